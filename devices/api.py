"""The device-model API: what a device author implements and what the runtime gives back.

A device is a :class:`Device` holding a PCI :class:`~devices.pci.ConfigSpace`, a set of
:class:`Region` objects (BARs, ROM, device-specific regions) and an
:class:`~devices.irq.InterruptController`. The runtime (``emulator``) turns wire messages
into calls on these objects and hands the device a :class:`DeviceContext` through which it
reaches guest memory (DMA) and schedules work. Nothing here knows about sockets, fds, trio or
the wire format, so devices can be unit-tested with plain Python objects.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from devices.errors import ClientGone, DeviceError, DmaFault
from devices.irq import InterruptController
from devices.migration import primitives as stream_primitives
from devices.migration.engine import DEFAULT_CAPS, EnvelopeCodec, MigrationCodec, MigrationEngine
from devices.migration.stream import LoadedSection, Section, SectionSink, StreamLimits
from devices.pci import ConfigAccessError, ConfigSpace
from protocol.constants import PCI_NUM_REGIONS, MigState, PciRegion

__all__ = ["ClientGone", "DeviceError", "DmaFault"]

REGION_CONFIG = PciRegion.CONFIG
PCI_FIXED_REGIONS = PCI_NUM_REGIONS


# ---------------------------------------------------------------------------------------------
# What the runtime provides


class Dma(Protocol):
    """Guest memory as the device sees it: bounds- and permission-checked by IOVA.

    Every method raises :class:`DmaFault` before moving a byte if any part of the access
    is unmapped or not permitted (reads need a readable map, writes a writable one).
    """

    async def read(self, iova: int, length: int) -> bytes: ...

    async def write(self, iova: int, data: bytes | bytearray | memoryview) -> None: ...

    async def read_sg(self, segments: list[tuple[int, int]]) -> bytes: ...

    async def write_sg(
        self, segments: list[tuple[int, int]], data: bytes | bytearray | memoryview
    ) -> None: ...

    def regions(self) -> list[tuple[int, int] | None]:
        """``(iova, size)`` of the client's mappings by slot, in DMA_MAP order; a slot
        freed by DMA_UNMAP is None until the next map reuses it."""
        ...

    async def message_read(self, iova: int, length: int) -> bytes:
        """Read through DMA_READ messages even where the range is mmapped."""
        ...

    async def message_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Write through DMA_WRITE messages even where the range is mmapped."""
        ...


class DeviceContext(Protocol):
    @property
    def dma(self) -> Dma: ...

    async def sleep(self, seconds: float) -> None:
        """Wait inside a device job (timers: autonegotiation, interrupt throttling...)."""
        ...

    async def sleep_until_work(self, seconds: float) -> None:
        """Like :meth:`sleep`, but return as soon as other work is submitted (or at once
        when some is queued): for a timer job that must never hold up the device's work,
        which runs one job at a time."""
        ...

    def submit(self, job: Callable[[], Awaitable[None]]) -> bool:
        """Queue device work (DMA, long operations) to run after the current request is
        answered, in submission order. Never DMA from inside a region access handler: the
        client may be blocked waiting for that access's reply.

        Returns False when the work was not accepted (no client, queue full): the device
        should then fail the operation in its own registers rather than stay "busy"."""
        ...


class _DetachedDma:
    async def read(self, iova: int, length: int) -> bytes:
        raise DmaFault("no client is attached")

    async def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        raise DmaFault("no client is attached")

    async def read_sg(self, segments: list[tuple[int, int]]) -> bytes:
        raise DmaFault("no client is attached")

    async def write_sg(
        self, segments: list[tuple[int, int]], data: bytes | bytearray | memoryview
    ) -> None:
        raise DmaFault("no client is attached")

    def regions(self) -> list[tuple[int, int] | None]:
        return []

    async def message_read(self, iova: int, length: int) -> bytes:
        raise DmaFault("no client is attached")

    async def message_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        raise DmaFault("no client is attached")


class DetachedContext:
    """The context of a device nobody is attached to: work is dropped, DMA faults."""

    _dma = _DetachedDma()

    @property
    def dma(self) -> Dma:
        return self._dma

    def submit(self, job: Callable[[], Awaitable[None]]) -> bool:
        return False

    async def sleep(self, seconds: float) -> None:
        raise DeviceError(errno.ENODEV, "no client is attached")

    async def sleep_until_work(self, seconds: float) -> None:
        raise DeviceError(errno.ENODEV, "no client is attached")


