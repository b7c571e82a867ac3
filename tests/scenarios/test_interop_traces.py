"""Replaying real clients' requests (the interop traces in tests/data/interop) against our server.

The traces were captured between independent implementations: libvfio-user's sample client,
and QEMU 10.2's ``vfio-user-pci``. Their client->server messages are sent here byte for byte
(fds replaced by our own memfd / eventfds) over a real UNIX socket to a DeviceServer serving
``testdev``, and every reply is checked against what those clients require of its framing:
same msg_id and command, the REPLY type, header-only errors, exact payload sizes
(vfio-user-facts 1.5, 10.1, 10.3, 11; qemu-wire 8). The trace devices are not testdev, so
device-specific values are only checked where testdev's answer is known.

Requests are pipelined the way the trace shows them: a client message is sent when the
trace shows it, and one reply is read where the trace shows the real server's reply, so
QEMU's bursts of up to 8 DMA_MAP/UNMAP go out back to back before any reply is read.
"""

from __future__ import annotations

import errno
import json
import mmap
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.testdev import DEVICE_ID, VENDOR_ID, TestDev
from emulator.testing.harness import EventFd, GuestRam, RawReply, RawWire, served_device
from protocol.constants import (
    FLAG_ERROR,
    HEADER_SIZE,
    Command,
    DeviceFlags,
    IrqIndex,
    MsgType,
    PciRegion,
    RegionFlags,
)
from protocol.header import Header, pack_message
from protocol.messages import (
    DeviceInfo,
    DmaMap,
    IrqInfo,
    RegionAccess,
    RegionData,
    RegionInfo,
    SparseMmapCap,
    unpack_region_caps,
)
from tests import traces
from tests.traces import LVU_CLIENT, QEMU_E1000, QEMU_GPIO, QEMU_GPIO_NOFD, TraceMessage

GUEST_RAM_SIZE = 512 * 1024 * 1024  # the traces' QEMU guests: -m 512M, memfd RAM
MAX_REPLY = 2 * 1024 * 1024
# Requests the test makes up itself (QEMU's region-info re-query, the final sync probe)
# use ids from here, far from the traces' ids.
OWN_IDS = 0xF000

TESTDEV_MMAP_REGION = 2  # BAR2, RAM behind a memfd
ROM_SIZING_PATTERN = 0xFFFFF800
PCI_ROM_ADDRESS = 0x30
PCI_INTERRUPT_PIN = 0x3D


# --------------------------------------------------------------------------------------------
# The client end of one connection


@asynccontextmanager
async def connect_testdev(directory: Path) -> AsyncIterator[RawWire]:
    """A fresh testdev served on a UNIX socket, and our raw connection to it."""
    async with served_device(TestDev(), directory) as served:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(served.socket_path))
        wire = RawWire(sock, max_message=MAX_REPLY)
        try:
            yield wire
        finally:
            wire.close()


def own_request(msg_id: int, command: int, payload: bytes) -> TraceMessage:
    """A request the test sends in a trace client's name (not in the trace)."""
    raw = pack_message(msg_id, command, payload)
    return TraceMessage(-1, "test", True, Header.unpack(raw), payload, 0, "(made up)")


