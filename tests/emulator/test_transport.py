"""emulator.transport over real UNIX socket pairs."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from emulator.transport import (
    TransportError,
    ancillary_space,
    close_fds,
    receive_chunk,
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


async def test_large_message_partial_sends(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    message = bytes(range(256)) * (4 * 4096)  # 4 MiB
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
            await send_message(counting, message, [w])  # type: ignore[arg-type]
        assert bytes(received) == message
        assert len(counting.calls) > 1, "expected the kernel to take the message in parts"
        assert counting.calls[0][1] == 1
        assert all(anc == 0 for _, anc in counting.calls[1:])
        assert len(got_fds) == 1 and same_pipe(got_fds[0], r)
    finally:
        close_fds([r, w, *got_fds])


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
