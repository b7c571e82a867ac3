"""Benchmarks (not tests): live migration between two ``serve`` processes, and the
``vfio-user-emu bench`` subcommand.

``scripts/bench_migration.py`` and ``vfio-user-emu bench migration`` both run
:func:`migration_main`; ``vfio-user-emu bench serialize`` runs ``scripts/bench_serialize.py``
from a source checkout.

The migration benchmark starts, for every run, two fresh server processes
(``python -m emulator serve --device testdev,ram-size=N``), fills the source's RAM BAR with
incompressible data through an mmap of the region fd from GET_REGION_INFO, migrates it with
:func:`emulator.client.migrate.migrate` and ends both servers by PID. Next to each migration it
times, on the same byte count, a plain UNIX-socket copy between two processes (the ceiling
for moving bytes between processes) and a memcpy into a preallocated buffer.

MB/s means 10^6 bytes per second: the bytes moved (the whole migration stream) divided by
the total migration time (from the first request of the migration to the destination
RUNNING). Each figure is the best of several runs (``--repeat``; by default 3, and 2 for 1 GiB
and larger).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import mmap
import os
import platform
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from devices.migration.fastpath import ENV_VAR as FASTPATH_ENV_VAR
from devices.registry import DeviceSpecError, parse_size
from devices.testdev import BAR_RAM
from emulator.client import Client
from emulator.client.migrate import (
    DATA_FD_CAPABILITIES,
    DEFAULT_PRECOPY_ROUNDS,
    DEFAULT_PRECOPY_THRESHOLD,
    MigrationError,
    MigrationReport,
    Mode,
    PrecopyHook,
    Transport,
    migrate,
)
from emulator.tools.processes import stop_process

__all__ = [
    "add_bench_parser",
    "add_migration_arguments",
    "migration_main",
    "run_bench",
    "run_migration_bench",
]

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
DEFAULT_SIZES = (16 * MIB, 256 * MIB, GIB)
#: Random bytes generated once and tiled over the RAM (each page gets its own stamp).
NOISE_SIZE = 64 * MIB
#: Bytes per recv_into of the socket-copy reader: the migration's chunk size.
COPY_CHUNK = 1 << 20
#: How often the RssAnon sampler reads /proc/PID/status during a migration.
SAMPLE_INTERVAL = 0.005
#: Seconds a server may take to start listening.
START_TIMEOUT = 60.0
#: Seconds the RAM writer runs before the migration starts (pre-copy comparison).
WRITER_WARMUP = 0.25
#: The RAM writer's tick: pages_per_second / TICKS_PER_SECOND pages per tick.
TICKS_PER_SECOND = 100
_STAMP = struct.Struct("<Q")
_CHECKSUM_LOG = re.compile(r"stream primitives: (.+)$", re.MULTILINE)

# The reader side of the socket-copy baseline, in its own process (argv: fd, chunk size).
_READER = """\
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
buf = bytearray(int(sys.argv[2]))
sock.sendall(b"r")
total = 0
while True:
    count = sock.recv_into(buf)
    if not count:
        break
    total += count
sock.sendall(total.to_bytes(8, "little"))
"""


# ---------------------------------------------------------------------------------------------
# measurements of a process


@dataclass(frozen=True, slots=True)
class ProcStatus:
    """Memory figures from /proc/PID/status, in bytes."""

    hwm: int  # VmHWM: peak resident set size
    rss: int  # VmRSS
    anon: int  # RssAnon
    shmem: int  # RssShmem (the memfd-backed RAM BAR)


def proc_status(pid: int) -> ProcStatus:
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024  # kB
    return ProcStatus(
        fields.get("VmHWM", 0),
        fields.get("VmRSS", 0),
        fields.get("RssAnon", 0),
        fields.get("RssShmem", 0),
    )


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


@dataclass(slots=True)
class MemoryPeak:
    """One server's memory around a migration (bytes)."""

    #: VmHWM before the migration: server start-up plus the RAM fill.
    startup_hwm: int = 0
    #: VmHWM at the end of the migration; reset just before it when the kernel allows.
    hwm: int = 0
    hwm_reset: bool = False
    #: Largest RssAnon seen by the sampler during the migration.
    peak_anon: int = 0
    anon_before: int = 0

    def sample(self, pid: int) -> None:
        self.peak_anon = max(self.peak_anon, proc_status(pid).anon)


# ---------------------------------------------------------------------------------------------
# server processes


