"""Shell for a real Linux guest (scripts/qemu/build-guest: busybox, no driver of ours) that
drives testdev through its BARs, and the parser of what it prints.

:data:`TESTDEV_SHELL` is the prelude of such scripts (``hex``, ``rdm``/``wrm`` for 32-bit
MMIO through busybox ``devmem``, ``rdc``/``wrc`` for config space through sysfs, ``$dev``,
``$bar0``, ``$bar2``). :func:`msix_stream_script` is a guest that keeps the device busy and
checks it, for migration tests and ``vfio-user-emu soak --qemu``: it writes SCRATCH0 and the
first word of the RAM BAR once, then, without end, rings testdev's DOORBELL and waits for the
MSI-X interrupt it raises, and prints one :class:`Tick` per interrupt.

Counting MSI-X interrupts without a driver: no guest driver claims testdev, so the guest
programs the MSI-X capability and table entry 0 itself (as tests/qemu/test_testdev_guest.py
does) and aims the message at the local APIC's error vector (0xfe). Linux's handler of that
vector (``sysvec_error_interrupt`` in arch/x86/kernel/apic/apic.c) only EOIs, increments
``irq_err_count`` and prints nothing unless ``apic=debug`` is given; /proc/interrupts shows
that count as ``ERR``. It is an exact per-interrupt counter in the guest (a message to an
unused external vector would only reach the rate-limited "No irq handler" log line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Prelude of guest scripts that drive testdev; the script exits with T-FAIL without one.
TESTDEV_SHELL = r"""
hex() { printf 0x%x $(($1)); }
rdm() { echo $(( $(devmem $(hex $1) 32) )); }
wrm() { devmem $(hex $1) 32 $(hex $2); }
rdc() { dd if=$dev/config bs=$2 skip=$(($1 / $2)) count=1 2>/dev/null | od -An -tu$2 | tr -d ' '; }
wrc() {
    s= i=0
    while [ $i -lt $2 ]; do s="$s\\$(printf %o $(( ($3 >> (8 * i)) & 0xff )))"; i=$((i + 1)); done
    printf "$s" | dd of=$dev/config bs=$2 seek=$(($1 / $2)) count=1 conv=notrunc 2>/dev/null
}
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1b36 ] && [ "$(cat $d/device)" = 0x0f00 ] && dev=$d
done
[ -n "$dev" ] || { echo "T-FAIL: no testdev"; exit 1; }
bar0=$(sed -n 1p $dev/resource | cut -d' ' -f1)
bar2=$(sed -n 3p $dev/resource | cut -d' ' -f1)
"""

SCRATCH_VALUE = 0x5EEDF00D
RAM_VALUE = 0xC0FFEE42
#: The local APIC's error vector (see the module docstring).
ERROR_VECTOR = 0xFE
#: How long the guest waits for one interrupt before it reports it lost (guest time: the
#: wait does not advance while the VM is stopped for a migration).
IRQ_WAIT_S = 5

_MSIX_STREAM = r"""
find_cap() {
    p=$(( $(rdc 0x34 1) & 0xfc ))
    while [ $p -ne 0 ]; do
        [ $(rdc $p 1) -eq $(($1)) ] && { echo $p; return; }
        p=$(( $(rdc $((p + 1)) 1) & 0xfc ))
    done
    echo 0
}
errs() { awk '$1 == "ERR:" { print $2 }' /proc/interrupts; }
wrc 4 2 $(( $(rdc 4 2) | 0x6 ))  # memory decoding and bus mastering (MSI-X writes) on
msix=$(find_cap 0x11)
[ $msix -ne 0 ] || { echo "T-FAIL: no MSI-X capability"; exit 1; }
ctrl=$(rdc $((msix + 2)) 2)
table=$(rdc $((msix + 4)) 4)
tbase=$(( $(sed -n "$(( (table & 7) + 1 ))p" $dev/resource | cut -d' ' -f1) + (table & ~7) ))
wrc $((msix + 2)) 2 $(( ctrl | 0xc000 ))  # enabled, function masked while programming
wrm $tbase 0xfee00000; wrm $((tbase + 4)) 0; wrm $((tbase + 8)) @VECTOR@; wrm $((tbase + 12)) 0
wrc $((msix + 2)) 2 $(( (ctrl | 0x8000) & ~0x4000 ))
wrm $((bar0 + 0x10)) @SCRATCH@
wrm $bar2 @RAM@
raised0=$(rdm $((bar0 + 0x38)))
echo "T-READY"
i=0 got=0
while [ $i -lt 100000000 ]; do
    n0=$(errs)
    wrm $((bar0 + 0x30)) 0  # DOORBELL: raise vector 0
    n=0
    while [ $(errs) -eq $n0 ] && [ $n -lt @WAIT@ ]; do usleep 10000; n=$((n + 1)); done
    d=$(( $(errs) - n0 ))
    [ $d -eq 1 ] || echo "T-LOST $i: $d interrupt(s) for one doorbell"
    got=$((got + d))
    wrm $((bar0 + 0x34)) 1  # acknowledge IRQ_STATUS bit 0
    echo "T-TICK $i irqs=$got raised=$(( $(rdm $((bar0 + 0x38))) - raised0 ))" \
        "scratch=$(hex $(rdm $((bar0 + 0x10)))) ram=$(hex $(rdm $bar2))"
    i=$((i + 1))
