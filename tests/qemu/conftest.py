"""Fixtures for tests that boot a real Linux guest in an unmodified QEMU with our devices.

Nothing is built here: the tests use the QEMU in ``$QEMU`` or the one
``scripts/qemu/build-qemu`` left in the cache, and the guest ``scripts/qemu/build-guest``
assembled, and are skipped with the reason (and the command to run) when either is missing.
The cache is ``$VFIO_USER_EMU_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/vfio-user-emu``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from emulator.testing.qmp import close_qmp, connect_qmp
from emulator.tools.qemu_soak import cache_dir

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "qemu"
MIN_QEMU = (10, 1, 1)
QEMU_NAME = "qemu-system-x86_64"


def _qemu_problem(binary: str) -> str | None:
    """Why ``binary`` cannot run these tests, or None when it can."""
    try:
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
        devices = subprocess.run(
            [binary, "-nodefaults", "-machine", "none", "-device", "help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary} does not run: {exc}"
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", version)
    if not match:
        return f"{binary} printed no QEMU version"
    found = tuple(int(part) for part in match.groups())
    if found < MIN_QEMU:
        return f"{binary} is QEMU {'.'.join(map(str, found))}, older than 10.1.1"
    if '"vfio-user-pci"' not in devices:
        return f"{binary} has no vfio-user-pci device"
    return None


#: ``make test QEMU_TESTS=...``: "auto" skips these tests (with the reason) when QEMU or the
#: guest is missing, "require" (CI) fails them instead, "skip" skips them all.
QEMU_TESTS_MODE = os.environ.get("VFIO_USER_EMU_QEMU_TESTS", "auto")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it when QEMU tests are required."""
    if QEMU_TESTS_MODE == "require":
        pytest.fail(f"{reason} [QEMU_TESTS=require]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """The QEMU the tests run: ``$QEMU``, else the one ``scripts/qemu/build-qemu`` built with
    the project's vfio-user migration patches."""
    if QEMU_TESTS_MODE == "skip":
        pytest.skip("QEMU_TESTS=skip")
    explicit = os.environ.get("QEMU")
    binary = explicit or str(cache_dir() / "qemu-patched" / "install" / "bin" / QEMU_NAME)
    if not explicit and not os.access(binary, os.X_OK):
        unavailable(
            f"no QEMU with vfio-user-pci: none in $QEMU nor at {binary} "
            "(run scripts/qemu/build-qemu, ~5 min, or set QEMU=/path/to/qemu-system-x86_64)"
        )
    problem = _qemu_problem(binary)
    if problem:
        unavailable(f"no suitable QEMU: {problem} (run scripts/qemu/build-qemu or fix $QEMU)")
    return binary


@pytest.fixture(scope="session")
def stock_qemu_binary() -> str:
    """A QEMU without the project's patches: ``$QEMU_STOCK``, else the one
    ``scripts/qemu/build-qemu --stock`` built. Optional even in CI (which builds only the
    patched QEMU): the tests that need it are skipped, with the reason, when there is none."""
    if QEMU_TESTS_MODE == "skip":
        pytest.skip("QEMU_TESTS=skip")
    explicit = os.environ.get("QEMU_STOCK")
    binary = explicit or str(cache_dir() / "qemu" / "install" / "bin" / QEMU_NAME)
    if not os.access(binary, os.X_OK):
        pytest.skip(
            f"no stock QEMU at {binary} (scripts/qemu/build-qemu --stock, or set QEMU_STOCK)"
        )
    problem = _qemu_problem(binary)
    if problem:
        pytest.skip(f"no suitable stock QEMU: {problem}")
    return binary


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    guest = cache_dir() / "guest"
    if not all((guest / name).is_file() for name in ("vmlinuz", "initramfs.cpio.gz")):
        unavailable(f"no test guest in {guest} (run scripts/qemu/build-guest, ~10 s)")
    for tool in ("cpio", "timeout"):
        if shutil.which(tool) is None:
            unavailable(f"scripts/qemu/run-vm needs {tool} (apt-get install {tool})")
    return guest


def emulator_command() -> list[str]:
    """Our CLI, from the interpreter running the tests (the project's venv)."""
    return [sys.executable, "-m", "emulator"]


@dataclass
class Server:
    """A ``vfio-user-emu serve --trace`` process and its logs."""

    socket: Path
    process: subprocess.Popen[bytes]
    log: Path

    def trace(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class ServerPool:
    """Starts ``vfio-user-emu serve --trace`` processes in ``workdir``; stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Server] = []

    def start(
        self,
        device: str,
        *extra: str,
        name: str | None = None,
        trace: bool = True,
        program: list[str] | None = None,
    ) -> Server:
        """Start a server for ``device`` (TYPE[,key=value...]); returns once it listens.
        ``trace=False`` leaves out ``--trace`` (a line per message slows a busy NIC down);
        ``program`` replaces our CLI (a variant taking the same arguments)."""
        name = name or device.split(",", maxsplit=1)[0]
        socket = self.workdir / f"{name}.sock"
        log = self.workdir / f"{name}-server.log"
        command = [*(program or emulator_command()), "serve", "--device", device]
        command += ["--socket-path", str(socket), *(["--trace"] if trace else []), *extra]
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        server = Server(socket, process, log)
        self.started.append(server)
        deadline = time.monotonic() + 30
        while not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"server for {device} did not start:\n{server.trace()}")
            time.sleep(0.05)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def vfio_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``vfio_server("testdev")`` starts our server and returns a :class:`Server` once its
    socket listens; every server started is stopped (SIGTERM) at teardown."""
    pool = ServerPool(tmp_path)
    yield pool.start
    pool.stop_all()


@dataclass
class VmRun:
    """What one ``scripts/qemu/run-vm`` run left behind."""

    returncode: int
    console: str
    output: str  # run-vm's and QEMU's own stdout/stderr
    wall_s: float
    marks: dict[str, float] = field(default_factory=dict)

    def guest_times(self) -> str:
        return ", ".join(f"{key} {value:.2f} s" for key, value in self.marks.items())


def _boot_marks(console: str) -> dict[str, float]:
    """Guest uptimes /init printed: when it started and when it powered off."""
    marks: dict[str, float] = {}
    if up := re.search(r"^GUEST: up ([\d.]+) s", console, re.M):
        marks["init started at uptime"] = float(up.group(1))
    if off := re.search(r"^GUEST: powering off at ([\d.]+) s", console, re.M):
        marks["poweroff at uptime"] = float(off.group(1))
    return marks


@dataclass
class VmCommand:
    """A ``scripts/qemu/run-vm`` command line, its environment and where its console goes."""

    argv: list[str]
    env: dict[str, str]
    console: Path
    timeout: int


def vm_command(
    workdir: Path,
    qemu_binary: str,
    sockets: list[Path],
    script: str,
    *,
    append: str = "",
    timeout: int = 240,
    memory: str = "512M",
    name: str = "vm",
    reboot: bool = False,
    qemu_args: tuple[str, ...] = (),
) -> VmCommand:
    """The run-vm command that boots the guest with our ``sockets`` attached and ``script``
    as /test.sh; console, QEMU's vfio trace and the script go to ``workdir``."""
    script_file = workdir / f"{name}-test.sh"
    script_file.write_text(script)
    console = workdir / f"{name}-console.log"
    argv = [str(SCRIPTS / "run-vm"), "--quiet", "--console", str(console)]
    argv += ["--script", str(script_file), "--timeout", str(timeout)]
    argv += ["--memory", memory, "--append", append]
    argv += ["--qemu-trace", str(workdir / f"{name}-qemu-trace.log")]
    if reboot:
        argv.append("--reboot")
    for path in sockets:
        argv += ["--socket", str(path)]
    if qemu_args:
        argv += ["--", *qemu_args]
    # run-vm's scratch directory goes to workdir too, so a killed run-vm leaves nothing behind
    env = dict(os.environ, QEMU=qemu_binary, TMPDIR=str(workdir))
    emu = Path(sys.executable).with_name("vfio-user-emu")
    if emu.exists():
        env["VFIO_USER_EMU"] = str(emu)
    return VmCommand(argv, env, console, timeout)


def read_console(console: Path) -> str:
    text = console.read_text(errors="replace") if console.exists() else ""
    return text.replace("\r\n", "\n")


def run_vm(
    qemu_binary: str,
    guest_dir: Path,
    workdir: Path,
    sockets: list[Path],
    script: str,
    **options: Any,
) -> VmRun:
    """Boot the guest (:func:`vm_command`) and wait until QEMU exits."""
    command = vm_command(workdir, qemu_binary, sockets, script, **options)
    start = time.monotonic()
    result = subprocess.run(
        command.argv,
        capture_output=True,
        text=True,
        env=command.env,
        timeout=command.timeout + 60,
        check=False,
    )
    wall = time.monotonic() - start
    text = read_console(command.console)
    return VmRun(result.returncode, text, result.stdout + result.stderr, wall, _boot_marks(text))


class RunningVm:
    """A run-vm started in its own process group, for tests that kill QEMU (SIGKILL to the
    group: run-vm, ``timeout`` and QEMU die together, as with a crash of the host side)."""

    def __init__(self, command: VmCommand) -> None:
        self.command = command
        self.output = command.console.with_suffix(".out")
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                command.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=command.env,
                start_new_session=True,
            )
        self.started = time.monotonic()

    def console(self) -> str:
        return read_console(self.command.console)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """The first match of ``pattern`` (multiline) in the console, or None when QEMU exited
        or ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.console(), re.M)
            if match or self.process.poll() is not None or time.monotonic() > deadline:
                return match
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


@pytest.fixture
def vm(qemu_binary: str, guest_dir: Path, tmp_path: Path) -> Callable[..., VmRun]:
    """``vm([socket, ...], script, append=...)``: :func:`run_vm` in this test's tmp_path."""

    def run(sockets: list[Path], script: str, **options: object) -> VmRun:
        return run_vm(qemu_binary, guest_dir, tmp_path, sockets, script, **options)

    return run


def quit_qemu(qmp: QEMUMonitorProtocol) -> None:
    """QMP ``quit``, and close the connection; QEMU may close the monitor before its reply
    arrives."""
    with contextlib.suppress(EOFError, OSError):
        qmp.cmd("quit")
    close_qmp(qmp)


def wait_migration(qmp: QEMUMonitorProtocol, timeout: float = 180) -> dict[str, Any]:
    """``query-migrate`` once the migration completed, failed or was cancelled."""
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.cmd("query-migrate")
        assert isinstance(info, dict)
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, f"migration still {info.get('status')}"
        time.sleep(0.1)


#: A MIG_DEVICE_STATE SET request in our server's --trace (VFIO_DEVICE_FEATURE_SET |
#: MIG_DEVICE_STATE), with the state asked for, and its reply.
_STATE_SET = re.compile(r"<- id=(\d+) DEVICE_FEATURE cmd .*flags=0x20002 data=([0-9a-f]{2})")
MIG_STATE_RUNNING = 2


def last_device_state(server: Server) -> int:
    """The device state QEMU last set successfully on ``server``: RUNNING, where a device
    starts, when it never set one (a stop-copy migration cancelled before the switchover
    leaves the device alone)."""
    trace = server.trace()
    for match in reversed(list(_STATE_SET.finditer(trace))):
        if re.search(rf"-> id={match.group(1)} DEVICE_FEATURE reply", trace[match.end() :]):
            return int(match.group(2), 16)
    return MIG_STATE_RUNNING


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Vm:
    """A QEMU (through scripts/qemu/run-vm) with its emulator and its QMP connection."""

    server: Server
    process: RunningVm
    qmp: QEMUMonitorProtocol


class Pair:
    """Starts emulator + QEMU pairs in ``workdir`` and stops them all."""

    def __init__(self, qemu_binary: str, workdir: Path) -> None:
        self.qemu_binary = qemu_binary
        self.workdir = workdir
        self.pool = ServerPool(workdir)
        self.vms: list[Vm] = []

    def start(
        self,
        name: str,
        device: str,
        script: str,
        *server_args: str,
        incoming: str | None = None,
        append: str = "",
        program: list[str] | None = None,
        more_devices: tuple[str, ...] = (),
    ) -> Vm:
        """Our server for ``device`` and a QEMU booting the guest with ``script`` attached to
        it, with a QMP monitor; ``incoming``: a destination, waiting for the migration.
        ``more_devices`` get a server each and are attached after the first."""
        server = self.pool.start(device, *server_args, name=name, program=program)
        sockets = [server.socket]
        for number, more in enumerate(more_devices, 2):
            extra = self.pool.start(more, *server_args, name=f"{name}{number}", program=program)
            sockets.append(extra.socket)
        qmp_path = self.workdir / f"{name}-qmp.sock"
        qemu_args = ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if incoming:
            qemu_args += ["-incoming", incoming]
        command = vm_command(
            self.workdir,
            self.qemu_binary,
            sockets,
            script,
            name=name,
            append=append,
            timeout=600,
            qemu_args=tuple(qemu_args),
        )
        vm = Vm(server, RunningVm(command), connect_qmp(qmp_path))
        self.vms.append(vm)
        return vm

    def stop_all(self) -> None:
        for vm in self.vms:
            close_qmp(vm.qmp)
            vm.process.kill()
        self.pool.stop_all()


@pytest.fixture
def pair(qemu_binary: str, guest_dir: Path, tmp_path: Path) -> Iterator[Pair]:
    pairs = Pair(qemu_binary, tmp_path)
    yield pairs
    pairs.stop_all()


#: Figures the QEMU tests measured (boot times, throughput, where QEMU was killed), shown
#: in pytest's terminal summary so that a plain ``make test`` reports them.
FIGURES: list[str] = []


def report(text: str) -> None:
    """Record ``text`` for the terminal summary (and print it, for ``pytest -s``)."""
    FIGURES.append(text.strip("\n"))
    print("\n" + text.strip("\n"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("real-QEMU figures (tests/qemu)")
        for text in FIGURES:
            terminalreporter.write_line(text)
