"""PCI configuration space of one emulated type-0 function (pure model, no I/O).

The space is kept as four parallel byte arrays:

* ``_regs``: what software reads right now;
* ``_init``: the power-on value of every byte (the *layout*: IDs, BAR type bits, the
  capability list, ...), which ``reset()`` returns to and ``restore()`` re-applies;
* ``_wmask``: bits a config write may change;
* ``_w1c``: bits a config write of 1 clears (error/status latches).

A third class of bits, ``_device``, is read-only to software but driven by the device (the
INTx status bit, MSI pending bits); they are state, not layout, so they migrate.

QEMU forwards every guest config write (1, 2 or 4 bytes, sometimes unaligned) and reads
whatever bits it does not emulate itself, so every access is handled byte by byte through
the masks and never fails for an in-range offset: bytes that mean nothing read 0 and ignore
writes, like undecoded registers on real hardware.
"""

from __future__ import annotations

import enum
import errno as _errno
from collections.abc import Callable
from dataclasses import dataclass

# --- sizes ---------------------------------------------------------------------------------

CONFIG_SIZE = 256
EXPRESS_CONFIG_SIZE = 4096

# --- type-0 header registers ---------------------------------------------------------------

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # 3 bytes: programming interface, subclass, base class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F

# The standard capability list lives between the header and the extended space.
CAPABILITY_AREA_START = 0x40
CAPABILITY_AREA_END = 0x100
EXTENDED_CAPABILITY_START = 0x100

NUM_BARS = 6

# --- command / status bits -----------------------------------------------------------------

COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_MASTER = 0x0004
COMMAND_PARITY = 0x0040
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400
COMMAND_WRITABLE = (
    COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE
)

STATUS_INTERRUPT = 0x0008
STATUS_CAP_LIST = 0x0010
STATUS_MASTER_DATA_PARITY = 0x0100
STATUS_SIG_TARGET_ABORT = 0x0800
STATUS_REC_TARGET_ABORT = 0x1000
STATUS_REC_MASTER_ABORT = 0x2000
STATUS_SIG_SYSTEM_ERROR = 0x4000
STATUS_DETECTED_PARITY = 0x8000
STATUS_W1C = (
    STATUS_MASTER_DATA_PARITY
    | STATUS_SIG_TARGET_ABORT
    | STATUS_REC_TARGET_ABORT
    | STATUS_REC_MASTER_ABORT
    | STATUS_SIG_SYSTEM_ERROR
    | STATUS_DETECTED_PARITY
)

# --- BAR bits ------------------------------------------------------------------------------

BAR_IO_SPACE = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8
BAR_MEM_ADDRESS_MASK = 0xFFFFFFF0
BAR_IO_ADDRESS_MASK = 0xFFFFFFFC
ROM_ENABLE = 0x1
ROM_ADDRESS_MASK = 0xFFFFF800
MIN_ROM_SIZE = 2048

# --- capability IDs and fields -------------------------------------------------------------

CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_EXPRESS = 0x10
CAP_ID_MSIX = 0x11
CAP_ID_VENDOR = 0x09

PM_PMC = 2
PM_PMCSR = 4
PM_CAP_LENGTH = 8
PM_VERSION_1_2 = 0x0003
PMCSR_POWER_STATE = 0x0003
PMCSR_NO_SOFT_RESET = 0x0008
PMCSR_PME_STATUS = 0x8000
POWER_D0 = 0
POWER_D3HOT = 3

MSI_CONTROL = 2
MSI_ENABLE = 0x0001
MSI_MMC_SHIFT = 1
MSI_MME_SHIFT = 4
MSI_MME_MASK = 0x0070
MSI_ADDR64 = 0x0080
MSI_PER_VECTOR_MASK = 0x0100
MSI_MAX_VECTORS = 32

MSIX_CONTROL = 2
MSIX_TABLE = 4
MSIX_PBA = 8
MSIX_CAP_LENGTH = 12
MSIX_TABLE_SIZE_MASK = 0x07FF
MSIX_FUNCTION_MASK = 0x4000
MSIX_ENABLE = 0x8000
MSIX_BIR_MASK = 0x7
MSIX_MAX_VECTORS = 2048
MSIX_ENTRY_SIZE = 16

