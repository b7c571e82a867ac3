"""The e1000's device work: the timers, the jobs it submits, and how a job commits.

:class:`Timers` holds named deadlines (autonegotiation, interrupt mitigation, the DMA retry)
on the device's clock. They are checked on every register access (the register bank calls
:meth:`Timers.poll`) and by a timer job that sleeps with ``context.sleep_until_work``: only
while no other device work is queued, and no longer than until some is, so it never holds
up transmit or receive. While the device is paused the timers are frozen as remaining time
(:attr:`Timers.paused` is the device's one pause flag).

:class:`Jobs` submits the transmit, receive and timer jobs to the runtime's
``DeviceContext``. Each job belongs to a *generation*: a reset, a state load or a new client
starts a new one, and jobs of older generations do nothing. :meth:`Jobs.write_back_and_commit`
is the exactly-once rule both rings follow across a disconnect (which cancels the running job
at any await); a DMA fault keeps the work and retries it (:meth:`Jobs.dma_failed`).

Both are objects the device composes and hands to the transmitter, the receiver and the
interrupt logic, rather than mixins: the timers and the generation are state of their own,
shared by several concerns, and a reader sees at each call (``self.jobs.submit``,
``self.timers.arm``) which object's rule applies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from devices.api import Device, DeviceError, Dma
from devices.migration.stream import Buffer

if TYPE_CHECKING:
    from devices.e1000.interrupts import Interrupts
    from devices.e1000.stats import Statistics

log = logging.getLogger("vfio_user_emu")

#: Retrying transmit and receive after a DMA fault (not migrated: resume kicks both anyway).
#: A client that reconnected maps its memory only after the attach that resubmits the work.
DMA_RETRY = "dmaretry"
DMA_RETRY_FIRST = 0.001
DMA_RETRY_MAX = 0.1


@dataclass(slots=True)
class Progress:
    """What a transmit or receive job has committed so far (for its interrupt causes)."""

    moved: int = 0  # descriptors (transmit) or frames (receive)
    report: bool = False  # transmit: an RS descriptor was written back
    delay: bool = False  # ... with IDE


class Timers:
    """Named deadlines on ``clock`` (seconds); ``fire(name)`` runs each one that is due."""

    def __init__(self, clock: Callable[[], float], fire: Callable[[str], None]) -> None:
        self.clock = clock
        self.fire = fire
        #: Called when a deadline is set while running (the device queues its timer job).
        self.on_arm: Callable[[], None] = lambda: None
        #: name -> deadline on ``clock``; frozen as remaining seconds while paused
        self.deadlines: dict[str, float] = {}
        self.frozen: dict[str, float] = {}
        self.next_due = math.inf
        #: The device is paused (migration): timers stand still and no work runs.
        self.paused = False

    def arm(self, name: str, delay: float) -> None:
        if self.paused:
            self.frozen[name] = max(delay, 0.0)
            return
        when = self.clock() + delay
        self.deadlines[name] = when
        self.next_due = min(self.next_due, when)
        self.on_arm()

    def disarm(self, name: str) -> None:
        self.frozen.pop(name, None)
        if self.deadlines.pop(name, None) is not None:
            self.next_due = min(self.deadlines.values(), default=math.inf)

    def running(self, name: str) -> bool:
        """Whether ``name`` has a deadline now (a frozen timer does not count)."""
        return name in self.deadlines

    def armed(self, name: str) -> bool:
        """Whether ``name`` is set, running or frozen."""
        return name in self.deadlines or name in self.frozen

    def poll(self) -> None:
        """Fire the timers that are due, earliest first."""
        if not self.deadlines or self.clock() < self.next_due:
            return
        now = self.clock()
        due = sorted((when, name) for name, when in self.deadlines.items() if when <= now)
        for _, name in due:
            del self.deadlines[name]
        self.next_due = min(self.deadlines.values(), default=math.inf)
        for _, name in due:
            self.fire(name)

    def clear(self) -> None:
        self.deadlines.clear()
        self.frozen.clear()
        self.next_due = math.inf

    def freeze(self) -> None:
        """Pause: every deadline becomes the time it has left."""
        now = self.clock()
        self.frozen.update({name: max(when - now, 0.0) for name, when in self.deadlines.items()})
        self.deadlines.clear()
        self.next_due = math.inf
        self.paused = True

    def thaw(self) -> None:
        """Resume: the frozen timers run again from now."""
        self.paused = False
        now = self.clock()
        for name, remaining in self.frozen.items():
            self.deadlines[name] = now + remaining
        self.frozen.clear()
        self.next_due = min(self.deadlines.values(), default=math.inf)

    def remaining(self) -> dict[str, float]:
        """Seconds each set timer has left (what migration saves)."""
        if self.paused:
            return dict(self.frozen)
        now = self.clock()
        return {name: max(when - now, 0.0) for name, when in self.deadlines.items()}

    def load(self, remaining: dict[str, float]) -> None:
        """Loaded state: the timers of ``remaining``, frozen (the device is paused)."""
        self.deadlines.clear()
        self.next_due = math.inf
        self.frozen = remaining
        self.paused = True


class Jobs:
    """The work ``device`` submits to its context, by generation, and the timer job."""

    def __init__(self, device: Device, timers: Timers) -> None:
        self.device = device
        self.timers = timers
        self.generation = 0  # bumped by resets and loads: older jobs do nothing
        self.waiting = 0  # our jobs queued and not started (this generation)
        self.running = 0  # ... and started, not finished
        self.timer_queued = False
        self.dma_failing = False  # the last transmit or receive DMA faulted
        self.dma_retry_delay = DMA_RETRY_FIRST

    @property
    def paused(self) -> bool:
        return self.timers.paused

    @property
    def dma(self) -> Dma:
        return self.device.context.dma

    def new_generation(self) -> None:
        """Jobs already queued or running belong to the past: they will do nothing."""
        self.generation += 1
        self.waiting = self.running = 0
        self.timer_queued = False

    def submit(self, work: Callable[[int], Awaitable[None]]) -> bool:
        """Queue ``work(generation)``; False when the context refused it (no client)."""
        generation = self.generation

        async def job() -> None:
            if generation != self.generation:
                return
            self.waiting -= 1
            self.running += 1
            try:
                await work(generation)
            finally:
                if generation == self.generation:
                    self.running -= 1

        if not self.device.context.submit(job):
            return False
        self.waiting += 1
        return True

    def kick_timers(self) -> None:
        if self.timer_queued or not self.timers.deadlines or self.paused:
            return
        generation = self.generation

        async def job() -> None:
            if generation == self.generation:
                await self._timer_job(generation)

        self.timer_queued = self.device.context.submit(job)

    async def _timer_job(self, generation: int) -> None:
        self.timer_queued = False
        timers = self.timers
        timers.poll()
        if self.paused or not timers.deadlines:
            return
        if not self.waiting:
            # Nothing else to do: sleep towards the next deadline. Jobs run one at a time,
            # so the sleep ends as soon as other work (a doorbell, a frame) is submitted:
            # that work runs first, this job queues again behind it.
            wait = timers.next_due - timers.clock()
            if wait > 0:
                await self.device.context.sleep_until_work(wait)
            if generation != self.generation:
                return
            timers.poll()
        self.kick_timers()  # behind whatever was queued meanwhile

    async def write_back_and_commit(
        self,
        generation: int,
        address: int,
        descriptors: Buffer,
        *,
        commit: Callable[[], None],
        causes: Callable[[], None],
    ) -> bool:
        """A batch's last await, the descriptor write-back, then its commit with no await
        in between; False when the device was reset meanwhile (nothing to commit).
        Cancelled during the write, the descriptors have landed (the runtime moves a
        write's bytes before its await can be cancelled): the batch commits, and raises
        its interrupt causes (the job that would have raised them is ending), before the
        cancellation goes on. A write refused before a byte moved commits nothing."""
        try:
            await self.dma.write(address, descriptors)
        except DeviceError:
            raise
        except BaseException:
            if generation == self.generation:
                commit()
                causes()
            raise
        if generation != self.generation:
            return False
        commit()
        return True

    def dma_failed(self, what: str, index: int, exc: DeviceError) -> None:
        """A transmit or receive job stopped at a DMA fault, its work left in place: try
        again after a while (backing off), logging once until DMA works again."""
        if not self.dma_failing:
            log.warning("e1000: %s DMA failed at %d: %s (retrying)", what, index, exc)
            self.dma_failing = True
        if not self.timers.armed(DMA_RETRY):
            self.timers.arm(DMA_RETRY, self.dma_retry_delay)
            self.dma_retry_delay = min(2 * self.dma_retry_delay, DMA_RETRY_MAX)

    def dma_worked(self) -> None:
        if self.dma_failing:
            self.reset_dma_retry()

    def reset_dma_retry(self) -> None:
        self.dma_failing = False
        self.dma_retry_delay = DMA_RETRY_FIRST


class Parts(Protocol):
    """What the device hands an :class:`Engine` (the device itself provides them)."""

    values: dict[int, int]
    jobs: Jobs
    interrupts: Interrupts
    stats: Statistics


class Engine:
    """A part of the device that moves frames with jobs (the transmitter, the receiver):
    the register file, the device work, the interrupt logic and the statistics it works
    with, and whether its job is queued."""

    def __init__(self, parts: Parts) -> None:
        self.values = parts.values
        self.jobs = parts.jobs
        self.interrupts = parts.interrupts
        self.stats = parts.stats
        self.queued = False  # a job is queued (this generation)
