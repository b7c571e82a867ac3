"""Fixtures for tests that run other projects' vfio-user programs against our server.

Nothing is built here: ``lvu_samples`` asks ``scripts/lvu/build-lvu-samples --check`` for the
libvfio-user sample client and server it built (``make test`` builds them first), and the
test is skipped with the reason when they are missing, or failed under ``QEMU_TESTS=require``
(CI), the same switch as the real-QEMU tests in tests/qemu.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.qemu.conftest import QEMU_TESTS_MODE, REPO, unavailable

BUILD_SCRIPT = REPO / "scripts" / "lvu" / "build-lvu-samples"


@pytest.fixture(scope="session")
def lvu_samples() -> Path:
    """The directory holding libvfio-user's protocol-0.1 sample ``client`` and ``server``."""
    if QEMU_TESTS_MODE == "skip":
        pytest.skip("QEMU_TESTS=skip")
    found = subprocess.run(
        [str(BUILD_SCRIPT), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    if found.returncode != 0:
        why = (found.stderr.strip().splitlines() or ["no reason given"])[-1]
        unavailable(f"no libvfio-user protocol-0.1 samples: {why}")
    return Path(found.stdout.splitlines()[-1])
