"""1 GiB of testdev state between two real server processes, over migration data fds.

The source's RAM is filled through its region fd (the test mmaps BAR2), migrated with
``migrate(..., transport="fd")``, and compared through the destination's region fd. Both
servers' memory is read from /proc/PID/status before, during (sampled) and after: the
stream must never be materialized in Python objects, so anonymous memory (RssAnon) may only
grow by a small bound. Nor is it staged: the destination validates the stream as it
arrives and reads its RAM sections straight into its RAM, so no server's shared memory
grows by more than its own RAM.
"""

from __future__ import annotations

import mmap
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

import emulator.client.migrate as driver
from devices import testdev as td
from emulator.client import Client
from emulator.client.migrate import DATA_FD_CAPABILITIES, get_state, migrate
from emulator.tools.processes import stop_process
from protocol.constants import MigState

PYTHON = sys.executable
RAM = 1 << 30
MiB = 1 << 20
#: How much anonymous memory either server may add while migrating 1 GiB.
ANON_BOUND = 64 * MiB
#: Memory figures read from /proc/PID/status (kB there; bytes here).
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
SAMPLE_EVERY = 0.02
COMPARE_CHUNK = 64 * MiB


def status(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def mib(value: int) -> str:
    return f"{value / MiB:8.1f} MiB"


@dataclass
class Watch:
    """One server's memory: before, sampled peaks during, after."""

    name: str
    pid: int
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    hwm_reset: bool = False

    def start(self) -> None:
        self.hwm_reset = reset_peak(self.pid)
        self.before = status(self.pid)
        self.peak = dict(self.before)

    def sample(self) -> None:
        for key, value in status(self.pid).items():
            self.peak[key] = max(self.peak.get(key, 0), value)

    def stop(self) -> None:
        self.sample()
        self.after = status(self.pid)

    def growth(self, key: str) -> int:
        return self.peak[key] - self.before[key]

    def report(self) -> list[str]:
        lines = [f"{self.name} (pid {self.pid}, VmHWM reset: {self.hwm_reset})"]
        for key in FIELDS:
            lines.append(
                f"  {key:8} before {mib(self.before[key])}  peak {mib(self.peak[key])}  "
                f"after {mib(self.after[key])}  peak growth {mib(self.growth(key))}"
            )
        return lines


@contextmanager
def server_process(path: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "emulator",
                "serve",
                "--device",
                "testdev,ram-size=1G",
                "--socket-path",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc
    finally:
        stop_process(proc, timeout=15)
    assert proc.returncode == 0, log.read_text()


async def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    with trio.fail_after(30):
        while not path.exists():
            assert proc.poll() is None, log.read_text()
            await trio.sleep(0.02)


@asynccontextmanager
async def ram_map(client: Client) -> AsyncIterator[mmap.mmap]:
    """The device's RAM BAR, mapped through the fd GET_REGION_INFO passes."""
    region = await client.get_region_info(td.BAR_RAM)
    assert region.fd is not None and region.info.size == RAM
    try:
        mapping = mmap.mmap(region.fd, RAM, mmap.MAP_SHARED)
    finally:
        os.close(region.fd)
    try:
        yield mapping
    finally:
        mapping.close()


def fill(mapping: mmap.mmap) -> list[tuple[int, bytes]]:
    """1 MiB of random bytes repeated, each MiB tagged with its index (so a misplaced MiB
    shows), a zero hole (zero pages are elided in the stream) and a few markers."""
    pattern = os.urandom(MiB)
    for at in range(0, RAM, MiB):
        mapping[at : at + MiB] = pattern
        mapping[at : at + 8] = struct.pack("<Q", at // MiB)
    hole = 300 * MiB
    mapping[hole : hole + 4 * MiB] = bytes(4 * MiB)
    markers = [
        (0, b"first byte of RAM"),
        (hole + 4096, b"inside the zero hole"),
        (RAM // 2 + 123, b"middle, unaligned"),
        (RAM - 32, b"last 32 bytes of RAM ..........."),
    ]
    for at, data in markers:
        mapping[at : at + len(data)] = data
    return markers


def same_ram(a: mmap.mmap, b: mmap.mmap) -> int | None:
    """The offset of the first differing chunk, or None."""
    for at in range(0, RAM, COMPARE_CHUNK):
        if a[at : at + COMPARE_CHUNK] != b[at : at + COMPARE_CHUNK]:
            return at
    return None


async def test_migrate_1gib_over_data_fds_with_bounded_server_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    began = time.perf_counter()
    src_path, dst_path = tmp_path / "src.sock", tmp_path / "dst.sock"
    src_log, dst_log = tmp_path / "src.log", tmp_path / "dst.log"

    # When the data fds carry the stream (the driver's pump), to tell control requests
    # answered mid-stream from those queued behind a SET.
    flow: list[float] = []
    real_pump = driver.pump_pipe

    async def timed_pump(source: int, sink: int) -> int:
        flow.append(time.perf_counter())
        try:
            return await real_pump(source, sink)
        finally:
            flow.append(time.perf_counter())

    monkeypatch.setattr(driver, "pump_pipe", timed_pump)

    # How long each SET takes: building the stream (RUNNING -> STOP_COPY) and validating and
    # applying it (RESUMING -> STOP) run inside the SET, before its reply.
    sets: list[tuple[str, float]] = []
    real_set = Client.set_mig_state

    async def timed_set(self: Client, state: int) -> int | None:
        at = time.perf_counter()
        try:
            return await real_set(self, state)
        finally:
            side = "source" if self is src_client[0] else "destination"
            sets.append((f"{side} -> {MigState(state).name}", time.perf_counter() - at))

    src_client: list[Client] = []
    monkeypatch.setattr(Client, "set_mig_state", timed_set)

    with (
        server_process(src_path, src_log) as src_proc,
        server_process(dst_path, dst_log) as dst_proc,
    ):
        await wait_for_socket(src_path, src_proc, src_log)
        await wait_for_socket(dst_path, dst_proc, dst_log)
        started = time.perf_counter() - began
        async with (
            Client.connect(src_path, capabilities=DATA_FD_CAPABILITIES) as src,
            Client.connect(dst_path, capabilities=DATA_FD_CAPABILITIES) as dst,
            ram_map(src) as src_ram,
            ram_map(dst) as dst_ram,
        ):
            assert src.data_fd_negotiated and dst.data_fd_negotiated
            src_client.append(src)
            connected = time.perf_counter() - began
            filled_at = time.perf_counter()
            markers = fill(src_ram)
            filled = time.perf_counter() - filled_at
            await src.region_write(td.BAR_REGS, td.REG_SCRATCH, struct.pack("<I", 0xC0FFEE))
            await src.region_write(td.BAR_REGS, td.REG_SCRATCH + 28, struct.pack("<I", 7))
            assert same_ram(src_ram, dst_ram) is not None

            watches = [Watch("source", src_proc.pid), Watch("destination", dst_proc.pid)]
            for watch in watches:
                watch.start()
            latencies: list[tuple[float, float]] = []  # (sent, answered)
            done = trio.Event()

            async def sampler() -> None:
                while not done.is_set():
                    for watch in watches:
                        watch.sample()
                    await trio.sleep(SAMPLE_EVERY)

            async def prober() -> None:
                # GET MIG_DEVICE_STATE on both control sockets throughout the migration.
                while not done.is_set():
                    for client in (src, dst):
                        sent = time.perf_counter()
                        await get_state(client)
                        latencies.append((sent, time.perf_counter()))
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler)
                nursery.start_soon(prober)
                with trio.fail_after(120):
                    report = await migrate(src, dst, transport="fd")
                done.set()
            # The destination frees its staging memfd in a thread after replying (off the
            # critical path): give that a moment before the "after" figures.
            with trio.move_on_after(10):
                while status(watches[1].pid)["RssShmem"] >= RAM + ANON_BOUND:
                    await trio.sleep(0.05)
            for watch in watches:
                watch.stop()

            assert await get_state(src) == MigState.STOP
            assert await get_state(dst) == MigState.RUNNING
            compared_at = time.perf_counter()
            assert same_ram(src_ram, dst_ram) is None, "destination RAM differs"
            compared = time.perf_counter() - compared_at
            for at, data in markers:
                assert dst_ram[at : at + len(data)] == data
            assert await dst.region_read(td.BAR_REGS, td.REG_SCRATCH, 4) == struct.pack(
                "<I", 0xC0FFEE
            )
            assert await dst.region_read(td.BAR_REGS, td.REG_SCRATCH + 28, 4) == struct.pack(
                "<I", 7
            )
        stopping = time.perf_counter()
    stopped = time.perf_counter() - stopping

    pumping = [b - a for a, b in latencies if flow and flow[0] <= a and b <= flow[-1]]
    everything = [b - a for a, b in latencies]
    lines = [
        "",
        f"sockets up in {started:.2f}s, connected and RAM mapped at {connected:.2f}s, "
        f"1 GiB filled in {filled:.2f}s, compared in {compared:.2f}s, "
        f"servers stopped in {stopped:.2f}s, test wall time {time.perf_counter() - began:.2f}s",
        *report.lines(),
        f"pump (data fds) {flow[-1] - flow[0]:.2f}s: "
        f"{report.stop_copy_bytes / (flow[-1] - flow[0]) / 1e6:.0f} MB/s; "
        f"migrate() wall {report.total_s:.2f}s: {report.bytes_moved / report.total_s / 1e6:.0f} "
        "MB/s end to end",
        f"GET MIG_DEVICE_STATE while the stream flowed: {len(pumping)} answered, "
        f"median {statistics.median(pumping) * 1e3:.1f} ms, worst {max(pumping) * 1e3:.1f} ms; "
        f"over the whole migration: {len(everything)}, worst {max(everything) * 1e3:.1f} ms "
        "(includes waits behind a SET)",
        "SETs: " + ", ".join(f"{what} {took * 1e3:.0f} ms" for what, took in sets),
    ]
    for watch in watches:
        lines += watch.report()
    print("\n".join(lines))

    assert report.stop_copy_bytes == report.bytes_moved > RAM - 8 * MiB
    for watch in watches:
        assert watch.growth("RssAnon") < ANON_BOUND, "\n".join(watch.report())
        assert watch.after["RssAnon"] - watch.before["RssAnon"] < ANON_BOUND
    source, destination = watches
    # A server's RAM BAR is a memfd that its own mapping touches only when the device uses
    # it (the test filled the source's through the client's mapping), so shared memory may
    # grow by the RAM size once; what must not appear is any further copy.
    # The source sends views of its RAM: at most its RAM, touched once.
    assert source.growth("VmRSS") < RAM + ANON_BOUND
    if source.hwm_reset:
        assert source.peak["VmHWM"] - source.before["VmHWM"] < RAM + ANON_BOUND
    # The destination writes its RAM in place: no staging copy of the stream, ever.
    assert destination.growth("RssShmem") < RAM + ANON_BOUND
    if destination.hwm_reset:
        assert destination.peak["VmHWM"] - destination.before["VmHWM"] < RAM + ANON_BOUND
    assert destination.after["RssShmem"] - destination.before["RssShmem"] < RAM + ANON_BOUND
    # The control sockets answered while the stream flowed.
    assert len(pumping) >= 5
    assert statistics.median(pumping) < 0.1
    assert max(pumping) < 1.0
