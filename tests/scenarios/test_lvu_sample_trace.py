"""``lvu-sample`` served for real, checked against libvfio-user's traced sample session.

The trace (``tests/data/interop/lvu-client-server.jsonl.xz``) is libvfio-user's sample client
against its sample server, migrating from ``src`` to ``dst``. Its device-level requests are
sent here byte for byte (fds replaced by ours) and our replies are compared with the real
server's recorded replies, byte for byte where the device is the same:

* the device description: GET_INFO, GET_REGION_INFO for all 9 regions (the caps reply with
  its fd), the 64-byte config read;
* the source's migration, seq 147-254: the BAR0 and BAR1 writes just before it, SET
  PRE_COPY, 16 MIG_DATA_READs with REGION_WRITEs of BAR1 between them, SET STOP_COPY, 17
  MIG_DATA_READs, SET STOP;
* the destination's, seq 257-298: SET RESUMING, 17 MIG_DATA_WRITEs, SET STOP, REGION_READ
  of BAR1, SET RUNNING.

The device's wall clock is pinned before the trace's BAR0 time so the timer is armed as it
was in the traced run, and the DMA the timer triggers is checked with our own client.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from devices.lvu_sample import DMA_PATTERN, RAM_SIZE, LvuSample
from emulator.client import Client
from emulator.testing.harness import (
    EventFd,
    GuestRam,
    RawReply,
    RawWire,
    ServedDevice,
    served_device,
)
from protocol.constants import (
    FEATURE_SET,
    FLAG_ERROR,
    Command,
    DeviceFeature,
    IrqSetFlags,
    MigState,
    MsgType,
)
from protocol.header import pack_message
from protocol.messages import DeviceFeatureMsg, MigData, MigDataRead, RegionData
from tests import traces
from tests.traces import LVU_CLIENT, TraceMessage

REPLY_TIMEOUT = 5.0
#: The time_t the client wrote to BAR0 just before migrating (trace #147).
TRACE_T = 1_795_235_422
#: Our device's wall clock: 100 s before that, so the timer is armed throughout.
CLOCK = TRACE_T - 100 + 0.5
VERSION_SEQ = {"src": 1, "dst": 255}
CONFIG_SEQ = 28
REGION_DATA_HEAD = 16  # REGION_READ reply: offset u64, region u32, count u32, data
#: Offsets of BAR2-5 in the config read: libvfio-user shows unused BARs as I/O (0x1).
UNUSED_BARS = range(0x18, 0x28)
OWN_ID = 0xF000


class Clock:
    def __init__(self, now: float = CLOCK) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------------
# Raw connection


@asynccontextmanager
async def serve_lvu(directory: Path, clock: Clock) -> AsyncIterator[tuple[ServedDevice, RawWire]]:
    device = LvuSample(sleep=trio.sleep, clock=clock, poll_interval=0.01)
    async with served_device(device, directory) as served:
        wire = await RawWire.connect(served.socket_path)
        try:
            yield served, wire
        finally:
            wire.close()


async def negotiate(wire: RawWire, conn: str) -> dict[str, object]:
    """The trace's VERSION; our reply must be usable by the client: max_msg_fds 8."""
    first = VERSION_SEQ[conn]
    request, recorded = traces.conversation(LVU_CLIENT, conn, first, first + 1)[0]
    assert request.command == Command.VERSION
    reply = await wire.request(request)
    assert reply.header.msg_id == request.msg_id and not reply.header.is_error
    assert not reply.fds
    major, minor = struct.unpack_from("<HH", reply.payload)
    assert (major, minor) == (0, 2)
    text = reply.payload[4:].rstrip(b"\0").decode()
    caps: dict[str, object] = json.loads(text)["capabilities"]
    recorded_caps = json.loads(recorded.payload[4:].rstrip(b"\0").decode())["capabilities"]
    assert caps["max_msg_fds"] == recorded_caps["max_msg_fds"] == 8
    return caps


