"""One client connection: the trio adapter around :class:`protocol.ServerConnection`.

:class:`Connection` does the connection's socket I/O and owns what lives as long as it:
the command handler (:class:`emulator.handler.CommandHandler`, commands in, replies out),
the device worker (:class:`emulator.worker.DeviceWorker`, the device's context, job queue
and DMA requests) and the client's eventfds (:class:`EventFdWatcher`).

Tasks per connection (one nursery):

* the reader: receives bytes+fds, feeds the sans-IO connection and handles each event
  in order. Commands are answered inline (the fast path); replies to our own DMA_READ /
  DMA_WRITE requests are routed to the waiting device job, so a job waiting for a DMA reply
  never blocks the reader (QEMU holds its big lock while it waits for our replies).
* the device worker: runs device jobs (``DeviceContext.submit``) one after another.
* one watcher per eventfd the client signals (INTx resample, ioeventfds).

The message fast path (docs/performance.md). Every trio socket call is a checkpoint, i.e. a
full pass of the scheduler (an epoll poll and a reschedule), and a register access used to
cost three of them (recvmsg, the send lock, sendmsg). So the reader works on a non-blocking
stdlib twin of the socket (``self._raw``, a dup of the same connection):

* it reads with ``recvmsg`` until EAGAIN and only then awaits ``wait_readable``: every whole
  message already buffered is answered without a trip through the scheduler;
* a reply without fds goes out with one non-blocking ``send`` when the send lock is free (no
  other task is in the middle of a message); only a partial send, fds or a busy lock take the
  shielded, locked path;
* to stay fair to the other connections of the process (``serve --config`` runs many), the
  reader yields once per READ_BUDGET messages handled without waiting.

Nothing yields between a command and its reply being handed to the kernel, so the in-order
rule and "the reply goes out before the DMA of a job it submitted" hold as before.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import trio

from devices.api import Device, DeviceError
from devices.irq import NullSink
from emulator.datafd import DataFdSessions, MemfdStaging
from emulator.dirty import LoggingFeature, covered
from emulator.dma import DirtyLog, DmaEngine, IovaMap
from emulator.eventfd_signal import read_nowait
from emulator.handler import CommandHandler, Deferred, IoEventFds, Outcome, RegionFds
from emulator.irqs import IrqBindings
from emulator.limits import Limits
from emulator.trace import Tracer
from emulator.transport import (
    Part,
    TransportError,
    after,
    close_fds,
    enlarge_send_buffer,
    receive_chunk_nowait,
    receive_into_nowait,
    send_gathered,
    send_gathered_nowait,
    send_message,
    send_nowait,
)
from emulator.worker import DeviceWorker, DmaRequests
from protocol.connection import (
    CommandReceived,
    Fatal,
    Negotiated,
    Rejected,
    ReplyReceived,
    ServerConnection,
)
from protocol.constants import HEADER_SIZE, Command
from protocol.errors import ProtocolError
from protocol.header import Header
from protocol.messages import DmaLayout
from protocol.version import ClientCapabilities, ServerCapabilities

log = logging.getLogger("vfio_user_emu")

SEND_TIMEOUT = 30.0
#: Messages the reader answers back to back before it lets other tasks run (fairness).
READ_BUDGET = 64
#: Bytes asked of one recvmsg.
RECV_BYTES = 256 * 1024


def choose_dma_layout(client: ClientCapabilities) -> DmaLayout:
    """QEMU (the only client proposing protocol minor 0) uses its own in-band DMA layout;
    libvfio-user and our client (minor 2) use the spec's."""
    return DmaLayout.QEMU if client.minor == 0 else DmaLayout.SPEC


def _reason(exc: ProtocolError | DeviceError) -> str:
    """Why a request was refused, for a client that asked (the errno travels on its own)."""
    return exc.message if isinstance(exc, ProtocolError) else str(exc)


