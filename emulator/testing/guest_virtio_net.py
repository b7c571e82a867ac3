"""A guest driver for the ``virtio-net`` model, played over a vfio-user :class:`Client`.

:class:`VirtioNetGuest` does what Linux's ``virtio_pci`` + ``virtio_net`` do, in the same
order: find the vendor capabilities by walking the capability list, reset (status 0),
ACKNOWLEDGE, DRIVER, read the device features (select 0 and 1), write its own, FEATURES_OK
and read it back, set up the queues (size, MSI-X vector, ring addresses, enable), the
configuration vector, then DRIVER_OK. Interrupts are MSI-X (one eventfd per vector, as QEMU
binds them) or INTx (the handler reads the ISR, then ``SET_IRQS INTx UNMASK``).

Rings live in the caller's guest RAM (:class:`emulator.testing.harness.GuestRam`). Frames are sent
as one descriptor (header and frame together, as Linux does for a linear skb), two
descriptors (``layout="split"``) or an indirect table (``layout="indirect"``). Receive
buffers are one write-only descriptor each; with MRG_RXBUF a frame may span several. With
EVENT_IDX the driver publishes ``used_event`` and notifies only when ``avail_event`` asks.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

import trio

from devices.irq import MSIX_ENTRY_SIZE
from devices.virtio_net import device as vn
from devices.virtio_net import transport as t
from devices.virtio_net.virtqueue import DESC, F_INDIRECT, F_NEXT, F_WRITE, NO_VECTOR, need_event
from emulator.client import Client
from emulator.testing.harness import CONFIG_REGION, EventFd, GuestRam, enable_bus_master
from protocol.constants import IrqIndex, IrqSetFlags

TRIGGER_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
NONE_UNMASK = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK
MSIX_CONTROL_ENABLE = 0x8000
#: What Linux's virtio_net asks for when the device offers it.
LINUX_FEATURES = (
    vn.F_CSUM
    | vn.F_GUEST_CSUM
    | vn.F_MTU
    | vn.F_MAC
    | vn.F_MRG_RXBUF
    | vn.F_STATUS
    | vn.F_CTRL_VQ
    | vn.F_CTRL_RX
    | vn.F_CTRL_MAC_ADDR
    | vn.F_HOST_TSO4
    | vn.F_HOST_TSO6
    | t.F_RING_INDIRECT_DESC
    | t.F_RING_EVENT_IDX
    | t.F_VERSION_1
)


class GuestError(Exception):
    """The device did not behave as the driver expects."""


@dataclass(frozen=True, slots=True)
class GuestConfig:
    features: int = LINUX_FEATURES
    queue_size: int = 256
    msix: bool = True
    rx_buffer_size: int = 2048
    tx_buffer_size: int = 2048
    layout: str = "single"  # transmit descriptors: single, split or indirect
    offset: int = 0  # where in guest RAM the driver's memory starts

    def ram_needed(self) -> int:
        rings = 3 * _ring_bytes(self.queue_size)
        buffers = self.queue_size * (self.rx_buffer_size + self.tx_buffer_size + 16 * 4)
        return self.offset + rings + buffers + 0x10000  # + control buffers


def _ring_bytes(size: int) -> int:
    return _align(16 * size) + _align(6 + 2 * size) + _align(6 + 8 * size)


def _align(value: int, to: int = 4096) -> int:
    return (value + to - 1) // to * to


@dataclass(slots=True)
class RxFrame:
    data: bytes  # the frame, without the virtio header
    header: tuple[int, ...]  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, n
    buffers: int


@dataclass(slots=True)
class GuestQueue:
    """The driver's side of one split virtqueue."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    free: deque[int] = field(default_factory=deque)
    avail_idx: int = 0  # next avail entry the driver writes
    last_used: int = 0  # next used entry the driver reads
    kicked_at: int = 0  # avail_idx at the last notification decision
    vector: int = 0
    notifications: int = 0
    suppressed: int = 0  # notifications the device said it did not need


