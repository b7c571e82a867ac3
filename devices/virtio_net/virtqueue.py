"""Split virtqueues (virtio 1.x section 2.7) as a device walks them: every ring index,
descriptor and length the driver wrote is hostile input.

A :class:`VirtQueue` holds the state the transport programs (size, ring addresses, MSI-X
vector, enable) and the device's own progress (``last_avail``, ``used_idx``), all of which
migrate. :func:`pop_chains` reads available descriptor chains *without* moving the queue
(the caller commits with :meth:`VirtQueue.consume` once their used entries are written), so
a job cancelled at any await leaves the queue as it was and the next job redoes the work.
Driver errors raise :class:`VirtqueueError`: the device then sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from devices.api import Dma

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_SIZE = 16
USED_ELEM = struct.Struct("<II")  # id, len
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 1024
NO_VECTOR = 0xFFFF
#: Longest descriptor chain (direct or through an indirect table) the device follows.
MAX_CHAIN = MAX_QUEUE_SIZE
#: Bytes one chain may describe in one direction; more is a driver error.
MAX_CHAIN_BYTES = 1 << 20


class VirtqueueError(Exception):
    """The driver broke the ring rules: the device needs a reset."""


@dataclass(slots=True)
class Chain:
    """One available descriptor chain: its head index and its buffers, device-readable
    ones first (``(guest address, length)``)."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_bytes(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_bytes(self) -> int:
        return sum(length for _, length in self.writable)


@dataclass(slots=True)
class VirtQueue:
    index: int
    max_size: int
    size: int = 0
    enabled: bool = False
    vector: int = NO_VECTOR
    desc: int = 0  # descriptor table
    driver: int = 0  # available ring
    device: int = 0  # used ring
    last_avail: int = 0  # next available entry the device takes (free-running u16)
    used_idx: int = 0  # next used entry the device writes (free-running u16)
    #: used_idx when the device last decided about an interrupt (EVENT_IDX); None: unknown.
    signalled_used: int | None = None

    def __post_init__(self) -> None:
        self.size = self.max_size

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.vector = NO_VECTOR
        self.desc = self.driver = self.device = 0
        self.last_avail = self.used_idx = 0
        self.signalled_used = None

    # -- ring addresses ------------------------------------------------------------------
    @property
    def avail_idx_address(self) -> int:
        return self.driver + 2

    def avail_entry_address(self, position: int) -> int:
        return self.driver + 4 + 2 * (position % self.size)

    @property
    def used_event_address(self) -> int:
        return self.driver + 4 + 2 * self.size

    @property
    def used_idx_address(self) -> int:
        return self.device + 2

    def used_entry_address(self, position: int) -> int:
        return self.device + 4 + USED_ELEM.size * (position % self.size)

    @property
    def avail_event_address(self) -> int:
        return self.device + 4 + USED_ELEM.size * self.size

    def ring_ranges(self) -> list[tuple[int, int]]:
        """``(address, length)`` of the descriptor table and both rings (event fields
        included)."""
        return [
            (self.desc, DESC_SIZE * self.size),
            (self.driver, 6 + 2 * self.size),
            (self.device, 6 + USED_ELEM.size * self.size),
        ]

    def check_layout(self) -> None:
        """The ring geometry the driver programmed (before enabling)."""
        if self.size == 0 or self.size & (self.size - 1) or self.size > self.max_size:
            raise VirtqueueError(f"queue {self.index}: size {self.size} is not a power of two")
        if self.desc % 16 or self.driver % 2 or self.device % 4:
            raise VirtqueueError(f"queue {self.index}: misaligned ring addresses")

    # -- progress ------------------------------------------------------------------------
    def consume(self, count: int) -> None:
        """Commit: ``count`` available chains taken and as many used entries published."""
        self.last_avail = (self.last_avail + count) & 0xFFFF
        self.used_idx = (self.used_idx + count) & 0xFFFF


async def available(dma: Dma, queue: VirtQueue) -> int:
    """How many chains the driver has made available beyond ``last_avail``."""
    raw = await dma.read(queue.avail_idx_address, 2)
    pending = (int.from_bytes(raw, "little") - queue.last_avail) & 0xFFFF
    if pending > queue.size:
        raise VirtqueueError(f"queue {queue.index}: avail idx is {pending} entries ahead")
    return pending


async def avail_heads(dma: Dma, queue: VirtQueue, count: int) -> list[int]:
    """Head indices of the next ``count`` available entries (one or two reads: wrap)."""
    start = queue.last_avail % queue.size
    first = min(count, queue.size - start)
    raw = await dma.read(queue.avail_entry_address(start), 2 * first)
    if count > first:
        raw += await dma.read(queue.avail_entry_address(0), 2 * (count - first))
    heads = list(struct.unpack(f"<{count}H", raw))
    for head in heads:
        if head >= queue.size:
            raise VirtqueueError(f"queue {queue.index}: head {head} >= size {queue.size}")
    return heads


