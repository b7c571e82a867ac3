"""Message I/O over a trio UNIX stream socket, with fds passed as SCM_RIGHTS.

This is the hot path of both the server and the client, so it stays small: one ``sendmsg``
per message (looping only on partial sends) and one ``recvmsg`` per chunk, with the
ancillary buffer size computed once per fd limit. Framing (which fds belong to which
message) is :class:`protocol.framer.MessageFramer`'s job, not this module's.

Socket errors (``OSError``, e.g. ``ECONNRESET`` / ``EPIPE``) and trio's
``ClosedResourceError`` propagate unchanged; :class:`TransportError` is only raised for
conditions this module detects itself.
"""

from __future__ import annotations

import array
import errno as _errno
import functools
import os
import socket
from collections.abc import Iterable, Sequence

import trio

#: One buffer of a message sent gathered (header, then views of the payload's pieces).
Part = bytes | bytearray | memoryview

_FD_ITEMSIZE = array.array("i").itemsize
#: Received fds are close-on-exec from the start (no leak into children such as QEMU).
#: Plain ints: ``socket.MSG_*`` are IntFlag members, and ``int & IntFlag`` runs Python-level
#: enum code on every message (measured ~1 µs; docs/performance.md).
_RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_SO_SNDBUF = int(socket.SO_SNDBUF)
#: SO_SNDBUF asked for every connection: room for a whole megabyte MIG_DATA message and
#: the next one, so that one ``sendmsg`` takes each and its reader gets it in few reads
#: (the default, ~208 KiB, split a 1 MiB message into ~5 sends and ~10 reads with a wakeup
#: each; measured on 256 MiB in-band migrations, docs/performance.md). The kernel doubles
#: the value for its bookkeeping and caps it at net.core.wmem_max; memory is only used by
#: bytes actually waiting for the reader.
SEND_BUFFER = 2 << 20
#: Buffers one sendmsg may take (the kernel's UIO_MAXIOV); more are sent in turns.
_IOV_MAX = 1024


class TransportError(Exception):
    """A transport-level failure detected here; ``errno`` says what kind.

    ``data`` holds the bytes that arrived with a refused ``recvmsg`` (e.g. with truncated
    fds), so a caller that wants to keep framing the stream still can.
    """

    def __init__(self, errno: int, message: str, *, data: bytes = b"") -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"{_errno.errorcode.get(self.errno, str(self.errno))}: {self.message}"


