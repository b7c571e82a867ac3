"""``vfio-user-emu bench scale``: many devices, one client each, in one process or many.

For N devices (default 1, 8, 32, 64) the benchmark starts either one
``vfio-user-emu serve --config`` process serving all N (mode ``one``) or N
``vfio-user-emu serve --device`` processes (mode ``per-device``), then a load process
connects one client per device. Each client keeps exactly one 4-byte config REGION_READ
outstanding (as one vCPU spinning on a register does) for ``--duration`` seconds after a
warm-up. Reported: aggregate messages/s, per-client rate (min/median/max, so unfairness
shows) and per-client p99 latency (median and worst client).

Memory: RSS of the serving process(es) idle (devices created, nobody connected) and with
every client connected and warmed up; per idle device is the growth of RSS from 1 to N idle
devices divided by N-1, per connected device the growth from idle to connected divided by N.
testdev's 64 KiB RAM BAR is a memfd populated at start, so it is part of every device's RSS.
Nothing is pinned: this is about how the process (or processes) share the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emulator.tools.bench_migration import proc_status
from emulator.tools.bench_rtt import REGION_CONFIG, SIZE_FIELD, read_message, version_message
from emulator.tools.processes import stop_process
from protocol.constants import HEADER_SIZE

START_TIMEOUT = 60.0
REPLY_SIZE = HEADER_SIZE + 16 + 4  # REGION_READ reply: header, offset/region/count, 4 bytes
DEFAULT_COUNTS = (1, 8, 32, 64)


# -- the load process ------------------------------------------------------------------------------


def _handshake(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(version_message())
    data = b""
    while len(data) < HEADER_SIZE or len(data) < SIZE_FIELD.unpack_from(data, 4)[0]:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"{path}: closed during VERSION")
        data += chunk
    return sock


def run_load(paths: Sequence[str], warmup: float, duration: float, hold: float) -> dict[str, Any]:
    """One outstanding config read per connection; per-connection counts and latencies.

    After the timed part the connections stay open for ``hold`` seconds (the parent
    measures the servers' connected RSS meanwhile)."""
    socks = [_handshake(path) for path in paths]
    message = read_message(REGION_CONFIG, 0)
    selector = selectors.DefaultSelector()
    clock = time.perf_counter_ns
    sent_at = [0] * len(socks)
    have = [0] * len(socks)
    latencies: list[list[int]] = [[] for _ in socks]
    for index, sock in enumerate(socks):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
        sent_at[index] = clock()
        sock.send(message)
    start = clock()
    measure_from = start + int(warmup * 1e9)
    end = measure_from + int(duration * 1e9)
    now = start
    while now < end:
        for key, _ in selector.select(timeout=1.0):
            index = key.data
            sock = socks[index]
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"{paths[index]}: server closed the connection")
            have[index] += len(data)
            now = clock()
            while have[index] >= REPLY_SIZE:
                have[index] -= REPLY_SIZE
                if now >= measure_from:
                    latencies[index].append(now - sent_at[index])
                sent_at[index] = now
                sock.send(message)
        now = clock()
    print(json.dumps({"ready": True}), flush=True)  # the parent samples memory now
    time.sleep(hold)
    for sock in socks:
        sock.close()
    result = []
    for lat in latencies:
        lat.sort()
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] / 1000 if lat else 0.0
        result.append({"count": len(lat), "p99_us": p99})
    return {"duration": duration, "clients": result}


def load_main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(run_load(spec["paths"], spec["warmup"], spec["duration"], spec["hold"])))


# -- servers ---------------------------------------------------------------------------------


def _wait_for(paths: Sequence[Path], procs: Sequence[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not all(path.exists() for path in paths):
        for proc in procs:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"a server exited at start: {err}")
        if time.monotonic() > deadline:
            raise RuntimeError("servers did not start in time")
        time.sleep(0.05)


@contextlib.contextmanager
def started_servers(directory: Path, count: int, mode: str) -> Iterator[list[int]]:
    """Serve ``count`` testdevs in one process (mode "one") or one each ("per-device");
    yields the server pids."""
    paths = [directory / f"dev{i}.sock" for i in range(count)]
    base = [sys.executable, "-m", "emulator", "serve"]
    if mode == "one":
        config = directory / "devices.toml"
        config.write_text("".join(f'[[device]]\nsocket = "{p}"\n' for p in paths))
        argvs = [[*base, "--config", str(config)]]
    else:
        argvs = [[*base, "--device", "testdev", "--socket-path", str(p)] for p in paths]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for argv in argvs
    ]
    try:
        _wait_for(paths, procs)
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            stop_process(proc)
            if proc.stderr:
                proc.stderr.close()


