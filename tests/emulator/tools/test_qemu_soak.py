"""The QEMU soak's plan, checks and report, without QEMU (the real run is
tests/qemu/test_qemu_soak.py)."""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from emulator.cli import build_parser
from emulator.tools.qemu_soak import (
    Outcome,
    QemuSoakConfig,
    QemuSoakResult,
    Step,
    VmFault,
    parse_vm_faults,
    plan,
    progress_line,
    summary_table,
)


def test_plan_without_faults_is_only_migrations() -> None:
    assert plan(5, 0.0, list(VmFault), seed=1) == [Step(None)] * 5


def test_every_fault_is_followed_by_a_migration_that_must_succeed() -> None:
    steps = plan(200, 0.5, list(VmFault), seed=7)
    assert sum(step.fault is None for step in steps) == 200
    assert steps[-1].fault is None
    for first, second in itertools.pairwise(steps):
        assert first.fault is None or second.fault is None
    kinds = Counter(step.fault for step in steps if step.fault)
    assert set(kinds) == set(VmFault)
    assert 60 < sum(kinds.values()) < 140  # about half of 200


def test_plan_is_reproducible_from_its_seed() -> None:
    assert plan(50, 0.3, list(VmFault), seed=3) == plan(50, 0.3, list(VmFault), seed=3)
    assert plan(50, 0.3, list(VmFault), seed=3) != plan(50, 0.3, list(VmFault), seed=4)


def test_rate_one_faults_every_migration_with_the_kinds_given() -> None:
    steps = plan(4, 1.0, [VmFault.CANCEL], seed=1)
    assert steps == [Step(VmFault.CANCEL), Step(None)] * 4


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_a_rate_outside_0_1_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        plan(3, rate, list(VmFault), seed=1)


def test_faults_need_a_kind() -> None:
    with pytest.raises(ValueError, match="fault kind"):
        plan(3, 0.5, [], seed=1)


def test_parse_vm_faults_names_the_valid_kinds() -> None:
    assert parse_vm_faults("cancel, refuse-stream") == [VmFault.CANCEL, VmFault.REFUSE_STREAM]
    with pytest.raises(argparse.ArgumentTypeError, match="kill-destination"):
        parse_vm_faults("cancel,explode")


def sample_result() -> QemuSoakResult:
    config = QemuSoakConfig(iterations=3, faults=0.5, qemu=Path("/q"), guest=Path("/g"))
    result = QemuSoakResult(config.as_dict(), wall_s=12.0, irqs_counted=99)
    result.outcomes = [
        Outcome(1, VmFault.CANCEL, "cancelled"),
        Outcome(2, None, "completed", downtime_ms=10, total_ms=1000),
        Outcome(3, VmFault.REFUSE_STREAM, "completed", losses=["refuse-stream: completed"]),
        Outcome(4, None, "completed", downtime_ms=30, total_ms=1500),
        Outcome(5, None, "failed", error="boom", losses=["migration failed: boom"]),
    ]
    return result


def test_summary_counts_migrations_faults_and_losses() -> None:
    summary = sample_result().summary()
    assert (summary["migrations"], summary["succeeded"], summary["attempts"]) == (3, 2, 5)
    # nearest-rank percentiles, as vfio-user-emu soak reports them
    assert summary["downtime_ms"] == {"min": 10, "p50": 10, "p90": 30, "max": 30}
    assert summary["faults_injected_by_kind"] == {"cancel": 1, "refuse-stream": 1}
    assert summary["faults_recovered_by_kind"] == {"cancel": 1}
    assert summary["losses"] == 2
    assert summary["loss_details"] == ["#3: refuse-stream: completed", "#5: migration failed: boom"]
    json.dumps(summary)  # the --report file


def test_summary_table_and_progress_line_show_the_figures() -> None:
    result = sample_result()
    table = summary_table(result.summary())
    assert "QEMU downtime min/p50/p90/max  10 / 10 / 30 / 30 ms" in table
    assert "  cancel" in table and "1 injected, 1 recovered" in table
    assert "LOSS: #5: migration failed: boom" in table
    line = progress_line(result, planned=3, started=0.0)
    assert "3/3 migrations" in line and "faults 2 recovered 1 | losses 2" in line


def test_the_soak_command_takes_qemu_options() -> None:
    args = build_parser().parse_args(
        ["soak", "--qemu", "--iterations", "4", "--faults", "0.5", "--vm-faults", "cancel"]
    )
    assert args.qemu and args.iterations == 4 and args.vm_faults == [VmFault.CANCEL]
    assert not build_parser().parse_args(["soak"]).qemu


def test_a_missing_qemu_is_reported(tmp_path: Path) -> None:
    config = QemuSoakConfig(iterations=1, qemu=tmp_path / "none", guest=tmp_path)
    assert "no QEMU at" in (config.problem() or "")


def test_an_aborted_soak_is_not_ok_and_says_why() -> None:
    result = sample_result()
    result.outcomes = result.outcomes[:2]
    assert result.summary()["aborted"] is None and not result.losses
    result.aborted = "the guest printed no tick on vm3 for 60 s"
    assert not result.ok
    assert "ABORTED" in summary_table(result.summary())