class VirtioNetGuest:
    def __init__(
        self,
        client: Client,
        ram: GuestRam,
        config: GuestConfig | None = None,
        *,
        irqs: list[EventFd] | None = None,
    ) -> None:
        self.client = client
        self.ram = ram
        self.config = cfg = config or GuestConfig()
        if cfg.ram_needed() > ram.size:
            raise ValueError(f"the driver needs {cfg.ram_needed():#x} bytes of guest RAM")
        self.irqs = irqs or []
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (bar, offset, length)
        self.pci_cfg_cap = 0
        self.notify_multiplier = 0
        self.features = 0
        self.mac = b""
        self.mtu = 0
        self.interrupts = 0
        self.queues: list[GuestQueue] = []
        base = ram.base + cfg.offset
        for index in range(3):
            size = cfg.queue_size if index != vn.CTRL else 64
            desc = base + index * _ring_bytes(cfg.queue_size)
            avail = desc + _align(16 * size)
            used = avail + _align(6 + 2 * size)
            self.queues.append(GuestQueue(index, size, desc, avail, used))
        self.buffers = base + 3 * _ring_bytes(cfg.queue_size)
        self.rx_area = self.buffers
        self.tx_area = self.rx_area + cfg.queue_size * cfg.rx_buffer_size
        self.indirect_area = self.tx_area + cfg.queue_size * cfg.tx_buffer_size
        self.ctrl_area = self.indirect_area + cfg.queue_size * 16 * 4
        self.tx_heads: dict[int, int] = {}  # head -> descriptors it holds
        self.rx_posted: dict[int, int] = {}  # head -> buffer address
        self.backlog: deque[RxFrame] = deque()  # polled, not yet handed to receive()

    # =========================================================================================
    # Register access

    async def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(await self.client.region_read(CONFIG_REGION, offset, size), "little")

    async def config_write(self, offset: int, value: int, size: int) -> None:
        await self.client.region_write(CONFIG_REGION, offset, value.to_bytes(size, "little"))

    async def read(self, cfg_type: int, offset: int, size: int) -> int:
        bar, base, _ = self.caps[cfg_type]
        raw = await self.client.region_read(bar, base + offset, size)
        return int.from_bytes(raw, "little")

    async def write(self, cfg_type: int, offset: int, value: int, size: int) -> None:
        bar, base, _ = self.caps[cfg_type]
        await self.client.region_write(bar, base + offset, value.to_bytes(size, "little"))

    async def common_read(self, name: str) -> int:
        offset, width = _common(name)
        return await self.read(t.CAP_COMMON, offset, width)

    async def common_write(self, name: str, value: int) -> None:
        offset, width = _common(name)
        await self.write(t.CAP_COMMON, offset, value, width)

    async def status(self) -> int:
        return await self.common_read("device_status")

    # =========================================================================================
    # Probe and open

    async def init(self, *, map_memory: bool = True) -> None:
        if map_memory:
            await self.client.dma_map(self.ram.base, self.ram.size, fd=self.ram.fd)
        await enable_bus_master(self.client)
        await self.find_capabilities()
        await self.negotiate()
        await self.setup_interrupts()
        for queue in self.queues:
            await self.setup_queue(queue)
        await self.common_write("config_msix_vector", 0 if self.config.msix else NO_VECTOR)
        await self.common_write("device_status", await self.status() | t.DRIVER_OK)
        await self.refill_rx()

    async def find_capabilities(self) -> None:
        vendor = await self.config_read(0, 4)
        if vendor != (t.MODERN_DEVICE_BASE + 1) << 16 | t.VENDOR_ID:
            raise GuestError(f"not a modern virtio-net: {vendor:#010x}")
        pointer = await self.config_read(0x34, 1) & 0xFC
        seen: set[int] = set()
        while pointer >= 0x40 and pointer not in seen:
            seen.add(pointer)
            cap_id = await self.config_read(pointer, 1)
            if cap_id == 0x09:
                cfg_type = await self.config_read(pointer + 3, 1)
                bar = await self.config_read(pointer + 4, 1)
                offset = await self.config_read(pointer + 8, 4)
                length = await self.config_read(pointer + 12, 4)
                if cfg_type == t.CAP_PCI_CFG:
                    self.pci_cfg_cap = pointer
                elif cfg_type not in self.caps:
                    self.caps[cfg_type] = (bar, offset, length)
                if cfg_type == t.CAP_NOTIFY:
                    self.notify_multiplier = await self.config_read(pointer + 16, 4)
            pointer = await self.config_read(pointer + 1, 1) & 0xFC
        for needed in (t.CAP_COMMON, t.CAP_NOTIFY, t.CAP_ISR, t.CAP_DEVICE):
            if needed not in self.caps:
                raise GuestError(f"virtio capability {needed} missing")

    async def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; False if refused."""
        await self.common_write("device_status", 0)
        if await self.status() != 0:
            raise GuestError("status did not read 0 after reset")
        await self.common_write("device_status", t.ACKNOWLEDGE)
        await self.common_write("device_status", t.ACKNOWLEDGE | t.DRIVER)
        offered = 0
        for select in (0, 1):
            await self.common_write("device_feature_select", select)
            offered |= await self.common_read("device_feature") << (32 * select)
        wanted = (self.config.features if features is None else features) & offered
        if features is not None:
            wanted = features  # a test may ask for what is not offered
        for select in (0, 1):
            await self.common_write("driver_feature_select", select)
            await self.common_write("driver_feature", wanted >> (32 * select) & 0xFFFFFFFF)
        await self.common_write("device_status", t.ACKNOWLEDGE | t.DRIVER | t.FEATURES_OK)
        if not await self.status() & t.FEATURES_OK:
            return False
        self.features = wanted
        self.mac = bytes([await self.read(t.CAP_DEVICE, i, 1) for i in range(6)])
        self.mtu = await self.read(t.CAP_DEVICE, 10, 2)
        return True

    def has(self, feature: int) -> bool:
        return bool(self.features & feature)

    async def setup_interrupts(self) -> None:
        if not self.irqs:
            return
        if self.config.msix:
            msix = await _find_cap(self, 0x11)
            control = await self.config_read(msix + 2, 2)
            await self.config_write(msix + 2, control | MSIX_CONTROL_ENABLE, 2)
            fds = [irq.fd for irq in self.irqs]
            await self.client.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 0, len(fds), fds=fds)
        else:
            await self.client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[self.irqs[0].fd])

    async def setup_queue(self, queue: GuestQueue) -> None:
        await self.common_write("queue_select", queue.index)
        maximum = await self.common_read("queue_size")
        if maximum < queue.size:
            raise GuestError(f"queue {queue.index} offers {maximum} entries")
        await self.common_write("queue_size", queue.size)
        if self.config.msix and self.irqs:
            queue.vector = 1 + queue.index if queue.index != vn.CTRL else NO_VECTOR
            await self.common_write("queue_msix_vector", queue.vector)
            if await self.common_read("queue_msix_vector") != queue.vector:
                raise GuestError("vector not accepted")
        for name, address in (
            ("queue_desc", queue.desc),
            ("queue_driver", queue.avail),
            ("queue_device", queue.used),
        ):
            await self.common_write(f"{name}_lo", address & 0xFFFFFFFF)
            await self.common_write(f"{name}_hi", address >> 32)
        self.ram.write(queue.desc, bytes(_ring_bytes(queue.size) - 0))
        queue.free = deque(range(queue.size))
        queue.avail_idx = queue.last_used = queue.kicked_at = 0
        await self.common_write("queue_enable", 1)

    # =========================================================================================
    # Rings

    def _add(self, queue: GuestQueue, descriptors: list[tuple[int, int, int]]) -> int:
        """Chain ``(address, length, flags)`` descriptors, put the head on the avail ring."""
        if len(descriptors) > len(queue.free):
            raise GuestError("no free descriptors")
        indices = [queue.free.popleft() for _ in descriptors]
        for i, (address, length, flags) in enumerate(descriptors):
            last = i == len(descriptors) - 1
            nxt = 0 if last else indices[i + 1]
            self.ram.write(
                queue.desc + 16 * indices[i],
                DESC.pack(address, length, flags | (0 if last else F_NEXT), nxt),
            )
        head = indices[0]
        slot = queue.avail + 4 + 2 * (queue.avail_idx % queue.size)
        self.ram.write(slot, struct.pack("<H", head))
        queue.avail_idx = (queue.avail_idx + 1) & 0xFFFF
        self.ram.write(queue.avail + 2, struct.pack("<H", queue.avail_idx))
        return head

    async def kick(self, queue: GuestQueue) -> None:
        """Notify the device, unless EVENT_IDX says it does not need it."""
        old, new = queue.kicked_at, queue.avail_idx
        queue.kicked_at = new
        if old == new:
            return
        if self.has(t.F_RING_EVENT_IDX):
            event = struct.unpack("<H", self.ram.read(queue.used + 4 + 8 * queue.size, 2))[0]
            if not need_event(event, new, old):
                queue.suppressed += 1
                return
        queue.notifications += 1
        await self.write(t.CAP_NOTIFY, queue.index * self.notify_multiplier, queue.index, 2)

    async def kick_all(self) -> None:
        """Ring every queue's doorbell, needed or not (after a lost connection)."""
        for queue in self.queues:
            queue.notifications += 1
            bar, base, _ = self.caps[t.CAP_NOTIFY]
            offset = base + queue.index * self.notify_multiplier
            await self.client.region_write(bar, offset, struct.pack("<H", queue.index))

    def used(self, queue: GuestQueue) -> list[tuple[int, int]]:
        """New used entries ``(head, length)``; publishes ``used_event`` for EVENT_IDX."""
        idx = struct.unpack("<H", self.ram.read(queue.used + 2, 2))[0]
        count = (idx - queue.last_used) & 0xFFFF
        if count > queue.size:
            raise GuestError(f"used idx {idx} is {count} entries ahead")
        out: list[tuple[int, int]] = []
        while count:  # one read per contiguous run of the ring
            start = queue.last_used % queue.size
            run = min(count, queue.size - start)
            raw = self.ram.read(queue.used + 4 + 8 * start, 8 * run)
            out += struct.iter_unpack("<II", raw)
            queue.last_used = (queue.last_used + run) & 0xFFFF
            count -= run
        if self.has(t.F_RING_EVENT_IDX):
            self.ram.write(queue.avail + 4 + 2 * queue.size, struct.pack("<H", queue.last_used))
        return out

    def _free_chain(self, queue: GuestQueue, head: int, count: int) -> None:
        index = head
        for _ in range(count):
            queue.free.append(index)
            _, nxt = struct.unpack("<HH", self.ram.read(queue.desc + 16 * index + 12, 4))
            index = nxt

    # =========================================================================================
    # Interrupts

    async def wait_interrupt(self, vector: int = 0, timeout: float = 5.0) -> int:
        """MSI-X: wait on the vector's eventfd. INTx: wait, read the ISR, UNMASK."""
        if self.config.msix:
            await self.irqs[vector].wait(timeout)
            self.interrupts += 1
            return 0
        await self.irqs[0].wait(timeout)
        isr = await self.read(t.CAP_ISR, 0, 1)
        await self.client.set_irqs(IrqIndex.INTX, NONE_UNMASK, 0, 1)
        self.interrupts += 1
        return isr

    # =========================================================================================
    # Transmit

    def reclaim_tx(self) -> int:
        queue = self.queues[vn.TX]
        done = self.used(queue)
        for head, _ in done:
            self._free_chain(queue, head, self.tx_heads.pop(head))
        return len(done)

    def queue(
        self,
        frame: bytes,
        *,
        csum: tuple[int, int] | None = None,
        gso: tuple[int, int] | None = None,
        layout: str | None = None,
    ) -> bool:
        """Put a frame on the transmit ring (no notification); False when it is full.
        ``csum``: (csum_start, csum_offset) for NEEDS_CSUM; ``gso``: (gso_type, MSS) of a
        TSO packet."""
        queue = self.queues[vn.TX]
        layout = layout or self.config.layout
        need = {"single": 1, "split": 2, "indirect": 1}[layout]
        if len(queue.free) < need:
            return False
        flags, start, offset = (vn.HDR_F_NEEDS_CSUM, *csum) if csum else (0, 0, 0)
        gso_type, gso_size = gso or (vn.GSO_NONE, 0)
        header = vn.HDR.pack(flags, gso_type, 0, gso_size, start, offset, 0)
        slot = queue.free[0]
        buffer = self.tx_area + slot * self.config.tx_buffer_size
        if len(header) + len(frame) > self.config.tx_buffer_size:
            raise GuestError("frame larger than a transmit buffer")
        self.ram.write(buffer, header + frame)
        if layout == "single":
            descriptors = [(buffer, len(header) + len(frame), 0)]
        elif layout == "split":
            descriptors = [(buffer, len(header), 0), (buffer + len(header), len(frame), 0)]
        else:
            table = self.indirect_area + slot * 64
            self.ram.write(table, DESC.pack(buffer, len(header), F_NEXT, 1))
            self.ram.write(table + 16, DESC.pack(buffer + len(header), len(frame), 0, 0))
            descriptors = [(table, 32, F_INDIRECT)]
        head = self._add(queue, descriptors)
        self.tx_heads[head] = len(descriptors)
        return True

    async def flush_tx(self) -> None:
        await self.kick(self.queues[vn.TX])

    async def send(self, frame: bytes, *, timeout: float = 5.0, **options: object) -> None:
        with trio.fail_after(timeout):
            while not self.queue(frame, **options):  # type: ignore[arg-type]
                self.reclaim_tx()
                await self.flush_tx()
                await trio.sleep(0.0005)
        await self.flush_tx()

    async def wait_tx_done(self, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while self.tx_heads:
                self.reclaim_tx()
                if self.tx_heads:
                    await trio.sleep(0.0005)

    # =========================================================================================
    # Receive

    async def refill_rx(self) -> None:
        queue = self.queues[vn.RX]
        size = self.config.rx_buffer_size
        while queue.free:
            slot = queue.free[0]
            buffer = self.rx_area + slot * size
            head = self._add(queue, [(buffer, size, F_WRITE)])
            self.rx_posted[head] = buffer
        await self.kick(queue)

    def poll_rx(self) -> list[RxFrame]:
        queue = self.queues[vn.RX]
        frames: list[RxFrame] = []
        pending = deque(self.used(queue))
        while pending:
            head, length = pending.popleft()
            data = self._take_rx(head, length)
            header = vn.HDR.unpack_from(data)
            count = header[6] if self.has(vn.F_MRG_RXBUF) else 1
            if count < 1 or count - 1 > len(pending):
                raise GuestError(f"num_buffers {count} with {len(pending)} entries left")
            for _ in range(count - 1):
                more_head, more_length = pending.popleft()
                data += self._take_rx(more_head, more_length)
            frames.append(RxFrame(data[vn.HDR_SIZE :], header, count))
        return frames

    def _take_rx(self, head: int, length: int) -> bytes:
        queue = self.queues[vn.RX]
        buffer = self.rx_posted.pop(head)
        if length > self.config.rx_buffer_size:
            raise GuestError(f"used length {length} beyond the buffer")
        queue.free.append(head)
        return self.ram.read(buffer, length)

    async def receive(self, timeout: float = 5.0) -> RxFrame:
        got = await self.receive_many(1, timeout)
        return got[0]

    async def receive_many(self, count: int, timeout: float = 10.0) -> list[RxFrame]:
        got: list[RxFrame] = []
        with trio.fail_after(timeout):
            while len(got) < count:
                if self.backlog:
                    got.append(self.backlog.popleft())
                    continue
                frames = self.poll_rx()
                if frames:
                    self.backlog += frames
                    await self.refill_rx()
                    continue
                await trio.sleep(0.0005)
        return got

    # =========================================================================================
    # Control queue

    async def command(self, klass: int, cmd: int, data: bytes, timeout: float = 5.0) -> int:
        """One control command; returns the device's ack."""
        queue = self.queues[vn.CTRL]
        out = self.ctrl_area
        ack = out + 0x8000
        self.ram.write(out, bytes([klass, cmd]) + data)
        self.ram.write(ack, b"\xff")
        descriptors = [(out, 2, 0)]
        if data:
            descriptors.append((out + 2, len(data), 0))
        descriptors.append((ack, 1, F_WRITE))
        head = self._add(queue, descriptors)
        await self.kick(queue)
        with trio.fail_after(timeout):
            while True:
                done = self.used(queue)
                if done:
                    break
                await trio.sleep(0.0005)
        if done[0][0] != head:
            raise GuestError("control queue completed another command")
        self._free_chain(queue, head, len(descriptors))
        return self.ram.read(ack, 1)[0]

    async def set_rx_mode(self, *, promisc: bool, allmulti: bool) -> tuple[int, int]:
        a = await self.command(vn.CLASS_RX, vn.RX_PROMISC, bytes([promisc]))
        b = await self.command(vn.CLASS_RX, vn.RX_ALLMULTI, bytes([allmulti]))
        return a, b

    async def set_mac_table(self, unicast: list[bytes], multicast: list[bytes]) -> int:
        data = struct.pack("<I", len(unicast)) + b"".join(unicast)
        data += struct.pack("<I", len(multicast)) + b"".join(multicast)
        return await self.command(vn.CLASS_MAC, vn.MAC_TABLE_SET, data)

    # =========================================================================================
    # Migration

    async def realize_destination(self, client: Client, irqs: list[EventFd] | None = None) -> None:
        """What QEMU does on a destination before the state arrives: map RAM, bind the
        interrupts it will use."""
        await client.dma_map(self.ram.base, self.ram.size, fd=self.ram.fd)
        if irqs:
            if self.config.msix:
                fds = [irq.fd for irq in irqs]
                await client.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 0, len(fds), fds=fds)
            else:
                await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[irqs[0].fd])

    def migrated_to(self, client: Client, irqs: list[EventFd] | None = None) -> None:
        self.client = client
        if irqs is not None:
            self.irqs = irqs


def _common(name: str) -> tuple[int, int]:
    for offset, (width, field_name) in t.COMMON_FIELDS.items():
        if field_name == name:
            return offset, width
    raise KeyError(name)


async def _find_cap(guest: VirtioNetGuest, cap_id: int) -> int:
    pointer = await guest.config_read(0x34, 1) & 0xFC
    while pointer >= 0x40:
        if await guest.config_read(pointer, 1) == cap_id:
            return pointer
        pointer = await guest.config_read(pointer + 1, 1) & 0xFC
    raise GuestError(f"capability {cap_id:#x} missing")


__all__ = ["MSIX_ENTRY_SIZE", "GuestConfig", "GuestError", "RxFrame", "VirtioNetGuest"]
