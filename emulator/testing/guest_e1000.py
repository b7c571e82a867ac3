"""A guest driver for the ``e1000`` model, played over a vfio-user :class:`Client`.

:class:`E1000Guest` does what Linux's ``e1000`` driver does to an 82540EM, in the same
order and through the same registers (probe: reset through the I/O BAR, EEPROM read by
Microwire bit-banging and checked against 0xBABA, PHY setup through MDIC with an
autonegotiation restart; open: rings in guest RAM, TCTL/RCTL, receive buffers, interrupt
mask, a forced LSC), then sends and receives frames with legacy descriptors, checksum
offload (context + data descriptors) or TSO, and services INTx the way QEMU does: the
interrupt handler's ICR read, then ``SET_IRQS INTx UNMASK``.

Memory: the caller provides guest RAM (:class:`emulator.testing.harness.GuestRam`, mapped for the
device with :meth:`E1000Guest.map_memory`); the driver lays out its rings and buffers from
``ram.base + offset``. BAR0 writes are posted (NO_REPLY), as QEMU sends them; BAR1 and
config accesses wait for their replies.

Also here, for tests and the soak harness: :func:`tx_descriptors` (the descriptors Linux
would queue for a frame), frame builders and checkers (IPv4 TCP/UDP with correct
checksums, segment parsing) and :class:`Crossover`, a back-to-back cable between two NIC
models in one process (a stand-in for ``emulator.netdev`` backends) whose ends can hand over
to a migration destination (:meth:`CrossoverEnd.successor`).
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from devices.e1000 import regs as r
from devices.e1000.packet import (
    ETHERTYPE_IPV4,
    IPPROTO_TCP,
    IPPROTO_UDP,
    add16,
    checksum,
    ones_sum,
    pseudo_header_sum,
)
from devices.net import NetDevice
from emulator.client import Client
from emulator.testing.harness import EventFd, GuestRam
from protocol.constants import IrqIndex, IrqSetFlags

BAR0, BAR1, CONFIG = 0, 1, 7
TRIGGER_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
NONE_UNMASK = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK
PCI_COMMAND = 0x04
PCI_COMMAND_VALUE = 0x0107  # I/O, memory, bus master, SERR (as the trace shows)
TX_BUFFER = 4096  # Linux's E1000_MAX_DATA_PER_TXD
EEPROM_WORDS = 64
EEPROM_READ_OPCODE = 0b110
PHY_ADDRESS = 1
#: TCTL as Linux's e1000_configure_tx leaves it: EN, PSP, CT 0x0F, COLD 0x3F, RTLC.
TCTL_VALUE = 0x0103F0FA
TIPG_VALUE = 0x00602008
ITR_20K = 195  # Linux's default: 20000 interrupts/s (1e9 / (20000 * 256))


class GuestError(Exception):
    """The device did not behave as the driver expects (what Linux would log and give up)."""


@dataclass(frozen=True, slots=True)
class RxFrame:
    data: bytes  # without the FCS
    status: int
    errors: int
    csum: int
    special: int
    descriptors: int
    fcs_ok: bool | None  # None when the device stripped the FCS (RCTL.SECRC)


@dataclass(slots=True)
class _TxPacket:
    last: int  # index of its last descriptor (RS is set there)
    count: int  # descriptors it occupies


@dataclass(slots=True)
class DriverConfig:
    tx_count: int = 256
    rx_count: int = 256
    rx_buffer_size: int = 2048
    itr: int = ITR_20K
    rdtr: int = 0
    radv: int = 8
    tidv: int = 8
    tadv: int = 32
    rxcsum: int = r.RXCSUM_TUOFL  # what Linux enables with rx checksumming on
    rctl_extra: int = 0  # UPE, MPE, VFE, SECRC, LPE ...
    ims: int = r.IMS_ENABLE_MASK
    linux_flushes: bool = False  # the STATUS reads Linux issues after posted writes
    offset: int = 0  # where in guest RAM the driver's structures start

    def __post_init__(self) -> None:
        for count in (self.tx_count, self.rx_count):
            if count < 8 or count % 8 or count > 4096:
                raise ValueError("ring sizes are multiples of 8 descriptors, at most 4096")
        if self.rx_buffer_size not in (256, 512, 1024, 2048, 4096, 8192, 16384):
            raise ValueError("receive buffers are 256..16384 bytes, powers of two")

    @property
    def rctl_bsize(self) -> int:
        size = self.rx_buffer_size
        if size >= 4096:
            return r.RCTL_BSEX | {16384: 1, 8192: 2, 4096: 3}[size] << r.RCTL_BSIZE_SHIFT
        return {2048: 0, 1024: 1, 512: 2, 256: 3}[size] << r.RCTL_BSIZE_SHIFT

    def ram_needed(self) -> int:
        return (
            self.offset
            + _align(16 * self.tx_count)
            + _align(16 * self.rx_count)
            + TX_BUFFER * self.tx_count
            + self.rx_buffer_size * self.rx_count
        )


def _align(value: int, to: int = 4096) -> int:
    return (value + to - 1) // to * to


class E1000Guest:
    def __init__(
        self,
        client: Client,
        ram: GuestRam,
        irq: EventFd | None = None,
        config: DriverConfig | None = None,
    ) -> None:
        self.client = client
        self.ram = ram
        self.irq = irq
        self.config = cfg = config or DriverConfig()
        if cfg.ram_needed() > ram.size:
            raise ValueError(f"the driver needs {cfg.ram_needed():#x} bytes of guest RAM")
        base = ram.base + cfg.offset
        self.tx_ring = base
        self.rx_ring = self.tx_ring + _align(16 * cfg.tx_count)
        self.tx_buffers = self.rx_ring + _align(16 * cfg.rx_count)
        self.rx_buffers = self.tx_buffers + TX_BUFFER * cfg.tx_count
        self.mac = b""
        self.eeprom: list[int] = []
        self.tx_next = 0  # next descriptor to fill
        self.tx_clean = 0  # oldest descriptor not yet reclaimed
        self.tx_in_flight: deque[_TxPacket] = deque()
        self.tx_used = 0
        self.rx_next = 0  # next descriptor to look at
        self.rx_filled_to = 0  # next descriptor to give to the device
        self.interrupts = 0
        self.icr_seen = 0  # OR of every ICR value read

    # =========================================================================================
    # Register access

    async def read(self, offset: int) -> int:
        return int.from_bytes(await self.client.region_read(BAR0, offset, 4), "little")

    async def write(self, offset: int, value: int) -> None:
        await self.client.region_write(BAR0, offset, value.to_bytes(4, "little"), posted=True)
        if self.config.linux_flushes:
            await self.read(r.STATUS)

    async def io_write(self, offset: int, value: int) -> None:
        """``e1000_write_reg_io``: IOADDR then IODATA, each waiting for its reply."""
        await self.client.region_write(BAR1, r.IOADDR, offset.to_bytes(4, "little"))
        await self.client.region_write(BAR1, r.IODATA, value.to_bytes(4, "little"))

    async def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(await self.client.region_read(CONFIG, offset, size), "little")

    async def config_write(self, offset: int, value: int, size: int) -> None:
        await self.client.region_write(CONFIG, offset, value.to_bytes(size, "little"))

    # =========================================================================================
    # Setup (what QEMU does at realize, then the driver's probe and open)

    async def map_memory(self) -> None:
        await self.client.dma_map(self.ram.base, self.ram.size, fd=self.ram.fd)

    async def connect_interrupt(self) -> None:
        if self.irq is not None:
            await self.client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[self.irq.fd])

    async def realize_destination(self, client: Client, irq: EventFd | None = None) -> None:
        """What QEMU does on a migration destination before the device state arrives: map
        this guest's RAM and bind an INTx eventfd there."""
        await client.dma_map(self.ram.base, self.ram.size, fd=self.ram.fd)
        if irq is not None:
            await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[irq.fd])

    def migrated_to(self, client: Client, irq: EventFd | None = None) -> None:
        """The VM continues on the destination: same RAM, rings and driver state."""
        self.client = client
        if irq is not None:
            self.irq = irq

    async def init(self, *, link_timeout: float = 5.0) -> None:
        """Probe and open, as Linux's e1000 does; returns with the link up."""
        await self.map_memory()
        await self.connect_interrupt()
        await self.probe()
        await self.open(link_timeout=link_timeout)

    async def probe(self) -> None:
        vendor = await self.config_read(0, 4)
        if vendor != r.DEVICE_ID << 16 | r.VENDOR_ID:
            raise GuestError(f"not an 82540EM: {vendor:#010x}")
        await self.config_write(PCI_COMMAND, PCI_COMMAND_VALUE, 2)
        await self.reset_hw()
        self.eeprom = await self.read_eeprom()
        if sum(self.eeprom) & 0xFFFF != 0xBABA:
            raise GuestError(f"EEPROM checksum {sum(self.eeprom) & 0xFFFF:#06x}, not 0xbaba")
        self.mac = b"".join(struct.pack("<H", w) for w in self.eeprom[:3])
        if self.mac[0] & 1 or self.mac == bytes(6):
            raise GuestError(f"invalid MAC address {self.mac.hex(':')}")
        await self.reset_hw()
        await self.init_hw()

    async def reset_hw(self) -> None:
        """``e1000_reset_hw`` for an 82540: quiesce, then CTRL.RST through the I/O BAR."""
        await self.write(r.IMC, 0xFFFFFFFF)
        await self.write(r.RCTL, 0)
        await self.write(r.TCTL, r.TCTL_PSP)
        await self.read(r.STATUS)
        ctrl = await self.read(r.CTRL)
        await self.io_write(r.CTRL, ctrl | r.CTRL_RST)
        if await self.read(r.CTRL) & r.CTRL_RST:
            raise GuestError("CTRL.RST did not self-clear")
        manc = await self.read(r.MANC)
        await self.write(r.MANC, manc & ~0x2000)  # ARP_EN off
        await self.write(r.IMC, 0xFFFFFFFF)
        await self.read(r.ICR)

    async def init_hw(self) -> None:
        """``e1000_init_hw`` + ``e1000_setup_link`` (copper, M88 PHY)."""
        for i in range(r.VFTA_COUNT):
            await self.write(r.VFTA + 4 * i, 0)
        await self.set_mac_filter()
        for i in range(r.MTA_COUNT):
            await self.write(r.MTA + 4 * i, 0)
        txdctl = await self.read(r.TXDCTL)
        await self.write(r.TXDCTL, (txdctl & ~0x003F0000) | 0x01010000)
        await self.write(r.FCAL, 0x00C28001)
        await self.write(r.FCAH, 0x0100)
        await self.write(r.FCT, 0x8808)
        await self.write(r.FCTTV, 0x0680)
        ctrl = await self.read(r.CTRL)
        await self.write(r.CTRL, (ctrl | r.CTRL_SLU) & ~0x1800)  # no forced speed/duplex
        await self.setup_phy()
        await self.write(r.FCRTL, 0x80007000)
        await self.write(r.FCRTH, 0x00008000)
        for offset in r.STATS_OFFSETS:
            await self.read(offset)

    async def set_mac_filter(self) -> None:
        await self.write(r.RA, int.from_bytes(self.mac[:4], "little"))
        await self.write(r.RA + 4, int.from_bytes(self.mac[4:], "little") | r.RAH_AV)
        for i in range(1, r.RA_COUNT - 1):
            await self.write(r.RA + 8 * i, 0)
            await self.write(r.RA + 8 * i + 4, 0)

    async def setup_phy(self) -> None:
        """``e1000_copper_link_mgp_setup`` + ``e1000_copper_link_autoneg``."""
        id1, id2 = await self.phy_read(2), await self.phy_read(3)
        if (id1, id2 & 0xFFF0) != (0x0141, 0x0C20):
            raise GuestError(f"unexpected PHY {id1:#06x}:{id2:#06x}")
        spec = await self.phy_read(0x10)
        await self.phy_write(0x10, (spec & ~0x0060) | 0x0060 | 0x0800)  # auto MDI-X, ...
        ext = await self.phy_read(0x14)
        await self.phy_write(0x14, (ext & ~0x0E70) | 0x0170)
        bmcr = await self.phy_read(0)
        await self.phy_write(0, bmcr | 0x8000)  # PHY reset (self-clearing)
        await self.phy_write(4, 0x0DE1)  # advertise 10/100 half/full + pause
        await self.phy_write(9, 0x0E00)  # 1000BASE-T full duplex, as the trace shows
        bmcr = await self.phy_read(0)
        await self.phy_write(0, bmcr | 0x1000 | 0x0200)  # AN enable + restart
        await self.phy_read(1)

    async def open(self, *, link_timeout: float = 5.0) -> None:
        """``e1000_open``: power up the PHY, rings, receive buffers, interrupts."""
        cfg = self.config
        bmcr = await self.phy_read(0)
        await self.phy_write(0, bmcr & ~0x0800)
        # transmit
        await self.write(r.TDBAL, self.tx_ring & 0xFFFFFFFF)
        await self.write(r.TDBAH, self.tx_ring >> 32)
        await self.write(r.TDLEN, 16 * cfg.tx_count)
        await self.write(r.TDH, 0)
        await self.write(r.TDT, 0)
        await self.write(r.TIPG, TIPG_VALUE)
        await self.write(r.TIDV, cfg.tidv)
        await self.write(r.TADV, cfg.tadv)
        await self.write(r.TCTL, TCTL_VALUE & ~r.TCTL_EN)
        # receive
        rctl = r.RCTL_BAM | cfg.rctl_bsize | cfg.rctl_extra
        await self.write(r.RCTL, rctl)
        await self.write(r.RDTR, cfg.rdtr)
        await self.write(r.RADV, cfg.radv)
        await self.write(r.ITR, cfg.itr)
        await self.write(r.RDBAL, self.rx_ring & 0xFFFFFFFF)
        await self.write(r.RDBAH, self.rx_ring >> 32)
        await self.write(r.RDLEN, 16 * cfg.rx_count)
        await self.write(r.RDH, 0)
        await self.write(r.RDT, 0)
        await self.write(r.RXCSUM, cfg.rxcsum)
        await self.write(r.RCTL, rctl | r.RCTL_EN)
        await self.write(r.TCTL, TCTL_VALUE)
        self.tx_next = self.tx_clean = self.tx_used = 0
        self.tx_in_flight.clear()
        self.rx_next = self.rx_filled_to = 0
        self.ram.write(self.tx_ring, bytes(16 * cfg.tx_count))
        await self.refill_rx()
        await self.write(r.IMS, cfg.ims)
        await self.write(r.ICS, r.ICR_LSC)  # make the watchdog look at the link now
        await self.wait_link(link_timeout)

    async def wait_link(self, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while True:
                if self.irq is not None:
                    # Linux's handler runs for open's ICS.LSC also when the link is up
                    # already: it reads ICR and unmasks INTx, which the next one needs.
                    with trio.move_on_after(0.05):
                        await self.service_interrupt()
                if await self.read(r.STATUS) & r.STATUS_LU:
                    break
                if self.irq is None:
                    await trio.sleep(0.01)
        bmsr = await self.phy_read(1)
        if bmsr & 0x0024 != 0x0024:
            raise GuestError(f"link up but BMSR {bmsr:#06x}")

    # =========================================================================================
    # EEPROM (Microwire bit-banging, e1000_read_eeprom for an 82540)

    async def read_eeprom(self) -> list[int]:
        await self._ee_acquire()
        words = []
        for address in range(EEPROM_WORDS):
            await self._ee_shift_out(EEPROM_READ_OPCODE, 3)
            await self._ee_shift_out(address, 6)
            words.append(await self._ee_shift_in(16))
            await self._ee_standby()
        await self._ee_release()
        return words

    async def read_eeprom_eerd(self, address: int) -> int:
        await self.write(r.EERD, address << r.EERD_ADDR_SHIFT | r.EERD_START)
        for _ in range(100):
            value = await self.read(r.EERD)
            if value & r.EERD_DONE:
                return value >> r.EERD_DATA_SHIFT
        raise GuestError("EERD never finished")

    async def _ee_acquire(self) -> None:
        eecd = await self.read(r.EECD)
        await self.write(r.EECD, eecd | r.EECD_REQ)
        eecd = await self.read(r.EECD)
        if not eecd & r.EECD_GNT:
            raise GuestError("EEPROM access not granted")
        eecd &= ~(r.EECD_DI | r.EECD_SK)
        await self.write(r.EECD, eecd)
        await self.write(r.EECD, eecd | r.EECD_CS)

    async def _ee_shift_out(self, data: int, count: int) -> None:
        eecd = await self.read(r.EECD) & ~r.EECD_DO
        for bit in range(count - 1, -1, -1):
            eecd = (eecd & ~r.EECD_DI) | (r.EECD_DI if data >> bit & 1 else 0)
            await self.write(r.EECD, eecd)
            await self.write(r.EECD, eecd | r.EECD_SK)
            await self.write(r.EECD, eecd)
        await self.write(r.EECD, eecd & ~r.EECD_DI)

    async def _ee_shift_in(self, count: int) -> int:
        eecd = await self.read(r.EECD) & ~(r.EECD_DO | r.EECD_DI)
        data = 0
        for _ in range(count):
            await self.write(r.EECD, eecd | r.EECD_SK)
            value = await self.read(r.EECD)
            data = data << 1 | bool(value & r.EECD_DO)
            await self.write(r.EECD, eecd)
        return data

    async def _ee_standby(self) -> None:
        eecd = await self.read(r.EECD)
        eecd &= ~(r.EECD_CS | r.EECD_SK)
        await self.write(r.EECD, eecd)
        await self.write(r.EECD, eecd | r.EECD_SK)
        await self.write(r.EECD, eecd | r.EECD_SK | r.EECD_CS)
        await self.write(r.EECD, eecd | r.EECD_CS)

    async def _ee_release(self) -> None:
        eecd = await self.read(r.EECD)
        eecd &= ~(r.EECD_CS | r.EECD_DI)
        await self.write(r.EECD, eecd)
        await self.write(r.EECD, eecd | r.EECD_SK)
        await self.write(r.EECD, eecd)
        await self.write(r.EECD, eecd & ~r.EECD_REQ)

    # =========================================================================================
    # PHY

    async def phy_read(self, reg: int) -> int:
        await self.write(r.MDIC, reg << r.MDIC_REG_SHIFT | PHY_ADDRESS << 21 | r.MDIC_OP_READ)
        value = await self._mdic_wait()
        return value & 0xFFFF

    async def phy_write(self, reg: int, value: int) -> None:
        await self.write(
            r.MDIC, value | reg << r.MDIC_REG_SHIFT | PHY_ADDRESS << 21 | r.MDIC_OP_WRITE
        )
        await self._mdic_wait()

    async def _mdic_wait(self) -> int:
        for _ in range(64):
            value = await self.read(r.MDIC)
            if value & r.MDIC_READY:
                if value & r.MDIC_ERROR:
                    raise GuestError(f"MDIC error: {value:#010x}")
                return value
        raise GuestError("MDIC never became ready")

    # =========================================================================================
    # Interrupts

    async def service_interrupt(self, timeout: float = 5.0) -> int:
        """Wait for INTx, read ICR (the ISR's first access), then UNMASK, as QEMU does."""
        if self.irq is None:
            raise GuestError("no interrupt eventfd")
        await self.irq.wait(timeout)
        # The eventfd is consumed: from here the handler runs to its end, as an ISR does.
        # Cancelled between the two (callers wait with move_on_after), the line would stay
        # automasked with no ICR read to lower it and no UNMASK, and every later interrupt
        # would be lost.
        with trio.CancelScope(shield=True), trio.fail_after(timeout):
            icr = await self.read(r.ICR)
            await self.client.set_irqs(IrqIndex.INTX, NONE_UNMASK, 0, 1)
        self.interrupts += 1
        self.icr_seen |= icr
        return icr

    async def quiesce_interrupts(self) -> None:
        """Start from a quiet line: forget signals taken so far, read ICR until nothing is
        pending, and UNMASK (a signal already taken left INTx automasked: without this the
        next cause would assert the line and never be signalled)."""
        if self.irq is None:
            raise GuestError("no interrupt eventfd")
        self.irq.take()
        while await self.read(r.ICR):
            pass
        await self.client.set_irqs(IrqIndex.INTX, NONE_UNMASK, 0, 1)
        self.irq.take()

    # =========================================================================================
    # Transmit

    @property
    def tx_free(self) -> int:
        return self.config.tx_count - 1 - self.tx_used

    def _tx_desc(self, index: int) -> int:
        return self.tx_ring + 16 * index

    def reclaim_tx(self) -> int:
        """Free descriptors of packets the device finished (DD on their last); returns
        how many packets completed."""
        done = 0
        while self.tx_in_flight:
            packet = self.tx_in_flight[0]
            status = self.ram.read(self._tx_desc(packet.last) + 12, 1)[0]
            if not status & r.TXD_STAT_DD:
                break
            self.tx_in_flight.popleft()
            self.tx_used -= packet.count
            self.tx_clean = (packet.last + 1) % self.config.tx_count
            done += 1
        return done

    def queue(
        self,
        frame: bytes,
        *,
        csum: bool = False,
        ip_csum: bool = False,
        tso_mss: int | None = None,
        vlan: int | None = None,
        extended: bool = False,
    ) -> bool:
        """Put one frame on the transmit ring (no doorbell): False if there is no room.

        ``csum``: TCP/UDP checksum offload (the driver writes the pseudo-header sum into
        the checksum field, as Linux's stack does for CHECKSUM_PARTIAL); ``ip_csum`` also
        has the IP header checksum inserted; ``tso_mss``: TCP segmentation (as e1000_tso
        prepares the headers); ``vlan``: insert this tag (CTRL.VME must be on);
        ``extended``: data descriptors (without offloads) instead of legacy ones.
        """
        descriptors = tx_descriptors(
            frame,
            csum=csum,
            ip_csum=ip_csum,
            tso_mss=tso_mss,
            vlan=vlan,
            extended=extended,
        )
        if len(descriptors) > self.tx_free:
            return False
        count = self.config.tx_count
        first = self.tx_next
        for i, (fields, lower, upper, payload) in enumerate(descriptors):
            index = (first + i) % count
            address = fields
            if payload is not None:
                address = self.tx_buffers + TX_BUFFER * index
                self.ram.write(address, payload)
            self.ram.write(self._tx_desc(index), r.DESC.pack(address, lower, upper))
        last = (first + len(descriptors) - 1) % count
        self.tx_next = (last + 1) % count
        self.tx_used += len(descriptors)
        self.tx_in_flight.append(_TxPacket(last, len(descriptors)))
        return True

    async def flush_tx(self) -> None:
        await self.write(r.TDT, self.tx_next)

    async def send(
        self,
        frame: bytes,
        *,
        csum: bool = False,
        ip_csum: bool = False,
        tso_mss: int | None = None,
        vlan: int | None = None,
        extended: bool = False,
        timeout: float = 5.0,
    ) -> None:
        """Queue one frame (waiting for room) and ring the doorbell."""
        options = {"csum": csum, "ip_csum": ip_csum, "tso_mss": tso_mss, "vlan": vlan}
        with trio.fail_after(timeout):
            while not self.queue(frame, extended=extended, **options):  # type: ignore[arg-type]
                self.reclaim_tx()
                if self.queue(frame, extended=extended, **options):  # type: ignore[arg-type]
                    break
                await self.flush_tx()
                await trio.sleep(0.0005)
        await self.flush_tx()

    async def wait_tx_done(self, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while self.tx_in_flight:
                self.reclaim_tx()
                if self.tx_in_flight:
                    await trio.sleep(0.0005)

    # =========================================================================================
    # Receive

    def _rx_desc(self, index: int) -> int:
        return self.rx_ring + 16 * index

    async def refill_rx(self) -> None:
        """Give every free descriptor a buffer; RDT = the last one given (as Linux does)."""
        cfg = self.config
        count = cfg.rx_count
        given = False
        # Linux keeps one descriptor unused: the ring holds count - 1 buffers at most.
        while (self.rx_filled_to + 1) % count != self.rx_next:
            index = self.rx_filled_to
            buffer = self.rx_buffers + cfg.rx_buffer_size * index
            self.ram.write(self._rx_desc(index), struct.pack("<QQ", buffer, 0))
            self.rx_filled_to = (index + 1) % count
            given = True
        if given:
            await self.write(r.RDT, (self.rx_filled_to - 1) % count)

    def poll_rx(self, limit: int | None = None) -> list[RxFrame]:
        """Frames the device wrote back since the last call (reads guest RAM only)."""
        cfg = self.config
        frames: list[RxFrame] = []
        while limit is None or len(frames) < limit:
            index = self.rx_next
            parts: list[bytes] = []
            descriptors = 0
            while True:
                desc = self.ram.read(self._rx_desc(index), 16)
                address, length, csum, status, errors, special = r.RX_DESC.unpack(desc)
                if not status & r.RXD_STAT_DD:
                    return frames  # the rest of this frame is not there yet
                parts.append(self.ram.read(address, length))
                descriptors += 1
                index = (index + 1) % cfg.rx_count
                if status & r.RXD_STAT_EOP:
                    break
            for k in range(descriptors):
                self.ram.write(self._rx_desc((self.rx_next + k) % cfg.rx_count) + 8, bytes(8))
            self.rx_next = index
            data = b"".join(parts)
            fcs_ok: bool | None = None
            if not cfg.rctl_extra & r.RCTL_SECRC:
                data, fcs = data[:-4], data[-4:]
                fcs_ok = zlib.crc32(data).to_bytes(4, "little") == fcs
            frames.append(RxFrame(data, status, errors, csum, special, descriptors, fcs_ok))
        return frames

    async def receive(self, timeout: float = 5.0) -> RxFrame:
        """The next frame (waiting for it, through interrupts when there is an eventfd)."""
        with trio.fail_after(timeout):
            while True:
                frames = self.poll_rx(limit=1)
                if frames:
                    await self.refill_rx()
                    return frames[0]
                if self.irq is not None:
                    with trio.move_on_after(0.02):
                        await self.service_interrupt(timeout)
                else:
                    await trio.sleep(0.0005)

    async def receive_many(self, count: int, timeout: float = 10.0) -> list[RxFrame]:
        got: list[RxFrame] = []
        with trio.fail_after(timeout):
            while len(got) < count:
                frames = self.poll_rx(limit=count - len(got))
                if frames:
                    got += frames
                    await self.refill_rx()
                    continue
                await trio.sleep(0.0005)
        return got

    # =========================================================================================
    # Statistics

    async def read_stats(self) -> dict[int, int]:
        return {offset: await self.read(offset) for offset in r.STATS_OFFSETS}


# =============================================================================================
# Frames


def tx_descriptors(
    frame: bytes | bytearray,
    *,
    csum: bool,
    ip_csum: bool,
    tso_mss: int | None,
    vlan: int | None,
    extended: bool,
) -> list[tuple[int, int, int, bytes | None]]:
    """The descriptors Linux's e1000 would queue for ``frame``: (buffer address, or the
    context descriptor's fields; lower dword; upper dword; buffer contents or None for a
    context descriptor). See :meth:`E1000Guest.queue` for the options."""
    frame = bytearray(frame)
    cmd_last = r.TXD_CMD_EOP | r.TXD_CMD_IFCS | r.TXD_CMD_RS | r.TXD_CMD_IDE
    vle = r.TXD_CMD_VLE if vlan is not None else 0
    special = (vlan or 0) << 16
    chunks = [bytes(frame[i : i + TX_BUFFER]) for i in range(0, len(frame), TX_BUFFER)]
    chunks = chunks or [b""]
    out: list[tuple[int, int, int, bytes | None]] = []
    if not (csum or ip_csum or tso_mss is not None):
        dext = r.TXD_CMD_DEXT if extended else 0
        dtyp = r.TXD_DTYP_DATA << 20 if extended else 0
        for i, chunk in enumerate(chunks):
            cmd = r.TXD_CMD_IFCS | vle | dext | (cmd_last if i == len(chunks) - 1 else 0)
            out.append((0, len(chunk) | dtyp | cmd << 24, special, chunk))
        return out
    layout = parse_l3_l4(frame)
    if layout is None:
        raise ValueError("offloads need an IPv4 TCP or UDP frame")
    l3, l4, proto, l4_header = layout
    tcp = proto == IPPROTO_TCP
    cso = l4 + (16 if tcp else 6)
    tucmd = (r.TUCMD_TCP if tcp else 0) | r.TUCMD_IP
    ipcss, ipcso, ipcse = (l3, l3 + 10, l4 - 1) if (ip_csum or tso_mss) else (0, 0, 0)
    src, dst = bytes(frame[l3 + 12 : l3 + 16]), bytes(frame[l3 + 16 : l3 + 20])
    popts = r.TXD_POPTS_TXSM if (csum or tso_mss) else 0
    if ip_csum or tso_mss:
        popts |= r.TXD_POPTS_IXSM
        struct.pack_into(">H", frame, l3 + 10, 0)
    mss = hdr_len = paylen = 0  # (no segmentation)
    data_cmd = r.TXD_CMD_DEXT | r.TXD_CMD_IFCS | vle
    if tso_mss is not None:
        if not tcp:
            raise ValueError("TSO needs TCP")
        hdr_len = l4 + l4_header
        mss, paylen = tso_mss, len(frame) - hdr_len
        struct.pack_into(">H", frame, l3 + 2, 0)  # e1000_tso: tot_len = 0
        struct.pack_into(">H", frame, cso, pseudo_header_sum(src, dst, proto, 0))
        tucmd |= r.TUCMD_TSE
        data_cmd |= r.TXD_CMD_TSE
    elif csum:
        length = len(frame) - l4
        struct.pack_into(">H", frame, cso, pseudo_header_sum(src, dst, proto, length))
    context = (
        ipcss
        | ipcso << 8
        | ipcse << 16
        | (l4 if (csum or tso_mss) else 0) << 32
        | (cso if (csum or tso_mss) else 0) << 40
    )
    chunks = [bytes(frame[i : i + TX_BUFFER]) for i in range(0, len(frame), TX_BUFFER)]
    out.append((context, paylen | (r.TXD_CMD_DEXT | tucmd) << 24, hdr_len << 8 | mss << 16, None))
    for i, chunk in enumerate(chunks):
        cmd = data_cmd | (cmd_last if i == len(chunks) - 1 else 0)
        lower = len(chunk) | r.TXD_DTYP_DATA << 20 | cmd << 24
        out.append((0, lower, popts << 8 | special, chunk))
    return out


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


def ipv4_packet(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes,
    *,
    ident: int = 1,
    ttl: int = 64,
    dont_fragment: bool = True,
) -> bytes:
    header = bytearray(
        struct.pack(
            ">BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            ident,
            0x4000 if dont_fragment else 0,
            ttl,
            proto,
            0,
            src,
            dst,
        )
    )
    struct.pack_into(">H", header, 10, checksum(header))
    return bytes(header) + payload


def tcp_segment(
    src: bytes,
    dst: bytes,
    payload: bytes,
    *,
    sport: int,
    dport: int,
    seq: int,
    ack: int = 0,
    flags: int = 0x18,  # PSH | ACK
    window: int = 65535,
) -> bytes:
    header = bytearray(
        struct.pack(">HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)
    )
    segment = header + payload
    pseudo = pseudo_header_sum(src, dst, IPPROTO_TCP, len(segment))
    struct.pack_into(">H", segment, 16, checksum(segment, extra=pseudo))
    return bytes(segment)


def udp_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    datagram = bytearray(struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload)
    pseudo = pseudo_header_sum(src, dst, IPPROTO_UDP, len(datagram))
    value = checksum(datagram, extra=pseudo) or 0xFFFF
    struct.pack_into(">H", datagram, 6, value)
    return bytes(datagram)


def tcp_frame(
    dst_mac: bytes,
    src_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    payload: bytes,
    *,
    sport: int = 40000,
    dport: int = 5001,
    seq: int = 1000,
    flags: int = 0x18,
    ident: int = 1,
) -> bytes:
    segment = tcp_segment(src_ip, dst_ip, payload, sport=sport, dport=dport, seq=seq, flags=flags)
    packet = ipv4_packet(src_ip, dst_ip, IPPROTO_TCP, segment, ident=ident)
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, packet)


def udp_frame(
    dst_mac: bytes,
    src_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    payload: bytes,
    *,
    sport: int = 40000,
    dport: int = 5001,
) -> bytes:
    datagram = udp_datagram(src_ip, dst_ip, sport, dport, payload)
    packet = ipv4_packet(src_ip, dst_ip, IPPROTO_UDP, datagram)
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, packet)


def parse_l3_l4(frame: bytes | bytearray) -> tuple[int, int, int, int] | None:
    """(IP header offset, L4 offset, protocol, L4 header length) of an IPv4 TCP/UDP frame
    (optionally 802.1Q tagged), else None."""
    l3 = 14
    ethertype = struct.unpack_from(">H", frame, 12)[0]
    if ethertype == 0x8100:
        ethertype = struct.unpack_from(">H", frame, 16)[0]
        l3 = 18
    if ethertype != ETHERTYPE_IPV4 or len(frame) < l3 + 20:
        return None
    ihl = (frame[l3] & 0x0F) * 4
    proto = frame[l3 + 9]
    l4 = l3 + ihl
    if proto == IPPROTO_TCP and len(frame) >= l4 + 20:
        return l3, l4, proto, (frame[l4 + 12] >> 4) * 4
    if proto == IPPROTO_UDP and len(frame) >= l4 + 8:
        return l3, l4, proto, 8
    return None


@dataclass(frozen=True, slots=True)
class ParsedIp:
    """What a test checks of a received IPv4 TCP/UDP frame."""

    ident: int
    total_length: int
    ip_checksum_ok: bool
    proto: int
    l4_checksum_ok: bool
    seq: int  # TCP only (0 for UDP)
    tcp_flags: int
    payload: bytes
    vlan: int | None = None
    extra: dict[str, int] = field(default_factory=dict)


def parse_ip(frame: bytes) -> ParsedIp:
    layout = parse_l3_l4(frame)
    if layout is None:
        raise ValueError("not an IPv4 TCP/UDP frame")
    l3, l4, proto, l4_header = layout
    vlan = struct.unpack_from(">H", frame, 14)[0] if l3 == 18 else None
    total = struct.unpack_from(">H", frame, l3 + 2)[0]
    ihl = (frame[l3] & 0x0F) * 4
    end = l3 + total
    ip_ok = ones_sum(frame, l3, l3 + ihl) == 0xFFFF
    pseudo = pseudo_header_sum(frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20], proto, end - l4)
    l4_ok = add16(ones_sum(frame, l4, end), pseudo) == 0xFFFF
    seq = struct.unpack_from(">I", frame, l4 + 4)[0] if proto == IPPROTO_TCP else 0
    flags = frame[l4 + 13] if proto == IPPROTO_TCP else 0
    return ParsedIp(
        ident=struct.unpack_from(">H", frame, l3 + 4)[0],
        total_length=total,
        ip_checksum_ok=ip_ok,
        proto=proto,
        l4_checksum_ok=l4_ok,
        seq=seq,
        tcp_flags=flags,
        payload=bytes(frame[l4 + l4_header : end]),
        vlan=vlan,
    )


