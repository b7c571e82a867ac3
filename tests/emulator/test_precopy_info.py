"""The ``precopy_info`` extension over a real socket: MIG_GET_PRECOPY_INFO (19) and a pre-copy
data fd opened where the kernel opens its data_fd (docs/qemu-migration.md).

A client that sends ``"migration": {"precopy_info": true}`` may ask a device in PRE_COPY for
the kernel's ``struct vfio_precopy_info``; if it also negotiated ``data_fd``, the SET that
opens the saving session (RUNNING -> PRE_COPY) returns the pipe, and the sizes count what
waits in it, so a reader that takes that many bytes never blocks and (0, 0) says "nothing
more for now" (the kernel's ENOMSG). This is what the patched QEMU does.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from devices import testdev as td
from emulator.client import Client
from emulator.testing.harness import read_migration_data, write_migration_data
from protocol.constants import MigState

from .test_datafd import (
    PLAIN_CAPS,
    errno_of,
    put_guest_state,
    read_some,
    read_to_eof,
    serve,
    snapshot,
)

PRECOPY_CAPS: dict[str, Any] = {
    **PLAIN_CAPS,
    "migration": {"pgsize": 4096, "data_fd": True, "precopy_info": True},
}
INBAND_PRECOPY_CAPS: dict[str, Any] = {
    **PLAIN_CAPS,
    "migration": {"pgsize": 4096, "precopy_info": True},
}


@pytest.mark.parametrize(
    ("migration", "offered"),
    [
        ({"data_fd": True, "precopy_info": True}, {"data_fd": True, "precopy_info": True}),
        ({"precopy_info": True}, {"precopy_info": True}),
        ({"precopy_info": False}, {}),
        ({}, {}),
    ],
    ids=["both", "precopy-info", "says-false", "neither"],
)
async def test_version_offers_precopy_info_only_to_clients_that_ask(
    tmp_path: Path, migration: dict[str, Any], offered: dict[str, bool]
):
    caps = {**PLAIN_CAPS, "migration": migration}
    async with serve(tmp_path, "dev", capabilities=caps) as (_, client):
        assert client.server_caps["migration"] == {"pgsize": 4096, **offered}


async def test_precopy_info_without_the_extension_is_refused(tmp_path: Path):
    caps = {**PLAIN_CAPS, "migration": {"data_fd": True}}
    async with serve(tmp_path, "dev", capabilities=caps) as (_, client):
        assert await client.set_mig_state(MigState.PRE_COPY) is None  # in-band pre-copy
        assert await errno_of(client.mig_precopy_info()) == errno.EINVAL
        assert await client.mig_data_read(1 << 16)  # the session is fine


@pytest.mark.parametrize("state", [MigState.RUNNING, MigState.STOP, MigState.STOP_COPY])
async def test_precopy_info_outside_pre_copy_is_einval(tmp_path: Path, state: MigState):
    async with serve(tmp_path, "dev", capabilities=INBAND_PRECOPY_CAPS) as (_, client):
        await client.set_mig_state(state)
        assert await errno_of(client.mig_precopy_info()) == errno.EINVAL


async def test_inband_pre_copy_sizes_count_down_to_nothing_for_now(tmp_path: Path):
    async with serve(tmp_path, "dev", capabilities=INBAND_PRECOPY_CAPS) as (served, client):
        await put_guest_state(served, client, seed=3)
        assert await client.set_mig_state(MigState.PRE_COPY) is None
        initial, dirty = await client.mig_precopy_info()
        assert initial > 0 and dirty == 0
        first = await client.mig_data_read(initial // 2)
        assert len(first) == initial // 2
        assert await client.mig_precopy_info() == (initial - len(first), 0)
        await read_migration_data(client)
        assert await client.mig_precopy_info() == (0, 0)  # the kernel's ENOMSG


async def test_pre_copy_over_the_data_fd_as_qemu_reads_it(tmp_path: Path):
    """RUNNING -> PRE_COPY returns the pipe; reading exactly what MIG_GET_PRECOPY_INFO
    announces never blocks and leaves the pipe empty; a device change shows up as dirty
    bytes; PRE_COPY -> STOP_COPY keeps the pipe, which then ends with the rest. The stream
    read this way restores the device exactly."""
    async with (
        serve(tmp_path, "src", capabilities=PRECOPY_CAPS) as (source, src),
        serve(tmp_path, "dst", capabilities=PLAIN_CAPS) as (destination, dst),
    ):
        await put_guest_state(source, src, seed=5)
        fd = await src.set_mig_state(MigState.PRE_COPY)
        assert fd is not None
        try:
            stream = bytearray()
            initial, dirty = await src.mig_precopy_info()
            assert initial > 0 and dirty == 0
            stream += await read_some(fd, initial)
            assert await src.mig_precopy_info() == (0, 0)
            with pytest.raises(BlockingIOError):
                os.read(fd, 1)  # nothing more in the pipe than announced

            # the device changes while it runs in PRE_COPY
            await src.region_write(td.BAR_RAM, 8192, b"changed in pre-copy")
            await src.region_write(td.BAR_REGS, td.REG_SCRATCH, struct.pack("<I", 0xFEED))
            initial, dirty = await src.mig_precopy_info()
            assert initial == 0 and dirty > 0
            stream += await read_some(fd, dirty)

            assert await src.set_mig_state(MigState.STOP_COPY) is None  # the same pipe
            stream += await read_to_eof(fd)
        finally:
            os.close(fd)
        assert await src.set_mig_state(MigState.STOP) is None
        expected = snapshot(source)

        await dst.set_mig_state(MigState.RESUMING)
        await write_migration_data(dst, bytes(stream))
        await dst.set_mig_state(MigState.STOP)
        assert snapshot(destination) == expected


async def test_leaving_pre_copy_ends_the_pipe(tmp_path: Path):
    """A failed migration (PRE_COPY -> RUNNING) closes our end: the reader sees EOF after
    whatever it had not read."""
    async with serve(tmp_path, "dev", capabilities=PRECOPY_CAPS) as (served, client):
        await put_guest_state(served, client, seed=7)
        fd = await client.set_mig_state(MigState.PRE_COPY)
        assert fd is not None
        try:
            await client.mig_precopy_info()
            assert await client.set_mig_state(MigState.RUNNING) is None
            assert await read_to_eof(fd) == b""  # discarded, then EOF
        finally:
            os.close(fd)
        assert isinstance(client, Client)
