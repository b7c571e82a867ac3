"""``e1000`` statistics registers (devices/e1000/stats.py): saturating, read to clear."""

from __future__ import annotations

from devices.e1000 import regs as r
from tests.devices.e1000.test_device import Rig


def test_statistics_are_read_to_clear() -> None:
    rig = Rig()
    dev = rig.dev
    dev.stats.count(r.MPC, 3)
    dev.stats.count64(r.TORL, 0x1_0000_0010)
    assert rig.rd(r.MPC) == 3 and rig.rd(r.MPC) == 0
    assert rig.rd(r.TORL) == 0x10 and rig.rd(r.TORL) == 0
    assert rig.rd(r.TORH) == 1 and rig.rd(r.TORH) == 0
    dev.stats.count64(r.TORL, 0x1_0000_0010)
    assert rig.rd(r.TORH) == 1
    assert rig.rd(r.TORL) == 0  # reading the high half cleared the pair
    dev.stats.count(r.GPRC, 0xFFFFFFFF)
    dev.stats.count(r.GPRC, 5)
    assert rig.rd(r.GPRC) == 0xFFFFFFFF  # counters saturate
    rig.wr(r.GPTC, 7)
    assert rig.rd(r.GPTC) == 0  # read-only
    assert all(rig.rd(off) == 0 for off in r.STATS_OFFSETS)
