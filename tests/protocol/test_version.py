"""VERSION negotiation (facts section 3) against the exact requests real clients send."""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.connection import Negotiated, Rejected, ServerConnection
from protocol.constants import Command
from protocol.errors import ProtocolError
from protocol.header import Header
from protocol.messages import VersionPayload
from protocol.version import (
    ClientCapabilities,
    ServerCapabilities,
    negotiate,
    parse_capabilities_json,
    parse_client_version,
)
from tests import traces

FAST = settings(max_examples=200, deadline=None)

# qemu-gpio.jsonl seq 1 (QEMU 10.2.2): the 214-byte VERSION request, header + payload.
QEMU_VERSION_REQUEST = bytes.fromhex(
    "00000100d6000000000000000000000000000000"
    "7b226361706162696c6974696573223a207b22706773697a6573223a20343039362c20226d61785f6d73"
    "675f666473223a2031362c20226d61785f646d615f6d617073223a2036353533352c20226d61785f6461"
    "74615f786665725f73697a65223a20313034383537362c20226d6967726174696f6e223a207b226d6178"
    "5f6269746d61705f73697a65223a203236383433353435362c2022706773697a65223a20343039367d2c"
    "202277726974655f6d756c7469706c65223a20747275657d7d00"
)
# lvu-client-server.jsonl seq 1 (libvfio-user sample client; msg_id 0xda55).
LVU_VERSION_REQUEST = bytes.fromhex(
    "55da0100520000000000000000000000000002007b226361706162696c6974696573223a"
    "7b226d61785f6d73675f66647322"
    "3a33322c226d61785f646174615f786665725f73697a65223a313032347d7d00"
)


def payload_of(message: bytes) -> bytes:
    return message[16:]


def test_embedded_requests_match_the_traces() -> None:
    assert len(QEMU_VERSION_REQUEST) == 214
    assert len(LVU_VERSION_REQUEST) == 82
    assert traces.by_seq("qemu-gpio.jsonl", 1).raw == QEMU_VERSION_REQUEST
    assert traces.by_seq("lvu-client-server.jsonl", 1).raw == LVU_VERSION_REQUEST


def qemu_accepts(reply_message: bytes, request_size: int) -> dict[str, Any]:
    """QEMU's checks on a VERSION reply (facts 3.3 caps_check, 1.5 reply size)."""
    header = Header.unpack(reply_message)
    assert header.size == len(reply_message) <= request_size
    assert header.is_reply and not header.is_error and header.command == Command.VERSION
    payload = payload_of(reply_message)
    major, minor = struct.unpack_from("<HH", payload)
    assert (major, minor) == (0, 0)
    assert payload[-1:] == b"\0", "NUL must be the last byte of the message"
    text = payload[4:-1].decode()
    assert "\0" not in text
    doc = json.loads(text)
    assert isinstance(doc, dict)
    caps = doc.get("capabilities", {})
    assert isinstance(caps, dict)
    for key, high in (
        ("max_msg_fds", 16),
        ("max_data_xfer_size", 64 * 1024 * 1024),
        ("max_dma_maps", 65535),
    ):
        if key in caps:
            assert type(caps[key]) is int and 0 <= caps[key] <= high, key
    if "pgsizes" in caps:
        assert type(caps["pgsizes"]) is int and caps["pgsizes"] % 4096 == 0
    if "write_multiple" in caps:
        assert type(caps["write_multiple"]) is bool
    if "migration" in caps:
        migration = caps["migration"]
        assert isinstance(migration, dict)
        if "pgsize" in migration:
            assert type(migration["pgsize"]) is int and migration["pgsize"] % 4096 == 0
    assert "twin_socket" not in caps
    return caps


def test_qemu_request_negotiates() -> None:
    version = VersionPayload.unpack(payload_of(QEMU_VERSION_REQUEST))
    assert (version.major, version.minor) == (0, 0)
    client, reply = negotiate(version, ServerCapabilities())
    assert client == ClientCapabilities(
        major=0,
        minor=0,
        max_msg_fds=16,
        max_data_xfer_size=1048576,
        max_dma_maps=65535,
        pgsizes=4096,
        write_multiple=True,
        twin_socket=False,
        migration_pgsize=4096,
        migration_data_fd=False,
    )
    assert (reply.major, reply.minor) == (0, 0)
    assert reply.json_text is not None
    raw = reply.pack()
    assert raw.endswith(b"\0") and raw.count(b"\0", 4) == 1
    caps = json.loads(reply.json_text)["capabilities"]
    assert caps["max_msg_fds"] == 8
    assert caps["max_data_xfer_size"] == 1048576
    assert caps["pgsizes"] == 4096
    assert caps["max_dma_maps"] == 65535
    assert "data_fd" not in caps.get("migration", {})


