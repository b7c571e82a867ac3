"""ServerConnection: every row of the rules table at the top of protocol/connection.py."""

from __future__ import annotations

import errno
import struct

import pytest

from protocol.connection import (
    CommandReceived,
    ConnState,
    Event,
    Fatal,
    Negotiated,
    Rejected,
    ReplyReceived,
    ServerConnection,
)
from protocol.constants import FLAG_ERROR, FLAG_NO_REPLY, Command, MsgType
from protocol.errors import ProtocolError
from protocol.header import Header, pack_error_reply, pack_message, pack_reply
from protocol.messages import (
    DmaData,
    DmaRw,
    VersionPayload,
    check_dma_write_reply,
    unpack_dma_read_reply,
)
from protocol.version import ServerCapabilities
from tests import traces

LIMIT = 4096
VERSION_MSG = pack_message(0, Command.VERSION, VersionPayload(0, 0, "{}").pack())


def state(conn: ServerConnection) -> ConnState:
    return conn.state  # (a call, so mypy does not carry narrowing across events)


def new(limit: int = LIMIT) -> ServerConnection:
    return ServerConnection(ServerCapabilities(), limit)


def ready(limit: int = LIMIT) -> ServerConnection:
    conn = new(limit)
    conn.receive_data(VERSION_MSG)
    assert isinstance(conn.next_event(), Negotiated)
    assert conn.state is ConnState.READY
    return conn


def events(conn: ServerConnection) -> list[Event]:
    out: list[Event] = []
    while (event := conn.next_event()) is not None:
        out.append(event)
        assert len(out) < 100_000
    return out


def one(conn: ServerConnection, data: bytes, fds: list[int] | None = None) -> Event:
    conn.receive_data(data, fds)
    got = events(conn)
    assert len(got) == 1, got
    return got[0]


def assert_error_reply(event: Rejected, err: int) -> None:
    assert event.error.errno == err
    assert event.reply == pack_error_reply(event.header.msg_id, event.header.command, err)
    assert event.reply is not None and len(event.reply) == 16
    header = Header.unpack(event.reply)
    assert header.flags == MsgType.REPLY | FLAG_ERROR and header.size == 16


# -- AWAITING_VERSION --------------------------------------------------------------------------


def test_valid_version_negotiates() -> None:
    conn = new()
    before = conn.client
    assert state(conn) is ConnState.AWAITING_VERSION and before is None
    event = one(conn, pack_message(7, Command.VERSION, VersionPayload(0, 2, None).pack()))
    assert isinstance(event, Negotiated)
    assert event.header.msg_id == 7
    assert state(conn) is ConnState.READY and conn.client is event.client
    reply = Header.unpack(event.reply)
    assert (reply.msg_id, reply.command, reply.flags) == (7, Command.VERSION, MsgType.REPLY)
    assert reply.size == len(event.reply)
    assert VersionPayload.unpack(event.reply[16:]).minor == 2
    assert conn.max_reply_size == 16 + (1 << 20)


@pytest.mark.parametrize(
    "command",
    [Command.DMA_MAP, Command.DEVICE_GET_INFO, Command.REGION_READ, Command.DEVICE_RESET, 0, 99],
)
def test_first_message_not_version_rejected_and_closed(command: int) -> None:
    conn = new()
    event = one(conn, pack_message(3, command, b"\0" * 16), [40])
    assert isinstance(event, Rejected)
    assert event.close
    assert_error_reply(event, errno.EINVAL)
    assert event.fds == [40]
    assert conn.state is ConnState.CLOSED and conn.client is None


def test_first_message_not_version_with_no_reply_gets_no_reply() -> None:
    conn = new()
    event = one(conn, pack_message(3, Command.REGION_WRITE, b"\0" * 20, FLAG_NO_REPLY))
    assert isinstance(event, Rejected) and event.close
    assert event.error.errno == errno.EINVAL and event.reply is None


