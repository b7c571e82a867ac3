"""What a stock QEMU 10.x's own VM migration does with a vfio-user device, and what ours
does instead.

A stock QEMU 10.2 (without the patches in scripts/qemu/patches, which make QEMU migrate the
device: test_qemu_live_migration.py) has no vfio-user migration support and registers no
migration blocker (reference facts, qemu.md): a VM migration "succeeds" and the device state
stays behind. This test shows it with a real guest, then moves the same state with our
driver. It needs a stock build (``scripts/qemu/build-qemu --stock`` or ``$QEMU_STOCK``) and
is skipped without one.

1. Emulator S serves ``testdev``; QEMU boots a guest attached to it. The guest writes a
   register (SCRATCH0) and the device's RAM BAR (both through devmem, as a driver would),
   then keeps reading them back and prints the values when they change.
2. QMP ``migrate`` to a file: it completes. Our server S saw no migration message at all
   (no DEVICE_FEATURE, no MIG_DATA_*): QEMU never asked the device for its state.
3. A destination QEMU (``-incoming file:...``) attached to a fresh emulator D resumes the
   guest. The guest now reads other values: the device it talks to is D in reset state
   (QEMU even leaves the BAR registers unassigned), the state written in step 1 is gone.
4. Our driver instead: QEMU 1 has quit (S kept the device state the guest left there), and
   ``vfio-user-emu migrate --from S --to D2`` moves it to a fresh emulator D2 through the
   vfio-user migration protocol; reading D2 shows the guest's values.

Why the two cannot be combined into a working VM migration with QEMU 10.2 (what the test
observes): the destination QEMU sends DEVICE_RESET to its server at start-up, before the
guest resumes, so state put there beforehand is wiped; it keeps its connection for the VM's
life and a device serves one client at a time, so nothing can load the state afterwards;
and QEMU restores none of its own emulated config space for the device (BARs 0, memory
decoding off), so the resumed guest cannot reach the device at all.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest
import trio

from devices import testdev as td
from emulator.client import Client
from emulator.testing.qmp import connect_qmp
from emulator.testing.testdev_vm import TESTDEV_SHELL

from .conftest import (
    RunningVm,
    ServerPool,
    emulator_command,
    quit_qemu,
    report,
    vm_command,
    wait_migration,
)

pytestmark = pytest.mark.qemu

SCRATCH_VALUE = 0xDEADBEEF
RAM_VALUE = 0xCAFEF00D

GUEST_SCRIPT = (
    TESTDEV_SHELL
    + r"""
# what the device shows: two registers it keeps, and QEMU's view of config space
state() {
    echo "scratch=$(hex $(rdm $((bar0 + 0x10)))) ram=$(hex $(rdm $bar2))" \
        "id=$(hex $(rdm $bar0)) bar0_register=$(hex $(rdc 0x10 4)) command=$(hex $(rdc 4 2))"
}
wrm $((bar0 + 0x10)) @SCRATCH@
wrm $bar2 @RAM@
before=$(state)
echo "T-BEFORE: $before"
echo "T-READY"
# Poll until what the device shows changes (it will, once the destination runs), at most
# ~60 s of guest time. The sample that saw the change may have started on the source, so
# the one reported is taken afterwards, wholly on the destination.
i=0
while [ $i -lt 600 ]; do
    now=$(state)
    if [ "$now" != "$before" ]; then echo "T-CHANGED: $now"; echo "T-AFTER: $(state)"; exit 0; fi
    usleep 100000
    i=$((i + 1))
