"""scripts/bench_serialize.py runs (small) and gives the whole-state rows for each
implementation; it exits non-zero when C and Python disagree on a result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devices.migration import fastpath


def test_bench_serialize_checks_c_against_python() -> None:
    script = Path(__file__).parents[2] / "scripts" / "bench_serialize.py"
    result = subprocess.run(
        [sys.executable, str(script), "--size-mib", "1", "--repeat", "1",
         "--python-sample-mib", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    implementations = 2 if fastpath.load() is not None else 1  # C (when built) and Python
    for operation in (
        "serialize (stop-copy stream)",
        "parse+verify+apply, whole stream",
        "parse+verify+apply, as it arrives",
    ):
        assert result.stdout.count(operation) == implementations, result.stdout
