"""``e1000`` in process (devices/e1000/device.py): identity, the register map, EEPROM
(Microwire and EERD), PHY through MDIC and autonegotiation, the I/O BAR and CTRL.RST. A fake
context runs the device's jobs on a fake clock (:class:`Rig`), which the tests of the
device's parts (test_tx, test_rx, test_interrupts, test_jobs, test_stats, test_state) share."""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Awaitable, Callable

import pytest
import trio

from devices.api import DeviceError
from devices.e1000 import E1000, E1000Options, eeprom, phy
from devices.e1000 import regs as r
from devices.irq import INTX
from devices.registry import DeviceSpecError, create_device

MAC = bytes.fromhex("525400abcdef")
RAM_SIZE = 0x800000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class OutOfTime(BaseException):
    """A job wanted to sleep past the time the test let pass."""


class FakeDma:
    """Guest memory at IOVA 0."""

    def __init__(self, size: int = RAM_SIZE) -> None:
        self.mem = bytearray(size)
        self.reads = 0
        self.writes = 0

    def _check(self, iova: int, length: int) -> None:
        if iova < 0 or iova + length > len(self.mem):
            raise DeviceError(errno.EFAULT, f"DMA [{iova:#x}, +{length:#x}) unmapped")

    async def read(self, iova: int, length: int) -> bytes:
        self._check(iova, length)
        self.reads += 1
        await trio.lowlevel.checkpoint()
        return bytes(self.mem[iova : iova + length])

    async def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        self._check(iova, len(data))
        self.writes += 1
        self.mem[iova : iova + len(data)] = data
        await trio.lowlevel.checkpoint()

    async def read_sg(self, segments: list[tuple[int, int]]) -> bytes:
        return b"".join([await self.read(iova, length) for iova, length in segments])

    async def write_sg(
        self, segments: list[tuple[int, int]], data: bytes | bytearray | memoryview
    ) -> None:
        pos = 0
        for iova, length in segments:
            await self.write(iova, bytes(data[pos : pos + length]))
            pos += length

    def regions(self) -> list[tuple[int, int] | None]:
        return [(0, len(self.mem))]

    async def message_read(self, iova: int, length: int) -> bytes:
        return await self.read(iova, length)

    async def message_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        await self.write(iova, data)


class FakeContext:
    def __init__(self, clock: FakeClock, dma: FakeDma) -> None:
        self.clock = clock
        self._dma = dma
        self.jobs: deque[Callable[[], Awaitable[None]]] = deque()
        self.until: float | None = None
        self.accepting = True
        self.idle_sleeps: list[float] = []  # what sleep_until_work was asked for

    @property
    def dma(self) -> FakeDma:
        return self._dma

    def submit(self, job: Callable[[], Awaitable[None]]) -> bool:
        if not self.accepting:
            return False
        self.jobs.append(job)
        return True

    async def sleep(self, seconds: float) -> None:
        target = self.clock.now + seconds
        if self.until is not None and target > self.until:
            self.clock.now = max(self.clock.now, self.until)
            raise OutOfTime
        self.clock.now = target
        await trio.lowlevel.checkpoint()

    async def sleep_until_work(self, seconds: float) -> None:
        self.idle_sleeps.append(seconds)
        if self.jobs:  # nothing is submitted while a fake sleep runs: only queued work
            await trio.lowlevel.checkpoint()
            return
        await self.sleep(seconds)

    async def run(self, *, advance: float = 0.0, limit: int = 100_000) -> None:
        """Run queued jobs; timers may take at most ``advance`` seconds of fake time."""
        self.until = self.clock.now + advance
        try:
            for _ in range(limit):
                if not self.jobs:
                    break
                job = self.jobs.popleft()
                try:
                    await job()
                except OutOfTime:
                    self.jobs.appendleft(job)  # the timer job waits for more time
                    break
            else:
                raise AssertionError("jobs never ran out")
            self.clock.now = max(self.clock.now, self.until)
        finally:
            self.until = None


