"""Tests for the PCI configuration-space model."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import pci
from devices.pci import (
    BarKind,
    BarSpec,
    ConfigAccessError,
    ConfigSpace,
    PciExpressType,
)

VENDOR = 0x1B36
DEVICE = 0x0010
CLASS = 0x010802  # NVMe controller


def r8(cs: ConfigSpace, offset: int) -> int:
    return cs.read(offset, 1)[0]


def r16(cs: ConfigSpace, offset: int) -> int:
    return int.from_bytes(cs.read(offset, 2), "little")


def r32(cs: ConfigSpace, offset: int) -> int:
    return int.from_bytes(cs.read(offset, 4), "little")


def w16(cs: ConfigSpace, offset: int, value: int) -> None:
    cs.write(offset, value.to_bytes(2, "little"))


def w32(cs: ConfigSpace, offset: int, value: int) -> None:
    cs.write(offset, value.to_bytes(4, "little"))


def bar_reg(index: int) -> int:
    return pci.BAR0 + 4 * index


def plain(**kwargs: int | bool) -> ConfigSpace:
    args: dict[str, int | bool] = {"vendor_id": VENDOR, "device_id": DEVICE, "class_code": CLASS}
    args.update(kwargs)
    return ConfigSpace(**args)  # type: ignore[arg-type]


def full(express: bool = True) -> ConfigSpace:
    """A device using every feature: all BAR kinds, ROM and all capabilities."""
    cs = ConfigSpace(
        vendor_id=VENDOR,
        device_id=DEVICE,
        subsystem_vendor_id=0x1AF4,
        subsystem_id=0x1100,
        class_code=CLASS,
        revision=0x02,
        interrupt_pin=1,
        express=express,
    )
    cs.add_bar(BarSpec(0, 0x4000, BarKind.MEM32))
    cs.add_bar(BarSpec(1, 0x100, BarKind.IO))
    cs.add_bar(BarSpec(2, 0x100000, BarKind.MEM64, prefetchable=True))
    cs.add_bar(BarSpec(4, 8 << 30, BarKind.MEM64))
    cs.set_rom(0x10000)
    cs.add_pm_capability()
    cs.add_msi_capability(4)
    cs.add_msix_capability(16, table_bar=0, table_offset=0x0, pba_bar=0, pba_offset=0x1000)
    if express:
        cs.add_express_capability()
    return cs


def walk_capabilities(cs: ConfigSpace) -> list[tuple[int, int]]:
    """Follow the list the way a guest or QEMU does, from the pointer at 0x34."""
    found: list[tuple[int, int]] = []
    offset = r8(cs, pci.CAPABILITY_LIST)
    while offset:
        assert offset % 4 == 0 and offset >= 0x40
        assert len(found) < 48, "capability list loops"
        found.append((r8(cs, offset), offset))
        offset = r8(cs, offset + 1)
    return found


# --- header ------------------------------------------------------------------------------


def test_header_ids_read_back() -> None:
    cs = full()
    assert r16(cs, pci.VENDOR_ID) == VENDOR
    assert r16(cs, pci.DEVICE_ID) == DEVICE
    assert r8(cs, pci.REVISION_ID) == 0x02
    assert int.from_bytes(cs.read(pci.CLASS_CODE, 3), "little") == CLASS
    assert r16(cs, pci.SUBSYSTEM_VENDOR_ID) == 0x1AF4
    assert r16(cs, pci.SUBSYSTEM_ID) == 0x1100
    assert r8(cs, pci.HEADER_TYPE) == 0
    assert r8(cs, pci.INTERRUPT_PIN) == 1
    assert cs.interrupt_pin == 1


def test_header_ids_are_read_only() -> None:
    cs = full()
    before = cs.read(0, 0x10)
    cs.write(pci.VENDOR_ID, b"\xff" * 4)
    cs.write(pci.REVISION_ID, b"\xff" * 4)
    cs.write(pci.HEADER_TYPE, b"\xff\xff")
    cs.write(pci.SUBSYSTEM_VENDOR_ID, b"\x00" * 4)
    cs.write(pci.INTERRUPT_PIN, b"\x04\xff\xff")
    cs.write(pci.CAPABILITY_LIST, b"\x00\xff\xff\xff")
    assert cs.read(0, 4) == before[:4]
    assert cs.read(8, 4) == before[8:12]
    assert r16(cs, pci.SUBSYSTEM_VENDOR_ID) == 0x1AF4
    assert r8(cs, pci.INTERRUPT_PIN) == 1
    assert r8(cs, pci.CAPABILITY_LIST) == 0x40


def test_sizes() -> None:
    assert plain().size == 256
    assert plain(express=True).size == 4096
    assert len(plain(express=True).read(0, 4096)) == 4096


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vendor_id": 0xFFFF},
        {"vendor_id": 0x10000},
        {"device_id": -1},
        {"class_code": 1 << 24},
        {"revision": 256},
        {"interrupt_pin": 5},
        {"interrupt_pin": -1},
        {"subsystem_id": 0x10000},
    ],
)
def test_constructor_rejects_bad_values(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        plain(**kwargs)


def test_writable_header_bytes() -> None:
    cs = plain()
    cs.write(pci.CACHE_LINE_SIZE, b"\x10\x40")
    cs.write(pci.INTERRUPT_LINE, b"\x0b")
    assert r8(cs, pci.CACHE_LINE_SIZE) == 0x10
    assert r8(cs, pci.LATENCY_TIMER) == 0x40
    assert r8(cs, pci.INTERRUPT_LINE) == 0x0B


# --- command / status --------------------------------------------------------------------


def command_bits(cs: ConfigSpace) -> tuple[bool, bool, bool, bool]:
    return (cs.io_enabled, cs.memory_enabled, cs.bus_master, cs.intx_disabled)


def test_command_register_writable_bits() -> None:
    cs = plain()
    w16(cs, pci.COMMAND, 0xFFFF)
    assert cs.command == pci.COMMAND_WRITABLE == 0x0547
    # (tuples, not chained asserts: mypy would narrow the properties across the writes)
    assert command_bits(cs) == (True, True, True, True)
    w16(cs, pci.COMMAND, pci.COMMAND_MEMORY)
    assert cs.command == pci.COMMAND_MEMORY
    assert command_bits(cs) == (False, True, False, False)


def test_command_byte_writes() -> None:
    cs = plain()
    cs.write(pci.COMMAND + 1, b"\x04")  # high byte only: INTX_DISABLE
    assert cs.command == pci.COMMAND_INTX_DISABLE
    cs.write(pci.COMMAND, b"\x06")
    assert cs.command == pci.COMMAND_INTX_DISABLE | pci.COMMAND_MEMORY | pci.COMMAND_MASTER


def test_status_w1c_bits() -> None:
    cs = plain()
    cs.latch_status(pci.STATUS_REC_MASTER_ABORT | pci.STATUS_SIG_TARGET_ABORT)
    assert cs.status == pci.STATUS_REC_MASTER_ABORT | pci.STATUS_SIG_TARGET_ABORT
    w16(cs, pci.STATUS, 0)  # writing 0 leaves latches alone
    assert cs.status == pci.STATUS_REC_MASTER_ABORT | pci.STATUS_SIG_TARGET_ABORT
    w16(cs, pci.STATUS, pci.STATUS_REC_MASTER_ABORT)
    assert cs.status == pci.STATUS_SIG_TARGET_ABORT
    w16(cs, pci.STATUS, 0xFFFF)  # clears all latches, sets nothing
    assert cs.status == 0


def test_latch_status_rejects_non_latch_bits() -> None:
    with pytest.raises(ValueError):
        plain().latch_status(pci.STATUS_CAP_LIST)


def test_w1c_does_not_touch_command_in_same_dword() -> None:
    cs = plain()
    cs.latch_status(pci.STATUS_DETECTED_PARITY)
    # A dword write at 0x04 sets the command and (with zeros) keeps the status latch.
    w32(cs, pci.COMMAND, pci.COMMAND_MASTER)
    assert cs.command == pci.COMMAND_MASTER
    assert cs.status == pci.STATUS_DETECTED_PARITY


def test_interrupt_status_is_device_driven() -> None:
    cs = plain()
    cs.set_interrupt_status(True)
    assert cs.status & pci.STATUS_INTERRUPT
    w16(cs, pci.STATUS, 0xFFFF)
    assert cs.status & pci.STATUS_INTERRUPT  # not W1C, not writable
    w16(cs, pci.COMMAND, pci.COMMAND_INTX_DISABLE)
    assert cs.status & pci.STATUS_INTERRUPT  # reflects the line even when disabled
    cs.set_interrupt_status(False)
    assert not cs.status & pci.STATUS_INTERRUPT


def test_interrupt_status_needs_a_pin() -> None:
    cs = plain(interrupt_pin=0)
    cs.set_interrupt_status(True)  # no INTx line: nothing to show
    assert cs.status == 0
    assert r8(cs, pci.INTERRUPT_PIN) == 0


# --- BARs --------------------------------------------------------------------------------


def size_bar(cs: ConfigSpace, index: int) -> int:
    """Standard sizing: save, write all-ones, read, restore."""
    saved = r32(cs, bar_reg(index))
    w32(cs, bar_reg(index), 0xFFFFFFFF)
    value = r32(cs, bar_reg(index))
    w32(cs, bar_reg(index), saved)
    return value


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (BarSpec(0, 0x1000, BarKind.MEM32), 0xFFFFF000),
        (BarSpec(0, 16, BarKind.MEM32), 0xFFFFFFF0),
        (BarSpec(3, 0x1000, BarKind.MEM32, prefetchable=True), 0xFFFFF008),
        (BarSpec(5, 1 << 31, BarKind.MEM32), 0x80000000),
        (BarSpec(1, 0x100, BarKind.IO), 0xFFFFFF01),
        (BarSpec(2, 4, BarKind.IO), 0xFFFFFFFD),
    ],
)
def test_bar_sizing_32bit(spec: BarSpec, expected: int) -> None:
    cs = plain()
    cs.add_bar(spec)
    assert size_bar(cs, spec.index) == expected
    assert r32(cs, bar_reg(spec.index)) == expected & ~(0xFFFFFFFF & -spec.size)  # type bits


def test_bar_type_bits_before_sizing() -> None:
    cs = full()
    assert r32(cs, bar_reg(0)) == 0x0  # 32-bit, non-prefetchable memory
    assert r32(cs, bar_reg(1)) == 0x1  # I/O
    assert r32(cs, bar_reg(2)) == 0xC  # 64-bit prefetchable
    assert r32(cs, bar_reg(4)) == 0x4  # 64-bit


def test_bar_sizing_64bit() -> None:
    cs = full()
    assert size_bar(cs, 2) == 0xFFF0000C
    assert size_bar(cs, 3) == 0xFFFFFFFF  # upper dword fully writable below 4 GiB
    assert size_bar(cs, 4) == 0x00000004  # 8 GiB: no address bits in the lower dword
    assert size_bar(cs, 5) == 0xFFFFFFFE
    # the 64-bit size from the pair, the way a guest computes it
    lo, hi = 0x00000004, 0xFFFFFFFE
    mask = (hi << 32 | lo) & ~0xF
    assert (~mask & 0xFFFFFFFF_FFFFFFFF) + 1 == 8 << 30


def test_bar_addresses() -> None:
    cs = full()
    w32(cs, bar_reg(0), 0xFEBF4123)  # low bits ignored
    w32(cs, bar_reg(1), 0xC0FF)
    w32(cs, bar_reg(2), 0xE0012345)
    w32(cs, bar_reg(3), 0x00000080)
    cs.write(bar_reg(4), (0x12_3456_7890_0000 | 0xF).to_bytes(8, "little"))  # one 8-byte write
    assert cs.bar_address(0) == 0xFEBF4000
    assert r32(cs, bar_reg(0)) == 0xFEBF4000
    assert cs.bar_address(1) == 0xC000
    assert r32(cs, bar_reg(1)) == 0xC001
    assert cs.bar_address(2) == 0x80_E000_0000  # 1 MiB BAR: bits 19:4 are not address bits
    assert r32(cs, bar_reg(2)) == 0xE000000C
    assert cs.bar_address(4) == 0x12_3456_0000_0000  # below 8 GiB alignment is dropped
    with pytest.raises(ValueError):
        cs.bar_address(3)  # upper half of BAR2


def test_unimplemented_bars_read_zero() -> None:
    cs = plain()
    cs.add_bar(BarSpec(1, 0x1000, BarKind.MEM32))
    for index in (0, 2, 3, 4, 5):
        w32(cs, bar_reg(index), 0xFFFFFFFF)
        assert r32(cs, bar_reg(index)) == 0
        with pytest.raises(ValueError):
            cs.bar_address(index)
    assert cs.bars() == {1: BarSpec(1, 0x1000, BarKind.MEM32)}


def test_cardbus_cis_reads_zero() -> None:
    cs = full()
    w32(cs, pci.CARDBUS_CIS, 0xFFFFFFFF)
    assert r32(cs, pci.CARDBUS_CIS) == 0


@pytest.mark.parametrize(
    "spec",
    [
        BarSpec(6, 0x1000, BarKind.MEM32),
        BarSpec(-1, 0x1000, BarKind.MEM32),
        BarSpec(0, 0x1800, BarKind.MEM32),
        BarSpec(0, 0, BarKind.MEM32),
        BarSpec(0, 8, BarKind.MEM32),
        BarSpec(0, 8, BarKind.MEM64),
        BarSpec(0, 2, BarKind.IO),
        BarSpec(0, 1 << 32, BarKind.MEM32),
        BarSpec(5, 0x1000, BarKind.MEM64),
        BarSpec(0, 0x100, BarKind.IO, prefetchable=True),
    ],
)
def test_add_bar_rejects_bad_specs(spec: BarSpec) -> None:
    with pytest.raises(ValueError):
        plain().add_bar(spec)


def test_add_bar_rejects_overlaps() -> None:
    cs = plain()
    cs.add_bar(BarSpec(2, 0x1000, BarKind.MEM64))
    for spec in (
        BarSpec(2, 0x1000, BarKind.MEM32),
        BarSpec(3, 0x1000, BarKind.MEM32),  # upper half of BAR2
        BarSpec(1, 0x1000, BarKind.MEM64),  # its upper half would be BAR2
    ):
        with pytest.raises(ValueError):
            cs.add_bar(spec)
    cs.add_bar(BarSpec(4, 0x1000, BarKind.MEM64))
    assert set(cs.bars()) == {2, 4}


def test_io_bar_may_exceed_256_bytes() -> None:
    cs = plain()
    cs.add_bar(BarSpec(0, 0x1000, BarKind.IO))
    assert size_bar(cs, 0) == 0xFFFFF001


# --- expansion ROM -----------------------------------------------------------------------


def qemu_rom_size(cs: ConfigSpace) -> int:
    """QEMU's vfio_pci_size_rom sequence over config space."""
    original = r32(cs, pci.ROM_ADDRESS)
    w32(cs, pci.ROM_ADDRESS, 0xFFFFF800)
    value = r32(cs, pci.ROM_ADDRESS)
    w32(cs, pci.ROM_ADDRESS, original)
    return (~(value & 0xFFFFF800) + 1) & 0xFFFFFFFF


