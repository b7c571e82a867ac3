"""The VFIO migration v2 device-state machine, as the Linux kernel defines it.

This is the table of ``vfio_mig_get_next_state`` (drivers/vfio/vfio_main.c, facts 8.1) and
nothing else: which *direct arcs* exist, and which next step a combination transition takes.
The engine that runs devices through it lives in :mod:`devices.migration.engine`.

Rules:

 1. States: ERROR 0, STOP 1, RUNNING 2, STOP_COPY 3, RESUMING 4, RUNNING_P2P 5, PRE_COPY 6,
    PRE_COPY_P2P 7. A device supports a state when it has all of the capability flags the
    state needs (STATE_FLAGS): STOP_COPY is mandatory; P2P adds RUNNING_P2P; PRE_COPY adds
    PRE_COPY; P2P+PRE_COPY adds PRE_COPY_P2P. ERROR is never "supported" (never requestable).
 2. A request for a target that is out of range, ERROR, or unsupported fails with EINVAL.
 3. Requesting the current state succeeds with no arc.
 4. Otherwise the path is built one step at a time: ``next = NEXT[cur][target]``. If the
    device does not support ``next``, it is skipped silently by looking up
    ``NEXT[next][target]`` again, until a supported state or ERROR comes up (the ERROR
    guard is the 2026 kernel fix: without it the lookup spins on STOP_COPY -> PRE_COPY).
 5. A path that reaches ERROR fails with EINVAL before any arc runs (STOP_COPY -> PRE_COPY,
    STOP_COPY -> PRE_COPY_P2P, and anything out of ERROR).
 6. The table encodes "shortest path, with saving states (PRE_COPY, PRE_COPY_P2P,
    STOP_COPY) only at the start or end", so every step of a planned path is a direct arc.
 7. What the states mean: the device runs in OPERATING_STATES (RUNNING, PRE_COPY) and is
    quiesced outside them (an arc out of them, STOPS_DEVICE, waits for the device's work
    first); SAVING_STATES share one saving session, opened by OPENS_SAVING and closed by
    CLOSES_SAVING; RESUMING's session opens with OPENS_RESUMING and the state is loaded by
    LOADS_RESUMED. Every such set is derived below from the state sets and the table.

The names ERROR, STOP, ... are the one alias block of :class:`MigState` members: import
them from here.
"""

from __future__ import annotations

import errno

from .constants import MigrationCaps, MigState
from .errors import ProtocolError

ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P = (
    MigState.ERROR,
    MigState.STOP,
    MigState.RUNNING,
    MigState.STOP_COPY,
    MigState.RESUMING,
    MigState.RUNNING_P2P,
    MigState.PRE_COPY,
    MigState.PRE_COPY_P2P,
)

SC, P2P, PRE = MigrationCaps.STOP_COPY, MigrationCaps.P2P, MigrationCaps.PRE_COPY

#: Capability flags a state needs (the kernel's ``state_flags_table``).
STATE_FLAGS: dict[MigState, int] = {
    STOP: SC,
    RUNNING: SC,
    STOP_COPY: SC,
    RESUMING: SC,
    RUNNING_P2P: SC | P2P,
    PRE_COPY: SC | PRE,
    PRE_COPY_P2P: SC | P2P | PRE,
}

#: NEXT[current][target] = the next step (the kernel's ``vfio_from_fsm_table``).
NEXT: dict[MigState, dict[MigState, MigState]] = {
    STOP: {
        STOP: STOP, RUNNING: RUNNING_P2P, STOP_COPY: STOP_COPY, RESUMING: RESUMING,
        RUNNING_P2P: RUNNING_P2P, PRE_COPY: RUNNING_P2P, PRE_COPY_P2P: RUNNING_P2P,
        ERROR: ERROR,
    },
    RUNNING: {
        STOP: RUNNING_P2P, RUNNING: RUNNING, STOP_COPY: RUNNING_P2P, RESUMING: RUNNING_P2P,
        RUNNING_P2P: RUNNING_P2P, PRE_COPY: PRE_COPY, PRE_COPY_P2P: RUNNING_P2P,
        ERROR: ERROR,
    },
    STOP_COPY: {
        STOP: STOP, RUNNING: STOP, STOP_COPY: STOP_COPY, RESUMING: STOP, RUNNING_P2P: STOP,
        PRE_COPY: ERROR, PRE_COPY_P2P: ERROR, ERROR: ERROR,
    },
    RESUMING: {
        STOP: STOP, RUNNING: STOP, STOP_COPY: STOP, RESUMING: RESUMING, RUNNING_P2P: STOP,
        PRE_COPY: STOP, PRE_COPY_P2P: STOP, ERROR: ERROR,
    },
    RUNNING_P2P: {
        STOP: STOP, RUNNING: RUNNING, STOP_COPY: STOP, RESUMING: STOP,
        RUNNING_P2P: RUNNING_P2P, PRE_COPY: RUNNING, PRE_COPY_P2P: PRE_COPY_P2P,
        ERROR: ERROR,
    },
    PRE_COPY: {
        STOP: RUNNING, RUNNING: RUNNING, STOP_COPY: PRE_COPY_P2P, RESUMING: RUNNING,
        RUNNING_P2P: RUNNING, PRE_COPY: PRE_COPY, PRE_COPY_P2P: PRE_COPY_P2P, ERROR: ERROR,
    },
    PRE_COPY_P2P: {
        STOP: RUNNING_P2P, RUNNING: RUNNING_P2P, STOP_COPY: STOP_COPY, RESUMING: RUNNING_P2P,
        RUNNING_P2P: RUNNING_P2P, PRE_COPY: PRE_COPY, PRE_COPY_P2P: PRE_COPY_P2P,
        ERROR: ERROR,
    },
    ERROR: dict.fromkeys(MigState, ERROR),
}  # fmt: skip

