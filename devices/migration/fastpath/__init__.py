"""The C fast path for :mod:`devices.migration.primitives` (CRC-32C and its combination,
zero-page bitmaps, page diffs).

The extension ``devices.migration.fastpath._fastpath`` is built by cffi (API mode) when the project
is installed (``setup.py`` / ``build.py``); if it could not be compiled the pure-Python
reference stays in use.  Call :func:`install_best` once at start-up::

    VFIO_USER_EMU_FASTPATH=0        force the Python implementation (also "python")
    VFIO_USER_EMU_FASTPATH=c        ask for C (a warning, then Python, if it is missing)
    unset / empty / "auto" / "1"    C when available, else Python

The compiled module has no type information, so it is imported through importlib and only
used behind the typed wrappers below.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
from typing import Any

from devices.migration import primitives as stream_primitives
from devices.migration.primitives import Buffer, Impl

__all__ = [
    "ENV_VAR",
    "MODULE",
    "hardware_crc",
    "install_best",
    "load",
    "load_error",
    "vmsplice",
    "vmsplice_available",
]

log = logging.getLogger("vfio_user_emu.fastpath")

ENV_VAR = "VFIO_USER_EMU_FASTPATH"
MODULE = "devices.migration.fastpath._fastpath"
_PYTHON_VALUES = frozenset({"0", "python", "py", "off", "no", "false"})
_C_VALUES = frozenset({"c", "on", "yes", "true"})
_AUTO_VALUES = frozenset({"", "1", "auto"})

_module: Any = None
_load_error: str | None = None


def _import() -> Any:
    global _module, _load_error  # noqa: PLW0603 - one import per process
    if _module is None and _load_error is None:
        try:
            _module = importlib.import_module(MODULE)
        except ImportError as exc:
            _load_error = f"{MODULE} is not built ({exc})"
    return _module


def load_error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was not tried)."""
    _import()
    return _load_error


def _make_impl(module: Any) -> Impl:
    ffi = module.ffi
    lib = module.lib

    def _cbuf(data: Buffer) -> Any:
        # Zero-copy pointer into the caller's buffer; only non-contiguous views are copied.
        if isinstance(data, memoryview) and not data.c_contiguous:
            data = data.tobytes()
        return ffi.from_buffer("uint8_t[]", data)

    def crc32c(data: Buffer, crc: int = 0) -> int:
        stream_primitives.check_crc(crc)
        buf = _cbuf(data)
        return int(lib.vfe_crc32c(crc, buf, len(buf)))

    def zero_page_bitmap(data: Buffer, page_size: int) -> bytes:
        stream_primitives.check_page_size(page_size)
        buf = _cbuf(data)
        total = len(buf)
        out = bytearray(stream_primitives.bitmap_len(total, page_size))
        if total:
            # A page larger than the data covers it all; clamping keeps it within size_t.
            page = min(page_size, total)
            lib.vfe_zero_page_bitmap(buf, total, page, ffi.from_buffer("uint8_t[]", out))
        return bytes(out)

    def diff_pages(current: Buffer, previous: Buffer, page_size: int) -> bytes:
        stream_primitives.check_page_size(page_size)
        a, b = _cbuf(current), _cbuf(previous)
        if len(a) != len(b):
            raise ValueError("diff_pages needs two buffers of the same size")
        out = bytearray(stream_primitives.bitmap_len(len(a), page_size))
        if len(a):
            page = min(page_size, len(a))
            lib.vfe_diff_pages(a, b, len(a), page, ffi.from_buffer("uint8_t[]", out))
        return bytes(out)

    def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
        stream_primitives.check_crc(crc1)
        stream_primitives.check_crc(crc2)
        if not 0 <= len2 < 1 << 64:
            raise ValueError(f"length out of range: {len2!r}")
        return int(lib.vfe_crc32c_combine(crc1, crc2, len2))

    return Impl(
        name="c",
        crc32c=crc32c,
        zero_page_bitmap=zero_page_bitmap,
        diff_pages=diff_pages,
        crc32c_combine=crc32c_combine,
    )


def load() -> Impl | None:
    """The C implementation, or None when the extension is not built."""
    module = _import()
    return None if module is None else _make_impl(module)


