"""The e1000's interrupt logic: ICR, ICS, IMS/IMC, the INTx line and its mitigation.

ICR is read-to-clear and W1C, ICS sets causes, IMS/IMC enable and disable them; the line
is ``ICR & IMS != 0``. Mitigation: an assertion waits until ITR x 256 ns after the previous
one; RXT0 waits for the RDTR packet timer (bounded by RADV), TXDW of IDE descriptors for
TIDV (bounded by TADV). Cause bits show in ICR at once; only the line is delayed. Writing
RDTR or TIDV with FPD set flushes a pending delay.

:class:`Interrupts` is composed by the device and shared with the transmitter and the
receiver (which call :meth:`Interrupts.cause`); it works on the device's register file and
its :class:`~devices.e1000.jobs.Timers`, and owns only the two "a delay is running" flags.
"""

from __future__ import annotations

from devices.e1000 import regs as r
from devices.e1000.jobs import Timers
from devices.irq import InterruptController


class Interrupts:
    """Interrupt causes into the register file ``values`` and the INTx line of ``irq``."""

    def __init__(self, values: dict[int, int], irq: InterruptController, timers: Timers) -> None:
        self.values = values
        self.irq = irq
        self.timers = timers
        self.rx_delaying = False  # RXT0 waits for the RDTR/RADV timers
        self.tx_delaying = False  # TXDW waits for the TIDV/TADV timers

    def reset(self) -> None:
        self.rx_delaying = self.tx_delaying = False

    # -- register handlers ------------------------------------------------------------------
    def read_icr(self) -> int:
        value = self.values[r.ICR]
        self.values[r.ICR] = 0
        self.update_line()
        return value

    def write_icr(self, value: int) -> None:  # W1C: the bank hands us what remains
        self.values[r.ICR] = value & r.ICR_VALID
        self.update_line()

    def read_ics(self) -> int:
        return self.values[r.ICR]

    def write_ics(self, value: int) -> None:
        self.values[r.ICS] = 0
        self.cause(value & r.ICR_VALID)

    def write_ims(self, value: int) -> None:
        self.values[r.IMS] |= value & r.ICR_VALID
        self.update_line()

    def write_imc(self, value: int) -> None:
        self.values[r.IMS] &= ~value
        self.update_line()

    def write_rdtr(self, value: int) -> None:
        self.values[r.RDTR] = value & 0xFFFF
        if value & r.FPD and self.rx_delaying:
            self.rx_delay_done()

    def write_tidv(self, value: int) -> None:
        self.values[r.TIDV] = value & 0xFFFF
        if value & r.FPD and self.tx_delaying:
            self.tx_delay_done()

    # -- causes and the line ----------------------------------------------------------------
    def cause(self, bits: int, *, rx_delay: bool = False, tx_delay: bool = False) -> None:
        """Set interrupt causes; RXT0 from reception and TXDW of IDE descriptors wait for
        their delay timers before they may assert the line."""
        if not bits:
            return
        values = self.values
        timers = self.timers
        values[r.ICR] |= bits
        if rx_delay and values[r.RDTR]:
            self.rx_delaying = True
            timers.arm("rxpkt", values[r.RDTR] * r.DELAY_UNIT)
            if values[r.RADV] and not timers.running("rxabs"):
                timers.arm("rxabs", values[r.RADV] * r.DELAY_UNIT)
        if tx_delay and values[r.TIDV]:
            self.tx_delaying = True
            timers.arm("txpkt", values[r.TIDV] * r.DELAY_UNIT)
            if values[r.TADV] and not timers.running("txabs"):
                timers.arm("txabs", values[r.TADV] * r.DELAY_UNIT)
        self.update_line()

    def update_line(self) -> None:
        values = self.values
        timers = self.timers
        pending = values[r.ICR] & values[r.IMS]
        irq = self.irq
        if not pending:
            if irq.intx_line:
                irq.lower_intx()
            return
        if irq.intx_line or timers.paused:
            return
        if timers.running("itr"):
            return  # the minimum interval since the last interrupt has not passed
        held = (r.ICR_RXT0 if self.rx_delaying else 0) | (r.ICR_TXDW if self.tx_delaying else 0)
        if not pending & ~held:
            return  # only delayed causes: their timers call back
        irq.raise_intx()
        itr = values[r.ITR] & 0xFFFF
        if itr:
            timers.arm("itr", itr * r.ITR_UNIT)
        if self.rx_delaying:
            self.rx_delaying = False
            timers.disarm("rxpkt")
            timers.disarm("rxabs")
        if self.tx_delaying:
            self.tx_delaying = False
            timers.disarm("txpkt")
            timers.disarm("txabs")

    def rx_delay_done(self) -> None:
        self.rx_delaying = False
        self.timers.disarm("rxpkt")
        self.timers.disarm("rxabs")
        self.update_line()

    def tx_delay_done(self) -> None:
        self.tx_delaying = False
        self.timers.disarm("txpkt")
        self.timers.disarm("txabs")
        self.update_line()
