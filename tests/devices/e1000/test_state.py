"""``e1000`` device state (devices/e1000/state.py): save/load round trips with work in
progress (a half-sent TSO packet, frames in the receive FIFO, an EEPROM read mid-word,
pending timers), pause/resume, the migration engine in process, and hostile states
rejected without any change."""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.api import DeviceError
from devices.e1000 import E1000, E1000Options
from devices.e1000 import regs as r
from devices.migration.stream import LoadedSection
from devices.net import announcement
from emulator.testing.guest_e1000 import parse_ip, tcp_frame, tx_descriptors
from emulator.testing.harness import flat_sections
from protocol.constants import MigState
from tests.devices.e1000.test_device import MAC, Microwire, Rig, frame_to, mdic

PEER = bytes.fromhex("525400000099")


CTX = 16  # size of the TX context at the start of the "e1000.tx" section


IP_A, IP_B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def state_of(dev: E1000) -> list[tuple[str, bytes]]:
    return flat_sections(dev.save_state())


def load_into(dev: E1000, sections: Sequence[LoadedSection]) -> None:
    """As the engine does: the destination is stopped while the state is loaded."""
    dev.pause()
    dev.load_state(sections)


async def busy_rig() -> tuple[Rig, bytes, list[tuple[int, int, int, bytes | None]]]:
    """A device with something of everything in flight. Returns the TSO frame and the
    descriptors of it not yet handed to the device."""
    rig = Rig()
    rig.setup_tx(64)
    rig.setup_rx(8)
    rig.wr(r.IMS, r.IMS_ENABLE_MASK)
    rig.wr(r.ITR, 3906)
    mdic(rig, 0x10, write=0x0B60)
    rig.wr(r.RA + 8, 0x11223344)
    rig.wr(r.RA + 12, 0x5566 | r.RAH_AV)
    rig.wr(r.MTA + 40, 0x800)
    rig.dev.region_write(1, 0, r.STATUS.to_bytes(4, "little"))  # IOADDR
    # a TSO packet of which only the first two data descriptors have been queued
    frame = tcp_frame(PEER, MAC, IP_A, IP_B, bytes(i & 0xFF for i in range(9000)), seq=77)
    descriptors = tx_descriptors(
        frame, csum=False, ip_csum=False, tso_mss=1400, vlan=None, extended=False
    )
    for fields, lower, upper, payload in descriptors[:3]:
        if payload is None:
            rig.tx_desc(lower, upper, address=fields)
        else:
            rig.tx_desc(lower, upper, data=payload)
    await rig.kick()
    assert len(rig.port.frames) == 5  # 8192 bytes in: 5 full segments out, one in assembly
    # frames waiting in the receive FIFO (the ring has no free descriptor)
    for i in range(3):
        rig.dev.net_receive(frame_to(MAC, 100 + i, src=PEER))
    await rig.run()
    # an EEPROM read in the middle of a word, and pending interrupt / link timers
    wire = Microwire(rig)
    wire.read(5)
    eecd = rig.rd(r.EECD) | r.EECD_CS | r.EECD_REQ
    rig.wr(r.EECD, eecd)
    rig.wr(r.ICS, r.ICR_LSC)
    rig.isr()
    rig.wr(r.ICS, r.ICR_LSC)  # held back by ITR
    mdic(rig, 0, write=0x1340)  # autonegotiation under way
    return rig, frame, descriptors[3:]


