"""QEMU dies, a new QEMU comes: the same ``vfio-user-emu serve`` process keeps serving.

One ``serve --device e1000`` process for the whole test. Its NIC's dgram peer is a tiny
responder in this test (ARP and ICMP echo for 169.254.0.2, nothing else), so the guest can
ping without any host network. Then:

1. A guest boots, the stock e1000 driver binds, the link comes up and pings are answered;
   the guest keeps pinging, and QEMU (run-vm's whole process group) is SIGKILLed while
   frames are flowing and the driver is busy.
2. QEMU is started and SIGKILLed a few more times: after seeded random delays, and when
   the emulator has received a seeded random number of requests from it (realize and
   start-up reset, SeaBIOS and the kernel's PCI scan, the e1000 probe and link-up).
3. A last guest boots to the end: the driver binds, the link comes up, 5/5 pings, poweroff.

After every kill the emulator must still be running, and at the end its log must show no
crash, one connection per QEMU that got as far as connecting, and each one cleaned up.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RunningVm, ServerPool, report, vm_command

pytestmark = pytest.mark.qemu

GUEST_MAC = "52:54:00:12:34:11"
GUEST_IP = "169.254.0.1"
PEER_MAC = bytes.fromhex("02aabbccdd02")
PEER_IP = "169.254.0.2"
#: Seeded so a failure can be replayed. A boot's protocol phases by requests received
#: (qemu-wire.md): realize ~23, start-up reset ~17, SeaBIOS ~64, kernel PCI scan ~67, then
#: the e1000 probe (~12000, EEPROM bit-banging) and the interface coming up.
SEED = 9
RANDOM_DELAY_KILLS = 2
KILL_WINDOW_S = (0.2, 12.0)
KILL_REQUEST_WINDOWS = ((1, 40), (40, 200), (200, 12500))
#: How long a pinging guest may go without an answered echo before the test calls it stuck.
TRAFFIC_DEADLINE_S = 15.0

GUEST_SCRIPT = rf"""
fail=0
ok() {{ echo "T-OK: $*"; }}
bad() {{ echo "T-FAIL: $*"; fail=1; }}
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0x100e ] && dev=$d
done
drv=
[ -n "$dev" ] && drv=$(basename "$(readlink $dev/driver)")
if [ "$drv" = e1000 ]; then ok "driver_bound"; else bad "driver_bound: '$drv'"; exit 1; fi
ifc=$(ls $dev/net)
ip link set $ifc up
n=0
while [ "$(cat /sys/class/net/$ifc/carrier)" != 1 ] && [ $n -lt 150 ]; do
    sleep 0.1; n=$((n + 1))
done
if [ "$(cat /sys/class/net/$ifc/carrier)" = 1 ]; then ok "carrier"; else bad "carrier"; fi
ip addr add {GUEST_IP}/16 dev $ifc
ping -c 5 -i 0.2 -W 3 {PEER_IP} > /tmp/ping 2>&1
cat /tmp/ping
if grep -q "5 packets transmitted, 5 packets received" /tmp/ping; then ok "ping"
else bad "ping: $(grep transmitted /tmp/ping)"; fi
if grep -q hold=1 /proc/cmdline; then
    echo "T-HOLD: pinging until killed"
    ping -i 0.05 {PEER_IP} > /dev/null
fi
exit $fail
"""


class Responder:
    """The far end of the guest's cable: answers ARP for PEER_IP and ICMP echo requests."""

    def __init__(self, path: Path, emulator_end: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.emulator_end = str(emulator_end)
        self.frames_in = 0
        self.echo_replies = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                frame = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.frames_in += 1
            reply = self.answer(frame)
            if reply is not None:
                with contextlib.suppress(OSError):  # the emulator's socket is gone: test over
                    self.sock.sendto(reply, self.emulator_end)

    def answer(self, frame: bytes) -> bytes | None:
        ethertype = frame[12:14]
        peer_ip = socket.inet_aton(PEER_IP)
        if ethertype == b"\x08\x06" and len(frame) >= 42 and frame[38:42] == peer_ip:
            sender_mac, sender_ip = frame[22:28], frame[28:32]
            if struct.unpack_from(">H", frame, 20)[0] != 1:  # not a request
                return None
            arp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 2)
            arp += PEER_MAC + peer_ip + sender_mac + sender_ip
            return sender_mac + PEER_MAC + b"\x08\x06" + arp
        if ethertype == b"\x08\x00" and len(frame) >= 42 and frame[23] == 1:
            ihl = (frame[14] & 0x0F) * 4
            if frame[30:34] != peer_ip or frame[14 + ihl] != 8:
                return None
            ip = bytearray(frame[14 : 14 + ihl])
            ip[12:16], ip[16:20] = frame[30:34], frame[26:30]  # swap: checksum unchanged
            icmp = bytearray(frame[14 + ihl :])
            icmp[0] = 0  # echo reply
            icmp[2:4] = b"\0\0"
            icmp[2:4] = struct.pack(">H", _internet_checksum(bytes(icmp)))
            self.echo_replies += 1
            return frame[6:12] + PEER_MAC + b"\x08\x00" + bytes(ip) + bytes(icmp)
        return None

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.sock.close()


def _internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int(word) for word in struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.fixture
def responder(tmp_path: Path) -> Iterator[Responder]:
    end = Responder(tmp_path / "wire-host.sock", tmp_path / "wire-emu.sock")
    yield end
    end.close()


