"""Linux's e1000 offline self-test (:mod:`emulator.testing.e1000_selftest`) against our ``e1000``
served over a vfio-user socket: all five tests pass, and each one fails, with the driver's
code and message, on a device with the defect it is there to find."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from devices.e1000 import E1000, E1000Options
from devices.e1000 import regs as r
from emulator.client import Client
from emulator.testing.e1000_selftest import SelfTest, SelfTester, lbtest_frame, lbtest_frame_ok
from emulator.testing.guest_e1000 import DriverConfig, E1000Guest
from emulator.testing.harness import EventFd, GuestRam, served_device

MAC = bytes.fromhex("525400000042")
RAM_BASE = 0x40000000


@asynccontextmanager
async def self_tester(tmp_path: Path, device: E1000) -> AsyncIterator[SelfTester]:
    """The guest driver, probed and opened (link up), on ``device`` served over a socket."""
    config = DriverConfig()
    async with AsyncExitStack() as stack:
        served = await stack.enter_async_context(served_device(device, tmp_path))
        client = await stack.enter_async_context(Client.connect(served.socket_path))
        ram = stack.enter_context(
            GuestRam(SelfTester.ram_needed(config.ram_needed()), base=RAM_BASE)
        )
        irq = EventFd()
        stack.callback(irq.close)
        guest = E1000Guest(client, ram, irq, config)
        await guest.init()
        yield SelfTester(guest)


async def run_selftest(tmp_path: Path, device: E1000 | None = None) -> SelfTest:
    async with self_tester(tmp_path, device or E1000(E1000Options(mac=MAC))) as tester:
        return await tester.run(link_wait=4.0)


def test_loopback_frame_pattern() -> None:
    frame = lbtest_frame()
    assert len(frame) == 1024 and frame[:512] == b"\xff" * 512
    assert frame[522] == 0xBE and frame[524] == 0xAF and frame[1023] == 0xFF
    assert lbtest_frame_ok(frame)
    assert not lbtest_frame_ok(bytes(1024))
    assert not lbtest_frame_ok(frame[:522] + b"\xaa" + frame[523:])


async def test_all_five_pass_on_our_e1000(tmp_path: Path) -> None:
    result = await run_selftest(tmp_path)
    assert result.passed, f"{result.table()}\n{result.messages}"
    assert (result.register, result.eeprom, result.interrupt, result.loopback, result.link) == (
        0,
        0,
        0,
        0,
        0,
    )
    # The ring has 255 descriptors to give (RDT = 255): every one came back written, and
    # each round's 64 frames were there well inside the driver's 200 ms.
    assert result.looped_frames == 255
    assert len(result.round_times) == 10 and max(result.round_times) < 0.2


async def test_register_test_finds_a_register_wider_than_the_part(tmp_path: Path) -> None:
    """The defect the issue measured: FCAH keeping 32 bits."""
    device = E1000(E1000Options(mac=MAC))
    next(reg for reg in device.regs.registers() if reg.offset == r.FCAH).writable = 0xFFFFFFFF
    result = await run_selftest(tmp_path, device)
    assert result.register == r.FCAH
    assert "pattern test reg 002C failed: got 0x5a5a5a5a expected 0x00005a5a" in result.messages
    assert (result.eeprom, result.interrupt, result.loopback, result.link) == (0, 0, 0, 0)


async def test_interrupt_test_finds_a_cause_that_ics_cannot_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit 5 as the model had it before (outside the ICR bits it latched): code 4."""
    monkeypatch.setattr(r, "ICR_VALID", r.ICR_VALID & ~0x20)
    result = await run_selftest(tmp_path)
    assert result.interrupt == 4
    assert "interrupt test: cause 0x20 enabled and forced, no interrupt" in result.messages


async def test_interrupt_test_finds_a_masked_cause_that_interrupts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = E1000(E1000Options(mac=MAC))
    unmasked = device.interrupts.update_line

    def ignore_mask() -> None:  # a line that follows ICR, whatever IMS says
        if device.values[r.ICR] and not device.irq.intx_line:
            device.irq.raise_intx()
        unmasked()

    monkeypatch.setattr(device.interrupts, "update_line", ignore_mask)
    result = await run_selftest(tmp_path, device)
    assert result.interrupt == 3


async def test_loopback_test_needs_the_phy_to_loop_frames_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = E1000(E1000Options(mac=MAC))
    monkeypatch.setattr(device, "_loopback", lambda: False)
    result = await run_selftest(tmp_path, device)
    assert result.loopback == 13
    assert result.looped_frames == 0
    assert (result.register, result.eeprom, result.interrupt, result.link) == (0, 0, 0, 0)


async def test_link_test_fails_while_autonegotiation_never_completes(tmp_path: Path) -> None:
    device = E1000(E1000Options(mac=MAC, autoneg_delay=0.5))
    async with self_tester(tmp_path, device) as tester:
        # The guest brought the link up; restart autonegotiation (0.5 s) and give it 0.2 s.
        bmcr = await tester.guest.phy_read(0)
        await tester.guest.phy_write(0, bmcr | 0x1000 | 0x0200)
        assert await tester.link_test(0.2) == 1
        assert tester.result.messages == ["link test: STATUS.LU clear"]
