"""The legacy (v1) region-based migration interface and protocol-0.1 dirty-page tracking.

Older clients (Linux 5.8-5.17 VFIO, vfio-user 0.9.1 / libvfio-user protocol 0.1) migrate
through a *migration region* instead of DEVICE_FEATURE; facts 8.3 and 9.3. This module is
the sans-IO part: the register layout, the ``device_state`` bitfield and how it maps onto
the v2 state machine (:mod:`protocol.migration_fsm`), and the DIRTY_PAGES (14) codec. The
region that serves it is :mod:`emulator.migration_region`; the states still move through
the one engine (:class:`devices.migration.engine.MigrationEngine`).

Rules:

 1. The region is device-specific (index >= 9) with a TYPE cap (type 3, subtype 1). Its
    first page holds the registers (``'<IIQQQ'``, 32 bytes, each accessed only at its own
    width and offset): ``device_state`` u32 @0 (RW), reserved u32 @4 (reads 0, writes
    ignored), ``pending_bytes`` u64 @8 (RO), ``data_offset`` u64 @0x10 (RO),
    ``data_size`` u64 @0x18 (RW). The data window starts at DATA_OFFSET (the second page).
 2. ``device_state`` bits: RUNNING 1, SAVING 2, RESUMING 4, and NDMA 8 (the never-merged
    P2P-quiescing proposal, advertised with region cap id 6 when the device has P2P).
    The valid combinations map onto v2 states (BITS_TO_STATE):

        RUNNING -> RUNNING              0 -> STOP            SAVING -> STOP_COPY
        SAVING|RUNNING -> PRE_COPY      RESUMING -> RESUMING
        NDMA|RUNNING -> RUNNING_P2P     NDMA|SAVING|RUNNING -> PRE_COPY_P2P

    SAVING|RESUMING is the error value: ERROR reads as it, and it cannot be written (ERROR
    is never requestable). Every other combination of the four bits is invalid.
 3. A write of an invalid combination fails with EINVAL and changes nothing. A valid one
    is a v2 SET of the mapped state: the engine plans the path (so unsupported states, e.g.
    NDMA without P2P or SAVING|RUNNING without PRE_COPY, fail with EINVAL before any arc),
    and a failing arc leaves the state as it was or ERROR -- never an intermediate state.
 4. Before that, the change must be an arc of the v1 allowed-transition table
    (ALLOWED_TRANSITIONS; vfio-user 0.9.1, facts 8.3.2), else EINVAL and nothing changes:

        from/to        STOP  RUNNING  STOP_COPY  PRE_COPY  RESUMING
        STOP            -     yes      no         no        no
        RUNNING        yes     -       yes        yes       yes
        STOP_COPY      yes    yes       -         no        no
        PRE_COPY        no     no      yes         -        no
        RESUMING        no    yes       no        no         -

    Writing the current state again ("-") is allowed and does nothing. The NDMA states are
    not in the 0.9.1 table; they get the conservative rows of the kernel v2 direct arcs
    that touch them: RUNNING <-> RUNNING_P2P, RUNNING_P2P -> STOP, PRE_COPY <->
    PRE_COPY_P2P, PRE_COPY_P2P -> STOP_COPY (so NDMA is entered only from the state it
    quiesces and left towards the stopped state the v2 path takes next, or back). ERROR
    has no row: only DEVICE_RESET leaves it (facts 8.3.1), every write is refused.
 5. Bits 4-31 are reserved. They belong to the device (which keeps them 0): a write's
    reserved bits are ignored, so a client's read-modify-write preserves them and a
    client that sets them does not change them.
 6. DIRTY_PAGES (14), for clients that negotiated the ``migration`` capability (the
    connection refuses it from others) with a device serving v1 (the session checks): request
    ``argsz u32, flags u32`` with exactly one of START 1, STOP 2, GET_BITMAP 4. START and
    STOP carry nothing more (header-only replies). GET_BITMAP appends ``iova u64, size u64,
    pgsize u64, bitmap_size u64``; the reply repeats those 40 bytes (argsz = 40 +
    bitmap_size) followed by bitmap_size bytes of bitmap. bitmap_size must hold one bit per
    page (rounded up to u64 words), else EINVAL. A request whose argsz cannot hold the
    reply gets only ``argsz, flags`` back, argsz saying how much is needed.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from .constants import MigState
from .dirty_logging import bitmap_bytes
from .errors import ProtocolError, require

# -- the region ---------------------------------------------------------------------------

REGION_TYPE_MIGRATION = 3
REGION_SUBTYPE_MIGRATION = 1
#: libvfio-user put the migration region right after the nine fixed PCI regions.
DEFAULT_REGION_INDEX = 9

REGISTERS = struct.Struct("<IIQQQ")
DEVICE_STATE_OFFSET = 0x00
RESERVED_OFFSET = 0x04
PENDING_BYTES_OFFSET = 0x08
DATA_OFFSET_OFFSET = 0x10
DATA_SIZE_OFFSET = 0x18
#: (offset, width) of each register.
REGISTER_FIELDS: dict[str, tuple[int, int]] = {
    "device_state": (DEVICE_STATE_OFFSET, 4),
    "reserved": (RESERVED_OFFSET, 4),
    "pending_bytes": (PENDING_BYTES_OFFSET, 8),
    "data_offset": (DATA_OFFSET_OFFSET, 8),
    "data_size": (DATA_SIZE_OFFSET, 8),
}
_FIELD_AT = {where: (name, width) for name, (where, width) in REGISTER_FIELDS.items()}
#: The register area is a page; the data window follows it.
DATA_OFFSET = 0x1000


def register_at(offset: int, count: int) -> str:
    """Which register an access addresses; EINVAL unless it is exactly one register."""
    found = _FIELD_AT.get(offset)
    require(
        found is not None and found[1] == count,
        f"migration region: access [{offset:#x}, +{count}) is not one whole register",
    )
    assert found is not None
    return found[0]


# -- device_state --------------------------------------------------------------------------


class StateBits(enum.IntFlag):
    RUNNING = 1 << 0
    SAVING = 1 << 1
    RESUMING = 1 << 2
    NDMA = 1 << 3


STATE_MASK = 0xF
RESERVED_MASK = 0xFFFF_FFFF & ~STATE_MASK
ERROR_BITS = StateBits.SAVING | StateBits.RESUMING

_R, _S, _RES, _N = StateBits.RUNNING, StateBits.SAVING, StateBits.RESUMING, StateBits.NDMA

#: Rule 2: the writable combinations.
BITS_TO_STATE: dict[int, MigState] = {
    int(_R): MigState.RUNNING,
    0: MigState.STOP,
    int(_S): MigState.STOP_COPY,
    int(_S | _R): MigState.PRE_COPY,
    int(_RES): MigState.RESUMING,
    int(_N | _R): MigState.RUNNING_P2P,
    int(_N | _S | _R): MigState.PRE_COPY_P2P,
}
STATE_TO_BITS: dict[MigState, int] = {state: bits for bits, state in BITS_TO_STATE.items()}
STATE_TO_BITS[MigState.ERROR] = int(ERROR_BITS)


def register_value(state: MigState, reserved: int = 0) -> int:
    """What ``device_state`` reads in ``state`` (reserved bits as the device keeps them)."""
    return STATE_TO_BITS[state] | (reserved & RESERVED_MASK)


def requested_state(value: int) -> MigState:
    """The v2 state a ``device_state`` write asks for (rules 2 and 5); EINVAL if invalid."""
    require(0 <= value <= 0xFFFF_FFFF, f"device_state {value:#x} is not a u32")
    bits = value & STATE_MASK
    state = BITS_TO_STATE.get(bits)
    if state is None:
        what = "the error value" if bits == ERROR_BITS else "an invalid combination"
        raise ProtocolError(errno.EINVAL, f"device_state {bits:#x} is {what}")
    return state


_STOP, _RUN, _SC, _PC = MigState.STOP, MigState.RUNNING, MigState.STOP_COPY, MigState.PRE_COPY
_RES_S, _RP2P, _PCP2P = MigState.RESUMING, MigState.RUNNING_P2P, MigState.PRE_COPY_P2P

#: Rule 4: state -> the states a ``device_state`` write may move it to (besides itself).
ALLOWED_TRANSITIONS: dict[MigState, frozenset[MigState]] = {
    _STOP: frozenset({_RUN}),
    _RUN: frozenset({_STOP, _SC, _PC, _RES_S, _RP2P}),
    _SC: frozenset({_STOP, _RUN}),
    _PC: frozenset({_SC, _PCP2P}),
    _RES_S: frozenset({_RUN}),
    _RP2P: frozenset({_RUN, _STOP}),
    _PCP2P: frozenset({_PC, _SC}),
    MigState.ERROR: frozenset(),
}


def transition_allowed(current: MigState, target: MigState) -> bool:
    """Rule 4: may a ``device_state`` write move ``current`` to ``target``?"""
    if current == MigState.ERROR:
        return False
    return target == current or target in ALLOWED_TRANSITIONS.get(current, frozenset())


def check_transition(current: MigState, target: MigState) -> None:
    """EINVAL unless rule 4 allows ``current`` -> ``target``."""
    require(
        transition_allowed(current, target),
        f"device_state: {current.name} -> {target.name} is not a v1 transition"
        + (" (only DEVICE_RESET leaves ERROR)" if current == MigState.ERROR else ""),
    )


# -- DIRTY_PAGES (14) ------------------------------------------------------------------------


class DirtyPagesFlags(enum.IntFlag):
    START = 1 << 0
    STOP = 1 << 1
    GET_BITMAP = 1 << 2


DIRTY_HEADER = struct.Struct("<II")
BITMAP_RANGE = struct.Struct("<QQQQ")


@dataclass(frozen=True, slots=True)
class BitmapRange:
    iova: int
    size: int
    pgsize: int
    bitmap_size: int

    SIZE: ClassVar[int] = BITMAP_RANGE.size

    def pack(self) -> bytes:
        return BITMAP_RANGE.pack(self.iova, self.size, self.pgsize, self.bitmap_size)


@dataclass(frozen=True, slots=True)
class DirtyPages:
    argsz: int
    flags: DirtyPagesFlags
    range: BitmapRange | None = None

    @property
    def reply_argsz(self) -> int:
        """argsz of the full GET_BITMAP reply."""
        assert self.range is not None
        return DIRTY_HEADER.size + BitmapRange.SIZE + self.range.bitmap_size

    def pack(self) -> bytes:
        out = DIRTY_HEADER.pack(self.argsz, self.flags)
        return out + self.range.pack() if self.range is not None else out

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        require(len(payload) >= DIRTY_HEADER.size, "DIRTY_PAGES: payload too short")
        argsz, flags = DIRTY_HEADER.unpack_from(payload)
        require(
            flags in (DirtyPagesFlags.START, DirtyPagesFlags.STOP, DirtyPagesFlags.GET_BITMAP),
            f"DIRTY_PAGES: flags {flags:#x} are not exactly one of START, STOP, GET_BITMAP",
        )
        require(argsz >= DIRTY_HEADER.size, f"DIRTY_PAGES: argsz {argsz} < 8")
        if flags != DirtyPagesFlags.GET_BITMAP:
            require(len(payload) == DIRTY_HEADER.size, "DIRTY_PAGES START/STOP: trailing bytes")
            return cls(argsz, DirtyPagesFlags(flags))
        require(
            len(payload) == DIRTY_HEADER.size + BITMAP_RANGE.size,
            f"DIRTY_PAGES GET_BITMAP: {len(payload)} bytes, expected 40",
        )
        iova, size, pgsize, bsize = BITMAP_RANGE.unpack_from(payload, DIRTY_HEADER.size)
        require(
            pgsize >= 4096 and pgsize & (pgsize - 1) == 0,
            f"DIRTY_PAGES GET_BITMAP: page size {pgsize:#x}",
        )
        require(size > 0, "DIRTY_PAGES GET_BITMAP: empty range")
        require(iova + size <= 1 << 64, "DIRTY_PAGES GET_BITMAP: range wraps", errno.EOVERFLOW)
        require(
            bsize >= bitmap_bytes(size, pgsize),
            f"DIRTY_PAGES GET_BITMAP: bitmap of {bsize} bytes is too small for "
            f"{size:#x} bytes at {pgsize:#x}",
        )
        require(bsize <= 1 << 20, f"DIRTY_PAGES GET_BITMAP: bitmap of {bsize} bytes", errno.E2BIG)
        return cls(argsz, DirtyPagesFlags(flags), BitmapRange(iova, size, pgsize, bsize))

    def pack_bitmap_reply(self, bitmap: bytes) -> bytes:
        """The GET_BITMAP reply; ``bitmap`` is zero-padded to the requested bitmap size."""
        assert self.range is not None
        require(len(bitmap) <= self.range.bitmap_size, "dirty bitmap larger than requested")
        head = DIRTY_HEADER.pack(self.reply_argsz, self.flags) + self.range.pack()
        return head + bitmap + bytes(self.range.bitmap_size - len(bitmap))

    def pack_too_small(self) -> bytes:
        """argsz could not hold the reply: the pair only, with the argsz needed."""
        return DIRTY_HEADER.pack(self.reply_argsz, self.flags)
