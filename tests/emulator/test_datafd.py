"""Migration data over passed pipes (the ``data_fd`` extension), over a real socket.

A client that puts ``"migration": {"data_fd": true}`` in VERSION gets one end of a pipe with
the reply of every SET MIG_DEVICE_STATE that starts STOP_COPY data or opens RESUMING; the
reply's data_fd field is its index (0). Clients that did not ask see the standard protocol.
These tests run the server in-process (small RAM), so every fd the test holds is read and
written non-blocking: a blocking call would stall the server too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import stat
import struct
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

import devices.migration.engine as engine_module
from devices import lvu_sample as lvu
from devices import testdev as td
from devices.api import DetachedContext
from devices.lvu_sample import LvuSample
from devices.testdev import TestDev, TestDevOptions
from emulator.client import Client, ClientError
from emulator.client.migrate import DATA_FD_CAPABILITIES, migrate
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
    STOP,
    STOP_COPY,
)
from protocol.version import ServerCapabilities

FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
MIG_DEVICE_STATE = 2
SC, P2P, PRE = 1, 2, 4

CONFIG = PciRegion.CONFIG
CFG_INTERRUPT_LINE = 0x3C
#: What a client that does not know the extension sends.
PLAIN_CAPS: dict[str, Any] = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}
SMALL_RAM = 64 * 1024
#: Random contents: a stream several times the server's 1 MiB pipe.
BIG_RAM = 8 << 20
TIMEOUT = 15.0
#: A control request must be answered within this while a data fd is stuck or busy.
LATENCY_BOUND = 1.0

Snapshot = tuple[dict[int, int], bytes, bytes, bytes]


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def fixed_session_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every saving session gets the same session id, so two identical devices produce
    byte-identical streams (the id is random otherwise)."""
    fake_os = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if n[:2] != "__"})
    fake_os.urandom = lambda n: b"\x5a" * n
    monkeypatch.setattr(engine_module, "os", fake_os)


@asynccontextmanager
async def serve(
    tmp_path: Path,
    name: str,
    *,
    ram: int = SMALL_RAM,
    caps: int | None = None,
    capabilities: dict[str, Any] | None = None,
    server_caps: ServerCapabilities | None = None,
) -> AsyncIterator[tuple[ServedDevice, Client]]:
    """A testdev served in this trio run, with a client (by default one that negotiates
    the data_fd extension)."""
    dev = TestDev(TestDevOptions(ram_size=ram))
    if caps is not None:
        dev.set_migration_caps(caps)
    wanted = DATA_FD_CAPABILITIES if capabilities is None else capabilities
    async with (
        served_device(dev, tmp_path, name=f"{name}.sock", capabilities=server_caps) as served,
        Client.connect(served.socket_path, capabilities=wanted) as client,
    ):
        yield served, client


def dev_of(served: ServedDevice) -> TestDev:
    device = served.device
    assert isinstance(device, TestDev)
    return device


async def put_guest_state(served: ServedDevice, client: Client, seed: int) -> None:
    """Registers, config space and RAM a migration must carry (RAM: random pages, zero
    pages, and markers written through the protocol)."""
    rng = random.Random(seed)
    for i in range(td.SCRATCH_COUNT):
        await client.region_write(
            td.BAR_REGS, td.REG_SCRATCH + 4 * i, struct.pack("<I", rng.getrandbits(32))
        )
    await client.region_write(CONFIG, CFG_INTERRUPT_LINE, bytes([rng.randrange(1, 255)]))
    ram = dev_of(served).ram.buffer
    size = len(ram)
    for page in range(0, size, td.PAGE):
        if rng.random() < 0.6:  # the rest stays zero (elided in the stream)
            ram[page : page + td.PAGE] = rng.randbytes(td.PAGE)
    await client.region_write(td.BAR_RAM, 0, b"first page marker %d" % seed)
    await client.region_write(td.BAR_RAM, size - 64, b"last page marker %d" % seed)
    await client.region_write(td.BAR_REGS, td.REG_DOORBELL, struct.pack("<I", seed % 4))


def fill_random(served: ServedDevice, seed: int) -> None:
    """Incompressible RAM: the stream is about as large as RAM."""
    ram = dev_of(served).ram.buffer
    ram[:] = random.Random(seed).randbytes(len(ram))


def snapshot(served: ServedDevice) -> Snapshot:
    """Everything a migration restores: registers, RAM, config space, interrupt state."""
    dev = dev_of(served)
    return (
        dict(dev.regs.values),
        bytes(dev.ram.buffer),
        dev.config.snapshot(),
        dev.irq.snapshot(),
    )


async def get_state(client: Client) -> MigState:
    reply = await client.device_feature(FEATURE_GET | MIG_DEVICE_STATE, argsz=16)
    return MigState(struct.unpack_from("<I", reply, 8)[0])


def set_request(state: int, data_fd: int = -1, argsz: int = 16, tail: bytes = b"") -> bytes:
    return struct.pack("<IIIi", argsz, FEATURE_SET | MIG_DEVICE_STATE, state, data_fd) + tail


async def raw_set(client: Client, request: bytes) -> tuple[bytes, list[int]]:
    """SET MIG_DEVICE_STATE as raw bytes: the reply payload and the fds that came with it."""
    _, payload, fds = await client.request(Command.DEVICE_FEATURE, request)
    return payload, fds


async def go(client: Client, state: MigState) -> None:
    """SET, closing any data fd that comes with the reply."""
    fd = await client.set_mig_state(state)
    if fd is not None:
        os.close(fd)


async def errno_of(call: Awaitable[object]) -> int:
    with pytest.raises(ClientError) as info:
        await call
    return info.value.errno


async def read_to_eof(fd: int, *, timeout: float = TIMEOUT) -> bytes:
    os.set_blocking(fd, False)
    out = bytearray()
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            if not chunk:
                return bytes(out)
            out += chunk


async def read_some(fd: int, count: int) -> bytes:
    """Exactly ``count`` bytes (fails on an early EOF)."""
    os.set_blocking(fd, False)
    out = bytearray()
    with trio.fail_after(TIMEOUT):
        while len(out) < count:
            try:
                chunk = os.read(fd, count - len(out))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            assert chunk, f"EOF after {len(out)} of {count} bytes"
            out += chunk
    return bytes(out)


async def write_fd(fd: int, data: bytes) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    with trio.fail_after(TIMEOUT):
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)


