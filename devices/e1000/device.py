"""``e1000``: an Intel 82540EM Gigabit Ethernet controller (PCI 8086:100E), as Linux's
``e1000`` driver drives it.

Layout:

* BAR0: 128 KiB of MMIO registers (``regs``); BAR1: 64 bytes of I/O space with IOADDR
  (offset 0) selecting a BAR0 register and IODATA (offset 4) accessing it; INTx only.
* EEPROM (64 words, MAC in words 0-2, sum 0xBABA) through EECD Microwire bit-banging and
  EERD; the PHY (address 1) through MDIC, with autonegotiation that completes after
  ``autoneg_delay`` (default: at once, see :data:`DEFAULT_AUTONEG_DELAY`) and raises LSC.
* Interrupts: ICR (read-to-clear, W1C), ICS, IMS/IMC; the INTx line is ``ICR & IMS != 0``.
  Mitigation: an assertion waits until ITR x 256 ns after the previous one; RXT0 waits for
  the RDTR packet timer (bounded by RADV), TXDW of IDE descriptors for TIDV (bounded by
  TADV). Cause bits show in ICR at once; only the line is delayed.
* Transmit: a TDT or TCTL write submits a job that walks TDH..TDT (legacy, context and data
  descriptors, checksum offload and TSO in :mod:`devices.e1000.packet`), hands frames to
  the NetPort, writes DD back for RS descriptors, raises TXDW and TXQE.
* Receive: ``net_receive`` filters a frame (RA with AV, MTA hash per RCTL.MO, BAM, UPE/MPE,
  VFTA when RCTL.VFE) into the receive FIFO (the PBA receive share); a job moves FIFO frames
  into descriptors RDH..RDT (RCTL.BSIZE/BSEX buffers, VLAN strip with CTRL.VME, FCS appended
  unless RCTL.SECRC, RXCSUM status), counting RNBC while there is no descriptor, and raises
  RXT0 and RXDMT0. A full FIFO drops the frame (MPC, RXO) only when the guest's ring cannot
  take what waits, as on the real part, whose DMA keeps up with the wire; when the ring has
  room and only our job is behind (a backend delivering a burst), the device keeps the frame
  and calls ``set_accepting(False)`` until the FIFO has drained to half.
* Loopback (what Linux's ``ethtool -t`` loopback test uses): MAC loopback (RCTL.LBM) or PHY
  loopback (BMCR bit 14) hands every transmitted frame to the receiver instead of the
  wire, and frames from the wire are not heard meanwhile.

A disconnect cancels the running job at any await: each transmit or receive batch commits
(frames on the wire or off the FIFO, TDH/RDH) at once after its last write-back, so a cut
job is redone from the same head for the next client, never losing or repeating a frame
(see ``_tx_batch``, ``_rx_batch``). A DMA fault keeps the work and retries it.

Timers (autonegotiation, interrupt mitigation) are deadlines on ``clock`` checked on every
register access and by a timer job that sleeps with ``context.sleep_until_work``: only while
no other device work is queued, and no longer than until some is, so it never holds up
transmit or receive. Timers freeze while the device is paused.

Migration: every register, the EEPROM, PHY registers, EECD state, the TX context and the
partly assembled (or partly segmented) packet, the receive FIFO and the remaining time of
every timer; :meth:`load_state` validates all sections before applying any.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from devices.api import Device, DeviceError, Region, RegisterBank
from devices.e1000 import eeprom, packet, phy
from devices.e1000 import regs as r
from devices.irq import InterruptController
from devices.migration.stream import Buffer, LoadedSection, Section
from devices.net import ANNOUNCE_DELAYS, DetachedPort, NetPort, announcement
from devices.pci import BarKind, BarSpec, ConfigSpace

log = logging.getLogger("vfio_user_emu")

DEFAULT_MAC = bytes.fromhex("525400123456")
#: Autonegotiation completes at once by default (the wire's far end is always there and
#: never changes). Linux's e1000 (e1000_main.c) resets the NIC for an MTU change or a Tx
#: timeout: e1000_reset restarts autonegotiation, then e1000_up fires ICS.LSC, whose
#: interrupt schedules the watchdog one jiffy later. A link still down then makes that run
#: re-arm itself for 2 s, and the LSC of a later link-up cannot bring it forward
#: (schedule_delayed_work does nothing to a pending work), so the guest learns of the link
#: 2 s late; and a watchdog run that finds the link down with Tx descriptors queued resets
#: the adapter ("Reset adapter", the flake of test_no_driver_complaints). Measured under
#: QEMU with a 0.5 s delay: the guest read the LSC 1 ms after autonegotiation completed,
#: and read the PHY's status next 2.03 s after the watchdog's first look.
DEFAULT_AUTONEG_DELAY = 0.0
TX_BATCH = 64  # descriptors fetched per DMA read
RX_BATCH = 64
MAX_FRAME = 1514  # without FCS and VLAN tag, RCTL.LPE off
MAX_LONG_FRAME = 16384
TIMER_NAMES = ("autoneg", "itr", "rxpkt", "rxabs", "txpkt", "txabs")
#: Retrying transmit and receive after a DMA fault (not migrated: resume kicks both anyway).
#: A client that reconnected maps its memory only after the attach that resubmits the work.
DMA_RETRY = "dmaretry"
DMA_RETRY_FIRST = 0.001
DMA_RETRY_MAX = 0.1
#: The rounds of the MAC announcement after a migration (not migrated: a device that
#: migrates again announces from its new place).
ANNOUNCE = "announce"
#: Longest timer a saved state may carry (ns): 0xffff x 1.024 us, with room to spare.
MAX_TIMER_NS = 1_000_000_000


def parse_mac(text: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address (xx:xx:xx:xx:xx:xx)") from None
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    if mac == bytes(6):
        raise ValueError("00:00:00:00:00:00 is not a usable MAC address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True, slots=True)
class E1000Options:
    mac: bytes = DEFAULT_MAC
    netdev: str | None = None
    #: Seconds from an autonegotiation restart to link up (0: at once).
    autoneg_delay: float = DEFAULT_AUTONEG_DELAY
    #: Time source of the timers (seconds); tests replaying a trace pass the trace's clock.
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        if len(self.mac) != 6 or self.mac[0] & 1:
            raise ValueError("mac must be a 6-byte unicast address")
        if not 0 <= self.autoneg_delay <= 10:
            raise ValueError("autoneg_delay must be 0..10 seconds")


#: Plain storage registers narrower than 32 bits, at the widths the part implements:
#: e1000_reg_test's REG_PATTERN_TEST masks (Linux e1000_ethtool.c) for flow control and TIPG,
#: TXCW, AIT; the packet buffer FIFO diagnostics at the widths of QEMU's model
#: (hw/net/e1000.c): 13-bit pointers, 11 for the transmit FIFO's head and tail.
_PLAIN_REGISTER_WIDTHS = (
    (r.FCAL, "FCAL", 0xFFFFFFFF),
    (r.FCAH, "FCAH", 0xFFFF),
    (r.FCT, "FCT", 0xFFFF),
    (r.FCTTV, "FCTTV", 0xFFFF),
    (r.FCRTH, "FCRTH", 0xFFF8),
    (r.FCRTL, "FCRTL", 0x8000FFF8),  # XONE and the low threshold
    (r.TIPG, "TIPG", 0x3FFFFFFF),
    (r.TXCW, "TXCW", 0xC000FFFF),
    (r.AIT, "AIT", 0xFFFF),
    (r.RDFH, "RDFH", 0x1FFF),
    (r.RDFT, "RDFT", 0x1FFF),
    (r.RDFHS, "RDFHS", 0x1FFF),
    (r.RDFTS, "RDFTS", 0x1FFF),
    (r.RDFPC, "RDFPC", 0x1FFF),
    (r.TDFH, "TDFH", 0x7FF),
    (r.TDFT, "TDFT", 0x7FF),
    (r.TDFHS, "TDFHS", 0x1FFF),
    (r.TDFTS, "TDFTS", 0x1FFF),
    (r.TDFPC, "TDFPC", 0x1FFF),
)


class _Registers(RegisterBank):
    """BAR0: a register bank that lets due timers fire before every access."""

    def __init__(self, tick: Callable[[], None]) -> None:
        super().__init__(r.BAR0_SIZE, "e1000")
        self._tick = tick

    def read(self, offset: int, count: int) -> bytes:
        self._tick()
        return super().read(offset, count)

    def write(self, offset: int, data: bytes) -> None:
        self._tick()
        super().write(offset, data)


class _IoPorts(Region):
    """BAR1: IOADDR (0) selects a BAR0 register, IODATA (4) reads or writes it."""

    size = r.BAR1_SIZE

    def __init__(self, bar0: RegisterBank) -> None:
        self.bar0 = bar0
        self.ioaddr = 0

    def _target(self) -> int | None:
        target = self.ioaddr & 0x7FFFC
        return target if target + 4 <= r.BAR0_SIZE else None

    def read(self, offset: int, count: int) -> bytes:
        window = bytearray(self.ioaddr.to_bytes(4, "little") + bytes(4))
        if offset < 8 and offset + count > 4:
            target = self._target()
            if target is not None:
                window[4:8] = self.bar0.read(target, 4)
        out = bytearray(count)
        for i in range(count):
            if offset + i < 8:
                out[i] = window[offset + i]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            pos = offset + i
            if pos < 4:
                shift = 8 * pos
                self.ioaddr = (self.ioaddr & ~(0xFF << shift)) | byte << shift
        start, stop = max(offset, 4), min(offset + len(data), 8)
        if start < stop:
            target = self._target()
            if target is not None:
                self.bar0.write(target + start - 4, data[start - offset : stop - offset])

    def reset(self) -> None:
        self.ioaddr = 0


@dataclass(slots=True)
class _Progress:
    """What a transmit or receive job has committed so far (for its interrupt causes)."""

    moved: int = 0  # descriptors (transmit) or frames (receive)
    report: bool = False  # transmit: an RS descriptor was written back
    delay: bool = False  # ... with IDE


@dataclass(slots=True)
class _TxStage:
    """A transmit batch read but not yet committed: the assembler it leaves behind, the
    frames it completes, the TSO context descriptors it counts, the TXDW it reports."""

    tx: packet.TxAssembler
    count: int  # descriptors
    next_head: int  # TDH after them
    frames: list[packet.TxFrame] = field(default_factory=list)
    tso_contexts: int = 0
    report: bool = False  # an RS descriptor is written back
    delay: bool = False  # ... with IDE


_MISC = struct.Struct("<IBBB6q")  # ioaddr, rx delaying, tx delaying, rnbc noted, timers


class E1000(Device):
    type_name: ClassVar[str] = "e1000"
    migration_caps: ClassVar[int] = 0x7  # STOP_COPY | P2P | PRE_COPY
    model_version: ClassVar[int] = 1

    def __init__(self, options: E1000Options | None = None) -> None:
        opts = options or E1000Options()
        self.options = opts
        self.netdev_id: str | None = opts.netdev
        self._clock = opts.clock
        config = ConfigSpace(
            vendor_id=r.VENDOR_ID,
            device_id=r.DEVICE_ID,
            subsystem_vendor_id=r.SUBSYSTEM_VENDOR_ID,
            subsystem_id=r.SUBSYSTEM_ID,
            class_code=r.CLASS_CODE,
            revision=r.REVISION,
            interrupt_pin=1,
        )
        config.add_bar(BarSpec(0, r.BAR0_SIZE, BarKind.MEM32))
        config.add_bar(BarSpec(1, r.BAR1_SIZE, BarKind.IO))
        super().__init__(config, InterruptController(config))
        self.regs = _Registers(self._poll_timers)
        self.values = self.regs.values  # the register file, by offset
        self._build_registers()
        self.io = _IoPorts(self.regs)
        self.add_region(0, self.regs)
        self.add_region(1, self.io)

        self.eeprom = eeprom.image(opts.mac)
        self.eecd = eeprom.Microwire()
        self.phy = phy.Phy()
        self.tx = packet.TxAssembler()
        self.port: NetPort = DetachedPort()
        self.rx_fifo: deque[bytes] = deque()
        self.rx_fifo_bytes = 0
        self._rnbc_noted = False  # RNBC already counted for the frame at the FIFO head
        self._backpressure = False  # the FIFO is full, the ring is not: the wire waits
        self._ra_cache: frozenset[bytes] | None = None

        # timers: name -> deadline on self._clock; frozen as remaining seconds while paused
        self._timers: dict[str, float] = {}
        self._frozen: dict[str, float] = {}
        self._next_due = math.inf
        self._rx_delaying = False
        self._tx_delaying = False
        self._dma_failing = False  # the last transmit or receive DMA faulted
        self._dma_retry_delay = DMA_RETRY_FIRST

        # device work
        self._paused = False
        self._generation = 0  # bumped by resets and loads: older jobs do nothing
        self._waiting = 0  # our jobs queued and not started (this generation)
        self._running = 0  # ... and started, not finished
        self._tx_queued = False
        self._rx_queued = False
        self._timer_queued = False
        self._migrated_in = False  # state loaded: announce the MAC when running again
        self._announce_round = len(ANNOUNCE_DELAYS)  # none under way
        self._load_mac_into_ra()
        self._update_link_status()

    # =========================================================================================
    # Registers

    def _build_registers(self) -> None:
        bank = self.regs
        add = bank.add
        v = self.values
        add(r.CTRL, "CTRL", reset=r.CTRL_RESET_VALUE, on_write=self._write_ctrl)
        add(r.STATUS, "STATUS", reset=r.STATUS_BASE | r.STATUS_LU, writable=0)
        add(r.EECD, "EECD", on_read=self._read_eecd, on_write=self._write_eecd)
        add(r.EERD, "EERD", on_write=self._write_eerd)
        add(r.MDIC, "MDIC", on_write=self._write_mdic)
        add(r.ICR, "ICR", w1c=True, on_read=self._read_icr, on_write=self._write_icr)
        add(r.ICS, "ICS", on_read=lambda: v[r.ICR], on_write=self._write_ics)
        add(r.IMS, "IMS", on_write=self._write_ims)
        add(r.IMC, "IMC", on_read=lambda: 0, on_write=self._write_imc)
        add(r.ITR, "ITR", writable=0xFFFF)
        add(r.RCTL, "RCTL", writable=r.RCTL_WRITABLE, on_write=self._write_rctl)
        add(r.TCTL, "TCTL", writable=r.TCTL_WRITABLE, on_write=self._write_tctl)
        add(r.VET, "VET", reset=r.VET_RESET, writable=0xFFFF)
        for off, name, bits in _PLAIN_REGISTER_WIDTHS:
            add(off, name, writable=bits)
        add(r.LEDCTL, "LEDCTL", reset=r.LEDCTL_RESET)
        add(r.PBA, "PBA", reset=r.PBA_RESET)
        add(r.MANC, "MANC", reset=r.MANC_RESET)
        for off, name in (
            (r.CTRL_EXT, "CTRL_EXT"),
            (r.FLA, "FLA"),
            (r.RXCW, "RXCW"),
            (r.RDBAH, "RDBAH"),
            (r.RXDCTL, "RXDCTL"),
            (r.RSRPD, "RSRPD"),
            (r.TXDMAC, "TXDMAC"),
            (r.TDBAH, "TDBAH"),
            (r.TXDCTL, "TXDCTL"),
            (r.TSPMT, "TSPMT"),
            (r.RXCSUM, "RXCSUM"),
            (r.WUC, "WUC"),
            (r.WUFC, "WUFC"),
            (r.WUS, "WUS"),
            (r.IPAV, "IPAV"),
            (r.WUPL, "WUPL"),
        ):
            add(off, name)
        add(r.RDBAL, "RDBAL", writable=0xFFFFFFF0)
        add(r.TDBAL, "TDBAL", writable=0xFFFFFFF0)
        add(r.RDLEN, "RDLEN", writable=0xFFF80)
        add(r.TDLEN, "TDLEN", writable=0xFFF80)
        add(r.RDH, "RDH", writable=0xFFFF)
        add(r.TDH, "TDH", writable=0xFFFF)
        add(r.RDT, "RDT", writable=0xFFFF, on_write=self._write_rdt)
        add(r.TDT, "TDT", writable=0xFFFF, on_write=self._write_tdt)
        add(r.RDTR, "RDTR", writable=0xFFFF | r.FPD, on_write=self._write_rdtr)
        add(r.TIDV, "TIDV", writable=0xFFFF | r.FPD, on_write=self._write_tidv)
        add(r.RADV, "RADV", writable=0xFFFF)
        add(r.TADV, "TADV", writable=0xFFFF)
        for i in range(4):
            add(r.IP4AT + 8 * i, f"IP4AT{i}")
            add(r.IP6AT + 4 * i, f"IP6AT{i}")
            add(r.FFLT + 8 * i, f"FFLT{i}", writable=0x7FF)
        for i in range(32):
            add(r.WUPM + 4 * i, f"WUPM{i}")
        for i in range(r.MTA_COUNT):
            add(r.MTA + 4 * i, f"MTA{i}")
        for i in range(r.VFTA_COUNT):
            add(r.VFTA + 4 * i, f"VFTA{i}")
        for i in range(r.RA_COUNT):
            add(r.RA + 8 * i, f"RAL{i}", on_write=self._ra_writer(r.RA + 8 * i))
            add(
                r.RA + 8 * i + 4,
                f"RAH{i}",
                writable=0x8003FFFF,
                on_write=self._ra_writer(r.RA + 8 * i + 4),
            )
        for off in r.STATS_OFFSETS:
            add(off, f"STAT{off:#x}", writable=0, on_read=self._stat_reader(off))

    # -- reset ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on / function-level reset: everything, PHY and EEPROM included."""
        super().reset()
        self.eeprom = eeprom.image(self.options.mac)
        self.phy.reset()
        self._timers.clear()
        self._frozen.clear()
        self._next_due = math.inf
        self._migrated_in = False
        self._reset_mac_state()

    def _mac_reset(self) -> None:
        """CTRL.RST: the MAC's registers and state; the PHY (and its autonegotiation in
        progress) and the EEPROM are not touched, as on the real part."""
        self.regs.reset()
        for name in ("itr", "rxpkt", "rxabs", "txpkt", "txabs", DMA_RETRY):
            self._disarm(name)
        self._reset_mac_state()
        self.irq.lower_intx()
        self._kick_timers()

    def _reset_mac_state(self) -> None:
        self.eecd.reset()
        self.tx.reset()
        self.rx_fifo.clear()
        self.rx_fifo_bytes = 0
        self._rnbc_noted = False
        self._set_backpressure(False)
        self._rx_delaying = self._tx_delaying = False
        self._dma_failing = False
        self._dma_retry_delay = DMA_RETRY_FIRST
        self._new_generation()
        self._load_mac_into_ra()
        self._update_link_status()

    def _new_generation(self) -> None:
        """Jobs already queued or running belong to the past: they will do nothing."""
        self._generation += 1
        self._waiting = self._running = 0
        self._tx_queued = self._rx_queued = self._timer_queued = False

    def _load_mac_into_ra(self) -> None:
        mac = eeprom.mac_of(self.eeprom)
        self.values[r.RA] = int.from_bytes(mac[:4], "little")
        self.values[r.RA + 4] = int.from_bytes(mac[4:], "little") | r.RAH_AV
        self._ra_cache = None

    def _update_link_status(self) -> None:
        status = self.values[r.STATUS] & ~r.STATUS_LU
        if self.phy.link_up:
            status |= r.STATUS_LU
        self.values[r.STATUS] = status

    # -- CTRL -------------------------------------------------------------------------------
    def _write_ctrl(self, value: int) -> None:
        if value & r.CTRL_RST:
            self._mac_reset()
            return
        before = self.values[r.CTRL]
        self.values[r.CTRL] = value
        if value & r.CTRL_PHY_RST and not before & r.CTRL_PHY_RST:
            self.phy.reset()
            self._restart_autoneg()

    # -- EEPROM -----------------------------------------------------------------------------
    def _read_eecd(self) -> int:
        return self.eecd.read(self.eeprom)

    def _write_eecd(self, value: int) -> None:
        self.eecd.write(value)

    def _write_eerd(self, value: int) -> None:
        if not value & r.EERD_START:
            self.values[r.EERD] = value
            return
        address = value >> r.EERD_ADDR_SHIFT & 0xFF
        data = self.eeprom[address] if address < eeprom.WORDS else 0
        self.values[r.EERD] = data << r.EERD_DATA_SHIFT | address << r.EERD_ADDR_SHIFT | r.EERD_DONE

    # -- PHY --------------------------------------------------------------------------------
    def _write_mdic(self, value: int) -> None:
        op = value & (r.MDIC_OP_READ | r.MDIC_OP_WRITE)
        address = value >> r.MDIC_PHY_SHIFT & 0x1F
        reg = value >> r.MDIC_REG_SHIFT & 0x1F
        result = value & ~(r.MDIC_READY | r.MDIC_ERROR)
        if address != phy.PHY_ADDRESS:
            result |= r.MDIC_ERROR
        elif op == r.MDIC_OP_READ:
            data = self.phy.read(reg)
            if data is None:
                result |= r.MDIC_ERROR
            else:
                result = (result & ~r.MDIC_DATA) | data
        elif op == r.MDIC_OP_WRITE:
            looping = self.phy.loopback
            accepted, restart = self.phy.write(reg, value & r.MDIC_DATA)
            if not accepted:
                result |= r.MDIC_ERROR
            elif restart:
                self._restart_autoneg()
            if self.phy.loopback and not looping:
                self._enter_phy_loopback()
        else:
            result |= r.MDIC_ERROR
        self.values[r.MDIC] = result | r.MDIC_READY
        if value & r.MDIC_INT_EN:
            self._cause(r.ICR_MDAC)

    def _restart_autoneg(self) -> None:
        was_up = self.phy.link_up
        self.phy.link_down()
        self._update_link_status()
        if self.options.autoneg_delay <= 0:
            self._autoneg_done()
            return
        self._arm("autoneg", self.options.autoneg_delay)
        if was_up:
            self._cause(r.ICR_LSC)

    def _enter_phy_loopback(self) -> None:
        """PHY loopback: no autonegotiation to wait for, the link is up at once (the
        driver's loopback test sends right after setting the bit)."""
        self._disarm("autoneg")
        if not self.phy.link_up:
            self.phy.loopback_link()
            self._update_link_status()
            self._cause(r.ICR_LSC)

    def _loopback(self) -> bool:
        """Whether transmitted frames come back to the receiver instead of the wire: MAC
        loopback (RCTL.LBM 01, or 11 through the transceiver) or the PHY's."""
        return bool(self.values[r.RCTL] & r.RCTL_LBM_MASK) or self.phy.loopback

    def _autoneg_done(self) -> None:
        self.phy.autoneg_done()
        self._update_link_status()
        self._cause(r.ICR_LSC)

    @property
    def link_up(self) -> bool:
        return bool(self.values[r.STATUS] & r.STATUS_LU)

    # -- interrupts -------------------------------------------------------------------------
    def _read_icr(self) -> int:
        value = self.values[r.ICR]
        self.values[r.ICR] = 0
        self._update_line()
        return value

    def _write_icr(self, value: int) -> None:  # W1C: the bank hands us what remains
        self.values[r.ICR] = value & r.ICR_VALID
        self._update_line()

    def _write_ics(self, value: int) -> None:
        self.values[r.ICS] = 0
        self._cause(value & r.ICR_VALID)

    def _write_ims(self, value: int) -> None:
        self.values[r.IMS] |= value & r.ICR_VALID
        self._update_line()

    def _write_imc(self, value: int) -> None:
        self.values[r.IMS] &= ~value
        self._update_line()

    def _write_rdtr(self, value: int) -> None:
        self.values[r.RDTR] = value & 0xFFFF
        if value & r.FPD and self._rx_delaying:
            self._rx_delay_done()

    def _write_tidv(self, value: int) -> None:
        self.values[r.TIDV] = value & 0xFFFF
        if value & r.FPD and self._tx_delaying:
            self._tx_delay_done()

    def _cause(self, bits: int, *, rx_delay: bool = False, tx_delay: bool = False) -> None:
        """Set interrupt causes; RXT0 from reception and TXDW of IDE descriptors wait for
        their delay timers before they may assert the line."""
        if not bits:
            return
        values = self.values
        values[r.ICR] |= bits
        if rx_delay and values[r.RDTR]:
            self._rx_delaying = True
            self._arm("rxpkt", values[r.RDTR] * r.DELAY_UNIT)
            if values[r.RADV] and "rxabs" not in self._timers:
                self._arm("rxabs", values[r.RADV] * r.DELAY_UNIT)
        if tx_delay and values[r.TIDV]:
            self._tx_delaying = True
            self._arm("txpkt", values[r.TIDV] * r.DELAY_UNIT)
            if values[r.TADV] and "txabs" not in self._timers:
                self._arm("txabs", values[r.TADV] * r.DELAY_UNIT)
        self._update_line()

    def _update_line(self) -> None:
        values = self.values
        pending = values[r.ICR] & values[r.IMS]
        irq = self.irq
        if not pending:
            if irq.intx_line:
                irq.lower_intx()
            return
        if irq.intx_line or self._paused:
            return
        if "itr" in self._timers:
            return  # the minimum interval since the last interrupt has not passed
        held = (r.ICR_RXT0 if self._rx_delaying else 0) | (r.ICR_TXDW if self._tx_delaying else 0)
        if not pending & ~held:
            return  # only delayed causes: their timers call back
        irq.raise_intx()
        itr = values[r.ITR] & 0xFFFF
        if itr:
            self._arm("itr", itr * r.ITR_UNIT)
        if self._rx_delaying:
            self._rx_delaying = False
            self._disarm("rxpkt")
            self._disarm("rxabs")
        if self._tx_delaying:
            self._tx_delaying = False
            self._disarm("txpkt")
            self._disarm("txabs")

    def _rx_delay_done(self) -> None:
        self._rx_delaying = False
        self._disarm("rxpkt")
        self._disarm("rxabs")
        self._update_line()

    def _tx_delay_done(self) -> None:
        self._tx_delaying = False
        self._disarm("txpkt")
        self._disarm("txabs")
        self._update_line()

    # -- statistics -------------------------------------------------------------------------
    def _stat_reader(self, offset: int) -> Callable[[], int]:
        values = self.values
        low = r.STATS_PAIRS.get(offset)

        def read() -> int:
            value = values[offset]
            values[offset] = 0
            if low is not None:
                values[low] = 0
            return value

        return read

    def _count(self, offset: int, amount: int = 1) -> None:
        values = self.values
        values[offset] = min(values[offset] + amount, 0xFFFFFFFF)

    def _count64(self, low: int, amount: int) -> None:
        values = self.values
        total = min((values[low] | values[low + 4] << 32) + amount, (1 << 64) - 1)
        values[low] = total & 0xFFFFFFFF
        values[low + 4] = total >> 32

    # -- receive address filter -------------------------------------------------------------
    def _ra_writer(self, offset: int) -> Callable[[int], None]:
        def write(value: int) -> None:
            self.values[offset] = value
            self._ra_cache = None

        return write

    def _ra_set(self) -> frozenset[bytes]:
        cache = self._ra_cache
        if cache is None:
            values = self.values
            addresses = set()
            for i in range(r.RA_COUNT):
                high = values[r.RA + 8 * i + 4]
                if high & r.RAH_AV:
                    low = values[r.RA + 8 * i]
                    addresses.add(low.to_bytes(4, "little") + (high & 0xFFFF).to_bytes(2, "little"))
            cache = self._ra_cache = frozenset(addresses)
        return cache

    # =========================================================================================
    # Timers and jobs

    def _arm(self, name: str, delay: float) -> None:
        if self._paused:
            self._frozen[name] = max(delay, 0.0)
            return
        when = self._clock() + delay
        self._timers[name] = when
        self._next_due = min(self._next_due, when)
        self._kick_timers()

    def _disarm(self, name: str) -> None:
        self._frozen.pop(name, None)
        if self._timers.pop(name, None) is not None:
            self._next_due = min(self._timers.values(), default=math.inf)

    def _poll_timers(self) -> None:
        if not self._timers or self._clock() < self._next_due:
            return
        now = self._clock()
        due = sorted((when, name) for name, when in self._timers.items() if when <= now)
        for _, name in due:
            del self._timers[name]
        self._next_due = min(self._timers.values(), default=math.inf)
        for _, name in due:
            self._fire(name)

    def _fire(self, name: str) -> None:
        if name == "autoneg":
            self._autoneg_done()
        elif name == "itr":
            self._update_line()
        elif name in ("rxpkt", "rxabs"):
            self._rx_delay_done()
        elif name in ("txpkt", "txabs"):
            self._tx_delay_done()
        elif name == DMA_RETRY:
            self._kick_tx(doorbell=False)
            self._kick_rx()
        elif name == ANNOUNCE:
            self._announce()

    def _dma_failed(self, what: str, index: int, exc: DeviceError) -> None:
        """A transmit or receive job stopped at a DMA fault, its work left in place: try
        again after a while (backing off), logging once until DMA works again."""
        if not self._dma_failing:
            log.warning("e1000: %s DMA failed at %d: %s (retrying)", what, index, exc)
            self._dma_failing = True
        if DMA_RETRY not in self._timers and DMA_RETRY not in self._frozen:
            self._arm(DMA_RETRY, self._dma_retry_delay)
            self._dma_retry_delay = min(2 * self._dma_retry_delay, DMA_RETRY_MAX)

    def _dma_worked(self) -> None:
        if self._dma_failing:
            self._dma_failing = False
            self._dma_retry_delay = DMA_RETRY_FIRST

    def _submit(self, work: Callable[[int], Awaitable[None]]) -> bool:
        generation = self._generation

        async def job() -> None:
            if generation != self._generation:
                return
            self._waiting -= 1
            self._running += 1
            try:
                await work(generation)
            finally:
                if generation == self._generation:
                    self._running -= 1

        if not self.context.submit(job):
            return False
        self._waiting += 1
        return True

    def _kick_timers(self) -> None:
        if self._timer_queued or not self._timers or self._paused:
            return
        generation = self._generation

        async def job() -> None:
            if generation == self._generation:
                await self._timer_job(generation)

        self._timer_queued = self.context.submit(job)

    async def _timer_job(self, generation: int) -> None:
        self._timer_queued = False
        self._poll_timers()
        if self._paused or not self._timers:
            return
        if not self._waiting:
            # Nothing else to do: sleep towards the next deadline. Jobs run one at a time,
            # so the sleep ends as soon as other work (a doorbell, a frame) is submitted:
            # that work runs first, this job queues again behind it.
            wait = self._next_due - self._clock()
            if wait > 0:
                await self.context.sleep_until_work(wait)
            if generation != self._generation:
                return
            self._poll_timers()
        self._kick_timers()  # behind whatever was queued meanwhile

    # =========================================================================================
    # Transmit

    def _write_tctl(self, value: int) -> None:
        self.values[r.TCTL] = value
        self._kick_tx()

    def _write_tdt(self, value: int) -> None:
        self.values[r.TDT] = value
        self._kick_tx()

    def _kick_tx(self, *, doorbell: bool = True) -> None:
        values = self.values
        if self._tx_queued or self._paused or not values[r.TCTL] & r.TCTL_EN:
            return
        if values[r.TDH] == values[r.TDT]:
            if doorbell:
                self._cause(r.ICR_TXQE)  # kicked with nothing to send: the queue is empty
            return
        self._tx_queued = self._submit(self._tx_job)

    async def _tx_job(self, generation: int) -> None:
        self._tx_queued = False
        values = self.values
        count_total = values[r.TDLEN] // r.DESC_SIZE
        base = (values[r.TDBAH] << 32 | values[r.TDBAL]) & ~0xF
        progress = _Progress()
        yielded = False
        while not self._paused and values[r.TCTL] & r.TCTL_EN:
            head, tail = values[r.TDH], values[r.TDT]
            if head == tail or head >= count_total or tail >= count_total:
                break
            count = min((tail - head) % count_total, count_total - head, TX_BATCH)
            try:
                moved = await self._tx_batch(
                    generation, base, head, count, count_total=count_total, progress=progress
                )
            except DeviceError as exc:
                self._dma_failed("transmit", head, exc)
                break
            if not moved:
                return  # reset, reloaded or detached meanwhile
            if self._waiting:
                yielded = True  # let queued work (receive) run first: see _rx_job
                break
        self._tx_causes(progress)
        if yielded:
            self._kick_tx(doorbell=False)  # the rest, behind what was queued meanwhile

    async def _tx_batch(
        self,
        generation: int,
        base: int,
        head: int,
        count: int,
        *,
        count_total: int,
        progress: _Progress,
    ) -> bool:
        """Move ``count`` descriptors from ``head``; False when the device was reset meanwhile.

        Exactly once across a disconnect: the connection cancels the job at any await. The
        descriptors and buffers are read into a copy of the assembler (nothing the guest or
        the wire sees); the DD write-back is the only await with an effect, and the commit
        (frames on the wire, the assembler, TDH) follows it with no await in between. A job
        cancelled before the write-back left no trace: the next one redoes the batch from
        the same TDH. Cancelled during the write-back, the DD bits have landed (the runtime
        moves a write's bytes before its await can be cancelled), so the batch commits
        before the cancellation goes on."""
        dma = self.context.dma
        raw = await dma.read(base + head * r.DESC_SIZE, count * r.DESC_SIZE)
        if generation != self._generation:
            return False
        stage = _TxStage(self.tx.copy(), count, (head + count) % count_total)
        writeback: bytearray | None = None
        for i in range(count):
            address, lower, upper = r.DESC.unpack_from(raw, i * r.DESC_SIZE)
            cmd = lower >> 24
            await self._tx_descriptor(stage, address, lower, upper, cmd)
            if generation != self._generation:
                return False
            if cmd & (r.TXD_CMD_RS | r.TXD_CMD_RPS):
                if writeback is None:
                    writeback = bytearray(raw)
                writeback[i * r.DESC_SIZE + 12] |= r.TXD_STAT_DD
                stage.report = True
                stage.delay = stage.delay or bool(cmd & r.TXD_CMD_IDE)
        commit = functools.partial(self._tx_commit, stage, progress)
        if writeback is None:
            commit()
            return True
        return await self._write_back_and_commit(
            generation,
            base + head * r.DESC_SIZE,
            writeback,
            commit=commit,
            causes=functools.partial(self._tx_causes, progress),
        )

    def _tx_commit(self, stage: _TxStage, progress: _Progress) -> None:
        """A batch's effects, all at once (no await may split them)."""
        self._dma_worked()
        self.tx = stage.tx
        for _ in range(stage.tso_contexts):
            self._count(r.TSCTC)
        for frame in stage.frames:
            self._send(frame)
        self.values[r.TDH] = stage.next_head
        progress.moved += stage.count
        progress.report = progress.report or stage.report
        progress.delay = progress.delay or stage.delay

    def _tx_causes(self, progress: _Progress) -> None:
        if not progress.moved:
            return
        values = self.values
        causes = r.ICR_TXDW if progress.report else 0
        if values[r.TDH] == values[r.TDT]:
            causes |= r.ICR_TXQE
        self._cause(causes, tx_delay=progress.delay)

    async def _tx_descriptor(
        self, stage: _TxStage, address: int, lower: int, upper: int, cmd: int
    ) -> None:
        """Read one descriptor's buffer into ``stage`` (its assembler and frames)."""
        values = self.values
        vlan_enabled = bool(values[r.CTRL] & r.CTRL_VME)
        if lower & r.TXD_CMD_DEXT << 24:
            dtyp = lower >> 20 & 0xF
            if dtyp == r.TXD_DTYP_CONTEXT:
                stage.tx.context(address, lower, upper)
                if cmd & r.TUCMD_TSE:
                    stage.tso_contexts += 1
                return
            if dtyp != r.TXD_DTYP_DATA:
                return  # reserved descriptor type: skipped
            length = lower & 0xFFFFF
            payload = await self.context.dma.read(address, length) if length else b""
            frames = stage.tx.add(
                payload,
                cmd=cmd,
                extended=True,
                popts=upper >> 8 & 0xFF,
                special=upper >> 16,
                vlan_enabled=vlan_enabled,
            )
        else:
            length = lower & 0xFFFF
            payload = await self.context.dma.read(address, length) if length else b""
            frames = stage.tx.add(
                payload,
                cmd=cmd,
                extended=False,
                special=upper >> 16,
                legacy_cso=lower >> 16 & 0xFF,
                legacy_css=upper >> 8 & 0xFF,
                vlan_enabled=vlan_enabled,
            )
        stage.frames.extend(frames)

    def _send(self, tx_frame: packet.TxFrame) -> None:
        values = self.values
        frame = tx_frame.data
        if tx_frame.vlan is not None:
            frame = packet.insert_vlan(frame, values[r.VET] & 0xFFFF, tx_frame.vlan)
        if values[r.TCTL] & r.TCTL_PSP and len(frame) < packet.MIN_FRAME:
            frame += bytes(packet.MIN_FRAME - len(frame))
        looped = self._loopback()
        if not looped and not self.link_up:
            return  # no carrier: the frame goes nowhere
        wire = len(frame) + 4  # statistics count the FCS
        self._count(r.TPT)
        self._count(r.GPTC)
        self._count64(r.TOTL, wire)
        self._count64(r.GOTCL, wire)
        self._count(r.TX_SIZE_BUCKETS[packet.size_bucket(wire)])
        if frame[0] & 1:
            self._count(r.BPTC if frame[:6] == b"\xff" * 6 else r.MPTC)
        if looped:
            self._receive(bytes(frame))  # back to our own receiver, nothing on the wire
        else:
            self.port.transmit(bytes(frame))

    # =========================================================================================
    # Receive

    def attach_net(self, port: NetPort) -> None:
        self.port = port
        if self._paused:
            port.set_accepting(False)

    def net_receive(self, frame: bytes) -> None:
        """A frame from the wire: heard only with the link up and not in loopback."""
        if self.link_up and not self._loopback():
            self._receive(frame)

    def _receive(self, frame: bytes) -> None:
        values = self.values
        rctl = values[r.RCTL]
        length = len(frame)
        if not rctl & r.RCTL_EN or length < packet.ETH_HEADER:
            return
        self._count(r.TPR)
        self._count64(r.TORL, max(length, packet.MIN_FRAME) + 4)
        if not self._accept(frame, rctl):
            return
        tagged = (frame[12] << 8 | frame[13]) == values[r.VET] & 0xFFFF
        limit = MAX_LONG_FRAME if rctl & r.RCTL_LPE else MAX_FRAME + (4 if tagged else 0)
        if length > limit:
            self._count(r.ROC)
            return
        if length < packet.MIN_FRAME:
            frame = frame + bytes(packet.MIN_FRAME - length)
        if self.rx_fifo_bytes + len(frame) > self._rx_fifo_limit():
            if self._ring_outrun(frame) or self.rx_fifo_bytes > 2 * self._rx_fifo_limit():
                self._count(r.MPC)  # overrun: the guest's ring cannot take what waits
                self._cause(r.ICR_RXO)
                return
            # The ring has room: only our DMA is behind (the hardware's would not be).
            # Keep the frame and have the wire hold the next ones until the FIFO drains.
            self._set_backpressure(True)
        self.rx_fifo.append(frame)
        self.rx_fifo_bytes += len(frame)
        self._kick_rx()

    def _rx_fifo_limit(self) -> int:
        return max((self.values[r.PBA] & 0xFFFF) * 1024, MAX_LONG_FRAME)

    def _ring_outrun(self, frame: bytes) -> bool:
        """Whether the FIFO's frames and ``frame`` need more descriptors than the guest has
        given the device (the FIFO overflows on the real part only then)."""
        values = self.values
        count_total = values[r.RDLEN] // r.DESC_SIZE
        head, tail = values[r.RDH], values[r.RDT]
        if not count_total or head >= count_total or tail >= count_total:
            return True
        available = (tail - head) % count_total
        size = self._rx_buffer_size(values[r.RCTL])
        extra = 0 if values[r.RCTL] & r.RCTL_SECRC else 4
        needed = sum(-(-(len(f) + extra) // size) for f in (*self.rx_fifo, frame))
        return needed > available

    def _set_backpressure(self, on: bool) -> None:
        if self._backpressure != on:
            self._backpressure = on
            if not self._paused:
                self.port.set_accepting(not on)

    def _accept(self, frame: bytes, rctl: int) -> bool:
        values = self.values
        if (
            rctl & r.RCTL_VFE
            and len(frame) >= 16
            and (frame[12] << 8 | frame[13]) == values[r.VET] & 0xFFFF
        ):
            vid = (frame[14] << 8 | frame[15]) & 0xFFF
            if not values[r.VFTA + 4 * (vid >> 5)] >> (vid & 31) & 1:
                return False
        dst = frame[:6]
        multicast = frame[0] & 1
        if multicast:
            if rctl & r.RCTL_MPE:
                return True
            if rctl & r.RCTL_BAM and dst == b"\xff" * 6:
                return True
        elif rctl & r.RCTL_UPE:
            return True
        if dst in self._ra_set():
            return True
        if not multicast:
            return False
        mo = (rctl & r.RCTL_MO_MASK) >> r.RCTL_MO_SHIFT
        shift = (4, 3, 2, 0)[mo]
        hashed = (frame[4] >> shift | frame[5] << (8 - shift)) & 0xFFF
        return bool(values[r.MTA + 4 * (hashed >> 5)] >> (hashed & 31) & 1)

    def _write_rctl(self, value: int) -> None:
        self.values[r.RCTL] = value
        if not value & r.RCTL_EN and self.rx_fifo:
            self.rx_fifo.clear()  # receiver off: what it held is gone
            self.rx_fifo_bytes = 0
            self._rnbc_noted = False
            self._set_backpressure(False)
        self._kick_rx()

    def _write_rdt(self, value: int) -> None:
        self.values[r.RDT] = value
        self._kick_rx()

    def _kick_rx(self) -> None:
        if self._rx_queued or self._paused or not self.rx_fifo:
            return
        self._rx_queued = self._submit(self._rx_job)

    @staticmethod
    def _rx_buffer_size(rctl: int) -> int:
        code = (rctl & r.RCTL_BSIZE_MASK) >> r.RCTL_BSIZE_SHIFT
        if rctl & r.RCTL_BSEX and code:
            return (0, 16384, 8192, 4096)[code]
        return (2048, 1024, 512, 256)[code]

    def _rx_prepare(self, frame: bytes) -> tuple[bytes, int, int, int, int]:
        """(bytes to store, status, errors, checksum, special) for a FIFO frame."""
        values = self.values
        status = errors = special = 0
        data = frame
        vet = values[r.VET] & 0xFFFF
        l3 = packet.ETH_HEADER
        if (frame[12] << 8 | frame[13]) == vet:
            if values[r.CTRL] & r.CTRL_VME:
                special = frame[14] << 8 | frame[15]
                status |= r.RXD_STAT_VP
                data = frame[:12] + frame[16:]
            else:
                l3 += 4
        csum_status, errors, csum = packet.rx_checksum(data, values[r.RXCSUM], l3)
        status |= csum_status
        if not values[r.RCTL] & r.RCTL_SECRC:
            data = data + (zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "little")
        return data, status, errors, csum, special

    async def _rx_job(self, generation: int) -> None:
        self._rx_queued = False
        values = self.values
        progress = _Progress()
        fifo = self.rx_fifo
        while fifo and not self._paused and values[r.RCTL] & r.RCTL_EN:
            count_total = values[r.RDLEN] // r.DESC_SIZE
            head, tail = values[r.RDH], values[r.RDT]
            available = (tail - head) % count_total if count_total else 0
            if not available or head >= count_total or tail >= count_total:
                self._no_buffer()
                break
            base = (values[r.RDBAH] << 32 | values[r.RDBAL]) & ~0xF
            try:
                used = await self._rx_batch(
                    generation, base, head, available, count_total=count_total, progress=progress
                )
            except DeviceError as exc:
                self._dma_failed("receive", head, exc)  # the frame stays at the FIFO head
                break
            if used is None:
                return  # reset, reloaded or detached meanwhile
            if not used:
                if fifo:
                    self._no_buffer()  # the frame at the head needs more descriptors
                break
            if self._waiting and fifo:
                # Transmit and receive are separate engines on the real part: while
                # frames keep arriving, a receive job that ran until the FIFO is empty
                # would starve the transmit job queued behind it (and the reverse), so
                # each goes to the back of the queue after a batch when work waits.
                self._kick_rx()
                break
        self._rx_causes(progress)

    def _rx_causes(self, progress: _Progress) -> None:
        values = self.values
        if self._backpressure and self.rx_fifo_bytes <= self._rx_fifo_limit() // 2:
            self._set_backpressure(False)
        if progress.moved:
            causes = r.ICR_RXT0
            count_total = values[r.RDLEN] // r.DESC_SIZE
            if count_total:
                free = (values[r.RDT] - values[r.RDH]) % count_total
                shift = ((values[r.RCTL] & r.RCTL_RDMTS_MASK) >> r.RCTL_RDMTS_SHIFT) + 1
                if free <= count_total >> shift:
                    causes |= r.ICR_RXDMT0
            self._cause(causes, rx_delay=True)

    async def _rx_batch(
        self,
        generation: int,
        base: int,
        head: int,
        available: int,
        *,
        count_total: int,
        progress: _Progress,
    ) -> int | None:
        """Fill up to RX_BATCH descriptors from ``head`` with FIFO frames; returns the
        descriptors used, None when the device was reset meanwhile.

        Exactly once across a disconnect (the connection cancels the job at any await):
        the frames stay in the FIFO, and RDH where it is, while their buffers are written;
        the write-back of the descriptors from RDH (the guest's next to read) is the last
        await, and the commit (frames off the FIFO, RDH) follows it with no await in
        between. Cancelled before it, the next job writes the same frames into the same
        buffers and descriptors again (the guest saw no DD at RDH, so read nothing).
        Cancelled during it, the descriptors have landed (the runtime moves a write's
        bytes before its await can be cancelled): the batch commits before the
        cancellation goes on."""
        dma = self.context.dma
        fifo = self.rx_fifo
        batch = min(available, RX_BATCH)
        size = self._rx_buffer_size(self.values[r.RCTL])
        addresses = await self._rx_buffers(base, head, batch, count_total)
        if generation != self._generation:
            return None
        used = 0
        frames: list[bytes] = []
        writebacks: list[tuple[int, bytes]] = []
        while len(frames) < len(fifo) and not self._paused:
            frame = fifo[len(frames)]
            data, status, errors, csum, special = self._rx_prepare(frame)
            need = -(-len(data) // size)
            if need > batch - used:
                if need >= count_total and not frames:
                    self._drop_head(frame)  # can never fit this ring
                    continue
                break
            for k in range(need):
                chunk = data[k * size : (k + 1) * size]
                index = used + k
                await dma.write(addresses[index], chunk)
                if generation != self._generation:
                    return None
                last = k == need - 1
                desc = r.RX_DESC.pack(
                    addresses[index],
                    len(chunk),
                    csum if last else 0,
                    r.RXD_STAT_DD | (r.RXD_STAT_EOP | status if last else 0),
                    errors if last else 0,
                    special if last else 0,
                )
                writebacks.append(((head + index) % count_total, desc))
            used += need
            frames.append(frame)
        if not frames:
            return 0
        runs = self._descriptor_runs(writebacks)
        for run_start, run in runs[:-1]:  # the ring wrapped: the part from index 0
            await dma.write(base + run_start * r.DESC_SIZE, run)
            if generation != self._generation:
                return None
        run_start, run = runs[-1]
        commit = functools.partial(self._rx_commit, frames, head, used, count_total, progress)
        address = base + run_start * r.DESC_SIZE
        if await self._write_back_and_commit(
            generation,
            address,
            run,
            commit=commit,
            causes=functools.partial(self._rx_causes, progress),
        ):
            return used
        return None

    async def _write_back_and_commit(
        self,
        generation: int,
        address: int,
        descriptors: Buffer,
        *,
        commit: Callable[[], None],
        causes: Callable[[], None],
    ) -> bool:
        """A batch's last await, the descriptor write-back, then its commit with no await
        in between; False when the device was reset meanwhile (nothing to commit).
        Cancelled during the write, the descriptors have landed (the runtime moves a
        write's bytes before its await can be cancelled): the batch commits, and raises
        its interrupt causes (the job that would have raised them is ending), before the
        cancellation goes on. A write refused before a byte moved commits nothing."""
        try:
            await self.context.dma.write(address, descriptors)
        except DeviceError:
            raise
        except BaseException:
            if generation == self._generation:
                commit()
                causes()
            raise
        if generation != self._generation:
            return False
        commit()
        return True

    def _rx_commit(
        self, frames: list[bytes], head: int, used: int, count_total: int, progress: _Progress
    ) -> None:
        """A batch's effects, all at once (no await may split them)."""
        self._dma_worked()
        fifo = self.rx_fifo
        for frame in frames:
            # The guest may have turned the receiver off meanwhile, clearing the FIFO: the
            # frames are in its ring all the same, only what is still queued leaves it.
            if fifo and fifo[0] is frame:
                fifo.popleft()
                self.rx_fifo_bytes -= len(frame)
                self._rnbc_noted = False
            self._count_received(frame)
        self.values[r.RDH] = (head + used) % count_total
        progress.moved += len(frames)

    def _no_buffer(self) -> None:
        """A frame waits in the FIFO with no descriptor for it (counted once per frame)."""
        if not self._rnbc_noted:
            self._rnbc_noted = True
            self._count(r.RNBC)

    def _drop_head(self, frame: bytes) -> None:
        self.rx_fifo.popleft()
        self.rx_fifo_bytes -= len(frame)
        self._rnbc_noted = False
        self._count(r.RLEC)

    async def _rx_buffers(self, base: int, head: int, count: int, total: int) -> list[int]:
        """Buffer addresses of ``count`` descriptors from ``head`` (wrapping)."""
        dma = self.context.dma
        first = min(count, total - head)
        raw = await dma.read(base + head * r.DESC_SIZE, first * r.DESC_SIZE)
        if count > first:
            raw += await dma.read(base, (count - first) * r.DESC_SIZE)
        return [struct.unpack_from("<Q", raw, i * r.DESC_SIZE)[0] for i in range(count)]

    @staticmethod
    def _descriptor_runs(writebacks: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """Descriptors to write back as (first index, bytes) runs of consecutive indices,
        the run holding the first descriptor last: the guest reads the ring in order from
        there, so runs written before it show the guest nothing (see _rx_batch)."""
        runs: list[tuple[int, list[bytes]]] = []
        for index, desc in writebacks:
            if runs and index == runs[-1][0] + len(runs[-1][1]):
                runs[-1][1].append(desc)
            else:
                runs.append((index, [desc]))
        return [(start, b"".join(run)) for start, run in reversed(runs)]

    def _count_received(self, frame: bytes) -> None:
        wire = len(frame) + 4
        self._count(r.GPRC)
        self._count64(r.GORCL, wire)
        self._count(r.RX_SIZE_BUCKETS[packet.size_bucket(wire)])
        if frame[0] & 1:
            self._count(r.BPRC if frame[:6] == b"\xff" * 6 else r.MPRC)

    # =========================================================================================
    # Life cycle

    def on_attach(self) -> None:
        self._new_generation()
        self._kick_timers()
        # Work the previous client's disconnect cut short (its job was cancelled before it
        # committed, see _tx_batch and _rx_batch) runs again for this one. (While stopped,
        # resume does it on the way back to RUNNING.)
        self._kick_tx(doorbell=False)
        self._kick_rx()

    def on_detach(self) -> None:
        self._new_generation()

    def pause(self) -> None:
        if self._paused:
            return
        now = self._clock()
        self._frozen.update({name: max(when - now, 0.0) for name, when in self._timers.items()})
        self._timers.clear()
        self._next_due = math.inf
        self._paused = True
        if not self._backpressure:
            self.port.set_accepting(False)

    def resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        now = self._clock()
        for name, remaining in self._frozen.items():
            self._timers[name] = now + remaining
        self._frozen.clear()
        self._next_due = min(self._timers.values(), default=math.inf)
        self._backpressure = self.rx_fifo_bytes > self._rx_fifo_limit()
        if not self._backpressure:
            self.port.set_accepting(True)
        self._poll_timers()
        self._kick_timers()
        self._kick_tx(doorbell=False)
        self._kick_rx()
        self._update_line()
        if self._migrated_in:
            self._migrated_in = False
            self._announce_round = 0
            self._announce()

    def _announce(self) -> None:
        """One round of the announcement a NIC that migrated in sends, as QEMU's
        announce-self does for its own NICs (which it cannot do for ours): a gratuitous
        RARP from the station address (RA[0], which the driver programs; the EEPROM's if
        it did not), so that switches learn the NIC's new port at once. Straight to the
        wire, as QEMU sends it: the guest's statistics do not count it. A round finding
        the link down (or in loopback) sends nothing."""
        if self.link_up and not self._loopback():
            rah = self.values[r.RA + 4]
            if rah & r.RAH_AV:
                mac = self.values[r.RA].to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little")
            else:
                mac = eeprom.mac_of(self.eeprom)
            self.port.transmit(announcement(mac))
        self._announce_round += 1
        if self._announce_round < len(ANNOUNCE_DELAYS):
            self._arm(ANNOUNCE, ANNOUNCE_DELAYS[self._announce_round])

    @property
    def idle(self) -> bool:
        """No transmit or receive work queued (tests wait for this)."""
        return not (self._tx_queued or self._rx_queued or self._waiting or self._running)

    # =========================================================================================
    # Migration
    #
    # Sections: "e1000.regs" (offset u32, value u32 for every register), "e1000.eeprom"
    # (64 u16), "e1000.phy" (32 u16), "e1000.eecd" (Microwire state), "e1000.tx" (context and
    # partial packet, packet.TxAssembler.pack), "e1000.rx" (count u32, then length u32 and
    # bytes of every FIFO frame), "e1000.misc" (IOADDR, delay flags, RNBC flag, remaining ns
    # of each timer in TIMER_NAMES or -1).

    _REG_ENTRY = struct.Struct("<II")

    def _timer_remaining(self) -> dict[str, float]:
        if self._paused:
            return dict(self._frozen)
        now = self._clock()
        return {name: max(when - now, 0.0) for name, when in self._timers.items()}

    def save_state(self) -> list[Section]:
        entries = sorted(self.values.items())
        regs_blob = b"".join(self._REG_ENTRY.pack(off, value) for off, value in entries)
        rx: list[Buffer] = [struct.pack("<I", len(self.rx_fifo))]
        for frame in self.rx_fifo:
            rx.append(struct.pack("<I", len(frame)))
            rx.append(frame)
        remaining = self._timer_remaining()
        timers = [round(remaining[name] * 1e9) if name in remaining else -1 for name in TIMER_NAMES]
        misc = _MISC.pack(
            self.io.ioaddr, self._rx_delaying, self._tx_delaying, self._rnbc_noted, *timers
        )
        return [
            ("e1000.regs", regs_blob),
            ("e1000.eeprom", struct.pack(f"<{eeprom.WORDS}H", *self.eeprom)),
            ("e1000.phy", self.phy.pack()),
            ("e1000.eecd", self.eecd.pack()),
            ("e1000.tx", self.tx.pack()),
            ("e1000.rx", rx),
            ("e1000.misc", misc),
        ]

    def migration_size_estimate(self) -> int:
        return (
            8 * len(self.values)
            + self.rx_fifo_bytes
            + 8 * len(self.rx_fifo)
            + (len(self.tx.data) + len(self.tx.segment) + 512)
        )

    def load_state(self, sections: Sequence[LoadedSection]) -> None:
        """Validate every section, then apply; any defect: EINVAL and nothing changed."""
        try:
            parsed = self._parse_state(sections)
        except (ValueError, struct.error) as exc:
            raise DeviceError(errno.EINVAL, f"e1000 state: {exc}") from None
        values, words, phy_regs, eecd, tx, fifo, misc = parsed
        ioaddr, rx_delaying, tx_delaying, rnbc_noted, timers = misc
        self.values.update(values)
        self.eeprom = words
        self.phy.regs = phy_regs
        self.eecd = eecd
        self.tx = tx
        self.rx_fifo = deque(fifo)
        self.rx_fifo_bytes = sum(len(frame) for frame in fifo)
        self._rnbc_noted = rnbc_noted
        self.io.ioaddr = ioaddr
        self._rx_delaying, self._tx_delaying = rx_delaying, tx_delaying
        self._ra_cache = None
        self._new_generation()
        self._timers.clear()
        self._next_due = math.inf
        self._frozen = timers
        self._migrated_in = True
        if not self._paused:  # loaded into a running device (not the engine's way)
            self._paused = True
            self.resume()

    def _parse_state(
        self, sections: Sequence[LoadedSection]
    ) -> tuple[
        dict[int, int],
        list[int],
        list[int],
        eeprom.Microwire,
        packet.TxAssembler,
        list[bytes],
        tuple[int, bool, bool, bool, dict[str, float]],
    ]:
        by_name: dict[str, memoryview] = {}
        for name, payload in sections:
            if name in by_name:
                raise ValueError(f"section {name!r} repeated")
            by_name[name] = memoryview(payload).cast("B")
        expected = {
            "e1000.regs",
            "e1000.eeprom",
            "e1000.phy",
            "e1000.eecd",
            "e1000.tx",
            "e1000.rx",
            "e1000.misc",
        }
        if set(by_name) != expected:
            missing = sorted(expected - set(by_name))
            unknown = sorted(set(by_name) - expected)
            raise ValueError(f"sections missing {missing}, unknown {unknown}")
        values = self._parse_regs(by_name["e1000.regs"])
        raw_words = by_name["e1000.eeprom"]
        if len(raw_words) != 2 * eeprom.WORDS:
            raise ValueError("EEPROM section of the wrong size")
        words = list(struct.unpack(f"<{eeprom.WORDS}H", raw_words))
        if not eeprom.checksum_ok(words):
            raise ValueError("EEPROM checksum is not 0xBABA")
        mac = eeprom.mac_of(words)
        if mac[0] & 1:
            raise ValueError("EEPROM MAC address is multicast")
        phy_regs = phy.Phy.unpack(by_name["e1000.phy"])
        eecd = eeprom.Microwire.unpack(by_name["e1000.eecd"])
        tx = packet.TxAssembler.unpack(by_name["e1000.tx"])
        fifo = self._parse_fifo(by_name["e1000.rx"], values)
        misc = self._parse_misc(by_name["e1000.misc"])
        link = bool(phy_regs[phy.BMSR] & phy.BMSR_LINK)
        if bool(values[r.STATUS] & r.STATUS_LU) != link:
            raise ValueError("STATUS.LU disagrees with the PHY's link state")
        if "autoneg" in misc[4] and link:
            raise ValueError("autonegotiation pending while the link is up")
        return values, words, phy_regs, eecd, tx, fifo, misc

    def _parse_regs(self, data: memoryview) -> dict[int, int]:
        known = {reg.offset: reg for reg in self.regs.registers()}
        if len(data) != self._REG_ENTRY.size * len(known):
            raise ValueError(f"register section of {len(data)} bytes")
        values = dict(self._REG_ENTRY.iter_unpack(data))
        if set(values) != set(known):
            raise ValueError("register section names unknown or missing registers")
        for offset, reg in known.items():
            # Registers the guest writes hold only writable bits (handlers store what
            # they are given; the internal ones are checked below).
            if reg.on_write is None and reg.writable and values[offset] & ~reg.writable:
                raise ValueError(f"{reg.name} = {values[offset]:#x} has read-only bits set")
        for offset, mask in (
            (r.TDT, 0xFFFF),
            (r.RDT, 0xFFFF),
            (r.RDTR, 0xFFFF),
            (r.TIDV, 0xFFFF),
            (r.ICS, 0),
            (r.RCTL, r.RCTL_WRITABLE),
            (r.TCTL, r.TCTL_WRITABLE),
            (r.ICR, r.ICR_VALID),
            (r.IMS, r.ICR_VALID),
        ):
            if values[offset] & ~mask:
                raise ValueError(f"register {offset:#x} = {values[offset]:#x} out of range")
        if values[r.CTRL] & r.CTRL_RST:
            raise ValueError("CTRL.RST is self-clearing")
        if values[r.STATUS] & ~r.STATUS_LU != r.STATUS_BASE:
            raise ValueError("STATUS holds bits this model never sets")
        if values[r.EECD]:
            raise ValueError("EECD lives in the EECD section")
        for offset in range(r.RA + 4, r.RA + 8 * r.RA_COUNT, 8):
            if values[offset] & ~0x8003FFFF:
                raise ValueError("RAH with reserved bits")
        return values

    def _parse_fifo(self, data: memoryview, values: dict[int, int]) -> list[bytes]:
        if len(data) < 4:
            raise ValueError("receive FIFO section too short")
        (count,) = struct.unpack_from("<I", data)
        limit = max((values[r.PBA] & 0xFFFF) * 1024, MAX_LONG_FRAME)
        frames: list[bytes] = []
        pos, total = 4, 0
        for _ in range(count):
            if pos + 4 > len(data):
                raise ValueError("receive FIFO section truncated")
            (length,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if not packet.MIN_FRAME <= length <= MAX_LONG_FRAME or pos + length > len(data):
                raise ValueError(f"receive FIFO frame of {length} bytes")
            frames.append(bytes(data[pos : pos + length]))
            pos += length
            total += length
            if total > 2 * limit + MAX_LONG_FRAME:  # see net_receive: the hard bound
                raise ValueError("receive FIFO holds more than the packet buffer")
        if pos != len(data):
            raise ValueError("receive FIFO section has trailing bytes")
        return frames

    @staticmethod
    def _parse_misc(data: memoryview) -> tuple[int, bool, bool, bool, dict[str, float]]:
        if len(data) != _MISC.size:
            raise ValueError(f"misc section of {len(data)} bytes")
        ioaddr, rx_delaying, tx_delaying, rnbc_noted, *times = _MISC.unpack(data)
        if max(rx_delaying, tx_delaying, rnbc_noted) > 1:
            raise ValueError("misc flags out of range")
        timers: dict[str, float] = {}
        for name, ns in zip(TIMER_NAMES, times, strict=True):
            if ns == -1:
                continue
            if not 0 <= ns <= MAX_TIMER_NS * 11:
                raise ValueError(f"timer {name} of {ns} ns")
            timers[name] = ns / 1e9
        if rx_delaying != ("rxpkt" in timers or "rxabs" in timers):
            raise ValueError("receive interrupt delay flag without its timers")
        if tx_delaying != ("txpkt" in timers or "txabs" in timers):
            raise ValueError("transmit interrupt delay flag without its timers")
        return ioaddr, bool(rx_delaying), bool(tx_delaying), bool(rnbc_noted), timers
