"""One client connection: the trio adapter around :class:`protocol.ServerConnection`.

Tasks per connection (one nursery):

* the reader: receives bytes+fds, feeds the sans-IO connection and handles each event
  in order. Commands are answered inline (the fast path); replies to our own DMA_READ /
  DMA_WRITE requests are routed to the waiting device job, so a job waiting for a DMA reply
  never blocks the reader (QEMU holds its big lock while it waits for our replies).
* the device worker: runs device jobs (``DeviceContext.submit``) one after another.
* one watcher per eventfd the client signals (INTx resample, ioeventfds).
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from devices.api import Device, DeviceError, DmaFault
from devices.irq import NullSink
from devices.migration import NoWork
from protocol.connection import (
    CommandReceived,
    Fatal,
    Negotiated,
    Rejected,
    ReplyReceived,
    ServerConnection,
)
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
from protocol.version import ClientCapabilities, ServerCapabilities

from .datafd import DataFdSessions, MemfdStaging
from .dirty import LoggingFeature, covered
from .dma import DirtyLog, DmaEngine, IovaMap
from .irqs import IrqBindings
from .limits import Limits
from .session import Deferred, IoEventFds, Outcome, RegionFds, Session
from .trace import Tracer
from .transport import TransportError, close_fds, receive_chunk, send_message

log = logging.getLogger("vfio_user_emu")

SEND_TIMEOUT = 30.0


def choose_dma_layout(client: ClientCapabilities) -> DmaLayout:
    """QEMU (the only client proposing protocol minor 0) uses its own in-band DMA layout;
    libvfio-user and our client (minor 2) use the spec's."""
    return DmaLayout.QEMU if client.minor == 0 else DmaLayout.SPEC


class _Waiter:
    __slots__ = ("event", "header", "payload")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.header: Header | None = None
        self.payload = b""


