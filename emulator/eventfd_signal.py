"""Signal a client's eventfd without ever blocking, and without touching its file flags.

An eventfd a client passes with SET_IRQS shares its *file description* with the client, and
O_NONBLOCK lives in the description: setting it on our copy turns the client's copy
non-blocking too. libvfio-user's sample client creates its INTx eventfd blocking and waits
with a plain ``read()``, which then fails with EAGAIN (shared/reference/lvu-sample-device.md,
"The client's own file descriptors"). So the server must leave the flags alone.

A plain ``write()`` of 1 on a blocking eventfd blocks while the counter is at its maximum
(0xfffffffffffffffe), and a hostile client can put it there at any moment, also between a
``poll()`` for POLLOUT and our write: no check before a blocking write is safe.

The kernel has a signalling path that never blocks: the completion of an asynchronous I/O
(``io_submit`` with ``IOCB_FLAG_RESFD``) adds 1 to the eventfd named in the request through
``eventfd_signal()``, which saturates instead of waiting. So each interrupt is a zero-byte
read of /dev/zero submitted with the client's eventfd as its completion fd: it completes
during ``io_submit`` and the client's eventfd counts one more, as a ``write()`` of 1 would.
A client that saturated its own counter loses its own interrupts, nothing else. Completions
are reaped in batches (they carry nothing we need).

Where the kernel has no AIO (``io_setup`` fails), :class:`Signaller` falls back to a
``write()`` when the description is non-blocking right now, and otherwise to one writer
thread per eventfd, which may block on a hostile client's counter without stalling anyone
else.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import platform
import queue
import select
import threading
from typing import Final

__all__ = ["AioSignaller", "Signaller", "ThreadSignaller", "read_nowait", "signaller"]

log = logging.getLogger("vfio_user_emu")

_ONE: Final = (1).to_bytes(8, "little")

# x86_64 and aarch64 system call numbers (the only architectures we build for); others use
# the fallback.
_SYSCALLS: Final = {
    "x86_64": {"io_setup": 206, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_getevents": 4, "io_submit": 2},
}
_IOCB_CMD_PREAD: Final = 0
_IOCB_FLAG_RESFD: Final = 1
_RING_EVENTS: Final = 256  # completions the kernel queues before io_submit says EAGAIN
_REAP_EVERY: Final = 64  # submissions between two reaps (a reap costs one system call)


class _Iocb(ctypes.Structure):
    # struct iocb of <linux/aio_abi.h> (little-endian layout of aio_key/aio_rw_flags).
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class Signaller:
    """Adds 1 to an eventfd; :meth:`signal` returns False when nothing was delivered (the
    fd is not an eventfd, or is closed)."""

    name = "abstract"

    def signal(self, fd: int) -> bool:
        raise NotImplementedError

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed (only the thread fallback keeps per-fd state)."""


