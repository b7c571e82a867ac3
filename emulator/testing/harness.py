"""Test helpers that play the guest side: a served device, guest RAM, eventfds.

A real module (like ``trio.testing``) so that tests, scripts and users' own device tests
share one harness::

    async with served_device(TestDev(), tmp_path) as served:
        async with Client.connect(served.socket_path) as client:
            ...
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from devices import testdev
from devices.api import Device
from devices.migration.stream import Section
from emulator.client import Client
from emulator.limits import Limits
from emulator.server import DeviceServer
from emulator.transport import close_fds, receive_chunk, send_message
from protocol.constants import (
    FEATURE_SET,
    HEADER_SIZE,
    Command,
    DeviceFeature,
    DmaMapFlags,
    MigState,
    PciRegion,
)
from protocol.header import Header, pack_message, pack_reply
from protocol.messages import DeviceFeatureMsg, DmaMap, MigDeviceState, RegionAccess, VersionPayload
from protocol.version import ServerCapabilities


@dataclass
class ServedDevice:
    server: DeviceServer
    socket_path: Path

    @property
    def device(self) -> Device:
        return self.server.device


@asynccontextmanager
async def served_device(
    device: Device,
    directory: Path,
    *,
    name: str = "dev.sock",
    capabilities: ServerCapabilities | None = None,
    limits: Limits | None = None,
    trace: bool = False,
) -> AsyncIterator[ServedDevice]:
    """Serve ``device`` on a socket in ``directory`` for the duration of the block."""
    path = directory / name
    server = DeviceServer(
        device, socket_path=path, capabilities=capabilities, limits=limits, trace=trace
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield ServedDevice(server, path)
        finally:
            nursery.cancel_scope.cancel()


class GuestRam:
    """Guest memory as QEMU provides it with memory-backend-memfd,share=on: a memfd the
    server can mmap (pass ``fd`` with DMA_MAP) and that the test reads and writes."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.size = size
        self.base = base
        # Sealed against resizing, as QEMU's memory-backend-memfd (seal=on) does: the server
        # mmaps only memory the client can no longer shrink.
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)

    def read(self, address: int, count: int) -> bytes:
        offset = self._offset(address, count)
        return self.map[offset : offset + count]

    def write(self, address: int, data: bytes) -> None:
        offset = self._offset(address, len(data))
        self.map[offset : offset + len(data)] = data

    def _offset(self, address: int, count: int) -> int:
        offset = address - self.base
        if offset < 0 or offset + count > self.size:
            raise ValueError(f"[{address:#x}, +{count:#x}) is outside guest RAM")
        return offset

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventFd:
    """An eventfd the test passes to SET_IRQS and then polls for interrupts."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def take(self) -> int:
        """How many times it was signalled since the last call (0 if never)."""
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    async def wait(self, timeout: float = 5.0) -> int:
        with trio.fail_after(timeout):
            while True:
                count = self.take()
                if count:
                    return count
                await trio.lowlevel.wait_readable(self.fd)

    def signal(self) -> None:
        os.write(self.fd, (1).to_bytes(8, "little"))

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)


class RoundedWaits(trio.abc.Instrument):
    """Counts the event loop's waits with a deadline under a millisecond: CPython hands
    epoll whole milliseconds rounded up, so each of them sleeps a full millisecond unless
    I/O comes first. Install with ``trio.lowlevel.add_instrument``."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []  # seconds, of the rounded-up waits

    def before_io_wait(self, timeout: float) -> None:
        if 0 < timeout < 1e-3:
            self.timeouts.append(timeout)


class ReceivedFrame(Protocol):
    @property
    def data(self) -> bytes: ...


class NicGuest(Protocol):
    """What the NIC guest drivers (``guest_e1000.E1000Guest``,
    ``guest_virtio_net.VirtioNetGuest``) share: frames onto the transmit ring, a doorbell,
    completions reclaimed, received frames polled and their buffers given back."""

    client: Client

    def reclaim_tx(self) -> int: ...

    def queue(self, frame: bytes) -> bool: ...

    async def flush_tx(self) -> None: ...

    def poll_rx(self) -> Sequence[ReceivedFrame]: ...

    async def refill_rx(self) -> None: ...


async def frame_rate(sender: NicGuest, receiver: NicGuest, frame: bytes, count: int) -> float:
    """Frames per second from ``sender`` to ``receiver`` (polling, no interrupts): the
    sender queues up to 64 frames per doorbell while the receiver polls and refills."""
    received = 0

    async def receive() -> None:
        nonlocal received
        while received < count:
            frames = receiver.poll_rx()
            if frames:
                received += len(frames)
                await receiver.refill_rx()
            else:
                await trio.sleep(0)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        sent = 0
        while sent < count:
            sender.reclaim_tx()
            batch = 0
            while sent < count and batch < 64 and sender.queue(frame):
                sent += 1
                batch += 1
            await sender.flush_tx()
            await trio.sleep(0)
    return count / (time.perf_counter() - started)


PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_CAPABILITY_LIST = 0x34
CONFIG_REGION = PciRegion.CONFIG


async def enable_bus_master(client: Client) -> None:
    """What a guest driver does before its device may DMA (``pci_set_master``): set the
    memory-space and bus-master bits of the command register."""
    raw = await client.region_read(CONFIG_REGION, PCI_COMMAND, 2)
    command = int.from_bytes(raw, "little") | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    await client.region_write(CONFIG_REGION, PCI_COMMAND, command.to_bytes(2, "little"))


async def find_capability(client: Client, cap_id: int) -> int | None:
    """Walk the capability list through REGION_READ, as a guest driver does: the offset of
    capability ``cap_id``, or None (also for a list that loops or points below 0x40)."""
    seen: set[int] = set()
    pointer = (await client.region_read(CONFIG_REGION, PCI_CAPABILITY_LIST, 1))[0] & 0xFC
    while pointer >= 0x40 and pointer not in seen:
        seen.add(pointer)
        ident, following = await client.region_read(CONFIG_REGION, pointer, 2)
        if ident == cap_id:
            return pointer
        pointer = following & 0xFC
    return None


async def read_migration_data(client: Client, chunk: int = 1 << 16) -> bytes:
    """MIG_DATA_READ until the device has nothing more (the rest of the stream, in-band)."""
    out = []
    while data := await client.mig_data_read(chunk):
        out.append(data)
    return b"".join(out)


async def write_migration_data(client: Client, data: bytes, chunk: int = 1 << 16) -> None:
    """MIG_DATA_WRITE a stream in chunks of ``chunk`` bytes."""
    for at in range(0, len(data), chunk):
        await client.mig_data_write(data[at : at + chunk])


# --------------------------------------------------------------------------------------------
# Raw wire access (replaying recorded traces byte for byte)

#: Seconds a :class:`RawWire` waits for one reply (QEMU's x-msg-timeout default).
RAW_REPLY_TIMEOUT = 5.0


@dataclass
class RawReply:
    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def raw(self) -> bytes:
        return self.header.pack() + self.payload

    def describe(self) -> str:
        h = self.header
        return (
            f"reply id={h.msg_id} cmd={h.command_name()} size={h.size} flags={h.flags:#x} "
            f"error={h.error} fds={len(self.fds)}"
        )


class RawMessage(Protocol):
    """Anything that knows its bytes on the wire (e.g. a recorded trace message)."""

    @property
    def raw(self) -> bytes: ...


class _Inbox:
    """Bytes and fds as they arrive on a raw socket, cut into whole messages (by the
    header's size field); the fds go with the message they completed."""

    def __init__(self, max_message: int | None = None) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._max = max_message

    def next(self) -> RawReply | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        header = Header.unpack(self._buffer)
        assert HEADER_SIZE <= header.size <= (self._max or header.size), f"bad size in {header}"
        if len(self._buffer) < header.size:
            return None
        payload = bytes(self._buffer[HEADER_SIZE : header.size])
        del self._buffer[: header.size]
        fds, self._fds = self._fds, []
        return RawReply(header, payload, fds)

    async def receive(self, sock: trio.socket.SocketType, chunk: int) -> RawReply | None:
        """The next whole message, or None once the peer closed the connection."""
        while (message := self.next()) is None:
            data, fds = await receive_chunk(sock, chunk, 16)
            self._fds += fds
            if not data:
                close_fds(self._fds)
                self._fds = []
                return None
            self._buffer += data
        return message


