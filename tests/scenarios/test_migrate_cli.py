"""``vfio-user-emu migrate`` between two real ``serve`` processes."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from devices import testdev as td
from emulator.client import Client
from emulator.client import migrate_v1 as migration_v1
from emulator.client.migrate import get_state
from emulator.testing.harness import RawWire
from protocol.constants import FLAG_ERROR, HEADER_SIZE, Command, MigState, MsgType
from protocol.header import Header

PYTHON = sys.executable


@asynccontextmanager
async def server(path: Path, device: str = "testdev") -> AsyncIterator[None]:
    proc = subprocess.Popen(
        [PYTHON, "-m", "emulator", "serve", "--socket-path", str(path), "--device", device],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with trio.fail_after(15):
            while not path.exists():
                assert proc.poll() is None, proc.communicate()[1]
                await trio.sleep(0.02)
        yield
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [PYTHON, "-m", "emulator", *args], capture_stdout=True, capture_stderr=True, check=False
        )


async def write_guest_state(path: Path) -> None:
    async with Client.connect(path) as client:
        await client.region_write(0, td.REG_SCRATCH, struct.pack("<I", 0xFEEDF00D))
        await client.region_write(td.BAR_RAM, 0x1000, b"migrated by the CLI")


@pytest.mark.parametrize("transport", ["inband", "fd"])
@pytest.mark.parametrize("mode", ["stop-copy", "pre-copy"])
async def test_migrate_between_two_servers(tmp_path: Path, mode: str, transport: str) -> None:
    src, dst = tmp_path / "src.sock", tmp_path / "dst.sock"
    async with server(src), server(dst):
        await write_guest_state(src)
        result = await cli(
            "migrate", "--from", str(src), "--to", str(dst), "--mode", mode,
            "--transport", transport,
        )  # fmt: skip
        out, err = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 0, err
        assert err == ""
        lines = out.splitlines()
        assert lines[0] == f"migrated {src} -> {dst}"
        assert lines[1] == f"mode: {mode}"
        fields = dict(line.split(": ", 1) for line in lines[1:])
        moved = int(fields["bytes moved"])
        pre = re.fullmatch(r"(\d+) in (\d+) round\(s\)", fields["pre-copy bytes"])
        assert pre is not None
        stop = int(fields["stop-copy bytes"])
        assert moved == int(pre[1]) + stop > 4096  # RAM goes zero-page-elided
        assert (int(pre[2]) > 0) == (mode == "pre-copy")
        assert re.fullmatch(r"\d+\.\d\d MB/s", fields["throughput"])
        assert re.fullmatch(r"\d+\.\d{3} ms", fields["downtime"])
        assert re.fullmatch(r"\d+\.\d{3} ms", fields["total time"])
        async with Client.connect(dst) as client:
            assert await get_state(client) == MigState.RUNNING
            scratch = await client.region_read(0, td.REG_SCRATCH, 4)
            assert struct.unpack("<I", scratch)[0] == 0xFEEDF00D
            assert await client.region_read(td.BAR_RAM, 0x1000, 19) == b"migrated by the CLI"
        async with Client.connect(src) as client:
            assert await get_state(client) == MigState.STOP


async def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    result = await cli("migrate", "--from", str(missing), "--to", str(tmp_path / "other.sock"))
    err = result.stderr.decode()
    assert result.returncode == 1
    assert result.stdout == b""
    assert err == (
        f"vfio-user-emu: migrate: cannot connect to the source: {missing} does not exist: no "
        f"server there (start one with `vfio-user-emu serve --socket-path {missing}`)\n"
    )
    src = tmp_path / "src.sock"
    async with server(src):
        result = await cli("migrate", "--from", str(src), "--to", str(missing))
        err = result.stderr.decode()
        assert result.returncode == 1
        assert err.startswith(
            f"vfio-user-emu: migrate: cannot connect to the destination: {missing} does not"
        )
        assert "Traceback" not in err


async def test_failures_exit_1_and_leave_the_source_running(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.sock", tmp_path / "dst.sock"
    async with server(src, "testdev,mig-caps=stop_copy"), server(dst, "testdev,ram-size=128K"):
        result = await cli("migrate", "--from", str(src), "--to", str(dst), "--mode", "pre-copy")
        err = result.stderr.decode()
        assert result.returncode == 1
        assert err.startswith("vfio-user-emu: migrate: pre-copy mode needs PRE_COPY")
        # A destination configured differently is refused before the source stops.
        result = await cli("migrate", "--from", str(src), "--to", str(dst))
        assert result.returncode == 1 and result.stdout == b""
        assert result.stderr.decode() == (
            "vfio-user-emu: migrate: the destination cannot take this device's state: BAR2 "
            "64K on the source, 128K on the destination (serve the destination with the "
            "source's --device options)\n"
        )
        # Without that check the destination refuses the state as it loads it; both
        # devices recover and the message carries the destination's own reason.
        result = await cli("migrate", "--from", str(src), "--to", str(dst), "--no-device-check")
        err = result.stderr.decode()
        assert result.returncode == 1, err
        assert result.stdout == b""
        assert "RESUMING -> STOP" in err and "EINVAL" in err
        assert "recovery: source STOP -> RUNNING" in err
        assert "the destination refused the state" in err
        assert "EINVAL: arc RESUMING->STOP: migration stream: RAM update" in err  # its reason
        assert "Traceback" not in err
        async with Client.connect(src) as client:
            assert await get_state(client) == MigState.RUNNING
        async with Client.connect(dst) as client:
            assert await get_state(client) == MigState.RUNNING


async def test_migrate_through_the_v1_region(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.sock", tmp_path / "dst.sock"
    async with server(src, "testdev,migration=v1"), server(dst, "testdev,migration=v1"):
        await write_guest_state(src)
        args = ("--from", str(src), "--to", str(dst), "--mode", "pre-copy")
        refused = await cli("migrate", *args)  # v2 is not served by these devices
        assert refused.returncode == 1 and b"supports no migration" in refused.stderr
        assert b"(a device served with migration=v1 migrates with --protocol v1;" in refused.stderr
        result = await cli("migrate", *args, "--protocol", "v1")
        out, err = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 0, err
        lines = out.splitlines()
        assert lines[:3] == [
            f"migrated {src} -> {dst}",
            "protocol: v1 (migration region)",
            "mode: pre-copy",
        ]
        async with Client.connect(dst) as client:
            assert await migration_v1.get_device_state(client, 9) == 1  # RUNNING
            assert await client.region_read(td.BAR_RAM, 0x1000, 19) == b"migrated by the CLI"
        async with Client.connect(src) as client:
            assert await migration_v1.get_device_state(client, 9) == 0  # STOP


async def _version_then_eio(listener: trio.socket.SocketType, real: Path) -> None:
    """A source that negotiates like the real server, then fails every request with EIO
    (here: the v1 region discovery's GET_INFO)."""
    conn, _ = await listener.accept()
    client = RawWire(conn)
    upstream = await RawWire.connect(real)
    try:
        version = await client.receive()  # framed like a reply: header size
        await upstream.send(version.raw)
        await client.send((await upstream.receive()).raw)
        while True:
            request = await client.receive()
            header = request.header
            failed = Header(
                header.msg_id, header.command, HEADER_SIZE, MsgType.REPLY | FLAG_ERROR, errno.EIO
            )
            await client.send(failed.pack())
    except (AssertionError, OSError, trio.TooSlowError):
        pass  # the CLI went away
    finally:
        client.close()
        upstream.close()


async def test_v1_discovery_failure_is_a_clean_error(tmp_path: Path) -> None:
    """A request failing during the v1 region discovery ends the CLI with a message and a
    non-zero exit, not a traceback."""
    real, src, dst = tmp_path / "real.sock", tmp_path / "src.sock", tmp_path / "dst.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(src))
    listener.listen(1)
    with listener:
        async with (
            server(real, "testdev,migration=v1"),
            server(dst, "testdev,migration=v1"),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_version_then_eio, listener, real)
            result = await cli("migrate", "--from", str(src), "--to", str(dst), "--protocol", "v1")
            nursery.cancel_scope.cancel()
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err
    assert "vfio-user-emu: migrate: v1 migration failed while discovery" in err
    assert "EIO" in err


async def test_v1_migration_back_to_where_the_state_came_from(tmp_path: Path) -> None:
    """The stopped source of a v1 migration takes the state back (it is reset first: v1
    has no STOP -> RESUMING), and every run of it succeeds; a stopped source is named."""
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    async with server(a, "testdev,migration=v1"), server(b, "testdev,migration=v1"):
        await write_guest_state(a)
        for source, destination in ((a, b), (b, a), (a, b), (b, a)):
            result = await cli(
                "migrate", "--from", str(source), "--to", str(destination), "--protocol", "v1"
            )
            assert result.returncode == 0, result.stderr.decode()
            assert result.stderr == b""
        async with Client.connect(a) as client:
            assert await migration_v1.get_device_state(client, 9) == 1  # RUNNING
            assert await client.region_read(td.BAR_RAM, 0x1000, 19) == b"migrated by the CLI"
        async with Client.connect(b) as client:
            assert await migration_v1.get_device_state(client, 9) == 0  # STOP
        result = await cli("migrate", "--from", str(b), "--to", str(a), "--protocol", "v1")
        assert result.returncode == 1
        assert result.stderr.decode() == (
            "vfio-user-emu: migrate: source is in STOP; a v1 migration starts from RUNNING\n"
        )


async def test_the_same_socket_twice_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "one.sock"
    async with server(path):
        result = await cli("migrate", "--from", str(path), "--to", f"{tmp_path}/./one.sock")
        assert result.returncode == 2 and result.stdout == b""
        err = result.stderr.decode()
        assert err.startswith(f"vfio-user-emu: migrate: --from and --to are the same socket {path}")
        assert "migrate between two servers" in err


async def test_another_device_type_is_refused_before_the_source_stops(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.sock", tmp_path / "dst.sock"
    async with server(src), server(dst, "e1000"):
        for protocol in ("v2",):
            result = await cli(
                "migrate", "--from", str(src), "--to", str(dst), "--protocol", protocol
            )
            assert result.returncode == 1
            assert result.stderr.decode() == (
                "vfio-user-emu: migrate: the destination cannot take this device's state: "
                "vendor:device 1b36:0f00 on the source, 8086:100e on the destination (serve "
                "the destination with the source's --device options)\n"
            )
        async with Client.connect(src) as client:
            assert await get_state(client) == MigState.RUNNING


async def test_a_busy_destination_is_named(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.sock", tmp_path / "dst.sock"
    async with server(src), server(dst), Client.connect(dst):
        result = await cli("migrate", "--from", str(src), "--to", str(dst))
        assert result.returncode == 1
        assert result.stderr.decode() == (
            f"vfio-user-emu: migrate: cannot connect to the destination: {dst} is busy: its "
            "server already serves another client (QEMU or another vfio-user-emu command) and "
            "takes one at a time; detach that client first\n"
        )


async def test_json_report(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.sock", tmp_path / "dst.sock"
    async with server(src), server(dst):
        result = await cli("migrate", "--from", str(src), "--to", str(dst), "--json")
        assert result.returncode == 0, result.stderr.decode()
        report = json.loads(result.stdout)
        assert report["source"] == str(src) and report["destination"] == str(dst)
        assert report["protocol"] == "v2" and report["mode"] == "stop-copy"
        assert report["bytes_moved"] == report["stop_copy_bytes"] > 0
        assert report["downtime_s"] > 0


async def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """``migrate ... | head -1``: the reader is gone before we print; no traceback."""
    src, dst = tmp_path / "src.sock", tmp_path / "dst.sock"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        async with server(src), server(dst):
            with trio.fail_after(30):
                result = await trio.run_process(
                    [PYTHON, "-m", "emulator", "migrate", "--from", str(src), "--to", str(dst)],
                    stdout=write_end,
                    capture_stderr=True,
                    check=False,
                )
            async with Client.connect(dst) as client:  # the migration itself completed
                assert await get_state(client) == MigState.RUNNING
    finally:
        os.close(write_end)
    assert result.returncode == 141  # 128 + SIGPIPE, as `yes | head` ends
    assert result.stderr == b""


async def _hold_first(
    listener: trio.socket.SocketType,
    real: Path,
    command: Command,
    seen: trio.Event,
    release: trio.Event,
) -> None:
    """A proxy to ``real`` that holds the first ``command`` from its client (and what
    follows it) until ``release``."""
    conn, _ = await listener.accept()
    client = RawWire(conn)
    upstream = await RawWire.connect(real)

    async def replies() -> None:
        while True:
            reply = await upstream.receive(timeout=60)
            await client.send(reply.raw, reply.fds)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replies)
            while True:
                request = await client.receive(timeout=60)
                if request.header.command == command and not seen.is_set():
                    seen.set()
                    await release.wait()
                await upstream.send(request.raw, request.fds)
    except* (AssertionError, OSError, trio.TooSlowError):
        pass  # the CLI went away
    finally:
        client.close()
        upstream.close()


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_signal_mid_migration_recovers_both_devices(
    tmp_path: Path, signum: int, status: int
) -> None:
    """Ctrl-C or SIGTERM while data moves: recovery runs (source back to RUNNING,
    destination reset), one line says so, and the exit status is the shell's 128+N."""
    src, real, dst = tmp_path / "src.sock", tmp_path / "real.sock", tmp_path / "dst.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(dst))
    listener.listen(1)
    seen, release = trio.Event(), trio.Event()
    with listener, (tmp_path / "stderr").open("wb") as stderr_file:
        async with server(src), server(real):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _hold_first, listener, real, Command.MIG_DATA_WRITE, seen, release
                )
                proc = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        [PYTHON, "-m", "emulator", "migrate", "--from", str(src), "--to", str(dst)],
                        stdout=subprocess.DEVNULL,
                        stderr=stderr_file.fileno(),
                        check=False,
                    )
                )
                with trio.fail_after(30):
                    await seen.wait()  # the source is in STOP_COPY, the destination RESUMING
                    proc.send_signal(signum)
                    await trio.sleep(0.2)  # the CLI cancels the write it waits for
                    release.set()
                    await proc.wait()
                nursery.cancel_scope.cancel()
            async with Client.connect(src) as client:
                assert await get_state(client) == MigState.RUNNING
            async with Client.connect(real) as client:
                assert await get_state(client) == MigState.RUNNING
    assert proc.returncode == status
    err = (tmp_path / "stderr").read_text()
    name = signal.Signals(signum).name
    assert err.startswith(f"vfio-user-emu: migrate: interrupted by {name}; migration failed while")
    assert "recovery: source STOP_COPY -> RUNNING" in err
    assert "destination RESUMING: DEVICE_RESET -> RUNNING" in err
    assert err.count("\n") == 1 and "Traceback" not in err
