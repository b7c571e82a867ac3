"""The RTT benchmark's own logic: its client against real servers, and the regression check.
(The benchmark itself is not a test; these only prove it measures what it says.)"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from emulator.tools.bench_rtt import (
    BATCH,
    SCENARIOS,
    TESTDEV_SCRATCH0,
    BlockingClient,
    _measure,
    posted_write_message,
    read_message,
    regressions,
    started_server,
    version_message,
)
from protocol.constants import HEADER_SIZE


def row(
    scenario: str, fast_ratio: float, rate_ratio: float, placement: str = "same"
) -> dict[str, Any]:
    return {
        "placement": placement,
        "scenario": scenario,
        "ratio": fast_ratio,
        "fast_ratio": fast_ratio,
        "rate_ratio": rate_ratio,
    }


def test_regressions_flag_only_changes_beyond_ten_percent() -> None:
    baseline = {"rows": [row("config_read", 1.60, 0.60), row("posted_write", 9.0, 0.10)]}
    current = {"rows": [row("config_read", 1.70, 0.56), row("posted_write", 10.2, 0.08)]}
    found = regressions(current, baseline)
    assert found == [
        "same posted_write: p10 10.20x floor, was 9.00x",
        "same posted_write: rate 0.08x floor, was 0.10x",
    ]
    assert regressions(baseline, baseline) == []
    assert regressions(current, {"rows": []}) == []  # new figures have nothing to regress from
    # Cross-CPU figures are reported but not checked (they measure the machine's load).
    cross_before = {"rows": [row("config_read", 1.0, 1.0, "cross")]}
    assert regressions({"rows": [row("config_read", 3.0, 0.1, "cross")]}, cross_before) == []


def test_client_measures_the_echo_floor_and_our_server() -> None:
    by_name = {s.name: s for s in SCENARIOS}
    for kind, scenario in (
        ("echo", "config_read"),
        ("trio-echo", "config_read"),
        ("testdev", "config_read"),
    ):
        sample = _measure(kind, by_name[scenario], (None, None), 200, 20)
        assert 0 < sample.p10_us <= sample.median_us <= sample.p99_us
        assert sample.rate > 0
    # Posted writes: the fence read only returns once all 64 writes were processed.
    posted = _measure("testdev", by_name["posted_write"], (None, None), 640, 64)
    assert posted.rate > 0


def test_posted_writes_reach_the_server_before_the_fence_read_answers(tmp_path: Path) -> None:
    """What the posted-write figure counts is real: the server applied every write (no
    reply each), in order, by the time the fence read behind them is answered."""
    path = str(tmp_path / "s.sock")
    with started_server("testdev", path, None):
        client = BlockingClient(path)
        try:
            client.check(version_message())
            client.check(SCENARIOS_BY_NAME["posted_write"].build())
            assert reply_data(client, 4) == struct.pack("<I", BATCH - 1)  # the last write
            # 64 writes spread over 8 scratch registers: each holds the last value it got.
            spread = b"".join(
                posted_write_message(0, TESTDEV_SCRATCH0 + 4 * (i % 8), 1000 + i)
                for i in range(BATCH)
            )
            client.check(spread + read_message(0, TESTDEV_SCRATCH0, 32))
            expected = [1000 + BATCH - 8 + r for r in range(8)]
            assert list(struct.unpack("<8I", reply_data(client, 32))) == expected
        finally:
            client.close()


SCENARIOS_BY_NAME = {s.name: s for s in SCENARIOS}


def reply_data(client: BlockingClient, count: int) -> bytes:
    """The data of the REGION_READ reply the client read last (header, access, data)."""
    return bytes(client.buf[HEADER_SIZE + 16 : HEADER_SIZE + 16 + count])
