"""emulator.migration_region: the v1 region driving the one migration engine, in process.

The bitfield is checked against the v2 FSM for every 32-bit value written from every
state (hypothesis): invalid combinations fail with EINVAL and change nothing; valid ones
outside the v1 allowed-transition table fail with EINVAL and change nothing; the rest
do exactly what a v2 SET of the mapped state does (``protocol.migration_fsm.plan``), and
a refused SET changes nothing either. Over a real socket: tests/emulator/client/test_migrate_v1.py.
"""

from __future__ import annotations

import errno
import gc
import struct
import sys
import weakref
from types import FrameType
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.errors import DeviceError, MigrationRefused
from devices.migration.engine import ALL_CAPS, DEFAULT_CAPS
from devices.testdev import TestDev, TestDevOptions
from emulator.limits import Limits
from emulator.migration_region import MigrationRegion, region_for
from emulator.worker import DeviceWorker
from protocol.constants import MigState
from protocol.errors import ProtocolError
from protocol.migration_fsm import plan
from protocol.migration_v1 import (
    ALLOWED_TRANSITIONS,
    BITS_TO_STATE,
    DATA_OFFSET,
    STATE_MASK,
    register_value,
    transition_allowed,
)

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
STARTS = [
    MigState.RUNNING,
    MigState.STOP,
    MigState.STOP_COPY,
    MigState.PRE_COPY,
    MigState.RESUMING,
    MigState.RUNNING_P2P,
    MigState.PRE_COPY_P2P,
]


def v1_device(caps: int = int(ALL_CAPS)) -> tuple[TestDev, MigrationRegion]:
    device = TestDev(TestDevOptions(ram_size=4096, msix_vectors=1))
    device.set_migration_caps(caps)
    device.migration_protocols = frozenset({"v1"})
    region = region_for(device)
    assert region is not None
    return device, region


def device_state(region: MigrationRegion) -> int:
    value: int = U32.unpack(region.read(0, 4))[0]
    return value


async def write_state(region: MigrationRegion, value: int) -> None:
    target = region.write(0, U32.pack(value))
    assert target is not None
    await region.transition(target, worker_of(region).change_state)


def worker_of(region: MigrationRegion) -> DeviceWorker:
    """The runtime's state changer for the region's device (as the handler gives it)."""
    return DeviceWorker(region.device, Limits())


def plan_fails(caps: int, start: MigState, target: MigState) -> bool:
    try:
        plan(caps, start, target)
    except ProtocolError:
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([int(ALL_CAPS), int(DEFAULT_CAPS), 1]),
    st.sampled_from(STARTS),
    st.integers(0, 0xFFFF_FFFF),
)
def test_every_u32_write_from_every_state_follows_the_fsm(caps: int, start: MigState, value: int):
    device, region = v1_device(caps)
    engine = device.migration

    async def scenario() -> None:
        if plan_fails(caps, MigState.RUNNING, start):
            return  # this device cannot be in that state
        engine.set_state(start)
        before = device_state(region)
        assert before == register_value(start)
        target = BITS_TO_STATE.get(value & STATE_MASK)
        if target is None:
            with pytest.raises(ProtocolError) as info:
                region.write(0, U32.pack(value))
            assert info.value.errno == errno.EINVAL
            assert engine.state == start and device_state(region) == before
            return
        if not transition_allowed(start, target):
            with pytest.raises(ProtocolError) as info:
                region.write(0, U32.pack(value))  # refused before any transition exists
            assert info.value.errno == errno.EINVAL
            assert engine.state == start and device_state(region) == before
            return
        if plan_fails(caps, start, target):
            with pytest.raises(MigrationRefused) as refused:
                await write_state(region, value)
            assert refused.value.errno == errno.EINVAL
            assert engine.state == start and device_state(region) == before
            return
        try:
            await write_state(region, value)
        except Exception as exc:  # only leaving RESUMING can fail: nothing was written
            assert start == MigState.RESUMING and target != MigState.RESUMING, exc
            assert engine.state == start and device_state(region) == before
            return
        assert engine.state == target
        # Reserved bits of the write are ignored: the register reads the state only.
        assert device_state(region) == register_value(target)

    trio.run(scenario)


