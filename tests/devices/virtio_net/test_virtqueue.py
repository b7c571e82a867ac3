"""The virtqueue walker (devices/virtio_net/virtqueue.py) against hostile rings (hypothesis): chains
that respect every rule, VirtqueueError or a DMA fault, never another exception or a hang;
the event-index arithmetic across the u16 wrap."""

from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.api import DmaFault
from devices.virtio_net import virtqueue as vq

BASE = 0x10000
SIZE = 0x10000


class MemoryDma:
    """Guest memory as a bytearray at BASE: every access outside faults."""

    def __init__(self) -> None:
        self.memory = bytearray(SIZE)
        self.reads = 0

    def _check(self, iova: int, length: int) -> int:
        if iova < BASE or iova + length > BASE + SIZE:
            raise DmaFault(f"[{iova:#x}, +{length:#x}) outside")
        return iova - BASE

    async def read(self, iova: int, length: int) -> bytes:
        self.reads += 1
        at = self._check(iova, length)
        return bytes(self.memory[at : at + length])

    async def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        at = self._check(iova, len(data))
        self.memory[at : at + len(data)] = data

    async def read_sg(self, segments: list[tuple[int, int]]) -> bytes:
        return b"".join([await self.read(a, n) for a, n in segments])

    async def write_sg(
        self, segments: list[tuple[int, int]], data: bytes | bytearray | memoryview
    ) -> None:
        pos = 0
        for address, length in segments:
            await self.write(address, bytes(data[pos : pos + length]))
            pos += length

    def regions(self) -> list[tuple[int, int] | None]:
        return [(BASE, SIZE)]

    async def message_read(self, iova: int, length: int) -> bytes:
        return await self.read(iova, length)

    async def message_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        await self.write(iova, data)


def _ring(queue: vq.VirtQueue, descriptors: bytes, heads: list[int], avail_idx: int) -> MemoryDma:
    dma = MemoryDma()
    dma.memory[queue.desc - BASE : queue.desc - BASE + len(descriptors)] = descriptors
    at = queue.driver - BASE
    dma.memory[at : at + 4] = struct.pack("<HH", 0, avail_idx)
    for i, head in enumerate(heads):
        dma.memory[at + 4 + 2 * i : at + 6 + 2 * i] = struct.pack("<H", head)
    return dma


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.binary(min_size=16 * 8, max_size=16 * 8),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8),
    avail_idx=st.integers(0, 0xFFFF),
    indirect_ok=st.booleans(),
)
def test_walker_survives_any_ring(
    table: bytes, heads: list[int], avail_idx: int, indirect_ok: bool
) -> None:
    """Whatever the driver wrote: chains that respect every rule, VirtqueueError, or a
    DMA fault for memory outside the guest; never another exception, never a hang."""
    queue = vq.VirtQueue(0, 8)
    queue.desc, queue.driver, queue.device = BASE, BASE + 0x1000, BASE + 0x2000
    # point some descriptors at an indirect table inside guest memory
    dma = _ring(queue, table, heads, avail_idx)

    async def walk() -> list[vq.Chain] | None:
        with trio.fail_after(5):
            try:
                return await vq.pop_chains(dma, queue, 64, indirect_ok=indirect_ok)
            except (vq.VirtqueueError, DmaFault):
                return None

    chains = trio.run(walk)
    if chains is None:
        return
    assert len(chains) <= 8 and (avail_idx & 0xFFFF) >= len(chains)
    for chain in chains:
        assert chain.head < 8
        assert chain.readable_bytes <= vq.MAX_CHAIN_BYTES
        assert chain.writable_bytes <= vq.MAX_CHAIN_BYTES
    assert queue.last_avail == 0  # popping never moves the queue


def test_walker_rules() -> None:
    queue = vq.VirtQueue(0, 8)
    queue.desc, queue.driver, queue.device = BASE, BASE + 0x1000, BASE + 0x2000
    indirect = BASE + 0x3000
    table = vq.DESC.pack(indirect, 32, vq.F_INDIRECT, 0)
    dma = _ring(queue, table, [0], 1)
    dma.memory[0x3000:0x3020] = vq.DESC.pack(BASE, 12, vq.F_NEXT, 1) + vq.DESC.pack(
        BASE + 0x100, 1500, vq.F_WRITE, 0
    )

    async def pop(indirect_ok: bool) -> list[vq.Chain]:
        return await vq.pop_chains(dma, queue, 8, indirect_ok=indirect_ok)

    (chain,) = trio.run(pop, True)
    assert chain.readable == [(BASE, 12)] and chain.writable == [(BASE + 0x100, 1500)]
    with pytest.raises(vq.VirtqueueError):
        trio.run(pop, False)  # INDIRECT_DESC not negotiated
    assert vq.need_event(0, 1, 0) and not vq.need_event(5, 3, 2)
    assert vq.need_event(0xFFFF, 0, 0xFFFE)  # across the u16 wrap
