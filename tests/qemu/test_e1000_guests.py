"""Two unmodified Linux guests, each with our ``e1000`` as its only NIC, talk to each other.

Each guest's QEMU attaches one ``vfio-user-emu serve --device e1000`` process; the two
emulators are wired back to back with ``--netdev dgram`` (UNIX datagram sockets, as QEMU's
``-netdev dgram``), emulator A also records every frame to a pcap file. The guests are never
attached to the host's network: they use link-local addresses (169.254.0.1 and .2), and the
only way out of a guest is our e1000 and the other emulator's socket.

One pair of concurrent boots for the whole module (two TCG guests on the machine at once):

* guest A (169.254.0.1): the stock ``e1000`` driver binds (8086:100E), link up at 1000/Full,
  pings B, receives a bulk transfer (busybox ``nc -l`` into ``dd``, which reports the
  throughput; md5 of what arrived), then reboots (``reboot -f``: QEMU resets the machine,
  which sends DEVICE_RESET to our server). After the reboot (told from the first boot by
  a marker in reserved guest RAM, which a machine reset keeps), the driver binds again,
  the link comes up, A pings B and sends B a message over TCP.
* guest B (169.254.0.2): binds, pings A, sends random bytes to A (md5 printed before), then
  waits for A's message from after the reboot.

The guests print ``T-OK``/``T-FAIL`` lines per check (prefixed ``b1.``/``b2.`` per boot);
the tests assert on those, on the pcap (ICMP echo request/reply between the two MACs, read
back with ``emulator.pcap``) and on the servers' traces (DEVICE_RESET count). The bulk
throughput is printed (and recorded in the test's report) but not asserted on: the machine
is shared and TCG is slow; only the checksum is.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from emulator.pcap import read_pcap

from .conftest import Server, ServerPool, VmRun, report, run_vm

pytestmark = pytest.mark.qemu

MAC_A = "52:54:00:12:34:01"
MAC_B = "52:54:00:12:34:02"
IP_A = "169.254.0.1"
IP_B = "169.254.0.2"
BULK_PORT = 5001
MESSAGE_PORT = 5002
#: The bulk transfer: BULK_BLOCKS blocks of 64 KiB of random bytes from guest B to guest A.
BULK_BLOCKS = 256
JUMBO_MTU = 9000
JUMBO_PING = 8000  # ICMP payload: an 8042-byte Ethernet frame
#: 1 MiB at 256 MiB kept out of the guest kernel's hands (e820 "Reserved"): a boot counter
#: there survives ``reboot -f`` (QEMU's machine reset does not clear guest RAM).
KERNEL_APPEND = "memmap=1M$0x10000000"

COMMON = r"""
fail=0
ok() { echo "T-OK: b$boot.$*"; }
bad() { echo "T-FAIL: b$boot.$*"; fail=1; }
info() { echo "T-INFO: $*"; }
MARK=0x10000000
boot=1
[ $(( $(devmem $MARK 32) )) -eq $((0x52424f4f)) ] && boot=2
info "boot $boot at uptime $(cut -d' ' -f1 /proc/uptime)"

# --- the stock e1000 driver probed our device ---------------------------------------------------
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0x100e ] && dev=$d
done
if [ -z "$dev" ]; then bad "enumerated: no 8086:100e in sysfs"; exit 1; fi
drv=$(basename "$(readlink $dev/driver)")
if [ "$drv" = e1000 ]; then ok "driver_bound ${dev##*/}"
else bad "driver_bound: driver is '$drv'"; dmesg | tail -30; exit 1; fi
ifc=$(ls $dev/net)
net=/sys/class/net/$ifc
mac=$(cat $net/address)
if [ "$mac" = "$MY_MAC" ]; then ok "mac $mac"; else bad "mac: $mac, expected $MY_MAC"; fi
ip link set $ifc up
n=0
while [ "$(cat $net/carrier 2>/dev/null)" != 1 ] && [ $n -lt 150 ]; do sleep 0.1; n=$((n + 1)); done
if [ "$(cat $net/carrier 2>/dev/null)" = 1 ]; then ok "carrier after $((n * 100)) ms"
else bad "carrier: no link after 10 s"; fi
speed=$(cat $net/speed 2>/dev/null); duplex=$(cat $net/duplex 2>/dev/null)
if [ "$speed/$duplex" = 1000/full ]; then ok "link 1000/full"
else bad "link: speed '$speed' duplex '$duplex'"; fi
dmesg | grep -E "e1000.*(Link is Up|eth)" | tail -3
ip addr add $MY_IP/16 dev $ifc

