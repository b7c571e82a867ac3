"""The command line as a user runs it: real processes, real signals."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from emulator.cli import build_parser
from emulator.client.qemu_args import device_json, qemu_args

PYTHON = sys.executable


def start_server(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "emulator", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextmanager
def cli_process(*args: str, **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """``vfio-user-emu ARGS`` with its output piped, killed on the way out unless the body
    ended it."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "emulator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


@contextmanager
def serving(*args: str, socket: Path) -> Iterator[subprocess.Popen[str]]:
    """A ``serve`` process, once ``socket`` exists; stopped with SIGTERM (then killed)
    unless the body stopped it."""
    proc = start_server(*args)
    try:
        wait_for(socket)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "emulator", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_qemu_line_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    path = tmp_path / "vfio-user.sock"
    with cli_process("serve", "--socket-path", str(path), "--print-qemu") as proc:
        wait_for(path)
        info = run_cli("info", "--socket-path", str(path))
        assert info.returncode == 0, info.stderr
        assert "1b36:0f00" in info.stdout and "MSI-X" in info.stdout
        assert "BAR2" in info.stdout and "MMAP" in info.stdout
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
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
    with cli_process("serve", f"--fd={fd}", pass_fds=(fd,)) as proc:
        listener.close()
        info = run_cli("info", "--socket-path", str(path))
        assert info.returncode == 0, info.stderr
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
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
        assert second.returncode == 1
        assert second.stderr == (
            f"vfio-user-emu: refusing to replace {path}: a server is listening on it (stop "
            "that server first, or choose another path)\n"
        )
        assert run_cli("info", "--socket-path", str(path)).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def test_qemu_args_command_is_shell_quoted_and_checks_its_input(tmp_path: Path) -> None:
    path = tmp_path / "dev.sock"
    with serving("--socket-path", str(path), socket=path):
        result = run_cli("qemu-args", "--socket-path", str(path), "--memory", "1G")
        assert result.returncode == 0, result.stderr
        # Pasted into a shell, the words are QEMU's arguments (no brace expansion).
        words = subprocess.run(
            ["bash", "-c", f"printf '%s\\n' {result.stdout}"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        assert words == qemu_args([str(path)], "1024M")
        lines = run_cli("qemu-args", "--socket-path", str(path), "--lines")
        assert lines.stdout.splitlines() == qemu_args([str(path)], "512M")
    banana = run_cli("qemu-args", "--socket-path", str(path), "--memory", "banana")
    assert banana.returncode == 2
    assert "argument --memory: 'banana' is not a size" in banana.stderr
    missing = run_cli("qemu-args", "--socket-path", str(path))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == (
        f"vfio-user-emu: qemu-args: {path} does not exist: no server there (start one with "
        f"`vfio-user-emu serve --socket-path {path}`) (--no-check prints the arguments "
        "anyway)\n"
    )
    unchecked = run_cli("qemu-args", "--socket-path", str(path), "--no-check")
    assert unchecked.returncode == 0 and "vfio-user-pci" in unchecked.stdout


def test_serve_socket_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nodir" / "dev.sock"
    result = run_cli("serve", "--socket-path", str(path))
    assert result.returncode == 1
    assert result.stderr == (
        f"vfio-user-emu: cannot create the socket {path}: the directory {path.parent} does "
        "not exist (create it first, or choose another path)\n"
    )


def test_serve_leaves_a_regular_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    result = run_cli("serve", "--socket-path", str(path))
    assert result.returncode == 1
    assert result.stderr == (
        f"vfio-user-emu: refusing to replace {path}: it exists and is not a socket (remove "
        "it, or choose another path)\n"
    )
    assert path.read_text() == "mine"


def _stale_socket(path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text(""), "{p} is a regular file, not a vfio-user socket"),
        (lambda p: p.mkdir(), "{p} is a directory, not a vfio-user socket"),
        (
            _stale_socket,
            "{p}: no server listens on this socket any more (a stale socket); start one "
            "with `vfio-user-emu serve --socket-path {p}`",
        ),
        (
            lambda p: None,
            "{p} does not exist: no server there (start one with "
            "`vfio-user-emu serve --socket-path {p}`)",
        ),
    ],
    ids=["file", "directory", "stale", "missing"],
)
def test_info_says_what_is_at_the_path(
    tmp_path: Path, make: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "thing"
    make(path)
    result = run_cli("info", "--socket-path", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"vfio-user-emu: info: {message.format(p=path)}\n"


def test_info_on_a_busy_server(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "busy.sock"
    with serving("--socket-path", str(path), socket=path), socket.socket(socket.AF_UNIX) as first:
        first.connect(str(path))
        time.sleep(0.2)  # accepted: the server now serves this client
        result = run_cli("info", "--socket-path", str(path))
    assert result.returncode == 1
    assert result.stderr == (
        f"vfio-user-emu: info: {path} is busy: its server already serves another client "
        "(QEMU or another vfio-user-emu command) and takes one at a time; detach that "
        "client first\n"
    )


def test_info_json_and_migration(tmp_path: Path) -> None:
    path = tmp_path / "dev.sock"
    with serving("--socket-path", str(path), "--device", "testdev,migration=both", socket=path):
        text = run_cli("info", "--socket-path", str(path))
        data = run_cli("info", "--json", "--socket-path", str(path))
    assert text.returncode == 0 and data.returncode == 0, text.stderr + data.stderr
    assert "Migration:\n  v2 (DEVICE_FEATURE)  STOP_COPY|PRE_COPY  state RUNNING\n" in text.stdout
    assert "  v1 (region 9)  state RUNNING\n" in text.stdout
    report = json.loads(data.stdout)
    assert report["migration"] == {
        "v2": {"capabilities": ["STOP_COPY", "PRE_COPY"], "state": "RUNNING"},
        "v1": {"region": 9, "state": "RUNNING"},
    }
    assert report["config"]["vendor:device"] == "1b36:0f00"
    assert report["regions"][2]["name"] == "BAR2" and report["regions"][2]["size"] == 64 * 1024
    assert report["regions"][2]["flags"] == ["R", "W", "MMAP", "CAPS"]
    assert report["regions"][1]["flags"] == []  # BAR1: unused
    assert report["flags"] == ["RESET", "PCI"]
    assert report["regions"][9]["v1_migration_region"] is True
    assert [irq["name"] for irq in report["irqs"]][:3] == ["INTx", "MSI", "MSI-X"]
    assert any("MSI-X" in line for line in report["capabilities"])


def test_device_help() -> None:
    everything = run_cli("serve", "--device", "help")
    assert everything.returncode == 0
    assert everything.stdout.startswith("device types:\n")
    for name in ("testdev", "lvu-sample", "e1000", "mig-caps="):
        assert name in everything.stdout
    one = run_cli("serve", "--device", "testdev,help")
    assert one.returncode == 0
    assert "ram-size=" in one.stdout and "mig-caps=" in one.stdout
    assert "e1000" not in one.stdout
    unknown = run_cli("serve", "--device", "nosuchdev,help")
    assert unknown.returncode == 2
    known = "testdev, lvu-sample, e1000, virtio-net"
    assert f"unknown device type 'nosuchdev' (known: {known})" in unknown.stderr
    needs_socket = run_cli("serve")
    assert needs_socket.returncode == 2
    assert "one of the arguments --socket-path --fd --config is required" in needs_socket.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"vfio-user-emu \d+\.\d+\.\d+\n", result.stdout)


@pytest.mark.parametrize(
    "argv",
    [["-v", "info", "--socket-path", "x"], ["info", "-v", "--socket-path", "x"]],
)
def test_verbose_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["info", "--socket-path", "x"]).verbose is False


def test_size_options_take_suffixes() -> None:
    args = build_parser().parse_args(
        ["serve", "--socket-path", "x", "--max-data-xfer-size", "1M", "--max-msg-size", "2M",
         "--max-migration-stream", "1G"]
    )  # fmt: skip
    assert args.max_data_xfer_size == 1 << 20
    assert args.max_msg_size == 2 << 20
    assert args.max_migration_stream == 1 << 30
    args = build_parser().parse_args(
        ["migrate", "--from", "a", "--to", "b", "--chunk", "64K", "--precopy-threshold", "1M"]
    )
    assert (args.chunk, args.precopy_threshold) == (64 << 10, 1 << 20)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-dma-maps", "0"], "argument --max-dma-maps: must be at least 1, not 0"),
        (["--max-data-xfer-size", "1X"], "argument --max-data-xfer-size: '1X' is not a size"),
    ],
)
def test_limit_options_name_themselves(tmp_path: Path, argv: list[str], message: str) -> None:
    result = run_cli("serve", "--socket-path", str(tmp_path / "x.sock"), *argv)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1]


