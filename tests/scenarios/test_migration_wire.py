"""Migration v2 over a real socket: DEVICE_FEATURE, MIG_DATA_READ / MIG_DATA_WRITE,
DEVICE_RESET, region gating, and faults, as a vfio-user client sees them (facts 8.2)."""

from __future__ import annotations

import errno
import random
import struct
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar

import pytest
import trio

from devices import testdev as td
from devices.errors import DeviceError
from devices.migration.stream import decode
from devices.testdev import TestDev
from emulator.client import Client, ClientError
from emulator.testing.harness import (
    ServedDevice,
    read_migration_data,
    served_device,
    write_migration_data,
)
from protocol.constants import Command, MigState, PciRegion
from protocol.migration_fsm import (
    ERROR,
    PRE_COPY,
    PRE_COPY_P2P,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    SAVING_STATES,
    STOP,
    STOP_COPY,
)
from tests.protocol.test_migration_fsm import ref_shortest_paths, ref_states

FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18
MIGRATION = 1
MIG_DEVICE_STATE = 2

SC, P2P, PRE = 1, 2, 4
CAP_SETS = {"sc": SC, "sc+p2p": SC | P2P, "sc+pre": SC | PRE, "all": SC | P2P | PRE}

BAR_REGS, BAR_RAM, BAR_MSIX, CONFIG = 0, 2, 4, PciRegion.CONFIG
CFG_INTERRUPT_LINE = 0x3C

Arc = tuple[MigState, MigState]