# --- the peer answers pings (it may still be booting: wait up to ~2 min) -------------------------
n=0
until ping -c 1 -W 1 $PEER_IP >/dev/null 2>&1; do
    n=$((n + 1))
    if [ $n -ge 120 ]; then break; fi
done
ping -c 5 -i 0.2 -W 2 $PEER_IP > /tmp/ping 2>&1
cat /tmp/ping
if grep -q "5 packets transmitted, 5 packets received" /tmp/ping; then ok "ping $PEER_IP 5/5"
else bad "ping: $(grep transmitted /tmp/ping)"; fi
"""

# Jumbo frames: MTU 9000 (the driver resets the NIC and, for 82540, receives a frame into
# several 4 KiB page buffers: descriptors chained up to EOP); A pings B with 8000 bytes, so
# an 8042-byte frame goes each way.
JUMBO = r"""
# The MTU change resets the NIC. Had autonegotiation not finished when the driver's
# watchdog first looks (a jiffy after e1000_up), the guest would see the link only 2 s later
# and reset the adapter once more if a frame was queued meanwhile; our autonegotiation ends
# at once, so the carrier is back at that first look (checked: "carrier after N ms"). Still
# let the link go quiet first (tx_packets unchanged for a second, at most 10 s): it costs a
# second and keeps the reset itself out of the way of the bulk transfer's last frames.
last=-1; n=0
while [ "$(cat $net/statistics/tx_packets)" != "$last" ] && [ $n -lt 10 ]; do
    last=$(cat $net/statistics/tx_packets); sleep 1; n=$((n + 1))
done
ip link set $ifc mtu @JUMBO_MTU@
n=0
while [ "$(cat $net/carrier 2>/dev/null)" != 1 ] && [ $n -lt 150 ]; do sleep 0.1; n=$((n + 1)); done
if [ "$(cat $net/mtu)/$(cat $net/carrier)" = @JUMBO_MTU@/1 ]; then
    ok "jumbo_mtu carrier after $((n * 100)) ms"
else bad "jumbo_mtu: mtu $(cat $net/mtu) carrier $(cat $net/carrier)"; fi
"""

STATS = r"""
for s in tx_packets rx_packets tx_errors rx_errors rx_dropped; do
    echo "T-INFO: b$boot $s=$(cat $net/statistics/$s)"
done
for s in tx_errors rx_errors rx_crc_errors rx_length_errors rx_over_errors tx_aborted_errors; do
    v=$(cat $net/statistics/$s)
    if [ "$v" = 0 ]; then ok "stats.$s 0"; else bad "stats.$s $v"; fi
done
echo "T-INFO: b$boot irq $(grep -E 'eth|e1000' /proc/interrupts)"
"""

# Guest A: receives the bulk transfer, reboots, then sends B a message.
GUEST_A = (
    f"MY_MAC={MAC_A}; MY_IP={IP_A}; PEER_IP={IP_B}\n"
    + COMMON
    + r"""
if [ $boot = 1 ]; then
    # runs once B connected: the time from the connection to B's end of stream
    cat > /tmp/sink.sh <<'SINK'
