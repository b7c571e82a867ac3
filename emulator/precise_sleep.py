"""Sleep for microseconds inside trio, on a timerfd instead of the event loop's deadline.

trio waits for I/O and deadlines with ``select.epoll.poll(timeout)``, and CPython converts
that timeout to epoll's whole milliseconds rounding *up*: a 50 us deadline (an e1000's
interrupt throttling interval at Linux's default 20,000 interrupts/s) becomes a 1 ms sleep
whenever nothing else wakes the loop first. Device timers are that short (RDTR, RADV, TIDV
and TADV count 1.024 us, ITR 256 ns), so a held interrupt reached the guest up to a
millisecond late.

A timerfd armed with the remaining time has the kernel's high-resolution timer behind it:
it becomes readable on time, epoll returns for it, and the sleeping task is woken with no
deadline handed to trio at all. Sleeps of a second or more keep using ``trio.sleep``, where
a millisecond is noise.

timerfds are kept in a small process-wide pool (a sleeping task holds one; tasks sleeping
at the same time hold one each) so that a timer costs two system calls, not an open and a
close.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from typing import Final

import trio

__all__ = ["COARSE_FROM", "precise_sleep", "timerfd_available"]

log = logging.getLogger("vfio_user_emu")

#: From this length on a sleep uses trio's own deadline (epoll's millisecond is < 0.1%).
COARSE_FROM: Final = 1.0
_KEEP_FREE: Final = 8  # timerfds kept open for reuse; more are closed when released

_CLOCK_MONOTONIC: Final = 1
_TFD_NONBLOCK: Final = os.O_NONBLOCK
_TFD_CLOEXEC: Final = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    create.restype = ctypes.c_int
    settime.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(_Itimerspec),
        ctypes.POINTER(_Itimerspec),
    ]
    settime.restype = ctypes.c_int
    return libc


_libc: Final = _load_libc()
_free: list[int] = []


def timerfd_available() -> bool:
    return _libc is not None


def _settime(fd: int, seconds: float) -> None:
    """Arm ``fd`` to expire once after ``seconds`` (0: disarm)."""
    assert _libc is not None
    nanoseconds = max(int(seconds * 1e9), 1) if seconds > 0 else 0
    spec = _Itimerspec()
    spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(nanoseconds, 1_000_000_000)
    if _libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"timerfd_settime: {os.strerror(code)}")


def _take() -> int | None:
    if _free:
        return _free.pop()
    assert _libc is not None
    fd = int(_libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC))
    if fd < 0:
        log.warning("timerfd_create: %s", os.strerror(ctypes.get_errno()))
        return None
    return fd


def _expired(fd: int) -> bool:
    try:
        return bool(os.read(fd, 8))
    except BlockingIOError:
        return False


def _release(fd: int, *, armed: bool) -> None:
    """Back to the pool disarmed and drained (a cancelled sleep leaves it armed), or
    closed when the pool is full or the fd misbehaves."""
    try:
        if armed:
            _settime(fd, 0)
            _expired(fd)
    except OSError:
        armed = True  # unknown state: do not reuse
    else:
        armed = False
    if not armed and len(_free) < _KEEP_FREE:
        _free.append(fd)
        return
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


async def precise_sleep(seconds: float) -> None:
    """``trio.sleep(seconds)`` woken by a timerfd: on time to the kernel's timer slack,
    not rounded up to epoll's millisecond. Cancellable like ``trio.sleep``."""
    if seconds <= 0:
        await trio.lowlevel.checkpoint()
        return
    fd = _take() if seconds < COARSE_FROM and _libc is not None else None
    if fd is None:
        await trio.sleep(seconds)
        return
    armed = False
    try:
        _settime(fd, seconds)
        armed = True
        while True:
            await trio.lowlevel.wait_readable(fd)
            if _expired(fd):
                armed = False
                return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
        log.warning("timerfd failed (%s): falling back to the event loop's timer", exc)
        await trio.sleep(seconds)
    finally:
        _release(fd, armed=armed)