class ServerProcess:
    """``python -m emulator -v serve --device testdev,ram-size=N`` on a socket in ``directory``;
    its output goes to log files there (``-v`` makes it log the checksum implementation)."""

    def __init__(
        self, directory: Path, name: str, ram_size: int, env: dict[str, str] | None = None
    ) -> None:
        self.socket_path = directory / f"{name}.sock"
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        command = [
            sys.executable,
            "-m",
            "emulator",
            "-v",
            "serve",
            "--device",
            f"testdev,ram-size={ram_size}",
            "--socket-path",
            str(self.socket_path),
        ]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while b"serving" not in self.stdout_path.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.pid} exited: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.pid} did not start in {timeout:g}s")
            time.sleep(0.01)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace").strip()

    def checksum_impl(self) -> str:
        """What the server logged about its stream primitives (C fast path or Python)."""
        found = _CHECKSUM_LOG.findall(self.log())
        return found[-1].strip() if found else "unknown (not logged)"

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit within 10 s."""
        stop_process(self.proc)


@contextmanager
def server_pair(
    directory: Path, ram_size: int, env: dict[str, str] | None
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with ExitStack() as stack:
        servers: list[ServerProcess] = []
        for name in ("src", "dst"):
            server = ServerProcess(directory, name, ram_size, env)
            stack.callback(server.stop)
            servers.append(server)
        for server in servers:
            server.wait_ready()
        yield servers[0], servers[1]


# ---------------------------------------------------------------------------------------------
# data


def make_pattern(size: int, seed: int = 1) -> bytearray:
    """``size`` bytes of incompressible data: random bytes tiled from a block of at most
    NOISE_SIZE, every page stamped with its own number, so no page is zero or repeated."""
    noise = random.Random(seed).randbytes(min(size, NOISE_SIZE))
    buf = bytearray(size)
    view = memoryview(buf)
    for start in range(0, size, len(noise)):
        end = min(start + len(noise), size)
        view[start:end] = noise[: end - start]
    stamp = random.Random(seed).getrandbits(63) | 1
    for page, offset in enumerate(range(0, size - _STAMP.size + 1, PAGE)):
        _STAMP.pack_into(buf, offset, stamp + page)
    return buf


def same_contents(a: mmap.mmap, b: mmap.mmap, size: int, chunk: int = 64 * MIB) -> bool:
    return all(a[i : i + chunk] == b[i : i + chunk] for i in range(0, size, chunk))


class RamWriter:
    """A "guest" writing ``pages_per_second`` random pages of the RAM BAR through the mmap
    (8 bytes per page: enough to dirty it), ``ticks`` times a second, until :meth:`stop`."""

    def __init__(
        self,
        ram: mmap.mmap,
        size: int,
        pages_per_second: int,
        ticks: int = TICKS_PER_SECOND,
        seed: int = 7,
    ) -> None:
        self.ram = ram
        self.pages = size // PAGE
        self.ticks = max(1, ticks)
        self.per_tick = max(1, pages_per_second // self.ticks)
        self.rng = random.Random(seed)
        self.running = True
        self.written = 0
        self.started = 0.0
        self.stopped = 0.0
        self.stopped_by = ""

    def stop(self, why: str = "") -> None:
        if self.running:
            self.running = False
            self.stopped = time.perf_counter()
            self.stopped_by = why

    async def run(self) -> None:
        self.started = time.perf_counter()
        tick = 1.0 / self.ticks
        deadline = trio.current_time()
        while self.running:
            for _ in range(self.per_tick):
                offset = self.rng.randrange(self.pages) * PAGE + 8  # keep the page stamp
                _STAMP.pack_into(self.ram, offset, self.written)
                self.written += 1
            deadline += tick
            await trio.sleep_until(deadline)

    @property
    def rate(self) -> float:
        """Pages per second actually written."""
        elapsed = (self.stopped or time.perf_counter()) - self.started
        return self.written / elapsed if elapsed > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# one migration


@dataclass(slots=True)
class MigrationRun:
    size: int
    transport: str
    mode: str
    bytes_moved: int
    total_s: float
    downtime_s: float
    transfer_s: float  # from the report's throughput: time spent reading and writing data
    precopy_bytes: int
    stop_copy_bytes: int
    precopy_rounds: int
    src: MemoryPeak
    dst: MemoryPeak
    verified: bool | None  # None: not checked
    error: str | None = None  # the MigrationError of a failed migration
    pages_written: int = 0  # by the RAM writer (pre-copy comparison)
    write_rate: float = 0.0
    #: Why the RAM writer stopped: "stop-copy" (before the migration), "last round" (the
    #: pre-copy round after which the source stops), "budget" (pre-copy ran out of time).
    writer_stopped_by: str = ""
    #: Seconds from the start of the migration to the writer's stop.
    writer_stopped_after_s: float = 0.0

    @property
    def rate(self) -> float:
        """MB/s: bytes moved over the total migration time."""
        return self.bytes_moved / self.total_s / 1e6


async def _map_ram(client: Client, size: int) -> mmap.mmap:
    region = await client.get_region_info(BAR_RAM)
    if region.fd is None:
        raise RuntimeError("the server passed no fd for the RAM BAR")
    try:
        if region.info.size != size:
            raise RuntimeError(f"RAM BAR of {region.info.size} bytes, expected {size}")
        return mmap.mmap(region.fd, size, mmap.MAP_SHARED, offset=region.info.offset)
    finally:
        os.close(region.fd)


async def _sample_memory(
    servers: Sequence[tuple[int, MemoryPeak]], task_status: trio.TaskStatus[None]
) -> None:
    task_status.started()
    while True:
        for pid, peak in servers:
            peak.sample(pid)
        await trio.sleep(SAMPLE_INTERVAL)


async def migrate_once(
    src: ServerProcess,
    dst: ServerProcess,
    pattern: bytearray,
    *,
    transport: Transport,
    mode: Mode,
    verify: bool,
    write_rate: int = 0,
    write_ticks: int = TICKS_PER_SECOND,
    precopy_budget: float = 0.0,
) -> MigrationRun:
    """Fill the source RAM with ``pattern``, migrate, read the memory figures, check the
    destination RAM.

    With ``write_rate`` (pages/s) a writer dirties the source RAM from WRITER_WARMUP seconds
    before the migration until the source stops: before a stop-copy migration (the guest is
    paused then), or after the pre-copy round the driver ends pre-copy with. A pre-copy round
    ends only on an empty read, which a steadily written RAM may never give, so the writer
    also stops ``precopy_budget`` seconds into the migration (the guest throttled to a halt,
    as auto-converge would): the run records which came first.
    """
    size = len(pattern)
    caps = DATA_FD_CAPABILITIES if transport == "fd" else None
    error: str | None = None
    report: MigrationReport | None = None
    async with (
        Client.connect(src.socket_path, capabilities=caps) as source,
        Client.connect(dst.socket_path, capabilities=caps) as destination,
    ):
        # Every run migrates into a freshly reset device, as a destination VM's is (the
        # server is reused between runs; its RAM would otherwise hold the last run's state,
        # which a resume must keep a copy of until the stream checks out).
        await destination.reset()
        src_ram = await _map_ram(source, size)
        try:
            src_ram[:] = pattern
            peaks = _memory_before(src.pid, dst.pid)
            writer = RamWriter(src_ram, size, write_rate, write_ticks) if write_rate else None
            hook = _stop_after_last_round(writer) if writer and mode == "pre-copy" else None

            async def budget() -> None:
                assert writer is not None
                await trio.sleep(precopy_budget)
                writer.stop("budget")

            started = 0.0
            async with trio.open_nursery() as nursery:
                await nursery.start(_sample_memory, list(peaks.items()))
                if writer is not None:
                    nursery.start_soon(writer.run)
                    await trio.sleep(WRITER_WARMUP)
                    if mode == "stop-copy":
                        writer.stop("stop-copy")
                    elif precopy_budget > 0:
                        nursery.start_soon(budget)
                started = time.perf_counter()
                try:
                    report = await migrate(
                        source,
                        destination,
                        mode=mode,
                        transport=transport,
                        precopy_rounds=DEFAULT_PRECOPY_ROUNDS,
                        precopy_threshold=DEFAULT_PRECOPY_THRESHOLD,
                        on_precopy_round=hook,
                    )
                except MigrationError as exc:
                    error = str(exc)
                finally:
                    if writer is not None:
                        writer.stop("end of the migration")
                    nursery.cancel_scope.cancel()
            for pid, peak in peaks.items():
                peak.sample(pid)
                peak.hwm = proc_status(pid).hwm
            verified: bool | None = None
            if verify and report is not None:
                dst_ram = await _map_ram(destination, size)
                try:
                    verified = same_contents(src_ram, dst_ram, size)
                finally:
                    dst_ram.close()
        finally:
            src_ram.close()
    return _make_run(
        size,
        transport,
        mode,
        report=report,
        src=peaks[src.pid],
        dst=peaks[dst.pid],
        verified=verified,
        error=error,
        writer=writer,
        started=started,
    )


def _memory_before(*pids: int) -> dict[int, MemoryPeak]:
    """Start-up figures of each server; then VmHWM reset for the migration."""
    peaks = {}
    for pid in pids:
        before = proc_status(pid)
        peak = MemoryPeak(startup_hwm=before.hwm, anon_before=before.anon)
        peak.hwm_reset = reset_peak_rss(pid)
        peaks[pid] = peak
    return peaks


def _stop_after_last_round(writer: RamWriter) -> PrecopyHook:
    async def last_round_stops_the_guest(round_number: int, moved: int) -> None:
        # The driver's own stop condition: the source leaves PRE_COPY next.
        if moved <= DEFAULT_PRECOPY_THRESHOLD or round_number >= DEFAULT_PRECOPY_ROUNDS:
            writer.stop("last round")
        await trio.lowlevel.checkpoint()

    return last_round_stops_the_guest


def _make_run(
    size: int,
    transport: str,
    mode: str,
    *,
    report: MigrationReport | None,
    src: MemoryPeak,
    dst: MemoryPeak,
    verified: bool | None,
    error: str | None,
    writer: RamWriter | None,
    started: float,
) -> MigrationRun:
    run = MigrationRun(
        size=size,
        transport=transport,
        mode=mode,
        bytes_moved=0,
        total_s=0.0,
        downtime_s=0.0,
        transfer_s=0.0,
        precopy_bytes=0,
        stop_copy_bytes=0,
        precopy_rounds=0,
        src=src,
        dst=dst,
        verified=verified,
        error=error,
    )
    if report is not None:
        run.bytes_moved = report.bytes_moved
        run.total_s = report.total_s
        run.downtime_s = report.downtime_s
        if report.throughput:
            run.transfer_s = report.bytes_moved / report.throughput
        run.precopy_bytes = report.precopy_bytes
        run.stop_copy_bytes = report.stop_copy_bytes
        run.precopy_rounds = report.precopy_rounds
    if writer is not None:
        run.pages_written = writer.written
        run.write_rate = writer.rate
        run.writer_stopped_by = writer.stopped_by
        run.writer_stopped_after_s = max(0.0, writer.stopped - started)
    return run


# ---------------------------------------------------------------------------------------------
# baselines


def best_of(repeat: int, func: Callable[[], float]) -> float:
    """The smallest of ``repeat`` durations returned by ``func``."""
    return min(func() for _ in range(max(1, repeat)))


def socket_copy_seconds(data: memoryview, count: int, chunk: int = COPY_CHUNK) -> float:
    """Send ``count`` bytes (``data`` repeated) through a UNIX stream socket pair to a reader
    process doing ``recv_into`` a ``chunk``-byte buffer; seconds from the first byte sent
    to the reader's confirmation that it received them all."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, str(theirs.fileno()), str(chunk)],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        try:
            if ours.recv(1) != b"r":
                raise RuntimeError("socket-copy reader did not start")
            started = time.perf_counter()
            left = count
            while left:
                piece = data[: min(left, len(data))]
                ours.sendall(piece)
                left -= len(piece)
            ours.shutdown(socket.SHUT_WR)
            answer = b""
            while len(answer) < 8:
                more = ours.recv(8 - len(answer))
                if not more:
                    break
                answer += more
            elapsed = time.perf_counter() - started
        finally:
            reader.wait(timeout=60)
    if int.from_bytes(answer, "little") != count:
        raise RuntimeError("socket-copy reader got the wrong byte count")
    return elapsed


