"""Client memory: the DMA map (DMA_MAP/DMA_UNMAP) and the device-facing DMA engine.

A range mapped with an fd is accessed directly: mmapped when the client can no longer shrink
the file (a sealed memfd), else with pread/pwrite on the fd (a file on disk: a shrunk file
then gives a short count instead of the SIGBUS a mapping would raise). A range mapped
without an fd is reached with DMA_READ/DMA_WRITE messages to the client, split at the
client's ``max_data_xfer_size``. Either way every access is checked against the map and its
permissions before a byte moves, and every byte written is told to the dirty-page logging
(which records pages while a client's logging session runs).
"""

from __future__ import annotations

import bisect
import ctypes
import enum
import errno
import fcntl
import logging
import mmap
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from devices.api import DmaFault
from protocol.constants import DmaMapFlags
from protocol.errors import ProtocolError
from protocol.messages import DmaMap

PAGE_SIZE = mmap.PAGESIZE

log = logging.getLogger("vfio_user_emu")


class Access(enum.Enum):
    """How the device reaches one DMA range."""

    MMAP = "mmap"  # an fd the client can no longer shrink
    FILE = "file"  # pread/pwrite on an fd it could shrink (a file on disk)
    MESSAGES = "messages"  # no fd: DMA_READ/DMA_WRITE to the client