# ---------------------------------------------------------------------------------------------
# Regions


def check_span(size: int, offset: int, count: int, what: str) -> None:
    if offset < 0 or count < 0 or offset + count > size:
        raise DeviceError(
            errno.EINVAL, f"{what}: access [{offset:#x}, +{count:#x}) outside size {size:#x}"
        )


class Region(ABC):
    """One vfio region. Accesses arrive already bounds-checked against ``size``."""

    size: int
    readable: bool = True
    writable: bool = True
    #: (offset, size) areas the client may mmap; non-empty only for memory-backed regions.
    mmap_areas: tuple[tuple[int, int], ...] = ()
    #: (type, subtype) for device-specific regions (index >= 9), sent as a TYPE cap.
    type_cap: tuple[int, int] | None = None

    @abstractmethod
    def read(self, offset: int, count: int) -> bytes: ...

    @abstractmethod
    def write(self, offset: int, data: bytes) -> None: ...

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Return to power-on contents (default: nothing to do)."""


@dataclass(slots=True)
class Register:
    offset: int
    name: str
    width: int
    reset: int
    writable: int
    on_read: Callable[[], int] | None
    on_write: Callable[[int], None] | None
    w1c: bool = False


class RegisterBank(Region):
    """A register-file region: named registers with reset values and optional handlers.

    A read handler computes the value (e.g. read-to-clear); a write handler receives the
    merged value (partial writes are merged with the stored value under the writable
    mask). Registers without handlers are plain storage. Bytes covered by no register read
    as 0 and ignore writes, as unimplemented hardware registers do. Accesses of any size
    and alignment are served byte-wise across registers.
    """

    def __init__(self, size: int, name: str = "registers") -> None:
        self.size = size
        self.name = name
        self._registers: dict[int, Register] = {}
        self._byte_owner: dict[int, int] = {}
        self.values: dict[int, int] = {}

    def add(
        self,
        offset: int,
        name: str,
        *,
        width: int = 4,
        reset: int = 0,
        writable: int | None = None,
        on_read: Callable[[], int] | None = None,
        on_write: Callable[[int], None] | None = None,
        w1c: bool = False,
    ) -> Register:
        if width not in (1, 2, 4, 8) or offset % width or offset + width > self.size:
            raise ValueError(f"register {name} at {offset:#x} width {width} does not fit")
        if any(offset + i in self._byte_owner for i in range(width)):
            raise ValueError(f"register {name} overlaps another")
        full = (1 << (8 * width)) - 1
        reg = Register(
            offset,
            name,
            width,
            reset,
            full if writable is None else writable,
            on_read,
            on_write,
            w1c,
        )
        self._registers[offset] = reg
        for i in range(width):
            self._byte_owner[offset + i] = offset
        self.values[offset] = reset
        return reg

    def registers(self) -> Iterable[Register]:
        return self._registers.values()

    def get(self, offset: int) -> int:
        return self.values[offset]

    def set(self, offset: int, value: int) -> None:
        """Set a register's stored value directly (device-internal, no masks, no handlers)."""
        self.values[offset] = value

    def reset(self) -> None:
        for reg in self._registers.values():
            self.values[reg.offset] = reg.reset

    def read(self, offset: int, count: int) -> bytes:
        reg = self._whole_register(offset, count)
        if reg is not None:
            return self._read_value(reg).to_bytes(reg.width, "little")
        out = bytearray(count)
        done: dict[int, bytes] = {}
        for i in range(count):
            owner = self._byte_owner.get(offset + i)
            if owner is None:
                continue
            if owner not in done:
                reg = self._registers[owner]
                done[owner] = self._read_value(reg).to_bytes(reg.width, "little")
            out[i] = done[owner][offset + i - owner]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        reg = self._whole_register(offset, len(data))
        if reg is not None:
            self._write_value(reg, int.from_bytes(data, "little"), (1 << (8 * reg.width)) - 1)
            return
        per_register: dict[int, tuple[int, int]] = {}
        for i, byte in enumerate(data):
            owner = self._byte_owner.get(offset + i)
            if owner is None:
                continue
            shift = 8 * (offset + i - owner)
            value, enables = per_register.get(owner, (0, 0))
            per_register[owner] = (value | byte << shift, enables | 0xFF << shift)
        for owner, (value, enables) in per_register.items():
            self._write_value(self._registers[owner], value, enables)

    def _whole_register(self, offset: int, count: int) -> Register | None:
        reg = self._registers.get(offset)
        return reg if reg is not None and reg.width == count else None

    def _read_value(self, reg: Register) -> int:
        return reg.on_read() if reg.on_read is not None else self.values[reg.offset]

    def _write_value(self, reg: Register, value: int, enables: int) -> None:
        old = self.values[reg.offset]
        mask = reg.writable & enables
        merged = old & ~(value & mask) if reg.w1c else (old & ~mask) | (value & mask)
        if reg.on_write is not None:
            reg.on_write(merged)
        else:
            self.values[reg.offset] = merged