async def write_segments(fd: int, data: bytes, rng: random.Random) -> int:
    """Write ``data`` in randomly sized segments (1 byte up to 1/16 of it), sometimes letting
    the server run in between; returns the number of segments."""
    sizes = [1, 2, 3, 7, 8, 63, 64, 511, 4095, 4096, 4097]
    pos = segments = 0
    while pos < len(data):
        size = rng.choice(sizes) if rng.random() < 0.9 else rng.randint(1, len(data) // 16 + 1)
        await write_fd(fd, data[pos : pos + size])
        pos += size
        segments += 1
        if rng.random() < 0.3:
            await trio.sleep(0)
    return segments


def pipe_inode(fd: int) -> int:
    info = os.fstat(fd)
    assert stat.S_ISFIFO(info.st_mode), "the data fd is not a pipe"
    return info.st_ino


def open_pipe_inodes() -> set[int]:
    """Pipes open anywhere in this process (the server runs in it too)."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("pipe:["):
            inodes.add(int(target[6:-1]))
    return inodes


def access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


async def save_via_fd(client: Client) -> bytes:
    """RUNNING/STOP -> STOP_COPY, the stream read from the passed fd, then -> STOP."""
    fd = await client.set_mig_state(STOP_COPY)
    assert fd is not None
    try:
        data = await read_to_eof(fd)
    finally:
        os.close(fd)
    assert await client.set_mig_state(STOP) is None
    return data


async def load_via_fd(client: Client, stream: bytes, seed: int = 0) -> None:
    """-> RESUMING, the stream written to the passed fd, -> STOP -> RUNNING."""
    fd = await client.set_mig_state(RESUMING)
    assert fd is not None
    try:
        await write_segments(fd, stream, random.Random(seed))
    finally:
        os.close(fd)
    assert await client.set_mig_state(STOP) is None
    assert await client.set_mig_state(RUNNING) is None


@dataclass
class Latency:
    worst: float = 0.0
    count: int = 0

    async def measure(self, request: Callable[[], Awaitable[object]]) -> None:
        began = time.perf_counter()
        with trio.fail_after(LATENCY_BOUND * 5):
            await request()
        self.worst = max(self.worst, time.perf_counter() - began)
        self.count += 1


# ---------------------------------------------------------------------------------------------
# negotiation


@pytest.mark.parametrize(
    ("migration", "negotiated"),
    [
        ({"pgsize": 4096, "data_fd": True}, True),
        ({"data_fd": True}, True),
        ({"pgsize": 4096, "data_fd": False}, False),
        ({"pgsize": 4096}, False),
        (None, False),
    ],
    ids=["asks", "asks-without-pgsize", "says-false", "no-key", "no-migration-object"],
)
async def test_version_reply_offers_data_fd_only_to_clients_that_ask(
    tmp_path: Path, migration: dict[str, Any] | None, negotiated: bool
):
    caps = dict(PLAIN_CAPS)
    if migration is not None:
        caps["migration"] = migration
    async with serve(tmp_path, "dev", capabilities=caps) as (_, client):
        assert client.data_fd_negotiated is negotiated
        offered = client.server_caps["migration"]
        if negotiated:
            assert offered == {"pgsize": 4096, "data_fd": True}
        else:
            assert offered == {"pgsize": 4096}  # exactly what the standard protocol says


async def test_a_data_fd_that_is_not_a_boolean_fails_version(tmp_path: Path):
    caps = {**PLAIN_CAPS, "migration": {"data_fd": 1}}
    async with served_device(TestDev(), tmp_path) as served:
        with pytest.raises(ClientError) as info:
            async with Client.connect(served.socket_path, capabilities=caps):
                pass
        assert info.value.command == Command.VERSION and info.value.errno == errno.EINVAL
        async with Client.connect(served.socket_path, capabilities=caps | {"migration": {}}):
            pass  # the server is fine


async def test_a_server_without_the_extension_keeps_the_standard_protocol(tmp_path: Path):
    server_caps = ServerCapabilities(migration_data_fd=False)
    async with serve(tmp_path, "dev", server_caps=server_caps) as (served, client):
        assert not client.data_fd_negotiated
        assert "data_fd" not in client.server_caps["migration"]
        await put_guest_state(served, client, 1)
        for state in (STOP_COPY, STOP, RESUMING):
            request = set_request(state)
            assert await raw_set(client, request) == (request, [])
        assert await get_state(client) == RESUMING


async def test_standard_clients_get_byte_identical_echoes_and_no_fds(tmp_path: Path):
    """Every arc, sessions included, for a client that did not ask: the reply is the
    request byte for byte (whatever its data_fd field and trailing bytes), no fd travels,
    and the stream goes in-band."""
    async with (
        serve(tmp_path, "src", caps=SC | P2P | PRE, capabilities=PLAIN_CAPS) as (served, src),
        serve(tmp_path, "dst", caps=SC | P2P | PRE, capabilities=PLAIN_CAPS) as (dst_served, dst),
    ):
        assert not src.data_fd_negotiated and not dst.data_fd_negotiated
        await put_guest_state(served, src, 2)

        async def echo(client: Client, state: MigState, data_fd: int, tail: bytes) -> None:
            request = set_request(state, data_fd, 16 + len(tail), tail)
            payload, fds = await raw_set(client, request)
            assert fds == []
            assert payload == request
            assert await get_state(client) == state

        before = snapshot(served)
        await echo(src, PRE_COPY, -1, b"")
        precopy = await read_migration_data(src)
        await echo(src, PRE_COPY_P2P, 0, b"")
        await echo(src, STOP_COPY, 7, b"")
        stream = precopy + await read_migration_data(src)
        await echo(src, STOP, 0, b"tail")
        await echo(src, STOP_COPY, -1, b"")  # a fresh session
        assert await read_migration_data(src) != b""
        await echo(src, RESUMING, 3, b"")  # STOP_COPY -> STOP -> RESUMING
        await echo(dst, RESUMING, 0, bytes(8))  # RUNNING -> RUNNING_P2P -> STOP -> RESUMING
        await write_migration_data(dst, stream)
        await echo(dst, RUNNING, 0x7FFFFFFF, b"")
        assert snapshot(dst_served) == before


async def test_a_client_that_takes_no_fds_is_not_offered_data_fds(tmp_path: Path):
    caps = {"max_msg_fds": 0, "migration": {"data_fd": True}}
    async with serve(tmp_path, "dev", capabilities=caps) as (_, client):
        offered = client.data_fd_negotiated
        fd = await client.set_mig_state(STOP_COPY)
        # Either the extension is not offered, or it works as offered.
        assert not offered or fd is not None


# ---------------------------------------------------------------------------------------------
# which arcs pass an fd


async def drive(client: Client, path: list[MigState]) -> None:
    """From RUNNING through ``path`` (closing data fds; RESUMING is left empty)."""
    await client.reset()
    for state in path:
        await go(client, state)
    assert await get_state(client) == (path[-1] if path else RUNNING)


FD_ARCS = [
    # caps, how to get to the start, target, the end the client gets
    (SC | PRE, [], STOP_COPY, os.O_RDONLY),
    (SC | PRE, [STOP], STOP_COPY, os.O_RDONLY),
    (SC | PRE, [PRE_COPY], STOP_COPY, os.O_RDONLY),
    (SC, [], STOP_COPY, os.O_RDONLY),
    (SC | P2P | PRE, [], STOP_COPY, os.O_RDONLY),
    (SC | P2P | PRE, [RUNNING_P2P], STOP_COPY, os.O_RDONLY),
    (SC | P2P | PRE, [PRE_COPY], STOP_COPY, os.O_RDONLY),
    (SC | P2P | PRE, [PRE_COPY_P2P], STOP_COPY, os.O_RDONLY),
    (SC | PRE, [STOP], RESUMING, os.O_WRONLY),
    (SC | PRE, [], RESUMING, os.O_WRONLY),
    (SC | PRE, [PRE_COPY], RESUMING, os.O_WRONLY),
    (SC | PRE, [STOP_COPY], RESUMING, os.O_WRONLY),
    (SC | P2P | PRE, [], RESUMING, os.O_WRONLY),
    (SC | P2P | PRE, [PRE_COPY_P2P], RESUMING, os.O_WRONLY),
]


@pytest.mark.parametrize(
    ("caps", "path", "target", "mode"),
    FD_ARCS,
    ids=[
        f"caps{c}-{'-'.join(s.name for s in [RUNNING, *p])}-to-{t.name}" for c, p, t, _ in FD_ARCS
    ],
)
async def test_fd_passed_when_the_arcs_start_a_session(
    tmp_path: Path, caps: int, path: list[MigState], target: MigState, mode: int
):
    async with serve(tmp_path, "dev", caps=caps) as (_, client):
        await drive(client, path)
        request = set_request(target)
        payload, fds = await raw_set(client, request)
        try:
            assert len(fds) == 1
            # Only the data_fd field differs from the request: the index of the fd (0).
            assert payload == request[:12] + struct.pack("<i", 0)
            pipe_inode(fds[0])
            assert access_mode(fds[0]) == mode
        finally:
            for fd in fds:
                os.close(fd)
        assert await get_state(client) == target


NO_FD_ARCS = [
    (SC | PRE, [], RUNNING),
    (SC | PRE, [], STOP),
    (SC | PRE, [STOP], RUNNING),
    (SC | PRE, [STOP], STOP),
    (SC | PRE, [], PRE_COPY),
    (SC | PRE, [PRE_COPY], RUNNING),
    (SC | PRE, [PRE_COPY], STOP),
    (SC | PRE, [PRE_COPY], PRE_COPY),
    (SC | PRE, [STOP_COPY], STOP),
    (SC | PRE, [STOP_COPY], RUNNING),
    (SC | PRE, [STOP_COPY], STOP_COPY),
    (SC | PRE, [RESUMING], RESUMING),
    (SC | P2P | PRE, [], RUNNING_P2P),
    (SC | P2P | PRE, [], PRE_COPY_P2P),
    (SC | P2P | PRE, [PRE_COPY], PRE_COPY_P2P),
    (SC | P2P | PRE, [STOP_COPY], RUNNING_P2P),
]


@pytest.mark.parametrize(
    ("caps", "path", "target"),
    NO_FD_ARCS,
    ids=[
        f"caps{c}-{'-'.join(s.name for s in [RUNNING, *p])}-to-{t.name}" for c, p, t in NO_FD_ARCS
    ],
)
async def test_no_fd_on_other_arcs(
    tmp_path: Path, caps: int, path: list[MigState], target: MigState
):
    async with serve(tmp_path, "dev", caps=caps) as (_, client):
        for data_fd in (-1, 5):
            await drive(client, path)
            request = set_request(target, data_fd)
            payload, fds = await raw_set(client, request)
            assert fds == []
            assert payload == request[:12] + struct.pack("<i", -1)
            assert await get_state(client) == target


async def test_resuming_to_stop_with_a_valid_stream_passes_no_fd(tmp_path: Path):
    async with serve(tmp_path, "src") as (served, src), serve(tmp_path, "dst") as (_, dst):
        await put_guest_state(served, src, 3)
        stream = await save_via_fd(src)
        fd = await dst.set_mig_state(RESUMING)
        assert fd is not None
        await write_fd(fd, stream)
        os.close(fd)
        request = set_request(STOP)
        assert await raw_set(dst, request) == (request[:12] + struct.pack("<i", -1), [])


async def test_a_failed_set_passes_no_fd(tmp_path: Path):
    async with serve(tmp_path, "dev") as (_, client):
        for target in (ERROR, RUNNING_P2P, 8):  # not requestable / not supported / no state
            assert await errno_of(raw_set(client, set_request(target))) == errno.EINVAL
        await go(client, STOP_COPY)
        assert await errno_of(raw_set(client, set_request(PRE_COPY))) == errno.EINVAL
        assert await get_state(client) == STOP_COPY


# ---------------------------------------------------------------------------------------------
# what flows over the fd


@pytest.mark.usefixtures("fixed_session_id")
@pytest.mark.parametrize("start", [RUNNING, STOP])
@pytest.mark.parametrize("caps", [SC | PRE, SC | P2P | PRE, SC], ids=["sc+pre", "all", "sc"])
async def test_stop_copy_fd_carries_exactly_the_in_band_stream(
    tmp_path: Path, start: MigState, caps: int
):
    """Two identical devices: one read through the fd, the other in-band."""
    async with (
        serve(tmp_path, "fd", caps=caps) as (served_a, by_fd),
        serve(tmp_path, "inband", caps=caps, capabilities=PLAIN_CAPS) as (served_b, in_band),
    ):
        await put_guest_state(served_a, by_fd, 4)
        await put_guest_state(served_b, in_band, 4)
        if start == STOP:
            await go(by_fd, STOP)
            await go(in_band, STOP)
        assert snapshot(served_a) == snapshot(served_b)
        fd = await by_fd.set_mig_state(STOP_COPY)
        assert fd is not None
        from_fd = await read_to_eof(fd)
        os.close(fd)
        await go(in_band, STOP_COPY)
        expected = await read_migration_data(in_band)
        assert len(from_fd) > 4 * td.PAGE
        assert from_fd == expected
        assert await by_fd.set_mig_state(STOP) is None


@pytest.mark.usefixtures("fixed_session_id")
@pytest.mark.parametrize("read_precopy", [True, False], ids=["precopy-read", "precopy-unread"])
@pytest.mark.parametrize("caps", [SC | PRE, SC | P2P | PRE], ids=["sc+pre", "all"])
async def test_pre_copy_then_stop_copy_over_the_fd(tmp_path: Path, read_precopy: bool, caps: int):
    """PRE_COPY data goes in-band (no fd for RUNNING -> PRE_COPY); PRE_COPY -> STOP_COPY
    passes an fd carrying the rest, exactly what in-band reads would return. Pre-copy data
    left unread comes first on the fd. The whole stream restores a destination."""
    async with (
        serve(tmp_path, "fd", caps=caps) as (served_a, by_fd),
        serve(tmp_path, "inband", caps=caps, capabilities=PLAIN_CAPS) as (served_b, in_band),
        serve(tmp_path, "dst", caps=caps) as (served_dst, dst),
    ):
        for served, client in ((served_a, by_fd), (served_b, in_band)):
            await put_guest_state(served, client, 5)
            assert await client.set_mig_state(PRE_COPY) is None
        precopy = b""
        if read_precopy:
            precopy = await read_migration_data(by_fd)
            assert precopy == await read_migration_data(in_band)
            assert precopy
        for client in (by_fd, in_band):
            # The guest keeps running: dirty a page and a register after the first pass.
            await client.region_write(td.BAR_RAM, 3 * td.PAGE, b"dirtied during pre-copy")
            await client.region_write(td.BAR_REGS, td.REG_SCRATCH, b"\x01\x02\x03\x04")
        fd = await by_fd.set_mig_state(STOP_COPY)
        assert fd is not None
        rest = await read_to_eof(fd)
        os.close(fd)
        await go(in_band, STOP_COPY)
        assert rest == await read_migration_data(in_band)
        await load_via_fd(dst, precopy + rest, seed=5)
        assert snapshot(served_dst) == snapshot(served_a)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("start", [RUNNING, STOP])
async def test_resume_from_the_fd_in_random_segments(tmp_path: Path, seed: int, start: MigState):
    """RESUMING -> STOP validates and applies the stream written to the fd in any
    segmentation exactly as the same stream written in-band."""
    async with (
        serve(tmp_path, "src") as (served_src, src),
        serve(tmp_path, "dst-fd") as (served_fd, by_fd),
        serve(tmp_path, "dst-inband", capabilities=PLAIN_CAPS) as (served_ib, in_band),
    ):
        await put_guest_state(served_src, src, 10 + seed)
        source = snapshot(served_src)
        stream = await save_via_fd(src)
        if start == STOP:
            await go(by_fd, STOP)
        fd = await by_fd.set_mig_state(RESUMING)
        assert fd is not None
        assert access_mode(fd) == os.O_WRONLY
        segments = await write_segments(fd, stream, random.Random(seed))
        assert segments > 20
        os.close(fd)
        assert await by_fd.set_mig_state(STOP) is None
        assert await by_fd.set_mig_state(RUNNING) is None
        await go(in_band, RESUMING)
        await write_migration_data(in_band, stream)
        await go(in_band, RUNNING)
        assert snapshot(served_fd) == source
        assert snapshot(served_fd) == snapshot(served_ib)
        # Through the protocol too.
        for client in (by_fd, src):
            assert await client.region_read(td.BAR_RAM, 0, 32) == source[1][:32]
        assert await by_fd.region_read(CONFIG, 0, 256) == source[2][:256]


async def test_resume_without_closing_the_write_end(tmp_path: Path):
    """A client that writes the whole stream but keeps its end open: RESUMING -> STOP
    takes what is in the pipe. Our end is closed afterwards (the client gets EPIPE)."""
    async with serve(tmp_path, "src") as (served_src, src), serve(tmp_path, "dst") as (s, dst):
        await put_guest_state(served_src, src, 20)
        stream = await save_via_fd(src)
        fd = await dst.set_mig_state(RESUMING)
        assert fd is not None
        try:
            await write_fd(fd, stream)
            assert await dst.set_mig_state(STOP) is None
            assert snapshot(s) == snapshot(served_src)
            with pytest.raises(BrokenPipeError):
                os.write(fd, b"more")
        finally:
            os.close(fd)


async def test_migrate_over_fds_in_process(tmp_path: Path):
    async with (
        serve(tmp_path, "src", ram=1 << 20) as (served_src, src),
        serve(tmp_path, "dst", ram=1 << 20) as (served_dst, dst),
    ):
        await put_guest_state(served_src, src, 21)
        source = snapshot(served_src)
        report = await migrate(src, dst, transport="fd")
        assert report.stop_copy_bytes == report.bytes_moved > (1 << 20) // 2
        assert await get_state(src) == STOP and await get_state(dst) == RUNNING
        assert snapshot(served_dst) == source


# ---------------------------------------------------------------------------------------------
# session lifetime


async def test_leaving_stop_copy_closes_our_end_even_with_data_unread(tmp_path: Path):
    async with (
        serve(tmp_path, "dev", ram=BIG_RAM) as (served, client),
        serve(tmp_path, "twin", ram=BIG_RAM) as (_, twin),
    ):
        fill_random(served, 30)
        fd = await client.set_mig_state(STOP_COPY)
        assert fd is not None
        inode = pipe_inode(fd)
        await trio.sleep(0.05)  # the server fills the pipe and waits
        assert await client.set_mig_state(STOP) is None
        assert await read_to_eof(fd) == b""  # what was in the pipe is discarded: EOF
        os.close(fd)
        assert inode not in open_pipe_inodes()
        # The device still gives the whole stream.
        whole = await save_via_fd(client)
        assert len(whole) > BIG_RAM
        assert await get_state(twin) == RUNNING


@pytest.mark.parametrize("leave", ["running", "reset", "new client"])
async def test_unread_stream_left_in_the_pipe_never_shows_later_ram(tmp_path: Path, leave: str):
    """Device RAM goes into the pipe by reference (vmsplice): bytes still in the pipe once
    STOP_COPY is left would show the RAM as it is when read, e.g. another client's data.
    The pipe is emptied when the session ends, before the device can change."""
    dev = TestDev(TestDevOptions(ram_size=BIG_RAM))
    async with served_device(dev, tmp_path, name="dev.sock") as served:
        fill_random(served, 32)
        async with Client.connect(served.socket_path, capabilities=DATA_FD_CAPABILITIES) as a:
            fd = await a.set_mig_state(STOP_COPY)
            assert fd is not None
            first = await read_some(fd, 64 << 10)
            await trio.sleep(0.05)  # the server fills the pipe and waits
            if leave == "running":
                assert await a.set_mig_state(RUNNING) is None
            elif leave == "reset":
                await a.reset()
        if leave == "new client":
            with trio.fail_after(TIMEOUT):
                while served.server.active is not None:
                    await trio.sleep(0.01)
        async with Client.connect(served.socket_path, capabilities=DATA_FD_CAPABILITIES):
            # The next user's RAM (whatever the device's state now, e.g. still STOP_COPY).
            dev_of(served).ram.buffer[:] = b"\xa5" * BIG_RAM
            rest = await read_to_eof(fd)
            os.close(fd)
        assert len(first) == 64 << 10
        assert rest == b""


async def test_each_session_gets_a_new_pipe(tmp_path: Path):
    async with serve(tmp_path, "dev") as (served, client):
        await put_guest_state(served, client, 31)
        first = await client.set_mig_state(STOP_COPY)
        assert first is not None
        first_inode = pipe_inode(first)
        stream = await read_to_eof(first)
        await go(client, STOP)
        second = await client.set_mig_state(STOP_COPY)
        assert second is not None
        assert pipe_inode(second) != first_inode
        assert len(await read_to_eof(second)) == len(stream)
        assert await read_to_eof(first) == b""
        # STOP_COPY -> RESUMING: the saving pipe ends, a resuming pipe (write end) comes.
        third = await client.set_mig_state(RESUMING)
        assert third is not None
        assert access_mode(third) == os.O_WRONLY
        assert pipe_inode(third) not in (first_inode, pipe_inode(second))
        assert await read_to_eof(second) == b""
        await write_fd(third, stream)
        os.close(third)
        assert await client.set_mig_state(RUNNING) is None
        fourth = await client.set_mig_state(RESUMING)
        assert fourth is not None
        assert pipe_inode(fourth) != first_inode
        for fd in (first, second, fourth):
            os.close(fd)


async def test_a_set_to_the_current_state_keeps_the_session(tmp_path: Path):
    async with serve(tmp_path, "src") as (served, src), serve(tmp_path, "dst") as (s, dst):
        await put_guest_state(served, src, 32)
        fd = await src.set_mig_state(STOP_COPY)
        assert fd is not None
        assert await src.set_mig_state(STOP_COPY) is None
        stream = await read_to_eof(fd)
        os.close(fd)
        wfd = await dst.set_mig_state(RESUMING)
        assert wfd is not None
        await write_fd(wfd, stream[:1000])
        assert await dst.set_mig_state(RESUMING) is None
        await write_fd(wfd, stream[1000:])
        os.close(wfd)
        assert await dst.set_mig_state(RUNNING) is None
        assert snapshot(s) == snapshot(served)


async def test_in_band_refused_while_an_fd_carries_the_session(tmp_path: Path):
    async with (
        serve(tmp_path, "src", ram=BIG_RAM) as (served, src),
        serve(tmp_path, "dst") as (
            _,
            dst,
        ),
    ):
        fill_random(served, 33)
        fd = await src.set_mig_state(STOP_COPY)
        assert fd is not None
        await trio.sleep(0.05)
        assert await errno_of(src.mig_data_read(4096)) == errno.EINVAL
        await read_some(fd, 1 << 20)
        assert await errno_of(src.mig_data_read(4096)) == errno.EINVAL
        os.close(fd)
        wfd = await dst.set_mig_state(RESUMING)
        assert wfd is not None
        assert await errno_of(dst.mig_data_write(b"x" * 100)) == errno.EINVAL
        await write_fd(wfd, b"garbage")
        assert await errno_of(dst.mig_data_write(b"x" * 100)) == errno.EINVAL
        os.close(wfd)
        await trio.sleep(0.05)  # the server saw EOF
        assert await errno_of(dst.mig_data_write(b"x" * 100)) == errno.EINVAL
        assert await get_state(dst) == RESUMING


async def test_in_band_refused_after_the_fd_delivered_the_whole_stream(tmp_path: Path):
    async with serve(tmp_path, "dev") as (served, client):
        await put_guest_state(served, client, 34)
        fd = await client.set_mig_state(STOP_COPY)
        assert fd is not None
        assert await read_to_eof(fd) != b""
        os.close(fd)
        assert await errno_of(client.mig_data_read(4096)) == errno.EINVAL


async def test_device_reset_ends_a_saving_session(tmp_path: Path):
    async with serve(tmp_path, "dev", ram=BIG_RAM) as (served, client):
        fill_random(served, 35)
        fd = await client.set_mig_state(STOP_COPY)
        assert fd is not None
        await trio.sleep(0.05)
        await client.reset()
        assert await get_state(client) == RUNNING
        leftover = await read_to_eof(fd)
        os.close(fd)
        assert len(leftover) < BIG_RAM  # only what was already in the pipe


async def test_device_reset_ends_a_resuming_session(tmp_path: Path):
    async with serve(tmp_path, "dev") as (_, client):
        fd = await client.set_mig_state(RESUMING)
        assert fd is not None
        try:
            await write_fd(fd, b"partial stream")
            await client.reset()
            assert await get_state(client) == RUNNING
            await trio.sleep(0.05)
            with pytest.raises(BrokenPipeError):
                os.write(fd, b"x")
        finally:
            os.close(fd)


async def test_a_refused_set_keeps_the_resuming_session(tmp_path: Path):
    async with serve(tmp_path, "src") as (served, src), serve(tmp_path, "dst") as (s, dst):
        await put_guest_state(served, src, 36)
        stream = await save_via_fd(src)
        fd = await dst.set_mig_state(RESUMING)
        assert fd is not None
        try:
            await write_fd(fd, stream[:100])
            assert await errno_of(raw_set(dst, set_request(8))) == errno.EINVAL
            assert await get_state(dst) == RESUMING
            await write_fd(fd, stream[100:])
        finally:
            os.close(fd)
        assert await dst.set_mig_state(RUNNING) is None
        assert snapshot(s) == snapshot(served)


# ---------------------------------------------------------------------------------------------
# the control socket keeps answering


async def control_requests(client: Client, latency: Latency, rounds: int) -> None:
    for _ in range(rounds):
        await latency.measure(lambda: get_state(client))
        await latency.measure(lambda: client.region_read(CONFIG, 0, 64))
        await latency.measure(lambda: client.region_read(td.BAR_REGS, td.REG_ID, 4))


async def test_control_socket_answers_while_the_client_does_not_read(tmp_path: Path):
    """The pipe is full and nobody reads it: GET state and config reads on the same
    connection, and a second device served in the same trio run, all keep answering."""
    async with (
        serve(tmp_path, "stuck", ram=BIG_RAM) as (served, stuck),
        serve(tmp_path, "other") as (served_other, other),
        serve(tmp_path, "other-dst") as (served_other_dst, other_dst),
    ):
        fill_random(served, 40)
        source = snapshot(served)
        fd = await stuck.set_mig_state(STOP_COPY)
        assert fd is not None
        await trio.sleep(0.1)  # the server has filled the pipe and waits for room
        latency = Latency()
        await control_requests(stuck, latency, 50)
        assert await get_state(stuck) == STOP_COPY
        # Another device: a full migration over data fds, while the first pipe stays full.
        await put_guest_state(served_other, other, 41)
        other_state = snapshot(served_other)
        with trio.fail_after(TIMEOUT):
            await migrate(other, other_dst, transport="fd")
        assert snapshot(served_other_dst) == other_state
        await control_requests(other_dst, latency, 20)
        await control_requests(stuck, latency, 20)
        assert latency.worst < LATENCY_BOUND, f"worst control latency {latency.worst:.3f}s"
        # The stuck stream is still whole once the client reads it.
        stream = await read_to_eof(fd)
        os.close(fd)
        assert await stuck.set_mig_state(STOP) is None
        await stuck.reset()
        await load_via_fd(stuck, stream)
        assert snapshot(served) == source


async def test_control_socket_answers_while_a_stream_flows(tmp_path: Path):
    """A slow reader: control requests are interleaved with the transfer."""
    async with serve(tmp_path, "dev", ram=BIG_RAM) as (served, client):
        fill_random(served, 42)
        fd = await client.set_mig_state(STOP_COPY)
        assert fd is not None
        os.set_blocking(fd, False)
        latency = Latency()
        received = bytearray()
        answered_mid_stream = 0
        done = trio.Event()

        async def slow_reader() -> None:
            with trio.fail_after(TIMEOUT * 4):
                while True:
                    try:
                        chunk = os.read(fd, 256 * 1024)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(fd)
                        continue
                    if not chunk:
                        break
                    received.extend(chunk)
                    await trio.sleep(0.005)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            while not done.is_set():
                await control_requests(client, latency, 1)
                if not done.is_set():
                    answered_mid_stream += 1
        os.close(fd)
        assert answered_mid_stream >= 5
        assert latency.worst < LATENCY_BOUND, f"worst control latency {latency.worst:.3f}s"
        assert len(received) > BIG_RAM
        assert await client.set_mig_state(STOP) is None


# ---------------------------------------------------------------------------------------------
# misbehaving clients


@pytest.mark.parametrize("read_first", [0, 100_000, 1 << 20])
async def test_client_closes_the_read_end_early(tmp_path: Path, read_first: int):
    async with (
        serve(tmp_path, "src", ram=BIG_RAM) as (served, src),
        serve(tmp_path, "dst", ram=BIG_RAM) as (served_dst, dst),
    ):
        fill_random(served, 50)
        await src.region_write(td.BAR_REGS, td.REG_SCRATCH, b"\x11\x22\x33\x44")
        before = snapshot(served)
        fd = await src.set_mig_state(STOP_COPY)
        assert fd is not None
        inode = pipe_inode(fd)
        if read_first:
            await read_some(fd, read_first)
        os.close(fd)
        await trio.sleep(0.05)  # the server's writer meets EPIPE
        assert await get_state(src) == STOP_COPY
        assert await src.region_read(CONFIG, 0, 4) == before[2][:4]
        assert await src.set_mig_state(STOP) is None
        assert inode not in open_pipe_inodes()
        assert snapshot(served) == before
        assert await src.set_mig_state(RUNNING) is None
        assert snapshot(served) == before
        # The source still migrates whole.
        await migrate(src, dst, transport="fd")
        assert snapshot(served_dst) == before


BAD_STREAMS: dict[str, Callable[[bytes], bytes]] = {
    "nothing": lambda s: b"",
    "garbage": lambda s: random.Random(1).randbytes(len(s)),
    "one-byte": lambda s: s[:1],
    "header-only": lambda s: s[:64],
    "truncated-half": lambda s: s[: len(s) // 2],
    "truncated-trailer": lambda s: s[:-1],
    "trailing-garbage": lambda s: s + b"\0",
    "flipped-byte": lambda s: s[:5000] + bytes([s[5000] ^ 0x40]) + s[5001:],
}


@pytest.mark.parametrize("target", [STOP, RUNNING])
@pytest.mark.parametrize("kind", BAD_STREAMS)
async def test_destination_refuses_a_bad_stream_and_stays_unchanged(
    tmp_path: Path, kind: str, target: MigState
):
    async with serve(tmp_path, "src") as (served, src), serve(tmp_path, "dst") as (s, dst):
        await put_guest_state(served, src, 60)
        stream = await save_via_fd(src)
        await put_guest_state(s, dst, 61)  # a destination with state of its own
        before = snapshot(s)
        config = await dst.region_read(CONFIG, 0, 256)
        fd = await dst.set_mig_state(RESUMING)
        assert fd is not None
        inode = pipe_inode(fd)
        await write_segments(fd, BAD_STREAMS[kind](stream), random.Random(kind))
        os.close(fd)
        assert await errno_of(dst.set_mig_state(target)) == errno.EINVAL
        assert await get_state(dst) == RESUMING
        assert inode not in open_pipe_inodes()
        assert snapshot(s) == before
        assert await dst.region_read(CONFIG, 0, 256) == config
        # Still serving: a reset, then a good stream over a new pipe.
        await dst.reset()
        assert await get_state(dst) == RUNNING
        await load_via_fd(dst, stream)
        assert snapshot(s) == snapshot(served)


async def test_a_stream_from_another_geometry_is_refused(tmp_path: Path):
    async with (
        serve(tmp_path, "src", ram=2 * SMALL_RAM) as (served, src),
        serve(tmp_path, "dst") as (s, dst),
    ):
        await put_guest_state(served, src, 62)
        stream = await save_via_fd(src)
        before = snapshot(s)
        fd = await dst.set_mig_state(RESUMING)
        assert fd is not None
        await write_fd(fd, stream)
        os.close(fd)
        assert await errno_of(dst.set_mig_state(STOP)) == errno.EINVAL
        assert await get_state(dst) == RESUMING
        assert snapshot(s) == before


async def test_bytes_past_the_resume_limit_fail_the_load(tmp_path: Path):
    async with serve(tmp_path, "src") as (served, src), serve(tmp_path, "dst") as (s, dst):
        await put_guest_state(served, src, 63)
        stream = await save_via_fd(src)
        dev_of(s).migration.max_resume = len(stream)
        before = snapshot(s)
        fd = await dst.set_mig_state(RESUMING)
        assert fd is not None
        await write_fd(fd, stream + b"trailing bytes the destination never validates")
        os.close(fd)
        await trio.sleep(0.05)
        assert await errno_of(dst.set_mig_state(STOP)) in (errno.EINVAL, errno.EFBIG)
        assert snapshot(s) == before


async def test_a_stream_past_the_resume_limit_is_refused(tmp_path: Path):
    async with serve(tmp_path, "src") as (served, src), serve(tmp_path, "dst") as (s, dst):
        await put_guest_state(served, src, 64)
        stream = await save_via_fd(src)
        dev_of(s).migration.max_resume = len(stream) // 2
        before = snapshot(s)
        fd = await dst.set_mig_state(RESUMING)
        assert fd is not None
        await write_fd(fd, stream)
        os.close(fd)
        assert await errno_of(dst.set_mig_state(STOP)) in (errno.EINVAL, errno.EFBIG)
        assert await get_state(dst) == RESUMING
        assert snapshot(s) == before


def os_for_datafd(monkeypatch: pytest.MonkeyPatch, **replaced: Callable[..., Any]) -> None:
    """emulator.datafd sees ``os`` with some calls replaced (the rest of the process not)."""
    from emulator import datafd

    fake_os = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if n[:2] != "__"})
    for name, call in replaced.items():
        setattr(fake_os, name, call)
    monkeypatch.setattr(datafd, "os", fake_os)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_a_resume_without_room_to_reserve_staging_maps_on_demand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """RLIMIT_FSIZE/RLIMIT_AS below the stream limit: the staging's big reservation fails,
    and the resume still works (its bytes are mapped when they are read)."""

    def ftruncate(fd: int, length: int) -> None:
        if length > 1 << 30:
            raise OSError(errno.EFBIG, "File too large")
        os.ftruncate(fd, length)

    async with serve(tmp_path, "src") as (served, src), serve(tmp_path, "dst") as (s, dst):
        await put_guest_state(served, src, 65)
        stream = await save_via_fd(src)
        os_for_datafd(monkeypatch, ftruncate=ftruncate)
        await load_via_fd(dst, stream)
        assert snapshot(s) == snapshot(served)
    no_tracebacks(caplog)


async def test_no_staging_at_all_is_a_clean_errno_and_the_device_stays_in_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    def memfd_create(name: str, flags: int = 0) -> int:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    async with serve(tmp_path, "src") as (served, src), serve(tmp_path, "dst") as (s, dst):
        await put_guest_state(served, src, 66)
        stream = await save_via_fd(src)
        await go(dst, STOP)
        os_for_datafd(monkeypatch, memfd_create=memfd_create)
        assert await errno_of(dst.set_mig_state(RESUMING)) == errno.ENOMEM
        assert await get_state(dst) == STOP
        assert dev_of(s).migration.resuming is None  # undone, nothing half-open
        monkeypatch.undo()
        fd = await dst.set_mig_state(RESUMING)
        assert fd is not None
        await write_fd(fd, stream)
        os.close(fd)
        assert await dst.set_mig_state(STOP) is None
        assert snapshot(s) == snapshot(served)
    no_tracebacks(caplog)


async def test_a_client_that_disconnects_mid_transfer_leaves_the_server_healthy(
    tmp_path: Path,
):
    dev = TestDev(TestDevOptions(ram_size=BIG_RAM))
    async with served_device(dev, tmp_path, name="dev.sock") as served:
        fill_random(served, 70)
        before = snapshot(served)
        # A saving session abandoned with the stream half read and the fd still open.
        async with Client.connect(served.socket_path, capabilities=DATA_FD_CAPABILITIES) as c:
            fd = await c.set_mig_state(STOP_COPY)
            assert fd is not None
            await read_some(fd, 300_000)
        rest = await read_to_eof(fd)  # the server closed its end: EOF, not a hang
        os.close(fd)
        assert len(rest) < BIG_RAM
        # A resuming session abandoned mid-write.
        async with Client.connect(served.socket_path, capabilities=DATA_FD_CAPABILITIES) as c:
            assert await get_state(c) == STOP_COPY
            assert await c.set_mig_state(STOP) is None
            fd = await c.set_mig_state(RESUMING)
            assert fd is not None
            await write_fd(fd, b"VFUSTATE" + bytes(5000))
        with trio.fail_after(TIMEOUT):
            while True:  # our end goes away with the connection: EPIPE
                try:
                    os.write(fd, b"x")
                except BrokenPipeError:
                    break
                await trio.sleep(0.01)
        os.close(fd)
        # A new client: the device kept its state (RESUMING, nothing loaded); reset works.
        async with Client.connect(served.socket_path, capabilities=DATA_FD_CAPABILITIES) as c:
            assert await get_state(c) == RESUMING
            assert snapshot(served) == before
            await c.reset()
            assert await get_state(c) == RUNNING
            assert await c.region_read(td.BAR_REGS, td.REG_ID, 4) == struct.pack("<I", td.ID_VALUE)
            assert not any(dev_of(served).ram.buffer)  # the reset cleared RAM
            stream = await save_via_fd(c)
            assert stream.startswith(b"VFUSTATE") and stream[-16:].startswith(b"END!")


async def big_stream(tmp_path: Path, seed: int) -> tuple[bytes, bytes]:
    """The stop-copy stream of a BIG_RAM testdev with random RAM, and that RAM."""
    async with serve(tmp_path, f"src{seed}", ram=BIG_RAM) as (served, src):
        fill_random(served, seed)
        return await save_via_fd(src), bytes(dev_of(served).ram.buffer)


async def resume_part(client: Client, device: TestDev, transport: str, part: bytes) -> None:
    """-> RESUMING and ``part`` of a stream written over the data fd or in-band; returns
    once the device took it all in (applied in place as it arrives)."""
    if transport == "fd":
        fd = await client.set_mig_state(RESUMING)
        assert fd is not None
        await write_fd(fd, part)
        os.close(fd)
    else:
        await go(client, RESUMING)
        await write_migration_data(client, part)
    with trio.fail_after(TIMEOUT):
        while (session := device.migration.resuming) is None or session.size < len(part):
            await trio.sleep(0.01)


async def detached(device: TestDev) -> None:
    """Wait until the server has torn the client's connection down."""
    with trio.fail_after(TIMEOUT):
        while not isinstance(device.context, DetachedContext):
            await trio.sleep(0.01)


async def load_in_band(client: Client, stream: bytes) -> None:
    """-> RESUMING, the stream in-band, -> STOP -> RUNNING (a client without data fds)."""
    await go(client, RESUMING)
    await write_migration_data(client, stream)
    await go(client, STOP)
    await go(client, RUNNING)


def caps_for(transport: str) -> dict[str, Any]:
    return DATA_FD_CAPABILITIES if transport == "fd" else PLAIN_CAPS


@pytest.mark.parametrize("transport", ["fd", "inband"])
async def test_a_resume_cut_by_a_disconnect_leaves_ram_as_it_was(tmp_path: Path, transport: str):
    """Most of a valid stream is written (its RAM sections are applied in place as they
    arrive), then the client goes: the destination keeps RESUMING with its old RAM."""
    stream, source_ram = await big_stream(tmp_path, 71)
    dev = TestDev(TestDevOptions(ram_size=BIG_RAM))
    async with served_device(dev, tmp_path, name="dst.sock") as s:
        fill_random(s, 72)
        before = snapshot(s)
        async with Client.connect(s.socket_path, capabilities=caps_for(transport)) as c:
            await go(c, STOP)
            await resume_part(c, dev, transport, stream[: len(stream) * 3 // 4])
            assert snapshot(s)[1] != before[1]  # applied in place while it arrives
        await detached(dev)
        assert snapshot(s) == before
        async with Client.connect(s.socket_path, capabilities=DATA_FD_CAPABILITIES) as c:
            assert await get_state(c) == RESUMING
            await c.reset()
            await load_via_fd(c, stream)
            assert bytes(dev.ram.buffer) == source_ram


@pytest.mark.parametrize("transport", ["fd", "inband"])
async def test_a_reset_in_resuming_leaves_zeros_not_the_old_ram(tmp_path: Path, transport: str):
    """Most of a stream applied in place over a non-zero RAM, then DEVICE_RESET: the
    reset's zeros win (the resume is undone before the reset, not after it)."""
    stream, _ = await big_stream(tmp_path, 73)
    async with serve(tmp_path, "dst", ram=BIG_RAM, capabilities=caps_for(transport)) as (s, dst):
        fill_random(s, 74)
        await resume_part(dst, dev_of(s), transport, stream[: len(stream) * 3 // 4])
        assert any(dev_of(s).ram.buffer)
        await dst.reset()
        assert await get_state(dst) == RUNNING
        assert not any(dev_of(s).ram.buffer)


async def test_a_disconnect_mid_resume_needs_no_new_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """The client goes mid-resume while no memfd can be made (EMFILE): the teardown takes
    back what was applied and starts the session over in the staging it has (nothing to
    allocate, nothing to fail), and the next client resumes into it without a reset."""
    stream, source_ram = await big_stream(tmp_path, 75)
    dev = TestDev(TestDevOptions(ram_size=BIG_RAM))
    async with served_device(dev, tmp_path, name="dst.sock") as s:
        fill_random(s, 76)
        before = snapshot(s)
        async with Client.connect(s.socket_path, capabilities=PLAIN_CAPS) as c:
            await resume_part(c, dev, "inband", stream[: len(stream) // 2])
            fds_before = set(os.listdir("/proc/self/fd"))  # the session's staging included

            def memfd_create(name: str, flags: int = 0) -> int:
                raise OSError(errno.EMFILE, "Too many open files")

            os_for_datafd(monkeypatch, memfd_create=memfd_create)
        await detached(dev)
        assert snapshot(s) == before
        assert set(os.listdir("/proc/self/fd")) <= fds_before
        async with Client.connect(s.socket_path, capabilities=PLAIN_CAPS) as c:
            assert await get_state(c) == RESUMING
            await write_migration_data(c, stream)
            await go(c, STOP)
            assert bytes(dev.ram.buffer) == source_ram
        no_tracebacks(caplog)


async def test_a_stream_another_codec_decodes_whole_is_staged_from_the_fd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """lvu-sample's raw codec is not our envelope: its stream is spliced into the staging
    memfd as it arrives and decoded at RESUMING -> STOP (the data-fd path that stages)."""
    from emulator.datafd import MemfdStaging

    spliced: list[int] = []
    fill_from = MemfdStaging.fill_from

    def counted(staging: MemfdStaging, source: int, count: int) -> int:
        spliced.append(fill_from(staging, source, count))
        return spliced[-1]

    monkeypatch.setattr(MemfdStaging, "fill_from", counted)
    source, destination = LvuSample(), LvuSample()
    pattern = random.Random(77).randbytes(len(source.bar1.buffer))
    source.bar1.buffer[:] = pattern
    async with (
        served_device(source, tmp_path, name="src.sock") as src,
        served_device(destination, tmp_path, name="dst.sock") as dst,
        Client.connect(src.socket_path, capabilities=DATA_FD_CAPABILITIES) as src_client,
        Client.connect(dst.socket_path, capabilities=DATA_FD_CAPABILITIES) as dst_client,
    ):
        await src_client.region_write(lvu.BAR_TIME, 0, struct.pack("<Q", 1234))
        report = await migrate(src_client, dst_client, transport="fd")
    assert report.stop_copy_bytes == sum(spliced) == len(pattern) + 8
    assert bytes(destination.bar1.buffer) == pattern
    assert destination.time_value == 1234


def test_only_large_pieces_of_mappings_go_by_reference() -> None:
    """vmsplice (the pipe refers to the pages) only for large pieces of a memory mapping,
    i.e. device RAM; Python objects the allocator may reuse are always copied."""
    import mmap

    from devices.migration import fastpath
    from emulator import datafd

    memory = mmap.mmap(-1, 1 << 20)
    try:
        view = memoryview(memory)
        expected = fastpath.vmsplice if fastpath.vmsplice_available() else os.write
        assert datafd._writer_for(view[4096:], STOP_COPY) is expected
        assert datafd._writer_for(view[: datafd.VMSPLICE_MIN - 1], STOP_COPY) is os.write
        assert datafd._writer_for(memoryview(bytes(1 << 20)), STOP_COPY) is os.write
        assert datafd._writer_for(memoryview(bytearray(1 << 20)), STOP_COPY) is os.write
        view.release()
    finally:
        memory.close()


def test_staging_takes_spliced_bytes_after_written_ones() -> None:
    from emulator.datafd import MemfdStaging

    staging = MemfdStaging()
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"first ")
        staging.append(b"0123")
        assert staging.fill_from(read_end, 100) == 6 and staging.size == 10
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            staging.fill_from(read_end, 100)
        os.close(write_end)
        write_end = -1
        assert not staging.fill_from(read_end, 100)  # EOF
        view = staging.view()
        assert bytes(view) == b"0123first "
        view.release()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        staging.close()