def total_rss(pids: Sequence[int]) -> int:
    return sum(proc_status(pid).rss for pid in pids)


# -- runs ------------------------------------------------------------------------------------


@dataclass
class ScaleRow:
    mode: str
    devices: int
    aggregate_rate: float
    client_rate_min: float
    client_rate_median: float
    client_rate_max: float
    p99_median_us: float
    p99_worst_us: float
    rss_idle: int
    rss_connected: int


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def measure(count: int, mode: str, warmup: float, duration: float) -> ScaleRow:
    with tempfile.TemporaryDirectory(prefix="vfu-scale-") as tmp:
        directory = Path(tmp)
        with started_servers(directory, count, mode) as pids:
            time.sleep(0.3)  # let start-up allocations settle
            rss_idle = total_rss(pids)
            spec = {
                "paths": [str(directory / f"dev{i}.sock") for i in range(count)],
                "warmup": warmup,
                "duration": duration,
                "hold": 0.5,
            }
            code = "from emulator.tools.bench_scale import load_main; load_main()"
            load = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(spec)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert load.stdout is not None
            ready = load.stdout.readline()
            if not ready:
                load.wait()
                raise RuntimeError("the load process failed")
            rss_connected = total_rss(pids)
            out, _ = load.communicate(timeout=60)
            if load.returncode:
                raise RuntimeError("the load process failed")
    result = json.loads(out)
    rates = [c["count"] / duration for c in result["clients"]]
    p99s = [c["p99_us"] for c in result["clients"]]
    return ScaleRow(
        mode,
        count,
        sum(rates),
        min(rates),
        _median(rates),
        max(rates),
        _median(p99s),
        max(p99s),
        rss_idle,
        rss_connected,
    )


def run(
    counts: Sequence[int], modes: Sequence[str], warmup: float, duration: float
) -> list[ScaleRow]:
    rows = []
    for mode in modes:
        for count in counts:
            print(f"  ... {mode}: {count} device(s)", file=sys.stderr, flush=True)
            rows.append(measure(count, mode, warmup, duration))
    return rows


def memory_lines(rows: Sequence[ScaleRow]) -> list[str]:
    lines = []
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = sorted((r for r in rows if r.mode == mode), key=lambda r: r.devices)
        if len(mine) < 2:
            continue
        small, large = mine[0], mine[-1]
        idle = (large.rss_idle - small.rss_idle) / (large.devices - small.devices)
        connected = (large.rss_connected - large.rss_idle) / large.devices
        lines.append(
            f"{mode}: {idle / 1024:,.0f} KiB per idle device, {connected / 1024:,.0f} KiB more "
            f"per connected device (RSS {small.devices} -> {large.devices} devices: "
            f"{small.rss_idle / 2**20:.1f} -> {large.rss_idle / 2**20:.1f} MiB idle, "
            f"{large.rss_connected / 2**20:.1f} MiB connected)"
        )
    return lines


def table(rows: Sequence[ScaleRow]) -> str:
    lines = [
        "| mode | devices | aggregate msgs/s | per-client msgs/s min / median / max "
        "| per-client p99 µs median / worst | RSS idle MiB | RSS connected MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.devices} | {r.aggregate_rate:,.0f} | "
            f"{r.client_rate_min:,.0f} / {r.client_rate_median:,.0f} / {r.client_rate_max:,.0f} "
            f"| {r.p99_median_us:,.0f} / {r.p99_worst_us:,.0f} | {r.rss_idle / 2**20:.1f} | "
            f"{r.rss_connected / 2**20:.1f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--devices",
        default=",".join(map(str, DEFAULT_COUNTS)),
        help="device counts, comma-separated (default 1,8,32,64)",
    )
    parser.add_argument(
        "--mode",
        choices=["one", "per-device", "both"],
        default="both",
        help="all devices in one process, one process per device, or both",
    )
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before timing")
    parser.add_argument("--duration", type=float, default=2.0, help="timed seconds per figure")
    parser.add_argument("--json", type=Path, help="also write the results here")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        counts = [int(text) for text in args.devices.split(",")]
    except ValueError:
        print(f"bench scale: --devices {args.devices!r} is not a list of numbers", file=sys.stderr)
        return 2
    if not counts or min(counts) < 1:
        print("bench scale: device counts must be >= 1", file=sys.stderr)
        return 2
    modes = ["one", "per-device"] if args.mode == "both" else [args.mode]
    rows = run(counts, modes, args.warmup, args.duration)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(table(rows))
    for line in memory_lines(rows):
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
