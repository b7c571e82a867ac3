"""A trio vfio-user client covering the whole protocol (spec 0.9.2).

Used by tests, scripts, ``vfio-user-emu info`` and the migration driver, so replies are
validated at least as strictly as libvfio-user's client does (facts 1.5, 10.3): the reply
must answer the command that was sent (same msg_id and command), its payload has the exact
size the command defines, fds are only accepted where the protocol allows them, and error
replies are header-only.

Structure: one receive task reads the socket, frames messages with
:class:`protocol.framer.MessageFramer` and hands each reply to the request waiting for its
msg_id, so any number of tasks may have requests in flight at once. Server->client commands
(DMA_READ / DMA_WRITE) are served by the receive task from the memory registered with
:meth:`Client.serve_dma`; their replies go out through a queue drained by a second task, so
the receive task never blocks on sending (which could deadlock against a server that is
itself blocked sending to us).

Error classes: :class:`ClientError` (the server answered with an error reply, or anything
else that failed a request), :class:`InvalidReply` (the server broke the protocol),
:class:`ConnectionLost` (the connection is gone). Both are ClientError subclasses.
A reply that cannot be matched to any request breaks the whole connection: with pipelining
there is no way to know which request it was meant for.
"""

from __future__ import annotations

import errno as _errno
import json
import math
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import trio

from emulator.transport import (
    Part,
    TransportError,
    after,
    close_fds,
    enlarge_send_buffer,
    receive_chunk,
    receive_chunk_nowait,
    receive_into,
    receive_into_nowait,
    send_gathered,
    send_gathered_nowait,
    send_message,
)
from protocol.constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    FEATURE_GET,
    FEATURE_PROBE,
    FEATURE_SET,
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAGS_TYPE_MASK,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    QEMU_MAX_XFER_SIZE,
    Command,
    DeviceFeature,
    DmaMapFlags,
    DmaUnmapFlags,
    MsgType,
    RegionFlags,
)
from protocol.errors import ProtocolError
from protocol.framer import InPlaceMessage, Message, MessageFramer, Oversized
from protocol.header import (
    HEADER,
    MAX_ERROR_DETAIL,
    Header,
    pack_error_reply,
    pack_message,
    pack_reply,
)
from protocol.messages import (
    U64,
    DeviceFeatureMsg,
    DeviceInfo,
    DmaData,
    DmaMap,
    DmaRw,
    DmaUnmap,
    IrqInfo,
    IrqSet,
    MigDataRead,
    MigDeviceState,
    PrecopyInfo,
    RegionAccess,
    RegionCap,
    RegionData,
    RegionInfo,
    RegionIoFds,
    RegionWriteMulti,
    VersionPayload,
    WriteMultiEntry,
    unpack_region_caps,
)
from protocol.version import parse_capabilities_json, parse_client_version

__all__ = [
    "Client",
    "ClientError",
    "ConnectionLost",
    "DmaMemory",
    "GuestMemory",
    "InvalidReply",
    "RegionDescription",
]

#: What we tell the server about ourselves unless the caller passes its own capabilities.
DEFAULT_CAPABILITIES: dict[str, Any] = {
    "max_msg_fds": 16,
    "max_data_xfer_size": DEFAULT_MAX_DATA_XFER_SIZE,
    "error_detail": True,  # our extension: refusals come back with the server's reason
}
#: libvfio-user's client clamps errnos outside 1..4096 to EINVAL (SERVER_MAX_ERROR_NO).
MAX_ERRNO = 4096
#: Bytes per recvmsg.
RECV_BYTES = 1 << 16
#: Reads the receive task does back to back before it lets other tasks run.
RECEIVE_BUDGET = 64
#: Room for fds per recvmsg: Linux's SCM_MAX_FD, so the kernel never has to drop any; fds
#: the protocol does not allow are closed by us and the request fails instead.
RECV_FDS = 253
#: Largest message we buffer (a bigger one is skipped and its request fails with E2BIG).
MAX_MESSAGE_SIZE = QEMU_MAX_XFER_SIZE + 4096
#: How often GET_REGION_INFO / GET_REGION_IO_FDS may ask again with a larger argsz.
MAX_ARGSZ_RETRIES = 4

_REPLY_FLAGS = MsgType.REPLY | FLAG_ERROR
_MIG_HEADER = 8  # argsz + size in front of MIG_DATA payloads


def _as_command(command: int) -> Command | int:
    try:
        return Command(command)
    except ValueError:
        return command


def _command_name(command: int) -> str:
    cmd = _as_command(command)
    return cmd.name if isinstance(cmd, Command) else f"UNKNOWN({cmd})"


# --------------------------------------------------------------------------------------------
# errors


class ClientError(Exception):
    """A request failed; ``errno`` is the server's (clamped) errno or our own diagnosis."""

    def __init__(self, errno: int, command: Command | int, message: str | None = None) -> None:
        self.errno = errno
        self.command = _as_command(command)
        self.message = message if message is not None else os.strerror(errno)
        super().__init__(errno, self.command, self.message)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{_command_name(self.command)}: {name}: {self.message}"


class InvalidReply(ClientError):
    """The server's reply broke the protocol (wrong size, id, fds, ...); errno EPROTO."""

    def __init__(self, command: Command | int, message: str, errno: int = _errno.EPROTO) -> None:
        super().__init__(errno, command, message)


class ConnectionLost(ClientError):
    """The connection is closed or unusable; every pending and later request fails."""


# --------------------------------------------------------------------------------------------
# public data types


@dataclass(slots=True)
class RegionDescription:
    """A GET_REGION_INFO answer. The caller owns ``fd`` (close it when done)."""

    info: RegionInfo
    caps: list[RegionCap]
    fd: int | None = None