def _subparsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, Any]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child_name, child in action.choices.items():
                yield from _subparsers(child, f"{name} {child_name}")


def test_every_option_has_help_and_shows_its_default() -> None:
    undocumented, without_default = [], []
    for name, parser in _subparsers(build_parser(), "vfio-user-emu"):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                undocumented.append(where)
                continue
            default = action.default
            shows = default not in (None, False, argparse.SUPPRESS, [])
            if action.option_strings and shows and "default" not in formatter._expand_help(action):
                without_default.append(where)
    assert not undocumented, undocumented
    assert not without_default, without_default


def test_bench_serialize_help_names_the_command() -> None:
    result = run_cli("bench", "serialize", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: vfio-user-emu bench serialize ")
    assert "(default: 16)" in result.stdout


def test_print_qemu_with_a_config(tmp_path: Path) -> None:
    config = tmp_path / "devices.toml"
    first, second = tmp_path / "a.sock", tmp_path / "b.sock"
    config.write_text(f'[[device]]\nsocket = "{first}"\n[[device]]\nsocket = "{second}"\n')
    with serving("--config", str(config), "--print-qemu", socket=second) as proc:
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "attach a guest with" in out
    assert device_json(str(first), "vfu0") in out and device_json(str(second), "vfu1") in out


def test_bench_rtt_finds_its_baseline_from_any_directory() -> None:
    baseline = build_parser().parse_args(["bench", "rtt"]).baseline
    assert baseline.is_absolute() and baseline.is_file()
    assert baseline == Path(__file__).resolve().parents[2] / "docs" / "bench" / "rtt-baseline.json"


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_info_waiting_on_a_silent_server_stops_on_a_signal(
    tmp_path: Path, signum: int, status: int
) -> None:
    """A socket whose owner accepts and never answers VERSION: `info` waits; Ctrl-C or
    SIGTERM ends it with one line and the shell's 128+N."""
    import socket

    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        with cli_process("info", "--socket-path", str(path)) as proc:
            listener.settimeout(30)
            conn, _ = listener.accept()
            with conn:
                assert conn.recv(4096)  # its VERSION: the CLI now waits for the reply
                proc.send_signal(signum)
                out, err = proc.communicate(timeout=10)
    assert proc.returncode == status
    assert out == ""
    assert err == f"vfio-user-emu: info: interrupted by {signal.Signals(signum).name}\n"


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_bench_stops_on_a_signal_with_one_line(signum: int, status: int) -> None:
    """A benchmark without a signal handling of its own (it is not a trio command): Ctrl-C
    or SIGTERM still ends it with one line, its servers stopped, and 128+N."""
    with cli_process(
        "bench", "rtt", "--count", "100000000", "--warmup", "0", "--placement", "same",
        "--scenario", "config_read",
    ) as proc:  # fmt: skip
        assert proc.stderr is not None
        assert "echo floor" in proc.stderr.readline()  # under way: measuring its floor
        time.sleep(0.5)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == status
    assert "Traceback" not in err
    assert (
        err.splitlines()[-1]
        == f"vfio-user-emu: bench: interrupted by {signal.Signals(signum).name}"
    )
