"""Every limit of emulator.limits enforced over a real socket, at the limit and one past it;
peer-credential refusal; fds accounted for (nothing the server holds outlives the client)."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from devices import testdev as td
from devices.testdev import TestDev, TestDevOptions
from emulator.client import Client, ClientError
from emulator.limits import MIGRATION_SESSIONS, Limits
from emulator.server import DeviceServer, ServerError
from emulator.testing.harness import (
    CONFIG_REGION,
    EventFd,
    GuestRam,
    RawConnection,
    ServedDevice,
    enable_bus_master,
    served_device,
    set_mig_state_payload,
    start_dma_left_unanswered,
)
from emulator.testing.testdev_driver import program_copy
from protocol.constants import (
    FEATURE_GET,
    FEATURE_SET,
    HEADER_SIZE,
    Command,
    DeviceFeature,
    DmaMapFlags,
    IrqIndex,
    IrqSetFlags,
    MigState,
)
from protocol.errors import ProtocolError
from protocol.header import Header, pack_message
from protocol.messages import DmaMap, IrqSet, RegionAccess, VersionPayload
from protocol.version import ServerCapabilities

EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
RW = DmaMapFlags.READ | DmaMapFlags.WRITE
RAM_BAR = 2


@asynccontextmanager
async def serving(
    tmp_path: Path,
    limits: Limits,
    *,
    device: TestDev | None = None,
    capabilities: ServerCapabilities | None = None,
    name: str = "dev.sock",
) -> AsyncIterator[ServedDevice]:
    async with served_device(
        device or TestDev(), tmp_path, name=name, limits=limits, capabilities=capabilities
    ) as served:
        yield served


async def errno_of(call: object) -> int:
    with pytest.raises(ClientError) as info:
        await call  # type: ignore[misc]
    return info.value.errno


def dma_map_payload(address: int, size: int = 0x1000, padding: int = 0) -> bytes:
    return DmaMap(DmaMap.SIZE, RW, 0, address, size).pack() + bytes(padding)


# -- message size ---------------------------------------------------------------------------


async def test_message_at_the_size_limit_is_served_one_byte_more_gets_e2big(
    tmp_path: Path,
) -> None:
    limit = 8192
    async with serving(tmp_path, Limits(max_message_size=limit)) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            padding = limit - HEADER_SIZE - DmaMap.SIZE  # DMA_MAP tolerates trailing bytes
            header, _ = await conn.call(Command.DMA_MAP, dma_map_payload(0, padding=padding))
            assert not header.is_error
            header, _ = await conn.call(
                Command.DMA_MAP, dma_map_payload(0x10000, padding=padding + 1)
            )
            assert header.is_error and header.error == errno.E2BIG
            # The oversized payload was skipped: the stream is still in step.
            header, payload = await conn.call(
                Command.REGION_READ, RegionAccess(0, CONFIG_REGION, 2).pack()
            )
            assert not header.is_error and payload[-2:] == struct.pack("<H", td.VENDOR_ID)
        finally:
            conn.close()


# -- DMA maps --------------------------------------------------------------------------------


async def test_dma_maps_up_to_the_limit_then_enospc(tmp_path: Path) -> None:
    async with (
        serving(tmp_path, Limits(max_dma_maps=4)) as served,
        Client.connect(served.socket_path) as client,
    ):
        for i in range(4):
            await client.dma_map(i * 0x10000, 0x1000)
        assert await errno_of(client.dma_map(0x100000, 0x1000)) == errno.ENOSPC
        await client.dma_unmap(0, 0x1000)
        await client.dma_map(0x100000, 0x1000)  # a freed slot is reusable


# -- fds per message ---------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [3, 4])
async def test_fds_per_message_at_limit_and_one_more(tmp_path: Path, limit: int) -> None:
    limits = Limits(max_fds_per_message=limit)
    device = TestDev(TestDevOptions(msix_vectors=8))
    async with serving(tmp_path, limits, device=device) as served:
        eventfds = [EventFd() for _ in range(limit + 1)]
        try:
            conn = await RawConnection.connect(served.socket_path)
            request = IrqSet(IrqSet.SIZE, EVENTFD_TRIGGER, IrqIndex.MSIX, 0, limit).pack()
            header, _ = await conn.call(
                Command.DEVICE_SET_IRQS, request, [e.fd for e in eventfds[:limit]]
            )
            assert not header.is_error
            over = IrqSet(IrqSet.SIZE, EVENTFD_TRIGGER, IrqIndex.MSIX, 0, limit + 1).pack()
            await conn.send(Command.DEVICE_SET_IRQS, over, [e.fd for e in eventfds])
            assert await conn.closed()  # the kernel may have dropped fds: no trusting the rest
            conn.close()
            # The server goes on serving the next client.
            async with Client.connect(served.socket_path) as client:
                assert (await client.get_info()).num_regions > 0
        finally:
            for e in eventfds:
                e.close()


# -- interrupt vectors ------------------------------------------------------------------------


async def test_irq_vectors_per_set_irqs_and_bound_eventfds(tmp_path: Path) -> None:
    limits = Limits(max_irq_vectors=4)
    device = TestDev(TestDevOptions(msix_vectors=4))
    async with (
        serving(tmp_path, limits, device=device) as served,
        Client.connect(served.socket_path) as client,
    ):
        eventfds = [EventFd() for _ in range(6)]
        try:
            fds = [e.fd for e in eventfds]
            # count = limit + 1 is refused before anything is looked at
            too_many = client.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 0, 5, fds=fds[:5])
            assert await errno_of(too_many) == errno.E2BIG
            # count = limit: fine; rebinding the same vectors does not count twice
            await client.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 0, 4, fds=fds[:4])
            await client.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 0, 4, fds=fds[:4])
            assert served.server.active is not None
            assert served.server.active.irqs.fd_count() == 4
            # a fifth eventfd on another index would exceed what one client may hold
            intx = client.set_irqs(IrqIndex.INTX, EVENTFD_TRIGGER, 0, 1, fds=fds[4:5])
            assert await errno_of(intx) == errno.E2BIG
            assert served.server.active.irqs.fd_count() == 4
        finally:
            for e in eventfds:
                e.close()


def test_a_device_with_more_vectors_than_the_limit_is_not_served(tmp_path: Path) -> None:
    device = TestDev(TestDevOptions(msix_vectors=8))
    with pytest.raises(ServerError, match="max_irq_vectors"):
        DeviceServer(device, socket_path=tmp_path / "x.sock", limits=Limits(max_irq_vectors=7))
    DeviceServer(device, socket_path=tmp_path / "x.sock", limits=Limits(max_irq_vectors=8))


# -- queued replies -----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3])
async def test_commands_owed_a_reply_stay_within_the_limit(tmp_path: Path, limit: int) -> None:
    """While a SET waits for a device job stuck on DMA, later commands are held back, in
    order. Past ``limit`` held, the reader reads on as far as the job's DMA_READ reply (the
    client answers it after more commands): the job goes on at once instead of waiting out
    ``dma_reply_timeout``, and every command is answered in order."""
    limits = Limits(max_queued_replies=limit, dma_reply_timeout=30.0)
    async with serving(tmp_path, limits) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            dma, dma_payload = await start_dma_left_unanswered(conn)
            set_id = await conn.send(Command.DEVICE_FEATURE, set_mig_state_payload(MigState.STOP))
            read = RegionAccess(td.REG_SCRATCH, 0, 4).pack()
            ids = [await conn.send(Command.REGION_READ, read) for _ in range(limit + 5)]
            await conn.send_reply(dma.msg_id, Command.DMA_READ, dma_payload + bytes(64))
            got: list[int] = []
            with trio.fail_after(5):  # well within dma_reply_timeout: no stall
                while len(got) < len(ids) + 1:
                    message = await conn.receive()
                    assert message is not None
                    header = message[0]
                    if header.command == Command.DMA_WRITE and header.is_command:
                        await conn.send_reply(header.msg_id, Command.DMA_WRITE)
                        continue
                    assert not header.is_error
                    got.append(header.msg_id)
            assert got == [set_id, *ids]
        finally:
            conn.close()


async def test_reading_past_the_queued_replies_limit_is_bounded(tmp_path: Path) -> None:
    """Commands held past the limit stop the reading once they reach max_message_size
    bytes: then the job's DMA reply behind them waits (``dma_reply_timeout``), and every
    command is still answered in order."""
    limit, write_size = 2, 4000
    limits = Limits(max_queued_replies=limit, max_message_size=8192, dma_reply_timeout=1.0)
    async with serving(tmp_path, limits) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            await start_dma_left_unanswered(conn)
            set_id = await conn.send(Command.DEVICE_FEATURE, set_mig_state_payload(MigState.STOP))
            write = RegionAccess(0, RAM_BAR, write_size).pack() + bytes(write_size)
            ids = [await conn.send(Command.REGION_WRITE, write) for _ in range(limit + 6)]
            session = served.server.active
            assert session is not None
            # Held past the limit: 4016, 8032 bytes (< 8192), then 12048: reading stops.
            with trio.fail_after(5):
                while len(session._backlog) < limit + 3:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert len(session._backlog) == limit + 3  # not one more read off the socket
            got = []
            for _ in range(len(ids) + 1):
                message = await conn.receive()
                assert message is not None
                assert not message[0].is_error
                got.append(message[0].msg_id)
            assert got == [set_id, *ids]
        finally:
            conn.close()


# -- migration sessions --------------------------------------------------------------------------


async def set_state(client: Client, state: MigState) -> None:
    await client.set_mig_state(state)


@pytest.mark.parametrize("limit", [1, 2])
async def test_migration_sessions_per_process(tmp_path: Path, limit: int) -> None:
    limits = Limits(max_migration_sessions=limit)
    assert MIGRATION_SESSIONS.open_sessions() == 0
    async with (
        serving(tmp_path, limits, name="a.sock") as a,
        serving(tmp_path, limits, name="b.sock") as b,
        serving(tmp_path, limits, name="c.sock") as c,
        Client.connect(a.socket_path) as ca,
        Client.connect(b.socket_path) as cb,
        Client.connect(c.socket_path) as cc,
    ):
        clients = [ca, cb, cc]
        states = [MigState.STOP_COPY, MigState.RESUMING, MigState.PRE_COPY]
        for client, state in zip(clients[:limit], states, strict=False):
            await set_state(client, state)  # up to the limit: fine
        over = clients[limit]
        assert await errno_of(set_state(over, states[limit])) == errno.EBUSY
        reply = await over.device_feature(FEATURE_GET | DeviceFeature.MIG_DEVICE_STATE, argsz=16)
        assert struct.unpack_from("<I", reply, 8)[0] == MigState.RUNNING  # nothing moved
        # Moving within a session's states keeps the session; leaving frees it.
        await set_state(clients[0], MigState.STOP)
        await set_state(over, states[limit])
        assert MIGRATION_SESSIONS.open_sessions() == limit
    assert MIGRATION_SESSIONS.open_sessions() == 0


async def test_resumed_stream_up_to_the_limit_then_efbig(tmp_path: Path) -> None:
    async with (
        serving(tmp_path, Limits(max_migration_stream=1000)) as served,
        Client.connect(served.socket_path) as client,
    ):
        await client.set_mig_state(MigState.RESUMING)
        await client.mig_data_write(bytes(600))
        await client.mig_data_write(bytes(400))  # exactly the limit: staged
        assert await errno_of(client.mig_data_write(b"x")) == errno.EFBIG
        await client.reset()


# -- sizes a client chooses ------------------------------------------------------------------------


async def test_dirty_report_bitmap_is_bounded_by_the_transfer_size(tmp_path: Path) -> None:
    xfer = 4096
    caps = ServerCapabilities(max_data_xfer_size=xfer)
    async with (
        serving(tmp_path, Limits(max_message_size=xfer + 4096), capabilities=caps) as served,
        Client.connect(served.socket_path) as client,
    ):
        await client.dma_map(0, 1 << 40)  # no fd: nothing is allocated for it
        start = struct.pack("<QII", 4096, 0, 0)
        await client.device_feature(FEATURE_SET | DeviceFeature.DMA_LOGGING_START, start)
        report = FEATURE_GET | DeviceFeature.DMA_LOGGING_REPORT
        at_limit = xfer * 8 * 4096  # exactly xfer bytes of bitmap
        data = struct.pack("<QQQ", 0, at_limit, 4096)
        reply = await client.device_feature(report, data, argsz=8 + 24 + xfer)
        assert len(reply) == 8 + 24 + xfer
        data = struct.pack("<QQQ", 0, at_limit + 64 * 4096, 4096)  # one more u64 word
        call = client.device_feature(report, data, argsz=8 + 24 + xfer + 8)
        assert await errno_of(call) == errno.E2BIG
        huge = struct.pack("<QQQ", 0, 1 << 40, 4096)  # 32 MiB of bitmap: never allocated
        assert await errno_of(client.device_feature(report, huge, argsz=0xFFFFFFFF)) == errno.E2BIG


async def test_mig_data_read_is_bounded_by_our_transfer_size(tmp_path: Path) -> None:
    xfer = 8192
    caps = ServerCapabilities(max_data_xfer_size=xfer)
    async with (
        serving(tmp_path, Limits(max_message_size=xfer + 4096), capabilities=caps) as served,
        Client.connect(served.socket_path, capabilities={"max_data_xfer_size": 1 << 32}) as client,
    ):
        await client.set_mig_state(MigState.STOP_COPY)
        assert len(await client.mig_data_read(xfer)) > 0  # at our limit: served
        assert await errno_of(client.mig_data_read(xfer + 1)) == errno.EINVAL
        await client.set_mig_state(MigState.RUNNING)


# -- peer credentials -----------------------------------------------------------------------------


async def test_allowed_uid_is_served_others_are_refused_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    me = os.getuid()
    other = me + 4242
    async with serving(tmp_path, Limits(allowed_uids=frozenset({me})), name="ok.sock") as ok:
        async with Client.connect(ok.socket_path) as client:
            assert (await client.get_info()).num_regions > 0
        assert ok.server.refused_peers == 0
    caplog.set_level(logging.WARNING, logger="vfio_user_emu")
    async with serving(tmp_path, Limits(allowed_uids=frozenset({other})), name="no.sock") as no:
        conn = await RawConnection.connect(no.socket_path, negotiate=False)
        try:
            assert await conn.closed()
        finally:
            conn.close()
        assert no.server.refused_peers == 1
        assert no.server.active is None  # the refused peer never became the client
    assert any(
        f"uid {me}" in r.getMessage() and "not allowed" in r.getMessage() for r in caplog.records
    )


# -- fd accounting ---------------------------------------------------------------------------


def open_fds() -> set[str]:
    """What each open fd of this process refers to (fd number and target). Devices of
    earlier tests are collected first: their RAM mmaps hold a dup of the memfd."""
    gc.collect()
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd
            found.add(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
    return found


async def client_gone(served: ServedDevice) -> None:
    with trio.fail_after(5):
        while served.server.active is not None:
            await trio.sleep(0.01)


async def test_every_fd_a_session_held_is_released_on_disconnect(tmp_path: Path) -> None:
    """fds sent with commands that take none are closed at once; maps, eventfds, ioeventfds,
    data fds and fds of commands still held back are closed when the client goes."""
    async with serving(tmp_path, Limits()) as served:
        spare = [EventFd() for _ in range(8)]
        ram = GuestRam(0x10000)
        before = open_fds()
        try:
            async with Client.connect(
                served.socket_path, capabilities={"max_msg_fds": 8, "migration": {"data_fd": True}}
            ) as client:
                await enable_bus_master(client)
                # fds on commands that do not take any: closed by the server at once
                during = open_fds()
                await client.region_read(0, td.REG_ID, 4)
                await client.get_info()
                _, _, fds = await client.request(
                    Command.REGION_READ, RegionAccess(td.REG_ID, 0, 4).pack(), fds=[spare[0].fd]
                )
                assert not fds
                with pytest.raises(ClientError):
                    await client.request(Command.DEVICE_GET_INFO, b"\0" * 16, fds=[spare[1].fd])
                with pytest.raises(ClientError):  # DMA_MAP with two fds: refused, both closed
                    await client.request(
                        Command.DMA_MAP, dma_map_payload(0), fds=[ram.fd, spare[2].fd]
                    )
                assert open_fds() == during
                # fds the session keeps
                await client.dma_map(0, 0x10000, fd=ram.fd)
                await client.set_irqs(
                    IrqIndex.MSIX, EVENTFD_TRIGGER, 0, 2, fds=[spare[3].fd, spare[4].fd]
                )
                _, io_fds = await client.get_region_io_fds(0)
                for fd in io_fds:
                    os.close(fd)
                data_fd = await client.set_mig_state(MigState.STOP_COPY)
                assert data_fd is not None
                os.close(data_fd)
                assert len(open_fds() - during) >= 4
            await client_gone(served)
            assert open_fds() == before
            # The device kept its migration state for the next client (spec); a reset ends it.
            async with Client.connect(served.socket_path) as client:
                await client.reset()
            await client_gone(served)
            assert open_fds() == before
        finally:
            ram.close()
            for e in spare:
                e.close()


# -- regressions found while auditing --------------------------------------------------------------


async def test_a_refused_second_client_with_too_many_fds_does_not_stop_the_server(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, Limits(max_fds_per_message=2)) as served:
        async with Client.connect(served.socket_path) as first:
            eventfds = [EventFd() for _ in range(3)]
            try:
                second = await RawConnection.connect(served.socket_path, negotiate=False)
                await second.send(Command.VERSION, b"\0" * 4, [e.fd for e in eventfds])
                assert await second.closed()
                second.close()
            finally:
                for e in eventfds:
                    e.close()
            assert (await first.get_info()).num_regions > 0  # the first client is undisturbed
        async with Client.connect(served.socket_path) as client:  # and the server serves on
            assert (await client.get_info()).num_regions > 0


async def test_a_client_eventfd_at_its_maximum_never_blocks_the_server(tmp_path: Path) -> None:
    """eventfd writes block when the counter would overflow; the client controls the counter.
    The server must drop that interrupt, not hang every device of the process."""
    async with (
        serving(tmp_path, Limits()) as served,
        Client.connect(served.socket_path) as client,
    ):
        full = EventFd()
        try:
            os.write(full.fd, (0xFFFFFFFFFFFFFFFE).to_bytes(8, "little"))
            os.set_blocking(full.fd, True)  # as a careless client would pass it
            await client.set_irqs(IrqIndex.INTX, EVENTFD_TRIGGER, 0, 1, fds=[full.fd])
            await client.region_write(0, td.REG_DOORBELL, struct.pack("<I", 0))
            with trio.fail_after(5):
                assert await client.region_read(0, td.REG_ID, 4) == struct.pack("<I", td.ID_VALUE)
            # The flag is the client's (it lives in the shared file description): the
            # server left it as the client set it.
            assert os.get_blocking(full.fd)
        finally:
            full.close()


def test_serve_options_build_the_limits() -> None:
    from emulator.cli import build_parser
    from emulator.limits import limits_from_args

    args = build_parser().parse_args(
        [
            "serve", "--socket-path", "x", "--max-msg-size", "65536", "--max-dma-maps", "7",
            "--max-fds-per-msg", "20", "--max-irq-vectors", "64", "--max-queued-replies", "9",
            "--max-migration-sessions", "3", "--allow-uid", "1000", "--allow-uid", "0",
            "--max-migration-stream", "12345",
        ]
    )  # fmt: skip
    caps, limits = limits_from_args(args, None)
    assert limits == Limits(
        max_message_size=65536,
        max_fds_per_message=20,
        max_dma_maps=7,
        max_irq_vectors=64,
        max_queued_replies=9,
        max_migration_sessions=3,
        max_migration_stream=12345,
        allowed_uids=frozenset({0, 1000}),
    )
    # What we advertise never exceeds what we accept (or what QEMU takes: 16 fds).
    assert caps.max_data_xfer_size == 65536 - 4096
    assert caps.max_msg_fds == 16 and caps.max_dma_maps == 7
    with pytest.raises(ValueError):
        limits_from_args(
            build_parser().parse_args(["serve", "--fd", "3", "--max-msg-size", "100"]), None
        )
    with pytest.raises(ValueError):
        Limits(max_irq_vectors=0)


async def refused(call: Awaitable[object]) -> None:
    assert await errno_of(call) == errno.EINVAL


async def test_a_data_fd_session_ended_while_its_pump_was_woken_never_touches_the_fd(
    tmp_path: Path,
) -> None:
    """Found by the fuzzer: the pump moving a resumed stream was woken (data in the pipe)
    just as a refused SET ended the session and closed the pipe; it then spliced from the
    closed fd number (EBADF ended the connection; a reused number would read another fd)."""
    async with (
        serving(tmp_path, Limits()) as served,
        Client.connect(
            served.socket_path, capabilities={"max_msg_fds": 8, "migration": {"data_fd": True}}
        ) as client,
    ):
        for attempt in range(60):
            fd = await client.set_mig_state(MigState.RESUMING)
            assert fd is not None
            async with trio.open_nursery() as nursery:
                # RESUMING -> STOP refuses the (empty) stream and ends the data session...
                nursery.start_soon(refused, client.set_mig_state(MigState.STOP))
                for _ in range(attempt % 6):
                    await trio.sleep(0)
                os.close(fd)  # ...while end of stream wakes the pump, at varied moments
            await client.reset()
        assert (await client.get_info()).num_regions > 0


# -- files a client could shrink under our mappings (SIGBUS would kill the server) -----------


async def test_an_unsealable_dma_file_shrunk_by_the_client_does_not_kill_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vfio_user_emu")
    async with (
        serving(tmp_path, Limits()) as served,
        Client.connect(served.socket_path) as client,
    ):
        await enable_bus_master(client)
        fd = os.memfd_create("unsealable", os.MFD_CLOEXEC)  # no MFD_ALLOW_SEALING
        try:
            os.ftruncate(fd, 0x40000)
            await client.dma_map(0, 0x20000, fd=fd)  # accepted, reached with pread/pwrite
            await client.dma_map(0x20000, 0x20000, fd=fd, offset=0x20000)
            assert not caplog.records  # a direct path: nothing to warn about
            os.ftruncate(fd, 0)  # the client shrinks it behind our back
            await program_copy(client, 0, 0x10000, 64)
            with trio.fail_after(5):
                while True:
                    raw = await client.region_read(0, td.REG_DMA_STATUS, 4)
                    status = struct.unpack("<I", raw)[0]
                    if status != td.DMA_BUSY:
                        break
                    await trio.sleep(0.01)
            assert status == td.DMA_FAILED  # a short read, reported as a DMA fault
        finally:
            os.close(fd)
        assert served.server.active is not None  # alive, same session


async def test_sealable_dma_memfds_and_our_ram_fds_are_sealed_against_shrinking(
    tmp_path: Path,
) -> None:
    async with (
        serving(tmp_path, Limits()) as served,
        Client.connect(served.socket_path) as client,
    ):
        fd = os.memfd_create("sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 0x10000)
            await client.dma_map(0, 0x10000, fd=fd)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)  # sealed by the server at DMA_MAP
        finally:
            os.close(fd)
        region = await client.get_region_info(2)  # testdev: BAR2 is its RAM
        assert region.fd is not None
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(region.fd, 0)  # the device's RAM BAR: sealed at creation
        finally:
            os.close(region.fd)


def test_a_dma_file_shrunk_just_before_the_seal_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The coverage check must see the size the seal froze: a client shrinking its memfd
    between our size check and the seal would leave us mapping past the end (SIGBUS)."""
    from emulator import dma

    real_seal = dma.mmap_is_safe

    def shrunk_then_sealed(fd: int) -> bool:
        os.ftruncate(fd, 0x1000)  # the hostile client wins the race
        return real_seal(fd)

    monkeypatch.setattr(dma, "mmap_is_safe", shrunk_then_sealed)
    maps = dma.IovaMap(max_maps=4)
    fd = os.memfd_create("racy", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 0x10000)
    with pytest.raises(ProtocolError) as refused:
        maps.add(DmaMap(argsz=32, flags=RW, offset=0, address=0, size=0x10000), fd)
    assert refused.value.errno == errno.EINVAL and len(maps) == 0
    # Refused by our own coverage check (not only by CPython's mmap length check).
    assert "does not cover" in str(refused.value)