class FdStandIns:
    """Our fds in place of the ones a trace's client passed: guest RAM for DMA_MAP
    (one sparse 512 MiB memfd, as QEMU's memory-backend-memfd), a fresh eventfd per
    SET_IRQS."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram
        self.eventfds: list[EventFd] = []

    def for_request(self, msg: TraceMessage) -> list[int]:
        if msg.nfds == 0:
            return []
        assert msg.nfds == 1, f"{msg}: {msg.nfds} fds"
        if msg.command == Command.DMA_MAP:
            dma = DmaMap.unpack(msg.payload)
            assert dma.offset + dma.size <= self.ram.size, f"{msg}: beyond the guest RAM memfd"
            return [self.ram.fd]
        if msg.command == Command.DEVICE_SET_IRQS:
            eventfd = EventFd()
            self.eventfds.append(eventfd)
            return [eventfd.fd]
        raise AssertionError(f"{msg}: no stand-in for its fd")

    def close(self) -> None:
        for eventfd in self.eventfds:
            eventfd.close()
        self.eventfds.clear()


@pytest.fixture
def guest_ram():
    with GuestRam(GUEST_RAM_SIZE) as ram:
        yield ram


@pytest.fixture
async def stand_ins(guest_ram):
    # async: EventFd.close() tells trio about the fd, which needs the trio run.
    fds = FdStandIns(guest_ram)
    yield fds
    fds.close()


# --------------------------------------------------------------------------------------------
# Checks shared by every reply


def errno_name(number: int) -> str:
    return errno.errorcode.get(number, str(number))


def check_reply_header(request: TraceMessage, reply: RawReply) -> None:
    """msg_id echo, REPLY type, consistent size; errors are header-only with an errno."""
    h = reply.header
    where = f"{request} -> {reply.describe()}"
    assert h.msg_id == request.msg_id, (
        f"{where}: the next message is not this request's reply (a reply to a posted write,"
        " or replies out of order?)"
    )
    assert h.command == request.command, where
    assert h.msg_type == MsgType.REPLY, where
    assert h.flags & ~(MsgType.REPLY | FLAG_ERROR) == 0, f"{where}: stray flag bits"
    assert h.size == HEADER_SIZE + len(reply.payload), where
    if h.is_error:
        assert h.error > 0, f"{where}: error flag without an errno"
        assert h.size == HEADER_SIZE, f"{where}: error replies must be header-only"
        assert not reply.fds, f"{where}: fds with an error reply"
    else:
        assert h.error == 0, f"{where}: errno without the error flag"


def region_of(request: TraceMessage) -> int | None:
    if request.command in (Command.REGION_READ, Command.REGION_WRITE):
        return RegionAccess.unpack(request.payload).region
    return None


def must_succeed(request: TraceMessage) -> bool:
    """Everything QEMU sends at realize/reset must work on any PCI device; accesses to BARs
    the trace's device had may fail on testdev (header-only error, which check_* verify)."""
    region = region_of(request)
    return region is None or region == PciRegion.CONFIG


def check_qemu_reply(request: TraceMessage, reply: RawReply, *, required: bool) -> None:
    """The size rules of QEMU's client (qemu-wire 8, facts 1.5): a reply never exceeds the
    buffer QEMU reserved, and has the exact shape its command needs."""
    check_reply_header(request, reply)
    h, payload, where = reply.header, reply.payload, f"{request} -> {reply.describe()}"
    if h.is_error:
        assert not required, f"{where}: failed with {errno_name(h.error)}"
        return
    command = request.command
    if command != Command.DEVICE_GET_REGION_INFO:
        assert not reply.fds, f"{where}: QEMU takes fds only with GET_REGION_INFO"
    if command == Command.VERSION:
        check_qemu_version(request, reply)
    elif command == Command.DEVICE_GET_INFO:
        assert h.size == 32, where
        device = DeviceInfo.unpack(payload)
        assert device.flags & DeviceFlags.PCI, where
        assert 8 <= device.num_regions <= 100, where
        assert 3 <= device.num_irqs <= 50, where
    elif command == Command.DEVICE_GET_REGION_INFO:
        asked = RegionInfo.unpack(request.payload)
        assert h.size <= HEADER_SIZE + asked.argsz, f"{where}: larger than QEMU's buffer"
        info = RegionInfo.unpack(payload)
        assert info.index == asked.index, where
        assert len(payload) == min(info.argsz, asked.argsz), where
        assert len(reply.fds) <= 1, where
        if info.flags & RegionFlags.CAPS and len(payload) == info.argsz:
            assert 32 <= info.cap_offset <= asked.argsz, where
        if reply.fds:
            assert info.flags & RegionFlags.CAPS and len(payload) == info.argsz, (
                f"{where}: an fd only goes with the full (caps) reply"
            )
    elif command == Command.DEVICE_GET_IRQ_INFO:
        assert h.size == 32, where
        assert IrqInfo.unpack(payload).index == IrqInfo.unpack(request.payload).index, where
    elif command == Command.REGION_READ:
        asked_access = RegionAccess.unpack(request.payload)
        assert h.size == 32 + asked_access.count, where
        data = RegionData.unpack(payload)
        assert (data.offset, data.region, data.count) == (
            asked_access.offset,
            asked_access.region,
            asked_access.count,
        ), where
    elif command == Command.REGION_WRITE:
        assert h.size == 32, where
        assert RegionAccess.unpack(payload) == RegionAccess.unpack(request.payload), where
    elif command == Command.DMA_UNMAP:
        assert h.size in (16, 40), where
        if h.size == 40:
            assert payload == request.payload[:24], f"{where}: not the request's struct echoed"
    elif command in (Command.DMA_MAP, Command.DEVICE_SET_IRQS, Command.DEVICE_RESET):
        assert h.size == HEADER_SIZE, f"{where}: must be header-only"
    else:
        raise AssertionError(f"{where}: no QEMU rule for this command")


