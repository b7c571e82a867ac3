"""``vfio-user-emu soak --qemu``: QEMU live-migrates a running VM with our testdev back and
forth between two QEMU + emulator pairs, with faults, and checks after every migration that
the guest and its device lost nothing.

The VM is the guest ``scripts/qemu/build-guest`` makes, booted by ``scripts/qemu/run-vm``
in QEMU with the project's vfio-user migration patches (``scripts/qemu/build-qemu``; TCG),
running :func:`emulator.testing.testdev_vm.msix_stream_script`: it writes testdev's SCRATCH0
and RAM BAR once, then rings the DOORBELL without end and counts the MSI-X interrupts, one
tick line per interrupt on its serial console. Pair A boots it; each migration starts a
fresh QEMU (``-incoming tcp:127.0.0.1:PORT``) and emulator in the other slot, QMP
``migrate``\\s to it, quits the old source and its emulator. Only loopback and UNIX sockets.

After each completed migration (:meth:`QemuSoak.check_destination`): the guest goes on
counting on the destination where it stopped on the source, every doorbell got exactly one
interrupt (no ``T-LOST``), the guest's count equals the device's IRQ_COUNT (migrated device
state) and SCRATCH0 and the RAM BAR hold what the guest wrote before the first migration.
QEMU's own figures (``query-migrate``: downtime, total time) are collected.

Faults (``--vm-faults``, each migration gets one with probability ``--faults``; a fault is
an extra attempt before that migration, :func:`plan`):

* ``kill-destination``: the destination emulator is SIGKILLed while QEMU migrates;
* ``cancel``: ``migrate_cancel`` while QEMU migrates;
* ``refuse-stream``: a man in the middle (:class:`MigrationProxy`) flips a byte of the device
  state; the destination emulator's checksum must refuse it.

A fault is recovered when QEMU reports the migration failed or cancelled, the source VM
still runs (QMP) and its guest goes on with its stream and values (guest side), and the
next migration succeeds. Anything else is a loss: a migration that completed with a fault
(the source then stays paused; the soak resumes it with ``cont``, as a management layer
that learnt the destination failed would), a check that failed, a migration that failed
without one.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from emulator.cli_common import enum_list_arg
from emulator.testing.testdev_vm import Tick, TickLedger, msix_stream_script, parse_ticks
from emulator.tools.migration_proxy import MigrationProxy
from emulator.tools.soak import percentile

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parents[2]
RUN_VM = REPO / "scripts" / "qemu" / "run-vm"
QEMU_NAME = "qemu-system-x86_64"
GUEST_MEMORY = "256M"
BOOT_TIMEOUT_S = 240.0
MIGRATION_TIMEOUT_S = 180.0
#: Ticks the guest must print on a destination (or a source after a fault) to pass.
TICKS_TO_CHECK = 3
#: Bandwidth while a fault is armed: slow enough that the migration is still active when
#: the fault fires (the guest's RAM is about 40 MB of non-zero pages).
FAULT_BANDWIDTH = 16 << 20
FAULT_AFTER_S = 0.7
FULL_BANDWIDTH = 128 << 20  # QEMU's own default (MAX_THROTTLE in migration/options.c)


def cache_dir() -> Path:
    """``$VFIO_USER_EMU_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/vfio-user-emu`` (where
    scripts/qemu/build-qemu and build-guest leave QEMU and the guest)."""
    if os.environ.get("VFIO_USER_EMU_CACHE"):
        return Path(os.environ["VFIO_USER_EMU_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vfio-user-emu"


def patched_qemu() -> Path:
    """The QEMU scripts/qemu/build-qemu built with the project's migration patches."""
    return cache_dir() / "qemu-patched" / "install" / "bin" / QEMU_NAME


class SoakError(Exception):
    """The soak cannot go on (no QEMU, a guest that does not boot, a source that died)."""


# =============================================================================================
# The plan


class VmFault(enum.Enum):
    KILL_DESTINATION = "kill-destination"  # the destination emulator dies mid-migration
    CANCEL = "cancel"  # migrate_cancel mid-migration
    REFUSE_STREAM = "refuse-stream"  # the device state arrives corrupted


@dataclass(frozen=True)
class Step:
    """One migration attempt: ``fault`` None is a migration that must complete."""

    fault: VmFault | None