def test_nothing_after_close_even_a_buffered_version() -> None:
    conn = new()
    conn.receive_data(pack_message(3, Command.DMA_MAP, b"\0" * 32) + VERSION_MSG, [41])
    got = events(conn)
    assert len(got) == 1 and isinstance(got[0], Rejected) and got[0].close
    assert conn.state is ConnState.CLOSED
    conn.receive_data(pack_message(4, Command.DEVICE_GET_INFO, b"\0" * 16))
    assert conn.next_event() is None
    assert conn.take_all_fds() == [41]


def test_version_with_fds_rejected() -> None:
    conn = new()
    event = one(conn, VERSION_MSG, [5, 6])
    assert isinstance(event, Rejected) and event.close
    assert_error_reply(event, errno.EINVAL)
    assert event.fds == [5, 6]
    assert conn.state is ConnState.CLOSED


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\0\0",
        VersionPayload(1, 0, None).pack(),
        struct.pack("<HH", 0, 0) + b"{}",
        VersionPayload(0, 0, '{"capabilities":{"max_msg_fds":"8"}}').pack(),
    ],
)
def test_invalid_version_rejected_and_closed(payload: bytes) -> None:
    conn = new()
    event = one(conn, pack_message(1, Command.VERSION, payload))
    assert isinstance(event, Rejected) and event.close
    assert_error_reply(event, errno.EINVAL)
    assert conn.state is ConnState.CLOSED


def test_reply_before_version_is_fatal_and_not_answered() -> None:
    conn = new()
    event = one(conn, pack_reply(1, Command.DMA_READ, b""))
    assert isinstance(event, Fatal)
    assert conn.state is ConnState.CLOSED


# -- READY ---------------------------------------------------------------------------------


def test_second_version_rejected_connection_stays() -> None:
    conn = ready()
    client = conn.client
    event = one(conn, pack_message(9, Command.VERSION, VersionPayload(0, 2, None).pack()))
    assert isinstance(event, Rejected) and not event.close
    assert_error_reply(event, errno.EINVAL)
    assert conn.state is ConnState.READY and conn.client is client


@pytest.mark.parametrize(
    "command", [Command.DMA_READ, Command.DMA_WRITE, Command.DIRTY_PAGES, 0, 20, 100, 0xFFFF]
)
def test_commands_not_served_rejected(command: int) -> None:
    conn = ready()
    event = one(conn, pack_message(9, command, b"\0" * 16), [3])
    assert isinstance(event, Rejected) and not event.close
    assert_error_reply(event, errno.EINVAL)
    assert event.fds == [3]
    assert conn.state is ConnState.READY


@pytest.mark.parametrize(
    "command", [Command.DMA_READ, Command.DMA_WRITE, Command.DIRTY_PAGES, Command.VERSION, 55]
)
def test_rejected_no_reply_commands_get_no_reply(command: int) -> None:
    conn = ready()
    event = one(conn, pack_message(9, command, b"\0" * 16, FLAG_NO_REPLY))
    assert isinstance(event, Rejected)
    assert event.error.errno == errno.EINVAL
    assert event.reply is None


SERVED = [c for c in Command if c not in (1, 11, 12, 14)]


@pytest.mark.parametrize("command", SERVED)
def test_served_commands_reach_the_session(command: Command) -> None:
    conn = ready()
    payload = bytes(range(24))
    event = one(conn, pack_message(0x1234, command, payload), [8, 9])
    assert isinstance(event, CommandReceived)
    assert event.header == Header(0x1234, command, 16 + len(payload), 0, 0)
    assert event.payload == payload
    assert event.fds == [8, 9]
    # Answering it: an ordinary reply, or nothing for NO_REPLY.
    assert conn.reply(event.header, b"ok") == pack_reply(0x1234, command, b"ok")
    posted = Header(1, command, 16, FLAG_NO_REPLY)
    assert conn.reply(posted, b"ok") is None
    assert conn.error_reply(posted, errno.EIO) is None
    assert conn.error_reply(event.header, errno.EIO) == pack_error_reply(0x1234, command, 5)