def parse_nul_terminated_json(payload: bytes, where: str) -> dict[str, Any]:
    text = payload[4:]
    assert text, f"{where}: no JSON (QEMU: corrupt version reply)"
    assert text.endswith(b"\0"), f"{where}: JSON is not NUL-terminated"
    assert b"\0" not in text[:-1], f"{where}: NUL inside the JSON"
    value = json.loads(text[:-1].decode())
    assert isinstance(value, dict), f"{where}: JSON is not an object"
    caps = value.get("capabilities", {})
    assert isinstance(caps, dict), f"{where}: capabilities is not an object"
    return caps


def is_json_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_qemu_version(request: TraceMessage, reply: RawReply) -> None:
    """QEMU's caps_check: major 0, minor 0, whole reply within its 214-byte buffer."""
    where = f"{request} -> {reply.describe()}"
    assert reply.header.size <= request.header.size, f"{where}: larger than QEMU's request"
    major, minor = struct.unpack_from("<HH", reply.payload)
    assert (major, minor) == (0, 0), where
    caps = parse_nul_terminated_json(reply.payload, where)
    limits = {
        "max_msg_fds": 16,
        "max_data_xfer_size": 64 * 1024 * 1024,
        "max_dma_maps": 65535,
    }
    for key, limit in limits.items():
        if key in caps:
            assert is_json_int(caps[key]) and 0 <= caps[key] <= limit, f"{where}: {key}"
    if "pgsizes" in caps:
        pgsizes = caps["pgsizes"]
        assert is_json_int(pgsizes) and pgsizes > 0 and pgsizes % 4096 == 0, where
    if "write_multiple" in caps:
        assert isinstance(caps["write_multiple"], bool), where
    if "migration" in caps:
        migration = caps["migration"]
        assert isinstance(migration, dict), where
        pgsize = migration.get("pgsize", 4096)
        assert is_json_int(pgsize) and pgsize % 4096 == 0, where
        bitmap = migration.get("max_bitmap_size", 0)
        assert is_json_int(bitmap) and bitmap <= 256 * 1024 * 1024, where
    assert "twin_socket" not in caps, f"{where}: QEMU never asks for a twin socket"


def u32(reply: RawReply) -> int:
    return int.from_bytes(RegionData.unpack(reply.payload).data, "little")


# --------------------------------------------------------------------------------------------
# Trace-driven replay


@dataclass
class Replay:
    """Replies by the seq of the trace request they answer."""

    requests: dict[int, TraceMessage] = field(default_factory=dict)
    replies: dict[int, RawReply] = field(default_factory=dict)
    region_fds: dict[int, list[int]] = field(default_factory=dict)  # from the caps re-query
    max_in_flight: int = 0
    posted: int = 0


