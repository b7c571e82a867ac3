"""The undo journal behind in-place resume: every write and clear can be taken back, in
any overlap, and a zero destination keeps no copy."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from devices.migration.memory_journal import MemoryJournal

SIZE = 1 << 14

operations = st.lists(
    st.tuples(
        st.sampled_from(["write", "clear"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 5000),
        st.integers(0, 255),
    ),
    max_size=12,
)


def apply(journal: MemoryJournal, ops: list[tuple[str, int, int, int]]) -> bytes:
    expected = bytearray(journal.memory)
    for kind, offset, wanted, fill in ops:
        length = min(wanted, SIZE - offset)
        if kind == "write":
            data = bytes([fill]) * length
            journal.write(offset, memoryview(data))
            expected[offset : offset + length] = data
        else:
            journal.clear(offset, length)
            expected[offset : offset + length] = bytes(length)
    return bytes(expected)


@settings(max_examples=150, deadline=None)
@given(ops=operations, initial=st.sampled_from(["zero", "noise", "mixed"]))
def test_undo_restores_and_commit_keeps(ops: list[tuple[str, int, int, int]], initial: str) -> None:
    rng = random.Random(len(ops))
    start = bytearray(SIZE)
    if initial == "noise":
        start[:] = rng.randbytes(SIZE)
    elif initial == "mixed":
        start[SIZE // 2 :] = rng.randbytes(SIZE // 2)
    memory = bytearray(start)
    journal = MemoryJournal(memoryview(memory))
    expected = apply(journal, ops)
    assert memory == expected
    journal.undo()
    assert memory == start
    journal.undo()  # nothing left to take back
    assert memory == start
    expected = apply(journal, ops)
    journal.commit()
    journal.undo()
    assert memory == expected


def test_a_zero_destination_keeps_no_copy() -> None:
    memory = bytearray(1 << 20)
    journal = MemoryJournal(memoryview(memory))
    journal.write(4096, memoryview(b"\x01" * 65536))
    assert journal.kept_bytes == 0  # only the range is noted
    journal.write(4096, memoryview(b"\x02" * 4096))  # now over written bytes: kept
    assert journal.kept_bytes == 4096
    journal.clear(1 << 19, 4096)  # already zero: nothing to do
    assert journal.kept_bytes == 4096
    journal.undo()
    assert memory == bytes(1 << 20)


def test_a_stream_in_tiny_pieces_costs_one_entry_per_run() -> None:
    """Byte-by-byte writes (1-byte MIG_DATA_WRITEs) continue one another: one entry for
    the zero part and one for the written part, not one per byte."""
    memory = bytearray(8192)
    memory[4096:] = b"\x05" * 4096
    journal = MemoryJournal(memoryview(memory))
    for at in range(8192):
        journal.write(at, memoryview(b"\x09"))
    assert journal.entries == 2 and journal.kept_bytes == 4096
    journal.clear(0, 8192)
    assert journal.entries == 3
    journal.undo()
    assert memory == bytes(4096) + b"\x05" * 4096


def test_a_large_clear_keeps_its_copy_in_bounded_pieces() -> None:
    memory = bytearray(b"\x07" * (3 << 20))
    journal = MemoryJournal(memoryview(memory))
    journal.clear(100, (3 << 20) - 200)
    assert memory[:100] == b"\x07" * 100 and not any(memory[100:-100])
    assert journal.kept_bytes == (3 << 20) - 200
    journal.undo()
    assert memory == b"\x07" * (3 << 20)
