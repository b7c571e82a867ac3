"""``virtio-net``: a virtio 1.x network device (PCI 1af4:1041) over the modern transport
(:mod:`devices.virtio_net.transport`), as Linux's ``virtio_net`` drives it.

Queues: 0 receive, 1 transmit, 2 control. Features offered: VERSION_1, RING_INDIRECT_DESC,
RING_EVENT_IDX, MAC, STATUS (link up/down), MTU, MRG_RXBUF, CSUM (the device completes a
NEEDS_CSUM frame's checksum at ``csum_start + csum_offset`` before it goes on the wire),
GUEST_CSUM (accepted; the device passes frames with flags 0, i.e. no claim), HOST_TSO4 and
HOST_TSO6 (the device cuts a TSO packet into MSS-sized segments with their checksums,
:mod:`devices.virtio_net.gso`: the peer behind a backend takes frames of its MTU only), CTRL_VQ
with CTRL_RX (promiscuous, all-multicast, the MAC filter table) and CTRL_MAC_ADDR. Every frame
carries the 12-byte ``virtio_net_hdr_v1``.

Work runs in device jobs (never in a doorbell handler). Cancel-safety, as in the e1000: a
batch reads chains and writes buffers and used entries without changing any device state;
its last await is the write of the used index, and the commit (frames sent or taken off the
receive queue, ``last_avail``/``used_idx``, filter changes) follows with no await between. A
batch cancelled before that write is redone from the same ring position by the next job
(the driver saw no used index move, so it read nothing); cancelled during it, the bytes have
landed (the runtime moves a write's bytes before its await can be cancelled) and the batch
commits before the cancellation goes on. Interrupts owed by a committed batch whose job was
cut are sent on the next attach or resume.

Receive never drops a frame for lack of buffers: frames wait in a bounded queue and the
device stops accepting from the backend (``set_accepting(False)``) while it is full, as
QEMU's virtio-net holds its peer. A frame that can never fit the guest's buffers is dropped.
"""

from __future__ import annotations

import errno
import functools
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from devices.api import DeviceError
from devices.e1000.packet import ones_sum
from devices.migration.stream import Buffer, LoadedSection, Section, sections_by_name
from devices.net import DetachedPort, NetPort
from devices.virtio_net import gso
from devices.virtio_net import virtqueue as vq
from devices.virtio_net.transport import (
    DRIVER_OK,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    VirtioPciFunction,
)

log = logging.getLogger("vfio_user_emu")

VIRTIO_ID_NET = 1
DEFAULT_MAC = bytes.fromhex("525400123457")
DEFAULT_QUEUE_SIZE = 256

# feature bits (virtio 1.x section 5.1.3)
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_UFO = 1 << 10
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_CTRL_RX = 1 << 18
F_CTRL_VLAN = 1 << 19
F_GUEST_ANNOUNCE = 1 << 21
F_MQ = 1 << 22
F_CTRL_MAC_ADDR = 1 << 23

OFFERED = (
    F_CSUM
    | F_GUEST_CSUM
    | F_MTU
    | F_MAC
    | F_MRG_RXBUF
    | F_STATUS
    | F_CTRL_VQ
    | F_CTRL_RX
    | F_CTRL_MAC_ADDR
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_RING_INDIRECT_DESC
    | F_RING_EVENT_IDX
    | F_VERSION_1
)

RX, TX, CTRL = 0, 1, 2
S_LINK_UP = 1

# the header every frame carries (virtio_net_hdr_v1)
HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start/offset, bufs
HDR_SIZE = HDR.size
HDR_F_NEEDS_CSUM = 1
GSO_NONE = 0

# control queue (section 5.1.6.5)
CTRL_OK, CTRL_ERR = 0, 1
CLASS_RX, CLASS_MAC = 0, 1
RX_PROMISC, RX_ALLMULTI = 0, 1
MAC_TABLE_SET, MAC_ADDR_SET = 0, 1
#: MAC filter entries kept per table; a longer table turns into "accept all" (as QEMU).
MAC_TABLE_ENTRIES = 64

