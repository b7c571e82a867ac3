"""A ``vde_switch`` (Debian's ``vde2``) as a child process: the shared segment the tests,
the soak and the scripts plug NICs into (``--netdev vde,sock=DIR``).

The switch runs in the foreground with its console on a pipe we hold: it exits when the
pipe closes (``vde_switch: EOF on stdin``), so it never outlives its owner by much, and
:meth:`VdeSwitch.stop` ends it by closing the pipe (then by its PID if it lingers). Its
management socket answers the console commands (``hash/print``: which MAC the switch has
learned behind which port; ``port/allprint``).

Migration: vde_switch keeps a MAC on the port it was last seen on for ``min persistence``
seconds (3 by default, counted in whole seconds) and ignores the same MAC arriving on
another port meanwhile, so a migrated NIC's announcement would move nothing for up to 3 s
after the source's last frame. Real switches move the MAC at the first frame from the new
port; ``hash/setminper -1`` makes vde_switch do the same (0 is not enough: it still holds
the MAC for the rest of the current second). :class:`VdeSwitch` sets it by default.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from emulator.tools.processes import stop_process

#: What ``apt-get install`` provides ``vde_switch`` on Debian.
VDE_PACKAGE = "vde2"
_PROMPT = b"vde$ "
_RESULT = re.compile(rb"^(1\d{3}) (.*)$", re.MULTILINE)
#: ``hash/print`` lines: ``Hash: 0001 Addr: 52:54:00:12:34:56 VLAN 0000 to port: 001  age 8 secs``
_HASH_LINE = re.compile(
    r"Addr:\s*([0-9a-f]{2}(?::[0-9a-f]{2}){5})\s+VLAN\s+(\d+)\s+to port:\s*(\d+)", re.IGNORECASE
)


class VdeSwitchError(Exception):
    """The switch could not start, or its management socket gave no answer."""


def vde_switch_binary() -> str | None:
    """The ``vde_switch`` on PATH (or in /usr/bin, /usr/sbin), None if there is none."""
    found = shutil.which("vde_switch")
    if found is not None:
        return found
    for directory in ("/usr/bin", "/usr/sbin"):
        candidate = Path(directory) / "vde_switch"
        if candidate.is_file():
            return str(candidate)
    return None


class VdeSwitch:
    """``vde_switch -s DIRECTORY -M MGMT`` (``hub=True``: ``-x``, every frame to every port;
    ``min_persistence``: ``hash/setminper``, None to keep the switch's 3 s)."""

    def __init__(
        self,
        directory: Path,
        *,
        hub: bool = False,
        binary: str | None = None,
        min_persistence: int | None = -1,
    ) -> None:
        self.directory = Path(directory)
        self.mgmt = self.directory.with_name(self.directory.name + ".mgmt")
        self.log_path = self.directory.with_name(self.directory.name + ".log")
        self.hub = hub
        self.min_persistence = min_persistence
        self.binary = binary or vde_switch_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Self:
        if self.binary is None:
            raise VdeSwitchError(f"no vde_switch on this machine (apt-get install {VDE_PACKAGE})")
        if not self.directory.parent.is_dir():
            raise VdeSwitchError(f"{self.directory.parent} is not a directory")
        command = [self.binary, "-s", str(self.directory), "-M", str(self.mgmt)]
        if self.hub:
            command.append("-x")
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log
        )
        deadline = time.monotonic() + timeout
        while not ((self.directory / "ctl").exists() and self.mgmt.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise VdeSwitchError(
                    f"vde_switch did not start at {self.directory}: {self.log_text().strip()}"
                )
            time.sleep(0.01)
        if self.min_persistence is not None:
            self.command(f"hash/setminper {self.min_persistence}")
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Close the console (the switch cleans up and exits); SIGTERM/SIGKILL if it does
        not within ``timeout`` seconds."""
        proc = self.proc
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def command(self, text: str, timeout: float = 5.0) -> str:
        """Run one console command on the management socket; its output (without the
        result line). VdeSwitchError if the switch reports an error."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(self.mgmt))
            _read_until_prompt(conn)
            conn.sendall(text.encode() + b"\n")
            answer = _read_until_prompt(conn)
        results = list(_RESULT.finditer(answer))
        if not results:
            raise VdeSwitchError(f"{text}: no result line in {answer!r}")
        code, message = results[-1].groups()
        if code != b"1000":
            raise VdeSwitchError(f"{text}: {code.decode()} {message.decode(errors='replace')}")
        body = answer[: results[-1].start()].decode(errors="replace")
        framing = ("0000 DATA END WITH '.'", ".")
        return "\n".join(line for line in body.splitlines() if line and line not in framing)

    def mac_table(self) -> dict[str, int]:
        """What the switch has learned: MAC (lower case, colons) -> port."""
        return {
            match.group(1).lower(): int(match.group(3))
            for match in _HASH_LINE.finditer(self.command("hash/print"))
        }

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _read_until_prompt(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(_PROMPT):
        chunk = conn.recv(65536)
        if not chunk:
            raise VdeSwitchError(f"the switch closed its management socket after {data!r}")
        data += chunk
    return data
