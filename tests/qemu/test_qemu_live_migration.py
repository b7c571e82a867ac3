"""QEMU live-migrates a running guest whose testdev our emulator serves.

Two QEMU + emulator pairs on this machine: the source VM boots, its guest writes testdev's
SCRATCH0 register and the first word of its RAM BAR (as a driver would, through the BARs),
then keeps printing what it reads back, with a counter, every 0.1 s. QMP ``migrate`` over
``tcp:127.0.0.1`` moves the VM to a destination QEMU (``-incoming``) attached to a second,
fresh emulator. The guest never stops printing: on the destination console it goes on
counting and reads the values it wrote, now served by the destination emulator, and QEMU's
own view of the device (BAR address, memory decoding) came along.

Stop-copy (``mig-caps=stop_copy``) and pre-copy (the default caps), each with the data over
a passed fd (the emulator's ``data_fd`` extension, which QEMU's client asks for) and in band
(``--no-data-fd``: MIG_DATA_READ / MIG_DATA_WRITE).

QEMU is driven with ``qemu.qmp`` (the QEMU project's QMP library, its synchronous ``legacy``
interface). The QEMU must carry the project's vfio-user migration patches
(``scripts/qemu/patches``); a stock QEMU is the subject of test_qemu_migration.py.
"""

from __future__ import annotations

import re
import time

import pytest
from qemu.qmp import ExecuteError

from emulator.testing.testdev_vm import TESTDEV_SHELL

from .conftest import (
    MIG_STATE_RUNNING,
    Pair,
    Vm,
    free_port,
    last_device_state,
    report,
    wait_migration,
)

pytestmark = pytest.mark.qemu

SCRATCH_VALUE = 0x5EEDF00D
RAM_VALUE = 0xC0FFEE42

# Prints "T-TICK n scratch=.. ram=.. bar0_register=.. command=.." every 0.1 s, for as long
# as the test lets it (the test quits QEMU).
GUEST_SCRIPT = (
    TESTDEV_SHELL
    + r"""
wrm $((bar0 + 0x10)) @SCRATCH@
wrm $bar2 @RAM@
echo "T-READY"
i=0
while [ $i -lt 100000 ]; do
    echo "T-TICK $i scratch=$(hex $(rdm $((bar0 + 0x10)))) ram=$(hex $(rdm $bar2))" \
        "bar0_register=$(hex $(rdc 0x10 4)) command=$(hex $(rdc 4 2))"
    usleep 100000
    i=$((i + 1))
done
""".replace("@SCRATCH@", hex(SCRATCH_VALUE)).replace("@RAM@", hex(RAM_VALUE))
)

TICK = re.compile(r"^T-TICK (\d+) (.*)$", re.M)


def ticks(console: str) -> list[tuple[int, dict[str, int]]]:
    return [
        (int(number), {k: int(v, 16) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+)", rest)})
        for number, rest in TICK.findall(console)
    ]


def wait_ticks(vm: Vm, after: int, timeout: float = 60) -> list[tuple[int, dict[str, int]]]:
    """The guest's ticks once it printed more than ``after`` of them on this console."""
    deadline = time.monotonic() + timeout
    while True:
        seen = ticks(vm.process.console())
        if len(seen) > after:
            return seen
        assert vm.process.process.poll() is None, f"QEMU exited:\n{vm.process.console()}"
        assert time.monotonic() < deadline, f"no guest output:\n{vm.process.console()}"
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["fd", "inband"])
@pytest.mark.parametrize("mode", ["stop-copy", "pre-copy"])
def test_qemu_live_migrates_running_guest_with_testdev(
    pair: Pair, mode: str, transport: str
) -> None:
    device = "testdev,mig-caps=stop_copy" if mode == "stop-copy" else "testdev"
    server_args = ("--no-data-fd",) if transport == "inband" else ()
    source = pair.start("source", device, GUEST_SCRIPT, *server_args)
    assert source.process.wait_for(r"^T-READY", timeout=240), source.process.console()
    before = wait_ticks(source, after=3)[-1][1]
    assert before["scratch"] == SCRATCH_VALUE and before["ram"] == RAM_VALUE, before

    port = free_port()
    destination = pair.start(
        "destination", device, GUEST_SCRIPT, *server_args, incoming=f"tcp:127.0.0.1:{port}"
    )
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = wait_migration(source.qmp)
    assert info["status"] == "completed", info
    last_on_source = ticks(source.process.console())[-1][0]

    after = wait_ticks(destination, after=5)
    numbers = [number for number, _ in after]
    # the same guest, resumed: it goes on counting where it was
    assert numbers[0] > last_on_source - 2 and numbers == sorted(numbers), numbers
    for _, values in after:
        assert values == before, (values, before)

    src_trace, dst_trace = source.server.trace(), destination.server.trace()
    assert " DEVICE_FEATURE cmd" in src_trace and " DEVICE_FEATURE cmd" in dst_trace
    if transport == "inband":
        assert " MIG_DATA_READ cmd" in src_trace and " MIG_DATA_WRITE cmd" in dst_trace
    else:
        assert " MIG_DATA_READ cmd" not in src_trace and " MIG_DATA_WRITE cmd" not in dst_trace
    assert (" MIG_GET_PRECOPY_INFO cmd" in src_trace) == (mode == "pre-copy")
    report(
        f"QEMU live migration, {mode}, {transport}: total {info.get('total-time')} ms, "
        f"downtime {info.get('downtime')} ms; guest tick {last_on_source} was the source's "
        f"last, {numbers[0]} the destination's first"
    )