def test_rom_absent() -> None:
    cs = plain()
    assert qemu_rom_size(cs) == 0
    w32(cs, pci.ROM_ADDRESS, 0xFFFFFFFF)
    assert r32(cs, pci.ROM_ADDRESS) == 0
    assert not cs.rom_enabled
    assert cs.rom_address == 0


@pytest.mark.parametrize("size", [2048, 0x10000, 1 << 20])
def test_rom_present_sizing(size: int) -> None:
    cs = plain()
    cs.set_rom(size)
    assert cs.rom_size == size
    assert qemu_rom_size(cs) == size
    assert r32(cs, pci.ROM_ADDRESS) == 0  # original value put back


def test_rom_address_and_enable() -> None:
    cs = plain()
    cs.set_rom(0x10000)
    w32(cs, pci.ROM_ADDRESS, 0xFEB87FFF)
    assert r32(cs, pci.ROM_ADDRESS) == 0xFEB80001
    assert cs.rom_address == 0xFEB80000
    assert cs.rom_enabled
    w32(cs, pci.ROM_ADDRESS, 0xFEB80000)
    assert not cs.rom_enabled


@pytest.mark.parametrize("size", [1024, 3000, -2048, 1 << 32])
def test_rom_bad_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        plain().set_rom(size)


def test_rom_can_be_removed() -> None:
    cs = plain()
    cs.set_rom(4096)
    w32(cs, pci.ROM_ADDRESS, 0xFFFFFFFF)
    cs.set_rom(0)
    assert r32(cs, pci.ROM_ADDRESS) == 0
    assert qemu_rom_size(cs) == 0


