"""``vfio-user-emu bench nic``: our NICs against QEMU's own, two TCG guests per pair, one run.

For each NIC model (``e1000``: ours against QEMU's in-process ``e1000``; ``virtio-net``: ours
against QEMU's ``virtio-net-pci``, modern, no vhost) two guests boot at once, each with the
NIC as its only network device, wired back to back over UNIX datagram sockets (ours with
``serve --netdev dgram``, QEMU's with ``-netdev dgram``: never the host's network). Each
guest pings the other (``ping -c COUNT -i 0.2``), then guest B sends guest A ``--bulk-mib``
MiB over TCP (busybox ``nc``; guest A times it from the connection to the end of stream).
One pair runs at a time, so each has the machine to itself; with ``--rounds`` the order
alternates (QEMU's first, then ours first...) so that a change of the machine's load hits
both sides. A benchmark, not a test: it needs QEMU with vfio-user-pci and the test guest
(``scripts/qemu/build-qemu``, ``scripts/qemu/build-guest``) and a source checkout
(``scripts/qemu/run-vm`` boots the guests).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from emulator.client.qemu_args import cache_dir
from emulator.tools.processes import stop_process

__all__ = ["add_arguments", "run_from_args"]

REPO: Final = Path(__file__).resolve().parents[2]
RUN_VM: Final = REPO / "scripts" / "qemu" / "run-vm"
MACS: Final = ("52:54:00:12:36:01", "52:54:00:12:36:02")
IPS: Final = ("169.254.2.1", "169.254.2.2")
BULK_PORT: Final = 5001
VM_TIMEOUT: Final = 600  # seconds for one guest's whole run (boot, pings, bulk)
SERVER_START_TIMEOUT: Final = 30.0
OURS: Final = "ours"
THEIRS: Final = "QEMU's"


@dataclass(frozen=True)
class Nic:
    """A NIC model as our server and QEMU name it, and how the guest finds it."""

    name: str
    pci_id: tuple[str, str]  # sysfs vendor, device
    ours: str  # serve --device TYPE
    qemu: str  # QEMU's -device TYPE with its options

    def qemu_args(self, mac: str, local: Path, remote: Path) -> tuple[str, ...]:
        return (
            "-netdev",
            f"dgram,id=n0,local.type=unix,local.path={local},remote.type=unix,remote.path={remote}",
            "-device",
            f"{self.qemu},netdev=n0,mac={mac}",
        )


NICS: Final = {
    "e1000": Nic("e1000", ("0x8086", "0x100e"), "e1000", "e1000,romfile="),
    "virtio-net": Nic(
        "virtio-net", ("0x1af4", "0x1041"), "virtio-net", "virtio-net-pci,disable-legacy=on"
    ),
}

# The guest's part (busybox sh as /test.sh). Both guests ping each other; then A listens
# and B sends. B starts sending only once A listens, i.e. after A's pings: the bulk
# transfer does not disturb the pings.
GUEST_SCRIPT: Final = r"""
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = @VENDOR@ ] && [ "$(cat $d/device)" = @DEVICE@ ] && dev=$d
done
[ -n "$dev" ] || { echo "BENCH-FAIL: no @VENDOR@:@DEVICE@ NIC"; exit 1; }
ifc=$(ls $dev/net 2>/dev/null || ls $dev/virtio*/net 2>/dev/null)
[ -n "$ifc" ] || { echo "BENCH-FAIL: no interface for ${dev##*/}"; exit 1; }
ip link set $ifc up
ip addr add @MY_IP@/16 dev $ifc
n=0
until ping -c 1 -W 1 @PEER_IP@ >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -ge 120 ] && break
done
ping -c @COUNT@ -i 0.2 -W 2 @PEER_IP@ > /tmp/ping 2>&1
echo "BENCH-PING: $(grep -E 'transmitted|round-trip' /tmp/ping | tr '\n' ' ')"
if [ @ROLE@ = a ]; then
    cat > /tmp/sink.sh <<'SINK'
#!/bin/sh
t0=$(cut -d' ' -f1 /proc/uptime)
dd of=/tmp/got bs=64k 2>/dev/null
echo "$t0 $(cut -d' ' -f1 /proc/uptime)" > /tmp/times
SINK
    chmod 755 /tmp/sink.sh
    timeout 300 nc -l -p @PORT@ -e /tmp/sink.sh
    echo "BENCH-BULK: $(wc -c < /tmp/got) $(cat /tmp/times)"
