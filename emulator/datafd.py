"""Migration data over a passed file descriptor (the kernel's ``data_fd`` semantics).

Negotiated with ``"migration": {"data_fd": true}`` in VERSION. A SET MIG_DEVICE_STATE whose
arcs start STOP_COPY data (STOP->STOP_COPY, or PRE_COPY->STOP_COPY) or open a RESUMING
session returns one end of a pipe with the reply (SCM_RIGHTS, ``data_fd`` = its index 0).
A client that also negotiated ``"precopy_info": true`` gets the pipe where the kernel
returns its data_fd, on the arc that opens the saving session (RUNNING->PRE_COPY,
RUNNING_P2P->PRE_COPY_P2P); the same pipe then carries the STOP_COPY data after the
pre-copy data (docs/qemu-migration.md):

* saving: we write the stream into the pipe from a background task; the client reads until
  EOF. A client that stops reading only stalls that task, never the control socket. In
  pre-copy the task writes what the stream holds and waits for more: the device is asked
  for its changes by MIG_GET_PRECOPY_INFO (:meth:`DataFdSessions.wake`), whose sizes count
  what is in the pipe, so a client reads only what is there and never blocks.
* resuming: the client writes the stream and closes its end; a background task reads it
  through a 1 MiB buffer into the session's decoder, which validates it as it arrives and
  lets the device write large sections (RAM) straight into place: a large stream is never
  held, and no fresh memory is touched for it (first-touching a staging copy of a 256 MiB
  RAM alone costs more than the whole transfer). A stream another codec must decode
  whole is spliced into a memfd instead. RESUMING->STOP first drains what is still in the
  pipe, then checks the end of the stream.

Leaving the state ends the session and closes our end; a new session gets a new pipe.
What the client has not read of a saving pipe by then is discarded: it may hold device RAM
pages by reference (vmsplice), which must not show the RAM as it is later.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import termios
import threading
from collections.abc import Callable
from functools import partial

import trio

from devices.errors import DeviceError
from devices.migration import fastpath
from devices.migration.engine import DEFAULT_MAX_RESUME, MigrationEngine, SavingSession
from devices.migration.stream import Buffer
from protocol.constants import MigState
from protocol.migration_fsm import (
    DATA_STATES,
    OPENS_PRECOPY,
    OPENS_RESUMING,
    SAVING_STATES,
    STARTS_STOP_COPY,
    Arc,
)

log = logging.getLogger("vfio_user_emu")

PIPE_SIZE = 1 << 20
CHUNK = 1 << 20


class MemfdStaging:
    """Resumed bytes kept in a memfd, outside the Python heap.

    The memfd is mapped once, read-only, over ``reserve`` bytes of address space (the
    engine's resume limit; memory is used only where bytes arrive), so the payloads of kept
    sections (or a whole stream another codec decodes at the end) are read back without
    mapping anything again. A process without room for that reservation (RLIMIT_AS,
    RLIMIT_FSIZE) maps the staged bytes on demand instead; running out of room then is a
    clean ENOMEM/EFBIG for the client, never a traceback.
    """

    def __init__(self, reserve: int = DEFAULT_MAX_RESUME) -> None:
        self.reserve = reserve
        try:
            self.fd = os.memfd_create("vfio-user-emu-resume", os.MFD_CLOEXEC)
        except OSError as exc:
            raise DeviceError(exc.errno or errno.ENOMEM, f"resume staging: {exc}") from None
        self._size = 0
        self._map: mmap.mmap | None = None
        try:
            os.ftruncate(self.fd, reserve)  # sparse: no memory until written
            self._map = mmap.mmap(self.fd, reserve, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError, OverflowError) as exc:
            log.info(
                "resume staging: no room to reserve %d bytes (%s); mapping on demand", reserve, exc
            )
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def size(self) -> int:
        return self._size

    def append(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if self._size + len(view) > self.reserve:
            raise DeviceError(errno.EFBIG, f"resumed stream exceeds {self.reserve} bytes")
        while view:
            written = _staging_io(partial(os.pwrite, self.fd, view, self._size))
            self._size += written
            view = view[written:]

    def fill_from(self, source: int, count: int) -> int:
        """Move up to ``count`` bytes from a pipe into the staging file (``splice``: no copy
        through Python); returns how many, 0 at EOF. Raises BlockingIOError when the pipe
        is empty."""
        count = min(count, self.reserve - self._size)
        if count <= 0:
            raise DeviceError(errno.EFBIG, f"resumed stream exceeds {self.reserve} bytes")
        moved = _staging_io(partial(os.splice, source, self.fd, count, offset_dst=self._size))
        self._size += moved
        return moved

    def window(self, start: int, end: int) -> memoryview:
        """A view of staged bytes (faulted in as they are read)."""
        if self._map is not None:
            return memoryview(self._map)[start:end]
        if end <= start:
            return memoryview(b"")
        skew = start % mmap.PAGESIZE  # no reservation: map just these bytes
        try:
            piece = mmap.mmap(
                self.fd, end - start + skew, mmap.MAP_SHARED, mmap.PROT_READ, offset=start - skew
            )
        except OSError as exc:
            raise DeviceError(errno.ENOMEM, f"resume staging: cannot map: {exc}") from None
        return memoryview(piece)[skew:]

    def view(self) -> memoryview:
        if not self.size or self.fd < 0:
            return memoryview(b"")
        if self._map is None:
            return self.window(0, self._size)
        # Map it all in one go (validation reads every byte anyway).
        with contextlib.suppress(OSError, ValueError):
            self._map.madvise(MADV_POPULATE_READ, 0, self._size)
        return self.window(0, self._size)

    def clear(self) -> None:
        """Drop the staged bytes (their pages are freed); the file and its mapping stay.
        Reads only ever cover what was staged since, so the mapping stays safe even if
        the file could not be extended to the reservation again."""
        self._size = 0
        try:
            os.ftruncate(self.fd, 0)
            if self._map is not None:
                os.ftruncate(self.fd, self.reserve)
        except OSError as exc:
            log.warning("resume staging: could not reset the file: %s", exc)

    def close(self) -> None:
        """Release the staged stream. Unmapping and freeing a large memfd takes a while, so
        it happens in a thread, off the migration's critical path (the SET's reply)."""
        mapping, fd = self._map, self.fd
        self._map, self.fd = None, -1
        if mapping is None and fd < 0:
            return
        if self._size < LARGE_STAGING:
            _release(mapping, fd)
            return
        threading.Thread(target=_release, args=(mapping, fd), daemon=True).start()


#: madvise(2) advice (Linux 5.14) that faults a range in without touching it page by page.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
LARGE_STAGING = 16 << 20


def _staging_io(operation: Callable[[], int]) -> int:
    """Errors of the staging file itself (no memory, RLIMIT_FSIZE) as clean errnos."""
    try:
        return operation()
    except BlockingIOError:
        raise  # an empty pipe: the caller waits
    except OSError as exc:
        if exc.errno not in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG):
            raise
        raise DeviceError(exc.errno, f"resume staging: {exc}") from None


def _release(mapping: mmap.mmap | None, fd: int) -> None:
    if mapping is not None:
        # Views of it may still be referenced (e.g. from a traceback); then the mapping
        # goes away with them.
        with contextlib.suppress(BufferError):
            mapping.close()
    if fd >= 0:
        os.close(fd)


#: Pieces at least this large of a mapping (device RAM) go into the pipe by reference.
VMSPLICE_MIN = 64 << 10


def _writer_for(view: memoryview, state: MigState) -> Callable[[int, memoryview], int]:
    """How to put ``view`` into the pipe: pieces of a memory mapping (device RAM, which
    stays put while the device is stopped in STOP_COPY) are handed over without a copy
    (vmsplice); anything else, e.g. bytes the allocator may reuse once sent, is copied.
    Pages go by reference only in STOP_COPY (in PRE_COPY the device runs and changes
    them), and whatever of them the client did not read is discarded when that state is
    left (:meth:`DataFdSessions.close`)."""
    if (
        state == MigState.STOP_COPY
        and len(view) >= VMSPLICE_MIN
        and isinstance(view.obj, mmap.mmap)
        and fastpath.vmsplice_available()
    ):
        return fastpath.vmsplice
    return os.write


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read_end, write_end


class DataFdSessions:
    """The data-fd side of one client session (at most one pipe at a time)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self._our_end: int | None = None
        self._scope: trio.CancelScope | None = None
        self._resume_engine: MigrationEngine | None = None
        #: The session's data goes over a pipe (until the state is left or reset), even
        #: after the saving pump delivered everything and closed its end.
        self._session_open = False
        self.failure: DeviceError | None = None
        self._bounce: bytearray | None = None  # resumed bytes pass through it (one per client)
        #: Our own copy of a saving pipe's read end, to empty the pipe when the session ends.
        self._saving_read_end: int | None = None
        #: Set when a pre-copy stream may have grown (the saving pump waits for it).
        self._more = trio.Event()

    @property
    def active(self) -> bool:
        return self._session_open

    async def before_transition(self, engine: MigrationEngine, target: int) -> None:
        """A resume session's data must all be taken in before RESUMING -> anything.
        The session itself stays until the transition succeeded (a refused SET keeps it)."""
        resuming = self._resume_engine
        if resuming is None or target == MigState.RESUMING:
            return
        try:
            self._drain(resuming)  # what the pump has not read yet
        except DeviceError as exc:
            self.failure = exc
        if self.failure is not None:
            # e.g. EFBIG: bytes were refused, the stream is incomplete: nothing of it may
            # stay applied.
            resuming.discard_resumed()
            raise self.failure

    def after_transition(
        self, engine: MigrationEngine, arcs: list[Arc], *, precopy: bool = False
    ) -> int | None:
        """Open a pipe if the arcs started a data session; returns the client's end.
        ``precopy``: the client reads pre-copy data from the pipe too (it negotiated
        ``precopy_info``), so the pipe opens with the saving session, as the kernel's."""
        # A data session's pipe lives through the data states (one pipe for PRE_COPY and
        # the STOP_COPY that follows it).
        if self.active and engine.state not in DATA_STATES:
            self.close()
        if self.active and engine.state in SAVING_STATES and engine.saving is not None:
            self.wake()  # e.g. PRE_COPY -> STOP_COPY: the same pipe goes on with the rest
            return None
        if precopy and any(arc in OPENS_PRECOPY for arc in arcs) and engine.saving is not None:
            return self._open_saving(engine)
        if any(arc in STARTS_STOP_COPY for arc in arcs) and engine.saving is not None:
            return self._open_saving(engine)
        if any(arc in OPENS_RESUMING for arc in arcs) and engine.resuming is not None:
            return self._open_resuming(engine)
        return None

    def wake(self) -> None:
        """The saving stream may have grown: the pump writes it into the pipe."""
        self._more.set()

    def unread(self) -> int:
        """Bytes in the saving pipe that the client has not read yet."""
        if self._saving_read_end is None:
            return 0
        count = array.array("i", [0])
        try:
            fcntl.ioctl(self._saving_read_end, termios.FIONREAD, count)
        except OSError:
            return 0
        return count[0]

    def _open_saving(self, engine: MigrationEngine) -> int:
        assert engine.saving is not None
        self.close()
        read_end, write_end = _pipe()
        try:
            self._saving_read_end = os.dup(read_end)
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        os.set_blocking(write_end, False)
        self._our_end = write_end
        self._session_open = True
        self._scope = trio.CancelScope()
        self.nursery.start_soon(self._pump_out, engine, engine.saving, write_end, self._scope)
        return read_end

    def _open_resuming(self, engine: MigrationEngine) -> int:
        self.close()
        read_end, write_end = _pipe()
        os.set_blocking(read_end, False)
        self._our_end = read_end
        self._session_open = True
        self._resume_engine = engine
        self._scope = trio.CancelScope()
        self.nursery.start_soon(self._pump_in, engine, read_end, self._scope)
        return write_end

    async def _pump_out(
        self, engine: MigrationEngine, session: SavingSession, fd: int, scope: trio.CancelScope
    ) -> None:
        with scope:
            while True:
                view = session.take(CHUNK)
                if not view and not session.complete:
                    # Pre-copy: all there is, for now (no checkpoint since take(): a wake
                    # cannot be missed).
                    self._more = trio.Event()
                    await self._more.wait()
                    if scope.cancel_called:
                        return
                    continue
                if not view:
                    break  # the whole stream is written (STOP_COPY data is complete)
                write = _writer_for(view, engine.state)
                while view:
                    try:
                        written = write(fd, view)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(fd)
                        if scope.cancel_called:
                            return  # see _pump_in
                        continue
                    except BrokenPipeError:
                        log.info("data fd: the client closed its end early")
                        return
                    view = view[written:]
                await trio.lowlevel.checkpoint()
            if scope.cancel_called:
                return
            self._close_fd()  # EOF for the client: that was the whole state

    async def _pump_in(self, engine: MigrationEngine, fd: int, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    if not self._move(engine, fd):
                        return  # EOF: the client closed its end
                    # A writer that keeps the pipe full must not keep the other tasks
                    # (this client's control socket, other devices) from running.
                    await trio.lowlevel.checkpoint()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    if scope.cancel_called:
                        # Woken before the session ended: the fd is closed now, and its
                        # number may already belong to something else. Never touch it.
                        return
                except DeviceError as exc:
                    self.failure = exc
                    log.warning("data fd: %s", exc)
                    return

    def _move(self, engine: MigrationEngine, fd: int) -> bool:
        session = engine.resuming
        if session is None:
            return False
        room = session.limit - session.size
        if room <= 0:
            raise DeviceError(errno.EFBIG, f"resumed stream exceeds {session.limit} bytes")
        staging = session.staging
        if session.decoder is None and isinstance(staging, MemfdStaging):
            moved = staging.fill_from(fd, min(CHUNK, room))  # staged whole: no copy here
            session.staged(moved)
            return moved > 0
        # Decoded while it arrives: RAM sections are read straight into device RAM, the
        # rest passes through a small buffer that stays in cache.
        target = session.target(CHUNK)
        if target is not None:
            count = os.readv(fd, [target])  # BlockingIOError: pipe empty
            if count:
                session.landed(count)
            return count > 0
        if self._bounce is None:
            self._bounce = bytearray(CHUNK)
        buffer = memoryview(self._bounce)
        count = os.readv(fd, [buffer[: session.wanted(min(CHUNK, room))]])  # or BlockingIOError
        session.write(buffer[:count])
        return count > 0

    def _drain(self, engine: MigrationEngine) -> None:
        """Move whatever the client already wrote (it is in the pipe) into staging."""
        fd = self._our_end
        if fd is None or self.failure is not None:
            return
        with contextlib.suppress(BlockingIOError):
            while self._move(engine, fd):
                pass

    def _close_fd(self) -> None:
        if self._our_end is not None:
            trio.lowlevel.notify_closing(self._our_end)
            os.close(self._our_end)
            self._our_end = None

    def _discard_unread(self) -> None:
        """Empty a saving pipe the client may still hold: what it did not read yet may be
        device RAM pages by reference (vmsplice), which would show the RAM as it is when
        read, even to another client. Called before the device can run or change (the
        callers close the session before a reset, after a transition without yielding to
        device work, and at teardown). Our write end is closed first, so reading ends at
        EOF and never blocks."""
        fd, self._saving_read_end = self._saving_read_end, None
        if fd is None:
            return
        try:
            while os.read(fd, CHUNK):
                pass
        except OSError as exc:
            log.warning("data fd: could not empty the saving pipe: %s", exc)
        finally:
            os.close(fd)

    def close(self) -> None:
        """End the session (state left, device reset, client gone): our end is closed and
        what the client did not read of a saving pipe is discarded."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        self._close_fd()
        self._discard_unread()
        self._resume_engine = None
        self._session_open = False
        self.failure = None