# --- capability list ---------------------------------------------------------------------


def test_no_capabilities() -> None:
    cs = plain()
    assert not cs.status & pci.STATUS_CAP_LIST
    assert r8(cs, pci.CAPABILITY_LIST) == 0
    assert cs.capabilities() == []
    assert cs.find_capability(pci.CAP_ID_MSI) is None


def test_capability_walk() -> None:
    cs = full()
    assert cs.status & pci.STATUS_CAP_LIST
    walked = walk_capabilities(cs)
    ids = [cap_id for cap_id, _ in walked]
    assert ids == [pci.CAP_ID_PM, pci.CAP_ID_MSI, pci.CAP_ID_MSIX, pci.CAP_ID_EXPRESS]
    assert walked == cs.capabilities()
    assert walked[0][1] == 0x40
    for cap_id, offset in walked:
        assert cs.find_capability(cap_id) == offset
    offsets = [offset for _, offset in walked]
    assert offsets == sorted(offsets)
    assert all(offset + 2 <= 0x100 for offset in offsets)


def test_cap_list_bit_survives_status_writes_and_reset() -> None:
    cs = full()
    w16(cs, pci.STATUS, 0xFFFF)
    assert cs.status & pci.STATUS_CAP_LIST
    cs.reset()
    assert cs.status & pci.STATUS_CAP_LIST