#!/bin/sh
t0=$(cut -d' ' -f1 /proc/uptime)
dd of=/tmp/got bs=64k 2>/dev/null
echo "$t0 $(cut -d' ' -f1 /proc/uptime)" > /tmp/times
SINK
    chmod 755 /tmp/sink.sh
    timeout 150 nc -l -p @BULK_PORT@ -e /tmp/sink.sh
    echo "T-BULK-RX: bytes=$(wc -c < /tmp/got) md5=$(md5sum < /tmp/got | cut -d' ' -f1)"
    echo "T-BULK-TIME: $(cat /tmp/times)"
    @JUMBO@
    n=0
    until ping -c 1 -s @JUMBO_PING@ -W 2 $PEER_IP >/dev/null 2>&1; do
        n=$((n + 1)); [ $n -ge 30 ] && break
    done
    ping -c 3 -i 0.2 -s @JUMBO_PING@ -W 2 $PEER_IP > /tmp/ping 2>&1
    if grep -q "3 packets transmitted, 3 packets received" /tmp/ping; then ok "jumbo_ping 3/3"
    else bad "jumbo_ping: $(grep transmitted /tmp/ping)"; fi
    @STATS@
    devmem $MARK 32 0x52424f4f
    echo "T-INFO: rebooting at uptime $(cut -d' ' -f1 /proc/uptime)"
    sync
    reboot -f
    sleep 30
    exit 1
fi
devmem $MARK 32 0
n=0
until echo "hello from A after reboot" | nc $PEER_IP @MESSAGE_PORT@; do
    n=$((n + 1)); [ $n -ge 60 ] && break; sleep 0.5
done
if [ $n -lt 60 ]; then ok "message_sent"; else bad "message_sent: B never accepted"; fi
@STATS@
exit $fail
"""
)

# Guest B: sends the bulk transfer, then waits for A's message from after its reboot.
GUEST_B = (
    f"MY_MAC={MAC_B}; MY_IP={IP_B}; PEER_IP={IP_A}\n"
    + COMMON
    + r"""
dd if=/dev/urandom of=/tmp/blob bs=64k count=@BULK_BLOCKS@ 2>/dev/null
echo "T-BULK-TX: bytes=$(wc -c < /tmp/blob) md5=$(md5sum < /tmp/blob | cut -d' ' -f1)"
printf '#!/bin/sh\nexec cat > /tmp/message\n' > /tmp/message.sh
chmod 755 /tmp/message.sh
n=0
until timeout 120 nc $PEER_IP @BULK_PORT@ < /tmp/blob; do
    n=$((n + 1)); [ $n -ge 60 ] && break; sleep 0.5