async def test_round_trip_preserves_everything_and_work_resumes_on_the_destination() -> None:
    rig, _frame, rest = await busy_rig()
    rig.dev.pause()
    assert rig.port.accepting[-1] is False
    saved = rig.dev.save_state()
    before = state_of(rig.dev)
    assert dict(before)["e1000.rx"][:4] == struct.pack("<I", 3)

    dst = Rig()
    dst.dma.mem[:] = rig.dma.mem  # shared guest RAM, as a local migration has
    dst.tx_next, dst.tx_count, dst.rx_count = rig.tx_next, rig.tx_count, rig.rx_count
    load_into(dst.dev, flat_sections(saved))
    assert state_of(dst.dev) == before
    dst.dev.resume()
    assert dst.port.accepting[-1] is True
    # pending timers: the autonegotiation (and the ITR-held LSC) complete on the destination
    assert not dst.rd(r.STATUS) & r.STATUS_LU
    await dst.run(advance=0.6)
    assert dst.rd(r.STATUS) & r.STATUS_LU
    assert dst.sink.intx >= 1
    # the rest of the TSO packet goes out from the destination: segments 6 and 7, numbered on
    for fields, lower, upper, payload in rest:
        dst.tx_desc(lower, upper, data=payload or b"", address=None if payload else fields)
    await dst.kick()
    segments = [parse_ip(f) for f in rig.port.frames + dst.port.frames]
    assert len(segments) == 7
    assert b"".join(s.payload for s in segments) == bytes(i & 0xFF for i in range(9000))
    assert [s.ident for s in segments] == [1 + i for i in range(7)]
    assert [s.seq for s in segments] == [77 + 1400 * i for i in range(7)]
    assert all(s.l4_checksum_ok and s.ip_checksum_ok for s in segments)
    # the FIFO frames land in the destination's ring
    dst.give_rx(7)
    await dst.run()
    got = [data for data, *_ in dst.take_rx()]
    assert got == [frame_to(MAC, 100 + i, src=PEER) for i in range(3)]
    # the EEPROM read continues mid-word, the register file and IOADDR came along
    assert dst.rd(r.RA + 8) == 0x11223344 and mdic(dst, 0x10) & 0xFFFF == 0x0B60
    assert int.from_bytes(dst.dev.region_read(1, 0, 4), "little") == r.STATUS


async def test_work_arriving_while_paused_runs_after_resume() -> None:
    rig = Rig()
    rig.setup_tx(8)
    rig.setup_rx(8)
    rig.give_rx(7)
    rig.dev.pause()
    rig.legacy(frame_to(PEER))
    rig.wr(r.TDT, rig.tx_next)
    rig.dev.net_receive(frame_to(MAC, src=PEER))  # (the runtime would have queued it)
    await rig.run()
    assert rig.port.frames == [] and rig.take_rx() == []
    rig.dev.resume()
    await rig.run()
    assert len(rig.port.frames) == 1 and len(rig.take_rx()) == 1


async def test_migration_engine_in_process() -> None:
    rig, _frame, _rest = await busy_rig()
    src = rig.dev
    src.migration.set_state(MigState.STOP_COPY)
    stream = b""
    while chunk := src.migration.read_data(1 << 16):
        stream += chunk
    dst = E1000(E1000Options(mac=bytes.fromhex("020000000001")))
    dst.migration.set_state(MigState.RESUMING)
    dst.migration.write_data(stream)
    dst.migration.set_state(MigState.STOP)
    assert state_of(dst) == state_of(src)
    dst.migration.set_state(MigState.RUNNING)
    # the MAC travelled with the EEPROM
    assert dst.eeprom == src.eeprom and dst.values[r.RA] == src.values[r.RA]


async def test_precopy_then_stop_copy() -> None:
    rig, _frame, _rest = await busy_rig()
    src = rig.dev
    src.migration.set_state(MigState.PRE_COPY)
    assert src.migration.read_data(1 << 16)  # the stream header
    src.migration.set_state(MigState.STOP_COPY)
    assert state_of(src)[0][0] == "e1000.regs"


def good_state() -> list[tuple[str, bytes]]:
    rig = Rig()
    rig.setup_rx(8)
    rig.dev.net_receive(frame_to(MAC, src=PEER))
    return state_of(rig.dev)


def replace(state: list[tuple[str, bytes]], name: str, payload: bytes) -> list[tuple[str, bytes]]:
    return [(n, payload if n == name else p) for n, p in state]


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def reg_entry(state: list[tuple[str, bytes]], offset: int, value: int) -> bytes:
    regs = bytearray(dict(state)["e1000.regs"])
    for pos in range(0, len(regs), 8):
        if struct.unpack_from("<I", regs, pos)[0] == offset:
            struct.pack_into("<I", regs, pos + 4, value)
            return bytes(regs)
    raise AssertionError(f"no register {offset:#x}")