class FaultDev(TestDev):
    """TestDev whose migration_arc fails for chosen arcs."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.fail: set[Arc] = set()
        self.err = errno.EIO

    def migration_arc(self, arc: tuple[MigState, MigState]) -> None:
        if arc in self.fail:
            raise DeviceError(self.err, f"injected failure of {arc}")


@asynccontextmanager
async def serve(
    tmp_path: Path, device: TestDev | None = None, caps: int | None = None, **client_kw: object
) -> AsyncIterator[tuple[ServedDevice, Client]]:
    dev = device if device is not None else TestDev()
    if caps is not None:
        dev.set_migration_caps(caps)
    async with (
        served_device(dev, tmp_path, name=f"m{id(dev)}.sock") as served,
        Client.connect(served.socket_path, **client_kw) as client,  # type: ignore[arg-type]
    ):
        yield served, client


def state_msg(state: int, data_fd: int = -1, argsz: int = 16) -> bytes:
    return struct.pack("<IIIi", argsz, FEATURE_SET | MIG_DEVICE_STATE, state, data_fd)


async def raw_feature(client: Client, payload: bytes) -> bytes:
    _, reply, fds = await client.request(Command.DEVICE_FEATURE, payload)
    assert fds == []
    return reply


async def set_state(client: Client, state: int) -> None:
    request = state_msg(state)
    assert await raw_feature(client, request) == request


async def get_state(client: Client) -> int:
    reply = await client.device_feature(FEATURE_GET | MIG_DEVICE_STATE, argsz=16)
    argsz, flags, state, _fd = struct.unpack("<IIIi", reply)
    assert (argsz, flags) == (16, FEATURE_GET | MIG_DEVICE_STATE)
    return int(state)


async def errno_of(call: object) -> int:
    with pytest.raises(ClientError) as info:
        await call  # type: ignore[misc]
    return info.value.errno


async def stream_of(client: Client) -> bytes:
    """A complete stream taken from the device itself (leaves it RUNNING)."""
    await client.reset()
    await set_state(client, STOP_COPY)
    stream = await read_migration_data(client)
    await client.reset()
    return stream


async def drive_to(client: Client, state: MigState, stream: bytes) -> None:
    await client.reset()
    if state != RUNNING:
        await set_state(client, state)
    if state == RESUMING:
        await write_migration_data(client, stream)
    assert await get_state(client) == state


# ---------------------------------------------------------------------------------------------
# DEVICE_FEATURE


async def test_get_migration_default_caps(tmp_path: Path):
    async with serve(tmp_path) as (_, client):
        reply = await client.device_feature(FEATURE_GET | MIGRATION, argsz=16)
        assert reply == struct.pack("<IIQ", 16, 0x10001, 5)
        # A larger argsz: the reply still declares its own 16 bytes.
        reply = await raw_feature(client, struct.pack("<II", 64, 0x10001))
        assert reply == struct.pack("<IIQ", 16, 0x10001, 5)


@pytest.mark.parametrize("caps", CAP_SETS.values(), ids=CAP_SETS.keys())
async def test_get_migration_advertises_configured_caps(tmp_path: Path, caps: int):
    async with serve(tmp_path, caps=caps) as (_, client):
        reply = await client.device_feature(FEATURE_GET | MIGRATION, argsz=16)
        assert reply == struct.pack("<IIQ", 16, 0x10001, caps)


async def test_probe_echoes_the_request(tmp_path: Path):
    async with serve(tmp_path) as (_, client):
        for flags, data in [
            (FEATURE_PROBE | FEATURE_GET | MIGRATION, b""),
            (FEATURE_PROBE | FEATURE_GET | MIGRATION, bytes(8)),
            (FEATURE_PROBE | FEATURE_GET | MIG_DEVICE_STATE, b""),
            (FEATURE_PROBE | FEATURE_SET | MIG_DEVICE_STATE, struct.pack("<Ii", 1, -1)),
            (FEATURE_PROBE | FEATURE_GET | FEATURE_SET | MIG_DEVICE_STATE, b""),
            (FEATURE_PROBE | MIGRATION, b""),
        ]:
            request = struct.pack("<II", 8 + len(data), flags) + data
            assert await raw_feature(client, request) == request, hex(flags)
        # Probing a SET does not change the state.
        assert await get_state(client) == RUNNING


async def test_device_feature_einval_cases(tmp_path: Path):
    async with serve(tmp_path) as (_, client):
        bad = [
            # PROBE of an operation the feature does not have
            struct.pack("<II", 8, FEATURE_PROBE | FEATURE_SET | MIGRATION),
            # GET and SET together without PROBE
            struct.pack("<IIIi", 16, FEATURE_GET | FEATURE_SET | MIG_DEVICE_STATE, 1, -1),
            # SET on a GET-only feature
            struct.pack("<IIQ", 16, FEATURE_SET | MIGRATION, 5),
            # no operation at all
            struct.pack("<II", 16, MIGRATION),
            # unknown features
            struct.pack("<II", 16, FEATURE_GET | 3),
            struct.pack("<II", 16, FEATURE_GET | 0xFFFF),
            struct.pack("<II", 16, FEATURE_PROBE | FEATURE_GET | 0x1234),
            # unknown flag bits
            struct.pack("<II", 16, (1 << 19) | FEATURE_GET | MIGRATION),
            # argsz too small for the GET reply / below the request / below 8
            struct.pack("<II", 15, FEATURE_GET | MIGRATION),
            struct.pack("<II", 8, FEATURE_GET | MIGRATION),
            struct.pack("<II", 12, FEATURE_GET | MIG_DEVICE_STATE),
            state_msg(STOP, argsz=15),
            struct.pack("<II", 4, FEATURE_GET | MIGRATION),
            # SET without the state
            struct.pack("<III", 12, FEATURE_SET | MIG_DEVICE_STATE, 1),
            # payload shorter than argsz+flags
            struct.pack("<I", 16),
        ]
        for request in bad:
            assert await errno_of(raw_feature(client, request)) == errno.EINVAL, request.hex()
        assert await get_state(client) == RUNNING


async def test_set_reply_is_the_request_byte_for_byte(tmp_path: Path):
    async with serve(tmp_path) as (_, client):
        for state, data_fd, argsz in [
            (STOP, -1, 16),
            (RUNNING, 7, 16),
            (STOP, 0, 16),
            (RUNNING, 0x7FFFFFFF, 32),
        ]:
            request = state_msg(state, data_fd, argsz)
            assert await raw_feature(client, request) == request
            assert await get_state(client) == state
        # Trailing bytes beyond the 8 bytes of state are echoed too.
        request = struct.pack("<IIIi", 24, FEATURE_SET | MIG_DEVICE_STATE, STOP, -1) + b"x" * 8
        assert await raw_feature(client, request) == request


async def test_get_state_reports_the_state(tmp_path: Path):
    async with serve(tmp_path) as (_, client):
        reply = await client.device_feature(FEATURE_GET | MIG_DEVICE_STATE, argsz=16)
        assert len(reply) == 16 and struct.unpack_from("<I", reply, 8)[0] == RUNNING
        for state in (STOP, STOP_COPY, STOP, RESUMING):
            await set_state(client, state)
            assert await get_state(client) == state


# ---------------------------------------------------------------------------------------------
# Every (from, to) over the socket


@pytest.mark.parametrize("caps", [SC | PRE, SC | P2P | PRE, SC], ids=["sc+pre", "all", "sc"])
async def test_every_pair_over_the_socket(tmp_path: Path, caps: int):
    async with serve(tmp_path, caps=caps) as (_, client):
        stream = await stream_of(client)
        for start in sorted(ref_states(caps)):
            for target in [*MigState, 8, 2**32 - 1]:
                await drive_to(client, start, stream)
                goal = MigState(target) if target in MigState._value2member_map_ else None
                valid = goal is not None and ref_shortest_paths(caps, start, goal) is not None
                if valid:
                    await set_state(client, target)
                    assert await get_state(client) == target, (start, target)
                else:
                    err = await errno_of(set_state(client, target))
                    assert err == errno.EINVAL, (start, target)
                    assert await get_state(client) == start, (start, target)


# ---------------------------------------------------------------------------------------------
# MIG_DATA_READ / MIG_DATA_WRITE


async def test_data_read_only_in_saving_states(tmp_path: Path):
    async with serve(tmp_path, caps=SC | P2P | PRE) as (_, client):
        stream = await stream_of(client)
        for state in MigState:
            if state == ERROR:
                continue
            await drive_to(client, state, stream)
            if state in SAVING_STATES:
                assert await client.mig_data_read(64), state
            else:
                assert await errno_of(client.mig_data_read(64)) == errno.EINVAL, state
            assert await get_state(client) == state


async def test_data_write_only_in_resuming(tmp_path: Path):
    async with serve(tmp_path, caps=SC | P2P | PRE) as (_, client):
        stream = await stream_of(client)
        for state in MigState:
            if state in (ERROR, RESUMING):
                continue
            await drive_to(client, state, stream)
            assert await errno_of(client.mig_data_write(stream[:64])) == errno.EINVAL, state
        await drive_to(client, STOP, stream)
        await set_state(client, RESUMING)
        await client.mig_data_write(stream[:64])


async def test_data_read_size_limits(tmp_path: Path):
    caps = {"max_msg_fds": 16, "max_data_xfer_size": 4096}
    async with serve(tmp_path, capabilities=caps) as (_, client):
        await set_state(client, STOP_COPY)
        assert await errno_of(client.mig_data_read(4097)) == errno.EINVAL
        assert len(await client.mig_data_read(4096)) == 4096
        # argsz must cover 8 + size
        request = struct.pack("<II", 8 + 99, 100)
        assert await errno_of(client.request(Command.MIG_DATA_READ, request)) == errno.EINVAL
        assert await errno_of(client.request(Command.MIG_DATA_READ, b"\0" * 4)) == errno.EINVAL


async def test_data_read_reply_framing(tmp_path: Path):
    """libvfio-user framing: payload = 8 + requested size (zero padded), argsz = 8 + valid
    bytes, size = valid bytes; the end of the STOP_COPY stream is size 0."""
    async with serve(tmp_path) as (_, client):
        await set_state(client, STOP_COPY)
        want = 4000
        total = b""
        sizes = []
        while True:
            request = struct.pack("<II", 8 + want, want)
            _, payload, fds = await client.request(Command.MIG_DATA_READ, request)
            assert fds == []
            assert len(payload) == 8 + want
            argsz, size = struct.unpack_from("<II", payload)
            assert argsz == 8 + size and size <= want
            assert payload[8 + size :] == bytes(want - size)
            sizes.append(size)
            if size == 0:
                break
            total += payload[8 : 8 + size]
        assert sizes[-1] == 0 and all(s == want for s in sizes[:-2])
        assert sizes[-2] > 0  # the last non-empty chunk may be short
        # Still 0 afterwards; the stream is what a typed read of a fresh session gives.
        assert await client.mig_data_read(want) == b""
        assert len(total) > 4096  # registers, config space and the (elided) RAM BAR


async def test_pre_copy_empty_read_then_new_data(tmp_path: Path):
    async with (
        serve(tmp_path, caps=SC | PRE) as (_, source),
        serve(tmp_path, caps=SC | PRE) as (dst_served, dest),
    ):
        await source.region_write(BAR_RAM, 0x0, b"\x11" * 32)
        await set_state(source, PRE_COPY)
        stream = await read_migration_data(source)
        assert stream
        assert await source.mig_data_read(4096) == b""  # nothing more for now
        assert await get_state(source) == PRE_COPY  # not the end: still PRE_COPY
        # The device keeps running in PRE_COPY: a RAM write makes new data.
        await source.region_write(BAR_RAM, 0x3000, b"\xaa" * 64)
        more = await read_migration_data(source)
        assert more
        assert await source.mig_data_read(4096) == b""
        await source.region_write(BAR_RAM, 0x5000, b"\xbb" * 8)
        await set_state(source, STOP_COPY)
        rest = await read_migration_data(source)
        assert rest
        assert await source.mig_data_read(4096) == b""
        # The whole stream resumes on another device with all three writes.
        await set_state(dest, RESUMING)
        await write_migration_data(dest, stream + more + rest, chunk=5000)
        await set_state(dest, RUNNING)
        assert await dest.region_read(BAR_RAM, 0x0, 32) == b"\x11" * 32
        assert await dest.region_read(BAR_RAM, 0x3000, 64) == b"\xaa" * 64
        assert await dest.region_read(BAR_RAM, 0x5000, 8) == b"\xbb" * 8
        assert dst_served.device.migration.state == RUNNING


async def read_reply_sizes(client: Client, want: int) -> list[int]:
    """Sizes of raw MIG_DATA_READ replies of ``want`` bytes, up to the first short one."""
    sizes: list[int] = []
    while not sizes or sizes[-1] == want:
        request = struct.pack("<II", 8 + want, want)
        _, payload, _ = await client.request(Command.MIG_DATA_READ, request)
        sizes.append(struct.unpack_from("<II", payload)[1])
    return sizes


@pytest.mark.parametrize("want", [1 << 20, 4000])
async def test_pre_copy_replies_are_full_while_data_is_available(tmp_path: Path, want: int):
    """A reply shorter than asked means "no more data for now" (spec): PRE_COPY replies
    fill across the device's sections (1 MiB RAM pieces with their framing) until the
    initial pass is out, like STOP_COPY's."""
    device = TestDev(td.TestDevOptions(ram_size=4 << 20))
    device.ram.buffer[:] = random.Random(7).randbytes(4 << 20)  # nothing to elide
    caps = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}
    async with serve(tmp_path, device, caps=SC | PRE, capabilities=caps) as (_, client):
        await set_state(client, PRE_COPY)
        sizes = await read_reply_sizes(client, want)
        assert sum(sizes) > 4 << 20  # the whole initial pass came before the short reply
        assert all(size == want for size in sizes[:-1]) and sizes[-1] < want
        assert await client.mig_data_read(want) == b""  # nothing more until RAM changes
        await client.region_write(BAR_RAM, 0x1000, b"\x5a" * 16)
        assert 4096 < sum(await read_reply_sizes(client, want)) < 8192  # one changed page


