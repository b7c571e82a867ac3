"""The e1000's migration state: what :meth:`E1000.save_state` writes and
:meth:`E1000.load_state` checks and applies.

Everything that is not recomputed: every register, the EEPROM, the PHY registers, the EECD
(Microwire) state, the TX context and the partly assembled (or partly segmented) packet, the
receive FIFO and the remaining time of every timer. Sections: "e1000.regs" (offset u32,
value u32 for every register), "e1000.eeprom" (64 u16), "e1000.phy" (32 u16), "e1000.eecd"
(Microwire state), "e1000.tx" (context and partial packet, packet.TxAssembler.pack),
"e1000.rx" (count u32, then length u32 and bytes of every FIFO frame), "e1000.misc"
(IOADDR, delay flags, RNBC flag, remaining ns of each timer in TIMER_NAMES or -1).

:func:`load_state` validates all sections before applying any: a defect is EINVAL and
nothing changed. The functions take the device (they read and set every part of it), so
they live apart from it only to keep the device's own module about its registers; the
device's ``save_state``/``load_state`` call them.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from devices.api import DeviceError
from devices.e1000 import eeprom, packet, phy
from devices.e1000 import regs as r
from devices.e1000.rx import MAX_LONG_FRAME, fifo_limit
from devices.migration.stream import Buffer, LoadedSection, Section, sections_by_name

if TYPE_CHECKING:
    from devices.e1000.device import E1000

TIMER_NAMES = ("autoneg", "itr", "rxpkt", "rxabs", "txpkt", "txabs")
#: Longest timer a saved state may carry (ns): 0xffff x 1.024 us, with room to spare.
MAX_TIMER_NS = 1_000_000_000
SECTIONS = frozenset(
    {
        "e1000.regs",
        "e1000.eeprom",
        "e1000.phy",
        "e1000.eecd",
        "e1000.tx",
        "e1000.rx",
        "e1000.misc",
    }
)

_REG_ENTRY = struct.Struct("<II")
_MISC = struct.Struct("<IBBB6q")  # ioaddr, rx delaying, tx delaying, rnbc noted, timers


@dataclass(slots=True)
class _Misc:
    ioaddr: int
    rx_delaying: bool
    tx_delaying: bool
    rnbc_noted: bool
    timers: dict[str, float]


@dataclass(slots=True)
class _State:
    """A checked saved state, ready to apply."""

    values: dict[int, int]
    words: list[int]
    phy_regs: list[int]
    eecd: eeprom.Microwire
    tx: packet.TxAssembler
    fifo: list[bytes]
    misc: _Misc


def save_state(nic: E1000) -> list[Section]:
    receiver = nic.receiver
    entries = sorted(nic.values.items())
    regs_blob = b"".join(_REG_ENTRY.pack(off, value) for off, value in entries)
    rx: list[Buffer] = [struct.pack("<I", len(receiver.fifo))]
    for frame in receiver.fifo:
        rx.append(struct.pack("<I", len(frame)))
        rx.append(frame)
    remaining = nic.timers.remaining()
    timers = [round(remaining[name] * 1e9) if name in remaining else -1 for name in TIMER_NAMES]
    misc = _MISC.pack(
        nic.io.ioaddr,
        nic.interrupts.rx_delaying,
        nic.interrupts.tx_delaying,
        receiver.rnbc_noted,
        *timers,
    )
    return [
        ("e1000.regs", regs_blob),
        ("e1000.eeprom", struct.pack(f"<{eeprom.WORDS}H", *nic.eeprom)),
        ("e1000.phy", nic.phy.pack()),
        ("e1000.eecd", nic.eecd.pack()),
        ("e1000.tx", nic.transmitter.assembler.pack()),
        ("e1000.rx", rx),
        ("e1000.misc", misc),
    ]


def size_estimate(nic: E1000) -> int:
    receiver = nic.receiver
    assembler = nic.transmitter.assembler
    return (
        8 * len(nic.values)
        + receiver.fifo_bytes
        + 8 * len(receiver.fifo)
        + (len(assembler.data) + len(assembler.segment) + 512)
    )


def load_state(nic: E1000, sections: Sequence[LoadedSection]) -> None:
    """Validate every section, then apply; any defect: EINVAL and nothing changed."""
    try:
        state = _parse_state(nic, sections)
    except (ValueError, struct.error) as exc:
        raise DeviceError(errno.EINVAL, f"e1000 state: {exc}") from None
    misc = state.misc
    receiver = nic.receiver
    nic.values.update(state.values)
    nic.eeprom = state.words
    nic.phy.regs = state.phy_regs
    nic.eecd = state.eecd
    nic.transmitter.assembler = state.tx
    receiver.fifo = deque(state.fifo)
    receiver.fifo_bytes = sum(len(frame) for frame in state.fifo)
    receiver.rnbc_noted = misc.rnbc_noted
    nic.io.ioaddr = misc.ioaddr
    nic.interrupts.rx_delaying, nic.interrupts.tx_delaying = misc.rx_delaying, misc.tx_delaying
    receiver.forget_addresses()
    nic.new_generation()
    running = not nic.jobs.paused
    nic.timers.load(misc.timers)
    nic.migrated_in()
    if running:  # loaded into a running device (not the engine's way)
        nic.resume()


def _parse_state(nic: E1000, sections: Sequence[LoadedSection]) -> _State:
    by_name = sections_by_name(sections, SECTIONS)
    values = _parse_regs(nic, by_name["e1000.regs"])
    raw_words = by_name["e1000.eeprom"]
    if len(raw_words) != 2 * eeprom.WORDS:
        raise ValueError("EEPROM section of the wrong size")
    words = list(struct.unpack(f"<{eeprom.WORDS}H", raw_words))
    if not eeprom.checksum_ok(words):
        raise ValueError("EEPROM checksum is not 0xBABA")
    mac = eeprom.mac_of(words)
    if mac[0] & 1:
        raise ValueError("EEPROM MAC address is multicast")
    phy_regs = phy.Phy.unpack(by_name["e1000.phy"])
    eecd = eeprom.Microwire.unpack(by_name["e1000.eecd"])
    tx = packet.TxAssembler.unpack(by_name["e1000.tx"])
    fifo = _parse_fifo(by_name["e1000.rx"], values)
    misc = _parse_misc(by_name["e1000.misc"])
    link = bool(phy_regs[phy.BMSR] & phy.BMSR_LINK)
    if bool(values[r.STATUS] & r.STATUS_LU) != link:
        raise ValueError("STATUS.LU disagrees with the PHY's link state")
    if "autoneg" in misc.timers and link:
        raise ValueError("autonegotiation pending while the link is up")
    return _State(values, words, phy_regs, eecd, tx, fifo, misc)


def _parse_regs(nic: E1000, data: memoryview) -> dict[int, int]:
    known = {reg.offset: reg for reg in nic.regs.registers()}
    if len(data) != _REG_ENTRY.size * len(known):
        raise ValueError(f"register section of {len(data)} bytes")
    values = dict(_REG_ENTRY.iter_unpack(data))
    if set(values) != set(known):
        raise ValueError("register section names unknown or missing registers")
    for offset, reg in known.items():
        # Registers the guest writes hold only writable bits (handlers store what
        # they are given; the internal ones are checked below).
        if reg.on_write is None and reg.writable and values[offset] & ~reg.writable:
            raise ValueError(f"{reg.name} = {values[offset]:#x} has read-only bits set")
    for offset, mask in (
        (r.TDT, 0xFFFF),
        (r.RDT, 0xFFFF),
        (r.RDTR, 0xFFFF),
        (r.TIDV, 0xFFFF),
        (r.ICS, 0),
        (r.RCTL, r.RCTL_WRITABLE),
        (r.TCTL, r.TCTL_WRITABLE),
        (r.ICR, r.ICR_VALID),
        (r.IMS, r.ICR_VALID),
    ):
        if values[offset] & ~mask:
            raise ValueError(f"register {offset:#x} = {values[offset]:#x} out of range")
    if values[r.CTRL] & r.CTRL_RST:
        raise ValueError("CTRL.RST is self-clearing")
    if values[r.STATUS] & ~r.STATUS_LU != r.STATUS_BASE:
        raise ValueError("STATUS holds bits this model never sets")
    if values[r.EECD]:
        raise ValueError("EECD lives in the EECD section")
    for offset in range(r.RA + 4, r.RA + 8 * r.RA_COUNT, 8):
        if values[offset] & ~0x8003FFFF:
            raise ValueError("RAH with reserved bits")
    return values


def _parse_fifo(data: memoryview, values: dict[int, int]) -> list[bytes]:
    if len(data) < 4:
        raise ValueError("receive FIFO section too short")
    (count,) = struct.unpack_from("<I", data)
    limit = fifo_limit(values)
    frames: list[bytes] = []
    pos, total = 4, 0
    for _ in range(count):
        if pos + 4 > len(data):
            raise ValueError("receive FIFO section truncated")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if not packet.MIN_FRAME <= length <= MAX_LONG_FRAME or pos + length > len(data):
            raise ValueError(f"receive FIFO frame of {length} bytes")
        frames.append(bytes(data[pos : pos + length]))
        pos += length
        total += length
        if total > 2 * limit + MAX_LONG_FRAME:  # see Receiver.receive: the hard bound
            raise ValueError("receive FIFO holds more than the packet buffer")
    if pos != len(data):
        raise ValueError("receive FIFO section has trailing bytes")
    return frames


def _parse_misc(data: memoryview) -> _Misc:
    if len(data) != _MISC.size:
        raise ValueError(f"misc section of {len(data)} bytes")
    ioaddr, rx_delaying, tx_delaying, rnbc_noted, *times = _MISC.unpack(data)
    if max(rx_delaying, tx_delaying, rnbc_noted) > 1:
        raise ValueError("misc flags out of range")
    timers: dict[str, float] = {}
    for name, ns in zip(TIMER_NAMES, times, strict=True):
        if ns == -1:
            continue
        if not 0 <= ns <= MAX_TIMER_NS * 11:
            raise ValueError(f"timer {name} of {ns} ns")
        timers[name] = ns / 1e9
    if rx_delaying != ("rxpkt" in timers or "rxabs" in timers):
        raise ValueError("receive interrupt delay flag without its timers")
    if tx_delaying != ("txpkt" in timers or "txabs" in timers):
        raise ValueError("transmit interrupt delay flag without its timers")
    return _Misc(ioaddr, bool(rx_delaying), bool(tx_delaying), bool(rnbc_noted), timers)
