"""emulator.connection over a real UNIX socket: VERSION first and once, framing errors
refused, skipped or closed, a disconnect dropping what belonged to the client; and the
message fast path: many messages per read, replies sent without a scheduler pass, partial
sends finished in order, commands held in order behind a deferred one, fairness."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import struct
import threading
from pathlib import Path

import pytest
import trio

from devices import testdev as td
from devices.testdev import REG_SCRATCH, TestDev
from emulator.client import Client, ClientError
from emulator.limits import Limits
from emulator.server import DeviceServer
from emulator.testing.harness import (
    RawConnection,
    ServedDevice,
    served_device,
    set_mig_state_payload,
    start_dma_left_unanswered,
)
from emulator.tools.bench_rtt import posted_write_message, read_message, version_message
from emulator.transport import receive_chunk
from protocol.constants import (
    HEADER_SIZE,
    Command,
    IrqIndex,
    MigState,
    MsgType,
    PciRegion,
)
from protocol.header import HEADER, Header, pack_message
from protocol.messages import (
    DeviceInfo,
    RegionAccess,
    RegionData,
    VersionPayload,
)

BAR0 = PciRegion.BAR0
CONFIG = PciRegion.CONFIG
U32 = struct.Struct("<I")
RAM_BAR = 2


async def test_pipelined_commands_are_answered_in_order(tmp_path: Path) -> None:
    async with served_device(TestDev(), tmp_path) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            # One buffer: a posted write then a read, 200 times; the reader parses them all
            # from few recvmsg calls and must answer every read in order, after its write.
            batch = b"".join(
                posted_write_message(0, REG_SCRATCH, i, msg_id=2 * i)
                + read_message(0, REG_SCRATCH, msg_id=2 * i + 1)
                for i in range(200)
            )
            await conn.send_raw(batch)
            replies = await conn.receive_many(200)
        finally:
            conn.close()
    assert [h.msg_id for h, _ in replies] == [2 * i + 1 for i in range(200)]
    assert all(h.command == Command.REGION_READ and not h.is_error for h, _ in replies)
    assert [U32.unpack(p[16:])[0] for _, p in replies] == list(range(200))


async def test_large_replies_to_a_client_that_is_not_reading(tmp_path: Path) -> None:
    """Replies far bigger than the socket buffer: the non-blocking send takes part of one,
    the rest goes under the send lock; every reply arrives whole and in order."""
    pattern = bytes(range(256)) * 256  # the 64 KiB RAM BAR
    async with served_device(TestDev(), tmp_path) as served:
        async with Client.connect(served.socket_path) as client:
            await client.region_write(RAM_BAR, 0, pattern)
        conn = await RawConnection.connect(served.socket_path)
        try:
            count = 48  # 3 MiB of replies
            await conn.send_raw(
                b"".join(read_message(RAM_BAR, 0, len(pattern), msg_id=i) for i in range(count))
            )
            await trio.sleep(0.2)  # the server is stuck in the middle of a reply meanwhile
            replies = await conn.receive_many(count)
        finally:
            conn.close()
    assert [h.msg_id for h, _ in replies] == list(range(count))
    for header, payload in replies:
        assert not header.is_error
        assert RegionData.unpack(payload).data == pattern


async def test_a_flooding_client_does_not_starve_another_device(tmp_path: Path) -> None:
    """Two devices in one process; a thread keeps one socket full of posted writes, so
    that reader never runs out of data. The other client's accesses are still answered:
    the reader yields every READ_BUDGET messages."""
    servers = [
        DeviceServer(TestDev(), socket_path=tmp_path / f"dev{i}.sock", name=f"d{i}")
        for i in range(2)
    ]
    flood = b"".join(posted_write_message(0, REG_SCRATCH, i) for i in range(1000))
    stop = threading.Event()
    batches = 0

    def keep_flooding(sock: socket.socket) -> None:
        nonlocal batches
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(flood)
                batches += 1

    async with trio.open_nursery() as nursery:
        for server in servers:
            await nursery.start(server.serve)
        flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flooder.connect(str(tmp_path / "dev0.sock"))
        flooder.sendall(version_message())
        thread = threading.Thread(target=keep_flooding, args=(flooder,), daemon=True)
        thread.start()
        try:
            with trio.fail_after(20):
                while batches < 2:  # the flood is under way
                    await trio.sleep(0.01)
                async with Client.connect(tmp_path / "dev1.sock") as client:
                    for i in range(50):
                        await client.region_write(0, REG_SCRATCH, U32.pack(i))
                        assert await client.region_read(0, REG_SCRATCH, 4) == U32.pack(i)
            assert thread.is_alive()  # still flooding while the other device answered
        finally:
            stop.set()
            with contextlib.suppress(OSError):
                flooder.shutdown(socket.SHUT_RDWR)
            await trio.to_thread.run_sync(thread.join)
            flooder.close()
            nursery.cancel_scope.cancel()


async def test_trailing_partial_message_waits_for_its_rest(tmp_path: Path) -> None:
    async with served_device(TestDev(), tmp_path) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            whole = read_message(0, REG_SCRATCH, msg_id=7)
            await conn.send_raw(whole + whole[:5])  # one and a bit
            first = await conn.receive_many(1)
            await trio.sleep(0.05)
            await conn.send_raw(whole[5:])
            second = await conn.receive_many(1)
        finally:
            conn.close()
    assert [h.msg_id for h, _ in first + second] == [7, 7]


def test_message_builders_match_the_codecs() -> None:
    message = read_message(7, 0x10, 4, msg_id=3)
    assert message == pack_message(3, Command.REGION_READ, struct.pack("<QII", 0x10, 7, 4))
    posted = Header.unpack(posted_write_message(0, 4, 9))
    assert posted.no_reply and posted.msg_type == MsgType.COMMAND


async def test_refusals_are_answered_in_turn_behind_a_deferred_command(tmp_path: Path) -> None:
    """A migration SET waits for a device job stuck on an unanswered DMA_READ; a second
    VERSION, an unknown command and an oversized message are refused, and their replies go
    out in order after the SET's, before the REGION_READ that followed them."""
    limits = Limits(max_message_size=8192, dma_reply_timeout=0.5)
    async with served_device(TestDev(), tmp_path, limits=limits) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            await start_dma_left_unanswered(conn)
            set_id = await conn.send(Command.DEVICE_FEATURE, set_mig_state_payload(MigState.STOP))
            version_id = await conn.send(Command.VERSION, VersionPayload(0, 2, "{}").pack())
            unknown_id = await conn.send(0x77)
            oversized_id = await conn.send(Command.REGION_WRITE, bytes(9000))
            read_id = await conn.send(Command.REGION_READ, RegionAccess(REG_SCRATCH, 0, 4).pack())
            got: list[tuple[int, int]] = []
            while len(got) < 5:
                message = await conn.receive()
                assert message is not None
                if message[0].is_reply:
                    got.append((message[0].msg_id, message[0].error))
        finally:
            conn.close()
    assert got == [
        (set_id, 0),
        (version_id, errno.EINVAL),
        (unknown_id, errno.EINVAL),
        (oversized_id, errno.E2BIG),
        (read_id, 0),
    ]


