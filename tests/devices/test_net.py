"""devices.net: the MAC announcement frame of a NIC that migrated in (QEMU's announce-self)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.net import ANNOUNCE_DELAYS, announcement


def test_announcement_is_qemus_gratuitous_rarp() -> None:
    mac = bytes.fromhex("525400123456")
    frame = announcement(mac)
    # net/announce.c announce_self_create: broadcast, RARP, Ethernet/IPv4, 6/4, opcode 3,
    # sender = target = the MAC, no protocol addresses, zero padding to 60 bytes.
    assert frame == bytes.fromhex(
        "ffffffffffff525400123456803500010800060400035254001234560000000052540012345600000000"
    ) + bytes(18)


@given(st.binary(min_size=6, max_size=6))
def test_any_mac_gives_a_60_byte_broadcast_from_it(mac: bytes) -> None:
    frame = announcement(mac)
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert frame[22:28] == mac == frame[32:38]


def test_a_mac_has_six_bytes() -> None:
    with pytest.raises(ValueError, match="6 bytes"):
        announcement(bytes(5))


def test_rounds_follow_qemus_defaults() -> None:
    # announce-initial 50, -step 100, -rounds 5: frames at 0, 50, 200, 450, 800 ms
    times = [round(sum(ANNOUNCE_DELAYS[: i + 1]), 3) for i in range(len(ANNOUNCE_DELAYS))]
    assert times == [0.0, 0.05, 0.2, 0.45, 0.8]