async def replay(
    wire: RawWire,
    trace: Iterable[TraceMessage],
    stand_ins: FdStandIns | None,
    *,
    requests_only: bool = False,
) -> Replay:
    """Send the trace's client messages when the trace does, read one of our replies where
    the trace shows the real server's, and check each against QEMU's rules.

    Where testdev answers a GET_REGION_INFO with a larger argsz, the re-query QEMU would
    send (vfio_device_get_region_info) is sent right away. Posted writes get no reply: the
    next reply read must answer the next synchronous request (its msg_id is checked).
    ``requests_only`` ignores the trace's server lines and answers each synchronous request
    before the next one (for a filtered subset of a trace).
    """
    result = Replay()
    outstanding: deque[TraceMessage] = deque()
    own_id = OWN_IDS

    async def answer(request: TraceMessage) -> None:
        nonlocal own_id
        reply = await wire.receive()
        check_qemu_reply(request, reply, required=must_succeed(request))
        result.replies[request.seq] = reply
        if request.command != Command.DEVICE_GET_REGION_INFO or reply.header.is_error:
            return
        asked, info = RegionInfo.unpack(request.payload), RegionInfo.unpack(reply.payload)
        if info.argsz > asked.argsz:
            assert not reply.fds, f"{request}: fd with a truncated region info"
            again = RegionInfo(info.argsz, 0, asked.index, 0, 0, 0).pack()
            again += bytes(info.argsz - len(again))  # QEMU's buffer: argsz bytes
            requery = own_request(own_id, Command.DEVICE_GET_REGION_INFO, again)
            own_id += 1
            await wire.send(requery.raw)
            second = await wire.receive()
            check_qemu_reply(requery, second, required=True)
            result.region_fds[asked.index] = second.fds

    for msg in trace:
        if msg.from_client:
            fds = stand_ins.for_request(msg) if stand_ins is not None else []
            assert msg.nfds == len(fds), f"{msg}: needs an fd stand-in"
            await wire.send(msg.raw, fds)
            result.requests[msg.seq] = msg
            if msg.posted:
                result.posted += 1
                continue
            outstanding.append(msg)
            result.max_in_flight = max(result.max_in_flight, len(outstanding))
            if requests_only:
                await answer(outstanding.popleft())
        elif not requests_only:
            assert outstanding, f"trace {msg}: a reply with nothing outstanding"
            request = outstanding.popleft()
            assert msg.msg_id == request.msg_id, f"trace: {msg} does not answer {request}"
            await answer(request)
    assert not outstanding, f"trace ended with {len(outstanding)} requests unanswered"
    return result


async def assert_nothing_extra(wire: RawWire) -> None:
    """A synchronous probe: its reply must be the very next message (no stray replies)."""
    probe = own_request(OWN_IDS - 1, Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0).pack())
    await wire.send(probe.raw)
    reply = await wire.receive()
    check_qemu_reply(probe, reply, required=True)


def config_reads(result: Replay, offset: int, count: int) -> list[tuple[int, RawReply]]:
    """(seq, reply) of the replayed config-space reads of offset/count, in order."""
    found = []
    for seq, request in sorted(result.requests.items()):
        if request.command != Command.REGION_READ:
            continue
        access = RegionAccess.unpack(request.payload)
        if (access.region, access.offset, access.count) == (PciRegion.CONFIG, offset, count):
            found.append((seq, result.replies[seq]))
    return found


def rom_sizing_readback(result: Replay) -> list[int]:
    """Values read from the ROM BAR right after the client wrote the sizing pattern."""
    values = []
    pattern_written = False
    for seq, request in sorted(result.requests.items()):
        access = RegionAccess.unpack(request.payload) if region_of(request) is not None else None
        if access is None or access.region != PciRegion.CONFIG:
            continue
        if access.offset != PCI_ROM_ADDRESS or access.count != 4:
            continue
        if request.command == Command.REGION_WRITE:
            written = int.from_bytes(RegionData.unpack(request.payload).data, "little")
            pattern_written = written == ROM_SIZING_PATTERN
        elif pattern_written:
            values.append(u32(result.replies[seq]))
            pattern_written = False
    return values


# --------------------------------------------------------------------------------------------
# 1. libvfio-user's sample client


def check_lvu_reply(request: TraceMessage, reply: RawReply, payload_size: int) -> None:
    """libvfio-user's client reads exactly the payload it expects; no fds anywhere but the
    caps GET_REGION_INFO reply (lvu-sample-device.md, facts 1.5/10.3)."""
    check_reply_header(request, reply)
    where = f"{request} -> {reply.describe()}"
    assert not reply.header.is_error, f"{where}: failed with {errno_name(reply.header.error)}"
    assert len(reply.payload) == payload_size, f"{where}: payload must be {payload_size} bytes"