# -- connection floods ---------------------------------------------------------------------------


def test_a_connection_flood_neither_kills_the_server_nor_disturbs_its_client(
    tmp_path: Path,
) -> None:
    """A local peer opening connections faster than they are refused runs the server out of
    fds (here a low RLIMIT_NOFILE); accept() failing must not end the server."""
    path = tmp_path / "flood.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "emulator", "-v", "serve", "--socket-path", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None and b"serving" in server.stdout.readline()
        # Room for the first client and a few more connections, fewer than the refusals.
        room = len(os.listdir(f"/proc/{server.pid}/fd")) + FLOOD_SPARE_FDS
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (room, room))
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        first.connect(str(path))
        first.settimeout(10)
        version = pack_message(1, Command.VERSION, VersionPayload(0, 2, "{}").pack())
        first.sendall(version)
        assert Header.unpack(first.recv(4096)).is_reply
        flood = []
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(0.5)  # a full listen backlog makes connect() wait
            try:
                sock.connect(str(path))
            except OSError:
                sock.close()
                break
            flood.append(sock)
        time.sleep(0.5)
        read = pack_message(2, Command.REGION_READ, RegionAccess(0, CONFIG_REGION, 2).pack())
        first.sendall(read)  # the client being served is undisturbed
        reply = first.recv(4096)
        assert Header.unpack(reply).msg_id == 2 and reply[-2:] == struct.pack("<H", td.VENDOR_ID)
        for sock in flood:
            sock.close()
        first.close()
        time.sleep(0.3)
        assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
        again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # and serves the next one
        again.settimeout(10)
        again.connect(str(path))
        again.sendall(version)
        assert Header.unpack(again.recv(4096)).is_reply
        again.close()
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=10)
    assert b"accept failed" in stderr  # the flood did exhaust the fds


FLOOD_SPARE_FDS = 6


async def test_a_client_the_server_has_no_fd_for_is_dropped_and_the_next_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The session dups the client's socket; EMFILE there closes that one client, it does
    not escape into the server's nursery and end the server."""
    real_dup = os.dup
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def dup_failing_once(fd: int) -> int:
        if failures:
            raise failures.pop()
        return real_dup(fd)

    async with serving(tmp_path, Limits()) as served:
        monkeypatch.setattr(os, "dup", dup_failing_once)
        first = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with first:
            await first.connect(str(served.socket_path))
            with trio.fail_after(5):
                assert await first.recv(4096) == b""  # closed, not served
        assert not failures
        conn = await RawConnection.connect(served.socket_path)  # the next client is served
        try:
            header, payload = await conn.call(
                Command.REGION_READ, RegionAccess(0, CONFIG_REGION, 2).pack()
            )
            assert not header.is_error and payload[-2:] == struct.pack("<H", td.VENDOR_ID)
        finally:
            conn.close()
    assert "cannot serve a client" in caplog.text