done
if [ $n -lt 60 ]; then ok "bulk_sent"; else bad "bulk_sent: A never accepted"; fi
@JUMBO@
timeout 180 nc -l -p @MESSAGE_PORT@ -e /tmp/message.sh
echo "T-MESSAGE: $(cat /tmp/message 2>/dev/null)"
@STATS@
exit $fail
"""
)


def guest_script(template: str) -> str:
    return (
        template.replace("@STATS@", STATS)
        .replace("@JUMBO@", JUMBO)
        .replace("@JUMBO_MTU@", str(JUMBO_MTU))
        .replace("@JUMBO_PING@", str(JUMBO_PING))
        .replace("@BULK_PORT@", str(BULK_PORT))
        .replace("@MESSAGE_PORT@", str(MESSAGE_PORT))
        .replace("@BULK_BLOCKS@", str(BULK_BLOCKS))
    )


CHECKS = re.compile(r"^T-(OK|FAIL): ([\w.]+)(.*)$", re.M)


@dataclass
class Guest:
    name: str
    run: VmRun
    server: Server

    @property
    def checks(self) -> dict[str, tuple[bool, str]]:
        return {m[2]: (m[1] == "OK", m[3]) for m in CHECKS.finditer(self.run.console)}

    def line(self, tag: str) -> str | None:
        match = re.search(rf"^T-{tag}: (.*)$", self.run.console, re.M)
        return match[1].strip() if match else None


@dataclass
class Pair:
    a: Guest
    b: Guest
    pcap: Path
    workdir: Path

    def report(self) -> str:
        parts = []
        for guest in (self.a, self.b):
            trace = guest.server.trace().splitlines()
            parts.append(
                f"=== guest {guest.name}: run-vm exit {guest.run.returncode}, "
                f"{guest.run.wall_s:.1f} s\n--- run-vm / QEMU output ---\n{guest.run.output}\n"
                f"--- console ---\n{guest.run.console}\n"
                f"--- server log (last 40 of {len(trace)} lines) ---\n" + "\n".join(trace[-40:])
            )
        return f"logs in {self.workdir}\n" + "\n".join(parts)

    def expect(self, guest: Guest, *names: str) -> None:
        checks = guest.checks
        failed = []
        for name in names:
            status = checks.get(name)
            if status is None:
                failed.append(f"{name}: not reported")
            elif not status[0]:
                failed.append(f"{name}:{status[1]}")
        assert not failed, f"guest {guest.name}: " + "; ".join(failed) + "\n" + self.report()


@pytest.fixture(scope="module")
def pair(
    qemu_binary: str, guest_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """Two e1000 emulators wired with dgram sockets, two guests booted concurrently."""
    workdir = tmp_path_factory.mktemp("e1000-pair")
    wire_a, wire_b = workdir / "wire-a.sock", workdir / "wire-b.sock"
    pcap = workdir / "a.pcap"
    pool = ServerPool(workdir)
    try:
        # DEVICE_RESET etc. are logged with --trace; the NIC's register traffic makes that a
        # lot of lines, so only A (the one that reboots) traces.
        server_a = pool.start(
            f"e1000,netdev=n0,mac={MAC_A}",
            "--netdev",
            f"dgram,id=n0,local={wire_a},remote={wire_b},pcap={pcap}",
            name="e1000-a",
        )
        server_b = pool.start(
            f"e1000,netdev=n0,mac={MAC_B}",
            "--netdev",
            f"dgram,id=n0,local={wire_b},remote={wire_a}",
            name="e1000-b",
            trace=False,
        )
        boots = {
            "a": (server_a, guest_script(GUEST_A), True),
            "b": (server_b, guest_script(GUEST_B), False),
        }
        with ThreadPoolExecutor(max_workers=2) as pool_threads:
            futures = {
                name: pool_threads.submit(
                    run_vm,
                    qemu_binary,
                    guest_dir,
                    workdir,
                    [server.socket],
                    script,
                    append=KERNEL_APPEND,
                    name=f"guest-{name}",
                    reboot=reboot,
                    timeout=300,
                )
                for name, (server, script, reboot) in boots.items()
            }
            runs = {name: future.result() for name, future in futures.items()}
    finally:
        pool.stop_all()  # also flushes and closes the pcap
    result = Pair(Guest("A", runs["a"], server_a), Guest("B", runs["b"], server_b), pcap, workdir)
    report(
        f"\ne1000 pair: guest A run-vm wall {runs['a'].wall_s:.1f} s, "
        f"guest B {runs['b'].wall_s:.1f} s; logs in {workdir}"
    )
    yield result


def test_stock_driver_binds_and_link_comes_up(pair: Pair) -> None:
    for guest in (pair.a, pair.b):
        pair.expect(guest, "b1.driver_bound", "b1.mac", "b1.carrier", "b1.link")
        assert re.search(r"e1000: eth\d NIC Link is Up 1000 Mbps Full Duplex", guest.run.console)


def test_guests_ping_each_other(pair: Pair) -> None:
    pair.expect(pair.a, "b1.ping")
    pair.expect(pair.b, "b1.ping")


def _ipv4_icmp(frame: bytes) -> tuple[str, str, int] | None:
    """(destination MAC, source MAC, ICMP type) of an Ethernet/IPv4/ICMP frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 1:
        return None
    header_length = (frame[14] & 0x0F) * 4
    icmp_type = frame[14 + header_length]
    return frame[0:6].hex(":"), frame[6:12].hex(":"), icmp_type