def assert_same_reply(ours: RawReply, recorded: TraceMessage) -> None:
    where = f"{recorded}: ours {ours.header}"
    assert ours.header == recorded.header, where
    assert len(ours.fds) == recorded.nfds, where
    assert ours.payload == recorded.payload, f"{where}: payload differs"


# --------------------------------------------------------------------------------------------
# Device description


async def test_device_description_matches_the_sample_server(tmp_path):
    async with serve_lvu(tmp_path, Clock()) as (_, wire):
        await negotiate(wire, "src")
        for request, recorded in traces.conversation(LVU_CLIENT, "src", 3, CONFIG_SEQ):
            reply = await wire.request(request)
            if request.command == Command.REGION_READ and request.seq == CONFIG_SEQ - 1:
                assert reply.header == recorded.header
                ours, theirs = bytearray(reply.payload), bytearray(recorded.payload)
                for at in UNUSED_BARS:
                    theirs[REGION_DATA_HEAD + at] = 0
                assert ours == theirs
                ids = ours[REGION_DATA_HEAD : REGION_DATA_HEAD + 4]
                subsystem = ours[REGION_DATA_HEAD + 0x2C : REGION_DATA_HEAD + 0x30]
                assert (ids.hex(), subsystem.hex()) == ("addeefbe", "fecabeba")
                continue
            assert_same_reply(reply, recorded)
            if recorded.nfds:  # the BAR1 caps reply (sparse areas): its fd is BAR1's memfd
                assert request.seq == 11
                assert os.fstat(reply.fds[0]).st_size == RAM_SIZE


async def test_irq_info_counts(tmp_path):
    async with serve_lvu(tmp_path, Clock()) as (_, wire):
        await negotiate(wire, "src")
        for request, recorded in traces.conversation(LVU_CLIENT, "src", 63, 72):
            reply = await wire.request(request)
            assert reply.header == recorded.header and not reply.fds
            # argsz, index, count as recorded; our INTx also says MASKABLE|AUTOMASKED.
            ours = struct.unpack("<IIII", reply.payload)
            theirs = struct.unpack("<IIII", recorded.payload)
            assert (ours[0], ours[2], ours[3]) == (theirs[0], theirs[2], theirs[3])


# --------------------------------------------------------------------------------------------
# Migration, source side


def is_set_state(msg: TraceMessage) -> bool:
    if msg.command != Command.DEVICE_FEATURE:
        return False
    return (
        DeviceFeatureMsg.unpack(msg.payload).flags == FEATURE_SET | DeviceFeature.MIG_DEVICE_STATE
    )


def set_state_target(msg: TraceMessage) -> MigState:
    return MigState(struct.unpack_from("<I", msg.payload, 8)[0])


