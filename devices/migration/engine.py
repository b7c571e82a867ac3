"""The per-device migration engine: the VFIO v2 state machine driving a device's arcs.

The table of legal steps, and every state and arc set, is :mod:`protocol.migration_fsm`;
this module executes it. A SET request becomes a list of direct arcs
(:func:`protocol.migration_fsm.plan`); each arc runs the device's hook for it and then the
engine's own action (pause/resume the device, open/close data sessions, validate and apply
resumed state). If an arc fails, the engine walks the executed arcs back in reverse; if that
fails too (or no reverse arc exists) the device enters ERROR, from which only a device
reset (-> RUNNING) leaves.

What each state means is enforced here, not left to devices: outside RUNNING and PRE_COPY
interrupts are latched and the device's ``pause`` hook stops its timers and backends.

The engine is synchronous and never calls up into the runtime. The one thing it cannot do
itself is wait for the device's work in progress (a job and its DMA, queued by the runtime)
before the device stops. So the runtime asks first (:meth:`MigrationEngine.stops_device`);
if the transition stops the device it pauses it here (:meth:`MigrationEngine.pause_device`:
interrupts latched, the device's timers and backends stopped, so a timer job ends), waits
for its job queue to go quiet, then runs the whole transition here without yielding (no
job can start between two arcs, so a stop in the middle of a combination transition or of
an unwind needs no second wait); afterwards the device runs, and the runtime's queue with
it, if and only if its state operates (:meth:`MigrationEngine.settle`, also after a failure
or a cancelled wait). See ``emulator.worker.DeviceWorker.change_state``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from devices.errors import DeviceError, MigrationRefused
from devices.migration.stream import (
    Buffer,
    LazyPiece,
    LoadedSection,
    Section,
    SectionSink,
    SinkFactory,
    StreamDecoder,
    StreamError,
    StreamLimits,
    StreamWriter,
    decode,
)
from protocol.constants import MigrationCaps, MigState
from protocol.migration_fsm import (
    CLOSES_SAVING,
    ERROR,
    LOADS_RESUMED,
    OPENS_RESUMING,
    OPENS_SAVING,
    OPERATING_STATES,
    PRE_COPY_STATES,
    RESUMING,
    RUNNING,
    SAVING_STATES,
    STARTS_DEVICE,
    STARTS_STOP_COPY,
    STOP,
    STOPS_DEVICE,
    Arc,
    TransitionRefused,
    direct_arcs,
    plan,
    valid_caps,
)

if TYPE_CHECKING:
    from devices.api import Device

#: What libvfio-user advertises, and so what we advertise unless told otherwise.
DEFAULT_CAPS = MigrationCaps.STOP_COPY | MigrationCaps.PRE_COPY
ALL_CAPS = MigrationCaps.STOP_COPY | MigrationCaps.P2P | MigrationCaps.PRE_COPY

CAP_NAMES = {
    "stop_copy": MigrationCaps.STOP_COPY,
    "p2p": MigrationCaps.P2P,
    "pre_copy": MigrationCaps.PRE_COPY,
}

#: Sections the engine adds for every device (config space and interrupt state).
CONFIG_SECTION = "pci.config"
IRQ_SECTION = "pci.irq"
DEFAULT_MAX_RESUME = 1 << 32


def parse_mig_caps(text: str) -> MigrationCaps:
    """``stop_copy+pre_copy`` -> flags. STOP_COPY is mandatory; ``none`` is a device that
    does not migrate (every migration request fails with EINVAL, as libvfio-user's)."""
    caps = MigrationCaps(0)
    if text.strip() == "none":
        return caps
    for name in filter(None, text.replace(",", "+").split("+")):
        flag = CAP_NAMES.get(name.strip())
        if flag is None:
            raise ValueError(f"unknown migration capability {name!r} (stop_copy, p2p, pre_copy)")
        caps |= flag
    if not caps & MigrationCaps.STOP_COPY:
        raise ValueError("mig-caps must include stop_copy (it is mandatory)")
    return caps


# ---------------------------------------------------------------------------------------------
# Stream codecs


class MigrationCodec(Protocol):
    """Turns sections into the bytes a client reads, and resumed bytes back into sections."""

    def begin(self, session_id: bytes) -> bytes: ...

    def sections(self, sections: Sequence[Section]) -> Sequence[Buffer | LazyPiece]:
        """The encoded sections as pieces (payload views are passed through uncopied); a
        :class:`LazyPiece` is made (checksummed) only when the reader reaches it."""
        ...

    def end(self) -> Buffer | LazyPiece: ...

    def decode(self, data: memoryview) -> list[LoadedSection]: ...


class EnvelopeCodec:
    """Our versioned, checksummed envelope (:mod:`devices.migration.stream`)."""

    def __init__(self, device_type: str, model_version: int, limits: StreamLimits) -> None:
        self.device_type = device_type
        self.model_version = model_version
        self.limits = limits
        self._writer: StreamWriter | None = None

    def begin(self, session_id: bytes) -> bytes:
        self._writer = StreamWriter(self.device_type, self.model_version, session_id)
        return self._writer.header()

    def sections(self, sections: Sequence[Section]) -> list[Buffer | LazyPiece]:
        assert self._writer is not None
        writer = self._writer
        return [writer.deferred_section(name, payload) for name, payload in sections]

    def end(self) -> LazyPiece:
        assert self._writer is not None
        return self._writer.deferred_trailer()

    def decode(self, data: memoryview) -> list[LoadedSection]:
        _, sections = decode(
            data,
            device_type=self.device_type,
            max_model_version=self.model_version,
            limits=self.limits,
        )
        return sections

    def decoder(self, sink_for: SinkFactory, store: Staging) -> StreamDecoder:
        """Decodes a stream while it arrives (see :class:`ResumingSession`)."""
        return StreamDecoder(
            device_type=self.device_type,
            max_model_version=self.model_version,
            sink_for=sink_for,
            store=store,
            limits=self.limits,
        )


# ---------------------------------------------------------------------------------------------
# Data sessions


class SavingSession:
    """Bytes produced for the client to read, in order; PRE_COPY appends as changes occur.

    ``produced`` counts every byte queued, including lazy pieces (sections checksummed only
    when the reader reaches them): a large state streams out while it is being encoded."""

    def __init__(self, codec: MigrationCodec) -> None:
        self.codec = codec
        self.session_id = os.urandom(16)
        self._chunks: deque[memoryview | LazyPiece] = deque()
        self.produced = 0
        self.consumed = 0
        self.complete = False
        #: Bytes of the initial pre-copy data (the kernel's ``initial_bytes`` count down
        #: from it); the rest is what changed since.
        self.initial_size = 0
        self._append(codec.begin(self.session_id))

    def _append(self, data: Buffer | LazyPiece) -> None:
        if isinstance(data, LazyPiece):
            if data.size:
                self._chunks.append(data)
                self.produced += data.size
        elif len(data):
            view = memoryview(data).cast("B")
            self._chunks.append(view)
            self.produced += len(view)

    def _head(self) -> memoryview | None:
        """The next bytes to read, making lazy pieces as they come to the front."""
        while self._chunks:
            head = self._chunks[0]
            if not isinstance(head, LazyPiece):
                return head
            self._chunks.popleft()
            views = [memoryview(piece).cast("B") for piece in head.produce()]
            if sum(len(view) for view in views) != head.size:
                raise RuntimeError(f"lazy stream piece of {head.size} bytes produced otherwise")
            self._chunks.extendleft(reversed([view for view in views if len(view)]))
        return None

    def add(self, sections: Sequence[Section]) -> None:
        for piece in self.codec.sections(sections) if sections else ():
            self._append(piece)

    def finish(self, sections: Sequence[Section]) -> None:
        self.add(sections)
        self._append(self.codec.end())
        self.complete = True

    @property
    def pending(self) -> int:
        return self.produced - self.consumed

    def take(self, size: int) -> memoryview:
        """Up to ``size`` bytes of the next piece, as a view (for the data-fd writer)."""
        chunk = self._head()
        if chunk is None:
            return memoryview(b"")
        view = chunk[:size]
        if len(view) == len(chunk):
            self._chunks.popleft()
        else:
            self._chunks[0] = chunk[len(view) :]
        self.consumed += len(view)
        return view

    def read(self, size: int) -> bytes:
        out = []
        left = size
        while left and (chunk := self._head()) is not None:
            take = chunk[:left]
            out.append(take)
            left -= len(take)
            if len(take) == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[len(take) :]
        data = b"".join(out)
        self.consumed += len(data)
        return data


class Staging(Protocol):
    """Where resumed bytes wait for validation. The runtime provides one backed by a memfd
    so a large stream never lives in Python objects; the default is in memory."""

    @property
    def size(self) -> int: ...

    def append(self, data: Buffer) -> None: ...

    def view(self) -> memoryview: ...

    def clear(self) -> None:
        """Drop what is staged (a stream starts over); the staging stays usable."""
        ...

    def close(self) -> None: ...


class MemoryStaging:
    def __init__(self, limit: int = 0) -> None:  # grows as bytes arrive: nothing to reserve
        self._data = bytearray()

    @property
    def size(self) -> int:
        return len(self._data)

    def append(self, data: Buffer) -> None:
        self._data += data

    def view(self) -> memoryview:
        return memoryview(self._data)

    def clear(self) -> None:
        self._data = bytearray()

    def close(self) -> None:
        self.clear()


class ResumingSession:
    """Resumed bytes, in order. With a ``decoder`` (our envelope) the stream is validated
    while it arrives and the device's sinks apply large sections in place (no staging of a
    large RAM); only the other sections' payloads are staged. Without one (another codec)
    the whole stream is staged and decoded at RESUMING -> STOP.

    A decoding error is kept and reported at RESUMING -> STOP (the errno the transition
    fails with), as when the whole stream was staged; bytes after it are only counted."""

    def __init__(self, limit: int, staging: Staging, decoder: StreamDecoder | None = None) -> None:
        self.limit = limit
        self.staging = staging
        self.decoder = decoder
        self._received = 0
        self._committed = False

    @property
    def size(self) -> int:
        return self._received

    def write(self, data: Buffer) -> None:
        if self._received + len(data) > self.limit:
            raise DeviceError(errno.EFBIG, f"resumed stream exceeds {self.limit} bytes")
        self._received += len(data)
        if self.decoder is None:
            self.staging.append(data)
        elif self.decoder.error is None:
            with contextlib.suppress(StreamError):  # kept in decoder.error
                self.decoder.feed(data)

    def target(self, limit: int) -> memoryview | None:
        """Where the next bytes go when the device takes them in place (its RAM): the
        runtime reads them straight into it and calls :meth:`landed`. None: :meth:`write`."""
        room = min(limit, self.limit - self._received)
        if self.decoder is None or self.decoder.error is not None or room <= 0:
            return None
        return self.decoder.target(room)

    def wanted(self, limit: int) -> int:
        """How many bytes to read next for :meth:`write` (see StreamDecoder.wanted)."""
        return limit if self.decoder is None else self.decoder.wanted(limit)

    def landed(self, count: int) -> None:
        assert self.decoder is not None
        self._received += count
        with contextlib.suppress(StreamError):  # kept in decoder.error
            self.decoder.landed(count)

    def staged(self, count: int) -> None:
        """``count`` bytes the runtime put into the staging itself (spliced from a data fd;
        only without a decoder)."""
        assert self.decoder is None, "a decoded stream is written, not staged"
        self._received += count

    def sections(self) -> list[LoadedSection] | None:
        """The decoded sections the sinks did not take (None: decode the staging)."""
        return None if self.decoder is None else self.decoder.sections()

    def commit(self) -> None:
        """The state was loaded: what the sinks applied stays."""
        if self.decoder is not None:
            self.decoder.commit()
        self._committed = True

    def restart(self, decoder: StreamDecoder | None) -> None:
        """Take back what sinks applied and start over, empty, with ``decoder``: the
        stream so far is abandoned, the same staging takes the next one."""
        if self.decoder is not None:
            self.decoder.undo()
        self.staging.clear()
        self.decoder = decoder
        self._received = 0

    def close(self) -> None:
        """End the session; unless committed, what sinks applied is taken back."""
        if self.decoder is not None and not self._committed:
            self.decoder.undo()
        self.staging.close()


# ---------------------------------------------------------------------------------------------
# The engine


class RunState(enum.Enum):
    """Whether the device may act on its own (qemu.qmp-style explicit state)."""

    RUNNING = "running"
    PAUSED = "paused"


@dataclass(slots=True)
class TransitionResult:
    arcs: list[Arc]
    state: MigState


class MigrationEngine:
    def __init__(
        self,
        device: Device,
        caps: int | None = None,
        *,
        stream_limits: StreamLimits | None = None,
        max_resume: int = DEFAULT_MAX_RESUME,
    ) -> None:
        wanted = int(device.migration_caps if caps is None else caps)
        # 0 = the device does not migrate: every request fails with EINVAL (nothing supported).
        if wanted and not valid_caps(wanted):
            raise ValueError(f"invalid migration capabilities {wanted:#x}")
        if wanted & ~int(device.migration_caps):
            raise ValueError(f"{device.type_name} cannot do migration capabilities {wanted:#x}")
        self.device = device
        self.caps = wanted
        self.arcs = direct_arcs(wanted)
        self.state = RUNNING
        self.run_state = RunState.RUNNING
        self.history: list[Arc] = []
        self.stream_limits = stream_limits or StreamLimits()
        self.max_resume = max_resume
        self.saving: SavingSession | None = None
        self.resuming: ResumingSession | None = None
        #: Makes staging buffers for resumed data, given the most bytes they must hold (the
        #: runtime installs a memfd-backed one).
        self.staging_factory: Callable[[int], Staging] = MemoryStaging

    # -- queries -----------------------------------------------------------------------------
    @property
    def operating(self) -> bool:
        return self.state in OPERATING_STATES

    # -- transitions ------------------------------------------------------------------------
    def plan(self, target: int) -> list[Arc]:
        """The arcs from the current state to ``target``; MigrationRefused (EINVAL) for an
        impossible request."""
        if self.state == ERROR:
            raise MigrationRefused("device is in ERROR; only a reset leaves it")
        try:
            return plan(self.caps, self.state, target)
        except TransitionRefused as exc:
            raise MigrationRefused(exc.message) from None

    def stops_device(self, target: int) -> bool:
        """Does the transition to ``target`` stop the device (an arc out of the operating
        states)? Then the runtime waits for the device's work in progress before
        :meth:`set_state`. Raises MigrationRefused as :meth:`set_state` would."""
        return any(arc in STOPS_DEVICE for arc in self.plan(target))

    def pause_device(self) -> None:
        """Latch interrupts and stop the device's timers and backends (``Device.pause``),
        ahead of a transition that stops it: the runtime then waits for its work."""
        self._pause()

    def settle(self) -> None:
        """The device runs if and only if its state operates: after a transition the
        runtime paused the device for (whatever came of it: a failed first arc, a wait
        cancelled before any arc ran)."""
        if self.operating:
            self._resume()
        else:
            self._pause()

    def set_state(self, target: int) -> TransitionResult:
        """Run the combination transition to ``target``, every arc without yielding.

        The caller has paused the device and quiesced its work first if
        :meth:`stops_device` says so, and settles it afterwards (a device with no runtime
        around it, as in unit tests, has no work to wait for). Raises
        MigrationRefused (EINVAL) for an impossible request (nothing changes) and
        DeviceError with the failing arc's errno when an arc fails (after unwinding).
        """
        arcs = self.plan(target)
        done: list[Arc] = []
        self.history = []
        for arc in arcs:
            try:
                self._run(arc)
            except DeviceError as exc:
                self._unwind(done)
                raise DeviceError(exc.errno, f"arc {arc[0].name}->{arc[1].name}: {exc}") from exc
            done.append(arc)
        return TransitionResult(done, self.state)

    def _run(self, arc: Arc) -> None:
        """One direct arc: the device's hook, then the engine's action; all or nothing."""
        dest = arc[1]
        stopping = arc in STOPS_DEVICE
        if stopping:
            self._pause()
        try:
            self.device.migration_arc(arc)
            self._data_action(arc)
        except DeviceError:
            self._undo_data_action(arc)
            if stopping:
                self._resume()
            raise
        if arc in STARTS_DEVICE:
            self._resume()
        self.state = dest
        self.history.append(arc)

    def _unwind(self, done: list[Arc]) -> None:
        for source, dest in reversed(done):
            back = (dest, source)
            if back not in self.arcs:
                self._enter_error()
                return
            try:
                if back == (RESUMING, STOP):
                    self._drop_resuming()  # abandoning a resume loads nothing
                    self.device.migration_arc(back)
                    self.state = STOP
                    self.history.append(back)
                else:
                    self._run(back)
            except DeviceError:
                self._enter_error()
                return

    def _data_action(self, arc: Arc) -> None:
        if arc in OPENS_SAVING:
            self.saving = SavingSession(self.device.migration_codec(self.stream_limits))
            if arc in STARTS_STOP_COPY:
                self.saving.finish(self._stop_copy_sections(after_precopy=False))
            else:
                self.saving.add(self.device.precopy_start())
                self.saving.initial_size = self.saving.produced
        elif arc in STARTS_STOP_COPY:  # from pre-copy: the same session goes on
            assert self.saving is not None
            self.saving.finish(self._stop_copy_sections(after_precopy=True))
        elif arc in CLOSES_SAVING:
            self.saving = None
            self.device.precopy_end()
        elif arc in OPENS_RESUMING:
            self._new_resuming()
        elif arc in LOADS_RESUMED:
            self._apply_resumed()

    def _new_resuming(self) -> None:
        self._drop_resuming()
        staging = self.staging_factory(self.max_resume)
        self.resuming = ResumingSession(self.max_resume, staging, self._decoder_for(staging))

    def _restart_resuming(self, session: ResumingSession) -> None:
        """The stream so far is abandoned (taken back) and a fresh one may be written, into
        the same staging: nothing is allocated, so this cannot fail for want of memory."""
        session.restart(self._decoder_for(session.staging))

    def _decoder_for(self, staging: Staging) -> StreamDecoder | None:
        """Our envelope is decoded as it arrives; another codec decodes the staged whole."""
        codec = self.device.migration_codec(self.stream_limits)
        return codec.decoder(self._sink_for, staging) if isinstance(codec, EnvelopeCodec) else None

    def _sink_for(self, name: str, length: int) -> SectionSink | None:
        if name.startswith("pci."):
            return None  # the engine's own sections
        return self.device.resume_sink(name, length)

    def _drop_resuming(self) -> None:
        if self.resuming is not None:
            self.resuming.close()
            self.resuming = None

    def _undo_data_action(self, arc: Arc) -> None:
        if arc in OPENS_SAVING:
            self.saving = None
        elif arc in OPENS_RESUMING:
            self._drop_resuming()

    def _stop_copy_sections(self, *, after_precopy: bool) -> Sequence[Section]:
        own = list(self.device.stop_copy_sections(after_precopy))
        if not self.device.migration_generic_state:
            return own
        generic: list[Section] = [
            (CONFIG_SECTION, self.device.config.snapshot()),
            (IRQ_SECTION, self.device.irq.snapshot()),
        ]
        return generic + own

    def _apply_resumed(self) -> None:
        """RESUMING -> STOP: validate everything, then apply atomically or not at all."""
        received = self.resuming
        if received is None:
            raise StreamError("nothing was resumed (no staging for the stream)")
        try:
            sections = received.sections()
            if sections is None:
                sections = self.device.migration_codec(self.stream_limits).decode(
                    received.staging.view()
                )
            self._apply_sections(sections)
        except BaseException:
            self._restart_resuming(received)  # nothing stays; a fresh stream may be written
            raise
        self.resuming = None
        received.commit()
        received.close()

    def _apply_sections(self, sections: Sequence[LoadedSection]) -> None:
        generic: dict[str, Buffer] = {}
        for name, payload in sections:
            if not name.startswith("pci."):
                continue
            if name not in (CONFIG_SECTION, IRQ_SECTION) or name in generic:
                raise StreamError(f"unknown or repeated engine section {name!r}")
            generic[name] = payload
        own = [(name, payload) for name, payload in sections if not name.startswith("pci.")]
        config_blob = generic.get(CONFIG_SECTION)
        irq_blob = generic.get(IRQ_SECTION)
        if self.device.migration_generic_state and (config_blob is None or irq_blob is None):
            raise StreamError("config-space or interrupt section missing")
        old_config = self.device.config.snapshot()
        old_irq = self.device.irq.snapshot()
        try:
            if config_blob is not None:
                self.device.config.restore(config_blob)
            if irq_blob is not None:
                self.device.irq.restore(irq_blob)
            self.device.load_state(own)
        except (ValueError, struct.error) as exc:
            self._restore_generic(old_config, old_irq)
            raise StreamError(str(exc)) from None
        except DeviceError:
            self._restore_generic(old_config, old_irq)
            raise

    def _restore_generic(self, config: bytes, irq: bytes) -> None:
        self.device.config.restore(config)
        self.device.irq.restore(irq)

    def _pause(self) -> None:
        if self.run_state is RunState.PAUSED:
            return
        self.run_state = RunState.PAUSED
        self.device.irq.suspend()
        self.device.pause()

    def _resume(self) -> None:
        if self.run_state is RunState.RUNNING:
            return
        self.run_state = RunState.RUNNING
        self.device.resume()
        self.device.irq.resume()

    def _enter_error(self) -> None:
        """A device in ERROR does nothing on its own: no interrupts, no timers (and, as ERROR
        is not an operating state, the runtime starts none of its jobs)."""
        self.state = ERROR
        self.saving = None
        self._drop_resuming()
        self._pause()

    # -- reset -------------------------------------------------------------------------------
    def reset(self) -> None:
        """DEVICE_RESET: back to RUNNING from any state, ERROR included (kernel, spec)."""
        self.saving = None
        self._drop_resuming()
        self.state = RUNNING
        self._resume()

    # -- data --------------------------------------------------------------------------------
    def read_data(self, size: int) -> bytes:
        return b"".join(self.read_views(size))

    def read_views(self, size: int) -> list[memoryview]:
        """Up to ``size`` bytes of the saving stream, as views of its pieces (the device's
        own buffers, e.g. its RAM in STOP_COPY), for a reply sent gathered instead of joined.

        The reply is as full as the data available now allows, across pieces and sections:
        a shorter one tells the client "nothing more for now" (spec), so in PRE_COPY the
        device is asked for its changes again whenever the stream runs dry mid-reply."""
        saving = self._saving_to_read()
        pieces: list[memoryview] = []
        while size:
            piece = saving.take(size)
            if not piece:
                if saving.complete or not self._add_precopy_changes(saving):
                    break
                continue
            pieces.append(piece)
            size -= len(piece)
        return pieces

    def _saving_to_read(self) -> SavingSession:
        """The saving session; EINVAL outside the saving states."""
        if self.state not in SAVING_STATES or self.saving is None:
            raise MigrationRefused(f"no migration data to read in {self.state.name}")
        return self.saving

    def _add_precopy_changes(self, saving: SavingSession) -> bool:
        """Ask the device for what changed (PRE_COPY only: after STOP_COPY's sections the
        stream is complete); True when that added bytes."""
        before = saving.pending
        saving.add(self.device.precopy_changes())
        return saving.pending > before

    def pending_data(self) -> int:
        """Bytes the saving stream holds now (the v1 region's ``pending_bytes``); in
        PRE_COPY it first asks the device for changes, as :meth:`read_data` does."""
        if self.state not in SAVING_STATES or self.saving is None:
            return 0
        if not self.saving.pending and not self.saving.complete:
            self._add_precopy_changes(self.saving)
        return self.saving.pending

    def precopy_info(self, unread: int = 0) -> tuple[int, int]:
        """The kernel's VFIO_MIG_GET_PRECOPY_INFO in PRE_COPY: ``(initial_bytes,
        dirty_bytes)``, what the client can read now. ``unread`` counts bytes already
        taken from the stream but not yet read by the client (in a data fd). The device is
        asked for changes first when nothing is pending; (0, 0) means nothing for now.
        EINVAL outside the pre-copy states, as the kernel's."""
        if self.state not in PRE_COPY_STATES:
            raise MigrationRefused(f"no pre-copy info in {self.state.name}")
        saving = self._saving_to_read()
        if not unread and not saving.pending:
            self._add_precopy_changes(saving)  # the client has everything: what changed?
        total = saving.pending + unread
        initial = min(total, max(0, saving.initial_size - (saving.consumed - unread)))
        return initial, total - initial

    def abandon_resumed(self) -> None:
        """End a resume session, taking back what it applied in place, before a device
        reset: undoing it after the reset would bring the old RAM back over the reset's."""
        self._drop_resuming()

    def discard_resumed(self) -> None:
        """The runtime refused part of the resumed stream (e.g. past the size limit): what
        was applied in place is taken back now, as a failed load does, and a fresh
        stream may be written."""
        if self.state == RESUMING and self.resuming is not None:
            self._restart_resuming(self.resuming)

    def write_data(self, data: Buffer) -> None:
        """Resumed bytes, used before this returns (the caller may reuse ``data``)."""
        if self.state != RESUMING or self.resuming is None:
            raise MigrationRefused(f"migration data written in {self.state.name}")
        self.resuming.write(data)

    def stop_copy_estimate(self) -> int:
        """Rough STOP_COPY size (VFIO_DEVICE_FEATURE_MIG_DATA_SIZE semantics)."""
        return self.device.migration_size_estimate()
