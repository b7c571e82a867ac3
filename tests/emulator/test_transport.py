"""emulator.transport over real UNIX socket pairs."""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
import trio

from emulator.transport import (
    Part,
    TransportError,
    after,
    ancillary_space,
    close_fds,
    receive_chunk,
    receive_into,
    receive_into_nowait,
    send_gathered,
    send_gathered_nowait,
    send_message,
)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def same_pipe(write_fd: int, read_fd: int) -> bool:
    os.write(write_fd, b"ping")
    return os.read(read_fd, 16) == b"ping"


@pytest.fixture
def pair():
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


async def test_fds_pass_both_ways(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        await send_message(a, b"hello", [w])
        data, fds = await receive_chunk(b, 4096, 4)
        assert data == b"hello"
        assert len(fds) == 1 and fds[0] != w
        assert same_pipe(fds[0], r)
        assert os.get_inheritable(fds[0]) is False
        close_fds(fds)

        efd = os.eventfd(0)
        await send_message(b, b"x" * 10, [efd])
        data, fds = await receive_chunk(a, 4096, 4)
        assert data == b"x" * 10 and len(fds) == 1
        os.eventfd_write(fds[0], 7)
        assert os.eventfd_read(efd) == 7
        close_fds([*fds, efd])
    finally:
        close_fds([r, w])


async def test_several_fds_keep_their_order(pair):
    a, b = pair
    pipes = [os.pipe() for _ in range(5)]
    try:
        await send_message(a, b"m", [w for _, w in pipes])
        data, fds = await receive_chunk(b, 100, 8)
        assert data == b"m" and len(fds) == 5
        for (r, _), fd in zip(pipes, fds, strict=True):
            assert same_pipe(fd, r)
        close_fds(fds)
    finally:
        close_fds([fd for p in pipes for fd in p])


async def test_no_fds_fast_path(pair):
    a, b = pair
    await send_message(a, b"abc")
    assert await receive_chunk(b, 100, 0) == (b"abc", [])


class CountingSocket:
    """Wraps a trio socket to record every sendmsg call."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.calls: list[tuple[int, int]] = []  # (bytes offered, ancdata items)

    async def sendmsg(self, buffers, ancdata=()):
        buffers = list(buffers)
        ancdata = list(ancdata)
        self.calls.append((sum(len(memoryview(b)) for b in buffers), len(ancdata)))
        return await self.sock.sendmsg(buffers, ancdata)


async def send_through_a_small_buffer(
    pair: tuple[trio.socket.SocketType, trio.socket.SocketType],
    message: bytes,
    send: Callable[[CountingSocket, int], Awaitable[None]],
) -> list[tuple[int, int]]:
    """``send(socket, fd)`` through a 4 KiB send buffer while a reader collects: every
    byte arrives in order, the fd once; returns the sendmsg calls (bytes, ancillary)."""
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    r, w = os.pipe()
    counting = CountingSocket(a)
    received = bytearray()
    got_fds: list[int] = []

    async def reader() -> None:
        while len(received) < len(message):
            data, fds = await receive_chunk(b, 65536, 2)
            assert data
            received.extend(data)
            got_fds.extend(fds)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await send(counting, w)
        assert bytes(received) == message
        assert len(got_fds) == 1 and same_pipe(got_fds[0], r)
        return counting.calls
    finally:
        close_fds([r, w, *got_fds])


async def test_large_message_partial_sends(pair):
    message = bytes(range(256)) * (4 * 4096)  # 4 MiB

    async def send(sock: CountingSocket, fd: int) -> None:
        await send_message(sock, message, [fd])  # type: ignore[arg-type]

    calls = await send_through_a_small_buffer(pair, message, send)
    assert len(calls) > 1, "expected the kernel to take the message in parts"
    assert calls[0][1] == 1
    assert all(anc == 0 for _, anc in calls[1:])


async def test_ctrunc_closes_received_fds(pair):
    a, b = pair
    pipes = [os.pipe() for _ in range(6)]
    before = open_fds()
    try:
        await send_message(a, b"data", [w for _, w in pipes])
        with pytest.raises(TransportError) as info:
            await receive_chunk(b, 100, 1)
        assert info.value.errno == errno.EFAULT
        assert info.value.data == b"data"
        assert open_fds() == before
    finally:
        close_fds([fd for p in pipes for fd in p])


async def test_more_fds_than_asked_is_refused_even_within_alignment_slack(pair):
    # CMSG_SPACE(4) leaves room for two fds on 64-bit; the second is still refused.
    a, b = pair
    r, w = os.pipe()
    before = open_fds()
    try:
        await send_message(a, b"d", [w, r])
        with pytest.raises(TransportError):
            await receive_chunk(b, 100, 1)
        assert open_fds() == before
    finally:
        close_fds([r, w])


async def test_fds_with_no_room_at_all(pair):
    a, b = pair
    r, w = os.pipe()
    before = open_fds()
    try:
        await send_message(a, b"d", [w])
        with pytest.raises(TransportError):
            await receive_chunk(b, 100, 0)
        assert open_fds() == before
    finally:
        close_fds([r, w])


async def test_eof(pair):
    a, b = pair
    await send_message(a, b"last")
    a.close()
    assert await receive_chunk(b, 100, 1) == (b"last", [])
    assert await receive_chunk(b, 100, 1) == (b"", [])


async def test_fds_need_data(pair):
    a, _ = pair
    with pytest.raises(ValueError):
        await send_message(a, b"", [0])


def test_close_fds_ignores_ebadf():
    r, w = os.pipe()
    os.close(r)
    close_fds([r, w])
    with pytest.raises(OSError):
        os.fstat(w)


def test_ancillary_space():
    assert ancillary_space(0) == 0
    assert ancillary_space(1) == socket.CMSG_SPACE(4)
    assert ancillary_space(8) == socket.CMSG_SPACE(32)


# -- gathered sends, receives into a buffer ---------------------------------------------------


def test_after_drops_bytes_from_the_front_without_copying():
    parts: list[Part] = [b"abc", bytearray(b"de"), memoryview(b"fghij")]
    assert [bytes(p) for p in after(parts, 0)] == [b"abc", b"de", b"fghij"]
    assert [bytes(p) for p in after(parts, 4)] == [b"e", b"fghij"]
    assert [bytes(p) for p in after(parts, 5)] == [b"fghij"]
    assert after(parts, 10) == []
    tail = after(parts, 7)[0]
    assert isinstance(tail, memoryview) and isinstance(parts[2], memoryview)
    assert tail.obj is parts[2].obj  # a view of the caller's buffer


async def test_gathered_send_of_more_parts_than_one_sendmsg_takes(pair):
    """3000 parts (the kernel takes at most 1024 buffers per sendmsg) through a small send
    buffer: every byte arrives in order, the fds with the first."""
    parts = [bytes([i & 0xFF]) * (1 + i % 700) for i in range(3000)]

    async def send(sock: CountingSocket, fd: int) -> None:
        await send_gathered(sock, parts, [fd])  # type: ignore[arg-type]

    calls = await send_through_a_small_buffer(pair, b"".join(parts), send)
    assert len(calls) > 3
    assert calls[0][1] == 1 and all(anc == 0 for _, anc in calls[1:])


async def test_gathered_send_with_fds_needs_data(pair):
    a, _ = pair
    with pytest.raises(ValueError):
        await send_gathered(a, [b"", b""], [0])


def test_gathered_send_nowait_takes_what_fits():
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        parts = [b"x" * 100_000, b"y" * 100_000]
        sent = send_gathered_nowait(a, parts)
        assert 0 < sent < 200_000
        while send_gathered_nowait(a, after(parts, sent)):
            pass  # the buffer fills up
        assert send_gathered_nowait(a, [b"z"]) == 0  # full: nothing taken, no error


async def test_receive_into_a_buffer_with_fds(pair):
    a, b = pair
    r, w = os.pipe()
    target = bytearray(10)
    try:
        await send_message(a, b"0123456789abc", [w])
        count, fds = await receive_into(b, memoryview(target)[2:6], 2)
        assert count == 4 and target == b"\0\0" + b"0123" + bytes(4)
        assert len(fds) == 1 and same_pipe(fds[0], r)
        close_fds(fds)
        count, fds = await receive_into(b, memoryview(target), 2)
        assert (count, fds, bytes(target[:9])) == (9, [], b"456789abc")
    finally:
        close_fds([r, w])


def test_receive_into_nowait_eof_and_would_block():
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        target = memoryview(bytearray(8))
        with pytest.raises(BlockingIOError):
            receive_into_nowait(b, target, 1)
        a.sendall(b"hi")
        assert receive_into_nowait(b, target, 1) == (2, [])
        a.close()
        assert receive_into_nowait(b, target, 1) == (0, [])


def test_receive_into_nowait_refuses_fds_beyond_the_limit():
    a, b = socket.socketpair()
    pipes = [os.pipe() for _ in range(3)]
    before = open_fds()
    try:
        with a, b:
            b.setblocking(False)
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array_of([p[1] for p in pipes]))]
            a.sendmsg([b"data"], ancdata)
            with pytest.raises(TransportError):
                receive_into_nowait(b, memoryview(bytearray(8)), 1)
            assert open_fds() <= before  # every fd received was closed
    finally:
        close_fds([fd for pipe in pipes for fd in pipe])


def array_of(fds: list[int]) -> bytes:
    return array.array("i", fds).tobytes()
