"""The migration soak harness (``emulator.tools.soak``): short soaks with every fault kind, a
disconnect at every message boundary of a migration on either side, the e1000 back-and-forth
migration during a continuous frame flow, and the pieces (fault socket, checks, statistics).

Cost: about 30-40 s on an idle 2-core machine (the short soaks dominate).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from devices import testdev as td
from devices.testdev import TestDev
from emulator.cli import main
from emulator.client import ClientError
from emulator.client.migrate import MigrationError, Mode, Transport, get_state, migrate
from emulator.tools.soak import (
    E1000_PROGRESS,
    Cut,
    FaultKind,
    FaultPlanner,
    FlowCheck,
    Link,
    ServerSlot,
    SoakConfig,
    Trigger,
    device_digest,
    least_squares_slope,
    numbered_frame,
    percentile,
    resume_source,
    run_soak,
    sample_resources,
    settle_destination,
)
from protocol.constants import Command, MigState

BAR0 = 0


# =============================================================================================
# Short soaks (the `make test` soak: a few hundred migrations with faults)


async def test_short_testdev_soak_with_every_fault_kind(tmp_path: Path) -> None:
    config = SoakConfig(device="testdev", iterations=300, faults=0.25, seed=3, directory=tmp_path)
    result = await run_soak(config)
    summary = result.summary()
    assert summary["losses"] == 0, summary["loss_details"]
    assert summary["migrations"] == 300
    # every kind fired, and each one was recovered from with the source's state intact
    assert set(result.faults_injected) == {kind.value for kind in FaultKind}
    assert result.faults_recovered == result.faults_injected
    assert summary["source_resets"] == 0 and summary["state_mismatches"] == 0
    assert summary["succeeded"] + summary["failed_by_faults"] == 300
    assert summary["succeeded"] >= 150
    assert result.guest["dma_copies"] > 0 and result.guest["interrupts"] > 0
    resources = summary["resources"]
    assert resources["fds_last"] == resources["fds_first"]  # nothing leaks an fd
    assert summary["downtime_ms"]["p50"] > 0


@pytest.mark.parametrize(("mode", "transport"), [("pre-copy", "inband"), ("stop-copy", "fd")])
async def test_short_soak_other_modes_and_transports(
    tmp_path: Path, mode: Mode, transport: Transport
) -> None:
    config = SoakConfig(
        device="testdev",
        iterations=80,
        faults=0.3,
        seed=5,
        mode=mode,
        transport=transport,
        directory=tmp_path,
    )
    result = await run_soak(config)
    assert result.losses == []
    assert sum(result.faults_injected.values()) >= 10
    assert result.faults_recovered == result.faults_injected
    if transport == "fd":  # the STOP_COPY data never travels in MIG_DATA_WRITE
        assert FaultKind.CORRUPT_STREAM.value not in result.faults_injected


async def test_short_e1000_soak_with_faults(tmp_path: Path) -> None:
    config = SoakConfig(device="e1000", iterations=40, faults=0.3, seed=2, directory=tmp_path)
    assert config.fault_kinds() == list(FaultKind)  # the running source's cuts included
    result = await run_soak(config)
    assert result.losses == []
    assert result.faults_recovered == result.faults_injected
    assert sum(result.faults_injected.values()) >= 5
    assert result.guest["frames_a_to_b"] > 0 and result.guest["frames_b_to_a"] > 0


async def test_e1000_soak_cutting_the_running_source_loses_no_frame(tmp_path: Path) -> None:
    """The running source's connection cut (cut-source) or its client killed (kill-client)
    mid-flow: the transmit and receive jobs the disconnect cancels (at any await) neither
    lose nor repeat a frame, and resume for the reconnected client."""
    kinds = [FaultKind.CUT_SOURCE, FaultKind.KILL_CLIENT]
    config = SoakConfig(
        device="e1000", iterations=150, faults=0.5, seed=5, directory=tmp_path, kinds=kinds
    )
    result = await run_soak(config)
    assert result.losses == []
    assert result.faults_recovered == result.faults_injected
    assert all(result.faults_injected.get(kind.value, 0) >= 20 for kind in kinds)
    assert result.guest["frames_a_to_b"] > 0 and result.guest["frames_b_to_a"] > 0


# =============================================================================================
# #6: one of two wired NICs migrated back and forth during a continuous flow


@pytest.mark.parametrize("mode", ["stop-copy", "pre-copy"])
async def test_e1000_back_and_forth_mid_flow_delivers_every_frame_once_in_order(
    tmp_path: Path, mode: Mode
) -> None:
    """NIC B moves between two servers 24 times (12 round trips) while numbered frames flow
    both ways without pause; every frame must arrive exactly once and in order
    (:class:`emulator.tools.soak.FlowCheck`), the flow must go on after every migration, and the
    state each destination loaded must equal the stopped source's."""
    config = SoakConfig(device="e1000", iterations=24, mode=mode, directory=tmp_path)
    result = await run_soak(config)
    assert result.losses == []  # also: every frame in flight was received at the end
    assert result.succeeded == 24 and result.state_mismatches == 0
    # the flow went on after every switch (the check waits for E1000_PROGRESS frames)
    assert result.guest["frames_a_to_b"] >= 24 * E1000_PROGRESS
    assert result.guest["frames_b_to_a"] >= 24 * E1000_PROGRESS


