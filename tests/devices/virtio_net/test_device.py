"""``virtio-net`` without a server: PCI layout, the virtqueue walker against hostile rings
(hypothesis), and saved states (round trip, hostile states rejected without any change)."""

from __future__ import annotations

import errno
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.api import DeviceError, DmaFault
from devices.pci import BarKind
from devices.virtio_net import VirtioNet, VirtioNetOptions
from devices.virtio_net import device as vn
from devices.virtio_net import transport as t
from devices.virtio_net import virtqueue as vq
from emulator.testing.harness import flat_sections

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


def test_pci_identity_and_capabilities() -> None:
    dev = VirtioNet()
    config = dev.config
    assert config.read(0, 4) == struct.pack("<HH", 0x1AF4, 0x1041)
    assert config.read(8, 1) == b"\x01"  # revision 1: modern only
    assert config.read(0x0B, 1) == b"\x02"  # network controller
    bars = config.bars()
    assert set(bars) == {1, 4} and all(b.kind is not BarKind.IO for b in bars.values())
    types = []
    for cap_id, offset in config.capabilities():
        if cap_id == 0x09:
            types.append(config.read(offset + 3, 1)[0])
    assert types == [t.CAP_COMMON, t.CAP_ISR, t.CAP_DEVICE, t.CAP_NOTIFY, t.CAP_PCI_CFG]
    assert config.msix_table_size == 4


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


# =============================================================================================
# Saved state


def busy_device() -> VirtioNet:
    dev = VirtioNet(VirtioNetOptions(mac=bytes.fromhex("525400000042"), queue_size=512))
    dev.driver_features = vn.OFFERED
    dev.status = t.ACKNOWLEDGE | t.DRIVER | t.FEATURES_OK | t.DRIVER_OK
    dev.config_vector = 0
    for i, queue in enumerate(dev.queues):
        queue.size = 256 if i < 2 else 64
        queue.enabled = True
        queue.vector = i + 1 if i < 2 else vq.NO_VECTOR
        queue.desc, queue.driver, queue.device = (
            0x100000 * (i + 1),
            0x100000 * (i + 1) + 0x1000,
            0x100000 * (i + 1) + 0x2000,
        )
        queue.last_avail, queue.used_idx, queue.signalled_used = 0xFFF0 + i, 0xFFEE, 0xFFE0
    dev.filter.promisc = False
    dev.filter.multicast = [bytes.fromhex("01005e000001")]
    dev.rx_frames.extend([bytes(60), bytes(range(200))])
    dev.rx_bytes = 260
    dev._irq_due.add(0)
    return dev


def test_state_round_trip() -> None:
    source = busy_device()
    saved = flat_sections(source.save_state())
    target = VirtioNet(VirtioNetOptions(queue_size=512))
    target.pause()
    target.load_state(saved)
    assert flat_sections(target.save_state()) == saved
    assert target.filter.mac == bytes.fromhex("525400000042")
    assert list(target.rx_frames) == list(source.rx_frames)
    assert target.queues[1].last_avail == 0xFFF1


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_hostile_states_are_refused_without_change(data: st.DataObject) -> None:
    saved = flat_sections(busy_device().save_state())
    index = data.draw(st.integers(0, len(saved) - 1))
    name, payload = saved[index]
    position = data.draw(st.integers(0, max(len(payload) - 1, 0)))
    value = data.draw(st.integers(0, 255))
    mutated = bytearray(payload)
    if mutated:
        mutated[position] = value
    cut = data.draw(st.booleans())
    if cut:
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    hostile = list(saved)
    hostile[index] = (name, bytes(mutated))
    target = VirtioNet(VirtioNetOptions(queue_size=512))
    target.pause()
    before = flat_sections(target.save_state())
    try:
        target.load_state(hostile)
    except DeviceError as exc:
        assert exc.errno == errno.EINVAL
        assert flat_sections(target.save_state()) == before
    else:
        # accepted: a state the device could have been in, saved back identically
        assert flat_sections(target.save_state()) == hostile


def test_state_with_unknown_features_or_a_bad_queue_is_refused() -> None:
    dev = busy_device()
    dev.driver_features |= vn.F_GUEST_TSO4  # not offered
    target = VirtioNet(VirtioNetOptions(queue_size=512))
    with pytest.raises(DeviceError):
        target.load_state(flat_sections(dev.save_state()))
    dev = busy_device()
    dev.queues[0].size = 100  # not a power of two
    with pytest.raises(DeviceError):
        target.load_state(flat_sections(dev.save_state()))
