"""MessageFramer: reassembly, fd attribution, fatal sizes, oversized skipping."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.framer import Message, MessageFramer, Oversized
from protocol.header import Header, pack_message

FAST = settings(max_examples=200, deadline=None)


def msg(msg_id: int, payload_size: int, command: int = 9) -> bytes:
    return pack_message(msg_id, command, bytes((msg_id + i) & 0xFF for i in range(payload_size)))


def drain(framer: MessageFramer) -> list[Message | Oversized]:
    out: list[Message | Oversized] = []
    while (item := framer.next_message()) is not None:
        out.append(item)
    return out


def as_wire(item: Message | Oversized) -> bytes:
    assert isinstance(item, Message)
    return item.header.pack() + item.payload


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
