"""``e1000``: an Intel 82540EM Gigabit Ethernet controller (PCI 8086:100E), as Linux's
``e1000`` driver drives it.

Layout:

* BAR0: 128 KiB of MMIO registers (``regs``); BAR1: 64 bytes of I/O space with IOADDR
  (offset 0) selecting a BAR0 register and IODATA (offset 4) accessing it; INTx only.
* EEPROM (64 words, MAC in words 0-2, sum 0xBABA) through EECD Microwire bit-banging and
  EERD; the PHY (address 1) through MDIC, with autonegotiation that completes after
  ``autoneg_delay`` (default: at once, see :data:`DEFAULT_AUTONEG_DELAY`) and raises LSC.
* After a migration the NIC announces its MAC on the wire (a gratuitous RARP, as QEMU's
  announce-self does for its own NICs), so that switches learn its new port at once.
* Interrupts and their mitigation: :mod:`devices.e1000.interrupts`.
* Transmit: :mod:`devices.e1000.tx`; receive: :mod:`devices.e1000.rx`.
* Loopback (what Linux's ``ethtool -t`` loopback test uses): MAC loopback (RCTL.LBM) or PHY
  loopback (BMCR bit 14) hands every transmitted frame to the receiver instead of the
  wire, and frames from the wire are not heard meanwhile.
* Timers, jobs and the exactly-once commit across a disconnect: :mod:`devices.e1000.jobs`;
  statistics: :mod:`devices.e1000.stats`; migration: :mod:`devices.e1000.state`.

:class:`E1000` is the device: PCI identity, the register map (which register is whose), the
CTRL/EEPROM/PHY/link registers, the life cycle (reset, attach, pause/resume) and the wiring
of its parts. The parts are objects it composes, not mixins: each owns its own state (the
FIFO is the receiver's, the assembler the transmitter's, the delay flags the interrupt
logic's), they share the register file ``values`` and the :class:`~devices.e1000.jobs.Jobs`
and :class:`~devices.e1000.interrupts.Interrupts` objects they are handed, and none imports
this module; a call such as ``self.interrupts.cause(...)`` says whose rule applies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from devices.api import Device, Region, RegisterBank
from devices.e1000 import eeprom, phy, state
from devices.e1000 import regs as r
from devices.e1000.interrupts import Interrupts
from devices.e1000.jobs import DMA_RETRY, Jobs, Timers
from devices.e1000.rx import Receiver
from devices.e1000.stats import Statistics
from devices.e1000.tx import Transmitter
from devices.irq import InterruptController
from devices.migration.stream import LoadedSection, Section
from devices.net import ANNOUNCE_DELAYS, DetachedPort, NetPort, announcement
from devices.pci import BarKind, BarSpec, ConfigSpace

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
#: The timer of the MAC announcement's rounds after a migration (not migrated: a device
#: that migrates again announces from its new place).
ANNOUNCE = "announce"


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


class E1000(Device):
    type_name: ClassVar[str] = "e1000"
    migration_caps: ClassVar[int] = 0x7  # STOP_COPY | P2P | PRE_COPY
    model_version: ClassVar[int] = 1

    def __init__(self, options: E1000Options | None = None) -> None:
        opts = options or E1000Options()
        self.options = opts
        self.netdev_id: str | None = opts.netdev
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
        self.timers = Timers(opts.clock, self._fire)
        self.jobs = Jobs(self, self.timers)
        self.timers.on_arm = self.jobs.kick_timers
        self.regs = _Registers(self.timers.poll)
        self.values = self.regs.values  # the register file, by offset
        self.stats = Statistics(self.values)
        self.interrupts = Interrupts(self.values, self.irq, self.timers)
        self.receiver = Receiver(self, set_accepting=self._set_accepting)
        self.transmitter = Transmitter(self, carrier=self._carrier, emit=self._emit)
        self._build_registers()
        self.io = _IoPorts(self.regs)
        self.add_region(0, self.regs)
        self.add_region(1, self.io)

        self.eeprom = eeprom.image(opts.mac)
        self.eecd = eeprom.Microwire()
        self.phy = phy.Phy()
        self.port: NetPort = DetachedPort()
        self._migrated_in = False  # state loaded: announce the MAC when running again
        self._announce_round = len(ANNOUNCE_DELAYS)  # none under way
        self._load_mac_into_ra()
        self._update_link_status()

    # =========================================================================================
    # The register map: which register is whose

    def _build_registers(self) -> None:
        bank = self.regs
        add = bank.add
        ints = self.interrupts
        tx = self.transmitter
        rx = self.receiver
        add(r.CTRL, "CTRL", reset=r.CTRL_RESET_VALUE, on_write=self._write_ctrl)
        add(r.STATUS, "STATUS", reset=r.STATUS_BASE | r.STATUS_LU, writable=0)
        add(r.EECD, "EECD", on_read=self._read_eecd, on_write=self._write_eecd)
        add(r.EERD, "EERD", on_write=self._write_eerd)
        add(r.MDIC, "MDIC", on_write=self._write_mdic)
        add(r.ICR, "ICR", w1c=True, on_read=ints.read_icr, on_write=ints.write_icr)
        add(r.ICS, "ICS", on_read=ints.read_ics, on_write=ints.write_ics)
        add(r.IMS, "IMS", on_write=ints.write_ims)
        add(r.IMC, "IMC", on_read=lambda: 0, on_write=ints.write_imc)
        add(r.ITR, "ITR", writable=0xFFFF)
        add(r.RCTL, "RCTL", writable=r.RCTL_WRITABLE, on_write=rx.write_rctl)
        add(r.TCTL, "TCTL", writable=r.TCTL_WRITABLE, on_write=tx.write_tctl)
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
        add(r.RDT, "RDT", writable=0xFFFF, on_write=rx.write_rdt)
        add(r.TDT, "TDT", writable=0xFFFF, on_write=tx.write_tdt)
        add(r.RDTR, "RDTR", writable=0xFFFF | r.FPD, on_write=ints.write_rdtr)
        add(r.TIDV, "TIDV", writable=0xFFFF | r.FPD, on_write=ints.write_tidv)
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
            add(r.RA + 8 * i, f"RAL{i}", on_write=rx.ra_writer(r.RA + 8 * i))
            add(
                r.RA + 8 * i + 4,
                f"RAH{i}",
                writable=0x8003FFFF,
                on_write=rx.ra_writer(r.RA + 8 * i + 4),
            )
        for off in r.STATS_OFFSETS:
            add(off, f"STAT{off:#x}", writable=0, on_read=self.stats.reader(off))

    # -- reset ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on / function-level reset: everything, PHY and EEPROM included."""
        super().reset()
        self.eeprom = eeprom.image(self.options.mac)
        self.phy.reset()
        self.timers.clear()
        self._migrated_in = False
        self._reset_mac_state()

    def _mac_reset(self) -> None:
        """CTRL.RST: the MAC's registers and state; the PHY (and its autonegotiation in
        progress) and the EEPROM are not touched, as on the real part."""
        self.regs.reset()
        for name in ("itr", "rxpkt", "rxabs", "txpkt", "txabs", DMA_RETRY):
            self.timers.disarm(name)
        self._reset_mac_state()
        self.irq.lower_intx()
        self.jobs.kick_timers()

    def _reset_mac_state(self) -> None:
        self.eecd.reset()
        self.transmitter.reset()
        self.receiver.reset()
        self.interrupts.reset()
        self.jobs.reset_dma_retry()
        self.new_generation()
        self._load_mac_into_ra()
        self._update_link_status()

    def new_generation(self) -> None:
        """Jobs already queued or running belong to the past: they will do nothing."""
        self.jobs.new_generation()
        self.transmitter.queued = self.receiver.queued = False

    def _load_mac_into_ra(self) -> None:
        mac = eeprom.mac_of(self.eeprom)
        self.values[r.RA] = int.from_bytes(mac[:4], "little")
        self.values[r.RA + 4] = int.from_bytes(mac[4:], "little") | r.RAH_AV
        self.receiver.forget_addresses()

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
            self.interrupts.cause(r.ICR_MDAC)

    def _restart_autoneg(self) -> None:
        was_up = self.phy.link_up
        self.phy.link_down()
        self._update_link_status()
        if self.options.autoneg_delay <= 0:
            self._autoneg_done()
            return
        self.timers.arm("autoneg", self.options.autoneg_delay)
        if was_up:
            self.interrupts.cause(r.ICR_LSC)

    def _enter_phy_loopback(self) -> None:
        """PHY loopback: no autonegotiation to wait for, the link is up at once (the
        driver's loopback test sends right after setting the bit)."""
        self.timers.disarm("autoneg")
        if not self.phy.link_up:
            self.phy.loopback_link()
            self._update_link_status()
            self.interrupts.cause(r.ICR_LSC)

    def _autoneg_done(self) -> None:
        self.phy.autoneg_done()
        self._update_link_status()
        self.interrupts.cause(r.ICR_LSC)

    @property
    def link_up(self) -> bool:
        return bool(self.values[r.STATUS] & r.STATUS_LU)

    # -- timers -----------------------------------------------------------------------------
    def _fire(self, name: str) -> None:
        """A timer is due: whose it is decides what happens."""
        if name == "autoneg":
            self._autoneg_done()
        elif name == "itr":
            self.interrupts.update_line()
        elif name in ("rxpkt", "rxabs"):
            self.interrupts.rx_delay_done()
        elif name in ("txpkt", "txabs"):
            self.interrupts.tx_delay_done()
        elif name == DMA_RETRY:
            self.transmitter.kick(doorbell=False)
            self.receiver.kick()
        elif name == ANNOUNCE:
            self._announce()

    # =========================================================================================
    # The wire

    def _loopback(self) -> bool:
        """Whether transmitted frames come back to the receiver instead of the wire: MAC
        loopback (RCTL.LBM 01, or 11 through the transceiver) or the PHY's."""
        return bool(self.values[r.RCTL] & r.RCTL_LBM_MASK) or self.phy.loopback

    def _carrier(self) -> bool:
        """Whether a transmitted frame goes anywhere: in loopback, or with the link up."""
        return self._loopback() or self.link_up

    def _emit(self, frame: bytes) -> None:
        if self._loopback():
            self.receiver.receive(frame)  # back to our own receiver, nothing on the wire
        else:
            self.port.transmit(frame)

    def _set_accepting(self, accepting: bool) -> None:
        self.port.set_accepting(accepting)

    def attach_net(self, port: NetPort) -> None:
        self.port = port
        if self.jobs.paused:
            port.set_accepting(False)

    def net_receive(self, frame: bytes) -> None:
        """A frame from the wire: heard only with the link up and not in loopback."""
        if self.link_up and not self._loopback():
            self.receiver.receive(frame)

    # =========================================================================================
    # Life cycle

    def on_attach(self) -> None:
        self.new_generation()
        self.jobs.kick_timers()
        # Work the previous client's disconnect cut short (its job was cancelled before it
        # committed, see Transmitter._batch and Receiver._batch) runs again for this one.
        # (While stopped, resume does it on the way back to RUNNING.)
        self.transmitter.kick(doorbell=False)
        self.receiver.kick()

    def on_detach(self) -> None:
        self.new_generation()

    def pause(self) -> None:
        if self.jobs.paused:
            return
        self.timers.freeze()
        if not self.receiver.backpressure:
            self.port.set_accepting(False)

    def resume(self) -> None:
        if not self.jobs.paused:
            return
        self.timers.thaw()
        receiver = self.receiver
        receiver.backpressure = receiver.fifo_bytes > receiver.fifo_limit()
        if not receiver.backpressure:
            self.port.set_accepting(True)
        self.timers.poll()
        self.jobs.kick_timers()
        self.transmitter.kick(doorbell=False)
        receiver.kick()
        self.interrupts.update_line()
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
            self.timers.arm(ANNOUNCE, ANNOUNCE_DELAYS[self._announce_round])

    def migrated_in(self) -> None:
        """A migrated state was loaded: announce the MAC once the device runs again."""
        self._migrated_in = True

    @property
    def idle(self) -> bool:
        """No transmit or receive work queued (tests wait for this)."""
        jobs = self.jobs
        return not (self.transmitter.queued or self.receiver.queued or jobs.waiting or jobs.running)

    # =========================================================================================
    # Migration: devices.e1000.state

    def save_state(self) -> list[Section]:
        return state.save_state(self)

    def migration_size_estimate(self) -> int:
        return state.size_estimate(self)

    def load_state(self, sections: Sequence[LoadedSection]) -> None:
        """Validate every section, then apply; any defect: EINVAL and nothing changed."""
        state.load_state(self, sections)