class ClientSession:
    def __init__(
        self,
        sock: trio.socket.SocketType,
        device: Device,
        *,
        capabilities: ServerCapabilities,
        limits: Limits,
        region_fds: RegionFds,
        tracer: Tracer,
    ) -> None:
        self.sock = sock
        self.device = device
        self.capabilities = capabilities
        self.limits = limits
        self.region_fds = region_fds
        self.tracer = tracer
        self.proto = ServerConnection(capabilities, limits.max_message_size)
        self.maps = IovaMap(
            min(limits.max_dma_maps, capabilities.max_dma_maps),
            mmap_unsealed=limits.mmap_unsealed_dma,
        )
        self.dirty = DirtyLog()
        self.logging = LoggingFeature(self._mapped)
        self.dirty.sink = self.logging.record
        self.irqs = IrqBindings(device.irq, self)
        self.io_fds = IoEventFds(self._create_ioeventfds)
        self.session: Session | None = None
        self.engine: DmaEngine | None = None
        self.client: ClientCapabilities | None = None
        self.max_transfer = 4096
        self.dma_layout = DmaLayout.SPEC
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._jobs: deque[Callable[[], Awaitable[None]]] = deque()
        self._jobs_ready = trio.Event()
        self._current_job: trio.CancelScope | None = None
        self._work_paused = False
        self._job_idle = trio.Event()
        self._job_idle.set()
        self._deferred_running = False
        self._backlog: deque[CommandReceived] = deque()
        self._backlog_drained = trio.Event()
        self._backlog_drained.set()
        self._watches: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.closed = False
        self.finished = trio.Event()
        self.data_fds: DataFdSessions | None = None

    # -- life cycle ------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.data_fds = DataFdSessions(nursery)
                nursery.start_soon(self._worker)
                try:
                    await self._read_loop()
                finally:
                    nursery.cancel_scope.cancel()
        except* (TransportError, OSError, trio.ClosedResourceError, trio.BrokenResourceError) as eg:
            log.info("connection ended: %s", eg.exceptions[0])
        finally:
            self._teardown()
            self.finished.set()

    def _teardown(self) -> None:
        """Client gone: drop DMA maps and irq fds, keep the device's state (spec)."""
        self.closed = True
        if self.data_fds is not None:
            self.data_fds.close()
        self._jobs.clear()
        for held in self._backlog:
            close_fds(held.fds)  # commands never processed: their fds are ours to close
        self._backlog.clear()
        if self.device.migration.work is self:
            self.device.migration.work = NoWork()
        if self.engine is not None:
            self.engine.enabled = False
        self.device.detach()
        self.device.irq.sink = NullSink()
        self.device.irq.client_gone()
        for fd in list(self._watches):
            self.unwatch(fd)
        self.irqs.close_all()
        for fds in self.io_fds.by_region.values():
            close_fds(fds)
        self.io_fds.by_region.clear()
        self.maps.clear()
        close_fds(self.proto.take_all_fds())
        self.sock.close()

    # -- reading -----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            try:
                data, fds = await receive_chunk(
                    self.sock, 256 * 1024, self.limits.max_fds_per_message
                )
            except TransportError as exc:
                log.warning("closing connection: %s", exc)
                return
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                log.info("connection lost: %s", exc)
                return
            if not data:
                close_fds(fds)
                return
            self.proto.receive_data(data, fds)
            while (event := self.proto.next_event()) is not None:
                if not await self._dispatch(event):
                    return
                if len(self._backlog) >= self.limits.max_backlog:
                    # Exactly the limit held: the rest of the chunk waits in the framer.
                    await self._backlog_drained.wait()
            close_fds(self.proto.take_orphan_fds())

    async def _dispatch(self, event: object) -> bool:
        """Handle one event; False when the connection must close."""
        if isinstance(event, CommandReceived):
            if self._deferred_running or self._backlog:
                # Processed in order once the deferred one ends; while its backlog is still
                # being worked off, later commands queue behind it (not overtake it).
                self._backlog.append(event)
                self._backlog_drained = trio.Event()
                return True
            await self._command(event)
            return True
        if isinstance(event, ReplyReceived):
            self.tracer.message("<-", event.header, event.payload, len(event.fds))
            close_fds(event.fds)
            self._route_reply(event.header, event.payload)
            return True
        if isinstance(event, Negotiated):
            self.tracer.message("<-", event.header, event.payload, 0)
            self._start_session(event.client)
            self.tracer.reply(event.header, event.reply[16:], 0)
            await self._send(event.reply)
            return True
        if isinstance(event, Rejected):
            self.tracer.rejected(event.header, event.error)
            close_fds(event.fds)
            if event.reply is not None:
                await self._send(event.reply)
            return not event.close
        if isinstance(event, Fatal):
            log.warning("closing connection: %s", event.reason)
            close_fds(event.fds)
            return False
        raise AssertionError(f"unknown event {event!r}")

    async def _command(self, event: CommandReceived) -> None:
        header, fds = event.header, event.fds
        self.tracer.message("<-", header, event.payload, len(fds))
        assert self.session is not None
        try:
            outcome = self.session.handle(header, event.payload, fds)
        except (ProtocolError, DeviceError) as exc:
            close_fds(fds)
            self.tracer.failed(header, exc.errno, str(exc))
            reply = self.proto.error_reply(header, exc.errno)
            if reply is not None:
                await self._send(reply)
            return
        except Exception:
            # A device bug must not take the server down; the client gets EIO.
            log.exception("device failed on %s", header.command_name())
            close_fds(fds)
            reply = self.proto.error_reply(header, errno.EIO)
            if reply is not None:
                await self._send(reply)
            return
        close_fds(fds)
        if isinstance(outcome, Deferred):
            self._deferred_running = True
            assert self._nursery is not None
            self._nursery.start_soon(self._run_deferred, header, outcome)
            return
        await self._send_outcome(header, outcome)

    async def _send_outcome(self, header: Header, outcome: Outcome) -> None:
        try:
            reply = self.proto.reply(header, outcome.payload)
            if reply is not None:
                self.tracer.reply(header, outcome.payload, len(outcome.fds))
                await self._send(reply, outcome.fds)
        finally:
            close_fds(outcome.transient_fds)

    async def _run_deferred(self, header: Header, deferred: Deferred) -> None:
        """Run a waiting command while the reader keeps routing DMA replies, then answer it
        and process the commands that arrived meanwhile, in order."""
        try:
            outcome = await deferred.work()
        except (ProtocolError, DeviceError) as exc:
            self.tracer.failed(header, exc.errno, str(exc))
            reply = self.proto.error_reply(header, exc.errno)
            if reply is not None:
                await self._send(reply)
        except Exception:
            log.exception("device failed on %s", header.command_name())
            reply = self.proto.error_reply(header, errno.EIO)
            if reply is not None:
                await self._send(reply)
        else:
            await self._send_outcome(header, outcome)
        self._deferred_running = False
        while self._backlog and not self._deferred_running:
            await self._command(self._backlog.popleft())
        if not self._backlog:
            self._backlog_drained.set()

    def _start_session(self, client: ClientCapabilities) -> None:
        self.client = client
        # Our DMA_READ replies must fit our own message limit, whatever the client offers.
        self.max_transfer = max(
            1, min(client.max_data_xfer_size, self.capabilities.max_data_xfer_size)
        )
        self.dma_layout = self.limits.dma_layout or choose_dma_layout(client)
        self.tracer.dma_layout = self.dma_layout
        device = self.device
        self.engine = DmaEngine(
            self.maps,
            self,
            self.dirty,
            bus_master=lambda: not device.dma_needs_bus_master or device.config.bus_master,
        )
        self.session = Session(
            self.device,
            client=client,
            server=self.capabilities,
            maps=self.maps,
            irqs=self.irqs,
            region_fds=self.region_fds,
            io_fds=self.io_fds,
            cancel_device_work=self.cancel_device_work,
            data_fds=self.data_fds,
            logging=self.logging,
            limits=self.limits,
        )
        self.device.irq.sink = self.irqs
        self.device.attach(self)
        engine = self.device.migration
        engine.work = self
        engine.staging_factory = MemfdStaging
        self._work_paused = not engine.operating

    async def _send(self, data: bytes, fds: list[int] | None = None) -> None:
        # A message is sent whole or the connection is dropped: a cancelled half-sent
        # message (a device job cancelled by DEVICE_RESET mid DMA_WRITE) would desynchronise
        # the stream. A peer that stops reading for SEND_TIMEOUT is dropped instead.
        async with self._send_lock:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(SEND_TIMEOUT) as timeout:
                    await send_message(self.sock, data, fds or ())
            if timeout.cancelled_caught:
                self.sock.close()
                raise TransportError(errno.ETIMEDOUT, "peer stopped reading; connection dropped")

    def _mapped(self, iova: int, length: int) -> bool:
        return covered((slot for slot in self.maps.slots() if slot is not None), iova, length)

    # -- DeviceContext ----------------------------------------------------------------------
    @property
    def dma(self) -> DmaEngine:
        if self.engine is None:
            raise DmaFault("no client session")
        return self.engine

    def submit(self, job: Callable[[], Awaitable[None]]) -> bool:
        if self.closed or len(self._jobs) >= self.limits.max_queued_jobs:
            log.warning("device work dropped (%s)", "closed" if self.closed else "queue full")
            return False
        self._jobs.append(job)
        self._jobs_ready.set()
        return True

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    def cancel_device_work(self) -> None:
        self._jobs.clear()
        if self._current_job is not None:
            self._current_job.cancel()

    async def _worker(self) -> None:
        while True:
            if not self._jobs or self._work_paused:
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

    # -- WorkControl (the migration engine pauses the device through it) ----------------------
    async def pause_work(self) -> None:
        """No new jobs start; the one in progress, with its DMA, completes first."""
        self._work_paused = True
        await self._job_idle.wait()

    def hold_work(self) -> None:
        self._work_paused = True

    def resume_work(self) -> None:
        self._work_paused = False
        self._jobs_ready.set()

    # -- MessageChannel: server -> client DMA ----------------------------------------------
    async def checkpoint(self) -> None:
        await trio.lowlevel.checkpoint()

    async def dma_read(self, address: int, count: int) -> bytes:
        _, payload = await self._dma_request(Command.DMA_READ, DmaRw(address, count).pack())
        try:
            return unpack_dma_read_reply(payload, address, count, self.dma_layout)
        except ProtocolError as exc:
            raise DmaFault(f"bad DMA_READ reply: {exc}") from None

    async def dma_write(self, address: int, data: bytes) -> None:
        _, payload = await self._dma_request(
            Command.DMA_WRITE, pack_dma_write(self.dma_layout, address, data)
        )
        try:
            check_dma_write_reply(payload, address, len(data))
        except ProtocolError as exc:
            raise DmaFault(f"bad DMA_WRITE reply: {exc}") from None

    async def _dma_request(self, command: Command, payload: bytes) -> tuple[Header, bytes]:
        if self.closed:
            raise DmaFault("client gone")
        msg_id, data = self.proto.request(command, payload)
        waiter = self._waiters[msg_id] = _Waiter()
        try:
            self.tracer.request(msg_id, command, payload)
            try:
                await self._send(data)
            except (OSError, TransportError, trio.ClosedResourceError) as exc:
                raise DmaFault(f"client gone: {exc}") from None
            with trio.move_on_after(self.limits.dma_reply_timeout):
                await waiter.event.wait()
        finally:
            self._waiters.pop(msg_id, None)
            self.proto.forget_request(msg_id)
        if waiter.header is None:
            raise DmaFault(f"no reply to {command.name} within {self.limits.dma_reply_timeout}s")
        if waiter.header.is_error:
            raise DmaFault(f"client refused {command.name}: errno {waiter.header.error}")
        return waiter.header, waiter.payload

    def _route_reply(self, header: Header, payload: bytes) -> None:
        waiter = self._waiters.get(header.msg_id)
        if waiter is None:
            return
        waiter.header = header
        waiter.payload = payload
        waiter.event.set()

    # -- FdWatcher ----------------------------------------------------------------------------
    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._watches[fd] = scope
        self._nursery.start_soon(self._watch, fd, callback, scope)

    def unwatch(self, fd: int) -> None:
        scope = self._watches.pop(fd, None)
        if scope is not None:
            scope.cancel()
            trio.lowlevel.notify_closing(fd)

    async def _watch(self, fd: int, callback: Callable[[], None], scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (trio.ClosedResourceError, OSError):
                    return
                if scope.cancel_called:
                    return  # unwatched (and closed) after we were woken: the number is stale
                try:
                    os.read(fd, 8)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                try:
                    callback()
                except Exception:
                    log.exception("eventfd handler failed")

    def _create_ioeventfds(self, index: int) -> list[int]:
        fds = []
        for doorbell in self.device.ioeventfds:
            if doorbell.region != index:
                continue
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fds.append(fd)
            self.watch(fd, doorbell.handler)
        return fds