EXP_FLAGS = 0x02
EXP_DEVCAP = 0x04
EXP_DEVCTL = 0x08
EXP_DEVSTA = 0x0A
EXP_LNKCAP = 0x0C
EXP_LNKCTL = 0x10
EXP_LNKSTA = 0x12
EXP_DEVCAP2 = 0x24
EXP_DEVCTL2 = 0x28
EXP_LNKCAP2 = 0x2C
EXP_LNKCTL2 = 0x30
EXP_CAP_LENGTH = 0x3C
EXP_CAP_VERSION = 2
EXP_TYPE_SHIFT = 4
EXP_DEVCAP_RBER = 0x00008000  # role-based error reporting, mandatory since PCIe 1.1
# Device Control: error reporting enables (3:0), relaxed ordering (4), no snoop (11) and
# max read request size (14:12). Max payload size stays 128 B (hardwired, as permitted when
# only 128 B is supported); phantom functions, extended tags, aux power and FLR are absent.
EXP_DEVCTL_WRITABLE = 0x781F
EXP_DEVCTL_DEFAULT = 0x2810  # relaxed ordering + no snoop, MRRS 512 B (spec defaults)
EXP_DEVSTA_W1C = 0x000F
# A x1 link at 2.5 GT/s that is up: speed 1, width 1, ASPM optionality compliance.
EXP_LNKCAP_VALUE = 0x00400011
# Link Control: ASPM control (1:0), read completion boundary (3), common clock (6),
# extended synch (7). The rest is reserved for endpoints or needs unadvertised features.
EXP_LNKCTL_WRITABLE = 0x00CB
EXP_LNKSTA_VALUE = 0x1011  # 2.5 GT/s, x1, slot clock configuration
EXP_LNKCAP2_VALUE = 0x00000002  # supported link speeds vector: 2.5 GT/s
EXP_LNKCTL2_VALUE = 0x0001  # target link speed 2.5 GT/s (hardwired: only one speed)