async def test_source_migration_replay(tmp_path):
    # BAR0 and BAR1 as the client left them just before SET PRE_COPY (#147, #149).
    setup = traces.conversation(LVU_CLIENT, "src", 147, 150)
    window = traces.conversation(LVU_CLIENT, "src", 151, 254)
    commands = {request.command for request, _ in window}
    assert commands == {
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
        Command.REGION_WRITE,
    }
    final_bar1 = traces.by_seq(LVU_CLIENT, 296).payload[16:]
    assert len(final_bar1) == RAM_SIZE

    async with serve_lvu(tmp_path, Clock()) as (served, wire):
        await negotiate(wire, "src")
        device = served.device
        assert isinstance(device, LvuSample)
        for request, recorded in setup:
            assert_same_reply(await wire.request(request), recorded)
        assert device.time_value == TRACE_T
        assert device.deadline == CLOCK + 100, "armed as in the traced run"

        state = MigState.RUNNING
        valid: dict[MigState, list[int]] = {MigState.PRE_COPY: [], MigState.STOP_COPY: []}
        for request, recorded in window:
            with trio.fail_after(1):  # an armed timer must not hold up SET STOP_COPY
                reply = await wire.request(request)
            # Every reply is the real server's, byte for byte: SETs echoed, REGION_WRITE
            # replies, and all MIG_DATA_READ replies (argsz/size, data, zero padding) --
            # PRE_COPY data is BAR1 as it is when read, STOP_COPY data as it was on entry.
            assert_same_reply(reply, recorded)
            if is_set_state(request):
                state = set_state_target(request)
            elif request.command == Command.MIG_DATA_READ:
                asked = MigDataRead.unpack(request.payload)
                data = MigData.unpack(reply.payload)
                assert len(reply.payload) == 8 + asked.size == 8 + 1024
                assert data.argsz == 8 + data.size
                assert reply.payload[8 + data.size :] == bytes(asked.size - data.size)
                valid[state].append(data.size)
            elif request.command == Command.REGION_WRITE:
                assert state == MigState.PRE_COPY
                assert RegionData.unpack(request.payload).region == 1
            # After the last STOP_COPY read, before SET STOP: the client does not read the
            # final empty chunk, but it must be empty.
            if request.seq == 251:
                extra = MigDataRead(8 + 1024, 1024).pack()
                await wire.send(pack_message(OWN_ID, Command.MIG_DATA_READ, extra))
                empty = await wire.receive()
                assert not empty.header.is_error
                assert empty.payload == struct.pack("<II", 8, 0) + bytes(1024)

        assert valid[MigState.PRE_COPY] == [1024] * 16
        assert valid[MigState.STOP_COPY] == [1024] * 16 + [8]
        assert state == MigState.STOP and device.migration.state == MigState.STOP
        assert bytes(device.bar1.buffer) == final_bar1, "BAR1 = the destination's BAR1"
        assert device.expirations == 0


# --------------------------------------------------------------------------------------------
# Migration, destination side


async def test_destination_migration_replay(tmp_path):
    window = traces.conversation(LVU_CLIENT, "dst", 257, 298)
    assert [set_state_target(r) for r, _ in window if is_set_state(r)] == [
        MigState.RESUMING,
        MigState.STOP,
        MigState.RUNNING,
    ]
    writes = [r for r, _ in window if r.command == Command.MIG_DATA_WRITE]
    assert [MigData.unpack(w.payload).size for w in writes] == [1024] * 16 + [8]

    clock = Clock()
    async with serve_lvu(tmp_path, clock) as (served, wire):
        caps = await negotiate(wire, "dst")
        assert caps["max_msg_fds"] == 8, "the client re-reads it on the destination"
        device = served.device
        assert isinstance(device, LvuSample)
        for request, recorded in window:
            reply = await wire.request(request)
            # SETs echoed, header-only MIG_DATA_WRITE replies, and the REGION_READ of BAR1
            # returning exactly the bytes the real destination returned.
            assert_same_reply(reply, recorded)
        assert device.migration.state == MigState.RUNNING
        assert device.time_value == TRACE_T
        assert bytes(device.bar1.buffer) == traces.by_seq(LVU_CLIENT, 296).payload[16:]
        assert device.deadline == CLOCK + 100, "RUNNING re-armed the migrated time"


@pytest.mark.parametrize("defect", ["short", "long"])
async def test_destination_rejects_a_bad_stream(tmp_path, defect):
    window = traces.conversation(LVU_CLIENT, "dst", 257, 294)
    resuming, stop = window[0], window[-1]
    writes = [pair for pair in window if pair[0].command == Command.MIG_DATA_WRITE]
    async with serve_lvu(tmp_path, Clock()) as (served, wire):
        await negotiate(wire, "dst")
        assert_same_reply(await wire.request(resuming[0]), resuming[1])
        sent = writes[:-1] if defect == "short" else writes  # short: BAR1 without BAR0
        for request, recorded in sent:
            assert_same_reply(await wire.request(request), recorded)
        if defect == "long":
            extra = MigData(9, 1, b"\0").pack()
            await wire.send(pack_message(OWN_ID, Command.MIG_DATA_WRITE, extra))
            assert not (await wire.receive()).header.is_error

        reply = await wire.request(stop[0])
        assert reply.header.msg_id == stop[0].msg_id
        assert reply.header.flags == MsgType.REPLY | FLAG_ERROR
        assert reply.header.error == errno.EINVAL and reply.payload == b"" and not reply.fds
        assert served.device.migration.state == MigState.RESUMING

        # The data was discarded; the whole stream again is accepted.
        for request, recorded in writes:
            assert_same_reply(await wire.request(request), recorded)
        assert_same_reply(await wire.request(stop[0]), stop[1])


