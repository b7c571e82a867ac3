"""Turn a byte stream (with the fds that rode along) into whole messages.

The kernel delivers SCM_RIGHTS fds with the ``recvmsg`` that carries the first byte of the
``sendmsg`` they were attached to, and a stream ``recvmsg`` stops right after such a
segment. So the fds of a chunk belong to the *last* message that starts inside that chunk
(or, when none starts there, to the message in progress). A message spanning stream offsets
``[start, end)`` therefore claims the fds of every chunk ``[cs, ce)`` with
``start < ce <= end``.

A message whose declared size exceeds the limit is not buffered: its header is reported as
:class:`Oversized` at once (so the server can answer E2BIG/EINVAL) and its payload bytes are
discarded as they arrive. A declared size below the header size is fatal framing damage.

Bulk payloads (migration data) can be received in place: the framer's owner passes a
``place`` callback, which is asked, for every message of at least ``IN_PLACE_MIN`` payload
bytes that is still incomplete when its header is parsed, for a buffer of exactly that
payload's size (or None: buffered as usual). The payload bytes already buffered are copied
there once; :meth:`MessageFramer.receive_buffer` then hands out the rest of that buffer for
the runtime to ``recv_into`` (``recvmsg_into``), so the rest of the payload is never held in
a Python object of its own, and :meth:`MessageFramer.received` records what arrived.
Bytes given to :meth:`MessageFramer.feed` meanwhile land in the same place. The message
comes out as an :class:`InPlaceMessage` whose payload is a view of that buffer.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .constants import HEADER_SIZE
from .errors import ProtocolError
from .header import HEADER, Header

#: Payloads larger than this are copied out of the buffer through a memoryview (one copy;
#: migration data moves in such messages); smaller ones by slicing, which costs less there.
COPY_ONCE_ABOVE = 64 * 1024
#: Smallest payload worth receiving in place: below it, a message usually arrives whole in
#: one receive anyway.
IN_PLACE_MIN = 64 * 1024


@dataclass(slots=True)
class Message:
    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)


@dataclass(slots=True)
class InPlaceMessage:
    """A message whose payload was received into the buffer its ``place`` callback gave:
    ``payload`` is a view of that buffer. An owner that lends the same buffer again must be
    done with it before it takes the next message (which may start in that buffer)."""

    header: Header
    payload: memoryview
    fds: list[int] = field(default_factory=list)


#: Given the header of a large incomplete message, a writable buffer of exactly its payload
#: size to receive the payload into, or None to buffer it as usual.
PlaceFor = Callable[[Header], memoryview | None]


@dataclass(slots=True)
class _InPlace:
    header: Header
    target: memoryview
    filled: int
    end: int  # absolute stream offset just past the message


#: An oversized message's payload is skipped, so the connection can go on, only up to this
#: many times the size limit (and at least SKIP_LIMIT_MIN bytes). A larger claim (a header
#: saying 0xfffffff0 bytes and no body, say) would have us wait for gigabytes that may never
#: come: it is refused, and the connection ends.
SKIP_LIMIT_FACTOR = 4
SKIP_LIMIT_MIN = 1 << 20


def skip_limit(max_message_size: int) -> int:
    """The largest oversized message whose payload is skipped rather than ending the
    connection."""
    return max(SKIP_LIMIT_FACTOR * max_message_size, SKIP_LIMIT_MIN)


@dataclass(slots=True)
class Oversized:
    """A message larger than the limit; its payload is being skipped (``skipped``) or,
    past the skip limit, the stream ends here."""

    header: Header
    fds: list[int] = field(default_factory=list)
    skipped: bool = True


@dataclass(slots=True)
class _FdMark:
    chunk_end: int  # absolute stream offset just past the chunk that carried the fds
    fds: list[int]


class MessageFramer:
    def __init__(self, max_message_size: int, place: PlaceFor | None = None) -> None:
        if max_message_size < HEADER_SIZE:
            raise ValueError("max_message_size below the header size")
        self.max_message_size = max_message_size
        self._place = place
        self._in_place: _InPlace | None = None  # the message being received in place
        self._buf = bytearray()
        self._buf_start = 0  # absolute stream offset of self._buf[0]
        self._fed = 0  # absolute stream offset just past everything fed
        self._marks: deque[_FdMark] = deque()
        self._discard_left = 0
        self._orphans: list[int] = []

    # -- input ---------------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        self._fed += len(data)
        if fds:
            self._marks.append(_FdMark(self._fed, list(fds)))
        if self._in_place is not None:
            data = self._fill_in_place(data)
        if self._discard_left:
            skipped = min(self._discard_left, len(data))
            self._discard_left -= skipped
            self._buf_start += skipped
            data = data[skipped:]
            if not self._discard_left:
                self._orphans.extend(self._claim(self._buf_start))
        self._buf += data

    def receive_buffer(self) -> memoryview | None:
        """Where the next bytes of the stream go when a payload is being received in place
        (exactly the part still missing, so no byte of the next message lands there), else
        None. Report what was written with :meth:`received`."""
        placed = self._in_place
        if placed is None or placed.filled == len(placed.target):
            return None
        return placed.target[placed.filled :]

    def received(self, count: int, fds: list[int] | None = None) -> None:
        """``count`` bytes were written at the start of :meth:`receive_buffer` (with the fds
        that came along)."""
        placed = self._in_place
        if placed is None or count > len(placed.target) - placed.filled:
            raise ValueError(f"{count} bytes received beyond the in-place payload")
        self._fed += count
        if fds:
            self._marks.append(_FdMark(self._fed, list(fds)))
        placed.filled += count
        self._buf_start += count

    def _fill_in_place(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Copy fed bytes into the payload received in place; returns the rest."""
        placed = self._in_place
        assert placed is not None
        view = memoryview(data)
        take = min(len(view), len(placed.target) - placed.filled)
        placed.target[placed.filled : placed.filled + take] = view[:take]
        placed.filled += take
        self._buf_start += take
        return view[take:]

    def _start_in_place(self, header: Header, start: int) -> None:
        """Move the incomplete message at the front of the buffer to the place its owner
        gives for it, if it gives one."""
        assert self._place is not None
        target = self._place(header)
        if target is None:
            return
        if len(target) != header.size - HEADER_SIZE:
            raise ValueError(f"in-place buffer of {len(target)} bytes for {header.size - 16}")
        buf = self._buf
        already = len(buf) - HEADER_SIZE
        with memoryview(buf) as view:
            target[:already] = view[HEADER_SIZE:]
        del buf[:]
        self._buf_start = start + HEADER_SIZE + already
        self._in_place = _InPlace(header, target, already, start + header.size)

    def _finish_in_place(self) -> InPlaceMessage | None:
        placed = self._in_place
        assert placed is not None
        if placed.filled < len(placed.target):
            return None
        self._in_place = None
        fds = self._claim(placed.end) if self._marks else []
        return InPlaceMessage(placed.header, placed.target, fds)

    # -- output --------------------------------------------------------------------------
    def next_message(self) -> Message | InPlaceMessage | Oversized | None:
        """The next whole message, an :class:`Oversized` notice, or None for "need data"."""
        # Called for every message: locals, and no call that is not needed.
        if self._in_place is not None:
            return self._finish_in_place()
        buf = self._buf
        if self._discard_left or len(buf) < HEADER_SIZE:
            return None
        header = Header._make(HEADER.unpack_from(buf))  # the length was just checked
        size = header.size
        if size < HEADER_SIZE:
            raise ProtocolError(errno.EINVAL, f"message size {size} below the header", fatal=True)
        start = self._buf_start
        if size > self.max_message_size:
            return self._start_discard(header, start)
        if len(buf) < size:
            if self._place is not None and size - HEADER_SIZE >= IN_PLACE_MIN:
                self._start_in_place(header, start)
            return None
        if size > COPY_ONCE_ABOVE:
            with memoryview(buf) as view:  # one copy (a bytearray slice would be two)
                payload = view[HEADER_SIZE:size].tobytes()
        else:  # for small messages a slice is cheaper than making a memoryview
            payload = bytes(buf[HEADER_SIZE:size])
        del buf[:size]
        self._buf_start = start + size
        return Message(header, payload, self._claim(start + size) if self._marks else [])

    def _start_discard(self, header: Header, start: int) -> Oversized:
        if header.size > skip_limit(self.max_message_size):
            # Nothing more is parsed (the connection closes); the fds stay for take_all_fds.
            self._discard_left = header.size
            return Oversized(header, skipped=False)
        end = start + header.size
        available = min(len(self._buf), header.size)
        del self._buf[:available]
        self._buf_start += available
        self._discard_left = header.size - available
        fds = self._claim(end) if not self._discard_left else []
        # fds of chunks fully inside the skipped message but not its last: also its own.
        return Oversized(header, fds)

    def _claim(self, end: int) -> list[int]:
        claimed: list[int] = []
        while self._marks and self._marks[0].chunk_end <= end:
            claimed.extend(self._marks.popleft().fds)
        return claimed

    # -- bookkeeping for the runtime, which owns (and must close) the fds -------------------
    def take_orphan_fds(self) -> list[int]:
        """fds that arrived with the payload of a skipped oversized message."""
        orphans, self._orphans = self._orphans, []
        return orphans

    def take_all_fds(self) -> list[int]:
        """Every fd still held (at connection close)."""
        fds = self.take_orphan_fds()
        while self._marks:
            fds.extend(self._marks.popleft().fds)
        return fds

    @property
    def buffered(self) -> int:
        placed = self._in_place
        return len(self._buf) + (placed.filled + HEADER_SIZE if placed is not None else 0)