def plan(migrations: int, rate: float, kinds: Sequence[VmFault], seed: int) -> list[Step]:
    """``migrations`` clean migrations; before each, with probability ``rate``, a fault
    attempt of a kind drawn from ``kinds``. A fault is always followed by a clean migration
    (which must succeed: that is part of recovering from it)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError("the fault rate is a probability (0..1)")
    if rate and not kinds:
        raise ValueError("faults need at least one fault kind")
    rng = random.Random(seed)
    steps: list[Step] = []
    for _ in range(migrations):
        if rate and rng.random() < rate:
            steps.append(Step(rng.choice(list(kinds))))
        steps.append(Step(None))
    return steps


#: An argparse type: comma-separated VM fault kinds.
parse_vm_faults = enum_list_arg(VmFault, "VM fault kind")


# =============================================================================================
# Results


@dataclass
class Outcome:
    """What one attempt came to."""

    number: int
    fault: VmFault | None
    status: str  # QEMU's: completed, failed, cancelled
    downtime_ms: float | None = None
    total_ms: float | None = None
    error: str | None = None
    losses: list[str] = field(default_factory=list)
    #: Interrupts lost with the doorbell in flight at the switchover (TickLedger explains).
    irqs_lost_at_switchover: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "fault": self.fault.value if self.fault else None,
            "status": self.status,
            "downtime_ms": self.downtime_ms,
            "total_ms": self.total_ms,
            "error": self.error,
            "losses": self.losses,
            "irqs_lost_at_switchover": self.irqs_lost_at_switchover,
        }


@dataclass
class QemuSoakResult:
    config: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    interrupted: str | None = None
    irqs_counted: int = 0  # interrupts the guest counted by the end
    aborted: str | None = None  # why the soak could not go on (a harness failure)

    @property
    def migrations(self) -> list[Outcome]:
        """The clean migrations (not fault attempts)."""
        return [outcome for outcome in self.outcomes if outcome.fault is None]

    @property
    def losses(self) -> list[str]:
        return [f"#{o.number}: {loss}" for o in self.outcomes for loss in o.losses]

    @property
    def ok(self) -> bool:
        return not self.losses and self.aborted is None

    def summary(self) -> dict[str, Any]:
        completed = [o for o in self.migrations if o.status == "completed"]
        downtimes = [o.downtime_ms for o in completed if o.downtime_ms is not None]
        totals = [o.total_ms for o in completed if o.total_ms is not None]
        faults = [o for o in self.outcomes if o.fault is not None]
        injected = Counter(o.fault.value for o in faults if o.fault)
        recovered = Counter(o.fault.value for o in faults if o.fault and not o.losses)
        return {
            "config": self.config,
            "migrations": len(self.migrations),
            "succeeded": len(completed),
            "attempts": len(self.outcomes),
            "wall_s": round(self.wall_s, 1),
            "downtime_ms": _stats(downtimes),
            "total_time_ms": _stats(totals),
            "faults_injected": sum(injected.values()),
            "faults_recovered": sum(recovered.values()),
            "faults_injected_by_kind": dict(injected),
            "faults_recovered_by_kind": dict(recovered),
            "irqs_counted_by_guest": self.irqs_counted,
            "irqs_lost_at_switchover": sum(o.irqs_lost_at_switchover for o in self.outcomes),
            "losses": len(self.losses),
            "loss_details": self.losses,
            "interrupted_by": self.interrupted,
            "aborted": self.aborted,
            "outcomes": [o.as_dict() for o in self.outcomes],
        }


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"min": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    return {
        "min": min(values),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "max": max(values),
    }


def progress_line(result: QemuSoakResult, planned: int, started: float) -> str:
    """The live line: as ``vfio-user-emu soak``'s, with QEMU's downtimes."""
    done = len(result.migrations)
    elapsed = max(time.monotonic() - started, 1e-9)
    width = 24
    filled = min(width, done * width // max(planned, 1))
    summary = result.summary()
    down = summary["downtime_ms"]
    return (
        f"[{'#' * filled}{'-' * (width - filled)}] {done}/{planned} migrations "
        f"{done / elapsed * 60:.1f}/min downtime p50 {down['p50']:.0f} p90 {down['p90']:.0f} "
        f"max {down['max']:.0f} ms | faults {summary['faults_injected']} recovered "
        f"{summary['faults_recovered']} | losses {summary['losses']}"
    )


def summary_table(summary: dict[str, Any]) -> str:
    down, total, config = summary["downtime_ms"], summary["total_time_ms"], summary["config"]
    rows = [
        ("VM / mode / transport", f"testdev under QEMU / {config['mode']} / {config['transport']}"),
        ("migrations", f"{summary['migrations']} ({summary['succeeded']} completed)"),
        ("attempts", f"{summary['attempts']} (migrations and fault attempts)"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        (
            "QEMU downtime min/p50/p90/max",
            "{min:.0f} / {p50:.0f} / {p90:.0f} / {max:.0f} ms".format(**down),
        ),
        (
            "QEMU total time min/p50/max",
            "{min:.0f} / {p50:.0f} / {max:.0f} ms".format(**total),
        ),
        ("guest interrupts counted", str(summary["irqs_counted_by_guest"])),
        ("  lost at a switchover", str(summary["irqs_lost_at_switchover"])),
        ("faults injected", str(summary["faults_injected"])),
        ("faults recovered", str(summary["faults_recovered"])),
        ("losses", str(summary["losses"])),
    ]
    for kind, count in summary["faults_injected_by_kind"].items():
        recovered = summary["faults_recovered_by_kind"].get(kind, 0)
        rows.append((f"  {kind}", f"{count} injected, {recovered} recovered"))
    if summary.get("aborted"):
        rows.insert(1, ("ABORTED", summary["aborted"]))
    if summary.get("interrupted_by"):
        rows.insert(1, ("interrupted by", f"{summary['interrupted_by']} (the run ended early)"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines += [f"LOSS: {detail}" for detail in summary["loss_details"][:10]]
    return "\n".join(lines)


# =============================================================================================
# QEMU + emulator pairs


@dataclass
class QemuSoakConfig:
    iterations: int
    faults: float = 0.0
    kinds: list[VmFault] = field(default_factory=lambda: list(VmFault))
    mode: str = "stop-copy"
    transport: str = "inband"
    seed: int = 1
    qemu: Path = field(default_factory=patched_qemu)
    guest: Path = field(default_factory=lambda: cache_dir() / "guest")
    directory: Path | None = None
    progress: TextIO | None = None
    #: These attempts instead of :func:`plan`'s (a test that wants each fault once).
    schedule: list[Step] | None = None

    def steps(self) -> list[Step]:
        if self.schedule is not None:
            return list(self.schedule)
        return plan(self.iterations, self.faults, self.kinds, self.seed)

    def device(self) -> str:
        return "testdev,mig-caps=stop_copy" if self.mode == "stop-copy" else "testdev"

    def server_args(self) -> list[str]:
        return ["--no-data-fd"] if self.transport == "inband" else []

    def as_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "faults": self.faults,
            "fault_kinds": [kind.value for kind in self.kinds],
            "mode": self.mode,
            "transport": self.transport,
            "seed": self.seed,
            "qemu": str(self.qemu),
        }

    def problem(self) -> str | None:
        """Why the soak cannot run here, or None."""
        if not os.access(self.qemu, os.X_OK):
            return f"no QEMU at {self.qemu} (scripts/qemu/build-qemu builds the patched one)"
        if not all((self.guest / name).is_file() for name in ("vmlinuz", "initramfs.cpio.gz")):
            return f"no guest in {self.guest} (scripts/qemu/build-guest makes it)"
        try:
            import qemu.qmp  # noqa: F401, PLC0415 (the QMP client, from the test extra)
        except ImportError:
            return "QMP needs the qemu.qmp package (pip install 'vfio-user-emu[test]')"
        if not RUN_VM.is_file():
            return f"no {RUN_VM}: run the soak from a checkout of the project"
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], *, group: bool = False) -> None:
    """End a process we started (its process group for run-vm: QEMU is its child)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Side:
    """One QEMU (through run-vm, its own process group) with its emulator and QMP."""

    def __init__(
        self, config: QemuSoakConfig, workdir: Path, name: str, incoming: int | None
    ) -> None:
        self.name = name
        self.socket = workdir / f"{name}.sock"
        self.console_path = workdir / f"{name}-console.log"
        self.emulator = self._start_emulator(config, workdir)
        self.qemu = self._start_qemu(config, workdir, incoming)
        self.qmp = self._connect(workdir / f"{name}-qmp.sock")

    def _start_emulator(self, config: QemuSoakConfig, workdir: Path) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "emulator", "serve", "--device", config.device()]
        command += ["--socket-path", str(self.socket), *config.server_args()]
        with (workdir / f"{self.name}-server.log").open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                _stop(process)
                raise SoakError(f"the emulator for {self.name} did not start")
            time.sleep(0.05)
        return process

    def _start_qemu(
        self, config: QemuSoakConfig, workdir: Path, incoming: int | None
    ) -> subprocess.Popen[bytes]:
        script = workdir / "guest-test.sh"
        if not script.exists():
            script.write_text(msix_stream_script())
        qmp = workdir / f"{self.name}-qmp.sock"
        argv = [str(RUN_VM), "--quiet", "--console", str(self.console_path)]
        argv += ["--script", str(script), "--timeout", "86400", "--memory", GUEST_MEMORY]
        argv += ["--socket", str(self.socket), "--", "-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming is not None:
            argv += ["-incoming", f"tcp:127.0.0.1:{incoming}"]
        env = dict(os.environ, QEMU=str(config.qemu), TMPDIR=str(workdir))
        env["VFIO_USER_EMU_CACHE"] = str(config.guest.parent)
        emu = Path(sys.executable).with_name("vfio-user-emu")
        if emu.exists():
            env["VFIO_USER_EMU"] = str(emu)
        with (workdir / f"{self.name}-run-vm.log").open("wb") as out:
            return subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def _connect(self, path: Path) -> QEMUMonitorProtocol:
        from emulator.testing.qmp import connect_qmp  # noqa: PLC0415 (qemu.qmp: problem())

        try:
            return connect_qmp(path)
        except Exception as exc:
            self.stop()
            raise SoakError(f"QEMU {self.name} has no QMP monitor: {exc}") from exc

    def console(self) -> str:
        text = self.console_path.read_text(errors="replace") if self.console_path.exists() else ""
        return text.replace("\r\n", "\n")

    def ticks(self) -> list[Tick]:
        return parse_ticks(self.console())

    def wait_ticks(self, count: int, timeout: float) -> list[Tick]:
        """At least ``count`` ticks on this console (SoakError when none come)."""
        deadline = time.monotonic() + timeout
        while len(ticks := self.ticks()) < count:
            if self.qemu.poll() is not None:
                raise SoakError(f"QEMU {self.name} exited")
            if time.monotonic() > deadline:
                raise SoakError(f"the guest printed no tick on {self.name} for {timeout:.0f} s")
            time.sleep(0.1)
        return ticks

    def status(self) -> str:
        return str(self.qmp.cmd("query-status")["status"])  # type: ignore[index]

    def kill_emulator(self) -> None:
        self.emulator.kill()
        self.emulator.wait()

    def stop(self) -> None:
        if hasattr(self, "qmp"):
            with contextlib.suppress(EOFError, OSError):
                self.qmp.close()
        _stop(self.qemu, group=True)
        _stop(self.emulator)


# =============================================================================================
# The soak


class QemuSoak:
    def __init__(self, config: QemuSoakConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.result = QemuSoakResult(config.as_dict())
        self.started = time.monotonic()
        self.sides = 0
        self.source: Side | None = None
        self.stop_requested: str | None = None
        self.ledger = TickLedger()

    def _side(self, incoming: int | None) -> Side:
        self.sides += 1
        return Side(self.config, self.workdir, f"vm{self.sides}", incoming)

    def run(self) -> QemuSoakResult:
        steps = self.config.steps()
        planned = sum(1 for step in steps if step.fault is None)
        try:
            self.source = self._side(None)
            if not re.search(r"^T-READY", self._wait_console(self.source, "T-READY"), re.M):
                raise SoakError("the guest did not start its script")
            self.source.wait_ticks(TICKS_TO_CHECK, BOOT_TIMEOUT_S)
            problems, _ = self.ledger.check(self.source.console())
            if problems:
                raise SoakError(f"the guest is not well before any migration: {problems}")
            for number, step in enumerate(steps, 1):
                if self.stop_requested:
                    self.result.interrupted = self.stop_requested
                    break
                self.result.outcomes.append(self.attempt(number, step.fault))
                self._progress(self.result, planned)
            ticks = self.source.ticks()
            self.result.irqs_counted = ticks[-1].irqs if ticks else 0
        except SoakError as exc:
            if self.source is None or not self.result.outcomes:
                raise  # nothing ran: no report to make
            self.result.aborted = str(exc)
        finally:
            if self.source is not None:
                self.source.stop()
            self.result.wall_s = time.monotonic() - self.started
            self._progress(self.result, planned, final=True)
        return self.result

    def _wait_console(self, side: Side, marker: str) -> str:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while marker not in (console := side.console()):
            if side.qemu.poll() is not None or time.monotonic() > deadline:
                raise SoakError(f"the guest never printed {marker}:\n{console[-2000:]}")
            time.sleep(0.2)
        return console

    def _progress(self, result: QemuSoakResult, planned: int, *, final: bool = False) -> None:
        stream = self.config.progress
        if stream is None:
            return
        line = progress_line(result, planned, self.started)
        if stream.isatty():
            stream.write("\r" + line + ("\n" if final else ""))
        else:
            stream.write(line + "\n")
        stream.flush()

    # -- one attempt --------------------------------------------------------------------------

    def attempt(self, number: int, fault: VmFault | None) -> Outcome:
        source = self.source
        assert source is not None
        port = _free_port()
        destination = self._side(port)
        proxy = MigrationProxy(port, corrupt=True) if fault is VmFault.REFUSE_STREAM else None
        try:
            in_flight = fault in (VmFault.KILL_DESTINATION, VmFault.CANCEL)
            bandwidth = FAULT_BANDWIDTH if in_flight else FULL_BANDWIDTH
            source.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth})
            for side in (source, destination):
                side.qmp.cmd(
                    "migrate-set-capabilities",
                    capabilities=[{"capability": "return-path", "state": True}],
                )
            uri_port = proxy.port if proxy is not None else port
            source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{uri_port}")
            if in_flight and fault is not None:
                self._fire(source, destination, fault)
            info = self._wait_migration(source)
        except BaseException:
            destination.stop()  # the soak ends here: leave no QEMU or emulator behind
            raise
        finally:
            if proxy is not None:
                proxy.close()
        outcome = Outcome(
            number,
            fault,
            str(info.get("status")),
            downtime_ms=info.get("downtime"),
            total_ms=info.get("total-time"),
            error=info.get("error-desc"),
        )
        if outcome.status == "completed" and fault is None:
            self._after_completed(outcome, source, destination)
        else:
            self._after_failed(outcome, source, destination)
        return outcome

    def _fire(self, source: Side, destination: Side, fault: VmFault) -> None:
        time.sleep(FAULT_AFTER_S)
        info = source.qmp.cmd("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if fault is VmFault.KILL_DESTINATION:
            destination.kill_emulator()
        else:
            source.qmp.cmd("migrate_cancel")
        if status != "active":  # the fault came too late to hit a migration in flight
            print(f"qemu soak: {fault.value} fired with the migration {status}", file=sys.stderr)

    def _wait_migration(self, source: Side) -> dict[str, Any]:
        deadline = time.monotonic() + MIGRATION_TIMEOUT_S
        while True:
            info = source.qmp.cmd("query-migrate")
            assert isinstance(info, dict)
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                source.qmp.cmd("migrate_cancel")
                raise SoakError(f"migration still {info.get('status')} after {deadline:.0f} s")
            time.sleep(0.05)

    def _after_completed(self, outcome: Outcome, source: Side, destination: Side) -> None:
        """The VM runs on the destination now: check it, end the old source."""
        on_source = source.ticks()  # final: the source VM stopped for good
        source.stop()
        self.source = destination
        self.check_destination(outcome, destination, on_source)

    def _after_failed(self, outcome: Outcome, source: Side, destination: Side) -> None:
        """The VM must still run on the source, its guest and device unharmed. A fault
        that QEMU completed the migration with is a loss: the destination is stopped and
        the paused source resumed, as a management layer that learnt of the fault would."""
        destination.stop()
        if outcome.fault is None:
            outcome.losses.append(f"migration {outcome.status}: {outcome.error}")
        elif outcome.status == "completed":
            outcome.losses.append(f"{outcome.fault.value}: QEMU completed the migration")
        status = source.status()
        if status != "running":
            if outcome.status != "completed":  # else QEMU paused it as it does after success
                outcome.losses.append(f"the source is {status} after the failed migration")
            source.qmp.cmd("cont")
        seen = len(source.ticks())
        try:
            source.wait_ticks(seen + TICKS_TO_CHECK, 60)
        except SoakError as exc:
            outcome.losses.append(f"source guest after the failure: {exc}")
            return
        problems, _ = self.ledger.check(source.console())
        outcome.losses += [f"source guest: {problem}" for problem in problems]

    def check_destination(self, outcome: Outcome, destination: Side, before: list[Tick]) -> None:
        """The guest goes on where it was, with every interrupt and its values."""
        try:
            ticks = destination.wait_ticks(TICKS_TO_CHECK, 60)
        except SoakError as exc:
            outcome.losses.append(f"destination guest: {exc}")
            return
        last = before[-1].number if before else None
        if last is not None and ticks[0].number <= last:
            outcome.losses.append(f"tick {ticks[0].number} after {last}: the guest went back")
        problems, outcome.irqs_lost_at_switchover = self.ledger.check(
            destination.console(), switchover_after=last
        )
        outcome.losses += [f"destination guest: {problem}" for problem in problems]


def run_qemu_soak(config: QemuSoakConfig) -> QemuSoakResult:
    problem = config.problem()
    if problem:
        raise SoakError(problem)
    with _workdir(config.directory) as workdir:
        return QemuSoak(config, workdir).run()


# =============================================================================================
# Command line (options added to `vfio-user-emu soak`)


def add_qemu_soak_arguments(soak: argparse.ArgumentParser) -> None:
    group = soak.add_argument_group(
        "with real VMs (--qemu)",
        "QEMU live-migrates a running guest with testdev between two QEMU + emulator pairs "
        "(the patched QEMU of scripts/qemu/build-qemu, the guest of scripts/qemu/build-guest, "
        "TCG). --iterations, --faults, --mode, --transport, --seed, --report, --quiet and "
        "--json apply.",
    )
    group.add_argument("--qemu", action="store_true", help="migrate a real VM with QEMU")
    group.add_argument(
        "--qemu-binary",
        type=Path,
        metavar="PATH",
        help=f"QEMU with the migration patches (default: $QEMU, else {patched_qemu()})",
    )
    group.add_argument(
        "--vm-faults",
        type=parse_vm_faults,
        metavar="KIND,...",
        help="the faults --faults draws from (default all): "
        + ", ".join(kind.value for kind in VmFault),
    )
    group.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="keep consoles and emulator logs here (default: a temporary directory)",
    )


