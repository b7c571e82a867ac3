"""An unmodified QEMU (>= 10.1.1, vfio-user-pci) and an unmodified Linux guest (Debian 12's
6.1 kernel, busybox userland) drive our ``testdev`` server.

One VM boot per module (a bare TCG boot to poweroff takes about 6 s, this script about 18 s).
The guest script below prints one line per check, ``T-OK: name ...`` or
``T-FAIL: name ...``, and the tests assert on those lines and on our server's ``--trace``.
Failing tests show the guest console and the end of the trace.

What the guest does, without any driver of its own:

* sysfs: finds 1b36:0f00 and checks class, subsystem ids, the resource (BAR) layout.
* BAR0 with busybox ``devmem`` (the BAR address from ``resource``): ID, VERSION, SCRATCH
  write/read. BAR2 (RAM, mmapped by QEMU from our memfd): write/read at both ends.
* DMA in guest memory: the kernel command line ``memmap=1M$0x10000000`` makes 1 MiB at
  256 MiB "Reserved" in the e820 map. The kernel never allocates it, and Debian's
  ``CONFIG_STRICT_DEVMEM``/``IO_STRICT_DEVMEM`` still let root reach it through /dev/mem
  (ordinary RAM it would refuse). Without an IOMMU guest-physical = IOVA, so the device
  copies inside it: a 64-byte copy set up and checked word by word with devmem, then a
  64 KiB copy of random bytes written and compared through /dev/mem (dd + md5sum).
  Bus mastering is set in the command register through sysfs ``config`` (no setpci).
* INTx: ``uio_pci_generic`` (a stock module) is bound with ``new_id``. Its handler checks
  the Status register's interrupt bit and masks with Command.INTX_DISABLE, so a counted
  interrupt in /proc/interrupts and an event from /dev/uio0 prove the whole path: DOORBELL
  -> our INTx eventfd -> QEMU asserts the line -> the guest's IOAPIC -> the handler reads
  our config space. Done twice, to prove re-arming (IRQ_STATUS ack, QEMU's UNMASK on the
  next BAR access, INTX_DISABLE cleared through sysfs as uio users do), then once with
  INTX_DISABLE set first: held off, and delivered as soon as the guest clears it.
* MSI and MSI-X without a driver: the guest programs the capability (and, for MSI-X, the
  table entry in BAR4, which QEMU emulates) with the local APIC address and an IDT vector no
  driver uses, enables it through sysfs, and rings the DOORBELL. The kernel then logs
  ``common_interrupt: 0.<vector> No irq handler for vector`` - proof that the message
  reached the guest CPU. QEMU only forwards PBA reads to us; the guest prints the PBA too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import Server, ServerPool, VmRun, report, run_vm

pytestmark = pytest.mark.qemu

# 1 MiB of guest RAM the kernel leaves alone (e820 "Reserved"); see the module docstring.
KERNEL_APPEND = "memmap=1M$0x10000000"

GUEST_SCRIPT = r"""
fail=0
ok() { echo "T-OK: $*"; }
bad() { echo "T-FAIL: $*"; fail=1; }
# check NAME EXPECTED ACTUAL (numbers, any base the shell understands)
check() {
    if [ -n "$3" ] && [ $(($2)) -eq $(($3)) ]; then ok "$1 = $(printf 0x%x $(($3)))"
    elif [ -n "$3" ]; then bad "$1: expected $(printf 0x%x $(($2))), got $(printf 0x%x $(($3)))"
    else bad "$1: expected $(printf 0x%x $(($2))), got nothing"; fi
}
hex() { printf 0x%x $(($1)); }
rdm() { echo $(( $(devmem $(hex $1) 32) )); }
wrm() { devmem $(hex $1) 32 $(hex $2); }
# config space through sysfs: rdc OFFSET WIDTH, wrc OFFSET WIDTH VALUE (aligned accesses)
rdc() { dd if=$cfg bs=$2 skip=$(($1 / $2)) count=1 2>/dev/null | od -An -tu$2 | tr -d ' '; }
wrc() {
    s= i=0
    while [ $i -lt $2 ]; do s="$s\\$(printf %o $(( ($3 >> (8 * i)) & 0xff )))"; i=$((i + 1)); done
    printf "$s" | dd of=$cfg bs=$2 seek=$(($1 / $2)) count=1 conv=notrunc 2>/dev/null
}
find_cap() {
    p=$(( $(rdc 0x34 1) & 0xfc ))
    while [ $p -ne 0 ]; do
        [ $(rdc $p 1) -eq $(($1)) ] && { echo $p; return; }
        p=$(( $(rdc $((p + 1)) 1) & 0xfc ))
    done
    echo 0
}
bar() { sed -n "$(($1 + 1))p" $dev/resource | cut -d' ' -f1; }
# barsize N, barflags N: from the resource line "start end flags"
barsize() { set -- $(sed -n "$(($1 + 1))p" $dev/resource); echo $(( $2 - $1 + 1 )); }
barflags() { set -- $(sed -n "$(($1 + 1))p" $dev/resource); echo $(( $3 )); }
nohandler() { dmesg | grep -c "No irq handler for vector" ; }
vector_seen() { dmesg | grep -c " 0\.$1 No irq handler for vector"; }
# await_vector VECTOR COUNT: until the kernel logged VECTOR COUNT times (at most ~15 s)
await_vector() {
    n=0
    while [ $(vector_seen $1) -lt $2 ] && [ $n -lt 150 ]; do n=$((n + 1)); sleep 0.1; done
    vector_seen $1
}

dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1b36 ] && [ "$(cat $d/device)" = 0x0f00 ] && dev=$d
done
if [ -z "$dev" ]; then bad "enumerated: no 1b36:0f00 device in sysfs"; exit 1; fi
cfg=$dev/config
ok "enumerated ${dev##*/}"
check class 0xff0000 $(cat $dev/class)
check subsystem_vendor 0x1b36 $(cat $dev/subsystem_vendor)
check subsystem_device 0x0001 $(cat $dev/subsystem_device)
check revision 1 $(cat $dev/revision)
check interrupt_pin 1 $(rdc 0x3d 1)
echo "T-INFO: resource:"; cat $dev/resource | head -7
echo "T-INFO: config[0:64]:"; od -An -tx1 -N 64 $cfg

bar0=$(bar 0); bar2=$(bar 2); bar4=$(bar 4)
check bar0.size 0x1000 $(barsize 0)
check bar2.size 0x10000 $(barsize 2)
check bar4.size 0x1000 $(barsize 4)
check bar2.prefetchable_64bit 0xc $(( $(barflags 2) & 0xf ))
check bar0.mem32 0 $(( $(barflags 0) & 0xf ))
echo "T-INFO: bar0=$bar0 bar2=$bar2 bar4=$bar4 cmd=$(hex $(rdc 4 2))"
if [ $((bar0)) -eq 0 ]; then bad "bar0: not assigned"; exit 1; fi

# --- BAR0 registers ----------------------------------------------------------------------------
check bar0.id 0x54534554 $(rdm $((bar0 + 0x00)))
check bar0.version 1 $(rdm $((bar0 + 0x04)))
wrm $((bar0 + 0x10)) 0xdeadbeef
wrm $((bar0 + 0x2c)) 0x12345678
check bar0.scratch0 0xdeadbeef $(rdm $((bar0 + 0x10)))
check bar0.scratch7 0x12345678 $(rdm $((bar0 + 0x2c)))
wrm $((bar0 + 0x04)) 7
check bar0.version_readonly 1 $(rdm $((bar0 + 0x04)))
# IOEVENT: QEMU 10.2 asks for no ioeventfds, so this is an ordinary (message) register write.
wrm $((bar0 + 0x80)) 1
check bar0.ioevent_count 1 $(rdm $((bar0 + 0x84)))
wrm $((bar0 + 0x34)) 1  # acknowledge the vector 0 it raised
check bar0.irq_status_acked 0 $(rdm $((bar0 + 0x34)))

# --- BAR2 RAM (QEMU maps our memfd into the guest) ---------------------------------------------
wrm $((bar2 + 0)) 0xcafef00d
wrm $((bar2 + 0xfffc)) 0x0badc0de
check bar2.ram_first 0xcafef00d $(rdm $((bar2 + 0)))
check bar2.ram_last 0x0badc0de $(rdm $((bar2 + 0xfffc)))

