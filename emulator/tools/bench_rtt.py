"""``vfio-user-emu bench rtt``: per-message cost of our server against the Python floor.

One blocking client (plain ``socket`` code, pre-built messages) measures, in one run:

* the **floor**: a plain Python UNIX-socket echo server (it frames by the 16-byte header,
  echoes every message that wants a reply and drops posted ones) -- no Python server can
  answer faster than this with the same client;
* a **trio echo** server reading the way our connection does (non-blocking until EAGAIN,
  then ``wait_readable``): what trio's scheduler costs per message before any vfio-user work;
* **our server** (``vfio-user-emu serve`` as a subprocess): a 4-byte config REGION_READ, a
  4-byte BAR0 register REGION_READ (testdev SCRATCH0), posted 4-byte REGION_WRITEs
  (NO_REPLY) pipelined, posted REGION_WRITE_MULTI batches, and an e1000 ICR read.

Both processes are pinned: ``same`` puts client and server on one CPU (the fair comparison
on a 2-vCPU machine, where a cross-CPU wake-up costs several times a same-CPU one), ``cross``
puts them on two. Figures are medians/p90/p99 of single round trips in microseconds and
messages per second; each is also given as a ratio to the floor measured in the same run,
which is what the regression check compares (absolute figures move with machine load).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emulator.tools.processes import stop_process
from protocol.constants import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    HEADER_SIZE,
    PROTOCOL_MAJOR,
    Command,
    MsgType,
    PciRegion,
)
from protocol.header import pack_message
from protocol.messages import (
    RegionAccess,
    RegionData,
    RegionWriteMulti,
    VersionPayload,
    WriteMultiEntry,
)

REGION_CONFIG = PciRegion.CONFIG
TESTDEV_SCRATCH0 = 0x10
E1000_ICR = 0x00C0
SIZE_FIELD = struct.Struct("<I")  # the header's size field, at offset 4
FLAGS_FIELD = struct.Struct("<I")  # the header's flags field, at offset 8
START_TIMEOUT = 20.0
#: In the source tree, wherever the command runs from.
DEFAULT_BASELINE = Path(__file__).resolve().parents[2] / "docs" / "bench" / "rtt-baseline.json"
#: A figure whose ratio to the floor grew by more than this is flagged as a regression.
REGRESSION_LIMIT = 0.10
CHECKED_PLACEMENTS = ("same",)
TARGET_CONFIG_RATIO = 2.0
TARGET_CONFIG_RATE = 50_000.0
TARGET_POSTED_RATE = 200_000.0
#: Timed rounds per figure; the rate reported is the best round's.
ROUNDS = 5


# -- messages ---------------------------------------------------------------------------------


def version_message() -> bytes:
    caps = {"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}}
    payload = VersionPayload(PROTOCOL_MAJOR, 2, json.dumps(caps)).pack()
    return pack_message(0, Command.VERSION, payload)


def read_message(region: int, offset: int, count: int = 4, msg_id: int = 1) -> bytes:
    return pack_message(msg_id, Command.REGION_READ, RegionAccess(offset, region, count).pack())


def posted_write_message(region: int, offset: int, value: int, msg_id: int = 2) -> bytes:
    payload = RegionData(offset, region, 4, value.to_bytes(4, "little")).pack()
    return pack_message(msg_id, Command.REGION_WRITE, payload, MsgType.COMMAND | FLAG_NO_REPLY)


def posted_multi_message(region: int, offset: int, entries: int, msg_id: int = 3) -> bytes:
    writes = tuple(
        WriteMultiEntry(offset + 4 * (i % 8), region, 4, i.to_bytes(4, "little"))
        for i in range(entries)
    )
    payload = RegionWriteMulti(writes).pack()
    return pack_message(
        msg_id, Command.REGION_WRITE_MULTI, payload, MsgType.COMMAND | FLAG_NO_REPLY
    )


# -- the floor: a plain Python echo server ------------------------------------------------------


def _echo_replies(buf: bytearray, have: int) -> tuple[list[bytes], int]:
    """The echoes due for the whole messages at the start of ``buf``; bytes consumed."""
    start = 0
    out = []
    while have - start >= HEADER_SIZE:
        (size,) = SIZE_FIELD.unpack_from(buf, start + 4)
        if have - start < size:
            break
        (flags,) = FLAGS_FIELD.unpack_from(buf, start + 8)
        if not flags & FLAG_NO_REPLY:
            out.append(bytes(buf[start : start + size]))
        start += size
    return out, start


class _EchoBuffer:
    """What an echo server has received; the echoes due once whole messages are in."""

    def __init__(self) -> None:
        self._buf = bytearray(1 << 20)
        self._view = memoryview(self._buf)
        self._have = 0

    def free(self) -> memoryview:
        """Where the next bytes go (``recv_into``)."""
        return self._view[self._have :]

    def received(self, count: int) -> bytes:
        """Take ``count`` bytes just read into :meth:`free`; the echoes now due (or b"")."""
        self._have += count
        out, used = _echo_replies(self._buf, self._have)
        if used:
            self._buf[: self._have - used] = self._buf[used : self._have]
            self._have -= used
        return b"".join(out)


def _listening(path: str) -> socket.socket:
    """A socket listening at ``path`` once the path exists: bound under a temporary name and
    renamed (the parent waits for the path, and a bound socket not yet listening would
    refuse its connection)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temporary = f"{path}.{os.getpid()}.tmp"
    listener.bind(temporary)
    listener.listen(1)
    os.rename(temporary, path)
    return listener