def memcpy_seconds(data: memoryview, target: memoryview) -> float:
    """memoryview slice assignment of ``data`` (repeated) into the preallocated ``target``."""
    started = time.perf_counter()
    at = 0
    while at < len(target):
        piece = min(len(data), len(target) - at)
        target[at : at + piece] = data[:piece]
        at += piece
    return time.perf_counter() - started


@dataclass(slots=True)
class Baseline:
    size: int
    nbytes: int
    repeat: int
    socket_s: float
    memcpy_s: float

    @property
    def socket_rate(self) -> float:
        return self.nbytes / self.socket_s / 1e6

    @property
    def memcpy_rate(self) -> float:
        return self.nbytes / self.memcpy_s / 1e6


def measure_baseline(pattern: bytearray, nbytes: int, repeat: int) -> Baseline:
    data = memoryview(pattern)
    socket_s = best_of(repeat, lambda: socket_copy_seconds(data, nbytes))
    target = memoryview(bytearray(nbytes))  # zero-filled: its pages are already faulted in
    memcpy_s = best_of(repeat, lambda: memcpy_seconds(data, target))
    return Baseline(len(pattern), nbytes, repeat, socket_s, memcpy_s)


# ---------------------------------------------------------------------------------------------
# the benchmark


@dataclass(slots=True)
class Row:
    """The runs of one (size, transport, mode); figures are the best of the successful ones."""

    size: int
    transport: str
    mode: str
    runs: list[MigrationRun]

    @property
    def ok(self) -> list[MigrationRun]:
        return [run for run in self.runs if run.error is None]

    @property
    def best_rate(self) -> float:
        return max((run.rate for run in self.ok), default=0.0)

    @property
    def best_total_s(self) -> float:
        return min((run.total_s for run in self.ok), default=0.0)

    @property
    def best_downtime_s(self) -> float:
        return min((run.downtime_s for run in self.ok), default=0.0)

    @property
    def bytes_moved(self) -> int:
        return max((run.bytes_moved for run in self.ok), default=0)

    def peak(self, side: str, what: str) -> int:
        return max((int(getattr(getattr(run, side), what)) for run in self.runs), default=0)


