"""devices.migration.engine.MigrationEngine in-process, on a recording TestDev.

Every capability set and every (from, to) pair: the arcs executed and the device hooks
called. Fault injection at every arc of every path: the request fails with the arc's errno
and the engine unwinds along the reverse arcs, or lands in ERROR when it cannot. Run-state
enforcement (pause/resume hooks, latched interrupts, the work queue) and a Hypothesis walk
over random requests keep the engine's invariants.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices import testdev as td
from devices.errors import DeviceError, MigrationRefused
from devices.irq import INTX, Delivery
from devices.migration.engine import ALL_CAPS, MemoryStaging, RunState
from devices.testdev import TestDev
from protocol.constants import MigrationCaps, MigState
from protocol.migration_fsm import (
    ERROR,
    PRE_COPY,
    PRE_COPY_P2P,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
    TransitionRefused,
    plan,
    supports,
)

SC = int(MigrationCaps.STOP_COPY)
P2P = int(MigrationCaps.P2P)
PRE = int(MigrationCaps.PRE_COPY)
CAP_SETS = {"sc": SC, "sc+p2p": SC | P2P, "sc+pre": SC | PRE, "all": SC | P2P | PRE}
SAVING = frozenset({PRE_COPY, PRE_COPY_P2P, STOP_COPY})
OPERATING = frozenset({RUNNING, PRE_COPY})  # the engine's "device runs" states

Arc = tuple[MigState, MigState]


def rev(arc: Arc) -> Arc:
    return (arc[1], arc[0])


class Sink:
    def __init__(self) -> None:
        self.fired: list[tuple[int, int]] = []

    def fire(self, index: int, vector: int) -> bool:
        self.fired.append((index, vector))
        return True


class RecDev(TestDev):
    """TestDev that records migration_arc / pause / resume and fails chosen arcs."""

    __test__ = False

    def __init__(self, caps: int, fail: Iterable[Arc] = (), err: int = errno.EIO) -> None:
        super().__init__()
        self.calls: list[Arc] = []
        self.events: list[str] = []
        self.fail: set[Arc] = set(fail)
        self.err = err
        self.sink = Sink()
        self.irq.sink = self.sink
        self.set_migration_caps(caps)

    def migration_arc(self, arc: tuple[MigState, MigState]) -> None:
        self.calls.append(arc)
        if arc in self.fail:
            raise DeviceError(self.err, f"injected failure of {arc[0].name}->{arc[1].name}")

    def pause(self) -> None:
        self.events.append("pause")
        super().pause()

    def resume(self) -> None:
        self.events.append("resume")
        super().resume()

    def forget(self) -> None:
        self.calls.clear()
        self.events.clear()


_STREAM: list[bytes] = []


async def valid_stream() -> bytes:
    """A complete STOP_COPY stream of a fresh TestDev (built once)."""
    if not _STREAM:
        donor = TestDev()
        donor.set_migration_caps(SC)
        donor.migration.set_state(STOP_COPY)
        chunks = []
        while chunk := donor.migration.read_data(1 << 16):
            chunks.append(chunk)
        _STREAM.append(b"".join(chunks))
    return _STREAM[0]


async def device_in(caps: int, state: MigState, fail: Iterable[Arc] = ()) -> RecDev:
    """A fresh device driven from RUNNING into ``state`` (RESUMING with a valid stream
    written, so that leaving it succeeds), with its records cleared."""
    dev = RecDev(caps)
    if state != RUNNING:
        dev.migration.set_state(state)
    if state == RESUMING:
        dev.migration.write_data(await valid_stream())
    assert dev.migration.state == state
    dev.fail = set(fail)
    dev.forget()
    return dev


def supported(caps: int) -> list[MigState]:
    return [s for s in MigState if supports(caps, s)]


def check_consistent(dev: RecDev) -> None:
    """Sessions and run state agree with the engine's state."""
    engine = dev.migration
    state = engine.state
    assert (engine.saving is not None) == (state in SAVING), state
    assert (engine.resuming is not None) == (state == RESUMING), state
    running = state in OPERATING
    assert (engine.run_state is RunState.RUNNING) == running, state
    assert (dev.irq.delivery is Delivery.ACTIVE) == running, state


