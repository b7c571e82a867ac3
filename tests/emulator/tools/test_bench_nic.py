"""``bench nic``'s own logic: the guest script it writes, what it reads back from the guests'
consoles, the report and its ratios, and its refusals. (The benchmark itself boots QEMU
guests and is not a test; a short real run: ``vfio-user-emu bench nic --count 3
--bulk-mib 1``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from emulator.tools.bench_nic import (
    IPS,
    NICS,
    OURS,
    THEIRS,
    PairResult,
    guest_script,
    parse_bulk,
    parse_ping,
    report,
)

PING_LINE = (
    "BENCH-PING: 10 packets transmitted, 9 packets received, 10% packet loss "
    "round-trip min/avg/max = 1.024/2.500/4.960 ms\n"
)


def result(
    who: str, round_number: int, pings: list[float | None], bulk: float | None
) -> PairResult:
    return PairResult("e1000", who, round_number, pings, 0, bulk, 16 << 20, 3.5)


def test_guest_script_is_filled_in_for_each_side() -> None:
    a = guest_script(NICS["virtio-net"], 0, 7, 64)
    b = guest_script(NICS["virtio-net"], 1, 7, 64)
    assert "@" not in a + b  # every placeholder replaced
    assert f"ip addr add {IPS[0]}/16" in a and f"ping -c 7 -i 0.2 -W 2 {IPS[1]}" in a
    assert f"ip addr add {IPS[1]}/16" in b
    assert "[ a = a ]" in a and "[ b = a ]" in b  # A receives the bulk transfer, B sends
    assert "count=64" in b and "0x1af4" in a and "0x1041" in a


def test_ping_and_bulk_are_read_from_the_console() -> None:
    assert parse_ping("boot noise\n" + PING_LINE) == (2.5, 1)
    assert parse_ping("BENCH-FAIL: no NIC\n") == (None, 0)
    assert parse_bulk("BENCH-BULK: 16777216 12.50 15.75\n") == (3.25, 16777216)
    assert parse_bulk("BENCH-BULK: 0 12.50 12.50\n") == (None, 0)
    assert parse_bulk("") == (None, 0)


def test_report_pairs_each_round_and_gives_the_ratios() -> None:
    results = [
        result(OURS, 0, [3.0, 5.0], 4.0),
        result(THEIRS, 0, [2.0, 2.0], 2.0),
        result(OURS, 1, [6.0, 6.0], None),
        result(THEIRS, 1, [3.0, None], 3.0),
    ]
    lines = report(results, 16)
    assert "| e1000 | ours | 3.5 | 3.00 / 5.00 | 4.00 | 0 | 4.00 | 4.19 |" in lines
    assert "round 1: e1000: ping ours / QEMU's 2.00x, bulk throughput ours / QEMU's 0.50x" in lines
    # a guest without a result: no average, no ratio for what is missing
    assert "round 2: e1000: ping ours / QEMU's n/a, bulk throughput ours / QEMU's n/a" in lines
    assert "e1000, all rounds: ping median ours 5.00 ms, QEMU's 2.00 ms (2.50x)" in lines


def test_refuses_unknown_nics_and_missing_qemu(tmp_path: Path) -> None:
    def bench(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "emulator", "bench", "nic", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    unknown = bench("--nic", "e1000,rtl8139")
    assert unknown.returncode == 2 and "unknown rtl8139" in unknown.stderr
    missing = bench("--qemu", str(tmp_path / "no-qemu"))
    assert missing.returncode == 2 and "no QEMU at" in missing.stderr
    assert bench("--rounds", "0").returncode == 2