def test_qemu_request_through_the_connection() -> None:
    conn = ServerConnection(ServerCapabilities(), 1 << 20)
    conn.receive_data(QEMU_VERSION_REQUEST)
    event = conn.next_event()
    assert isinstance(event, Negotiated)
    assert event.header.msg_id == 0
    assert event.client.max_msg_fds == 16
    assert conn.client == event.client
    reply_header = Header.unpack(event.reply)
    assert reply_header.msg_id == 0 and reply_header.flags == 1
    qemu_accepts(event.reply, len(QEMU_VERSION_REQUEST))


def test_lvu_request_negotiates() -> None:
    version = VersionPayload.unpack(payload_of(LVU_VERSION_REQUEST))
    assert (version.major, version.minor) == (0, 2)
    client, reply = negotiate(version, ServerCapabilities())
    assert (client.max_msg_fds, client.max_data_xfer_size) == (32, 1024)
    assert not client.write_multiple and client.migration_pgsize is None
    assert client.pgsizes == 4096 and client.max_dma_maps == 65535  # spec defaults
    assert (reply.major, reply.minor) == (0, 2)
    raw = reply.pack()
    assert raw[-1:] == b"\0"
    caps = json.loads(raw[4:-1])["capabilities"]
    # libvfio-user's strict parser: numbers must be JSON integers.
    assert type(caps["max_msg_fds"]) is int and type(caps["max_data_xfer_size"]) is int


_pgsize_sets = st.sets(st.sampled_from([4096, 1 << 16, 1 << 21, 1 << 30]), min_size=1).map(sum)


server_caps = st.builds(
    ServerCapabilities,
    max_msg_fds=st.integers(1, 16),
    max_data_xfer_size=st.integers(4096, 64 * 1024 * 1024),
    max_dma_maps=st.integers(1, 65535),
    pgsizes=_pgsize_sets,
    write_multiple=st.booleans(),
    migration_pgsize=st.sampled_from([None, 4096, 1 << 16, 1 << 21]),
    migration_data_fd=st.booleans(),
)


@FAST
@given(server_caps)
def test_any_valid_server_caps_fit_qemu(ours: ServerCapabilities) -> None:
    conn = ServerConnection(ours, 1 << 20)
    conn.receive_data(QEMU_VERSION_REQUEST)
    event = conn.next_event()
    assert isinstance(event, Negotiated)
    caps = qemu_accepts(event.reply, len(QEMU_VERSION_REQUEST))
    assert caps["max_msg_fds"] == ours.max_msg_fds
    assert caps["max_data_xfer_size"] == ours.max_data_xfer_size
    assert caps["max_dma_maps"] == ours.max_dma_maps
    assert caps["pgsizes"] == ours.pgsizes
    assert caps.get("write_multiple", False) == ours.write_multiple
    assert caps.get("migration", {}).get("pgsize") == ours.migration_pgsize
    assert "data_fd" not in caps.get("migration", {})  # QEMU did not ask


@FAST
@given(st.integers(0, 0xFFFF))
def test_reply_minor_is_min_of_client_and_two(minor: int) -> None:
    _, reply = negotiate(VersionPayload(0, minor, None), ServerCapabilities())
    assert reply.major == 0
    assert reply.minor == min(minor, 2)


@pytest.mark.parametrize("major", [1, 2, 0x100, 0xFFFF])
def test_major_other_than_zero_rejected(major: int) -> None:
    with pytest.raises(ProtocolError) as info:
        negotiate(VersionPayload(major, 0, None), ServerCapabilities())
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError):
        parse_client_version(VersionPayload(major, 2, '{"capabilities":{}}'))


@pytest.mark.parametrize("text", [None, "", "   ", "{}", '{"capabilities":{}}', '{"other":1}'])
def test_no_capabilities_means_spec_defaults(text: str | None) -> None:
    client, reply = negotiate(VersionPayload(0, 2, text), ServerCapabilities())
    assert client == ClientCapabilities(major=0, minor=2)
    assert client.max_msg_fds == 1  # spec default, not QEMU's 8
    assert client.max_data_xfer_size == 1 << 20
    assert client.max_dma_maps == 65535
    assert client.pgsizes == 4096
    assert not client.write_multiple and not client.twin_socket
    assert client.migration_pgsize is None and not client.migration_data_fd
    assert reply.json_text is not None


