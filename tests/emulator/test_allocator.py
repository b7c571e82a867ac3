"""emulator.allocator: malloc keeps message-sized buffers (no page faults per copy)."""

from __future__ import annotations

import platform

from emulator import allocator


def test_keep_large_buffers_is_done_once_and_reports_glibc() -> None:
    first = allocator.keep_large_buffers()
    assert allocator.keep_large_buffers() is first  # cached: once per process
    if platform.libc_ver()[0] == "glibc":
        assert first is True


def test_large_buffers_still_work_after_tuning() -> None:
    allocator.keep_large_buffers()
    blocks = [bytes([n]) * (1 << 20) for n in range(8)]  # message-sized, from the heap now
    assert [block[-1] for block in blocks] == list(range(8))
    del blocks
    again = bytearray(3 << 20)
    assert not any(again[:: 1 << 12])
