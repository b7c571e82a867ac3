"""stop_process: SIGTERM first, SIGKILL only for a child that ignores it, reaped always."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from emulator.tools.processes import stop_process


def child(code: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_a_child_that_exits_on_sigterm_is_not_killed() -> None:
    proc = child("import time; print('ready', flush=True); time.sleep(60)")
    stop_process(proc, timeout=10)
    assert proc.returncode == -signal.SIGTERM


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    proc = child(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    began = time.monotonic()
    stop_process(proc, timeout=0.3)
    assert proc.returncode == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - began < 10


def test_an_exited_child_is_left_alone() -> None:
    proc = child("print('ready', flush=True)")
    proc.wait()
    stop_process(proc)
    assert proc.returncode == 0
