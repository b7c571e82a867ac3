"""Client side of the legacy (v1) region-based migration and protocol-0.1 dirty pages.

What an older client (kernel VFIO 5.8-5.17, libvfio-user protocol 0.1) does, over our
:class:`~emulator.client.core.Client` (facts 8.3, 9.3; layout in :mod:`protocol.migration_v1`):

* find the migration region: the device-specific region (index >= 9) whose TYPE cap says
  3/1;
* change states by writing ``device_state`` with a read-modify-write (reserved bits kept);
* save: read ``pending_bytes``; while it is not 0: read ``data_offset`` (the device
  prepares a segment), ``data_size``, the segment's bytes at ``data_offset``, then
  ``pending_bytes`` again (acknowledging the segment);
* resume: per segment, read ``data_offset``, write the bytes there, write ``data_size``.

:func:`migrate` is :func:`emulator.client.migrate.migrate` for this interface: the devices
checked (source RUNNING, destination RUNNING or STOP, both the same device as far as
:mod:`emulator.client.compat` sees) before anything changes; a STOP destination (e.g. the source of
the previous migration, when a device goes back where it came from) is reset to RUNNING,
since v1 has no STOP -> RESUMING; destination RUNNING -> RESUMING; source SAVING|RUNNING
(pre-copy, optional), then SAVING (stop-and-copy) until ``pending_bytes`` is 0; source -> 0
(STOP); destination -> RUNNING. Segments go
to the destination as they are read, in order and with the same sizes (v1 requires both).
Any failure, discovery included, ends in :class:`MigrationError` after recovery (source
back to RUNNING along the v1 transitions, destination reset).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from emulator.client.compat import incompatibility
from emulator.client.core import Client
from emulator.client.migrate import RECOVERY_TIMEOUT, MigrationError, Mode, fail_after_recovery
from emulator.client.requests import ClientError, InvalidReply
from protocol.constants import PCI_NUM_REGIONS, Command, MigState, RegionFlags
from protocol.dirty_logging import bitmap_bytes
from protocol.messages import TypeCap
from protocol.migration_v1 import (
    BITS_TO_STATE,
    DATA_OFFSET_OFFSET,
    DATA_SIZE_OFFSET,
    DEVICE_STATE_OFFSET,
    ERROR_BITS,
    PENDING_BYTES_OFFSET,
    REGION_SUBTYPE_MIGRATION,
    REGION_TYPE_MIGRATION,
    STATE_MASK,
    BitmapRange,
    DirtyPages,
    DirtyPagesFlags,
    StateBits,
)

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
PCI_FIXED_REGIONS = PCI_NUM_REGIONS
#: Pre-copy stops after this many segment rounds even if the device keeps changing.
DEFAULT_PRECOPY_SEGMENTS = 64

RUNNING = StateBits.RUNNING
SAVING = StateBits.SAVING
RESUMING = StateBits.RESUMING
STOP = 0
BITS_STATES = {**BITS_TO_STATE, int(ERROR_BITS): MigState.ERROR}


def state_name(bits: int) -> str:
    """The v2 name of a ``device_state`` value's state bits (ERROR for SAVING|RESUMING)."""
    state = BITS_STATES.get(bits & STATE_MASK)
    return state.name if state is not None else f"invalid state {bits:#x}"


# -- dirty pages (14) --------------------------------------------------------------------------


async def dirty_pages_start(client: Client) -> None:
    await client.request(Command.DIRTY_PAGES, DirtyPages(8, DirtyPagesFlags.START).pack())


async def dirty_pages_stop(client: Client) -> None:
    await client.request(Command.DIRTY_PAGES, DirtyPages(8, DirtyPagesFlags.STOP).pack())


async def dirty_bitmap(client: Client, iova: int, size: int, pgsize: int = 4096) -> bytes:
    """GET_BITMAP for ``[iova, iova+size)``: one bit per page, LSB first, u64 words."""
    bitmap_size = bitmap_bytes(size, pgsize)
    request = DirtyPages(
        40 + bitmap_size, DirtyPagesFlags.GET_BITMAP, BitmapRange(iova, size, pgsize, bitmap_size)
    )
    _, payload, fds = await client.request(Command.DIRTY_PAGES, request.pack())
    if fds or len(payload) != 40 + bitmap_size or payload[8:40] != request.pack()[8:]:
        raise InvalidReply(Command.DIRTY_PAGES, f"GET_BITMAP reply of {len(payload)} bytes")
    return payload[40:]


# -- the region ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationRegionInfo:
    index: int
    size: int