ETH_HEADER = 14
MIN_MTU, MAX_MTU = 68, 65535 - ETH_HEADER - 4
#: Largest frame a chain may carry: a TSO packet of 64 KiB with IPv6 and VLAN headers.
MAX_TX_FRAME = 65536 + 64
BATCH = 64  # chains per batch
RX_QUEUE_LIMIT = 256  # frames waiting for buffers before the backend is held
CTRL_MAX_COMMAND = 2 + 8 + 2 * MAC_TABLE_ENTRIES * 6 * 1024  # generous: tables may overflow
DMA_RETRY_FIRST, DMA_RETRY_MAX, DMA_RETRY_SLICE = 0.001, 0.1, 0.002
#: Consecutive DMA faults, with guest memory mapped, before they count as a driver error.
DMA_FAULTS_FATAL = 20


@dataclass(frozen=True, slots=True)
class VirtioNetOptions:
    mac: bytes = DEFAULT_MAC
    netdev: str | None = None
    mtu: int = 1500
    queue_size: int = DEFAULT_QUEUE_SIZE
    link_up: bool = True

    def __post_init__(self) -> None:
        if len(self.mac) != 6 or self.mac[0] & 1:
            raise ValueError("mac must be a 6-byte unicast address")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"mtu must be {MIN_MTU}..{MAX_MTU}")
        size = self.queue_size
        if not 2 <= size <= vq.MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"queue size must be a power of two 2..{vq.MAX_QUEUE_SIZE}")


@dataclass(slots=True)
class RxFilter:
    """What the control queue programs (reset: promiscuous, as QEMU's virtio-net)."""

    mac: bytes
    promisc: bool = True
    allmulti: bool = False
    unicast: list[bytes] = field(default_factory=list)
    multicast: list[bytes] = field(default_factory=list)
    unicast_overflow: bool = False
    multicast_overflow: bool = False

    def accepts(self, frame: bytes) -> bool:
        if self.promisc:
            return True
        dst = frame[:6]
        if dst[0] & 1:
            if dst == b"\xff" * 6:
                return True
            return self.allmulti or self.multicast_overflow or dst in self.multicast
        return dst == self.mac or self.unicast_overflow or dst in self.unicast

    _HEAD = struct.Struct("<6sBHH")

    def pack(self) -> bytes:
        flags = (
            self.promisc
            | self.allmulti << 1
            | self.unicast_overflow << 2
            | self.multicast_overflow << 3
        )
        head = self._HEAD.pack(self.mac, flags, len(self.unicast), len(self.multicast))
        return head + b"".join(self.unicast) + b"".join(self.multicast)

    @classmethod
    def unpack(cls, data: Buffer) -> RxFilter:
        view = bytes(data)
        if len(view) < cls._HEAD.size:
            raise ValueError("filter section too short")
        mac, flags, uni, multi = cls._HEAD.unpack_from(view)
        if flags & ~0xF or max(uni, multi) > MAC_TABLE_ENTRIES:
            raise ValueError("filter flags or table sizes out of range")
        if len(view) != cls._HEAD.size + 6 * (uni + multi):
            raise ValueError("filter section of the wrong size")
        if mac[0] & 1:
            raise ValueError("filter MAC is multicast")
        pos = cls._HEAD.size
        entries = [view[pos + 6 * i : pos + 6 * i + 6] for i in range(uni + multi)]
        return cls(
            mac,
            bool(flags & 1),
            bool(flags & 2),
            entries[:uni],
            entries[uni:],
            bool(flags & 4),
            bool(flags & 8),
        )


@dataclass(slots=True)
class NetStats:
    tx_frames: int = 0
    tx_dropped: int = 0  # malformed, oversized or link down
    rx_frames: int = 0
    rx_filtered: int = 0
    rx_dropped: int = 0  # can never fit the guest's buffers, or the device not running
    ctrl_commands: int = 0