def check_lvu_version(request: TraceMessage, reply: RawReply) -> None:
    """libvfio-user's strict tran_parse_version_json, as its client applies it to our reply."""
    check_reply_header(request, reply)
    where = f"{request} -> {reply.describe()}"
    assert not reply.header.is_error, where
    assert not reply.fds, where
    major, minor = struct.unpack_from("<HH", reply.payload)
    assert (major, minor) == (0, 2), f"{where}: must answer minor min(2, ours) = 2"
    caps = parse_nul_terminated_json(reply.payload, where)
    for key in ("max_msg_fds", "max_data_xfer_size"):
        if key in caps:
            assert is_json_int(caps[key]), f"{where}: {key} must be a JSON integer"
    if "max_msg_fds" in caps:
        assert 0 <= caps["max_msg_fds"] <= 1024, where
    if "migration" in caps:
        migration = caps["migration"]
        assert isinstance(migration, dict), f"{where}: migration must be an object"
        if "pgsize" in migration:
            assert is_json_int(migration["pgsize"]), where
    assert "twin_socket" not in caps, f"{where}: twin socket offered though not asked for"


def lvu_request(seq: int) -> TraceMessage:
    for msg in traces.requests(LVU_CLIENT, conn="src", max_seq=seq):
        if msg.seq == seq:
            return msg
    raise LookupError(f"{LVU_CLIENT}: no request #{seq}")


async def lvu_handshake(wire: RawWire) -> DeviceInfo:
    """VERSION, the bad REGION_READ and GET_INFO exactly as libvfio-user's client sends them."""
    version = lvu_request(1)
    assert version.command == Command.VERSION and version.payload[:4] == b"\0\0\2\0"
    await wire.send(version.raw)
    check_lvu_version(version, await wire.receive())

    bad_read = lvu_request(3)
    assert RegionAccess.unpack(bad_read.payload).region == 0xDEADBEEF
    await wire.send(bad_read.raw)
    reply = await wire.receive()
    check_reply_header(bad_read, reply)
    assert reply.header.is_error and reply.header.error == errno.EINVAL, reply.describe()

    get_info = lvu_request(5)
    assert get_info.command == Command.DEVICE_GET_INFO
    await wire.send(get_info.raw)
    reply = await wire.receive()
    check_lvu_reply(get_info, reply, DeviceInfo.SIZE)
    info = DeviceInfo.unpack(reply.payload)
    assert info.flags == DeviceFlags.PCI | DeviceFlags.RESET, reply.describe()
    assert info.num_regions >= 9, reply.describe()
    assert info.num_irqs == 5, reply.describe()
    return info


