"""``e1000`` transmit in process (devices/e1000/tx.py): descriptors, offloads (checksums,
TSO), VLAN insertion, the ring, interrupt causes, and loopback back to the receiver (see
test_device.Rig)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.e1000 import regs as r
from devices.e1000.packet import ones_sum
from emulator.testing.guest_e1000 import parse_ip, tcp_frame, tx_descriptors, udp_frame
from tests.devices.e1000.test_device import MAC, Rig, frame_to

PEER = bytes.fromhex("525400000099")


IP_A, IP_B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


BROADCAST = b"\xff" * 6


def queue(rig: Rig, frame: bytes, **options: object) -> int:
    """Put ``frame`` on the TX ring as Linux's e1000 would; returns the descriptor count."""
    descriptors = tx_descriptors(
        frame,
        csum=bool(options.get("csum")),
        ip_csum=bool(options.get("ip_csum")),
        tso_mss=options.get("tso_mss"),  # type: ignore[arg-type]
        vlan=options.get("vlan"),  # type: ignore[arg-type]
        extended=bool(options.get("extended")),
    )
    for fields, lower, upper, payload in descriptors:
        if payload is None:
            rig.tx_desc(lower, upper, address=fields)
        else:
            rig.tx_desc(lower, upper, data=payload)
    return len(descriptors)


def tx_status(rig: Rig, index: int) -> int:
    return rig.mem(Rig.TX_RING + 16 * index + 12, 1)[0]


async def send_and_receive(rig: Rig, frames: list[bytes]) -> list[bytes]:
    for frame in frames:
        rig.legacy(frame)
    await rig.kick()
    return [data for data, *_ in rig.take_rx()]


@pytest.mark.parametrize("mode", ["mac", "phy"])
async def test_loopback_returns_transmitted_frames_to_the_receiver(mode: str) -> None:
    rig = Rig()
    rig.setup_tx(8)
    rig.setup_rx(8)
    rig.give_rx(7)
    if mode == "mac":
        rig.wr(r.RCTL, rig.rd(r.RCTL) | r.RCTL_LBM_MAC)
    else:
        rig.wr(r.MDIC, r.MDIC_OP_WRITE | 0x4140 | 1 << 21)  # BMCR: loopback, 1000/Full
    rig.wr(r.IMS, r.ICR_RXT0)
    frames = [frame_to(BROADCAST, 1024), frame_to(MAC, 60), frame_to(PEER, 100)]
    got = await send_and_receive(rig, frames)
    # the receive filters still apply: broadcast (BAM) and our own address pass, PEER not
    assert got == frames[:2]
    assert rig.port.frames == []  # nothing on the wire
    assert rig.rd(r.GPTC) == 3 and rig.rd(r.GPRC) == 2
    assert rig.isr() & r.ICR_RXT0
    rig.dev.net_receive(frame_to(MAC, 80, src=PEER))  # the wire is not heard meanwhile
    await rig.run()
    assert rig.take_rx() == []


async def test_loopback_off_sends_to_the_wire_again() -> None:
    rig = Rig()
    rig.setup_tx(8)
    rig.setup_rx(8)
    rig.give_rx(7)
    rig.wr(r.RCTL, rig.rd(r.RCTL) | r.RCTL_LBM_MAC)
    rig.wr(r.RCTL, rig.rd(r.RCTL) & ~r.RCTL_LBM_MASK)
    frame = frame_to(MAC, 60)
    assert await send_and_receive(rig, [frame]) == []
    assert rig.port.frames == [frame]
    rig.dev.net_receive(frame_to(MAC, 80, src=PEER))
    await rig.run()
    assert len(rig.take_rx()) == 1


async def test_loopback_works_without_a_link() -> None:
    """MAC loopback never reaches the PHY: a link that is down does not matter."""
    rig = Rig()
    rig.setup_tx(8)
    rig.setup_rx(8)
    rig.give_rx(7)
    rig.wr(r.MDIC, r.MDIC_OP_WRITE | 0x1340 | 1 << 21)  # autonegotiation: link down
    assert not rig.rd(r.STATUS) & r.STATUS_LU
    rig.wr(r.RCTL, rig.rd(r.RCTL) | r.RCTL_LBM_MAC)
    frame = frame_to(MAC, 60)
    assert await send_and_receive(rig, [frame]) == [frame]