# ---------------------------------------------------------------------------------------------
# DEVICE_RESET, region gating, faults


async def test_reset_from_every_state(tmp_path: Path):
    async with serve(tmp_path, caps=SC | P2P | PRE) as (_, client):
        stream = await stream_of(client)
        for state in MigState:
            if state == ERROR:
                continue
            await drive_to(client, state, stream)
            await client.reset()
            assert await get_state(client) == RUNNING, state
            await set_state(client, STOP)  # usable again
            assert await get_state(client) == STOP


async def test_reset_leaves_error(tmp_path: Path):
    dev = FaultDev()
    async with serve(tmp_path, dev) as (_, client):
        dev.fail = {(STOP, STOP_COPY), (STOP, RUNNING)}
        dev.err = errno.ENOSPC
        assert await errno_of(set_state(client, STOP_COPY)) == errno.ENOSPC
        assert await get_state(client) == ERROR
        for target in (STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY, ERROR):
            assert await errno_of(set_state(client, target)) == errno.EINVAL
        assert await errno_of(client.mig_data_read(16)) == errno.EINVAL
        dev.fail.clear()
        await client.reset()
        assert await get_state(client) == RUNNING
        await set_state(client, STOP_COPY)
        assert await read_migration_data(client)


async def test_fault_reply_carries_the_arc_errno(tmp_path: Path):
    dev = FaultDev()
    async with serve(tmp_path, dev, caps=SC | P2P | PRE) as (_, client):
        cases: Iterable[tuple[Arc, int, MigState, MigState]] = [
            ((RUNNING_P2P, STOP), errno.ENOSPC, RUNNING, STOP_COPY),
            ((STOP, STOP_COPY), errno.EIO, RUNNING, STOP_COPY),
            ((RUNNING, PRE_COPY), errno.EBUSY, RUNNING, PRE_COPY),
            ((PRE_COPY_P2P, STOP_COPY), errno.EAGAIN, PRE_COPY, STOP_COPY),
        ]
        for arc, err, start, goal in cases:
            dev.fail.clear()
            await client.reset()
            if start != RUNNING:
                await set_state(client, start)
            dev.fail, dev.err = {arc}, err
            assert await errno_of(set_state(client, goal)) == err, arc
            assert await get_state(client) == start, arc  # unwound
            dev.fail.clear()
            await set_state(client, goal)
            assert await get_state(client) == goal