def echo_server(path: str) -> None:
    """Serve one client: echo each message that wants a reply, drop posted ones.

    Deliberately the least a Python server can do per message: one blocking ``recv_into``,
    a header look at each message, one ``sendall`` of the echoed bytes."""
    listener = _listening(path)
    conn, _ = listener.accept()
    listener.close()
    echo = _EchoBuffer()
    with conn:
        while got := conn.recv_into(echo.free()):
            if out := echo.received(got):
                conn.sendall(out)


def trio_echo_server(path: str) -> None:
    """The echo server as a trio task reading like our connection does (non-blocking until
    EAGAIN, then ``wait_readable``): the part of our cost that is trio's, not ours."""
    import trio  # noqa: PLC0415 -- only this child process needs it

    async def serve() -> None:
        listener = trio.socket.from_stdlib_socket(_listening(path))
        conn, _ = await listener.accept()
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        raw.setblocking(False)
        echo = _EchoBuffer()
        while True:
            try:
                got = raw.recv_into(echo.free())
            except BlockingIOError:
                await trio.lowlevel.wait_readable(raw)
                continue
            if not got:
                return
            if out := echo.received(got):
                raw.setblocking(True)  # a benchmark peer always reads; keep it simple
                raw.sendall(out)
                raw.setblocking(False)

    trio.run(serve)


# -- the client ---------------------------------------------------------------------------------