async def test_working_off_a_backlog_lets_other_tasks_run(tmp_path: Path) -> None:
    """1000 posted writes held behind a deferred SET are worked off in slices of
    READ_BUDGET, with the scheduler run in between (another task sees the backlog part
    done), not in one go."""
    count = 1000
    async with served_device(TestDev(), tmp_path) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            dma, dma_payload = await start_dma_left_unanswered(conn)
            set_id = await conn.send(Command.DEVICE_FEATURE, set_mig_state_payload(MigState.STOP))
            await conn.send_raw(
                b"".join(posted_write_message(0, REG_SCRATCH, i, msg_id=i) for i in range(count))
            )
            session = served.server.active
            assert session is not None
            with trio.fail_after(5):
                while len(session._backlog) < count:
                    await trio.sleep(0.01)
            seen_while_draining = set()

            async def watch_the_drain() -> None:
                while True:
                    if not session._deferred_running:
                        seen_while_draining.add(len(session._backlog))
                    await trio.sleep(0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_the_drain)
                await conn.send_reply(dma.msg_id, Command.DMA_READ, dma_payload + bytes(64))
                with trio.fail_after(5):
                    while True:
                        message = await conn.receive()
                        assert message is not None
                        header = message[0]
                        if header.command == Command.DMA_WRITE and header.is_command:
                            await conn.send_reply(header.msg_id, Command.DMA_WRITE)
                        elif header.msg_id == set_id:
                            break
                    while session._backlog:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        finally:
            conn.close()
    assert set(seen_while_draining) - {0, count}, seen_while_draining


async def raw_socket(path: Path) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    return sock


async def receive_message(sock: trio.socket.SocketType) -> tuple[Header, bytes]:
    data = b""
    while len(data) < HEADER_SIZE:
        chunk, _ = await receive_chunk(sock, HEADER_SIZE - len(data), 4)
        assert chunk, "server closed the connection"
        data += chunk
    header = Header.unpack(data)
    payload = b""
    while len(payload) < header.payload_size:
        chunk, _ = await receive_chunk(sock, header.payload_size - len(payload), 4)
        assert chunk
        payload += chunk
    return header, payload


async def is_closed(sock: trio.socket.SocketType) -> bool:
    with trio.fail_after(5):
        data, _ = await receive_chunk(sock, 64, 4)
    return data == b""