def scatter(segments: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The first ``length`` bytes of ``segments`` as a scatter list."""
    out: list[tuple[int, int]] = []
    left = length
    for address, size in segments:
        if left <= 0:
            break
        take = min(size, left)
        if take:
            out.append((address, take))
        left -= take
    return out


def complete_checksum(frame: bytearray, start: int, offset: int) -> bool:
    """NEEDS_CSUM: the field at ``start + offset`` holds the pseudo-header sum; store the
    complement of the sum from ``start`` to the end (False: the offsets are outside)."""
    at = start + offset
    if at + 2 > len(frame) or start >= len(frame):
        return False
    value = ~ones_sum(frame, start) & 0xFFFF
    frame[at : at + 2] = value.to_bytes(2, "big")
    return True


class VirtioNet(VirtioPciFunction):
    type_name: ClassVar[str] = "virtio-net"
    virtio_device_id = VIRTIO_ID_NET
    class_code = 0x020000
    model_version: ClassVar[int] = 1
    migration_caps: ClassVar[int] = 0x7

    def __init__(self, options: VirtioNetOptions | None = None) -> None:
        opts = options or VirtioNetOptions()
        self.options = opts
        self.netdev_id: str | None = opts.netdev
        sizes = [opts.queue_size, opts.queue_size, 64]
        super().__init__(sizes, OFFERED)
        self.port: NetPort = DetachedPort()
        self.link_up = opts.link_up
        self.filter = RxFilter(opts.mac)
        self.rx_frames: deque[bytes] = deque()
        self.rx_bytes = 0
        self.stats = NetStats()
        self._holding = False  # the receive queue is full: the backend waits
        self._paused = False
        self._generation = 0
        self._queued: set[str] = set()
        self._running = 0
        self._irq_due: set[int] = set()  # queues whose committed batch still owes a check
        self._dma_faults = 0
        self._dma_failing = False
        self._dma_retry_delay = DMA_RETRY_FIRST
        self._retry_queued = False
        self.config.add_write_listener(self._config_written)

    # =========================================================================================
    # Transport hooks

    def device_config(self) -> bytes:
        status = S_LINK_UP if self.link_up else 0
        return struct.pack(
            "<6sHHHIB", self.filter.mac, status, 1, self.options.mtu, 0xFFFFFFFF, 0xFF
        )

    def features_acceptable(self, features: int) -> bool:
        """The dependencies of section 5.1.3.1."""
        needs_ctrl = F_CTRL_RX | F_CTRL_MAC_ADDR | F_CTRL_VLAN | F_GUEST_ANNOUNCE | F_MQ
        if features & needs_ctrl and not features & F_CTRL_VQ:
            return False
        needs_csum = F_HOST_TSO4 | F_HOST_TSO6
        return not (features & needs_csum and not features & F_CSUM)

    def virtio_reset(self) -> None:
        self._new_generation()
        self.filter = RxFilter(self.options.mac)
        self.rx_frames.clear()
        self.rx_bytes = 0
        self._irq_due.clear()
        self._dma_faults = 0
        self._dma_retry_delay = DMA_RETRY_FIRST
        self._hold(False)

    def driver_ok(self) -> None:
        self._kick_all()

    def queue_notified(self, queue: vq.VirtQueue) -> None:
        self._kick(queue.index)

    def driver_error(self, why: str) -> None:
        super().driver_error(why)
        self._new_generation()

    # =========================================================================================
    # Link

    def set_link(self, up: bool) -> None:
        """Carrier up or down (``STATUS``); the driver hears of it by a config interrupt."""
        if up == self.link_up:
            return
        self.link_up = up
        if self.status & DRIVER_OK:
            self.config_changed()

    # =========================================================================================
    # Jobs

    def _new_generation(self) -> None:
        self._generation += 1
        self._queued.clear()
        self._running = 0
        self._retry_queued = False

    @property
    def idle(self) -> bool:
        return not (self._queued or self._running)

    def _kick_all(self) -> None:
        for queue in self.queues:
            self._kick(queue.index)

    def _kick(self, index: int) -> None:
        name = ("rx", "tx", "ctrl")[index]
        if name in self._queued or self._paused or not self.running:
            return
        if not self.queues[index].enabled or (index == RX and not self.rx_frames):
            return
        work = (self._rx_work, self._tx_work, self._ctrl_work)[index]
        if self._submit(name, work):
            self._queued.add(name)

    def _submit(self, name: str, work: Callable[[int], Awaitable[None]]) -> bool:
        generation = self._generation

        async def job() -> None:
            if generation != self._generation:
                return
            self._queued.discard(name)
            self._running += 1
            try:
                await work(generation)
            except vq.VirtqueueError as exc:
                if generation == self._generation:
                    self.driver_error(str(exc))
            except DeviceError as exc:
                if generation == self._generation:
                    self._dma_failed(name, exc)
            finally:
                if generation == self._generation:
                    self._running -= 1

        return self.context.submit(job)

    def _dma_failed(self, what: str, exc: DeviceError) -> None:
        """A DMA fault on the rings or buffers (addresses outside the client's map were
        refused before, as driver errors). With bus mastering off the work waits until the
        guest turns it on (:meth:`_config_written`). With no memory mapped yet (a client
        reconnecting) it is retried with backoff. Persisting with memory mapped (the map
        changed under the driver's feet), it becomes a driver error: NEEDS_RESET."""
        if not self.config.bus_master:
            return
        if any(self.context.dma.regions()):
            self._dma_faults += 1
            if self._dma_faults >= DMA_FAULTS_FATAL:
                self.driver_error(f"{what}: DMA keeps failing: {exc}")
                return
        if not self._dma_failing:  # once per streak of faults
            self._dma_failing = True
            log.warning("virtio-net: %s DMA failed: %s (retrying)", what, exc)
        self._schedule_retry()

    def _config_written(self, offset: int, length: int) -> None:
        # Bus mastering (back) on: work that waited for it goes on.
        if self.config.bus_master and self.running:
            self._kick_all()

    def _dma_worked(self) -> None:
        self._dma_failing = False
        self._dma_faults = 0
        self._dma_retry_delay = DMA_RETRY_FIRST

    def _schedule_retry(self) -> None:
        if self._retry_queued:
            return
        delay = self._dma_retry_delay
        self._dma_retry_delay = min(2 * delay, DMA_RETRY_MAX)
        generation = self._generation
        remaining = [delay]

        async def wait_slice() -> None:
            # Sleep a slice at a time, going to the back of the job queue in between, so
            # the retry never holds up other work for long.
            if generation != self._generation:
                return
            step = min(remaining[0], DMA_RETRY_SLICE)
            await self.context.sleep(step)
            if generation != self._generation:
                return
            remaining[0] -= step
            if remaining[0] > 0 and self.context.submit(wait_slice):
                return
            self._retry_queued = False
            self._kick_all()

        self._retry_queued = self.context.submit(wait_slice)

    # -- publishing used entries ------------------------------------------------------------
    async def _publish(
        self,
        generation: int,
        queue: vq.VirtQueue,
        entries: list[tuple[int, int]],
        commit: Callable[[], None],
    ) -> bool:
        """Write used entries, then the used index (the last await), then commit. False
        when the device was reset or reloaded meanwhile (nothing committed)."""
        dma = self.context.dma
        for address, run in vq.used_entries(queue, entries):
            await dma.write(address, run)
            if generation != self._generation:
                return False
        count = len(entries)

        def apply() -> None:
            self._dma_worked()
            commit()
            queue.consume(count)
            self._irq_due.add(queue.index)

        new_idx = (queue.used_idx + count) & 0xFFFF
        try:
            await dma.write(queue.used_idx_address, new_idx.to_bytes(2, "little"))
        except DeviceError:
            raise
        except BaseException:
            if generation == self._generation:
                apply()
            raise
        if generation != self._generation:
            return False
        apply()
        await self._interrupt_if_wanted(queue)
        return True

    async def _interrupt_if_wanted(self, queue: vq.VirtQueue) -> None:
        if await vq.should_notify(self.context.dma, queue, event_idx=self.has(F_RING_EVENT_IDX)):
            self.notify_queue(queue)
        self._irq_due.discard(queue.index)

    async def _arm_avail_event(self, queue: vq.VirtQueue, seen: int = 0) -> bool:
        """The ``seen`` available chains are all the device can use now (none, or too few
        buffers for the frame that waits): with EVENT_IDX ask for a kick when the driver
        adds the next one, then look again (it may have added one before it saw the
        request). True: there is more than ``seen`` already."""
        if not self.has(F_RING_EVENT_IDX):
            return False
        event = (queue.last_avail + seen) & 0xFFFF
        await self.context.dma.write(queue.avail_event_address, event.to_bytes(2, "little"))
        return await vq.available(self.context.dma, queue) > seen

    def _can_work(self, queue: vq.VirtQueue, generation: int) -> bool:
        return (
            generation == self._generation and not self._paused and self.running and queue.enabled
        )

    async def _pop(self, queue: vq.VirtQueue, limit: int) -> list[vq.Chain]:
        """Available chains, every ring and buffer address checked against the client's
        memory map: outside it is the driver's error (NEEDS_RESET), not a DMA fault to
        retry (those are left for memory not mapped yet or bus mastering off)."""
        self._check_mapped(queue.ring_ranges())
        chains = await vq.pop_chains(
            self.context.dma,
            queue,
            limit,
            indirect_ok=self.has(F_RING_INDIRECT_DESC),
            check=self._check_mapped,
        )
        for chain in chains:
            self._check_mapped(chain.readable)
            self._check_mapped(chain.writable)
        return chains

    def _check_mapped(self, ranges: list[tuple[int, int]]) -> None:
        mapped = _merged(self.context.dma.regions())
        if not mapped:
            return  # nothing mapped (yet): the DMA faults and is retried
        for address, length in ranges:
            if length and not any(
                start <= address and address + length <= end for start, end in mapped
            ):
                raise vq.VirtqueueError(
                    f"[{address:#x}, +{length:#x}) is outside the guest's memory"
                )

    # =========================================================================================
    # Transmit

    async def _next_batch(
        self, queue: vq.VirtQueue, generation: int, limit: int = BATCH
    ) -> list[vq.Chain] | None:
        """The next chains to work on; None when the queue is empty (and a notification
        asked for) or the device stopped, was reset or reloaded meanwhile."""
        while self._can_work(queue, generation):
            chains = await self._pop(queue, limit)
            if generation != self._generation:
                return None
            if chains:
                return chains
            if not await self._arm_avail_event(queue):
                return None
        return None

    async def _tx_work(self, generation: int) -> None:
        queue = self.queues[TX]
        while (chains := await self._next_batch(queue, generation)) is not None:
            frames, dropped = await self._tx_frames(chains)
            if generation != self._generation:
                return
            entries = [(chain.head, 0) for chain in chains]
            commit = functools.partial(self._tx_commit, frames, dropped)
            if not await self._publish(generation, queue, entries, commit):
                return
            if self._queued:
                self._kick(TX)  # let queued work (receive) run: to the back of the queue
                return

    async def _tx_frames(self, chains: list[vq.Chain]) -> tuple[list[bytes], int]:
        """The frames a batch of transmit chains carries (one gather for all of them),
        checksums completed, TSO packets segmented; and how many chains were dropped as
        malformed (their buffers complete all the same)."""
        sizes = [chain.readable_bytes for chain in chains]
        wanted = [HDR_SIZE + ETH_HEADER <= size <= HDR_SIZE + MAX_TX_FRAME for size in sizes]
        segments = [
            seg for chain, ok in zip(chains, wanted, strict=True) if ok for seg in chain.readable
        ]
        data = memoryview(await self.context.dma.read_sg(segments))
        frames: list[bytes] = []
        dropped = len(chains) - sum(wanted)
        pos = 0
        for size, ok in zip(sizes, wanted, strict=True):
            if ok:
                out = self._tx_frame(data[pos : pos + size])
                pos += size
                if out is None:
                    dropped += 1
                elif isinstance(out, list):
                    frames += out
                else:
                    frames.append(out)
        return frames, dropped

    def _tx_frame(self, data: memoryview) -> bytes | list[bytes] | None:
        """One chain's bytes (header and frame) as the frame to send, or the segments of
        a TSO packet; None: dropped."""
        flags, gso_type, _, gso_size, csum_start, csum_offset, _ = HDR.unpack_from(data)
        if gso_type != GSO_NONE:
            return self._tso(bytes(data[HDR_SIZE:]), gso_type, gso_size)
        if not flags & HDR_F_NEEDS_CSUM:
            return bytes(data[HDR_SIZE:])
        frame = bytearray(data[HDR_SIZE:])
        if not (self.has(F_CSUM) and complete_checksum(frame, csum_start, csum_offset)):
            return None
        return bytes(frame)

    def _tso(self, frame: bytes, gso_type: int, mss: int) -> list[bytes] | None:
        kind = gso_type & ~gso.GSO_ECN
        allowed = (kind == gso.GSO_TCPV4 and self.has(F_HOST_TSO4)) or (
            kind == gso.GSO_TCPV6 and self.has(F_HOST_TSO6)
        )
        if not allowed:
            return None  # a GSO type the driver did not negotiate: its error, dropped
        return gso.segment_tcp(frame, gso_type, mss)

    def _tx_commit(self, frames: list[bytes], dropped: int) -> None:
        self.stats.tx_dropped += dropped
        for frame in frames:
            if not self.link_up:
                self.stats.tx_dropped += 1
                continue
            self.stats.tx_frames += 1
            self.port.transmit(frame)

    # =========================================================================================
    # Receive

    def attach_net(self, port: NetPort) -> None:
        self.port = port
        if self._paused or self._holding:
            port.set_accepting(False)

    def net_receive(self, frame: bytes) -> None:
        if not self.running or not self.link_up or len(frame) < ETH_HEADER:
            self.stats.rx_dropped += 1
            return
        if not self.filter.accepts(frame):
            self.stats.rx_filtered += 1
            return
        if len(self.rx_frames) >= 2 * RX_QUEUE_LIMIT:
            self.stats.rx_dropped += 1  # a backend that ignores set_accepting(False)
            return
        self.rx_frames.append(frame)
        self.rx_bytes += len(frame)
        if len(self.rx_frames) >= RX_QUEUE_LIMIT:
            self._hold(True)
        self._kick(RX)

    def _hold(self, on: bool) -> None:
        if self._holding != on:
            self._holding = on
            if not self._paused:
                self.port.set_accepting(not on)

    async def _rx_work(self, generation: int) -> None:
        queue = self.queues[RX]
        limit = BATCH
        while self.rx_frames and (chains := await self._next_batch(queue, generation, limit)):
            staged = await self._rx_fill(generation, queue, chains)
            if staged is None:
                return
            frames, entries = staged
            if not frames:
                if len(chains) == limit < queue.size:
                    limit = queue.size  # the frame needs more buffers than a batch has
                    continue
                if await self._arm_avail_event(queue, seen=len(chains)):
                    continue
                return  # the frame at the head waits for more buffers
            limit = BATCH
            commit = functools.partial(self._rx_commit, frames)
            if not await self._publish(generation, queue, entries, commit):
                return
            if self._queued:
                self._kick(RX)
                return

    async def _rx_fill(
        self, generation: int, queue: vq.VirtQueue, chains: list[vq.Chain]
    ) -> tuple[list[bytes], list[tuple[int, int]]] | None:
        """Write queued frames into ``chains``: (frames placed, used entries), None when
        the device was reset meanwhile. Nothing is committed here."""
        mergeable = self.has(F_MRG_RXBUF)
        frames: list[bytes] = []
        entries: list[tuple[int, int]] = []
        segments: list[tuple[int, int]] = []
        pieces: list[memoryview] = []
        used = 0
        while len(frames) < len(self.rx_frames) and used < len(chains):
            frame = self.rx_frames[len(frames)]
            need = HDR_SIZE + len(frame)
            if mergeable:
                taken, room = 0, 0
                while room < need and used + taken < len(chains):
                    room += chains[used + taken].writable_bytes
                    taken += 1
                if room < need:
                    if not frames and taken >= queue.size:
                        self._drop_head()  # more than the whole ring: it never fits
                        continue
                    break  # wait for more buffers
            else:
                taken = 1
                if chains[used].writable_bytes < need:
                    if frames:
                        break
                    self._drop_head()  # the driver's buffers are too small for it
                    continue
            data = HDR.pack(0, GSO_NONE, 0, 0, 0, 0, taken) + frame
            pos = 0
            view = memoryview(data)
            for chain in chains[used : used + taken]:
                piece = min(chain.writable_bytes, len(data) - pos)
                segments += scatter(chain.writable, piece)
                pieces.append(view[pos : pos + piece])
                entries.append((chain.head, piece))
                pos += piece
            used += taken
            frames.append(frame)
        if segments:  # one scatter for the whole batch
            await self.context.dma.write_sg(segments, b"".join(pieces))
            if generation != self._generation:
                return None
        return frames, entries

    def _drop_head(self) -> None:
        frame = self.rx_frames.popleft()
        self.rx_bytes -= len(frame)
        self.stats.rx_dropped += 1

    def _rx_commit(self, frames: list[bytes]) -> None:
        fifo = self.rx_frames
        for frame in frames:
            if fifo and fifo[0] is frame:  # a reset meanwhile may have emptied the queue
                fifo.popleft()
                self.rx_bytes -= len(frame)
                self.stats.rx_frames += 1
        if self._holding and len(fifo) <= RX_QUEUE_LIMIT // 2:
            self._hold(False)

    # =========================================================================================
    # Control queue

    async def _ctrl_work(self, generation: int) -> None:
        queue = self.queues[CTRL]
        while (chains := await self._next_batch(queue, generation)) is not None:
            changes: list[Callable[[RxFilter], None]] = []
            entries: list[tuple[int, int]] = []
            preview = self._filter_copy()
            for chain in chains:
                if not chain.writable or chain.readable_bytes < 2:
                    raise vq.VirtqueueError("control command without header or ack")
                if chain.readable_bytes > CTRL_MAX_COMMAND:
                    raise vq.VirtqueueError("control command too long")
                command = await self.context.dma.read_sg(chain.readable)
                ack, change = self._ctrl_command(command)
                if change is not None:
                    change(preview)
                    changes.append(change)
                await self.context.dma.write_sg(scatter(chain.writable, 1), bytes([ack]))
                if generation != self._generation:
                    return
                entries.append((chain.head, 1))
            commit = functools.partial(self._ctrl_commit, changes, len(chains))
            if not await self._publish(generation, queue, entries, commit):
                return

    def _filter_copy(self) -> RxFilter:
        f = self.filter
        return RxFilter(
            f.mac,
            f.promisc,
            f.allmulti,
            list(f.unicast),
            list(f.multicast),
            f.unicast_overflow,
            f.multicast_overflow,
        )

    def _ctrl_commit(self, changes: list[Callable[[RxFilter], None]], count: int) -> None:
        for change in changes:
            change(self.filter)
        self.stats.ctrl_commands += count

    def _ctrl_command(self, command: bytes) -> tuple[int, Callable[[RxFilter], None] | None]:
        """(ack, the filter change it makes when committed) for one command."""
        klass, cmd, data = command[0], command[1], command[2:]
        if klass == CLASS_RX and self.has(F_CTRL_RX) and cmd in (RX_PROMISC, RX_ALLMULTI):
            if len(data) != 1:
                return CTRL_ERR, None
            on = bool(data[0])
            if cmd == RX_PROMISC:
                return CTRL_OK, functools.partial(_set_attr, "promisc", on)
            return CTRL_OK, functools.partial(_set_attr, "allmulti", on)
        if klass == CLASS_MAC and cmd == MAC_ADDR_SET and self.has(F_CTRL_MAC_ADDR):
            if len(data) != 6 or data[0] & 1:
                return CTRL_ERR, None
            return CTRL_OK, functools.partial(_set_attr, "mac", bytes(data))
        if klass == CLASS_MAC and cmd == MAC_TABLE_SET and self.has(F_CTRL_RX):
            tables = _parse_mac_tables(data)
            if tables is None:
                return CTRL_ERR, None
            return CTRL_OK, functools.partial(_set_tables, tables)
        return CTRL_ERR, None

    # =========================================================================================
    # Life cycle

    def on_attach(self) -> None:
        self._new_generation()
        self._dma_failing = False  # a new client: its first fault is worth a line
        for index in sorted(self._irq_due):
            self.notify_queue(self.queues[index])  # owed by a batch a disconnect cut short
        self._irq_due.clear()
        self._kick_all()

    def on_detach(self) -> None:
        self._new_generation()

    def pause(self) -> None:
        if self._paused:
            return
        self._paused = True
        if not self._holding:
            self.port.set_accepting(False)

    def resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if not self._holding:
            self.port.set_accepting(True)
        for index in sorted(self._irq_due):
            self.notify_queue(self.queues[index])
        self._irq_due.clear()
        self._kick_all()

    # =========================================================================================
    # Migration
    #
    # Sections: "virtio.transport" (features, status, selectors, vectors, ISR and every
    # queue's geometry, vector, last_avail, used_idx, event index), "virtio_net.filter"
    # (MAC, receive modes, MAC tables), "virtio_net.rx" (frames waiting for buffers),
    # "virtio_net.misc" (link, queues owing an interrupt check). Config space and the
    # MSI-X table travel in the engine's own sections.

    _MISC = struct.Struct("<BB")

    def save_state(self) -> list[Section]:
        rx: list[Buffer] = [struct.pack("<I", len(self.rx_frames))]
        for frame in self.rx_frames:
            rx.append(struct.pack("<I", len(frame)))
            rx.append(frame)
        due = sum(1 << i for i in self._irq_due)
        return [
            ("virtio.transport", self.save_transport()),
            ("virtio_net.filter", self.filter.pack()),
            ("virtio_net.rx", rx),
            ("virtio_net.misc", self._MISC.pack(int(self.link_up), due)),
        ]

    def migration_size_estimate(self) -> int:
        return 1024 + self.rx_bytes + 4 * len(self.rx_frames)

    def load_state(self, sections: Sequence[LoadedSection]) -> None:
        try:
            by_name = sections_by_name(
                sections,
                {"virtio.transport", "virtio_net.filter", "virtio_net.rx", "virtio_net.misc"},
            )
            head, queues = self.parse_transport(by_name["virtio.transport"])
            rx_filter = RxFilter.unpack(by_name["virtio_net.filter"])
            frames = _parse_frames(by_name["virtio_net.rx"])
            misc = by_name["virtio_net.misc"]
            if len(misc) != self._MISC.size:
                raise ValueError("misc section of the wrong size")
            link, due = self._MISC.unpack(misc)
            if link > 1 or due >> len(self.queues):
                raise ValueError("misc flags out of range")
        except (ValueError, struct.error) as exc:
            raise DeviceError(errno.EINVAL, f"virtio-net state: {exc}") from None
        self.load_transport(head, queues)
        self.filter = rx_filter
        self.rx_frames = deque(frames)
        self.rx_bytes = sum(len(frame) for frame in frames)
        self.link_up = bool(link)
        self._irq_due = {i for i in range(len(self.queues)) if due >> i & 1}
        self._new_generation()
        self._holding = len(self.rx_frames) >= RX_QUEUE_LIMIT
        if not self._paused:  # loaded into a running device (not the engine's way)
            self._paused = True
            self.resume()


def _merged(regions: list[tuple[int, int] | None]) -> list[tuple[int, int]]:
    """Mapped ``(start, end)`` intervals, adjacent mappings joined."""
    spans = sorted((iova, iova + size) for region in regions if region for iova, size in [region])
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _set_attr(name: str, value: object, target: RxFilter) -> None:
    setattr(target, name, value)


def _parse_mac_tables(data: bytes) -> tuple[list[bytes], bool, list[bytes], bool] | None:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET: unicast then multicast ``{le32 entries; macs}``."""
    tables: list[tuple[list[bytes], bool]] = []
    pos = 0
    for _ in range(2):
        if pos + 4 > len(data):
            return None
        (count,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if count > (len(data) - pos) // 6:
            return None
        macs = [bytes(data[pos + 6 * i : pos + 6 * i + 6]) for i in range(count)]
        pos += 6 * count
        overflow = count > MAC_TABLE_ENTRIES
        tables.append(([] if overflow else macs, overflow))
    if pos != len(data):
        return None
    (uni, uni_overflow), (multi, multi_overflow) = tables
    return uni, uni_overflow, multi, multi_overflow


def _set_tables(tables: tuple[list[bytes], bool, list[bytes], bool], target: RxFilter) -> None:
    target.unicast, target.unicast_overflow, target.multicast, target.multicast_overflow = tables


def _parse_frames(data: memoryview) -> list[bytes]:
    if len(data) < 4:
        raise ValueError("receive queue section too short")
    (count,) = struct.unpack_from("<I", data)
    if count > RX_QUEUE_LIMIT * 2:
        raise ValueError(f"{count} frames waiting: more than the queue holds")
    frames: list[bytes] = []
    pos = 4
    for _ in range(count):
        if pos + 4 > len(data):
            raise ValueError("receive queue section truncated")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if not ETH_HEADER <= length <= MAX_TX_FRAME or pos + length > len(data):
            raise ValueError(f"waiting frame of {length} bytes")
        frames.append(bytes(data[pos : pos + length]))
        pos += length
    if pos != len(data):
        raise ValueError("receive queue section has trailing bytes")
    return frames


__all__ = [
    "DEFAULT_MAC",
    "OFFERED",
    "RxFilter",
    "VirtioNet",
    "VirtioNetOptions",
]
