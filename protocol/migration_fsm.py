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

#: States in which the device runs (DMA, interrupts, internal state advancing).
OPERATING_STATES = frozenset({RUNNING, PRE_COPY})
#: Running states that must not initiate DMA (peer-to-peer quiescence).
P2P_STATES = frozenset({RUNNING_P2P, PRE_COPY_P2P})
#: States sharing one saving (data-read) session.
SAVING_STATES = frozenset({PRE_COPY, PRE_COPY_P2P, STOP_COPY})

#: Arcs that open a new data session (the kernel returns a new data_fd for them).
OPENS_SAVING = frozenset({(RUNNING, PRE_COPY), (RUNNING_P2P, PRE_COPY_P2P), (STOP, STOP_COPY)})
OPENS_RESUMING = frozenset({(STOP, RESUMING)})

Arc = tuple[MigState, MigState]


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
        raise ProtocolError(errno.EINVAL, f"migration state {target} does not exist")
    goal = MigState(target)
    if not supports(caps, goal):
        raise ProtocolError(errno.EINVAL, f"state {goal.name} not supported or requestable")
    arcs: list[Arc] = []
    state = current
    while state != goal:
        step = next_step(caps, state, goal)
        if step == ERROR:
            raise ProtocolError(errno.EINVAL, f"no transition {current.name} -> {goal.name}")
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
                except ProtocolError:
                    continue
    return frozenset(arcs)
