"""``lvu-sample,migration=v1`` served for real, against the protocol-0.1 sample's trace.

The trace (``tests/data/interop/lvu-v1-client-server.jsonl.xz``) is the older libvfio-user sample
client (protocol 0.1) against its sample server: a session with DIRTY_PAGES (14) and a v1
migration through the migration region (index 9) from ``src`` to ``dst``. Its requests
are sent here byte for byte (fds replaced by ours) and our replies compared with the real
server's, byte for byte, except for these justified differences:

* VERSION: our JSON advertises more (``pgsizes``, ``max_dma_maps``, ``write_multiple``);
  what the client needs is equal: minor 1, ``max_msg_fds`` 8, ``migration.pgsize`` 4096.
* GET_REGION_INFO of config space: flags READ|WRITE here, 0 there (the old library did
  not flag config space; that client reads it regardless).
* GET_IRQ_INFO of INTx: ours also says MASKABLE|AUTOMASKED (as in the v2 profile's test).
* the config read: unused BARs read 0 here, 0x1 there (as in the v2 profile's test).
* GET_REGION_INFO of BAR1 with caps: one fd (BAR1's memfd, covering both sparse areas),
  where the old library sent one per area -- QEMU accepts at most one.
* GET_REGION_INFO of the migration region: ours is trapped only (READ|WRITE|CAPS, the
  TYPE 3/1 cap, argsz 48, offset 0); the traced server also offered its data window for
  mmap (a sparse cap and an fd), which that client never uses.
* the server->client DMA the timer triggers (#85-#100) is checked with our own client,
  not replayed, so the DIRTY_PAGES bitmaps of the replay are all clean, as recorded.
  (After that DMA we report the page written with DMA_WRITE messages dirty; the old
  library left such pages to the client. Reporting too much is safe.)

The device's wall clock is pinned one second before the trace's BAR0 time, so BAR0 reads
as recorded and the timer stays armed without firing.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from devices.lvu_sample import LEGACY_DMA_PATTERN, LEGACY_RAM_SIZE, LvuSample
from emulator.client import Client
from emulator.client import migrate_v1 as migration_v1
from emulator.testing.harness import (
    EventFd,
    GuestRam,
    RawReply,
    RawWire,
    ServedDevice,
    served_device,
)
from protocol.constants import Command, IrqSetFlags, MigState, RegionFlags
from protocol.header import pack_message
from protocol.messages import RegionAccess, RegionInfo, TypeCap, unpack_region_caps
from protocol.migration_v1 import DATA_OFFSET
from tests import traces
from tests.traces import LVU_V1_CLIENT as LVU_V1
from tests.traces import TraceMessage

#: The time_t the client wrote to BAR0 before its first interrupt (#81), and before
#: migrating (#151).
FIRST_T = 1_795_238_188
MIGRATED_T = FIRST_T + 10
REGION_DATA_HEAD = 16
UNUSED_BARS = range(0x18, 0x28)
MIGRATION_REGION = 9
#: Recorded replies that differ for a documented reason (module docstring).
CONFIG_INFO_SEQ = 24
CONFIG_READ_SEQ = 32
BAR1_CAPS_SEQ = 12
MIGRATION_INFO_SEQS = (28, 30)
DMA_SEQS = frozenset({*range(85, 101), *range(229, 245)})
INTX_INFO_SEQS = (68, 218)


@dataclass(frozen=True)
class Raw:
    raw: bytes


READ_STATE = RegionAccess(0, MIGRATION_REGION, 4).pack()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def v1_sample(clock: Clock) -> LvuSample:
    device = LvuSample(sleep=trio.sleep, clock=clock, poll_interval=0.01, legacy_v1=True)
    device.migration_protocols = frozenset({"v1"})
    return device


@asynccontextmanager
async def serve(directory: Path, clock: Clock) -> AsyncIterator[tuple[ServedDevice, RawWire]]:
    async with served_device(v1_sample(clock), directory) as served:
        wire = await RawWire.connect(served.socket_path)
        try:
            yield served, wire
        finally:
            wire.close()


def assert_same_reply(ours: RawReply, recorded: TraceMessage) -> None:
    where = f"{recorded}: ours {ours.header}"
    assert ours.header == recorded.header, where
    assert len(ours.fds) == recorded.nfds, where
    assert ours.payload == recorded.payload, f"{where}: payload differs"


async def negotiate(wire: RawWire, conn: str) -> None:
    first = 1 if conn == "src" else 181
    request, recorded = traces.conversation(LVU_V1, conn, first, first + 1, skip=DMA_SEQS)[0]
    assert request.command == Command.VERSION
    reply = await wire.request(request)
    ours_header, their_header = reply.header, recorded.header
    assert (ours_header.msg_id, ours_header.flags) == (their_header.msg_id, their_header.flags)
    assert not reply.fds
    assert struct.unpack_from("<HH", reply.payload) == (0, 1)
    ours = json.loads(reply.payload[4:].rstrip(b"\0"))["capabilities"]
    theirs = json.loads(recorded.payload[4:].rstrip(b"\0"))["capabilities"]
    for key in ("max_msg_fds", "max_data_xfer_size"):
        assert ours[key] == theirs[key]
    assert ours["migration"] == theirs["migration"] == {"pgsize": 4096}


class Fds:
    """What the client passed: one memfd for every DMA_MAP, one eventfd for INTx."""

    def __init__(self, ram: GuestRam, intx: EventFd) -> None:
        self.ram = ram
        self.intx = intx

    def of(self, request: TraceMessage) -> list[int]:
        if not request.nfds:
            return []
        assert request.nfds == 1
        return [self.ram.fd if request.command == Command.DMA_MAP else self.intx.fd]


async def replay(
    wire: RawWire, window: list[tuple[TraceMessage, TraceMessage]], fds: Fds
) -> dict[int, RawReply]:
    """Send each request, compare each reply; return the replies that may differ."""
    special: dict[int, RawReply] = {}
    for request, recorded in window:
        reply = await wire.request(request, fds.of(request))
        if recorded.seq in (CONFIG_INFO_SEQ, CONFIG_READ_SEQ, BAR1_CAPS_SEQ, *MIGRATION_INFO_SEQS):
            special[recorded.seq] = reply
            continue
        if recorded.seq in INTX_INFO_SEQS:
            assert reply.header == recorded.header and not reply.fds
            ours, theirs = (
                struct.unpack("<IIII", reply.payload),
                struct.unpack("<IIII", recorded.payload),
            )
            assert (ours[0], ours[2], ours[3]) == (theirs[0], theirs[2], theirs[3])
            assert ours[1] & theirs[1] == theirs[1]
            continue
        assert_same_reply(reply, recorded)
    return special


# --------------------------------------------------------------------------------------------


async def test_source_session_and_v1_save_replay(tmp_path):
    window = traces.conversation(LVU_V1, "src", 3, 180, skip=DMA_SEQS)
    commands = {request.command for request, _ in window}
    assert Command.DIRTY_PAGES in commands and Command.DMA_MAP in commands
    clock = Clock(FIRST_T - 1 + 0.5)
    with GuestRam(0x10000) as ram:
        intx = EventFd()
        try:
            async with serve(tmp_path, clock) as (served, wire):
                await negotiate(wire, "src")
                device = served.device
                assert isinstance(device, LvuSample)
                special = await replay(wire, window, Fds(ram, intx))
                assert device.migration.state == MigState.STOP
                assert device.time_value == MIGRATED_T
                assert device.expirations == 0 and intx.take() == 0
        finally:
            intx.close()

    # The documented differences, checked for what they must still say.
    config = RegionInfo.unpack(special[CONFIG_INFO_SEQ].payload)
    theirs_config = RegionInfo.unpack(traces.by_seq(LVU_V1, CONFIG_INFO_SEQ).payload)
    assert config == dataclasses.replace(theirs_config, flags=RegionFlags.READ | RegionFlags.WRITE)
    ours = bytearray(special[CONFIG_READ_SEQ].payload)
    theirs = bytearray(traces.by_seq(LVU_V1, CONFIG_READ_SEQ).payload)
    for at in UNUSED_BARS:
        theirs[REGION_DATA_HEAD + at] = 0
    assert ours == theirs
    caps_reply = special[BAR1_CAPS_SEQ]
    assert caps_reply.payload == traces.by_seq(LVU_V1, BAR1_CAPS_SEQ).payload
    assert len(caps_reply.fds) == 1

    first, full = (special[seq] for seq in MIGRATION_INFO_SEQS)
    for reply in (first, full):
        info = RegionInfo.unpack(reply.payload)
        assert (info.index, info.size, info.argsz) == (MIGRATION_REGION, 0x5000, 48)
        assert not reply.fds
    assert RegionInfo.unpack(first.payload).flags == RegionFlags.READ | RegionFlags.WRITE
    info = RegionInfo.unpack(full.payload)
    assert info.flags == RegionFlags.READ | RegionFlags.WRITE | RegionFlags.CAPS
    assert unpack_region_caps(full.payload, info.cap_offset) == [TypeCap(3, 1)]


async def test_destination_v1_resume_replay(tmp_path):
    window = traces.conversation(LVU_V1, "dst", 183, 246, skip=DMA_SEQS)
    states = [
        struct.unpack_from("<I", r.payload, 16)[0]
        for r, _ in window
        if r.command == Command.REGION_WRITE
        and struct.unpack_from("<QI", r.payload) == (0, MIGRATION_REGION)
    ]
    assert states == [4, 1]  # RESUMING, then RUNNING
    clock = Clock(MIGRATED_T - 1 + 0.5)
    with GuestRam(0x10000) as ram:
        intx = EventFd()
        try:
            async with serve(tmp_path, clock) as (served, wire):
                await negotiate(wire, "dst")
                device = served.device
                assert isinstance(device, LvuSample)
                # Includes the REGION_READ of BAR1 after RUNNING (#199): exactly the bytes
                # the real destination held, from the two segments written (#187, #193).
                await replay(wire, window, Fds(ram, intx))
                assert device.migration.state == MigState.RUNNING
                assert device.time_value == MIGRATED_T
                assert device.deadline == clock.now + 1, "RUNNING re-armed the migrated T"
                last_bar1 = traces.by_seq(LVU_V1, 200).payload[REGION_DATA_HEAD:]
                assert bytes(device.bar1.buffer) == last_bar1
        finally:
            intx.close()


async def test_destination_refuses_a_truncated_segment_stream(tmp_path):
    window = traces.conversation(LVU_V1, "dst", 183, 198, skip=DMA_SEQS)
    resuming, running = window[0], window[-1]
    # Only the PRE_COPY segment (BAR1 alone), then RUNNING: the stream lacks BAR0.
    first_segment = window[1:4]
    async with serve(tmp_path, Clock(MIGRATED_T - 1)) as (served, wire):
        await negotiate(wire, "dst")
        assert_same_reply(await wire.request(resuming[0]), resuming[1])
        for request, reply in first_segment:
            assert_same_reply(await wire.request(request), reply)
        refused = await wire.request(running[0])
        assert refused.header.is_error and refused.payload == b""
        engine = served.device.migration
        assert engine.state == MigState.RESUMING, "a failed load leaves RESUMING"
        device_state = await wire.request(Raw(pack_message(7, Command.REGION_READ, READ_STATE)))
        assert device_state.payload[REGION_DATA_HEAD:] == struct.pack("<I", 4)


async def test_timer_interrupt_and_message_dma_as_recorded(tmp_path):
    recorded_dma: list[tuple[str, int, bytes | int]] = []
    for msg in traces.messages(LVU_V1, conn="src", max_seq=100):
        if msg.seq in DMA_SEQS and not msg.from_client:
            address, count = struct.unpack_from("<QQ", msg.payload)
            kind = "DMA_WRITE" if msg.command == Command.DMA_WRITE else "DMA_READ"
            recorded_dma.append((kind, address, msg.payload[16:] if kind == "DMA_WRITE" else count))
    assert len(recorded_dma) == 8

    clock = Clock(FIRST_T - 1 + 0.5)
    device = v1_sample(clock)
    caps = {"max_msg_fds": 32, "max_data_xfer_size": 1024, "migration": {"pgsize": 4096}}
    log: list[tuple[str, int, bytes | int]] = []
    with GuestRam(0x2000) as ram:

        class Memory:
            def read(self, address: int, count: int) -> bytes:
                log.append(("DMA_READ", address, count))
                return ram.read(address, count)

            def write(self, address: int, data: bytes) -> None:
                log.append(("DMA_WRITE", address, bytes(data)))
                ram.write(address, data)

        async with (
            served_device(device, tmp_path) as served,
            Client.connect(served.socket_path, capabilities=caps, minor=1) as client,
        ):
            client.serve_dma(Memory())
            await client.dma_map(0x0, 0x1000, fd=ram.fd, offset=0x0)
            await client.dma_map(0x1000, 0x1000, fd=ram.fd, offset=0x1000)
            await migration_v1.dirty_pages_start(client)
            intx = EventFd()
            try:
                flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
                await client.set_irqs(0, flags, 0, 1, fds=[intx.fd])
                await client.region_write(0, 0, FIRST_T.to_bytes(8, "little"))
                clock.now += 1
                assert await intx.wait() == 1
                with trio.fail_after(5):
                    while device.dma_rounds_done < 1:
                        await trio.sleep(0.01)
            finally:
                intx.close()
            assert log == recorded_dma, "4 DMA_WRITEs then 4 DMA_READs to the first region"
            assert ram.read(0x0, 0x1000) == LEGACY_DMA_PATTERN
            assert ram.read(0x1000, 0x1000) == bytes(0x1000), "no mmap round in the old sample"
            page0 = await migration_v1.dirty_bitmap(client, 0x0, 0x1000)
            page1 = await migration_v1.dirty_bitmap(client, 0x1000, 0x1000)
            assert (page0, page1) == (b"\x01" + bytes(7), bytes(8))
            await migration_v1.dirty_pages_stop(client)


def test_legacy_profile_layout():
    device = v1_sample(Clock(0))
    assert device.regions[1].size == LEGACY_RAM_SIZE
    assert device.num_regions == 9, "the session adds the migration region as index 9"
    assert device.migration_v1_window == 0x4000 and DATA_OFFSET == 0x1000