async def test_failed_transition_reads_previous_state_or_the_error_value():
    class Fragile(TestDev):
        fail: frozenset[tuple[MigState, MigState]] = frozenset()

        def migration_arc(self, arc: tuple[MigState, MigState]) -> None:
            if arc in self.fail:
                raise DeviceError(errno.EIO, f"arc {arc} fails")

    device = Fragile(TestDevOptions(ram_size=4096, msix_vectors=1))
    device.migration_protocols = frozenset({"v1"})
    region = region_for(device)
    assert region is not None
    # RUNNING -> STOP -> STOP_COPY, the second arc fails, the walk back works: RUNNING.
    device.fail = frozenset({(MigState.STOP, MigState.STOP_COPY)})
    with pytest.raises(DeviceError) as info:
        await write_state(region, 0b010)
    assert info.value.errno == errno.EIO
    assert device_state(region) == 0b001
    # The walk back fails too: ERROR, which reads SAVING|RESUMING and refuses everything.
    device.fail = frozenset(
        {(MigState.STOP, MigState.STOP_COPY), (MigState.STOP, MigState.RUNNING)}
    )
    with pytest.raises(DeviceError):
        await write_state(region, 0b010)
    assert device_state(region) == 0b110
    with pytest.raises(ProtocolError):
        await write_state(region, 0b001)
    assert device_state(region) == 0b110
    # A reset (what DEVICE_RESET does) is the way out: RUNNING.
    device.migration.reset()
    region.reset()
    assert device_state(region) == 0b001


async def test_save_segments_and_acknowledgement():
    device, region = v1_device()
    device.ram.buffer[:4] = b"data"
    await write_state(region, 0b010)  # SAVING: STOP_COPY
    pending = U64.unpack(region.read(8, 8))[0]
    assert pending > 0
    assert U64.unpack(region.read(0x10, 8))[0] == DATA_OFFSET
    size = U64.unpack(region.read(0x18, 8))[0]
    assert size == pending <= region.window
    # Reading data_offset again before the acknowledgement keeps the same segment.
    assert U64.unpack(region.read(0x10, 8))[0] == DATA_OFFSET
    assert U64.unpack(region.read(0x18, 8))[0] == size
    first = region.read(DATA_OFFSET, 16)
    whole = region.read(DATA_OFFSET, size)
    assert whole[:16] == first
    with pytest.raises(ProtocolError):
        region.read(DATA_OFFSET + size - 4, 8)  # beyond the segment
    assert U64.unpack(region.read(8, 8))[0] == 0, "acknowledged: the stream is complete"
    with pytest.raises(ProtocolError):
        region.write(0x18, U64.pack(1))  # data_size is not writable while saving
    with pytest.raises(ProtocolError):
        region.write(8, U64.pack(1))  # pending_bytes is read-only

    # The same bytes resume a second device.
    other, target = v1_device()
    await write_state(target, 0b100)
    assert U64.unpack(target.read(0x10, 8))[0] == DATA_OFFSET
    target.write(DATA_OFFSET + 8, whole[8:])
    with pytest.raises(ProtocolError):
        target.write(0x18, U64.pack(size))  # bytes 0..8 were never written
    target.write(DATA_OFFSET, whole[:8])
    assert target.write(0x18, U64.pack(size)) is None
    await write_state(target, 0b001)
    assert bytes(other.ram.buffer[:4]) == b"data"


async def test_pre_copy_segments_fill_the_window_while_data_is_available():
    """As MIG_DATA_READ replies: a segment shorter than the window only when nothing more
    is available now (not at every boundary of the device's 1 MiB PRE_COPY sections)."""
    device = TestDev(TestDevOptions(ram_size=4 << 20, msix_vectors=1))
    device.migration_protocols = frozenset({"v1"})
    region = region_for(device)
    assert region is not None
    device.ram.buffer[:] = bytes(range(256)) * (4 << 12)  # no zero page to elide
    await write_state(region, 0b011)  # SAVING | RUNNING: PRE_COPY
    sizes = []
    while U64.unpack(region.read(8, 8))[0]:  # pending_bytes (acknowledges the last segment)
        assert U64.unpack(region.read(0x10, 8))[0] == DATA_OFFSET
        sizes.append(U64.unpack(region.read(0x18, 8))[0])
    assert sum(sizes) > 4 << 20
    assert all(size == region.window for size in sizes[:-1]) and sizes[-1] <= region.window


