"""``lvu-sample``: the device of libvfio-user's sample server, as its sample client sees it.

Written from the behaviour described in ``shared/reference/lvu-sample-device.md`` and the
traced run ``shared/interop/lvu-client-server.jsonl``, so that libvfio-user's sample client
can run its whole session, migration included, against this emulator.

Layout::

  config   dead:beef, subsystem cafe:babe, class 0, 256 bytes, INTA#, no capabilities
  BAR0     8 bytes, I/O BAR: a 64-bit little-endian time_t T (only 8-byte accesses at 0)
           write: arm the timer to fire when wall-clock time reaches T, counted like
                  setitimer(T - time(NULL)) in whole seconds; a T not in the future
                  leaves the timer disarmed
           read:  now - T (whole seconds)
  BAR1     0x4000 bytes RAM, I/O BAR, mmap-able through the sparse areas [0x0, +0x1000]
           and [0x2000, +0x1000]
  irqs     INTx 1, MSI 0, MSI-X 0, ERR 1, REQ 1

When the timer fires the device signals INTx and then runs two DMA rounds, each writing
four 1 KiB chunks (chunk i filled with ``'A' + i``) and reading the 4 KiB back as two 2 KiB
reads, failing if anything differs: round 1 into the second DMA region the client mapped,
through the runtime's ordinary path (the region's mmap for an fd-backed map, which logs
the page dirty); round 2 into the first region through DMA_WRITE / DMA_READ messages even
if it is fd-backed, split at the client's max_data_xfer_size.

Migration (STOP_COPY | PRE_COPY) uses libvfio-user's raw stream, not our envelope:
PRE_COPY yields BAR1 (0x4000 bytes) as it is when each chunk is read; STOP_COPY yields
BAR1 then BAR0 (0x4008 bytes) as they were when STOP_COPY was entered. The destination
accepts exactly 0x4008 bytes and answers anything else with EINVAL. Config space and
interrupt state are not part of the stream (libvfio-user's sample does not send them).

``legacy_v1`` (``--device lvu-sample,migration=v1``) is the older sample of libvfio-user
protocol 0.1 (``shared/reference/lvu-sample-v1.md``): BAR1 is 0x3000 bytes (config space
keeps a power-of-two 0x4000 BAR; that client never sizes BARs), the timer does only the
message round (4 DMA_WRITEs of 'A' bytes, as traced, then 4 DMA_READs, to the first DMA
region), and the device migrates
through the v1 region (index 9, a 0x4000-byte data window) in raw segments: PRE_COPY yields
BAR1, STOP_COPY BAR1 + BAR0 (0x3008 bytes). That client writes every segment it read to
the destination, so the resumed stream is any number of BAR1 images followed by BAR1 +
BAR0; the last one counts, as the old sample applied segments in order.

The model stays free of trio: its timer waits in a device job that polls the wall clock
with a ``sleep`` function handed in by whoever builds it (``devices.registry`` passes the
runtime's), because :class:`~devices.api.DeviceContext` offers no timer yet.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar

from devices.api import Device, DeviceError, DmaFault, RamRegion, Region
from devices.irq import InterruptController
from devices.migration.stream import Buffer, LoadedSection, Section, StreamLimits, payload_parts
from devices.pci import BarKind, BarSpec, ConfigSpace
from protocol.constants import MigrationCaps

log = logging.getLogger("vfio_user_emu.lvu_sample")

VENDOR_ID = 0xDEAD
DEVICE_ID = 0xBEEF
SUBSYSTEM_VENDOR_ID = 0xCAFE
SUBSYSTEM_ID = 0xBABE
CLASS_CODE = 0x000000

BAR_TIME, BAR_RAM = 0, 1
TIME_SIZE = 8
RAM_SIZE = 0x4000
SPARSE_AREAS = ((0x0, 0x1000), (0x2000, 0x1000))

#: STOP_COPY stream: BAR1, then BAR0.
STOP_COPY_SIZE = RAM_SIZE + TIME_SIZE
SECTION_RAM = "bar1"
SECTION_TIME = "bar0"
#: A PRE_COPY section standing for "BAR1 as it is when read" (the codec streams it live).
SECTION_RAM_LIVE = "bar1.live"

DMA_CHUNK = 1024
DMA_CHUNKS = 4
DMA_READ_SIZE = 2048
DMA_SPAN = DMA_CHUNK * DMA_CHUNKS
DMA_PATTERN = b"".join(bytes([ord("A") + i]) * DMA_CHUNK for i in range(DMA_CHUNKS))
#: What the protocol-0.1 sample's DMA_WRITEs carried in its traced run: every chunk 'A'
#: (lvu-sample-v1.md says 'A' + i; the wire shows 'A' four times, and the wire wins).
LEGACY_DMA_PATTERN = b"A" * DMA_SPAN

DEFAULT_POLL_INTERVAL = 0.02
_U64 = (1 << 64) - 1

Sleep = Callable[[float], Awaitable[object]]


# ---------------------------------------------------------------------------------------------
# Regions


class TimeRegister(Region):
    """BAR0: the 64-bit time_t. Like the sample, only whole 8-byte accesses at 0 work."""

    size = TIME_SIZE

    def __init__(self, now: Callable[[], int], written: Callable[[], None]) -> None:
        self._now = now
        self._written = written
        #: T, a signed 64-bit time_t.
        self.value = 0

    @staticmethod
    def _check(offset: int, count: int) -> None:
        if offset != 0 or count != TIME_SIZE:
            raise DeviceError(
                errno.EINVAL,
                f"BAR0: access [{offset:#x}, +{count:#x}) is not the 8-byte time_t at 0",
            )

    def read(self, offset: int, count: int) -> bytes:
        self._check(offset, count)
        return ((self._now() - self.value) & _U64).to_bytes(TIME_SIZE, "little")

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.value = int.from_bytes(data, "little", signed=True)
        self._written()

    def reset(self) -> None:
        self.value = 0


#: The protocol-0.1 sample's BAR1 (not a power of two; libvfio-user accepted it then).
LEGACY_RAM_SIZE = 0x3000
LEGACY_V1_WINDOW = 0x4000


class SparseRam(RamRegion):
    """BAR1: RAM whose mmap-able part is the two sparse areas."""

    def __init__(self, size: int = RAM_SIZE) -> None:
        super().__init__(size)
        self.mmap_areas = SPARSE_AREAS


# ---------------------------------------------------------------------------------------------
# Migration stream


class LvuRawCodec:
    """libvfio-user's sample stream: the bytes of the sections, nothing around them.

    A :data:`SECTION_RAM_LIVE` section becomes a view of BAR1 itself, so each read of the
    PRE_COPY data sees BAR1 as it is at that moment (what the sample server does).
    """

    def __init__(self, ram: RamRegion, *, precopy_images: bool = False) -> None:
        self._ram = ram
        #: legacy v1: the stream may start with whole BAR1 images (the PRE_COPY segments).
        self._precopy_images = precopy_images

    def begin(self, session_id: bytes) -> bytes:
        return b""

    def sections(self, sections: Sequence[Section]) -> list[Buffer]:
        pieces: list[Buffer] = []
        for name, payload in sections:
            if name == SECTION_RAM_LIVE:
                pieces.append(self._ram.buffer)
            elif name in (SECTION_RAM, SECTION_TIME):
                pieces += payload_parts(payload)
            else:
                raise DeviceError(errno.EINVAL, f"lvu-sample stream: unknown section {name!r}")
        return pieces

    def end(self) -> bytes:
        return b""

    def decode(self, data: memoryview) -> list[LoadedSection]:
        view = memoryview(data).cast("B")
        ram_size = self._ram.size
        final = ram_size + TIME_SIZE
        precopy = len(view) - final
        if precopy < 0 or precopy % ram_size or (precopy and not self._precopy_images):
            images = "[k x BAR1 +] " if self._precopy_images else ""
            raise DeviceError(
                errno.EINVAL,
                f"lvu-sample stream of {len(view):#x} bytes; it must be {images}BAR1 + BAR0 "
                f"({final:#x} bytes)",
            )
        view = view[precopy:]
        return [(SECTION_RAM, view[:ram_size]), (SECTION_TIME, view[ram_size:])]


# ---------------------------------------------------------------------------------------------
# The device


class LvuSample(Device):
    type_name: ClassVar[str] = "lvu-sample"
    migration_caps: ClassVar[int] = int(MigrationCaps.STOP_COPY | MigrationCaps.PRE_COPY)
    migration_generic_state: ClassVar[bool] = False
    #: libvfio-user does not check bus mastering, and its sample client never enables it.
    dma_needs_bus_master: ClassVar[bool] = False
    migration_v1_window: ClassVar[int] = LEGACY_V1_WINDOW

    def __init__(
        self,
        *,
        sleep: Sleep | None = None,
        clock: Callable[[], float] = time.time,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        legacy_v1: bool = False,
    ) -> None:
        """``sleep``: an async sleep of the runtime the device is served by (without one the
        timer cannot run unless the device context offers ``sleep``); ``clock``: wall-clock
        seconds (time_t comes from it); ``poll_interval``: longest sleep of the timer job,
        so a migration stop waits at most this long for it; ``legacy_v1``: the protocol-0.1
        sample (see the module docstring)."""
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        config = ConfigSpace(
            vendor_id=VENDOR_ID,
            device_id=DEVICE_ID,
            subsystem_vendor_id=SUBSYSTEM_VENDOR_ID,
            subsystem_id=SUBSYSTEM_ID,
            class_code=CLASS_CODE,
            interrupt_pin=1,
        )
        # The traced sample server shows its BARs as I/O BARs (bit 0 set in config).
        config.add_bar(BarSpec(BAR_TIME, TIME_SIZE, BarKind.IO))
        config.add_bar(BarSpec(BAR_RAM, RAM_SIZE, BarKind.IO))
        super().__init__(config, InterruptController(config))
        self.legacy_v1 = legacy_v1
        self._sleep = sleep
        self._clock = clock
        self.poll_interval = poll_interval
        self.bar0 = TimeRegister(self._now, self._arm)
        self.add_region(BAR_TIME, self.bar0)
        if legacy_v1:
            # GET_REGION_INFO says 0x3000 as the old sample did; config keeps 0x4000.
            self.bar1 = SparseRam(LEGACY_RAM_SIZE)
            self.regions[BAR_RAM] = self.bar1
        else:
            self.bar1 = SparseRam()
            self.add_region(BAR_RAM, self.bar1)
        #: Wall-clock second (``clock()``) at which the timer fires; None = disarmed.
        self.deadline: float | None = None
        self.expirations = 0  # times the timer fired
        self.dma_rounds_done = 0  # expirations whose two DMA rounds succeeded
        self._paused = False
        self._attached = False
        self._waiter_queued = False

    # -- time and the timer -----------------------------------------------------------------
    @property
    def time_value(self) -> int:
        """T, the time_t in BAR0."""
        return self.bar0.value

    @property
    def armed(self) -> bool:
        return self.deadline is not None

    def _now(self) -> int:
        return math.floor(self._clock())

    def _arm(self) -> None:
        """(Re)arm from T like setitimer(T - time(NULL)): whole seconds from now; a delay
        that is not positive leaves the timer disarmed."""
        now = self._clock()
        delay = self.bar0.value - math.floor(now)
        self.deadline = now + delay if delay > 0 else None
        self._start_waiter()

    def _sleeper(self) -> Sleep | None:
        return self._sleep if self._sleep is not None else self.context.sleep

    def _start_waiter(self) -> None:
        if self.deadline is None or self._paused or not self._attached or self._waiter_queued:
            return
        sleep = self._sleeper()
        if sleep is None:
            log.warning("lvu-sample: no sleep function was given; the BAR0 timer cannot run")
            return
        self._waiter_queued = True
        if not self.context.submit(lambda: self._wait_and_fire(sleep)):
            self._waiter_queued = False  # no client, or its queue is full; attach re-arms
            log.warning("lvu-sample: the runtime refused the timer job")

    async def _wait_and_fire(self, sleep: Sleep) -> None:
        try:
            while True:
                if self.deadline is None or self._paused:
                    return  # disarmed, or stopped: resume() re-arms
                remaining = self.deadline - self._clock()
                if remaining <= 0:
                    break
                await sleep(min(remaining, self.poll_interval))
        finally:
            self._waiter_queued = False
        self.deadline = None
        await self.expire()

    async def expire(self) -> None:
        """What the timer does when it fires: INTx, then the two DMA rounds."""
        self.expirations += 1
        # An edge, like the sample's eventfd write: nothing acknowledges a level here.
        self.irq.raise_intx()
        self.irq.lower_intx()
        await self._dma_rounds()
        self.dma_rounds_done += 1

    # -- DMA ----------------------------------------------------------------------------------
    async def _dma_rounds(self) -> None:
        dma = self.context.dma
        slots = dma.regions()
        needed = 1 if self.legacy_v1 else 2
        regions = [slot for slot in slots[:needed] if slot is not None]
        if len(regions) < needed:
            raise DmaFault(f"lvu-sample: needs DMA regions in slots 0..{needed - 1}, have {slots}")
        for iova, size in regions:
            if size < DMA_SPAN:
                raise DmaFault(f"lvu-sample: DMA region at {iova:#x} is smaller than 4 KiB")

        if not self.legacy_v1:
            await self._mmap_round(regions[1][0])
        await self._message_round(regions[0][0])

    async def _mmap_round(self, iova: int) -> None:
        """Round 1: the second region, the ordinary way (mmap when fd-backed; logged)."""
        dma = self.context.dma
        for i in range(DMA_CHUNKS):
            at = i * DMA_CHUNK
            await dma.write(iova + at, DMA_PATTERN[at : at + DMA_CHUNK])
        back = [
            await dma.read(iova + at, DMA_READ_SIZE) for at in range(0, DMA_SPAN, DMA_READ_SIZE)
        ]
        self._compare(b"".join(back), "round 1", iova)

    async def _message_round(self, iova: int) -> None:
        """Round 2: the first region, through DMA_WRITE / DMA_READ messages."""
        dma = self.context.dma
        pattern = LEGACY_DMA_PATTERN if self.legacy_v1 else DMA_PATTERN
        for i in range(DMA_CHUNKS):
            at = i * DMA_CHUNK
            await dma.message_write(iova + at, pattern[at : at + DMA_CHUNK])
        back = [
            await dma.message_read(iova + at, DMA_READ_SIZE)
            for at in range(0, DMA_SPAN, DMA_READ_SIZE)
        ]
        self._compare(b"".join(back), "round 2", iova, pattern)

    @staticmethod
    def _compare(got: bytes, what: str, iova: int, pattern: bytes = DMA_PATTERN) -> None:
        if got != pattern:
            raise DeviceError(errno.EIO, f"lvu-sample: DMA {what} at {iova:#x} read back wrong")

    # -- life cycle ---------------------------------------------------------------------------
    def on_attach(self) -> None:
        self._attached = True
        self._waiter_queued = False
        self._start_waiter()

    def on_detach(self) -> None:
        self._attached = False
        self._waiter_queued = False  # the runtime drops queued and running jobs

    def reset(self) -> None:
        super().reset()
        self.deadline = None
        self._waiter_queued = False  # DEVICE_RESET cancels device jobs first

    def pause(self) -> None:
        self._paused = True  # the timer job sees it within poll_interval and ends

    def resume(self) -> None:
        # The sample re-arms from BAR0 whenever it enters RUNNING (so a migrated T counts).
        self._paused = False
        self._arm()

    # -- migration ----------------------------------------------------------------------------
    def migration_codec(self, limits: StreamLimits) -> LvuRawCodec:
        return LvuRawCodec(self.bar1, precopy_images=self.legacy_v1)

    def _time_bytes(self) -> bytes:
        return (self.bar0.value & _U64).to_bytes(TIME_SIZE, "little")

    def save_state(self) -> list[tuple[str, bytes]]:
        return [(SECTION_RAM, bytes(self.bar1.buffer)), (SECTION_TIME, self._time_bytes())]

    def precopy_start(self) -> list[tuple[str, bytes]]:
        return [(SECTION_RAM_LIVE, b"")]

    def stop_copy_sections(self, after_precopy: bool) -> list[tuple[str, bytes]]:
        return self.save_state()

    def migration_size_estimate(self) -> int:
        return self.bar1.size + TIME_SIZE

    def load_state(self, sections: Sequence[LoadedSection]) -> None:
        names = [name for name, _ in sections]
        if names != [SECTION_RAM, SECTION_TIME]:
            raise DeviceError(errno.EINVAL, f"lvu-sample state with sections {names}")
        ram, stamp = sections[0][1], sections[1][1]
        if len(ram) != self.bar1.size or len(stamp) != TIME_SIZE:
            raise DeviceError(errno.EINVAL, "lvu-sample state of the wrong size")
        self.bar1.buffer[:] = ram
        self.bar0.value = int.from_bytes(stamp, "little", signed=True)
        # Not armed here: the destination arms when it enters RUNNING (resume).
