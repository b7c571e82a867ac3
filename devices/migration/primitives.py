"""Byte-stream primitives for the migration stream: CRC-32C, zero-page maps, page elision.

This module is the pure-Python *reference* implementation.  The runtime may install a
faster implementation with the same behaviour (``devices.migration.fastpath`` provides a C one);
code that wants the fastest available primitive calls ``current().crc32c(...)`` /
``current().zero_page_bitmap(...)``, while the module-level functions :func:`crc32c` and
:func:`zero_page_bitmap` are always the Python reference.

CRC-32C is the Castagnoli CRC (polynomial 0x1EDC6F41, reflected 0x82F63B78) with the usual
initial value and final XOR of 0xFFFFFFFF: ``crc32c(b"123456789") == 0xE3069283`` and
``crc32c(b, crc32c(a)) == crc32c(a + b)``.

Elided page encoding (little-endian), produced by :func:`pack_pages`::

    page_size   u32    power of two, 512 B .. 1 MiB
    total_len   u64    length of the original data
    bitmap      ceil(pages / 8) bytes; page k is bit k % 8 of byte k // 8 (LSB first),
                set when the page is all zero; the unused high bits of the last byte are 0
    pages       the non-zero pages, concatenated in order; the last page is
                total_len - (pages - 1) * page_size bytes long (it may be partial)

where ``pages = ceil(total_len / page_size)``.  No imports from the runtime (no trio).
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

Buffer = bytes | bytearray | memoryview

CRC32C_POLY = 0x1EDC6F41
CRC32C_POLY_REFLECTED = 0x82F63B78
CRC32C_CHECK = 0xE3069283  # crc32c(b"123456789")

PAGES_HEADER = struct.Struct("<IQ")  # page_size, total_len
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
_MASK32 = 0xFFFFFFFF
_ZERO_CHUNK = 1 << 20  # largest zero block allocated at once when clearing a destination


class Crc32cFunction(Protocol):
    def __call__(self, data: Buffer, crc: int = 0) -> int: ...


class ZeroPageBitmapFunction(Protocol):
    def __call__(self, data: Buffer, page_size: int) -> bytes: ...


class DiffPagesFunction(Protocol):
    def __call__(self, current: Buffer, previous: Buffer, page_size: int) -> bytes: ...


class Crc32cCombineFunction(Protocol):
    def __call__(self, crc1: int, crc2: int, len2: int) -> int: ...


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32C polynomial, both in the reflected representation."""
    product = 0
    bit = 0x80000000  # x^0
    while a and bit:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ CRC32C_POLY_REFLECTED if b & 1 else b >> 1
    return product


@functools.lru_cache(maxsize=256)
def _x_pow_8n(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: what appending ``nbytes`` zero bytes does."""
    result, square, exponent = 0x80000000, 0x40000000, nbytes * 8
    while exponent:
        if exponent & 1:
            result = _multmodp(square, result)
        square = _multmodp(square, square)
        exponent >>= 1
    return result


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """``crc32c(a + b)`` from ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``, without the bytes:
    a stream checksum follows from its sections' checksums, so each byte is read once."""
    check_crc(crc1)
    check_crc(crc2)
    if len2 < 0:
        raise ValueError(f"length must not be negative, not {len2!r}")
    return _multmodp(_x_pow_8n(len2), crc1) ^ crc2


@dataclass(frozen=True, slots=True)
class Impl:
    """One implementation of the primitives (``name`` is "python" or "c")."""

    name: str
    crc32c: Crc32cFunction
    zero_page_bitmap: ZeroPageBitmapFunction
    diff_pages: DiffPagesFunction
    #: Has a default so that implementations written before it existed still build.
    crc32c_combine: Crc32cCombineFunction = crc32c_combine


def byte_view(data: Buffer) -> memoryview:
    """A flat, C-contiguous, unsigned-byte view of ``data`` (copies only if not contiguous)."""
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def check_crc(crc: int) -> int:
    if not 0 <= crc <= _MASK32:
        raise ValueError(f"CRC value out of range: {crc!r}")
    return crc


def check_page_size(page_size: int) -> int:
    """Any positive page size is allowed for bitmaps; see :func:`check_stream_page_size`."""
    if page_size <= 0:
        raise ValueError(f"page size must be positive, not {page_size!r}")
    return page_size


def check_stream_page_size(page_size: int) -> int:
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(
            f"page size must be a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}, "
            f"not {page_size!r}"
        )
    return page_size


def page_count(total_len: int, page_size: int) -> int:
    return -(-total_len // page_size)


def bitmap_len(total_len: int, page_size: int) -> int:
    return (page_count(total_len, page_size) + 7) // 8


# --------------------------------------------------------------------------- CRC-32C


def _make_tables() -> tuple[tuple[int, ...], ...]:
    first = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ CRC32C_POLY_REFLECTED if crc & 1 else crc >> 1
        first.append(crc)
    tables = [first]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(value >> 8) ^ first[value & 0xFF] for value in prev])
    return tuple(tuple(table) for table in tables)


