"""``testdev``: a small but real PCI device used throughout the tests and as the default.

Layout (all registers 32-bit, little-endian)::

  BAR0  4 KiB MMIO registers
        0x00 ID          RO   0x54534554 ("TEST")
        0x04 VERSION     RO   1
        0x10-0x2c SCRATCH0-7  RW
        0x30 DOORBELL    WO   write N: raise interrupt vector N, set IRQ_STATUS bit N
        0x34 IRQ_STATUS  RW1C one bit per vector raised and not yet acknowledged; INTx
                              stays asserted while any bit is set
        0x38 IRQ_COUNT   RO   interrupts raised since reset
        0x40/0x44 DMA_SRC     RW  source IOVA (low/high)
        0x48/0x4c DMA_DST     RW  destination IOVA (low/high)
        0x50 DMA_LEN     RW   bytes to copy (at most 16 MiB)
        0x54 DMA_CTRL    WO   bit0 start; bit1 interrupt when done; bits 15:8 vector
        0x58 DMA_STATUS  RO   0 idle, 1 busy, 2 done, 3 error
        0x5c DMA_DONE    RO   copies completed since reset
        0x60 DMA_ERROR   RO   errno of the last failed copy
        0x80 IOEVENT     WO   doorbell also offered as an ioeventfd: raises vector 0
        0x84 IOEVENT_COUNT RO times the ioeventfd doorbell rang
  BAR2  RAM (64-bit, prefetchable, default 64 KiB), mmap-able through a memfd
  BAR4  MSI-X table (offset 0) and PBA (offset 0x800), 4 KiB
  config: PCIe endpoint (4 KiB config space), PM, MSI (1 vector), MSI-X (4 vectors), INTA#
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from devices.api import (
    ClientGone,
    Device,
    DeviceError,
    IoEventFd,
    MsixPbaRegion,
    MsixTableRegion,
    RamRegion,
    RegisterBank,
    SplitRegion,
)
from devices.irq import InterruptController
from devices.migration import primitives as stream_primitives
from devices.migration.memory_journal import MemoryJournal
from devices.migration.stream import Buffer, LoadedSection, Section, SectionSink
from devices.pci import BarKind, BarSpec, ConfigSpace

VENDOR_ID = 0x1B36
DEVICE_ID = 0x0F00
CLASS_CODE = 0xFF0000  # "unassigned": no guest driver claims it by accident

ID_VALUE = 0x54534554
REG_ID = 0x00
REG_VERSION = 0x04
REG_SCRATCH = 0x10
SCRATCH_COUNT = 8
REG_DOORBELL = 0x30
REG_IRQ_STATUS = 0x34
REG_IRQ_COUNT = 0x38
REG_DMA_SRC = 0x40
REG_DMA_DST = 0x48
REG_DMA_LEN = 0x50
REG_DMA_CTRL = 0x54
REG_DMA_STATUS = 0x58
REG_DMA_DONE = 0x5C
REG_DMA_ERROR = 0x60
REG_IOEVENT = 0x80
REG_IOEVENT_COUNT = 0x84
REG_DMA_CTRL_LATCH = 0x88  # internal: the DMA_CTRL value of the copy in progress

DMA_CTRL_START = 1 << 0
DMA_CTRL_IRQ = 1 << 1
DMA_IDLE, DMA_BUSY, DMA_DONE, DMA_FAILED = range(4)
DMA_MAX_LEN = 16 * 1024 * 1024

BAR_REGS, BAR_RAM, BAR_MSIX = 0, 2, 4
PAGE = 4096
RAM_CHUNK = 1 << 20  # initial PRE_COPY data goes out in sections of this size
RAM_SECTION = 8 << 20  # a larger RAM is saved as "ram.zpage" sections of this size
REG_ENTRY = struct.Struct("<II")
PAGE_HEADER = struct.Struct("<Q")
GEOMETRY = struct.Struct("<QI")  # RAM BAR size, MSI-X vectors
REGS_SIZE = 0x1000
MSIX_BAR_SIZE = 0x1000
PBA_OFFSET = 0x800


@dataclass(frozen=True, slots=True)
class TestDevOptions:
    __test__ = False
    ram_size: int = 64 * 1024
    msix_vectors: int = 4

    def __post_init__(self) -> None:
        if self.ram_size < 4096 or self.ram_size & (self.ram_size - 1):
            raise ValueError("ram-size must be a power of two >= 4096")
        if self.ram_size > 1 << 36:
            raise ValueError("ram-size is at most 64G")
        if not 1 <= self.msix_vectors <= 32:
            raise ValueError("msix vectors must be 1..32")


class TestDev(Device):
    __test__ = False  # not a pytest test class, despite the name
    type_name: ClassVar[str] = "testdev"

    def __init__(self, options: TestDevOptions | None = None) -> None:
        opts = options or TestDevOptions()
        self.options = opts
        config = ConfigSpace(
            vendor_id=VENDOR_ID,
            device_id=DEVICE_ID,
            subsystem_vendor_id=VENDOR_ID,
            subsystem_id=0x0001,
            class_code=CLASS_CODE,
            revision=1,
            interrupt_pin=1,
            express=True,
        )
        config.add_bar(BarSpec(BAR_REGS, REGS_SIZE, BarKind.MEM32))
        config.add_bar(BarSpec(BAR_RAM, opts.ram_size, BarKind.MEM64, prefetchable=True))
        config.add_bar(BarSpec(BAR_MSIX, MSIX_BAR_SIZE, BarKind.MEM32))
        config.add_pm_capability()
        config.add_msi_capability(1)
        config.add_msix_capability(
            opts.msix_vectors,
            table_bar=BAR_MSIX,
            table_offset=0,
            pba_bar=BAR_MSIX,
            pba_offset=PBA_OFFSET,
        )
        config.add_express_capability()
        super().__init__(
            config, InterruptController(config, msi_vectors=1, msix_vectors=opts.msix_vectors)
        )
        self.regs = self._build_registers()
        self.ram = RamRegion(opts.ram_size)
        self.add_region(BAR_REGS, self.regs)
        self.add_region(BAR_RAM, self.ram)
        self.add_region(
            BAR_MSIX,
            SplitRegion(
                MSIX_BAR_SIZE,
                [(0, MsixTableRegion(self.irq)), (PBA_OFFSET, MsixPbaRegion(self.irq))],
            ),
        )
        self.add_ioeventfd(IoEventFd(BAR_REGS, REG_IOEVENT, 4, None, self._ioevent))
        self._copy_queued = False  # a copy job is queued or running in this process
        self._shadow: bytearray | None = None  # RAM as last sent during PRE_COPY
        self._sent_upto = 0  # how far the PRE_COPY initial pass got

    # -- registers ---------------------------------------------------------------------------
    def _build_registers(self) -> RegisterBank:
        bank = RegisterBank(REGS_SIZE, "testdev")
        bank.add(REG_ID, "ID", reset=ID_VALUE, writable=0)
        bank.add(REG_VERSION, "VERSION", reset=1, writable=0)
        for i in range(SCRATCH_COUNT):
            bank.add(REG_SCRATCH + 4 * i, f"SCRATCH{i}")
        bank.add(REG_DOORBELL, "DOORBELL", on_read=lambda: 0, on_write=self._doorbell)
        bank.add(REG_IRQ_STATUS, "IRQ_STATUS", w1c=True, on_write=self._ack)
        bank.add(REG_IRQ_COUNT, "IRQ_COUNT", writable=0)
        bank.add(REG_DMA_SRC, "DMA_SRC_LO")
        bank.add(REG_DMA_SRC + 4, "DMA_SRC_HI")
        bank.add(REG_DMA_DST, "DMA_DST_LO")
        bank.add(REG_DMA_DST + 4, "DMA_DST_HI")
        bank.add(REG_DMA_LEN, "DMA_LEN")
        bank.add(REG_DMA_CTRL, "DMA_CTRL", on_read=lambda: 0, on_write=self._dma_ctrl)
        bank.add(REG_DMA_STATUS, "DMA_STATUS", writable=0, on_read=self._dma_status)
        bank.add(REG_DMA_DONE, "DMA_DONE", writable=0)
        bank.add(REG_DMA_ERROR, "DMA_ERROR", writable=0)
        bank.add(REG_IOEVENT, "IOEVENT", on_read=lambda: 0, on_write=lambda _v: self._ioevent())
        bank.add(REG_IOEVENT_COUNT, "IOEVENT_COUNT", writable=0)
        bank.add(REG_DMA_CTRL_LATCH, "DMA_CTRL_LATCH", writable=0)
        return bank

    def _raise(self, vector: int) -> None:
        status = self.regs.get(REG_IRQ_STATUS) | (1 << vector)
        self.regs.set(REG_IRQ_STATUS, status)
        self.regs.set(REG_IRQ_COUNT, (self.regs.get(REG_IRQ_COUNT) + 1) & 0xFFFFFFFF)
        # A vector beyond what the enabled mode offers goes to its last vector.
        self.irq.notify(min(vector, max(self.irq.vectors_in_use() - 1, 0)))

    def _doorbell(self, value: int) -> None:
        self._raise(value & 0x1F)

    def _ack(self, status: int) -> None:
        self.regs.set(REG_IRQ_STATUS, status)
        if not status:
            self.irq.lower_intx()  # level-triggered: the line drops once all causes are acked

    def _ioevent(self) -> None:
        self.regs.set(REG_IOEVENT_COUNT, (self.regs.get(REG_IOEVENT_COUNT) + 1) & 0xFFFFFFFF)
        self._raise(0)

    # -- DMA copy ---------------------------------------------------------------------------
    def _dma_ctrl(self, value: int) -> None:
        if not value & DMA_CTRL_START:
            return
        if self.regs.get(REG_DMA_STATUS) == DMA_BUSY:
            return  # one copy at a time; the guest polls DMA_STATUS
        self.regs.set(REG_DMA_CTRL_LATCH, value)
        self.regs.set(REG_DMA_STATUS, DMA_BUSY)
        self._submit_copy()

    def _dma_status(self) -> int:
        # BUSY with no job while running: the copy's job died with its client (dropped at
        # the disconnect, or its DMA found the client gone). It runs again now, when the
        # new client's driver polls for it, not when that client attaches: a client that
        # has just connected has not mapped its memory yet, and the copy would fail (and
        # interrupt) for nothing (found by the soak, pre-copy with cut-source).
        if self.regs.get(REG_DMA_STATUS) == DMA_BUSY and self.migration.operating:
            self.resume()
        return self.regs.get(REG_DMA_STATUS)

    def _submit_copy(self) -> None:
        """Queue the copy the registers describe. While the device is stopped the job waits
        in the queue; the BUSY status is what migrates, and the destination resubmits it."""
        src = self.regs.get(REG_DMA_SRC) | self.regs.get(REG_DMA_SRC + 4) << 32
        dst = self.regs.get(REG_DMA_DST) | self.regs.get(REG_DMA_DST + 4) << 32
        length = self.regs.get(REG_DMA_LEN)
        ctrl = self.regs.get(REG_DMA_CTRL_LATCH)
        notify = bool(ctrl & DMA_CTRL_IRQ)
        vector = (ctrl >> 8) & 0xFF
        self._copy_queued = True

        async def copy() -> None:
            try:
                await self._copy(src, dst, length, notify, vector)
            finally:
                self._copy_queued = False

        if not self.context.submit(copy):
            self._copy_queued = False
            self.regs.set(REG_DMA_ERROR, errno.EAGAIN)
            self.regs.set(REG_DMA_STATUS, DMA_FAILED)

    async def _copy(self, src: int, dst: int, length: int, notify: bool, vector: int) -> None:
        try:
            if length > DMA_MAX_LEN:
                raise DeviceError(errno.E2BIG, f"DMA_LEN {length} above {DMA_MAX_LEN}")
            data = await self.context.dma.read(src, length)
            await self.context.dma.write(dst, data)
        except ClientGone:
            # Our client hung up under the copy: it did not fail, it was dropped with the
            # connection, like a job cancelled there. It stays BUSY, with no interrupt, and
            # runs again for the next client (on_attach, or the engine's resume).
            return
        except DeviceError as exc:
            self.regs.set(REG_DMA_ERROR, exc.errno)
            self.regs.set(REG_DMA_STATUS, DMA_FAILED)
        else:
            self.regs.set(REG_DMA_STATUS, DMA_DONE)
            self.regs.set(REG_DMA_DONE, (self.regs.get(REG_DMA_DONE) + 1) & 0xFFFFFFFF)
        if notify:
            self._raise(vector)

    def reset(self) -> None:
        super().reset()
        self._shadow = None

    # -- migration ------------------------------------------------------------------------
    # Sections: "geometry" (RAM size, vectors: must match), "regs" (offset, value) pairs of
    # every register, and RAM as "ram.z" (the whole RAM BAR, up to RAM_SECTION bytes) or
    # "ram.zpage" (an offset u64 then that part of RAM: changed pages, and a larger RAM in
    # RAM_SECTION parts), both zero-page-elided (devices.migration.primitives.pack_pages).
    # The raw forms "ram" / "ram.page" (offset u64 + bytes) are accepted on load.

    def _regs_blob(self) -> bytes:
        regs = sorted(self.regs.values.items())
        return b"".join(REG_ENTRY.pack(offset, value) for offset, value in regs)

    def _geometry(self) -> bytes:
        """What must match between source and destination before anything is applied."""
        return GEOMETRY.pack(self.ram.size, self.options.msix_vectors)

    def _ram_section(self, offset: int, data: Buffer) -> Section:
        pieces = stream_primitives.pack_pages(data, PAGE)
        return ("ram.zpage", [PAGE_HEADER.pack(offset), *pieces])

    def save_state(self) -> list[Section]:
        # Views of the live RAM, not a copy: the device is stopped while they are sent.
        sections: list[Section] = [("geometry", self._geometry()), ("regs", self._regs_blob())]
        if self.ram.size <= RAM_SECTION:
            sections.append(("ram.z", stream_primitives.pack_pages(self.ram.buffer, PAGE)))
            return sections
        # A large RAM goes out in parts, so the source checksums one part while the previous
        # one is already on its way (a section's checksum precedes its payload).
        for at in range(0, self.ram.size, RAM_SECTION):
            sections.append(self._ram_section(at, self.ram.buffer[at : at + RAM_SECTION]))
        return sections

    def precopy_start(self) -> list[Section]:
        # The initial pass goes out one chunk per read, so memory stays bounded; pages the
        # guest changes meanwhile are found later by comparing with what was sent.
        self._shadow = bytearray(self.ram.size)
        self._sent_upto = 0
        return self._next_initial_chunk()

    def _next_initial_chunk(self) -> list[Section]:
        assert self._shadow is not None
        at = self._sent_upto
        if at >= self.ram.size:
            return []
        end = min(at + RAM_CHUNK, self.ram.size)
        chunk = bytes(self.ram.buffer[at:end])  # immutable: safe to queue by reference
        self._shadow[at:end] = chunk
        self._sent_upto = end
        return [self._ram_section(at, chunk)]

    def precopy_changes(self) -> list[Section]:
        """The rest of the initial pass, then RAM pages changed since they were sent (by
        REGION_WRITE or through the client's mmap, which only a comparison can see)."""
        if self._shadow is None:
            return []
        if self._sent_upto < self.ram.size:
            return self._next_initial_chunk()
        return self._changed_runs(self.ram.size)

    def _changed_runs(self, end: int) -> list[Section]:
        assert self._shadow is not None
        ram, shadow = self.ram.buffer[:end], memoryview(self._shadow)[:end]
        bitmap = stream_primitives.current().diff_pages(ram, shadow, PAGE)
        runs: list[Section] = []
        for first, last in stream_primitives.set_runs(bitmap, (end + PAGE - 1) // PAGE):
            start, stop = first * PAGE, min(last * PAGE, end)
            data = bytes(ram[start:stop])
            shadow[start:stop] = data
            runs.append(self._ram_section(start, data))
        return runs

    def precopy_end(self) -> None:
        self._shadow = None

    def stop_copy_sections(self, after_precopy: bool) -> list[Section]:
        if not after_precopy or self._shadow is None:
            return self.save_state()
        sections: list[Section] = [("geometry", self._geometry()), ("regs", self._regs_blob())]
        sections += self._changed_runs(self._sent_upto)
        if self._sent_upto < self.ram.size:  # the initial pass did not finish: the rest
            rest = self.ram.buffer[self._sent_upto :]
            sections.append(self._ram_section(self._sent_upto, rest))
        return sections

    def migration_size_estimate(self) -> int:
        """The STOP_COPY size (MIG_DATA_SIZE): the whole state, or in pre-copy only what the
        stop-copy phase will still send: RAM the initial pass has not reached and pages
        changed since they were sent. QEMU switches over once this fits its downtime limit,
        so a full-RAM figure there would keep a pre-copy migration from ever converging."""
        regs = len(self._regs_blob())
        if self._shadow is None:
            return regs + self.ram.size
        sent = self._sent_upto
        bitmap = stream_primitives.current().diff_pages(
            self.ram.buffer[:sent], memoryview(self._shadow)[:sent], PAGE
        )
        changed = int.from_bytes(bitmap, "little").bit_count() * PAGE
        return regs + (self.ram.size - sent) + changed

    def load_state(self, sections: Sequence[LoadedSection]) -> None:
        """Apply a whole saved state, all or nothing. RAM sections go through the same
        sinks as a stream arriving (:meth:`resume_sink`; the engine gives this method only
        the other sections), and are undone if anything after them is refused."""
        regs: dict[int, int] | None = None
        geometry = None
        applied: list[SectionSink] = []
        try:
            for name, payload in sections:
                data = memoryview(payload).cast("B")
                if name == "geometry":
                    geometry = bytes(data)
                    if geometry != self._geometry():
                        raise DeviceError(
                            errno.EINVAL, "testdev geometry (RAM size, vectors) differs"
                        )
                elif name == "regs":
                    regs = self._parse_regs(data)
                elif (sink := self.resume_sink(name, len(data))) is not None:
                    applied.append(sink)
                    sink.write(data)
                    sink.finish()
                else:
                    raise DeviceError(errno.EINVAL, f"unknown testdev section {name!r}")
            if regs is None or geometry is None:
                raise DeviceError(errno.EINVAL, "testdev state without geometry or registers")
        except BaseException:
            for sink in reversed(applied):
                sink.undo()
            raise
        for sink in applied:
            sink.commit()
        self.regs.values.update(regs)
        self._copy_queued = False

    def resume_sink(self, name: str, length: int) -> SectionSink | None:
        """RAM sections are written into RAM while they arrive (no staged copy of RAM)."""
        if name in RAM_SECTIONS:
            whole, elided = RAM_SECTIONS[name]
            return _RamSink(self.ram.buffer, length, whole=whole, elided=elided)
        return None

    def _parse_regs(self, payload: Buffer) -> dict[int, int]:
        known = {reg.offset for reg in self.regs.registers()}
        if len(payload) != REG_ENTRY.size * len(known):
            raise DeviceError(errno.EINVAL, f"regs section of {len(payload)} bytes")
        regs = dict(REG_ENTRY.iter_unpack(payload))
        if set(regs) != known:
            raise DeviceError(errno.EINVAL, "regs section names unknown or missing registers")
        if regs[REG_ID] != ID_VALUE or regs[REG_DMA_STATUS] > DMA_FAILED:
            raise DeviceError(errno.EINVAL, "regs section holds impossible register values")
        return regs

    def resume(self) -> None:
        # Work that arrived while stopped, or that came with migrated state, runs now.
        if self.regs.get(REG_DMA_STATUS) == DMA_BUSY and not self._copy_queued:
            self._submit_copy()

    def on_detach(self) -> None:
        # The connection drops every queued job (and cancels the running one): a copy
        # queued but never started is no longer queued. It stays BUSY and runs again for
        # the next client (a copy is idempotent: same source, same destination): when that
        # client's driver polls DMA_STATUS (_dma_status), or by the engine's resume when the
        # device was stopped meanwhile; never at attach, before the client mapped memory.
        self._copy_queued = False


#: RAM sections, applied in place as they arrive: name -> (the whole RAM, zero pages elided).
RAM_SECTIONS = {
    "ram.z": (True, True),
    "ram.zpage": (False, True),
    "ram": (True, False),
    "ram.page": (False, False),
}


class _RamSink:
    """A RAM section (see RAM_SECTIONS; a partial one starts with its offset, u64) written
    into RAM as it arrives, in stream order like every RAM section, with the checks
    :meth:`TestDevice.load_state` makes on one; journaled, so the engine can take it back."""

    def __init__(self, ram: memoryview, length: int, *, whole: bool, elided: bool) -> None:
        self._ram = ram
        self._length = length
        self._whole = whole
        self._elided = elided
        self._offset_bytes = bytearray()
        self._offset = 0
        self._journal: MemoryJournal | None = None
        self._pages: stream_primitives.PagesReceiver | None = None
        if whole:
            self._start(0, length)

    def write(self, data: memoryview) -> None:
        if self._pages is None:
            take = min(PAGE_HEADER.size - len(self._offset_bytes), len(data))
            self._offset_bytes += data[:take]
            data = data[take:]
            if len(self._offset_bytes) < PAGE_HEADER.size:
                return
            (offset,) = PAGE_HEADER.unpack(self._offset_bytes)
            if offset % PAGE or offset >= len(self._ram):
                raise DeviceError(errno.EINVAL, f"RAM update at {offset:#x} is not a page in RAM")
            self._start(offset, self._length - PAGE_HEADER.size)
        assert self._pages is not None
        try:
            self._pages.feed(data)
        except ValueError as exc:
            raise DeviceError(errno.EINVAL, f"RAM update at {self._offset:#x}: {exc}") from None

    def target(self, limit: int) -> memoryview | None:
        return None if self._pages is None else self._pages.target(limit)

    def landed(self, count: int) -> None:
        assert self._pages is not None
        self._pages.landed(count)

    def finish(self) -> None:
        if self._pages is None:
            raise DeviceError(errno.EINVAL, "RAM page section too short")
        try:
            length = self._pages.finish()
        except ValueError as exc:
            raise DeviceError(errno.EINVAL, f"RAM update at {self._offset:#x}: {exc}") from None
        if not length or (self._whole and length != len(self._ram)):
            raise DeviceError(errno.EINVAL, f"RAM update [{self._offset:#x}, +{length:#x}) is bad")

    def _start(self, offset: int, payload: int) -> None:
        self._offset = offset
        self._journal = MemoryJournal(self._ram[offset:])
        room = len(self._ram) - offset
        if self._elided:
            self._pages = stream_primitives.PagesReceiver(payload, room, self._journal)
        elif payload > room:  # checked before a byte is written
            raise DeviceError(errno.EINVAL, f"RAM update [{offset:#x}, +{payload:#x}) is bad")
        else:
            self._pages = stream_primitives.PagesReceiver.raw(payload, self._journal)

    def undo(self) -> None:
        if self._journal is not None:
            self._journal.undo()

    def commit(self) -> None:
        if self._journal is not None:
            self._journal.commit()