class RecordingSink:
    def __init__(self) -> None:
        self.fired: list[tuple[int, int]] = []

    def fire(self, index: int, vector: int) -> bool:
        self.fired.append((index, vector))
        return True

    @property
    def intx(self) -> int:
        return sum(1 for index, _ in self.fired if index == INTX)


class RecordingPort:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.accepting: list[bool] = []

    def transmit(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True

    def set_accepting(self, accepting: bool) -> None:
        self.accepting.append(accepting)


class Rig:
    """One e1000 with guest memory, a job runner, an interrupt sink and a recording port."""

    TX_RING = 0x1000
    RX_RING = 0x2000
    TX_BUF = 0x100000  # 4 KiB per descriptor
    RX_BUF = 0x400000

    def __init__(self, *, mac: bytes = MAC, autoneg_delay: float = 0.5) -> None:
        self.clock = FakeClock()
        self.dma = FakeDma()
        self.ctx = FakeContext(self.clock, self.dma)
        self.dev = E1000(E1000Options(mac=mac, autoneg_delay=autoneg_delay, clock=self.clock))
        self.sink = RecordingSink()
        self.dev.irq.sink = self.sink
        self.dev.attach(self.ctx)
        self.port = RecordingPort()
        self.dev.attach_net(self.port)
        self.tx_next = 0
        self.rx_next = 0
        self.tx_count = 0
        self.rx_count = 0
        self.rx_size = 2048

    # -- registers -------------------------------------------------------------------------
    def rd(self, offset: int) -> int:
        return int.from_bytes(self.dev.region_read(0, offset, 4), "little")

    def wr(self, offset: int, value: int) -> None:
        self.dev.region_write(0, offset, value.to_bytes(4, "little"))

    def isr(self) -> int:
        """The guest's interrupt handler as QEMU runs it: read ICR, then UNMASK INTx."""
        icr = self.rd(r.ICR)
        self.dev.irq.unmask(INTX, 0)
        return icr

    async def run(self, advance: float = 0.0) -> None:
        await self.ctx.run(advance=advance)

    def mem(self, address: int, length: int) -> bytes:
        return bytes(self.dma.mem[address : address + length])

    def poke(self, address: int, data: bytes) -> None:
        self.dma.mem[address : address + len(data)] = data

    # -- rings -----------------------------------------------------------------------------
    def setup_tx(self, count: int = 16, *, tctl: int = r.TCTL_EN | r.TCTL_PSP) -> None:
        self.tx_count, self.tx_next = count, 0
        self.wr(r.TDBAL, self.TX_RING)
        self.wr(r.TDBAH, 0)
        self.wr(r.TDLEN, 16 * count)
        self.wr(r.TDH, 0)
        self.wr(r.TDT, 0)
        self.wr(r.TCTL, tctl)

    def setup_rx(
        self,
        count: int = 16,
        *,
        rctl: int = r.RCTL_EN | r.RCTL_BAM | r.RCTL_SECRC,
        size: int = 2048,
    ) -> None:
        self.rx_count, self.rx_next, self.rx_size = count, 0, size
        self.wr(r.RDBAL, self.RX_RING)
        self.wr(r.RDBAH, 0)
        self.wr(r.RDLEN, 16 * count)
        self.wr(r.RDH, 0)
        for i in range(count):
            self.poke(self.RX_RING + 16 * i, struct.pack("<QQ", self.RX_BUF + size * i, 0))
        self.wr(r.RCTL, rctl)
        self.wr(r.RDT, 0)

    def give_rx(self, descriptors: int) -> None:
        self.wr(r.RDT, (self.rd(r.RDT) + descriptors) % self.rx_count)

    def tx_desc(
        self, lower: int, upper: int = 0, *, data: bytes = b"", address: int | None = None
    ) -> int:
        """Write one TX descriptor at the tail (buffer filled from ``data``); returns its
        index. ``address`` overrides the buffer address (context descriptors)."""
        index = self.tx_next
        buffer = self.TX_BUF + 0x1000 * index
        if data:
            self.poke(buffer, data)
        self.poke(
            self.TX_RING + 16 * index,
            r.DESC.pack(buffer if address is None else address, lower, upper),
        )
        self.tx_next = (index + 1) % self.tx_count
        return index

    def legacy(self, frame: bytes, cmd: int = r.TXD_CMD_EOP | r.TXD_CMD_IFCS | r.TXD_CMD_RS) -> int:
        return self.tx_desc(len(frame) | cmd << 24, data=frame)

    async def kick(self) -> None:
        self.wr(r.TDT, self.tx_next)
        await self.run()

    def rx_descriptor(self, index: int) -> tuple[int, int, int, int, int, int]:
        return r.RX_DESC.unpack(self.mem(self.RX_RING + 16 * index, 16))

    def take_rx(self) -> list[tuple[bytes, int, int, int, int]]:
        """(data, status, errors, csum, special) of written-back frames, in order."""
        out: list[tuple[bytes, int, int, int, int]] = []
        while True:
            parts = []
            index = self.rx_next
            while True:
                address, length, csum, status, errors, special = self.rx_descriptor(index)
                if not status & r.RXD_STAT_DD:
                    return out
                parts.append(self.mem(address, length))
                index = (index + 1) % self.rx_count
                if status & r.RXD_STAT_EOP:
                    break
            for k in range(len(parts)):
                self.poke(self.RX_RING + 16 * ((self.rx_next + k) % self.rx_count) + 8, bytes(8))
            self.rx_next = index
            out.append((b"".join(parts), status, errors, csum, special))


def line(rig: Rig) -> bool:
    """The INTx line level (a call, so that asserts on it do not narrow its type)."""
    return rig.dev.irq.intx_line


def frame_to(dst: bytes, size: int = 60, ethertype: int = 0x88B5, src: bytes = MAC) -> bytes:
    body = dst + src + struct.pack(">H", ethertype)
    return body + bytes(i & 0xFF for i in range(size - len(body)))


# =============================================================================================
# Identity


def test_pci_identity_and_bars() -> None:
    dev = E1000()
    cfg = dev.config.read(0, 64)
    assert struct.unpack_from("<HH", cfg, 0) == (0x8086, 0x100E)
    assert cfg[8] == 3 and cfg[9:12] == bytes([0, 0, 2])  # rev 3, class 02 00 00
    assert struct.unpack_from("<HH", cfg, 0x2C) == (0x1AF4, 0x1100)
    assert cfg[0x3D] == 1  # INTA#
    assert struct.unpack_from("<I", cfg, 0x10)[0] == 0  # memory, 32-bit, not prefetchable
    assert struct.unpack_from("<I", cfg, 0x14)[0] == 1  # I/O
    assert cfg[0x34] == 0 and not struct.unpack_from("<H", cfg, 6)[0] & 0x10  # no capabilities
    assert dev.regions[0].size == 0x20000 and dev.regions[1].size == 0x40
    assert dev.irq.count(0) == 1 and dev.irq.count(1) == 0 and dev.irq.count(2) == 0
    assert E1000.migration_caps == 0x7  # STOP_COPY | P2P | PRE_COPY
    assert create_device("e1000,mig-caps=stop_copy+p2p+pre_copy").migration.caps == 0x7


def test_registry_options() -> None:
    dev = create_device("e1000,mac=02:11:22:33:44:55,netdev=n0")
    assert isinstance(dev, E1000)
    assert dev.netdev_id == "n0"
    assert eeprom.mac_of(dev.eeprom) == bytes.fromhex("021122334455")
    default = create_device("e1000")
    assert isinstance(default, E1000)
    assert eeprom.mac_of(default.eeprom) == bytes.fromhex("525400123456")
    assert default.netdev_id is None
    for bad in ("e1000,mac=01:00:00:00:00:01", "e1000,mac=zz", "e1000,netdev=", "e1000,foo=1"):
        with pytest.raises(DeviceSpecError):
            create_device(bad)


def test_reset_values_match_the_82540() -> None:
    rig = Rig()
    assert rig.rd(r.CTRL) == 0x00140240
    assert rig.rd(r.STATUS) == 0x80080783
    assert rig.rd(r.EECD) == 0x188
    assert rig.rd(r.MANC) == 0x00222300
    assert rig.rd(r.PBA) == 0x00100030
    assert rig.rd(r.LEDCTL) == 0x602
    assert rig.rd(r.RA) == int.from_bytes(MAC[:4], "little")
    assert rig.rd(r.RA + 4) == int.from_bytes(MAC[4:], "little") | r.RAH_AV
    assert rig.rd(0x1FFFC) == 0  # unimplemented space reads 0
    rig.wr(0x1FFFC, 0x1234)
    assert rig.rd(0x1FFFC) == 0


#: (register, bits the 82540 implements): what Linux's e1000_reg_test checks (its
#: REG_PATTERN_TEST / REG_SET_AND_CHECK masks), plus the flow-control low threshold and the
#: narrower registers of QEMU's model.
IMPLEMENTED_BITS = [
    (r.FCAL, 0xFFFFFFFF),
    (r.FCAH, 0x0000FFFF),
    (r.FCT, 0x0000FFFF),
    (r.VET, 0x0000FFFF),
    (r.RDTR, 0x0000FFFF),
    (r.RDBAH, 0xFFFFFFFF),
    (r.RDLEN, 0x000FFF80),
    (r.RDH, 0x0000FFFF),
    (r.RDT, 0x0000FFFF),
    (r.FCRTH, 0x0000FFF8),
    (r.FCRTL, 0x8000FFF8),
    (r.FCTTV, 0x0000FFFF),
    (r.TIPG, 0x3FFFFFFF),
    (r.TDBAH, 0xFFFFFFFF),
    (r.TDLEN, 0x000FFF80),
    (r.RCTL, 0x06DFB3FE),
    (r.TCTL, 0x017FFFFA),
    (r.RDBAL, 0xFFFFFFF0),
    (r.TXCW, 0xC000FFFF),
    (r.TDBAL, 0xFFFFFFF0),
    (r.TIDV, 0x0000FFFF),
    (r.RA + 4, 0x8003FFFF),
    (r.MTA, 0xFFFFFFFF),
    # the packet buffer FIFO pointers (widths as QEMU's model has them)
    (r.RDFH, 0x1FFF),
    (r.RDFPC, 0x1FFF),
    (r.TDFH, 0x7FF),
    (r.TDFT, 0x7FF),
    (r.TDFTS, 0x1FFF),
    (r.FFLT, 0x7FF),
    (r.AIT, 0xFFFF),
]


@pytest.mark.parametrize(("offset", "bits"), IMPLEMENTED_BITS)
def test_registers_keep_exactly_the_bits_the_part_implements(offset: int, bits: int) -> None:
    rig = Rig()
    for pattern in (0x5A5A5A5A, 0xA5A5A5A5, 0x00000000, 0xFFFFFFFF):
        rig.wr(offset, pattern)
        assert rig.rd(offset) == pattern & bits, f"{offset:#06x} after {pattern:#010x}"


def test_status_ignores_writes() -> None:
    rig = Rig()
    before = rig.rd(r.STATUS)
    rig.wr(r.STATUS, 0xFFFFF833)
    assert rig.rd(r.STATUS) == before


# =============================================================================================
# EEPROM


class Microwire:
    """Linux's e1000_read_eeprom bit-banging, against the in-process device."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig

    def _clock(self, eecd: int) -> None:
        self.rig.wr(r.EECD, eecd | r.EECD_SK)
        self.rig.wr(r.EECD, eecd)

    def read(self, address: int, count: int = 1) -> list[int]:
        rig = self.rig
        eecd = rig.rd(r.EECD)
        rig.wr(r.EECD, eecd | r.EECD_REQ)
        assert rig.rd(r.EECD) & r.EECD_GNT
        eecd = (eecd | r.EECD_REQ) & ~(r.EECD_DI | r.EECD_SK)
        rig.wr(r.EECD, eecd)
        eecd |= r.EECD_CS
        rig.wr(r.EECD, eecd)
        for bit in (1, 1, 0, *(address >> i & 1 for i in range(5, -1, -1))):
            eecd = (eecd & ~r.EECD_DI) | (r.EECD_DI if bit else 0)
            rig.wr(r.EECD, eecd)
            self._clock(eecd)
        eecd &= ~r.EECD_DI
        rig.wr(r.EECD, eecd)
        words = []
        for _ in range(count):
            word = 0
            for _ in range(16):
                rig.wr(r.EECD, eecd | r.EECD_SK)
                word = word << 1 | bool(rig.rd(r.EECD) & r.EECD_DO)
                rig.wr(r.EECD, eecd)
            words.append(word)
        rig.wr(r.EECD, eecd & ~(r.EECD_CS | r.EECD_REQ))
        return words


def test_eeprom_image_sums_to_0xbaba_with_the_mac_in_words_0_to_2() -> None:
    for mac in (MAC, bytes.fromhex("525400123456"), bytes.fromhex("02ffffffff00")):
        words = eeprom.image(mac)
        assert len(words) == 64 and sum(words) & 0xFFFF == 0xBABA
        assert eeprom.mac_of(words) == mac
        assert words[0] == mac[0] | mac[1] << 8


def test_eeprom_by_microwire_bit_banging() -> None:
    rig = Rig()
    wire = Microwire(rig)
    words = [wire.read(address)[0] for address in range(64)]
    assert words == rig.dev.eeprom
    assert sum(words) & 0xFFFF == 0xBABA
    assert b"".join(struct.pack("<H", w) for w in words[:3]) == MAC
    # A read keeps running into the following words, as on the real part.
    assert wire.read(62, count=3) == [words[62], words[63], words[0]]
    # Deselected, DO reads 1.
    assert rig.rd(r.EECD) & r.EECD_DO


def test_eeprom_by_eerd() -> None:
    rig = Rig()
    for address in (0, 1, 2, 0x3F):
        rig.wr(r.EERD, address << 8 | r.EERD_START)
        value = rig.rd(r.EERD)
        assert value & r.EERD_DONE
        assert value >> 16 == rig.dev.eeprom[address]
    rig.wr(r.EERD, 0x80 << 8 | r.EERD_START)  # beyond the part: done, reads 0
    assert rig.rd(r.EERD) >> 16 == 0


# =============================================================================================
# PHY and link


def mdic(rig: Rig, reg: int, *, write: int | None = None, address: int = 1) -> int:
    op = r.MDIC_OP_READ if write is None else r.MDIC_OP_WRITE | write
    rig.wr(r.MDIC, op | reg << 16 | address << 21)
    value = rig.rd(r.MDIC)
    assert value & r.MDIC_READY
    return value


def test_phy_registers_through_mdic() -> None:
    rig = Rig()
    assert mdic(rig, 2) & 0xFFFF == 0x0141
    assert mdic(rig, 3) & 0xFFFF == 0x0C20
    assert mdic(rig, 1) & 0xFFFF == 0x796D  # link up, autonegotiation complete
    assert mdic(rig, 0x10) & 0xFFFF == 0x0360
    written = mdic(rig, 0x10, write=0x0B60)
    assert written == 0x14300B60  # READY | write | phy 1 | reg 0x10 | data
    assert mdic(rig, 0x10) == 0x18300B60
    assert mdic(rig, 2, address=2) & r.MDIC_ERROR  # only PHY address 1 answers
    assert mdic(rig, 0x0C) & r.MDIC_ERROR  # no such register
    assert mdic(rig, 2, write=0x1234) & r.MDIC_ERROR  # read-only
    assert mdic(rig, 2) & 0xFFFF == 0x0141
    # BMCR reset is self-clearing and keeps the configuration
    mdic(rig, 0, write=0x9140)
    assert mdic(rig, 0) & 0xFFFF == 0x1140
    assert mdic(rig, 0x10) & 0xFFFF == 0x0B60


def test_mdic_interrupt() -> None:
    rig = Rig()
    rig.wr(r.IMS, r.ICR_MDAC)
    rig.wr(r.MDIC, r.MDIC_OP_READ | 2 << 16 | 1 << 21 | r.MDIC_INT_EN)
    assert rig.rd(r.ICR) == r.ICR_MDAC
    assert rig.sink.intx == 1


async def test_autonegotiation_takes_half_a_second_and_raises_lsc() -> None:
    rig = Rig()
    rig.wr(r.IMS, r.ICR_LSC)
    mdic(rig, 0, write=0x1340)  # restart autonegotiation
    assert not rig.rd(r.STATUS) & r.STATUS_LU
    assert mdic(rig, 1) & 0xFFFF == 0x7949
    assert mdic(rig, 0) & 0xFFFF == 0x1140  # restart bit self-clears
    assert rig.isr() == r.ICR_LSC  # link went down
    fired = rig.sink.intx
    await rig.run(advance=0.4)
    assert not rig.rd(r.STATUS) & r.STATUS_LU
    await rig.run(advance=0.2)  # the timer job (context.sleep) completes it
    assert rig.sink.intx == fired + 1  # LSC raised the line without any register access
    assert rig.rd(r.STATUS) & r.STATUS_LU
    assert mdic(rig, 1) & 0xFFFF == 0x796D
    assert mdic(rig, 5) & 0xFFFF == 0x41E0  # link partner acknowledged
    assert rig.rd(r.ICR) == r.ICR_LSC


def test_autonegotiation_also_completes_on_register_access() -> None:
    rig = Rig()
    mdic(rig, 0, write=0x1340)
    rig.clock.now += 0.5
    assert rig.rd(r.STATUS) & r.STATUS_LU  # due timers fire before the access


def test_instant_autonegotiation_option() -> None:
    rig = Rig(autoneg_delay=0)
    mdic(rig, 0, write=0x1340)
    assert rig.rd(r.STATUS) & r.STATUS_LU
    assert rig.rd(r.ICR) & r.ICR_LSC


def test_link_is_up_when_linux_first_looks_after_resetting_the_nic() -> None:
    """Linux's e1000 resetting the NIC for an MTU change (e1000_main.c: e1000_down's
    e1000_reset resets the PHY and restarts autonegotiation; e1000_up then sets ICS.LSC, and
    the interrupt schedules the watchdog a jiffy later). If that watchdog run finds the link
    down it waits 2 s for the next look, whatever LSC comes meanwhile, and resets the
    adapter if Tx work is queued: so with the default options the link must be up by then."""
    rig = Rig(autoneg_delay=E1000Options().autoneg_delay)
    rig.wr(r.IMS, r.IMS_ENABLE_MASK)
    rig.wr(r.CTRL, rig.rd(r.CTRL) | r.CTRL_RST)  # e1000_reset_hw
    mdic(rig, 0, write=0x9140)  # e1000_phy_hw_reset / copper link setup: BMCR reset
    mdic(rig, 0, write=0x1340)  # e1000_copper_link_autoneg: restart autonegotiation
    rig.wr(r.ICS, r.ICR_LSC)  # e1000_up: "fire a link status change interrupt"
    assert rig.isr() & r.ICR_LSC
    rig.clock.now += 0.004  # the watchdog, one jiffy (HZ=250) later: e1000_check_for_link
    mdic(rig, 1)  # (the link bit latches low: the driver reads the status twice)
    assert mdic(rig, 1) & 0x0004, "link still down at the watchdog's first look"
    assert rig.rd(r.STATUS) & r.STATUS_LU


def test_phy_loopback_brings_the_link_up_at_once() -> None:
    """Linux's loopback test sets BMCR loopback (forced 1000/Full, autonegotiation off)
    right after a reset restarted autonegotiation, and sends at once."""
    rig = Rig()
    rig.wr(r.IMS, r.ICR_LSC)
    mdic(rig, 0, write=0x1340)  # autonegotiation restarted: link down for 0.5 s
    assert rig.isr() == r.ICR_LSC and not rig.rd(r.STATUS) & r.STATUS_LU
    mdic(rig, 0, write=0x8140)  # reset, autonegotiation off
    mdic(rig, 0, write=0x4140)  # loopback
    assert rig.rd(r.STATUS) & r.STATUS_LU
    assert mdic(rig, 1) & phy.BMSR_LINK
    assert rig.isr() == r.ICR_LSC
    rig.clock.now += 1
    assert rig.rd(r.ICR) == 0  # the autonegotiation that was pending does not complete
    mdic(rig, 0, write=0x1140)
    assert mdic(rig, 0) & 0xFFFF == 0x1140


def test_phy_reset_through_ctrl_restarts_autonegotiation() -> None:
    rig = Rig()
    mdic(rig, 0x10, write=0x0B60)
    rig.wr(r.CTRL, rig.rd(r.CTRL) | r.CTRL_PHY_RST)
    rig.wr(r.CTRL, rig.rd(r.CTRL) & ~r.CTRL_PHY_RST)
    assert mdic(rig, 0x10) & 0xFFFF == 0x0360  # PHY registers back to defaults
    assert not rig.rd(r.STATUS) & r.STATUS_LU
    rig.clock.now += 0.5
    assert rig.rd(r.STATUS) & r.STATUS_LU


# =============================================================================================
# I/O BAR and resets


def io_write(rig: Rig, offset: int, value: int) -> None:
    rig.dev.region_write(1, 0, offset.to_bytes(4, "little"))
    rig.dev.region_write(1, 4, value.to_bytes(4, "little"))


def io_read(rig: Rig, offset: int) -> int:
    rig.dev.region_write(1, 0, offset.to_bytes(4, "little"))
    return int.from_bytes(rig.dev.region_read(1, 4, 4), "little")


def test_io_bar_reaches_bar0_registers() -> None:
    rig = Rig()
    io_write(rig, r.FCAL, 0xC28001)
    assert rig.rd(r.FCAL) == 0xC28001
    assert io_read(rig, r.STATUS) == rig.rd(r.STATUS)
    assert int.from_bytes(rig.dev.region_read(1, 0, 4), "little") == r.STATUS  # IOADDR reads back
    rig.wr(r.ICS, r.ICR_LSC)
    assert io_read(rig, r.ICR) == r.ICR_LSC and rig.rd(r.ICR) == 0  # side effects too
    assert rig.dev.region_read(1, 8, 8) == bytes(8)  # the rest of the I/O window
    rig.dev.region_write(1, 0, (0x7FFFF).to_bytes(4, "little"))  # beyond BAR0: nothing
    rig.dev.region_write(1, 4, b"\xff\xff\xff\xff")
    assert rig.dev.region_read(1, 4, 4) == bytes(4)


def test_ctrl_rst_resets_the_mac_not_the_phy_or_eeprom() -> None:
    rig = Rig()
    rig.wr(r.TCTL, r.TCTL_PSP)
    rig.wr(r.IMS, r.ICR_LSC)
    rig.wr(r.ICS, r.ICR_LSC)
    rig.wr(r.RA + 8, 0x12345678)
    mdic(rig, 0x10, write=0x0B60)
    assert line(rig)
    ctrl = rig.rd(r.CTRL)
    io_write(rig, r.CTRL, ctrl | r.CTRL_RST | r.CTRL_VME)  # as e1000_reset_hw does
    assert rig.rd(r.CTRL) == r.CTRL_RESET_VALUE  # RST self-cleared
    assert rig.rd(r.TCTL) == 0 and rig.rd(r.IMS) == 0 and rig.rd(r.RA + 8) == 0
    assert not line(rig)
    assert rig.rd(r.RA) == int.from_bytes(MAC[:4], "little")  # reloaded from the EEPROM
    assert mdic(rig, 0x10) & 0xFFFF == 0x0B60
    assert rig.rd(r.STATUS) & r.STATUS_LU


def test_device_reset_returns_everything_to_power_on() -> None:
    rig = Rig()
    mdic(rig, 0x10, write=0x0B60)
    rig.wr(r.RCTL, r.RCTL_EN)
    rig.dev.reset()
    assert mdic(rig, 0x10) & 0xFFFF == 0x0360
    assert rig.rd(r.RCTL) == 0
    assert rig.rd(r.STATUS) == 0x80080783


def test_phy_module_constants() -> None:
    assert phy.RESET_VALUES[phy.BMSR] & phy.BMSR_LINK