else
    dd if=/dev/urandom of=/tmp/blob bs=64k count=@BLOCKS@ 2>/dev/null
    n=0
    until timeout 280 nc @PEER_IP@ @PORT@ < /tmp/blob; do
        n=$((n + 1)); [ $n -ge 120 ] && break; sleep 0.5
    done
fi
exit 0
"""

_PING: Final = re.compile(
    r"BENCH-PING: (\d+) packets transmitted, (\d+) packets received.*?= [\d.]+/([\d.]+)/"
)
_BULK: Final = re.compile(r"BENCH-BULK: (\d+) ([\d.]+) ([\d.]+)")


@dataclass
class PairResult:
    """What one pair of guests measured (None: the guest reported nothing)."""

    nic: str
    who: str  # OURS or THEIRS
    round: int
    ping_ms: list[float | None]  # average round trip, guest A and guest B
    lost: int  # pings without an answer, both guests
    bulk_s: float | None
    bulk_bytes: int
    load: float  # 1-minute load average when the pair started
    problems: list[str] = field(default_factory=list)

    @property
    def ping_avg(self) -> float | None:
        found = [ping for ping in self.ping_ms if ping is not None]
        return statistics.fmean(found) if len(found) == len(self.ping_ms) else None


def guest_script(nic: Nic, index: int, count: int, blocks: int) -> str:
    replacements = {
        "@VENDOR@": nic.pci_id[0],
        "@DEVICE@": nic.pci_id[1],
        "@MY_IP@": IPS[index],
        "@PEER_IP@": IPS[1 - index],
        "@COUNT@": str(count),
        "@ROLE@": "ab"[index],
        "@PORT@": str(BULK_PORT),
        "@BLOCKS@": str(blocks),
    }
    script = GUEST_SCRIPT
    for key, value in replacements.items():
        script = script.replace(key, value)
    return script


def parse_ping(console: str) -> tuple[float | None, int]:
    """(average round trip in ms, pings lost) from a guest's console; (None, 0) if absent."""
    match = _PING.search(console)
    if match is None:
        return None, 0
    return float(match[3]), int(match[1]) - int(match[2])


def parse_bulk(console: str) -> tuple[float | None, int]:
    """(seconds, bytes received) of the bulk transfer from guest A's console."""
    match = _BULK.search(console)
    if match is None:
        return None, 0
    seconds = float(match[3]) - float(match[2])
    return (seconds if seconds > 0 else None), int(match[1])


# ---------------------------------------------------------------------------------------------
# Running the guests


