"""Keep large freed buffers inside the process (glibc ``malloc`` tuning).

Migration data moves through messages of up to ``max_data_xfer_size`` (1 MiB) bytes, and
each is built, copied and freed in turn. glibc serves blocks of 128 KiB and more with a
fresh ``mmap`` and returns them with ``munmap`` (and trims the heap top above 128 KiB), so
every such copy first page-faults its destination in, 256 faults per MiB. On a virtual
machine a fault costs microseconds: measured here, two 1 MiB copies per message ran at
~1.2 GB/s with the defaults and ~8 GB/s once freed blocks are reused.

:func:`keep_large_buffers` raises the mmap threshold to 4 MiB (messages come from the heap
and are reused) and the trim threshold to 32 MiB (at most that much freed memory is kept
at the heap top). Elsewhere than glibc it does nothing.

The trade-off is resident memory: freed blocks below 4 MiB are no longer handed back to
the kernel, so RSS stays near its high-water mark (plus up to 32 MiB kept at the heap top)
instead of shrinking after a transfer. The setting is process-wide and cannot be undone
per caller, so only the command line applies it, for the commands that move bulk data
(``serve``, ``migrate``, ``bench``), and :func:`emulator.client.migrate.migrate`, through whose
process a whole in-band stream passes. Merely constructing a ``DeviceServer`` (library use,
tests) leaves the host program's allocator alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger("vfio_user_emu")

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20


@functools.cache
def keep_large_buffers() -> bool:
    """Tune malloc once per process; True when it was done (glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    log.debug("malloc keeps freed blocks up to %d bytes: %s", MMAP_THRESHOLD, done)
    return done