async def test_legacy_transmit_status_writeback_and_causes() -> None:
    rig = Rig()
    rig.setup_tx(8)
    rig.wr(r.IMS, r.ICR_TXDW | r.ICR_TXQE)
    first = frame_to(PEER, 100)
    second = frame_to(PEER, 200)
    rig.legacy(first, r.TXD_CMD_EOP | r.TXD_CMD_IFCS)  # no RS: no write-back
    rig.legacy(second)
    await rig.kick()
    assert rig.port.frames == [first, second]
    assert tx_status(rig, 0) == 0 and tx_status(rig, 1) & r.TXD_STAT_DD
    assert rig.rd(r.TDH) == 2
    assert rig.rd(r.ICR) == r.ICR_TXDW | r.ICR_TXQE
    assert rig.rd(r.GPTC) == 2 and rig.rd(r.TPT) == 2
    assert rig.rd(r.TOTL) == 104 + 204 and rig.rd(r.GOTCL) == 308
    assert rig.rd(r.PTC127) == 1 and rig.rd(r.PTC255) == 1


async def test_transmit_needs_tctl_en_and_a_doorbell_without_work_reports_txqe() -> None:
    rig = Rig()
    rig.setup_tx(8, tctl=r.TCTL_PSP)
    rig.legacy(frame_to(PEER))
    await rig.kick()
    assert rig.port.frames == [] and rig.rd(r.TDH) == 0
    rig.wr(r.TCTL, r.TCTL_EN | r.TCTL_PSP)  # enabling the transmitter starts it
    await rig.run()
    assert len(rig.port.frames) == 1
    rig.rd(r.ICR)
    rig.wr(r.TCTL, r.TCTL_EN | r.TCTL_PSP)  # nothing queued: the queue is (still) empty
    assert rig.rd(r.ICR) == r.ICR_TXQE


async def test_frames_span_descriptors_and_short_frames_are_padded() -> None:
    rig = Rig()
    rig.setup_tx(8)
    frame = frame_to(PEER, 3000)
    rig.tx_desc(1000 | r.TXD_CMD_IFCS << 24, data=frame[:1000])
    rig.tx_desc(1000 | r.TXD_CMD_IFCS << 24, data=frame[1000:2000])
    rig.legacy(frame[2000:])
    short = frame_to(PEER, 20)
    rig.legacy(short)
    await rig.kick()
    assert rig.port.frames == [frame, short + bytes(40)]
    rig.wr(r.TCTL, r.TCTL_EN)  # PSP off: no padding
    rig.legacy(short)
    await rig.kick()
    assert rig.port.frames[-1] == short


async def test_transmit_ring_wraps_around() -> None:
    rig = Rig()
    rig.setup_tx(8)
    sent = []
    for round_number in range(5):
        batch = [frame_to(PEER, 60 + round_number * 10 + i) for i in range(5)]
        for frame in batch:
            rig.legacy(frame)
        await rig.kick()
        sent += batch
        assert rig.rd(r.TDH) == rig.tx_next
    assert rig.port.frames == sent
    assert rig.tx_next == 25 % 8


async def test_transmit_stops_at_a_bad_ring_without_looping() -> None:
    rig = Rig()
    rig.setup_tx(8)
    rig.wr(r.TDT, 12)  # beyond the ring: nothing happens
    await rig.run()
    assert rig.rd(r.TDH) == 0 and rig.port.frames == []
    rig.wr(r.TDBAL, 0x7FFFFFF0)  # unmapped ring: the DMA fault stops the job
    rig.wr(r.TDT, 1)
    await rig.run()
    assert rig.rd(r.TDH) == 0


async def test_checksum_offload_fills_tcp_and_udp_checksums() -> None:
    rig = Rig()
    rig.setup_tx(16)
    tcp = tcp_frame(PEER, MAC, IP_A, IP_B, bytes(range(256)) * 3)
    udp = udp_frame(PEER, MAC, IP_A, IP_B, b"x" * 333)
    queue(rig, tcp, csum=True)
    queue(rig, udp, csum=True, ip_csum=True)
    await rig.kick()
    assert rig.port.frames == [tcp, udp]  # bit for bit what the stack would have computed
    for frame in rig.port.frames:
        parsed = parse_ip(frame)
        assert parsed.ip_checksum_ok and parsed.l4_checksum_ok


