"""Numbers of the vfio-user wire protocol (spec 0.9.2) and the VFIO uAPI it borrows from."""

from __future__ import annotations

import enum

HEADER_SIZE = 16

#: Protocol version we implement: libvfio-user speaks 0.2, QEMU proposes 0.0.
PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 2


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # retired in spec 0.9.2; served only to protocol-0.1 clients (migration cap)
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18
    #: Extension (docs/qemu-migration.md): served only to clients that negotiated
    #: ``"migration": {"precopy_info": true}``; the kernel's VFIO_MIG_GET_PRECOPY_INFO.
    MIG_GET_PRECOPY_INFO = 19


#: Commands only the server sends (the client answers them).
SERVER_TO_CLIENT_COMMANDS = frozenset({Command.DMA_READ, Command.DMA_WRITE})


class MsgType(enum.IntEnum):
    COMMAND = 0
    REPLY = 1


FLAGS_TYPE_MASK = 0xF
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
FLAGS_KNOWN = FLAGS_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR


class DeviceFlags(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(enum.IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2
    MIGRATION_NDMA = 6  # legacy v1 migration region: the device can quiesce P2P (NDMA bit)


class PciRegion(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9


class IrqIndex(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_MASK = IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD
IRQ_SET_ACTION_MASK = (
    IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK | IrqSetFlags.ACTION_TRIGGER
)


class DmaMapFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(enum.IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


class IoFdType(enum.IntEnum):
    IOEVENTFD = 0
    IOREGIONFD = 1


class IoeventfdFlags(enum.IntFlag):
    DATAMATCH = 1 << 0
    PIO = 1 << 1
    DEASSIGN = 1 << 2


class DeviceFeature(enum.IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9


FEATURE_INDEX_MASK = 0xFFFF
FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18
FEATURE_FLAGS_KNOWN = FEATURE_INDEX_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE


class MigrationCaps(enum.IntFlag):
    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class MigState(enum.IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


#: Limits that clients impose on us (from the facts sheet) and that bound what we advertise.
QEMU_MAX_MSG_FDS = 16
QEMU_MAX_XFER_SIZE = 64 * 1024 * 1024
MAX_DMA_MAPS_LIMIT = 65535
DEFAULT_MAX_DATA_XFER_SIZE = 1024 * 1024
SPEC_DEFAULT_MAX_MSG_FDS = 1