def mutations() -> list[tuple[str, list[tuple[str, bytes]]]]:
    state = good_state()
    sections = dict(state)
    eeprom_words = sections["e1000.eeprom"]
    phy_regs = sections["e1000.phy"]
    tx = sections["e1000.tx"]
    misc = sections["e1000.misc"]
    out = [
        ("missing section", state[:-1]),
        ("repeated section", [*state, state[0]]),
        ("unknown section", [*state, ("e1000.extra", b"")]),
        ("registers truncated", replace(state, "e1000.regs", sections["e1000.regs"][:-8])),
        (
            "register offset unknown",
            replace(state, "e1000.regs", patch(sections["e1000.regs"], 0, "<I", 0x1234)),
        ),
        (
            "ICR with undefined causes",
            replace(state, "e1000.regs", reg_entry(state, r.ICR, 1 << 30)),
        ),
        ("CTRL.RST set", replace(state, "e1000.regs", reg_entry(state, r.CTRL, r.CTRL_RST))),
        ("STATUS bits never set", replace(state, "e1000.regs", reg_entry(state, r.STATUS, 0x4))),
        (
            "STATUS.LU without link",
            replace(state, "e1000.regs", reg_entry(state, r.STATUS, r.STATUS_BASE)),
        ),
        (
            "TDLEN not a multiple of 128",
            replace(state, "e1000.regs", reg_entry(state, r.TDLEN, 0x84)),
        ),
        ("TDT beyond 16 bits", replace(state, "e1000.regs", reg_entry(state, r.TDT, 0x10000))),
        ("RAH reserved bits", replace(state, "e1000.regs", reg_entry(state, r.RA + 4, 1 << 20))),
        ("EEPROM checksum", replace(state, "e1000.eeprom", patch(eeprom_words, 10, "<H", 0x1234))),
        (
            "EEPROM multicast MAC",
            replace(
                state,
                "e1000.eeprom",
                patch(
                    patch(eeprom_words, 0, "<H", 0x5453),
                    126,
                    "<H",
                    (struct.unpack_from("<H", eeprom_words, 126)[0] - 1) & 0xFFFF,
                ),
            ),
        ),
        ("EEPROM short", replace(state, "e1000.eeprom", eeprom_words[:-2])),
        ("foreign PHY", replace(state, "e1000.phy", patch(phy_regs, 4, "<H", 0x0022))),
        (
            "PHY register that does not exist",
            replace(state, "e1000.phy", patch(phy_regs, 2 * 0x0C, "<H", 1)),
        ),
        ("PHY link down, STATUS up", replace(state, "e1000.phy", patch(phy_regs, 2, "<H", 0x7949))),
        (
            "EECD bits beyond the command",
            replace(state, "e1000.eecd", patch(sections["e1000.eecd"], 6, "<B", 10)),
        ),
        (
            "EECD undriven bits",
            replace(state, "e1000.eecd", patch(sections["e1000.eecd"], 0, "<I", 0x100)),
        ),
        ("TX flags", replace(state, "e1000.tx", patch(tx, CTX, "<B", 2))),
        ("TX buffer length lies", replace(state, "e1000.tx", tx + b"x")),
        (
            "TX data outside a packet",
            replace(state, "e1000.tx", patch(tx, CTX + 19, "<I", 1) + b"x"),
        ),
        (
            "TX segment without TSO",
            replace(state, "e1000.tx", patch(patch(tx, CTX, "<B", 1), CTX + 23, "<I", 1) + b"y"),
        ),
        (
            "TX TSO without a context",
            replace(
                state,
                "e1000.tx",
                patch(patch(patch(tx, CTX, "<B", 1), CTX + 1, "<B", 1), CTX + 2, "<B", 1),
            ),
        ),
        ("TX PAYLEN beyond 20 bits", replace(state, "e1000.tx", patch(tx, 8, "<I", 1 << 20))),
        ("FIFO count lies", replace(state, "e1000.rx", patch(sections["e1000.rx"], 0, "<I", 2))),
        (
            "FIFO frame too big",
            replace(state, "e1000.rx", struct.pack("<II", 1, 20000) + bytes(20000)),
        ),
        ("FIFO frame too short", replace(state, "e1000.rx", struct.pack("<II", 1, 10) + bytes(10))),
        (
            "FIFO beyond the packet buffer",
            replace(
                state,
                "e1000.rx",
                struct.pack("<I", 8) + (struct.pack("<I", 16000) + bytes(16000)) * 8,
            ),
        ),
        ("FIFO trailing bytes", replace(state, "e1000.rx", sections["e1000.rx"] + b"\0")),
        ("misc flag", replace(state, "e1000.misc", patch(misc, 4, "<B", 2))),
        ("delay flag without timer", replace(state, "e1000.misc", patch(misc, 4, "<B", 1))),
        ("negative timer", replace(state, "e1000.misc", patch(misc, 7, "<q", -5))),
        ("huge timer", replace(state, "e1000.misc", patch(misc, 7, "<q", 1 << 60))),
        (
            "autoneg pending with the link up",
            replace(state, "e1000.misc", patch(misc, 7, "<q", 1000)),
        ),
        ("misc short", replace(state, "e1000.misc", misc[:-1])),
    ]
    return out