def test_duplicate_capability_rejected() -> None:
    cs = plain()
    cs.add_pm_capability()
    with pytest.raises(ValueError):
        cs.add_pm_capability()


def test_capability_space_exhausted() -> None:
    cs = plain(express=True)
    cs.add_bar(BarSpec(0, 0x10000, BarKind.MEM32))
    cs.add_pm_capability()
    cs.add_msi_capability(32)
    cs.add_msix_capability(64, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x8000)
    cs.add_express_capability()  # 0x40 + 8 + 24 + 12 + 60 = 0xA4 bytes so far: fits
    assert cs.find_capability(pci.CAP_ID_EXPRESS) is not None


def test_extended_capability_space_is_null() -> None:
    cs = full()
    assert r32(cs, pci.EXTENDED_CAPABILITY_START) == 0
    w32(cs, pci.EXTENDED_CAPABILITY_START, 0xFFFFFFFF)
    assert cs.read(0x100, 0xF00) == bytes(0xF00)


# --- power management --------------------------------------------------------------------


def test_pm_capability() -> None:
    cs = plain()
    pm = cs.add_pm_capability()
    assert r16(cs, pm + pci.PM_PMC) & 0x7 == 3  # PM spec 1.2
    assert cs.power_state == 0
    w16(cs, pm + pci.PM_PMCSR, 3)
    assert cs.power_state == 3
    w16(cs, pm + pci.PM_PMCSR, 1)  # D1 is not supported: write ignored
    assert cs.power_state == 3
    w16(cs, pm + pci.PM_PMCSR, 0)
    assert cs.power_state == 0
    w16(cs, pm + pci.PM_PMCSR, 2)
    assert cs.power_state == 0
    assert r16(cs, pm + pci.PM_PMCSR) & pci.PMCSR_NO_SOFT_RESET


def test_pm_pme_status_is_w1c() -> None:
    cs = plain()
    pm = cs.add_pm_capability()
    snap = bytearray(cs.snapshot())
    snap[pm + pci.PM_PMCSR + 1] |= 0x80
    cs.restore(bytes(snap))
    assert r16(cs, pm + pci.PM_PMCSR) & pci.PMCSR_PME_STATUS
    w16(cs, pm + pci.PM_PMCSR, pci.PMCSR_PME_STATUS | 3)
    assert not r16(cs, pm + pci.PM_PMCSR) & pci.PMCSR_PME_STATUS
    assert cs.power_state == 3


def test_power_state_without_pm() -> None:
    assert plain().power_state == 0


# --- MSI ---------------------------------------------------------------------------------


def test_msi_enable_via_config_write() -> None:
    cs = full()
    msi = cs.find_capability(pci.CAP_ID_MSI)
    assert msi is not None
    control = r16(cs, msi + pci.MSI_CONTROL)
    assert control == (2 << 1) | pci.MSI_ADDR64 | pci.MSI_PER_VECTOR_MASK  # 4 vectors
    assert (cs.msi_enabled, cs.msi_vectors) == (False, 4)
    w32(cs, msi + 4, 0xFEE01004 | 0x3)  # low two bits are read-only zero
    w32(cs, msi + 8, 0x1)
    w16(cs, msi + 12, 0x4041)
    w16(cs, msi + pci.MSI_CONTROL, control | pci.MSI_ENABLE | (2 << 4))
    assert cs.msi_enabled
    assert cs.msi_vectors_enabled == 4
    assert cs.msi_address == 0x1_FEE01004
    assert cs.msi_data == 0x4041
    w16(cs, msi + pci.MSI_CONTROL, 0)
    assert (cs.msi_enabled, cs.msi_vectors_enabled) == (False, 1)
    assert r16(cs, msi + pci.MSI_CONTROL) == control  # MMC/64-bit/PVM bits are read-only


def test_msi_mme_clamped_to_mmc() -> None:
    cs = plain()
    msi = cs.add_msi_capability(4)
    w16(cs, msi + pci.MSI_CONTROL, 0x70 | pci.MSI_ENABLE)
    assert cs.msi_vectors_enabled == 4
    assert (r16(cs, msi + pci.MSI_CONTROL) >> 4) & 7 == 2
    cs.write(msi + pci.MSI_CONTROL, b"\x31")  # 8 vectors requested
    assert cs.msi_vectors_enabled == 4
    cs.write(msi + pci.MSI_CONTROL, b"\x11")
    assert cs.msi_vectors_enabled == 2