def test_qemu_refuses_to_migrate_a_device_that_cannot(pair: Pair) -> None:
    """A server whose device does not migrate: QEMU's migration blocker refuses ``migrate``
    with its reason, instead of leaving the device state behind."""
    source = pair.start("source", "testdev,mig-caps=none", GUEST_SCRIPT)
    assert source.process.wait_for(r"^T-READY", timeout=240), source.process.console()
    with pytest.raises(ExecuteError) as refused:
        source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{free_port()}")
    message = str(refused.value)
    report(f"QEMU refused migrate: {message}")
    assert "VFIO migration is not supported by the vfio-user server" in message, message
    # the VM goes on running
    assert source.qmp.cmd("query-status")["status"] == "running"  # type: ignore[index]


def migrate_to_new_pair(pair: Pair, source: Vm, device: str, name: str) -> dict[str, object]:
    """Migrate ``source`` to a fresh destination pair; the guest must go on there with its
    values."""
    port = free_port()
    destination = pair.start(name, device, GUEST_SCRIPT, incoming=f"tcp:127.0.0.1:{port}")
    source.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = wait_migration(source.qmp)
    assert info["status"] == "completed", info
    for _, values in wait_ticks(destination, after=3):
        assert values["scratch"] == SCRATCH_VALUE and values["ram"] == RAM_VALUE, values
    return info


def assert_source_runs_on(source: Vm) -> None:
    """The source guest goes on counting and reading its values from the device (a guest
    side check), QEMU says it runs, and the device was put back in RUNNING."""
    assert source.qmp.cmd("query-status")["status"] == "running"  # type: ignore[index]
    assert last_device_state(source.server) == MIG_STATE_RUNNING, source.server.trace()[-2000:]
    seen = len(ticks(source.process.console()))
    for _, values in wait_ticks(source, after=seen + 3)[seen:]:
        assert values["scratch"] == SCRATCH_VALUE and values["ram"] == RAM_VALUE, values


@pytest.mark.parametrize("mode", ["stop-copy", "pre-copy"])
def test_cancelled_migration_leaves_the_source_running(pair: Pair, mode: str) -> None:
    """``migrate_cancel`` while guest RAM is in flight: the source VM and its device run on
    (QEMU moves the device back to RUNNING), and a later migration succeeds."""
    device = "testdev,mig-caps=stop_copy" if mode == "stop-copy" else "testdev"
    source = pair.start("source", device, GUEST_SCRIPT)
    assert source.process.wait_for(r"^T-READY", timeout=240), source.process.console()
    wait_ticks(source, after=2)
    port = free_port()
    pair.start("doomed", device, GUEST_SCRIPT, incoming=f"tcp:127.0.0.1:{port}")
    source.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    time.sleep(1.5)
    assert source.qmp.cmd("query-migrate")["status"] == "active"  # type: ignore[index]
    source.qmp.cmd("migrate_cancel")
    info = wait_migration(source.qmp)
    assert info["status"] == "cancelled", info
    assert_source_runs_on(source)
    info = migrate_to_new_pair(pair, source, device, "destination")
    report(f"after migrate_cancel ({mode}) a new migration took {info.get('total-time')} ms")