@pytest.mark.parametrize("mode", ["stop-copy", "pre-copy"])
async def test_virtio_net_back_and_forth_mid_flow_with_faults(tmp_path: Path, mode: Mode) -> None:
    """The same flow over two virtio-nets, migrated 40 times with every fault kind: no
    frame lost or repeated (the used index commits each batch exactly once), the state
    each destination loaded equals the stopped source's, and the flow goes on."""
    config = SoakConfig(
        device="virtio-net", iterations=40, mode=mode, faults=0.3, seed=3, directory=tmp_path
    )
    result = await run_soak(config)
    assert result.losses == []
    assert result.state_mismatches == 0
    assert result.faults_recovered == result.faults_injected
    assert sum(result.faults_injected.values()) >= 5
    assert result.guest["frames_a_to_b"] >= result.succeeded * E1000_PROGRESS


async def test_virtio_net_soak_cutting_the_running_source_loses_no_frame(tmp_path: Path) -> None:
    kinds = [FaultKind.CUT_SOURCE, FaultKind.KILL_CLIENT]
    config = SoakConfig(
        device="virtio-net", iterations=100, faults=0.5, seed=5, directory=tmp_path, kinds=kinds
    )
    result = await run_soak(config)
    assert result.losses == []
    assert result.faults_recovered == result.faults_injected
    assert all(result.faults_injected.get(kind.value, 0) >= 10 for kind in kinds)


def test_flow_check_sees_loss_duplication_and_damage() -> None:
    mac_a, mac_b = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    check = FlowCheck("A->B")
    for seq in (0, 1, 3, 3, 2):
        check.receive(numbered_frame(mac_b, mac_a, seq))
    damaged = bytearray(numbered_frame(mac_b, mac_a, 4))
    damaged[-1] ^= 1
    check.receive(bytes(damaged))
    assert check.problems == [
        "A->B: got frame 3, expected 2 (lost)",
        "A->B: got frame 3, expected 4 (duplicated or reordered)",
        "A->B: got frame 2, expected 4 (duplicated or reordered)",
        "A->B: a damaged or foreign frame",
    ]


# =============================================================================================
# Disconnects at every message boundary of a migration


@dataclass
class Pair:
    source: Link
    destination: Link
    source_slot: ServerSlot
    destination_slot: ServerSlot


@asynccontextmanager
async def server_pair(directory: Path, transport: Transport) -> AsyncIterator[Pair]:
    caps = {"max_msg_fds": 16, "migration": {"pgsize": 4096, "data_fd": True}}
    capabilities = caps if transport == "fd" else None
    async with trio.open_nursery() as nursery:
        slots = [
            ServerSlot(name, directory / f"{name}.sock", TestDev, nursery)
            for name in ("src", "dst")
        ]
        for slot in slots:
            await slot.start()
        source = await Link(slots[0], capabilities).open(nursery)
        destination = await Link(slots[1], capabilities).open(nursery)
        yield Pair(source, destination, slots[0], slots[1])
        for link in (source, destination):
            await link.close()
        nursery.cancel_scope.cancel()


