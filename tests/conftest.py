"""Tests run on the C fast path when it is built (as the server does). Tests that switch
implementations get the installed one back afterwards, so one test cannot slow down (or
change) the rest.

``VFIO_USER_EMU_REQUIRE_FASTPATH=1`` (set by CI's ``.ci/run``) makes the whole run fail at
start when the C fast path is not in use, so that a missing compiler or Python headers can
not silently turn CI into a test of the pure-Python fallback only. Without it a user with no
compiler still gets the full suite on the fallback."""

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from devices.migration import fastpath
from devices.migration import primitives as stream_primitives
from devices.testdev import TestDev
from emulator.client import Client
from emulator.testing.harness import ServedDevice, enable_bus_master, served_device
from emulator.testing.vde_switch import VDE_PACKAGE, VdeSwitch, vde_switch_binary

REQUIRE_FASTPATH_VAR = "VFIO_USER_EMU_REQUIRE_FASTPATH"

_installed = fastpath.install_best()


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(REQUIRE_FASTPATH_VAR, "") not in ("", "0") and _installed.name != "c":
        why = fastpath.load_error() or "it did not pass its self-test or was switched off"
        raise pytest.UsageError(
            f"{REQUIRE_FASTPATH_VAR}=1 but the C fast path is not in use ({why}); install gcc "
            "and python3-dev, then `make clean test` (or `make fastpath`)"
        )


@pytest.fixture(autouse=True)
def _restore_stream_primitives() -> Iterator[None]:
    installed = stream_primitives.current()
    yield
    stream_primitives.install(installed)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[ServedDevice]:
    async with served_device(TestDev(), tmp_path) as s:
        yield s


@pytest.fixture
async def client(served: ServedDevice) -> AsyncIterator[Client]:
    async with Client.connect(served.socket_path) as c:
        await enable_bus_master(c)  # as a guest driver does before its device may DMA
        yield c


@pytest.fixture
def vde_switches() -> Iterator[Callable[..., VdeSwitch]]:
    """Start ``vde_switch`` processes (``vde_switches(hub=False)`` -> a started switch in a
    short directory of its own), all stopped at the end. Without vde_switch the test is
    skipped, or fails under ``QEMU_TESTS=require`` (CI, whose .ci/run installs vde2), as the
    QEMU tests that need a switch do."""
    if vde_switch_binary() is None:
        reason = f"no vde_switch (apt-get install {VDE_PACKAGE})"
        if os.environ.get("VFIO_USER_EMU_QEMU_TESTS") == "require":
            pytest.fail(f"{reason} [QEMU_TESTS=require]", pytrace=False)
        pytest.skip(reason)
    # Short paths: the switch's and our sockets live in the directory (108-byte limit).
    base = Path(tempfile.mkdtemp(prefix="vde-"))
    started: list[VdeSwitch] = []

    def start(*, hub: bool = False, name: str = "") -> VdeSwitch:
        switch = VdeSwitch(base / (name or f"sw{len(started)}"), hub=hub)
        started.append(switch)
        return switch.start()

    try:
        yield start
    finally:
        for switch in started:
            switch.stop()
        shutil.rmtree(base, ignore_errors=True)
