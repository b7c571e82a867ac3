"""``e1000`` transmit and receive in process: descriptors, offloads, filters, buffers,
overruns, checksum status, VLANs, interrupt causes (see test_e1000.Rig)."""

from __future__ import annotations

import struct
import zlib

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


# =============================================================================================
# Loopback


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


# =============================================================================================
# Transmit


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


# =============================================================================================
# Receive


async def test_receive_writes_back_length_status_and_fcs() -> None:
    rig = Rig()
    rig.setup_rx(8, rctl=r.RCTL_EN)  # SECRC off: the FCS comes along, as Linux expects
    rig.give_rx(7)
    rig.wr(r.IMS, r.IMS_ENABLE_MASK)
    frame = frame_to(MAC, 100, src=PEER)
    rig.dev.net_receive(frame)
    await rig.run()
    [(data, status, errors, _csum, special)] = rig.take_rx()
    assert data == frame + zlib.crc32(frame).to_bytes(4, "little")
    assert status == r.RXD_STAT_DD | r.RXD_STAT_EOP | r.RXD_STAT_IXSM
    assert errors == 0 and special == 0
    assert rig.rd(r.RDH) == 1
    assert rig.rd(r.ICR) == r.ICR_RXT0
    assert rig.rd(r.GPRC) == 1 and rig.rd(r.GORCL) == 104 and rig.rd(r.TPR) == 1
    assert rig.rd(r.PRC127) == 1


async def test_short_frames_are_padded_long_ones_need_lpe() -> None:
    rig = Rig()
    rig.setup_rx(8)
    rig.give_rx(7)
    rig.dev.net_receive(frame_to(MAC, 42, src=PEER))
    rig.dev.net_receive(frame_to(MAC, 1515, src=PEER))
    await rig.run()
    [(data, *_)] = rig.take_rx()
    assert len(data) == 60
    assert rig.rd(r.ROC) == 1
    rig.wr(r.RCTL, rig.rd(r.RCTL) | r.RCTL_LPE)
    rig.dev.net_receive(frame_to(MAC, 1515, src=PEER))
    await rig.run()
    assert len(rig.take_rx()) == 1


