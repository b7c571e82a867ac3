"""The guest-driver helpers of emulator.testing.harness, against a served testdev over a socket."""

from __future__ import annotations

from pathlib import Path

from devices import pci
from devices.testdev import TestDev
from emulator.client import Client
from emulator.testing.harness import find_capability, served_device

ABSENT = 0x13  # Advanced Features: not in testdev's list


async def test_find_capability_walks_the_list_as_a_driver_does(tmp_path: Path) -> None:
    device = TestDev()
    async with (
        served_device(device, tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        for cap_id in (pci.CAP_ID_MSI, pci.CAP_ID_MSIX):
            found = await find_capability(client, cap_id)
            assert found is not None and found == device.config.find_capability(cap_id)
        assert await find_capability(client, ABSENT) is None


async def test_find_capability_stops_on_a_looping_list(tmp_path: Path) -> None:
    device = TestDev()
    (_, first), *_, (_, last) = device.config.capabilities()
    device.config._regs[last + 1] = first  # a broken device: the list loops
    async with (
        served_device(device, tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        assert await find_capability(client, ABSENT) is None
