"""``lvu-sample`` in process: layout, BAR0 timer, DMA rounds, raw migration stream."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import pytest
import trio

from devices.api import REGION_CONFIG, DeviceContext, DeviceError, DmaFault
from devices.irq import ERR, INTX, MSI, MSIX, REQ
from devices.lvu_sample import (
    DMA_PATTERN,
    RAM_SIZE,
    SECTION_RAM,
    SECTION_RAM_LIVE,
    SECTION_TIME,
    SPARSE_AREAS,
    STOP_COPY_SIZE,
    LvuRawCodec,
    LvuSample,
)
from devices.migration.engine import EnvelopeCodec
from devices.migration.stream import StreamLimits
from devices.registry import DEVICE_TYPES, create_device
from emulator.dma import DirtyLog, DmaEngine, IovaMap
from protocol.constants import DmaMapFlags, MigrationCaps, MigState
from protocol.messages import DmaMap

NOW = 1_795_235_000.25  # a wall clock with a fraction, as time.time() has

# The client's 64-byte config read (lvu-client-server.jsonl #28), except that libvfio-user
# also shows its unused BARs 2-5 as I/O BARs (0x1); ours read 0.
EXPECTED_CONFIG = bytes.fromhex(
    "addeefbe000000000000000000000000"
    "01000000010000000000000000000000"
    "000000000000000000000000fecabeba"
    "00000000000000000000000000010000"
)


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now
        self.slept: list[float] = []
        self.during_sleep: Callable[[], None] | None = None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if self.during_sleep is not None:
            self.during_sleep()


class FakeDma:
    """Guest memory with the region list and message DMA the device asks the runtime for."""

    def __init__(self, regions: Sequence[tuple[int, int]] = ((0x0, 0x1000), (0x1000, 0x1000))):
        self.slots: list[tuple[int, int] | None] = list(regions)
        self.memory = bytearray(0x10000)
        self.log: list[tuple[str, int, int]] = []
        self.corrupt_reads = False

    def regions(self) -> list[tuple[int, int] | None]:
        return self.slots

    def _read(self, kind: str, iova: int, length: int) -> bytes:
        self.log.append((kind, iova, length))
        data = bytes(self.memory[iova : iova + length])
        return data[::-1] if self.corrupt_reads else data

    def _write(self, kind: str, iova: int, data: bytes | bytearray | memoryview) -> None:
        self.log.append((kind, iova, len(data)))
        self.memory[iova : iova + len(data)] = data

    async def read(self, iova: int, length: int) -> bytes:
        return self._read("read", iova, length)

    async def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        self._write("write", iova, data)

    async def read_sg(self, segments: list[tuple[int, int]]) -> bytes:
        raise NotImplementedError

    async def write_sg(
        self, segments: list[tuple[int, int]], data: bytes | bytearray | memoryview
    ) -> None:
        raise NotImplementedError

    async def message_write(self, iova: int, data: bytes) -> None:
        self._write("msg-write", iova, data)

    async def message_read(self, iova: int, count: int) -> bytes:
        return self._read("msg-read", iova, count)


class FakeContext:
    def __init__(self, dma: FakeDma | None = None) -> None:
        self._dma = dma or FakeDma()
        self.jobs: list[Callable[[], Awaitable[None]]] = []

    @property
    def dma(self) -> FakeDma:
        return self._dma

    def submit(self, job: Callable[[], Awaitable[None]]) -> bool:
        self.jobs.append(job)
        return True

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def sleep_until_work(self, seconds: float) -> None:
        await trio.sleep(0 if self.jobs else seconds)

    async def run_jobs(self) -> None:
        while self.jobs:
            await self.jobs.pop(0)()


class RecordingSink:
    def __init__(self) -> None:
        self.fired: list[tuple[int, int]] = []

    def fire(self, index: int, vector: int) -> bool:
        self.fired.append((index, vector))
        return True


def make_device(clock: FakeClock | None = None) -> tuple[LvuSample, FakeClock]:
    clock = clock or FakeClock()
    return LvuSample(sleep=clock.sleep, clock=clock, poll_interval=0.25), clock


def attached(clock: FakeClock | None = None) -> tuple[LvuSample, FakeClock, FakeContext]:
    device, clock = make_device(clock)
    context = FakeContext()
    device.irq.sink = RecordingSink()
    device.attach(cast(DeviceContext, context))
    return device, clock, context


def time_bytes(value: int) -> bytes:
    return (value & (1 << 64) - 1).to_bytes(8, "little")


# --------------------------------------------------------------------------------------------
# Layout


def test_regions_irqs_and_config():
    device, _ = make_device()
    assert device.num_regions == 9
    present = {index: region.size for index, region in device.regions.items() if region.size}
    assert present == {0: 8, 1: 0x4000, REGION_CONFIG: 256}
    assert device.regions[0].mmap_areas == ()
    assert device.regions[1].mmap_areas == SPARSE_AREAS == ((0, 0x1000), (0x2000, 0x1000))
    counts = {index: device.irq.count(index) for index in (INTX, MSI, MSIX, ERR, REQ)}
    assert counts == {INTX: 1, MSI: 0, MSIX: 0, ERR: 1, REQ: 1}
    assert device.region_read(REGION_CONFIG, 0, 64) == EXPECTED_CONFIG
    assert device.supports_reset


def test_migration_profile():
    device, _ = make_device()
    assert device.migration.caps == MigrationCaps.STOP_COPY | MigrationCaps.PRE_COPY
    assert device.migration_generic_state is False
    codec = device.migration_codec(StreamLimits())
    assert type(codec) is LvuRawCodec
    assert not isinstance(device.migration_codec(StreamLimits()), EnvelopeCodec)
    assert device.migration_size_estimate() == STOP_COPY_SIZE == 0x4008


def test_registry_builds_it_and_its_timer_uses_the_context_sleep():
    assert "lvu-sample" in DEVICE_TYPES
    device = create_device("lvu-sample")
    assert isinstance(device, LvuSample)
    context = FakeContext()
    device.attach(cast(DeviceContext, context))
    assert device._sleeper() == context.sleep
    narrowed = create_device("lvu-sample,mig-caps=stop_copy")
    assert narrowed.migration.caps == MigrationCaps.STOP_COPY


# --------------------------------------------------------------------------------------------
# BAR0 and BAR1


def test_bar0_reads_now_minus_t():
    device, clock = make_device()
    t = int(NOW) + 1
    device.region_write(0, 0, time_bytes(t))
    assert device.time_value == t
    assert device.region_read(0, 0, 8) == b"\xff" * 8  # -1, as the trace's client read it
    clock.now += 100
    assert int.from_bytes(device.region_read(0, 0, 8), "little", signed=True) == 99
    device.region_write(0, 0, time_bytes(-5))
    assert device.time_value == -5


@pytest.mark.parametrize(("offset", "count"), [(0, 4), (4, 4), (0, 1), (7, 1)])
def test_bar0_only_whole_time_t_accesses(offset, count):
    device, _ = make_device()
    for access in (
        lambda: device.region_read(0, offset, count),
        lambda: device.region_write(0, offset, bytes(count)),
    ):
        with pytest.raises(DeviceError) as info:
            access()
        assert info.value.errno == errno.EINVAL
    assert device.time_value == 0 and not device.armed


def test_bar1_is_plain_ram():
    device, _ = make_device()
    device.region_write(1, 0x3FF0, b"0123456789abcdef")
    assert device.region_read(1, 0x3FF0, 16) == b"0123456789abcdef"
    assert bytes(device.bar1.buffer[0x3FF0:]) == b"0123456789abcdef"
    with pytest.raises(DeviceError):
        device.region_write(1, 0x3FF8, bytes(16))


def test_reset_clears_time_ram_and_timer():
    device, _, _ = attached()
    device.region_write(0, 0, time_bytes(int(NOW) + 5))
    device.region_write(1, 0, b"x" * 16)
    device.reset()
    assert device.time_value == 0 and not device.armed
    assert bytes(device.bar1.buffer) == bytes(RAM_SIZE)


# --------------------------------------------------------------------------------------------
# The timer


def test_arming_follows_setitimer():
    device, _, context = attached()
    device.region_write(0, 0, time_bytes(int(NOW) + 2))
    # setitimer(T - time(NULL)): whole seconds from now.
    assert device.deadline == NOW + 2
    assert len(context.jobs) == 1
    device.region_write(0, 0, time_bytes(int(NOW) + 3))
    assert device.deadline == NOW + 3
    assert len(context.jobs) == 1, "one timer job at a time"
    for past in (int(NOW), int(NOW) - 10):
        device.region_write(0, 0, time_bytes(past))
        assert not device.armed, "a delay that is not positive leaves it disarmed"


async def test_timer_fires_intx_then_dma_rounds():
    device, clock, context = attached()
    device.region_write(0, 0, time_bytes(int(NOW) + 1))
    await context.run_jobs()
    assert clock.now >= NOW + 1
    assert max(clock.slept) <= device.poll_interval
    assert device.irq.sink.fired == [(INTX, 0)]  # type: ignore[attr-defined]
    assert not device.irq.intx_line, "an edge: nothing acknowledges a level"
    assert device.expirations == 1 and device.dma_rounds_done == 1 and not device.armed
    kib = 1024
    assert context.dma.log == [
        # round 1: the 2nd region, ordinary DMA (mmap for an fd-backed map)
        *[("write", 0x1000 + i * kib, kib) for i in range(4)],
        ("read", 0x1000, 2 * kib),
        ("read", 0x1800, 2 * kib),
        # round 2: the 1st region, forced through messages
        *[("msg-write", i * kib, kib) for i in range(4)],
        ("msg-read", 0x0, 2 * kib),
        ("msg-read", 0x800, 2 * kib),
    ]
    assert context.dma.memory[:0x1000] == DMA_PATTERN
    assert context.dma.memory[0x1000:0x2000] == DMA_PATTERN
    assert b"A" * kib + b"B" * kib + b"C" * kib + b"D" * kib == DMA_PATTERN


async def test_dma_failures_are_reported():
    device, _, context = attached()
    context.dma.slots = [(0x0, 0x1000)]
    with pytest.raises(DmaFault):
        await device.expire()
    context.dma.slots = [(0x0, 0x1000), (0x1000, 0x1000)]
    context.dma.corrupt_reads = True
    with pytest.raises(DeviceError) as info:
        await device.expire()
    assert info.value.errno == errno.EIO
    assert device.dma_rounds_done == 0


async def test_pause_ends_the_timer_job_and_resume_rearms():
    device, clock, context = attached()
    device.region_write(0, 0, time_bytes(int(NOW) + 5))
    job = context.jobs.pop()
    clock.during_sleep = device.pause
    await job()
    assert device.expirations == 0 and device.armed
    clock.during_sleep = None
    clock.now = NOW + 1
    device.resume()
    assert device.deadline == NOW + 1 + 4  # re-armed from T, whole seconds
    await context.run_jobs()
    assert device.expirations == 1


async def test_stopped_past_t_never_fires():
    device, clock, context = attached()
    device.region_write(0, 0, time_bytes(int(NOW) + 1))
    device.pause()
    await context.run_jobs()
    clock.now += 10
    device.resume()
    assert not device.armed and not context.jobs


def test_no_timer_job_without_a_client():
    device, _ = make_device()
    device.region_write(0, 0, time_bytes(int(NOW) + 1))
    assert device.armed  # detached: armed, waiting for a client
    context = FakeContext()
    device.attach(cast(DeviceContext, context))
    assert len(context.jobs) == 1, "attaching starts the armed timer"
    device.detach()
    device.region_write(0, 0, time_bytes(int(NOW) + 2))
    assert device.armed  # re-armed while detached: no job until a client attaches


# --------------------------------------------------------------------------------------------
# DMA windows over the emulator's DMA engine


class Channel:
    max_transfer = 1024

    def __init__(self) -> None:
        self.memory = bytearray(0x3000)
        self.log: list[tuple[str, int, int]] = []

    async def checkpoint(self) -> None:
        pass

    async def dma_read(self, address: int, count: int) -> bytes:
        self.log.append(("DMA_READ", address, count))
        return bytes(self.memory[address : address + count])

    async def dma_write(self, address: int, data: bytes) -> None:
        self.log.append(("DMA_WRITE", address, len(data)))
        self.memory[address : address + len(data)] = data


async def test_dma_engine_regions_and_message_dma():
    maps = IovaMap(16)
    rw = DmaMapFlags.READ | DmaMapFlags.WRITE
    maps.add(DmaMap(32, rw, 0, 0x1000, 0x1000), None)
    maps.add(DmaMap(32, rw, 0, 0x0, 0x1000), None)
    maps.add(DmaMap(32, DmaMapFlags.READ, 0, 0x2000, 0x1000), None)
    channel = Channel()
    engine = DmaEngine(maps, channel, DirtyLog())
    # DMA_MAP order, not IOVA order; a freed slot is reused by the next map.
    assert engine.regions() == [(0x1000, 0x1000), (0x0, 0x1000), (0x2000, 0x1000)]
    maps.remove(0x0, 0x1000)
    assert engine.regions() == [(0x1000, 0x1000), None, (0x2000, 0x1000)]
    maps.add(DmaMap(32, rw, 0, 0x0, 0x1000), None)
    assert engine.regions() == [(0x1000, 0x1000), (0x0, 0x1000), (0x2000, 0x1000)]
    await engine.message_write(0x400, b"z" * 2048)
    assert await engine.message_read(0x400, 2048) == b"z" * 2048
    assert channel.log == [
        ("DMA_WRITE", 0x400, 1024),
        ("DMA_WRITE", 0x800, 1024),
        ("DMA_READ", 0x400, 1024),
        ("DMA_READ", 0x800, 1024),
    ]
    with pytest.raises(DmaFault):
        await engine.message_write(0x2000, b"x")  # read-only map
    with pytest.raises(DmaFault):
        await engine.message_read(0x3000, 1)  # unmapped
    engine.enabled = False
    with pytest.raises(DmaFault):
        await engine.message_read(0x0, 1)


# --------------------------------------------------------------------------------------------
# The raw stream


def test_codec_round_trip_and_rejection():
    device, _ = make_device()
    device.bar1.buffer[:] = bytes(range(256)) * (RAM_SIZE // 256)
    device.bar0.value = 0x1122334455667788
    codec = device.migration_codec(StreamLimits())
    assert codec.begin(b"\0" * 16) == b"" and codec.end() == b""
    stream = b"".join(bytes(piece) for piece in codec.sections(device.save_state()))
    assert stream == bytes(device.bar1.buffer) + bytes.fromhex("8877665544332211")
    sections = codec.decode(memoryview(stream))
    assert [(name, bytes(payload)) for name, payload in sections] == device.save_state()
    for size in (0, 8, RAM_SIZE, STOP_COPY_SIZE - 1, STOP_COPY_SIZE + 1, 2 * STOP_COPY_SIZE):
        with pytest.raises(DeviceError) as info:
            codec.decode(memoryview(bytes(size)))
        assert info.value.errno == errno.EINVAL
    with pytest.raises(DeviceError):
        codec.sections([("pci.config", b"")])


def test_precopy_section_is_live_bar1():
    device, _ = make_device()
    codec = device.migration_codec(StreamLimits())
    (piece,) = codec.sections(device.precopy_start())
    assert device.precopy_start() == [(SECTION_RAM_LIVE, b"")]
    device.region_write(1, 0, b"later")
    assert bytes(piece[:5]) == b"later"


def test_load_state_validates_before_applying():
    device, _ = make_device()
    good = [(SECTION_RAM, b"r" * RAM_SIZE), (SECTION_TIME, time_bytes(42))]
    for bad in (
        good[:1],
        good[::-1],
        [(SECTION_RAM, b"r" * (RAM_SIZE - 1)), good[1]],
        [good[0], (SECTION_TIME, b"1234567")],
    ):
        with pytest.raises(DeviceError):
            device.load_state(bad)
        assert device.time_value == 0 and bytes(device.bar1.buffer) == bytes(RAM_SIZE)
    device.load_state(good)
    assert device.time_value == 42 and bytes(device.bar1.buffer) == b"r" * RAM_SIZE
    assert not device.armed, "loading does not arm; entering RUNNING does"


async def read_all(device: LvuSample, size: int = 1024) -> list[bytes]:
    chunks = []
    while chunk := device.migration.read_data(size):
        chunks.append(chunk)
    return chunks


async def test_migration_through_the_engine():
    source, _ = make_device()
    context = FakeContext()
    source.attach(cast(DeviceContext, context))
    initial = bytes(i % 251 for i in range(RAM_SIZE))
    source.region_write(1, 0, initial)
    t = int(NOW) + 10
    source.region_write(0, 0, time_bytes(t))

    source.migration.set_state(MigState.PRE_COPY)
    pre = []
    for k in range(16):
        pre.append(source.migration.read_data(1024))
        source.region_write(1, 0, bytes([k]) * RAM_SIZE)  # the client keeps writing BAR1
    assert pre[0] == initial[:1024]
    assert pre[1:] == [bytes([k]) * 1024 for k in range(15)], "PRE_COPY reads BAR1 live"
    assert source.migration.read_data(1024) == b"", "no more PRE_COPY data for now"
    final = bytes(source.bar1.buffer)

    source.migration.set_state(MigState.STOP_COPY)
    stop = await read_all(source)
    assert [len(c) for c in stop] == [1024] * 16 + [8]
    assert b"".join(stop) == final + time_bytes(t)
    source.migration.set_state(MigState.STOP)

    destination, _ = make_device(FakeClock())
    destination.attach(cast(DeviceContext, FakeContext()))
    destination.migration.set_state(MigState.RESUMING)
    for chunk in stop:
        destination.migration.write_data(chunk)
    destination.migration.set_state(MigState.STOP)
    assert bytes(destination.bar1.buffer) == final and destination.time_value == t
    assert not destination.armed
    destination.migration.set_state(MigState.RUNNING)
    assert destination.deadline == NOW + 10, "RUNNING re-arms the migrated timer"


@pytest.mark.parametrize("size", [0, RAM_SIZE, STOP_COPY_SIZE - 1, STOP_COPY_SIZE + 1])
async def test_destination_rejects_a_stream_of_the_wrong_size(size):
    device, _ = make_device()
    device.migration.set_state(MigState.RESUMING)
    for at in range(0, size, 1024):
        device.migration.write_data(b"\x55" * min(1024, size - at))
    with pytest.raises(DeviceError) as info:
        device.migration.set_state(MigState.STOP)
    assert info.value.errno == errno.EINVAL
    assert device.migration.state == MigState.RESUMING
    assert bytes(device.bar1.buffer) == bytes(RAM_SIZE) and device.time_value == 0
    # A complete stream written afterwards is accepted.
    device.migration.write_data(b"\x66" * RAM_SIZE + time_bytes(7))
    device.migration.set_state(MigState.STOP)
    assert device.time_value == 7 and bytes(device.bar1.buffer) == b"\x66" * RAM_SIZE