def test_msi_single_vector_mme_stays_zero() -> None:
    cs = plain()
    msi = cs.add_msi_capability()
    w16(cs, msi + pci.MSI_CONTROL, 0xFFFF)
    assert cs.msi_enabled
    assert cs.msi_vectors_enabled == 1


def test_msi_mask_and_pending_bits() -> None:
    cs = plain()
    msi = cs.add_msi_capability(4)  # 64-bit + PVM: mask at +0x10, pending at +0x14
    w32(cs, msi + 0x10, 0xFFFFFFFF)
    assert r32(cs, msi + 0x10) == 0xF  # only the offered vectors
    assert all(cs.msi_vector_masked(v) for v in range(4))
    w32(cs, msi + 0x10, 0b0101)
    assert [cs.msi_vector_masked(v) for v in range(4)] == [True, False, True, False]
    with pytest.raises(ValueError):
        cs.msi_vector_masked(4)
    cs.set_msi_pending(1, True)
    assert r32(cs, msi + 0x14) == 0b10
    w32(cs, msi + 0x14, 0)  # read-only to software
    assert cs.msi_vector_pending(1)
    cs.set_msi_pending(1, False)
    assert r32(cs, msi + 0x14) == 0


def test_msi_32bit_without_mask_layout() -> None:
    cs = plain()
    msi = cs.add_msi_capability(1, addr64=False, per_vector_mask=False)
    assert r16(cs, msi + pci.MSI_CONTROL) == 0
    w32(cs, msi + 4, 0xFEE00000)
    w16(cs, msi + 8, 0x0031)
    w32(cs, msi + 0xC, 0xFFFFFFFF)  # beyond the capability: nothing there
    assert cs.msi_address == 0xFEE00000
    assert cs.msi_data == 0x31
    assert r32(cs, msi + 0xC) == 0
    assert not cs.msi_vector_masked(0)
    with pytest.raises(ValueError):
        cs.set_msi_pending(0, True)
    # the next capability follows dword-aligned right after the 10-byte capability
    pm = cs.add_pm_capability()
    assert pm == msi + 12


@pytest.mark.parametrize("vectors", [0, 3, 64, -1])
def test_msi_bad_vector_counts(vectors: int) -> None:
    with pytest.raises(ValueError):
        plain().add_msi_capability(vectors)


def test_msi_absent() -> None:
    cs = plain()
    assert not cs.msi_enabled
    assert cs.msi_vectors_enabled == 0
    assert cs.msi_address == 0
    assert cs.msi_data == 0
    with pytest.raises(ValueError):
        cs.msi_vector_masked(0)


# --- MSI-X -------------------------------------------------------------------------------


def test_msix_capability_registers() -> None:
    cs = full()
    msix = cs.find_capability(pci.CAP_ID_MSIX)
    assert msix is not None
    # QEMU's realize reads: flags at +2, table at +4, PBA at +8
    assert r16(cs, msix + 2) & pci.MSIX_TABLE_SIZE_MASK == 15
    assert r32(cs, msix + 4) == 0x0000 | 0
    assert r32(cs, msix + 8) == 0x1000 | 0
    assert cs.msix_table_size == 16
    layout = cs.msix_layout
    assert layout is not None
    assert (layout.table_bar, layout.table_offset, layout.pba_bar, layout.pba_offset) == (
        0,
        0,
        0,
        0x1000,
    )
    assert layout.table_length == 256
    assert layout.pba_length == 8


def test_msix_enable_and_function_mask() -> None:
    cs = full()
    msix = cs.find_capability(pci.CAP_ID_MSIX)
    assert msix is not None
    assert (cs.msix_enabled, cs.msix_function_masked) == (False, False)
    w16(cs, msix + 2, 0xFFFF)
    assert (cs.msix_enabled, cs.msix_function_masked) == (True, True)
    assert r16(cs, msix + 2) == 0xC000 | 15  # table size is read-only
    cs.write(msix + 3, b"\x80")  # byte write: enable, unmask
    assert (cs.msix_enabled, cs.msix_function_masked) == (True, False)
    w32(cs, msix + 4, 0xFFFFFFFF)
    w32(cs, msix + 8, 0xFFFFFFFF)
    assert r32(cs, msix + 4) == 0
    assert r32(cs, msix + 8) == 0x1000


def test_msix_bir_in_register() -> None:
    cs = plain()
    cs.add_bar(BarSpec(2, 0x8000, BarKind.MEM64))
    cs.add_bar(BarSpec(4, 0x1000, BarKind.MEM32))
    msix = cs.add_msix_capability(2048, table_bar=2, table_offset=0x0, pba_bar=4, pba_offset=0x800)
    assert r16(cs, msix + 2) == 2047
    assert r32(cs, msix + 4) == 2
    assert r32(cs, msix + 8) == 0x804


def test_msix_absent() -> None:
    cs = plain()
    assert not cs.msix_enabled
    assert not cs.msix_function_masked
    assert cs.msix_table_size == 0
    assert cs.msix_layout is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"table_size": 0},
        {"table_size": 2049},
        {"table_bar": 5},  # not implemented
        {"table_bar": 3},  # upper half of a 64-bit BAR
        {"pba_bar": 1},  # I/O BAR
        {"table_offset": 0x4},  # not 8-byte aligned
        {"pba_offset": 0xFFC},
        {"table_offset": 0xF80},  # 16 entries * 16 bytes overflow a 4 KiB BAR
        {"pba_offset": 0x1000},  # PBA past the end of the BAR
        {"pba_offset": 0x80},  # PBA inside the table
        {"table_offset": -8},
    ],
)
def test_msix_validation(kwargs: dict[str, int]) -> None:
    cs = plain()
    cs.add_bar(BarSpec(0, 0x1000, BarKind.MEM32))
    cs.add_bar(BarSpec(1, 0x100, BarKind.IO))
    cs.add_bar(BarSpec(2, 0x1000, BarKind.MEM64))
    args = {"table_size": 16, "table_bar": 0, "table_offset": 0, "pba_bar": 0}
    args["pba_offset"] = 0x800
    args.update(kwargs)
    with pytest.raises(ValueError):
        cs.add_msix_capability(**args)
    assert cs.find_capability(pci.CAP_ID_MSIX) is None  # nothing half-added