# --------------------------------------------------------------------------------------------
# The timer and its DMA, with our client in the sample client's part


class RecordingMemory:
    """The client's memory for server->client DMA messages, logging each one."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram
        self.log: list[tuple[str, int, bytes | int]] = []

    def read(self, address: int, count: int) -> bytes:
        self.log.append(("DMA_READ", address, count))
        return self.ram.read(address, count)

    def write(self, address: int, data: bytes) -> None:
        self.log.append(("DMA_WRITE", address, bytes(data)))
        self.ram.write(address, data)


async def test_timer_raises_intx_and_does_the_dma_rounds(tmp_path):
    # The traced server's DMA after the first interrupt (#81-#96).
    recorded: list[tuple[str, int, bytes | int]] = []
    for msg in traces.messages(LVU_CLIENT, conn="src", max_seq=96):
        if msg.seq >= 81 and not msg.from_client:
            address, count = struct.unpack_from("<QQ", msg.payload)
            if msg.command == Command.DMA_WRITE:
                recorded.append(("DMA_WRITE", address, msg.payload[16:]))
            else:
                recorded.append(("DMA_READ", address, count))
    assert len(recorded) == 8

    clock = Clock()
    device = LvuSample(sleep=trio.sleep, clock=clock, poll_interval=0.01)
    caps = {"max_msg_fds": 32, "max_data_xfer_size": 1024}  # as the sample client
    with GuestRam(0x2000) as ram:
        async with (
            served_device(device, tmp_path) as served,
            Client.connect(served.socket_path, capabilities=caps) as client,
        ):
            assert client.server_caps["max_msg_fds"] == 8
            memory = RecordingMemory(ram)
            client.serve_dma(memory)
            await client.dma_map(0x0, 0x1000, fd=ram.fd, offset=0x0)
            await client.dma_map(0x1000, 0x1000, fd=ram.fd, offset=0x1000)
            session = served.server.active
            assert session is not None
            dirty: set[int] = set()  # 4 KiB pages the device's writes told the dirty log of
            forward = session.dirty.sink

            def record_dirty(iova: int, length: int) -> None:
                if length:
                    dirty.update(range(iova // 0x1000, (iova + length - 1) // 0x1000 + 1))
                if forward is not None:
                    forward(iova, length)

            session.dirty.sink = record_dirty
            intx = EventFd()
            try:
                flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
                await client.set_irqs(0, flags, 0, 1, fds=[intx.fd])
                t = int(clock.now) + 1
                await client.region_write(0, 0, t.to_bytes(8, "little"))
                assert await client.region_read(0, 0, 8) == b"\xff" * 8  # now - T = -1
                await trio.sleep(0.05)
                assert intx.take() == 0 and not memory.log, "fired before T"

                clock.now += 1
                assert await intx.wait() == 1
                with trio.fail_after(REPLY_TIMEOUT):
                    while device.dma_rounds_done < 1:
                        await trio.sleep(0.01)
            finally:
                intx.close()
            assert memory.log == recorded, "4 DMA_WRITEs then 4 DMA_READs to region 1"
            # Round 1 went to the second region through its mmap, not by message ...
            assert ram.read(0x1000, 0x1000) == DMA_PATTERN
            # ... and both pages are logged dirty: the one written through the mmap and the
            # one written with DMA_WRITE messages (our rule: every DMA_WRITE we send counts,
            # where libvfio-user leaves message-written pages to the client).
            assert {0, 1} <= dirty
            assert ram.read(0x0, 0x1000) == DMA_PATTERN
            assert device.expirations == 1 and not device.armed
