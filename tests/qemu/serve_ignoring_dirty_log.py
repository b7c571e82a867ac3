"""``vfio-user-emu`` whose DMA_LOGGING_REPORT never reports a dirty page (it still reads and
clears the log). A broken server on purpose: the DMA-loop migration test runs against it to
prove that it catches device writes a migration loses (tests/qemu/test_qemu_migration_dma.py).

    python -m tests.qemu.serve_ignoring_dirty_log serve --device testdev ...
"""

from __future__ import annotations

from emulator import dirty
from emulator.cli import entry

_real_report = dirty.LoggingFeature.report


def _report_nothing(
    self: dirty.LoggingFeature, data: bytes, argsz: int, max_bitmap: int = 1 << 20
) -> bytes:
    reply = _real_report(self, data, argsz, max_bitmap)
    head = dirty.REPORT.size
    return reply[:head] + bytes(len(reply) - head)


dirty.LoggingFeature.report = _report_nothing  # type: ignore[method-assign]

if __name__ == "__main__":
    entry()