@dataclass(slots=True)
class Results:
    python: str = field(default_factory=lambda: sys.version.split()[0])
    cpus: int = field(default_factory=lambda: os.cpu_count() or 0)
    machine: str = field(default_factory=platform.platform)
    fastpath_env: str = ""
    checksum: set[str] = field(default_factory=set)
    rows: list[Row] = field(default_factory=list)
    baselines: dict[int, Baseline] = field(default_factory=dict)
    precopy: list[Row] = field(default_factory=list)
    precopy_write_rate: int = 0
    precopy_write_ticks: int = 0
    precopy_budget_s: float = 0.0
    seconds: float = 0.0


def _size_text(size: int) -> str:
    if size >= GIB and size % GIB == 0:
        return f"{size // GIB} GiB"
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    return f"{size // 1024} KiB"


def _mib(count: int) -> str:
    return f"{count / MIB:,.0f}"


def _repeat_for(size: int, repeat: int | None) -> int:
    if repeat is not None:
        return max(1, repeat)
    return 2 if size >= GIB else 3


def _server_env(fastpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if fastpath is not None:
        env[FASTPATH_ENV_VAR] = fastpath
    return env


class _Runner:
    """Runs migrations between fresh server pairs in one temporary directory."""

    def __init__(self, directory: Path, args: argparse.Namespace, results: Results) -> None:
        self.directory = directory
        self.env = _server_env(args.fastpath)
        self.verify = not args.no_verify
        self.quiet = args.quiet
        self.results = results
        self.started = time.perf_counter()

    def progress(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            print(f"[{elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)

    def row(
        self,
        pattern: bytearray,
        repeat: int,
        transport: Transport,
        mode: Mode,
        label: str = "",
        **writer: Any,
    ) -> Row:
        row = Row(len(pattern), transport, mode, [])
        for attempt in range(repeat):
            what = (
                f"{label}{_size_text(len(pattern))} {transport} {mode} run {attempt + 1}/{repeat}"
            )
            self.progress(f"{what} ...")
            run = self.one(pattern, transport, mode, **writer)
            row.runs.append(run)
            if run.error is not None:
                self.progress(f"{what}: FAILED: {run.error}")
            else:
                self.progress(
                    f"{what}: {run.rate:,.0f} MB/s, downtime {run.downtime_s * 1e3:,.1f} ms"
                )
        return row

    def one(
        self, pattern: bytearray, transport: Transport, mode: Mode, **writer: Any
    ) -> MigrationRun:
        with server_pair(self.directory, len(pattern), self.env) as (src, dst):
            run = trio.run(
                functools.partial(
                    migrate_once,
                    src,
                    dst,
                    pattern,
                    transport=transport,
                    mode=mode,
                    verify=self.verify,
                    **writer,
                )
            )
            for server in (src, dst):
                self.results.checksum.add(server.checksum_impl())
        if run.verified is False:
            raise RuntimeError(
                f"{_size_text(run.size)} {transport} {mode}: the destination's RAM differs "
                "from the source's"
            )
        return run


def run_migration_bench(args: argparse.Namespace) -> Results:
    results = Results(fastpath_env=args.fastpath or os.environ.get(FASTPATH_ENV_VAR, ""))
    modes: list[Mode] = ["stop-copy", "pre-copy"] if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="vfio-user-emu-bench-") as tmp:
        runner = _Runner(Path(tmp), args, results)
        for size in [] if args.no_table else args.sizes:
            repeat = _repeat_for(size, args.repeat)
            pattern = make_pattern(size)
            rows = [
                runner.row(pattern, repeat, transport, mode)
                for transport in args.transport
                for mode in modes
            ]
            results.rows += rows
            nbytes = max(row.bytes_moved for row in rows) or size
            runner.progress(f"{_size_text(size)} baselines (socket copy, memcpy) ...")
            results.baselines[size] = measure_baseline(pattern, nbytes, repeat)
            del pattern
        if args.precopy_compare:
            size = args.precopy_size
            pattern = make_pattern(size)
            results.precopy_write_rate = args.write_rate
            results.precopy_write_ticks = args.write_ticks
            results.precopy_budget_s = args.precopy_budget
            for pc_mode in ("stop-copy", "pre-copy"):
                row = runner.row(
                    pattern,
                    _repeat_for(size, args.repeat),
                    args.precopy_transport,
                    pc_mode,
                    label="pre-copy comparison: ",
                    write_rate=args.write_rate,
                    write_ticks=args.write_ticks,
                    precopy_budget=args.precopy_budget,
                )
                results.precopy.append(row)
    results.seconds = time.perf_counter() - runner.started
    return results


# ---------------------------------------------------------------------------------------------
# output


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.0%}" if reference > 0 and value > 0 else "-"


def print_results(results: Results) -> None:
    print(
        f"python {results.python}, {results.cpus} CPUs, {results.machine}; MB = 10^6 bytes, "
        "MiB = 2^20 bytes"
    )
    checksum = "; ".join(sorted(results.checksum)) or "-"
    forced = ""
    if results.fastpath_env and FASTPATH_ENV_VAR not in checksum:
        forced = f" ({FASTPATH_ENV_VAR}={results.fastpath_env})"
    print(f"servers' stream checksum (CRC-32C) implementation: {checksum}{forced}")
    if results.rows:
        _print_table(results)
    if results.precopy:
        _print_precopy(results)
    failures = [
        f"  {_size_text(run.size)} {run.transport} {run.mode}: {run.error}"
        for row in results.rows + results.precopy
        for run in row.runs
        if run.error is not None
    ]
    if failures:
        print("\nfailed runs (left out of the figures):")
        print("\n".join(failures))
    print(f"\nbenchmark time: {results.seconds:.0f} s")


def _print_table(results: Results) -> None:
    repeats = sorted({(row.size, len(row.runs)) for row in results.rows})
    print(
        "each figure is the best of its runs: "
        + ", ".join(f"{_size_text(size)}: {count}" for size, count in repeats)
        + " run(s) (MB/s and ratios: highest; times: lowest; memory: highest)\n"
    )
    print("baselines on the same byte count (the migration stream's size), same best-of:")
    header = f"{'size':>8}  {'bytes':>13}  {'socket copy MB/s':>16}  {'memcpy MB/s':>11}"
    print(header)
    print("-" * len(header))
    for size, baseline in sorted(results.baselines.items()):
        print(
            f"{_size_text(size):>8}  {baseline.nbytes:>13,}  {baseline.socket_rate:>16,.0f}  "
            f"{baseline.memcpy_rate:>11,.0f}"
        )
    print(
        "socket copy: one process sendall()s into a UNIX stream socketpair, another "
        f"recv_into()s a {COPY_CHUNK // MIB} MiB buffer;\nmemcpy: memoryview slice assignment "
        "into a preallocated buffer\n"
    )
    header = (
        f"{'size':>8}  {'transport':<9} {'mode':<9} {'MB/s':>7} {'total ms':>9} "
        f"{'downtime ms':>11} {'/socket':>7} {'/memcpy':>7}  "
        f"{'src HWM':>7} {'src anon':>8}  {'dst HWM':>7} {'dst anon':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in results.rows:
        base = results.baselines.get(row.size)
        rate = row.best_rate
        figures = (
            f"{rate:>7,.0f} {row.best_total_s * 1e3:>9,.1f} {row.best_downtime_s * 1e3:>11,.1f} "
            f"{_ratio(rate, base.socket_rate) if base else '-':>7} "
            f"{_ratio(rate, base.memcpy_rate) if base else '-':>7}"
            if row.ok
            else f"{'failed':>7} {'-':>9} {'-':>11} {'-':>7} {'-':>7}"
        )
        print(
            f"{_size_text(row.size):>8}  {row.transport:<9} {row.mode:<9} {figures}  "
            f"{_mib(row.peak('src', 'hwm')):>7} {_mib(row.peak('src', 'peak_anon')):>8}  "
            f"{_mib(row.peak('dst', 'hwm')):>7} {_mib(row.peak('dst', 'peak_anon')):>8}"
        )
    runs = [run for row in results.rows for run in row.runs]
    reset = all(run.src.hwm_reset and run.dst.hwm_reset for run in runs)
    startup = max(max(run.src.startup_hwm, run.dst.startup_hwm) for run in runs)
    print(
        "MB/s: bytes moved / total migration time; /socket, /memcpy: that rate as a share of "
        "the baselines'.\nHWM: VmHWM in MiB "
        + (
            "during the migration (reset through /proc/PID/clear_refs just before it)"
            if reset
            else "since the server started (clear_refs refused: includes start-up)"
        )
        + f";\nanon: peak RssAnon in MiB, sampled every {SAMPLE_INTERVAL * 1e3:g} ms. The RAM "
        "BAR is a memfd (RssShmem): in HWM, not in anon. The destination stages no stream:\n"
        "it writes RAM in place, and each run starts from a reset destination (zero RAM).\n"
        f"largest VmHWM before a migration (server start-up + RAM fill): {_mib(startup)} MiB"
    )
    _print_targets(results)


#: (transport, share of the socket copy) that stop-copy at 256 MiB should reach.
TARGETS = (("fd", 0.50), ("inband", 0.25))


def _print_targets(results: Results) -> None:
    lines = []
    for row in results.rows:
        base = results.baselines.get(row.size)
        if row.size != 256 * MIB or row.mode != "stop-copy" or base is None:
            continue
        for transport, share in TARGETS:
            if row.transport == transport:
                got = row.best_rate / base.socket_rate
                verdict = "met" if got >= share else "NOT met"
                lines.append(
                    f"  {transport:<6} at 256 MiB: {got:.0%} of the socket copy "
                    f"(target >= {share:.0%}): {verdict}"
                )
    if lines:
        print("\ntargets (stop-copy):")
        print("\n".join(lines))


def _print_precopy(results: Results) -> None:
    size = results.precopy[0].size
    transport = results.precopy[0].transport
    print(
        f"\npre-copy vs stop-copy downtime: {_size_text(size)} testdev, {transport} transport; "
        f"the benchmark writes {results.precopy_write_rate:,} random pages/s into the source "
        f"RAM\n(through the mmap, {results.precopy_write_ticks} bursts a second) until the "
        "source stops: before a stop-copy migration, after the last pre-copy round,\nor "
        f"{results.precopy_budget_s:g} s into the migration (budget) if pre-copy has not "
        "ended by then"
    )
    header = (
        f"{'mode':<9} {'runs':>4} {'downtime ms':>11} {'total ms':>9} {'rounds':>6} "
        f"{'pre-copy MiB':>12} {'stop-copy MiB':>13} {'pages written':>13} {'pages/s':>8}  "
        "writer stopped"
    )
    print(header)
    print("-" * len(header))
    for row in results.precopy:
        if not row.ok:
            print(f"{row.mode:<9} {len(row.runs):>4} failed")
            continue
        best = min(row.ok, key=lambda run: run.downtime_s)
        stopped = best.writer_stopped_by
        if best.mode == "pre-copy":
            stopped += f" ({best.writer_stopped_after_s:.1f} s in)"
        print(
            f"{row.mode:<9} {len(row.runs):>4} {best.downtime_s * 1e3:>11,.1f} "
            f"{best.total_s * 1e3:>9,.1f} {best.precopy_rounds:>6} "
            f"{best.precopy_bytes / MIB:>12,.1f} {best.stop_copy_bytes / MIB:>13,.1f} "
            f"{best.pages_written:>13,} {best.write_rate:>8,.0f}  {stopped}"
        )
    by_mode = {row.mode: row.best_downtime_s for row in results.precopy if row.ok}
    stop, pre = by_mode.get("stop-copy"), by_mode.get("pre-copy")
    if stop and pre:
        print(
            f"downtime pre-copy / stop-copy: {pre / stop:.3f} "
            f"(pre-copy cuts the downtime {stop / pre:,.1f}x); lowest downtime of each mode, "
            "shown with the rest of that run's figures"
        )
    budget = [run for row in results.precopy for run in row.ok if run.writer_stopped_by == "budget"]
    if budget:
        print(
            f"pre-copy did not end by itself in {len(budget)} run(s): a round ends only on an "
            "empty MIG_DATA_READ, and\nwhile the RAM keeps being written every read finds "
            "freshly dirtied pages; the writer was stopped after the budget."
        )


def results_json(results: Results) -> dict[str, Any]:
    def row_json(row: Row) -> dict[str, Any]:
        base = results.baselines.get(row.size)
        return {
            "size": row.size,
            "transport": row.transport,
            "mode": row.mode,
            "repeat": len(row.runs),
            "failed": len(row.runs) - len(row.ok),
            "best_mb_per_s": row.best_rate,
            "best_total_s": row.best_total_s,
            "best_downtime_s": row.best_downtime_s,
            "share_of_socket_copy": row.best_rate / base.socket_rate if base else None,
            "share_of_memcpy": row.best_rate / base.memcpy_rate if base else None,
            "runs": [
                asdict(run) | {"mb_per_s": run.rate if run.error is None else None}
                for run in row.runs
            ],
        }

    return {
        "benchmark": "migration",
        "argv": sys.argv[1:],
        "python": results.python,
        "cpus": results.cpus,
        "machine": results.machine,
        "checksum_implementation": sorted(results.checksum),
        "fastpath_env": results.fastpath_env,
        "mb": "10^6 bytes",
        "seconds": results.seconds,
        "rows": [row_json(row) for row in results.rows],
        "baselines": [
            asdict(base)
            | {"socket_mb_per_s": base.socket_rate, "memcpy_mb_per_s": base.memcpy_rate}
            for base in results.baselines.values()
        ],
        "precopy_compare": {
            "write_pages_per_s": results.precopy_write_rate,
            "write_bursts_per_s": results.precopy_write_ticks,
            "budget_s": results.precopy_budget_s,
            "rows": [row_json(row) for row in results.precopy],
        }
        if results.precopy
        else None,
    }


# ---------------------------------------------------------------------------------------------
# command line


def _sizes(text: str) -> list[int]:
    try:
        sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    except DeviceSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("no size given")
    return sizes


def _size(text: str) -> int:
    (size,) = _sizes(text)
    return size


def _transports(text: str) -> list[Transport]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    chosen: list[Transport] = []
    for part in parts:
        if part == "inband":
            chosen.append("inband")
        elif part == "fd":
            chosen.append("fd")
        else:
            raise argparse.ArgumentTypeError(f"transports are inband and fd, not {part!r}")
    if not chosen:
        raise argparse.ArgumentTypeError("no transport given")
    return chosen


def add_migration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=list(DEFAULT_SIZES),
        help="testdev RAM sizes, comma-separated (default 16M,256M,1G)",
    )
    parser.add_argument("--quick", action="store_true", help="16 MiB only (same as --sizes 16M)")
    parser.add_argument(
        "--transport",
        type=_transports,
        default=["inband", "fd"],
        help="inband, fd or both comma-separated (default inband,fd)",
    )
    parser.add_argument(
        "--mode",
        choices=["stop-copy", "pre-copy", "both"],
        default="stop-copy",
        help="default stop-copy",
    )
    parser.add_argument(
        "--repeat", type=int, help="runs per figure, best kept (default 3; 2 from 1 GiB)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run as JSON here")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip comparing the RAM of both servers"
    )
    parser.add_argument(
        "--fastpath",
        choices=["auto", "c", "python"],
        help=f"set {FASTPATH_ENV_VAR} for the servers (default: inherited)",
    )
    parser.add_argument(
        "--precopy-compare",
        action="store_true",
        help="also compare pre-copy and stop-copy downtime with the RAM being written",
    )
    parser.add_argument(
        "--precopy-size", type=_size, default=256 * MIB, help="RAM size for it (default 256M)"
    )
    parser.add_argument(
        "--precopy-transport",
        choices=["inband", "fd"],
        default="inband",
        help="transport for it (default inband)",
    )
    parser.add_argument(
        "--write-rate",
        type=int,
        default=2000,
        help="pages per second the RAM writer dirties (default 2000: 8 MB/s)",
    )
    parser.add_argument(
        "--write-ticks",
        type=int,
        default=TICKS_PER_SECOND,
        help=f"bursts per second the writer spreads them over (default {TICKS_PER_SECOND})",
    )
    parser.add_argument(
        "--precopy-budget",
        type=float,
        default=5.0,
        help="seconds into a pre-copy migration after which the writer stops if pre-copy "
        "has not ended (default 5)",
    )
    parser.add_argument(
        "--no-table", action="store_true", help="skip the main table (with --precopy-compare)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run_migration(args: argparse.Namespace) -> int:
    if args.quick:
        args.sizes = [16 * MIB]
    if args.write_rate < 1 or args.write_ticks < 1:
        print("bench migration: --write-rate and --write-ticks must be positive", file=sys.stderr)
        return 2
    results = run_migration_bench(args)
    print_results(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results_json(results), out, indent=2)
            out.write("\n")
    return 0


def migration_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Live-migration throughput and downtime of testdev between two servers "
        "(a benchmark, not a test)."
    )
    add_migration_arguments(parser)
    return run_migration(parser.parse_args(argv))


