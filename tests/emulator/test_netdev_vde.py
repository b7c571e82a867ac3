"""The vde netdev (emulator.netdev_vde) against a real vde_switch: plug-in protocol,
frames both ways through the switch, MAC learning, refusals, the switch going away."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from emulator import netdev_vde
from emulator.netdev import NetdevError, parse_netdev, setup_netdevs
from emulator.netdev_vde import (
    SWITCH_MAGIC,
    VdeBackend,
    decode_reply,
    encode_request,
    port_of,
)
from emulator.testing.vde_switch import VdeSwitch
from tests.emulator.test_netdev import FakeNic, frame_index, make_frame, wait_until

MAC_A = bytes.fromhex("020000000a0a")
MAC_B = bytes.fromhex("020000000b0b")
MAC_C = bytes.fromhex("020000000c0c")

StartSwitch = Callable[..., VdeSwitch]


def plugged(switch: VdeSwitch, *names: str, **options: object) -> list[tuple[VdeBackend, FakeNic]]:
    pairs = []
    for name in names:
        backend = VdeBackend(name, sock=switch.directory, **options)  # type: ignore[arg-type]
        nic = FakeNic(name)
        backend.attach(nic)
        pairs.append((backend, nic))
    return pairs


def mac_text(mac: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in mac)


# -- spec and codec ------------------------------------------------------------------------


def test_parse_vde_specs() -> None:
    backend = parse_netdev("vde,id=v0,sock=/run/sw,port=7,mode=660,reconnect=0.5,txqueue=9")
    assert isinstance(backend, VdeBackend)
    assert backend.switch_dir == Path("/run/sw")
    assert (backend.requested_port, backend.mode, backend.reconnect) == (7, 0o660, 0.5)
    assert backend.tx_queue_limit == 9
    assert parse_netdev("vde,id=v0,sock=/run/sw").describe() == (
        "netdev v0: vde switch /run/sw, unplugged"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("vde,id=v0", "vde needs sock=DIR"),
        ("vde,id=v0,sock=", "vde needs sock=DIR"),
        ("vde,id=v0,sock=/s,port=x", "port='x' is not from 0 to 65535"),
        ("vde,id=v0,sock=/s,port=65536", "port='65536' is not from 0 to 65535"),
        ("vde,id=v0,sock=/s,mode=9", "mode='9' is not an octal mode"),
        ("vde,id=v0,sock=/s,mode=1777", "mode='1777' is not an octal mode"),
        ("vde,id=v0,sock=/s,reconnect=0", "reconnect='0' is not a number of seconds"),
        ("vde,id=v0,sock=/s,group=kvm", r"unknown option\(s\) group for vde"),
        ("vde,id=v0,sock=/" + "d" * 90, "too long for the socket paths inside it"),
    ],
)
def test_bad_vde_specs_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(NetdevError, match=message):
        parse_netdev(spec)


def test_request_layout() -> None:
    request = encode_request("/sw/.me", 5, "hello")
    magic, version, kind, family = struct.unpack_from("=IIIH", request)
    assert (magic, version, kind, family) == (SWITCH_MAGIC, 3, 5 << 8, socket.AF_UNIX)
    assert request[14:122] == b"/sw/.me".ljust(108, b"\0")
    assert request[122:] == b"hello\0"


@given(st.binary(min_size=1, max_size=107).filter(lambda path: b"\0" not in path))
def test_reply_decodes_any_socket_path(path: bytes) -> None:
    reply = struct.pack("=H", socket.AF_UNIX) + path.ljust(108, b"\0")
    assert os.fsencode(decode_reply(reply)) == path


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"", "0 bytes instead of 110"),
        (struct.pack("=H", socket.AF_INET) + bytes(108), "family 2 is not AF_UNIX"),
        (struct.pack("=H", socket.AF_UNIX) + bytes(108), "empty socket path"),
    ],
)
def test_bad_replies(reply: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_reply(reply)


def test_port_of_switch_socket_names() -> None:
    assert port_of("/sw/003.12") == 3
    assert port_of("/sw/odd") == 0


# -- against vde_switch ----------------------------------------------------------------------


def test_no_switch_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NetdevError, match=r"no vde switch at .*start one with vde_switch -s"):
        VdeBackend("v", sock=tmp_path / "nothing").open()


def our_sockets(switch: VdeSwitch) -> list[str]:
    return [path.name for path in switch.directory.iterdir() if path.name.startswith(".emu-")]


def test_a_refused_port_is_an_error_and_leaves_nothing_behind(
    vde_switches: StartSwitch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netdev_vde, "HANDSHAKE_TIMEOUT", 0.5)
    switch = vde_switches()  # 32 ports
    first = VdeBackend("first", sock=switch.directory, port=5)
    first.open()
    try:
        assert first.port == 5
        with pytest.raises(NetdevError, match=r"within 0.5s .it cannot give port 40"):
            VdeBackend("second", sock=switch.directory, port=40).open()
        assert len(our_sockets(switch)) == 1  # the refused backend removed its socket
    finally:
        first.close()
    assert not our_sockets(switch)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", r"refused a port \(no such port, none free, or it may not use"),
        (struct.pack("=H", socket.AF_UNIX) + bytes(108), "answered with an empty socket path"),
        (b"\x01\x00/x", "hung up|refused"),  # short answer, then hang-up
    ],
)
def test_a_socket_that_is_not_a_switch_is_an_error(
    tmp_path: Path, answer: bytes, message: str
) -> None:
    """Something listens on DIR/ctl, reads our request and answers ``answer`` (then hangs
    up)."""
    (tmp_path / "sw").mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "sw" / "ctl"))
    listener.listen(1)
    listener.settimeout(5)
    requests: list[bytes] = []

    def answer_once() -> None:
        conn, _ = listener.accept()
        requests.append(conn.recv(4096))
        conn.sendall(answer)
        conn.close()

    thread = threading.Thread(target=answer_once)
    thread.start()
    try:
        with pytest.raises(NetdevError, match=message):
            VdeBackend("v", sock=tmp_path / "sw").open()
    finally:
        thread.join()
        listener.close()
    assert requests[0].startswith(struct.pack("=III", SWITCH_MAGIC, 3, 0))
    assert not [p for p in (tmp_path / "sw").iterdir() if p.name.startswith(".emu-")]


async def test_frames_cross_the_switch_both_ways_in_order(vde_switches: StartSwitch) -> None:
    switch = vde_switches()
    (a, nic_a), (b, nic_b) = plugged(switch, "a", "b")
    to_b = [make_frame(i, MAC_A, MAC_B, 60 + (i * 37) % 1455) for i in range(300)]
    to_a = [make_frame(i, MAC_B, MAC_A, 1514 - i) for i in range(200)]
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        assert a.link_up and b.link_up and {a.port, b.port} == {1, 2}
        for index, frame in enumerate(to_b):
            assert nic_a.send(frame)
            if index < len(to_a):
                assert nic_b.send(to_a[index])
            if index % 50 == 49:
                await trio.sleep(0.01)  # the switch's queue towards a port is bounded
        await wait_until(lambda: len(nic_b.received) == 300 and len(nic_a.received) == 200)
        assert nic_b.received == to_b
        assert nic_a.received == to_a
        assert a.stats.tx_frames == 300 and a.stats.rx_frames == 200
        assert "port" in a.describe()
        nursery.cancel_scope.cancel()


async def test_the_switch_learns_where_a_mac_is(vde_switches: StartSwitch) -> None:
    """A switch (not a hub) sends a frame for a learned MAC to that port only: this is what
    a migrated NIC's announcement must update."""
    switch = vde_switches()
    (a, nic_a), (b, nic_b), (c, nic_c) = plugged(switch, "a", "b", "c")
    async with trio.open_nursery() as nursery:
        for backend in (a, b, c):
            await nursery.start(backend.run)
        nic_a.send(make_frame(1, MAC_A, b"\xff" * 6))  # broadcast: everyone, and A learned
        await wait_until(lambda: len(nic_b.received) == 1 and len(nic_c.received) == 1)
        table = await trio.to_thread.run_sync(switch.mac_table)
        assert table[mac_text(MAC_A)] == a.port
        nic_b.send(make_frame(2, MAC_B, MAC_A))
        await wait_until(lambda: len(nic_a.received) == 1)
        await trio.sleep(0.1)
        assert [frame_index(f) for f in nic_c.received] == [1]  # not flooded to C
        nursery.cancel_scope.cancel()