_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7 = _make_tables()
_WORDS = struct.Struct("<II")


def crc32c(data: Buffer, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing from the finished CRC ``crc`` (0 to start)."""
    view = byte_view(data)
    raw = check_crc(crc) ^ _MASK32
    t0, t1, t2, t3, t4, t5, t6, t7 = _T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7
    bulk = len(view) & ~7
    if bulk:
        # Slicing-by-8: one iteration folds eight bytes through eight tables.
        for word, hi in _WORDS.iter_unpack(view[:bulk]):
            lo = word ^ raw
            raw = (
                t7[lo & 0xFF]
                ^ t6[(lo >> 8) & 0xFF]
                ^ t5[(lo >> 16) & 0xFF]
                ^ t4[lo >> 24]
                ^ t3[hi & 0xFF]
                ^ t2[(hi >> 8) & 0xFF]
                ^ t1[(hi >> 16) & 0xFF]
                ^ t0[hi >> 24]
            )
    for byte in view[bulk:]:
        raw = t0[(raw ^ byte) & 0xFF] ^ (raw >> 8)
    return raw ^ _MASK32


# --------------------------------------------------------------------------- zero pages


def zero_page_bitmap(data: Buffer, page_size: int) -> bytes:
    """One bit per page (LSB first), set when the page is all zero; the last may be partial."""
    check_page_size(page_size)
    view = byte_view(data)
    total = len(view)
    pages = page_count(total, page_size)
    out = bytearray((pages + 7) // 8)
    if not pages:
        return bytes(out)
    zero = bytes(min(page_size, total))
    for page in range(pages):
        start = page * page_size
        chunk = view[start : start + page_size]
        # bytes(...) == bytes is a memcpy + memcmp: far faster than comparing memoryviews.
        if bytes(chunk) == (zero if len(chunk) == len(zero) else bytes(len(chunk))):
            out[page >> 3] |= 1 << (page & 7)
    return bytes(out)


def diff_pages(current: Buffer, previous: Buffer, page_size: int) -> bytes:
    """One bit per page (LSB first), set when the page differs between the two buffers."""
    check_page_size(page_size)
    a, b = byte_view(current), byte_view(previous)
    if len(a) != len(b):
        raise ValueError("diff_pages needs two buffers of the same size")
    pages = page_count(len(a), page_size)
    out = bytearray((pages + 7) // 8)
    block = max(page_size, 1 << 20)
    for base in range(0, len(a), block):
        # Compare a large block first (bytes == bytes is a memcmp); look at its pages only
        # when it differs.
        if bytes(a[base : base + block]) == bytes(b[base : base + block]):
            continue
        for start in range(base, min(base + block, len(a)), page_size):
            end = start + page_size
            if bytes(a[start:end]) != bytes(b[start:end]):
                page = start // page_size
                out[page >> 3] |= 1 << (page & 7)
    return bytes(out)


# --------------------------------------------------------------------------- implementations

IMPL = Impl(
    name="python",
    crc32c=crc32c,
    zero_page_bitmap=zero_page_bitmap,
    diff_pages=diff_pages,
    crc32c_combine=crc32c_combine,
)
#: Alias of :data:`IMPL`, the pure-Python reference.
PYTHON = IMPL
_current: Impl = IMPL


def current() -> Impl:
    """The implementation everything should call (Python unless a faster one is installed)."""
    return _current


def install(impl: Impl) -> Impl:
    """Make ``impl`` the current implementation; returns the previous one."""
    global _current
    previous, _current = _current, impl
    return previous


def use_python() -> Impl:
    """Force the pure-Python reference implementation; returns the previous one."""
    return install(IMPL)


# --------------------------------------------------------------------------- page elision


def _runs(bitmap: Buffer, pages: int) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs ``(first_page, end_page, is_zero)`` of the bitmap's first ``pages`` bits."""
    if not pages:
        return
    start, page = 0, 0
    state = bool(bitmap[0] & 1)
    while page < pages:
        byte = bitmap[page >> 3]
        if not page & 7 and page + 8 <= pages and byte == (0xFF if state else 0):
            page += 8  # eight pages continuing the current run
            continue
        bit = bool((byte >> (page & 7)) & 1)
        if bit != state:
            yield start, page, state
            start, state = page, bit
        page += 1
    yield start, pages, state


_SET_BYTES = re.compile(rb"[^\x00]+")


def set_runs(bitmap: Buffer, pages: int) -> list[tuple[int, int]]:
    """Maximal runs ``(first_page, end_page)`` of the set bits among the bitmap's first
    ``pages`` bits. Clear stretches are skipped by a regular expression (at C speed), so a
    bitmap with a few set bits costs next to nothing however many pages it covers: the
    stop-copy phase of a large device looks for changed pages while the VM is stopped."""
    data = bytes(byte_view(bitmap)[: (pages + 7) // 8])
    runs: list[tuple[int, int]] = []
    for match in _SET_BYTES.finditer(data):
        base = match.start() * 8
        width = min(len(match.group()) * 8, pages - base)
        for first, end, is_set in _runs(match.group(), width):
            if not is_set:
                continue
            if runs and runs[-1][1] == base + first:  # continues across two matches
                runs[-1] = (runs[-1][0], base + end)
            else:
                runs.append((base + first, base + end))
    return runs


def pack_pages(data: Buffer, page_size: int) -> list[bytes | memoryview]:
    """Encode ``data`` with its all-zero pages elided.

    Returns the pieces to send in order: header + bitmap (``bytes``), then views of the
    non-zero pages (adjacent non-zero pages share one view).  Nothing is copied, so ``data``
    must not change until the pieces have been consumed; ``b"".join(pieces)`` is the payload.
    """
    check_stream_page_size(page_size)
    view = byte_view(data)
    total = len(view)
    bitmap = current().zero_page_bitmap(view, page_size)
    pieces: list[bytes | memoryview] = [PAGES_HEADER.pack(page_size, total) + bitmap]
    for first, end, is_zero in _runs(bitmap, page_count(total, page_size)):
        if not is_zero:
            pieces.append(view[first * page_size : min(end * page_size, total)])
    return pieces


def _parse_header(view: memoryview, max_total: int) -> tuple[int, int, int]:
    """``(page_size, total_len, pages)`` of a payload's header, checked."""
    page_size, total = PAGES_HEADER.unpack_from(view)
    check_stream_page_size(page_size)
    if total > max_total:
        raise ValueError(f"page payload claims {total} bytes, more than the {max_total} allowed")
    return page_size, total, page_count(total, page_size)


def _check_body_length(bitmap: memoryview, page_size: int, total: int, body_len: int) -> None:
    """The bitmap has no stray bits, and the body holds exactly the pages it leaves."""
    pages = page_count(total, page_size)
    if pages % 8 and bitmap[-1] >> (pages % 8):
        raise ValueError("page bitmap has bits set beyond the last page")
    zero_pages = int.from_bytes(bitmap, "little").bit_count()
    expected = (pages - zero_pages) * page_size
    last = total - (pages - 1) * page_size if pages else 0
    if pages and not (bitmap[(pages - 1) >> 3] >> ((pages - 1) & 7)) & 1:
        expected -= page_size - last  # the last page is sent and may be partial
    if body_len != expected:
        raise ValueError(f"page payload carries {body_len} bytes of pages, expected {expected}")


def check_pages(payload: Buffer, max_total: int) -> int:
    """Validate an elided-pages payload without writing anything; returns its length."""
    view = byte_view(payload)
    if len(view) < PAGES_HEADER.size:
        raise ValueError(f"page payload of {len(view)} bytes is shorter than its header")
    page_size, total, pages = _parse_header(view, max_total)
    bitmap_end = PAGES_HEADER.size + (pages + 7) // 8
    if len(view) < bitmap_end:
        raise ValueError("page payload is truncated inside its bitmap")
    _check_body_length(
        view[PAGES_HEADER.size : bitmap_end], page_size, total, len(view) - bitmap_end
    )
    return int(total)


def unpack_pages(payload: Buffer, max_total: int) -> bytearray:
    """Rebuild the data encoded by :func:`pack_pages`.

    The payload is treated as hostile: the header, bitmap and length are validated before
    anything is allocated (at most ``max_total`` bytes), and any defect raises
    :class:`ValueError` (and nothing else).
    """
    out = bytearray(check_pages(payload, max_total))
    _unpack(byte_view(payload), memoryview(out))
    return out


def unpack_pages_into(payload: Buffer, dest: memoryview) -> None:
    """Rebuild the encoded data into ``dest``, which must be exactly ``total_len`` bytes.

    Everything is validated before the first byte is written, so on :class:`ValueError`
    ``dest`` is unchanged.  ``dest`` must not overlap ``payload``.
    """
    if dest.readonly:
        raise ValueError("destination buffer is read-only")
    if not dest.c_contiguous:
        raise ValueError("destination buffer must be C-contiguous")
    target = byte_view(dest)
    total = check_pages(payload, len(target))
    if total != len(target):
        raise ValueError(f"page payload holds {total} bytes, destination is {len(target)}")
    _unpack(byte_view(payload), target)


def fill_zero(view: memoryview) -> None:
    """Zero ``view`` without a temporary as large as it (RAM may be gigabytes)."""
    zero = bytes(min(_ZERO_CHUNK, len(view)))
    for at in range(0, len(view), _ZERO_CHUNK):
        size = min(_ZERO_CHUNK, len(view) - at)
        view[at : at + size] = zero[:size]


def _unpack(payload: memoryview, dest: memoryview) -> None:
    """A whole payload (validated already) through the receiver, into a plain buffer."""
    receiver = PagesReceiver(len(payload), len(dest), _BufferPages(dest))
    receiver.feed(payload)
    receiver.finish()


class _BufferPages:
    """A :class:`PageSink` writing straight into a buffer (nothing to take back)."""

    def __init__(self, dest: memoryview) -> None:
        self.dest = dest

    def write(self, offset: int, data: memoryview) -> None:
        self.dest[offset : offset + len(data)] = data

    def clear(self, offset: int, count: int) -> None:
        fill_zero(self.dest[offset : offset + count])

    def prepare(self, offset: int, count: int) -> memoryview:
        return self.dest[offset : offset + count]


class PageSink(Protocol):
    """Where :class:`PagesReceiver` puts data: offsets are from the start of the data."""

    def write(self, offset: int, data: memoryview) -> None: ...

    def clear(self, offset: int, count: int) -> None: ...

    def prepare(self, offset: int, count: int) -> memoryview:
        """The memory ``count`` bytes at ``offset`` will be read into (by the caller)."""
        ...


class PagesReceiver:
    """:func:`unpack_pages_into` for a payload that arrives in pieces: the payload (of a
    known ``length``) is checked as soon as its header and bitmap are in, exactly as
    :func:`check_pages` does, before anything is written; then the zero pages are cleared
    and each non-zero page is written where it belongs as its bytes arrive. Any defect
    raises :class:`ValueError`."""

    def __init__(self, length: int, max_total: int, sink: PageSink) -> None:
        self._length = length
        self._max_total = max_total
        self._sink = sink
        self._head = bytearray()
        self._need = PAGES_HEADER.size  # header bytes, then header + bitmap bytes
        self._page_size = 0
        self.total_len = 0
        self._runs: list[tuple[int, int]] = []  # non-zero byte ranges still to fill, reversed
        self._received = 0
        self._window = memoryview(b"")  # prepared by the sink for reads in place
        self._window_start = 0

    @classmethod
    def raw(cls, length: int, sink: PageSink) -> PagesReceiver:
        """A receiver for ``length`` bytes of plain data (no header, no elided page): one
        run that covers it all."""
        receiver = cls(length, length, sink)
        receiver._need = 0
        receiver.total_len = length
        receiver._runs = [(0, length)] if length else []
        return receiver

    def feed(self, data: Buffer) -> None:
        view = byte_view(data)
        if self._received + len(view) > self._length:
            raise ValueError(f"page payload longer than the {self._length} bytes announced")
        self._received += len(view)
        if self._need:
            view = self._take_head(view)
        while view:
            start, stop = self._runs[-1]
            piece = view[: stop - start]
            self._sink.write(start, piece)
            view = view[len(piece) :]
            if start + len(piece) == stop:
                self._runs.pop()
            else:
                self._runs[-1] = (start + len(piece), stop)

    def target(self, limit: int) -> memoryview | None:
        """Where the next payload bytes (at most ``limit``) belong, for the caller to read
        them straight into (then :meth:`landed`); None before the header and bitmap are in
        (or past the end): use :meth:`feed`."""
        if self._need or not self._runs:
            return None
        start, stop = self._runs[-1]
        window, at = self._window, start - self._window_start
        if not 0 <= at < len(window):  # prepared once, though it may be filled in steps
            window = self._window = self._sink.prepare(start, min(stop - start, limit))
            self._window_start, at = start, 0
        return window[at : at + limit]

    def landed(self, count: int) -> None:
        """``count`` bytes were read into the last :meth:`target`."""
        self._received += count
        start, stop = self._runs[-1]
        if start + count == stop:
            self._runs.pop()
        else:
            self._runs[-1] = (start + count, stop)

    def finish(self) -> int:
        """Checks that the whole payload arrived; returns the data's length."""
        if self._received != self._length or self._need:
            raise ValueError(f"page payload of {self._received} bytes is truncated")
        return self.total_len

    def _take_head(self, view: memoryview) -> memoryview:
        take = min(self._need - len(self._head), len(view))
        self._head += view[:take]
        view = view[take:]
        if len(self._head) < self._need:
            return view
        if self._need == PAGES_HEADER.size:
            self._page_size, self.total_len, pages = _parse_header(
                memoryview(self._head), self._max_total
            )
            self._need += (pages + 7) // 8
            if self._length < self._need:
                raise ValueError("page payload is truncated inside its bitmap")
            return self._take_head(view) if self._need > len(self._head) else self._begin(view)
        return self._begin(view)

    def _begin(self, view: memoryview) -> memoryview:
        """Header and bitmap are in: check the body's length, clear the zero pages."""
        bitmap = memoryview(self._head)[PAGES_HEADER.size :]
        size, total = self._page_size, self.total_len
        _check_body_length(bitmap, size, total, self._length - self._need)
        self._need = 0
        for first, end, is_zero in _runs(bitmap, page_count(total, size)):
            start, stop = first * size, min(end * size, total)
            if is_zero:
                self._sink.clear(start, stop - start)
            else:
                self._runs.append((start, stop))
        self._runs.reverse()
        return view