def pause_balance(events: list[str], start_running: bool) -> bool:
    """pause/resume strictly alternate, starting from the initial run state."""
    running = start_running
    for event in events:
        if (event == "pause") != running:
            return False
        running = not running
    return True


def crossings(arcs: list[Arc]) -> list[str]:
    """The pause/resume hook calls a path should cause: one per leave/enter of the
    operating states."""
    out = []
    for a, b in arcs:
        if a in OPERATING and b not in OPERATING:
            out.append("pause")
        elif a not in OPERATING and b in OPERATING:
            out.append("resume")
    return out


def pairs(caps: int) -> list[tuple[MigState, MigState]]:
    return [(a, b) for a in supported(caps) for b in MigState]


# ---------------------------------------------------------------------------------------------
# Every pair, no faults


@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
async def test_every_pair(caps: int):
    for start, goal in pairs(caps):
        dev = await device_in(caps, start)
        engine = dev.migration
        try:
            expected = plan(caps, start, goal)
        except TransitionRefused:
            with pytest.raises(MigrationRefused) as info:
                engine.set_state(goal)
            assert info.value.errno == errno.EINVAL
            assert engine.state == start and dev.calls == [] and dev.events == []
            check_consistent(dev)
            continue
        result = engine.set_state(goal)
        assert result.state == engine.state == goal, (start, goal)
        assert result.arcs == expected, (start, goal)
        assert dev.calls == expected, (start, goal)
        assert engine.history == expected
        assert dev.events == crossings(expected), (start, goal)
        check_consistent(dev)


async def test_out_of_range_targets_change_nothing():
    dev = await device_in(ALL_CAPS, PRE_COPY)
    saving = dev.migration.saving
    for target in (0, 8, 9, 2**32 - 1, -1):
        with pytest.raises(MigrationRefused) as info:
            dev.migration.set_state(target)
        assert info.value.errno == errno.EINVAL
    assert dev.migration.state == PRE_COPY and dev.migration.saving is saving
    assert dev.calls == [] and dev.events == []


async def test_unsupported_target_is_einval():
    dev = await device_in(SC, RUNNING)
    for target in (RUNNING_P2P, PRE_COPY, PRE_COPY_P2P):
        with pytest.raises(MigrationRefused) as info:
            dev.migration.set_state(target)
        assert info.value.errno == errno.EINVAL
    assert dev.migration.state == RUNNING and dev.calls == []


async def test_same_state_is_a_no_op():
    for caps in CAP_SETS.values():
        for state in supported(caps):
            dev = await device_in(caps, state)
            saving, resuming = dev.migration.saving, dev.migration.resuming
            result = dev.migration.set_state(state)
            assert result.arcs == [] and result.state == state
            assert dev.calls == [] and dev.events == []
            assert dev.migration.saving is saving and dev.migration.resuming is resuming


# ---------------------------------------------------------------------------------------------
# Fault injection


def fault_cases() -> list[tuple[str, int, MigState, MigState, int]]:
    cases = []
    for name, caps in CAP_SETS.items():
        for start, goal in pairs(caps):
            try:
                arcs = plan(caps, start, goal)
            except TransitionRefused:
                continue
            cases += [(name, caps, start, goal, k) for k in range(len(arcs))]
    return cases


FAULT_CASES = fault_cases()


@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
async def test_failing_arc_unwinds_to_the_start(caps: int):
    cases = [c for c in FAULT_CASES if c[1] == caps]
    assert cases
    for _, _, start, goal, k in cases:
        arcs = plan(caps, start, goal)
        dev = await device_in(caps, start, fail=[arcs[k]])
        start_running = start in OPERATING
        with pytest.raises(DeviceError) as info:
            dev.migration.set_state(goal)
        assert not isinstance(info.value, MigrationRefused)
        assert info.value.errno == errno.EIO, (start, goal, k)
        done = arcs[:k]
        expected_calls = arcs[: k + 1] + [rev(a) for a in reversed(done)]
        assert dev.calls == expected_calls, (start, goal, k)
        assert dev.migration.state == start, (start, goal, k)
        check_consistent(dev)
        assert pause_balance(dev.events, start_running), (start, goal, k, dev.events)


