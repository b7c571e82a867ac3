"""The e1000's transmitter: the TDH..TDT descriptor ring and the transmit job.

A TDT or TCTL write submits a job that walks TDH..TDT (legacy, context and data descriptors;
checksum offload and TSO are :mod:`devices.e1000.packet`'s), hands frames to the wire,
writes DD back for RS descriptors, and raises TXDW and TXQE.

A disconnect cancels the running job at any await: each batch commits (frames on the wire,
the assembler, TDH) at once after its last write-back, so a cut job is redone from the same
head for the next client, never losing or repeating a frame (see
:meth:`Transmitter._batch`). A DMA fault keeps the work and retries it.

:class:`Transmitter` is composed by the device: it owns the transmit assembler and works on
the shared register file, :class:`~devices.e1000.jobs.Jobs`,
:class:`~devices.e1000.interrupts.Interrupts` and
:class:`~devices.e1000.stats.Statistics`. Where a frame goes (the wire, back to the
receiver in loopback, nowhere without a carrier) is the device's to say: ``carrier`` and
``emit``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from devices.api import DeviceError
from devices.e1000 import packet
from devices.e1000 import regs as r
from devices.e1000.jobs import Engine, Parts, Progress

TX_BATCH = 64  # descriptors fetched per DMA read


@dataclass(slots=True)
class _TxStage:
    """A transmit batch read but not yet committed: the assembler it leaves behind, the
    frames it completes, the TSO context descriptors it counts, the TXDW it reports."""

    tx: packet.TxAssembler
    count: int  # descriptors
    next_head: int  # TDH after them
    frames: list[packet.TxFrame] = field(default_factory=list)
    tso_contexts: int = 0
    report: bool = False  # an RS descriptor is written back
    delay: bool = False  # ... with IDE


class Transmitter(Engine):
    """The transmit ring of the device's register file."""

    def __init__(
        self, parts: Parts, *, carrier: Callable[[], bool], emit: Callable[[bytes], None]
    ) -> None:
        super().__init__(parts)
        #: Whether a frame sent now goes anywhere (link up, or loopback).
        self.carrier = carrier
        #: Puts a frame on the wire (or back to the receiver in loopback).
        self.emit = emit
        #: The TX context and the partly assembled (or partly segmented) packet.
        self.assembler = packet.TxAssembler()

    def reset(self) -> None:
        self.assembler.reset()

    # -- register handlers ------------------------------------------------------------------
    def write_tctl(self, value: int) -> None:
        self.values[r.TCTL] = value
        self.kick()

    def write_tdt(self, value: int) -> None:
        self.values[r.TDT] = value
        self.kick()

    # -- the job ----------------------------------------------------------------------------
    def kick(self, *, doorbell: bool = True) -> None:
        values = self.values
        if self.queued or self.jobs.paused or not values[r.TCTL] & r.TCTL_EN:
            return
        if values[r.TDH] == values[r.TDT]:
            if doorbell:
                self.interrupts.cause(r.ICR_TXQE)  # kicked with nothing to send: queue empty
            return
        self.queued = self.jobs.submit(self._job)

    async def _job(self, generation: int) -> None:
        self.queued = False
        values = self.values
        jobs = self.jobs
        count_total = values[r.TDLEN] // r.DESC_SIZE
        base = (values[r.TDBAH] << 32 | values[r.TDBAL]) & ~0xF
        progress = Progress()
        yielded = False
        while not jobs.paused and values[r.TCTL] & r.TCTL_EN:
            head, tail = values[r.TDH], values[r.TDT]
            if head == tail or head >= count_total or tail >= count_total:
                break
            count = min((tail - head) % count_total, count_total - head, TX_BATCH)
            try:
                moved = await self._batch(
                    generation, base, head, count, count_total=count_total, progress=progress
                )
            except DeviceError as exc:
                jobs.dma_failed("transmit", head, exc)
                break
            if not moved:
                return  # reset, reloaded or detached meanwhile
            if jobs.waiting:
                yielded = True  # let queued work (receive) run first: see Receiver._job
                break
        self._causes(progress)
        if yielded:
            self.kick(doorbell=False)  # the rest, behind what was queued meanwhile

    async def _batch(
        self,
        generation: int,
        base: int,
        head: int,
        count: int,
        *,
        count_total: int,
        progress: Progress,
    ) -> bool:
        """Move ``count`` descriptors from ``head``; False when the device was reset meanwhile.

        Exactly once across a disconnect: the connection cancels the job at any await. The
        descriptors and buffers are read into a copy of the assembler (nothing the guest or
        the wire sees); the DD write-back is the only await with an effect, and the commit
        (frames on the wire, the assembler, TDH) follows it with no await in between. A job
        cancelled before the write-back left no trace: the next one redoes the batch from
        the same TDH. Cancelled during the write-back, the DD bits have landed (the runtime
        moves a write's bytes before its await can be cancelled), so the batch commits
        before the cancellation goes on."""
        jobs = self.jobs
        raw = await jobs.dma.read(base + head * r.DESC_SIZE, count * r.DESC_SIZE)
        if generation != jobs.generation:
            return False
        stage = _TxStage(self.assembler.copy(), count, (head + count) % count_total)
        writeback: bytearray | None = None
        for i in range(count):
            address, lower, upper = r.DESC.unpack_from(raw, i * r.DESC_SIZE)
            cmd = lower >> 24
            await self._descriptor(stage, address, lower, upper, cmd)
            if generation != jobs.generation:
                return False
            if cmd & (r.TXD_CMD_RS | r.TXD_CMD_RPS):
                if writeback is None:
                    writeback = bytearray(raw)
                writeback[i * r.DESC_SIZE + 12] |= r.TXD_STAT_DD
                stage.report = True
                stage.delay = stage.delay or bool(cmd & r.TXD_CMD_IDE)
        commit = functools.partial(self._commit, stage, progress)
        if writeback is None:
            commit()
            return True
        return await jobs.write_back_and_commit(
            generation,
            base + head * r.DESC_SIZE,
            writeback,
            commit=commit,
            causes=functools.partial(self._causes, progress),
        )

    def _commit(self, stage: _TxStage, progress: Progress) -> None:
        """A batch's effects, all at once (no await may split them)."""
        self.jobs.dma_worked()
        self.assembler = stage.tx
        for _ in range(stage.tso_contexts):
            self.stats.count(r.TSCTC)
        for frame in stage.frames:
            self._send(frame)
        self.values[r.TDH] = stage.next_head
        progress.moved += stage.count
        progress.report = progress.report or stage.report
        progress.delay = progress.delay or stage.delay

    def _causes(self, progress: Progress) -> None:
        if not progress.moved:
            return
        values = self.values
        causes = r.ICR_TXDW if progress.report else 0
        if values[r.TDH] == values[r.TDT]:
            causes |= r.ICR_TXQE
        self.interrupts.cause(causes, tx_delay=progress.delay)

    async def _descriptor(
        self, stage: _TxStage, address: int, lower: int, upper: int, cmd: int
    ) -> None:
        """Read one descriptor's buffer into ``stage`` (its assembler and frames)."""
        vlan_enabled = bool(self.values[r.CTRL] & r.CTRL_VME)  # as it is before the read
        extended = bool(lower & r.TXD_CMD_DEXT << 24)
        if extended:
            dtyp = lower >> 20 & 0xF
            if dtyp == r.TXD_DTYP_CONTEXT:
                stage.tx.context(address, lower, upper)
                if cmd & r.TUCMD_TSE:
                    stage.tso_contexts += 1
                return
            if dtyp != r.TXD_DTYP_DATA:
                return  # reserved descriptor type: skipped
        length = lower & (0xFFFFF if extended else 0xFFFF)
        payload = await self.jobs.dma.read(address, length) if length else b""
        frames = stage.tx.add(
            payload,
            cmd=cmd,
            extended=extended,
            popts=upper >> 8 & 0xFF if extended else 0,  # data descriptors' options
            special=upper >> 16,
            legacy_cso=0 if extended else lower >> 16 & 0xFF,  # legacy checksum insertion
            legacy_css=0 if extended else upper >> 8 & 0xFF,
            vlan_enabled=vlan_enabled,
        )
        stage.frames.extend(frames)

    def _send(self, tx_frame: packet.TxFrame) -> None:
        values = self.values
        stats = self.stats
        frame = tx_frame.data
        if tx_frame.vlan is not None:
            frame = packet.insert_vlan(frame, values[r.VET] & 0xFFFF, tx_frame.vlan)
        if values[r.TCTL] & r.TCTL_PSP and len(frame) < packet.MIN_FRAME:
            frame += bytes(packet.MIN_FRAME - len(frame))
        if not self.carrier():
            return  # no carrier: the frame goes nowhere
        wire = len(frame) + 4  # statistics count the FCS
        stats.count(r.TPT)
        stats.count(r.GPTC)
        stats.count64(r.TOTL, wire)
        stats.count64(r.GOTCL, wire)
        stats.count(r.TX_SIZE_BUCKETS[packet.size_bucket(wire)])
        if frame[0] & 1:
            stats.count(r.BPTC if frame[:6] == b"\xff" * 6 else r.MPTC)
        self.emit(bytes(frame))
