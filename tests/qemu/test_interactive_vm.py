"""The README's quick start: ``make run`` in one terminal, ``make vm`` in another, which is
``scripts/qemu/run-vm --interactive --socket ./vfio-user.sock``: a shell in the guest on a
terminal, where the user finds our device, and ``exit`` powers the guest off.

The terminal is a pty driven from here (ash asks the terminal where its cursor is, with
ESC [6n, before each prompt: answered as a terminal would).
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import SCRIPTS, Server

pytestmark = pytest.mark.qemu

CURSOR_QUERY = b"\x1b[6n"
CURSOR_REPLY = b"\x1b[24;1R"


class Terminal:
    """The master side of a pty whose slave is a program's stdin, stdout and stderr."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True
        )
        os.close(slave)
        self.seen = b""

    def read_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the program closed the terminal
                return
            self.seen += data
            if CURSOR_QUERY in data:
                os.write(self.master, CURSOR_REPLY)

    def wait_for(self, text: bytes, seconds: float) -> None:
        end = time.monotonic() + seconds
        while text not in self.seen:
            if time.monotonic() > end or self.process.poll() is not None:
                tail = self.seen[-3000:].decode(errors="replace")
                pytest.fail(f"no {text!r} on the terminal; it shows:\n{tail}")
            self.read_for(0.5)

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def test_interactive_guest_finds_our_device(
    qemu_binary: str, guest_dir: Path, vfio_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = vfio_server("testdev", trace=False)
    env = dict(os.environ, QEMU=qemu_binary, TMPDIR=str(tmp_path))
    emu = Path(sys.executable).with_name("vfio-user-emu")
    if emu.exists():
        env["VFIO_USER_EMU"] = str(emu)
    console = tmp_path / "console.log"
    argv = [str(SCRIPTS / "run-vm"), "--interactive", "--socket", str(server.socket)]
    terminal = Terminal([*argv, "--console", str(console)], env, tmp_path)
    try:
        terminal.wait_for(b"interactive shell", 240)
        terminal.read_for(2)
        terminal.type("cat /sys/bus/pci/devices/*/device | tr '\\n' ' '; echo END-$((6*7))")
        terminal.wait_for(b"END-42", 60)
        terminal.type("exit")
        terminal.wait_for(b"GUEST: powering off", 60)
        assert terminal.process.wait(timeout=60) == 0
    finally:
        terminal.close()
    listing = terminal.seen.decode(errors="replace").split("END-$((6*7))")[-1]
    assert "0x0f00" in listing.split("END-42")[0]  # testdev, seen from the guest's shell
    assert "GUEST-TEST-EXIT: 0" in console.read_text(errors="replace")