async def test_tso_segments_like_the_hardware() -> None:
    rig = Rig()
    rig.setup_tx(64)
    payload = bytes((i * 7) & 0xFF for i in range(10_000))
    frame = tcp_frame(PEER, MAC, IP_A, IP_B, payload, seq=0xFFFFF000, flags=0x19, ident=700)
    used = queue(rig, frame, tso_mss=1448)
    assert used == 1 + 3  # context + 3 data descriptors (4 KiB each at most)
    await rig.kick()
    segments = [parse_ip(f) for f in rig.port.frames]
    assert len(segments) == 7  # ceil(10000 / 1448)
    assert b"".join(s.payload for s in segments) == payload
    for i, seg in enumerate(segments):
        assert seg.ip_checksum_ok and seg.l4_checksum_ok
        assert seg.ident == 700 + i
        assert seg.seq == (0xFFFFF000 + 1448 * i) & 0xFFFFFFFF  # wraps
        last = i == len(segments) - 1
        assert seg.tcp_flags == (0x19 if last else 0x10)  # FIN/PSH only in the last one
        assert seg.total_length == 20 + 20 + len(seg.payload)
        assert len(seg.payload) == (10_000 - 6 * 1448 if last else 1448)
    assert rig.rd(r.TSCTC) == 1
    assert tx_status(rig, 3) & r.TXD_STAT_DD


async def test_tso_with_a_payload_that_is_a_multiple_of_the_mss() -> None:
    rig = Rig()
    rig.setup_tx(32)
    frame = tcp_frame(PEER, MAC, IP_A, IP_B, bytes(4000), flags=0x18)
    queue(rig, frame, tso_mss=1000)
    await rig.kick()
    segments = [parse_ip(f) for f in rig.port.frames]
    assert [len(s.payload) for s in segments] == [1000] * 4
    assert [s.tcp_flags for s in segments] == [0x10, 0x10, 0x10, 0x18]


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 20_000),
    mss=st.integers(64, 9000),
    split=st.integers(1, 4096),
)
async def test_tso_property(size: int, mss: int, split: int) -> None:
    rig = Rig()
    rig.setup_tx(256)
    payload = bytes((i * 13) & 0xFF for i in range(size))
    frame = tcp_frame(PEER, MAC, IP_A, IP_B, payload, seq=5)
    descriptors = tx_descriptors(
        frame, csum=False, ip_csum=False, tso_mss=mss, vlan=None, extended=False
    )
    context, *data = descriptors
    rig.tx_desc(context[1], context[2], address=context[0])
    # Cut the data at arbitrary points, as a driver with fragments would.
    blob = b"".join(d[3] or b"" for d in data)
    lower_flags = data[0][1] & ~0xFFFFF & ~(r.TXD_CMD_EOP << 24 | r.TXD_CMD_RS << 24)
    split = max(split, -(-len(blob) // 200))  # the packet must fit the 256-entry ring
    pieces = [blob[i : i + split] for i in range(0, len(blob), split)]
    for i, piece in enumerate(pieces):
        last = (r.TXD_CMD_EOP | r.TXD_CMD_RS) << 24 if i == len(pieces) - 1 else 0
        rig.tx_desc(len(piece) | lower_flags | last, data[0][2], data=piece)
    await rig.kick()
    segments = [parse_ip(f) for f in rig.port.frames]
    assert len(segments) == -(-size // mss)
    assert b"".join(s.payload for s in segments) == payload
    assert all(s.ip_checksum_ok and s.l4_checksum_ok for s in segments)
    assert [s.seq for s in segments] == [5 + mss * i for i in range(len(segments))]


async def test_vlan_insertion_needs_ctrl_vme() -> None:
    rig = Rig()
    rig.setup_tx(8)
    frame = tcp_frame(PEER, MAC, IP_A, IP_B, b"v" * 100)
    queue(rig, frame, vlan=0x2064)
    await rig.kick()
    assert rig.port.frames[-1] == frame  # VME off: no tag
    rig.wr(r.CTRL, rig.rd(r.CTRL) | r.CTRL_VME)
    queue(rig, frame, vlan=0x2064, csum=True)
    await rig.kick()
    tagged = rig.port.frames[-1]
    assert tagged[12:16] == b"\x81\x00\x20\x64" and tagged[:12] + tagged[16:] == frame
    assert parse_ip(tagged).l4_checksum_ok


async def test_legacy_insert_checksum() -> None:
    rig = Rig()
    rig.setup_tx(8)
    frame = bytearray(frame_to(PEER, 100))
    css, cso = 20, 16
    rig.tx_desc(
        len(frame) | cso << 16 | (r.TXD_CMD_EOP | r.TXD_CMD_IC | r.TXD_CMD_RS) << 24,
        css << 8,
        data=bytes(frame),
    )
    await rig.kick()
    sent = rig.port.frames[0]
    assert (
        ones_sum(sent[:cso] + b"\0\0" + sent[cso + 2 :], css) ^ 0xFFFF
        == (struct.unpack_from(">H", sent, cso)[0])
    )
