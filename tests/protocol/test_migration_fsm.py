"""protocol.migration_fsm against an independent reference.

The reference is NOT the kernel's table: it is built here from the list of direct arcs a
driver must implement for each capability set (facts 8.1.3) and the rule that picks a
combination transition (facts 8.1.4): the shortest path whose interior holds no saving
state (PRE_COPY, PRE_COPY_P2P, STOP_COPY), plus the two explicitly blocked requests
STOP_COPY -> PRE_COPY / PRE_COPY_P2P. (A path between two saving states moves inside the
group: PRE_COPY -> PRE_COPY_P2P -> STOP_COPY is the kernel's path with P2P, so the "no
interior saving state" rule applies to paths that start or end outside the group.)
``plan()`` must agree with it for every capability set and every (from, to) pair. The
check allows any of several equally short paths, but under these rules every shortest path
is unique (asserted below), so in effect each planned path is checked exactly; the facts'
"Effective paths after skipping" table is checked row by row as well.
"""

from __future__ import annotations

import errno
import itertools
import signal
from collections.abc import Iterable, Iterator

import pytest

from protocol import migration_fsm as fsm
from protocol.constants import MigrationCaps, MigState
from protocol.errors import ProtocolError
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
)

SC = int(MigrationCaps.STOP_COPY)
P2P = int(MigrationCaps.P2P)
PRE = int(MigrationCaps.PRE_COPY)

CAP_SETS = {
    "stop_copy": SC,
    "stop_copy+p2p": SC | P2P,
    "stop_copy+pre_copy": SC | PRE,
    "all": SC | P2P | PRE,
}
ALL_STATES = list(MigState)  # the 8 states, ERROR included
SAVING = frozenset({PRE_COPY, PRE_COPY_P2P, STOP_COPY})