def test_version_without_json_through_the_connection() -> None:
    conn = ServerConnection(ServerCapabilities(), 4096)
    conn.receive_data(Header(5, Command.VERSION, 20).pack() + b"\0\0\x01\0")
    event = conn.next_event()
    assert isinstance(event, Negotiated)
    assert event.client.max_msg_fds == 1
    reply = VersionPayload.unpack(payload_of(event.reply))
    assert (reply.major, reply.minor) == (0, 1)


def test_unknown_keys_ignored() -> None:
    doc = {
        "capabilities": {
            "max_msg_fds": 4,
            "some_future_key": {"x": [1, 2, {"y": None}]},
            "another": "text",
            "migration": {"pgsize": 4096, "max_bitmap_size": 268435456, "new": [1]},
            "twin_socket": {"supported": False, "extra": 1},
        },
        "top_level_extra": 1.5,
    }
    client = parse_client_version(VersionPayload(0, 0, json.dumps(doc)))
    assert client.max_msg_fds == 4
    assert client.migration_pgsize == 4096
    assert not client.twin_socket


def test_twin_socket_request_recorded_but_never_offered() -> None:
    text = '{"capabilities":{"max_msg_fds":8,"twin_socket":{"supported":true}}}'
    client, reply = negotiate(VersionPayload(0, 2, text), ServerCapabilities())
    assert client.twin_socket
    assert reply.json_text is not None
    assert "twin_socket" not in json.loads(reply.json_text)["capabilities"]


BAD_CAPS: list[tuple[str, str]] = [
    ("max_msg_fds-string", '{"capabilities":{"max_msg_fds":"16"}}'),
    ("max_msg_fds-bool", '{"capabilities":{"max_msg_fds":true}}'),
    ("max_msg_fds-float", '{"capabilities":{"max_msg_fds":16.0}}'),
    ("max_msg_fds-null", '{"capabilities":{"max_msg_fds":null}}'),
    ("max_msg_fds-2000", '{"capabilities":{"max_msg_fds":2000}}'),
    ("max_msg_fds-1025", '{"capabilities":{"max_msg_fds":1025}}'),
    ("max_msg_fds-negative", '{"capabilities":{"max_msg_fds":-1}}'),
    ("max_data_xfer_size-bool", '{"capabilities":{"max_data_xfer_size":false}}'),
    ("max_data_xfer_size-string", '{"capabilities":{"max_data_xfer_size":"1048576"}}'),
    ("max_data_xfer_size-zero", '{"capabilities":{"max_data_xfer_size":0}}'),
    ("max_dma_maps-bool", '{"capabilities":{"max_dma_maps":true}}'),
    ("pgsizes-list", '{"capabilities":{"pgsizes":[4096]}}'),
    ("write_multiple-number", '{"capabilities":{"write_multiple":1}}'),
    ("write_multiple-string", '{"capabilities":{"write_multiple":"true"}}'),
    ("capabilities-list", '{"capabilities":[]}'),
    ("capabilities-string", '{"capabilities":"max_msg_fds"}'),
    ("capabilities-number", '{"capabilities":1}'),
    ("capabilities-null", '{"capabilities":null}'),
    ("twin_socket-bool", '{"capabilities":{"twin_socket":true}}'),
    ("twin_socket-list", '{"capabilities":{"twin_socket":[]}}'),
    ("twin_socket-supported-number", '{"capabilities":{"twin_socket":{"supported":1}}}'),
    ("migration-list", '{"capabilities":{"migration":[4096]}}'),
    ("migration-number", '{"capabilities":{"migration":4096}}'),
    ("migration-pgsize-string", '{"capabilities":{"migration":{"pgsize":"4096"}}}'),
    ("migration-pgsize-zero", '{"capabilities":{"migration":{"pgsize":0}}}'),
    ("migration-data_fd-number", '{"capabilities":{"migration":{"data_fd":1}}}'),
    ("top-level-list", "[]"),
    ("top-level-string", '"capabilities"'),
    ("top-level-number", "1"),
    ("unparsable", "{"),
    ("single-quotes", "{'capabilities': {}}"),
    ("trailing-garbage", '{"capabilities":{}} x'),
    ("too-long", '{"capabilities":{}}' + " " * 5000),
]


