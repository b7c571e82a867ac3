"""The e1000's statistics registers: saturating counters, read-to-clear.

Every counter is a plain register of the register file (``values``, shared with the rest
of the device), so migration saves them with the others; transmit and receive count into
them through one :class:`Statistics` object the device hands both.
"""

from __future__ import annotations

from collections.abc import Callable

from devices.e1000 import regs as r


class Statistics:
    """Counting into the register file ``values`` (offset -> value)."""

    def __init__(self, values: dict[int, int]) -> None:
        self.values = values

    def count(self, offset: int, amount: int = 1) -> None:
        """Add ``amount`` to a 32-bit counter; it sticks at 0xFFFFFFFF."""
        values = self.values
        values[offset] = min(values[offset] + amount, 0xFFFFFFFF)

    def count64(self, low: int, amount: int) -> None:
        """Add ``amount`` to a 64-bit counter kept as low and high registers."""
        values = self.values
        total = min((values[low] | values[low + 4] << 32) + amount, (1 << 64) - 1)
        values[low] = total & 0xFFFFFFFF
        values[low + 4] = total >> 32

    def reader(self, offset: int) -> Callable[[], int]:
        """The read handler of the counter at ``offset``: reading clears it (and the low
        half along with a 64-bit counter's high one)."""
        values = self.values
        low = r.STATS_PAIRS.get(offset)

        def read() -> int:
            value = values[offset]
            values[offset] = 0
            if low is not None:
                values[low] = 0
            return value

        return read
