"""Command handling for one connection: wire requests in, device calls, reply payloads out.

:class:`CommandHandler` is one per connection, created once the version is negotiated.
Handlers are synchronous so that the common case (a register access) costs one function
call. Each returns an :class:`Outcome` (reply payload and fds to pass along) or raises
:class:`~protocol.errors.ProtocolError` / :class:`~devices.api.DeviceError`, which the
connection turns into a header-only error reply. A handler takes the fds it keeps out of
the list it is given; the connection closes whatever is left.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from devices.api import Device, DeviceError, Region
from devices.errors import MigrationRefused
from emulator.datafd import DataFdSessions
from emulator.dirty import REPORT as LOGGING_REPORT
from emulator.dirty import START_HEADER as LOGGING_START
from emulator.dirty import LoggingFeature
from emulator.dma import IovaMap
from emulator.irqs import IrqBindings
from emulator.limits import MIGRATION_SESSIONS, Limits
from emulator.migration_region import region_for
from emulator.worker import DeviceWorker
from protocol.constants import (
    FEATURE_GET,
    FEATURE_INDEX_MASK,
    FEATURE_PROBE,
    FEATURE_SET,
    FLAG_NO_REPLY,
    PCI_NUM_IRQS,
    Command,
    DeviceFeature,
    DeviceFlags,
    IoeventfdFlags,
    IoFdType,
    IrqSetFlags,
    PciRegion,
    RegionFlags,
)
from protocol.dirty_logging import bitmap_bytes
from protocol.errors import ProtocolError, require
from protocol.header import Header
from protocol.messages import (
    REGION_ACCESS,
    DeviceFeatureMsg,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    IoFdEntry,
    IrqInfo,
    IrqSet,
    MigData,
    MigDataRead,
    MigDeviceState,
    PrecopyInfo,
    RegionAccess,
    RegionData,
    RegionInfo,
    RegionIoFds,
    RegionWriteMulti,
    SparseMmapCap,
    TypeCap,
    pack_region_caps,
    unpack_mig_data_view,
)
from protocol.migration_fsm import FROZEN_STATES
from protocol.migration_v1 import DirtyPages, DirtyPagesFlags
from protocol.version import ClientCapabilities, ServerCapabilities

U64 = struct.Struct("<Q")
MIG_DATA_HEADER = 8  # argsz, size
#: Features served, with the operations each supports (kernel/libvfio-user semantics).
FEATURE_OPS = {
    DeviceFeature.MIGRATION: FEATURE_GET,
    DeviceFeature.MIG_DEVICE_STATE: FEATURE_GET | FEATURE_SET,
    DeviceFeature.DMA_LOGGING_START: FEATURE_SET,
    DeviceFeature.DMA_LOGGING_STOP: FEATURE_SET,
    DeviceFeature.DMA_LOGGING_REPORT: FEATURE_GET,
    DeviceFeature.MIG_DATA_SIZE: FEATURE_GET,
}
#: Features only a device serving migration v2 offers.
V2_FEATURES = frozenset(
    {DeviceFeature.MIGRATION, DeviceFeature.MIG_DEVICE_STATE, DeviceFeature.MIG_DATA_SIZE}
)
#: Dirty logging is served for every device (it is about the client's memory, not state).
LOGGING_FEATURES = frozenset(
    {
        DeviceFeature.DMA_LOGGING_START,
        DeviceFeature.DMA_LOGGING_STOP,
        DeviceFeature.DMA_LOGGING_REPORT,
    }
)


@dataclass(slots=True)
class Outcome:
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)  # sent with the reply; still owned by us
    #: fds sent with the reply that are ours to close once sent (a data fd's client end).
    transient_fds: list[int] = field(default_factory=list)
    #: When not empty, the payload is these buffers in order, sent without joining them
    #: (``payload`` is then unused): migration data as views of the device's state.
    gathered: Sequence[bytes | memoryview] = ()


EMPTY = Outcome()


@dataclass(slots=True)
class Deferred:
    """A command that must wait (e.g. for outstanding DMA before a migration arc). The
    connection runs ``work`` while it keeps routing DMA replies, holds later commands back
    so they are still processed in order, and sends the Outcome when ``work`` returns."""

    work: Callable[[], Awaitable[Outcome]]


class RegionFds:
    """fds of the device's mmap-able regions (owned by the server, shared by connections)."""

    def __init__(self, fds: dict[int, int] | None = None) -> None:
        self.fds = dict(fds or {})

    def get(self, index: int) -> int | None:
        return self.fds.get(index)