def vmsplice_available() -> bool:
    """True when :func:`vmsplice` can work (the extension is built, the system is Linux)."""
    global _vmsplice_ok  # noqa: PLW0603 - probed once per process
    if _vmsplice_ok is None:
        _vmsplice_ok = _probe_vmsplice()
    return _vmsplice_ok


def _probe_vmsplice() -> bool:
    if _import() is None:
        return False
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)
        return vmsplice(write_end, _PROBE) == len(_PROBE) and os.read(read_end, 8) == _PROBE
    except OSError:
        return False
    finally:
        os.close(read_end)
        os.close(write_end)


_PROBE = b"vmsplice"
_vmsplice_ok: bool | None = None


def vmsplice(fd: int, data: Buffer) -> int:
    """Hand ``data`` to the (non-blocking) pipe ``fd`` without copying it; returns the
    bytes handed over. The pipe refers to ``data``'s pages until its reader consumed them,
    so they must not change or be freed meanwhile: use it for memory that outlives the
    pipe and stays put (a stopped device's RAM mapping), never for Python objects the
    allocator may reuse. Raises BlockingIOError when the pipe is full, OSError(ENOSYS)
    without the extension or the system call."""
    module = _import()
    if module is None:
        raise OSError(errno.ENOSYS, "vmsplice needs the C fast path")
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("vmsplice needs a contiguous buffer")
    buf = module.ffi.from_buffer("uint8_t[]", view)
    result = int(module.lib.vfe_vmsplice(fd, buf, len(buf)))
    if result < 0:
        raise OSError(-result, os.strerror(-result))
    return result


def hardware_crc() -> bool:
    """True when the extension computes CRC-32C with the SSE4.2 instruction."""
    module = _import()
    return module is not None and bool(module.lib.vfe_crc32c_hw_active())


def _self_test(impl: Impl) -> str | None:
    sample = bytes(range(256)) * 33 + bytes(4096) + b"\x01"
    if impl.crc32c(b"123456789") != stream_primitives.CRC32C_CHECK:
        return "CRC-32C check value mismatch"
    if impl.crc32c(sample) != stream_primitives.crc32c(sample):
        return "CRC-32C disagrees with the Python reference"
    if impl.zero_page_bitmap(sample, 512) != stream_primitives.zero_page_bitmap(sample, 512):
        return "zero-page bitmap disagrees with the Python reference"
    head, tail = sample[:777], sample[777:]
    combined = impl.crc32c_combine(impl.crc32c(head), impl.crc32c(tail), len(tail))
    if combined != stream_primitives.crc32c(sample):
        return "CRC-32C combination disagrees with the Python reference"
    other = sample[:1000] + b"x" + sample[1001:]
    if impl.diff_pages(sample, other, 512) != stream_primitives.diff_pages(sample, other, 512):
        return "page diff disagrees with the Python reference"
    return None


def install_best() -> Impl:
    """Install the fastest working implementation (honouring ``VFIO_USER_EMU_FASTPATH``)."""
    setting = os.environ.get(ENV_VAR, "").strip().lower()
    if setting in _PYTHON_VALUES:
        stream_primitives.use_python()
        log.info("stream primitives: python (forced by %s=%s)", ENV_VAR, setting)
        return stream_primitives.current()
    if setting not in _C_VALUES | _AUTO_VALUES:
        log.warning("ignoring unknown %s=%r (expected 0, python, c or auto)", ENV_VAR, setting)
    impl = load()
    problem = load_error() if impl is None else _self_test(impl)
    if impl is None or problem is not None:
        stream_primitives.use_python()
        # Built but wrong is an error (never use it); not built is worth a warning, since
        # CRC-32C in Python runs at ~15 MB/s (set VFIO_USER_EMU_FASTPATH=python to silence).
        level = logging.ERROR if impl is not None else logging.WARNING
        log.log(level, "stream primitives: python (C fast path unavailable: %s)", problem)
        return stream_primitives.current()
    stream_primitives.install(impl)
    kind = "sse4.2" if hardware_crc() else "software tables"
    log.info("stream primitives: c (CRC-32C via %s)", kind)
    return impl