@pytest.mark.parametrize("state", [STOP_COPY, RESUMING], ids=["STOP_COPY", "RESUMING"])
async def test_bar_writes_refused_config_writes_accepted(tmp_path: Path, state: MigState):
    async with serve(tmp_path) as (_, client):
        await set_state(client, state)
        one = (1).to_bytes(4, "little")
        for region, offset in [(BAR_REGS, td.REG_SCRATCH), (BAR_RAM, 0), (BAR_MSIX, td.PBA_OFFSET)]:
            assert await errno_of(client.region_write(region, offset, one)) == errno.EINVAL
        # Config space stays writable (kernel: config/MSI-X accesses work in every state).
        await client.region_write(CONFIG, CFG_INTERRUPT_LINE, b"\x0b")
        assert await client.region_read(CONFIG, CFG_INTERRUPT_LINE, 1) == b"\x0b"
        # So does the MSI-X table.
        await client.region_write(BAR_MSIX, 0, (0xFEE00000).to_bytes(4, "little"))
        assert await client.region_read(BAR_MSIX, 0, 4) == (0xFEE00000).to_bytes(4, "little")
        # BAR reads are fine, and nothing was written.
        assert await client.region_read(BAR_REGS, td.REG_SCRATCH, 4) == bytes(4)
        assert await get_state(client) == state


