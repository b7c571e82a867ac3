"""Run a command that forks and execs itself away, and report how each of its processes ended.

libvfio-user's sample client forks when it migrates: the *parent* execs the destination server
and the *child* carries on as the client (samples/client.c, ``migrate_to``). The process a test
starts therefore ends as the destination server, and the client's own exit status goes to
whoever reaps an orphan. This program makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``)
so that every process of the tree is reaped here, and prints one JSON line per process on
its stdout (the tree's own output goes to ``--output``): ``{"pid", "name" (/proc/PID/comm,
read before reaping), "exit" (the code, or -signal), "seconds" (since the start), "first"
(true for the process it started)}``.

    python reaper.py --timeout 120 --output client.log -- ./client /tmp/x/sock

Past ``--timeout`` seconds the whole tree (its own process group) is killed with SIGKILL and the
exit status is 124. Otherwise it exits 0 once every process of the tree has ended."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from types import FrameType

PR_SET_CHILD_SUBREAPER = 36
TIMED_OUT = 124


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def process_name(pid: int) -> str:
    """The kernel's name of a process (a zombie's too: comm outlives cmdline)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def reap_one(started: float) -> dict[str, object] | None:
    """Wait up to 50 ms for a descendant to end; its record, or None when none did."""
    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    if info is None:
        time.sleep(0.05)
        return None
    name = process_name(info.si_pid)
    _, status = os.waitpid(info.si_pid, 0)
    return {
        "pid": info.si_pid,
        "name": name,
        "exit": os.waitstatus_to_exitcode(status),
        "seconds": round(time.monotonic() - started, 3),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--output", required=True, help="the tree's stdout and stderr")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    become_subreaper()
    started = time.monotonic()
    # Its own process group: a timeout (or our own SIGTERM) kills the whole tree, orphans too.
    with open(args.output, "ab") as output:
        first = subprocess.Popen(command, stdout=output, stderr=output, process_group=0)

    def kill_tree(signum: int = 0, frame: FrameType | None = None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, kill_tree)
    deadline = started + args.timeout
    timed_out = False
    while True:
        if not timed_out and time.monotonic() > deadline:
            timed_out = True
            kill_tree()
        try:
            record = reap_one(started)
        except ChildProcessError:
            break
        if record is not None:
            record["first"] = record["pid"] == first.pid
            print(json.dumps(record), flush=True)
    first.returncode = 0  # reaped above; keeps Popen from waiting again
    return TIMED_OUT if timed_out else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