@pytest.mark.parametrize(
    ("bsize", "bsex", "size"),
    [(0, 0, 2048), (1, 0, 1024), (2, 0, 512), (3, 0, 256), (1, 1, 16384), (3, 1, 4096)],
)
async def test_buffer_sizes_and_frames_across_descriptors(bsize: int, bsex: int, size: int) -> None:
    rig = Rig()
    rctl = r.RCTL_EN | r.RCTL_SECRC | r.RCTL_LPE | bsize << 16 | (r.RCTL_BSEX if bsex else 0)
    rig.setup_rx(16, rctl=rctl, size=size)
    rig.give_rx(15)
    frame = frame_to(MAC, 3000, src=PEER)
    rig.dev.net_receive(frame)
    await rig.run()
    [(data, status, *_)] = rig.take_rx()
    assert data == frame
    assert status & r.RXD_STAT_EOP
    assert rig.rd(r.RDH) == -(-3000 // size)


async def test_receive_ring_wraps_around() -> None:
    rig = Rig()
    rig.setup_rx(8)
    got = []
    sent = []
    for i in range(30):
        rig.give_rx(1)
        frame = frame_to(MAC, 60 + i, src=PEER)
        sent.append(frame)
        rig.dev.net_receive(frame)
        await rig.run()
        got += [data for data, *_ in rig.take_rx()]
    assert got == sent


async def test_no_descriptor_counts_rnbc_then_overrun_counts_mpc_and_rxo() -> None:
    rig = Rig()
    rig.setup_rx(8)
    rig.wr(r.IMS, r.ICR_RXO | r.ICR_RXT0)
    frame = frame_to(MAC, 1514, src=PEER)
    fits = (0x30 * 1024) // 1514  # the PBA's 48 KiB receive FIFO
    for _ in range(fits + 3):
        rig.dev.net_receive(frame)
    await rig.run()
    assert rig.take_rx() == []
    assert rig.rd(r.RNBC) == 1  # the head frame found no descriptor
    assert rig.rd(r.MPC) == 3  # the FIFO overflowed
    assert rig.rd(r.ICR) & r.ICR_RXO
    rig.give_rx(7)  # descriptors arrive: the FIFO drains into them
    await rig.run()
    assert len(rig.take_rx()) == 7
    assert rig.rd(r.ICR) & r.ICR_RXT0
    assert rig.rd(r.RNBC) == 1  # the next frame waits again
    assert len(rig.dev.rx_fifo) == fits - 7


async def test_rxdmt0_at_the_minimum_threshold() -> None:
    rig = Rig()
    rig.setup_rx(16)  # RDMTS = 1/2
    rig.give_rx(12)
    for _ in range(3):
        rig.dev.net_receive(frame_to(MAC, 60, src=PEER))
    await rig.run()
    assert rig.rd(r.ICR) == r.ICR_RXT0  # 9 of 16 left
    for _ in range(2):
        rig.dev.net_receive(frame_to(MAC, 60, src=PEER))
    await rig.run()
    assert rig.rd(r.ICR) == r.ICR_RXT0 | r.ICR_RXDMT0  # 7 <= 16 / 2


async def test_receiver_disabled_or_link_down_drops() -> None:
    rig = Rig()
    rig.setup_rx(8, rctl=r.RCTL_BAM)
    rig.give_rx(7)
    rig.dev.net_receive(frame_to(MAC, src=PEER))
    rig.wr(r.RCTL, r.RCTL_EN | r.RCTL_BAM)
    rig.wr(r.MDIC, r.MDIC_OP_WRITE | 1 << 21 | 0x1340)  # autonegotiation: link down
    rig.dev.net_receive(frame_to(MAC, src=PEER))
    await rig.run()
    assert rig.take_rx() == []
    rig.clock.now += 1
    rig.dev.net_receive(frame_to(MAC, src=PEER))  # link was due up: the next access sees it
    assert rig.rd(r.STATUS) & r.STATUS_LU
    rig.dev.net_receive(frame_to(MAC, src=PEER))
    await rig.run()
    assert len(rig.take_rx()) == 1


def accepted(rig: Rig, frame: bytes) -> bool:
    return rig.dev._accept(frame, rig.rd(r.RCTL))


def test_unicast_filter_uses_receive_addresses_with_av() -> None:
    rig = Rig()
    rig.setup_rx(8, rctl=r.RCTL_EN)
    assert accepted(rig, frame_to(MAC))
    assert not accepted(rig, frame_to(PEER))
    rig.wr(r.RA + 8 * 3, int.from_bytes(PEER[:4], "little"))
    rig.wr(r.RA + 8 * 3 + 4, int.from_bytes(PEER[4:], "little"))
    assert not accepted(rig, frame_to(PEER))  # no AV bit
    rig.wr(r.RA + 8 * 3 + 4, int.from_bytes(PEER[4:], "little") | r.RAH_AV)
    assert accepted(rig, frame_to(PEER))
    rig.wr(r.RA + 4, 0)  # our own address invalidated
    assert not accepted(rig, frame_to(MAC))
    rig.wr(r.RCTL, r.RCTL_EN | r.RCTL_UPE)
    assert accepted(rig, frame_to(bytes.fromhex("020000000042")))


def test_broadcast_needs_bam() -> None:
    rig = Rig()
    rig.setup_rx(8, rctl=r.RCTL_EN)
    assert not accepted(rig, frame_to(BROADCAST))
    rig.wr(r.RCTL, r.RCTL_EN | r.RCTL_BAM)
    assert accepted(rig, frame_to(BROADCAST))
    rig.wr(r.RCTL, r.RCTL_EN | r.RCTL_MPE)
    assert accepted(rig, frame_to(BROADCAST))


@pytest.mark.parametrize("mo", [0, 1, 2, 3])
def test_multicast_hash_per_rctl_mo(mo: int) -> None:
    rig = Rig()
    rig.setup_rx(8, rctl=r.RCTL_EN | mo << 12)
    group = bytes.fromhex("01005e7f1234")
    assert not accepted(rig, frame_to(group))
    # The 12 hash bits are bits 47:36, 46:35, 45:34 or 43:32 (MO 0..3) of the address read
    # as a little-endian 48-bit number (Linux's e1000_hash_mc_addr).
    hashed = int.from_bytes(group, "little") >> (36, 35, 34, 32)[mo] & 0xFFF
    rig.wr(r.MTA + 4 * (hashed >> 5), 1 << (hashed & 31))
    assert accepted(rig, frame_to(group))
    other = group[:4] + bytes([group[4] ^ 0x10]) + group[5:]  # bit 36: in every range
    assert not accepted(rig, frame_to(other))
    rig.wr(r.MTA + 4 * (hashed >> 5), 0)
    rig.wr(r.RCTL, r.RCTL_EN | r.RCTL_MPE)
    assert accepted(rig, frame_to(group))


def test_multicast_exact_match_through_receive_addresses() -> None:
    rig = Rig()
    rig.setup_rx(8, rctl=r.RCTL_EN)
    group = bytes.fromhex("333300000001")
    rig.wr(r.RA + 8, int.from_bytes(group[:4], "little"))
    rig.wr(r.RA + 12, int.from_bytes(group[4:], "little") | r.RAH_AV)
    assert accepted(rig, frame_to(group))


def vlan_frame(vid: int, dst: bytes = MAC) -> bytes:
    inner = tcp_frame(dst, PEER, IP_B, IP_A, b"q" * 64)
    return inner[:12] + struct.pack(">HH", 0x8100, 0x6000 | vid) + inner[12:]


async def test_vlan_filter_and_strip() -> None:
    rig = Rig()
    rig.setup_rx(8, rctl=r.RCTL_EN | r.RCTL_SECRC | r.RCTL_VFE)
    rig.give_rx(7)
    assert not accepted(rig, vlan_frame(100))
    rig.wr(r.VFTA + 4 * (100 >> 5), 1 << (100 & 31))
    assert accepted(rig, vlan_frame(100))
    assert not accepted(rig, vlan_frame(101))
    assert accepted(rig, frame_to(MAC))  # untagged frames pass the VLAN filter
    rig.dev.net_receive(vlan_frame(100))
    await rig.run()
    rig.wr(r.CTRL, rig.rd(r.CTRL) | r.CTRL_VME)
    rig.dev.net_receive(vlan_frame(100))
    await rig.run()
    (kept, status1, *_), (stripped, status2, _e, _c, special) = rig.take_rx()
    assert status1 & r.RXD_STAT_VP == 0 and kept[12:14] == b"\x81\x00"
    assert status2 & r.RXD_STAT_VP and special == 0x6000 | 100
    assert stripped == kept[:12] + kept[16:]


async def test_receive_checksum_status() -> None:
    rig = Rig()
    rig.setup_rx(16)
    rig.give_rx(15)
    good = tcp_frame(MAC, PEER, IP_B, IP_A, b"c" * 300)
    bad_tcp = bytearray(good)
    bad_tcp[-1] ^= 0xFF
    bad_ip = bytearray(good)
    bad_ip[14 + 8] ^= 1  # TTL, without fixing the header checksum
    udp = udp_frame(MAC, PEER, IP_B, IP_A, b"u" * 99)
    frames = [good, bytes(bad_tcp), bytes(bad_ip), udp, frame_to(MAC)]
    rig.wr(r.RXCSUM, r.RXCSUM_TUOFL | r.RXCSUM_IPOFL)
    for frame in frames:
        rig.dev.net_receive(frame)
    await rig.run()
    rig.wr(r.RXCSUM, 0)
    rig.dev.net_receive(good)
    await rig.run()
    got = rig.take_rx()
    base = r.RXD_STAT_DD | r.RXD_STAT_EOP
    ok = base | r.RXD_STAT_IPCS | r.RXD_STAT_TCPCS
    assert [(status, errors) for _, status, errors, _, _ in got] == [
        (ok, 0),
        (ok, r.RXD_ERR_TCPE),
        (ok, r.RXD_ERR_IPE),
        (ok, 0),
        (base, 0),  # not IP: nothing to check
        (base | r.RXD_STAT_IXSM, 0),  # offloads off
    ]
    data, *_ = got[0]
    assert got[0][3] == ones_sum(data)  # packet checksum from PCSS 0


async def test_frames_wait_in_the_fifo_in_order_across_ring_refills() -> None:
    rig = Rig()
    rig.setup_rx(8)
    frames = [frame_to(MAC, 60 + i, src=PEER) for i in range(20)]
    for frame in frames:
        rig.dev.net_receive(frame)
    got: list[bytes] = []
    while len(got) < 20:
        rig.give_rx(3)
        await rig.run()
        got += [data for data, *_ in rig.take_rx()]
    assert got == frames
    assert rig.rd(r.MPC) == 0


async def test_a_full_fifo_with_free_descriptors_holds_the_wire_instead_of_dropping() -> None:
    rig = Rig()
    rig.setup_rx(128)
    rig.give_rx(127)
    frame = frame_to(MAC, 1514, src=PEER)
    fits = (0x30 * 1024) // 1514
    for _ in range(fits + 1):  # a burst faster than our DMA (a backend delivering a batch)
        rig.dev.net_receive(frame)
    assert rig.port.accepting == [False]  # the wire waits; nothing was dropped
    assert rig.rd(r.MPC) == 0
    await rig.run()
    assert rig.port.accepting == [False, True]
    assert len(rig.take_rx()) == fits + 1
    # paused with the wire held: resuming keeps it held until the FIFO drains
    for _ in range(fits + 1):
        rig.dev.net_receive(frame)
    rig.dev.pause()
    rig.dev.resume()
    assert rig.port.accepting[-1:] == [False]
    await rig.run()
    assert rig.port.accepting[-1:] == [True] and rig.rd(r.MPC) == 0
    assert len(rig.take_rx()) == fits + 1
