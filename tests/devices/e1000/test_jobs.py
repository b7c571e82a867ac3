"""``e1000`` device work in process (devices/e1000/jobs.py): transmit and receive jobs cut
off by a disconnect at every await point, a DMA fault retried, the timer job and timers
frozen while paused.

The connection cancels the running device job when its client goes away, then a client
attaches again (``detach``/``attach``). Here a DMA that cancels the job's scope at its k-th
call stands for that, for every k, with the runtime's semantics: a cancelled read has
moved nothing, a cancelled write has landed (its bytes move before the await can be
cancelled). Meanwhile the guest keeps polling its receive ring, as a running VM does.
Whatever k, every frame reaches the wire and the guest exactly once, in order, with the
same descriptors written back, heads and statistics as a run that was never cut."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio

from devices.e1000 import regs as r
from devices.e1000.jobs import Timers
from emulator.testing.guest_e1000 import tcp_frame, udp_frame
from tests.devices.e1000.test_device import MAC, FakeDma, Rig, frame_to, line, mdic
from tests.devices.e1000.test_tx import IP_A, IP_B, PEER, queue, tx_status


async def test_itr_deferred_interrupt_is_delivered_by_the_timer_job() -> None:
    rig = Rig()
    rig.wr(r.ITR, 3906)
    rig.wr(r.IMS, r.ICR_LSC)
    rig.wr(r.ICS, r.ICR_LSC)
    rig.isr()
    rig.wr(r.ICS, r.ICR_LSC)
    assert rig.sink.intx == 1
    await rig.run(advance=0.002)  # no register access: the job's context.sleep gets there
    assert rig.sink.intx == 2


async def test_the_timer_job_sleeps_to_the_deadline_in_one_wait() -> None:
    """No slices: the context ends the wait when work is submitted (a doorbell never
    queues behind a sleeping timer), so the job asks for the whole time to the deadline."""
    rig = Rig()
    rig.wr(r.IMS, r.ICR_RXT0)
    rig.wr(r.RDTR, 0xFFFF)  # 67 ms
    rig.dev.interrupts.cause(r.ICR_RXT0, rx_delay=True)
    await rig.run(advance=0.001)
    assert rig.ctx.idle_sleeps == [pytest.approx(0xFFFF * r.DELAY_UNIT)]
    assert not line(rig)
    await rig.run(advance=0.07)
    assert line(rig)


async def test_timers_freeze_while_paused() -> None:
    rig = Rig()
    mdic(rig, 0, write=0x1340)
    rig.clock.now += 0.3
    rig.dev.pause()
    rig.clock.now += 10  # stopped for a long time
    assert not rig.rd(r.STATUS) & r.STATUS_LU
    rig.dev.resume()
    rig.clock.now += 0.1
    assert not rig.rd(r.STATUS) & r.STATUS_LU
    rig.clock.now += 0.11
    assert rig.rd(r.STATUS) & r.STATUS_LU  # 0.5 s of running time in all


class CuttingDma(FakeDma):
    """Guest memory whose k-th access cancels the job (the client went away)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.cut_at: int | None = None
        self.scope: trio.CancelScope | None = None

    def _count_call(self) -> None:
        self.calls += 1
        if self.calls == self.cut_at and self.scope is not None:
            self.scope.cancel()  # FakeDma's checkpoint raises: reads before, writes after

    async def read(self, iova: int, length: int) -> bytes:
        self._count_call()
        return await super().read(iova, length)

    async def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        self._count_call()
        await super().write(iova, data)


def cutting_rig() -> tuple[Rig, CuttingDma]:
    rig = Rig(autoneg_delay=0)
    dma = CuttingDma()
    rig.dma = rig.ctx._dma = dma
    return rig, dma


@dataclass
class Outcome:
    wire: list[bytes]
    received: list[bytes]
    tdh: int
    rdh: int
    tx_status: list[int]
    stats: dict[str, int]
    dma_calls: int
    cut: bool