async def give_state(link: Link) -> None:
    """Distinctive device state: scratch registers, RAM BAR, an MSI-X entry, a raised
    and unacknowledged interrupt."""
    client = link.client
    for i in range(td.SCRATCH_COUNT):
        await client.region_write(BAR0, td.REG_SCRATCH + 4 * i, struct.pack("<I", 0xA5A50000 + i))
    await client.region_write(td.BAR_RAM, 0x100, b"state that must survive" * 40)
    await client.region_write(td.BAR_MSIX, 16, struct.pack("<IIII", 0xFEE00010, 0, 0x4001, 1))
    await client.region_write(BAR0, td.REG_DOORBELL, struct.pack("<I", 1))


async def reopen(link: Link, nursery: trio.Nursery) -> Link:
    """The management layer's new connection after a fault (the server must take it)."""
    await link.close()
    return await Link(link.slot, link.capabilities).open(nursery)


async def message_logs(tmp_path: Path, mode: Mode, transport: Transport) -> dict[str, list[int]]:
    """The commands each side of a clean migration receives, in order."""
    async with server_pair(tmp_path / "clean", transport) as pair:
        assert pair.source.sock is not None and pair.destination.sock is not None
        pair.source.sock.arm(None)
        pair.destination.sock.arm(None)
        await migrate(pair.source.client, pair.destination.client, mode=mode, transport=transport)
        return {"source": pair.source.sock.log, "destination": pair.destination.sock.log}


BOUNDARY_CASES = [("stop-copy", "inband"), ("pre-copy", "inband"), ("stop-copy", "fd")]


@pytest.mark.parametrize(("mode", "transport"), BOUNDARY_CASES)
async def test_disconnect_at_every_message_boundary_leaves_servers_and_source_intact(
    tmp_path: Path, mode: Mode, transport: Transport
) -> None:
    """For each message k of the migration, on the source's and on the destination's
    connection: the connection closes before k is sent, after it was sent (its reply is
    lost), or with only half of k sent. Then both servers take a fresh connection, the
    source is RUNNING again (through SET, no reset) with exactly the state it had, and a
    clean migration from it succeeds and delivers that state."""
    (tmp_path / "clean").mkdir()
    logs = await message_logs(tmp_path, mode, transport)
    assert Command.DEVICE_FEATURE in logs["source"] and len(logs["destination"]) >= 5
    cases = 0
    for side, log in logs.items():
        for index in range(len(log)):
            for cut in (Cut.BEFORE, Cut.AFTER, Cut.HALF):
                directory = tmp_path / f"{side}-{index}-{cut.value}"
                directory.mkdir()
                await one_boundary(directory, mode, transport, side=side, index=index, cut=cut)
                cases += 1
    assert cases == 3 * (len(logs["source"]) + len(logs["destination"]))


async def one_boundary(
    directory: Path, mode: Mode, transport: Transport, *, side: str, index: int, cut: Cut
) -> None:
    where = f"{side} message {index} ({cut.value})"
    async with trio.open_nursery() as nursery, server_pair(directory, transport) as pair:
        await give_state(pair.source)
        before = device_digest(pair.source_slot.device)
        target = pair.source if side == "source" else pair.destination
        assert target.sock is not None
        trigger = Trigger(index, cut)
        target.sock.arm(trigger)
        completed = True
        try:
            await migrate(
                pair.source.client, pair.destination.client, mode=mode, transport=transport
            )
        except (MigrationError, ClientError):
            completed = False
        assert trigger.fired, where
        # Only the destination's last reply (SET RUNNING) can be lost after the migration
        # completed on the devices; every other cut fails it.
        last = side == "destination" and cut == Cut.AFTER
        assert completed is False or last, where
        source = await reopen(pair.source, nursery)
        destination = await reopen(pair.destination, nursery)
        await source.client.get_info()  # both servers serve a fresh client
        await destination.client.get_info()
        assert await resume_source(source.client) is None, where
        assert await get_state(source.client) == MigState.RUNNING, where
        assert device_digest(pair.source_slot.device) == before, where
        assert await settle_destination(destination.client), where
        # the source migrates cleanly afterwards and the destination gets its state
        await migrate(source.client, destination.client, mode=mode, transport=transport)
        assert await get_state(destination.client) == MigState.RUNNING, where
        pair.source, pair.destination = source, destination
        assert device_digest(pair.destination_slot.device) == before, where
        nursery.cancel_scope.cancel()