@pytest.mark.parametrize("text", [pytest.param(t, id=n) for n, t in BAD_CAPS])
def test_bad_capabilities_rejected(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        negotiate(VersionPayload(0, 0, text), ServerCapabilities())
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("text", [pytest.param(t, id=n) for n, t in BAD_CAPS])
def test_bad_capabilities_close_the_connection(text: str) -> None:
    conn = ServerConnection(ServerCapabilities(), 1 << 16)
    payload = VersionPayload(0, 0, text).pack()
    conn.receive_data(Header(9, Command.VERSION, 16 + len(payload)).pack() + payload)
    event = conn.next_event()
    assert isinstance(event, Rejected)
    assert event.close and event.error.errno == errno.EINVAL
    assert event.reply == Header(9, Command.VERSION, 16, 0x21, errno.EINVAL).pack()
    assert conn.client is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"capabilities":{"max_msg_fds":0}}', 0),
        ('{"capabilities":{"max_msg_fds":1024}}', 1024),
        ('{"capabilities":{"max_msg_fds":32}}', 32),
    ],
)
def test_max_msg_fds_bounds(text: str, expected: int) -> None:
    assert parse_client_version(VersionPayload(0, 0, text)).max_msg_fds == expected


def test_parse_capabilities_json() -> None:
    assert parse_capabilities_json(None) == {}
    assert parse_capabilities_json(" \n") == {}
    assert parse_capabilities_json('{"capabilities":{"a":1}}') == {"a": 1}


# -- the data_fd extension ----------------------------------------------------------------

_ASKS = '{"capabilities":{"max_msg_fds":8,"migration":{"pgsize":4096,"data_fd":true}}}'
_DOES_NOT_ASK = '{"capabilities":{"max_msg_fds":8,"migration":{"pgsize":4096}}}'
_SAYS_NO = '{"capabilities":{"max_msg_fds":8,"migration":{"data_fd":false}}}'


@pytest.mark.parametrize(
    ("client_text", "server_supports", "echoed"),
    [
        (_ASKS, True, True),
        (_ASKS, False, False),
        (_DOES_NOT_ASK, True, False),
        (_DOES_NOT_ASK, False, False),
        (_SAYS_NO, True, False),
        (None, True, False),
    ],
)
def test_data_fd_only_echoed_when_both_sides_want_it(
    client_text: str | None, server_supports: bool, echoed: bool
) -> None:
    ours = ServerCapabilities(migration_data_fd=server_supports)
    client, reply = negotiate(VersionPayload(0, 2, client_text), ours)
    assert client.migration_data_fd == (client_text == _ASKS)
    assert reply.json_text is not None
    caps = json.loads(reply.json_text)["capabilities"]
    assert ("data_fd" in caps.get("migration", {})) == echoed
    if echoed:
        assert caps["migration"]["data_fd"] is True
    else:
        # A client that did not negotiate the extension sees exactly the standard reply.
        _, plain = negotiate(
            VersionPayload(0, 2, client_text), ServerCapabilities(migration_data_fd=False)
        )
        assert reply == plain


def test_qemu_never_gets_data_fd() -> None:
    version = VersionPayload.unpack(payload_of(QEMU_VERSION_REQUEST))
    _, reply = negotiate(version, ServerCapabilities(migration_data_fd=True))
    assert reply.json_text is not None and "data_fd" not in reply.json_text


# -- ServerCapabilities guards ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_msg_fds": 0},
        {"max_msg_fds": 17},
        {"max_data_xfer_size": 4095},
        {"max_data_xfer_size": 64 * 1024 * 1024 + 1},
        {"max_dma_maps": 0},
        {"max_dma_maps": 65536},
        {"pgsizes": 0},
        {"pgsizes": 2048},
        {"pgsizes": 4096 + 2048},
    ],
)
def test_server_capabilities_out_of_qemu_range(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerCapabilities(**kwargs)


def test_server_capabilities_to_json() -> None:
    text = ServerCapabilities(
        write_multiple=False,
        migration_pgsize=None,
        migration_data_fd=False,
        migration_precopy_info=False,
        error_detail=False,
    ).to_json()
    assert json.loads(text) == {
        "capabilities": {
            "max_msg_fds": 8,
            "max_data_xfer_size": 1048576,
            "pgsizes": 4096,
            "max_dma_maps": 65535,
        }
    }
    assert " " not in text
    full = json.loads(ServerCapabilities().to_json())  # the defaults offer everything
    assert full["capabilities"]["write_multiple"] is True
    assert full["capabilities"]["error_detail"] is True
    assert full["capabilities"]["migration"] == {
        "pgsize": 4096,
        "data_fd": True,
        "precopy_info": True,
    }
    # QEMU rejects a reply longer than its request (which offers both migration extensions
    # too, not error_detail: only our client asks for that one, and it has no such limit)
    assert len(ServerCapabilities(error_detail=False).to_json()) < 200