# --- DMA ---------------------------------------------------------------------------------------
if grep -q '^10000000-100fffff : Reserved' /proc/iomem; then ok "dma.buffer_reserved"
else bad "dma.buffer_reserved: memmap=1M\$0x10000000 did not reserve 0x10000000"; fi
SRC=0x10000000; DST=0x10010000; BIG=0x10020000
dma() {  # dma SRC DST LEN -> final DMA_STATUS
    wrm $((bar0 + 0x40)) $1; wrm $((bar0 + 0x44)) 0
    wrm $((bar0 + 0x48)) $2; wrm $((bar0 + 0x4c)) 0
    wrm $((bar0 + 0x50)) $3
    wrm $((bar0 + 0x54)) 1
    n=0
    while [ $(rdm $((bar0 + 0x58))) -eq 1 ] && [ $n -lt 1500 ]; do n=$((n + 1)); usleep 10000; done
    rdm $((bar0 + 0x58))
}
i=0
while [ $i -lt 16 ]; do
    wrm $((SRC + 4 * i)) $((0xc0de0000 + i * 0x1111)); wrm $((DST + 4 * i)) 0; i=$((i + 1))
done
wrm $((DST + 64)) 0x5a5a5a5a
cmd=$(rdc 4 2)
echo "T-INFO: command register before DMA: $(hex $cmd) (bus master $(( (cmd >> 2) & 1 )))"
if [ $(( cmd & 4 )) -eq 0 ]; then
    # A function must not issue memory requests (DMA) while Command.MASTER is 0.
    st=$(dma $SRC $DST 64)
    first=$(rdm $DST)
    echo "T-INFO: dma with bus mastering off: DMA_STATUS=$st" \
        "DMA_DONE=$(rdm $((bar0 + 0x5c))) dst[0]=$(hex $first)"
    check dma.no_copy_without_bus_master 0 $first
    wrm $DST 0
fi
wrc 4 2 $(( cmd | 0x6 ))
check command.bus_master 0x4 $(( $(rdc 4 2) & 0x4 ))
done0=$(rdm $((bar0 + 0x5c)))
check dma.small.status 2 $(dma $SRC $DST 64)
check dma.small.done_count $((done0 + 1)) $(rdm $((bar0 + 0x5c)))
i=0; mism=0
while [ $i -lt 16 ]; do
    [ $(rdm $((DST + 4 * i))) -eq $((0xc0de0000 + i * 0x1111)) ] || mism=$((mism + 1)); i=$((i + 1))
done
check dma.small.mismatched_words 0 $mism
check dma.small.guard_untouched 0x5a5a5a5a $(rdm $((DST + 64)))