# =============================================================================================
# The fault socket, against a real server


async def test_faulty_socket_corrupts_and_shortens_migration_data(tmp_path: Path) -> None:
    for cut in (Cut.CORRUPT, Cut.SHORTEN):
        directory = tmp_path / cut.value
        directory.mkdir()
        async with server_pair(directory, "inband") as pair:
            await give_state(pair.source)
            before = device_digest(pair.source_slot.device)
            assert pair.destination.sock is not None
            trigger = Trigger(0, cut, Command.MIG_DATA_WRITE)
            pair.destination.sock.arm(trigger)
            with pytest.raises(MigrationError) as failure:
                await migrate(pair.source.client, pair.destination.client)
            assert trigger.fired
            assert "RESUMING -> STOP" in failure.value.stage  # the destination refused it
            assert await get_state(pair.source.client) == MigState.RUNNING  # recovered
            assert await get_state(pair.destination.client) == MigState.RUNNING  # reset
            assert device_digest(pair.source_slot.device) == before
            assert device_digest(pair.destination_slot.device) != before


# =============================================================================================
# Statistics and the command line


def test_slope_and_percentiles() -> None:
    assert least_squares_slope([(0, 10.0), (1000, 10.0), (2000, 10.0)]) == 0
    assert least_squares_slope([(0, 0.0), (10, 5.0), (20, 10.0)]) == pytest.approx(0.5)
    assert least_squares_slope([(5, 1.0)]) == 0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99
    assert percentile([], 0.9) == 0


async def test_resource_samples_count_live_python_objects() -> None:
    """The object count sees objects kept alive (what a leak of Python objects is) and
    leaves out the samples the harness itself holds."""
    before = sample_resources(0)
    kept = [[index] for index in range(5000)]  # 5000 gc-tracked lists, plus ``kept``
    during = sample_resources(1)
    assert during.py_objects - before.py_objects >= len(kept)
    del kept
    after = sample_resources(2)
    assert after.py_objects - before.py_objects < 100  # (gone again; a few are the test's)
    held = sample_resources(3, samples_held=40)
    assert held.py_objects < after.py_objects
    # trio keeps exited deadlines in its heap (up to 1000 more than live ones): no leak.
    for _ in range(300):
        with trio.move_on_after(100):
            pass
    assert sample_resources(4).py_objects - after.py_objects < 100
    assert before.anon_kb > 0 and before.anon_kb <= before.rss_kb