def test_window_accesses_outside_their_states_are_refused():
    _, region = v1_device()
    with pytest.raises(ProtocolError):
        region.read(DATA_OFFSET, 4)  # RUNNING: nothing to read
    with pytest.raises(ProtocolError):
        region.write(DATA_OFFSET, b"x")  # nor to write
    with pytest.raises(ProtocolError):
        region.write(0x18, U64.pack(0))
    with pytest.raises(DeviceError):  # outside the region
        region.read(region.size - 2, 4)
    assert region.read(4, 4) == bytes(4)
    assert region.write(4, b"\xff" * 4) is None  # reserved: ignored
    assert U64.unpack(region.read(8, 8))[0] == 0


_OFFSETS = st.one_of(
    st.sampled_from([0, 4, 8, 0x10, 0x18, 0x20, DATA_OFFSET, DATA_OFFSET + 8, 0x1000 + (1 << 20)]),
    st.integers(0, DATA_OFFSET + (1 << 20) + 16),
)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), _OFFSETS, st.sampled_from([0, 1, 4, 8, 16, 4096])),
        st.tuples(st.just("write"), _OFFSETS, st.binary(max_size=24)),
        st.tuples(st.just("state"), st.just(0), st.integers(0, 15).map(U32.pack)),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_arbitrary_accesses_only_fail_with_an_errno(ops: list[tuple[str, int, object]]):
    """Whatever a client does to the region: an errno or a result, never anything else;
    and device_state always reads a value the bitfield defines."""
    _, region = v1_device()

    async def scenario() -> None:
        for kind, offset, arg in ops:
            try:
                if kind == "read":
                    assert isinstance(arg, int)
                    assert len(region.read(offset, arg)) == arg
                else:
                    assert isinstance(arg, bytes)
                    target = region.write(0 if kind == "state" else offset, arg)
                    if target is not None:
                        await region.transition(target, worker_of(region).change_state)
            except (ProtocolError, DeviceError) as exc:
                assert exc.errno > 0
            assert device_state(region) in {0, 1, 2, 3, 4, 6, 9, 11}

    trio.run(scenario)


async def test_a_prepared_segment_survives_pre_copy_to_stop_copy():
    device, region = v1_device()
    device.ram.buffer[:5] = b"first"
    await write_state(region, 0b011)  # SAVING|RUNNING: PRE_COPY
    assert U64.unpack(region.read(8, 8))[0] > 0
    region.read(0x10, 8)  # prepares a segment: its bytes leave the stream
    size = U64.unpack(region.read(0x18, 8))[0]
    head = region.read(DATA_OFFSET, size)
    await write_state(region, 0b010)  # SAVING: STOP_COPY, the same saving session
    region.read(0x10, 8)
    assert U64.unpack(region.read(0x18, 8))[0] == size, "still the unacknowledged segment"
    assert region.read(DATA_OFFSET, size) == head
    stream = [head]
    while U64.unpack(region.read(8, 8))[0]:
        region.read(0x10, 8)
        stream.append(region.read(DATA_OFFSET, U64.unpack(region.read(0x18, 8))[0]))
    await write_state(region, 0)
    assert U64.unpack(region.read(8, 8))[0] == 0  # STOP: the session ended

    other, target = v1_device()
    await write_state(target, 0b100)
    for segment in stream:
        target.write(DATA_OFFSET, segment)
        target.write(0x18, U64.pack(len(segment)))
    await write_state(target, 0b001)
    assert bytes(other.ram.buffer[:5]) == b"first"


# -- the v1 allowed-transition table (facts 8.3.2) ------------------------------------------