# =============================================================================================
# A back-to-back cable (stand-in for emulator.netdev backends in tests)


class CrossoverEnd:
    """One end of :class:`Crossover`: the NetPort of the device plugged into it."""

    def __init__(self, cable: Crossover) -> None:
        self.cable = cable
        self.device: NetDevice | None = None
        self.peer: CrossoverEnd | None = None
        self.accepting = True
        self.queue: deque[bytes] = deque()  # frames for this end's device, while it refuses
        self.sent = 0
        self.delivered = 0

    def plug(self, device: NetDevice) -> None:
        """Connect a device (replacing any other: a migrated NIC takes over the cable)."""
        self.device = device
        self.accepting = True
        device.attach_net(self)
        self._drain()

    def transmit(self, frame: bytes) -> bool:
        self.sent += 1
        peer = self.peer
        if peer is None:
            return False
        if self.cable.tap is not None:
            self.cable.tap(self, frame)
        peer.queue.append(frame)
        peer._drain()
        return True

    def set_accepting(self, accepting: bool) -> None:
        self.accepting = accepting
        self._drain()

    def _drain(self) -> None:
        while self.accepting and self.queue and self.device is not None:
            self.delivered += 1
            self.device.net_receive(self.queue.popleft())

    def successor(self, device: NetDevice) -> HandoverPort:
        """The port of a migration destination: it sends on this cable at once and takes
        the cable over (frames queued while the source was stopped included) when the
        destination starts accepting, i.e. when it resumes. The wire follows the VM."""
        port = HandoverPort(self, device)
        device.attach_net(port)
        return port


class HandoverPort:
    def __init__(self, end: CrossoverEnd, device: NetDevice) -> None:
        self.end = end
        self.device = device
        self.took_over = False
        self.queued_at_takeover = 0  # frames that waited on the wire for the switch

    def transmit(self, frame: bytes) -> bool:
        return self.end.transmit(frame)

    def set_accepting(self, accepting: bool) -> None:
        if accepting and not self.took_over:
            self.took_over = True
            self.queued_at_takeover = len(self.end.queue)
            self.end.device = self.device
        if self.took_over:
            self.end.set_accepting(accepting)


class Crossover:
    """Two NetPorts wired back to back, delivering synchronously (frames queue, in order,
    while a device does not accept). Not a backend: it lives only in this process."""

    def __init__(self) -> None:
        self.a = CrossoverEnd(self)
        self.b = CrossoverEnd(self)
        self.a.peer, self.b.peer = self.b, self.a
        self.tap: Callable[[CrossoverEnd, bytes], None] | None = None