async def run_cut(rig: Rig, dma: CuttingDma, cut_at: int | None) -> tuple[bool, list[bytes]]:
    """Run the queued jobs, cut at DMA call ``cut_at``; after a cut, the guest polls its
    ring, the connection drops the queued jobs and a client attaches again."""
    dma.calls, dma.cut_at = 0, cut_at
    with trio.CancelScope() as scope:
        dma.scope = scope
        await rig.run()
    dma.scope, dma.cut_at = None, None
    if not scope.cancelled_caught:
        return False, []
    polled = [data for data, *_ in rig.take_rx()]
    rig.ctx.jobs.clear()
    rig.dev.detach()
    rig.dev.attach(rig.ctx)  # pending work is resubmitted
    await rig.run()
    return True, polled


RX_FRAME_SIZES = (60, 300, 520, 100, 64, 1000, 61)  # 13 of the 15 descriptors


async def scenario(cut_at: int | None) -> Outcome:
    """Transmit (legacy, TSO, checksum offload, descriptors without RS, a ring wrap) and
    receive (frames over several 256-byte buffers, a ring wrap) in one device, with both
    jobs queued when the cut comes."""
    rig, dma = cutting_rig()
    rig.setup_tx(16)
    rig.setup_rx(
        16,
        rctl=r.RCTL_EN | r.RCTL_BAM | (3 << r.RCTL_BSIZE_SHIFT),  # 256-byte buffers, FCS
        size=256,
    )
    rig.give_rx(15)
    # Move both heads near the end of their rings first (not cut).
    for i in range(11):
        rig.legacy(frame_to(PEER, 60 + i))
    rig.wr(r.TDT, rig.tx_next)
    for i in range(10):
        rig.dev.net_receive(frame_to(MAC, 60 + i, src=PEER))
    await rig.run()
    rig.take_rx()
    rig.give_rx(10)
    rig.port.frames.clear()
    for offset in (r.GPTC, r.TSCTC, r.GPRC):
        rig.rd(offset)

    payload = bytes((i * 13) & 0xFF for i in range(5000))
    queue(rig, tcp_frame(PEER, MAC, IP_A, IP_B, payload, seq=7), tso_mss=1448)
    queue(rig, udp_frame(PEER, MAC, IP_A, IP_B, b"u" * 333), csum=True, ip_csum=True)
    rig.legacy(frame_to(PEER, 90), r.TXD_CMD_EOP | r.TXD_CMD_IFCS)  # no RS
    rig.legacy(frame_to(PEER, 1514))
    rig.wr(r.TDT, rig.tx_next)
    for i, size in enumerate(RX_FRAME_SIZES):
        rig.dev.net_receive(frame_to(MAC, size, ethertype=0x8800 + i, src=PEER))
    cut, received = await run_cut(rig, dma, cut_at)
    received += [data for data, *_ in rig.take_rx()]
    return Outcome(
        wire=list(rig.port.frames),
        received=received,
        tdh=rig.rd(r.TDH),
        rdh=rig.rd(r.RDH),
        tx_status=[tx_status(rig, i) for i in range(16)],
        stats={"GPTC": rig.rd(r.GPTC), "TSCTC": rig.rd(r.TSCTC), "GPRC": rig.rd(r.GPRC)},
        dma_calls=dma.calls,
        cut=cut,
    )


async def test_the_uncut_reference_run_moves_everything() -> None:
    ref = await scenario(None)
    assert not ref.cut
    assert len(ref.wire) == 4 + 3  # TSO: 4 segments of a 5000-byte payload
    assert [len(data) for data in ref.received] == [size + 4 for size in RX_FRAME_SIZES]
    assert ref.stats == {"GPTC": 7, "TSCTC": 1, "GPRC": len(RX_FRAME_SIZES)}
    assert ref.dma_calls > 20  # every one of them is a cut point below


async def test_a_cut_at_any_dma_call_neither_loses_nor_repeats_a_frame() -> None:
    ref = await scenario(None)
    for cut_at in range(1, ref.dma_calls + 1):
        got = await scenario(cut_at)
        assert got.cut, cut_at
        assert got.wire == ref.wire, f"cut at DMA call {cut_at}: transmit"
        assert got.received == ref.received, f"cut at DMA call {cut_at}: receive"
        assert (got.tdh, got.rdh, got.tx_status, got.stats) == (
            ref.tdh,
            ref.rdh,
            ref.tx_status,
            ref.stats,
        ), cut_at


