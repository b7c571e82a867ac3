"""The e1000's receiver: the receive filters, the receive FIFO, the RDH..RDT ring and the
receive job.

A frame from the wire (or from the transmitter in loopback) is filtered (RA with AV, the MTA
hash per RCTL.MO, BAM, UPE/MPE, VFTA when RCTL.VFE) into the receive FIFO (the PBA receive
share); a job moves FIFO frames into descriptors RDH..RDT (RCTL.BSIZE/BSEX buffers, VLAN
strip with CTRL.VME, FCS appended unless RCTL.SECRC, RXCSUM status), counting RNBC while
there is no descriptor, and raises RXT0 and RXDMT0. A full FIFO drops the frame (MPC, RXO)
only when the guest's ring cannot take what waits, as on the real part, whose DMA keeps up
with the wire; when the ring has room and only our job is behind (a backend delivering a
burst), the receiver keeps the frame and has the wire wait (``set_accepting(False)``) until
the FIFO has drained to half.

A disconnect cancels the running job at any await: each batch commits (frames off the FIFO,
RDH) at once after its last write-back, so a cut job is redone from the same head for the
next client, never losing or repeating a frame (see :meth:`Receiver._batch`).

:class:`Receiver` is composed by the device: it owns the FIFO and the receive-address cache
and works on the shared register file, :class:`~devices.e1000.jobs.Jobs`,
:class:`~devices.e1000.interrupts.Interrupts` and :class:`~devices.e1000.stats.Statistics`;
``set_accepting`` is the device's network port's.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections import deque
from collections.abc import Callable

from devices.api import DeviceError
from devices.e1000 import packet
from devices.e1000 import regs as r
from devices.e1000.jobs import Engine, Parts, Progress

RX_BATCH = 64  # descriptors filled per job step
MAX_FRAME = 1514  # without FCS and VLAN tag, RCTL.LPE off
MAX_LONG_FRAME = 16384


def fifo_limit(values: dict[int, int]) -> int:
    """Bytes the receive FIFO holds: the PBA receive share (at least one long frame)."""
    return max((values[r.PBA] & 0xFFFF) * 1024, MAX_LONG_FRAME)


class Receiver(Engine):
    """The receive side of the device's register file."""

    def __init__(self, parts: Parts, *, set_accepting: Callable[[bool], None]) -> None:
        super().__init__(parts)
        #: Whether the wire may deliver frames now (the network port's).
        self.set_accepting = set_accepting
        self.fifo: deque[bytes] = deque()
        self.fifo_bytes = 0
        self.rnbc_noted = False  # RNBC already counted for the frame at the FIFO head
        self.backpressure = False  # the FIFO is full, the ring is not: the wire waits
        self._addresses: frozenset[bytes] | None = None  # RA entries with AV

    def reset(self) -> None:
        self.fifo.clear()
        self.fifo_bytes = 0
        self.rnbc_noted = False
        self.set_backpressure(False)

    # -- receive address filter -------------------------------------------------------------
    def ra_writer(self, offset: int) -> Callable[[int], None]:
        def write(value: int) -> None:
            self.values[offset] = value
            self._addresses = None

        return write

    def forget_addresses(self) -> None:
        """The RA registers changed behind the handlers (reset, state load)."""
        self._addresses = None

    def _address_set(self) -> frozenset[bytes]:
        cache = self._addresses
        if cache is None:
            values = self.values
            addresses = set()
            for i in range(r.RA_COUNT):
                high = values[r.RA + 8 * i + 4]
                if high & r.RAH_AV:
                    low = values[r.RA + 8 * i]
                    addresses.add(low.to_bytes(4, "little") + (high & 0xFFFF).to_bytes(2, "little"))
            cache = self._addresses = frozenset(addresses)
        return cache

    def accept(self, frame: bytes, rctl: int) -> bool:
        values = self.values
        if (
            rctl & r.RCTL_VFE
            and len(frame) >= 16
            and (frame[12] << 8 | frame[13]) == values[r.VET] & 0xFFFF
        ):
            vid = (frame[14] << 8 | frame[15]) & 0xFFF
            if not values[r.VFTA + 4 * (vid >> 5)] >> (vid & 31) & 1:
                return False
        dst = frame[:6]
        multicast = frame[0] & 1
        if multicast:
            if rctl & r.RCTL_MPE:
                return True
            if rctl & r.RCTL_BAM and dst == b"\xff" * 6:
                return True
        elif rctl & r.RCTL_UPE:
            return True
        if dst in self._address_set():
            return True
        if not multicast:
            return False
        mo = (rctl & r.RCTL_MO_MASK) >> r.RCTL_MO_SHIFT
        shift = (4, 3, 2, 0)[mo]
        hashed = (frame[4] >> shift | frame[5] << (8 - shift)) & 0xFFF
        return bool(values[r.MTA + 4 * (hashed >> 5)] >> (hashed & 31) & 1)

    # -- into the FIFO ----------------------------------------------------------------------
    def receive(self, frame: bytes) -> None:
        """A frame for the receiver (the device checked the link and loopback)."""
        values = self.values
        stats = self.stats
        rctl = values[r.RCTL]
        length = len(frame)
        if not rctl & r.RCTL_EN or length < packet.ETH_HEADER:
            return
        stats.count(r.TPR)
        stats.count64(r.TORL, max(length, packet.MIN_FRAME) + 4)
        if not self.accept(frame, rctl):
            return
        tagged = (frame[12] << 8 | frame[13]) == values[r.VET] & 0xFFFF
        limit = MAX_LONG_FRAME if rctl & r.RCTL_LPE else MAX_FRAME + (4 if tagged else 0)
        if length > limit:
            stats.count(r.ROC)
            return
        if length < packet.MIN_FRAME:
            frame = frame + bytes(packet.MIN_FRAME - length)
        if self.fifo_bytes + len(frame) > self.fifo_limit():
            if self._ring_outrun(frame) or self.fifo_bytes > 2 * self.fifo_limit():
                stats.count(r.MPC)  # overrun: the guest's ring cannot take what waits
                self.interrupts.cause(r.ICR_RXO)
                return
            # The ring has room: only our DMA is behind (the hardware's would not be).
            # Keep the frame and have the wire hold the next ones until the FIFO drains.
            self.set_backpressure(True)
        self.fifo.append(frame)
        self.fifo_bytes += len(frame)
        self.kick()

    def fifo_limit(self) -> int:
        return fifo_limit(self.values)

    def _ring_outrun(self, frame: bytes) -> bool:
        """Whether the FIFO's frames and ``frame`` need more descriptors than the guest has
        given the device (the FIFO overflows on the real part only then)."""
        values = self.values
        count_total = values[r.RDLEN] // r.DESC_SIZE
        head, tail = values[r.RDH], values[r.RDT]
        if not count_total or head >= count_total or tail >= count_total:
            return True
        available = (tail - head) % count_total
        size = self.buffer_size(values[r.RCTL])
        extra = 0 if values[r.RCTL] & r.RCTL_SECRC else 4
        needed = sum(-(-(len(f) + extra) // size) for f in (*self.fifo, frame))
        return needed > available

    def set_backpressure(self, on: bool) -> None:
        if self.backpressure != on:
            self.backpressure = on
            if not self.jobs.paused:
                self.set_accepting(not on)

    # -- register handlers ------------------------------------------------------------------
    def write_rctl(self, value: int) -> None:
        self.values[r.RCTL] = value
        if not value & r.RCTL_EN and self.fifo:
            self.fifo.clear()  # receiver off: what it held is gone
            self.fifo_bytes = 0
            self.rnbc_noted = False
            self.set_backpressure(False)
        self.kick()

    def write_rdt(self, value: int) -> None:
        self.values[r.RDT] = value
        self.kick()

    # -- the job ----------------------------------------------------------------------------
    def kick(self) -> None:
        if self.queued or self.jobs.paused or not self.fifo:
            return
        self.queued = self.jobs.submit(self._job)

    @staticmethod
    def buffer_size(rctl: int) -> int:
        code = (rctl & r.RCTL_BSIZE_MASK) >> r.RCTL_BSIZE_SHIFT
        if rctl & r.RCTL_BSEX and code:
            return (0, 16384, 8192, 4096)[code]
        return (2048, 1024, 512, 256)[code]

    def _prepare(self, frame: bytes) -> tuple[bytes, int, int, int, int]:
        """(bytes to store, status, errors, checksum, special) for a FIFO frame."""
        values = self.values
        status = errors = special = 0
        data = frame
        vet = values[r.VET] & 0xFFFF
        l3 = packet.ETH_HEADER
        if (frame[12] << 8 | frame[13]) == vet:
            if values[r.CTRL] & r.CTRL_VME:
                special = frame[14] << 8 | frame[15]
                status |= r.RXD_STAT_VP
                data = frame[:12] + frame[16:]
            else:
                l3 += 4
        csum_status, errors, csum = packet.rx_checksum(data, values[r.RXCSUM], l3)
        status |= csum_status
        if not values[r.RCTL] & r.RCTL_SECRC:
            data = data + (zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "little")
        return data, status, errors, csum, special

    async def _job(self, generation: int) -> None:
        self.queued = False
        values = self.values
        jobs = self.jobs
        progress = Progress()
        fifo = self.fifo
        while fifo and not jobs.paused and values[r.RCTL] & r.RCTL_EN:
            count_total = values[r.RDLEN] // r.DESC_SIZE
            head, tail = values[r.RDH], values[r.RDT]
            available = (tail - head) % count_total if count_total else 0
            if not available or head >= count_total or tail >= count_total:
                self._no_buffer()
                break
            base = (values[r.RDBAH] << 32 | values[r.RDBAL]) & ~0xF
            try:
                used = await self._batch(
                    generation, base, head, available, count_total=count_total, progress=progress
                )
            except DeviceError as exc:
                jobs.dma_failed("receive", head, exc)  # the frame stays at the FIFO head
                break
            if used is None:
                return  # reset, reloaded or detached meanwhile
            if not used:
                if fifo:
                    self._no_buffer()  # the frame at the head needs more descriptors
                break
            if jobs.waiting and fifo:
                # Transmit and receive are separate engines on the real part: while
                # frames keep arriving, a receive job that ran until the FIFO is empty
                # would starve the transmit job queued behind it (and the reverse), so
                # each goes to the back of the queue after a batch when work waits.
                self.kick()
                break
        self._causes(progress)

    def _causes(self, progress: Progress) -> None:
        values = self.values
        if self.backpressure and self.fifo_bytes <= self.fifo_limit() // 2:
            self.set_backpressure(False)
        if progress.moved:
            causes = r.ICR_RXT0
            count_total = values[r.RDLEN] // r.DESC_SIZE
            if count_total:
                free = (values[r.RDT] - values[r.RDH]) % count_total
                shift = ((values[r.RCTL] & r.RCTL_RDMTS_MASK) >> r.RCTL_RDMTS_SHIFT) + 1
                if free <= count_total >> shift:
                    causes |= r.ICR_RXDMT0
            self.interrupts.cause(causes, rx_delay=True)

    async def _batch(
        self,
        generation: int,
        base: int,
        head: int,
        available: int,
        *,
        count_total: int,
        progress: Progress,
    ) -> int | None:
        """Fill up to RX_BATCH descriptors from ``head`` with FIFO frames; returns the
        descriptors used, None when the device was reset meanwhile.

        Exactly once across a disconnect (the connection cancels the job at any await):
        the frames stay in the FIFO, and RDH where it is, while their buffers are written;
        the write-back of the descriptors from RDH (the guest's next to read) is the last
        await, and the commit (frames off the FIFO, RDH) follows it with no await in
        between. Cancelled before it, the next job writes the same frames into the same
        buffers and descriptors again (the guest saw no DD at RDH, so read nothing).
        Cancelled during it, the descriptors have landed (the runtime moves a write's
        bytes before its await can be cancelled): the batch commits before the
        cancellation goes on."""
        jobs = self.jobs
        dma = jobs.dma
        fifo = self.fifo
        batch = min(available, RX_BATCH)
        size = self.buffer_size(self.values[r.RCTL])
        addresses = await self._buffers(base, head, batch, count_total)
        if generation != jobs.generation:
            return None
        used = 0
        frames: list[bytes] = []
        writebacks: list[tuple[int, bytes]] = []
        while len(frames) < len(fifo) and not jobs.paused:
            frame = fifo[len(frames)]
            data, status, errors, csum, special = self._prepare(frame)
            need = -(-len(data) // size)
            if need > batch - used:
                if need >= count_total and not frames:
                    self._drop_head(frame)  # can never fit this ring
                    continue
                break
            for k in range(need):
                chunk = data[k * size : (k + 1) * size]
                index = used + k
                await dma.write(addresses[index], chunk)
                if generation != jobs.generation:
                    return None
                last = k == need - 1
                desc = r.RX_DESC.pack(
                    addresses[index],
                    len(chunk),
                    csum if last else 0,
                    r.RXD_STAT_DD | (r.RXD_STAT_EOP | status if last else 0),
                    errors if last else 0,
                    special if last else 0,
                )
                writebacks.append(((head + index) % count_total, desc))
            used += need
            frames.append(frame)
        if not frames:
            return 0
        runs = self._descriptor_runs(writebacks)
        for run_start, run in runs[:-1]:  # the ring wrapped: the part from index 0
            await dma.write(base + run_start * r.DESC_SIZE, run)
            if generation != jobs.generation:
                return None
        run_start, run = runs[-1]
        commit = functools.partial(self._commit, frames, head, used, count_total, progress)
        address = base + run_start * r.DESC_SIZE
        if await jobs.write_back_and_commit(
            generation,
            address,
            run,
            commit=commit,
            causes=functools.partial(self._causes, progress),
        ):
            return used
        return None

    def _commit(
        self, frames: list[bytes], head: int, used: int, count_total: int, progress: Progress
    ) -> None:
        """A batch's effects, all at once (no await may split them)."""
        self.jobs.dma_worked()
        fifo = self.fifo
        for frame in frames:
            # The guest may have turned the receiver off meanwhile, clearing the FIFO: the
            # frames are in its ring all the same, only what is still queued leaves it.
            if fifo and fifo[0] is frame:
                fifo.popleft()
                self.fifo_bytes -= len(frame)
                self.rnbc_noted = False
            self._count_received(frame)
        self.values[r.RDH] = (head + used) % count_total
        progress.moved += len(frames)

    def _no_buffer(self) -> None:
        """A frame waits in the FIFO with no descriptor for it (counted once per frame)."""
        if not self.rnbc_noted:
            self.rnbc_noted = True
            self.stats.count(r.RNBC)

    def _drop_head(self, frame: bytes) -> None:
        self.fifo.popleft()
        self.fifo_bytes -= len(frame)
        self.rnbc_noted = False
        self.stats.count(r.RLEC)

    async def _buffers(self, base: int, head: int, count: int, total: int) -> list[int]:
        """Buffer addresses of ``count`` descriptors from ``head`` (wrapping)."""
        dma = self.jobs.dma
        first = min(count, total - head)
        raw = await dma.read(base + head * r.DESC_SIZE, first * r.DESC_SIZE)
        if count > first:
            raw += await dma.read(base, (count - first) * r.DESC_SIZE)
        return [struct.unpack_from("<Q", raw, i * r.DESC_SIZE)[0] for i in range(count)]

    @staticmethod
    def _descriptor_runs(writebacks: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """Descriptors to write back as (first index, bytes) runs of consecutive indices,
        the run holding the first descriptor last: the guest reads the ring in order from
        there, so runs written before it show the guest nothing (see _batch)."""
        runs: list[tuple[int, list[bytes]]] = []
        for index, desc in writebacks:
            if runs and index == runs[-1][0] + len(runs[-1][1]):
                runs[-1][1].append(desc)
            else:
                runs.append((index, [desc]))
        return [(start, b"".join(run)) for start, run in reversed(runs)]

    def _count_received(self, frame: bytes) -> None:
        stats = self.stats
        wire = len(frame) + 4
        stats.count(r.GPRC)
        stats.count64(r.GORCL, wire)
        stats.count(r.RX_SIZE_BUCKETS[packet.size_bucket(wire)])
        if frame[0] & 1:
            stats.count(r.BPRC if frame[:6] == b"\xff" * 6 else r.MPRC)
