"""The testdev guest script's pieces and the parser of its console."""

from __future__ import annotations

from emulator.testing.testdev_vm import (
    ERROR_VECTOR,
    RAM_VALUE,
    SCRATCH_VALUE,
    TESTDEV_SHELL,
    Tick,
    TickLedger,
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


def tick_line(number: int, irqs: int, raised: int, scratch: int = SCRATCH_VALUE) -> str:
    return f"T-TICK {number} irqs={irqs} raised={raised} scratch={scratch:#x} ram={RAM_VALUE:#x}\n"


def test_ledger_accepts_a_healthy_stream_across_consoles() -> None:
    ledger = TickLedger()
    source = "".join(tick_line(n, n + 1, n + 1) for n in range(5))
    assert ledger.check(source) == ([], 0)
    destination = "".join(tick_line(n, n + 1, n + 1) for n in range(5, 9))
    assert ledger.check(destination, switchover_after=4) == ([], 0)
    assert ledger.check(source + destination) == ([], 0)  # nothing new, nothing said again


def test_ledger_explains_one_interrupt_lost_at_the_switchover_once() -> None:
    ledger = TickLedger()
    ledger.check("".join(tick_line(n, n + 1, n + 1) for n in range(5)))
    destination = "T-LOST 5: 0 interrupt(s) for one doorbell\n" + "".join(
        tick_line(n, n, n + 1) for n in range(5, 9)
    )
    assert ledger.check(destination, switchover_after=4) == ([], 1)
    # later ticks carry the same deficit: no new loss
    assert ledger.check(destination + tick_line(9, 9, 10)) == ([], 0)


def test_ledger_reports_losses_elsewhere_and_wrong_values() -> None:
    ledger = TickLedger()
    ledger.check("".join(tick_line(n, n + 1, n + 1) for n in range(5)))
    console = (
        tick_line(5, 6, 6)
        + "T-LOST 6: 0 interrupt(s) for one doorbell\n"
        + tick_line(6, 6, 7)  # lost, but not at the switchover (after tick 2)
        + tick_line(7, 7, 8, scratch=0)
    )
    problems, at_switchover = ledger.check(console, switchover_after=2)
    assert at_switchover == 0
    assert problems == [
        "tick 6: +1 interrupt(s) the device raised and the guest did not count",
        "tick 7: scratch 0x0 ram 0xc0ffee42",
    ]


def test_ledger_reports_two_lost_at_the_switchover() -> None:
    ledger = TickLedger()
    ledger.check(tick_line(0, 1, 1))
    problems, at_switchover = ledger.check(tick_line(1, 0, 2), switchover_after=0)
    assert at_switchover == 0 and problems[0].startswith("tick 1: +2 interrupt(s)")
