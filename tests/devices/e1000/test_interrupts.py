"""``e1000`` interrupts in process (devices/e1000/interrupts.py): ICR read-to-clear, ICS,
IMS/IMC and the INTx line, ITR mitigation, the RDTR/RADV and TIDV/TADV delays (see
test_device.Rig)."""

from __future__ import annotations

import struct

import pytest

from devices.e1000 import regs as r
from tests.devices.e1000.test_device import Rig, line


def test_icr_read_to_clear_ics_ims_imc_and_the_line_level() -> None:
    rig = Rig()
    rig.wr(r.ICS, r.ICR_RXT0 | r.ICR_TXDW)
    assert not line(rig)  # masked
    assert rig.rd(r.ICS) == r.ICR_RXT0 | r.ICR_TXDW  # ICS reads the causes, no clearing
    rig.wr(r.IMS, r.ICR_TXDW)
    assert line(rig) and rig.sink.intx == 1
    assert rig.rd(r.IMS) == r.ICR_TXDW
    rig.wr(r.IMC, r.ICR_TXDW)
    assert not line(rig)  # level: the mask dropped it
    assert rig.rd(r.IMC) == 0
    rig.wr(r.IMS, r.IMS_ENABLE_MASK)
    assert line(rig)
    assert rig.rd(r.ICR) == r.ICR_RXT0 | r.ICR_TXDW
    assert not line(rig)
    assert rig.rd(r.ICR) == 0
    # W1C: writing ICR clears the bits written
    rig.wr(r.ICS, r.ICR_RXT0 | r.ICR_LSC)
    rig.wr(r.ICR, r.ICR_RXT0)
    assert rig.rd(r.ICR) == r.ICR_LSC
    # partial (byte) writes of ICS and ICR
    rig.dev.region_write(0, r.ICS + 1, bytes([0x02]))  # MDAC
    assert rig.rd(r.ICR) == r.ICR_MDAC


@pytest.mark.parametrize("bit", range(17))
def test_every_cause_forced_through_ics_interrupts_at_once_when_enabled(bit: int) -> None:
    """e1000_intr_test: masked, a forced cause stays quiet; enabled, the line rises on the
    ICS write itself (no timer involved) and the handler's ICR read returns the cause."""
    rig = Rig()
    mask = 1 << bit
    rig.wr(r.IMC, mask)
    rig.wr(r.ICS, mask)
    assert not line(rig) and rig.sink.intx == 0
    rig.wr(r.IMS, mask)
    rig.wr(r.ICS, mask)
    assert line(rig) and rig.sink.intx == 1
    assert rig.isr() == mask
    rig.wr(r.IMC, ~mask & 0x7FFF)
    rig.wr(r.ICS, ~mask & 0x7FFF)
    assert not line(rig) and rig.sink.intx == 1
    assert rig.rd(r.ICR) == ~mask & 0x7FFF


def test_ics_beyond_the_implemented_causes_is_ignored() -> None:
    rig = Rig()
    rig.wr(r.IMS, 0xFFFFFFFF)
    assert rig.rd(r.IMS) == r.ICR_VALID
    rig.wr(r.ICS, 0xFFFE0000)
    assert not line(rig) and rig.rd(r.ICR) == 0


def test_config_space_intx_status_and_disable() -> None:
    rig = Rig()
    rig.wr(r.IMS, r.ICR_LSC)
    rig.wr(r.ICS, r.ICR_LSC)
    assert struct.unpack("<H", rig.dev.config.read(6, 2))[0] & 0x08
    rig.rd(r.ICR)
    assert not struct.unpack("<H", rig.dev.config.read(6, 2))[0] & 0x08


def test_itr_is_a_minimum_interval_between_interrupts() -> None:
    rig = Rig()
    rig.wr(r.ITR, 3906)  # 3906 x 256 ns ~ 1 ms: at most ~1000 interrupts/s
    rig.wr(r.IMS, r.ICR_LSC)
    rig.wr(r.ICS, r.ICR_LSC)
    assert rig.sink.intx == 1
    rig.isr()
    rig.wr(r.ICS, r.ICR_LSC)
    assert rig.sink.intx == 1 and not line(rig)  # too soon
    rig.clock.now += 0.0009
    rig.rd(r.STATUS)
    assert rig.sink.intx == 1
    rig.clock.now += 0.0002
    rig.rd(r.STATUS)  # the ITR interval passed: the pending cause asserts the line
    assert rig.sink.intx == 2 and line(rig)


@pytest.mark.parametrize(("itr", "max_interrupts"), [(3906, 101), (0, 2000)])
def test_itr_bounds_the_interrupt_rate_of_a_guest_under_load(itr: int, max_interrupts: int) -> None:
    """20,000 events/s for 100 ms with a guest that services every interrupt at once: with
    ITR ~1 ms it sees at most one interrupt per ms (plus the first); without ITR, one per
    event. No cause is lost either way: every interrupt's ICR read returns the cause."""
    rig = Rig()
    rig.wr(r.ITR, itr)
    rig.wr(r.IMS, r.ICR_LSC)
    interrupts = 0
    for _ in range(2000):
        rig.clock.now += 50e-6
        rig.wr(r.ICS, r.ICR_LSC)  # a device event raising a cause
        if line(rig):
            assert rig.isr() & r.ICR_LSC
            interrupts += 1
    assert rig.sink.intx == interrupts
    if itr:
        assert 90 <= interrupts <= max_interrupts  # throttled, but never starved
    else:
        assert interrupts == max_interrupts


def test_receive_and_transmit_interrupt_delays() -> None:
    rig = Rig()
    rig.wr(r.IMS, r.IMS_ENABLE_MASK)
    rig.wr(r.RDTR, 100)  # 102.4 us after the last frame
    rig.wr(r.RADV, 300)  # but at most 307.2 us after the first
    rig.dev.interrupts.cause(r.ICR_RXT0, rx_delay=True)
    assert rig.rd(r.ICS) & r.ICR_RXT0 and not line(rig)  # cause seen, line held
    for _ in range(5):  # frames keep coming: the packet timer restarts, the absolute one not
        rig.clock.now += 80e-6
        rig.rd(r.STATUS)
        rig.dev.interrupts.cause(r.ICR_RXT0, rx_delay=True)
        if line(rig):
            break
    assert line(rig)  # RADV bounded the delay
    rig.rd(r.ICR)
    rig.wr(r.TIDV, 50)
    rig.dev.interrupts.cause(r.ICR_TXDW, tx_delay=True)
    assert not line(rig)
    rig.clock.now += 52e-6
    rig.rd(r.STATUS)
    assert line(rig)
    rig.rd(r.ICR)
    rig.dev.interrupts.cause(r.ICR_TXDW, tx_delay=True)
    rig.wr(r.TIDV, 50 | r.FPD)  # flush: fire now
    assert line(rig)
    assert rig.rd(r.TIDV) == 50
