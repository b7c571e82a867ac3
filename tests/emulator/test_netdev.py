"""Network backends (emulator.netdev) with fake NICs: dgram, stream, tap, queues, pcap, CLI."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio

from devices.net import NetPort
from devices.testdev import TestDev
from emulator import cli, netdev
from emulator.netdev import (
    MAX_FRAME_SIZE,
    DgramBackend,
    NetBackend,
    NetdevError,
    StreamBackend,
    TapBackend,
    parse_netdev,
    setup_netdevs,
    split_spec,
)
from emulator.pcap import read_pcap
from emulator.server import DeviceServer

REPO = Path(__file__).resolve().parents[2]
MAC_A = bytes.fromhex("020000000a0a")
MAC_B = bytes.fromhex("020000000b0b")
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental


def make_frame(index: int, src: bytes = MAC_A, dst: bytes = MAC_B, size: int = 60) -> bytes:
    head = dst + src + ETHERTYPE + index.to_bytes(4, "big")
    return head + bytes(max(0, size - len(head)))


def frame_index(frame: bytes) -> int:
    return int.from_bytes(frame[14:18], "big")


class FakeNic:
    """The NetDevice side, as the e1000 model implements it."""

    def __init__(self, netdev_id: str | None = "n0") -> None:
        self.netdev_id = netdev_id
        self.port: NetPort | None = None
        self.received: list[bytes] = []
        self.on_receive: Callable[[bytes], None] | None = None

    def attach_net(self, port: NetPort) -> None:
        self.port = port

    def net_receive(self, frame: bytes) -> None:
        self.received.append(frame)
        if self.on_receive is not None:
            self.on_receive(frame)

    def send(self, frame: bytes) -> bool:
        assert self.port is not None
        return self.port.transmit(frame)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.002)


def dgram_pair(
    tmp_path: Path, **options: object
) -> tuple[DgramBackend, FakeNic, DgramBackend, FakeNic]:
    a_path, b_path = tmp_path / "a.sock", tmp_path / "b.sock"
    a_options = {k: v for k, v in options.items() if not k.startswith("b_")}
    b_options = {k[2:]: v for k, v in options.items() if k.startswith("b_")}
    a = DgramBackend("a", local=a_path, remote=b_path, **a_options)
    b = DgramBackend("b", local=b_path, remote=a_path, **b_options)
    nic_a, nic_b = FakeNic("a"), FakeNic("b")
    a.attach(nic_a)
    b.attach(nic_b)
    return a, nic_a, b, nic_b


async def start_pair(nursery: trio.Nursery, a: NetBackend, b: NetBackend) -> None:
    await nursery.start(a.run)
    await nursery.start(b.run)
    await wait_until(lambda: a.link_up and b.link_up)


async def link_up(nic: FakeNic, backend: NetBackend) -> None:
    """Send probe frames (index 0xffffffff) until the backend reaches its peer."""
    with trio.fail_after(5):
        while not (nic.send(make_frame(0xFFFFFFFF)) and backend.link_up):
            await trio.sleep(0.02)


def without_probes(frames: Sequence[bytes]) -> list[bytes]:
    return [f for f in frames if frame_index(f) != 0xFFFFFFFF]


# -- specs ---------------------------------------------------------------------------------


def test_split_spec_comma_escape() -> None:
    assert split_spec("dgram,id=a,local=/x,,y,remote=/z") == [
        "dgram",
        "id=a",
        "local=/x,y",
        "remote=/z",
    ]


def test_parse_valid_specs(tmp_path: Path) -> None:
    d = parse_netdev(f"dgram,id=n0,local={tmp_path}/a,remote={tmp_path}/b,txqueue=8,rxqueue=0")
    assert isinstance(d, DgramBackend)
    assert (d.netdev_id, d.local, d.remote) == ("n0", tmp_path / "a", tmp_path / "b")
    assert (d.tx_queue_limit, d.rx_queue_limit) == (8, 0)
    q = parse_netdev(
        f"dgram,id=q,local.type=unix,local.path={tmp_path}/a,remote.type=unix,"
        f"remote.path={tmp_path}/b,pcap={tmp_path}/q.pcap"
    )
    assert isinstance(q, DgramBackend) and q.remote == tmp_path / "b"
    assert q.pcap_path == tmp_path / "q.pcap"
    s = parse_netdev(f"stream,id=s,path={tmp_path}/s,server=on")
    assert isinstance(s, StreamBackend) and s.server and s.path == tmp_path / "s"
    c = parse_netdev(f"stream,id=c,addr.type=unix,addr.path={tmp_path}/s,reconnect=0.25")
    assert isinstance(c, StreamBackend) and not c.server and c.reconnect == 0.25
    t = parse_netdev("tap,id=t,ifname=emu7")
    assert isinstance(t, TapBackend) and t.ifname == "emu7"
    assert "tap" in t.describe() and "emu7" in t.describe()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "missing the type"),
        ("id=n0", "start with the type"),
        ("socket,id=n0", "unknown netdev type 'socket' (known: dgram, stream, tap, vde)"),
        ("dgram,local=/tmp/a,remote=/tmp/b", "missing id=ID"),
        ("dgram,id=n0,remote=/tmp/b", "dgram needs local=PATH"),
        ("dgram,id=n0", "dgram needs local=PATH and remote=PATH"),
        ("dgram,id=n0,local=/tmp/a,remote=/tmp/a", "local and remote are the same path"),
        ("dgram,id=n0,local=/tmp/a,remote=/tmp/b,mtu=9000", "unknown option(s) mtu for dgram"),
        ("dgram,id=n0,local=/tmp/a,local=/tmp/c,remote=/tmp/b", "'local' given twice"),
        ("dgram,id=n0,local=/tmp/a,remote", "option 'remote' is not key=value"),
        ("dgram,id=n0,local.type=inet,local.path=x,remote=/b", "only unix addresses"),
        ("dgram,id=n0,local=/a,local.path=/c,remote=/b", "not both"),
        ("dgram,id=n0,local=/tmp/" + "x" * 120 + ",remote=/tmp/b", "longer than a UNIX"),
        ("dgram,id=n0,local=/a,remote=/b,txqueue=0", "txqueue='0' is not a number"),
        ("dgram,id=n0,local=/a,remote=/b,rxqueue=lots", "rxqueue='lots' is not a number"),
        ("dgram,id=n0,local=/a,remote=/b,pcap=", "pcap= needs a file name"),
        ("stream,id=s", "stream needs path=PATH"),
        ("stream,id=s,path=/tmp/s,server=maybe", "server='maybe' is not on or off"),
        ("stream,id=s,path=/tmp/s,server=on,reconnect=1", "reconnect= is for server=off"),
        ("stream,id=s,path=/tmp/s,reconnect=-1", "reconnect='-1' is not a number of seconds"),
        ("stream,id=s,path=/tmp/s,local=/x", "unknown option(s) local for stream"),
        ("tap,id=t,ifname=" + "x" * 16, "ifname must be 1-15 characters"),
        ("tap,id=t,ifname=a/b", "is not a valid name"),
        ("tap,id=t,script=/etc/qemu-ifup", "unknown option(s) script for tap"),
    ],
)
def test_bad_specs_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(NetdevError) as info:
        parse_netdev(spec)
    assert message in str(info.value)


def test_setup_checks_wiring_before_creating_anything(tmp_path: Path) -> None:
    spec = f"dgram,id=n0,local={tmp_path}/a,remote={tmp_path}/b"
    with pytest.raises(NetdevError, match=r"no --netdev \.\.\.,id=n1 was given"):
        setup_netdevs([spec], [FakeNic("n1")])
    with pytest.raises(NetdevError, match="no device uses it"):
        setup_netdevs([spec], [FakeNic(None)])
    with pytest.raises(NetdevError, match="given twice"):
        setup_netdevs([spec, spec], [FakeNic()])
    with pytest.raises(NetdevError, match="used by two devices"):
        setup_netdevs([spec], [FakeNic(), FakeNic()])
    not_a_nic = TestDev()
    not_a_nic.netdev_id = "n0"  # type: ignore[attr-defined]
    with pytest.raises(NetdevError, match="not a network device"):
        setup_netdevs([spec], [not_a_nic])
    pcap = f"pcap={tmp_path}/x.pcap"
    with pytest.raises(NetdevError, match="also the capture file"):
        setup_netdevs(
            [f"{spec},{pcap}", f"dgram,id=n1,local={tmp_path}/c,remote={tmp_path}/d,{pcap}"],
            [FakeNic("n0"), FakeNic("n1")],
        )
    assert list(tmp_path.iterdir()) == []


def test_setup_failure_closes_what_it_opened(tmp_path: Path) -> None:
    good = f"dgram,id=n0,local={tmp_path}/a,remote={tmp_path}/b"
    bad = f"dgram,id=n1,local={tmp_path}/missing/c,remote={tmp_path}/d"
    with pytest.raises(NetdevError, match=r"cannot bind local=.*No such file or directory"):
        setup_netdevs([good, bad], [FakeNic("n0"), FakeNic("n1")])
    assert not (tmp_path / "a").exists()
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(NetdevError, match="exists and is not a stale datagram socket"):
        setup_netdevs([f"dgram,id=n0,local={tmp_path}/plain,remote=/b"], [FakeNic()])
    with pytest.raises(NetdevError, match="cannot write pcap file"):
        setup_netdevs([f"{good},pcap={tmp_path}/missing/x.pcap"], [FakeNic()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_setup_opens_and_attaches(tmp_path: Path) -> None:
    nic = FakeNic()
    (backend,) = setup_netdevs([f"dgram,id=n0,local={tmp_path}/a,remote={tmp_path}/b"], [nic])
    try:
        assert nic.port is backend and backend.device is nic
        assert (tmp_path / "a").is_socket()
        assert not backend.link_up  # the peer is not there yet
    finally:
        backend.close()
    assert not (tmp_path / "a").exists()


# -- dgram ---------------------------------------------------------------------------------


async def test_dgram_pair_exchanges_frames_both_ways_in_order(tmp_path: Path) -> None:
    a, nic_a, b, nic_b = dgram_pair(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        assert b.link_up  # a was there when b started
        await wait_until(lambda: a.link_up)  # b was not when a started: a retries
        to_b = [make_frame(i, MAC_A, MAC_B, 60 + i) for i in range(200)]
        to_a = [make_frame(i, MAC_B, MAC_A, 1514 - i) for i in range(200)]
        for x, y in zip(to_b, to_a, strict=True):
            assert nic_a.send(x)
            assert nic_b.send(y)
            if frame_index(x) % 16 == 0:
                await trio.sleep(0)
        await wait_until(lambda: len(nic_b.received) == 200 and len(nic_a.received) == 200)
        assert nic_b.received == to_b
        assert nic_a.received == to_a
        assert a.stats.tx_frames == b.stats.rx_frames == 200
        assert a.stats.rx_bytes == sum(map(len, to_a))
        assert a.stats.tx_dropped == b.stats.tx_dropped == 0
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "a.sock").exists() and not (tmp_path / "b.sock").exists()
    assert not nic_a.send(make_frame(1))  # closed: dropped, counted
    assert a.stats.extra["tx_link_down"] == 1


async def test_dgram_peer_late_and_restarting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(netdev, "DGRAM_RETRY_INTERVAL", 0.02)
    a, nic_a, b, nic_b = dgram_pair(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        assert not a.link_up
        assert not nic_a.send(make_frame(1))  # nobody at remote yet
        assert a.stats.extra["tx_link_down"] == 1
        async with trio.open_nursery() as b_nursery:
            await b_nursery.start(b.run)
            await link_up(nic_a, a)
            assert nic_a.send(make_frame(2))
            await wait_until(lambda: make_frame(2) in nic_b.received)
            b_nursery.cancel_scope.cancel()
        # b is gone: the first send notices, later ones are dropped while it is away
        assert not nic_a.send(make_frame(3))
        assert not a.link_up
        b2 = DgramBackend("b2", local=b.local, remote=a.local)
        nic_b2 = FakeNic("b2")
        b2.attach(nic_b2)
        async with trio.open_nursery() as b_nursery:
            await b_nursery.start(b2.run)
            await link_up(nic_a, a)
            assert nic_a.send(make_frame(4))
            await wait_until(lambda: make_frame(4) in nic_b2.received)
            # and b2 reaches a, whose receiving socket never changed
            assert nic_b2.send(make_frame(5, MAC_B, MAC_A))
            await wait_until(lambda: make_frame(5, MAC_B, MAC_A) in nic_a.received)
            b_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_dgram_back_pressure_bounded_queue(tmp_path: Path) -> None:
    a, nic_a, b, nic_b = dgram_pair(tmp_path, tx_queue=16)
    b.open()  # bound, but nobody reads it yet
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        accepted = [f for f in map(make_frame, range(500)) if nic_a.send(f)]
        await trio.sleep(0.05)
        # the kernel holds a few, our queue 16, the rest are refused and counted
        assert 16 < len(accepted) < 500
        assert a.tx_backlog == 16
        refused = 500 - len(accepted)
        assert a.stats.tx_dropped == refused == a.stats.extra["tx_queue_full"]
        assert a.stats.tx_frames == len(accepted) - 16
        await nursery.start(b.run)  # the peer reads: everything accepted arrives, in order
        await wait_until(lambda: len(nic_b.received) == len(accepted))
        assert nic_b.received == accepted
        await wait_until(lambda: a.tx_backlog == 0)
        assert a.stats.tx_frames == len(accepted)
        assert nic_a.send(make_frame(1000))  # flowing again
        await wait_until(lambda: len(nic_b.received) == len(accepted) + 1)
        nursery.cancel_scope.cancel()


async def test_bad_frame_sizes_are_dropped_and_counted(tmp_path: Path) -> None:
    a, nic_a, b, nic_b = dgram_pair(tmp_path)
    async with trio.open_nursery() as nursery:
        await start_pair(nursery, a, b)
        assert not nic_a.send(bytes(13))
        assert not nic_a.send(bytes(MAX_FRAME_SIZE + 1))
        assert a.stats.extra["tx_bad_size"] == 2 and a.stats.tx_dropped == 2
        biggest = make_frame(7, size=MAX_FRAME_SIZE)
        smallest = make_frame(1)[:14]
        assert nic_a.send(smallest)
        assert nic_a.send(biggest)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        with raw:
            raw.sendto(bytes(10), str(b.local))
            raw.sendto(b"", str(b.local))
            raw.sendto(bytes(MAX_FRAME_SIZE + 1), str(b.local))
            raw.sendto(make_frame(2), str(b.local))
        await wait_until(lambda: len(nic_b.received) == 3)
        assert nic_b.received == [smallest, biggest, make_frame(2)]
        assert b.stats.extra["rx_bad_size"] == 3
        assert b.stats.rx_frames == 3
        nursery.cancel_scope.cancel()


# -- not accepting -------------------------------------------------------------------------


async def test_frames_queue_while_not_accepting_bounded_in_order(tmp_path: Path) -> None:
    a, nic_a, b, nic_b = dgram_pair(tmp_path, b_rx_queue=8)
    async with trio.open_nursery() as nursery:
        await start_pair(nursery, a, b)
        assert b.accepting
        assert nic_b.port is not None
        nic_b.port.set_accepting(False)  # e.g. migration STOP, or RX disabled
        for i in range(20):
            assert nic_a.send(make_frame(i))
        await wait_until(lambda: b.stats.rx_frames == 20)
        assert nic_b.received == []
        assert b.rx_backlog == 8
        assert b.stats.rx_queued_dropped == 12
        nic_b.port.set_accepting(True)
        await wait_until(lambda: len(nic_b.received) == 8)
        assert nic_b.received == [make_frame(i) for i in range(8)]
        for i in range(20, 25):
            assert nic_a.send(make_frame(i))
        await wait_until(lambda: len(nic_b.received) == 13)
        assert [frame_index(f) for f in nic_b.received] == [*range(8), *range(20, 25)]
        nursery.cancel_scope.cancel()


async def test_device_stops_accepting_in_the_middle_of_delivery(tmp_path: Path) -> None:
    a, nic_a, b, nic_b = dgram_pair(tmp_path)
    assert nic_b.port is not None
    port = nic_b.port

    def stop_after_three(frame: bytes) -> None:
        if len(nic_b.received) % 3 == 0:
            port.set_accepting(False)

    async with trio.open_nursery() as nursery:
        await start_pair(nursery, a, b)
        port.set_accepting(False)
        for i in range(10):
            assert nic_a.send(make_frame(i))
        await wait_until(lambda: b.rx_backlog == 10)
        nic_b.on_receive = stop_after_three
        port.set_accepting(True)
        await wait_until(lambda: len(nic_b.received) == 3)
        await trio.sleep(0.02)
        assert len(nic_b.received) == 3 and b.rx_backlog == 7
        # arriving while others wait: behind them
        assert nic_a.send(make_frame(10))
        await wait_until(lambda: b.rx_backlog == 8)
        nic_b.on_receive = None
        port.set_accepting(True)
        await wait_until(lambda: len(nic_b.received) == 11)
        assert [frame_index(f) for f in nic_b.received] == list(range(11))
        nursery.cancel_scope.cancel()


async def test_device_can_refuse_frames_from_attach_and_errors_do_not_stop_the_backend(
    tmp_path: Path,
) -> None:
    class SlowStartNic(FakeNic):
        def attach_net(self, port: NetPort) -> None:
            super().attach_net(port)
            port.set_accepting(False)  # RX disabled at reset

        def net_receive(self, frame: bytes) -> None:
            super().net_receive(frame)
            if frame_index(frame) == 1:
                raise RuntimeError("device bug")

    a = DgramBackend("a", local=tmp_path / "a", remote=tmp_path / "b")
    b = DgramBackend("b", local=tmp_path / "b", remote=tmp_path / "a")
    nic_a, nic_b = FakeNic("a"), SlowStartNic("b")
    a.attach(nic_a)
    b.attach(nic_b)
    assert not b.accepting
    async with trio.open_nursery() as nursery:
        await start_pair(nursery, a, b)
        for i in range(3):
            assert nic_a.send(make_frame(i))
        await wait_until(lambda: b.rx_backlog == 3)
        assert nic_b.port is not None
        nic_b.port.set_accepting(True)
        await wait_until(lambda: len(nic_b.received) == 3)
        assert b.stats.extra["rx_device_errors"] == 1
        assert nic_a.send(make_frame(3))
        await wait_until(lambda: len(nic_b.received) == 4)
        nursery.cancel_scope.cancel()


# -- stream --------------------------------------------------------------------------------


def read_stream_frames(data: bytes) -> tuple[list[bytes], bytes]:
    frames = []
    while len(data) >= 4:
        (length,) = struct.unpack_from(">I", data)
        if len(data) < 4 + length:
            break
        frames.append(data[4 : 4 + length])
        data = data[4 + length :]
    return frames, data


async def test_stream_server_and_client_exchange_frames(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    server = StreamBackend("s", path=path, server=True)
    client = StreamBackend("c", path=path, reconnect=0.02)
    nic_s, nic_c = FakeNic("s"), FakeNic("c")
    server.attach(nic_s)
    client.attach(nic_c)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o600
        assert not nic_s.send(make_frame(0))  # nobody connected: dropped
        await nursery.start(client.run)
        await wait_until(lambda: server.link_up and client.link_up)
        to_s = [make_frame(i, MAC_A, MAC_B, 14 + i * 7) for i in range(300)]
        to_c = [make_frame(i, MAC_B, MAC_A, 1514) for i in range(300)]
        for x, y in zip(to_s, to_c, strict=True):
            assert nic_c.send(x)
            assert nic_s.send(y)
        await wait_until(lambda: len(nic_s.received) == 300 and len(nic_c.received) == 300)
        assert nic_s.received == to_s
        assert nic_c.received == to_c
        assert server.stats.extra["connections"] == client.stats.extra["connections"] == 1
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_stream_framing_split_reads_short_and_oversized(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    server = StreamBackend("s", path=path, server=True)
    nic = FakeNic("s")
    server.attach(nic)
    frames = [make_frame(1, size=60), make_frame(2, size=1514), make_frame(3, size=14)]
    wire = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await peer.connect(str(path))
        # byte by byte across the length prefix and the frame, then bigger pieces
        for cut in [1, 2, 3, 5, 9, 20, 64, 500, 2000, len(wire)]:
            piece, wire = wire[:cut], wire[cut:]
            if piece:
                await peer.send(piece)
                await trio.sleep(0.005)  # separate reads on the backend's side
        await wait_until(lambda: len(nic.received) == 3)
        assert nic.received == frames
        # a frame too short for Ethernet is skipped, the stream goes on
        await peer.send(struct.pack(">I", 5) + b"short" + struct.pack(">I", 60) + frames[0])
        await wait_until(lambda: len(nic.received) == 4)
        assert server.stats.extra["rx_bad_size"] == 1
        # the server's frames are length-prefixed
        assert nic.send(make_frame(9, MAC_B, MAC_A))
        with trio.fail_after(5):
            data = b""
            while len(data) < 64:
                data += await peer.recv(4096)
        assert read_stream_frames(data) == ([make_frame(9, MAC_B, MAC_A)], b"")
        # an impossible length: the stream is not trusted any more, the peer is dropped
        await peer.send(struct.pack(">I", MAX_FRAME_SIZE + 1) + bytes(100))
        with trio.fail_after(5):
            assert await peer.recv(10) == b""
        peer.close()
        assert server.stats.extra["rx_bad_size"] == 2
        await wait_until(lambda: not server.link_up)
        # and the next peer is served
        peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await peer.connect(str(path))
        await peer.send(struct.pack(">I", 60) + make_frame(10))
        await wait_until(lambda: len(nic.received) == 5)
        assert server.stats.extra["connections"] == 2
        peer.close()
        nursery.cancel_scope.cancel()


async def test_stream_back_pressure_when_peer_does_not_read(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    server = StreamBackend("s", path=path, server=True, tx_queue=32)
    nic = FakeNic("s")
    server.attach(nic)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await peer.connect(str(path))
        await wait_until(lambda: server.link_up)
        accepted = []
        for i in range(5000):
            frame = make_frame(i, MAC_B, MAC_A, 1000 + i % 514)
            if nic.send(frame):
                accepted.append(frame)
        assert len(accepted) < 5000
        assert server.tx_backlog == 32
        assert server.stats.tx_dropped == 5000 - len(accepted)
        assert server.stats.extra["tx_queue_full"] == 5000 - len(accepted)
        # the peer reads: exactly what was accepted arrives, whole and in order
        data = b""
        with trio.fail_after(10):
            while True:
                frames, _ = read_stream_frames(data)
                if len(frames) >= len(accepted):
                    break
                data += await peer.recv(1 << 20)
        assert frames == accepted
        await wait_until(lambda: server.tx_backlog == 0)
        assert server.stats.tx_frames == len(accepted)
        peer.close()
        nursery.cancel_scope.cancel()


async def test_stream_client_reconnects_and_drops_what_was_queued(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    client = StreamBackend("c", path=path, reconnect=0.02)
    nic_c = FakeNic("c")
    client.attach(nic_c)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)  # nobody listens yet: it keeps trying
        await trio.sleep(0.05)
        assert not client.link_up
        assert not nic_c.send(make_frame(0))
        for generation in range(2):
            server = StreamBackend(f"s{generation}", path=path, server=True)
            nic_s = FakeNic(f"s{generation}")
            server.attach(nic_s)
            async with trio.open_nursery() as server_nursery:
                await server_nursery.start(server.run)
                await wait_until(lambda: client.link_up)
                assert nic_c.send(make_frame(generation + 1))
                received = nic_s.received
                await wait_until(lambda: len(received) == 1)  # noqa: B023
                server_nursery.cancel_scope.cancel()
            await wait_until(lambda: not client.link_up)
        assert client.stats.extra["connections"] == 2
        nursery.cancel_scope.cancel()


async def test_stream_queued_frames_dropped_when_peer_leaves(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    server = StreamBackend("s", path=path, server=True, tx_queue=8)
    nic = FakeNic("s")
    server.attach(nic)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await peer.connect(str(path))
        await wait_until(lambda: server.link_up)
        while server.tx_backlog < 8:
            nic.send(make_frame(1, size=1514))
        dropped_before = server.stats.tx_dropped
        peer.close()
        await wait_until(lambda: not server.link_up)
        assert server.tx_backlog == 0
        assert server.stats.tx_dropped == dropped_before + 8
        nursery.cancel_scope.cancel()


async def test_stream_server_path_in_use_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    first = StreamBackend("s", path=path, server=True)
    first.open()
    try:
        with pytest.raises(NetdevError, match="a server is listening on it"):
            StreamBackend("t", path=path, server=True).open()
    finally:
        first.close()
    assert not path.exists()


# -- pcap ----------------------------------------------------------------------------------


async def test_pcap_records_both_directions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(netdev, "PCAP_FLUSH_INTERVAL", 0.02)
    capture = tmp_path / "a.pcap"
    a, nic_a, b, nic_b = dgram_pair(tmp_path, pcap=capture)
    sent = [make_frame(i, MAC_A, MAC_B, 60 + 100 * i) for i in range(5)]
    received = [make_frame(i, MAC_B, MAC_A, 1514 - i) for i in range(4)]
    async with trio.open_nursery() as nursery:
        await start_pair(nursery, a, b)
        for frame in sent:
            assert nic_a.send(frame)
        for frame in received:
            assert nic_b.send(frame)
        await wait_until(lambda: len(nic_a.received) == 4 and len(nic_b.received) == 5)
        # flushed while running: readable by tcpdump -r on the live file
        await wait_until(lambda: len(read_pcap(capture).records) == 9)
        assert not nic_a.send(bytes(5))  # dropped frames are not on the wire
        nursery.cancel_scope.cancel()
    pcap = read_pcap(capture)
    assert pcap.linktype == 1 and pcap.version == (2, 4)
    assert len(pcap.records) == 9
    outgoing = [f for f in pcap.frames if f[6:12] == MAC_A]
    incoming = [f for f in pcap.frames if f[6:12] == MAC_B]
    assert outgoing == sent
    assert incoming == received
    assert all(r.original_length == len(r.frame) for r in pcap.records)
    stamps = [r.timestamp for r in pcap.records]
    assert stamps == sorted(stamps) and abs(stamps[0] - time.time()) < 60
    tool = shutil.which("tshark") or shutil.which("tcpdump")
    if tool is None:
        return  # test_pcap.py reports the skip
    command = [tool, "-r", str(capture)] if "tshark" in tool else [tool, "-nr", str(capture)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    # One summary line per frame; tcpdump adds indented hex dumps for unknown ethertypes.
    summaries = [line for line in result.stdout.splitlines() if line and not line[0].isspace()]
    assert len(summaries) == 9


# -- tap -----------------------------------------------------------------------------------


def test_tap_without_tun_device_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netdev, "TUN_DEVICE", str(tmp_path / "no-tun"))
    with pytest.raises(NetdevError, match=r"no-tun does not exist \(no tun driver"):
        TapBackend("t").open()
    plain = tmp_path / "not-tun"
    plain.write_bytes(b"")
    monkeypatch.setattr(netdev, "TUN_DEVICE", str(plain))
    with pytest.raises(NetdevError, match="cannot create tap emu9"):
        TapBackend("t", ifname="emu9").open()


_TAP_SCRIPT = textwrap.dedent(
    """
    import socket, struct, subprocess, trio
    from emulator.netdev import TapBackend

    class Nic:
        netdev_id = "t0"
        def __init__(self):
            self.received = []
        def attach_net(self, port):
            self.port = port
        def net_receive(self, frame):
            self.received.append(frame)

    def checksum(data):
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    async def main():
        nic = Nic()
        tap = TapBackend("t0", ifname="emu0")
        tap.attach(nic)
        async with trio.open_nursery() as nursery:
            await nursery.start(tap.run)
            ip = ["ip", "link", "set", "emu0", "address", "02:00:00:00:00:01", "up"]
            subprocess.run(ip, check=True)
            subprocess.run(["ip", "addr", "add", "10.9.0.1/24", "dev", "emu0"], check=True)
            # receive: the kernel ARPs for 10.9.0.2 when we send it a datagram
            out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out.sendto(b"x", ("10.9.0.2", 9))
            with trio.fail_after(5):
                while not any(f[12:14] == b"\\x08\\x06" for f in nic.received):
                    await trio.sleep(0.01)
            # transmit: the device's UDP datagram reaches a socket in the namespace
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink.bind(("10.9.0.1", 5555))
            sink.setblocking(False)
            payload = b"hello from the device"
            udp = struct.pack("!HHHH", 4444, 5555, 8 + len(payload), 0) + payload
            header = struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                bytes([10, 9, 0, 2]), bytes([10, 9, 0, 1]),
            )
            header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
            ether = bytes.fromhex("020000000001020000000002") + b"\\x08\\x00"
            assert nic.port.transmit(ether + header + udp)
            with trio.fail_after(5):
                while True:
                    try:
                        data = sink.recv(100)
                        break
                    except BlockingIOError:
                        await trio.sleep(0.01)
            assert data == payload, data
            print("tap ok", tap.stats.rx_frames >= 1, tap.stats.tx_frames)
            nursery.cancel_scope.cancel()

    trio.run(main)
    """
)


def _namespace_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace and a tap"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip"
    probe = subprocess.run(
        ["unshare", "--net", "--", "ip", "tuntap", "add", "dev", "probe0", "mode", "tap"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot create a tap in a new network namespace: {probe.stderr.decode().strip()}"
    return None


def test_tap_in_own_network_namespace() -> None:
    reason = _namespace_unavailable()
    if reason is not None:
        pytest.skip(reason)
    result = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", _TAP_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "tap ok True 1" in result.stdout


# -- the server and the command line -------------------------------------------------------


async def test_backends_run_in_the_server_and_stop_with_it(tmp_path: Path) -> None:
    a, nic_a, b, nic_b = dgram_pair(tmp_path)
    server = DeviceServer(TestDev(), socket_path=tmp_path / "dev.sock", netdevs=[a])
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        await nursery.start(server.serve)
        assert a.link_up and (tmp_path / "a.sock").is_socket()
        await wait_until(lambda: b.link_up)
        assert nic_b.send(make_frame(1, MAC_B, MAC_A))
        await wait_until(lambda: len(nic_a.received) == 1)
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "a.sock").exists() and not (tmp_path / "dev.sock").exists()


class NicTestDev(TestDev):
    """A served device with a network side (stands in for the e1000 model)."""

    def __init__(self, netdev_id: str) -> None:
        super().__init__()
        self.netdev_id = netdev_id
        self.port: NetPort | None = None
        self.received: list[bytes] = []

    def attach_net(self, port: NetPort) -> None:
        self.port = port

    def net_receive(self, frame: bytes) -> None:
        self.received.append(frame)


async def test_cli_serve_with_netdev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = NicTestDev("n0")
    monkeypatch.setattr(cli, "create_device", lambda spec: device)
    peer = DgramBackend("peer", local=tmp_path / "peer", remote=tmp_path / "emu")
    nic = FakeNic("peer")
    peer.attach(nic)
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--socket-path",
            str(tmp_path / "dev.sock"),
            "--netdev",
            f"dgram,id=n0,local={tmp_path}/emu,remote={tmp_path}/peer,pcap={tmp_path}/n0.pcap",
        ]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        nursery.start_soon(cli._serve, args)
        await wait_until((tmp_path / "dev.sock").exists)
        assert device.port is not None
        await wait_until(lambda: peer.link_up)
        assert device.port.transmit(make_frame(1))
        assert nic.send(make_frame(2, MAC_B, MAC_A))
        await wait_until(lambda: len(device.received) == 1 and len(nic.received) == 1)
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "emu").exists() and not (tmp_path / "dev.sock").exists()
    assert read_pcap(tmp_path / "n0.pcap").frames == [make_frame(1), make_frame(2, MAC_B, MAC_A)]


@pytest.mark.parametrize(
    ("netdevs", "message"),
    [
        (["bogus,id=n0"], "unknown netdev type 'bogus'"),
        (["dgram,id=n0"], "dgram needs local=PATH and remote=PATH"),
        (["stream,id=n0,path=/x,colour=blue"], "unknown option(s) colour"),
        (["dgram,id=n0,local={tmp}/a,remote={tmp}/b"], "no device uses it"),
        (["tap,id=n0,ifname=waytoolonginterfacename"], "ifname must be"),
    ],
)
def test_cli_bad_netdev(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], netdevs: list[str], message: str
) -> None:
    argv = ["serve", "--socket-path", str(tmp_path / "dev.sock")]
    for spec in netdevs:
        argv += ["--netdev", spec.format(tmp=tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vfio-user-emu: ") and message in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_device_netdev_without_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "create_device", lambda spec: NicTestDev("lan"))
    assert cli.main(["serve", "--socket-path", str(tmp_path / "dev.sock")]) == 2
    err = capsys.readouterr().err
    assert "uses netdev=lan, but no --netdev ...,id=lan was given (netdevs given: none)" in err


def test_cli_bad_netdev_real_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emulator",
            "serve",
            "--socket-path",
            str(tmp_path / "dev.sock"),
            "--netdev",
            "dgram,id=n0,local=/nonexistent/dir/a,remote=/tmp/b",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert "no device uses it" in result.stderr and "Traceback" not in result.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "emulator", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=True,
    ).stdout
    assert "--netdev TYPE,id=ID,..." in help_text and "netdev types" in help_text


# -- throughput ----------------------------------------------------------------------------


async def test_dgram_throughput_1500_byte_frames(tmp_path: Path) -> None:
    """Frames/s through a dgram pair in one process (both ends on one trio loop)."""
    a, nic_a, b, nic_b = dgram_pair(tmp_path)
    frame = make_frame(1, size=1500)
    count = 30000
    async with trio.open_nursery() as nursery:
        await start_pair(nursery, a, b)
        start = time.perf_counter()
        sent = 0
        while sent < count:
            if a.tx_backlog < 128:
                assert nic_a.send(frame)
                sent += 1
            else:
                await trio.sleep(0)
        await wait_until(lambda: len(nic_b.received) == count, timeout=60)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    rate = count / elapsed
    print(
        f"\ndgram pair, 1500-byte frames: {rate:,.0f} frames/s ({rate * 1500 * 8 / 1e9:.2f} Gbit/s)"
    )
    assert a.stats.tx_dropped == 0 and b.stats.rx_frames == count
    assert rate > 2000