@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
async def test_failing_arc_carries_its_errno(caps: int):
    arcs = plan(caps, RUNNING, STOP_COPY)
    dev = await device_in(caps, RUNNING, fail=[arcs[-1]])
    dev.err = errno.ENOSPC
    with pytest.raises(DeviceError) as info:
        dev.migration.set_state(STOP_COPY)
    assert info.value.errno == errno.ENOSPC
    assert dev.migration.state == RUNNING


def error_cases(caps: int) -> list[tuple[MigState, MigState, int, int]]:
    """(start, goal, failing arc k, index j < k of the done arc whose reverse also fails)."""
    out = []
    for start, goal in pairs(caps):
        try:
            arcs = plan(caps, start, goal)
        except TransitionRefused:
            continue
        out += [(start, goal, k, j) for k in range(1, len(arcs)) for j in range(k)]
    return out


async def check_error_state(dev: RecDev) -> None:
    engine = dev.migration
    assert engine.state == ERROR
    assert engine.saving is None and engine.resuming is None
    assert dev.irq.delivery is Delivery.SUSPENDED
    assert engine.run_state is RunState.PAUSED
    calls = list(dev.calls)
    for target in range(10):
        with pytest.raises(MigrationRefused) as info:
            engine.set_state(target)
        assert info.value.errno == errno.EINVAL
    assert dev.calls == calls and engine.state == ERROR
    with pytest.raises(MigrationRefused):
        engine.read_data(16)
    with pytest.raises(MigrationRefused):
        engine.write_data(b"x")
    # Interrupts raised in ERROR are latched, not delivered.
    before = len(dev.sink.fired)
    dev.region_write(td.BAR_REGS, td.REG_DOORBELL, (0).to_bytes(4, "little"))
    assert len(dev.sink.fired) == before


async def check_reset_recovers(dev: RecDev) -> None:
    engine = dev.migration
    dev.fail.clear()
    engine.reset()
    assert engine.state == RUNNING
    assert dev.irq.delivery is Delivery.ACTIVE
    assert engine.run_state is RunState.RUNNING
    check_consistent(dev)
    dev.forget()
    result = engine.set_state(STOP)
    assert result.state == STOP and dev.calls == plan(engine.caps, RUNNING, STOP)
    engine.set_state(RUNNING)
    assert engine.state == RUNNING


@pytest.mark.parametrize(
    "caps", [SC | P2P, SC | PRE, SC | P2P | PRE], ids=["sc+p2p", "sc+pre", "all"]
)
async def test_failing_reverse_arc_enters_error(caps: int):
    cases = error_cases(caps)
    assert cases
    for start, goal, k, j in cases:
        arcs = plan(caps, start, goal)
        dev = await device_in(caps, start, fail=[arcs[k], rev(arcs[j])])
        with pytest.raises(DeviceError) as info:
            dev.migration.set_state(goal)
        assert info.value.errno == errno.EIO
        expected = arcs[: k + 1] + [rev(a) for a in reversed(arcs[j:k])]
        assert dev.calls == expected, (start, goal, k, j)
        await check_error_state(dev)
        await check_reset_recovers(dev)


async def test_error_from_two_arc_path_without_p2p():
    # RUNNING -> STOP -> STOP_COPY; STOP_COPY arc fails, and so does STOP -> RUNNING.
    dev = await device_in(SC, RUNNING, fail=[(STOP, STOP_COPY), (STOP, RUNNING)])
    with pytest.raises(DeviceError):
        dev.migration.set_state(STOP_COPY)
    assert dev.calls == [(RUNNING, STOP), (STOP, STOP_COPY), (STOP, RUNNING)]
    await check_error_state(dev)
    await check_reset_recovers(dev)


async def test_missing_reverse_arc_enters_error(monkeypatch: pytest.MonkeyPatch):
    """PRE_COPY -> STOP_COPY has no reverse arc. The kernel table never runs another arc
    after it (STOP_COPY only ends paths), so a longer path is injected to reach the
    engine's "no way back" branch: it must go to ERROR without trying STOP_COPY -> PRE_COPY."""
    import devices.migration.engine as migration_module

    dev = await device_in(SC | PRE, PRE_COPY, fail=[(STOP_COPY, STOP)])
    monkeypatch.setattr(
        migration_module,
        "plan",
        lambda caps, cur, target: [(PRE_COPY, STOP_COPY), (STOP_COPY, STOP)],
    )
    with pytest.raises(DeviceError) as info:
        dev.migration.set_state(STOP)
    assert info.value.errno == errno.EIO
    assert dev.calls == [(PRE_COPY, STOP_COPY), (STOP_COPY, STOP)]
    monkeypatch.undo()
    await check_error_state(dev)
    await check_reset_recovers(dev)