class AioSignaller(Signaller):
    """Signals through AIO completions (see the module docstring). One per process."""

    name = "aio"

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None or not hasattr(ctypes, "CDLL"):
            raise OSError(errno.ENOSYS, f"no AIO system call numbers for {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._numbers = numbers
        self._context = ctypes.c_ulong(0)
        setup = ctypes.c_long(numbers["io_setup"])
        if self._syscall(setup, ctypes.c_long(_RING_EVENTS), ctypes.byref(self._context)) < 0:
            raise OSError(ctypes.get_errno(), "io_setup: " + os.strerror(ctypes.get_errno()))
        self._zero_fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        self._buffer = ctypes.create_string_buffer(1)
        self._iocb = _Iocb(
            aio_lio_opcode=_IOCB_CMD_PREAD,
            aio_fildes=self._zero_fd,
            aio_buf=ctypes.addressof(self._buffer),
            aio_nbytes=0,
            aio_flags=_IOCB_FLAG_RESFD,
        )
        self._iocbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._events = (_IoEvent * _RING_EVENTS)()
        self._no_wait = (ctypes.c_long * 2)(0, 0)
        self._unreaped = 0
        self._lock = threading.Lock()  # one iocb buffer, shared by every caller
        self._probe()

    def _probe(self) -> None:
        """Prove the mechanism on an eventfd of our own before clients depend on it."""
        probe = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            if not self.signal(probe) or os.eventfd_read(probe) != 1:
                raise OSError(errno.ENOSYS, "AIO completion did not signal the eventfd")
        finally:
            os.close(probe)

    def signal(self, fd: int) -> bool:
        with self._lock:
            self._iocb.aio_resfd = fd
            for _attempt in range(2):
                if self._submit_one() == 1:
                    self._unreaped += 1
                    if self._unreaped >= _REAP_EVERY:
                        self._reap()
                    return True
                if ctypes.get_errno() != errno.EAGAIN:
                    return False  # EBADF / EINVAL: not an (open) eventfd
                self._reap()  # the completion ring is full
            return False

    def _submit_one(self) -> int:
        submit = ctypes.c_long(self._numbers["io_submit"])
        return int(self._syscall(submit, self._context, ctypes.c_long(1), self._iocbs))

    def _reap(self) -> None:
        getevents = ctypes.c_long(self._numbers["io_getevents"])
        self._syscall(
            getevents,
            self._context,
            ctypes.c_long(0),
            ctypes.c_long(_RING_EVENTS),
            self._events,
            self._no_wait,
        )
        self._unreaped = 0


class ThreadSignaller(Signaller):
    """The fallback without AIO: a direct write when the client's description is
    non-blocking at that moment (EAGAIN: the client saturated its own counter, its
    interrupt is lost), otherwise a write from a thread of that fd's own, which may block
    on a hostile client without holding up the server or another client."""

    name = "thread"

    def __init__(self) -> None:
        self._writers: dict[int, queue.SimpleQueue[int | None]] = {}

    def signal(self, fd: int) -> bool:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            return False
        if flags & os.O_NONBLOCK:
            try:
                os.write(fd, _ONE)
            except BlockingIOError:
                return True  # delivered as far as it can be: the counter is saturated
            except OSError:
                return False
            return True
        self._writer(fd).put(fd)
        return True

    def _writer(self, fd: int) -> queue.SimpleQueue[int | None]:
        jobs = self._writers.get(fd)
        if jobs is None:
            jobs = queue.SimpleQueue()
            # The thread writes to a dup of its own, so closing the client's fd (unbinding
            # the vector) never makes it write to a number reused for something else.
            own = os.dup(fd)
            thread = threading.Thread(
                target=_write_until_told, args=(own, jobs), name=f"eventfd-{fd}", daemon=True
            )
            thread.start()
            self._writers[fd] = jobs
        return jobs

    def forget(self, fd: int) -> None:
        jobs = self._writers.pop(fd, None)
        if jobs is not None:
            jobs.put(None)


def _write_until_told(fd: int, jobs: queue.SimpleQueue[int | None]) -> None:
    try:
        while jobs.get() is not None:
            try:
                os.write(fd, _ONE)
            except OSError:
                return
    finally:
        os.close(fd)


_signaller: Signaller | None = None


def signaller() -> Signaller:
    """The process's signaller: AIO where the kernel has it, else the thread fallback."""
    global _signaller  # noqa: PLW0603 - one per process, made on first use
    if _signaller is None:
        try:
            _signaller = AioSignaller()
        except OSError as exc:
            log.warning("eventfds are signalled by threads (no kernel AIO: %s)", exc)
            _signaller = ThreadSignaller()
    return _signaller


def read_nowait(fd: int) -> bool:
    """Read (reset) a client's eventfd if it holds a count; True when it did.

    The read must not block and must not change the client's flags either: a client could
    drain its own eventfd between our wake-up and our read. ``preadv2(RWF_NOWAIT)`` is a
    non-blocking read for this one call (measured here, Linux 6.18: EAGAIN on an empty
    blocking eventfd); a kernel whose eventfds do not take it answers EOPNOTSUPP and gets
    a read guarded by a zero-timeout poll, which a client racing its own reader could
    still make wait.
    """
    buffer = bytearray(8)
    try:
        return os.preadv(fd, [buffer], -1, os.RWF_NOWAIT) == len(buffer)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
    if not select.select([fd], [], [], 0)[0]:
        return False
    return len(os.read(fd, 8)) == len(buffer)
