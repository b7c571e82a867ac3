"""An ``e1000`` live-migrated between two emulators plugged into one real ``vde_switch``
(``--netdev vde``), with a third NIC on the switch as the peer, each NIC served over its
own vfio-user socket and driven by the Linux-style guest driver: after the destination
resumes, its announcement (QEMU's gratuitous RARP) moves the NIC's MAC to the new port in
the switch at once, before the guest sends anything, and the peer's unicast frames reach
the destination only."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import trio

from devices.e1000 import E1000
from devices.net import ETH_P_RARP, announcement
from devices.registry import create_device
from emulator.client import Client
from emulator.client.migrate import get_state, migrate
from emulator.netdev import setup_netdevs
from emulator.netdev_vde import VdeBackend
from emulator.server import DeviceServer
from emulator.testing.guest_e1000 import DriverConfig, E1000Guest, udp_frame
from emulator.testing.harness import GuestRam
from emulator.testing.vde_switch import VdeSwitch
from protocol.constants import MigState

MAC_A = bytes.fromhex("525400000a01")
MAC_B = bytes.fromhex("525400000b01")
IP_A, IP_B = bytes([192, 168, 9, 1]), bytes([192, 168, 9, 2])
RAM_BASE = 0x40000000


@dataclass
class Nic:
    device: E1000
    backend: VdeBackend
    client: Client


async def plugged_nic(
    stack: AsyncExitStack, nursery: trio.Nursery, switch: VdeSwitch, name: str, mac: bytes
) -> Nic:
    """An emulator serving an e1000 on the switch (in ``nursery``), and its client."""
    device = create_device(f"e1000,mac={mac.hex(':')},netdev={name}")
    assert isinstance(device, E1000)
    [backend] = setup_netdevs([f"vde,id={name},sock={switch.directory}"], [device])
    assert isinstance(backend, VdeBackend)
    socket_path = switch.directory.parent / f"{name}.sock"
    server = DeviceServer(device, socket_path=socket_path, netdevs=[backend])
    await nursery.start(server.serve)
    client = await stack.enter_async_context(Client.connect(socket_path))
    return Nic(device, backend, client)


async def switch_port_of(switch: VdeSwitch, mac: bytes) -> int | None:
    table = await trio.to_thread.run_sync(switch.mac_table)
    return table.get(mac.hex(":"))


async def test_the_switch_learns_the_new_port_from_the_announcement(
    vde_switches: Callable[..., VdeSwitch],
) -> None:
    switch = vde_switches()
    config = DriverConfig(itr=0)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        a = await plugged_nic(stack, nursery, switch, "a", MAC_A)
        b = await plugged_nic(stack, nursery, switch, "b", MAC_B)
        # B's destination: its MAC comes with the migrated state
        b2 = await plugged_nic(stack, nursery, switch, "b2", bytes.fromhex("02000000bb02"))
        ram_a = stack.enter_context(GuestRam(config.ram_needed(), base=RAM_BASE))
        ram_b = stack.enter_context(GuestRam(config.ram_needed(), base=RAM_BASE))
        guest_a = E1000Guest(a.client, ram_a, None, config)
        guest_b = E1000Guest(b.client, ram_b, None, config)
        async with trio.open_nursery() as bring_up:
            bring_up.start_soon(guest_a.init)
            bring_up.start_soon(guest_b.init)

        def a_to_b(payload: bytes) -> bytes:
            return udp_frame(MAC_B, MAC_A, IP_A, IP_B, payload)

        # B talks: the switch puts B's MAC behind B's port.
        await guest_b.send(udp_frame(MAC_A, MAC_B, IP_B, IP_A, b"hello from b"))
        await guest_a.receive()
        assert await switch_port_of(switch, MAC_B) == b.backend.port

        await guest_b.realize_destination(b2.client)
        await migrate(guest_b.client, b2.client, mode="stop-copy")
        guest_b.migrated_to(b2.client)
        assert await get_state(b2.client) == MigState.RUNNING
        # B's guest has sent nothing since: the announcement alone moves the MAC.

        with trio.fail_after(2):
            while await switch_port_of(switch, MAC_B) != b2.backend.port:
                await trio.sleep(0.01)
        await trio.sleep(1)  # all five rounds (800 ms)
        announced = [f.data for f in guest_a.poll_rx()]
        assert announced == [announcement(MAC_B)] * 5  # peers hear them (broadcast)
        assert b2.backend.stats.tx_frames == 5
        old_port_frames = b.backend.stats.rx_frames
        await guest_a.send(a_to_b(b"after the move"))
        got = await guest_b.receive()
        assert got.data[42:56] == b"after the move"
        await trio.sleep(0.1)
        assert b.backend.stats.rx_frames == old_port_frames  # no flooding to the old port
        assert int.from_bytes(announced[0][12:14], "big") == ETH_P_RARP
        await stack.aclose()  # the clients, before the servers
        nursery.cancel_scope.cancel()