def test_msix_pba_in_other_bar_may_share_offset() -> None:
    cs = plain()
    cs.add_bar(BarSpec(0, 0x1000, BarKind.MEM32))
    cs.add_bar(BarSpec(1, 0x1000, BarKind.MEM32))
    cs.add_msix_capability(4, table_bar=0, table_offset=0, pba_bar=1, pba_offset=0)
    assert cs.msix_table_size == 4


# --- PCI Express -------------------------------------------------------------------------


def test_express_capability() -> None:
    cs = full()
    exp = cs.find_capability(pci.CAP_ID_EXPRESS)
    assert exp is not None
    flags = r16(cs, exp + pci.EXP_FLAGS)
    assert flags & 0xF == 2
    assert (flags >> 4) & 0xF == PciExpressType.ENDPOINT
    lnkcap = r32(cs, exp + pci.EXP_LNKCAP)
    assert lnkcap & 0xF == 1 and (lnkcap >> 4) & 0x3F == 1
    lnksta = r16(cs, exp + pci.EXP_LNKSTA)
    assert lnksta & 0xF == 1 and (lnksta >> 4) & 0x3F == 1
    assert r16(cs, exp + pci.EXP_DEVCTL) == pci.EXP_DEVCTL_DEFAULT


def test_express_device_control_and_status() -> None:
    cs = full()
    exp = cs.find_capability(pci.CAP_ID_EXPRESS)
    assert exp is not None
    w16(cs, exp + pci.EXP_DEVCTL, 0xFFFF)
    assert r16(cs, exp + pci.EXP_DEVCTL) == pci.EXP_DEVCTL_WRITABLE
    w16(cs, exp + pci.EXP_DEVCTL, 0)
    assert r16(cs, exp + pci.EXP_DEVCTL) == 0
    snap = bytearray(cs.snapshot())
    snap[exp + pci.EXP_DEVSTA] = 0xFF  # device latched errors (+ read-only bits ignored)
    cs.restore(bytes(snap))
    assert r16(cs, exp + pci.EXP_DEVSTA) == 0xF
    w16(cs, exp + pci.EXP_DEVSTA, 0x5)
    assert r16(cs, exp + pci.EXP_DEVSTA) == 0xA
    w32(cs, exp + pci.EXP_DEVCAP, 0xFFFFFFFF)
    assert r32(cs, exp + pci.EXP_DEVCAP) == pci.EXP_DEVCAP_RBER


@pytest.mark.parametrize("kind", list(PciExpressType))
def test_express_device_types(kind: PciExpressType) -> None:
    cs = plain(express=True)
    exp = cs.add_express_capability(kind)
    assert (r16(cs, exp + pci.EXP_FLAGS) >> 4) & 0xF == kind
    has_link = kind is not PciExpressType.RC_INTEGRATED
    assert bool(r32(cs, exp + pci.EXP_LNKCAP)) == has_link
    assert bool(r16(cs, exp + pci.EXP_LNKSTA)) == has_link


def test_express_capability_needs_express_config() -> None:
    with pytest.raises(ValueError):
        plain().add_express_capability()


def test_express_rejects_unknown_type() -> None:
    with pytest.raises(ValueError):
        plain(express=True).add_express_capability(4)  # type: ignore[arg-type]


# --- access rules ------------------------------------------------------------------------


@pytest.mark.parametrize("express", [False, True])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 8])
def test_every_offset_and_width_is_accepted(express: bool, count: int) -> None:
    cs = full(express)
    for offset in range(cs.size - count + 1):
        data = cs.read(offset, count)
        assert len(data) == count
        cs.write(offset, data)
        cs.write(offset, b"\xff" * count)
    assert r16(cs, pci.VENDOR_ID) == VENDOR


def test_whole_space_read_and_empty_accesses() -> None:
    cs = full()
    assert len(cs.read(0, cs.size)) == cs.size
    assert cs.read(cs.size, 0) == b""
    cs.write(cs.size, b"")


@pytest.mark.parametrize(
    ("offset", "count"),
    [(-1, 1), (0, -1), (256, 1), (255, 2), (0, 257), (1 << 40, 4)],
)
def test_out_of_range_read(offset: int, count: int) -> None:
    cs = plain()
    with pytest.raises(ConfigAccessError) as info:
        cs.read(offset, count)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (256, 1), (253, 4), (0, 257)])
def test_out_of_range_write(offset: int, length: int) -> None:
    cs = plain()
    before = cs.snapshot()
    with pytest.raises(ConfigAccessError) as info:
        cs.write(offset, b"\xff" * length)
    assert info.value.errno == errno.EINVAL
    assert cs.snapshot() == before


def test_express_range_is_4096() -> None:
    cs = plain(express=True)
    assert cs.read(4092, 4) == bytes(4)
    with pytest.raises(ConfigAccessError):
        cs.read(4093, 4)


def test_multi_register_write_goes_byte_by_byte() -> None:
    cs = full()
    # one 16-byte write over command, status, revision/class and cache/latency/header/BIST
    cs.write(pci.COMMAND, b"\xff" * 12)
    assert cs.command == pci.COMMAND_WRITABLE
    assert int.from_bytes(cs.read(pci.CLASS_CODE, 3), "little") == CLASS
    assert r8(cs, pci.CACHE_LINE_SIZE) == 0xFF
    assert r8(cs, pci.HEADER_TYPE) == 0


