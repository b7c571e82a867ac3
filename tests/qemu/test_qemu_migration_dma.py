"""Guest memory the device writes by DMA while QEMU migrates the VM arrives intact.

The guest (``memmap=1M$0x10000000`` reserves a buffer QEMU's RAM migration carries like any
other guest page) runs a DMA loop with testdev: generation ``g`` writes ``g`` into a source
page with the CPU, then has the device copy that page by DMA into slot ``g % 4`` of a
destination area that only the device ever writes. Before every copy it checks that each
slot holds the last generation copied into it, and prints ``T-BAD`` otherwise.

QEMU sees the CPU's writes itself, but the device's writes only through the device's dirty
log (DMA_LOGGING_REPORT): a destination page written by DMA after QEMU sent it must be sent
again. The migration's bandwidth is limited so that it lasts several seconds while the loop
runs. With our server the guest never sees a stale slot on the destination; with a server
whose dirty log reports nothing (``serve_ignoring_dirty_log``, broken on purpose) it does:
the test can fail.
"""

from __future__ import annotations

import re
import sys
import time

import pytest

from emulator.testing.testdev_vm import TESTDEV_SHELL

from .conftest import Pair, Vm, free_port, report, wait_migration

pytestmark = pytest.mark.qemu

APPEND = "memmap=1M$0x10000000"
BROKEN_SERVER = [sys.executable, "-m", "tests.qemu.serve_ignoring_dirty_log"]

GUEST_SCRIPT = (
    TESTDEV_SHELL
    + r"""
grep -q '^10000000-100fffff : Reserved' /proc/iomem || { echo "T-FAIL: no DMA buffer"; exit 1; }
wrc 4 2 $(( $(rdc 4 2) | 0x6 ))   # memory decoding and bus mastering on
SRC=0x10000000; DST=0x10080000; SLOTS=4
dd if=/dev/zero of=/dev/mem bs=4096 seek=$((SRC / 4096)) count=$((2 * 128)) conv=notrunc 2>/dev/null
# want N K: the last generation <= N copied into slot K (0: none yet)
want() { w=$(( $1 - (($1 - $2) % SLOTS + SLOTS) % SLOTS )); [ $w -gt 0 ] && echo $w || echo 0; }
echo "T-READY"
g=1
while [ $g -lt 100000 ]; do
    k=0
    while [ $k -lt $SLOTS ]; do
        have=$(rdm $((DST + k * 4096)))
        expect=$(want $((g - 1)) $k)
        [ $have -eq $expect ] || echo "T-BAD gen $g slot $k has $have, want $expect"
        k=$((k + 1))
    done
    slot=$((g % SLOTS))
    wrm $((SRC + slot * 4096)) $g
    wrm $((bar0 + 0x40)) $((SRC + slot * 4096)); wrm $((bar0 + 0x44)) 0
    wrm $((bar0 + 0x48)) $((DST + slot * 4096)); wrm $((bar0 + 0x4c)) 0
    wrm $((bar0 + 0x50)) 4096
    wrm $((bar0 + 0x54)) 1
    n=0
    while [ $(rdm $((bar0 + 0x58))) -eq 1 ] && [ $n -lt 500 ]; do n=$((n + 1)); usleep 10000; done
    [ $(rdm $((bar0 + 0x58))) -eq 2 ] || echo "T-BAD gen $g: DMA status $(rdm $((bar0 + 0x58)))"
    echo "T-GEN $g"
    g=$((g + 1))
done
"""
)

GEN = re.compile(r"^T-GEN (\d+)$", re.M)


def generations(vm: Vm) -> list[int]:
    return [int(number) for number in GEN.findall(vm.process.console())]


def wait_generations(vm: Vm, count: int, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(seen := generations(vm)) < count:
        assert vm.process.process.poll() is None, f"QEMU exited:\n{vm.process.console()}"
        assert time.monotonic() < deadline, f"guest stuck:\n{vm.process.console()}"
        time.sleep(0.2)
    return seen


def migrate_dma_loop(pair: Pair, mode: str, program: list[str] | None) -> tuple[str, str]:
    """Migrate the guest running the DMA loop; the source's and the destination's consoles
    once the destination ran several more generations."""
    device = "testdev,mig-caps=stop_copy" if mode == "stop-copy" else "testdev"
    source = pair.start("source", device, GUEST_SCRIPT, append=APPEND, program=program)
    assert source.process.wait_for(r"^T-READY", timeout=240), source.process.console()
    wait_generations(source, 5)
    port = free_port()
    destination = pair.start(
        "destination",
        device,
        GUEST_SCRIPT,
        append=APPEND,
        program=program,
        incoming=f"tcp:127.0.0.1:{port}",
    )
    # Slow enough that the loop copies several generations while guest RAM is in flight.
    source.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = wait_migration(source.qmp)
    assert info["status"] == "completed", info
    during = generations(source)
    resumed = wait_generations(destination, 5)
    report(
        f"DMA loop under QEMU migration ({mode}, {'broken' if program else 'our'} server): "
        f"{info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
        f"source reached generation {during[-1]}, destination went on to {resumed[-1]}"
    )
    assert resumed[0] >= during[-1] - 1, (during[-1], resumed)
    return source.process.console(), destination.process.console()


@pytest.mark.parametrize("mode", ["stop-copy", "pre-copy"])
def test_dma_written_guest_memory_survives_migration(pair: Pair, mode: str) -> None:
    source_console, destination_console = migrate_dma_loop(pair, mode, program=None)
    assert "T-BAD" not in source_console, source_console
    bad = [line for line in destination_console.splitlines() if "T-BAD" in line]
    assert not bad, "\n".join(bad)


def test_the_dma_check_fails_when_the_dirty_log_is_ignored(pair: Pair) -> None:
    """The same run with a server that reports no dirty page: the destination guest finds
    slots the device wrote during the migration with their old contents."""
    _, destination_console = migrate_dma_loop(pair, "pre-copy", program=BROKEN_SERVER)
    bad = [line for line in destination_console.splitlines() if "T-BAD" in line]
    report(f"ignored dirty log: {len(bad)} stale slot(s) seen, first: {bad[:1]}")
    assert bad, "a migration that loses DMA writes went unnoticed"