class BlockingClient:
    """The same client loop for every server: sendall, then read whole replies."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)

    def close(self) -> None:
        self.sock.close()

    def round_trip(self, message: bytes) -> int:
        """Send ``message`` (possibly several, the last wanting a reply); read one reply."""
        sock, buf, view = self.sock, self.buf, self.view
        sock.sendall(message)
        have = sock.recv_into(view)
        while have < HEADER_SIZE or have < SIZE_FIELD.unpack_from(buf, 4)[0]:
            got = sock.recv_into(view[have:])
            if not got:
                raise ConnectionError("server closed the connection")
            have += got
        return have

    def check(self, message: bytes) -> None:
        """One round trip whose reply must not be an error (catches a wrong setup)."""
        self.round_trip(message)
        (flags,) = FLAGS_FIELD.unpack_from(self.buf, 8)
        if flags & FLAG_ERROR:
            (err,) = SIZE_FIELD.unpack_from(self.buf, 12)
            raise RuntimeError(f"server answered with errno {err}")


def timed_round_trips(
    client: BlockingClient, message: bytes, count: int, warmup: int, rounds: int = ROUNDS
) -> Sample:
    """``count`` timed round trips in ``rounds`` rounds. Percentiles are over all of them;
    the rate is the best round's, since on a shared machine a round in which another
    process took the CPU says nothing about either server."""
    round_trip = client.round_trip
    for _ in range(warmup):
        round_trip(message)
    clock = time.perf_counter_ns
    per_round = max(1, count // rounds)
    times: list[int] = []
    best_rate = 0.0
    for _ in range(rounds):
        chunk = [0] * per_round
        begin = clock()
        for i in range(per_round):
            t0 = clock()
            round_trip(message)
            chunk[i] = clock() - t0
        best_rate = max(best_rate, per_round / ((clock() - begin) / 1e9))
        times.extend(chunk)
    return Sample.of(times, best_rate)


@dataclass
class Sample:
    p10_us: float  # the fast mode: what the regression check compares (see regressions())
    median_us: float
    p90_us: float
    p99_us: float
    rate: float  # messages per second (best of ROUNDS rounds)

    @classmethod
    def of(cls, times_ns: list[int], rate: float) -> Sample:
        times_ns.sort()
        n = len(times_ns)

        def pick(q: float) -> float:
            return times_ns[min(n - 1, int(q * n))] / 1000

        return cls(pick(0.1), pick(0.5), pick(0.9), pick(0.99), rate)


# -- scenarios ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    device: str  # "echo" for the floor server's counterpart; else the --device spec
    build: Callable[[], bytes]
    #: messages counted per round trip (posted writes are pipelined before one fence read)
    per_trip: int = 1


BATCH = 64
MULTI_ENTRIES = 64
MULTI_BATCH = 8


def _config_read() -> bytes:
    return read_message(REGION_CONFIG, 0)


def _posted_batch() -> bytes:
    writes = b"".join(posted_write_message(0, TESTDEV_SCRATCH0, i) for i in range(BATCH))
    return writes + read_message(0, TESTDEV_SCRATCH0)


def _multi_batch() -> bytes:
    multis = b"".join(
        posted_multi_message(0, TESTDEV_SCRATCH0, MULTI_ENTRIES) for _ in range(MULTI_BATCH)
    )
    return multis + read_message(0, TESTDEV_SCRATCH0)


SCENARIOS = (
    Scenario(
        "trio_echo",
        "trio echo server, our read loop, no vfio-user (reference)",
        "trio-echo",
        _config_read,
    ),
    Scenario("config_read", "4-byte config REGION_READ", "testdev", _config_read),
    Scenario(
        "bar_read",
        "4-byte BAR0 REGION_READ (register)",
        "testdev",
        lambda: read_message(0, TESTDEV_SCRATCH0),
    ),
    Scenario(
        "posted_write",
        f"posted 4-byte REGION_WRITE, {BATCH} pipelined + 1 read",
        "testdev",
        _posted_batch,
        per_trip=BATCH,
    ),
    Scenario(
        "write_multi",
        f"posted REGION_WRITE_MULTI x{MULTI_ENTRIES} writes, {MULTI_BATCH} pipelined + 1 read",
        "testdev",
        _multi_batch,
        per_trip=MULTI_BATCH * MULTI_ENTRIES,
    ),
    Scenario("e1000_icr", "e1000 ICR REGION_READ", "e1000", lambda: read_message(0, E1000_ICR)),
)


# -- processes ---------------------------------------------------------------------------------


def _pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv


@contextlib.contextmanager
def started_server(kind: str, path: str, cpu: int | None) -> Iterator[subprocess.Popen[bytes]]:
    """The echo floor (kind "echo"), the trio echo ("trio-echo") or
    ``vfio-user-emu serve --device kind``, pinned."""
    if kind in ("echo", "trio-echo"):
        function = "echo_server" if kind == "echo" else "trio_echo_server"
        code = f"from emulator.tools.bench_rtt import {function}; {function}({path!r})"
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, "-m", "emulator", "serve", "--device", kind]
        argv += ["--socket-path", path]
    proc = subprocess.Popen(_pinned(cpu, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"server {kind} did not start: {stderr}")
            time.sleep(0.02)
        yield proc
    finally:
        stop_process(proc, timeout=5)
        if proc.stderr:
            proc.stderr.close()


@contextlib.contextmanager
def pinned_self(cpu: int | None) -> Iterator[None]:
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# -- runs ----------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    label: str
    placement: str
    server: Sample
    floor: Sample

    @property
    def ratio(self) -> float:
        """Median latency (per message) relative to the floor's."""
        return self.server.median_us / self.floor.median_us

    @property
    def fast_ratio(self) -> float:
        """p10 latency relative to the floor's p10."""
        return self.server.p10_us / self.floor.p10_us

    @property
    def rate_ratio(self) -> float:
        return self.server.rate / self.floor.rate


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)