def run_qemu_soak_cli(args: argparse.Namespace) -> int:
    qemu = args.qemu_binary or (Path(os.environ["QEMU"]) if os.environ.get("QEMU") else None)
    try:
        config = QemuSoakConfig(
            iterations=args.iterations or 20,
            faults=args.faults,
            kinds=args.vm_faults or list(VmFault),
            mode=args.mode,
            transport=args.transport,
            seed=args.seed,
            qemu=qemu or patched_qemu(),
            directory=args.workdir,
            progress=None if args.quiet or args.json else sys.stderr,
        )
        config.steps()  # validates the fault rate and kinds
    except ValueError as exc:
        print(f"vfio-user-emu: soak --qemu: {exc}", file=sys.stderr)
        return 2
    soak: list[QemuSoak] = []

    def stop(signum: int, _frame: object) -> None:
        if soak:
            soak[0].stop_requested = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        problem = config.problem()
        if problem:
            print(f"vfio-user-emu: soak --qemu: {problem}", file=sys.stderr)
            return 2
        with _workdir(config.directory) as workdir:
            soak.append(QemuSoak(config, workdir))
            result = soak[0].run()
    except SoakError as exc:
        print(f"vfio-user-emu: soak --qemu: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = result.summary()
    if args.report is not None:
        args.report.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2) if args.json else summary_table(summary))
    return 0 if result.ok else 1


@contextlib.contextmanager
def _workdir(directory: Path | None) -> Iterator[Path]:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="vfio-qemu-soak-") as tmp:
        yield Path(tmp)