RangeCheck = Callable[[list[tuple[int, int]]], None]


async def read_chain(
    dma: Dma,
    queue: VirtQueue,
    head: int,
    *,
    indirect_ok: bool,
    ring: bytes | None = None,
    check: RangeCheck | None = None,
) -> Chain:
    """Follow a descriptor chain from ``head`` (through an indirect table if there is one),
    checking every rule a driver can break: indices in range, no loops, no nested or
    chained indirect tables, readable buffers before writable ones, bounded lengths.
    ``ring``: the descriptor table, already read (a batch reads it once); ``check``
    raises for an indirect table the driver placed outside its memory."""
    chain = Chain(head)
    table, table_size = queue.desc, queue.size
    index = head
    seen = 0
    in_indirect = False
    while True:
        seen += 1
        if seen > table_size:
            raise VirtqueueError(f"queue {queue.index}: descriptor chain loops or is too long")
        if ring is not None and not in_indirect:
            address, length, flags, next_index = DESC.unpack_from(ring, DESC_SIZE * index)
        else:
            address, length, flags, next_index = DESC.unpack(
                await dma.read(table + DESC_SIZE * index, DESC_SIZE)
            )
        if flags & F_INDIRECT:
            # Only a chain's head may point to a table (QEMU's rule too), never with NEXT.
            if not indirect_ok or in_indirect or flags & F_NEXT or seen > 1:
                raise VirtqueueError(f"queue {queue.index}: indirect descriptor not allowed")
            if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_CHAIN:
                raise VirtqueueError(f"queue {queue.index}: indirect table of {length} bytes")
            if check is not None:
                check([(address, length)])
            table, table_size = address, length // DESC_SIZE
            index, seen, in_indirect = 0, 0, True
            continue
        _add_buffer(queue, chain, address, length, flags)
        if not flags & F_NEXT:
            return chain
        if next_index >= table_size:
            raise VirtqueueError(f"queue {queue.index}: next {next_index} >= {table_size}")
        index = next_index


def _add_buffer(queue: VirtQueue, chain: Chain, address: int, length: int, flags: int) -> None:
    if address + length > 1 << 64:
        raise VirtqueueError(f"queue {queue.index}: buffer wraps the address space")
    if flags & F_WRITE:
        chain.writable.append((address, length))
        if chain.writable_bytes > MAX_CHAIN_BYTES:
            raise VirtqueueError(f"queue {queue.index}: chain of more than 1 MiB")
    else:
        if chain.writable:
            raise VirtqueueError(f"queue {queue.index}: readable buffer after a writable one")
        chain.readable.append((address, length))
        if chain.readable_bytes > MAX_CHAIN_BYTES:
            raise VirtqueueError(f"queue {queue.index}: chain of more than 1 MiB")


async def pop_chains(
    dma: Dma, queue: VirtQueue, limit: int, *, indirect_ok: bool, check: RangeCheck | None = None
) -> list[Chain]:
    """Up to ``limit`` available chains from ``last_avail``; the queue does not move."""
    count = min(await available(dma, queue), limit)
    if not count:
        return []
    heads = await avail_heads(dma, queue, count)
    # One read of the whole table beats one per descriptor once a batch has a few chains.
    ring = await dma.read(queue.desc, DESC_SIZE * queue.size) if count >= 4 else None
    return [
        await read_chain(dma, queue, head, indirect_ok=indirect_ok, ring=ring, check=check)
        for head in heads
    ]


def used_entries(queue: VirtQueue, entries: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    """``(head, written length)`` entries as (address, bytes) runs from ``used_idx``
    (two runs when the ring wraps)."""
    start = queue.used_idx % queue.size
    first = min(len(entries), queue.size - start)
    runs = [
        (
            queue.used_entry_address(start),
            b"".join(USED_ELEM.pack(head, length) for head, length in entries[:first]),
        )
    ]
    if len(entries) > first:
        rest = entries[first:]
        runs.append(
            (
                queue.used_entry_address(0),
                b"".join(USED_ELEM.pack(head, length) for head, length in rest),
            )
        )
    return runs


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did the used index pass ``event`` going old -> new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


async def should_notify(dma: Dma, queue: VirtQueue, *, event_idx: bool) -> bool:
    """After publishing used entries: does the driver want an interrupt? (Read after the
    used index was written, as the spec requires.)"""
    new = queue.used_idx
    if event_idx:
        old = queue.signalled_used
        queue.signalled_used = new
        if old is None:
            return True
        event = int.from_bytes(await dma.read(queue.used_event_address, 2), "little")
        return need_event(event, new, old)
    flags = int.from_bytes(await dma.read(queue.driver, 2), "little")
    return not flags & AVAIL_F_NO_INTERRUPT