def test_destination_emulator_killed_mid_migration(pair: Pair) -> None:
    """The destination's emulator dies while QEMU migrates: the migration fails, the source
    VM and its device run on, and a migration to a new pair then succeeds."""
    source = pair.start("source", "testdev", GUEST_SCRIPT)
    assert source.process.wait_for(r"^T-READY", timeout=240), source.process.console()
    wait_ticks(source, after=2)
    port = free_port()
    doomed = pair.start("doomed", "testdev", GUEST_SCRIPT, incoming=f"tcp:127.0.0.1:{port}")
    source.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    time.sleep(1.5)
    doomed.server.process.kill()
    info = wait_migration(source.qmp)
    assert info["status"] == "failed", info
    report(f"destination emulator killed: migration failed ({info.get('error-desc')})")
    assert_source_runs_on(source)
    migrate_to_new_pair(pair, source, "testdev", "destination")


# Every testdev gets SCRATCH0 = BASE + its index; ticks print them all, in sysfs order.
TWO_DEVICE_SCRIPT = r"""
hex() { printf 0x%x $(($1)); }
rdm() { echo $(( $(devmem $(hex $1) 32) )); }
wrm() { devmem $(hex $1) 32 $(hex $2); }
bars=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1b36 ] && [ "$(cat $d/device)" = 0x0f00 ] &&
        bars="$bars $(sed -n 1p $d/resource | cut -d' ' -f1)"
done
n=0
for b in $bars; do wrm $((b + 0x10)) $((0x5eed0000 + n)); n=$((n + 1)); done
echo "T-READY $n"
i=0
while [ $i -lt 100000 ]; do
    line="T-TICK $i"; n=0
    for b in $bars; do line="$line dev$n=$(hex $(rdm $((b + 0x10))))"; n=$((n + 1)); done
    echo "$line"
    usleep 100000
    i=$((i + 1))
done
"""
P2P_DEVICE = "testdev,mig-caps=stop_copy+p2p+pre_copy"


def test_two_devices_with_p2p_migrate_together(pair: Pair) -> None:
    """QEMU migrates a VM with more than one VFIO device only if all of them advertise P2P,
    and then stops them through RUNNING_P2P / PRE_COPY_P2P first: both devices' state
    arrives."""
    source = pair.start("source", P2P_DEVICE, TWO_DEVICE_SCRIPT, more_devices=(P2P_DEVICE,))
    assert source.process.wait_for(r"^T-READY 2", timeout=240), source.process.console()
    before = wait_ticks(source, after=2)[-1][1]
    assert before == {"dev0": 0x5EED0000, "dev1": 0x5EED0001}, before
    port = free_port()
    destination = pair.start(
        "destination",
        P2P_DEVICE,
        TWO_DEVICE_SCRIPT,
        incoming=f"tcp:127.0.0.1:{port}",
        more_devices=(P2P_DEVICE,),
    )
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = wait_migration(source.qmp)
    assert info["status"] == "completed", info
    for _, values in wait_ticks(destination, after=3):
        assert values == before, values
    for server in (source.server, destination.server):
        # the P2P states were used for real (MIG_DEVICE_STATE SET to 5 or 7)
        assert re.search(r"DEVICE_FEATURE cmd .*flags=0x20002 data=0[57]000000", server.trace())
    report(f"two P2P devices migrated: downtime {info.get('downtime')} ms")


def test_two_devices_without_p2p_are_blocked(pair: Pair) -> None:
    source = pair.start("source", "testdev", TWO_DEVICE_SCRIPT, more_devices=("testdev",))
    assert source.process.wait_for(r"^T-READY 2", timeout=240), source.process.console()
    with pytest.raises(ExecuteError) as refused:
        source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{free_port()}")
    assert "all of them support P2P migration" in str(refused.value), str(refused.value)