@pytest.mark.parametrize("paused", [False, True])
async def test_reattaching_resubmits_the_cut_work(paused: bool) -> None:
    """Nothing rings a doorbell after the reconnect: on_attach (or, stopped, resume)
    resubmits the transmit and receive work the cut job left."""
    rig, dma = cutting_rig()
    rig.setup_tx(8)
    rig.setup_rx(8)
    rig.give_rx(7)
    frame = frame_to(PEER, 200)
    rig.legacy(frame)
    rig.wr(r.TDT, rig.tx_next)
    incoming = frame_to(MAC, 100, src=PEER)
    rig.dev.net_receive(incoming)
    dma.calls, dma.cut_at = 0, 1  # the transmit job's descriptor read
    with trio.CancelScope() as scope:
        dma.scope = scope
        await rig.run()
    assert scope.cancelled_caught and rig.port.frames == []
    rig.ctx.jobs.clear()
    rig.dev.detach()
    if paused:
        rig.dev.pause()
    rig.dev.attach(rig.ctx)
    await rig.run()
    if paused:
        assert rig.port.frames == [] and not rig.ctx.jobs
        rig.dev.resume()
        await rig.run()
    assert rig.port.frames == [frame]
    assert [data for data, *_ in rig.take_rx()] == [incoming]


async def test_a_dma_fault_keeps_the_work_and_retries_it() -> None:
    """A client that reconnected maps its memory only after the attach that resubmitted
    the work: the frames wait (nothing dropped, nothing sent twice) and the device tries
    again, backing off, without a doorbell."""
    rig = Rig(autoneg_delay=0)
    rig.setup_rx(8)
    rig.setup_tx(8)
    rig.give_rx(4)
    rig.wr(r.RDBAL, 0x7FFFFFF0)  # unmapped rings
    rig.wr(r.TDBAL, 0x7FFFFFF0)
    incoming = frame_to(MAC, 100, src=PEER)
    rig.dev.net_receive(incoming)
    outgoing = frame_to(PEER, 80)
    rig.tx_desc(len(outgoing) | (r.TXD_CMD_EOP | r.TXD_CMD_IFCS | r.TXD_CMD_RS) << 24)
    rig.dev.values[r.TDT] = 1  # (no doorbell: the job runs by the retry)
    await rig.run(advance=0.05)  # several retries
    assert rig.rd(r.RDH) == 0 and list(rig.dev.receiver.fifo) == [incoming]
    assert rig.rd(r.TDH) == 0 and rig.port.frames == []
    rig.dev.values[r.RDBAL] = Rig.RX_RING  # "mapped" now; no register write kicks
    rig.dev.values[r.TDBAL] = Rig.TX_RING
    rig.poke(Rig.TX_BUF, outgoing)
    await rig.run(advance=0.2)
    assert [data for data, *_ in rig.take_rx()] == [incoming]
    assert rig.port.frames == [outgoing] and rig.rd(r.TDH) == 1


def test_timers_fire_in_deadline_order_and_keep_their_time_while_frozen() -> None:
    """Timers on their own: due ones fire earliest first; frozen, they keep what they had
    left and a timer armed meanwhile counts from the thaw."""
    now = [0.0]
    fired: list[str] = []
    armed: list[None] = []
    timers = Timers(lambda: now[0], fired.append)
    timers.on_arm = lambda: armed.append(None)
    timers.arm("late", 0.3)
    timers.arm("early", 0.1)
    assert len(armed) == 2 and timers.running("late") and timers.armed("late")
    now[0] = 0.2
    timers.poll()
    assert fired == ["early"] and timers.next_due == pytest.approx(0.3)
    timers.freeze()
    timers.arm("new", 0.05)  # while paused: frozen at once, no timer job kicked
    assert len(armed) == 2 and timers.armed("new") and not timers.running("new")
    assert timers.remaining() == {"late": pytest.approx(0.1), "new": 0.05}
    now[0] = 100.0
    timers.poll()
    assert fired == ["early"]
    timers.thaw()
    now[0] = 100.06
    timers.poll()
    assert fired == ["early", "new"]
    timers.disarm("late")
    now[0] = 200.0
    timers.poll()
    assert fired == ["early", "new"] and timers.remaining() == {}
