from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devices.testdev import TestDev
from emulator.client import Client
from emulator.testing import ServedDevice, enable_bus_master, served_device


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[ServedDevice]:
    async with served_device(TestDev(), tmp_path) as s:
        yield s


@pytest.fixture
async def client(served: ServedDevice) -> AsyncIterator[Client]:
    async with Client.connect(served.socket_path) as c:
        await enable_bus_master(c)  # as a guest driver does before its device may DMA
        yield c