class RamRegion(Region):
    """Memory the client may mmap. The runtime rebinds ``buffer`` to a shared memfd mapping
    (keeping the contents), so device code must always go through ``self.buffer``."""

    def __init__(self, size: int, *, mmap: bool = True) -> None:
        self.size = size
        # Allocated on first use: a served device gets the runtime's memfd mapping first and
        # never holds a second, anonymous copy of its RAM.
        self._buffer: memoryview | None = None
        self.mmap_areas = ((0, size),) if mmap else ()

    @property
    def buffer(self) -> memoryview:
        if self._buffer is None:
            self._buffer = memoryview(bytearray(self.size))
        return self._buffer

    @buffer.setter
    def buffer(self, value: memoryview) -> None:
        self._buffer = value

    def bind(self, buffer: memoryview) -> None:
        if len(buffer) != self.size:
            raise ValueError("RAM backing of the wrong size")
        if self._buffer is not None:
            buffer[:] = self._buffer  # keep what was written before binding
        self._buffer = buffer

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.buffer[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        self.buffer[offset : offset + len(data)] = data

    def reset(self) -> None:
        stream_primitives.fill_zero(self.buffer)


class SplitRegion(Region):
    """A BAR made of several sub-regions at fixed offsets (e.g. registers + MSI-X table)."""

    def __init__(self, size: int, parts: list[tuple[int, Region]]) -> None:
        self.size = size
        self._parts = sorted(parts, key=lambda p: p[0])
        for base, part in self._parts:
            if base + part.size > size:
                raise ValueError("sub-region outside its region")

    def _split(self, offset: int, count: int) -> Iterable[tuple[Region | None, int, int, int]]:
        """(part or None for a hole, offset inside the part, position in the access, length)."""
        pos = 0
        while pos < count:
            at = offset + pos
            part, base = next(((p, b) for b, p in self._parts if b <= at < b + p.size), (None, 0))
            if part is None:
                nxt = min((b for b, _ in self._parts if b > at), default=offset + count)
                length = min(nxt, offset + count) - at
            else:
                length = min(base + part.size, offset + count) - at
            yield part, at - base, pos, length
            pos += length

    def read(self, offset: int, count: int) -> bytes:
        out = bytearray(count)
        for part, inner, pos, length in self._split(offset, count):
            if part is not None:
                out[pos : pos + length] = part.read(inner, length)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        for part, inner, pos, length in self._split(offset, len(data)):
            if part is not None:
                part.write(inner, data[pos : pos + length])

    def reset(self) -> None:
        for _, part in self._parts:
            part.reset()


class ConfigRegion(Region):
    """Region 7: the PCI configuration space."""

    def __init__(self, config: ConfigSpace) -> None:
        self.config = config
        self.size = config.size

    def read(self, offset: int, count: int) -> bytes:
        try:
            return self.config.read(offset, count)
        except ConfigAccessError as exc:
            raise DeviceError(errno.EINVAL, str(exc)) from None

    def write(self, offset: int, data: bytes) -> None:
        try:
            self.config.write(offset, data)
        except ConfigAccessError as exc:
            raise DeviceError(errno.EINVAL, str(exc)) from None

    def reset(self) -> None:
        self.config.reset()


# ---------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True, slots=True)
class IoEventFd:
    """A doorbell the device lets the client signal through an ioeventfd (REGION_IO_FDS)."""

    region: int
    offset: int
    size: int
    datamatch: int | None
    handler: Callable[[], None]


class Device:
    """Base class of every device model.

    Subclasses build ``self.config``, call :meth:`add_region` for their BARs, and create
    ``self.irq`` with the vector counts they support. They may override :meth:`reset`
    (call ``super().reset()``), :meth:`on_attach` and :meth:`on_detach`.

    Migration: a device implements :meth:`save_state` / :meth:`load_state` (snapshot style)
    and, to shrink downtime, :meth:`precopy_start` / :meth:`precopy_changes` /
    :meth:`stop_copy_sections` (iterative style). Config space and interrupt state are saved
    by the engine itself. :meth:`migration_arc` is called for every direct arc; raising
    DeviceError fails it. :meth:`pause` / :meth:`resume` stop and restart timers and
    backends when the device leaves / re-enters a running state.
    """

    type_name: ClassVar[str] = "device"
    supports_reset: ClassVar[bool] = True
    #: DMA only while the guest enabled bus mastering (command register bit 2), as PCI
    #: requires; a profile reproducing a server that does not check can turn it off.
    dma_needs_bus_master: ClassVar[bool] = True
    #: Migration capabilities the model can do (MigrationCaps bits: 1 STOP_COPY, 2 P2P,
    #: 4 PRE_COPY); users narrow them with the ``mig-caps=`` option.
    migration_caps: ClassVar[int] = 0x7
    #: Version of the device's saved-state layout; a receiver accepts versions <= its own.
    model_version: ClassVar[int] = 1
    #: Whether the engine adds config-space and interrupt sections to the stream.
    migration_generic_state: ClassVar[bool] = True
    #: Migration interfaces served (the ``migration=`` option): "v2" (DEVICE_FEATURE and
    #: MIG_DATA_*) and/or "v1" (the legacy migration region). Both drive one engine.
    migration_protocols: frozenset[str] = frozenset({"v2"})
    #: Size of the v1 migration region's data window (the largest segment). It sits on the
    #: device (a plain number, no wire knowledge) because it is part of what the device
    #: looks like to a client: the region's size in GET_REGION_INFO and the segment sizes
    #: a v1 client sees. A model reproducing a real device sets it to that device's value
    #: (devices.lvu_sample: libvfio-user's 16 KiB); emulator.migration_region reads it.
    migration_v1_window: ClassVar[int] = 1 << 20

    def __init__(self, config: ConfigSpace, irq: InterruptController) -> None:
        self.config = config
        self.irq = irq
        self.regions: dict[int, Region] = {REGION_CONFIG: ConfigRegion(config)}
        self.ioeventfds: list[IoEventFd] = []
        self.context: DeviceContext = DetachedContext()

    # -- building ------------------------------------------------------------------------
    def add_region(self, index: int, region: Region) -> None:
        if index in self.regions:
            raise ValueError(f"region {index} defined twice")
        bar = self.config.bars().get(index) if index < 6 else None
        if index < 6 and (bar is None or bar.size != region.size):
            # The BAR register the guest sizes and the region the client sees must agree.
            raise ValueError(f"region {index} needs a BAR of {region.size:#x} bytes in config")
        if index >= PCI_FIXED_REGIONS and region.type_cap is None:
            raise ValueError("device-specific regions need a type capability")
        self.regions[index] = region

    def add_ioeventfd(self, ioeventfd: IoEventFd) -> None:
        self.ioeventfds.append(ioeventfd)

    @property
    def num_regions(self) -> int:
        return max(PCI_FIXED_REGIONS, max(self.regions) + 1)

    # -- access (called by the runtime) --------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        region = self._region(index)
        if not region.readable:
            raise DeviceError(errno.EINVAL, f"region {index} is not readable")
        if offset < 0 or count < 0 or offset + count > region.size:  # hot: format on failure
            check_span(region.size, offset, count, f"region {index}")
        data = region.read(offset, count)
        if len(data) != count:
            raise DeviceError(errno.EIO, f"region {index} returned {len(data)} of {count} bytes")
        return data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        region = self._region(index)
        if not region.writable:
            raise DeviceError(errno.EINVAL, f"region {index} is not writable")
        if offset < 0 or offset + len(data) > region.size:  # hot: format on failure
            check_span(region.size, offset, len(data), f"region {index}")
        region.write(offset, data)

    def _region(self, index: int) -> Region:
        region = self.regions.get(index)
        if region is None or region.size == 0:
            raise DeviceError(errno.EINVAL, f"region {index} does not exist")
        return region

    # -- life cycle ----------------------------------------------------------------------
    def attach(self, context: DeviceContext) -> None:
        self.context = context
        self.on_attach()

    def detach(self) -> None:
        """The client went away: DMA and interrupt delivery end, device state stays."""
        self.on_detach()
        self.context = DetachedContext()

    def on_attach(self) -> None:
        pass

    def on_detach(self) -> None:
        pass

    def reset(self) -> None:
        """Function-level reset: registers, RAM, config space and interrupt state."""
        for region in self.regions.values():
            region.reset()
        self.irq.reset()

    # -- migration ---------------------------------------------------------------------------
    @property
    def migration(self) -> MigrationEngine:
        engine = self.__dict__.get("_migration")
        if engine is None:
            caps = self.__dict__.get("mig_caps", DEFAULT_CAPS & self.migration_caps)
            if caps and not caps & 1:
                caps = 0  # a model without STOP_COPY does not migrate at all
            engine = self.__dict__["_migration"] = MigrationEngine(self, caps)
        return engine

    def set_migration_caps(self, caps: int) -> None:
        """Narrow what is advertised (the ``mig-caps=`` device option)."""
        self.__dict__["mig_caps"] = caps
        self.__dict__["_migration"] = MigrationEngine(self, caps)

    def save_state(self) -> Sequence[Section]:
        raise DeviceError(errno.ENOTSUP, f"{self.type_name} cannot save its state")

    def load_state(self, sections: Sequence[LoadedSection]) -> None:
        """Validate every section, then apply: on any error nothing may have changed."""
        raise DeviceError(errno.ENOTSUP, f"{self.type_name} cannot load state")

    def resume_sink(self, name: str, length: int) -> SectionSink | None:
        """A sink that applies section ``name`` (``length`` payload bytes) while the stream
        arrives, e.g. a large RAM written in place instead of staged; None (the default)
        keeps the section for :meth:`load_state`, which then does not see the applied
        ones. The engine undoes what sinks wrote if the stream or :meth:`load_state`
        fails, so "nothing may have changed" holds for them too."""
        return None

    def precopy_start(self) -> Sequence[Section]:
        return []

    def precopy_changes(self) -> Sequence[Section]:
        return []

    def precopy_end(self) -> None:
        pass

    def stop_copy_sections(self, after_precopy: bool) -> Sequence[Section]:
        return self.save_state()

    def migration_size_estimate(self) -> int:
        return sum(len(payload) for _, payload in self.save_state())

    def migration_codec(self, limits: StreamLimits) -> MigrationCodec:
        return EnvelopeCodec(self.type_name, self.model_version, limits)

    def migration_arc(self, arc: tuple[MigState, MigState]) -> None:
        """Called for every direct arc; raise DeviceError to make it fail."""

    def pause(self) -> None:
        """Stop advancing on its own (timers, backends); called when leaving RUNNING."""

    def resume(self) -> None:
        """Continue after :meth:`pause`; re-submit any work queued while paused."""


class MsixTableRegion(Region):
    """The MSI-X table, placed by the device inside one of its BARs."""

    def __init__(self, irq: InterruptController) -> None:
        self.irq = irq
        self.size = len(irq.msix_table)

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.irq.msix_table[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        self.irq.msix_table_write(offset, data)


class MsixPbaRegion(Region):
    """The MSI-X pending-bit array; read-only, writes are dropped (PCI spec)."""

    def __init__(self, irq: InterruptController) -> None:
        self.irq = irq
        self.size = len(irq.pba_bytes())

    def read(self, offset: int, count: int) -> bytes:
        return self.irq.pba_bytes()[offset : offset + count]

    def write(self, offset: int, data: bytes) -> None:
        pass