done
"""


def msix_stream_script(scratch: int = SCRATCH_VALUE, ram: int = RAM_VALUE) -> str:
    """The guest script (see the module docstring) writing ``scratch`` and ``ram``."""
    return TESTDEV_SHELL + (
        _MSIX_STREAM.replace("@SCRATCH@", hex(scratch))
        .replace("@RAM@", hex(ram))
        .replace("@VECTOR@", hex(ERROR_VECTOR))
        .replace("@WAIT@", str(IRQ_WAIT_S * 100))
    )


@dataclass(frozen=True)
class Tick:
    """One ``T-TICK`` line: the doorbell number, the interrupts the guest counted and the
    device's IRQ_COUNT (both since the script started), and the values it read back."""

    number: int
    irqs: int
    raised: int
    scratch: int
    ram: int


_TICK = re.compile(
    r"^T-TICK (\d+) irqs=(\d+) raised=(-?\d+) scratch=(0x[0-9a-f]+) ram=(0x[0-9a-f]+)\r?\n", re.M
)
_LOST = re.compile(r"^T-LOST [^\r\n]*", re.M)


def parse_ticks(console: str) -> list[Tick]:
    """The complete tick lines of a console log, in order."""
    return [
        Tick(int(n), int(irqs), int(raised), int(scratch, 16), int(ram, 16))
        for n, irqs, raised, scratch, ram in _TICK.findall(console)
    ]


def lost_lines(console: str) -> list[str]:
    """The guest's ``T-LOST`` reports (a doorbell whose interrupt never came, or came twice)."""
    return _LOST.findall(console)


_LOST_NUMBER = re.compile(r"^T-LOST (\d+):", re.M)


@dataclass
class TickLedger:
    """Follows one guest's ticks across the consoles of the QEMUs it runs in, and says what
    went wrong since the last check, each problem once.

    An interrupt the device raised and the guest never got shows as ``raised - irqs``
    growing (and as a ``T-LOST`` line). One case is explained, not a fault of the device: the
    doorbell rung as the source VM stopped for the switchover. The source emulator raises it
    (the posted write reaches it before QEMU's STOP) and signals its eventfd, but QEMU's main
    loop reads that eventfd only after the migration thread, which holds the big QEMU lock
    from the stop to the end of saving, has saved the guest's local APIC: the interrupt lands
    in the source's APIC, after its state left (a userspace interrupt path: with KVM's irqfd
    the kernel would inject it at once). :meth:`check` counts such a loss apart when it is
    at most one interrupt, at the first doorbell after the last tick the source printed."""

    scratch: int = SCRATCH_VALUE
    ram: int = RAM_VALUE
    last: int = -1  # the last tick checked
    deficit: int = 0  # raised - irqs at that tick

    def check(self, console: str, switchover_after: int | None = None) -> tuple[list[str], int]:
        """Problems in the ticks of ``console`` after the last one checked, and how many
        interrupts were lost at the switchover (``switchover_after``: the last tick the
        source printed before this console's QEMU took over)."""
        ticks = [tick for tick in parse_ticks(console) if tick.number > self.last]
        problems: list[str] = []
        at_switchover = 0
        lost_at = {int(n) for n in _LOST_NUMBER.findall(console) if int(n) > self.last}
        for tick in ticks:
            missing = tick.raised - tick.irqs - self.deficit
            explained = (
                switchover_after is not None
                and missing == 1
                and tick.number in (switchover_after + 1, switchover_after + 2)
                and at_switchover == 0
            )
            if explained:
                at_switchover = 1
                lost_at.discard(tick.number)
            elif missing:
                lost_at.discard(tick.number)  # the same loss, said once
                problems.append(
                    f"tick {tick.number}: {missing:+d} interrupt(s) the device raised and the "
                    "guest did not count"
                )
            self.deficit += missing
            if (tick.scratch, tick.ram) != (self.scratch, self.ram):
                problems.append(f"tick {tick.number}: scratch {tick.scratch:#x} ram {tick.ram:#x}")
            self.last = tick.number
        problems += [f"T-LOST at doorbell {n}" for n in sorted(lost_at)]
        return problems[:5], at_switchover