def test_emulator_survives_qemu_kills(
    qemu_binary: str, guest_dir: Path, tmp_path: Path, responder: Responder
) -> None:
    pool = ServerPool(tmp_path)
    try:
        server = pool.start(
            f"e1000,netdev=n0,mac={GUEST_MAC}",
            "--netdev",
            f"dgram,id=n0,local={tmp_path / 'wire-emu.sock'},remote={tmp_path / 'wire-host.sock'}",
        )

        def start(name: str, append: str = "") -> RunningVm:
            command = vm_command(
                tmp_path, qemu_binary, [server.socket], GUEST_SCRIPT, name=name, append=append
            )
            return RunningVm(command)

        def alive(after: str) -> None:
            assert server.process.poll() is None, f"emulator died after {after}:\n{server.trace()}"

        # 1. killed while the driver is busy with traffic
        busy = start("busy", append="hold=1")
        try:
            held = busy.wait_for(r"^T-HOLD:", timeout=180)
            assert held, f"first guest never got to pinging:\n{busy.console()}"
            assert "T-OK: ping" in busy.console(), busy.console()
            echoes_before = responder.echo_replies
            # The guest pings every 50 ms, but a loaded machine may starve the TCG guest or
            # the emulator for a while: wait for one more answer, up to a deadline.
            deadline = time.monotonic() + TRAFFIC_DEADLINE_S
            while responder.echo_replies <= echoes_before and time.monotonic() < deadline:
                if busy.process.poll() is not None:
                    break
                time.sleep(0.05)
            assert responder.echo_replies > echoes_before, (
                f"no echo answered within {TRAFFIC_DEADLINE_S} s while holding:\n{busy.console()}"
            )
        finally:
            busy.kill()
        alive("a kill during traffic")

        # 2. killed at random points of the boot: after seeded random delays, and after
        # seeded random numbers of requests the emulator has received from that QEMU
        rng = random.Random(SEED)
        kills = [("delay", rng.uniform(*KILL_WINDOW_S)) for _ in range(RANDOM_DELAY_KILLS)]
        kills += [("requests", rng.randint(*window)) for window in KILL_REQUEST_WINDOWS]
        follower = RequestCounter(server.log)
        stages = []
        for index, (kind, point) in enumerate(kills):
            follower.new_client()
            vm = start(f"kill{index}")
            try:
                if kind == "delay":
                    time.sleep(point)  # the kill point itself, not a wait for something
                else:
                    reached = follower.wait_for(int(point), vm)
                    assert reached, f"QEMU exited or stalled first:\n{vm.console()}"
            finally:
                vm.kill()  # also when the assertion fails: no QEMU is left running
            when = f"after {point:.2f} s" if kind == "delay" else f"at request {int(point)}"
            request = follower.last_request()
            stages.append(f"{when}: {follower.count} requests seen, the last one {request}")
            alive(f"a kill {when}")
        report("\nQEMU killed:\n  " + "\n  ".join(stages))

        # 3. a last QEMU works end to end against the same emulator
        last = start("last")
        returncode = last.wait(timeout=300)  # kills it on a timeout
        report(
            f"restart: the last QEMU's guest booted, pinged, powered off in "
            f"{time.monotonic() - last.started:.1f} s"
        )
        console = last.console()
        assert returncode == 0, (
            f"last boot failed ({returncode}):\n{console}\n{server.trace()[-5000:]}"
        )
        for check in ("driver_bound", "carrier", "ping"):
            assert f"T-OK: {check}" in console, console
        alive("the last guest powered off")
    finally:
        pool.stop_all()

    log = server.trace()
    report("what the emulator saw of each QEMU:\n  " + "\n  ".join(connections(log)))
    assert "Traceback" not in log, log[-5000:]
    connected = log.count("client connected")
    disconnected = log.count("client disconnected")
    # the busy one, those killed at a request count and the last one surely connected
    assert connected >= 2 + len(KILL_REQUEST_WINDOWS), connected
    assert connected == disconnected, (connected, disconnected)
    assert "refusing a second client" not in log, "a new QEMU found the device still busy"


def connections(log: str) -> list[str]:
    """Per client connection in a ``--trace`` log: how many requests it sent and the last one."""
    summaries = []
    for part in log.split("client connected")[1:]:
        requests = re.findall(r"<- id=\S+ (\w+) cmd", part)
        ended = "disconnected" if "client disconnected" in part else "still connected"
        last = requests[-1] if requests else "-"
        summaries.append(f"{len(requests)} requests, last {last}, {ended}")
    return summaries


class RequestCounter:
    """Follows a ``serve --trace`` log: requests received since the last client connected."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0
        self.count = 0
        self.pending = ""
        self.last = "-"

    def new_client(self) -> None:
        """Forget what came before (call before starting the next QEMU)."""
        self._read()
        self.count, self.last = 0, "-"

    def _read(self) -> None:
        with self.log.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        lines = (self.pending + data.decode(errors="replace")).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if "client connected" in line:  # what the previous QEMU left in flight is not counted
                self.count, self.last = 0, "-"
            elif match := re.search(r"<- id=\S+ (\w+) cmd", line):
                self.count += 1
                self.last = match[1]

    def wait_for(self, requests: int, vm: RunningVm, timeout: float = 180) -> bool:
        """Until the emulator has received ``requests`` requests; False if QEMU exited."""
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            if self.count >= requests:
                return True
            if vm.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    def last_request(self) -> str:
        self._read()
        return self.last