class RawWire:
    """Raw messages out, replies framed by hand with the fds that came with them (kept open
    until :meth:`close`). ``max_message`` bounds what a reply may claim to be."""

    def __init__(self, sock: trio.socket.SocketType, max_message: int | None = None) -> None:
        self.sock = sock
        self._inbox = _Inbox(max_message)
        self._owned: list[int] = []

    @classmethod
    async def connect(cls, path: Path) -> RawWire:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(str(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes, fds: Iterable[int] = ()) -> None:
        await send_message(self.sock, data, list(fds))

    async def receive(self, timeout: float = RAW_REPLY_TIMEOUT) -> RawReply:
        with trio.fail_after(timeout):
            reply = await self._inbox.receive(self.sock, 256 * 1024)
        assert reply is not None, "server closed the connection"
        self._owned += reply.fds
        return reply

    async def request(self, msg: RawMessage, fds: Iterable[int] = ()) -> RawReply:
        await self.send(msg.raw, fds)
        return await self.receive()

    def close(self) -> None:
        close_fds(self._owned)
        self.sock.close()


class RawConnection:
    """A client that sends exactly the bytes and fds it is given and reads whole messages,
    for tests of the server's limits and error paths (no checks of its own)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.next_id = 1
        self._inbox = _Inbox()

    @classmethod
    async def connect(cls, path: Path, *, negotiate: bool = True) -> RawConnection:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        await sock.connect(str(path))
        conn = cls(sock)
        if negotiate:
            header, _ = await conn.call(Command.VERSION, VersionPayload(0, 2, "{}").pack())
            assert not header.is_error, "VERSION refused"
        return conn

    async def send(
        self, command: int, payload: bytes = b"", fds: Sequence[int] = (), *, flags: int = 0
    ) -> int:
        msg_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFF
        await send_message(self.sock, pack_message(msg_id, command, payload, flags), fds)
        return msg_id

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are: e.g. many messages packed into one buffer."""
        await send_message(self.sock, data, ())

    async def receive_many(self, count: int, timeout: float = 5.0) -> list[tuple[Header, bytes]]:
        """The next ``count`` whole messages (asserting the connection stays open)."""
        out = []
        with trio.fail_after(timeout):
            for _ in range(count):
                message = await self.receive(math.inf)
                assert message is not None, "server closed the connection"
                out.append(message)
        return out

    async def send_reply(self, msg_id: int, command: int, payload: bytes = b"") -> None:
        """Answer a request the server sent (DMA_READ / DMA_WRITE)."""
        await send_message(self.sock, pack_reply(msg_id, command, payload))

    async def receive(self, timeout: float = 5.0) -> tuple[Header, bytes] | None:
        """The next whole message, or None when the server closed the connection (fds that
        came with it are closed: these tests look at bytes only)."""
        with trio.fail_after(timeout):
            message = await self._inbox.receive(self.sock, 1 << 20)
        if message is None:
            return None
        close_fds(message.fds)
        return message.header, message.payload

    async def call(
        self, command: int, payload: bytes = b"", fds: Sequence[int] = ()
    ) -> tuple[Header, bytes]:
        """Send a command and return its reply (asserting the ids match)."""
        msg_id = await self.send(command, payload, fds)
        message = await self.receive()
        assert message is not None, f"connection closed instead of replying to {command}"
        header, payload = message
        assert header.msg_id == msg_id and header.is_reply, f"unexpected {header}"
        return header, payload

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (messages before it are dropped)."""
        while (message := await self.receive(timeout)) is not None:
            del message
        return True

    def close(self) -> None:
        self.sock.close()


def flat_sections(sections: Sequence[Section]) -> list[tuple[str, bytes]]:
    """A device's saved sections with each payload as one ``bytes``: comparable with ==
    whether the device produced a buffer or a list of pieces."""
    out = []
    for name, payload in sections:
        if isinstance(payload, bytes | bytearray | memoryview):
            out.append((name, bytes(payload)))
        else:
            out.append((name, b"".join(bytes(piece) for piece in payload)))
    return out


def set_mig_state_payload(state: MigState) -> bytes:
    """DEVICE_FEATURE payload moving the device to ``state`` (no data fd)."""
    return DeviceFeatureMsg(
        16, FEATURE_SET | DeviceFeature.MIG_DEVICE_STATE, MigDeviceState(state).pack()
    ).pack()


async def start_dma_left_unanswered(conn: RawConnection) -> tuple[Header, bytes]:
    """Make a :class:`~devices.testdev.TestDev` start a 64-byte copy through DMA_READ /
    DMA_WRITE messages (guest RAM mapped without an fd) and return the job's DMA_READ
    request (header, payload), unanswered: the device job waits for it (until
    ``dma_reply_timeout``), so a migration SET (which pauses device work) is deferred until
    the test answers it."""
    rw = DmaMapFlags.READ | DmaMapFlags.WRITE
    header, _ = await conn.call(
        Command.DMA_MAP, DmaMap(DmaMap.SIZE, rw, 0, 0x10000, 0x10000).pack()
    )
    assert not header.is_error
    enable = struct.pack("<H", PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    await conn.call(
        Command.REGION_WRITE, RegionAccess(PCI_COMMAND, CONFIG_REGION, 2).pack() + enable
    )
    for reg, value in [
        (testdev.REG_DMA_SRC, 0x10000), (testdev.REG_DMA_DST, 0x18000),
        (testdev.REG_DMA_LEN, 64), (testdev.REG_DMA_CTRL, 1),
    ]:  # fmt: skip
        access = RegionAccess(reg, 0, 4).pack() + struct.pack("<I", value)
        header, _ = await conn.call(Command.REGION_WRITE, access)
        assert not header.is_error
    message = await conn.receive()
    assert message is not None and message[0].command == Command.DMA_READ, message
    return message


async def finish_dma_left_unanswered(
    conn: RawConnection, dma_read: tuple[Header, bytes]
) -> tuple[Header, bytes]:
    """Answer the job's DMA_READ (from :func:`start_dma_left_unanswered`) and the DMA_WRITE
    that follows it; return the next message that is not one of the job's requests."""
    request, payload = dma_read
    await conn.send_reply(request.msg_id, Command.DMA_READ, payload + bytes(64))
    while True:
        message = await conn.receive()
        if message is None:
            raise ConnectionError("the server closed the connection")
        header = message[0]
        if header.command != Command.DMA_WRITE or not header.is_command:
            return message
        await conn.send_reply(header.msg_id, Command.DMA_WRITE)