done
echo "T-UNCHANGED: $before"
exit 0
""".replace("@SCRATCH@", hex(SCRATCH_VALUE)).replace("@RAM@", hex(RAM_VALUE))
)

MIGRATION_COMMANDS = ("DEVICE_FEATURE", "MIG_DATA_READ", "MIG_DATA_WRITE")


def _line(console: str, tag: str) -> dict[str, int]:
    match = re.search(rf"^T-{tag}: (.*)$", console, re.M)
    assert match, f"no T-{tag} line in the console:\n{console}"
    return {key: int(value, 16) for key, value in re.findall(r"(\w+)=(0x[0-9a-f]+)", match[1])}


async def _read_device(socket_path: Path) -> tuple[int, int]:
    async with Client.connect(socket_path) as client:
        scratch = await client.region_read(td.BAR_REGS, td.REG_SCRATCH, 4)
        ram = await client.region_read(td.BAR_RAM, 0, 4)
    return struct.unpack("<I", scratch)[0], struct.unpack("<I", ram)[0]


def test_stock_qemu_migration_leaves_device_state_behind_ours_moves_it(
    stock_qemu_binary: str, guest_dir: Path, tmp_path: Path
) -> None:
    qemu_binary = stock_qemu_binary
    pool = ServerPool(tmp_path)
    image = tmp_path / "vm.migration"
    source_vm = destination_vm = None
    try:
        source = pool.start("testdev", name="source")
        destination = pool.start("testdev", name="destination")

        # 1. the guest puts state into the device behind emulator S
        qmp_path = tmp_path / "qmp-source.sock"
        source_vm = RunningVm(
            vm_command(
                tmp_path,
                qemu_binary,
                [source.socket],
                GUEST_SCRIPT,
                name="source",
                qemu_args=("-qmp", f"unix:{qmp_path},server=on,wait=off"),
            )
        )
        assert source_vm.wait_for(r"^T-READY", timeout=180), source_vm.console()
        before = _line(source_vm.console(), "BEFORE")
        assert before["scratch"] == SCRATCH_VALUE and before["ram"] == RAM_VALUE, before

        # 2. QEMU's own migration, to a file: it completes
        qmp = connect_qmp(qmp_path)
        try:
            qmp.cmd("migrate", uri=f"file:{image}")
            info = wait_migration(qmp)
            assert info["status"] == "completed", info
            report(
                f"QEMU migrate to a file: completed in {info.get('total-time')} ms, "
                f"{image.stat().st_size >> 20} MiB image, no device state in it"
            )
            assert qmp.cmd("query-status")["status"] == "postmigrate"  # type: ignore[index]
        finally:
            quit_qemu(qmp)
        source_vm.wait(timeout=30)
        for command in MIGRATION_COMMANDS:
            assert f" {command} cmd" not in source.trace(), f"QEMU sent {command}"

        # 3. the destination QEMU resumes the guest against a fresh emulator D
        destination_vm = RunningVm(
            vm_command(
                tmp_path,
                qemu_binary,
                [destination.socket],
                GUEST_SCRIPT,
                name="destination",
                qemu_args=("-incoming", f"file:{image}"),
            )
        )
        returncode = destination_vm.wait(timeout=240)
        console = destination_vm.console()
        assert returncode == 0, console
        assert "T-BEFORE" not in console, "the destination booted instead of resuming"
        after = _line(console, "AFTER")
        report(f"\nguest before QEMU's migration: {before}\nguest after it: {after}")
        assert after["scratch"] != SCRATCH_VALUE and after["ram"] != RAM_VALUE, after
        # Not even QEMU's own view of the device came along: the BAR register and the
        # command register (memory decoding) are back to 0, so the guest's driver could not
        # reach the device at its old address even if the device state had been restored.
        assert after["bar0_register"] & ~0xF == 0 and after["command"] & 0x2 == 0, after
        trace = destination.trace()
        for command in MIGRATION_COMMANDS:
            assert f" {command} cmd" not in trace, f"QEMU sent {command}"
        # The destination QEMU resets the device before the guest resumes: state put into
        # D beforehand (by any means) would have been wiped here.
        assert " DEVICE_RESET cmd" in trace

        # 4. our driver moves the state S still holds to a fresh emulator D2
        assert trio.run(_read_device, source.socket) == (SCRATCH_VALUE, RAM_VALUE)
        moved_to = pool.start("testdev", name="d2")
        result = subprocess.run(
            [
                *emulator_command(),
                "migrate",
                "--from",
                str(source.socket),
                "--to",
                str(moved_to.socket),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        report(f"vfio-user-emu migrate: {result.stdout.strip()}")
        assert trio.run(_read_device, moved_to.socket) == (SCRATCH_VALUE, RAM_VALUE)
        assert " DEVICE_FEATURE cmd" in source.trace()
        assert " MIG_DATA_READ cmd" in source.trace()
    finally:
        for vm in (source_vm, destination_vm):
            if vm is not None:
                vm.kill()
        pool.stop_all()
        image.unlink(missing_ok=True)  # guest RAM: ~90 MiB
