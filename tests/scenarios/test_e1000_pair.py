"""Two ``e1000`` NICs served over vfio-user sockets in one trio run, wired back to back,
each driven by the Linux-style guest driver of :mod:`emulator.testing.guest_e1000` (EEPROM
bit-banging, PHY setup and autonegotiation, rings in memfd guest RAM, INTx with UNMASK after
the ICR read): frames both ways, offloads verified by parsing, filters, ring wrap-around,
overruns, interrupts and mitigation, statistics, the frame rate, and a live migration of one
NIC while frames flow both ways.

The wire is :class:`emulator.testing.guest_e1000.Crossover`, an in-process NetPort pair standing in
for ``emulator.netdev`` backends (which these tests do not need).
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from devices.e1000 import E1000, E1000Options
from devices.e1000 import regs as r
from devices.registry import create_device
from emulator.client import Client
from emulator.client.migrate import Mode, get_state, migrate
from emulator.netdev import setup_netdevs
from emulator.server import DeviceServer
from emulator.testing.guest_e1000 import (
    Crossover,
    DriverConfig,
    E1000Guest,
    parse_ip,
    tcp_frame,
    udp_frame,
)
from emulator.testing.harness import EventFd, GuestRam, RoundedWaits, frame_rate, served_device
from protocol.constants import MigState

MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")
IP_A, IP_B = bytes([192, 168, 7, 1]), bytes([192, 168, 7, 2])
RAM_BASE = 0x40000000


@dataclass
class Pair:
    a: E1000Guest
    b: E1000Guest
    dev_a: E1000
    dev_b: E1000
    cable: Crossover


@asynccontextmanager
async def nic_pair(
    tmp_path: Path,
    config_a: DriverConfig | None = None,
    config_b: DriverConfig | None = None,
    *,
    irq: bool = True,
    init: bool = True,
) -> AsyncIterator[Pair]:
    config_a = config_a or DriverConfig()
    config_b = config_b or DriverConfig()
    dev_a = E1000(E1000Options(mac=MAC_A))
    dev_b = E1000(E1000Options(mac=MAC_B))
    cable = Crossover()
    cable.a.plug(dev_a)
    cable.b.plug(dev_b)
    async with AsyncExitStack() as stack:
        served_a = await stack.enter_async_context(served_device(dev_a, tmp_path, name="a.sock"))
        served_b = await stack.enter_async_context(served_device(dev_b, tmp_path, name="b.sock"))
        client_a = await stack.enter_async_context(Client.connect(served_a.socket_path))
        client_b = await stack.enter_async_context(Client.connect(served_b.socket_path))
        ram_a = stack.enter_context(GuestRam(config_a.ram_needed(), base=RAM_BASE))
        ram_b = stack.enter_context(GuestRam(config_b.ram_needed(), base=RAM_BASE))
        irq_a = EventFd() if irq else None
        irq_b = EventFd() if irq else None
        for fd in (irq_a, irq_b):
            if fd is not None:
                stack.callback(fd.close)
        a = E1000Guest(client_a, ram_a, irq_a, config_a)
        b = E1000Guest(client_b, ram_b, irq_b, config_b)
        if init:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.init)
                nursery.start_soon(b.init)
        yield Pair(a, b, dev_a, dev_b, cable)


def tcp(src: E1000Guest, dst: E1000Guest, payload: bytes, **kwargs: int) -> bytes:
    ip_src, ip_dst = (IP_A, IP_B) if src.mac == MAC_A else (IP_B, IP_A)
    return tcp_frame(dst.mac, src.mac, ip_src, ip_dst, payload, **kwargs)


def numbered(src: E1000Guest, dst: E1000Guest, seq: int, size: int = 60) -> bytes:
    body = dst.mac + src.mac + b"\x88\xb5" + struct.pack(">I", seq)
    return body + bytes(max(size - len(body), 0))


def seq_of(frame: bytes) -> int:
    return int(struct.unpack_from(">I", frame, 14)[0])


# =============================================================================================


async def test_linux_style_bring_up_and_frames_both_ways(tmp_path: Path) -> None:
    async with nic_pair(tmp_path) as pair:
        a, b = pair.a, pair.b
        assert a.mac == MAC_A and b.mac == MAC_B  # read from the EEPROM by bit-banging
        assert sum(a.eeprom) & 0xFFFF == 0xBABA
        assert a.icr_seen & r.ICR_LSC  # the interrupt handler saw the link come up
        assert await a.read(r.STATUS) & r.STATUS_LU
        frame_ab = tcp(a, b, b"ping" * 50)
        frame_ba = tcp(b, a, b"pong" * 60)
        await a.send(frame_ab)
        await b.send(frame_ba)
        got_b = await b.receive()
        got_a = await a.receive()
        assert got_b.data == frame_ab and got_a.data == frame_ba
        assert got_b.fcs_ok and got_a.fcs_ok  # SECRC off: the FCS is there and right
        assert got_b.status & r.RXD_STAT_TCPCS and not got_b.errors
        await a.wait_tx_done()
        assert a.icr_seen & r.ICR_TXDW or await a.read(r.ICR) & r.ICR_TXDW


async def test_checksum_offload_and_tso_end_to_end(tmp_path: Path) -> None:
    async with nic_pair(tmp_path) as pair:
        a, b = pair.a, pair.b
        frames = [
            tcp(a, b, bytes(range(200)) * 5),
            udp_frame(b.mac, a.mac, IP_A, IP_B, b"datagram" * 100),
        ]
        await a.send(frames[0], csum=True)
        await a.send(frames[1], csum=True, ip_csum=True)
        got = await b.receive_many(2)
        assert [f.data for f in got] == frames
        payload = bytes((7 * i) & 0xFF for i in range(64000))
        big = tcp(a, b, payload, seq=123456, flags=0x19, ident=4000)
        await a.send(big, tso_mss=1460)
        segments = await b.receive_many(-(-64000 // 1460))
        parsed = [parse_ip(f.data) for f in segments]
        assert b"".join(p.payload for p in parsed) == payload
        assert all(p.ip_checksum_ok and p.l4_checksum_ok for p in parsed)
        assert all(f.status & r.RXD_STAT_TCPCS and not f.errors for f in segments)
        assert [p.seq for p in parsed] == [123456 + 1460 * i for i in range(len(parsed))]
        assert [p.ident for p in parsed] == [4000 + i for i in range(len(parsed))]
        assert all(len(p.payload) == 1460 for p in parsed[:-1])
        assert [p.tcp_flags for p in parsed] == [0x10] * (len(parsed) - 1) + [0x19]


async def test_filters_promiscuous_and_multicast(tmp_path: Path) -> None:
    async with nic_pair(tmp_path) as pair:
        a, b = pair.a, pair.b
        stranger = bytes.fromhex("02aabbccddee")
        group = bytes.fromhex("01005e000001")
        await a.send(tcp_frame(stranger, a.mac, IP_A, IP_B, b"not for b"))
        await a.send(tcp_frame(group, a.mac, IP_A, IP_B, b"multicast"))
        await a.send(tcp_frame(b"\xff" * 6, a.mac, IP_A, IP_B, b"broadcast"))
        first = await b.receive()
        assert first.data[:6] == b"\xff" * 6  # only the broadcast passed (BAM)
        hashed = int.from_bytes(group[4:6], "little") >> 4 & 0xFFF  # RCTL.MO = 0
        await b.write(r.MTA + 4 * (hashed >> 5), 1 << (hashed & 31))
        await b.write(r.RCTL, await b.read(r.RCTL) | r.RCTL_UPE)
        await a.send(tcp_frame(group, a.mac, IP_A, IP_B, b"multicast"))
        await a.send(tcp_frame(stranger, a.mac, IP_A, IP_B, b"promiscuous"))
        got = await b.receive_many(2)
        assert [f.data[:6] for f in got] == [group, stranger]


async def test_rings_wrap_around_many_times(tmp_path: Path) -> None:
    small = DriverConfig(tx_count=16, rx_count=16)
    async with nic_pair(tmp_path, small, small) as pair:
        a, b = pair.a, pair.b
        sent = [numbered(a, b, i, 60 + i % 200) for i in range(200)]

        async def receive() -> list[bytes]:
            return [f.data for f in await b.receive_many(len(sent))]

        async with trio.open_nursery() as nursery:
            result: list[list[bytes]] = []

            async def collect() -> None:
                result.append(await receive())

            nursery.start_soon(collect)
            for frame in sent:
                await a.send(frame)
                await trio.sleep(0)
        assert result[0] == sent
        assert await pair.b.read(r.MPC) == 0


async def test_overrun_without_descriptors_is_counted(tmp_path: Path) -> None:
    async with nic_pair(tmp_path) as pair:
        a, b = pair.a, pair.b
        await b.write(r.RDT, await b.read(r.RDH))  # take every descriptor away
        frame = numbered(a, b, 0, 1514)
        count = 48 * 1024 // 1514 + 10  # the 48 KiB receive FIFO, and ten more
        for i in range(count):
            await a.send(numbered(a, b, i, 1514))
        await a.wait_tx_done()
        assert len(frame) == 1514
        assert await b.read(r.MPC) == 10
        assert await b.read(r.RNBC) == 1
        assert b.icr_seen & r.ICR_RXO or await b.read(r.ICR) & r.ICR_RXO
        # The descriptors come back: the FIFO drains into them, nothing more is lost.
        await b.write(r.RDT, (b.rx_filled_to - 1) % b.config.rx_count)
        got = await b.receive_many(count - 10)
        assert [seq_of(f.data) for f in got] == list(range(count - 10))


async def test_interrupt_causes_and_itr_mitigation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = DriverConfig(itr=39062, tidv=0, tadv=0)  # 39062 x 256 ns = 10 ms between interrupts
    async with nic_pair(tmp_path, slow, slow) as pair:
        a, b = pair.a, pair.b
        await b.quiesce_interrupts()
        started = trio.current_time()
        # When the device asserts the line (not when our ISR gets to run: on a loaded
        # machine an ISR served late makes the next gap look short).
        raised: list[float] = []
        raise_intx = pair.dev_b.irq.raise_intx

        def recorded() -> None:
            raised.append(time.monotonic())  # the e1000's timer clock
            raise_intx()

        monkeypatch.setattr(pair.dev_b.irq, "raise_intx", recorded)
        causes = 0

        async def isr() -> None:
            nonlocal causes
            while len(raised) < 4:
                causes |= await b.service_interrupt(timeout=5)
                b.poll_rx()
                await b.refill_rx()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(isr)
            while len(raised) < 4:
                await a.send(numbered(a, b, len(raised)))
                await trio.sleep(0.001)
        gaps = [later - earlier for earlier, later in itertools.pairwise(raised)]
        assert all(gap >= 0.0099 for gap in gaps), gaps  # ITR: at most one per 10 ms
        assert causes & r.ICR_RXT0
        assert trio.current_time() - started < 2


async def test_sub_millisecond_itr_is_not_rounded_up_to_epolls_millisecond(
    tmp_path: Path,
) -> None:
    """ITR 0.5 ms: each interrupt after the first is held by the timer job, which must not
    hand the event loop a sub-millisecond deadline (epoll would sleep a whole millisecond:
    a held interrupt twice as late as the driver asked, Linux's 50 us ones 20 times)."""
    config = DriverConfig(itr=1953, tidv=0, tadv=0)  # 1953 x 256 ns = 0.5 ms
    async with nic_pair(tmp_path, config, config) as pair:
        a, b = pair.a, pair.b
        await b.quiesce_interrupts()
        waits = RoundedWaits()
        trio.lowlevel.add_instrument(waits)
        try:
            for seq in range(8):
                await a.send(numbered(a, b, seq))
                assert await b.service_interrupt(timeout=5) & r.ICR_RXT0
                assert b.poll_rx()
                await b.refill_rx()
        finally:
            trio.lowlevel.remove_instrument(waits)
        assert waits.timeouts == []


async def test_a_sleeping_timer_job_wakes_for_submitted_work(tmp_path: Path) -> None:
    """The e1000's timer job waits in the device's only worker with the connection's
    sleep_until_work: submitted work (a doorbell's transmit job) ends the wait at once."""
    async with nic_pair(tmp_path) as pair:
        context = pair.dev_a.context
        woke, ran = trio.Event(), trio.Event()

        async def timer_like() -> None:
            await context.sleep_until_work(30)
            woke.set()

        async def job() -> None:
            ran.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(timer_like)
            await trio.sleep(0.05)
            assert not woke.is_set()
            started = trio.current_time()
            assert context.submit(job)
            with trio.fail_after(5):
                await woke.wait()
                await ran.wait()
        assert trio.current_time() - started < 5


async def test_statistics_read_to_clear(tmp_path: Path) -> None:
    async with nic_pair(tmp_path) as pair:
        a, b = pair.a, pair.b
        for stats in (await a.read_stats(), await b.read_stats()):
            del stats  # start from zero
        for i in range(5):
            await a.send(numbered(a, b, i, 100))
        await b.receive_many(5)
        await a.wait_tx_done()
        tx = await a.read_stats()
        rx = await b.read_stats()
        assert tx[r.GPTC] == tx[r.TPT] == 5 and tx[r.TOTL] == tx[r.GOTCL] == 5 * 104
        assert rx[r.GPRC] == rx[r.TPR] == 5 and rx[r.GORCL] == rx[r.TORL] == 5 * 104
        assert rx[r.PRC127] == 5
        assert await a.read(r.GPTC) == 0 and await b.read(r.GPRC) == 0


async def measure_rate(pair: Pair, size: int, count: int) -> float:
    return await frame_rate(pair.a, pair.b, numbered(pair.a, pair.b, 0, size), count)


async def test_frame_rate_between_two_emulated_nics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = DriverConfig(itr=0)
    async with nic_pair(tmp_path, config, config, irq=False) as pair:
        small = await measure_rate(pair, 60, 6000)
        large = await measure_rate(pair, 1514, 3000)
        assert await pair.b.read(r.MPC) == 0  # none lost
    with capsys.disabled():
        print(
            f"\ne1000 -> e1000 frame rate: {small:,.0f} frames/s (60 B), "
            f"{large:,.0f} frames/s (1514 B, {large * 1514 * 8 / 1e6:,.0f} Mbit/s)"
        )
    assert small > 1000 and large > 500


# =============================================================================================
# Live migration of NIC B while frames flow both ways


class Gate:
    """Lets a guest loop run or parks it (the VM paused for the migration's stop phase)."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.open.set()
        self.parked = trio.Event()

    async def check(self) -> None:
        if not self.open.is_set():
            self.parked.set()
            await self.open.wait()
            self.parked = trio.Event()

    async def close(self) -> None:
        self.open = trio.Event()
        await self.parked.wait()

    def reopen(self) -> None:
        self.open.set()


@pytest.mark.parametrize("mode", ["stop-copy", "pre-copy"])
async def test_migrating_one_nic_mid_flow_delivers_every_frame_once_in_order(
    tmp_path: Path, mode: Mode
) -> None:
    total = 1500
    # In flight towards B at most. B's ring (64 descriptors) cannot hold them all: while B's
    # VM is paused, frames pile up in its receive FIFO (state that must migrate) and then on
    # the wire (which follows the VM); the FIFO (48 KiB) and the wire hold the rest.
    window = 200
    async with nic_pair(tmp_path, None, DriverConfig(rx_count=64), irq=False) as pair:
        a, b = pair.a, pair.b
        dev_b2 = E1000(E1000Options(mac=bytes.fromhex("020000000bbb")))  # the MAC comes along
        async with (
            served_device(dev_b2, tmp_path, name="b2.sock") as served_b2,
            Client.connect(served_b2.socket_path) as client_b2,
        ):
            handover = pair.cable.b.successor(dev_b2)
            await b.realize_destination(client_b2)  # B's VM on the destination, realized
            got_b: list[int] = []  # what B's guest received from A
            got_a: list[int] = []  # what A's guest received from B
            gate = Gate()
            migrated = trio.Event()
            in_flight: list[int] = []

            async def a_sends() -> None:
                for seq in range(total):
                    while seq - len(got_b) >= window:
                        await trio.sleep(0.0005)
                    await a.send(numbered(a, b, seq))

            async def a_receives() -> None:
                while len(got_a) < total:
                    frames = a.poll_rx()
                    # (B2's MAC announcements after the move are broadcasts A hears too)
                    got_a.extend(seq_of(f.data) for f in frames if f.data[12:14] == b"\x88\xb5")
                    await (a.refill_rx() if frames else trio.sleep(0.0002))

            async def b_runs() -> None:  # B's VM: receive from A, send to B, until paused
                sent = 0
                while len(got_b) < total or sent < total:
                    await gate.check()
                    frames = b.poll_rx()
                    got_b.extend(seq_of(f.data) for f in frames)
                    if frames:
                        await b.refill_rx()
                    b.reclaim_tx()
                    queued = 0
                    while sent < total and sent - len(got_a) < window and queued < 16:
                        if not b.queue(numbered(b, a, sent)):
                            break
                        sent += 1
                        queued += 1
                    if queued:
                        await b.flush_tx()
                    if not frames and not queued:
                        await trio.sleep(0.0002)

            async def migrate_b() -> None:
                while len(got_b) < total // 3:
                    await trio.sleep(0.001)

                async def paused_with_a_full_ring() -> None:
                    await gate.close()  # B's VM stops...
                    values = pair.dev_b.values
                    # ...while A goes on sending, until its ring is full (RDH caught up with
                    # RDT: no job can empty the FIFO now) and 20 frames wait in the FIFO.
                    while len(pair.dev_b.receiver.fifo) < 20 or values[r.RDH] != values[r.RDT]:
                        await trio.sleep(0.0005)

                async def precopy_round(round_number: int, moved: int) -> None:
                    await trio.sleep(0.005)  # B's VM keeps running between pre-copy rounds
                    if moved <= 0 or round_number >= 3:
                        await paused_with_a_full_ring()  # the last round: VM, then device

                if mode == "stop-copy":
                    await paused_with_a_full_ring()
                report = await migrate(
                    b.client,
                    client_b2,
                    mode=mode,
                    precopy_threshold=0,
                    precopy_rounds=3,
                    on_precopy_round=precopy_round if mode == "pre-copy" else None,
                )
                assert report.mode == mode
                in_flight.append(len(pair.dev_b.receiver.fifo))  # frames the state carried
                b.migrated_to(client_b2)  # B's VM continues on the destination
                gate.reopen()
                migrated.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(a_sends)
                nursery.start_soon(a_receives)
                nursery.start_soon(b_runs)
                nursery.start_soon(migrate_b)
                with trio.fail_after(60):
                    await migrated.wait()
            assert len(got_b) == total and len(got_a) == total
            assert await get_state(client_b2) == MigState.RUNNING
            assert handover.took_over
            assert in_flight[0] >= 20  # received by B's NIC, delivered by B2's
            assert got_b == list(range(total))  # exactly once, in order, across the switch
            assert got_a == list(range(total))
            assert await a.read(r.MPC) == 0 and await client_b2.region_read(0, r.MPC, 4) == bytes(4)
            assert dev_b2.eeprom[:3] == pair.dev_b.eeprom[:3]


async def test_through_the_dgram_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same NICs over real emulator.netdev backends (UNIX datagram sockets), as
    ``serve --device e1000,netdev=n0 --netdev dgram,...`` wires them."""
    dev_a = create_device(f"e1000,mac={MAC_A.hex(':')},netdev=n0")
    dev_b = create_device(f"e1000,mac={MAC_B.hex(':')},netdev=n1")
    assert isinstance(dev_a, E1000) and isinstance(dev_b, E1000)
    a_net, b_net = tmp_path / "a.net", tmp_path / "b.net"
    netdevs_a = setup_netdevs([f"dgram,id=n0,local={a_net},remote={b_net}"], [dev_a])
    netdevs_b = setup_netdevs([f"dgram,id=n1,local={b_net},remote={a_net}"], [dev_b])
    server_a = DeviceServer(dev_a, socket_path=tmp_path / "a.sock", netdevs=netdevs_a)
    server_b = DeviceServer(dev_b, socket_path=tmp_path / "b.sock", netdevs=netdevs_b)
    config = DriverConfig(itr=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server_a.serve)
        await nursery.start(server_b.serve)
        async with (
            Client.connect(tmp_path / "a.sock") as client_a,
            Client.connect(tmp_path / "b.sock") as client_b,
        ):
            with (
                GuestRam(config.ram_needed(), base=RAM_BASE) as ram_a,
                GuestRam(config.ram_needed(), base=RAM_BASE) as ram_b,
            ):
                a = E1000Guest(client_a, ram_a, None, config)
                b = E1000Guest(client_b, ram_b, None, config)
                async with trio.open_nursery() as bring_up:
                    bring_up.start_soon(a.init)
                    bring_up.start_soon(b.init)
                payload = bytes(range(256)) * 100
                await a.send(tcp(a, b, payload), tso_mss=1448)
                segments = [parse_ip(f.data) for f in await b.receive_many(18)]
                assert b"".join(s.payload for s in segments) == payload
                assert all(s.l4_checksum_ok for s in segments)
                await b.send(tcp(b, a, b"back"), csum=True)
                assert parse_ip((await a.receive()).data).payload == b"back"
                pair = Pair(a, b, dev_a, dev_b, Crossover())  # (the cable is unused here)
                rate = await measure_rate(pair, 1514, 3000)
                assert await b.read(r.MPC) == 0  # bursts from the backend wait, not drop
                assert netdevs_b[0].stats.rx_queued_dropped == 0
        nursery.cancel_scope.cancel()
    with capsys.disabled():
        print(f"\ne1000 -> dgram -> e1000: {rate:,.0f} frames/s (1514 B)")
