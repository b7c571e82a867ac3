"""The server side of one vfio-user connection, as a sans-IO state machine.

Rules (spec 0.9.2 and what libvfio-user / QEMU do, facts sections 1-3):

  state             message from client                     outcome
  ----------------  --------------------------------------  -----------------------------------
  AWAITING_VERSION  command VERSION, valid                  Negotiated + reply; -> READY
  AWAITING_VERSION  command VERSION, invalid                Rejected(errno, close=True)
  AWAITING_VERSION  any other command                       Rejected(EINVAL, close=True)
  AWAITING_VERSION  a reply                                 Fatal -> CLOSED
  READY             command VERSION                         Rejected(EINVAL)  (second VERSION)
  READY             command DMA_READ/DMA_WRITE              Rejected(EINVAL)  (server-only)
  READY             command not in 1..18                    Rejected(EINVAL)
  READY             command 14 (DIRTY_PAGES, retired) from  Rejected(EINVAL)
                    a client without the 0.1 `migration`
                    capability in its VERSION
  READY             other command                           CommandReceived -> session
  READY             reply matching one of our requests      ReplyReceived
  READY             reply matching nothing                  Rejected(silent)  (logged, dropped)
  any               message type not command/reply          Fatal -> CLOSED
  any               size < 16                               Fatal -> CLOSED
  any               limit < size <= skip limit              Rejected(E2BIG); payload skipped
  any               size > skip limit (4 x limit, >= 1 MiB) Rejected(E2BIG, close=True)
                                                            (never wait for gigabytes)
  any               end of stream                           -> CLOSED
  CLOSED            anything                                ignored

  Rejected commands are answered with a header-only error reply, unless they carry NO_REPLY
  (then nothing at all is sent: QEMU cannot cope with unexpected replies). fds that came with
  a rejected message are handed back in the event for the runtime to close.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Collection
from dataclasses import dataclass, field

from .constants import (
    FLAGS_TYPE_MASK,
    HEADER_SIZE,
    SERVER_TO_CLIENT_COMMANDS,
    Command,
    MsgType,
)
from .errors import ProtocolError
from .framer import InPlaceMessage, Message, MessageFramer, Oversized
from .header import Header, pack_error_reply, pack_message, pack_reply, pack_reply_header
from .messages import VersionPayload
from .version import ClientCapabilities, ServerCapabilities, negotiate


class ConnState(enum.Enum):
    AWAITING_VERSION = "awaiting-version"
    READY = "ready"
    CLOSED = "closed"


# -- events --------------------------------------------------------------------------------


@dataclass(slots=True)
class Negotiated:
    header: Header
    payload: bytes
    client: ClientCapabilities
    reply: bytes  # the VERSION reply, ready to send


@dataclass(slots=True)
class CommandReceived:
    header: Header
    #: A view for a command received in place (see ServerConnection): valid until the next
    #: event is taken.
    payload: bytes | memoryview
    fds: list[int] = field(default_factory=list)


@dataclass(slots=True)
class ReplyReceived:
    header: Header
    payload: bytes
    request_command: int
    fds: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Rejected:
    """A message refused before it reaches the session.

    ``reply`` is the error reply to send (None when the command had NO_REPLY or was itself a
    reply); ``close`` says the connection must be closed after sending it.
    """

    header: Header
    error: ProtocolError
    reply: bytes | None
    fds: list[int] = field(default_factory=list)
    close: bool = False


@dataclass(slots=True)
class Fatal:
    reason: str
    fds: list[int] = field(default_factory=list)


Event = Negotiated | CommandReceived | ReplyReceived | Rejected | Fatal

_VALID_CLIENT_COMMANDS = frozenset(int(c) for c in Command) - {
    int(c) for c in SERVER_TO_CLIENT_COMMANDS
}
#: The last row of the table, taken first because nearly every message is one: a command
#: of a READY connection that goes to the session as it is. Plain ints and module constants,
#: since enum attribute lookups cost real time per message on Python 3.11.
_ORDINARY_COMMANDS = _VALID_CLIENT_COMMANDS - {int(Command.VERSION), int(Command.DIRTY_PAGES)}
_READY = ConnState.READY
_CLOSED = ConnState.CLOSED
_COMMAND = int(MsgType.COMMAND)


class ServerConnection:
    """``in_place``: commands whose large payloads are received into one buffer the
    connection reuses (see protocol.framer) rather than into a new bytes object each: their
    CommandReceived carries a view of it, valid only until the next event is taken, so the
    runtime must be done with it (or copy it) before it asks for the next one."""

    def __init__(
        self,
        capabilities: ServerCapabilities,
        max_message_size: int,
        *,
        in_place: Collection[int] = (),
    ) -> None:
        self.capabilities = capabilities
        self.state = ConnState.AWAITING_VERSION
        self.client: ClientCapabilities | None = None
        self._in_place = frozenset(int(command) for command in in_place)
        self._payload_buffer = bytearray()
        self._framer = MessageFramer(max_message_size, self._place if self._in_place else None)
        self._next_request_id = 1
        self._pending: dict[int, int] = {}  # our msg_id -> command, for server->client requests
        self._eof = False

    # -- input ---------------------------------------------------------------------------
    def receive_data(
        self, data: bytes | bytearray | memoryview, fds: list[int] | None = None
    ) -> None:
        self._framer.feed(data, fds)

    def receive_buffer(self) -> memoryview | None:
        """Where the next received bytes must go (a payload received in place), or None
        when they are simply given to :meth:`receive_data`."""
        return self._framer.receive_buffer()

    def received(self, count: int, fds: list[int] | None = None) -> None:
        """``count`` bytes (and ``fds``) were received into :meth:`receive_buffer`."""
        self._framer.received(count, fds)

    def _place(self, header: Header) -> memoryview | None:
        """The reused buffer for an in-place command's payload (MessageFramer's ``place``)."""
        if (
            self.state is not _READY
            or header.flags & FLAGS_TYPE_MASK != _COMMAND
            or header.command not in self._in_place
        ):
            return None
        size = header.size - HEADER_SIZE
        if len(self._payload_buffer) < size:
            # Grown, never shrunk (up to the message size limit). A new buffer rather than
            # a resize: a view of the old one may still be alive.
            self._payload_buffer = bytearray(size)
        return memoryview(self._payload_buffer)[:size]

    def receive_eof(self) -> None:
        # Whole messages that arrived before the end of stream are still handed out (in the
        # state they arrived in); the connection is CLOSED once they are drained.
        self._eof = True
        if not self._framer.buffered:
            self.state = ConnState.CLOSED

    def next_event(self) -> Event | None:
        if self.state is _CLOSED:
            return None
        try:
            item = self._framer.next_message()
        except ProtocolError as exc:
            self.state = ConnState.CLOSED
            return Fatal(str(exc), self._framer.take_all_fds())
        if item is None:
            if self._eof:
                self.state = ConnState.CLOSED
            return None
        if isinstance(item, InPlaceMessage):  # only a READY connection's ordinary command
            return CommandReceived(item.header, item.payload, item.fds)
        if isinstance(item, Oversized):
            over = f"message of {item.header.size} bytes over the limit"
            if not item.skipped:
                over += " (past the skip limit: not skipped, the connection ends)"
            error = ProtocolError(errno.E2BIG, over)
            return self._reject(item.header, error, item.fds, close=not item.skipped)
        return self._classify(item)

    def take_orphan_fds(self) -> list[int]:
        return self._framer.take_orphan_fds()

    def take_all_fds(self) -> list[int]:
        return self._framer.take_all_fds()

    # -- the rules table -----------------------------------------------------------------
    def _classify(self, msg: Message) -> Event:
        header = msg.header
        msg_type = header.flags & FLAGS_TYPE_MASK
        if self.state is _READY and msg_type == _COMMAND and header.command in _ORDINARY_COMMANDS:
            return CommandReceived(header, msg.payload, msg.fds)
        if msg_type == MsgType.REPLY and self.state is ConnState.AWAITING_VERSION:
            self.state = ConnState.CLOSED
            return Fatal("a reply before VERSION", msg.fds)
        if msg_type == MsgType.REPLY:
            return self._reply(msg)
        if msg_type != MsgType.COMMAND:
            self.state = ConnState.CLOSED
            return Fatal(f"message type {msg_type} is neither command nor reply", msg.fds)
        if self.state is ConnState.AWAITING_VERSION:
            return self._first_command(msg)
        if header.command == Command.VERSION:
            return self._reject(header, ProtocolError(errno.EINVAL, "VERSION again"), msg.fds)
        if header.command not in _VALID_CLIENT_COMMANDS or (
            header.command == Command.DIRTY_PAGES and not self._speaks_0_1_migration()
        ):
            return self._reject(
                header,
                ProtocolError(errno.EINVAL, f"command {header.command_name()} not served"),
                msg.fds,
            )
        return CommandReceived(header, msg.payload, msg.fds)

    def _speaks_0_1_migration(self) -> bool:
        """Protocol 0.1 clients announce dirty-page tracking with ``migration``."""
        return self.client is not None and self.client.migration_pgsize is not None

    def _first_command(self, msg: Message) -> Event:
        header = msg.header
        if header.command != Command.VERSION:
            error = ProtocolError(errno.EINVAL, f"{header.command_name()} before VERSION")
            return self._reject(header, error, msg.fds, close=True)
        if msg.fds:
            error = ProtocolError(errno.EINVAL, "VERSION carrying fds")
            return self._reject(header, error, msg.fds, close=True)
        try:
            client, reply = negotiate(VersionPayload.unpack(msg.payload), self.capabilities)
        except ProtocolError as exc:
            return self._reject(header, exc, msg.fds, close=True)
        self.client = client
        self.state = ConnState.READY
        return Negotiated(
            header, msg.payload, client, pack_reply(header.msg_id, Command.VERSION, reply.pack())
        )

    def _reply(self, msg: Message) -> Event:
        command = self._pending.pop(msg.header.msg_id, None)
        if command is None or command != msg.header.command:
            error = ProtocolError(errno.EINVAL, f"reply id {msg.header.msg_id} matches nothing")
            return Rejected(msg.header, error, None, msg.fds)
        return ReplyReceived(msg.header, msg.payload, command, msg.fds)

    def _reject(
        self, header: Header, error: ProtocolError, fds: list[int], *, close: bool = False
    ) -> Rejected:
        if close:
            self.state = ConnState.CLOSED
        reply = self.error_reply(header, error.errno, error.message)
        return Rejected(header, error, reply, fds, close)

    # -- output --------------------------------------------------------------------------
    def reply(self, request: Header, payload: bytes = b"") -> bytes | None:
        """The reply to ``request``; None when the request asked for no reply."""
        if request.no_reply:
            return None
        return pack_reply(request.msg_id, request.command, payload)

    def reply_header(self, request: Header, payload_size: int) -> bytes | None:
        """The header of the reply to ``request`` whose payload follows it separately; None
        when the request asked for no reply."""
        if request.no_reply:
            return None
        return pack_reply_header(request.msg_id, request.command, payload_size)

    def error_reply(self, request: Header, err: int, detail: str = "") -> bytes | None:
        """The error reply to ``request``: header-only, or with ``detail`` (the reason) for
        a client that negotiated ``error_detail``; None when no reply is wanted."""
        if request.no_reply or not request.is_command:
            return None
        if self.client is None or not self.client.error_detail:
            detail = ""
        return pack_error_reply(request.msg_id, request.command, err, detail)

    def request(self, command: Command, payload: bytes) -> tuple[int, bytes]:
        """A server->client command (DMA_READ/DMA_WRITE): its msg_id and bytes."""
        msg_id = self._allocate_id()
        self._pending[msg_id] = command
        return msg_id, pack_message(msg_id, command, payload)

    def forget_request(self, msg_id: int) -> None:
        self._pending.pop(msg_id, None)

    def _allocate_id(self) -> int:
        for _ in range(0x10000):
            msg_id = self._next_request_id
            self._next_request_id = (msg_id + 1) & 0xFFFF
            if msg_id not in self._pending:
                return msg_id
        raise ProtocolError(errno.EAGAIN, "all 65536 request ids are in flight")

    @property
    def max_reply_size(self) -> int:
        return HEADER_SIZE + (self.client.max_data_xfer_size if self.client else 0)