async def test_switch_going_away_and_coming_back(
    vde_switches: StartSwitch, monkeypatch: pytest.MonkeyPatch
) -> None:
    switch = vde_switches(name="sw")
    (a, nic_a), (b, nic_b) = plugged(switch, "a", "b", reconnect=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        assert nic_a.send(make_frame(1, MAC_A, MAC_B))
        await wait_until(lambda: len(nic_b.received) == 1)
        await trio.to_thread.run_sync(switch.stop)
        await wait_until(lambda: not a.link_up and not b.link_up)
        assert not nic_a.send(make_frame(2, MAC_A, MAC_B))
        assert a.stats.extra["tx_link_down"] >= 1
        assert a.describe().endswith("unplugged")
        await trio.to_thread.run_sync(lambda: vde_switches(name="sw"))
        await wait_until(lambda: a.link_up and b.link_up)
        assert nic_a.send(make_frame(3, MAC_A, MAC_B))
        await wait_until(lambda: len(nic_b.received) == 2)
        assert frame_index(nic_b.received[-1]) == 3
        nursery.cancel_scope.cancel()
    assert not our_sockets(switch)


async def test_a_switch_that_does_not_answer_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netdev_vde, "HANDSHAKE_TIMEOUT", 0.2)
    (tmp_path / "sw").mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "sw" / "ctl"))
    listener.listen(1)  # accepted by the kernel, never answered
    try:
        with pytest.raises(NetdevError, match=r"did not answer within 0.2s"):
            VdeBackend("v", sock=tmp_path / "sw").open()
    finally:
        listener.close()


def test_setup_netdevs_plugs_a_nic_in(vde_switches: StartSwitch) -> None:
    switch = vde_switches()
    nic = FakeNic("n0")
    [backend] = setup_netdevs([f"vde,id=n0,sock={switch.directory}"], [nic])
    try:
        assert backend.link_up and nic.port is backend
        assert "vfio-user-emu netdev n0" in switch.command("port/allprint")
    finally:
        backend.close()