@pytest.mark.parametrize(("why", "state"), mutations(), ids=[m[0] for m in mutations()])
def test_hostile_state_is_refused_and_changes_nothing(
    why: str, state: list[tuple[str, bytes]]
) -> None:
    rig = Rig()
    rig.wr(r.RA + 8, 0xABCDEF)
    rig.dev.pause()
    before = state_of(rig.dev)
    with pytest.raises(DeviceError) as exc:
        rig.dev.load_state(state)
    assert exc.value.errno == errno.EINVAL
    assert state_of(rig.dev) == before


def test_the_unmutated_state_loads() -> None:
    rig = Rig()
    load_into(rig.dev, good_state())
    assert state_of(rig.dev) == good_state()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruption_is_refused_or_loads_a_working_device(data: st.DataObject) -> None:
    state = good_state()
    index = data.draw(st.integers(0, len(state) - 1))
    _name, payload = state[index]
    kind = data.draw(st.sampled_from(["flip", "cut", "grow"]))
    blob = bytearray(payload)
    if kind == "flip" and blob:
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "cut":
        del blob[data.draw(st.integers(0, len(blob))) :]
    else:
        blob += data.draw(st.binary(min_size=1, max_size=16))
    mutated = [(n, bytes(blob) if i == index else p) for i, (n, p) in enumerate(state)]
    rig = Rig()
    rig.dev.pause()
    before = state_of(rig.dev)
    try:
        rig.dev.load_state(mutated)
    except DeviceError as exc:
        assert exc.errno == errno.EINVAL
        assert state_of(rig.dev) == before
        return
    # Accepted: it is a state the device can be in; it runs and saves consistently.
    rig.dev.resume()
    rig.rd(r.ICR)
    rig.dev.net_receive(frame_to(MAC, src=PEER))
    reloaded = Rig()
    load_into(reloaded.dev, state_of(rig.dev))


# =============================================================================================
# The announcement after a migration


def migrated_rig(src: Rig) -> Rig:
    """A destination holding ``src``'s state, stopped (RESUMING -> STOP done)."""
    src.dev.pause()
    dst = Rig()
    load_into(dst.dev, flat_sections(src.dev.save_state()))
    return dst


async def test_a_migrated_in_nic_announces_its_mac_as_qemu_does() -> None:
    src = Rig()
    src.wr(r.RA, 0x33221102)  # the driver's station address 02:11:22:33:44:55
    src.wr(r.RA + 4, 0x5544 | r.RAH_AV)
    dst = migrated_rig(src)
    await dst.run(advance=1)
    assert dst.port.frames == []  # stopped: nothing yet
    sent_at: list[float] = []
    transmit = dst.port.transmit

    def timed(frame: bytes) -> bool:
        sent_at.append(dst.clock.now)
        return transmit(frame)

    dst.port.transmit = timed  # type: ignore[method-assign]
    resumed = dst.clock.now
    dst.dev.resume()
    await dst.run(advance=10)
    rarp = announcement(bytes.fromhex("021122334455"))
    assert dst.port.frames == [rarp] * 5  # QEMU's five rounds, then quiet
    assert [round(t - resumed, 6) for t in sent_at] == [0.0, 0.05, 0.2, 0.45, 0.8]
    assert dst.rd(r.TPT) == 0  # on the wire, not guest traffic
    # The source, resumed after a failed migration, did not move: it does not announce.
    src.dev.resume()
    await src.run(advance=1)
    assert src.port.frames == []


async def test_announcement_rounds_need_the_link_and_stop_at_a_reset() -> None:
    src = Rig()
    mdic(src, 0, write=0x1340)  # autonegotiation under way: the link is down
    dst = migrated_rig(src)
    dst.dev.resume()
    await dst.run(advance=0.3)  # rounds at 0, 50 and 200 ms find no link
    assert dst.port.frames == [] and not dst.rd(r.STATUS) & r.STATUS_LU
    await dst.run(advance=1)  # link up at 500 ms: the rounds at 450 ms no, 800 ms yes
    assert dst.port.frames == [announcement(MAC)]  # the EEPROM's MAC (RA[0] as at reset)
    dst = migrated_rig(Rig())
    dst.dev.resume()
    assert len(dst.port.frames) == 1
    dst.dev.reset()
    await dst.run(advance=2)
    assert len(dst.port.frames) == 1