class IoEventFds:
    """ioeventfds handed to the client by GET_REGION_IO_FDS, per region (created lazily)."""

    def __init__(self, create: Callable[[int], list[int]]) -> None:
        self._create = create
        self.by_region: dict[int, list[int]] = {}

    def for_region(self, index: int) -> list[int]:
        if index not in self.by_region:
            self.by_region[index] = self._create(index)
        return self.by_region[index]


class CommandHandler:
    """Answers the commands of one connection (the client's capabilities are known) by
    calling the device, its migration engine (state changes through the device worker,
    which waits for the device's work first) and the connection's DMA maps and irq fds."""

    def __init__(
        self,
        device: Device,
        *,
        client: ClientCapabilities,
        server: ServerCapabilities,
        maps: IovaMap,
        irqs: IrqBindings,
        region_fds: RegionFds,
        io_fds: IoEventFds,
        worker: DeviceWorker,
        data_fds: DataFdSessions | None = None,
        logging: LoggingFeature | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.device = device
        self.client = client
        self.server = server
        self.maps = maps
        self.irqs = irqs
        self.region_fds = region_fds
        self.io_fds = io_fds
        self.worker = worker
        self.data_fds = data_fds
        self.logging = logging
        #: The legacy v1 migration region (``migration=v1`` or ``both``), else None.
        self.v1 = region_for(device)
        self.limits = limits or Limits()
        self.handlers: dict[int, Callable[[Header, bytes, list[int]], Outcome | Deferred]] = {
            Command.DMA_MAP: self.dma_map,
            Command.DMA_UNMAP: self.dma_unmap,
            Command.DEVICE_GET_INFO: self.get_info,
            Command.DEVICE_GET_REGION_INFO: self.get_region_info,
            Command.DEVICE_GET_REGION_IO_FDS: self.get_region_io_fds,
            Command.DEVICE_GET_IRQ_INFO: self.get_irq_info,
            Command.DEVICE_SET_IRQS: self.set_irqs,
            Command.REGION_READ: self.region_read,
            Command.REGION_WRITE: self.region_write,
            Command.REGION_WRITE_MULTI: self.region_write_multi,
            Command.DEVICE_RESET: self.reset,
            Command.DEVICE_FEATURE: self.device_feature,
            Command.MIG_DATA_READ: self.mig_data_read,
            Command.MIG_DATA_WRITE: self.mig_data_write,
            Command.MIG_GET_PRECOPY_INFO: self.mig_get_precopy_info,
            Command.DIRTY_PAGES: self.dirty_pages,
        }

    def handle(
        self, header: Header, payload: bytes | memoryview, fds: list[int]
    ) -> Outcome | Deferred:
        """``payload`` is a view for a command received in place (the connection's reused
        buffer: see Connection), valid only during this call."""
        if isinstance(payload, memoryview):
            if header.command == Command.MIG_DATA_WRITE:
                return self.mig_data_write(header, payload, fds)
            payload = payload.tobytes()
        # Hot path: no error text is formatted unless there is an error.
        handler = self.handlers.get(header.command)
        if handler is None:
            raise ProtocolError(errno.EINVAL, f"command {header.command_name()} not served")
        if not payload and header.command != Command.DEVICE_RESET:
            # libvfio-user refuses payload-less commands other than DEVICE_RESET too.
            raise ProtocolError(errno.EINVAL, f"{header.command_name()} without payload")
        return handler(header, payload, fds)

    # -- DMA -------------------------------------------------------------------------------
    def dma_map(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        request = DmaMap.unpack(payload)
        require(len(fds) <= 1, f"DMA_MAP with {len(fds)} fds")
        self.maps.add(request, fds.pop() if fds else None)
        return EMPTY

    def dma_unmap(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        request = DmaUnmap.unpack(payload)
        if request.wants_bitmap:
            return Outcome(self._unmap_with_bitmap(request))
        if request.unmap_all:
            self.maps.clear()
        else:
            self.maps.remove(request.address, request.size)
        return Outcome(request.pack_echo())

    # -- device and regions ----------------------------------------------------------------
    def get_info(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        DeviceInfo.unpack(payload)
        flags = DeviceFlags.PCI | (DeviceFlags.RESET if self.device.supports_reset else 0)
        info = DeviceInfo(DeviceInfo.SIZE, flags, self.num_regions, PCI_NUM_IRQS)
        return Outcome(info.pack())

    @property
    def num_regions(self) -> int:
        """The device's regions, and the v1 migration region after them if served."""
        return self.device.num_regions + (1 if self.v1 is not None else 0)

    def _is_v1_region(self, index: int) -> bool:
        return self.v1 is not None and index == self.v1.index

    def _region(self, index: int) -> Region | None:
        region = self.device.regions.get(index)
        if region is None and index >= self.num_regions:
            raise ProtocolError(errno.EINVAL, f"region {index} >= {self.num_regions} regions")
        return region if region is not None and region.size else None

    def get_region_info(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        request = RegionInfo.unpack(payload)
        index = request.index
        if self.v1 is not None and self._is_v1_region(index):
            return Outcome(self.v1.region_info(request.argsz))
        region = self._region(index)
        if region is None:
            return Outcome(RegionInfo(RegionInfo.SIZE, 0, index, 0, 0, 0).pack())
        flags = (RegionFlags.READ if region.readable else 0) | (
            RegionFlags.WRITE if region.writable else 0
        )
        caps: list[SparseMmapCap | TypeCap] = []
        fd = self.region_fds.get(index)
        # The fd can only travel if the client accepts fds at all.
        if region.mmap_areas and fd is not None and self.client.max_msg_fds > 0:
            flags |= RegionFlags.MMAP
            caps.append(SparseMmapCap(region.mmap_areas))
        else:
            fd = None
        if region.type_cap is not None:
            caps.append(TypeCap(*region.type_cap))
        if not caps:
            return Outcome(RegionInfo(RegionInfo.SIZE, flags, index, 0, region.size, 0).pack())
        body = pack_region_caps(caps, RegionInfo.SIZE)
        needed = RegionInfo.SIZE + len(body)
        if request.argsz < needed:
            # Too small for the caps: fixed part only, argsz tells the client to ask again.
            return Outcome(RegionInfo(needed, flags, index, 0, region.size, 0).pack())
        info = RegionInfo(needed, flags | RegionFlags.CAPS, index, RegionInfo.SIZE, region.size, 0)
        return Outcome(info.pack() + body, [fd] if fd is not None else [])

    def get_region_io_fds(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        request = RegionIoFds.unpack(payload)
        require(request.flags == 0 and request.count == 0, "GET_REGION_IO_FDS: flags/count != 0")
        require(self._region(request.index) is not None, f"region {request.index} is empty")
        doorbells = [d for d in self.device.ioeventfds if d.region == request.index]
        needed = RegionIoFds.HEADER_SIZE + len(doorbells) * RegionIoFds.ENTRY_SIZE
        if request.argsz < needed or not doorbells:
            reply = RegionIoFds(needed, 0, request.index, len(doorbells))
            return Outcome(reply.pack())
        require(
            len(doorbells) <= self.client.max_msg_fds,
            f"{len(doorbells)} ioeventfds exceed the client's max_msg_fds",
            errno.E2BIG,
        )
        eventfds = self.io_fds.for_region(request.index)
        entries = tuple(
            IoFdEntry(
                d.offset,
                d.size,
                i,
                IoFdType.IOEVENTFD,
                IoeventfdFlags.DATAMATCH if d.datamatch is not None else 0,
                d.datamatch or 0,
            )
            for i, d in enumerate(doorbells)
        )
        reply = RegionIoFds(needed, 0, request.index, len(entries), entries)
        return Outcome(reply.pack(), list(eventfds))

    def _check_count(self, count: int) -> None:
        if count > self.server.max_data_xfer_size:
            raise ProtocolError(
                errno.EINVAL,
                f"count {count} exceeds max_data_xfer_size {self.server.max_data_xfer_size}",
            )

    # REGION_READ / REGION_WRITE are the guest's register accesses, by far the most frequent
    # messages: they use the payload struct directly instead of the codec objects
    # (RegionAccess / RegionData lay out the same bytes; see docs/performance.md).
    def region_read(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        if len(payload) != REGION_ACCESS.size:
            RegionAccess.unpack(payload)  # raises for a short payload
            raise ProtocolError(errno.EINVAL, "REGION_READ: trailing bytes")
        offset, index, count = REGION_ACCESS.unpack_from(payload)
        self._check_count(count)
        self._region(index)
        if count == 0:
            return Outcome(payload)  # the header and no bytes, as every REGION_READ reply
        if self.v1 is not None and index == self.v1.index:
            return Outcome(payload + self.v1.read(offset, count))
        data = self.device.region_read(index, offset, count)
        return Outcome(payload + data)  # the reply echoes offset, region, count

    def _check_writable_now(self, region: int, offset: int, count: int) -> None:
        """While the state is being read out (STOP_COPY) or loaded (RESUMING), a BAR write
        would change state behind the stream's back. Config space and the MSI-X table stay
        writable in every state."""
        if self.device.migration.state not in FROZEN_STATES:
            return
        if region == PciRegion.CONFIG:
            return
        msix = self.device.config.msix_layout
        if msix is not None and region == msix.table_bar:
            table_end = msix.table_offset + 16 * msix.table_size
            if msix.table_offset <= offset and offset + count <= table_end:
                return
        raise DeviceError(
            errno.EINVAL, f"region {region} is not writable in {self.device.migration.state.name}"
        )

    def region_write(self, header: Header, payload: bytes, fds: list[int]) -> Outcome | Deferred:
        if len(payload) < REGION_ACCESS.size:
            RegionData.unpack(payload)  # raises with the codec's message
        offset, index, count = REGION_ACCESS.unpack_from(payload)
        if len(payload) != REGION_ACCESS.size + count:
            RegionData.unpack(payload)  # raises with the codec's message
        self._check_count(count)
        self._region(index)
        if self.v1 is not None and index == self.v1.index:
            return self._v1_region_write(offset, payload[REGION_ACCESS.size :])
        if self.device.migration.state in FROZEN_STATES:
            self._check_writable_now(index, offset, count)
        if count:
            self.device.region_write(index, offset, payload[REGION_ACCESS.size :])
        if header.flags & FLAG_NO_REPLY:
            return EMPTY  # posted: the reply is never sent, so not built either
        return Outcome(payload[: REGION_ACCESS.size])

    def _v1_region_write(self, offset: int, data: bytes) -> Outcome | Deferred:
        """A write to the v1 migration region; a ``device_state`` write is a state change
        of the engine, answered once it is done."""
        assert self.v1 is not None
        echo = Outcome(RegionAccess(offset, self.v1.index, len(data)).pack())
        target = self.v1.write(offset, data) if data else None
        if target is None:
            return echo
        v1 = self.v1

        async def change_state() -> Outcome:
            await v1.transition(target, self.worker.change_state)
            return echo

        return Deferred(change_state)

    def region_write_multi(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        require(self.server.write_multiple, "REGION_WRITE_MULTI was not offered")
        writes = RegionWriteMulti.unpack_writes(payload)  # all checked before any is done
        frozen = self.device.migration.state in FROZEN_STATES
        region_write = self.device.region_write
        for offset, index, data in writes:
            # The v1 migration region is not among the device's regions: entries aimed at
            # it get EINVAL from the device (its state changes need a reply per write).
            self._region(index)
            if frozen:
                self._check_writable_now(index, offset, len(data))
            region_write(index, offset, data)
        return Outcome(U64.pack(len(writes)))

    def reset(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        require(payload == b"", "DEVICE_RESET carries no payload")
        if not self.device.supports_reset:
            raise DeviceError(errno.ENOTSUP, "device does not support reset")
        # The device must not touch guest memory or interrupts after the reply.
        self.worker.cancel()
        if self.data_fds is not None:
            self.data_fds.close()  # a reset ends any migration data session
        self.device.migration.abandon_resumed()  # undone first: the reset has the last word
        self.device.reset()
        self.device.migration.reset()  # -> RUNNING, also out of ERROR (kernel, spec)
        self.worker.follow_device()  # RUNNING: its (new) work may run
        if self.v1 is not None:
            self.v1.reset()
        return EMPTY

    # -- interrupts -------------------------------------------------------------------------
    def get_irq_info(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        request = IrqInfo.unpack(payload)
        require(request.index < PCI_NUM_IRQS, f"irq index {request.index} does not exist")
        controller = self.device.irq
        info = IrqInfo(
            IrqInfo.SIZE,
            controller.info_flags(request.index),
            request.index,
            controller.count(request.index),
        )
        return Outcome(info.pack())

    def set_irqs(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        request = IrqSet.unpack(payload)
        limit = self.limits.max_irq_vectors
        require(
            request.count <= limit,
            f"SET_IRQS: {request.count} vectors exceed max_irq_vectors={limit}",
            errno.E2BIG,
        )
        if request.data_type == IrqSetFlags.DATA_EVENTFD and fds:
            # Triggers being replaced are released first, so count what stays bound.
            replaced = self.irqs.bound_in(request.index, request.start, request.count)
            bound = self.irqs.fd_count() - replaced + len(fds)
            require(
                bound <= limit,
                f"SET_IRQS: {bound} eventfds would be bound, max_irq_vectors={limit}",
                errno.E2BIG,
            )
        self.irqs.set_irqs(request, fds)
        return EMPTY

    # -- migration ---------------------------------------------------------------------------
    def device_feature(self, header: Header, payload: bytes, fds: list[int]) -> Outcome | Deferred:
        request = DeviceFeatureMsg.unpack(payload)
        feature = request.flags & FEATURE_INDEX_MASK
        if feature not in LOGGING_FEATURES and not self.device.migration.caps:
            raise ProtocolError(errno.EINVAL, "device has no migration features")
        if feature in V2_FEATURES:
            self._check_v2()
        ops = request.flags & (FEATURE_GET | FEATURE_SET | FEATURE_PROBE)
        require(bool(ops), "DEVICE_FEATURE: no operation")
        require(
            bool(ops & FEATURE_PROBE) or (ops & (FEATURE_GET | FEATURE_SET)).bit_count() == 1,
            "DEVICE_FEATURE: GET and SET together without PROBE",
        )
        supported = FEATURE_OPS.get(DeviceFeature(feature)) if feature in FEATURE_OPS else None
        require(supported is not None, f"DEVICE_FEATURE: feature {feature} not supported")
        assert supported is not None
        asked = ops & (FEATURE_GET | FEATURE_SET)
        require(asked & supported == asked, f"DEVICE_FEATURE {feature}: operation not supported")
        if ops & FEATURE_PROBE:
            return Outcome(payload)  # "data is not used for probing"
        if feature in LOGGING_FEATURES:
            return Outcome(self._logging(request, feature, payload))
        if ops & FEATURE_GET:
            return Outcome(self._feature_get(request, feature))
        return self._set_state(request, payload)

    def _logging(self, request: DeviceFeatureMsg, feature: int, payload: bytes) -> bytes:
        require(self.logging is not None, "dirty logging is not available on this session")
        assert self.logging is not None
        if feature == DeviceFeature.DMA_LOGGING_START:
            self.logging.start(request.data)
            return payload  # SET replies echo the request (libvfio-user's client checks)
        if feature == DeviceFeature.DMA_LOGGING_STOP:
            self.logging.stop()
            return payload
        data = self.logging.report(request.data, request.argsz, self.server.max_data_xfer_size)
        return DeviceFeatureMsg(
            DeviceFeatureMsg.HEADER_SIZE + len(data), request.flags, data
        ).pack()

    def _feature_get(self, request: DeviceFeatureMsg, feature: int) -> bytes:
        engine = self.device.migration
        if feature == DeviceFeature.MIGRATION:
            data = U64.pack(engine.caps)
        elif feature == DeviceFeature.MIG_DEVICE_STATE:
            data = MigDeviceState(engine.state).pack()
        else:
            data = U64.pack(engine.stop_copy_estimate())
        size = DeviceFeatureMsg.HEADER_SIZE + len(data)
        require(request.argsz >= size, f"DEVICE_FEATURE GET: argsz {request.argsz} < {size}")
        return DeviceFeatureMsg(size, request.flags, data).pack()

    def _set_state(self, request: DeviceFeatureMsg, payload: bytes) -> Deferred:
        asked = MigDeviceState.unpack(request.data)
        require(request.argsz >= len(payload), "MIG_DEVICE_STATE SET: argsz below the request")
        data_fds = self.data_fds if self._uses_data_fd() else None
        return Deferred(lambda: self._change_state(asked.device_state, payload, data_fds))

    async def _change_state(
        self, target: int, payload: bytes, data_fds: DataFdSessions | None
    ) -> Outcome:
        """MIG_DEVICE_STATE SET, run as a deferred command: the rules are
        protocol.migration_fsm's, the arcs the engine's, the waiting for the device's work
        the worker's; here are the connection's parts (the process-wide session limit, the
        data fd's pipe)."""
        limit = self.limits.max_migration_sessions
        if not MIGRATION_SESSIONS.may_open(self.device, target, limit):
            raise DeviceError(
                errno.EBUSY, f"{limit} migration session(s) already open in this process"
            )
        if data_fds is None:
            await self.worker.change_state(target)
            # libvfio-user's client compares the reply with its request byte for byte.
            return Outcome(payload)
        engine = self.device.migration
        try:
            await data_fds.before_transition(engine, target)
            result = await self.worker.change_state(target)
        except MigrationRefused:
            raise  # an impossible request changes nothing, its data session included
        except DeviceError:
            data_fds.close()  # the data was consumed and refused: the session is over
            raise
        fd = data_fds.after_transition(engine, result.arcs, precopy=self._uses_precopy_info())
        # As the kernel's ioctl returns a new data_fd: here the index of the passed fd.
        answer = MigDeviceState(target, -1 if fd is None else 0)
        data_at = DeviceFeatureMsg.HEADER_SIZE
        reply = payload[:data_at] + answer.pack() + payload[data_at + answer.SIZE :]
        if fd is None:
            return Outcome(reply)
        return Outcome(reply, [fd], transient_fds=[fd])

    def _uses_data_fd(self) -> bool:
        return (
            self.data_fds is not None
            and self.client.migration_data_fd
            and self.server.migration_data_fd
            and self.client.max_msg_fds > 0
        )

    def _uses_precopy_info(self) -> bool:
        return self.client.migration_precopy_info and self.server.migration_precopy_info

    def mig_get_precopy_info(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        """MIG_GET_PRECOPY_INFO (19, extension): the kernel's VFIO_MIG_GET_PRECOPY_INFO.
        The sizes count what is already in a data fd, so a client reading that many bytes
        from it never blocks; (0, 0) is the kernel's ENOMSG, nothing more for now."""
        self._check_v2()
        require(
            self._uses_precopy_info(),
            "MIG_GET_PRECOPY_INFO needs the negotiated precopy_info extension",
        )
        PrecopyInfo.unpack(payload)
        pipe = self.data_fds if self.data_fds is not None and self.data_fds.active else None
        initial, dirty = self.device.migration.precopy_info(pipe.unread() if pipe else 0)
        if pipe is not None:
            pipe.wake()  # what the device just gave goes into the pipe
        return Outcome(PrecopyInfo(PrecopyInfo.SIZE, 0, initial, dirty).pack())

    def _check_no_data_fd(self) -> None:
        # One stream, one reader: once a data fd carries this session, in-band is refused.
        require(
            self.data_fds is None or not self.data_fds.active,
            "migration data of this session goes over the passed data fd",
        )

    def _check_v2(self) -> None:
        require(
            "v2" in self.device.migration_protocols,
            "this device migrates through the v1 migration region (migration=v1)",
        )

    def mig_data_read(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        self._check_v2()
        request = MigDataRead.unpack(payload)
        self._check_no_data_fd()
        # Both sides' transfer sizes bound the reply (it is padded to the size asked).
        require(
            request.size <= min(self.client.max_data_xfer_size, self.server.max_data_xfer_size),
            f"MIG_DATA_READ of {request.size} bytes exceeds max_data_xfer_size",
        )
        pieces = self.device.migration.read_views(request.size)
        valid = sum(len(piece) for piece in pieces)
        head = MigData(MIG_DATA_HEADER + valid, valid, b"").pack()
        # libvfio-user pads the reply to the requested size; ``size`` says what is valid.
        padding = [bytes(request.size - valid)] if valid < request.size else []
        return Outcome(gathered=[head, *pieces, *padding])

    def mig_data_write(
        self, header: Header, payload: bytes | memoryview, fds: list[int]
    ) -> Outcome:
        self._check_v2()
        argsz, size, data = unpack_mig_data_view(payload)
        self._check_no_data_fd()
        end = MIG_DATA_HEADER + size
        require(len(payload) == end, "MIG_DATA_WRITE: size and payload differ")
        require(argsz >= end, "MIG_DATA_WRITE: argsz < 8 + size")
        self._check_count(size)
        # A view, possibly of the connection's reused receive buffer: write_data consumes
        # it (copies or applies it) before returning.
        self.device.migration.write_data(data)
        return EMPTY

    # -- protocol 0.1 dirty-page tracking --------------------------------------------------------
    def dirty_pages(self, header: Header, payload: bytes, fds: list[int]) -> Outcome:
        """DIRTY_PAGES (14) over the same dirty log as DMA_LOGGING (protocol.migration_v1
        rule 5). START logs every write at the negotiated ``migration.pgsize``."""
        # Old libvfio-user answered ENOTSUP when migration was not configured (facts 9.3).
        self._check_protocol_0_1("DIRTY_PAGES", no_v1=errno.ENOTSUP)
        require(self.logging is not None, "dirty logging is not available on this session")
        assert self.logging is not None and self.client.migration_pgsize is not None
        request = DirtyPages.unpack(payload)
        if request.flags == DirtyPagesFlags.START:
            self.logging.start(LOGGING_START.pack(self.client.migration_pgsize, 0, 0))
            return EMPTY
        if request.flags == DirtyPagesFlags.STOP:
            self.logging.stop()
            return EMPTY
        assert request.range is not None
        if request.argsz < request.reply_argsz:
            return Outcome(request.pack_too_small())
        bitmap_range = request.range
        report = LOGGING_REPORT.pack(bitmap_range.iova, bitmap_range.size, bitmap_range.pgsize)
        data = self.logging.report(report, argsz=request.reply_argsz)
        return Outcome(request.pack_bitmap_reply(data[LOGGING_REPORT.size :]))

    def _unmap_with_bitmap(self, request: DmaUnmap) -> bytes:
        """DMA_UNMAP with GET_DIRTY_BITMAP (protocol 0.1): the mapping's dirty bitmap, read
        and cleared from the dirty log, then the unmap. Reply: the 24-byte struct, the
        ``pgsize, size`` pair, the bitmap (facts 9.3)."""
        self._check_protocol_0_1("DMA_UNMAP with GET_DIRTY_BITMAP")
        require(self.logging is not None, "dirty logging is not available on this session")
        assert self.logging is not None
        pgsize, bitmap_size = request.bitmap_pgsize, request.bitmap_size
        require(pgsize >= 4096 and pgsize & (pgsize - 1) == 0, f"DMA_UNMAP: page size {pgsize}")
        require(
            bitmap_bytes(request.size, pgsize) <= bitmap_size <= 1 << 20,
            f"DMA_UNMAP: bitmap of {bitmap_size} bytes for {request.size:#x} bytes",
        )
        head = request.pack()
        require(
            request.argsz >= len(head) + bitmap_size,
            f"DMA_UNMAP: argsz {request.argsz} < {len(head) + bitmap_size}",
        )
        require(
            (request.address, request.size) in self.maps.slots(),
            f"DMA_UNMAP: no mapping is exactly [{request.address:#x}, +{request.size:#x})",
            errno.ENOENT,
        )
        report = LOGGING_REPORT.pack(request.address, request.size, pgsize)
        bitmap = self.logging.report(report, argsz=1 << 30)[LOGGING_REPORT.size :]
        self.maps.remove(request.address, request.size)
        return head + bitmap + bytes(bitmap_size - len(bitmap))

    def _check_protocol_0_1(self, what: str, no_v1: int = errno.EINVAL) -> None:
        """Protocol 0.1 dirty tracking is for clients that announced it (the ``migration``
        capability) talking to a device started with the v1 interface; everyone else sees
        the current spec, where it does not exist."""
        require(
            self.client.migration_pgsize is not None,
            f"{what} needs the protocol 0.1 migration capability",
        )
        require(
            self.v1 is not None, f"{what} needs a device started with migration=v1 or both", no_v1
        )
