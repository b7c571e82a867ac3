"""The command line as a user runs it: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.qemu import device_json, qemu_args

PYTHON = sys.executable


def start_server(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "emulator", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "emulator", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_qemu_line_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    path = tmp_path / "vfio-user.sock"
    proc = start_server("--socket-path", str(path), "--print-qemu")
    try:
        wait_for(path)
        info = run_cli("info", "--socket-path", str(path))
        assert info.returncode == 0, info.stderr
        assert "1b36:0f00" in info.stdout and "MSI-X" in info.stdout
        assert "BAR2" in info.stdout and "MMAP" in info.stdout
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert not path.exists()
    assert "serving testdev" in out
    expected = device_json(str(path), "vfu0")
    assert f"'{expected}'" in out  # the JSON form, shell-quoted, as QEMU 10.2 needs
    assert "memory-backend-memfd" in out and "share=on" in out


def test_serve_once_exits_after_the_client_leaves(tmp_path: Path) -> None:
    path = tmp_path / "once.sock"
    proc = start_server("--socket-path", str(path), "--once")
    try:
        wait_for(path)
        assert run_cli("info", "--socket-path", str(path)).returncode == 0
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 0
    assert not path.exists()


def test_serve_from_inherited_fd(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    proc = subprocess.Popen(
        [PYTHON, "-m", "emulator", "serve", f"--fd={fd}"],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.close()
    try:
        info = run_cli("info", "--socket-path", str(path))
        assert info.returncode == 0, info.stderr
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuchdev", "unknown device type 'nosuchdev'"),
        ("testdev,ram-size=3K", "power of two"),
        ("testdev,colour=blue", "unknown option(s) colour"),
        ("testdev,ram", "not key=value"),
    ],
)
def test_bad_device_spec_is_a_clear_error(tmp_path: Path, spec: str, message: str) -> None:
    result = run_cli("serve", "--device", spec, "--socket-path", str(tmp_path / "x.sock"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_info_on_a_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("info", "--socket-path", str(tmp_path / "absent.sock"))
    assert result.returncode == 1 and "absent.sock" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_to_replace_a_live_socket(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    proc = start_server("--socket-path", str(path))
    try:
        wait_for(path)
        second = run_cli("serve", "--socket-path", str(path))
        assert second.returncode == 1 and "refusing to replace" in second.stderr
        assert run_cli("info", "--socket-path", str(path)).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def test_qemu_args() -> None:
    args = qemu_args(["/run/a.sock", "/run/b.sock"], "1G")
    assert "memory-backend-memfd,id=mem,size=1G,share=on" in args
    devices = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-device"]
    assert [d["socket"] for d in devices] == [
        {"type": "unix", "path": "/run/a.sock"},
        {"type": "unix", "path": "/run/b.sock"},
    ]
    assert all(d["driver"] == "vfio-user-pci" for d in devices)
    result = run_cli("qemu-args", "--socket-path", "/run/a.sock")
    assert result.returncode == 0 and "vfio-user-pci" in result.stdout