@dataclass(eq=False)
class Mapping:
    address: int
    size: int
    readable: bool
    writable: bool
    fd: int | None = None
    file_offset: int = 0
    file_id: tuple[int, int] | None = None  # (st_dev, st_ino), to recognise identical re-maps
    access: Access = field(default=Access.MESSAGES)
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    _skew: int = 0  # bytes between the page-aligned mmap start and file_offset
    _closed: bool = False

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def fd_backed(self) -> bool:
        """Reached directly (mmap or file I/O) rather than with messages to the client."""
        return self.access is not Access.MESSAGES

    @property
    def alive(self) -> bool:
        """False once unmapped: in-flight DMA must not touch it any more (spec)."""
        return not self._closed

    def same_as(self, other: Mapping) -> bool:
        return (
            self.address == other.address
            and self.size == other.size
            and self.readable == other.readable
            and self.writable == other.writable
            and self.file_offset == other.file_offset
            and self.file_id == other.file_id
        )

    def read(self, offset: int, length: int) -> bytes:
        if self._mmap is not None:
            start = self._skew + offset
            return self._mmap[start : start + length]
        assert self.fd is not None
        try:
            data = os.pread(self.fd, length, self.file_offset + offset)
        except OSError as exc:
            raise DmaFault(f"DMA: reading the file of [{self.address:#x}, ...): {exc}") from None
        if len(data) != length:
            raise DmaFault(f"DMA: the file of [{self.address:#x}, {self.end:#x}) was shrunk")
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._mmap is not None:
            start = self._skew + offset
            self._mmap[start : start + len(data)] = data
            return
        assert self.fd is not None
        view = memoryview(data).cast("B")
        at = self.file_offset + offset
        try:
            while view:
                done = os.pwrite(self.fd, view, at)
                view, at = view[done:], at + done
        except OSError as exc:
            raise DmaFault(f"DMA: writing the file of [{self.address:#x}, ...): {exc}") from None

    def close(self) -> None:
        self._closed = True
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def mmap_is_safe(fd: int) -> bool:
    """Can the client no longer shrink the file under our mapping?

    A file shrunk while we map it turns our next access into SIGBUS, which kills the whole
    server: a client must not be able to do that. memfds sealed against shrinking (QEMU's
    ``memory-backend-memfd`` seals by default) are safe; a memfd that still accepts seals is
    sealed against shrinking here (no client needs to shrink guest RAM it mapped); anything
    else (a file on disk, a memfd closed to sealing) is not, and is reached with file I/O.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False  # not a memfd/shmem file
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    if seals & fcntl.F_SEAL_SEAL:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True


def _open_mapping(request: DmaMap, fd: int | None, *, mmap_unsealed: bool = False) -> Mapping:
    readable = bool(request.flags & DmaMapFlags.READ)
    writable = bool(request.flags & DmaMapFlags.WRITE)
    mapping = Mapping(request.address, request.size, readable, writable, fd, request.offset)
    if fd is None:
        return mapping
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise ProtocolError(errno.EINVAL, "DMA_MAP: fd is not a regular file or memfd")
    # Seal first, measure after: a size read before the seal could be undercut by a client
    # shrinking the file in between (SIGBUS on our next access).
    sealed = mmap_unsealed or mmap_is_safe(fd)
    st = os.fstat(fd)
    if st.st_size < request.offset + request.size:
        raise ProtocolError(
            errno.EINVAL,
            f"DMA_MAP: file of {st.st_size:#x} bytes does not cover "
            f"offset {request.offset:#x} + size {request.size:#x}",
        )
    mapping.file_id = (st.st_dev, st.st_ino)
    if not sealed:
        mapping.access = _file_access(fd)
        if mapping.access is Access.MESSAGES:
            os.close(fd)
            mapping.fd = None
        return mapping
    skew = request.offset % PAGE_SIZE
    prot = (mmap.PROT_READ if readable else 0) | (mmap.PROT_WRITE if writable else 0)
    try:
        mapping._mmap = mmap.mmap(
            fd, skew + request.size, mmap.MAP_SHARED, prot, offset=request.offset - skew
        )
    except OSError as exc:
        raise ProtocolError(exc.errno or errno.EINVAL, f"DMA_MAP: mmap failed: {exc}") from None
    except (OverflowError, ValueError) as exc:
        raise ProtocolError(errno.EINVAL, f"DMA_MAP: cannot map: {exc}") from None
    mapping._skew = skew
    mapping.access = Access.MMAP
    return mapping


_FUSE_SUPER_MAGIC = 0x65735546
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


_HUGETLBFS_MAGIC = 0x958458F6


def _file_access(fd: int) -> Access:
    """How to reach a file the client could shrink: pread/pwrite, except where that cannot
    work. FUSE: I/O waits for whoever serves that file system, which may be the client
    itself, and the server must never wait on a client (refused). hugetlbfs has no write():
    reached with messages, as without an fd."""
    kind = _filesystem_type(fd)
    if kind == _FUSE_SUPER_MAGIC:
        raise ProtocolError(errno.EINVAL, "DMA_MAP: fd is on a FUSE file system")
    if kind == _HUGETLBFS_MAGIC:
        _warn_once(
            "DMA_MAP: a hugetlbfs fd cannot be sealed nor written with pwrite, so the device "
            "reaches it with DMA_READ/DMA_WRITE messages (slow); --dma-mmap-unsealed mmaps it "
            "for a trusted client"
        )
        return Access.MESSAGES
    return Access.FILE


def _filesystem_type(fd: int) -> int | None:
    # struct statfs begins with f_type (a long on the 64-bit Linux ABIs); the rest is not
    # needed, 256 bytes cover the whole struct.
    buffer = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buffer) != 0:
        return None
    return int.from_bytes(buffer.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder)


_libc = ctypes.CDLL(None, use_errno=True)


class IovaMap:
    """The client's IOVA ranges, sorted and non-overlapping."""

    def __init__(self, max_maps: int, *, mmap_unsealed: bool = False) -> None:
        self.max_maps = max_maps
        #: mmap fds the client could still shrink (SIGBUS risk; only for trusted clients).
        self.mmap_unsealed = mmap_unsealed
        self._starts: list[int] = []
        self._maps: list[Mapping] = []
        self._slots: list[Mapping | None] = []  # DMA_MAP order, freed slots reused

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self) -> Iterator[Mapping]:
        return iter(list(self._maps))

    def add(self, request: DmaMap, fd: int | None) -> None:
        """Map a range; takes ownership of ``fd`` on success (and closes it on failure)."""
        try:
            mapping = _open_mapping(request, fd, mmap_unsealed=self.mmap_unsealed)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        existing = self._overlapping(mapping.address, mapping.end)
        if existing:
            mapping.close()
            if len(existing) == 1 and existing[0].same_as(mapping):
                return  # an identical re-map is harmless (QEMU resends them)
            raise ProtocolError(
                errno.EEXIST, f"DMA_MAP: [{mapping.address:#x}, {mapping.end:#x}) overlaps"
            )
        if len(self._maps) >= self.max_maps:
            mapping.close()
            raise ProtocolError(errno.ENOSPC, f"DMA_MAP: already {self.max_maps} maps")
        at = bisect.bisect_left(self._starts, mapping.address)
        self._starts.insert(at, mapping.address)
        self._maps.insert(at, mapping)
        if None in self._slots:
            self._slots[self._slots.index(None)] = mapping
        else:
            self._slots.append(mapping)

    def remove(self, address: int, size: int) -> Mapping:
        at = bisect.bisect_left(self._starts, address)
        if at == len(self._maps) or self._starts[at] != address or self._maps[at].size != size:
            raise ProtocolError(
                errno.ENOENT, f"DMA_UNMAP: no mapping is exactly [{address:#x}, +{size:#x})"
            )
        del self._starts[at]
        mapping = self._maps.pop(at)
        self._slots[self._slots.index(mapping)] = None
        mapping.close()
        return mapping

    def clear(self) -> None:
        for mapping in self._maps:
            mapping.close()
        self._starts.clear()
        self._maps.clear()
        self._slots.clear()

    def slots(self) -> list[tuple[int, int] | None]:
        return [None if m is None else (m.address, m.size) for m in self._slots]

    def _overlapping(self, start: int, end: int) -> list[Mapping]:
        at = max(bisect.bisect_right(self._starts, start) - 1, 0)
        found = []
        for mapping in self._maps[at:]:
            if mapping.address >= end:
                break
            if mapping.end > start:
                found.append(mapping)
        return found

    def segments(self, iova: int, length: int, *, write: bool) -> list[tuple[Mapping, int, int]]:
        """(mapping, offset in mapping, length) covering ``[iova, iova+length)`` exactly.

        Raises :class:`DmaFault` if any byte is unmapped or the access is not permitted, so
        nothing is transferred unless everything may be.
        """
        if length < 0 or iova < 0 or iova + length > 1 << 64:
            raise DmaFault(f"DMA: bad range [{iova:#x}, +{length:#x})")
        out: list[tuple[Mapping, int, int]] = []
        pos = iova
        end = iova + length
        at = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if (
                at < 0
                or at >= len(self._maps)
                or not (self._maps[at].address <= pos < self._maps[at].end)
            ):
                raise DmaFault(f"DMA: {pos:#x} is not mapped")
            mapping = self._maps[at]
            if write and not mapping.writable:
                raise DmaFault(f"DMA: write to read-only mapping at {mapping.address:#x}")
            if not write and not mapping.readable:
                raise DmaFault(f"DMA: read from write-only mapping at {mapping.address:#x}")
            chunk = min(end, mapping.end) - pos
            out.append((mapping, pos - mapping.address, chunk))
            pos += chunk
            at += 1
        return out