def test_error_reply_never_answers_a_reply() -> None:
    conn = ready()
    assert conn.error_reply(Header(1, Command.DMA_READ, 16, MsgType.REPLY), errno.EINVAL) is None


def test_request_and_matching_reply() -> None:
    conn = ready()
    msg_id, raw = conn.request(Command.DMA_READ, DmaRw(0x1000, 4).pack())
    header = Header.unpack(raw)
    assert header == Header(msg_id, Command.DMA_READ, 32, MsgType.COMMAND, 0)
    assert raw[16:] == DmaRw(0x1000, 4).pack()
    reply_payload = struct.pack("<QQ", 0x1000, 4) + b"abcd"
    event = one(conn, pack_reply(msg_id, Command.DMA_READ, reply_payload), [77])
    assert isinstance(event, ReplyReceived)
    assert event.request_command == Command.DMA_READ
    assert event.payload == reply_payload and event.fds == [77]
    assert unpack_dma_read_reply(event.payload, 0x1000, 4) == b"abcd"
    # The same reply again matches nothing now.
    again = one(conn, pack_reply(msg_id, Command.DMA_READ, reply_payload))
    assert isinstance(again, Rejected) and again.reply is None and not again.close


def test_error_reply_to_our_request_is_delivered() -> None:
    conn = ready()
    msg_id, _ = conn.request(Command.DMA_WRITE, DmaData(0, 2, b"hi").pack())
    event = one(conn, pack_error_reply(msg_id, Command.DMA_WRITE, errno.EFAULT))
    assert isinstance(event, ReplyReceived)
    assert event.header.is_error and event.header.error == errno.EFAULT
    assert event.request_command == Command.DMA_WRITE


def test_replies_matched_out_of_order_and_interleaved_with_commands() -> None:
    conn = ready()
    id_a, _ = conn.request(Command.DMA_READ, DmaRw(0, 1).pack())
    id_b, _ = conn.request(Command.DMA_WRITE, DmaData(0, 1, b"x").pack())
    assert id_a != id_b
    conn.receive_data(
        pack_reply(id_b, Command.DMA_WRITE)
        + pack_message(id_a, Command.REGION_READ, struct.pack("<QII", 0, 7, 4))
        + pack_reply(id_a, Command.DMA_READ, struct.pack("<QQ", 0, 1) + b"z")
    )
    got = events(conn)
    assert [type(e) for e in got] == [ReplyReceived, CommandReceived, ReplyReceived]
    assert isinstance(got[0], ReplyReceived) and got[0].request_command == Command.DMA_WRITE
    assert isinstance(got[2], ReplyReceived) and got[2].request_command == Command.DMA_READ


def test_unmatched_reply_dropped_silently() -> None:
    conn = ready()
    event = one(conn, pack_reply(500, Command.DMA_READ, b"x" * 20), [4])
    assert isinstance(event, Rejected)
    assert event.reply is None and not event.close and event.fds == [4]
    assert event.error.errno == errno.EINVAL
    assert conn.state is ConnState.READY


def test_reply_with_right_id_wrong_command_rejected() -> None:
    conn = ready()
    msg_id, _ = conn.request(Command.DMA_READ, DmaRw(0, 1).pack())
    event = one(conn, pack_reply(msg_id, Command.DMA_WRITE))
    assert isinstance(event, Rejected) and event.reply is None


def test_forgotten_request_reply_unmatched() -> None:
    conn = ready()
    msg_id, _ = conn.request(Command.DMA_READ, DmaRw(0, 1).pack())
    conn.forget_request(msg_id)
    conn.forget_request(msg_id)  # idempotent
    event = one(conn, pack_reply(msg_id, Command.DMA_READ, struct.pack("<QQ", 0, 1) + b"z"))
    assert isinstance(event, Rejected) and event.reply is None