def enlarge_send_buffer(sock: socket.socket | trio.socket.SocketType) -> None:
    """Ask for a SEND_BUFFER-sized send buffer (best effort: a smaller one still works)."""
    try:
        if sock.getsockopt(_SOL_SOCKET, _SO_SNDBUF) < SEND_BUFFER:
            sock.setsockopt(_SOL_SOCKET, _SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd; already-closed ones (EBADF) are ignored, other errors re-raised last."""
    failure: OSError | None = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != _errno.EBADF and failure is None:
                failure = exc
    if failure is not None:
        raise failure


@functools.cache
def ancillary_space(max_fds: int) -> int:
    """``recvmsg`` ancillary buffer size with room for ``max_fds`` fds (0 for none)."""
    return socket.CMSG_SPACE(max_fds * _FD_ITEMSIZE) if max_fds > 0 else 0


async def send_message(
    sock: trio.socket.SocketType, data: bytes | bytearray, fds: Sequence[int] = ()
) -> None:
    """Send ``data`` whole; ``fds`` ride as one SCM_RIGHTS message on the first ``sendmsg``.

    A stream socket may accept only part of the bytes; the rest is sent without fds.
    Cancellation between two partial sends leaves a partial message on the stream, so
    callers that need message atomicity shield the call.
    """
    if fds:
        if not data:
            raise ValueError("fds need at least one byte to travel with")
        ancdata = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))]
        sent = await sock.sendmsg([data], ancdata)
    else:
        sent = await sock.sendmsg([data])
    total = len(data)
    if sent >= total:
        return
    view = memoryview(data)
    while sent < total:
        sent += await sock.sendmsg([view[sent:]])


async def send_gathered(
    sock: trio.socket.SocketType, parts: Sequence[Part], fds: Sequence[int] = ()
) -> None:
    """:func:`send_message` of the message made of ``parts`` in order, without joining
    them: ``sendmsg`` gathers them (a megabyte payload is not copied into a message
    first). The same rules for fds, partial sends and cancellation apply."""
    pending = list(parts)
    total = sum(len(part) for part in pending)
    if fds:
        if not total:
            raise ValueError("fds need at least one byte to travel with")
        ancdata = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))]
        sent = await sock.sendmsg(pending[:_IOV_MAX], ancdata)
    else:
        sent = await sock.sendmsg(pending[:_IOV_MAX])
    total -= sent
    while total:
        pending = after(pending, sent)
        sent = await sock.sendmsg(pending[:_IOV_MAX])
        total -= sent


def send_gathered_nowait(sock: socket.socket, parts: Sequence[Part]) -> int:
    """Send what the socket takes now of the message made of ``parts`` (no fds, no
    yield); the count of bytes sent."""
    try:
        return sock.sendmsg(parts[:_IOV_MAX] if len(parts) > _IOV_MAX else parts)
    except BlockingIOError:
        return 0


def after(parts: Sequence[Part], count: int) -> list[Part]:
    """``parts`` without their first ``count`` bytes (views, nothing copied)."""
    for index, part in enumerate(parts):
        if count < len(part):
            head = memoryview(part)[count:] if count else part
            return [head, *parts[index + 1 :]]
        count -= len(part)
    return []


async def receive_chunk(
    sock: trio.socket.SocketType, max_bytes: int, max_fds: int
) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` of up to ``max_bytes`` with room for ``max_fds`` fds.

    Returns ``(data, fds)``; ``data == b""`` means end of stream. The caller owns the fds.
    If the kernel had to drop fds (MSG_CTRUNC) or more than ``max_fds`` arrived, every fd
    received is closed and :class:`TransportError` (EFAULT) is raised.
    """
    data, ancdata, msg_flags, _ = await sock.recvmsg(
        max_bytes, ancillary_space(max_fds), _RECV_FLAGS
    )
    return _with_fds(data, ancdata, msg_flags, max_fds)


def receive_chunk_nowait(
    sock: socket.socket, max_bytes: int, max_fds: int
) -> tuple[bytes, list[int]]:
    """:func:`receive_chunk` on a non-blocking stdlib socket, without yielding to trio.

    Raises ``BlockingIOError`` when nothing is buffered (the caller then waits with
    ``trio.lowlevel.wait_readable``). The connection's fast path: a message that is already
    in the socket buffer costs one system call and no trip through the scheduler."""
    data, ancdata, msg_flags, _ = sock.recvmsg(max_bytes, ancillary_space(max_fds), _RECV_FLAGS)
    return _with_fds(data, ancdata, msg_flags, max_fds)


def receive_into_nowait(
    sock: socket.socket, buffer: memoryview, max_fds: int
) -> tuple[int, list[int]]:
    """:func:`receive_chunk_nowait` straight into ``buffer`` (``recvmsg_into``): the count
    of bytes received (0: end of stream) and the fds, with the same errors."""
    count, ancdata, msg_flags, _ = sock.recvmsg_into(
        [buffer], ancillary_space(max_fds), _RECV_FLAGS
    )
    if ancdata or msg_flags & _MSG_CTRUNC:
        return count, _fds_of(buffer[:count], ancdata, msg_flags, max_fds)
    return count, []


async def receive_into(
    sock: trio.socket.SocketType, buffer: memoryview, max_fds: int
) -> tuple[int, list[int]]:
    """:func:`receive_into_nowait` on a trio socket (waits for data)."""
    count, ancdata, msg_flags, _ = await sock.recvmsg_into(
        [buffer], ancillary_space(max_fds), _RECV_FLAGS
    )
    if ancdata or msg_flags & _MSG_CTRUNC:
        return count, _fds_of(buffer[:count], ancdata, msg_flags, max_fds)
    return count, []


def send_nowait(sock: socket.socket, data: bytes) -> int:
    """Send what the socket takes now (no fds, no yield); the count of bytes sent."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def _with_fds(
    data: bytes, ancdata: list[tuple[int, int, bytes]], msg_flags: int, max_fds: int
) -> tuple[bytes, list[int]]:
    if not ancdata and not msg_flags & _MSG_CTRUNC:
        return data, []
    return data, _fds_of(data, ancdata, msg_flags, max_fds)


def _fds_of(
    data: bytes | memoryview,
    ancdata: list[tuple[int, int, bytes]],
    msg_flags: int,
    max_fds: int,
) -> list[int]:
    """The fds of a ``recvmsg``'s control messages; all closed, and TransportError raised,
    when some were dropped or more than ``max_fds`` came."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            # The last control message may be cut short: keep whole fds only.
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_ITEMSIZE])
    received = fds.tolist()
    if msg_flags & _MSG_CTRUNC or len(received) > max_fds:
        close_fds(received)
        raise TransportError(
            _errno.EFAULT,
            f"ancillary data truncated: room for {max_fds} fd(s), got {len(received)}"
            + (" and the kernel dropped more" if msg_flags & _MSG_CTRUNC else ""),
            data=bytes(data),
        )
    return received
