"""scripts/qemu/build-qemu's cache: the patched build is reused only while it was made from
the current patches (their names and contents, in apply order), the stock one (``--stock``)
lives apart and needs no stamp. Run against a fake installed QEMU in a scratch cache; a
wanted rebuild is seen by its stop at the recent-failure back-off (nothing is built here).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_QEMU = REPO / "scripts" / "qemu" / "build-qemu"
PATCHES = sorted((REPO / "scripts" / "qemu" / "patches").glob("*.patch"))

FAKE_QEMU = """#!/bin/sh
case "$*" in
    --version) echo "QEMU emulator version 10.2.2 (fake)" ;;
    *help*) echo 'name "vfio-user-pci", bus PCI' ;;
esac
"""


def patch_key() -> str:
    """What build-qemu stamps a patched build with (its documented cache key)."""
    digest = hashlib.sha256()
    for patch in PATCHES:
        digest.update(patch.name.encode() + b"\n" + patch.read_bytes())
    return digest.hexdigest()[:16]


def install_fake(cache: Path, root: str, stamp: str | None) -> Path:
    prefix = cache / root / "install"
    binary = prefix / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text(FAKE_QEMU)
    binary.chmod(0o755)
    if stamp is not None:
        (prefix / "PATCHES").write_text(stamp + "\n")
    return binary


def run(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "QEMU"}
    # The mirror is a closed loopback port: should the back-off not stop it, nothing is
    # downloaded or built.
    env |= {
        "VFIO_USER_EMU_CACHE": str(cache),
        "QEMU_RETRY_AFTER": "3600",
        "DEBIAN_MIRROR": "http://127.0.0.1:9/debian",
    }
    return subprocess.run(
        [str(BUILD_QEMU), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def recent_failure(cache: Path, root: str) -> None:
    """A failed build a minute ago: a build-qemu that wants to build stops at the back-off."""
    (cache / root).mkdir(parents=True, exist_ok=True)
    (cache / root / "last-failure").write_text(f"{int(time.time()) - 60}\tnot really\n")


def test_there_are_patches() -> None:
    assert PATCHES, "scripts/qemu/patches has no patch"
    for patch in PATCHES:
        text = patch.read_text()
        assert text.startswith("From ") and "\nSubject: [PATCH" in text, patch.name


def test_a_build_from_the_current_patches_is_reused(tmp_path: Path) -> None:
    binary = install_fake(tmp_path, "qemu-patched", patch_key())
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(binary)


@pytest.mark.parametrize("stamp", [None, "0123456789abcdef"], ids=["no-stamp", "other-patches"])
def test_a_build_from_other_patches_is_rebuilt(tmp_path: Path, stamp: str | None) -> None:
    install_fake(tmp_path, "qemu-patched", stamp)
    recent_failure(tmp_path, "qemu-patched")
    result = run(tmp_path)
    assert result.returncode == 1
    assert "not retrying" in result.stderr, result.stderr  # it went on to build


def test_stock_build_lives_apart_and_needs_no_stamp(tmp_path: Path) -> None:
    stock = install_fake(tmp_path, "qemu", None)
    result = run(tmp_path, "--stock")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(stock)
    # ... and is not what the default (patched) build reuses
    recent_failure(tmp_path, "qemu-patched")
    assert run(tmp_path).returncode == 1


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    result = run(tmp_path, "--bogus")
    assert result.returncode == 2 and "usage" in result.stderr