async def test_bar_writes_accepted_in_stop_and_pre_copy(tmp_path: Path):
    async with serve(tmp_path) as (_, client):
        for state in (STOP, RUNNING, PRE_COPY):
            await set_state(client, state)
            await client.region_write(BAR_REGS, td.REG_SCRATCH, state.to_bytes(4, "little"))
            assert await client.region_read(BAR_REGS, td.REG_SCRATCH, 4) == state.to_bytes(
                4, "little"
            )


class NoMigrationDev(TestDev):
    """A device model that cannot migrate (``migration_caps`` = 0)."""

    __test__ = False
    migration_caps: ClassVar[int] = 0


async def test_device_without_migration_is_served(tmp_path: Path):
    with trio.fail_after(2):
        async with serve(tmp_path, NoMigrationDev()) as (_, client):
            await client.region_write(BAR_REGS, td.REG_SCRATCH, b"\x01\0\0\0")
            assert await client.region_read(BAR_REGS, td.REG_SCRATCH, 4) == b"\x01\0\0\0"
            # Every feature is refused (libvfio-user: EINVAL without migration callbacks).
            for request in (
                struct.pack("<II", 16, FEATURE_GET | MIGRATION),
                struct.pack("<II", 8, FEATURE_PROBE | FEATURE_GET | MIGRATION),
                state_msg(STOP),
            ):
                assert await errno_of(raw_feature(client, request)) == errno.EINVAL
            assert await errno_of(client.mig_data_read(16)) == errno.EINVAL
            await client.reset()


async def test_pipelined_requests_are_served_in_order(tmp_path: Path) -> None:
    """Commands that arrive while a deferred one (a SET) and the backlog behind it are being
    worked off queue behind that backlog: MIG_DATA_READs sent without waiting for replies
    (as the migration driver pipelines them) return the stream in order. (A race: several
    attempts make it likely that some late request arrives mid-backlog.)"""
    size = 4 << 20
    device = TestDev(td.TestDevOptions(ram_size=size))
    device.ram.buffer[:] = random.Random(3).randbytes(size)  # no zero page: a long stream
    async with serve(tmp_path, device) as (_, client):
        for _attempt in range(6):
            stream = await pipelined_stop_copy_read(client, size)
            await set_state(client, RUNNING)  # keeps the RAM (a reset would clear it)
            sections = decode(stream, device_type="testdev", max_model_version=9)[1]
            ram = b"".join(bytes(payload) for name, payload in sections if name.startswith("ram"))
            assert len(ram) > size  # all of it, in order (else a checksum disagrees)


async def pipelined_stop_copy_read(client: Client, size: int, chunk: int = 64 * 1024) -> bytes:
    set_sent = await client.send_request(Command.DEVICE_FEATURE, state_msg(STOP_COPY))
    early = [await client.mig_data_read_send(chunk) for _ in range(24)]  # behind the SET
    pieces = [bytes(await client.mig_data_read_reply(early[0], chunk))]
    # The backlog is being worked off now (its replies fill the socket): more requests.
    late = [await client.mig_data_read_send(chunk) for _ in range(size // chunk)]
    await set_sent.reply()
    for sent in early[1:] + late:
        pieces.append(bytes(await client.mig_data_read_reply(sent, chunk)))
    return b"".join(pieces)
