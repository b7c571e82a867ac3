"""The request machinery of the vfio-user client: the part of :class:`~emulator.client.Client`
that knows messages, not commands.

It owns the socket: message ids, sending (with fds, gathered, shielded from cancellation), the
receive task that frames what comes in and hands each reply to the request waiting for its
msg_id (so any number of tasks may have requests in flight at once), replies received into a
buffer the caller lends (:meth:`RequestChannel.receive_buffers`), and the commands the server
sends us: DMA_READ / DMA_WRITE are served by the receive task from the memory registered with
:meth:`RequestChannel.serve_dma`; their replies go out through a queue drained by a second
task, so the receive task never blocks on sending (which could deadlock against a server that
is itself blocked sending to us).

The typed commands (one method per vfio-user command, in :mod:`emulator.client.core`) are a
subclass: :class:`~emulator.client.core.Client` *is* a request channel that also knows what each
command's payload means. A subclass rather than a channel object the client holds, because the
raw layer is part of the client's public API (tests send malformed messages with
:meth:`RequestChannel.send_raw` and pipeline with :meth:`RequestChannel.send_request` on the same
connection as the typed calls), and forwarding each of those methods would only restate them.

Error classes: :class:`ClientError` (the server answered with an error reply, or anything
else that failed a request), :class:`InvalidReply` (the server broke the protocol),
:class:`ConnectionLost` (the connection is gone). Both are ClientError subclasses.
A reply that cannot be matched to any request breaks the whole connection: with pipelining
there is no way to know which request it was meant for.
"""

from __future__ import annotations

import errno as _errno
import math
import os
import socket
from collections.abc import Callable, Sequence
from contextlib import suppress
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
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAGS_TYPE_MASK,
    PROTOCOL_MAJOR,
    QEMU_MAX_XFER_SIZE,
    Command,
    MsgType,
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
from protocol.messages import DmaData, DmaRw

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

_REPLY_FLAGS = MsgType.REPLY | FLAG_ERROR


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
# guest memory the server reaches


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
# requests in flight


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
        #: Where a large reply payload is received (see RequestChannel._place_reply), and the view
        #: of it once it was received there.
        self.into = into
        self.in_place: memoryview | None = None


class InFlight:
    """A request that was sent and whose reply is still to come
    (:meth:`RequestChannel.send_request`)."""

    def __init__(self, client: RequestChannel, command: int, waiter: _Pending) -> None:
        self.client = client
        self.command = command
        self._waiter = waiter

    async def reply(self) -> tuple[Header, bytes, list[int]]:
        """Wait for the reply: ``(header, payload, fds)`` as :meth:`RequestChannel.request` returns
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


class RequestChannel:
    """Requests and their replies on one vfio-user connection; the typed commands are
    :class:`~emulator.client.core.Client`, which is how one creates it."""

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

    # -- replies received in place --------------------------------------------------------

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