def test_pcap_shows_echo_request_and_reply(pair: Pair) -> None:
    capture = read_pcap(pair.pcap)
    icmp = [parsed for frame in capture.frames if (parsed := _ipv4_icmp(frame))]
    requests_b_to_a = icmp.count((MAC_A, MAC_B, 8))
    replies_a_to_b = icmp.count((MAC_B, MAC_A, 0))
    requests_a_to_b = icmp.count((MAC_B, MAC_A, 8))
    replies_b_to_a = icmp.count((MAC_A, MAC_B, 0))
    report(
        f"\npcap: {len(capture.records)} frames; ICMP echo B->A {requests_b_to_a} requests, "
        f"{replies_a_to_b} replies; A->B {requests_a_to_b} requests, {replies_b_to_a} replies"
    )
    # Each guest pinged 5 times successfully after its first answered ping.
    assert min(requests_b_to_a, replies_a_to_b, requests_a_to_b, replies_b_to_a) >= 6, pair.report()


#: After the MTU change's reset the carrier must come back before the driver's watchdog's
#: 2 s re-look (it does when the link is up at the watchdog's first look, a jiffy after
#: e1000_up: see devices.e1000.device.DEFAULT_AUTONEG_DELAY). Measured: 0 ms; 1500 ms with
#: the old 0.5 s autonegotiation.
MAX_CARRIER_AFTER_MTU_MS = 1000


def test_jumbo_frames(pair: Pair) -> None:
    pair.expect(pair.a, "b1.jumbo_mtu", "b1.jumbo_ping")
    pair.expect(pair.b, "b1.jumbo_mtu")
    for guest in (pair.a, pair.b):
        after = re.search(r"carrier after (\d+) ms", guest.checks["b1.jumbo_mtu"][1])
        assert after is not None, pair.report()
        assert int(after[1]) < MAX_CARRIER_AFTER_MTU_MS, (
            f"guest {guest.name}: carrier {after[1]} ms after the MTU change\n" + pair.report()
        )
    frame_size = 14 + 20 + 8 + JUMBO_PING
    capture = read_pcap(pair.pcap)
    jumbo = [
        parsed
        for frame in capture.frames
        if len(frame) == frame_size and (parsed := _ipv4_icmp(frame))
    ]
    assert (MAC_B, MAC_A, 8) in jumbo and (MAC_A, MAC_B, 0) in jumbo, (
        f"no {frame_size}-byte echo request A->B and reply B->A in the pcap: {jumbo}"
    )


def _tcp_payload_to(frame: bytes, port: int) -> int:
    """Bytes of TCP payload in an Ethernet/IPv4/TCP frame for destination ``port``."""
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return 0
    ip_header = (frame[14] & 0x0F) * 4
    total_length = struct.unpack_from(">H", frame, 16)[0]
    tcp = 14 + ip_header
    if struct.unpack_from(">H", frame, tcp + 2)[0] != port:
        return 0
    tcp_header = (frame[tcp + 12] >> 4) * 4
    return int(total_length) - ip_header - tcp_header


def test_bulk_transfer_arrives_intact(
    pair: Pair, record_property: Callable[[str, object], None]
) -> None:
    pair.expect(pair.b, "b1.bulk_sent")
    sent, received = pair.b.line("BULK-TX"), pair.a.line("BULK-RX")
    assert sent is not None and received is not None, pair.report()
    assert sent == received, f"sent {sent}, received {received}\n{pair.report()}"
    assert f"bytes={BULK_BLOCKS * 65536}" in received
    # Throughput, as the receiving guest's clock saw it (connection to end of stream) and
    # from the pcap's timestamps (first to last data frame). Reported, not asserted: the
    # machine is shared and TCG's speed depends on the host's load.
    size = BULK_BLOCKS * 65536
    start, end = map(float, (pair.a.line("BULK-TIME") or "0 0").split())
    guest_rate = f"{size / (end - start) / 1e6:.2f} MB/s" if end > start else "n/a"
    capture = read_pcap(pair.pcap)
    data = [
        (record.timestamp, length)
        for record in capture.records
        if (length := _tcp_payload_to(record.frame, BULK_PORT)) > 0
    ]
    assert sum(n for _, n in data) >= size, pair.report()
    span = data[-1][0] - data[0][0]
    pcap_rate = f"{size / span / 1e6:.2f} MB/s" if span > 0 else "n/a"
    figure = (
        f"{size >> 10} KiB guest B -> guest A: {pcap_rate} on the wire ({span:.2f} s from "
        f"the first to the last of {len(data)} data frames in the pcap), {guest_rate} in "
        f"guest A ({end - start:.2f} s from accept to end of stream)"
    )
    record_property("e1000_bulk_throughput", figure)
    report(f"\ne1000 bulk transfer: {figure}")