def test_request_ids_skip_pending_and_run_out() -> None:
    conn = ready()
    ids = {conn.request(Command.DMA_READ, b"")[0] for _ in range(0x10000)}
    assert ids == set(range(0x10000))
    with pytest.raises(ProtocolError) as info:
        conn.request(Command.DMA_READ, b"")
    assert info.value.errno == errno.EAGAIN
    conn.forget_request(1234)
    assert conn.request(Command.DMA_WRITE, b"")[0] == 1234


# -- any state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("msg_type", [2, 3, 7, 0xF])
@pytest.mark.parametrize("negotiated", [False, True])
def test_bad_message_type_fatal(msg_type: int, negotiated: bool) -> None:
    conn = ready() if negotiated else new()
    conn.receive_data(pack_message(1, Command.DMA_MAP, b"\0" * 32, msg_type), [6])
    conn.receive_data(VERSION_MSG, [7])  # never looked at
    got = events(conn)
    assert len(got) == 1
    assert isinstance(got[0], Fatal) and got[0].fds == [6]
    assert "neither command nor reply" in got[0].reason
    assert conn.state is ConnState.CLOSED
    assert conn.next_event() is None
    assert conn.take_all_fds() == [7]


@pytest.mark.parametrize("size", [0, 1, 8, 15])
def test_size_below_header_fatal(size: int) -> None:
    conn = ready()
    conn.receive_data(Header(1, Command.REGION_READ, size).pack() + b"\0" * 40, [1])
    conn.receive_data(b"\0" * 10, [2])
    got = events(conn)
    assert len(got) == 1 and isinstance(got[0], Fatal)
    assert "below the header" in got[0].reason
    assert sorted(got[0].fds) == [1, 2]
    assert conn.state is ConnState.CLOSED
    assert conn.take_all_fds() == []


@pytest.mark.parametrize("negotiated", [False, True])
def test_oversized_rejected_e2big_then_next_message_parses(negotiated: bool) -> None:
    conn = ready(limit=128) if negotiated else new(limit=128)
    big = pack_message(3, Command.REGION_WRITE, b"\xee" * 1000)
    conn.receive_data(big[:40])
    event = conn.next_event()
    assert isinstance(event, Rejected)
    assert not event.close
    assert event.header.size == 1016
    assert_error_reply(event, errno.E2BIG)
    assert conn.next_event() is None
    conn.receive_data(big[40:500], [21])
    assert conn.next_event() is None
    following = VERSION_MSG if not negotiated else pack_message(4, Command.DEVICE_RESET)
    conn.receive_data(big[500:] + following)
    nxt = conn.next_event()
    if negotiated:
        assert isinstance(nxt, CommandReceived) and nxt.header.msg_id == 4
    else:
        assert isinstance(nxt, Negotiated)
    assert conn.take_orphan_fds() == [21]


def test_oversized_no_reply_and_oversized_reply_not_answered() -> None:
    conn = ready(limit=64)
    event = one(conn, pack_message(3, Command.REGION_WRITE, b"\0" * 100, FLAG_NO_REPLY))
    assert isinstance(event, Rejected) and event.error.errno == errno.E2BIG
    assert event.reply is None
    event = one(conn, pack_reply(4, Command.DMA_READ, b"\0" * 100))
    assert isinstance(event, Rejected) and event.reply is None


def test_eof_closes() -> None:
    conn = ready()
    conn.receive_eof()
    assert conn.state is ConnState.CLOSED
    assert conn.next_event() is None


def test_eof_after_buffered_messages_drains_them_in_order() -> None:
    conn = new()
    conn.receive_data(VERSION_MSG + pack_message(1, Command.DEVICE_GET_INFO, b"\0" * 16))
    conn.receive_eof()
    got = events(conn)
    assert [type(e) for e in got] == [Negotiated, CommandReceived]
    assert conn.state is ConnState.CLOSED


