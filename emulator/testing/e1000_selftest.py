"""Linux's e1000 offline self-test (``ethtool -t ethX offline``), played over vfio-user by
the guest driver of :mod:`emulator.testing.guest_e1000`.

The five tests and the order are those of ``e1000_diag_test`` in Linux's
``drivers/net/ethernet/intel/e1000/e1000_ethtool.c`` for an 82540 with copper media (read
for the facts: the register table, the codes, the timing; the code here is our own):

* link (``e1000_link_test``), run first, before any reset: STATUS.LU after autonegotiation;
* register (``e1000_reg_test``): STATUS ignores writes; each register of the table keeps
  exactly its implemented bits of four patterns; RCTL/TCTL set-and-check; the 15 RAH and
  128 MTA entries. Result: 0, 1 (STATUS) or the offset of the first register that failed;
* EEPROM (``e1000_eeprom_test``): the 64 words read by Microwire sum to 0xBABA (2 if not);
* interrupt (``e1000_intr_test``, unshared line): for each cause 0..9, masked it must not
  interrupt (3), enabled and forced through ICS it must (4), the others masked and forced
  must not (5); each within the driver's 10 ms;
* loopback (``e1000_loopback_test`` with ``e1000_integrated_phy_loopback``): rings of 256
  descriptors, the PHY in loopback at forced 1000/Full, ten rounds of 64 frames of 1024
  bytes; each round the driver waits 200 ms after the doorbell, then needs 64 receive
  buffers holding the test pattern (13 otherwise). Like the driver it reads the buffers,
  not the descriptors; :attr:`SelfTest.looped_frames` counts the DD write-backs besides.

A device reset (``e1000_reset``: :meth:`E1000Guest.reset_hw` and ``init_hw``) runs
between the tests, as the driver does.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import trio

from devices.e1000 import regs as r
from emulator.testing.guest_e1000 import E1000Guest

REG_PATTERNS = (0x5A5A5A5A, 0xA5A5A5A5, 0x00000000, 0xFFFFFFFF)
#: STATUS bits the register test toggles (and expects to stay as they were).
STATUS_TOGGLE = 0xFFFFF833
#: (offset, implemented bits, value written) of e1000_reg_test's first pattern tests.
PATTERN_TESTS = (
    (r.FCAL, 0xFFFFFFFF, 0xFFFFFFFF),
    (r.FCAH, 0x0000FFFF, 0xFFFFFFFF),
    (r.FCT, 0x0000FFFF, 0xFFFFFFFF),
    (r.VET, 0x0000FFFF, 0xFFFFFFFF),
    (r.RDTR, 0x0000FFFF, 0xFFFFFFFF),
    (r.RDBAH, 0xFFFFFFFF, 0xFFFFFFFF),
    (r.RDLEN, 0x000FFF80, 0x000FFFFF),
    (r.RDH, 0x0000FFFF, 0x0000FFFF),
    (r.RDT, 0x0000FFFF, 0x0000FFFF),
    (r.FCRTH, 0x0000FFF8, 0x0000FFF8),
    (r.FCTTV, 0x0000FFFF, 0x0000FFFF),
    (r.TIPG, 0x3FFFFFFF, 0x3FFFFFFF),
    (r.TDBAH, 0xFFFFFFFF, 0xFFFFFFFF),
    (r.TDLEN, 0x000FFF80, 0x000FFFFF),
)
#: After the RCTL/TCTL checks, for an 82543 or later MAC.
LATE_PATTERN_TESTS = (
    (r.RDBAL, 0xFFFFFFF0, 0xFFFFFFFF),
    (r.TXCW, 0xC000FFFF, 0x0000FFFF),
    (r.TDBAL, 0xFFFFFFF0, 0xFFFFFFFF),
    (r.TIDV, 0x0000FFFF, 0x0000FFFF),
)
RAR_ENTRIES = 15  # E1000_RAR_ENTRIES: the driver tests RAH 0..14
RCTL_TESTED = 0x06DFB3FE

INTR_WAIT = 0.010  # the driver's msleep(10) after each forced cause
INTR_CAUSES = 10  # causes 0..9
INTR_OTHERS = 0x7FFF

LB_RING = 256  # E1000_DEFAULT_TXD / E1000_DEFAULT_RXD
LB_FRAME = 1024
LB_BURST = 64
LB_RX_BUFFER = 2048
LB_WAIT = 0.200  # msleep(200) after the doorbell
LB_CHECK = 0.020  # then 20 jiffies to find them (80 ms at Debian's HZ 250: we allow 20)
#: TCTL of e1000_setup_desc_rings: PSP, EN, collision threshold 15, full-duplex distance 63.
LB_TCTL = r.TCTL_PSP | r.TCTL_EN | 0x0F << 4 | 0x3F << 12
LB_RCTL = r.RCTL_EN | r.RCTL_BAM  # 2048-byte buffers, no loopback yet, RDMTS half, MO 0
# CTRL bits of the integrated-PHY loopback setup.
CTRL_FD, CTRL_ILOS, CTRL_SPD_SEL = 0x1, 0x80, 0x300
CTRL_SPD_1000, CTRL_FRCSPD, CTRL_FRCDPX = 0x200, 0x800, 0x1000
BMCR_LOOPBACK, BMCR_RESET = 0x4000, 0x8000


def lbtest_frame(size: int = LB_FRAME) -> bytes:
    """e1000_create_lbtest_frame: 0xFF, its second half 0xAA, with 0xBE and 0xAF marks."""
    frame = bytearray(b"\xff" * size)
    half = (size & ~1) // 2
    frame[half : half + half - 1] = b"\xaa" * (half - 1)
    frame[half + 10] = 0xBE
    frame[half + 12] = 0xAF
    return bytes(frame)


def lbtest_frame_ok(data: bytes, size: int = LB_FRAME) -> bool:
    """e1000_check_lbtest_frame."""
    half = (size & ~1) // 2
    return data[3] == 0xFF and data[half + 10] == 0xBE and data[half + 12] == 0xAF


@dataclass
class SelfTest:
    """Results in ``ethtool -t`` order, 0 for a pass, else the driver's code."""

    register: int = -1
    eeprom: int = -1
    interrupt: int = -1
    loopback: int = -1
    link: int = -1
    messages: list[str] = field(default_factory=list)
    looped_frames: int = 0  # receive descriptors the loopback test found written back
    round_times: list[float] = field(default_factory=list)  # loopback: doorbell to RDH

    @property
    def passed(self) -> bool:
        return not any((self.register, self.eeprom, self.interrupt, self.loopback, self.link))

    def table(self) -> str:
        """As ``ethtool -t`` prints the results."""
        rows = (
            ("Register test  (offline)", self.register),
            ("Eeprom test    (offline)", self.eeprom),
            ("Interrupt test (offline)", self.interrupt),
            ("Loopback test  (offline)", self.loopback),
            ("Link test   (on/offline)", self.link),
        )
        return "\n".join(f"{name}\t {code}" for name, code in rows)


