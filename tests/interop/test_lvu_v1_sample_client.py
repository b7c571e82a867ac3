"""libvfio-user's protocol-0.1 sample client (the one Debian's QEMU 10.2.2 source bundles) runs
its whole session and its v1 migration, and exits 0: against its own C sample server (the
control: the client and the harness work) and against ``vfio-user-emu serve --device
lvu-sample,migration=v1`` with default options.

How the client migrates (samples/client.c, ``migrate_to``): it forks; the *parent* execs
``<directory of the client binary>/server -v <SOCKET>_migrated`` and the *child* carries on as
the client, connecting to that socket as soon as the path exists. So each run gets a directory
with a link to the client and a ``server`` there (the sample server, or a two-line script that
execs ours), and runs under tests/interop/reaper.py, which reaps the child and reports its
exit status (the process the test starts ends as the destination server). The built client
carries two documented one-line fixes of timing-dependent failures (scripts/lvu/patches/).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from emulator.tools.processes import stop_process
from tests.qemu.conftest import emulator_command

pytestmark = pytest.mark.lvu

REAPER = Path(__file__).with_name("reaper.py")
DEVICE = "lvu-sample,migration=v1"
#: The session schedules the post-migration interrupt 10 s ahead (time(NULL) + 10) and takes
#: ~12 s; this bounds a hang, not a slow run.
CLIENT_TIMEOUT_S = 120


@dataclass
class ClientRun:
    """What one run of the sample client left: every process the reaper saw, and its log."""

    reaper_exit: int
    processes: list[dict[str, object]]
    log: str

    def forked_client(self) -> dict[str, object] | None:
        """The record of the child that carried on as the client after the fork."""
        found = [p for p in self.processes if p["name"] == "client" and not p["first"]]
        assert len(found) <= 1, f"more than one forked client process: {self}"
        return found[0] if found else None

    def first(self) -> dict[str, object]:
        """The record of the process we started: the client until it forks to migrate, then
        the destination server it exec'd."""
        found = [p for p in self.processes if p["first"]]
        assert len(found) == 1, f"the started process was never reaped: {self}"
        return found[0]

    def client(self) -> dict[str, object]:
        """The client's record: the forked child, or the first process if it never forked."""
        return self.forked_client() or self.first()

    source_log: Path

    def __str__(self) -> str:
        return (
            f"reaper exit {self.reaper_exit}; processes {self.processes}\n"
            f"--- the client's output (and the destination server's) ---\n{self.log}\n"
            f"--- the source server's output ---\n{self.source_log.read_text(errors='replace')}"
        )


def listening(path: Path) -> bool:
    """Whether a socket bound at ``path`` listens (/proc/net/unix: flag __SO_ACCEPTCON)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
            return True
    return False


def wait_listening(
    path: Path, process: subprocess.Popen[bytes], log: Path, *, renamed: bool
) -> None:
    """Until the server listens on ``path``. The C sample server binds before it listens and
    accepts one connection only, so it is neither probed by connecting nor trusted as soon as
    the path exists: /proc/net/unix tells. Ours (``renamed``) binds under a temporary name
    (the name /proc/net/unix keeps), listens, then renames: the path exists once it listens."""
    deadline = time.monotonic() + 30
    while True:
        if path.exists() if renamed else listening(path):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"source server did not listen on {path}:\n{log.read_text()}")
        time.sleep(0.02)


@pytest.fixture
def source_servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Source servers a test starts; each is stopped at teardown (if still running)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        stop_process(process)


def start_source(
    command: list[str],
    socket: Path,
    log: Path,
    started: list[subprocess.Popen[bytes]],
    *,
    renamed: bool,
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    started.append(process)
    wait_listening(socket, process, log, renamed=renamed)
    return process


def client_directory(workdir: Path, samples: Path, destination_server: str | None) -> Path:
    """A directory with the sample client and, next to it, the ``server`` it execs as the
    migration destination: the sample server (None) or a shell script with this body."""
    directory = workdir / "client-dir"
    directory.mkdir()
    (directory / "client").symlink_to(samples / "client")
    server = directory / "server"
    if destination_server is None:
        server.symlink_to(samples / "server")
    else:
        server.write_text(destination_server)
        server.chmod(0o755)
    return directory


def run_client(directory: Path, socket: Path, log: Path, source_log: Path) -> ClientRun:
    command = [sys.executable, str(REAPER), "--timeout", str(CLIENT_TIMEOUT_S)]
    # stdbuf -oL: its printf lines keep their place among its err()/warn() lines in the log
    # (stdbuf execs the client: same process, same argv[0]).
    command += ["--output", str(log), "--", "stdbuf", "-oL", str(directory / "client")]
    command.append(str(socket))
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S + 30, check=False
    )
    processes = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return ClientRun(done.returncode, processes, log.read_text(errors="replace"), source_log)


def assert_whole_session(run: ClientRun) -> None:
    """Exit 0 after both interrupts (source and destination) and both migration segments
    written to the destination; the destination server exited 0 once the client left."""
    assert run.reaper_exit == 0, f"timed out after {CLIENT_TIMEOUT_S} s: {run}"
    assert run.client()["exit"] == 0, f"the sample client failed: {run}"
    assert run.forked_client() is not None, f"the client never forked to migrate: {run}"
    assert run.first()["exit"] == 0, f"the destination server failed: {run}"
    assert run.log.count("client: INTx triggered!") == 2, str(run)
    assert run.log.count("client: writing migration device data") == 2, str(run)
    assert "CRC mismatch" not in run.log, str(run)


def test_old_sample_client_against_its_own_server(
    tmp_path: Path, lvu_samples: Path, source_servers: list[subprocess.Popen[bytes]]
) -> None:
    """The control: the client, its fix and this harness pass with libvfio-user's server."""
    socket = tmp_path / "sock"
    source_log = tmp_path / "source-server.log"
    source = start_source(
        [str(lvu_samples / "server"), "-v", str(socket)],
        socket,
        source_log,
        source_servers,
        renamed=False,
    )
    directory = client_directory(tmp_path, lvu_samples, destination_server=None)
    run = run_client(directory, socket, tmp_path / "client.log", source_log)
    print(f"sample client vs its C server: {run.processes}")
    assert_whole_session(run)
    assert source.wait(timeout=10) == 0, source_log.read_text()


def test_old_sample_client_against_our_v1_profile(
    tmp_path: Path, lvu_samples: Path, source_servers: list[subprocess.Popen[bytes]]
) -> None:
    """The same client against our server with default options, source and destination."""
    socket = tmp_path / "sock"
    serve = [*emulator_command(), "serve", "--device", DEVICE, "--once"]
    source_log = tmp_path / "source-server.log"
    source = start_source(
        [*serve, "--socket-path", str(socket)], socket, source_log, source_servers, renamed=True
    )
    # The client runs `server -v SOCKET`: the socket path is the last argument.
    wrapper = "#!/bin/sh\nfor socket; do :; done\n"
    wrapper += f'exec {shlex.join(serve)} --socket-path "$socket"\n'
    directory = client_directory(tmp_path, lvu_samples, destination_server=wrapper)
    run = run_client(directory, socket, tmp_path / "client.log", source_log)
    print(f"sample client vs vfio-user-emu {DEVICE}: {run.processes}")
    assert_whole_session(run)
    assert source.wait(timeout=10) == 0, source_log.read_text()
