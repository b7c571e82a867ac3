"""tests/interop/reaper.py: the exit status of a process whose parent exec'd something else is
reported (the sample client's fork-and-exec), and a tree past its timeout is killed whole."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REAPER = Path(__file__).with_name("reaper.py")


def reap(tmp_path: Path, timeout: float, script: str) -> tuple[int, list[dict[str, object]], str]:
    log = tmp_path / "tree.log"
    command = [sys.executable, str(REAPER), "--timeout", str(timeout), "--output", str(log)]
    done = subprocess.run(
        [*command, "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return done.returncode, records, log.read_text()


def test_a_forked_child_is_reaped_with_its_status_after_its_parent_execs(tmp_path: Path) -> None:
    # The child outlives its parent's exec and exits 3 after it: only a subreaper sees that.
    code, records, log = reap(tmp_path, 30, "(sleep 0.3; echo child; exit 3) & exec sleep 0.1")
    assert code == 0
    first = [r for r in records if r["first"]]
    others = [r for r in records if not r["first"]]
    assert len(first) == 1 and first[0]["name"] == "sleep" and first[0]["exit"] == 0, records
    assert len(others) == 1 and others[0]["exit"] == 3, records
    assert log == "child\n"


def test_a_tree_past_its_timeout_is_killed_whole(tmp_path: Path) -> None:
    started = time.monotonic()
    code, records, _ = reap(tmp_path, 1, "sleep 60 & exec sleep 60")
    assert code == 124
    assert time.monotonic() - started < 30
    assert [r["exit"] for r in records] == [-9, -9], records