Arc = tuple[MigState, MigState]


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """plan() is a loop over a table: a bad skip walk (the pre-2026 kernel bug) spins
    forever. Turn that into a failure instead of a hung test run."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("plan() did not return")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# The reference, from facts 8.1.2 - 8.1.4


def ref_states(caps: int) -> frozenset[MigState]:
    """States a device with ``caps`` supports (8.1.2). ERROR is never requestable."""
    states = {STOP, RUNNING, STOP_COPY, RESUMING}
    if caps & P2P:
        states.add(RUNNING_P2P)
    if caps & PRE:
        states.add(PRE_COPY)
    if caps & P2P and caps & PRE:
        states.add(PRE_COPY_P2P)
    return frozenset(states)


def ref_arcs(caps: int) -> frozenset[Arc]:
    """Direct arcs per 8.1.3. RUNNING <-> STOP and PRE_COPY -> STOP_COPY exist only without
    P2P: a P2P-capable device always passes through the P2P-quiescent state first."""
    arcs: set[Arc] = {
        (RESUMING, STOP),
        (STOP, RESUMING),
        (STOP, STOP_COPY),
        (STOP_COPY, STOP),
    }
    p2p, pre = bool(caps & P2P), bool(caps & PRE)
    if not p2p:
        arcs |= {(RUNNING, STOP), (STOP, RUNNING)}
    else:
        arcs |= {
            (RUNNING, RUNNING_P2P),
            (RUNNING_P2P, RUNNING),
            (RUNNING_P2P, STOP),
            (STOP, RUNNING_P2P),
        }
    if pre:
        arcs |= {(RUNNING, PRE_COPY), (PRE_COPY, RUNNING)}
        if not p2p:
            arcs.add((PRE_COPY, STOP_COPY))
    if pre and p2p:
        arcs |= {
            (PRE_COPY, PRE_COPY_P2P),
            (PRE_COPY_P2P, PRE_COPY),
            (PRE_COPY_P2P, RUNNING_P2P),
            (RUNNING_P2P, PRE_COPY_P2P),
            (PRE_COPY_P2P, STOP_COPY),
        }
    return frozenset(arcs)


def ref_shortest_paths(caps: int, start: MigState, goal: MigState) -> list[list[Arc]] | None:
    """Every shortest path start -> goal whose interior holds no saving state, or None when
    the request is invalid (unsupported/ERROR goal, blocked, unreachable).

    One refinement of the facts' wording, which the kernel's own table needs: a path from
    one saving state to another moves *inside* the group (PRE_COPY -> PRE_COPY_P2P ->
    STOP_COPY with P2P, which keeps the one session, 8.1.3), so interior saving states are
    allowed when both ends are saving states."""
    states = ref_states(caps)
    if goal not in states or start not in states:
        return None
    if start == STOP_COPY and goal in (PRE_COPY, PRE_COPY_P2P):
        return None  # blocked explicitly (8.1.3)
    if start == goal:
        return [[]]
    inside_group = start in SAVING and goal in SAVING
    arcs = ref_arcs(caps)
    successors: dict[MigState, list[MigState]] = {s: [] for s in states}
    for a, b in arcs:
        successors[a].append(b)
    # BFS layer by layer, keeping every path of the current length.
    layer: list[list[MigState]] = [[start]]
    found: list[list[Arc]] = []
    while layer and not found:
        nxt: list[list[MigState]] = []
        for path in layer:
            tail = path[-1]
            if tail in SAVING and tail != start and not inside_group:
                continue  # a saving state may only start or end the path
            for succ in successors[tail]:
                if succ in path:
                    continue
                new = [*path, succ]
                if succ == goal:
                    found.append(list(itertools.pairwise(new)))
                else:
                    nxt.append(new)
        layer = nxt
    return found or None


def walk(start: MigState, steps: Iterable[MigState]) -> list[Arc]:
    arcs, here = [], start
    for step in steps:
        arcs.append((here, step))
        here = step
    return arcs


def plan_or_einval(caps: int, start: MigState, goal: int) -> list[Arc] | None:
    try:
        return plan(caps, start, goal)
    except ProtocolError as exc:
        assert exc.errno == errno.EINVAL
        return None


# ---------------------------------------------------------------------------------------------
# The reference itself, sanity-checked against hand-derived facts (so a wrong reference
# cannot silently agree with a wrong table)


def test_reference_states_and_arcs_are_what_the_facts_list():
    assert ref_states(SC) == {STOP, RUNNING, STOP_COPY, RESUMING}
    assert RUNNING_P2P in ref_states(SC | P2P) and PRE_COPY not in ref_states(SC | P2P)
    assert PRE_COPY_P2P in ref_states(SC | P2P | PRE)
    assert PRE_COPY_P2P not in ref_states(SC | PRE)
    assert len(ref_arcs(SC)) == 6
    assert len(ref_arcs(SC | P2P)) == 8
    assert len(ref_arcs(SC | PRE)) == 9
    assert len(ref_arcs(SC | P2P | PRE)) == 15
    assert (RUNNING, STOP) not in ref_arcs(SC | P2P | PRE)
    assert (PRE_COPY, STOP_COPY) not in ref_arcs(SC | P2P | PRE)


def test_reference_rejects_interior_saving_states():
    # PRE_COPY -> STOP with all flags: PRE_COPY_P2P -> RUNNING_P2P -> STOP and
    # PRE_COPY_P2P -> STOP_COPY -> STOP are as short as RUNNING -> RUNNING_P2P -> STOP,
    # but have a saving state inside.
    paths = ref_shortest_paths(SC | P2P | PRE, PRE_COPY, STOP)
    assert paths == [walk(PRE_COPY, [RUNNING, RUNNING_P2P, STOP])]
    # Without P2P, PRE_COPY -> STOP_COPY -> STOP ties with PRE_COPY -> RUNNING -> STOP.
    assert ref_shortest_paths(SC | PRE, PRE_COPY, STOP) == [walk(PRE_COPY, [RUNNING, STOP])]
    # Between two saving states the path moves inside the group.
    assert ref_shortest_paths(SC | P2P | PRE, PRE_COPY, STOP_COPY) == [
        walk(PRE_COPY, [PRE_COPY_P2P, STOP_COPY])
    ]
    # Entering the group mid-path is not: RUNNING_P2P -> PRE_COPY_P2P -> STOP_COPY is as
    # short as RUNNING_P2P -> STOP -> STOP_COPY but opens a session on the way.
    assert ref_shortest_paths(SC | P2P | PRE, RUNNING_P2P, STOP_COPY) == [
        walk(RUNNING_P2P, [STOP, STOP_COPY])
    ]
    # RUNNING -> STOP_COPY may not pass through PRE_COPY (SC|PRE: RUNNING -> PRE_COPY ->
    # STOP_COPY is as short as RUNNING -> STOP -> STOP_COPY; only the second is allowed).
    assert ref_shortest_paths(SC | PRE, RUNNING, STOP_COPY) == [walk(RUNNING, [STOP, STOP_COPY])]


# ---------------------------------------------------------------------------------------------
# plan() against the reference, exhaustively


def _cases() -> list[tuple[str, int, MigState, MigState]]:
    cases = []
    for name, caps in CAP_SETS.items():
        for start in ALL_STATES:
            if start not in ref_states(caps):
                continue
            for goal in ALL_STATES:
                cases.append((name, caps, start, goal))
    return cases


CASES = _cases()


def test_reference_paths_are_unique():
    for _, caps, start, goal in CASES:
        paths = ref_shortest_paths(caps, start, goal)
        assert paths is None or len(paths) == 1, (caps, start, goal, paths)


def test_case_count():
    # 4 + 5 + 5 + 7 supported "from" states, 8 targets each.
    assert len(CASES) == (4 + 5 + 5 + 7) * 8


@pytest.mark.parametrize(
    ("caps", "start", "goal"),
    [pytest.param(c, s, g, id=f"{n}-{s.name}-{g.name}") for n, c, s, g in CASES],
)
def test_plan_matches_reference(caps: int, start: MigState, goal: MigState):
    expected = ref_shortest_paths(caps, start, goal)
    got = plan_or_einval(caps, start, goal)
    if expected is None:
        assert got is None, f"plan() gave {got}, reference says EINVAL"
        return
    assert got is not None, f"plan() EINVAL, reference paths {expected}"
    assert got in expected, f"plan() {got} is not among the shortest paths {expected}"
    # Every step is a direct arc of this capability set, the chain is connected, and no
    # saving state is interior unless the path runs between two saving states.
    arcs = ref_arcs(caps)
    here = start
    for i, (a, b) in enumerate(got):
        assert a == here and (a, b) in arcs
        if i > 0 and not (start in SAVING and goal in SAVING):
            assert a not in SAVING, f"{got} has the saving state {a.name} inside"
        here = b
    assert here == goal


# "Effective paths after skipping" (facts 8.1.4): from, to, then the steps for flags
# STOP_COPY, STOP_COPY|PRE_COPY and all flags (None = EINVAL, "-" rows = from unsupported).
EFFECTIVE = [
    (STOP, RUNNING, [RUNNING], [RUNNING], [RUNNING_P2P, RUNNING]),
    (STOP, PRE_COPY, None, [RUNNING, PRE_COPY], [RUNNING_P2P, RUNNING, PRE_COPY]),
    (RUNNING, STOP, [STOP], [STOP], [RUNNING_P2P, STOP]),
    (RUNNING, STOP_COPY, [STOP, STOP_COPY], [STOP, STOP_COPY], [RUNNING_P2P, STOP, STOP_COPY]),
    (RUNNING, RESUMING, [STOP, RESUMING], [STOP, RESUMING], [RUNNING_P2P, STOP, RESUMING]),
    (STOP_COPY, RUNNING, [STOP, RUNNING], [STOP, RUNNING], [STOP, RUNNING_P2P, RUNNING]),
    (STOP_COPY, RESUMING, [STOP, RESUMING], [STOP, RESUMING], [STOP, RESUMING]),
    (STOP_COPY, PRE_COPY, None, None, None),
    (RESUMING, RUNNING, [STOP, RUNNING], [STOP, RUNNING], [STOP, RUNNING_P2P, RUNNING]),
    (RESUMING, STOP_COPY, [STOP, STOP_COPY], [STOP, STOP_COPY], [STOP, STOP_COPY]),
    (
        RESUMING,
        PRE_COPY,
        None,
        [STOP, RUNNING, PRE_COPY],
        [STOP, RUNNING_P2P, RUNNING, PRE_COPY],
    ),
    (PRE_COPY, STOP, "-", [RUNNING, STOP], [RUNNING, RUNNING_P2P, STOP]),
    (PRE_COPY, STOP_COPY, "-", [STOP_COPY], [PRE_COPY_P2P, STOP_COPY]),
    (PRE_COPY, RESUMING, "-", [RUNNING, STOP, RESUMING], [RUNNING, RUNNING_P2P, STOP, RESUMING]),
]


@pytest.mark.parametrize("row", EFFECTIVE, ids=[f"{r[0].name}-{r[1].name}" for r in EFFECTIVE])
def test_effective_paths_table(row):
    start, goal, *columns = row
    for caps, steps in zip((SC, SC | PRE, SC | P2P | PRE), columns, strict=True):
        if steps == "-":
            continue  # "from" not supported with these flags
        got = plan_or_einval(caps, start, goal)
        if steps is None:
            assert got is None, f"caps {caps:#x}: expected EINVAL, got {got}"
        else:
            assert got == walk(start, steps), f"caps {caps:#x}"
            # The facts' table and the BFS reference agree too.
            expected = ref_shortest_paths(caps, start, goal)
            assert expected is not None and got in expected


# ---------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
def test_invalid_targets(caps: int):
    for start in ref_states(caps):
        for target in (0, 8, 9, 255, 2**31, 2**32 - 1, -1):
            with pytest.raises(ProtocolError) as info:
                plan(caps, start, target)
            assert info.value.errno == errno.EINVAL
        for target in set(MigState) - ref_states(caps) - {ERROR}:
            with pytest.raises(ProtocolError) as info:
                plan(caps, start, target)
            assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
def test_current_state_is_a_no_op(caps: int):
    for state in ref_states(caps):
        assert plan(caps, state, state) == []
        assert plan(caps, state, int(state)) == []


def test_nothing_leaves_error():
    for caps in CAP_SETS.values():
        for target in ref_states(caps):
            with pytest.raises(ProtocolError) as info:
                plan(caps, ERROR, target)
            assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("caps", [SC | PRE, SC | P2P | PRE], ids=["stop_copy+pre_copy", "all"])
def test_stop_copy_never_goes_back_to_pre_copy(caps: int):
    # The kernel's skip loop spun forever here before the 2026 fix: must be a prompt EINVAL.
    for target in (PRE_COPY, PRE_COPY_P2P):
        if target not in ref_states(caps):
            continue
        with pytest.raises(ProtocolError) as info:
            plan(caps, STOP_COPY, target)
        assert info.value.errno == errno.EINVAL


def test_plan_returns_fresh_lists():
    first = plan(SC | PRE, RUNNING, STOP_COPY)
    first.clear()
    assert plan(SC | PRE, RUNNING, STOP_COPY) == walk(RUNNING, [STOP, STOP_COPY])


# ---------------------------------------------------------------------------------------------
# Rule 7: the derived state and arc sets, against what they mean written out by hand


def test_derived_state_sets() -> None:
    assert {PRE_COPY, PRE_COPY_P2P} == fsm.PRE_COPY_STATES
    assert {PRE_COPY, PRE_COPY_P2P, STOP_COPY, RESUMING} == fsm.DATA_STATES
    assert {STOP_COPY, RESUMING} == fsm.FROZEN_STATES


def test_derived_arc_sets() -> None:
    assert {
        (RUNNING, RUNNING_P2P),
        (RUNNING, STOP),  # without P2P
        (PRE_COPY, PRE_COPY_P2P),
        (PRE_COPY, STOP_COPY),  # without P2P
    } == fsm.STOPS_DEVICE
    assert {(RUNNING_P2P, RUNNING), (STOP, RUNNING), (PRE_COPY_P2P, PRE_COPY)} == fsm.STARTS_DEVICE
    assert {(RUNNING, PRE_COPY), (RUNNING_P2P, PRE_COPY_P2P), (STOP, STOP_COPY)} == fsm.OPENS_SAVING
    assert {(RUNNING, PRE_COPY), (RUNNING_P2P, PRE_COPY_P2P)} == fsm.OPENS_PRECOPY
    assert {
        (STOP, STOP_COPY),
        (PRE_COPY, STOP_COPY),
        (PRE_COPY_P2P, STOP_COPY),
    } == fsm.STARTS_STOP_COPY
    assert {
        (PRE_COPY, RUNNING),
        (PRE_COPY_P2P, RUNNING_P2P),
        (STOP_COPY, STOP),
    } == fsm.CLOSES_SAVING
    assert {(STOP, RESUMING)} == fsm.OPENS_RESUMING
    assert {(RESUMING, STOP)} == fsm.LOADS_RESUMED


def test_every_arc_of_every_device_is_known() -> None:
    """ALL_ARCS is the union the arc sets are derived from: an arc some device could run
    and ALL_ARCS lacked would fall through every set."""
    for caps in (SC, SC | P2P, SC | PRE, SC | P2P | PRE):
        assert fsm.direct_arcs(caps) <= fsm.ALL_ARCS
    assert all(fsm.valid_caps(c) for c in (SC, SC | P2P, SC | PRE, SC | P2P | PRE))


def test_refusals_are_their_own_type() -> None:
    """The engine tells the table's refusals apart (a device-level error) by this type."""
    with pytest.raises(TransitionRefused) as info:
        plan(SC, STOP_COPY, PRE_COPY)
    assert info.value.errno == errno.EINVAL and isinstance(info.value, ProtocolError)