#: Hand-copied from /work/shared/reference/vfio-user-facts.md 8.3.2 (rows: from, columns:
#: to, in the order STOP, RUNNING, STOP_COPY, PRE_COPY, RESUMING; "-" = the same state).
FACTS_TABLE = {
    "STOP": "- y n n n",
    "RUNNING": "y - y y y",
    "STOP_COPY": "y y - n n",
    "PRE_COPY": "n n y - n",
    "RESUMING": "n y n n -",
}
FACTS_COLUMNS = ["STOP", "RUNNING", "STOP_COPY", "PRE_COPY", "RESUMING"]
#: The NDMA arcs we chose (the kernel v2 direct arcs touching the P2P states).
P2P_ARCS = {
    ("RUNNING", "RUNNING_P2P"),
    ("RUNNING_P2P", "RUNNING"),
    ("RUNNING_P2P", "STOP"),
    ("PRE_COPY", "PRE_COPY_P2P"),
    ("PRE_COPY_P2P", "PRE_COPY"),
    ("PRE_COPY_P2P", "STOP_COPY"),
}


def facts_allow(start: str, target: str) -> bool:
    """The expected answer: the facts table, the chosen NDMA arcs, a same-state write."""
    if start == "ERROR":
        return False  # only DEVICE_RESET leaves ERROR (facts 8.3.1)
    if start == target:
        return True
    if start in FACTS_TABLE and target in FACTS_COLUMNS:
        return FACTS_TABLE[start].split()[FACTS_COLUMNS.index(target)] == "y"
    return (start, target) in P2P_ARCS


WRITABLE = STARTS


@pytest.mark.parametrize("start", [*STARTS, MigState.ERROR], ids=lambda s: s.name)
def test_allowed_transition_table_is_the_facts_table(start: MigState) -> None:
    for target in WRITABLE:
        assert transition_allowed(start, target) == facts_allow(start.name, target.name), (
            start.name,
            target.name,
        )
    assert not transition_allowed(start, MigState.ERROR)
    assert set(ALLOWED_TRANSITIONS) == {*STARTS, MigState.ERROR}


async def test_refused_transitions_leave_everything_as_it_was() -> None:
    """From every reachable state, every target: allowed -> the engine moves there;
    refused -> EINVAL, same state, and the saving stream is untouched."""
    for start in STARTS:
        for target in WRITABLE:
            device, region = v1_device()
            engine = device.migration
            engine.set_state(start)
            if not transition_allowed(start, target):
                with pytest.raises(ProtocolError) as info:
                    region.write(0, U32.pack(BITS[target]))
                assert info.value.errno == errno.EINVAL
                assert engine.state == start and device_state(region) == register_value(start)
                continue
            if start == MigState.RESUMING and target != start:
                continue  # leaving RESUMING loads a stream; covered over the socket
            await write_state(region, BITS[target])
            assert engine.state == target


BITS = {state: bits for bits, state in BITS_TO_STATE.items()}


def test_many_tiny_window_writes_cost_linear_time() -> None:
    """A client writing the data window one byte at a time, every other byte, must not
    make each write dearer than the last (that froze the server's event loop). Work is
    counted, not timed (a loaded machine makes timings flaky): the bytecodes the region's
    code runs for 8x the writes are ~8x (the old merged-interval list was ~64x), and the
    bookkeeping is one mask byte per window byte, whatever the pattern of writes."""
    import emulator.migration_region as module

    def scattered_writes(count: int) -> int:
        device, region = v1_device()
        trio.run(write_state, region, BITS[MigState.RESUMING])
        opcodes = 0

        def count_opcodes(frame: FrameType, event: str, arg: object) -> Any:
            nonlocal opcodes
            if event == "opcode":
                opcodes += 1
            return count_opcodes

        def trace_region_code(frame: FrameType, event: str, arg: object) -> Any:
            if frame.f_code.co_filename != module.__file__:
                return None
            frame.f_trace_opcodes = True
            return count_opcodes

        sys.settrace(trace_region_code)
        try:
            for k in range(count):
                region.write(DATA_OFFSET + 2 * k, b"x")
        finally:
            sys.settrace(None)
        assert len(region._written.mask) == 2 * count - 1  # one byte per window byte
        assert len(region._incoming) == 2 * count - 1
        device.migration.reset()
        region.reset()
        return opcodes

    baseline = scattered_writes(1000)
    assert baseline > 1000  # the tracer saw the region's code
    assert scattered_writes(8000) <= 8 * baseline + 1000


def test_a_device_serving_v1_can_be_collected() -> None:
    device, region = v1_device()
    collected = weakref.ref(device)
    del device
    gc.collect()
    assert collected() is None, "the v1 region keeps its device alive"
    del region