async def test_lvu_client_handshake_and_region_info(tmp_path):
    template = lvu_request(7)  # GET_REGION_INFO index 0, argsz 32
    assert template.command == Command.DEVICE_GET_REGION_INFO
    assert RegionInfo.unpack(template.payload) == RegionInfo(32, 0, 0, 0, 0, 0)

    async with connect_testdev(tmp_path) as wire:
        info = await lvu_handshake(wire)
        with_fd: dict[int, tuple[RegionInfo, list[int], bytes]] = {}
        for index in range(info.num_regions):
            first = RegionInfo(32, 0, index, 0, 0, 0).pack()
            request = own_request(template.msg_id, template.command, first)
            await wire.send(request.raw)
            reply = await wire.receive()
            check_lvu_reply(request, reply, 32)
            assert not reply.fds, f"{reply.describe()}: fd with the argsz-32 reply (EFAULT)"
            region = RegionInfo.unpack(reply.payload)
            assert region.index == index, reply.describe()
            if region.argsz <= 32:
                assert not region.flags & RegionFlags.CAPS, reply.describe()
                continue
            # The client's second call: argsz as returned, payload padded to argsz.
            again = RegionInfo(region.argsz, 0, index, 0, 0, 0).pack()
            again += bytes(region.argsz - len(again))
            request = own_request(template.msg_id, template.command, again)
            await wire.send(request.raw)
            reply = await wire.receive()
            check_lvu_reply(request, reply, min(region.argsz, len(again)))
            full = RegionInfo.unpack(reply.payload)
            assert full.argsz == region.argsz and full.index == index, reply.describe()
            if reply.fds:
                assert len(reply.fds) == 1, reply.describe()
                with_fd[index] = (full, reply.fds, reply.payload)

        assert set(with_fd) == {TESTDEV_MMAP_REGION}, "exactly one mmap-able region: BAR2"
        full, fds, payload = with_fd[TESTDEV_MMAP_REGION]
        assert full.flags & RegionFlags.MMAP and full.flags & RegionFlags.CAPS
        assert full.cap_offset == 32
        caps = unpack_region_caps(payload, full.cap_offset)
        sparse = [cap for cap in caps if isinstance(cap, SparseMmapCap)]
        assert len(sparse) == 1 and sparse[0].areas, caps

        # The fd really is BAR2: a REGION_WRITE shows through a mapping of it.
        area_offset, area_size = sparse[0].areas[0]
        mapping = mmap.mmap(fds[0], area_size, mmap.MAP_SHARED, offset=full.offset + area_offset)
        try:
            data = RegionData(area_offset, TESTDEV_MMAP_REGION, 8, b"interop!").pack()
            write = own_request(OWN_IDS, Command.REGION_WRITE, data)
            await wire.send(write.raw)
            check_lvu_reply(write, await wire.receive(), 16)
            assert mapping[:8] == b"interop!"
        finally:
            mapping.close()


async def test_lvu_client_session_setup(tmp_path, stand_ins):
    """The rest of the client's device-independent setup, byte for byte: 64-byte config
    read, DEVICE_RESET, 16 one-page DMA_MAPs with fds, GET_IRQ_INFO 0-4, INTx eventfd, and
    later the DMA_UNMAPs. Each reply's payload must be exactly what the client reads (the
    real server's size), or empty where the client allows it (DMA_UNMAP)."""
    trace = list(traces.messages(LVU_CLIENT, conn="src", max_seq=146))
    wanted = {
        Command.REGION_READ,
        Command.DEVICE_RESET,
        Command.DMA_MAP,
        Command.DEVICE_GET_IRQ_INFO,
        Command.DEVICE_SET_IRQS,
        Command.DMA_UNMAP,
    }
    async with connect_testdev(tmp_path) as wire:
        await lvu_handshake(wire)
        pending: TraceMessage | None = None
        replayed: set[int] = set()
        for msg in trace:
            if msg.seq <= 26 or msg.command not in wanted:
                continue
            if msg.command == Command.REGION_READ and region_of(msg) != PciRegion.CONFIG:
                continue
            if msg.from_client:
                await wire.send(msg.raw, stand_ins.for_request(msg))
                pending = msg
                continue
            assert pending is not None and pending.msg_id == msg.msg_id, msg
            reply = await wire.receive()
            expected = len(msg.payload)
            if pending.command == Command.DMA_UNMAP and not reply.payload:
                expected = 0
            check_lvu_reply(pending, reply, expected)
            assert not reply.fds, reply.describe()
            if pending.command == Command.DEVICE_GET_IRQ_INFO:
                asked = IrqInfo.unpack(pending.payload)
                assert IrqInfo.unpack(reply.payload).index == asked.index
            replayed.add(pending.command)
            pending = None
        assert replayed == wanted
        maps = sum(1 for m in trace if m.from_client and m.command == Command.DMA_MAP)
        assert maps == 16