class MessageChannel(Protocol):
    """Server-to-client DMA messages, provided by the connection."""

    max_transfer: int

    async def checkpoint(self) -> None:
        """Let other tasks run between segments of a long transfer."""
        ...

    async def dma_read(self, address: int, count: int) -> bytes: ...

    async def dma_write(self, address: int, data: bytes) -> None: ...


class DirtyLog:
    """Where the device's writes to guest memory are told: ``sink``, the connection's
    dirty-page logging, which keeps pages only while a client's logging session runs.

    It keeps nothing itself. (It used to also collect every page ever written in a set that
    nothing read: a connection's memory then grew with each guest page its device touched,
    up to the size of guest RAM.)"""

    def __init__(self) -> None:
        #: Told of every write: the client's dirty-logging session, when started.
        self.sink: Callable[[int, int], None] | None = None

    def record(self, iova: int, length: int) -> None:
        if self.sink is not None:
            self.sink(iova, length)


class DmaEngine:
    """The :class:`devices.api.Dma` a device uses, bound to one client connection."""

    def __init__(
        self,
        maps: IovaMap,
        channel: MessageChannel,
        dirty: DirtyLog,
        bus_master: Callable[[], bool] = lambda: True,
    ) -> None:
        self.maps = maps
        self.channel = channel
        self.dirty = dirty
        self.enabled = True
        #: Whether the guest lets the function master the bus (PCI command register bit 2).
        self.bus_master = bus_master

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise DmaFault("DMA is disabled (device reset, stopped or client gone)")
        if not self.bus_master():
            raise DmaFault("DMA while bus mastering is disabled (PCI command register)")

    def _check_live(self, mapping: Mapping) -> None:
        # Messages await the client, during which the client may unmap or reset; never
        # touch a range after its unmap was answered.
        self._check_enabled()
        if not mapping.alive:
            raise DmaFault(f"DMA: [{mapping.address:#x}, {mapping.end:#x}) was unmapped")

    async def read(self, iova: int, length: int) -> bytes:
        return await self._read(iova, length, mmap_allowed=True)

    async def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        await self._write(iova, data, mmap_allowed=True)

    def regions(self) -> list[tuple[int, int] | None]:
        return self.maps.slots()

    async def message_read(self, iova: int, length: int) -> bytes:
        return await self._read(iova, length, mmap_allowed=False)

    async def message_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        await self._write(iova, data, mmap_allowed=False)

    async def _read(self, iova: int, length: int, *, mmap_allowed: bool) -> bytes:
        self._check_enabled()
        parts = []
        for mapping, offset, chunk in self.maps.segments(iova, length, write=False):
            if mapping.fd_backed and mmap_allowed:
                self._check_live(mapping)
                parts.append(mapping.read(offset, chunk))
                await self.channel.checkpoint()
                continue
            address = mapping.address + offset
            received = bytearray()  # one buffer, however many messages the client needs
            for start, count in self._pieces(chunk):
                self._check_live(mapping)
                received += await self.channel.dma_read(address + start, count)
            parts.append(bytes(received))
        return b"".join(parts)

    async def _write(
        self, iova: int, data: bytes | bytearray | memoryview, *, mmap_allowed: bool
    ) -> None:
        self._check_enabled()
        view = memoryview(data).cast("B")
        pos = 0
        for mapping, offset, chunk in self.maps.segments(iova, len(view), write=True):
            address = mapping.address + offset
            if mapping.fd_backed and mmap_allowed:
                self._check_live(mapping)
                mapping.write(offset, view[pos : pos + chunk])
                self.dirty.record(address, chunk)
                await self.channel.checkpoint()
            else:
                for start, count in self._pieces(chunk):
                    self._check_live(mapping)
                    piece = bytes(view[pos + start : pos + start + count])
                    await self.channel.dma_write(address + start, piece)
                    self.dirty.record(address + start, count)  # DMA_WRITEs we send count too
            pos += chunk

    def _pieces(self, length: int) -> Iterator[tuple[int, int]]:
        """(start, count) messages for ``length`` bytes, split at the client's transfer size
        (generated: a client announcing a tiny transfer size costs messages, not memory)."""
        step = self.channel.max_transfer
        for start in range(0, length, step):
            yield start, min(step, length - start)

    async def read_sg(self, segments: list[tuple[int, int]]) -> bytes:
        """Gather ``(iova, length)`` segments; all are checked before any is read. When
        every segment is mmapped the copies run back to back with one checkpoint at the
        end (a ring of small buffers is not worth a trip through the scheduler each)."""
        self._check_enabled()
        plan = [self.maps.segments(iova, length, write=False) for iova, length in segments]
        if not all(mapping.fd_backed for pieces in plan for mapping, _, _ in pieces):
            return b"".join([await self.read(iova, length) for iova, length in segments])
        parts = []
        for pieces in plan:
            for mapping, offset, chunk in pieces:
                self._check_live(mapping)
                parts.append(mapping.read(offset, chunk))
        await self.channel.checkpoint()
        return b"".join(parts)

    async def write_sg(
        self, segments: list[tuple[int, int]], data: bytes | bytearray | memoryview
    ) -> None:
        """Scatter ``data`` over ``(iova, length)`` segments; all are checked first (and,
        all mmapped, written back to back with one checkpoint at the end, as read_sg)."""
        view = memoryview(data).cast("B")
        if sum(length for _, length in segments) != len(view):
            raise DmaFault("DMA: scatter list and data differ in length")
        self._check_enabled()
        plan = [self.maps.segments(iova, length, write=True) for iova, length in segments]
        pos = 0
        if not all(mapping.fd_backed for pieces in plan for mapping, _, _ in pieces):
            for iova, length in segments:
                await self.write(iova, view[pos : pos + length])
                pos += length
            return
        for pieces in plan:
            for mapping, offset, chunk in pieces:
                self._check_live(mapping)
                mapping.write(offset, view[pos : pos + chunk])
                self.dirty.record(mapping.address + offset, chunk)
                pos += chunk
        await self.channel.checkpoint()
