"""Two unmodified Linux guests, each with our ``virtio-net`` as its only NIC, talk to each
other: the stock ``virtio_pci`` + ``virtio_net`` drivers bind to 1af4:1041, the link comes
up, the guests ping each other over 169.254.0.0/16, move 64 MiB over TCP (md5 checked),
switch to MTU 9000 and ping with 8000-byte payloads, and guest A reboots (DEVICE_RESET) and
talks again. Then the same guests and scripts run over QEMU's own in-process
``virtio-net-pci``, and the bulk time and ping of both are reported side by side.

The guests run the e1000 pair's scripts (:mod:`tests.qemu.test_e1000_guests`) with the
virtio probe in place of the e1000 one; the emulators are wired with ``--netdev dgram`` and
emulator A records a pcap. Never attached to the host's network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from emulator.pcap import read_pcap

from .conftest import ServerPool, VmRun, report, run_vm
from .test_e1000_guests import (
    BULK_PORT,
    COMMON,
    GUEST_A,
    GUEST_B,
    JUMBO_MTU,
    JUMBO_PING,
    KERNEL_APPEND,
    MAC_A,
    MAC_B,
    Guest,
    Pair,
    _ipv4_icmp,
    _tcp_payload_to,
    guest_script,
)

pytestmark = pytest.mark.qemu

# The e1000 probe (8086:100e bound to e1000, 1000/full) replaced by virtio's: the PCI
# function is bound to virtio-pci and its virtio device to virtio_net.
VIRTIO_PROBE = r"""
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1041 ] && dev=$d
done
if [ -z "$dev" ]; then bad "enumerated: no 1af4:1041 in sysfs"; exit 1; fi
pdrv=$(basename "$(readlink $dev/driver)")
vdev=$(ls -d $dev/virtio* 2>/dev/null | head -n 1)
vdrv=$(basename "$(readlink $vdev/driver 2>/dev/null)" 2>/dev/null)
if [ "$pdrv/$vdrv" = virtio-pci/virtio_net ]; then ok "driver_bound ${dev##*/}"
else bad "driver_bound: '$pdrv' / '$vdrv'"; dmesg | tail -30; exit 1; fi
info "virtio features $(cat $vdev/features)"
ifc=$(ls $vdev/net)
net=/sys/class/net/$ifc
mac=$(cat $net/address)
if [ "$mac" = "$MY_MAC" ]; then ok "mac $mac"; else bad "mac: $mac, expected $MY_MAC"; fi
ip link set $ifc up
n=0
while [ "$(cat $net/carrier 2>/dev/null)" != 1 ] && [ $n -lt 150 ]; do sleep 0.1; n=$((n + 1)); done
if [ "$(cat $net/carrier 2>/dev/null)" = 1 ]; then ok "carrier after $((n * 100)) ms"
else bad "carrier: no link after 10 s"; fi
ok "link (virtio reports no speed)"
grep virtio /proc/interrupts | while read -r line; do info "irq $line"; done
ip addr add $MY_IP/16 dev $ifc
"""

_E1000_PROBE_START = "# --- the stock e1000 driver probed our device"
_E1000_PROBE_END = "ip addr add $MY_IP/16 dev $ifc\n"


#: 64 MiB guest B -> guest A (the e1000 pair moves 16 MiB).
VIRTIO_BULK_BLOCKS = 1024

# Guest A's second boot, before its message to B: the driver let go of the device and bound
# again (unbind/bind through sysfs), the interface set up anew, B reachable again.
REBIND = r"""
echo "${dev##*/}" > /sys/bus/pci/drivers/virtio-pci/unbind
echo "${dev##*/}" > /sys/bus/pci/drivers/virtio-pci/bind
vdev=$(ls -d $dev/virtio* 2>/dev/null | head -n 1)
ifc=$(ls $vdev/net 2>/dev/null)
if [ -n "$ifc" ]; then ok "rebind $ifc"; else bad "rebind: no interface after bind"; fi
net=/sys/class/net/$ifc
ip link set $ifc up
ip addr add $MY_IP/16 dev $ifc
n=0
until ping -c 1 -W 1 $PEER_IP >/dev/null 2>&1; do n=$((n + 1)); [ $n -ge 30 ] && break; done
ping -c 3 -i 0.2 -W 2 $PEER_IP > /tmp/ping 2>&1
if grep -q "3 packets transmitted, 3 packets received" /tmp/ping; then ok "rebind_ping 3/3"
else bad "rebind_ping: $(grep transmitted /tmp/ping)"; fi
devmem $MARK 32 0
"""


def virtio_common() -> str:
    start = COMMON.index(_E1000_PROBE_START)
    end = COMMON.index(_E1000_PROBE_END) + len(_E1000_PROBE_END)
    return COMMON[:start] + VIRTIO_PROBE + COMMON[end:]


def virtio_script(template: str, *, rebind: bool = False) -> str:
    script = template.replace(COMMON, virtio_common())
    if rebind:
        script = script.replace("devmem $MARK 32 0\n", REBIND, 1)
    return guest_script(script.replace("@BULK_BLOCKS@", str(VIRTIO_BULK_BLOCKS)))


Boot = tuple[list[Path], str, bool, tuple[str, ...]]


def boot_both(
    qemu_binary: str, guest_dir: Path, workdir: Path, boots: dict[str, Boot], prefix: str
) -> dict[str, VmRun]:
    """Boot guests ``a`` and ``b`` at once: (vfio-user sockets, script, may reboot, extra
    QEMU arguments) each; their runs once both QEMUs exited."""
    with ThreadPoolExecutor(max_workers=2) as threads:
        futures = {
            name: threads.submit(
                run_vm,
                qemu_binary,
                guest_dir,
                workdir,
                sockets,
                script,
                append=KERNEL_APPEND,
                name=f"{prefix}-{name}",
                reboot=reboot,
                timeout=300,
                qemu_args=qemu_args,
            )
            for name, (sockets, script, reboot, qemu_args) in boots.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def pair(
    qemu_binary: str, guest_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """Two virtio-net emulators wired with dgram sockets, two guests booted concurrently."""
    if "virtio_net" not in (guest_dir / "KERNEL").read_text():
        pytest.skip("the test guest has no virtio_net module (rebuild: scripts/qemu/build-guest)")
    workdir = tmp_path_factory.mktemp("virtio-pair")
    wire_a, wire_b = workdir / "wire-a.sock", workdir / "wire-b.sock"
    pcap = workdir / "a.pcap"
    pool = ServerPool(workdir)
    try:
        server_a = pool.start(
            f"virtio-net,netdev=n0,mac={MAC_A},mtu={JUMBO_MTU}",
            "--netdev",
            f"dgram,id=n0,local={wire_a},remote={wire_b},pcap={pcap}",
            name="virtio-a",
        )
        server_b = pool.start(
            f"virtio-net,netdev=n0,mac={MAC_B},mtu={JUMBO_MTU}",
            "--netdev",
            f"dgram,id=n0,local={wire_b},remote={wire_a}",
            name="virtio-b",
            trace=False,
        )
        boots: dict[str, Boot] = {
            "a": ([server_a.socket], virtio_script(GUEST_A, rebind=True), True, ()),
            "b": ([server_b.socket], virtio_script(GUEST_B), False, ()),
        }
        runs = boot_both(qemu_binary, guest_dir, workdir, boots, "guest")
    finally:
        pool.stop_all()
    result = Pair(Guest("A", runs["a"], server_a), Guest("B", runs["b"], server_b), pcap, workdir)
    report(
        f"\nvirtio-net pair: guest A run-vm wall {runs['a'].wall_s:.1f} s, "
        f"guest B {runs['b'].wall_s:.1f} s; logs in {workdir}"
    )
    yield result


def test_stock_driver_binds_and_link_comes_up(pair: Pair) -> None:
    for guest in (pair.a, pair.b):
        pair.expect(guest, "b1.driver_bound", "b1.mac", "b1.carrier")
        # MSI-X: a configuration vector and one per queue (input.0, output.0)
        assert re.search(r"virtio0-input\.0", guest.run.console), pair.report()


def test_guests_ping_each_other(pair: Pair) -> None:
    pair.expect(pair.a, "b1.ping")
    pair.expect(pair.b, "b1.ping")
    capture = read_pcap(pair.pcap)
    icmp = [parsed for frame in capture.frames if (parsed := _ipv4_icmp(frame))]
    assert icmp.count((MAC_A, MAC_B, 8)) >= 6 and icmp.count((MAC_B, MAC_A, 0)) >= 6
    assert icmp.count((MAC_B, MAC_A, 8)) >= 6 and icmp.count((MAC_A, MAC_B, 0)) >= 6


def test_jumbo_frames(pair: Pair) -> None:
    pair.expect(pair.a, "b1.jumbo_mtu", "b1.jumbo_ping")
    frame_size = 14 + 20 + 8 + JUMBO_PING
    capture = read_pcap(pair.pcap)
    jumbo = [
        parsed
        for frame in capture.frames
        if len(frame) == frame_size and (parsed := _ipv4_icmp(frame))
    ]
    assert (MAC_B, MAC_A, 8) in jumbo and (MAC_A, MAC_B, 0) in jumbo, jumbo


def test_bulk_transfer_arrives_intact(
    pair: Pair, record_property: Callable[[str, object], None]
) -> None:
    pair.expect(pair.b, "b1.bulk_sent")
    sent, received = pair.b.line("BULK-TX"), pair.a.line("BULK-RX")
    assert sent is not None and received is not None, pair.report()
    assert sent == received, f"sent {sent}, received {received}\n{pair.report()}"
    size = VIRTIO_BULK_BLOCKS * 65536
    assert f"bytes={size}" in received
    start, end = map(float, (pair.a.line("BULK-TIME") or "0 0").split())
    capture = read_pcap(pair.pcap)
    data = [
        (record.timestamp, length)
        for record in capture.records
        if (length := _tcp_payload_to(record.frame, BULK_PORT)) > 0
    ]
    span = data[-1][0] - data[0][0] if data else 0.0
    figure = (
        f"{size >> 10} KiB guest B -> guest A in {span:.2f} s on the wire "
        f"({size / span / 1e6:.2f} MB/s), {end - start:.2f} s in guest A"
        if span > 0 and end > start
        else "n/a"
    )
    record_property("virtio_net_bulk_throughput", figure)
    report(f"\nvirtio-net bulk transfer: {figure}")


def test_reboot_resets_device_and_traffic_resumes(pair: Pair) -> None:
    assert "T-INFO: boot 2" in pair.a.run.console, pair.report()
    pair.expect(pair.a, "b2.driver_bound", "b2.mac", "b2.carrier", "b2.ping", "b2.message_sent")
    assert pair.b.line("MESSAGE") == "hello from A after reboot", pair.report()
    assert pair.a.server.trace().count(" DEVICE_RESET cmd") >= 2, pair.report()


_PING = re.compile(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/")


def _ping_ms(guest: Guest) -> tuple[float, float] | None:
    """(min, avg) round trip of the guest's first 5-ping run (before any jumbo ping)."""
    match = _PING.search(guest.run.console)
    return (float(match[1]), float(match[2])) if match else None