async def test_lvu_client_dma_logging_start_stop(tmp_path, stand_ins):
    """DMA_LOGGING_START/STOP with 0 ranges: reply = the 24-byte request echoed (or empty)."""
    async with connect_testdev(tmp_path) as wire:
        await lvu_handshake(wire)
        for seq in (31, 33):  # two DMA_MAPs, so there is something to log
            msg = lvu_request(seq)
            await wire.send(msg.raw, stand_ins.for_request(msg))
            check_lvu_reply(msg, await wire.receive(), 0)
        for seq in (75, 129):
            msg = lvu_request(seq)
            assert msg.command == Command.DEVICE_FEATURE
            await wire.send(msg.raw)
            reply = await wire.receive()
            check_lvu_reply(msg, reply, len(reply.payload))
            assert reply.payload in (b"", msg.payload), reply.describe()


# --------------------------------------------------------------------------------------------
# 2. QEMU 10.2 vfio-user-pci realize and startup reset (gpio trace)


def realize_and_reset(name: str) -> list[TraceMessage]:
    """A QEMU trace from VERSION to the end of the startup machine reset: everything before
    the first region access that follows DEVICE_RESET and the DMA re-map after it (that
    access is SeaBIOS's first config read). Streamed: the rest of the file is not read."""
    head: list[TraceMessage] = []
    reset = remapped = False
    for msg in traces.messages(name):
        if msg.from_client:
            reset = reset or msg.command == Command.DEVICE_RESET
            remapped = remapped or (reset and msg.command == Command.DMA_MAP)
            if remapped and msg.command == Command.REGION_READ:
                return head
        head.append(msg)
    raise AssertionError(f"{name}: no end of the startup reset")


@pytest.mark.parametrize("name", [QEMU_GPIO, QEMU_GPIO_NOFD])
async def test_qemu_realize_and_reset(tmp_path, stand_ins, name):
    """QEMU's realize and startup reset, as sent (memfd RAM: DMA_MAP with fds; anonymous
    RAM: the same messages, DMA_MAP without fds)."""
    trace = realize_and_reset(name)
    # Realize is #1-#44, the startup machine reset #45-#104; SeaBIOS starts at #105.
    assert trace[-1].seq == 104
    version = trace[0]
    assert version.command == Command.VERSION and version.header.size == 214
    assert version.payload[:4] == b"\0\0\0\0"
    assert any(m.command == Command.DEVICE_RESET for m in trace)

    async with connect_testdev(tmp_path) as wire:
        result = await replay(wire, trace, stand_ins)
        await assert_nothing_extra(wire)

    assert result.max_in_flight == 8, "the trace's DMA bursts were sent back to back"
    assert len(result.replies) == sum(1 for m in trace if m.from_client)

    # GET_REGION_INFO: testdev's BAR2 needs QEMU's re-query; that reply carries its fd.
    assert set(result.region_fds) == {TESTDEV_MMAP_REGION}
    assert len(result.region_fds[TESTDEV_MMAP_REGION]) == 1

    (err_info,) = [
        reply
        for seq, reply in result.replies.items()
        if result.requests[seq].command == Command.DEVICE_GET_IRQ_INFO
    ]
    info = IrqInfo.unpack(err_info.payload)
    assert (info.index, info.count) == (IrqIndex.ERR, 1)

    ((_, snapshot),) = config_reads(result, 0, 256)
    ids = RegionData.unpack(snapshot.payload).data[:4]
    assert ids == struct.pack("<HH", VENDOR_ID, DEVICE_ID)

    assert rom_sizing_readback(result) == [0], "testdev has no ROM: the ROM BAR reads 0"

    # QEMU's BAR type probe read cfg+0x18 (BAR2: testdev's 64-bit prefetchable RAM BAR).
    ((_, bar2),) = config_reads(result, 0x18, 4)
    assert u32(bar2) & 0xF == 0xC

    pins = config_reads(result, PCI_INTERRUPT_PIN, 1)
    assert len(pins) == 3  # twice at realize, once after DEVICE_RESET
    assert all(RegionData.unpack(reply.payload).data == b"\x01" for _, reply in pins)


