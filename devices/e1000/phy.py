"""The Marvell 88E1011-style PHY behind MDIC (PHY address 1).

Register values are those the Linux driver reads from QEMU's model in the trace (IDs
0x0141/0x0C20, BMCR 0x1140, ANAR 0x0DE1, 1000BASE-T control 0x0E00, specific control 0x0360,
extended specific control 0x0D60, ...). Autonegotiation: restarting it (BMCR bit 9, or a PHY
reset through CTRL.PHY_RST) takes the link down; the device completes it after its
autonegotiation delay, bringing the link up (BMSR link + AN complete, link partner ability
acknowledged) and raising ICR.LSC. Loopback (BMCR bit 14, which Linux's self-test sets with
forced 1000/Full) brings the link up at once and loops the MAC's frames back to it.
"""

from __future__ import annotations

import struct

PHY_ADDRESS = 1
NUM_REGS = 32

BMCR = 0x00
BMSR = 0x01
PHYID1 = 0x02
PHYID2 = 0x03
ANAR = 0x04
ANLPAR = 0x05
ANER = 0x06
CTRL1000 = 0x09
STAT1000 = 0x0A
SPEC_CTRL = 0x10
SPEC_STATUS = 0x11
EXT_SPEC_CTRL = 0x14
RX_ERR_CNTR = 0x15
PAGE_SELECT = 0x1D
PAGE_DATA = 0x1E

BMCR_RESET = 0x8000
BMCR_LOOPBACK = 0x4000
BMCR_AN_ENABLE = 0x1000
BMCR_AN_RESTART = 0x0200
BMSR_LINK = 0x0004
BMSR_AN_COMPLETE = 0x0020
ANLPAR_ACK = 0x4000
ANER_LP_AN_ABLE = 0x0001
SPEC_STATUS_LINK = 0x0400
SPEC_STATUS_RESOLVED = 0x0800

PHYID1_VALUE = 0x0141
PHYID2_VALUE = 0x0C20

#: Power-on values with the link up and autonegotiation complete.
RESET_VALUES = {
    BMCR: 0x1140,
    BMSR: 0x796D,
    PHYID1: PHYID1_VALUE,
    PHYID2: PHYID2_VALUE,
    ANAR: 0x0DE1,
    ANLPAR: 0x41E0,
    ANER: ANER_LP_AN_ABLE,
    CTRL1000: 0x0E00,
    STAT1000: 0x3C00,
    SPEC_CTRL: 0x0360,
    SPEC_STATUS: 0xAC00,
    EXT_SPEC_CTRL: 0x0D60,
    RX_ERR_CNTR: 0x0000,
}
READABLE = frozenset(RESET_VALUES) | {PAGE_SELECT, PAGE_DATA}
WRITABLE = frozenset({BMCR, ANAR, CTRL1000, SPEC_CTRL, EXT_SPEC_CTRL, PAGE_SELECT, PAGE_DATA})

_REGS = struct.Struct(f"<{NUM_REGS}H")


class Phy:
    def __init__(self) -> None:
        self.regs = [0] * NUM_REGS
        self.reset()

    def reset(self) -> None:
        self.regs = [0] * NUM_REGS
        for reg, value in RESET_VALUES.items():
            self.regs[reg] = value

    @property
    def link_up(self) -> bool:
        return bool(self.regs[BMSR] & BMSR_LINK)

    @property
    def loopback(self) -> bool:
        """BMCR loopback: the PHY returns what the MAC transmits and ignores the wire."""
        return bool(self.regs[BMCR] & BMCR_LOOPBACK)

    def read(self, reg: int) -> int | None:
        """The register's value, or None when it does not exist (MDIC.ERROR)."""
        return self.regs[reg] if reg in READABLE else None

    def write(self, reg: int, value: int) -> tuple[bool, bool]:
        """Store a write; returns (accepted, autonegotiation restarted)."""
        if reg not in WRITABLE:
            return False, False
        if reg == BMCR:
            # Reset and restart are self-clearing; a restart only means something while
            # autonegotiation is enabled.
            self.regs[BMCR] = value & ~(BMCR_RESET | BMCR_AN_RESTART)
            restart = bool(value & BMCR_AN_RESTART and value & BMCR_AN_ENABLE)
            return True, restart
        self.regs[reg] = value
        return True, False

    def link_down(self) -> None:
        self.regs[BMSR] &= ~(BMSR_LINK | BMSR_AN_COMPLETE)
        self.regs[ANLPAR] &= ~ANLPAR_ACK
        self.regs[ANER] &= ~ANER_LP_AN_ABLE
        self.regs[SPEC_STATUS] &= ~(SPEC_STATUS_LINK | SPEC_STATUS_RESOLVED)

    def loopback_link(self) -> None:
        """In loopback the PHY has its own transmitter for a partner: link up at the forced
        speed, without autonegotiation."""
        self.regs[BMSR] |= BMSR_LINK
        self.regs[SPEC_STATUS] |= SPEC_STATUS_LINK | SPEC_STATUS_RESOLVED

    def autoneg_done(self) -> None:
        self.regs[BMSR] |= BMSR_LINK | BMSR_AN_COMPLETE
        self.regs[ANLPAR] |= ANLPAR_ACK
        self.regs[ANER] |= ANER_LP_AN_ABLE
        self.regs[SPEC_STATUS] |= SPEC_STATUS_LINK | SPEC_STATUS_RESOLVED

    # -- migration -------------------------------------------------------------------------
    def pack(self) -> bytes:
        return _REGS.pack(*self.regs)

    @staticmethod
    def unpack(data: bytes | bytearray | memoryview) -> list[int]:
        """Validated register values; ValueError if they cannot come from this PHY."""
        if len(data) != _REGS.size:
            raise ValueError(f"PHY state of {len(data)} bytes")
        values = list(_REGS.unpack(data))
        if values[PHYID1] != PHYID1_VALUE or values[PHYID2] != PHYID2_VALUE:
            raise ValueError("PHY state has foreign PHY identifiers")
        if any(values[reg] for reg in range(NUM_REGS) if reg not in READABLE):
            raise ValueError("PHY state sets registers this PHY does not have")
        if values[BMCR] & (BMCR_RESET | BMCR_AN_RESTART):
            raise ValueError("PHY state holds self-clearing BMCR bits")
        return values

    @staticmethod
    def packed_size() -> int:
        return _REGS.size