class SelfTester:
    """Runs the tests on an :class:`E1000Guest` that has probed the device (MAC, EEPROM)
    and has an interrupt eventfd. The loopback rings go into guest RAM after the driver's
    own structures (:meth:`ram_needed`)."""

    def __init__(self, guest: E1000Guest) -> None:
        self.guest = guest
        self.result = SelfTest()
        base = guest.ram.base + guest.config.ram_needed()
        self.tx_ring = base
        self.rx_ring = base + 16 * LB_RING
        self.tx_buffers = self.rx_ring + 16 * LB_RING
        self.rx_buffers = self.tx_buffers + LB_FRAME * LB_RING

    @staticmethod
    def ram_needed(guest_ram: int) -> int:
        """Guest RAM for a driver needing ``guest_ram`` bytes plus the loopback rings."""
        return guest_ram + 32 * LB_RING + (LB_FRAME + LB_RX_BUFFER) * LB_RING

    def _fail(self, message: str) -> None:
        self.result.messages.append(message)

    async def run(self, *, link_wait: float = 4.0) -> SelfTest:
        """``e1000_diag_test`` offline: link, then register, EEPROM, interrupt and loopback
        with a reset before each, and a final reset."""
        guest = self.guest
        self.result.link = await self.link_test(link_wait)
        await guest.reset_hw()
        self.result.register = await self.reg_test()
        await self.reset()
        self.result.eeprom = await self.eeprom_test()
        await self.reset()
        self.result.interrupt = await self.intr_test()
        await self.reset()
        await self.power_up_phy()
        self.result.loopback = await self.loopback_test()
        await self.reset()
        return self.result

    async def reset(self) -> None:
        """``e1000_reset``: reset the MAC, then set it up again (filters, flow control, PHY
        and an autonegotiation restart)."""
        await self.guest.reset_hw()
        await self.guest.init_hw()

    async def power_up_phy(self) -> None:
        bmcr = await self.guest.phy_read(0)
        await self.guest.phy_write(0, bmcr & ~0x0800)

    # =========================================================================================
    # Link

    async def link_test(self, wait: float) -> int:
        """STATUS.LU, once autonegotiation had the driver's 4 s to finish."""
        with trio.move_on_after(wait):
            while not await self.guest.read(r.STATUS) & r.STATUS_LU:
                await trio.sleep(0.01)
        if await self.guest.read(r.STATUS) & r.STATUS_LU:
            return 0
        self._fail("link test: STATUS.LU clear")
        return 1

    # =========================================================================================
    # Registers

    async def _pattern(self, offset: int, mask: int, write: int) -> bool:
        guest = self.guest
        for pattern in REG_PATTERNS:
            await guest.write(offset, write & pattern)
            got = await guest.read(offset)
            expected = write & pattern & mask
            if got != expected:
                self._fail(
                    f"pattern test reg {offset:04X} failed: got {got:#010x} "
                    f"expected {expected:#010x}"
                )
                return False
        return True

    async def _set_and_check(self, offset: int, mask: int, write: int) -> bool:
        await self.guest.write(offset, write & mask)
        got = await self.guest.read(offset) & mask
        if got != write & mask:
            self._fail(
                f"set/check reg {offset:04X} test failed: got {got:#010x} "
                f"expected {write & mask:#010x}"
            )
            return False
        return True

    async def reg_test(self) -> int:
        guest = self.guest
        before = await guest.read(r.STATUS)
        value = before & STATUS_TOGGLE
        await guest.write(r.STATUS, STATUS_TOGGLE)
        after = await guest.read(r.STATUS) & STATUS_TOGGLE
        if after != value:
            self._fail(f"failed STATUS register test got: {after:#010x} expected: {value:#010x}")
            return 1
        await guest.write(r.STATUS, before)
        for offset, mask, write in PATTERN_TESTS:
            if not await self._pattern(offset, mask, write):
                return offset
        checks = (
            (r.RCTL, 0xFFFFFFFF, 0),
            (r.RCTL, RCTL_TESTED, 0x003FFFFB),
            (r.TCTL, 0xFFFFFFFF, 0),
            (r.RCTL, RCTL_TESTED, 0xFFFFFFFF),
        )
        for offset, mask, write in checks:
            if not await self._set_and_check(offset, mask, write):
                return offset
        late = [*LATE_PATTERN_TESTS]
        late += [(r.RA + 8 * i + 4, 0x8003FFFF, 0xFFFFFFFF) for i in range(RAR_ENTRIES)]
        late += [(r.MTA + 4 * i, 0xFFFFFFFF, 0xFFFFFFFF) for i in range(r.MTA_COUNT)]
        for offset, mask, write in late:
            if not await self._pattern(offset, mask, write):
                return offset
        return 0

    # =========================================================================================
    # EEPROM

    async def eeprom_test(self) -> int:
        words = await self.guest.read_eeprom()
        total = sum(words) & 0xFFFF
        if total != 0xBABA:
            self._fail(f"EEPROM words sum to {total:#06x}, not 0xbaba")
            return 2
        return 0

    # =========================================================================================
    # Interrupts

    async def _posted(self) -> int:
        """E1000_WRITE_FLUSH then msleep(10): the ICR bits every interrupt handler run
        read meanwhile (the handler reads ICR, QEMU then UNMASKs)."""
        guest = self.guest
        await guest.read(r.STATUS)
        icr = 0
        with trio.move_on_after(INTR_WAIT):
            while True:
                icr |= await guest.service_interrupt(timeout=math.inf)
        return icr

    async def intr_test(self) -> int:
        """``e1000_intr_test`` with the line to itself (the unshared variant, which also
        checks that masked causes stay quiet)."""
        guest = self.guest
        if guest.irq is None:
            raise ValueError("the interrupt test needs an interrupt eventfd")
        await guest.write(r.IMC, 0xFFFFFFFF)
        await self._posted()
        for bit in range(INTR_CAUSES):
            mask = 1 << bit
            await guest.write(r.IMC, mask)
            await guest.write(r.ICS, mask)
            if (icr := await self._posted()) & mask:
                self._fail(f"interrupt test: masked cause {mask:#x} interrupted (ICR {icr:#x})")
                return 3
            await guest.write(r.IMS, mask)
            await guest.write(r.ICS, mask)
            if not (icr := await self._posted()) & mask:
                self._fail(f"interrupt test: cause {mask:#x} enabled and forced, no interrupt")
                return 4
            await guest.write(r.IMC, ~mask & INTR_OTHERS)
            await guest.write(r.ICS, ~mask & INTR_OTHERS)
            if icr := await self._posted():
                self._fail(f"interrupt test: masked causes interrupted with ICR {icr:#x}")
                return 5
        await guest.write(r.IMC, 0xFFFFFFFF)
        await self._posted()
        return 0

    # =========================================================================================
    # Loopback

    async def loopback_test(self) -> int:
        await self._setup_rings()
        await self._phy_loopback()
        try:
            return await self._run_loopback()
        finally:
            await self._loopback_cleanup()

    async def _setup_rings(self) -> None:
        """``e1000_setup_desc_rings``: both rings, TX descriptors prepared (EOP, IFCS, RPS)."""
        guest, ram = self.guest, self.guest.ram
        await guest.write(r.TDBAL, self.tx_ring & 0xFFFFFFFF)
        await guest.write(r.TDBAH, self.tx_ring >> 32)
        await guest.write(r.TDLEN, 16 * LB_RING)
        await guest.write(r.TDH, 0)
        await guest.write(r.TDT, 0)
        await guest.write(r.TCTL, LB_TCTL)
        cmd = (r.TXD_CMD_EOP | r.TXD_CMD_IFCS | r.TXD_CMD_RPS) << 24
        for i in range(LB_RING):
            buffer = self.tx_buffers + LB_FRAME * i
            ram.write(self.tx_ring + 16 * i, r.DESC.pack(buffer, LB_FRAME | cmd, 0))
        rctl = await guest.read(r.RCTL)
        await guest.write(r.RCTL, rctl & ~r.RCTL_EN)
        await guest.write(r.RDBAL, self.rx_ring & 0xFFFFFFFF)
        await guest.write(r.RDBAH, self.rx_ring >> 32)
        await guest.write(r.RDLEN, 16 * LB_RING)
        await guest.write(r.RDH, 0)
        await guest.write(r.RDT, 0)
        await guest.write(r.RCTL, LB_RCTL)
        for i in range(LB_RING):
            buffer = self.rx_buffers + LB_RX_BUFFER * i
            ram.write(buffer, bytes(LB_RX_BUFFER))
            ram.write(self.rx_ring + 16 * i, struct.pack("<QQ", buffer, 0))

    async def _phy_loopback(self) -> None:
        """``e1000_integrated_phy_loopback`` for the M88 PHY."""
        guest = self.guest
        await guest.phy_write(0x10, 0x0808)  # auto MDI/MDI-X off
        await guest.phy_write(0, 0x9140)  # reset to apply it
        await guest.phy_write(0, 0x8140)  # autonegotiation off
        await guest.phy_write(0, 0x4140)  # forced 1000/Full, loopback
        ctrl = await guest.read(r.CTRL) & ~CTRL_SPD_SEL
        ctrl |= CTRL_FRCSPD | CTRL_FRCDPX | CTRL_SPD_1000 | CTRL_FD | CTRL_ILOS
        await guest.write(r.CTRL, ctrl)
        for reg, value in ((29, 0x001F), (30, 0x8FFC), (29, 0x001A), (30, 0x8FF0)):
            await guest.phy_write(reg, value)  # e1000_phy_disable_receiver

    async def _run_loopback(self) -> int:
        guest, ram = self.guest, self.guest.ram
        await guest.write(r.RDT, LB_RING - 1)
        rounds = (LB_RING // LB_BURST) * 2 + 1
        frame = lbtest_frame()
        tx_index = rx_index = sent = 0
        for _ in range(rounds + 1):
            for _ in range(LB_BURST):
                ram.write(self.tx_buffers + LB_FRAME * tx_index, frame)
                tx_index = (tx_index + 1) % LB_RING
            await guest.write(r.TDT, tx_index)
            await guest.read(r.STATUS)
            sent += LB_BURST
            await self._settle(min(sent, LB_RING - 1))
            # The driver's receive loop, for at most 20 ms (it reads buffers, not DD bits).
            found = 0
            with trio.move_on_after(LB_CHECK):
                while True:
                    found, next_index = self._good_buffers(rx_index)
                    if found == LB_BURST:
                        break
                    await trio.sleep(0.002)
            if found != LB_BURST:
                self._fail(f"loopback test: {found} of {LB_BURST} frames came back")
                return 13
            rx_index = next_index
        self.result.looped_frames = sum(
            1 for i in range(LB_RING) if ram.read(self.rx_ring + 16 * i + 12, 1)[0] & r.RXD_STAT_DD
        )
        return 0

    async def _settle(self, expected_rdh: int) -> None:
        """The driver's msleep(200) after the doorbell, cut short once the receive head
        shows every frame of the round stored (or the ring full). Waiting matters: the
        buffer check also counts buffers left from earlier rounds, so checking early
        would pass before this round's frames are in. Records how long it took."""
        start = trio.current_time()
        with trio.move_on_after(LB_WAIT):
            while await self.guest.read(r.RDH) != expected_rdh:
                await trio.sleep(0.001)
        self.result.round_times.append(trio.current_time() - start)

    def _good_buffers(self, start: int) -> tuple[int, int]:
        """The driver's receive loop: from ``start``, buffers until 64 hold the pattern
        (at most a ring's worth); (how many did, the index after the last one looked at)."""
        ram = self.guest.ram
        good, index = 0, start
        for _ in range(LB_RING):
            data = ram.read(self.rx_buffers + LB_RX_BUFFER * index, LB_FRAME)
            index = (index + 1) % LB_RING
            if lbtest_frame_ok(data):
                good += 1
                if good == LB_BURST:
                    break
        return good, index

    async def _loopback_cleanup(self) -> None:
        """``e1000_loopback_cleanup``: loopback modes off, then a PHY reset (BMCR bit 15)."""
        guest = self.guest
        rctl = await guest.read(r.RCTL)
        await guest.write(r.RCTL, rctl & ~r.RCTL_LBM_MASK)
        bmcr = await guest.phy_read(0)
        if bmcr & BMCR_LOOPBACK:
            bmcr &= ~BMCR_LOOPBACK
            await guest.phy_write(0, bmcr)
            await guest.phy_write(0, bmcr | BMCR_RESET)  # e1000_phy_reset for an M88 PHY
