"""``e1000`` receive in process (devices/e1000/rx.py): descriptors, buffers, filters,
overruns, checksum status, VLAN filter and strip, the FIFO and its backpressure (see
test_device.Rig)."""

from __future__ import annotations

import struct
import zlib

import pytest

from devices.e1000 import regs as r
from devices.e1000.packet import ones_sum
from emulator.testing.guest_e1000 import tcp_frame, udp_frame
from tests.devices.e1000.test_device import MAC, Rig, frame_to
from tests.devices.e1000.test_tx import BROADCAST, IP_A, IP_B, PEER


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
    assert len(rig.dev.receiver.fifo) == fits - 7


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
    return rig.dev.receiver.accept(frame, rig.rd(r.RCTL))


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