dd if=/dev/urandom of=/tmp/pattern bs=4096 count=16 2>/dev/null
dd if=/tmp/pattern of=/dev/mem bs=4096 seek=$((SRC / 4096)) count=16 conv=notrunc 2>/dev/null
dd if=/dev/zero of=/dev/mem bs=4096 seek=$((BIG / 4096)) count=16 conv=notrunc 2>/dev/null
want=$(md5sum < /tmp/pattern | cut -d' ' -f1)
have=$(dd if=/dev/mem bs=4096 skip=$((SRC / 4096)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)
if [ "$want" = "$have" ]; then ok "dma.big.source_written_via_devmem"
else bad "dma.big.source_written_via_devmem: /dev/mem gave $have, wrote $want"; fi
check dma.big.status 2 $(dma $SRC $BIG 0x10000)
got=$(dd if=/dev/mem bs=4096 skip=$((BIG / 4096)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)
if [ "$want" = "$got" ]; then ok "dma.big.copied_64k md5 $got"
else bad "dma.big.copied_64k: destination md5 $got, source $want"; fi

# --- INTx through uio_pci_generic --------------------------------------------------------------
echo "1b36 0f00" > /sys/bus/pci/drivers/uio_pci_generic/new_id
drv=$(basename "$(readlink $dev/driver)")
if [ "$drv" = uio_pci_generic ]; then ok "intx.bound uio_pci_generic"
else bad "intx.bound: driver is '$drv'"; dmesg | tail -5; fi
irq=$(cat $dev/irq)
irqcount() { awk -v n="$irq:" '$1 == n { print $2 }' /proc/interrupts; }
echo "T-INFO: irq $irq; /proc/interrupts: $(grep "^ *$irq:" /proc/interrupts)"
count0=$(rdm $((bar0 + 0x38)))
for round in 1 2; do
    before=$(irqcount)
    (timeout 10 dd if=/dev/uio0 bs=4 count=1 2>/dev/null | od -An -tu4 | tr -d ' ' > /tmp/uio) &
    reader=$!
    sleep 0.5  # let dd open /dev/uio0 first (it counts events from its open)
    wrm $((bar0 + 0x30)) 0  # DOORBELL: vector 0 (INTx)
    wait $reader
    after=$(irqcount)
    check intx.round$round.proc_interrupts $((before + 1)) "$after"
    check intx.round$round.uio_event_count $round "$(cat /tmp/uio)"
    check intx.round$round.status_intx_bit 0x8 $(( $(rdc 6 2) & 0x8 ))
    check intx.round$round.command_intx_disable 0x400 $(( $(rdc 4 2) & 0x400 ))
    check intx.round$round.irq_count $((count0 + round)) $(rdm $((bar0 + 0x38)))
    check intx.round$round.irq_status 1 $(rdm $((bar0 + 0x34)))
    wrm $((bar0 + 0x34)) 1  # acknowledge (RW1C): the line drops
    check intx.round$round.irq_status_acked 0 $(rdm $((bar0 + 0x34)))
    check intx.round$round.status_intx_bit_clear 0 $(( $(rdc 6 2) & 0x8 ))
    wrc 4 2 $(( $(rdc 4 2) & ~0x400 ))  # how a uio_pci_generic user re-enables INTx
    check intx.round$round.command_intx_enabled 0 $(( $(rdc 4 2) & 0x400 ))
done
sleep 0.5
check intx.no_spurious $((before + 1)) "$(irqcount)"
# Raised while Command.INTX_DISABLE is set: held off, then delivered once it is cleared.
before=$(irqcount)
wrc 4 2 $(( $(rdc 4 2) | 0x400 ))
(timeout 10 dd if=/dev/uio0 bs=4 count=1 2>/dev/null | od -An -tu4 | tr -d ' ' > /tmp/uio) &
reader=$!
sleep 0.5
wrm $((bar0 + 0x30)) 0
sleep 0.5
check intx.disabled.held_off $before "$(irqcount)"
check intx.disabled.status_intx_bit 0x8 $(( $(rdc 6 2) & 0x8 ))
wrc 4 2 $(( $(rdc 4 2) & ~0x400 ))
wait $reader
check intx.disabled.delivered_when_enabled $((before + 1)) "$(irqcount)"
check intx.disabled.uio_event_count 3 "$(cat /tmp/uio)"
wrm $((bar0 + 0x34)) 1
wrc 4 2 $(( $(rdc 4 2) & ~0x400 ))
echo -n ${dev##*/} > /sys/bus/pci/drivers/uio_pci_generic/unbind
wrc 4 2 $(( $(rdc 4 2) | 0x6 ))  # unbinding disabled bus mastering

# --- MSI: capability programmed by hand, vector 0xd1 (209) -------------------------------------
msi=$(find_cap 0x05)
if [ $msi -eq 0 ]; then bad "msi.capability: none"; else
    ctrl=$(rdc $((msi + 2)) 2)
    echo "T-INFO: MSI cap at $(hex $msi), control $(hex $ctrl)"
    wrc $((msi + 4)) 4 0xfee00000
    if [ $(( ctrl & 0x80 )) -ne 0 ]; then
        wrc $((msi + 8)) 4 0; data=$((msi + 12)); mask=$((msi + 16))
    else
        data=$((msi + 8)); mask=$((msi + 12))
    fi
    wrc $data 2 0xd1
    [ $(( ctrl & 0x100 )) -ne 0 ] && wrc $mask 4 0
    wrc $((msi + 2)) 2 $(( (ctrl & ~0x70) | 1 ))
    check msi.enabled 1 $(( $(rdc $((msi + 2)) 2) & 1 ))
    n0=$(vector_seen 209); c0=$(rdm $((bar0 + 0x38)))
    wrm $((bar0 + 0x30)) 0  # DOORBELL vector 0
    check msi.delivered_to_vector_209 $((n0 + 1)) $(await_vector 209 $((n0 + 1)))
    check msi.irq_count $((c0 + 1)) $(rdm $((bar0 + 0x38)))
    wrm $((bar0 + 0x34)) 1
    wrc $((msi + 2)) 2 $(( ctrl & ~0x71 ))
fi

# --- MSI-X: table entry 1 in BAR4 programmed by hand, vector 0xd2 (210) ------------------------
msix=$(find_cap 0x11)
if [ $msix -eq 0 ]; then bad "msix.capability: none"; else
    ctrl=$(rdc $((msix + 2)) 2)
    table=$(rdc $((msix + 4)) 4); pba=$(rdc $((msix + 8)) 4)
    tbase=$(( $(bar $((table & 7))) + (table & ~7) ))
    pbase=$(( $(bar $((pba & 7))) + (pba & ~7) ))
    echo "T-INFO: MSI-X cap at $(hex $msix), control $(hex $ctrl)," \
        "table $(hex $tbase), PBA $(hex $pbase)"
    check msix.table_size 4 $(( (ctrl & 0x7ff) + 1 ))
    wrc $((msix + 2)) 2 $(( ctrl | 0xc000 ))  # enable, function masked
    e=$((tbase + 16))
    wrm $e 0xfee00000; wrm $((e + 4)) 0; wrm $((e + 8)) 0xd2; wrm $((e + 12)) 0
    check msix.entry1.data 0xd2 $(rdm $((e + 8)))
    wrc $((msix + 2)) 2 $(( (ctrl | 0x8000) & ~0x4000 ))  # unmask the function
    check msix.enabled 0x8000 $(( $(rdc $((msix + 2)) 2) & 0xc000 ))
    n0=$(vector_seen 210); c0=$(rdm $((bar0 + 0x38)))
    wrm $((bar0 + 0x30)) 1  # DOORBELL vector 1
    seen=$(await_vector 210 $((n0 + 1)))
    check msix.irq_count $((c0 + 1)) $(rdm $((bar0 + 0x38)))
    echo "T-INFO: MSI-X PBA (read from the server) after the doorbell: $(hex $(rdm $pbase))"
    check msix.delivered_to_vector_210 $((n0 + 1)) $seen
    wrm $((bar0 + 0x34)) 2
    wrc $((msix + 2)) 2 $(( ctrl & ~0xc000 ))
fi
echo "T-INFO: 'No irq handler' lines: $(nohandler)"
dmesg | grep -i -E "no irq handler|nobody cared|uio|vfio|1b36|00:01.0" | tail -20
exit $fail
"""

CHECKS = re.compile(r"^T-(OK|FAIL): ([\w.]+)(.*)$", re.M)


@dataclass
class GuestResult:
    run: VmRun
    server: Server
    checks: dict[str, tuple[bool, str]]

    def report(self) -> str:
        trace = self.server.trace().splitlines()
        return (
            f"run-vm exit {self.run.returncode}, {self.run.wall_s:.1f} s\n"
            f"--- run-vm / QEMU output ---\n{self.run.output}\n"
            f"--- guest console ---\n{self.run.console}\n"
            f"--- server trace (last 120 of {len(trace)} lines) ---\n" + "\n".join(trace[-120:])
        )

    def expect(self, *names: str) -> None:
        failed = []
        for name in names:
            status = self.checks.get(name)
            if status is None:
                failed.append(f"{name}: not reported by the guest")
            elif not status[0]:
                failed.append(f"{name}:{status[1]}")
        assert not failed, "guest checks failed: " + "; ".join(failed) + "\n" + self.report()


@pytest.fixture(scope="module")
def guest(
    qemu_binary: str, guest_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GuestResult]:
    """One boot for the whole module: our testdev server, the VM, the parsed checks."""
    workdir = tmp_path_factory.mktemp("testdev-guest")
    pool = ServerPool(workdir)
    try:
        server = pool.start("testdev")
        run = run_vm(
            qemu_binary,
            guest_dir,
            workdir,
            [server.socket],
            GUEST_SCRIPT,
            append=KERNEL_APPEND,
            name="testdev",
        )
    finally:
        pool.stop_all()
    checks = {m.group(2): (m.group(1) == "OK", m.group(3)) for m in CHECKS.finditer(run.console)}
    report(f"\nguest boot: run-vm wall {run.wall_s:.1f} s; {run.guest_times()}; logs in {workdir}")
    yield GuestResult(run, server, checks)


def test_qemu_realized_and_guest_enumerated(guest: GuestResult) -> None:
    assert "GUEST-PCI: 0000:00:01.0 vendor=0x1b36 device=0x0f00 class=0xff0000" in (
        guest.run.console
    ), guest.report()
    guest.expect("class", "subsystem_vendor", "subsystem_device", "revision", "interrupt_pin")
    guest.expect("bar0.size", "bar2.size", "bar4.size", "bar2.prefetchable_64bit", "bar0.mem32")
    trace = guest.server.trace()
    for command in ("VERSION", "DMA_MAP", "DEVICE_GET_INFO", "DEVICE_RESET", "DEVICE_SET_IRQS"):
        assert f" {command} cmd" in trace, f"no {command} in the server trace\n" + guest.report()
    assert "rejected" not in trace, guest.report()


def test_guest_ran_to_completion(guest: GuestResult) -> None:
    assert "GUEST-TEST-EXIT:" in guest.run.console, guest.report()
    assert "reboot: Power down" in guest.run.console, guest.report()
    assert guest.run.marks.get("poweroff at uptime", 1e9) < 120, guest.report()


def test_bar0_registers(guest: GuestResult) -> None:
    guest.expect(
        "bar0.id",
        "bar0.version",
        "bar0.scratch0",
        "bar0.scratch7",
        "bar0.version_readonly",
        "bar0.ioevent_count",
        "bar0.irq_status_acked",
    )


def test_bar2_ram(guest: GuestResult) -> None:
    guest.expect("bar2.ram_first", "bar2.ram_last")


def test_dma_copy_in_guest_memory(guest: GuestResult) -> None:
    guest.expect(
        "dma.buffer_reserved",
        "command.bus_master",
        "dma.small.status",
        "dma.small.done_count",
        "dma.small.mismatched_words",
        "dma.small.guard_untouched",
        "dma.big.source_written_via_devmem",
        "dma.big.status",
        "dma.big.copied_64k",
    )
    # memfd guest RAM (share=on): the copies went through our mmap of it, not messages.
    trace = guest.server.trace()
    assert "DMA_READ" not in trace and "DMA_WRITE" not in trace, guest.report()


def test_intx_reaches_guest_handler(guest: GuestResult) -> None:
    names = [
        f"intx.round{n}.{what}"
        for n in (1, 2)
        for what in (
            "proc_interrupts",
            "uio_event_count",
            "status_intx_bit",
            "command_intx_disable",
            "irq_count",
            "irq_status",
            "irq_status_acked",
            "status_intx_bit_clear",
            "command_intx_enabled",
        )
    ]
    disabled = ("held_off", "status_intx_bit", "delivered_when_enabled", "uio_event_count")
    names += [f"intx.disabled.{what}" for what in disabled]
    guest.expect("intx.bound", *names, "intx.no_spurious")


def test_msi_reaches_guest_cpu(guest: GuestResult) -> None:
    guest.expect("msi.enabled", "msi.irq_count", "msi.delivered_to_vector_209")
    assert "index=MSI flags=0x24" in guest.server.trace(), guest.report()


def test_msix_enabled_by_guest(guest: GuestResult) -> None:
    guest.expect("msix.table_size", "msix.entry1.data", "msix.enabled", "msix.irq_count")
    assert "index=MSIX flags=0x24 start=1 count=1" in guest.server.trace(), guest.report()


def test_msix_reaches_guest_cpu(guest: GuestResult) -> None:
    guest.expect("msix.delivered_to_vector_210")


def test_no_dma_without_bus_master(guest: GuestResult) -> None:
    guest.expect("dma.no_copy_without_bus_master")


KNOWN_FAILURES: set[str] = set()


def test_no_other_guest_check_failed(guest: GuestResult) -> None:
    failed = [
        f"{name}:{detail}"
        for name, (good, detail) in guest.checks.items()
        if not good and name not in KNOWN_FAILURES
    ]
    assert not failed, "unexpected guest check failures: " + "; ".join(failed) + guest.report()