class DmaMemory(Protocol):
    """Guest memory the server reaches with DMA_READ / DMA_WRITE. Raise to signal a fault."""

    def read(self, address: int, count: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...


class GuestMemory:
    """A bytearray standing for guest memory at ``[base, base + size)``."""

    def __init__(self, base: int, size: int, fill: int = 0) -> None:
        if base < 0 or size < 0:
            raise ValueError("negative base or size")
        self.base = base
        self.data = bytearray([fill]) * size

    @property
    def size(self) -> int:
        return len(self.data)

    def _offset(self, address: int, count: int) -> int:
        offset = address - self.base
        if offset < 0 or count < 0 or offset + count > len(self.data):
            raise ValueError(f"[{address:#x}, +{count:#x}) outside guest memory")
        return offset

    def read(self, address: int, count: int) -> bytes:
        offset = self._offset(address, count)
        return bytes(self.data[offset : offset + count])

    def write(self, address: int, data: bytes) -> None:
        offset = self._offset(address, len(data))
        self.data[offset : offset + len(data)] = data


# --------------------------------------------------------------------------------------------
# the client


class _Pending:
    """One request waiting for its reply."""

    __slots__ = (
        "abandoned",
        "command",
        "error",
        "event",
        "fds",
        "header",
        "in_place",
        "into",
        "payload",
    )

    def __init__(self, command: int, into: bytearray | None = None) -> None:
        self.command = command
        self.event = trio.Event()
        self.header: Header | None = None
        self.payload = b""
        self.fds: list[int] = []
        self.error: ClientError | None = None
        self.abandoned = False
        #: Where a large reply payload is received (see Client._place_reply), and the view
        #: of it once it was received there.
        self.into = into
        self.in_place: memoryview | None = None


class InFlight:
    """A request that was sent and whose reply is still to come (:meth:`Client.send_request`)."""

    def __init__(self, client: Client, command: int, waiter: _Pending) -> None:
        self.client = client
        self.command = command
        self._waiter = waiter

    async def reply(self) -> tuple[Header, bytes, list[int]]:
        """Wait for the reply: ``(header, payload, fds)`` as :meth:`Client.request` returns
        it (and with the same errors). Cancelled, the reply is dropped when it comes."""
        waiter = self._waiter
        try:
            await waiter.event.wait()
        except BaseException:
            self.abandon()  # the receive task drops the reply quietly
            raise
        if waiter.error is not None:
            raise waiter.error
        header = waiter.header
        assert header is not None
        return header, waiter.payload, self.client._check_reply(self.command, header, waiter)

    @property
    def received_in_place(self) -> memoryview | None:
        """After :meth:`reply`: the payload, when it was received into the buffer the
        request named (``payload`` is then empty)."""
        return self._waiter.in_place

    def abandon(self) -> None:
        """Not waiting for the reply after all (it is dropped when it comes)."""
        if self._waiter.event.is_set():
            close_fds(self._waiter.fds)
        else:
            self._waiter.abandoned = True
            if self._waiter.into is not None:
                # The reply may still be received into that buffer: never lend it again.
                self.client._forget_receive_buffers()


class _Broken:
    """Why the connection stopped working, turned into a fresh error for each request."""

    def __init__(self, kind: type[ClientError], errno: int, message: str) -> None:
        self.kind = kind
        self.errno = errno
        self.message = message

    def error(self, command: int) -> ClientError:
        if self.kind is InvalidReply:
            return InvalidReply(command, self.message, self.errno)
        return self.kind(self.errno, command, self.message)


class Client:
    """A vfio-user client connection. Create it with :meth:`connect` or :meth:`from_socket`."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        capabilities: dict[str, Any] | None = None,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        self._sock = sock
        #: A non-blocking stdlib twin of the socket (a dup), for sends and receives that
        #: need not wait: no trip through trio's scheduler each (see _send, _receive_loop).
        #: None for a test's stand-in socket, which then sees every send and receive.
        self._raw: socket.socket | None = None
        if isinstance(sock, trio.socket.SocketType):
            enlarge_send_buffer(sock)
            self._raw = socket.socket(fileno=os.dup(sock.fileno()))
            self._raw.setblocking(False)
        self.trace = trace
        self.capabilities: dict[str, Any] = dict(
            DEFAULT_CAPABILITIES if capabilities is None else capabilities
        )
        xfer = self.capabilities.get("max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE)
        #: DMA_READ / DMA_WRITE counts above this (what we advertised) are refused (E2BIG).
        self.max_data_xfer_size = (
            xfer if isinstance(xfer, int) and xfer > 0 else DEFAULT_MAX_DATA_XFER_SIZE
        )
        #: The server's ``capabilities`` object from its VERSION reply.
        self.server_caps: dict[str, Any] = {}
        #: Negotiated protocol minor version (the server's reply).
        self.minor = 0
        self.major = PROTOCOL_MAJOR
        self.server_max_msg_fds = 1
        self.server_max_data_xfer_size = DEFAULT_MAX_DATA_XFER_SIZE
        self._memory: DmaMemory | None = None
        self._framer = MessageFramer(MAX_MESSAGE_SIZE, self._place_reply)
        self._receive_buffers: list[bytearray] = []
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._send_lock = trio.Lock()
        self._replies_in, self._replies_out = trio.open_memory_channel[bytes](math.inf)
        self._background_scope = trio.CancelScope()
        self._broken: _Broken | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        capabilities: dict[str, Any] | None = None,
        minor: int = PROTOCOL_MINOR,
        trace: Callable[[str], None] | None = None,
    ) -> AsyncIterator[Client]:
        """Connect to the UNIX socket at ``path`` and negotiate VERSION.

        ``capabilities`` replaces the default capabilities object we send (it is sent as
        ``{"capabilities": ...}``); everything is closed when the context exits.
        """
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        async with cls.from_socket(
            sock, capabilities=capabilities, minor=minor, trace=trace
        ) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def from_socket(
        cls,
        sock: trio.socket.SocketType,
        *,
        capabilities: dict[str, Any] | None = None,
        minor: int = PROTOCOL_MINOR,
        trace: Callable[[str], None] | None = None,
        negotiate: bool = True,
    ) -> AsyncIterator[Client]:
        """Run a client on an already connected socket (which it takes over and closes).

        With ``negotiate=False`` no VERSION is sent (for tests of the server's handshake
        rules, using :meth:`request` / :meth:`send_raw`).
        """
        client = cls(sock, capabilities=capabilities, trace=trace)
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._background)
                try:
                    if negotiate:
                        await client.negotiate(minor)
                    yield client
                except BaseException as exc:
                    # Re-raised outside the nursery so callers see their own exception
                    # rather than an ExceptionGroup wrapping it.
                    body_error = exc
                finally:
                    client._shutdown()
        finally:
            client._shutdown()
        if body_error is not None:
            raise body_error

    async def aclose(self) -> None:
        """Close the connection; pending and later requests fail with ConnectionLost."""
        self._shutdown()
        await trio.lowlevel.checkpoint()

    @property
    def closed(self) -> bool:
        return self._closed

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._break(_Broken(ConnectionLost, _errno.ECONNABORTED, "client closed"))
        self._background_scope.cancel()
        self._replies_in.close()
        close_fds(self._framer.take_all_fds())
        if self._raw is not None:
            trio.lowlevel.notify_closing(self._raw)
            self._raw.close()
        self._sock.close()

    def _break(self, why: _Broken) -> None:
        """Mark the connection unusable and fail every request still waiting."""
        if self._broken is None:
            self._broken = why
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if waiter.event.is_set():
                continue
            waiter.error = self._broken.error(waiter.command)
            waiter.event.set()

    # -- VERSION --------------------------------------------------------------------------

    async def negotiate(self, minor: int = PROTOCOL_MINOR) -> None:
        """Send VERSION (major 0, ``minor``, our capabilities) and check the reply.

        The reply must carry major 0, a minor not above ours and a NUL-terminated JSON
        object whose known capabilities have the right types.
        """
        caps_json = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"))
        payload = VersionPayload(PROTOCOL_MAJOR, minor, caps_json).pack()
        _, reply, fds = await self.request(Command.VERSION, payload)
        self._no_fds(Command.VERSION, fds)
        with _parsing(Command.VERSION):
            version = VersionPayload.unpack(reply)
            if version.json_text is None:
                raise ProtocolError(_errno.EINVAL, "VERSION reply without JSON")
            if version.major != PROTOCOL_MAJOR:
                raise ProtocolError(_errno.EINVAL, f"VERSION reply major {version.major}")
            if version.minor > minor:
                raise ProtocolError(
                    _errno.EINVAL, f"VERSION reply minor {version.minor} > proposed {minor}"
                )
            # Same strictness as for a client's VERSION: known keys must have the right type.
            parsed = parse_client_version(version)
            caps = parse_capabilities_json(version.json_text)
        twin = caps.get("twin_socket")
        if isinstance(twin, dict) and twin.get("supported"):
            raise InvalidReply(Command.VERSION, "server enabled twin_socket (not supported here)")
        self.server_caps = caps
        self.major = version.major
        self.minor = version.minor
        self.server_max_msg_fds = parsed.max_msg_fds
        self.server_max_data_xfer_size = parsed.max_data_xfer_size

    # -- raw requests ---------------------------------------------------------------------

    def _allocate_id(self) -> int:
        for _ in range(0x10000):
            msg_id = self._next_id
            self._next_id = (msg_id + 1) & 0xFFFF
            if msg_id not in self._pending:
                return msg_id
        raise ClientError(_errno.EAGAIN, 0, "all 65536 message ids are in flight")

    def _check_usable(self, command: int) -> None:
        if self._broken is not None:
            raise self._broken.error(command)

    async def _send(
        self, data: bytes | bytearray | list[Part], fds: Sequence[int], command: int
    ) -> None:
        """Send one message: bytes, or a list of parts (header first) sent gathered.

        The fast path: when nobody is in the middle of a message (the send lock is free)
        and no fds go along, one non-blocking ``sendmsg`` on the twin socket usually takes
        it all, without a scheduler pass; the rest of a partial send follows under the lock
        before anything else is sent (the lock is taken before anything yields)."""
        raw = self._raw
        lock = self._send_lock
        if raw is None or fds or lock.locked():
            async with lock:
                await self._send_locked(data, fds, command)
            return
        self._check_usable(command)
        self._trace_send(data, fds)
        parts = data if isinstance(data, list) else [data]
        try:
            sent = send_gathered_nowait(raw, parts)
        except OSError as exc:
            self._send_failed(exc, command)
        if sent == sum(len(part) for part in parts):
            return
        lock.acquire_nowait()
        try:
            await self._send_shielded(after(parts, sent), (), command)
        finally:
            lock.release()

    async def _send_locked(
        self, data: bytes | bytearray | list[Part], fds: Sequence[int], command: int
    ) -> None:
        self._check_usable(command)
        self._trace_send(data, fds)
        await self._send_shielded(data, fds, command)

    async def _send_shielded(
        self, data: bytes | bytearray | list[Part], fds: Sequence[int], command: int
    ) -> None:
        # Shielded: a half-sent message would corrupt the stream. A send stuck on a
        # server that stopped reading is undone by aclose(), which closes the socket.
        with trio.CancelScope(shield=True):
            try:
                if isinstance(data, list):
                    await send_gathered(self._sock, data, fds)
                else:
                    await send_message(self._sock, data, fds)
            except (OSError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
                self._send_failed(exc, command)

    def _send_failed(self, exc: BaseException, command: int) -> NoReturn:
        why = _Broken(ConnectionLost, _errno_of(exc), f"send failed: {exc!r}")
        self._break(why)
        raise why.error(command) from exc

    def _trace_send(self, data: bytes | bytearray | list[Part], fds: Sequence[int]) -> None:
        if self.trace is not None:
            head = data[0] if isinstance(data, list) else data
            if len(head) >= HEADER.size:
                self._trace("->", Header.unpack(head), len(fds))
            else:
                self.trace(f"-> {len(head)} raw bytes, fds={len(fds)}")

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (e.g. a malformed message); no reply is awaited.

        A reply the server sends to it arrives unexpected and breaks the connection; use
        :meth:`request` for anything that gets an answer.
        """
        command = Header.unpack(data).command if len(data) >= HEADER.size else 0
        await self._send(data, fds, command)

    async def request(
        self,
        command: int,
        payload: bytes = b"",
        *,
        fds: Sequence[int] = (),
        no_reply: bool = False,
    ) -> tuple[Header, bytes, list[int]]:
        """Send one command and wait for its reply: ``(reply header, payload, fds)``.

        The caller owns the returned fds. An error reply raises :class:`ClientError` with the
        server's errno (clamped to EINVAL when <= 0 or > 4096 like libvfio-user); a reply
        with another command number, unexpected flags, or an error reply with a payload or
        fds raises :class:`InvalidReply`. With ``no_reply`` the command carries NO_REPLY,
        nothing is awaited and the header that was *sent* is returned with b"" and [].
        """
        if no_reply:
            self._check_usable(command)
            data = pack_message(
                self._allocate_id(), command, payload, MsgType.COMMAND | FLAG_NO_REPLY
            )
            await self._send(data, fds, command)
            return Header.unpack(data), b"", []
        return await (await self.send_request(command, payload, fds=fds)).reply()

    async def send_request(
        self, command: int, payload: bytes = b"", *, fds: Sequence[int] = ()
    ) -> InFlight:
        """Send one command and return at once; :meth:`InFlight.reply` waits for its reply.
        Requests are sent (and served) in the order of these calls, so several may be in
        flight: the migration driver keeps its reads and writes of migration data going
        while the previous ones are answered."""
        return await self._send_request(command, (payload,), fds)

    async def _send_request(
        self,
        command: int,
        parts: Sequence[Part],
        fds: Sequence[int],
        *,
        into: bytearray | None = None,
    ) -> InFlight:
        """:meth:`send_request` of a payload made of ``parts``, sent gathered after the
        header (never joined: migration data goes out from the buffer it came in). A large
        reply payload is received into ``into`` when it fits (see :meth:`_place_reply`)."""
        self._check_usable(command)
        msg_id = self._allocate_id()
        size = HEADER.size + sum(len(part) for part in parts)
        head = HEADER.pack(msg_id, command, size, MsgType.COMMAND, 0)
        waiter = _Pending(command, into)
        self._pending[msg_id] = waiter
        try:
            await self._send([head, *parts], fds, command)
        except BaseException:
            if self._pending.get(msg_id) is waiter:
                del self._pending[msg_id]
            raise
        return InFlight(self, command, waiter)

    def _error_detail(self, command: int, payload: bytes) -> str | None:
        """The server's reason for an error (the ``error_detail`` extension), or None."""
        if not payload:
            return None
        if self.server_caps.get("error_detail") is not True or len(payload) > MAX_ERROR_DETAIL:
            raise InvalidReply(command, f"error reply with {len(payload)} payload bytes")
        return payload.decode("utf-8", "replace")

    def _check_reply(self, command: int, header: Header, waiter: _Pending) -> list[int]:
        fds = waiter.fds
        try:
            if header.command != command:
                raise InvalidReply(
                    command, f"reply carries command {_command_name(header.command)}"
                )
            if header.flags & ~_REPLY_FLAGS:
                raise InvalidReply(command, f"reply flags {header.flags:#x}")
            if header.is_error:
                detail = self._error_detail(command, waiter.payload)
                if fds:
                    raise InvalidReply(command, f"error reply with {len(fds)} fd(s)")
                err = header.error
                raise ClientError(err if 0 < err <= MAX_ERRNO else _errno.EINVAL, command, detail)
        except ClientError:
            close_fds(fds)
            raise
        return fds

    # -- typed commands -------------------------------------------------------------------

    @staticmethod
    def _no_fds(command: int, fds: list[int]) -> None:
        if fds:
            close_fds(fds)
            raise InvalidReply(command, f"{len(fds)} unexpected fd(s) with the reply")

    @staticmethod
    def _exact(command: int, payload: bytes, size: int) -> None:
        if len(payload) != size:
            raise InvalidReply(
                command, f"reply payload of {len(payload)} bytes, expected exactly {size}"
            )

    async def _call(
        self, command: Command, payload: bytes = b"", *, fds: Sequence[int] = (), size: int = 0
    ) -> bytes:
        """A request whose reply has exactly ``size`` payload bytes and no fds."""
        _, reply, got = await self.request(command, payload, fds=fds)
        self._no_fds(command, got)
        self._exact(command, reply, size)
        return reply

    async def get_info(self) -> DeviceInfo:
        cmd = Command.DEVICE_GET_INFO
        reply = await self._call(cmd, DeviceInfo(DeviceInfo.SIZE, 0, 0, 0).pack(), size=16)
        with _parsing(cmd):
            return DeviceInfo.unpack(reply)

    async def get_region_info(self, index: int) -> RegionDescription:
        """Region ``index``: ask with argsz 32, again with the argsz the server needs.

        An fd is accepted only on a final reply that has CAPS (with a parsable chain) and
        MMAP set; at most one. fds on a truncated first reply are closed (as QEMU does).
        """
        cmd = Command.DEVICE_GET_REGION_INFO
        argsz = RegionInfo.SIZE
        for _ in range(MAX_ARGSZ_RETRIES):
            request = RegionInfo(argsz, 0, index, 0, 0, 0).pack()
            _, payload, fds = await self.request(cmd, request)
            try:
                with _parsing(cmd):
                    info = RegionInfo.unpack(payload)
                self._exact(cmd, payload, min(info.argsz, argsz))
                if info.index != index:
                    raise InvalidReply(cmd, f"reply for region {info.index}, asked {index}")
                if info.argsz > argsz:
                    if info.argsz > MAX_MESSAGE_SIZE:
                        raise InvalidReply(cmd, f"reply argsz {info.argsz} is absurd")
                    close_fds(fds)
                    fds = []
                    argsz = info.argsz
                    continue
                caps: list[RegionCap] = []
                if info.flags & RegionFlags.CAPS:
                    if not RegionInfo.SIZE <= info.cap_offset < info.argsz:
                        raise InvalidReply(cmd, f"cap_offset {info.cap_offset} out of range")
                    with _parsing(cmd):
                        caps = unpack_region_caps(payload, info.cap_offset)
                if fds and not (caps and info.flags & RegionFlags.MMAP and len(fds) == 1):
                    raise InvalidReply(
                        cmd,
                        f"{len(fds)} fd(s) with a reply of flags {info.flags:#x} and "
                        f"{len(caps)} cap(s) (one fd, only with caps and MMAP)",
                    )
            except BaseException:
                close_fds(fds)
                raise
            return RegionDescription(info, caps, fds[0] if fds else None)
        raise InvalidReply(cmd, "reply argsz keeps growing")

    async def get_irq_info(self, index: int) -> IrqInfo:
        cmd = Command.DEVICE_GET_IRQ_INFO
        reply = await self._call(cmd, IrqInfo(IrqInfo.SIZE, 0, index, 0).pack(), size=16)
        with _parsing(cmd):
            info = IrqInfo.unpack(reply)
        if info.index != index:
            raise InvalidReply(cmd, f"reply for irq index {info.index}, asked {index}")
        return info

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        """``count`` bytes at ``offset`` of ``region``; the reply must echo all three."""
        cmd = Command.REGION_READ
        _, payload, fds = await self.request(cmd, RegionAccess(offset, region, count).pack())
        self._no_fds(cmd, fds)
        if count == 0 and not payload:
            return b""  # libvfio-user answers a zero-length access header-only
        self._exact(cmd, payload, RegionAccess.SIZE + count)
        with _parsing(cmd):
            reply = RegionData.unpack(payload)
        if (reply.offset, reply.region, reply.count) != (offset, region, count):
            raise InvalidReply(
                cmd,
                f"reply for region {reply.region} offset {reply.offset:#x} count "
                f"{reply.count}, asked {region}/{offset:#x}/{count}",
            )
        return reply.data

    async def region_write(
        self, region: int, offset: int, data: bytes, *, posted: bool = False
    ) -> None:
        """Write ``data``; ``posted`` sends it NO_REPLY and does not wait."""
        cmd = Command.REGION_WRITE
        request = RegionData(offset, region, len(data), bytes(data)).pack()
        if posted:
            await self.request(cmd, request, no_reply=True)
            return
        _, payload, fds = await self.request(cmd, request)
        self._no_fds(cmd, fds)
        if not data and not payload:
            return
        self._exact(cmd, payload, RegionAccess.SIZE)
        with _parsing(cmd):
            reply = RegionAccess.unpack(payload)
        if (reply.offset, reply.region, reply.count) != (offset, region, len(data)):
            raise InvalidReply(
                cmd,
                f"reply for region {reply.region} offset {reply.offset:#x} count "
                f"{reply.count}, wrote {region}/{offset:#x}/{len(data)}",
            )

    async def region_write_multi(
        self, entries: Sequence[tuple[int, int, bytes]], *, posted: bool = True
    ) -> int | None:
        """REGION_WRITE_MULTI of ``(region, offset, data)`` entries (data 1..8 bytes).

        Posted (NO_REPLY, as QEMU always sends it) returns None; otherwise the number of
        writes the server reports completed.
        """
        cmd = Command.REGION_WRITE_MULTI
        if not entries:
            raise ValueError("REGION_WRITE_MULTI needs at least one entry")
        items = []
        for region, offset, data in entries:
            if not 1 <= len(data) <= 8:
                raise ValueError(f"REGION_WRITE_MULTI data of {len(data)} bytes (1..8)")
            items.append(WriteMultiEntry(offset, region, len(data), bytes(data)))
        request = RegionWriteMulti(tuple(items)).pack()
        if posted:
            await self.request(cmd, request, no_reply=True)
            return None
        reply = await self._call(cmd, request, size=U64.size)
        (done,) = U64.unpack(reply)
        if done > len(items):
            raise InvalidReply(cmd, f"{done} writes completed out of {len(items)}")
        return int(done)

    async def reset(self) -> None:
        await self._call(Command.DEVICE_RESET)

    async def dma_map(
        self,
        address: int,
        size: int,
        *,
        fd: int | None = None,
        offset: int = 0,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        """Map ``[address, address + size)``; with ``fd`` the server may mmap it at ``offset``.

        The fd is only sent (the caller keeps its copy).
        """
        flags = (DmaMapFlags.READ if readable else 0) | (DmaMapFlags.WRITE if writable else 0)
        request = DmaMap(DmaMap.SIZE, flags, offset, address, size).pack()
        await self._call(Command.DMA_MAP, request, fds=() if fd is None else (fd,))

    async def dma_unmap(self, address: int = 0, size: int = 0, *, unmap_all: bool = False) -> None:
        """Unmap one mapping exactly, or everything (``unmap_all``, address = size = 0)."""
        cmd = Command.DMA_UNMAP
        flags = DmaUnmapFlags.ALL if unmap_all else 0
        request = DmaUnmap(DmaUnmap.SIZE, flags, address, size).pack_echo()
        reply = await self._call(cmd, request, size=DmaUnmap.SIZE)
        if reply != request:
            raise InvalidReply(cmd, "reply does not echo the request")

    async def set_irqs(
        self,
        index: int,
        flags: int,
        start: int,
        count: int,
        *,
        fds: Sequence[int] = (),
        data: bytes = b"",
    ) -> None:
        """SET_IRQS with argsz = 20 + len(data); eventfds travel as SCM_RIGHTS (``fds``)."""
        request = IrqSet(IrqSet.SIZE + len(data), flags, index, start, count, bytes(data))
        await self._call(Command.DEVICE_SET_IRQS, request.pack(), fds=fds)

    async def get_region_io_fds(self, index: int) -> tuple[RegionIoFds, list[int]]:
        """The ioeventfds of region ``index`` (spec 40-byte entries) and their fds.

        Asks with argsz 16 first, then with the argsz the server needs. The caller owns
        the returned fds.
        """
        cmd = Command.DEVICE_GET_REGION_IO_FDS
        argsz = RegionIoFds.HEADER_SIZE
        for _ in range(MAX_ARGSZ_RETRIES):
            _, payload, fds = await self.request(cmd, RegionIoFds(argsz, 0, index, 0).pack())
            try:
                with _parsing(cmd):
                    head = RegionIoFds.unpack(payload)
                self._exact(cmd, payload, min(head.argsz, argsz))
                if head.index != index:
                    raise InvalidReply(cmd, f"reply for region {head.index}, asked {index}")
                if head.argsz > argsz:
                    if head.argsz > MAX_MESSAGE_SIZE:
                        raise InvalidReply(cmd, f"reply argsz {head.argsz} is absurd")
                    if fds:
                        raise InvalidReply(cmd, f"{len(fds)} fd(s) with a truncated reply")
                    argsz = head.argsz
                    continue
                need = RegionIoFds.HEADER_SIZE + head.count * RegionIoFds.ENTRY_SIZE
                if head.argsz != need:
                    raise InvalidReply(
                        cmd, f"argsz {head.argsz} for {head.count} entries, expected {need}"
                    )
                with _parsing(cmd):
                    reply = RegionIoFds.unpack_reply(payload)
                if head.count and not fds:
                    raise InvalidReply(cmd, f"{head.count} entries but no fds")
                if len(fds) > head.count:
                    raise InvalidReply(cmd, f"{len(fds)} fds for {head.count} entries")
                for entry in reply.entries:
                    if entry.fd_index >= len(fds):
                        raise InvalidReply(cmd, f"fd_index {entry.fd_index} of {len(fds)} fds")
            except BaseException:
                close_fds(fds)
                raise
            return reply, fds
        raise InvalidReply(cmd, "reply argsz keeps growing")

    async def device_feature(
        self, flags: int, data: bytes = b"", argsz: int | None = None
    ) -> bytes:
        """DEVICE_FEATURE; returns the whole reply payload (argsz, flags, data).

        ``argsz`` defaults to the request size (at least 16 for a GET). SET and PROBE
        replies must echo the request byte for byte (libvfio-user's client memcmp()s them);
        a GET reply must keep our flags, declare its own size as argsz and fit our argsz.
        """
        cmd = Command.DEVICE_FEATURE
        is_get = bool(flags & FEATURE_GET) and not flags & FEATURE_PROBE
        if argsz is None:
            argsz = DeviceFeatureMsg.HEADER_SIZE + len(data)
            if is_get:
                argsz = max(argsz, 16)
        request = DeviceFeatureMsg(argsz, flags, bytes(data)).pack()
        _, payload, fds = await self.request(cmd, request)
        self._no_fds(cmd, fds)
        if not is_get:
            if payload != request:
                raise InvalidReply(cmd, "SET/PROBE reply does not echo the request")
            return payload
        with _parsing(cmd):
            reply = DeviceFeatureMsg.unpack(payload)
        if reply.flags != flags:
            raise InvalidReply(cmd, f"reply flags {reply.flags:#x}, sent {flags:#x}")
        if reply.argsz != len(payload):
            raise InvalidReply(cmd, f"reply argsz {reply.argsz} for {len(payload)} bytes")
        if len(payload) > argsz:
            raise InvalidReply(cmd, f"reply of {len(payload)} bytes exceeds argsz {argsz}")
        return payload

    async def mig_precopy_info(self) -> tuple[int, int]:
        """MIG_GET_PRECOPY_INFO (19, the ``precopy_info`` extension): ``(initial_bytes,
        dirty_bytes)`` the device has for us now, in PRE_COPY."""
        cmd = Command.MIG_GET_PRECOPY_INFO
        request = PrecopyInfo(PrecopyInfo.SIZE, 0, 0, 0).pack()
        _, payload, fds = await self.request(cmd, request)
        self._no_fds(cmd, fds)
        self._exact(cmd, payload, PrecopyInfo.SIZE)
        with _parsing(cmd):
            reply = PrecopyInfo.unpack(payload)
        return reply.initial_bytes, reply.dirty_bytes

    @property
    def data_fd_negotiated(self) -> bool:
        """The server agreed to pass migration data fds (the ``data_fd`` extension)."""
        migration = self.server_caps.get("migration")
        return isinstance(migration, dict) and migration.get("data_fd") is True

    async def set_mig_state(self, state: int) -> int | None:
        """SET MIG_DEVICE_STATE; returns the data fd the server passed (caller owns it).

        Without the ``data_fd`` extension the reply must echo the request byte for byte.
        With it, the reply's data_fd field is 0 (the index of the one fd passed) when the
        transition opened a data session, else -1, and nothing else may differ.
        """
        cmd = Command.DEVICE_FEATURE
        flags = FEATURE_SET | DeviceFeature.MIG_DEVICE_STATE
        request = DeviceFeatureMsg(16, flags, MigDeviceState(state).pack()).pack()
        _, payload, fds = await self.request(cmd, request)
        if not self.data_fd_negotiated:
            self._no_fds(cmd, fds)
            if payload != request:
                raise InvalidReply(cmd, "SET reply does not echo the request")
            return None
        expected = request[:8] + MigDeviceState(state, 0 if fds else -1).pack()
        if payload != expected or len(fds) > 1:
            close_fds(fds)
            raise InvalidReply(cmd, "SET reply's data_fd does not match the fds passed")
        return fds[0] if fds else None

    async def mig_data_read(self, size: int) -> bytes:
        """Up to ``size`` bytes of migration data (fewer = end of data for now).

        Only the reply's ``size`` field counts: padding after the valid bytes (libvfio-user
        pads to the requested size) is tolerated and dropped.
        """
        return bytes(await self.mig_data_read_reply(await self.mig_data_read_send(size), size))

    async def mig_data_read_send(self, size: int, into: bytearray | None = None) -> InFlight:
        """Send MIG_DATA_READ of ``size`` bytes; :meth:`mig_data_read_reply` gets the data.

        With ``into`` (at least 8 + ``size`` bytes, e.g. from :meth:`receive_buffers`), a
        large reply is received straight into it: the caller must leave it alone until it
        has the reply and is done with its data."""
        request = MigDataRead(_MIG_HEADER + size, size).pack()
        return await self._send_request(Command.MIG_DATA_READ, (request,), (), into=into)

    async def mig_data_read_reply(self, sent: InFlight, size: int) -> memoryview:
        """The data of a MIG_DATA_READ sent with :meth:`mig_data_read_send`, as a view of
        the reply (not copied): of the ``into`` buffer when it was received there."""
        cmd = Command.MIG_DATA_READ
        _, reply, fds = await sent.reply()
        self._no_fds(cmd, fds)
        in_place = sent.received_in_place
        payload = reply if in_place is None else in_place
        if len(payload) < _MIG_HEADER:
            raise InvalidReply(cmd, f"reply of {len(payload)} bytes: no MIG_DATA header")
        argsz, valid = struct.unpack_from("<II", payload)
        if len(payload) < _MIG_HEADER + valid:
            raise InvalidReply(cmd, f"reply of {len(payload)} bytes announces {valid} data bytes")
        if valid > size:
            raise InvalidReply(cmd, f"{valid} bytes returned, asked at most {size}")
        if len(payload) > _MIG_HEADER + size:
            raise InvalidReply(cmd, f"reply of {len(payload)} bytes for {size} asked")
        if argsz < _MIG_HEADER + valid:
            raise InvalidReply(cmd, f"reply argsz {argsz} < 8 + {valid}")
        return memoryview(payload)[_MIG_HEADER : _MIG_HEADER + valid]

    async def mig_data_write(self, data: bytes | bytearray | memoryview) -> None:
        await self.mig_data_write_reply(await self.mig_data_write_send(data))

    async def mig_data_write_send(self, data: bytes | bytearray | memoryview) -> InFlight:
        """Send MIG_DATA_WRITE; :meth:`mig_data_write_reply` waits for the server's answer.
        ``data`` is sent from where it is (gathered after the header): once this returns,
        the kernel has it and the caller may reuse its buffer."""
        head = struct.pack("<II", _MIG_HEADER + len(data), len(data))
        return await self._send_request(Command.MIG_DATA_WRITE, (head, data), ())

    async def mig_data_write_reply(self, sent: InFlight) -> None:
        _, reply, fds = await sent.reply()
        self._no_fds(Command.MIG_DATA_WRITE, fds)
        self._exact(Command.MIG_DATA_WRITE, reply, 0)

    def receive_buffers(self, count: int, size: int) -> list[bytearray]:
        """``count`` buffers of ``size`` bytes to receive replies into (the ``into`` of
        :meth:`mig_data_read_send`). They are kept and lent again by later calls, so a
        migration does not page in fresh memory for every message; one user at a time."""
        kept = self._receive_buffers
        if len(kept) < count or any(len(buffer) < size for buffer in kept[:count]):
            kept[:] = [bytearray(size) for _ in range(count)]
        return kept[:count]

    def _forget_receive_buffers(self) -> None:
        self._receive_buffers = []

    def _place_reply(self, header: Header) -> memoryview | None:
        """Where the framer receives a large reply payload in place: the buffer its request
        named, when it fits (a larger reply is received as usual, then refused)."""
        if header.flags & (FLAGS_TYPE_MASK | FLAG_ERROR) != MsgType.REPLY:
            return None
        waiter = self._pending.get(header.msg_id)
        if waiter is None or waiter.into is None or waiter.abandoned:
            return None
        size = header.size - HEADER.size
        if waiter.command != header.command or size > len(waiter.into):
            return None
        return memoryview(waiter.into)[:size]

    # -- server -> client DMA -------------------------------------------------------------

    def serve_dma(self, memory: DmaMemory | None) -> None:
        """Serve the server's DMA_READ / DMA_WRITE from ``memory`` (None: answer EFAULT)."""
        self._memory = memory

    def _serve_command(self, msg: Message) -> bytes | None:
        """The reply to a server->client command (None when it asked for no reply)."""
        header = msg.header
        try:
            if msg.fds:
                raise ProtocolError(_errno.EINVAL, "server command carrying fds")
            if header.command == Command.DMA_READ:
                reply = self._dma_read(msg.payload)
            elif header.command == Command.DMA_WRITE:
                reply = self._dma_write(msg.payload)
            else:
                raise ProtocolError(_errno.ENOSYS, f"{header.command_name()} not served")
        except ProtocolError as exc:
            if self.trace is not None:
                self.trace(f"!! {header.command_name()} id={header.msg_id} refused: {exc}")
            return (
                None
                if header.no_reply
                else pack_error_reply(header.msg_id, header.command, exc.errno)
            )
        return None if header.no_reply else pack_reply(header.msg_id, header.command, reply)

    def _dma_memory(self, count: int) -> DmaMemory:
        if count > self.max_data_xfer_size:
            raise ProtocolError(_errno.E2BIG, f"DMA count {count} > {self.max_data_xfer_size}")
        if self._memory is None:
            raise ProtocolError(_errno.EFAULT, "no guest memory registered")
        return self._memory

    def _dma_read(self, payload: bytes) -> bytes:
        if len(payload) != DmaRw.SIZE:
            raise ProtocolError(_errno.EINVAL, f"DMA_READ payload of {len(payload)} bytes")
        request = DmaRw.unpack(payload)
        memory = self._dma_memory(request.count)
        try:
            data = bytes(memory.read(request.address, request.count))
        except Exception as exc:
            raise ProtocolError(_errno.EFAULT, f"DMA_READ fault: {exc}") from None
        if len(data) != request.count:
            raise ProtocolError(_errno.EFAULT, f"DMA_READ got {len(data)} bytes")
        return DmaData(request.address, request.count, data).pack()

    def _dma_write(self, payload: bytes) -> bytes:
        request = DmaData.unpack(payload)
        memory = self._dma_memory(request.count)
        try:
            memory.write(request.address, request.data)
        except Exception as exc:
            raise ProtocolError(_errno.EFAULT, f"DMA_WRITE fault: {exc}") from None
        return DmaRw(request.address, request.count).pack()

    # -- background tasks -----------------------------------------------------------------

    async def _background(self) -> None:
        with self._background_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reply_sender)
                await self._receive_loop()
                nursery.cancel_scope.cancel()

    async def _reply_sender(self) -> None:
        async for data in self._replies_out:
            try:
                await self._send(data, (), Header.unpack(data).command)
            except ClientError:
                return

    async def _receive_loop(self) -> None:
        framer = self._framer
        raw = self._raw
        budget = RECEIVE_BUDGET
        try:
            while True:
                if raw is None:
                    count, fds = await self._receive(framer)
                else:
                    # The twin socket: read until EAGAIN, and only then wait (a scheduler
                    # pass); every RECEIVE_BUDGET reads, let the other tasks run.
                    try:
                        count, fds = self._receive_nowait(raw, framer)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(raw)
                        budget = RECEIVE_BUDGET
                        continue
                    budget -= 1
                    if budget <= 0:
                        await trio.lowlevel.checkpoint()
                        budget = RECEIVE_BUDGET
                if not count:
                    close_fds(fds)
                    self._break(_Broken(ConnectionLost, _errno.ECONNRESET, "server hung up"))
                    return
                while (item := self._framer.next_message()) is not None:
                    self._dispatch(item)
                close_fds(self._framer.take_orphan_fds())
        except InvalidReply as exc:
            self._break(_Broken(InvalidReply, exc.errno, exc.message))
        except ProtocolError as exc:
            self._break(_Broken(InvalidReply, _errno.EPROTO, f"framing: {exc}"))
        except (OSError, TransportError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            self._break(_Broken(ConnectionLost, _errno_of(exc), f"receive failed: {exc!r}"))
        finally:
            close_fds(self._framer.take_all_fds())

    async def _receive(self, framer: MessageFramer) -> tuple[int, list[int]]:
        """Receive what comes next into the framer: the count of bytes (0: end of stream)
        and the fds. A payload received in place goes straight to its buffer."""
        if (place := framer.receive_buffer()) is not None:
            count, fds = await receive_into(self._sock, place, RECV_FDS)
            if count:
                framer.received(count, fds)
            return count, fds
        data, fds = await receive_chunk(self._sock, RECV_BYTES, RECV_FDS)
        if data:
            framer.feed(data, fds)
        return len(data), fds

    @staticmethod
    def _receive_nowait(raw: socket.socket, framer: MessageFramer) -> tuple[int, list[int]]:
        """:meth:`_receive` on the twin socket, without waiting (BlockingIOError)."""
        if (place := framer.receive_buffer()) is not None:
            count, fds = receive_into_nowait(raw, place, RECV_FDS)
            if count:
                framer.received(count, fds)
            return count, fds
        data, fds = receive_chunk_nowait(raw, RECV_BYTES, RECV_FDS)
        if data:
            framer.feed(data, fds)
        return len(data), fds

    def _dispatch(self, item: Message | InPlaceMessage | Oversized) -> None:
        header = item.header
        if self.trace is not None:
            self._trace("<-", header, len(item.fds))
        if isinstance(item, InPlaceMessage):  # a reply received into its request's buffer
            self._complete(header, b"", item.fds, None, item.payload)
            return
        kind = header.msg_type
        if isinstance(item, Oversized):
            close_fds(item.fds)
            error = InvalidReply(
                header.command, f"message of {header.size} bytes skipped", _errno.E2BIG
            )
            if kind == MsgType.REPLY:
                self._complete(header, b"", [], error)
            elif kind == MsgType.COMMAND and not header.no_reply:
                self._queue_reply(pack_error_reply(header.msg_id, header.command, _errno.E2BIG))
            return
        if kind == MsgType.REPLY:
            self._complete(header, item.payload, item.fds, None)
        elif kind == MsgType.COMMAND:
            close_fds(item.fds)
            reply = self._serve_command(item)
            if reply is not None:
                self._queue_reply(reply)
        else:
            close_fds(item.fds)
            raise InvalidReply(header.command, f"message type {header.flags & FLAGS_TYPE_MASK}")

    def _complete(
        self,
        header: Header,
        payload: bytes,
        fds: list[int],
        error: ClientError | None,
        in_place: memoryview | None = None,
    ) -> None:
        waiter = self._pending.pop(header.msg_id, None)
        if waiter is None:
            close_fds(fds)
            raise InvalidReply(
                header.command, f"reply id {header.msg_id} matches no request in flight"
            )
        if waiter.abandoned:
            close_fds(fds)
            return
        waiter.header = header
        waiter.payload = payload
        waiter.in_place = in_place
        waiter.fds = fds
        waiter.error = error
        waiter.event.set()

    def _queue_reply(self, data: bytes) -> None:
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):  # closing down
            self._replies_in.send_nowait(data)

    def _trace(self, direction: str, header: Header, nfds: int) -> None:
        assert self.trace is not None
        parts = [
            f"{direction} id={header.msg_id} {header.command_name()}",
            f"size={header.size} flags={header.flags:#x}",
        ]
        if header.is_error:
            parts.append(f"errno={header.error}")
        if nfds:
            parts.append(f"fds={nfds}")
        self.trace(" ".join(parts))


def _errno_of(exc: BaseException) -> int:
    value = getattr(exc, "errno", None)
    return value if isinstance(value, int) and value > 0 else _errno.ECONNRESET


@contextmanager
def _parsing(command: int) -> Iterator[None]:
    """Turn a codec's ProtocolError about a reply into InvalidReply."""
    try:
        yield
    except ProtocolError as exc:
        raise InvalidReply(command, exc.message) from None
