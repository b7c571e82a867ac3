"""protocol.migration_v1: the device_state bitfield rules and the DIRTY_PAGES codec."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.constants import MigState
from protocol.dirty_logging import bitmap_bytes
from protocol.errors import ProtocolError
from protocol.migration_v1 import (
    BITS_TO_STATE,
    RESERVED_MASK,
    STATE_MASK,
    BitmapRange,
    DirtyPages,
    DirtyPagesFlags,
    StateBits,
    register_at,
    register_value,
    requested_state,
)

R, S, RES, N = StateBits.RUNNING, StateBits.SAVING, StateBits.RESUMING, StateBits.NDMA

#: The issue's list, written out independently of the module's table.
LISTED = {
    R: MigState.RUNNING,
    0: MigState.STOP,
    S: MigState.STOP_COPY,
    S | R: MigState.PRE_COPY,
    RES: MigState.RESUMING,
    N | R: MigState.RUNNING_P2P,
    N | S | R: MigState.PRE_COPY_P2P,
}
U32 = st.integers(0, 0xFFFF_FFFF)


def test_table_is_the_listed_one() -> None:
    assert {int(k): v for k, v in LISTED.items()} == BITS_TO_STATE


@given(U32)
def test_every_u32_maps_as_listed_or_is_einval(value: int) -> None:
    bits = value & STATE_MASK
    expected = LISTED.get(StateBits(bits))
    if expected is None:
        with pytest.raises(ProtocolError) as info:
            requested_state(value)
        assert info.value.errno == errno.EINVAL
    else:
        # Reserved bits do not change what is asked for (rule 4).
        assert requested_state(value) == expected


def test_error_value_reads_but_cannot_be_written() -> None:
    assert register_value(MigState.ERROR) == S | RES
    with pytest.raises(ProtocolError):
        requested_state(S | RES)


@given(st.sampled_from([s for s in MigState if s != MigState.ERROR]), U32)
def test_read_modify_write_round_trips(state: MigState, reserved: int) -> None:
    # A client reads the register, keeps everything but the state bits, writes it back.
    value = register_value(state, reserved)
    assert value & RESERVED_MASK == reserved & RESERVED_MASK
    assert requested_state(value) == state


@pytest.mark.parametrize(
    ("offset", "count", "name"),
    [(0, 4, "device_state"), (4, 4, "reserved"), (8, 8, "pending_bytes"), (0x10, 8, "data_offset")],
)
def test_register_at(offset: int, count: int, name: str) -> None:
    assert register_at(offset, count) == name


@pytest.mark.parametrize(
    ("offset", "count"), [(0, 8), (0, 2), (1, 4), (8, 4), (0x20, 8), (0x18, 4)]
)
def test_register_at_refuses_partial_or_other_accesses(offset: int, count: int) -> None:
    with pytest.raises(ProtocolError):
        register_at(offset, count)


# -- DIRTY_PAGES ------------------------------------------------------------------------------


def test_start_stop_round_trip() -> None:
    for flags in (DirtyPagesFlags.START, DirtyPagesFlags.STOP):
        raw = struct.pack("<II", 8, flags)
        assert DirtyPages.unpack(raw).pack() == raw


def test_get_bitmap_round_trip_and_reply() -> None:
    raw = struct.pack("<IIQQQQ", 48, 4, 0x1000, 0x1000, 4096, 8)
    request = DirtyPages.unpack(raw)
    assert request.pack() == raw
    assert request.range == BitmapRange(0x1000, 0x1000, 4096, 8)
    assert request.reply_argsz == 48
    assert request.pack_bitmap_reply(b"\x01") == raw + b"\x01" + bytes(7)
    assert request.pack_too_small() == struct.pack("<II", 48, 4)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x08\x00\x00",  # short
        struct.pack("<II", 8, 0),  # no flag
        struct.pack("<II", 8, 3),  # two flags
        struct.pack("<II", 8, 8),  # unknown flag
        struct.pack("<II", 4, 1),  # argsz below the header
        struct.pack("<III", 8, 1, 0),  # START with trailing bytes
        struct.pack("<II", 48, 4),  # GET_BITMAP without its range
        struct.pack("<IIQQQQ", 48, 4, 0, 0x1000, 1000, 8),  # page size not a power of two
        struct.pack("<IIQQQQ", 48, 4, 0, 0x1000, 2048, 8),  # below 4 KiB
        struct.pack("<IIQQQQ", 48, 4, 0, 0, 4096, 8),  # empty range
        struct.pack("<IIQQQQ", 48, 4, 0, 65 * 4096, 4096, 8),  # bitmap too small
        struct.pack("<IIQQQQ", 48, 4, (1 << 64) - 4096, 8192, 4096, 8),  # wraps
    ],
)
def test_bad_requests_are_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        DirtyPages.unpack(raw)


@given(st.integers(1, 1 << 40), st.sampled_from([4096, 8192, 1 << 21]))
def test_bitmap_bytes_holds_one_bit_per_page_in_words(size: int, pgsize: int) -> None:
    pages = -(-size // pgsize)
    got = bitmap_bytes(size, pgsize)
    assert got % 8 == 0 and got * 8 >= pages and (got - 8) * 8 < pages
