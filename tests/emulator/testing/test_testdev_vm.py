"""The testdev guest script's pieces and the parser of its console."""

from __future__ import annotations

from emulator.testing.testdev_vm import (
    ERROR_VECTOR,
    RAM_VALUE,
    SCRATCH_VALUE,
    TESTDEV_SHELL,
    Tick,
    lost_lines,
    msix_stream_script,
    parse_ticks,
)


def test_script_carries_its_values_and_vector() -> None:
    script = msix_stream_script(0x1234, 0x5678)
    assert script.startswith(TESTDEV_SHELL)
    assert "@" not in script.replace("$@", "")  # every placeholder filled
    assert "wrm $((bar0 + 0x10)) 0x1234" in script and "wrm $bar2 0x5678" in script
    assert f"wrm $((tbase + 8)) {ERROR_VECTOR:#x}" in script


def test_parse_ticks_takes_complete_lines_only() -> None:
    console = (
        "GUEST: up 1.0 s\n"
        f"T-TICK 0 irqs=1 raised=1 scratch={SCRATCH_VALUE:#x} ram={RAM_VALUE:#x}\r\n"
        "T-LOST 1: 0 interrupt(s) for one doorbell\n"
        f"T-TICK 1 irqs=1 raised=2 scratch={SCRATCH_VALUE:#x} ram=0x0\n"
        "T-TICK 2 irqs=2 raised=3 scratch=0x5eed"  # still being printed
    )
    assert parse_ticks(console) == [
        Tick(0, 1, 1, SCRATCH_VALUE, RAM_VALUE),
        Tick(1, 1, 2, SCRATCH_VALUE, 0),
    ]
    assert lost_lines(console) == ["T-LOST 1: 0 interrupt(s) for one doorbell"]