def test_write_accepts_bytearray_and_memoryview() -> None:
    cs = plain()
    cs.write(pci.COMMAND, bytearray(b"\x02\x00"))
    assert cs.memory_enabled
    cs.write(pci.COMMAND, memoryview(b"\x00\x00"))
    assert not cs.memory_enabled


# --- listeners ---------------------------------------------------------------------------


def test_write_listener_called_after_write() -> None:
    cs = full()
    msi = cs.find_capability(pci.CAP_ID_MSI)
    assert msi is not None
    seen: list[tuple[int, int, bool]] = []
    cs.add_write_listener(lambda off, n: seen.append((off, n, cs.msi_enabled)))
    w16(cs, msi + 2, pci.MSI_ENABLE)
    cs.write(pci.VENDOR_ID, b"\x00")  # read-only, but still a write
    cs.write(0x80, b"")  # nothing written
    assert seen == [(msi + 2, 2, True), (0, 1, True)]
    cs.reset()
    assert seen[-1] == (0, cs.size, False)
    cs.restore(cs.snapshot())
    assert seen[-1] == (0, cs.size, False)


def test_remove_write_listener() -> None:
    cs = plain()
    calls: list[tuple[int, int]] = []

    def listener(offset: int, length: int) -> None:
        calls.append((offset, length))

    cs.add_write_listener(listener)
    cs.write(0, b"\x00")
    cs.remove_write_listener(listener)
    cs.write(0, b"\x00")
    assert calls == [(0, 1)]


def test_listener_not_called_for_rejected_write() -> None:
    cs = plain()
    calls: list[tuple[int, int]] = []
    cs.add_write_listener(lambda off, n: calls.append((off, n)))
    with pytest.raises(ConfigAccessError):
        cs.write(255, b"\x00\x00")
    assert calls == []


# --- reset -------------------------------------------------------------------------------


def test_reset_restores_power_on_values() -> None:
    cs = full()
    fresh = full().snapshot()
    pm = cs.find_capability(pci.CAP_ID_PM)
    msi = cs.find_capability(pci.CAP_ID_MSI)
    msix = cs.find_capability(pci.CAP_ID_MSIX)
    assert pm is not None and msi is not None and msix is not None
    w16(cs, pci.COMMAND, 0xFFFF)
    w32(cs, bar_reg(0), 0xFEB00000)
    w32(cs, pci.ROM_ADDRESS, 0xFFFFFFFF)
    w16(cs, pm + pci.PM_PMCSR, 3)
    w16(cs, msi + 2, 0xFFFF)
    w16(cs, msix + 2, 0xFFFF)
    cs.set_interrupt_status(True)
    cs.latch_status(pci.STATUS_REC_MASTER_ABORT)
    assert cs.snapshot() != fresh
    cs.reset()
    assert cs.snapshot() == fresh
    assert cs.command == 0
    assert cs.bar_address(0) == 0
    assert cs.power_state == 0
    assert not cs.msi_enabled and not cs.msix_enabled and not cs.rom_enabled
    assert walk_capabilities(cs) == cs.capabilities()
    assert r32(cs, bar_reg(2)) == 0xC


def test_qemu_reset_sequence() -> None:
    """What QEMU's vfio_user_pci_reset sends around DEVICE_RESET."""
    cs = full()
    pm = cs.find_capability(pci.CAP_ID_PM)
    assert pm is not None
    w16(cs, pci.COMMAND, pci.COMMAND_MEMORY | pci.COMMAND_MASTER | pci.COMMAND_SERR)
    w16(cs, pm + pci.PM_PMCSR, 3)
    clear = pci.COMMAND_IO | pci.COMMAND_MEMORY | pci.COMMAND_MASTER | pci.COMMAND_INTX_DISABLE
    w16(cs, pci.COMMAND, cs.command & ~clear)
    assert cs.command == pci.COMMAND_SERR
    w16(cs, pm + pci.PM_PMCSR, r16(cs, pm + pci.PM_PMCSR) & ~3)
    assert cs.power_state == 0
    cs.reset()
    for index in range(6):
        w32(cs, bar_reg(index), 0)
    assert [r32(cs, bar_reg(i)) for i in range(6)] == [0, 1, 0xC, 0, 0x4, 0]


# --- snapshot / restore ------------------------------------------------------------------


def test_snapshot_restore_round_trip() -> None:
    cs = full()
    w16(cs, pci.COMMAND, 0x0006)
    w32(cs, bar_reg(2), 0xE0000000)
    cs.set_interrupt_status(True)
    msi = cs.find_capability(pci.CAP_ID_MSI)
    assert msi is not None
    cs.set_msi_pending(3, True)
    snap = cs.snapshot()
    other = full()
    other.restore(snap)
    assert other.snapshot() == snap
    assert other.bar_address(2) == 0xE0000000
    assert other.status & pci.STATUS_INTERRUPT
    assert other.msi_vector_pending(3)


@pytest.mark.parametrize("length", [0, 255, 257, 4096])
def test_restore_rejects_wrong_length(length: int) -> None:
    cs = plain()
    with pytest.raises(ValueError):
        cs.restore(bytes(length))