def _measure(
    kind: str, scenario: Scenario, placement: tuple[int | None, int | None], count: int, warmup: int
) -> Sample:
    client_cpu, server_cpu = placement
    with tempfile.TemporaryDirectory(prefix="vfu-rtt-") as tmp:
        path = str(Path(tmp) / "s.sock")
        with started_server(kind, path, server_cpu), pinned_self(client_cpu):
            client = BlockingClient(path)
            try:
                if not kind.endswith("echo"):
                    client.check(version_message())
                message = scenario.build()
                if not kind.endswith("echo"):
                    client.check(message)  # a refused access would make a fast wrong figure
                trips = max(1, count // scenario.per_trip)
                sample = timed_round_trips(
                    client, message, trips, max(1, warmup // scenario.per_trip)
                )
            finally:
                client.close()
    if scenario.per_trip > 1:
        # Latency per message of the batch; rate in messages (writes), not round trips.
        per = scenario.per_trip
        sample = Sample(
            sample.p10_us / per,
            sample.median_us / per,
            sample.p90_us / per,
            sample.p99_us / per,
            sample.rate * per,
        )
    return sample


PLACEMENTS = {"same": (0, 0), "cross": (0, 1)}


def run(
    scenarios: Sequence[Scenario],
    placements: Sequence[str],
    count: int,
    warmup: int,
    progress: Callable[[str], None] = lambda _: None,
) -> Results:
    results = Results(machine=machine_info())
    for placement in placements:
        cpus = PLACEMENTS[placement]
        floors: dict[int, Sample] = {}
        for scenario in scenarios:
            if scenario.per_trip not in floors:
                progress(f"{placement}: echo floor ({scenario.per_trip} per trip)")
                floors[scenario.per_trip] = _measure("echo", scenario, cpus, count, warmup)
            progress(f"{placement}: {scenario.name}")
            server = _measure(scenario.device, scenario, cpus, count, warmup)
            results.rows.append(
                Row(scenario.name, scenario.label, placement, server, floors[scenario.per_trip])
            )
    return results


def machine_info() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "loadavg": [round(x, 2) for x in load],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- output ---------------------------------------------------------------------------------------


def results_json(results: Results) -> dict[str, Any]:
    return {
        "machine": results.machine,
        "rows": [
            {
                "scenario": r.scenario,
                "label": r.label,
                "placement": r.placement,
                "server": asdict(r.server),
                "floor": asdict(r.floor),
                "ratio": round(r.ratio, 3),
                "fast_ratio": round(r.fast_ratio, 3),
                "rate_ratio": round(r.rate_ratio, 3),
            }
            for r in results.rows
        ],
    }


def table(results: Results) -> str:
    lines = [
        "| placement | scenario | p10 µs | median µs | p90 µs | p99 µs | msgs/s "
        "| floor median µs | floor msgs/s | median / floor | p10 / floor p10 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.rows:
        s, f = r.server, r.floor
        lines.append(
            f"| {r.placement} | {r.label} | {s.p10_us:.2f} | {s.median_us:.2f} | "
            f"{s.p90_us:.2f} | {s.p99_us:.2f} | {s.rate:,.0f} | {f.median_us:.2f} | "
            f"{f.rate:,.0f} | {r.ratio:.2f}x | {r.fast_ratio:.2f}x |"
        )
    return "\n".join(lines)


def target_lines(results: Results) -> list[str]:
    lines = []
    for r in results.rows:
        if r.placement != "same":
            continue
        if r.scenario == "config_read":
            ok = r.ratio <= TARGET_CONFIG_RATIO and r.server.rate >= TARGET_CONFIG_RATE
            lines.append(
                f"config read: {r.ratio:.2f}x floor (target <= {TARGET_CONFIG_RATIO}x), "
                f"{r.server.rate:,.0f} msgs/s (target >= {TARGET_CONFIG_RATE:,.0f}): "
                + ("met" if ok else "MISSED")
            )
        if r.scenario == "posted_write":
            ok = r.server.rate >= TARGET_POSTED_RATE
            lines.append(
                f"posted writes: {r.server.rate:,.0f}/s (target >= {TARGET_POSTED_RATE:,.0f}): "
                + ("met" if ok else "MISSED")
            )
    return lines


def regressions(current: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """Figures whose ratio to the floor grew by more than REGRESSION_LIMIT since the baseline.

    Ratios, not absolute times, are compared: the floor measured in the same run absorbs
    the machine's load, which moves absolute figures by far more than 10%. Latency is
    compared at p10, not the median: same-CPU round trips are bimodal (whether the kernel
    switches to the client at once when the reply is sent or only when the server sleeps),
    and the share of each mode -- hence the median -- moves by 20% between runs, the fast
    mode by a few percent. The rate (best round) is compared too. Only same-CPU figures
    are checked: cross-CPU ones on a small shared machine measure the other processes."""
    before = {(r["placement"], r["scenario"]): r for r in baseline.get("rows", [])}
    found = []
    for row in current["rows"]:
        if row["placement"] not in CHECKED_PLACEMENTS:
            continue
        old = before.get((row["placement"], row["scenario"]))
        if old is None:
            continue
        if "fast_ratio" in old and row["fast_ratio"] > old["fast_ratio"] * (1 + REGRESSION_LIMIT):
            found.append(
                f"{row['placement']} {row['scenario']}: p10 {row['fast_ratio']:.2f}x floor, "
                f"was {old['fast_ratio']:.2f}x"
            )
        if row["rate_ratio"] < old["rate_ratio"] * (1 - REGRESSION_LIMIT):
            found.append(
                f"{row['placement']} {row['scenario']}: rate {row['rate_ratio']:.2f}x floor, "
                f"was {old['rate_ratio']:.2f}x"
            )
    return found


# -- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=20000, help="timed messages per figure")
    parser.add_argument("--warmup", type=int, default=2000, help="untimed messages first")
    parser.add_argument(
        "--placement",
        choices=["same", "cross", "both"],
        default="both",
        help="client and server on one CPU (same), on two (cross), or both",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[s.name for s in SCENARIOS],
        help="only these scenarios (repeatable; default all)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=DEFAULT_BASELINE,
        help=f"results file to compare against (default {DEFAULT_BASELINE})",
    )
    parser.add_argument(
        "--save-baseline", action="store_true", help="write this run's results to --baseline"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")


def run_from_args(args: argparse.Namespace) -> int:
    if os.cpu_count() == 1 and args.placement != "same":
        args.placement = "same"
    placements = ["same", "cross"] if args.placement == "both" else [args.placement]
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    results = run(
        chosen,
        placements,
        args.count,
        args.warmup,
        progress=lambda text: print(f"  ... {text}", file=sys.stderr, flush=True),
    )
    data = results_json(results)
    print(f"machine: {results.machine}")
    print(table(results))
    for line in target_lines(results):
        print(line)
    status = 0
    if args.baseline.exists() and not args.save_baseline:
        found = regressions(data, json.loads(args.baseline.read_text()))
        print(f"compared with {args.baseline}: " + ("no regression" if not found else ""))
        for line in found:
            print(f"  REGRESSION {line}")
        status = 1 if found else 0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.save_baseline:
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(json.dumps(data, indent=2) + "\n")
        print(f"baseline written to {args.baseline}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