Arc = tuple[MigState, MigState]


class TransitionRefused(ProtocolError):
    """A request the table refuses (rules 2 and 5): EINVAL, and nothing changes. Its own
    type so that a device engine can tell it from the protocol's other errors."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


def supports(caps: int, state: MigState) -> bool:
    """Does a device with capability flags ``caps`` support ``state``?"""
    needed = STATE_FLAGS.get(state)
    return needed is not None and caps & needed == needed


def valid_caps(caps: int) -> bool:
    """STOP_COPY is mandatory; only the three known flags exist."""
    return bool(caps & SC) and not caps & ~int(SC | P2P | PRE)


def next_step(caps: int, current: MigState, target: MigState) -> MigState:
    """The kernel's next step from ``current`` towards ``target``, skipping states the
    device does not support. May return ERROR (no way there)."""
    step = NEXT[current][target]
    while step != ERROR and not supports(caps, step):
        step = NEXT[step][target]
    return step


def plan(caps: int, current: MigState, target: int) -> list[Arc]:
    """The arcs that take ``current`` to ``target``; raises EINVAL (rules 2 and 5)."""
    if target not in MigState._value2member_map_:
        raise TransitionRefused(f"migration state {target} does not exist")
    goal = MigState(target)
    if not supports(caps, goal):
        raise TransitionRefused(f"state {goal.name} not supported or requestable")
    arcs: list[Arc] = []
    state = current
    while state != goal:
        step = next_step(caps, state, goal)
        if step == ERROR:
            raise TransitionRefused(f"no transition {current.name} -> {goal.name}")
        arcs.append((state, step))
        state = step
        if len(arcs) > len(MigState):
            raise AssertionError("migration table loops")  # pragma: no cover - table bug
    return arcs


def direct_arcs(caps: int) -> frozenset[Arc]:
    """Every arc some combination transition of a device with ``caps`` may execute."""
    arcs = set()
    for current in MigState:
        if not supports(caps, current):
            continue
        for target in MigState:
            if current != target and supports(caps, target):
                try:
                    arcs.update(plan(caps, current, target))
                except TransitionRefused:
                    continue
    return frozenset(arcs)


# ---------------------------------------------------------------------------------------------
# What the states and arcs mean (rule 7). Everything below is derived from the state sets and
# the table above; nothing else in the tree restates a state set or an arc set.

#: States in which the device runs (DMA, interrupts, internal state advancing).
OPERATING_STATES = frozenset({RUNNING, PRE_COPY})
#: Running states that must not initiate DMA (peer-to-peer quiescence).
P2P_STATES = frozenset({RUNNING_P2P, PRE_COPY_P2P})
#: States sharing one saving (data-read) session.
SAVING_STATES = frozenset({PRE_COPY, PRE_COPY_P2P, STOP_COPY})
#: Saving states in which the device still runs: the data so far is a first draft.
PRE_COPY_STATES = SAVING_STATES & (OPERATING_STATES | P2P_STATES)
#: States with a data session open (saving, or loading the resumed stream).
DATA_STATES = SAVING_STATES | {RESUMING}
#: Data states in which the device is stopped: its state is being read out whole
#: (STOP_COPY) or loaded (RESUMING), so nothing may change it behind the stream's back.
FROZEN_STATES = DATA_STATES - OPERATING_STATES - P2P_STATES

#: Every direct arc of any valid capability set (the skip walk of rule 4 makes arcs that
#: are not in NEXT literally, e.g. RUNNING -> STOP without P2P).
ALL_ARCS: frozenset[Arc] = frozenset().union(
    *(direct_arcs(caps) for caps in range(int(SC | P2P | PRE) + 1) if valid_caps(caps))
)
#: Arcs that leave the operating states: the device's work must be quiesced first.
STOPS_DEVICE = frozenset(
    (source, dest)
    for source, dest in ALL_ARCS
    if source in OPERATING_STATES and dest not in OPERATING_STATES
)
#: Arcs that enter the operating states: the device runs again.
STARTS_DEVICE = frozenset(
    (source, dest)
    for source, dest in ALL_ARCS
    if source not in OPERATING_STATES and dest in OPERATING_STATES
)
#: Arcs that open a new saving session (the kernel returns a new data_fd for them).
OPENS_SAVING = frozenset(
    (source, dest)
    for source, dest in ALL_ARCS
    if source not in SAVING_STATES and dest in SAVING_STATES
)
#: Arcs that open the pre-copy part of a saving session.
OPENS_PRECOPY = frozenset(a for a in OPENS_SAVING if a[1] in PRE_COPY_STATES)
#: Arcs that add the stop-copy data (the saving stream is then complete).
STARTS_STOP_COPY = frozenset(arc for arc in ALL_ARCS if arc[1] == STOP_COPY)
#: Arcs that close the saving session (its data is dropped).
CLOSES_SAVING = frozenset(
    (source, dest)
    for source, dest in ALL_ARCS
    if source in SAVING_STATES and dest not in SAVING_STATES
)
#: Arcs that open a resuming session (the kernel returns a new data_fd for them).
OPENS_RESUMING = frozenset(arc for arc in ALL_ARCS if arc[1] == RESUMING)
#: Arcs that load the resumed stream (all or nothing) and close the resuming session.
LOADS_RESUMED = frozenset(arc for arc in ALL_ARCS if arc[0] == RESUMING)
