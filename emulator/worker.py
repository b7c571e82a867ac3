"""The device's side of one connection: its work queue, its DMA requests, its state changes.

:class:`DeviceWorker` is the :class:`devices.api.DeviceContext` a device is attached to
while a client is connected: guest memory (``dma``), a queue of device jobs that one task
runs one after another (``submit``), timers (``sleep``, ``sleep_until_work``). It owns
the work side of migration too. A transition that stops the device (an arc out of RUNNING
or PRE_COPY) must not begin while a job and its DMA are still running, and no job may start
while the device is stopped; the engine (:mod:`devices.migration.engine`) runs the arcs
and knows nothing of the queue, so :meth:`DeviceWorker.change_state` is where the two
meet:

1. ask the engine whether the transition stops the device (refusals are raised here,
   before anything changed);
2. if so, pause the device first (interrupts latched, its timers and backends stopped,
   so that a timer job ends and nothing new is submitted), then stop starting jobs and
   wait for the one in progress and its DMA (the only wait);
3. run the transition in the engine, synchronously: no job starts between two arcs;
4. the device runs, and the queue with it, if and only if its state operates afterwards
   (also after a failure, an unwind, ERROR, or a wait in step 2 cancelled because the
   client went away).

:class:`DmaRequests` are the device's DMA_READ / DMA_WRITE messages to the client (the
:class:`emulator.dma.MessageChannel` of the connection's :class:`~emulator.dma.DmaEngine`):
each waits for its reply, which the connection's reader routes here by message id.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from devices.api import ClientGone, Device, DeviceError, DmaFault
from devices.migration.engine import TransitionResult
from emulator.dma import DmaEngine
from emulator.limits import Limits
from emulator.precise_sleep import precise_sleep
from emulator.trace import Tracer
from emulator.transport import TransportError
from protocol.connection import ServerConnection
from protocol.constants import Command
from protocol.errors import ProtocolError
from protocol.header import Header
from protocol.messages import (
    DmaLayout,
    DmaRw,
    check_dma_write_reply,
    pack_dma_write,
    unpack_dma_read_reply,
)

log = logging.getLogger("vfio_user_emu")

Job = Callable[[], Awaitable[None]]


class DeviceWorker:
    """The device's job queue and context for one connection (see the module docstring).

    ``dma`` is set by the connection once the client's capabilities are known (version
    negotiation); before that, and after ``close``, the device's DMA faults."""

    def __init__(self, device: Device, limits: Limits) -> None:
        self.device = device
        self.limits = limits
        self.engine: DmaEngine | None = None
        self.closed = False
        self._jobs: deque[Job] = deque()
        self._jobs_ready = trio.Event()
        #: Set by submit(): wakes a job waiting in sleep_until_work.
        self._work_submitted: trio.CancelScope | None = None  # a sleep_until_work
        self._current_job: trio.CancelScope | None = None
        self._paused = not device.migration.operating
        self._job_idle = trio.Event()
        self._job_idle.set()

    # -- DeviceContext ----------------------------------------------------------------------
    @property
    def dma(self) -> DmaEngine:
        if self.engine is None:
            raise DmaFault("no client session")
        return self.engine

    def submit(self, job: Job) -> bool:
        if self.closed or len(self._jobs) >= self.limits.max_queued_jobs:
            log.warning("device work dropped (%s)", "closed" if self.closed else "queue full")
            return False
        self._jobs.append(job)
        self._jobs_ready.set()
        if self._work_submitted is not None:
            self._work_submitted.cancel()
        return True

    async def sleep(self, seconds: float) -> None:
        # Device timers are microseconds long: not rounded up to epoll's millisecond.
        await precise_sleep(seconds)

    async def sleep_until_work(self, seconds: float) -> None:
        if self._jobs:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope() as submitted:  # submit() cancels it
            self._work_submitted = submitted
            try:
                await precise_sleep(seconds)
            finally:
                self._work_submitted = None

    # -- the queue ----------------------------------------------------------------------------
    async def run(self) -> None:
        """The worker task: runs jobs one after another while the device operates."""
        while True:
            if not self._jobs or self._paused:
                self._jobs_ready = trio.Event()
                await self._jobs_ready.wait()
                continue
            job = self._jobs.popleft()
            self._job_idle = trio.Event()
            with trio.CancelScope() as scope:
                self._current_job = scope
                try:
                    await job()
                except DeviceError as exc:
                    log.warning("device job failed: %s", exc)
                except Exception:
                    log.exception("device job crashed")
            self._current_job = None
            self._job_idle.set()

    def cancel(self) -> None:
        """DEVICE_RESET: queued jobs are dropped and the one in progress is cancelled (the
        device must not touch guest memory or interrupts after the reply)."""
        self._jobs.clear()
        if self._current_job is not None:
            self._current_job.cancel()

    def close(self) -> None:
        """The client is gone: no job is accepted or run any more."""
        self.closed = True
        self._jobs.clear()
        if self.engine is not None:
            self.engine.enabled = False

    @property
    def paused(self) -> bool:
        return self._paused

    # -- migration: work follows the device's state ---------------------------------------------
    async def change_state(self, target: int) -> TransitionResult:
        """Move the device's migration engine to ``target`` (steps 1-4 of the module
        docstring). Raises what the engine raises."""
        engine = self.device.migration
        if not engine.stops_device(target):
            try:
                return engine.set_state(target)
            finally:
                self.follow_device()
        engine.pause_device()
        try:
            await self._quiesce()
            return engine.set_state(target)
        finally:
            # Also when the wait was cancelled (the client went away while its SET waited
            # for the job in progress): no arc ran, so the device and its work run again.
            engine.settle()
            self.follow_device()

    async def _quiesce(self) -> None:
        """No new jobs start; the one in progress, with its DMA, completes first."""
        self._paused = True
        await self._job_idle.wait()

    def follow_device(self) -> None:
        """Run jobs if and only if the device operates (RUNNING, PRE_COPY): after a state
        change, a device reset, or a new client attaching to a device left stopped."""
        self._paused = not self.device.migration.operating
        if not self._paused:
            self._jobs_ready.set()