def test_reboot_resets_device_and_traffic_resumes(pair: Pair) -> None:
    """``reboot -f`` in guest A: QEMU resets the machine (DEVICE_RESET to our server), the
    second boot's driver binds again, the link comes up and TCP traffic flows both ways."""
    assert "T-INFO: rebooting" in pair.a.run.console, pair.report()
    assert "T-INFO: boot 2" in pair.a.run.console, pair.report()
    pair.expect(pair.a, "b2.driver_bound", "b2.mac", "b2.carrier", "b2.link", "b2.ping")
    pair.expect(pair.a, "b2.message_sent")
    assert pair.b.line("MESSAGE") == "hello from A after reboot", pair.report()
    trace = pair.a.server.trace()
    resets = trace.count(" DEVICE_RESET cmd")
    # QEMU 10.2 runs its reset handlers once at start-up and twice for a guest reboot; each
    # run sends one DEVICE_RESET (the device advertises VFIO_DEVICE_FLAGS_RESET).
    qemu_trace = (pair.workdir / "guest-a-qemu-trace.log").read_text(errors="replace")
    handlers = qemu_trace.count("vfio_device_reset_handler")
    assert resets >= 2 and resets == handlers, (
        f"{resets} DEVICE_RESET in the server trace, {handlers} reset handler runs in QEMU's\n"
        + pair.report()
    )
    assert trace.count("client connected") == 1, "QEMU reconnected instead of resetting"


#: What Linux's e1000 driver (or the kernel) logs when a NIC misbehaves: a transmit queue
#: that stopped for good (NETDEV WATCHDOG, then an adapter reset), EEPROM/PHY trouble, or a
#: kernel warning or oops. Any of these fails the test.
DRIVER_COMPLAINTS = re.compile(
    r"Reset adapter|NETDEV WATCHDOG|EEPROM Checksum Is Not Valid|"
    r"PHY reset is blocked|Hardware Error|e1000.*(?:error|failed)|Call Trace|"
    # The kernel's own WARNING:/BUG: are upper case; "..MP-BIOS bug: 8254 timer not connected
    # to IO-APIC" (a boot-time timer check that a loaded TCG host can fail) is not a complaint.
    r"(?-i:WARNING:|BUG:)",
    re.I,
)
#: "Detected Tx Unit Hang" is not in that list, on purpose. The driver's watchdog (every 2 s)
#: prints it when the oldest transmit descriptor it has not yet reclaimed was queued more
#: than a second ago (tx_timeout_factor * HZ, guest time, which follows the host's clock
#: under TCG). That measures latency, not a stop: during the bulk transfer the ring is full,
#: and with two TCG guests, two emulators and other work on 2 shared cores an emulator that
#: gets little CPU for a moment leaves the oldest descriptor over a second old while TDH is
#: still advancing. The driver then stops the queue and wakes it as soon as descriptors are
#: reclaimed again. A genuine device bug (a lost doorbell, a TDH that stops or wraps
#: wrongly) does not recover: the queue stays stopped, and after the 5 s transmit timeout
#: the kernel prints NETDEV WATCHDOG and resets the adapter, which DRIVER_COMPLAINTS fails
#: on, as do the transfer's checksum and the later pings and messages in the other tests.
#: So a few hang reports that recovered are tolerated, but recorded (with the guest's
#: kernel timestamps and TDH/TDT) in the test's report; more than this many per guest fail.
TX_HANG = re.compile(r"Detected Tx Unit Hang")
MAX_TX_HANG_REPORTS = 3
_KERNEL_TIME = re.compile(r"\[\s*(\d+\.\d+)\]")
_RING_STATE = re.compile(r"\b(TDH|TDT)\s+<([0-9a-f]+)>")