@dataclass
class Bench:
    qemu: str
    workdir: Path
    count: int
    blocks: int

    def emulator(self) -> list[str]:
        return [sys.executable, "-m", "emulator"]

    def run_vm(
        self, name: str, script: str, sockets: list[Path], qemu_args: tuple[str, ...]
    ) -> str:
        """Boot one guest with ``script``; its console once QEMU exited."""
        script_file = self.workdir / f"{name}.sh"
        script_file.write_text(script)
        console = self.workdir / f"{name}-console.log"
        argv = [str(RUN_VM), "--quiet", "--console", str(console), "--script", str(script_file)]
        argv += ["--timeout", str(VM_TIMEOUT)]
        for path in sockets:
            argv += ["--socket", str(path)]
        if qemu_args:
            argv += ["--", *qemu_args]
        env = dict(os.environ, QEMU=self.qemu, TMPDIR=str(self.workdir))
        emu = Path(sys.executable).with_name("vfio-user-emu")
        if emu.exists():
            env["VFIO_USER_EMU"] = str(emu)
        with (self.workdir / f"{name}-run-vm.log").open("wb") as out:
            subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=VM_TIMEOUT + 60,
                check=False,
            )
        return console.read_text(errors="replace") if console.exists() else ""

    def boot_pair(
        self, prefix: str, nic: Nic, sockets: list[list[Path]], qemu_args: list[tuple[str, ...]]
    ) -> list[str]:
        scripts = [guest_script(nic, i, self.count, self.blocks) for i in range(2)]
        with ThreadPoolExecutor(max_workers=2) as threads:
            futures = [
                threads.submit(self.run_vm, f"{prefix}-{i}", scripts[i], sockets[i], qemu_args[i])
                for i in range(2)
            ]
            return [future.result() for future in futures]

    def start_server(
        self, prefix: str, nic: Nic, index: int
    ) -> tuple[subprocess.Popen[bytes], Path]:
        name = f"{prefix}-{index}"
        socket = self.workdir / f"{name}.sock"
        wires = [self.workdir / f"{prefix}-wire-{i}.sock" for i in range(2)]
        command = [*self.emulator(), "serve", "--socket-path", str(socket)]
        command += ["--device", f"{nic.ours},netdev=n0,mac={MACS[index]}"]
        command += ["--netdev", f"dgram,id=n0,local={wires[index]},remote={wires[1 - index]}"]
        with (self.workdir / f"{name}-server.log").open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                raise RuntimeError(f"server {name} did not start: see {name}-server.log")
            time.sleep(0.05)
        return process, socket

    def ours(self, nic: Nic, tag: str) -> list[str]:
        servers: list[subprocess.Popen[bytes]] = []
        try:
            sockets = []
            for i in range(2):
                process, socket = self.start_server(f"ours-{nic.name}-{tag}", nic, i)
                servers.append(process)
                sockets.append([socket])
            return self.boot_pair(f"ours-{nic.name}-{tag}", nic, sockets, [(), ()])
        finally:
            for process in servers:
                stop_process(process)

    def theirs(self, nic: Nic, tag: str) -> list[str]:
        wires = [self.workdir / f"qemu-{nic.name}-{tag}-wire-{i}.sock" for i in range(2)]
        args = [nic.qemu_args(MACS[i], wires[i], wires[1 - i]) for i in range(2)]
        return self.boot_pair(f"qemu-{nic.name}-{tag}", nic, [[], []], args)

    def measure(self, nic: Nic, who: str, round_number: int) -> PairResult:
        load = os.getloadavg()[0]
        tag = f"r{round_number}"
        consoles = self.ours(nic, tag) if who == OURS else self.theirs(nic, tag)
        pings = [parse_ping(console) for console in consoles]
        bulk_s, bulk_bytes = parse_bulk(consoles[0])
        result = PairResult(
            nic.name,
            who,
            round_number,
            [ping for ping, _ in pings],
            sum(lost for _, lost in pings),
            bulk_s,
            bulk_bytes,
            load,
        )
        for index, console in enumerate(consoles):
            if fail := re.search(r"BENCH-FAIL: .*", console):
                result.problems.append(f"guest {'AB'[index]}: {fail[0]}")
            elif pings[index][0] is None:
                result.problems.append(f"guest {'AB'[index]}: no ping result")
        if bulk_bytes != self.blocks * 65536:
            result.problems.append(f"bulk: {bulk_bytes} of {self.blocks * 65536} bytes arrived")
        return result


# ---------------------------------------------------------------------------------------------
# Report


def _ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def row(result: PairResult) -> str:
    a, b = (_ms(ping) for ping in result.ping_ms)
    bulk = f"{result.bulk_s:.2f}" if result.bulk_s else "-"
    rate = f"{result.bulk_bytes / result.bulk_s / 1e6:.2f}" if result.bulk_s else "-"
    return (
        f"| {result.nic} | {result.who} | {result.load:.1f} | {a} / {b} | "
        f"{_ms(result.ping_avg)} | {result.lost} | {bulk} | {rate} |"
    )


def ratios(ours: PairResult, theirs: PairResult) -> str:
    """Ours against QEMU's: ping time ratio (lower is better) and throughput ratio (higher
    is better)."""
    ping = f"{ours.ping_avg / theirs.ping_avg:.2f}x" if ours.ping_avg and theirs.ping_avg else "n/a"
    bulk = f"{theirs.bulk_s / ours.bulk_s:.2f}x" if ours.bulk_s and theirs.bulk_s else "n/a"
    return f"{ours.nic}: ping ours / QEMU's {ping}, bulk throughput ours / QEMU's {bulk}"


