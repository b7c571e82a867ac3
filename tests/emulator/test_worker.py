"""emulator.worker: the device's job queue follows its migration state (a stop waits for the
job in progress, no job runs while the device is stopped, a cancelled wait changes nothing)
and its DMA requests to the client.

The engine itself (arcs, unwinding, ERROR) is tested in tests/devices/migration/test_engine.py
with the same recording device; here the same walks go through the runtime's
``DeviceWorker.change_state``, as a SET does.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from devices import testdev as td
from devices.errors import ClientGone, DeviceError, MigrationRefused
from devices.irq import INTX, Delivery
from devices.migration.engine import ALL_CAPS, RunState
from devices.testdev import TestDev
from emulator.client import Client
from emulator.limits import Limits
from emulator.testing.harness import (
    RawConnection,
    finish_dma_left_unanswered,
    served_device,
    set_mig_state_payload,
    start_dma_left_unanswered,
)
from emulator.worker import DeviceWorker
from protocol.constants import Command, MigState
from protocol.migration_fsm import (
    ERROR,
    PRE_COPY,
    PRE_COPY_P2P,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
    plan,
)
from tests.devices.migration.test_engine import (
    CAP_SETS,
    FAULT_CASES,
    OPERATING,
    PRE,
    SC,
    RecDev,
    check_consistent,
    crossings,
    device_in,
    pairs,
    supported,
    valid_stream,
)


class RecordingWorker(DeviceWorker):
    """A DeviceWorker that records when its queue stops and starts."""

    def __init__(self, device: RecDev) -> None:
        super().__init__(device, Limits())
        self.log: list[str] = []

    async def _quiesce(self) -> None:
        self.log.append("pause_work")
        await super()._quiesce()

    def follow_device(self) -> None:
        was_paused = self.paused
        super().follow_device()
        if was_paused and not self.paused:
            self.log.append("resume_work")


@asynccontextmanager
async def running(worker: DeviceWorker) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        yield nursery
        nursery.cancel_scope.cancel()


# -- the queue follows the state -----------------------------------------------------------


@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
async def test_every_pair_leaves_the_queue_running_only_where_the_device_operates(caps: int):
    for start, goal in pairs(caps):
        dev = await device_in(caps, start)
        worker = DeviceWorker(dev, Limits())
        assert worker.paused == (start not in OPERATING)
        try:
            result = await worker.change_state(goal)
        except MigrationRefused as exc:
            assert exc.errno == errno.EINVAL
            assert dev.migration.state == start and dev.calls == [] and dev.events == []
        else:
            assert result.state == goal
        assert worker.paused == (dev.migration.state not in OPERATING), (start, goal)
        check_consistent(dev)


@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
async def test_a_failed_transition_leaves_the_queue_as_it_was(caps: int):
    for _, _, start, goal, k in (c for c in FAULT_CASES if c[1] == caps):
        dev = await device_in(caps, start, fail=[plan(caps, start, goal)[k]])
        worker = DeviceWorker(dev, Limits())
        with pytest.raises(DeviceError) as info:
            await worker.change_state(goal)
        assert info.value.errno == errno.EIO
        assert dev.migration.state == start
        assert worker.paused == (start not in OPERATING), (start, goal, k)


async def test_the_queue_stops_and_starts_once_per_crossing():
    dev = await device_in(ALL_CAPS, RUNNING)
    worker = RecordingWorker(dev)
    route = [PRE_COPY, PRE_COPY_P2P, PRE_COPY, RUNNING, RUNNING_P2P, STOP, STOP_COPY,
             RUNNING, STOP, RESUMING]  # fmt: skip
    for target in route:
        await worker.change_state(target)
    dev.migration.write_data(await valid_stream())
    await worker.change_state(PRE_COPY)
    assert dev.events == crossings(dev.calls)
    assert dev.events.count("pause") == 3 and dev.events.count("resume") == 3
    assert worker.log == ["pause_work" if e == "pause" else "resume_work" for e in dev.events]


async def test_the_queue_stays_stopped_in_error_entered_from_running():
    # SC|PRE, STOP -> PRE_COPY = STOP->RUNNING, RUNNING->PRE_COPY. The second arc fails and
    # so does the way back RUNNING->STOP: the engine is in RUNNING (device resumed) when it
    # gives up and enters ERROR.
    dev = await device_in(SC | PRE, STOP, fail=[(RUNNING, PRE_COPY), (RUNNING, STOP)])
    worker = RecordingWorker(dev)
    with pytest.raises(DeviceError):
        await worker.change_state(PRE_COPY)
    assert dev.migration.state == ERROR
    assert dev.irq.delivery is Delivery.SUSPENDED
    assert worker.paused, f"work queue running in ERROR: {worker.log}"


async def test_reset_from_every_state_lets_the_queue_run():
    """DEVICE_RESET (the handler: engine reset, then follow_device) from any state."""
    for caps in CAP_SETS.values():
        for state in supported(caps):
            dev = await device_in(caps, state)
            worker = DeviceWorker(dev, Limits())
            dev.migration.reset()
            worker.follow_device()
            assert dev.migration.state == RUNNING and not worker.paused, state


async def test_a_stop_waits_for_the_job_in_progress_and_no_job_runs_while_stopped():
    dev = RecDev(SC | PRE)
    worker = DeviceWorker(dev, Limits())
    release, started = trio.Event(), trio.Event()
    ran: list[str] = []

    async def slow_job() -> None:
        started.set()
        await release.wait()
        ran.append(f"slow job finished in {dev.migration.state.name}")

    async def later_job() -> None:
        ran.append(f"later job ran in {dev.migration.state.name}")

    async with running(worker) as nursery:
        assert worker.submit(slow_job)
        await started.wait()
        done = trio.Event()

        async def stop() -> None:
            await worker.change_state(STOP)
            done.set()

        nursery.start_soon(stop)
        await trio.sleep(0.05)
        assert not done.is_set() and dev.migration.state == RUNNING and dev.calls == []
        assert worker.submit(later_job)  # queued behind the stop
        release.set()
        await done.wait()
        assert dev.migration.state == STOP
        await trio.sleep(0.05)
        assert ran == ["slow job finished in RUNNING"]  # the later job waits
        await worker.change_state(RUNNING)
        with trio.fail_after(5):
            while len(ran) < 2:
                await trio.sleep(0.01)
    assert ran == ["slow job finished in RUNNING", "later job ran in RUNNING"]


class TimerDev(RecDev):
    """A device whose timer job runs until its pause hook stops it (as lvu-sample's)."""

    def __init__(self) -> None:
        super().__init__(SC)
        self.stopped = trio.Event()

    def pause(self) -> None:
        super().pause()
        self.stopped.set()


async def test_a_stop_pauses_the_device_before_waiting_so_its_timer_job_ends():
    """Waiting for the job in progress before the device's pause hook ran would wait
    forever for a timer job (found by the lvu-sample trace replays)."""
    dev = TimerDev()
    worker = DeviceWorker(dev, Limits())
    started = trio.Event()

    async def timer_job() -> None:
        started.set()
        await dev.stopped.wait()

    async with running(worker):
        assert worker.submit(timer_job)
        await started.wait()
        with trio.fail_after(5):
            await worker.change_state(STOP)
        assert dev.migration.state == STOP and worker.paused
        assert dev.events == ["pause"]


async def test_a_set_cancelled_while_waiting_for_the_job_leaves_the_device_running():
    """The client goes away while its SET waits for the job in progress: the arc did not
    happen, so the device must run on (work, interrupts) and still say RUNNING. (Found by
    the soak: the device stayed RUNNING with interrupts latched forever.)"""
    dev = RecDev(SC | PRE)
    worker = DeviceWorker(dev, Limits())
    release, started = trio.Event(), trio.Event()

    async def slow_job() -> None:
        started.set()
        await release.wait()

    async with running(worker):
        assert worker.submit(slow_job)
        await started.wait()
        with trio.move_on_after(0.05) as scope:
            await worker.change_state(STOP_COPY)
        assert scope.cancelled_caught
        assert dev.migration.state == RUNNING and dev.migration.run_state is RunState.RUNNING
        assert dev.irq.delivery is Delivery.ACTIVE and not worker.paused
        assert dev.events == ["pause", "resume"] and dev.calls == []
        dev.region_write(td.BAR_REGS, td.REG_DOORBELL, (0).to_bytes(4, "little"))
        assert dev.sink.fired == [(INTX, 0)]  # delivered, not latched
        release.set()


async def test_a_refused_transition_does_not_wait_for_work():
    dev = RecDev(SC)
    worker = DeviceWorker(dev, Limits())
    started = trio.Event()

    async def stuck_job() -> None:
        started.set()
        await trio.sleep_forever()

    async with running(worker):
        assert worker.submit(stuck_job)
        await started.wait()
        with trio.fail_after(5), pytest.raises(MigrationRefused):
            await worker.change_state(PRE_COPY)  # not supported without PRE_COPY
        assert not worker.paused


async def test_a_closed_worker_takes_no_work():
    worker = DeviceWorker(TestDev(), Limits())

    async def job() -> None:
        return None

    worker.close()
    assert not worker.submit(job)


# -- over a real socket --------------------------------------------------------------------


async def test_a_set_stop_is_answered_after_the_jobs_dma_completes(tmp_path: Path) -> None:
    """The device job is stuck on a DMA_READ the client has not answered: the SET waits
    (and the device stays RUNNING) until the job's DMA is done, then stops the device."""
    device = TestDev()
    async with served_device(device, tmp_path, limits=Limits(dma_reply_timeout=30.0)) as served:
        conn = await RawConnection.connect(served.socket_path)
        try:
            dma_read = await start_dma_left_unanswered(conn)
            set_id = await conn.send(Command.DEVICE_FEATURE, set_mig_state_payload(MigState.STOP))
            with trio.move_on_after(0.3) as idle:
                await conn.receive()
            assert idle.cancelled_caught  # no reply while the job waits
            assert device.migration.state == RUNNING
            with trio.fail_after(5):
                reply, _ = await finish_dma_left_unanswered(conn, dma_read)
            assert reply.msg_id == set_id and not reply.is_error
            assert device.migration.state == STOP
        finally:
            conn.close()


async def test_dma_to_a_client_that_hung_up_is_client_gone_not_a_fault(tmp_path: Path) -> None:
    """A DMA request the session cannot send because its client hung up raises ClientGone
    (the device's work dies with the connection), not a plain DmaFault the device would
    report to the guest as a failed DMA (the soak's cut-source fault found testdev copies
    failing, and interrupting twice, that way)."""
    async with (
        served_device(TestDev(), tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        await client.dma_map(0x1000, 0x1000)  # no fd: DMA goes by messages
        connection = served.server.active
        assert connection is not None
        client._shutdown()  # hang up; the connection has not noticed yet (no checkpoint)
        with pytest.raises(ClientGone):
            await connection.dma_requests.dma_read(0x1000, 4)