# ---------------------------------------------------------------------------------------------
# vfio-user-emu bench

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run_script(name: str, argv: Sequence[str]) -> int:
    """Run ``main(argv)`` of scripts/NAME.py (a source checkout only: scripts/ is not
    installed as a package)."""
    path = SCRIPTS / f"{name}.py"
    if not path.is_file():
        print(f"vfio-user-emu bench: {path} not found (needs a source checkout)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"_vfio_user_emu_{name}", path)
    if spec is None or spec.loader is None:
        print(f"vfio-user-emu bench: cannot load {path}", file=sys.stderr)
        return 2
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        main: Callable[..., int] = module.main
        return main(list(argv), prog=f"vfio-user-emu bench {name.removeprefix('bench_')}")
    finally:
        del sys.modules[spec.name]


def add_bench_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add ``bench migration`` and ``bench serialize`` to the ``vfio-user-emu`` subparsers;
    returns the ``bench`` subparsers, for benchmarks defined elsewhere."""
    bench = sub.add_parser("bench", help="run a benchmark (not a test)")
    which = bench.add_subparsers(dest="benchmark", required=True)
    migration = which.add_parser(
        "migration",
        help="migration throughput/downtime between two serve processes",
        description="Live-migration throughput and downtime of testdev between two servers.",
    )
    add_migration_arguments(migration)
    serialize = which.add_parser(
        "serialize",
        help="stream primitives: memcpy vs C vs Python (scripts/bench_serialize.py)",
        description="Runs scripts/bench_serialize.py with the arguments that follow "
        "(see its --help).",
        prefix_chars="+",  # everything after "serialize" goes to the script, --help included
        add_help=False,
    )
    serialize.add_argument(
        "script_args", nargs=argparse.REMAINDER, help="the script's arguments (--help lists them)"
    )
    return which


def run_bench(args: argparse.Namespace) -> int:
    if args.benchmark == "migration":
        return run_migration(args)
    if args.benchmark == "serialize":
        return _run_script("bench_serialize", args.script_args)
    raise AssertionError(args.benchmark)