class ConfigAccessError(Exception):
    """A config access outside the config space; answered to the client with ``errno``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.EINVAL


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass(frozen=True)
class BarSpec:
    """One base address register; a MEM64 BAR also occupies register ``index + 1``."""

    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    @property
    def is_memory(self) -> bool:
        return self.kind is not BarKind.IO

    @property
    def slots(self) -> tuple[int, ...]:
        """BAR register indices this BAR occupies."""
        if self.kind is BarKind.MEM64:
            return (self.index, self.index + 1)
        return (self.index,)


class PciExpressType(enum.IntEnum):
    """Device/port types QEMU accepts for an assigned endpoint."""

    ENDPOINT = 0
    LEGACY_ENDPOINT = 1
    RC_INTEGRATED = 9


@dataclass(frozen=True)
class MsixLayout:
    """Where the MSI-X table and PBA live (fixed when the capability is added)."""

    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @property
    def table_length(self) -> int:
        return self.table_size * MSIX_ENTRY_SIZE

    @property
    def pba_length(self) -> int:
        """One pending bit per vector, in whole qwords."""
        return (self.table_size + 63) // 64 * 8


@dataclass(frozen=True)
class _MsiLayout:
    offset: int
    vectors: int
    addr64: bool
    per_vector_mask: bool

    @property
    def control(self) -> int:
        return self.offset + MSI_CONTROL

    @property
    def address_lo(self) -> int:
        return self.offset + 4

    @property
    def address_hi(self) -> int | None:
        return self.offset + 8 if self.addr64 else None

    @property
    def data(self) -> int:
        return self.offset + (12 if self.addr64 else 8)

    @property
    def mask(self) -> int | None:
        return self.data + 4 if self.per_vector_mask else None

    @property
    def pending(self) -> int | None:
        return self.data + 8 if self.per_vector_mask else None

    @property
    def length(self) -> int:
        # The message data register is 16 bits; mask and pending are dwords.
        return (self.data + 12 if self.per_vector_mask else self.data + 2) - self.offset

    @property
    def mmc(self) -> int:
        """Multiple Message Capable: log2 of the vector count."""
        return self.vectors.bit_length() - 1


WriteListener = Callable[[int, int], None]


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check_uint(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name} {value:#x} does not fit in {bits} bits")


def _align4(value: int) -> int:
    return (value + 3) & ~3


class ConfigSpace:
    """Configuration space of a type-0 PCI/PCIe function."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        class_code: int,
        revision: int = 0,
        interrupt_pin: int = 1,
        express: bool = False,
    ) -> None:
        _check_uint("vendor_id", vendor_id, 16)
        _check_uint("device_id", device_id, 16)
        _check_uint("subsystem_vendor_id", subsystem_vendor_id, 16)
        _check_uint("subsystem_id", subsystem_id, 16)
        _check_uint("class_code", class_code, 24)
        _check_uint("revision", revision, 8)
        if vendor_id == 0xFFFF:
            # Config reads of a missing function return all-ones; this ID means "no device".
            raise ValueError("vendor_id 0xffff is reserved for 'no function present'")
        if not 0 <= interrupt_pin <= 4:
            raise ValueError(f"interrupt_pin {interrupt_pin} is not 0 (none) or 1..4 (INTA-D)")

        self._size = EXPRESS_CONFIG_SIZE if express else CONFIG_SIZE
        self._express = express
        self._init = bytearray(self._size)
        self._regs = bytearray(self._size)
        self._wmask = bytearray(self._size)
        self._w1c = bytearray(self._size)
        self._device = bytearray(self._size)

        self._bars: dict[int, BarSpec] = {}
        self._rom_size = 0
        self._caps: list[tuple[int, int]] = []  # (capability id, offset) in list order
        self._next_cap = CAPABILITY_AREA_START
        self._pm: int | None = None
        self._msi: _MsiLayout | None = None
        self._msix: int | None = None
        self._msix_layout: MsixLayout | None = None
        self._express_cap: int | None = None
        self._listeners: list[WriteListener] = []

        self._define(VENDOR_ID, 2, vendor_id)
        self._define(DEVICE_ID, 2, device_id)
        self._define(COMMAND, 2, 0, writable=COMMAND_WRITABLE)
        self._define(STATUS, 2, 0, w1c=STATUS_W1C, device=STATUS_INTERRUPT)
        self._define(REVISION_ID, 1, revision)
        self._define(CLASS_CODE, 3, class_code)
        self._define(CACHE_LINE_SIZE, 1, 0, writable=0xFF)
        self._define(LATENCY_TIMER, 1, 0, writable=0xFF)
        self._define(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._define(SUBSYSTEM_ID, 2, subsystem_id)
        self._define(INTERRUPT_LINE, 1, 0, writable=0xFF)
        self._define(INTERRUPT_PIN, 1, interrupt_pin)
        # Header type 0 (single function), BIST, CardBus CIS, capability pointer, Min_Gnt and
        # Max_Lat stay read-only zero until something is added.

    # --- layout ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def express(self) -> bool:
        return self._express

    def _define(
        self,
        offset: int,
        width: int,
        value: int,
        *,
        writable: int = 0,
        w1c: int = 0,
        device: int = 0,
    ) -> None:
        """Lay out a little-endian register: power-on value and per-bit behaviour.

        The current value is reset to the power-on value, since a layout change makes any
        earlier software value of these bytes meaningless.
        """
        for i in range(width):
            shift = 8 * i
            pos = offset + i
            self._init[pos] = (value >> shift) & 0xFF
            self._regs[pos] = self._init[pos]
            self._wmask[pos] = (writable >> shift) & 0xFF
            self._w1c[pos] = (w1c >> shift) & 0xFF
            self._device[pos] = (device >> shift) & 0xFF

    def _set_fixed_bits(self, offset: int, width: int, bits: int) -> None:
        """Set read-only layout bits without disturbing the register's live state."""
        for i in range(width):
            byte = (bits >> (8 * i)) & 0xFF
            self._init[offset + i] |= byte
            self._regs[offset + i] |= byte

    def add_bar(self, spec: BarSpec) -> None:
        """Implement a BAR; its type bits become read-only and its address bits writable."""
        _validate_bar(spec)
        for slot in spec.slots:
            if self._bar_slot_owner(slot) is not None:
                raise ValueError(f"BAR register {slot} is already in use")
        self._bars[spec.index] = spec
        offset = BAR0 + 4 * spec.index
        size_mask = ~(spec.size - 1)
        if spec.kind is BarKind.IO:
            self._define(offset, 4, BAR_IO_SPACE, writable=size_mask & BAR_IO_ADDRESS_MASK)
            return
        flags = BAR_MEM_PREFETCH if spec.prefetchable else 0
        if spec.kind is BarKind.MEM32:
            self._define(offset, 4, flags, writable=size_mask & BAR_MEM_ADDRESS_MASK)
            return
        # A 64-bit BAR is one 8-byte register: the upper dword holds address bits 63:32,
        # which are all writable unless the BAR is 4 GiB or larger.
        writable64 = size_mask & 0xFFFFFFFF_FFFFFFF0
        self._define(offset, 8, flags | BAR_MEM_TYPE_64, writable=writable64)

    def _bar_slot_owner(self, slot: int) -> BarSpec | None:
        for spec in self._bars.values():
            if slot in spec.slots:
                return spec
        return None

    def bars(self) -> dict[int, BarSpec]:
        """Implemented BARs by (lower) register index; a copy."""
        return dict(self._bars)

    def set_rom(self, size: int) -> None:
        """Declare the expansion ROM size (0 = no ROM: the register reads 0, writes ignored)."""
        if size != 0 and (not _is_power_of_two(size) or not MIN_ROM_SIZE <= size <= 1 << 31):
            raise ValueError(f"ROM size {size:#x} is not 0 or a power of two 2 KiB..2 GiB")
        self._rom_size = size
        writable = ((~(size - 1) & ROM_ADDRESS_MASK) | ROM_ENABLE) if size else 0
        self._define(ROM_ADDRESS, 4, 0, writable=writable)

    @property
    def rom_size(self) -> int:
        return self._rom_size

    def _allocate_capability(self, cap_id: int, length: int, *, unique: bool = True) -> int:
        """Append a capability to the list and return its (dword-aligned) offset."""
        if unique and self.find_capability(cap_id) is not None:
            raise ValueError(f"capability {cap_id:#04x} already present")
        offset = self._next_cap
        if offset + length > CAPABILITY_AREA_END:
            raise ValueError(f"no room for capability {cap_id:#04x} below {CAPABILITY_AREA_END:#x}")
        self._define(offset, 1, cap_id)
        self._define(offset + 1, 1, 0)  # next pointer: end of list until another cap follows
        link = CAPABILITY_LIST if not self._caps else self._caps[-1][1] + 1
        self._define(link, 1, offset)
        self._caps.append((cap_id, offset))
        self._next_cap = _align4(offset + length)
        self._set_fixed_bits(STATUS, 2, STATUS_CAP_LIST)
        return offset

    def add_pm_capability(self) -> int:
        """Power management 1.2 supporting D0 and D3hot only, without PME."""
        offset = self._allocate_capability(CAP_ID_PM, PM_CAP_LENGTH)
        self._pm = offset
        self._define(offset + PM_PMC, 2, PM_VERSION_1_2)
        # No_Soft_Reset: D3hot -> D0 keeps the configuration (this model never self-resets).
        self._define(
            offset + PM_PMCSR,
            2,
            PMCSR_NO_SOFT_RESET,
            writable=PMCSR_POWER_STATE,
            w1c=PMCSR_PME_STATUS,
        )
        return offset

    def add_vendor_capability(self, body: bytes, *, writable: bytes = b"") -> int:
        """A vendor-specific capability (ID 0x09; a function may have several): ``body``
        is what follows the ID and next pointer, read-only except for the bits set in
        ``writable`` (a per-byte mask over the start of ``body``). Returns its offset."""
        if len(writable) > len(body):
            raise ValueError("writable mask longer than the capability")
        offset = self._allocate_capability(CAP_ID_VENDOR, 2 + len(body), unique=False)
        for i, value in enumerate(body):
            mask = writable[i] if i < len(writable) else 0
            self._define(offset + 2 + i, 1, value, writable=mask)
        return offset

    def add_msi_capability(
        self, vectors: int = 1, *, addr64: bool = True, per_vector_mask: bool = True
    ) -> int:
        if not _is_power_of_two(vectors) or vectors > MSI_MAX_VECTORS:
            raise ValueError(f"MSI vector count {vectors} is not a power of two 1..32")
        probe = _MsiLayout(0, vectors, addr64, per_vector_mask)
        offset = self._allocate_capability(CAP_ID_MSI, probe.length)
        msi = _MsiLayout(offset, vectors, addr64, per_vector_mask)
        self._msi = msi
        control = msi.mmc << MSI_MMC_SHIFT
        if addr64:
            control |= MSI_ADDR64
        if per_vector_mask:
            control |= MSI_PER_VECTOR_MASK
        self._define(msi.control, 2, control, writable=MSI_ENABLE | MSI_MME_MASK)
        self._define(msi.address_lo, 4, 0, writable=0xFFFFFFFC)  # dword-aligned address
        if msi.address_hi is not None:
            self._define(msi.address_hi, 4, 0, writable=0xFFFFFFFF)
        self._define(msi.data, 2, 0, writable=0xFFFF)
        vector_bits = (1 << vectors) - 1
        if msi.mask is not None and msi.pending is not None:
            self._define(msi.mask, 4, 0, writable=vector_bits)
            self._define(msi.pending, 4, 0, device=vector_bits)
        return offset

    def add_msix_capability(
        self, table_size: int, *, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int
    ) -> int:
        """MSI-X capability; the table and PBA must fit in memory BARs added beforehand."""
        if not 1 <= table_size <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X table size {table_size} is not 1..{MSIX_MAX_VECTORS}")
        layout = MsixLayout(table_size, table_bar, table_offset, pba_bar, pba_offset)
        self._check_msix_structure("table", table_bar, table_offset, layout.table_length)
        self._check_msix_structure("PBA", pba_bar, pba_offset, layout.pba_length)
        if table_bar == pba_bar and _overlaps(
            table_offset, layout.table_length, pba_offset, layout.pba_length
        ):
            raise ValueError("MSI-X table and PBA overlap")
        offset = self._allocate_capability(CAP_ID_MSIX, MSIX_CAP_LENGTH)
        self._msix = offset
        self._msix_layout = layout
        self._define(
            offset + MSIX_CONTROL,
            2,
            table_size - 1,
            writable=MSIX_FUNCTION_MASK | MSIX_ENABLE,
        )
        self._define(offset + MSIX_TABLE, 4, table_offset | table_bar)
        self._define(offset + MSIX_PBA, 4, pba_offset | pba_bar)
        return offset

    def _check_msix_structure(self, what: str, bar: int, offset: int, length: int) -> None:
        spec = self._bars.get(bar)
        if spec is None:
            raise ValueError(
                f"MSI-X {what} BAR {bar} is not implemented (or is a BAR's upper half)"
            )
        if not spec.is_memory:
            raise ValueError(f"MSI-X {what} BAR {bar} is not a memory BAR")
        if not 0 <= offset <= 0xFFFFFFF8 or offset & MSIX_BIR_MASK:
            # The low three bits of the register hold the BIR, so offsets are qword-aligned.
            raise ValueError(f"MSI-X {what} offset {offset:#x} is not a 32-bit qword offset")
        if offset + length > spec.size:
            raise ValueError(f"MSI-X {what} ({length:#x} bytes at {offset:#x}) overflows BAR {bar}")

    def add_express_capability(self, device_type: PciExpressType = PciExpressType.ENDPOINT) -> int:
        """PCIe capability (version 2) of an endpoint on a x1 2.5 GT/s link that is up."""
        device_type = PciExpressType(device_type)
        if not self._express:
            raise ValueError("a PCI Express capability needs the 4096-byte config space")
        offset = self._allocate_capability(CAP_ID_EXPRESS, EXP_CAP_LENGTH)
        self._express_cap = offset
        self._define(offset + EXP_FLAGS, 2, EXP_CAP_VERSION | device_type << EXP_TYPE_SHIFT)
        self._define(offset + EXP_DEVCAP, 4, EXP_DEVCAP_RBER)
        self._define(offset + EXP_DEVCTL, 2, EXP_DEVCTL_DEFAULT, writable=EXP_DEVCTL_WRITABLE)
        self._define(offset + EXP_DEVSTA, 2, 0, w1c=EXP_DEVSTA_W1C)
        if device_type is not PciExpressType.RC_INTEGRATED:
            # Root-complex integrated endpoints have no link; their link registers stay 0.
            self._define(offset + EXP_LNKCAP, 4, EXP_LNKCAP_VALUE)
            self._define(offset + EXP_LNKCTL, 2, 0, writable=EXP_LNKCTL_WRITABLE)
            self._define(offset + EXP_LNKSTA, 2, EXP_LNKSTA_VALUE)
            self._define(offset + EXP_LNKCAP2, 4, EXP_LNKCAP2_VALUE)
            self._define(offset + EXP_LNKCTL2, 2, EXP_LNKCTL2_VALUE)
        # Slot/root registers and the version-2 device registers (DEVCAP2/DEVCTL2: no
        # optional features) read 0.
        return offset

    def find_capability(self, cap_id: int) -> int | None:
        for found_id, offset in self._caps:
            if found_id == cap_id:
                return offset
        return None

    def capabilities(self) -> list[tuple[int, int]]:
        """``(capability id, offset)`` in list order."""
        return list(self._caps)

    # --- masks (for tests and debugging) ---------------------------------------------------

    def writable_mask(self) -> bytes:
        """Per byte, the bits a config write can set or clear."""
        return bytes(self._wmask)

    def w1c_mask(self) -> bytes:
        """Per byte, the bits a config write of 1 clears."""
        return bytes(self._w1c)

    def read_only_mask(self) -> bytes:
        """Per byte, the bits config writes can never change (neither writable nor W1C)."""
        return bytes(~(w | c) & 0xFF for w, c in zip(self._wmask, self._w1c, strict=True))

    def device_mask(self) -> bytes:
        """Per byte, the read-only bits the device drives (INTx status, MSI pending).

        They are state rather than layout, so ``restore()`` takes them from the snapshot.
        """
        return bytes(self._device)

    # --- access ----------------------------------------------------------------------------

    def _check_range(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self._size:
            raise ConfigAccessError(
                f"config access of {count} bytes at {offset:#x} outside {self._size} bytes"
            )

    def read(self, offset: int, count: int) -> bytes:
        self._check_range(offset, count)
        return bytes(self._regs[offset : offset + count])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Apply a config write through the masks; listeners hear about non-empty writes."""
        data = bytes(data)
        self._check_range(offset, len(data))
        if not data:
            return
        old_power = self.power_state
        for i, value in enumerate(data):
            self._write_byte(offset + i, value)
        self._apply_write_rules(offset, len(data), old_power)
        self._notify(offset, len(data))

    def _write_byte(self, pos: int, value: int) -> None:
        writable = self._wmask[pos]
        new = (self._regs[pos] & ~writable) | (value & writable)
        self._regs[pos] = new & ~(value & self._w1c[pos])

    def _apply_write_rules(self, offset: int, length: int, old_power: int) -> None:
        """Field rules that a bit mask cannot express."""
        touched = range(offset, offset + length)
        if self._msi is not None and self._msi.control in touched:
            self._clamp_msi_mme()
        if self._pm is not None and self._pm + PM_PMCSR in touched:
            state = self._regs[self._pm + PM_PMCSR] & PMCSR_POWER_STATE
            if state not in (POWER_D0, POWER_D3HOT):
                # D1/D2 are not supported: the write completes but the state is unchanged.
                pos = self._pm + PM_PMCSR
                self._regs[pos] = (self._regs[pos] & ~PMCSR_POWER_STATE) | old_power

    def _clamp_msi_mme(self) -> None:
        # Like QEMU's msi_write_config: asking for more vectors than offered grants them all.
        assert self._msi is not None
        pos = self._msi.control
        if (self._regs[pos] & MSI_MME_MASK) >> MSI_MME_SHIFT > self._msi.mmc:
            self._regs[pos] = (self._regs[pos] & ~MSI_MME_MASK) | self._msi.mmc << MSI_MME_SHIFT

    def add_write_listener(self, callback: WriteListener) -> None:
        """Call ``callback(offset, length)`` after every config write (and, with the whole
        range, after ``reset()`` and ``restore()``), so interrupt logic can follow MSI/MSI-X
        enables."""
        self._listeners.append(callback)

    def remove_write_listener(self, callback: WriteListener) -> None:
        self._listeners.remove(callback)

    def _notify(self, offset: int, length: int) -> None:
        for callback in list(self._listeners):
            callback(offset, length)

    # --- reset and migration ---------------------------------------------------------------

    def reset(self) -> None:
        """Return every register to its power-on value; the layout is kept."""
        self._regs[:] = self._init
        self._notify(0, self._size)

    def snapshot(self) -> bytes:
        return bytes(self._regs)

    def restore(self, data: bytes | bytearray | memoryview) -> None:
        """Load a snapshot; bits that are layout (not state) always come from this layout.

        Raises ValueError, leaving the space untouched, on a wrong length or on a value no
        sequence of config writes could have produced.
        """
        data = bytes(data)
        if len(data) != self._size:
            raise ValueError(f"config snapshot is {len(data)} bytes, expected {self._size}")
        regs = bytearray(self._size)
        for pos in range(self._size):
            state = self._wmask[pos] | self._w1c[pos] | self._device[pos]
            regs[pos] = (self._init[pos] & ~state) | (data[pos] & state)
        self._validate_state(regs)
        self._regs = regs
        self._notify(0, self._size)

    def _validate_state(self, regs: bytearray) -> None:
        if self._msi is not None:
            mme = (regs[self._msi.control] & MSI_MME_MASK) >> MSI_MME_SHIFT
            if mme > self._msi.mmc:
                raise ValueError(f"snapshot enables 2**{mme} MSI vectors, only {self._msi.vectors}")
        if self._pm is not None:
            state = regs[self._pm + PM_PMCSR] & PMCSR_POWER_STATE
            if state not in (POWER_D0, POWER_D3HOT):
                raise ValueError(f"snapshot has unsupported power state D{state}")

    # --- state for the device and interrupt logic ------------------------------------------

    def _get(self, offset: int, width: int) -> int:
        return int.from_bytes(self._regs[offset : offset + width], "little")

    def _put(self, offset: int, width: int, value: int) -> None:
        self._regs[offset : offset + width] = value.to_bytes(width, "little")

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    @property
    def status(self) -> int:
        return self._get(STATUS, 2)

    @property
    def io_enabled(self) -> bool:
        return bool(self.command & COMMAND_IO)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & COMMAND_MEMORY)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & COMMAND_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & COMMAND_INTX_DISABLE)

    @property
    def interrupt_pin(self) -> int:
        return self._regs[INTERRUPT_PIN]

    def set_interrupt_status(self, pending: bool) -> None:
        """Mirror the device's INTx line in status bit 3 (set even while INTx is disabled).

        A function without an interrupt pin has no line, so the bit stays 0; ignoring the
        call keeps shared "fall back to INTx" paths in interrupt logic from failing.
        """
        pending = pending and self.interrupt_pin != 0
        status = self.status & ~STATUS_INTERRUPT
        self._put(STATUS, 2, status | (STATUS_INTERRUPT if pending else 0))

    def latch_status(self, bits: int) -> None:
        """Record an error event (e.g. a received master abort) in the W1C status bits."""
        if bits & ~STATUS_W1C:
            raise ValueError(f"status bits {bits:#06x} are not error latches")
        self._put(STATUS, 2, self.status | bits)

    def bar_address(self, index: int) -> int:
        """Address programmed into BAR ``index`` (64 bits for MEM64), flag bits stripped."""
        spec = self._bars.get(index)
        if spec is None:
            raise ValueError(f"BAR {index} is not implemented")
        offset = BAR0 + 4 * index
        if spec.kind is BarKind.IO:
            return self._get(offset, 4) & BAR_IO_ADDRESS_MASK
        if spec.kind is BarKind.MEM32:
            return self._get(offset, 4) & BAR_MEM_ADDRESS_MASK
        return self._get(offset, 8) & 0xFFFFFFFF_FFFFFFF0

    @property
    def rom_address(self) -> int:
        return self._get(ROM_ADDRESS, 4) & ROM_ADDRESS_MASK

    @property
    def rom_enabled(self) -> bool:
        return bool(self._get(ROM_ADDRESS, 4) & ROM_ENABLE)

    @property
    def power_state(self) -> int:
        """0 (D0) .. 3 (D3hot); always D0 without a PM capability."""
        if self._pm is None:
            return POWER_D0
        return self._regs[self._pm + PM_PMCSR] & PMCSR_POWER_STATE

    # MSI ------------------------------------------------------------------------------------

    @property
    def msi_vectors(self) -> int:
        """Vectors the MSI capability offers (0 without one)."""
        return self._msi.vectors if self._msi is not None else 0

    @property
    def msi_enabled(self) -> bool:
        return self._msi is not None and bool(self._regs[self._msi.control] & MSI_ENABLE)

    @property
    def msi_vectors_enabled(self) -> int:
        """Vectors granted by Multiple Message Enable (0 without an MSI capability)."""
        if self._msi is None:
            return 0
        return 1 << ((self._regs[self._msi.control] & MSI_MME_MASK) >> MSI_MME_SHIFT)

    @property
    def msi_address(self) -> int:
        if self._msi is None:
            return 0
        address = self._get(self._msi.address_lo, 4)
        if self._msi.address_hi is not None:
            address |= self._get(self._msi.address_hi, 4) << 32
        return address

    @property
    def msi_data(self) -> int:
        return self._get(self._msi.data, 2) if self._msi is not None else 0

    def _msi_vector_bit(self, vector: int) -> int:
        if self._msi is None or not 0 <= vector < self._msi.vectors:
            raise ValueError(f"MSI vector {vector} does not exist")
        return 1 << vector

    def msi_vector_masked(self, vector: int) -> bool:
        """Per-vector mask bit (always False without per-vector masking)."""
        bit = self._msi_vector_bit(vector)
        assert self._msi is not None
        if self._msi.mask is None:
            return False
        return bool(self._get(self._msi.mask, 4) & bit)

    def set_msi_pending(self, vector: int, pending: bool) -> None:
        """Drive a pending bit (needs per-vector masking; read-only to software)."""
        bit = self._msi_vector_bit(vector)
        assert self._msi is not None
        if self._msi.pending is None:
            raise ValueError("the MSI capability has no pending bits (no per-vector masking)")
        bits = self._get(self._msi.pending, 4) & ~bit
        self._put(self._msi.pending, 4, bits | (bit if pending else 0))

    def msi_vector_pending(self, vector: int) -> bool:
        bit = self._msi_vector_bit(vector)
        assert self._msi is not None
        if self._msi.pending is None:
            return False
        return bool(self._get(self._msi.pending, 4) & bit)

    # MSI-X ----------------------------------------------------------------------------------

    def _msix_control(self) -> int:
        return self._get(self._msix + MSIX_CONTROL, 2) if self._msix is not None else 0

    @property
    def msix_enabled(self) -> bool:
        return bool(self._msix_control() & MSIX_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self._msix_control() & MSIX_FUNCTION_MASK)

    @property
    def msix_table_size(self) -> int:
        """Number of MSI-X vectors (0 without an MSI-X capability)."""
        return self._msix_layout.table_size if self._msix_layout is not None else 0

    @property
    def msix_layout(self) -> MsixLayout | None:
        """Table/PBA placement, or None without an MSI-X capability."""
        return self._msix_layout


def _validate_bar(spec: BarSpec) -> None:
    if not 0 <= spec.index < NUM_BARS:
        raise ValueError(f"BAR index {spec.index} is not 0..{NUM_BARS - 1}")
    if spec.kind is BarKind.MEM64 and spec.index >= NUM_BARS - 1:
        raise ValueError(f"64-bit BAR {spec.index} has no room for its upper half")
    if not _is_power_of_two(spec.size):
        raise ValueError(f"BAR {spec.index} size {spec.size:#x} is not a power of two")
    if spec.kind is BarKind.IO:
        if spec.prefetchable:
            raise ValueError(f"I/O BAR {spec.index} cannot be prefetchable")
        low, high = 4, 1 << 31
    elif spec.kind is BarKind.MEM32:
        low, high = 16, 1 << 31
    else:
        low, high = 16, 1 << 63
    if not low <= spec.size <= high:
        raise ValueError(f"BAR {spec.index} size {spec.size:#x} is not {low:#x}..{high:#x}")


def _overlaps(a_start: int, a_length: int, b_start: int, b_length: int) -> bool:
    return a_start < b_start + b_length and b_start < a_start + a_length
