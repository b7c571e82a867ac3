"""Ping between two TCG guests: our ``e1000`` pair against QEMU's in-process e1000 pair, in
the same run (one pair after the other, so that each has the machine to itself).

Both pairs are wired the same way, back to back over UNIX datagram sockets, never to the
host's network: ours with ``vfio-user-emu serve --netdev dgram``, QEMU's with ``-netdev
dgram``. Each guest pings the other (``ping -c 10 -i 0.2``). The round-trip times and their
ratio are reported (terminal summary), not asserted on: the machine is shared and TCG's
speed follows its load. What is asserted: every ping of both pairs was answered.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ServerPool, VmRun, report, run_vm

pytestmark = pytest.mark.qemu

MACS = ("52:54:00:12:35:01", "52:54:00:12:35:02")
IPS = ("169.254.1.1", "169.254.1.2")
COUNT = 10

SCRIPT = r"""
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0x100e ] && dev=$d
done
[ -n "$dev" ] || { echo "T-FAIL: no e1000"; exit 1; }
ifc=$(ls $dev/net)
ip link set $ifc up
ip addr add @MY_IP@/16 dev $ifc
n=0
until ping -c 1 -W 1 @PEER_IP@ >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -ge 120 ] && break
done
ping -c @COUNT@ -i 0.2 -W 2 @PEER_IP@ > /tmp/ping 2>&1
cat /tmp/ping
echo "T-PING: $(grep -E 'transmitted|round-trip' /tmp/ping | tr '\n' ' ')"
sleep 4   # answer the peer's last pings
exit 0
"""

RTT = re.compile(r"(\d+) packets transmitted, (\d+) packets received.*?= [\d.]+/([\d.]+)/")


@dataclass
class Ping:
    sent: int
    received: int
    avg_ms: float


def ping_of(run: VmRun) -> Ping | None:
    match = RTT.search(run.console)
    return Ping(int(match[1]), int(match[2]), float(match[3])) if match else None


def boot_pair(
    qemu_binary: str,
    guest_dir: Path,
    workdir: Path,
    *,
    name: str,
    sockets: tuple[list[Path], list[Path]],
    qemu_args: tuple[tuple[str, ...], tuple[str, ...]],
) -> list[VmRun]:
    scripts = [
        SCRIPT.replace("@MY_IP@", IPS[i])
        .replace("@PEER_IP@", IPS[1 - i])
        .replace("@COUNT@", str(COUNT))
        for i in range(2)
    ]
    with ThreadPoolExecutor(max_workers=2) as threads:
        futures = [
            threads.submit(
                run_vm,
                qemu_binary,
                guest_dir,
                workdir,
                sockets[i],
                scripts[i],
                name=f"{name}-{i}",
                timeout=300,
                qemu_args=qemu_args[i],
            )
            for i in range(2)
        ]
        return [future.result() for future in futures]


def test_ping_ours_against_qemus_e1000(qemu_binary: str, guest_dir: Path, tmp_path: Path) -> None:
    wires = [tmp_path / "ours-0.sock", tmp_path / "ours-1.sock"]
    pool = ServerPool(tmp_path)
    try:
        servers = [
            pool.start(
                f"e1000,netdev=n0,mac={MACS[i]}",
                "--netdev",
                f"dgram,id=n0,local={wires[i]},remote={wires[1 - i]}",
                name=f"e1000-{i}",
                trace=False,
            )
            for i in range(2)
        ]
        ours = boot_pair(
            qemu_binary,
            guest_dir,
            tmp_path,
            name="ours",
            sockets=([servers[0].socket], [servers[1].socket]),
            qemu_args=((), ()),
        )
    finally:
        pool.stop_all()
    qwires = [tmp_path / "qemu-0.sock", tmp_path / "qemu-1.sock"]
    qemu_args = tuple(
        (
            "-netdev",
            f"dgram,id=n0,local.type=unix,local.path={qwires[i]},"
            f"remote.type=unix,remote.path={qwires[1 - i]}",
            "-device",
            f"e1000,netdev=n0,mac={MACS[i]},romfile=",
        )
        for i in range(2)
    )
    theirs = boot_pair(
        qemu_binary,
        guest_dir,
        tmp_path,
        name="qemu",
        sockets=([], []),
        qemu_args=(qemu_args[0], qemu_args[1]),
    )
    pings = {"ours": [ping_of(run) for run in ours], "qemu": [ping_of(run) for run in theirs]}
    lines = []
    for name, results in pings.items():
        shown = ", ".join(
            f"{p.avg_ms:.2f} ms ({p.received}/{p.sent})" if p else "no result" for p in results
        )
        lines.append(f"  {name}: avg rtt per guest {shown}")
    mine = [p.avg_ms for p in pings["ours"] if p]
    qemus = [p.avg_ms for p in pings["qemu"] if p]
    if mine and qemus:
        ratio = (sum(mine) / len(mine)) / (sum(qemus) / len(qemus))
        lines.append(f"  ours / QEMU's: {ratio:.2f}x")
    report("\ne1000 ping, two TCG guests, 10 x 0.2 s each way, same run:\n" + "\n".join(lines))
    for name, results in pings.items():
        for index, result in enumerate(results):
            run = (ours if name == "ours" else theirs)[index]
            assert result is not None, f"{name} guest {index}: no ping result\n{run.console}"
            assert result.received == result.sent == COUNT, f"{name} guest {index}: {result}"