def test_eof_with_partial_message_closes() -> None:
    conn = ready()
    conn.receive_data(pack_message(1, Command.DEVICE_GET_INFO, b"\0" * 16)[:20], [3])
    conn.receive_eof()
    assert conn.next_event() is None
    assert conn.state is ConnState.CLOSED
    assert conn.take_all_fds() == [3]


def test_closed_ignores_everything() -> None:
    conn = ready()
    conn.receive_eof()
    conn.receive_data(pack_message(1, Command.DEVICE_GET_INFO, b"\0" * 16))
    assert conn.next_event() is None
    conn.receive_data(b"\0" * 16)  # would be fatal framing damage
    assert conn.next_event() is None


# -- real traffic ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", traces.QEMU_TRACES)
def test_qemu_trace_replay(name: str) -> None:
    """Every QEMU command passes the connection layer unchanged, with its fds."""
    conn = new(limit=1 << 20)
    client_msgs = [m for m in traces.load(name) if m.from_client]
    fd = 1000
    expected_fds: list[list[int]] = []
    for m in client_msgs:
        fds = list(range(fd, fd + m.nfds))
        fd += m.nfds
        expected_fds.append(fds)
        conn.receive_data(m.raw, fds)
    got = events(conn)
    assert len(got) == len(client_msgs)
    assert isinstance(got[0], Negotiated)
    for event, m, fds in zip(got[1:], client_msgs[1:], expected_fds[1:], strict=True):
        assert isinstance(event, CommandReceived), (m.seq, event)
        assert event.header == m.header and event.payload == m.payload
        assert event.fds == fds


@pytest.mark.parametrize("conn_name", ["src", "dst"])
def test_lvu_trace_replay_with_server_requests(conn_name: str) -> None:
    """libvfio-user client session, with our own DMA_READ/WRITE requests standing in for the
    trace's: the client's replies come back as ReplyReceived and parse."""
    conn = new(limit=1 << 20)
    ours: dict[int, tuple[int, traces.TraceMessage]] = {}  # trace id -> (our id, request)
    replies = 0
    for m in traces.load("lvu-client-server.jsonl"):
        if m.conn != conn_name:
            continue
        if not m.from_client:
            if m.header.is_command:  # a server->client DMA request
                our_id, _raw = conn.request(Command(m.header.command), m.payload)
                ours[m.header.msg_id] = (our_id, m)
            continue
        raw = m.raw
        if m.header.is_reply:
            our_id, request = ours.pop(m.header.msg_id)
            raw = Header(our_id, m.header.command, m.header.size, m.header.flags).pack()
            raw += m.payload
        event = one(conn, raw, list(range(m.nfds)))
        if m.header.command == Command.VERSION:
            assert isinstance(event, Negotiated)
            assert Header.unpack(event.reply).msg_id == m.header.msg_id
        elif m.header.is_reply:
            assert isinstance(event, ReplyReceived)
            sent = request.payload
            if event.request_command == Command.DMA_READ:
                want = DmaRw.unpack(sent)
                data = unpack_dma_read_reply(event.payload, want.address, want.count)
                assert len(data) == want.count
            else:
                out = DmaData.unpack(sent)
                check_dma_write_reply(event.payload, out.address, out.count)
            replies += 1
        else:
            assert isinstance(event, CommandReceived), (m.seq, event)
            assert len(event.fds) == m.nfds
    assert not ours
    assert replies == 8


def test_lvu_v1_dirty_pages_reach_the_session() -> None:
    # The protocol-0.1 client sends the ``migration`` capability: DIRTY_PAGES is served.
    conn = new(limit=1 << 20)
    results = []
    for m in traces.load("lvu-v1-client-server.jsonl"):
        if m.conn == "src" and m.from_client:
            results.append((m, one(conn, m.raw, list(range(m.nfds)))))
    dirty = [e for m, e in results if m.header.command == Command.DIRTY_PAGES]
    assert len(dirty) == 2 + 16
    others = [e for m, e in results[1:] if m.header.is_command]
    assert others and all(isinstance(e, CommandReceived) for e in others)


