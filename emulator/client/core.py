"""The vfio-user client: :class:`Client`, one method per vfio-user command (spec 0.9.2).

Used by tests, scripts, ``vfio-user-emu info`` and the migration driver, so replies are
validated at least as strictly as libvfio-user's client does (facts 1.5, 10.3): the reply
must answer the command that was sent (same msg_id and command), its payload has the exact
size the command defines, fds are only accepted where the protocol allows them, and error
replies are header-only.

This module holds what each command means: VERSION negotiation, the region, irq and DMA
commands, DEVICE_FEATURE and the migration helpers (MIG_DEVICE_STATE, MIG_DATA_READ/WRITE,
precopy info). How a message travels (ids, sending with fds, the receive task, matching
replies, the server's DMA requests) is :mod:`emulator.client.requests`, the class
:class:`Client` extends.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from emulator.client.requests import (
    MAX_MESSAGE_SIZE,
    InFlight,
    InvalidReply,
    RequestChannel,
)
from emulator.transport import close_fds
from protocol.constants import (
    FEATURE_GET,
    FEATURE_PROBE,
    FEATURE_SET,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    Command,
    DeviceFeature,
    DmaMapFlags,
    DmaUnmapFlags,
    RegionFlags,
)
from protocol.errors import ProtocolError
from protocol.messages import (
    U64,
    DeviceFeatureMsg,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    IrqInfo,
    IrqSet,
    MigDataRead,
    MigDeviceState,
    PrecopyInfo,
    RegionAccess,
    RegionCap,
    RegionData,
    RegionInfo,
    RegionIoFds,
    RegionWriteMulti,
    VersionPayload,
    WriteMultiEntry,
    unpack_region_caps,
)
from protocol.version import parse_capabilities_json, parse_client_version

__all__ = ["Client", "RegionDescription"]

#: How often GET_REGION_INFO / GET_REGION_IO_FDS may ask again with a larger argsz.
MAX_ARGSZ_RETRIES = 4
_MIG_HEADER = 8  # argsz + size in front of MIG_DATA payloads


@dataclass(slots=True)
class RegionDescription:
    """A GET_REGION_INFO answer. The caller owns ``fd`` (close it when done)."""

    info: RegionInfo
    caps: list[RegionCap]
    fd: int | None = None


class Client(RequestChannel):
    """A vfio-user client connection. Create it with :meth:`connect` or :meth:`from_socket`."""

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        capabilities: dict[str, Any] | None = None,
        minor: int = PROTOCOL_MINOR,
        trace: Callable[[str], None] | None = None,
    ) -> AsyncIterator[Client]:
        """Connect to the UNIX socket at ``path`` and negotiate VERSION.

        ``capabilities`` replaces the default capabilities object we send (it is sent as
        ``{"capabilities": ...}``); everything is closed when the context exits.
        """
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        async with cls.from_socket(
            sock, capabilities=capabilities, minor=minor, trace=trace
        ) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def from_socket(
        cls,
        sock: trio.socket.SocketType,
        *,
        capabilities: dict[str, Any] | None = None,
        minor: int = PROTOCOL_MINOR,
        trace: Callable[[str], None] | None = None,
        negotiate: bool = True,
    ) -> AsyncIterator[Client]:
        """Run a client on an already connected socket (which it takes over and closes).

        With ``negotiate=False`` no VERSION is sent (for tests of the server's handshake
        rules, using :meth:`request` / :meth:`send_raw`).
        """
        client = cls(sock, capabilities=capabilities, trace=trace)
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._background)
                try:
                    if negotiate:
                        await client.negotiate(minor)
                    yield client
                except BaseException as exc:
                    # Re-raised outside the nursery so callers see their own exception
                    # rather than an ExceptionGroup wrapping it.
                    body_error = exc
                finally:
                    client._shutdown()
        finally:
            client._shutdown()
        if body_error is not None:
            raise body_error

    # -- VERSION --------------------------------------------------------------------------

    async def negotiate(self, minor: int = PROTOCOL_MINOR) -> None:
        """Send VERSION (major 0, ``minor``, our capabilities) and check the reply.

        The reply must carry major 0, a minor not above ours and a NUL-terminated JSON
        object whose known capabilities have the right types.
        """
        caps_json = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"))
        payload = VersionPayload(PROTOCOL_MAJOR, minor, caps_json).pack()
        _, reply, fds = await self.request(Command.VERSION, payload)
        self._no_fds(Command.VERSION, fds)
        with _parsing(Command.VERSION):
            version = VersionPayload.unpack(reply)
            if version.json_text is None:
                raise ProtocolError(_errno.EINVAL, "VERSION reply without JSON")
            if version.major != PROTOCOL_MAJOR:
                raise ProtocolError(_errno.EINVAL, f"VERSION reply major {version.major}")
            if version.minor > minor:
                raise ProtocolError(
                    _errno.EINVAL, f"VERSION reply minor {version.minor} > proposed {minor}"
                )
            # Same strictness as for a client's VERSION: known keys must have the right type.
            parsed = parse_client_version(version)
            caps = parse_capabilities_json(version.json_text)
        twin = caps.get("twin_socket")
        if isinstance(twin, dict) and twin.get("supported"):
            raise InvalidReply(Command.VERSION, "server enabled twin_socket (not supported here)")
        self.server_caps = caps
        self.major = version.major
        self.minor = version.minor
        self.server_max_msg_fds = parsed.max_msg_fds
        self.server_max_data_xfer_size = parsed.max_data_xfer_size

    # -- typed commands -------------------------------------------------------------------

    @staticmethod
    def _no_fds(command: int, fds: list[int]) -> None:
        if fds:
            close_fds(fds)
            raise InvalidReply(command, f"{len(fds)} unexpected fd(s) with the reply")

    @staticmethod
    def _exact(command: int, payload: bytes, size: int) -> None:
        if len(payload) != size:
            raise InvalidReply(
                command, f"reply payload of {len(payload)} bytes, expected exactly {size}"
            )

    async def _call(
        self, command: Command, payload: bytes = b"", *, fds: Sequence[int] = (), size: int = 0
    ) -> bytes:
        """A request whose reply has exactly ``size`` payload bytes and no fds."""
        _, reply, got = await self.request(command, payload, fds=fds)
        self._no_fds(command, got)
        self._exact(command, reply, size)
        return reply

    async def get_info(self) -> DeviceInfo:
        cmd = Command.DEVICE_GET_INFO
        reply = await self._call(cmd, DeviceInfo(DeviceInfo.SIZE, 0, 0, 0).pack(), size=16)
        with _parsing(cmd):
            return DeviceInfo.unpack(reply)

    async def get_region_info(self, index: int) -> RegionDescription:
        """Region ``index``: ask with argsz 32, again with the argsz the server needs.

        An fd is accepted only on a final reply that has CAPS (with a parsable chain) and
        MMAP set; at most one. fds on a truncated first reply are closed (as QEMU does).
        """
        cmd = Command.DEVICE_GET_REGION_INFO
        argsz = RegionInfo.SIZE
        for _ in range(MAX_ARGSZ_RETRIES):
            request = RegionInfo(argsz, 0, index, 0, 0, 0).pack()
            _, payload, fds = await self.request(cmd, request)
            try:
                with _parsing(cmd):
                    info = RegionInfo.unpack(payload)
                self._exact(cmd, payload, min(info.argsz, argsz))
                if info.index != index:
                    raise InvalidReply(cmd, f"reply for region {info.index}, asked {index}")
                if info.argsz > argsz:
                    if info.argsz > MAX_MESSAGE_SIZE:
                        raise InvalidReply(cmd, f"reply argsz {info.argsz} is absurd")
                    close_fds(fds)
                    fds = []
                    argsz = info.argsz
                    continue
                caps: list[RegionCap] = []
                if info.flags & RegionFlags.CAPS:
                    if not RegionInfo.SIZE <= info.cap_offset < info.argsz:
                        raise InvalidReply(cmd, f"cap_offset {info.cap_offset} out of range")
                    with _parsing(cmd):
                        caps = unpack_region_caps(payload, info.cap_offset)
                if fds and not (caps and info.flags & RegionFlags.MMAP and len(fds) == 1):
                    raise InvalidReply(
                        cmd,
                        f"{len(fds)} fd(s) with a reply of flags {info.flags:#x} and "
                        f"{len(caps)} cap(s) (one fd, only with caps and MMAP)",
                    )
            except BaseException:
                close_fds(fds)
                raise
            return RegionDescription(info, caps, fds[0] if fds else None)
        raise InvalidReply(cmd, "reply argsz keeps growing")

    async def get_irq_info(self, index: int) -> IrqInfo:
        cmd = Command.DEVICE_GET_IRQ_INFO
        reply = await self._call(cmd, IrqInfo(IrqInfo.SIZE, 0, index, 0).pack(), size=16)
        with _parsing(cmd):
            info = IrqInfo.unpack(reply)
        if info.index != index:
            raise InvalidReply(cmd, f"reply for irq index {info.index}, asked {index}")
        return info

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        """``count`` bytes at ``offset`` of ``region``; the reply must echo all three."""
        cmd = Command.REGION_READ
        _, payload, fds = await self.request(cmd, RegionAccess(offset, region, count).pack())
        self._no_fds(cmd, fds)
        if count == 0 and not payload:
            return b""  # libvfio-user answers a zero-length access header-only
        self._exact(cmd, payload, RegionAccess.SIZE + count)
        with _parsing(cmd):
            reply = RegionData.unpack(payload)
        if (reply.offset, reply.region, reply.count) != (offset, region, count):
            raise InvalidReply(
                cmd,
                f"reply for region {reply.region} offset {reply.offset:#x} count "
                f"{reply.count}, asked {region}/{offset:#x}/{count}",
            )
        return reply.data

    async def region_write(
        self, region: int, offset: int, data: bytes, *, posted: bool = False
    ) -> None:
        """Write ``data``; ``posted`` sends it NO_REPLY and does not wait."""
        cmd = Command.REGION_WRITE
        request = RegionData(offset, region, len(data), bytes(data)).pack()
        if posted:
            await self.request(cmd, request, no_reply=True)
            return
        _, payload, fds = await self.request(cmd, request)
        self._no_fds(cmd, fds)
        if not data and not payload:
            return
        self._exact(cmd, payload, RegionAccess.SIZE)
        with _parsing(cmd):
            reply = RegionAccess.unpack(payload)
        if (reply.offset, reply.region, reply.count) != (offset, region, len(data)):
            raise InvalidReply(
                cmd,
                f"reply for region {reply.region} offset {reply.offset:#x} count "
                f"{reply.count}, wrote {region}/{offset:#x}/{len(data)}",
            )

    async def region_write_multi(
        self, entries: Sequence[tuple[int, int, bytes]], *, posted: bool = True
    ) -> int | None:
        """REGION_WRITE_MULTI of ``(region, offset, data)`` entries (data 1..8 bytes).

        Posted (NO_REPLY, as QEMU always sends it) returns None; otherwise the number of
        writes the server reports completed.
        """
        cmd = Command.REGION_WRITE_MULTI
        if not entries:
            raise ValueError("REGION_WRITE_MULTI needs at least one entry")
        items = []
        for region, offset, data in entries:
            if not 1 <= len(data) <= 8:
                raise ValueError(f"REGION_WRITE_MULTI data of {len(data)} bytes (1..8)")
            items.append(WriteMultiEntry(offset, region, len(data), bytes(data)))
        request = RegionWriteMulti(tuple(items)).pack()
        if posted:
            await self.request(cmd, request, no_reply=True)
            return None
        reply = await self._call(cmd, request, size=U64.size)
        (done,) = U64.unpack(reply)
        if done > len(items):
            raise InvalidReply(cmd, f"{done} writes completed out of {len(items)}")
        return int(done)

    async def reset(self) -> None:
        await self._call(Command.DEVICE_RESET)

    async def dma_map(
        self,
        address: int,
        size: int,
        *,
        fd: int | None = None,
        offset: int = 0,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        """Map ``[address, address + size)``; with ``fd`` the server may mmap it at ``offset``.

        The fd is only sent (the caller keeps its copy).
        """
        flags = (DmaMapFlags.READ if readable else 0) | (DmaMapFlags.WRITE if writable else 0)
        request = DmaMap(DmaMap.SIZE, flags, offset, address, size).pack()
        await self._call(Command.DMA_MAP, request, fds=() if fd is None else (fd,))

    async def dma_unmap(self, address: int = 0, size: int = 0, *, unmap_all: bool = False) -> None:
        """Unmap one mapping exactly, or everything (``unmap_all``, address = size = 0)."""
        cmd = Command.DMA_UNMAP
        flags = DmaUnmapFlags.ALL if unmap_all else 0
        request = DmaUnmap(DmaUnmap.SIZE, flags, address, size).pack_echo()
        reply = await self._call(cmd, request, size=DmaUnmap.SIZE)
        if reply != request:
            raise InvalidReply(cmd, "reply does not echo the request")

    async def set_irqs(
        self,
        index: int,
        flags: int,
        start: int,
        count: int,
        *,
        fds: Sequence[int] = (),
        data: bytes = b"",
    ) -> None:
        """SET_IRQS with argsz = 20 + len(data); eventfds travel as SCM_RIGHTS (``fds``)."""
        request = IrqSet(IrqSet.SIZE + len(data), flags, index, start, count, bytes(data))
        await self._call(Command.DEVICE_SET_IRQS, request.pack(), fds=fds)

    async def get_region_io_fds(self, index: int) -> tuple[RegionIoFds, list[int]]:
        """The ioeventfds of region ``index`` (spec 40-byte entries) and their fds.

        Asks with argsz 16 first, then with the argsz the server needs. The caller owns
        the returned fds.
        """
        cmd = Command.DEVICE_GET_REGION_IO_FDS
        argsz = RegionIoFds.HEADER_SIZE
        for _ in range(MAX_ARGSZ_RETRIES):
            _, payload, fds = await self.request(cmd, RegionIoFds(argsz, 0, index, 0).pack())
            try:
                with _parsing(cmd):
                    head = RegionIoFds.unpack(payload)
                self._exact(cmd, payload, min(head.argsz, argsz))
                if head.index != index:
                    raise InvalidReply(cmd, f"reply for region {head.index}, asked {index}")
                if head.argsz > argsz:
                    if head.argsz > MAX_MESSAGE_SIZE:
                        raise InvalidReply(cmd, f"reply argsz {head.argsz} is absurd")
                    if fds:
                        raise InvalidReply(cmd, f"{len(fds)} fd(s) with a truncated reply")
                    argsz = head.argsz
                    continue
                need = RegionIoFds.HEADER_SIZE + head.count * RegionIoFds.ENTRY_SIZE
                if head.argsz != need:
                    raise InvalidReply(
                        cmd, f"argsz {head.argsz} for {head.count} entries, expected {need}"
                    )
                with _parsing(cmd):
                    reply = RegionIoFds.unpack_reply(payload)
                if head.count and not fds:
                    raise InvalidReply(cmd, f"{head.count} entries but no fds")
                if len(fds) > head.count:
                    raise InvalidReply(cmd, f"{len(fds)} fds for {head.count} entries")
                for entry in reply.entries:
                    if entry.fd_index >= len(fds):
                        raise InvalidReply(cmd, f"fd_index {entry.fd_index} of {len(fds)} fds")
            except BaseException:
                close_fds(fds)
                raise
            return reply, fds
        raise InvalidReply(cmd, "reply argsz keeps growing")

    async def device_feature(
        self, flags: int, data: bytes = b"", argsz: int | None = None
    ) -> bytes:
        """DEVICE_FEATURE; returns the whole reply payload (argsz, flags, data).

        ``argsz`` defaults to the request size (at least 16 for a GET). SET and PROBE
        replies must echo the request byte for byte (libvfio-user's client memcmp()s them);
        a GET reply must keep our flags, declare its own size as argsz and fit our argsz.
        """
        cmd = Command.DEVICE_FEATURE
        is_get = bool(flags & FEATURE_GET) and not flags & FEATURE_PROBE
        if argsz is None:
            argsz = DeviceFeatureMsg.HEADER_SIZE + len(data)
            if is_get:
                argsz = max(argsz, 16)
        request = DeviceFeatureMsg(argsz, flags, bytes(data)).pack()
        _, payload, fds = await self.request(cmd, request)
        self._no_fds(cmd, fds)
        if not is_get:
            if payload != request:
                raise InvalidReply(cmd, "SET/PROBE reply does not echo the request")
            return payload
        with _parsing(cmd):
            reply = DeviceFeatureMsg.unpack(payload)
        if reply.flags != flags:
            raise InvalidReply(cmd, f"reply flags {reply.flags:#x}, sent {flags:#x}")
        if reply.argsz != len(payload):
            raise InvalidReply(cmd, f"reply argsz {reply.argsz} for {len(payload)} bytes")
        if len(payload) > argsz:
            raise InvalidReply(cmd, f"reply of {len(payload)} bytes exceeds argsz {argsz}")
        return payload

    async def mig_precopy_info(self) -> tuple[int, int]:
        """MIG_GET_PRECOPY_INFO (19, the ``precopy_info`` extension): ``(initial_bytes,
        dirty_bytes)`` the device has for us now, in PRE_COPY."""
        cmd = Command.MIG_GET_PRECOPY_INFO
        request = PrecopyInfo(PrecopyInfo.SIZE, 0, 0, 0).pack()
        _, payload, fds = await self.request(cmd, request)
        self._no_fds(cmd, fds)
        self._exact(cmd, payload, PrecopyInfo.SIZE)
        with _parsing(cmd):
            reply = PrecopyInfo.unpack(payload)
        return reply.initial_bytes, reply.dirty_bytes

    @property
    def data_fd_negotiated(self) -> bool:
        """The server agreed to pass migration data fds (the ``data_fd`` extension)."""
        migration = self.server_caps.get("migration")
        return isinstance(migration, dict) and migration.get("data_fd") is True

    async def set_mig_state(self, state: int) -> int | None:
        """SET MIG_DEVICE_STATE; returns the data fd the server passed (caller owns it).

        Without the ``data_fd`` extension the reply must echo the request byte for byte.
        With it, the reply's data_fd field is 0 (the index of the one fd passed) when the
        transition opened a data session, else -1, and nothing else may differ.
        """
        cmd = Command.DEVICE_FEATURE
        flags = FEATURE_SET | DeviceFeature.MIG_DEVICE_STATE
        request = DeviceFeatureMsg(16, flags, MigDeviceState(state).pack()).pack()
        _, payload, fds = await self.request(cmd, request)
        if not self.data_fd_negotiated:
            self._no_fds(cmd, fds)
            if payload != request:
                raise InvalidReply(cmd, "SET reply does not echo the request")
            return None
        expected = request[:8] + MigDeviceState(state, 0 if fds else -1).pack()
        if payload != expected or len(fds) > 1:
            close_fds(fds)
            raise InvalidReply(cmd, "SET reply's data_fd does not match the fds passed")
        return fds[0] if fds else None

    async def mig_data_read(self, size: int) -> bytes:
        """Up to ``size`` bytes of migration data (fewer = end of data for now).

        Only the reply's ``size`` field counts: padding after the valid bytes (libvfio-user
        pads to the requested size) is tolerated and dropped.
        """
        return bytes(await self.mig_data_read_reply(await self.mig_data_read_send(size), size))

    async def mig_data_read_send(self, size: int, into: bytearray | None = None) -> InFlight:
        """Send MIG_DATA_READ of ``size`` bytes; :meth:`mig_data_read_reply` gets the data.

        With ``into`` (at least 8 + ``size`` bytes, e.g. from :meth:`receive_buffers`), a
        large reply is received straight into it: the caller must leave it alone until it
        has the reply and is done with its data."""
        request = MigDataRead(_MIG_HEADER + size, size).pack()
        return await self._send_request(Command.MIG_DATA_READ, (request,), (), into=into)

    async def mig_data_read_reply(self, sent: InFlight, size: int) -> memoryview:
        """The data of a MIG_DATA_READ sent with :meth:`mig_data_read_send`, as a view of
        the reply (not copied): of the ``into`` buffer when it was received there."""
        cmd = Command.MIG_DATA_READ
        _, reply, fds = await sent.reply()
        self._no_fds(cmd, fds)
        in_place = sent.received_in_place
        payload = reply if in_place is None else in_place
        if len(payload) < _MIG_HEADER:
            raise InvalidReply(cmd, f"reply of {len(payload)} bytes: no MIG_DATA header")
        argsz, valid = struct.unpack_from("<II", payload)
        if len(payload) < _MIG_HEADER + valid:
            raise InvalidReply(cmd, f"reply of {len(payload)} bytes announces {valid} data bytes")
        if valid > size:
            raise InvalidReply(cmd, f"{valid} bytes returned, asked at most {size}")
        if len(payload) > _MIG_HEADER + size:
            raise InvalidReply(cmd, f"reply of {len(payload)} bytes for {size} asked")
        if argsz < _MIG_HEADER + valid:
            raise InvalidReply(cmd, f"reply argsz {argsz} < 8 + {valid}")
        return memoryview(payload)[_MIG_HEADER : _MIG_HEADER + valid]

    async def mig_data_write(self, data: bytes | bytearray | memoryview) -> None:
        await self.mig_data_write_reply(await self.mig_data_write_send(data))

    async def mig_data_write_send(self, data: bytes | bytearray | memoryview) -> InFlight:
        """Send MIG_DATA_WRITE; :meth:`mig_data_write_reply` waits for the server's answer.
        ``data`` is sent from where it is (gathered after the header): once this returns,
        the kernel has it and the caller may reuse its buffer."""
        head = struct.pack("<II", _MIG_HEADER + len(data), len(data))
        return await self._send_request(Command.MIG_DATA_WRITE, (head, data), ())

    async def mig_data_write_reply(self, sent: InFlight) -> None:
        _, reply, fds = await sent.reply()
        self._no_fds(Command.MIG_DATA_WRITE, fds)
        self._exact(Command.MIG_DATA_WRITE, reply, 0)


@contextmanager
def _parsing(command: int) -> Iterator[None]:
    """Turn a codec's ProtocolError about a reply into InvalidReply."""
    try:
        yield
    except ProtocolError as exc:
        raise InvalidReply(command, exc.message) from None