async def find_region(client: Client, side: str = "the device") -> MigrationRegionInfo:
    """The device's v1 migration region (TYPE cap 3/1 among the device-specific regions);
    ``side`` names the device in the error."""
    info = await client.get_info()
    for index in range(PCI_FIXED_REGIONS, info.num_regions):
        region = await client.get_region_info(index)
        if region.fd is not None:
            os.close(region.fd)
        wanted = TypeCap(REGION_TYPE_MIGRATION, REGION_SUBTYPE_MIGRATION)
        if wanted in region.caps and region.info.flags & RegionFlags.WRITE:
            return MigrationRegionInfo(index, region.info.size)
    raise MigrationError(
        f"{side} has no v1 migration region (serve it with --device TYPE,migration=v1 or "
        "migration=both)",
        stage="discovery",
    )


async def _read_u64(client: Client, region: int, offset: int) -> int:
    value: int = U64.unpack(await client.region_read(region, offset, 8))[0]
    return value


async def get_device_state(client: Client, region: int) -> int:
    """The raw ``device_state`` register (reserved bits included)."""
    value: int = U32.unpack(await client.region_read(region, DEVICE_STATE_OFFSET, 4))[0]
    return value


async def set_device_state(client: Client, region: int, bits: int) -> None:
    """Read-modify-write of ``device_state``: the state bits become ``bits``."""
    current = await get_device_state(client, region)
    value = (current & ~STATE_MASK & 0xFFFF_FFFF) | (bits & STATE_MASK)
    await client.region_write(region, DEVICE_STATE_OFFSET, U32.pack(value))


async def pending_bytes(client: Client, region: int) -> int:
    return await _read_u64(client, region, PENDING_BYTES_OFFSET)


def _chunk(client: Client) -> int:
    return max(1, min(client.server_max_data_xfer_size, 1 << 20))


async def read_segment(client: Client, region: int) -> bytes:
    """One save iteration after a non-zero ``pending_bytes``: the next segment."""
    offset = await _read_u64(client, region, DATA_OFFSET_OFFSET)
    size = await _read_u64(client, region, DATA_SIZE_OFFSET)
    step = _chunk(client)
    parts = [
        await client.region_read(region, offset + at, min(step, size - at))
        for at in range(0, size, step)
    ]
    return b"".join(parts)


async def segments(
    client: Client, region: int, *, limit: int | None = None, precopy: bool = False
) -> AsyncIterator[bytes]:
    """Segments while ``pending_bytes`` is not 0 (at most ``limit``); each is acknowledged
    by the ``pending_bytes`` read that follows it. An empty segment although bytes were
    pending means "nothing now" in pre-copy (``precopy``); in stop-and-copy it would end a
    stream the device said was not complete, so it is an InvalidReply."""
    count = 0
    while pending := await pending_bytes(client, region):
        if limit is not None and count >= limit:
            return
        segment = await read_segment(client, region)
        count += 1
        if not segment:
            if precopy:
                return
            raise InvalidReply(
                Command.REGION_READ,
                f"stop-and-copy: an empty segment while pending_bytes was {pending}",
            )
        yield segment


async def write_segment(client: Client, region: int, segment: bytes) -> None:
    """One resume iteration: the segment into the data window, then its size."""
    offset = await _read_u64(client, region, DATA_OFFSET_OFFSET)
    step = _chunk(client)
    for at in range(0, len(segment), step):
        await client.region_write(region, offset + at, segment[at : at + step])
    await client.region_write(region, DATA_SIZE_OFFSET, U64.pack(len(segment)))


# -- a whole migration ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationReportV1:
    mode: Mode
    bytes_moved: int
    precopy_bytes: int
    segments: int
    downtime_s: float
    total_s: float

    def lines(self) -> list[str]:
        return [
            "protocol: v1 (migration region)",
            f"mode: {self.mode}",
            f"bytes moved: {self.bytes_moved} in {self.segments} segment(s)",
            f"pre-copy bytes: {self.precopy_bytes}",
            f"downtime: {self.downtime_s * 1e3:.3f} ms",
            f"total time: {self.total_s * 1e3:.3f} ms",
        ]


async def migrate(
    source: Client,
    destination: Client,
    *,
    mode: Mode = "stop-copy",
    precopy_segments: int = DEFAULT_PRECOPY_SEGMENTS,
    check_devices: bool = True,
) -> MigrationReportV1:
    """Migrate through the v1 regions only. On failure the source is put back to RUNNING
    and the destination reset (best effort) and :class:`MigrationError` is raised.
    ``check_devices=False`` skips the comparison of the two devices (:mod:`emulator.client.compat`)
    and leaves an incompatible state for the destination to refuse."""
    started = time.perf_counter()
    run = _Run(source, destination, check_devices=check_devices)
    try:
        return await run.transfer(mode, precopy_segments, started)
    except BaseException as exc:
        await fail_after_recovery(run, exc, "v1 migration")