@pytest.mark.parametrize(
    "json_text", ["{}", '{"capabilities":{"max_msg_fds":8}}', '{"capabilities":{"migration":{}}}']
)
def test_dirty_pages_refused_without_the_migration_capability(json_text: str) -> None:
    conn = new()
    conn.receive_data(pack_message(0, Command.VERSION, VersionPayload(0, 1, json_text).pack()))
    assert isinstance(conn.next_event(), Negotiated)
    event = one(conn, pack_message(9, Command.DIRTY_PAGES, struct.pack("<II", 8, 1)))
    assert isinstance(event, Rejected) and not event.close
    assert_error_reply(event, errno.EINVAL)


# -- commands received in place ------------------------------------------------------------


def mig_data_write(msg_id: int, size: int) -> bytes:
    data = bytes((msg_id + i) & 0xFF for i in range(size))
    return pack_message(msg_id, Command.MIG_DATA_WRITE, struct.pack("<II", 8 + size, size) + data)


def in_place_ready(limit: int = 1 << 21) -> ServerConnection:
    conn = ServerConnection(ServerCapabilities(), limit, in_place=(Command.MIG_DATA_WRITE,))
    conn.receive_data(VERSION_MSG)
    assert isinstance(conn.next_event(), Negotiated)
    return conn


def receive_split(conn: ServerConnection, message: bytes) -> CommandReceived:
    """Header and a little payload through receive_data, the rest into receive_buffer."""
    conn.receive_data(message[:32])
    assert conn.next_event() is None
    at = 32
    while (target := conn.receive_buffer()) is not None:
        count = min(len(target), 100_000)
        target[:count] = message[at : at + count]
        conn.received(count)
        at += count
    assert at == len(message)
    event = conn.next_event()
    assert isinstance(event, CommandReceived)
    return event


def test_in_place_commands_arrive_as_views_of_one_reused_buffer() -> None:
    conn = in_place_ready()
    first_message, second_message = mig_data_write(1, 300_000), mig_data_write(2, 200_000)
    first = receive_split(conn, first_message)
    assert isinstance(first.payload, memoryview) and bytes(first.payload) == first_message[16:]
    buffer = first.payload.obj
    second = receive_split(conn, second_message)
    assert isinstance(second.payload, memoryview) and second.payload.obj is buffer
    assert bytes(second.payload) == second_message[16:]


def test_a_payload_larger_than_the_reused_buffer_gets_a_larger_one() -> None:
    conn = in_place_ready()
    small = receive_split(conn, mig_data_write(1, 100_000))
    assert isinstance(small.payload, memoryview)
    held = small.payload  # still alive: the larger buffer must not be a resize of its own
    large_message = mig_data_write(2, 1_500_000)
    large = receive_split(conn, large_message)
    assert isinstance(large.payload, memoryview) and large.payload.obj is not held.obj
    assert bytes(large.payload) == large_message[16:]
    assert bytes(held) == mig_data_write(1, 100_000)[16:]


def test_only_the_named_commands_of_a_ready_connection_are_received_in_place() -> None:
    region_write = pack_message(5, Command.REGION_WRITE, bytes(200_000))
    conn = in_place_ready()
    conn.receive_data(region_write[:100])
    assert conn.next_event() is None and conn.receive_buffer() is None
    conn.receive_data(region_write[100:])
    (event,) = events(conn)
    assert isinstance(event, CommandReceived) and isinstance(event.payload, bytes)
    # Before VERSION nothing is received in place (the message is refused as usual).
    fresh = ServerConnection(ServerCapabilities(), 1 << 21, in_place=(Command.MIG_DATA_WRITE,))
    fresh.receive_data(mig_data_write(1, 100_000)[:100])
    assert fresh.receive_buffer() is None
    # Nor without ``in_place``.
    plain = ready(1 << 21)
    plain.receive_data(mig_data_write(1, 100_000)[:100])
    assert plain.next_event() is None and plain.receive_buffer() is None