def report(results: list[PairResult], bulk_mib: float) -> list[str]:
    lines = [
        f"| NIC | who | load | ping avg ms (A / B) | ping ms | lost | {bulk_mib:g} MiB s | MB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [row(result) for result in results]
    lines.append("")
    pairs: dict[tuple[str, int], dict[str, PairResult]] = {}
    for result in results:
        pairs.setdefault((result.nic, result.round), {})[result.who] = result
    for (_, round_number), both in pairs.items():
        if len(both) == 2:
            lines.append(f"round {round_number + 1}: {ratios(both['ours'], both[THEIRS])}")
    for name in dict.fromkeys(result.nic for result in results):
        mine = [r.ping_avg for r in results if r.nic == name and r.who == OURS and r.ping_avg]
        qemus = [r.ping_avg for r in results if r.nic == name and r.who == THEIRS and r.ping_avg]
        if mine and qemus:
            lines.append(
                f"{name}, all rounds: ping median ours {statistics.median(mine):.2f} ms, "
                f"QEMU's {statistics.median(qemus):.2f} ms "
                f"({statistics.median(mine) / statistics.median(qemus):.2f}x)"
            )
    problems = [f"{r.nic} {r.who}: {p}" for r in results for p in r.problems]
    return lines + [f"problem: {problem}" for problem in problems]


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nic",
        default="e1000,virtio-net",
        help="NIC models, comma-separated (default e1000,virtio-net)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="ours/QEMU's pairs per NIC")
    parser.add_argument("--count", type=int, default=10, help="pings each way (default 10)")
    parser.add_argument(
        "--bulk-mib", type=int, default=16, help="MiB sent over TCP, B to A (default 16)"
    )
    parser.add_argument(
        "--qemu",
        help="QEMU with vfio-user-pci (default: $QEMU, else the one scripts/qemu/build-qemu "
        "built in the cache)",
    )
    parser.add_argument("--workdir", type=Path, help="keep consoles and logs here")


def find_qemu(explicit: str | None) -> str | None:
    if explicit or os.environ.get("QEMU"):
        return explicit or os.environ["QEMU"]
    for build in ("qemu-patched", "qemu"):
        binary = cache_dir() / build / "install" / "bin" / "qemu-system-x86_64"
        if os.access(binary, os.X_OK):
            return str(binary)
    return None


def _check(args: argparse.Namespace) -> tuple[list[Nic], str] | str:
    """The NICs and the QEMU to run, or why the benchmark cannot run."""
    names = [name.strip() for name in args.nic.split(",") if name.strip()]
    unknown = [name for name in names if name not in NICS]
    if not names or unknown:
        return f"--nic: unknown {', '.join(unknown) or 'nothing'} (choose from {', '.join(NICS)})"
    if args.rounds < 1 or args.count < 1 or args.bulk_mib < 1:
        return "--rounds, --count and --bulk-mib must be at least 1"
    qemu = find_qemu(args.qemu)
    if qemu is None or not os.access(qemu, os.X_OK):
        return f"no QEMU at {qemu or 'the cache'} (scripts/qemu/build-qemu, or --qemu / $QEMU)"
    if not RUN_VM.is_file():
        return f"needs a source checkout: {RUN_VM} is missing"
    guest = cache_dir() / "guest"
    if not (guest / "vmlinuz").is_file():
        return f"no test guest in {guest} (scripts/qemu/build-guest)"
    if shutil.which("cpio") is None:
        return "scripts/qemu/run-vm needs cpio (apt-get install cpio)"
    return [NICS[name] for name in names], qemu


def run_from_args(args: argparse.Namespace) -> int:
    checked = _check(args)
    if isinstance(checked, str):
        print(f"bench nic: {checked}", file=sys.stderr)
        return 2
    nics, qemu = checked
    with tempfile.TemporaryDirectory(prefix="bench-nic-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        bench = Bench(qemu, workdir, args.count, args.bulk_mib * 16)
        results: list[PairResult] = []
        for round_number in range(args.rounds):
            # alternate who goes first, so that a change of the machine's load hits both
            order = (THEIRS, OURS) if round_number % 2 == 0 else (OURS, THEIRS)
            for nic in nics:
                for who in order:
                    result = bench.measure(nic, who, round_number)
                    print(row(result), flush=True)
                    results.append(result)
        results.sort(key=lambda r: (list(NICS).index(r.nic), r.round, r.who != OURS))
        print(f"\nmachine: {os.cpu_count()} CPUs; QEMU {qemu}")
        print("\n".join(report(results, args.bulk_mib)))
        return 1 if any(result.problems for result in results) else 0