def test_hostile_snapshot_cannot_change_layout() -> None:
    cs = full()
    hostile = bytearray(b"\xff" * cs.size)
    msi = cs.find_capability(pci.CAP_ID_MSI)
    pm = cs.find_capability(pci.CAP_ID_PM)
    assert msi is not None and pm is not None
    hostile[msi + 2] = 0x21  # a legal MME and enable, so the snapshot is accepted
    hostile[pm + pci.PM_PMCSR] = 0x03
    cs.restore(bytes(hostile))
    assert r16(cs, pci.VENDOR_ID) == VENDOR
    assert r16(cs, pci.DEVICE_ID) == DEVICE
    assert r8(cs, pci.INTERRUPT_PIN) == 1
    assert r32(cs, bar_reg(0)) == 0xFFFFC000  # address bits are state, type bits layout
    assert r32(cs, bar_reg(1)) == 0xFFFFFF01
    assert r32(cs, bar_reg(2)) & 0xF == 0xC
    assert r32(cs, bar_reg(4)) & 0xF == 0x4
    assert walk_capabilities(cs) == cs.capabilities()
    assert cs.msix_table_size == 16
    assert r32(cs, pci.EXTENDED_CAPABILITY_START) == 0
    assert cs.read(0x100, 0xF00) == bytes(0xF00)
    assert cs.msi_vectors_enabled == 4


@pytest.mark.parametrize(
    ("cap_id", "rel", "value"),
    [(pci.CAP_ID_MSI, pci.MSI_CONTROL, 0x70), (pci.CAP_ID_PM, pci.PM_PMCSR, 0x01)],
)
def test_restore_rejects_impossible_state(cap_id: int, rel: int, value: int) -> None:
    cs = full()
    offset = cs.find_capability(cap_id)
    assert offset is not None
    w16(cs, pci.COMMAND, pci.COMMAND_MEMORY)
    before = cs.snapshot()
    bad = bytearray(before)
    bad[offset + rel] = value
    bad[pci.COMMAND] = 0
    with pytest.raises(ValueError):
        cs.restore(bytes(bad))
    assert cs.snapshot() == before


def test_masks_are_consistent() -> None:
    cs = full()
    writable, w1c, read_only = cs.writable_mask(), cs.w1c_mask(), cs.read_only_mask()
    assert len(writable) == len(w1c) == len(read_only) == cs.size
    for w, c, ro in zip(writable, w1c, read_only, strict=True):
        assert w & c == 0
        assert w | c | ro == 0xFF
        assert ro & (w | c) == 0
    assert read_only[pci.VENDOR_ID] == 0xFF
    assert struct.unpack_from("<H", writable, pci.COMMAND)[0] == pci.COMMAND_WRITABLE
    assert struct.unpack_from("<H", w1c, pci.STATUS)[0] == pci.STATUS_W1C


# --- properties --------------------------------------------------------------------------

LAYOUTS = {"conventional": lambda: full(express=False), "express": lambda: full(express=True)}


def writes_for(size: int) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    # Most registers live in the first 0x100 bytes, so bias offsets there.
    offsets = st.one_of(st.integers(0, min(0x10F, size - 1)), st.integers(0, size - 1))
    payload = st.one_of(
        st.binary(min_size=1, max_size=8),
        st.sampled_from([1, 2, 4]).map(lambda n: b"\xff" * n),
    )
    write = st.tuples(offsets, payload).map(lambda w: (w[0], w[1][: size - w[0]]))
    return st.lists(write, max_size=40)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_writes_never_change_read_only_bits(layout: str, data: st.DataObject) -> None:
    cs = LAYOUTS[layout]()
    fresh = LAYOUTS[layout]().snapshot()
    writes = data.draw(writes_for(cs.size))
    for offset, payload in writes:
        cs.write(offset, payload)
    now = cs.read(0, cs.size)
    # Everything a write cannot set is unchanged: read-only bits stay at their layout value
    # and W1C bits (all clear at power-on, no device events here) stay clear.
    not_writable = bytes(~b & 0xFF for b in cs.writable_mask())
    for pos, mask in enumerate(not_writable):
        assert now[pos] & mask == fresh[pos] & mask, f"byte {pos:#x} changed"
    assert cs.msi_vectors_enabled <= cs.msi_vectors
    assert cs.power_state in (0, 3)
    # and the state migrates
    other = LAYOUTS[layout]()
    other.restore(cs.snapshot())
    assert other.snapshot() == cs.snapshot()
    assert other.msi_enabled == cs.msi_enabled
    assert other.msix_enabled == cs.msix_enabled
    assert other.command == cs.command


@settings(max_examples=80, deadline=None)
@given(
    head=st.binary(min_size=0x110, max_size=0x110),
    fill=st.integers(0, 255),
    legal=st.booleans(),
)
def test_hostile_snapshot_keeps_read_only_bytes(head: bytes, fill: int, legal: bool) -> None:
    # Random where the registers are, one repeated byte over the (empty) extended space.
    cs = full()
    fresh = full().snapshot()
    msi = cs.find_capability(pci.CAP_ID_MSI)
    pm = cs.find_capability(pci.CAP_ID_PM)
    assert msi is not None and pm is not None
    hostile = bytearray(head + bytes([fill]) * (cs.size - len(head)))
    if legal:
        # Keep the two fields restore() validates legal, so the masking path always runs.
        hostile[msi + pci.MSI_CONTROL] &= 0x2F
        hostile[pm + pci.PM_PMCSR] |= 0x03
    w16(cs, pci.COMMAND, pci.COMMAND_MASTER)
    before = cs.snapshot()
    try:
        cs.restore(bytes(hostile))
    except ValueError:
        assert not legal
        assert cs.snapshot() == before  # rejected snapshots change nothing
        return
    now = cs.snapshot()
    # Device-driven bits are read-only to software but are state, so they migrate.
    device = cs.device_mask()
    assert device[pci.STATUS] == pci.STATUS_INTERRUPT
    assert device[msi + 0x14] == 0xF  # MSI pending bits of the 4 vectors
    for pos, read_only in enumerate(cs.read_only_mask()):
        mask = read_only & ~device[pos]
        assert now[pos] & mask == fresh[pos] & mask, f"byte {pos:#x} changed"
    assert r16(cs, pci.VENDOR_ID) == VENDOR
    assert walk_capabilities(cs) == cs.capabilities()