async def test_qemu_posted_writes_get_no_reply(tmp_path):
    """QEMU posts memory-BAR writes (NO_REPLY). From the e1000 trace: its first driver
    accesses to BAR0, posted writes mixed with reads (some beyond testdev's 4 KiB BAR0, so
    they fail, and a failing posted write must stay silent too)."""
    version = traces.first_request(QEMU_E1000, Command.VERSION)
    window: list[TraceMessage] = []
    posted = 0
    for msg in traces.messages(QEMU_E1000):
        if msg.from_client and msg.posted:
            posted += 1
        if posted:
            window.append(msg)
        if posted >= 12 and not window[-1].from_client:
            break
    assert window[0].posted

    async with connect_testdev(tmp_path) as wire:
        await wire.send(version.raw)
        check_qemu_reply(version, await wire.receive(), required=True)
        result = await replay(wire, window, None)
        await assert_nothing_extra(wire)
    assert result.posted == 12
    beyond = [
        seq
        for seq, request in result.requests.items()
        if request.posted and RegionAccess.unpack(request.payload).offset >= 0x1000
    ]
    assert beyond, "the window has a posted write testdev must refuse silently"


# --------------------------------------------------------------------------------------------
# 3. The e1000 trace's realize + reset: config-space requests only


async def test_qemu_e1000_realize_config_accesses(tmp_path):
    head = realize_and_reset(QEMU_E1000)
    assert len(head) < 120, "only the first messages of the 8.7 MB trace"
    version = head[0]
    assert version.command == Command.VERSION
    config = [msg for msg in head if msg.from_client and region_of(msg) == PciRegion.CONFIG]
    assert len(config) >= 15

    async with connect_testdev(tmp_path) as wire:
        await wire.send(version.raw)
        check_qemu_reply(version, await wire.receive(), required=True)
        result = await replay(wire, config, None, requests_only=True)
        await assert_nothing_extra(wire)

    assert len(result.replies) == len(config)
    assert rom_sizing_readback(result) == [0]
    ((_, bar0),) = config_reads(result, 0x10, 4)
    assert u32(bar0) & 0xF == 0x0, "testdev BAR0: 32-bit memory, not prefetchable"


# --------------------------------------------------------------------------------------------
# 4. Pipelining: 50 requests in one send, replies in order


def e1000_probe_window() -> list[TraceMessage]:
    """50 fd-less requests of the e1000 trace, starting 10 before its first posted write."""
    before: deque[TraceMessage] = deque(maxlen=10)
    window: list[TraceMessage] = []
    for msg in traces.requests(QEMU_E1000):
        if msg.nfds:
            continue
        if not window and not msg.posted:
            before.append(msg)
            continue
        if not window:
            window.extend(before)
        window.append(msg)
        if len(window) == 50:
            return window
    raise AssertionError("e1000 trace too short")


def gpio_realize_window() -> list[TraceMessage]:
    """The first 50 fd-less requests of the gpio trace after VERSION (GET_*, config
    accesses, reset, DMA_MAP/UNMAP without fd: some of those fail, framing must not)."""
    window = [
        msg
        for msg in traces.requests(QEMU_GPIO, max_seq=200)
        if not msg.nfds and msg.command != Command.VERSION
    ]
    return window[:50]


@pytest.mark.parametrize("source", ["e1000-probe", "gpio-realize"])
async def test_fifty_requests_in_one_send(tmp_path, source):
    if source == "e1000-probe":
        version = traces.first_request(QEMU_E1000, Command.VERSION)
        window = e1000_probe_window()
    else:
        version = traces.first_request(QEMU_GPIO, Command.VERSION)
        window = gpio_realize_window()
    assert len(window) == 50

    async with connect_testdev(tmp_path) as wire:
        await wire.send(version.raw)
        check_qemu_reply(version, await wire.receive(), required=True)
        await wire.send(b"".join(msg.raw for msg in window))
        answered = 0
        for request in window:
            if request.posted:
                continue
            reply = await wire.receive()
            # DMA requests here lost their fd-backed neighbours, so they may fail.
            required = must_succeed(request) and request.command not in (
                Command.DMA_MAP,
                Command.DMA_UNMAP,
            )
            check_qemu_reply(request, reply, required=required)
            answered += 1
        await assert_nothing_extra(wire)

    expected = sum(1 for msg in window if not msg.posted)
    assert answered == expected
    if source == "e1000-probe":
        assert expected < 50, "the window has posted writes"