class _Waiter:
    __slots__ = ("event", "header", "payload")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.header: Header | None = None
        self.payload = b""


class DmaRequests:
    """The device's DMA_READ / DMA_WRITE requests to the client (a MessageChannel).

    ``send`` sends one whole message on the connection; ``max_transfer`` and ``layout`` are
    set at version negotiation (the smaller of both sides' transfer sizes; QEMU's or the
    spec's DMA layout)."""

    def __init__(
        self,
        proto: ServerConnection,
        send: Callable[[bytes], Awaitable[None]],
        *,
        tracer: Tracer,
        reply_timeout: float,
    ) -> None:
        self.proto = proto
        self._send = send
        self.tracer = tracer
        self.reply_timeout = reply_timeout
        self.max_transfer = 4096
        self.layout = DmaLayout.SPEC
        self.closed = False
        self._waiters: dict[int, _Waiter] = {}

    async def checkpoint(self) -> None:
        await trio.lowlevel.checkpoint()

    async def dma_read(self, address: int, count: int) -> bytes:
        _, payload = await self._request(Command.DMA_READ, DmaRw(address, count).pack())
        try:
            return unpack_dma_read_reply(payload, address, count, self.layout)
        except ProtocolError as exc:
            raise DmaFault(f"bad DMA_READ reply: {exc}") from None

    async def dma_write(self, address: int, data: bytes) -> None:
        _, payload = await self._request(
            Command.DMA_WRITE, pack_dma_write(self.layout, address, data)
        )
        try:
            check_dma_write_reply(payload, address, len(data))
        except ProtocolError as exc:
            raise DmaFault(f"bad DMA_WRITE reply: {exc}") from None

    async def _request(self, command: Command, payload: bytes) -> tuple[Header, bytes]:
        # A request the client can no longer get is not a DMA fault: ClientGone tells the
        # device its work dies with the connection (it would have been cancelled a moment
        # later, when the read loop sees the hang-up), so it must not report a failure.
        if self.closed:
            raise ClientGone("client gone")
        msg_id, data = self.proto.request(command, payload)
        waiter = self._waiters[msg_id] = _Waiter()
        try:
            self.tracer.request(msg_id, command, payload)
            try:
                await self._send(data)
            except (OSError, TransportError, trio.ClosedResourceError) as exc:
                raise ClientGone(f"client gone: {exc}") from None
            with trio.move_on_after(self.reply_timeout):
                await waiter.event.wait()
        finally:
            self._waiters.pop(msg_id, None)
            self.proto.forget_request(msg_id)
        if waiter.header is None:
            raise DmaFault(f"no reply to {command.name} within {self.reply_timeout}s")
        if waiter.header.is_error:
            raise DmaFault(f"client refused {command.name}: errno {waiter.header.error}")
        return waiter.header, waiter.payload

    def route_reply(self, header: Header, payload: bytes) -> None:
        """A reply the reader received: to the request waiting for it (if any still is)."""
        waiter = self._waiters.get(header.msg_id)
        if waiter is None:
            return
        waiter.header = header
        waiter.payload = payload
        waiter.event.set()