class _Run:
    """One v1 migration: where it is (``stage``) and what it touched (for recovery)."""

    def __init__(self, source: Client, destination: Client, *, check_devices: bool) -> None:
        self.check_devices = check_devices
        self.source = source
        self.destination = destination
        self.stage = "discovery"
        self.src: MigrationRegionInfo | None = None
        self.destination_touched = False

    async def transfer(
        self, mode: Mode, precopy_segments: int, started: float
    ) -> MigrationReportV1:
        source, destination = self.source, self.destination
        src = await find_region(source, "the source")
        dst = await find_region(destination, "the destination")
        self.stage = "checking the devices"
        src_bits = await get_device_state(source, src.index) & STATE_MASK
        dst_bits = await get_device_state(destination, dst.index) & STATE_MASK
        if src_bits != RUNNING:
            raise MigrationError(
                f"source is in {state_name(src_bits)}; a v1 migration starts from RUNNING",
                stage=self.stage,
            )
        if dst_bits not in (RUNNING, STOP):
            raise MigrationError(
                f"destination is in {state_name(dst_bits)}; it must be RUNNING or STOP",
                stage=self.stage,
            )
        if self.check_devices:
            self.stage = "comparing the devices"
            problem = await incompatibility(source, destination)
            if problem is not None:
                raise MigrationError(problem, stage=self.stage)
        self.src = src
        moved = precopy = count = 0
        self.destination_touched = True
        if dst_bits == STOP:
            # A stopped device (e.g. the source of an earlier migration) holds a state
            # that must not run again, and v1 has no STOP -> RESUMING: DEVICE_RESET it
            # (back to RUNNING, as a freshly started destination).
            self.stage = "resetting the stopped destination (DEVICE_RESET -> RUNNING)"
            await destination.reset()
        self.stage = "destination RUNNING -> RESUMING"
        await set_device_state(destination, dst.index, RESUMING)
        if mode == "pre-copy":
            self.stage = "source pre-copy"
            await set_device_state(source, src.index, SAVING | RUNNING)
            limit = precopy_segments
            async for segment in segments(source, src.index, limit=limit, precopy=True):
                await write_segment(destination, dst.index, segment)
                precopy += len(segment)
                count += 1
        self.stage = "source stop-and-copy"
        stopped = time.perf_counter()
        await set_device_state(source, src.index, SAVING)
        async for segment in segments(source, src.index):
            await write_segment(destination, dst.index, segment)
            moved += len(segment)
            count += 1
        self.stage = "source -> STOP"
        await set_device_state(source, src.index, 0)
        self.stage = "destination RESUMING -> RUNNING (loading the state)"
        await set_device_state(destination, dst.index, RUNNING)
        done = time.perf_counter()
        return MigrationReportV1(
            mode, moved + precopy, precopy, count, done - stopped, done - started
        )

    async def recover(self) -> list[str]:
        """Best effort, shielded and bounded: the source back to RUNNING, the destination
        reset. Nothing was touched before discovery completed."""
        notes: list[str] = []
        with trio.CancelScope(shield=True), trio.move_on_after(RECOVERY_TIMEOUT) as scope:
            if self.src is not None:
                notes.append(await _recover_source(self.source, self.src.index))
            if self.destination_touched:
                notes.append(await _recover_destination(self.destination))
        if scope.cancelled_caught:
            notes.append(f"recovery gave up after {RECOVERY_TIMEOUT:g}s")
        return notes


async def _recover_source(source: Client, region: int) -> str:
    """Back to RUNNING along the v1 table: pre-copy may only go on to stop-and-copy, which
    may return to RUNNING."""
    try:
        bits = await get_device_state(source, region) & STATE_MASK
        if bits == RUNNING:
            return "source still RUNNING"
        if bits & SAVING and bits & RUNNING:  # PRE_COPY or PRE_COPY_P2P
            await set_device_state(source, region, SAVING)
        await set_device_state(source, region, RUNNING)
    except ClientError as exc:
        return f"source left as it is ({exc})"
    return "source -> RUNNING"


async def _recover_destination(destination: Client) -> str:
    try:
        await destination.reset()
    except ClientError as exc:
        return f"destination left as it is ({exc})"
    return "destination DEVICE_RESET -> RUNNING"