# -- VERSION and connection state ---------------------------------------------------------


async def test_version_reply_is_small_and_valid(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    request = VersionPayload(0, 0, json.dumps({"capabilities": {"max_msg_fds": 16}}))
    await sock.send(pack_message(7, Command.VERSION, request.pack()))
    header, payload = await receive_message(sock)
    assert (header.msg_id, header.command, header.flags) == (7, Command.VERSION, 1)
    reply = VersionPayload.unpack(payload)
    assert (reply.major, reply.minor) == (0, 0)
    caps = json.loads(reply.json_text or "")["capabilities"]
    assert caps["max_msg_fds"] <= 16 and caps["write_multiple"] is True
    assert header.size <= 214  # QEMU's buffer for the reply is its own request's size
    sock.close()


async def test_first_message_must_be_version(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(3, Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0).pack()))
    header, payload = await receive_message(sock)
    assert header.is_error and header.error == errno.EINVAL and payload == b""
    assert await is_closed(sock)
    sock.close()


async def test_bad_version_closes_connection(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(1, Command.VERSION, VersionPayload(1, 0, "{}").pack()))
    header, _ = await receive_message(sock)
    assert header.is_error and header.error == errno.EINVAL
    assert await is_closed(sock)
    sock.close()


async def test_second_version_is_refused(client: Client) -> None:
    with pytest.raises(ClientError) as info:
        await client.request(Command.VERSION, VersionPayload(0, 0, "{}").pack())
    assert info.value.errno == errno.EINVAL
    assert (await client.get_info()).num_regions == 9


# -- framing: refused, skipped or closed ---------------------------------------------------


async def test_oversized_message_is_refused_and_skipped(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(1, Command.VERSION, VersionPayload(0, 2, "{}").pack()))
    await receive_message(sock)
    limit = served.server.limits.max_message_size
    big = RegionData(0, BAR0, limit, bytes(limit)).pack()
    data = pack_message(2, Command.REGION_WRITE, big)
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
    header, _ = await receive_message(sock)
    assert (header.msg_id, header.is_error, header.error) == (2, True, errno.E2BIG)
    await sock.send(pack_message(3, Command.REGION_READ, RegionAccess(0, BAR0, 4).pack()))
    header, payload = await receive_message(sock)
    assert header.msg_id == 3 and payload[16:] == struct.pack("<I", td.ID_VALUE)
    sock.close()


async def test_a_size_claim_past_the_skip_limit_is_answered_and_closed(
    served: ServedDevice,
) -> None:
    """A header claiming 0xfffffff0 bytes with no body: answered E2BIG and closed at once,
    not a silent wait for 4 GiB; the next client is served."""
    conn = await RawConnection.connect(served.socket_path)
    try:
        await conn.send_raw(HEADER.pack(7, Command.REGION_WRITE, 0xFFFFFFF0, 0, 0))
        reply = await conn.receive(timeout=5)
        assert reply is not None
        header, _ = reply
        assert (header.msg_id, header.is_error, header.error) == (7, True, errno.E2BIG)
        assert await conn.closed(timeout=5)
    finally:
        conn.close()
    async with Client.connect(served.socket_path) as client:
        assert await client.region_read(BAR0, td.REG_ID, 4) == struct.pack("<I", td.ID_VALUE)


async def test_size_below_header_closes_only_that_connection(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(1, Command.VERSION, VersionPayload(0, 2, "{}").pack()))
    await receive_message(sock)
    await sock.send(struct.pack("<HHIII", 2, Command.REGION_READ, 8, 0, 0))
    assert await is_closed(sock)
    sock.close()
    async with Client.connect(served.socket_path) as again:
        assert (await again.get_info()).num_regions == 9


# -- disconnects -----------------------------------------------------------------------------


async def test_disconnect_drops_maps_and_fds_but_keeps_device_state(
    served: ServedDevice, tmp_path: Path
) -> None:
    from emulator.testing.harness import EventFd, GuestRam

    with GuestRam(0x10000) as ram:
        async with Client.connect(served.socket_path) as first:
            await first.region_write(BAR0, td.REG_SCRATCH + 4, b"keep")
            await first.dma_map(0, ram.size, fd=ram.fd)
            irq = EventFd()
            await first.set_irqs(IrqIndex.INTX, 0x24, 0, 1, fds=[irq.fd])
            session = served.server.active
            assert session is not None and len(session.maps) == 1
            assert session.irqs.fd_count() == 1
        with trio.fail_after(5):
            while served.server.active is not None:
                await trio.sleep(0.01)
        assert len(session.maps) == 0 and session.irqs.fd_count() == 0
        irq.close()
        async with Client.connect(served.socket_path) as second:
            assert await second.region_read(BAR0, td.REG_SCRATCH + 4, 4) == b"keep"
