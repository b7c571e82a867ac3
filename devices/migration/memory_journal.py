"""Writes into device memory that can be taken back: a resumed stream is applied in place
while it arrives (no staging copy of a large RAM), and a stream that then fails to check out
must leave the device as it was.

Before a write replaces bytes, the journal keeps them, unless they are all zero (a freshly
reset or never-used destination, the usual case of a migration): then it only notes the
range, and undoing it clears the range again. Writes that continue the previous one extend
its entry (a stream arriving in tiny pieces costs no entry per piece); kept bytes are
copied at most ZERO_PROBE at a time, and freed by :meth:`commit` or :meth:`undo`. A
destination that is not zero thus costs a copy of what is overwritten, in fresh memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from devices.migration import primitives as stream_primitives

#: The zero test looks at this much at a time (a whole-range bitmap bit each).
ZERO_PROBE = stream_primitives.MAX_PAGE_SIZE


@dataclass(slots=True)
class _Entry:
    offset: int
    length: int
    kept: bytearray | None  # the bytes replaced; None: they were all zero


class MemoryJournal:
    def __init__(self, memory: memoryview) -> None:
        self.memory = memory
        self._entries: list[_Entry] = []

    def write(self, offset: int, data: memoryview) -> None:
        self.prepare(offset, len(data))[:] = data

    def prepare(self, offset: int, count: int) -> memoryview:
        """The memory at ``offset``, for the caller to overwrite (its bytes kept first)."""
        self._keep(offset, count)
        return self.memory[offset : offset + count]

    def clear(self, offset: int, count: int) -> None:
        for at in range(offset, offset + count, ZERO_PROBE):
            current = self.memory[at : min(at + ZERO_PROBE, offset + count)]
            if not _all_zero(current):  # else nothing changes, nothing to take back
                self._note(at, current, zero=False)
                stream_primitives.fill_zero(current)

    def undo(self) -> None:
        """Every write taken back, newest first (a later write may cover an earlier)."""
        entries, self._entries = self._entries, []
        for entry in reversed(entries):
            target = self.memory[entry.offset : entry.offset + entry.length]
            if entry.kept is None:
                stream_primitives.fill_zero(target)
            else:
                target[:] = entry.kept

    def commit(self) -> None:
        self._entries = []

    @property
    def entries(self) -> int:
        """Ranges noted (writes that continue the previous one share its entry)."""
        return len(self._entries)

    @property
    def kept_bytes(self) -> int:
        return sum(len(entry.kept) for entry in self._entries if entry.kept is not None)

    def _keep(self, offset: int, count: int) -> None:
        for at in range(offset, offset + count, ZERO_PROBE):
            current = self.memory[at : min(at + ZERO_PROBE, offset + count)]
            self._note(at, current, zero=_all_zero(current))

    def _note(self, offset: int, current: memoryview, *, zero: bool) -> None:
        """Record what ``current`` (at ``offset``) holds before it is overwritten."""
        last = self._entries[-1] if self._entries else None
        if last is not None and last.offset + last.length == offset and (last.kept is None) == zero:
            last.length += len(current)  # continues the newest entry: one entry for both
            if last.kept is not None:
                last.kept += current
            return
        self._entries.append(_Entry(offset, len(current), None if zero else bytearray(current)))


def _all_zero(view: memoryview) -> bool:
    """Whether ``view`` holds only zero bytes (the fastest available primitive)."""
    bitmap = stream_primitives.current().zero_page_bitmap
    for at in range(0, len(view), ZERO_PROBE):
        piece = view[at : at + ZERO_PROBE]
        if not bitmap(piece, len(piece))[0] & 1:
            return False
    return True
