"""The bulk path of in-band migration data over real sockets: MIG_DATA_WRITE payloads
received in place into a buffer the server reuses per connection, MIG_DATA_READ replies
sent gathered from views of the stream, the client receiving replies into the buffers its
requests name, and sends gathered from parts (emulator/connection.py, handler.py,
client.py, transport.py)."""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from devices.migration import primitives as stream_primitives
from devices.testdev import TestDev, TestDevOptions
from emulator.client import Client
from emulator.connection import Connection
from emulator.testing.harness import (
    RawConnection,
    ServedDevice,
    read_migration_data,
    served_device,
    set_mig_state_payload,
    start_dma_left_unanswered,
    write_migration_data,
)
from emulator.transport import SEND_BUFFER, Part
from protocol.constants import Command, MigState
from protocol.header import pack_message

PAGE = 4096
BAR_RAM = 2


def mig_data_write(msg_id: int, data: bytes) -> bytes:
    return pack_message(
        msg_id, Command.MIG_DATA_WRITE, struct.pack("<II", 8 + len(data), len(data)) + data
    )


def stream_bytes(size: int, seed: int) -> bytes:
    """Distinct bytes per page or message."""
    block = bytes((seed * 7 + i) & 0xFF for i in range(256))
    return (block * (size // 256 + 1))[:size]


def active(served: object) -> Connection:
    session = served.server.active  # type: ignore[attr-defined]
    assert isinstance(session, Connection)
    return session


async def saved_stream(ram_size: int, seed: int) -> tuple[bytes, bytes]:
    """A testdev's stop-copy stream (RAM of random bytes), and that RAM."""
    source = TestDev(TestDevOptions(ram_size=ram_size))
    ram = random.Random(seed).randbytes(ram_size)
    source.ram.buffer[:] = ram
    source.migration.set_state(MigState.STOP_COPY)
    return source.migration.read_data(2 * ram_size), ram


@dataclass
class Destination:
    """A served testdev, a raw connection to it, and the stream of a source whose RAM
    (``ram``, random bytes) it is to resume."""

    served: ServedDevice
    device: TestDev
    conn: RawConnection
    stream: bytes
    ram: bytes

    async def loads(self) -> None:
        """Every byte written arrived intact and in order: the device took all of them,
        and RESUMING -> STOP loads exactly the source's RAM."""
        resuming = self.device.migration.resuming
        assert resuming is not None and resuming.size == len(self.stream)
        header, _ = await self.conn.call(
            Command.DEVICE_FEATURE, set_mig_state_payload(MigState.STOP)
        )
        assert not header.is_error
        assert bytes(self.device.ram.buffer) == self.ram


@asynccontextmanager
async def destination(tmp_path: Path, ram_size: int, seed: int) -> AsyncIterator[Destination]:
    stream, ram = await saved_stream(ram_size, seed)
    device = TestDev(TestDevOptions(ram_size=ram_size))
    async with served_device(device, tmp_path) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            yield Destination(served, device, conn, stream, ram)
        finally:
            conn.close()


async def send_in_pieces(conn: RawConnection, data: bytes, piece: int) -> None:
    """Send ``data`` ``piece`` bytes at a time, letting the server read between pieces."""
    for at in range(0, len(data), piece):
        await conn.send_raw(data[at : at + piece])
        await trio.sleep(0)


async def resuming(conn: RawConnection) -> None:
    header, _ = await conn.call(Command.DEVICE_FEATURE, set_mig_state_payload(MigState.RESUMING))
    assert not header.is_error


async def test_mig_data_write_payload_split_across_many_receives(tmp_path: Path) -> None:
    async with destination(tmp_path, 512 << 10, 1) as dst:
        first, second = dst.stream[:300_000], dst.stream[300_000:]
        await resuming(dst.conn)
        await send_in_pieces(dst.conn, mig_data_write(10, first), 4000)
        await send_in_pieces(dst.conn, mig_data_write(11, second), 33_333)
        replies = await dst.conn.receive_many(2)
        assert [(h.msg_id, h.is_error, p) for h, p in replies] == [
            (10, False, b""),
            (11, False, b""),
        ]
        # Received in place: the connection's reused buffer holds the last payload.
        buffer = active(dst.served).proto._payload_buffer
        assert len(buffer) >= 8 + len(first)
        assert bytes(buffer[8 : 8 + len(second)]) == second
        await dst.loads()


async def test_mig_data_write_larger_than_the_reused_buffer(tmp_path: Path) -> None:
    async with destination(tmp_path, 1 << 20, 3) as dst:
        small, large = dst.stream[:100_000], dst.stream[100_000:]
        await resuming(dst.conn)
        await send_in_pieces(dst.conn, mig_data_write(1, small), 50_000)
        assert (await dst.conn.receive_many(1))[0][0].msg_id == 1
        before = len(active(dst.served).proto._payload_buffer)
        await send_in_pieces(dst.conn, mig_data_write(2, large), 200_000)
        ((header, _),) = await dst.conn.receive_many(1)
        assert header.msg_id == 2 and not header.is_error
        assert before < 8 + len(large) <= len(active(dst.served).proto._payload_buffer)
        await dst.loads()


async def test_mig_data_writes_held_behind_a_deferred_set_are_kept(tmp_path: Path) -> None:
    """Writes that arrive while a SET waits for the device's DMA are held, and the next
    one is received into the same reused buffer: the held ones must have been copied."""
    async with destination(tmp_path, 256 << 10, 5) as dst:
        conn = dst.conn
        first, second = dst.stream[:150_000], dst.stream[150_000:]
        dma, dma_payload = await start_dma_left_unanswered(conn)
        set_id = await conn.send(Command.DEVICE_FEATURE, set_mig_state_payload(MigState.RESUMING))
        await send_in_pieces(conn, mig_data_write(200, first), 20_000)
        await send_in_pieces(conn, mig_data_write(201, second), 20_000)
        session = active(dst.served)
        with trio.fail_after(5):
            while len(session._backlog) < 2:
                await trio.sleep(0.01)
        await conn.send_reply(dma.msg_id, Command.DMA_READ, dma_payload + bytes(64))
        answered: list[tuple[int, bool]] = []
        with trio.fail_after(5):
            while len(answered) < 3:
                message = await conn.receive()
                assert message is not None
                header = message[0]
                if header.command == Command.DMA_WRITE and header.is_command:
                    await conn.send_reply(header.msg_id, Command.DMA_WRITE)
                else:
                    answered.append((header.msg_id, header.is_error))
        assert answered == [(set_id, False), (200, False), (201, False)]
        await dst.loads()


def half_zero_ram(size: int) -> bytes:
    """Every other page zero: the saved RAM is a list of one view per non-zero page."""
    page = stream_bytes(PAGE, 9)
    return b"".join(page if i % 2 else bytes(PAGE) for i in range(size // PAGE))


@pytest.mark.parametrize("send_buffer", [None, 4096])
async def test_mig_data_read_reply_gathered_from_many_views(
    tmp_path: Path, send_buffer: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One MiB of RAM saved as ~128 page views: each 1 MiB reply is gathered from them and
    the destination loads a RAM equal to the source's. With a tiny send buffer on the
    source's side each reply goes out in many partial sends (the rest under the lock)."""
    size = 1 << 20
    source = TestDev(TestDevOptions(ram_size=size))
    destination = TestDev(TestDevOptions(ram_size=size))
    source.ram.buffer[:] = half_zero_ram(size)
    rests: list[int] = []
    send_rest = Connection._send_rest

    async def counted(session: Connection, rest: bytes | list[Part]) -> None:
        rests.append(len(rest))
        await send_rest(session, rest)

    monkeypatch.setattr(Connection, "_send_rest", counted)
    assert len(stream_primitives.pack_pages(source.ram.buffer, PAGE)) > 100
    async with (
        served_device(source, tmp_path, name="src.sock") as src,
        served_device(destination, tmp_path, name="dst.sock") as dst,
        Client.connect(src.socket_path) as src_client,
        Client.connect(dst.socket_path) as dst_client,
    ):
        if send_buffer is not None:
            active(src)._raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        await dst_client.set_mig_state(MigState.RESUMING)
        await src_client.set_mig_state(MigState.STOP_COPY)
        stream = await read_migration_data(src_client, chunk=1 << 20)
        assert len(stream) > size // 2
        await write_migration_data(dst_client, stream, chunk=1 << 20)
        await dst_client.set_mig_state(MigState.STOP)
    assert bytes(destination.ram.buffer) == bytes(source.ram.buffer)
    if send_buffer is not None:
        assert rests, "expected replies sent in parts"


async def test_mig_data_read_padding_and_end_of_stream(tmp_path: Path) -> None:
    """A read past the end is padded to the size asked (as libvfio-user does), with
    ``size`` saying how many bytes are valid; the read after it is all padding."""
    device = TestDev()
    async with served_device(device, tmp_path) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            header, _ = await conn.call(
                Command.DEVICE_FEATURE, set_mig_state_payload(MigState.STOP_COPY)
            )
            assert not header.is_error
            asked = 1 << 20  # more than the whole stream of a 64 KiB testdev
            header, payload = await conn.call(
                Command.MIG_DATA_READ, struct.pack("<II", 8 + asked, asked)
            )
            argsz, valid = struct.unpack_from("<II", payload)
            assert not header.is_error and len(payload) == 8 + asked
            assert 0 < valid < asked and argsz == 8 + valid
            assert payload[8 + valid :] == bytes(asked - valid)
            header, payload = await conn.call(
                Command.MIG_DATA_READ, struct.pack("<II", 8 + 4096, 4096)
            )
            assert payload == struct.pack("<II", 8, 0) + bytes(4096)
        finally:
            conn.close()


async def test_client_receives_a_read_reply_into_the_buffer_named(tmp_path: Path) -> None:
    size = 256 * 1024
    device = TestDev(TestDevOptions(ram_size=size))
    device.ram.buffer[:] = stream_bytes(size, 11)
    async with (
        served_device(device, tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        await client.set_mig_state(MigState.STOP_COPY)
        (buffer,) = client.receive_buffers(1, 8 + size)
        sent = await client.mig_data_read_send(size, into=buffer)
        data = await client.mig_data_read_reply(sent, size)
        assert data.obj is buffer and len(data) == size  # received in place
        rest = await read_migration_data(client)
        # A buffer too small for the (padded) reply: received as usual, same bytes.
        await client.set_mig_state(MigState.STOP)
        await client.set_mig_state(MigState.STOP_COPY)
        small = bytearray(1000)
        sent = await client.mig_data_read_send(size, into=small)
        again = await client.mig_data_read_reply(sent, size)
        assert again.obj is not small
    # The stream starts with a random session id: compare past the header part with it.
    assert len(again) == len(data) and bytes(again[64:]) == bytes(data[64:])
    assert len(rest) > 0


async def test_an_abandoned_read_takes_its_buffer_out_of_use(tmp_path: Path) -> None:
    async with (
        served_device(TestDev(), tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        await client.set_mig_state(MigState.STOP_COPY)
        buffers = client.receive_buffers(2, 8 + 65536)
        assert client.receive_buffers(2, 8 + 65536) == buffers  # kept and lent again
        assert all(a is b for a, b in zip(client.receive_buffers(2, 100), buffers, strict=True))
        sent = await client.mig_data_read_send(65536, into=buffers[0])
        sent.abandon()  # its reply may still be written there
        fresh = client.receive_buffers(2, 8 + 65536)
        assert not any(f is b for f in fresh for b in buffers)
        assert len(await client.mig_data_read(65536)) == 0  # the stream was all in that one
        await client.set_mig_state(MigState.STOP)  # the connection goes on


async def test_connections_ask_for_large_send_buffers(tmp_path: Path) -> None:
    with open("/proc/sys/net/core/wmem_max") as limit:
        wmem_max = int(limit.read())
    expected = min(SEND_BUFFER, wmem_max) * 2  # the kernel doubles what it grants
    async with (
        served_device(TestDev(), tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        await client.get_info()
        server_side = active(served)._raw
        assert server_side.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= expected
        client_side = client._sock
        assert client_side.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= expected


async def test_a_cancelled_wait_for_a_read_takes_its_buffer_out_of_use(tmp_path: Path) -> None:
    async with (
        served_device(TestDev(), tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        await client.set_mig_state(MigState.STOP_COPY)
        (buffer,) = client.receive_buffers(1, 8 + 65536)
        sent = await client.mig_data_read_send(65536, into=buffer)
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.mig_data_read_reply(sent, 65536)
        (fresh,) = client.receive_buffers(1, 8 + 65536)
        assert fresh is not buffer
        await client.set_mig_state(MigState.STOP)


async def test_client_sends_from_many_tasks_arrive_whole_through_a_small_buffer(
    tmp_path: Path,
) -> None:
    """The client's fast path (a non-blocking send when nobody is mid-message) with a send
    buffer far smaller than the messages: partial sends finish under the lock before any
    other task's bytes, so every message arrives whole."""
    size = 64 * 1024
    half = size // 2
    device = TestDev(TestDevOptions(ram_size=size))
    async with (
        served_device(device, tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        client._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        async def writer(offset: int, seed: int) -> None:
            for round_ in range(20):
                await client.region_write(BAR_RAM, offset, stream_bytes(half, seed + round_))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, 0, 0)
            nursery.start_soon(writer, half, 100)
        assert await client.region_read(BAR_RAM, 0, half) == stream_bytes(half, 19)
        assert await client.region_read(BAR_RAM, half, half) == stream_bytes(half, 119)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


async def test_client_closes_its_twin_socket(tmp_path: Path) -> None:
    async with served_device(TestDev(), tmp_path) as served:
        before = open_fds()
        async with Client.connect(served.socket_path) as client:
            await client.get_info()
            assert len(open_fds() - before) >= 2  # the socket and its twin
        await trio.sleep(0.05)  # the server notices the hang-up
        assert open_fds() - before == set()