async def test_invalid_resumed_stream_fails_and_stays_resuming():
    dev = await device_in(SC | PRE, RUNNING)
    dev.migration.set_state(RESUMING)
    dev.region_write(td.BAR_REGS, td.REG_SCRATCH, (0xABCD).to_bytes(4, "little"))
    stream = bytearray(await valid_stream())
    stream[len(stream) // 2] ^= 0xFF  # break the checksum
    dev.migration.write_data(bytes(stream))
    dev.forget()
    with pytest.raises(DeviceError) as info:
        dev.migration.set_state(RUNNING)
    assert info.value.errno == errno.EINVAL
    assert dev.migration.state == RESUMING
    assert dev.migration.resuming is not None
    assert dev.region_read(td.BAR_REGS, td.REG_SCRATCH, 4) == (0xABCD).to_bytes(4, "little")
    # A fresh, valid stream can be written after the failure.
    dev.migration.write_data(await valid_stream())
    result = dev.migration.set_state(RUNNING)
    assert result.arcs == [(RESUMING, STOP), (STOP, RUNNING)]
    assert dev.region_read(td.BAR_REGS, td.REG_SCRATCH, 4) == bytes(4)


class OneStagingAtATime:
    """A staging factory for a process with room for one stream's staging, not two."""

    def __init__(self) -> None:
        self.live = 0
        self.reserves: list[int] = []

    def __call__(self, reserve: int) -> MemoryStaging:
        if self.live:
            raise DeviceError(errno.ENOMEM, "no room for a second staging")
        self.live += 1
        self.reserves.append(reserve)
        staging = MemoryStaging(reserve)
        close = staging.close

        def closed() -> None:
            self.live -= 1
            close()

        staging.close = closed  # type: ignore[method-assign]
        return staging


async def test_leaving_resuming_needs_room_for_one_staging_only():
    dev = await device_in(SC, RUNNING)
    factory = OneStagingAtATime()
    dev.migration.staging_factory = factory
    dev.migration.max_resume = 1 << 20
    dev.migration.set_state(RESUMING)
    dev.migration.write_data(await valid_stream())
    dev.migration.set_state(STOP)  # loads without a second staging
    assert factory.live == 0 and factory.reserves == [1 << 20]  # sized by the stream limit
    # A failed load still leaves a fresh staging behind for the next attempt.
    dev.migration.set_state(RESUMING)
    dev.migration.write_data(b"not a stream")
    with pytest.raises(DeviceError):
        dev.migration.set_state(STOP)
    assert dev.migration.state == RESUMING and factory.live == 1
    dev.migration.write_data(await valid_stream())
    dev.migration.set_state(STOP)
    assert factory.live == 0


# ---------------------------------------------------------------------------------------------
# Run-state enforcement


@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
async def test_interrupts_latched_while_stopped(caps: int):
    for state in supported(caps):
        dev = await device_in(caps, state)
        dev.region_write(td.BAR_REGS, td.REG_DOORBELL, (0).to_bytes(4, "little"))
        if state in OPERATING:
            assert dev.sink.fired == [(INTX, 0)], state
            continue
        assert dev.irq.delivery is Delivery.SUSPENDED, state
        assert dev.sink.fired == [], state
        dev.migration.set_state(RUNNING)
        if state == RESUMING:
            # The loaded state (no interrupt pending) replaced the latched one.
            assert dev.sink.fired == [] and dev.regs.get(td.REG_IRQ_STATUS) == 0
        else:
            assert dev.sink.fired == [(INTX, 0)], state  # delivered once RUNNING


async def test_latched_interrupt_survives_stop_copy_round_trip():
    dev = await device_in(SC | PRE, STOP)
    dev.region_write(td.BAR_REGS, td.REG_DOORBELL, (0).to_bytes(4, "little"))
    dev.migration.set_state(STOP_COPY)
    dev.migration.set_state(STOP)
    assert dev.sink.fired == []
    dev.migration.set_state(PRE_COPY)
    assert dev.sink.fired == [(INTX, 0)]


async def test_error_does_not_pause_twice():
    dev = await device_in(SC, RUNNING, fail=[(STOP, STOP_COPY), (STOP, RUNNING)])
    with pytest.raises(DeviceError):
        dev.migration.set_state(STOP_COPY)
    assert dev.migration.state == ERROR
    assert pause_balance(dev.events, start_running=True), dev.events


async def test_reset_in_running_does_not_resume_unpaused_device():
    dev = await device_in(SC | PRE, RUNNING)
    dev.migration.reset()
    assert dev.events == []


async def test_reset_from_every_state_returns_running():
    for caps in CAP_SETS.values():
        for state in supported(caps):
            dev = await device_in(caps, state)
            dev.migration.reset()
            assert dev.migration.state == RUNNING, state
            check_consistent(dev)
            result = dev.migration.set_state(STOP)
            assert result.arcs == plan(caps, RUNNING, STOP)


# ---------------------------------------------------------------------------------------------
# Hypothesis: random requests, faults, resets, data


def _all_arcs() -> list[Arc]:
    arcs: set[Arc] = set()
    for caps in CAP_SETS.values():
        for start, goal in pairs(caps):
            try:
                arcs.update(plan(caps, start, goal))
            except TransitionRefused:
                continue
    return sorted(arcs)


ACTIONS = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 9)),
    st.tuples(st.just("set"), st.sampled_from([1, 2, 3, 4, 6])),
    st.tuples(st.just("reset"), st.just(0)),
    st.tuples(st.just("write"), st.booleans().map(int)),
    st.tuples(st.just("read"), st.integers(0, 1 << 17)),
)


