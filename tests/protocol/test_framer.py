"""MessageFramer: reassembly, fd attribution, fatal sizes, oversized skipping."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.framer import (
    IN_PLACE_MIN,
    InPlaceMessage,
    Message,
    MessageFramer,
    Oversized,
    skip_limit,
)
from protocol.header import HEADER, Header, pack_message

FAST = settings(max_examples=200, deadline=None)


def msg(msg_id: int, payload_size: int, command: int = 9) -> bytes:
    return pack_message(msg_id, command, bytes((msg_id + i) & 0xFF for i in range(payload_size)))


def drain(framer: MessageFramer) -> list[Message | InPlaceMessage | Oversized]:
    out: list[Message | InPlaceMessage | Oversized] = []
    while (item := framer.next_message()) is not None:
        out.append(item)
    return out


def as_wire(item: Message | InPlaceMessage | Oversized) -> bytes:
    assert isinstance(item, Message | InPlaceMessage)
    return item.header.pack() + bytes(item.payload)


STREAM = [msg(1, 16), msg(2, 0), msg(3, 5), msg(4, 40)]


def test_several_messages_in_one_chunk() -> None:
    framer = MessageFramer(4096)
    framer.feed(b"".join(STREAM))
    items = drain(framer)
    assert [as_wire(i) for i in items] == STREAM
    assert [i.header.msg_id for i in items] == [1, 2, 3, 4]
    assert all(isinstance(i, Message) and i.fds == [] for i in items)
    assert framer.buffered == 0
    assert framer.next_message() is None


@pytest.mark.parametrize("cut", range(len(b"".join(STREAM)) + 1))
def test_split_at_every_byte_boundary(cut: int) -> None:
    stream = b"".join(STREAM)
    framer = MessageFramer(4096)
    framer.feed(stream[:cut])
    items = drain(framer)
    # Only messages wholly inside the first part come out.
    complete = 0
    end = 0
    for m in STREAM:
        if end + len(m) <= cut:
            complete += 1
            end += len(m)
        else:
            break
    assert [as_wire(i) for i in items] == STREAM[:complete]
    assert framer.buffered == cut - end
    framer.feed(stream[cut:])
    items += drain(framer)
    assert [as_wire(i) for i in items] == STREAM


def test_one_byte_at_a_time() -> None:
    stream = b"".join(STREAM)
    framer = MessageFramer(4096)
    items = []
    for i in range(len(stream)):
        framer.feed(stream[i : i + 1])
        items += drain(framer)
    assert [as_wire(i) for i in items] == STREAM


@FAST
@given(
    st.lists(st.integers(0, 100), min_size=1, max_size=8),
    st.data(),
)
def test_random_chunking_reassembles(sizes: list[int], data: st.DataObject) -> None:
    messages = [msg(i, n) for i, n in enumerate(sizes)]
    stream = b"".join(messages)
    framer = MessageFramer(4096)
    items = []
    at = 0
    while at < len(stream):
        n = data.draw(st.integers(1, len(stream) - at))
        framer.feed(memoryview(stream)[at : at + n])
        at += n
        items += drain(framer)
    assert [as_wire(i) for i in items] == messages


def test_accepts_bytearray_and_memoryview() -> None:
    framer = MessageFramer(4096)
    framer.feed(bytearray(STREAM[0]))
    framer.feed(memoryview(STREAM[1]))
    assert [as_wire(i) for i in drain(framer)] == STREAM[:2]


def test_exactly_max_size_is_a_message() -> None:
    framer = MessageFramer(64)
    framer.feed(msg(1, 48))
    (item,) = drain(framer)
    assert isinstance(item, Message) and item.header.size == 64


def test_max_message_size_below_header_refused() -> None:
    with pytest.raises(ValueError):
        MessageFramer(15)
    MessageFramer(16)


# -- fd attribution ------------------------------------------------------------------------


def test_fds_go_to_the_last_message_starting_in_the_chunk() -> None:
    a, b, c = msg(1, 8), msg(2, 8), msg(3, 8)
    framer = MessageFramer(4096)
    framer.feed(a + b + c, [10, 11])
    items = drain(framer)
    assert [i.fds for i in items] == [[], [], [10, 11]]


def test_fds_of_a_chunk_ending_mid_message_go_to_that_message() -> None:
    a, b = msg(1, 8), msg(2, 32)
    framer = MessageFramer(4096)
    framer.feed(a + b[:20], [10])  # b starts in this chunk
    first = drain(framer)
    assert [i.header.msg_id for i in first] == [1] and first[0].fds == []
    framer.feed(b[20:30], [11])  # continuation: the message in progress
    framer.feed(b[30:], [12])
    (second,) = drain(framer)
    assert second.header.msg_id == 2 and second.fds == [10, 11, 12]


def test_chunk_boundaries_on_message_boundaries() -> None:
    a, b = msg(1, 8), msg(2, 8)
    framer = MessageFramer(4096)
    framer.feed(a, [10])
    framer.feed(b, [11])
    assert [i.fds for i in drain(framer)] == [[10], [11]]


def test_continuation_chunk_that_also_starts_the_next_message() -> None:
    a, b = msg(1, 32), msg(2, 8)
    framer = MessageFramer(4096)
    framer.feed(a[:10], [10])
    framer.feed(a[10:] + b, [11])  # b starts here, so b owns these fds
    items = drain(framer)
    assert [(i.header.msg_id, i.fds) for i in items] == [(1, [10]), (2, [11])]


def test_fds_held_until_the_message_completes() -> None:
    a = msg(1, 32)
    framer = MessageFramer(4096)
    framer.feed(a[:5], [10])
    framer.feed(a[5:20], [11])
    assert framer.next_message() is None
    framer.feed(a[20:])
    (item,) = drain(framer)
    assert item.fds == [10, 11]


def model_owner(bounds: list[tuple[int, int]], cs: int, ce: int) -> int | None:
    """Docstring rule: the last message starting inside [cs, ce), else the one in progress."""
    starters = [i for i, (s, _e) in enumerate(bounds) if cs <= s < ce]
    if starters:
        return starters[-1]
    for i, (s, e) in enumerate(bounds):
        if s < cs < e:
            return i
    return None


@FAST
@given(st.lists(st.integers(0, 60), min_size=1, max_size=6), st.data())
def test_fd_attribution_matches_the_model(sizes: list[int], data: st.DataObject) -> None:
    messages = [msg(i, n) for i, n in enumerate(sizes)]
    bounds = []
    at = 0
    for m in messages:
        bounds.append((at, at + len(m)))
        at += len(m)
    stream = b"".join(messages)
    framer = MessageFramer(4096)
    expected: list[list[int]] = [[] for _ in messages]
    got: list[list[int]] = []
    at = 0
    fd = 100
    while at < len(stream):
        n = data.draw(st.integers(1, len(stream) - at))
        fds = [fd] if data.draw(st.booleans()) else []
        fd += 1
        if fds:
            owner = model_owner(bounds, at, at + n)
            assert owner is not None
            expected[owner] += fds
        framer.feed(stream[at : at + n], fds)
        at += n
        got += [i.fds for i in drain(framer)]
    assert got == expected
    assert framer.take_all_fds() == []


# -- fatal sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(16))
def test_size_below_header_is_fatal(size: int) -> None:
    framer = MessageFramer(4096)
    framer.feed(msg(1, 4) + Header(2, 9, size).pack() + b"\0" * 32, [7])
    first = framer.next_message()
    assert isinstance(first, Message) and first.header.msg_id == 1
    with pytest.raises(ProtocolError) as info:
        framer.next_message()
    assert info.value.fatal and info.value.errno == errno.EINVAL
    # The runtime closes; everything still held comes back once.
    assert framer.take_all_fds() == [7]
    assert framer.take_all_fds() == []


def test_bad_size_detected_only_once_the_header_is_complete() -> None:
    framer = MessageFramer(4096)
    raw = Header(2, 9, 3).pack()
    framer.feed(raw[:15])
    assert framer.next_message() is None
    framer.feed(raw[15:])
    with pytest.raises(ProtocolError):
        framer.next_message()


# -- oversized messages ----------------------------------------------------------------------


def test_oversized_reported_at_header_time_and_skipped() -> None:
    framer = MessageFramer(64)
    big = msg(1, 1000)
    after = msg(2, 8)
    framer.feed(big[:16])
    item = framer.next_message()
    assert isinstance(item, Oversized)
    assert item.header.msg_id == 1 and item.header.size == 1016
    assert framer.next_message() is None
    framer.feed(big[16:400], [10])
    assert framer.next_message() is None
    framer.feed(big[400:1000], [11, 12])
    assert framer.next_message() is None
    assert framer.buffered == 0
    framer.feed(big[1000:] + after)
    (item2,) = drain(framer)
    assert isinstance(item2, Message) and as_wire(item2) == after and item2.fds == []
    assert framer.take_orphan_fds() == [10, 11, 12]
    assert framer.take_orphan_fds() == []
    assert framer.take_all_fds() == []


def test_a_claim_past_the_skip_limit_ends_the_stream_instead_of_waiting() -> None:
    framer = MessageFramer(64)
    header = HEADER.pack(1, 1, skip_limit(64) + 1, 0, 0)  # a size, and no body ever
    framer.feed(header, [10])
    item = framer.next_message()
    assert isinstance(item, Oversized) and not item.skipped and item.fds == []
    framer.feed(msg(2, 8))  # nothing after it is parsed: the runtime closes
    assert framer.next_message() is None
    assert framer.take_all_fds() == [10]
    at_limit = MessageFramer(64)
    at_limit.feed(HEADER.pack(1, 1, skip_limit(64), 0, 0))
    item = at_limit.next_message()
    assert isinstance(item, Oversized) and item.skipped  # up to the limit: skipped


def test_oversized_header_split_across_chunks() -> None:
    framer = MessageFramer(64)
    big = msg(1, 200)
    framer.feed(big[:7])
    assert framer.next_message() is None
    framer.feed(big[7:20])
    assert isinstance(framer.next_message(), Oversized)
    framer.feed(big[20:] + msg(2, 3))
    (item,) = drain(framer)
    assert isinstance(item, Message) and item.header.msg_id == 2


def test_oversized_whole_in_one_chunk_with_followers() -> None:
    framer = MessageFramer(64)
    stream = msg(1, 8) + msg(2, 100) + msg(3, 8)
    framer.feed(stream)
    items = drain(framer)
    assert [type(i) for i in items] == [Message, Oversized, Message]
    assert [i.header.msg_id for i in items] == [1, 2, 3]


def test_oversized_whole_in_its_own_chunk_keeps_its_fds() -> None:
    framer = MessageFramer(64)
    framer.feed(msg(1, 100), [10])
    (item,) = drain(framer)
    assert isinstance(item, Oversized) and item.fds == [10]
    assert framer.take_orphan_fds() == []


def test_fds_of_the_chunk_ending_the_skip_and_starting_the_next_message() -> None:
    framer = MessageFramer(64)
    big = msg(1, 500)
    framer.feed(big[:100], [10])
    assert isinstance(framer.next_message(), Oversized)
    framer.feed(big[100:] + msg(2, 4), [11])  # message 2 starts in this chunk: its fds
    (item,) = drain(framer)
    assert isinstance(item, Message) and item.header.msg_id == 2 and item.fds == [11]
    assert framer.take_orphan_fds() == [10]


def test_chunk_ending_exactly_at_the_end_of_the_skip() -> None:
    framer = MessageFramer(64)
    big = msg(1, 500)
    framer.feed(big[:50])
    assert isinstance(framer.next_message(), Oversized)
    framer.feed(big[50:], [10])
    framer.feed(msg(2, 4), [11])
    (item,) = drain(framer)
    assert item.fds == [11]
    assert framer.take_orphan_fds() == [10]


def test_one_over_the_limit_is_oversized() -> None:
    framer = MessageFramer(64)
    framer.feed(msg(1, 49))
    assert isinstance(framer.next_message(), Oversized)


def test_take_all_fds_returns_everything_held() -> None:
    framer = MessageFramer(64)
    big = msg(1, 500)
    framer.feed(big[:100], [1])
    assert isinstance(framer.next_message(), Oversized)
    framer.feed(big[100:200], [2])  # still skipping: held
    assert sorted(framer.take_all_fds()) == [1, 2]
    assert framer.take_all_fds() == []

    framer = MessageFramer(4096)
    framer.feed(msg(1, 4) + msg(2, 40)[:20], [3])  # partial message 2 owns fd 3
    (first,) = drain(framer)
    assert first.fds == []
    assert framer.take_all_fds() == [3]


def test_take_all_fds_includes_untaken_orphans() -> None:
    framer = MessageFramer(64)
    big = msg(1, 500)
    framer.feed(big[:16])
    assert isinstance(framer.next_message(), Oversized)
    framer.feed(big[16:], [5])
    framer.feed(msg(2, 40)[:10], [6])
    assert sorted(framer.take_all_fds()) == [5, 6]


# -- payloads received in place ------------------------------------------------------------

BIG = IN_PLACE_MIN + 1000
MIG_DATA_WRITE = 18


class Places:
    """A ``place`` callback lending one reused buffer for MIG_DATA_WRITE payloads."""

    def __init__(self, size: int = 1 << 20, command: int = MIG_DATA_WRITE) -> None:
        self.buffer = bytearray(size)
        self.command = command
        self.asked: list[int] = []

    def __call__(self, header: Header) -> memoryview | None:
        self.asked.append(header.msg_id)
        if header.command != self.command:
            return None
        return memoryview(self.buffer)[: header.size - 16]


_PATTERN = bytes(range(256)) * (BIG // 256 + 2)


def fast_msg(msg_id: int, payload_size: int, command: int = 9) -> bytes:
    """:func:`msg` for large payloads (same bytes, built without a loop per byte)."""
    start = msg_id & 0xFF
    return pack_message(msg_id, command, _PATTERN[start : start + payload_size])


def big(msg_id: int, size: int = BIG) -> bytes:
    return fast_msg(msg_id, size, MIG_DATA_WRITE)


def receive_in_place(framer: MessageFramer, data: bytes, piece: int) -> int:
    """Write ``data`` into the framer's receive buffer ``piece`` bytes at a time, as
    ``recvmsg_into`` would; returns how many bytes it took."""
    at = 0
    while at < len(data) and (target := framer.receive_buffer()) is not None:
        count = min(piece, len(target), len(data) - at)
        target[:count] = data[at : at + count]
        framer.received(count)
        at += count
    return at


def test_large_payload_is_received_in_place_in_many_pieces() -> None:
    places = Places()
    framer = MessageFramer(1 << 20, places)
    first, second = big(1), msg(2, 8)
    framer.feed(first[:1000])  # the header and the payload's first bytes
    assert framer.next_message() is None
    assert framer.buffered == 1000
    taken = receive_in_place(framer, first[1000:], 777)
    assert taken == len(first) - 1000  # exactly the payload: no byte of the next message
    assert framer.receive_buffer() is None
    framer.feed(second)
    first_out, second_out = drain(framer)
    assert isinstance(first_out, InPlaceMessage) and isinstance(second_out, Message)
    assert first_out.payload.obj is places.buffer  # a view of the lent buffer, not a copy
    assert as_wire(first_out) == first and as_wire(second_out) == second
    assert framer.buffered == 0


def test_fed_bytes_fill_the_in_place_payload_and_the_rest_is_buffered() -> None:
    places = Places()
    framer = MessageFramer(1 << 20, places)
    stream = big(1) + msg(2, 8) + big(3)
    framer.feed(stream[:100])
    assert drain(framer) == []
    framer.feed(stream[100:])  # the rest of 1, all of 2, all of 3 in one chunk
    items = drain(framer)
    assert [type(i) for i in items] == [InPlaceMessage, Message, Message]  # 3 came whole
    assert b"".join(as_wire(i) for i in items) == stream


def test_an_in_place_payload_is_valid_until_the_next_message_is_taken() -> None:
    """The next large message may start in the same buffer as soon as it is asked for."""
    framer = MessageFramer(1 << 20, Places())
    stream = big(1) + big(3)
    framer.feed(stream[:100])
    assert framer.next_message() is None
    receive_in_place(framer, stream[100 : len(big(1))], 1 << 20)
    framer.feed(stream[len(big(1)) : len(big(1)) + 100])
    first = framer.next_message()
    assert isinstance(first, InPlaceMessage) and as_wire(first) == big(1)
    assert framer.next_message() is None  # 3 starts in place: the buffer now holds its bytes
    assert as_wire(first) != big(1)


def test_small_payloads_and_declined_places_are_buffered_as_usual() -> None:
    places = Places()
    framer = MessageFramer(1 << 20, places)
    small, other = fast_msg(1, IN_PLACE_MIN - 1, MIG_DATA_WRITE), fast_msg(2, BIG, 9)
    for message in (small, other):
        framer.feed(message[:50])
        assert framer.next_message() is None and framer.receive_buffer() is None
        framer.feed(message[50:])
        (item,) = drain(framer)
        assert isinstance(item, Message) and as_wire(item) == message
    assert places.asked == [2]  # asked only about the large one; it declined


def test_fds_of_in_place_pieces_belong_to_that_message() -> None:
    framer = MessageFramer(1 << 20, Places())
    first, second = big(1), msg(2, 8)
    framer.feed(first[:64], [10])
    assert framer.next_message() is None
    target = framer.receive_buffer()
    assert target is not None
    target[:100] = first[64:164]
    framer.received(100, [11])
    rest = framer.receive_buffer()
    assert rest is not None
    rest[:] = first[164:]
    framer.received(len(rest), [12])
    framer.feed(second, [13])
    first_out, second_out = drain(framer)
    assert first_out.fds == [10, 11, 12] and second_out.fds == [13]
    assert framer.take_all_fds() == []


def test_receiving_beyond_the_in_place_payload_is_refused() -> None:
    framer = MessageFramer(1 << 20, Places())
    with pytest.raises(ValueError):
        framer.received(1)  # nothing is being received in place
    framer.feed(big(1)[:16])
    assert framer.next_message() is None
    target = framer.receive_buffer()
    assert target is not None and len(target) == BIG
    with pytest.raises(ValueError):
        framer.received(BIG + 1)


def test_a_place_of_the_wrong_size_is_refused() -> None:
    framer = MessageFramer(1 << 20, lambda header: memoryview(bytearray(10)))
    framer.feed(big(1)[:16])
    with pytest.raises(ValueError):
        framer.next_message()


def test_oversized_messages_are_skipped_not_received_in_place() -> None:
    places = Places()
    framer = MessageFramer(BIG, places)  # big(1) is BIG + 16 bytes: over the limit
    framer.feed(big(1)[:100])
    (item,) = drain(framer)
    assert isinstance(item, Oversized) and places.asked == []
    assert framer.receive_buffer() is None


def test_eof_inside_an_in_place_payload_leaves_it_buffered() -> None:
    framer = MessageFramer(1 << 20, Places())
    framer.feed(big(1)[:100])
    assert framer.next_message() is None
    assert framer.buffered == 100


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from([0, 8, IN_PLACE_MIN - 1, IN_PLACE_MIN, BIG]), max_size=5),
    st.data(),
)
def test_in_place_reassembles_like_buffering(sizes: list[int], data: st.DataObject) -> None:
    """Any mix of fed chunks and in-place receives gives the same messages, each large
    MIG_DATA_WRITE payload still incomplete when its header was parsed in place."""
    messages = [fast_msg(i, n, MIG_DATA_WRITE if i % 2 else 9) for i, n in enumerate(sizes)]
    stream = b"".join(messages)
    framer = MessageFramer(1 << 20, Places())
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream))), max_size=12))))
    out = []
    at = 0
    for end in [*cuts, len(stream)]:
        if end <= at:
            continue
        if framer.receive_buffer() is not None and data.draw(st.booleans()):
            at += receive_in_place(framer, stream[at:end], end - at)
        else:
            framer.feed(stream[at:end])
            at = end
        # Each copied before the next is taken: the next in-place message reuses the buffer.
        while (item := framer.next_message()) is not None:
            out.append(as_wire(item))
    while at < len(stream):  # what an in-place receive did not take (past its payload)
        framer.feed(stream[at:])
        at = len(stream)
        while (item := framer.next_message()) is not None:
            out.append(as_wire(item))
    assert out == messages