def test_soak_command_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "soak.json"
    argv = ["soak", "--iterations", "40", "--faults", "0.3", "--seed", "4", "--quiet"]
    assert main([*argv, "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["migrations"] == 40 and data["losses"] == 0
    assert data["faults_injected"] == data["faults_recovered"] > 0
    assert {
        "rss_kb_slope_per_1000",
        "anon_kb_slope_per_1000",
        "py_objects_slope_per_1000",
        "fds_slope_per_1000",
        "tasks_slope_per_1000",
    } <= set(data["resources"])
    assert set(data["downtime_ms"]) == {"p50", "p90", "p99", "max"}
    table = capsys.readouterr().out
    assert "faults recovered" in table and "downtime p50/p90/p99/max" in table


def test_soak_command_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["soak", "--faults", "2", "--quiet"]) == 2
    assert "probability" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["soak", "--duration", "soon"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--iterations", "0"], "argument --iterations: must be at least 1, not 0"),
        (["--iterations", "-5"], "argument --iterations: must be at least 1, not -5"),
        (
            ["--fault-kinds", "cut-source,bogus"],
            "argument --fault-kinds: unknown fault kind 'bogus' (valid: cut-source, "
            "cut-destination, truncate-message, corrupt-stream, truncate-stream, kill-client, "
            "kill-server, fail-arc)",
        ),
    ],
)
def test_soak_usage_errors_name_the_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["soak", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"vfio-user-emu soak: error: {message}"


def test_soak_config_refuses_no_iterations() -> None:
    with pytest.raises(ValueError, match="--iterations must be at least 1, not 0"):
        SoakConfig(iterations=0)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_soak_with_its_summary_and_report(
    tmp_path: Path, signum: int, status: int
) -> None:
    """Ctrl-C or SIGTERM: the migration in progress completes, then the summary table is
    printed and the report written, with one line on stderr and the shell's 128+N."""
    report = tmp_path / "soak.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "soak", "--duration", "1h", "--quiet",
         "--report", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # where the soak's sockets appear
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob("vfio-soak-*/vm-1.sock")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)  # some migrations
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status, err
    name = signal.Signals(signum).name
    assert err == (
        f"vfio-user-emu: soak: {name}: stopping after the migration in progress "
        "(again to abandon the run)\n"
    )
    assert re.search(rf"^interrupted by +{name} \(the run ended early\)$", out, re.M), out
    data = json.loads(report.read_text())
    assert data["interrupted_by"] == name
    assert data["migrations"] > 0 and data["losses"] == 0
    assert re.search(rf"^migrations +{data['migrations']} \(", out, re.M), out


def test_soak_command_runs_for_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["soak", "--duration", "1s", "--quiet"]) == 0
    table = capsys.readouterr().out
    migrations = int(table.split("migrations", 1)[1].split()[0])
    assert migrations > 5


def test_fault_points_avoid_the_destinations_completed_migration() -> None:
    """A cut just after the destination's SET RUNNING would leave both sides running the
    VM (a split brain no recovery undoes): the planner never chooses it, and a server is
    killed while a message passes unchanged."""
    planner = FaultPlanner(1.0, random.Random(9), list(FaultKind))
    planner.learn([1] * 10, [1] * 6, {"source": 3, "destination": 4})
    seen: set[tuple[str, str, int]] = set()
    for _ in range(3000):
        fault = planner.choose()
        assert fault is not None
        if fault.kind == FaultKind.FAIL_ARC:
            assert fault.at < planner.arcs[fault.side]
            continue
        assert fault.cut is not None
        if fault.kind == FaultKind.KILL_SERVER:
            assert fault.cut == Cut.PASS and fault.side == "destination"
        if fault.side == "destination" and fault.cut in (Cut.AFTER, Cut.PASS):
            assert fault.at < 5
        seen.add((fault.side, fault.cut.value, fault.at))
    assert ("destination", "before", 5) in seen and ("source", "after", 9) in seen


def test_quiet_soak_prints_only_its_table() -> None:
    """--quiet: no progress line and none of the warnings the injected faults provoke in
    the in-process servers (an e1000 whose client died mid-DMA logs one)."""
    argv = ["soak", "--device", "e1000", "--faults", "0.3", "--iterations", "30", "--quiet"]
    quiet = subprocess.run(
        [sys.executable, "-m", "emulator", *argv],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert re.search(r"^faults injected +[1-9]", quiet.stdout, re.M), quiet.stdout
    verbose = subprocess.run(
        [sys.executable, "-m", "emulator", *argv, "-v"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "vfio_user_emu" in verbose.stderr  # the same run, its log shown


def test_soak_json_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["soak", "--iterations", "3", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["migrations"] == 3 and summary["ok"] is True
    assert summary["interrupted_by"] is None
    assert captured.err == ""  # --json: no progress line either