def _bulk_seconds(guest: Guest) -> float | None:
    line = guest.line("BULK-TIME")
    if not line:
        return None
    start, end = map(float, line.split())
    return end - start if end > start else None


def test_same_run_against_qemus_own_virtio_net(
    pair: Pair,
    qemu_binary: str,
    guest_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    record_property: Callable[[str, object], None],
) -> None:
    """The same two guests and scripts over QEMU's in-process ``virtio-net-pci`` (modern,
    no vhost, ``-netdev dgram`` between the two QEMUs), right after ours: bulk time and
    ping, as ratios to ours (reported, not asserted: TCG on a shared machine)."""
    workdir = tmp_path_factory.mktemp("qemu-virtio-pair")
    wire_a, wire_b = workdir / "wire-a.sock", workdir / "wire-b.sock"

    def qemu_nic(mac: str, local: Path, remote: Path) -> tuple[str, ...]:
        return (
            "-netdev",
            f"dgram,id=n0,local.type=unix,local.path={local},remote.type=unix,remote.path={remote}",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={mac},disable-legacy=on,host_mtu={JUMBO_MTU}",
        )

    boots: dict[str, Boot] = {
        "a": ([], virtio_script(GUEST_A), True, qemu_nic(MAC_A, wire_a, wire_b)),
        "b": ([], virtio_script(GUEST_B), False, qemu_nic(MAC_B, wire_b, wire_a)),
    }
    runs = boot_both(qemu_binary, guest_dir, workdir, boots, "qemu-guest")
    theirs_a = Guest("A", runs["a"], pair.a.server)
    theirs_b = Guest("B", runs["b"], pair.b.server)
    for guest in (theirs_a, theirs_b):
        failed = [name for name, (ok, _) in guest.checks.items() if not ok]
        assert "b1.ping" in guest.checks and not failed, (failed, guest.run.console[-3000:])
    ours_bulk, qemu_bulk = _bulk_seconds(pair.a), _bulk_seconds(theirs_a)
    pings = {
        who: [ping for g in guests if (ping := _ping_ms(g)) is not None]
        for who, guests in (("ours", (pair.a, pair.b)), ("qemu", (theirs_a, theirs_b)))
    }
    assert ours_bulk and qemu_bulk and all(len(p) == 2 for p in pings.values()), pings
    low = {who: min(p[0] for p in found) for who, found in pings.items()}
    avg = {who: sum(p[1] for p in found) / 2 for who, found in pings.items()}
    size = VIRTIO_BULK_BLOCKS * 65536
    figure = (
        f"{size >> 20} MiB guest B -> guest A: ours {ours_bulk:.2f} s, QEMU's virtio-net-pci "
        f"{qemu_bulk:.2f} s (throughput ratio {qemu_bulk / ours_bulk:.2f}x); ping avg ours "
        f"{avg['ours']:.2f} ms, QEMU's {avg['qemu']:.2f} ms (ratio "
        f"{avg['ours'] / avg['qemu']:.2f}x), min {low['ours']:.2f} / {low['qemu']:.2f} ms "
        f"({low['ours'] / low['qemu']:.2f}x)"
    )
    record_property("virtio_net_vs_qemu", figure)
    report(f"\nvirtio-net vs QEMU's own, same run: {figure}")


def test_driver_unbind_and_rebind(pair: Pair) -> None:
    pair.expect(pair.a, "b2.rebind", "b2.rebind_ping")


def test_no_driver_complaints(pair: Pair) -> None:
    complaints = re.compile(r"NETDEV WATCHDOG|virtio_net.*error|Call Trace|WARNING:|BUG:", re.I)
    for guest in (pair.a, pair.b):
        found = complaints.findall(guest.run.console)
        assert not found, f"guest {guest.name}: {found}\n{pair.report()}"
        for boot in (1, 2):
            if f"b{boot}.mac" not in guest.checks:
                continue
            pair.expect(guest, *(f"b{boot}.stats.{s}" for s in ("tx_errors", "rx_errors")))
