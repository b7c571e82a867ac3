"""The server over a real UNIX socket: every command, malformed input, life cycle."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from devices import testdev as td
from devices.testdev import TestDev
from emulator.client import Client
from emulator.server import DeviceServer, ServerError, adopt_listener, create_listener
from emulator.testing.harness import ServedDevice, served_device
from protocol.constants import (
    Command,
    PciRegion,
)
from protocol.header import pack_message
from protocol.messages import (
    VersionPayload,
)
from tests.emulator.test_connection import is_closed, raw_socket, receive_message

BAR0 = PciRegion.BAR0
CONFIG = PciRegion.CONFIG


# -- clients, disconnects, sockets ---------------------------------------------------------


async def test_second_client_is_refused_without_disturbing_the_first(
    served: ServedDevice, client: Client
) -> None:
    await client.region_write(BAR0, td.REG_SCRATCH, b"\x05\x00\x00\x00")
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(9, Command.VERSION, VersionPayload(0, 2, "{}").pack()))
    header, _ = await receive_message(sock)
    assert (header.msg_id, header.is_error, header.error) == (9, True, errno.EBUSY)
    assert await is_closed(sock)
    sock.close()
    assert await client.region_read(BAR0, td.REG_SCRATCH, 4) == b"\x05\x00\x00\x00"


async def test_socket_is_private_and_removed_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "private.sock"
    async with served_device(TestDev(), tmp_path, name=path.name):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not path.exists()


def test_stale_socket_is_replaced_but_a_file_is_not(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(stale))
    old.close()  # bound, never listened: a connect is refused
    create_listener(stale).close()
    regular = tmp_path / "file.sock"
    regular.write_text("not a socket")
    with pytest.raises(ServerError):
        create_listener(regular)
    assert regular.read_text() == "not a socket"


async def test_inherited_listening_socket(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    server = DeviceServer(TestDev(), listen_fd=listener.detach())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with Client.connect(path) as client:
            assert (await client.get_info()).num_irqs == 5
        nursery.cancel_scope.cancel()
    assert path.exists()  # we did not create it, so we leave it


def test_inherited_fd_must_be_a_listening_unix_socket(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for not_listening in (a, udp):
            with pytest.raises(ServerError):
                adopt_listener(not_listening.fileno())
            os.fstat(not_listening.fileno())  # refused, and still open for its owner
    finally:
        for s in (a, b, udp):
            s.close()


async def test_trace_logs_each_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vfio_user_emu.trace")
    async with (
        served_device(TestDev(), tmp_path, trace=True) as served,
        Client.connect(served.socket_path) as client,
    ):
        await client.region_read(BAR0, 0, 4)
    lines = [r.getMessage() for r in caplog.records if r.name == "vfio_user_emu.trace"]
    assert any("VERSION cmd" in line and "json=" in line for line in lines)
    assert any(
        "REGION_READ cmd" in line and "region=0 offset=0x0 count=4" in line for line in lines
    )
    assert any("REGION_READ reply" in line for line in lines)