async def run_walk(caps: int, fail: set[Arc], actions: list[tuple[str, int]]) -> None:
    dev = RecDev(caps, fail)
    engine = dev.migration
    stream = await valid_stream()
    for kind, arg in actions:
        before = engine.state
        saving, resuming = engine.saving, engine.resuming
        n_calls = len(dev.calls)
        if kind == "set":
            try:
                expected: list[Arc] | None = None if before == ERROR else plan(caps, before, arg)
            except TransitionRefused:
                expected = None
            try:
                result = engine.set_state(arg)
            except MigrationRefused as exc:
                assert exc.errno == errno.EINVAL
                assert expected is None, f"EINVAL but plan gives {expected}"
                # A request refused by the FSM changes nothing at all.
                assert engine.state == before
                assert engine.saving is saving and engine.resuming is resuming
                assert len(dev.calls) == n_calls
            except DeviceError:
                assert expected is not None
                assert engine.state in (before, ERROR)
                # The first failing call is the forward arc (or RESUMING -> STOP with an
                # invalid stream, always a first arc: nothing to unwind); ERROR means a
                # way back failed too.
                failures = sum(a in fail for a in dev.calls[n_calls:])
                assert (engine.state == ERROR) == (failures >= 2), dev.calls[n_calls:]
            else:
                assert expected is not None
                assert result.state == engine.state == MigState(arg)
                assert result.arcs == expected == dev.calls[n_calls:]
        elif kind == "reset":
            engine.reset()
            assert engine.state == RUNNING
        elif kind == "write":
            data = stream if arg else b"garbage"
            if before == RESUMING:
                engine.write_data(data)
            else:
                with pytest.raises(MigrationRefused):
                    engine.write_data(data)
        elif before in SAVING:
            got = engine.read_data(arg)
            assert len(got) <= arg
        else:
            with pytest.raises(MigrationRefused):
                engine.read_data(arg)
        state = engine.state
        assert state == ERROR or supports(caps, state)
        assert (engine.saving is not None) == (state in SAVING)
        assert (engine.resuming is not None) == (state == RESUMING)
        assert (engine.run_state is RunState.RUNNING) == (state in OPERATING)
        assert (dev.irq.delivery is Delivery.ACTIVE) == (state in OPERATING)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    caps=st.sampled_from(list(CAP_SETS.values())),
    fail=st.sets(st.sampled_from(_all_arcs()), max_size=3),
    actions=st.lists(ACTIONS, max_size=25),
)
def test_random_walk_keeps_invariants(caps: int, fail: set[Arc], actions: list[tuple[str, int]]):
    trio.run(run_walk, caps, fail, actions)