def kernel_events(console: str, pattern: re.Pattern[str]) -> list[str]:
    """Each console line matching ``pattern``, as "boot N [kernel time] match" (guest A's
    kernel clock starts again at its reboot: each boot begins with "Linux version")."""
    events = []
    boot = 0
    lines = console.splitlines()
    for index, line in enumerate(lines):
        if "] Linux version " in line:
            boot += 1
        match = pattern.search(line)
        if not match:
            continue
        stamp = _KERNEL_TIME.search(line)
        when = f"[{stamp[1]}]" if stamp else "[no kernel time]"
        # A hang report's next lines carry the ring's state: worth keeping for the record.
        ring = " ".join(
            f"{m[1]}={m[2]}" for m in _RING_STATE.finditer("\n".join(lines[index + 1 : index + 4]))
        )
        events.append(f"boot {boot} {when} {match[0]}" + (f" ({ring})" if ring else ""))
    return events


def test_kernel_events_dates_complaints_per_boot() -> None:
    console = (
        "[    0.000000] Linux version 6.1.0-56-amd64\n"
        "[    9.100000] e1000 0000:00:02.0 eth0: Detected Tx Unit Hang\n"
        "[    9.100000]   Tx Queue             <0>\n"
        "[    9.100000]   TDH                  <3b>\n"
        "[    9.100000]   TDT                  <41>\n"
        "[    0.000000] Linux version 6.1.0-56-amd64\n"
        "[   12.500000] NETDEV WATCHDOG: eth0 (e1000): transmit queue 0 timed out\n"
        "[    0.036000] ..MP-BIOS bug: 8254 timer not connected to IO-APIC\n"
    )
    assert kernel_events(console, TX_HANG) == [
        "boot 1 [9.100000] Detected Tx Unit Hang (TDH=3b TDT=41)"
    ]
    assert kernel_events(console, DRIVER_COMPLAINTS) == ["boot 2 [12.500000] NETDEV WATCHDOG"]


def test_no_driver_complaints(pair: Pair, record_property: Callable[[str, object], None]) -> None:
    for guest in (pair.a, pair.b):
        complaints = kernel_events(guest.run.console, DRIVER_COMPLAINTS)
        hangs = kernel_events(guest.run.console, TX_HANG)
        if complaints or hangs:
            figure = "; ".join(complaints + hangs)
            record_property(f"e1000_guest_{guest.name}_driver_messages", figure)
            report(f"\ne1000 guest {guest.name} driver messages: {figure}")
        assert not complaints, f"guest {guest.name}: {complaints}\n{pair.report()}"
        assert len(hangs) <= MAX_TX_HANG_REPORTS, (
            f"guest {guest.name}: {len(hangs)} Tx Unit Hang reports (more than "
            f"{MAX_TX_HANG_REPORTS} is more than a loaded machine explains): {hangs}\n"
            + pair.report()
        )
        names = [
            f"b{boot}.stats.{s}"
            for boot in (1, 2)
            if f"b{boot}.mac" in guest.checks
            for s in (
                "tx_errors",
                "rx_errors",
                "rx_crc_errors",
                "rx_length_errors",
                "rx_over_errors",
                "tx_aborted_errors",
            )
        ]
        pair.expect(guest, *names)


def test_guests_finished_cleanly(pair: Pair) -> None:
    for guest in (pair.a, pair.b):
        assert guest.run.returncode == 0, pair.report()
        failed = [name for name, (good, _) in guest.checks.items() if not good]
        assert not failed, f"guest {guest.name}: failed checks {failed}\n{pair.report()}"