class EventFdWatcher:
    """Watches the eventfds the client signals (INTx resample, ioeventfds) in the
    connection's nursery: one task per fd, calling its handler once per signal."""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self._watches: dict[int, trio.CancelScope] = {}

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        assert self.nursery is not None
        scope = trio.CancelScope()
        self._watches[fd] = scope
        self.nursery.start_soon(self._watch, fd, callback, scope)

    def unwatch(self, fd: int) -> None:
        scope = self._watches.pop(fd, None)
        if scope is not None:
            scope.cancel()
            trio.lowlevel.notify_closing(fd)

    def unwatch_all(self) -> None:
        for fd in list(self._watches):
            self.unwatch(fd)

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
                    if not read_nowait(fd):
                        continue  # woken with nothing to read (the count was taken first)
                except OSError:
                    return
                try:
                    callback()
                except Exception:
                    log.exception("eventfd handler failed")


class Connection:
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
        #: Non-blocking stdlib twin of ``sock`` for the fast path (see the module docstring).
        self._raw = socket.socket(fileno=os.dup(sock.fileno()))
        self._raw.setblocking(False)
        enlarge_send_buffer(self._raw)
        self.device = device
        self.capabilities = capabilities
        self.limits = limits
        self.region_fds = region_fds
        self.tracer = tracer
        # MIG_DATA_WRITE payloads land in one buffer reused for the connection; each is
        # consumed (CommandHandler.mig_data_write) before the next event is taken, or copied
        # when held behind a deferred command (_hold).
        self.proto = ServerConnection(
            capabilities, limits.max_message_size, in_place=(Command.MIG_DATA_WRITE,)
        )
        self.maps = IovaMap(
            min(limits.max_dma_maps, capabilities.max_dma_maps),
            mmap_unsealed=limits.mmap_unsealed_dma,
        )
        self.dirty = DirtyLog()
        self.logging = LoggingFeature(self._mapped)
        self.dirty.sink = self.logging.record
        self.fd_watcher = EventFdWatcher()
        self.irqs = IrqBindings(device.irq, self.fd_watcher)
        self.io_fds = IoEventFds(self._create_ioeventfds)
        self.worker = DeviceWorker(device, limits)
        self.dma_requests = DmaRequests(
            self.proto, self._send, tracer=tracer, reply_timeout=limits.dma_reply_timeout
        )
        self.handler: CommandHandler | None = None
        self.client: ClientCapabilities | None = None
        self._send_lock = trio.Lock()
        self._deferred_running = False
        #: Commands, and refusals' replies, held in order behind a deferred command.
        self._backlog: deque[CommandReceived | Rejected] = deque()
        self._backlog_drained = trio.Event()
        self._backlog_drained.set()
        #: Bytes and fds of the messages held past ``limits.max_backlog`` (see _hold).
        self._overflow_bytes = 0
        self._overflow_fds = 0
        self._nursery: trio.Nursery | None = None
        self.closed = False
        self.finished = trio.Event()
        self.data_fds: DataFdSessions | None = None

    # -- life cycle ------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self.fd_watcher.nursery = nursery
                self.data_fds = DataFdSessions(nursery)
                nursery.start_soon(self.worker.run)
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
        # A stream cut off with its writer is never loaded: what of it was applied in place
        # is taken back (the device stays RESUMING, as it was left, ready for a new one).
        self.device.migration.discard_resumed()
        self.worker.close()
        self.dma_requests.closed = True
        for held in self._backlog:
            close_fds(held.fds)  # commands never processed: their fds are ours to close
        self._backlog.clear()
        self.device.detach()
        self.device.irq.sink = NullSink()
        self.device.irq.client_gone()
        self.fd_watcher.unwatch_all()
        self.irqs.close_all()
        for fds in self.io_fds.by_region.values():
            close_fds(fds)
        self.io_fds.by_region.clear()
        self.maps.clear()
        close_fds(self.proto.take_all_fds())
        self._close_socket()

    def _close_socket(self) -> None:
        trio.lowlevel.notify_closing(self._raw)
        self._raw.close()
        self.sock.close()

    # -- reading -----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        raw = self._raw
        proto = self.proto
        max_fds = self.limits.max_fds_per_message
        budget = READ_BUDGET
        while True:
            try:
                if (place := proto.receive_buffer()) is not None:
                    # The rest of a bulk payload (MIG_DATA_WRITE), received where it is
                    # consumed: no bytes object per chunk, no copy out of the framer.
                    count, fds = receive_into_nowait(raw, place, max_fds)
                    if count:
                        proto.received(count, fds)
                else:
                    data, fds = receive_chunk_nowait(raw, RECV_BYTES, max_fds)
                    count = len(data)
                    if count:
                        proto.receive_data(data, fds)
            except BlockingIOError:
                # Everything buffered is answered: sleep until the socket is readable, the
                # one place the reader sleeps. (Measured: going straight to wait_readable
                # after a short read, saving this EAGAIN, made round trips ~40% slower on a
                # shared CPU; see docs/performance.md.)
                await trio.lowlevel.wait_readable(raw)
                budget = READ_BUDGET
                continue
            except TransportError as exc:
                log.warning("closing connection: %s", exc)
                return
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                log.info("connection lost: %s", exc)
                return
            if not count:
                close_fds(fds)
                return
            while (event := proto.next_event()) is not None:
                if (
                    type(event) is CommandReceived
                    and not self._deferred_running
                    and not self._backlog
                ):
                    # The fast path: answered and sent without a coroutine or a yield. (Not
                    # while a deferred command or its backlog is pending: see _dispatch.)
                    pending = self._command(event)
                    if pending is not None:
                        await pending
                elif not await self._dispatch(event):
                    return
                if self._backlog and self._overflow_full():
                    # The rest of the chunk waits in the framer, the rest of the stream in
                    # the socket, until the deferred command and its backlog are done.
                    await self._backlog_drained.wait()
                budget -= 1
                if budget <= 0:
                    # A client that keeps the socket full must not starve the device worker,
                    # eventfd watchers or other connections in this process. (Safe between
                    # two messages: the ones answered so far are already sent.)
                    await trio.lowlevel.checkpoint()
                    budget = READ_BUDGET
            close_fds(self.proto.take_orphan_fds())

    async def _dispatch(self, event: object) -> bool:
        """Handle one event; False when the connection must close."""
        if isinstance(event, CommandReceived):
            if self._deferred_running or self._backlog:
                # Processed in order once the deferred one ends; while its backlog is still
                # being worked off, later commands queue behind it (not overtake it).
                self._hold(event)
                return True
            pending = self._command(event)
            if pending is not None:
                await pending
            return True
        if isinstance(event, ReplyReceived):
            self.tracer.message("<-", event.header, event.payload, len(event.fds))
            close_fds(event.fds)
            self.dma_requests.route_reply(event.header, event.payload)
            return True
        if isinstance(event, Negotiated):
            self.tracer.message("<-", event.header, event.payload, 0)
            self._start(event.client)
            self.tracer.reply(event.header, event.reply[16:], 0)
            await self._send(event.reply)
            return True
        if isinstance(event, Rejected):
            self.tracer.rejected(event.header, event.error)
            close_fds(event.fds)
            event.fds = []
            if event.reply is None:
                return not event.close
            if (self._deferred_running or self._backlog) and not event.close:
                # A refusal is answered in its turn too: behind the deferred command and
                # the commands held before it, never ahead of them.
                self._hold(event)
                return True
            await self._send(event.reply)
            return not event.close
        if isinstance(event, Fatal):
            log.warning("closing connection: %s", event.reason)
            close_fds(event.fds)
            return False
        raise AssertionError(f"unknown event {event!r}")

    # Commands. These are plain functions, not coroutines, so that the common case (handled
    # and answered at once) costs no coroutine and no scheduler pass. Each returns None when
    # the command is fully dealt with, or an awaitable the caller must await at once, before
    # it looks at the next message: the rest of the reply's send (see _send_soon).

    def _command(self, event: CommandReceived) -> Awaitable[None] | None:
        header, fds = event.header, event.fds
        tracer = self.tracer
        if tracer.enabled:  # checked here: the hot path makes no call when tracing is off
            tracer.message("<-", header, bytes(event.payload), len(fds))
        assert self.handler is not None
        try:
            outcome = self.handler.handle(header, event.payload, fds)
        except (ProtocolError, DeviceError) as exc:
            close_fds(fds)
            self.tracer.failed(header, exc.errno, str(exc))
            return self._send_soon(self.proto.error_reply(header, exc.errno, _reason(exc)))
        except Exception:
            # A device bug must not take the server down; the client gets EIO.
            log.exception("device failed on %s", header.command_name())
            close_fds(fds)
            return self._send_soon(self.proto.error_reply(header, errno.EIO))
        if fds:
            close_fds(fds)
        if isinstance(outcome, Deferred):
            self._deferred_running = True
            assert self._nursery is not None
            self._nursery.start_soon(self._run_deferred, header, outcome)
            return None
        return self._answer(header, outcome)

    def _answer(self, header: Header, outcome: Outcome) -> Awaitable[None] | None:
        if outcome.gathered:
            return self._answer_gathered(header, outcome)
        reply = self.proto.reply(header, outcome.payload)
        if reply is None:  # posted (NO_REPLY): nothing goes back
            if outcome.transient_fds:
                close_fds(outcome.transient_fds)
            return None
        if self.tracer.enabled:
            self.tracer.reply(header, outcome.payload, len(outcome.fds))
        if outcome.fds or outcome.transient_fds:
            return self._send_with_fds(reply, outcome)
        return self._send_soon(reply)

    def _answer_gathered(self, header: Header, outcome: Outcome) -> Awaitable[None] | None:
        """A reply whose payload is sent from its pieces (MIG_DATA_READ: views of the
        device's state), without joining them."""
        parts = outcome.gathered
        head = self.proto.reply_header(header, sum(len(part) for part in parts))
        if head is None:
            return None
        if self.tracer.enabled:
            self.tracer.reply(header, b"".join(parts), 0)
        return self._send_gathered_soon([head, *parts])

    async def _send_with_fds(self, reply: bytes, outcome: Outcome) -> None:
        try:
            await self._send(reply, outcome.fds)
        finally:
            close_fds(outcome.transient_fds)

    async def _run_deferred(self, header: Header, deferred: Deferred) -> None:
        """Run a waiting command while the reader keeps routing DMA replies, then answer it
        and process the commands that arrived meanwhile, in order."""
        pending: Awaitable[None] | None
        try:
            outcome = await deferred.work()
        except (ProtocolError, DeviceError) as exc:
            self.tracer.failed(header, exc.errno, str(exc))
            pending = self._send_soon(self.proto.error_reply(header, exc.errno, _reason(exc)))
        except Exception:
            log.exception("device failed on %s", header.command_name())
            pending = self._send_soon(self.proto.error_reply(header, errno.EIO))
        else:
            pending = self._answer(header, outcome)
        if pending is not None:
            await pending
        self._deferred_running = False
        budget = READ_BUDGET
        while self._backlog and not self._deferred_running:
            pending = self._handle_held(self._backlog.popleft())
            if pending is not None:
                await pending
            budget -= 1
            if budget <= 0 and self._backlog:
                # Up to max_backlog commands are held: fair to the other tasks, as the
                # reader is. Messages read meanwhile queue behind the rest (in order).
                await trio.lowlevel.checkpoint()
                budget = READ_BUDGET
        if not self._backlog:
            self._overflow_bytes = self._overflow_fds = 0
            self._backlog_drained.set()

    def _hold(self, event: CommandReceived | Rejected) -> None:
        """Queue a message behind the deferred command.

        Past ``max_backlog`` held messages the reader still reads on: the DMA replies the
        deferred command's device job waits for may come after commands in the stream, and
        stopping there would stall the job (and the command) for ``dma_reply_timeout``. What
        it holds beyond the limit is bounded instead: reading stops once those messages
        reach ``max_message_size`` bytes or ``max_fds_per_message`` fds (_overflow_full)."""
        if isinstance(event, CommandReceived) and isinstance(event.payload, memoryview):
            # A payload received in place is overwritten by the next one: keep a copy.
            event.payload = event.payload.tobytes()
        if len(self._backlog) >= self.limits.max_backlog:
            if isinstance(event, CommandReceived):
                self._overflow_bytes += HEADER_SIZE + len(event.payload)
                self._overflow_fds += len(event.fds)
            else:
                self._overflow_bytes += HEADER_SIZE
        self._backlog.append(event)
        self._backlog_drained = trio.Event()

    def _overflow_full(self) -> bool:
        limits = self.limits
        return (
            self._overflow_bytes >= limits.max_message_size
            or self._overflow_fds >= limits.max_fds_per_message
        )

    def _handle_held(self, held: CommandReceived | Rejected) -> Awaitable[None] | None:
        if isinstance(held, CommandReceived):
            return self._command(held)
        return self._send_soon(held.reply)  # a refusal's prepared reply

    def _start(self, client: ClientCapabilities) -> None:
        """Version negotiated: the device is attached to this client."""
        self.client = client
        requests = self.dma_requests
        # Our DMA_READ replies must fit our own message limit, whatever the client offers.
        requests.max_transfer = max(
            1, min(client.max_data_xfer_size, self.capabilities.max_data_xfer_size)
        )
        requests.layout = self.limits.dma_layout or choose_dma_layout(client)
        self.tracer.dma_layout = requests.layout
        device = self.device
        self.worker.engine = DmaEngine(
            self.maps,
            requests,
            self.dirty,
            bus_master=lambda: not device.dma_needs_bus_master or device.config.bus_master,
        )
        self.handler = CommandHandler(
            self.device,
            client=client,
            server=self.capabilities,
            maps=self.maps,
            irqs=self.irqs,
            region_fds=self.region_fds,
            io_fds=self.io_fds,
            worker=self.worker,
            data_fds=self.data_fds,
            logging=self.logging,
            limits=self.limits,
        )
        self.device.irq.sink = self.irqs
        self.device.attach(self.worker)
        self.device.migration.staging_factory = MemfdStaging
        self.worker.follow_device()  # a device left stopped by the last client stays so

    async def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        # A message is sent whole or the connection is dropped: a cancelled half-sent
        # message (a device job cancelled by DEVICE_RESET mid DMA_WRITE) would desynchronise
        # the stream. A peer that stops reading for SEND_TIMEOUT is dropped instead.
        if not fds:
            pending = self._send_soon(data)
            if pending is not None:
                await pending
            return
        async with self._send_lock:
            await self._send_shielded(data, fds)

    def _send_soon(self, data: bytes | None) -> Awaitable[None] | None:
        """Send ``data`` (None: nothing to send) now if nobody else is mid-message.

        The fast path: when the send lock is free, one non-blocking ``send`` usually takes
        the whole message, with no checkpoint. Otherwise the returned awaitable sends it (or
        the rest of it) under the lock, shielded; the caller awaits it at once."""
        if data is None:
            return None
        lock = self._send_lock
        if lock.locked():
            return self._send_locked(data)
        sent = send_nowait(self._raw, data)
        if sent == len(data):
            return None
        # The rest must follow before anybody else's bytes: take the lock now (free, and
        # nothing yielded since we looked) and hand the remainder to the caller.
        lock.acquire_nowait()
        return self._send_rest(data[sent:])

    def _send_gathered_soon(self, parts: list[Part]) -> Awaitable[None] | None:
        """:meth:`_send_soon` of the message made of ``parts`` (one ``sendmsg``)."""
        lock = self._send_lock
        if lock.locked():
            return self._send_locked(parts)
        sent = send_gathered_nowait(self._raw, parts)
        if sent == sum(len(part) for part in parts):
            return None
        lock.acquire_nowait()
        return self._send_rest(after(parts, sent))

    async def _send_locked(self, data: bytes | list[Part]) -> None:
        async with self._send_lock:
            await self._send_shielded(data, ())

    async def _send_rest(self, rest: bytes | list[Part]) -> None:
        """The tail of a partially sent message; the lock is already held for us."""
        try:
            await self._send_shielded(rest, ())
        finally:
            self._send_lock.release()

    async def _send_shielded(self, data: bytes | list[Part], fds: Sequence[int]) -> None:
        """Send under the lock (the caller holds it), shielded, within SEND_TIMEOUT."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(SEND_TIMEOUT) as timeout:
                if isinstance(data, list):
                    await send_gathered(self.sock, data, fds)
                else:
                    await send_message(self.sock, data, fds)
        if timeout.cancelled_caught:
            self._close_socket()
            raise TransportError(errno.ETIMEDOUT, "peer stopped reading; connection dropped")

    def _mapped(self, iova: int, length: int) -> bool:
        return covered((slot for slot in self.maps.slots() if slot is not None), iova, length)

    def _create_ioeventfds(self, index: int) -> list[int]:
        fds = []
        for doorbell in self.device.ioeventfds:
            if doorbell.region != index:
                continue
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fds.append(fd)
            self.fd_watcher.watch(fd, doorbell.handler)
        return fds
