"""``lspci -vv``-like description of a vfio-user device, gathered through a :class:`Client`."""

from __future__ import annotations

import struct

from protocol.constants import (
    DeviceFlags,
    IrqIndex,
    IrqInfoFlags,
    PciRegion,
    RegionFlags,
)
from protocol.messages import NdmaCap, SparseMmapCap, TypeCap

from .client import Client, ClientError, ConnectionLost, RegionDescription
from .transport import close_fds

#: QEMU's anti-malicious-server limits (facts 5.2); the report stops there too.
MAX_REGIONS = 100
MAX_IRQS = 50
#: Bytes of config space read for the report: all of it (PCIe: extended caps at 0x100).
CONFIG_READ_SIZE = 4096
PCI_CONFIG_SPACE_SIZE = 256
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34

CAP_NAMES = {
    0x01: "Power Management",
    0x02: "AGP",
    0x03: "Vital Product Data",
    0x04: "Slot Identification",
    0x05: "MSI",
    0x06: "CompactPCI Hot Swap",
    0x07: "PCI-X",
    0x08: "HyperTransport",
    0x09: "Vendor Specific",
    0x0A: "Debug port",
    0x0B: "CompactPCI central resource control",
    0x0C: "PCI Standard Hot-Plug Controller",
    0x0D: "Bridge subsystem vendor/device ID",
    0x0E: "AGP 8x",
    0x0F: "Secure Device",
    0x10: "PCI Express",
    0x11: "MSI-X",
    0x12: "SATA",
    0x13: "Advanced Features",
    0x14: "Enhanced Allocation",
    0x15: "Flattening Portal Bridge",
}

EXT_CAP_NAMES = {
    0x0001: "Advanced Error Reporting",
    0x0002: "Virtual Channel",
    0x0003: "Device Serial Number",
    0x0004: "Power Budgeting",
    0x000B: "Vendor Specific",
    0x000D: "Access Control Services",
    0x000E: "Alternative Routing-ID",
    0x0010: "SR-IOV",
    0x0015: "Resizable BAR",
    0x0018: "Latency Tolerance Reporting",
    0x001E: "L1 PM Substates",
    0x0023: "Designated Vendor-Specific",
}

PCIE_PORT_TYPES = {
    0x0: "Endpoint",
    0x1: "Legacy Endpoint",
    0x4: "Root Port",
    0x5: "Upstream Port",
    0x6: "Downstream Port",
    0x7: "PCIe-to-PCI Bridge",
    0x8: "PCI-to-PCIe Bridge",
    0x9: "Root Complex Integrated Endpoint",
    0xA: "Root Complex Event Collector",
}

IRQ_NAMES = {
    IrqIndex.INTX: "INTx",
    IrqIndex.MSI: "MSI",
    IrqIndex.MSIX: "MSI-X",
    IrqIndex.ERR: "ERR",
    IrqIndex.REQ: "REQ",
}


def region_name(index: int) -> str:
    if index <= PciRegion.BAR5:
        return f"BAR{index}"
    if index < len(PciRegion):
        return PciRegion(index).name
    return f"REGION{index}"


def human_size(size: int) -> str:
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def _flag_names(value: int, names: list[tuple[int, str]]) -> str:
    parts = [name for bit, name in names if value & bit]
    unknown = value & ~sum(bit for bit, _ in names)
    if unknown:
        parts.append(f"{unknown:#x}")
    return "/".join(parts) if parts else "-"


def _region_flags(flags: int) -> str:
    return _flag_names(
        flags,
        [
            (RegionFlags.READ, "R"),
            (RegionFlags.WRITE, "W"),
            (RegionFlags.MMAP, "MMAP"),
            (RegionFlags.CAPS, "CAPS"),
        ],
    )


def _irq_flags(flags: int) -> str:
    return _flag_names(
        flags,
        [
            (IrqInfoFlags.EVENTFD, "EVENTFD"),
            (IrqInfoFlags.MASKABLE, "MASKABLE"),
            (IrqInfoFlags.AUTOMASKED, "AUTOMASKED"),
            (IrqInfoFlags.NORESIZE, "NORESIZE"),
        ],
    )


class _Config:
    """Little-endian accessors over a config-space snapshot (short reads give 0)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _get(self, fmt: str, offset: int) -> int:
        size = struct.calcsize(fmt)
        if offset < 0 or offset + size > len(self.data):
            return 0
        return int(struct.unpack_from(fmt, self.data, offset)[0])

    def u8(self, offset: int) -> int:
        return self._get("<B", offset)

    def u16(self, offset: int) -> int:
        return self._get("<H", offset)

    def u32(self, offset: int) -> int:
        return self._get("<I", offset)


def bar_type(config: _Config, index: int) -> str:
    """BAR ``index``'s type from its config register (what QEMU reads at realize)."""
    if index > 0 and _is_mem64(config.u32(0x10 + 4 * (index - 1))):
        return f"upper half of 64-bit BAR{index - 1}"
    value = config.u32(0x10 + 4 * index)
    if value & 1:
        return "I/O"
    kind = {0: "mem32", 1: "mem32 (below 1M)", 2: "mem64"}.get((value >> 1) & 3, "mem (reserved)")
    return f"{kind}, {'prefetchable' if value & 8 else 'non-prefetchable'}"


def _is_mem64(value: int) -> bool:
    return not value & 1 and (value >> 1) & 3 == 2


def _describe_cap(config: _Config, pos: int, cap_id: int) -> str:
    name = CAP_NAMES.get(cap_id, f"ID {cap_id:#04x}")
    head = f"  [{pos:02x}] {name}"
    if cap_id == 0x01:  # Power Management
        pmc = config.u16(pos + 2)
        pmcsr = config.u16(pos + 4)
        return f"{head}: version {pmc & 7}, power state D{pmcsr & 3}"
    if cap_id == 0x05:  # MSI
        ctrl = config.u16(pos + 2)
        capable = 1 << ((ctrl >> 1) & 7)
        enabled = 1 << ((ctrl >> 4) & 7)
        return (
            f"{head}: enable={'+' if ctrl & 1 else '-'} {capable} vector(s) capable, "
            f"{enabled} enabled, {'64' if ctrl & 0x80 else '32'}-bit, "
            f"per-vector masking {'+' if ctrl & 0x100 else '-'}"
        )
    if cap_id == 0x10:  # PCI Express
        caps = config.u16(pos + 2)
        port = (caps >> 4) & 0xF
        return f"{head}: version {caps & 0xF}, {PCIE_PORT_TYPES.get(port, f'port type {port:#x}')}"
    if cap_id == 0x11:  # MSI-X
        ctrl = config.u16(pos + 2)
        table = config.u32(pos + 4)
        pba = config.u32(pos + 8)
        return (
            f"{head}: enable={'+' if ctrl & 0x8000 else '-'} "
            f"masked={'+' if ctrl & 0x4000 else '-'} table size {(ctrl & 0x7FF) + 1}, "
            f"table BAR{table & 7} offset {table & ~7:#x}, PBA BAR{pba & 7} offset {pba & ~7:#x}"
        )
    return head


def capability_lines(config: _Config) -> list[str]:
    """Walk the standard capability list (status bit 4, pointer at 0x34)."""
    if not config.u16(0x06) & PCI_STATUS_CAP_LIST:
        return ["  (no capability list)"]
    lines = []
    seen: set[int] = set()
    pos = config.u8(PCI_CAPABILITY_LIST) & 0xFC
    while pos:
        if pos in seen or pos < 0x40 or pos + 2 > len(config.data):
            lines.append(f"  [{pos:02x}] broken capability pointer")
            break
        seen.add(pos)
        lines.append(_describe_cap(config, pos, config.u8(pos)))
        pos = config.u8(pos + 1) & 0xFC
    return lines or ["  (empty capability list)"]


def extended_capability_lines(config: _Config) -> list[str]:
    """Walk the PCIe extended capability list at 0x100 (only in a 4096-byte config space)."""
    if len(config.data) <= PCI_CONFIG_SPACE_SIZE or not config.u32(0x100):
        return []
    lines = []
    seen: set[int] = set()
    pos = 0x100
    while pos:
        if pos in seen or pos < 0x100 or pos + 4 > len(config.data):
            lines.append(f"  [{pos:03x}] broken extended capability pointer")
            break
        seen.add(pos)
        header = config.u32(pos)
        cap_id = header & 0xFFFF
        name = EXT_CAP_NAMES.get(cap_id, f"ID {cap_id:#06x}")
        lines.append(f"  [{pos:03x}] {name} (extended), version {(header >> 16) & 0xF}")
        pos = (header >> 20) & 0xFFC
    return lines


def _region_lines(desc: RegionDescription, config: _Config | None) -> list[str]:
    info = desc.info
    name = region_name(info.index)
    line = (
        f"  {name:<8} size {info.size:#x} ({human_size(info.size)})  [{_region_flags(info.flags)}]"
    )
    if info.offset:
        line += f"  offset {info.offset:#x}"
    if config is not None and info.index <= PciRegion.BAR5 and info.size:
        line += f"  {bar_type(config, info.index)}"
    lines = [line]
    for cap in desc.caps:
        if isinstance(cap, SparseMmapCap):
            areas = ", ".join(f"{off:#x}+{size:#x}" for off, size in cap.areas) or "none"
            lines.append(f"           sparse mmap areas: {areas}")
        elif isinstance(cap, TypeCap):
            migration = " (v1 migration region)" if (cap.type, cap.subtype) == (3, 1) else ""
            lines.append(f"           type {cap.type}, subtype {cap.subtype}{migration}")
        elif isinstance(cap, NdmaCap):
            lines.append("           NDMA (P2P quiescing)")
    return lines


async def _regions(client: Client, count: int) -> list[RegionDescription | ClientError]:
    """Every region's description, or the error it got. Region fds are closed at once.

    Error replies (and malformed replies, after which the stream is still in sync) are
    reported in place; a lost connection ends the report.
    """
    regions: list[RegionDescription | ClientError] = []
    for index in range(count):
        try:
            desc = await client.get_region_info(index)
        except ConnectionLost:
            raise
        except ClientError as exc:
            regions.append(exc)
            continue
        if desc.fd is not None:
            close_fds([desc.fd])
            desc.fd = None
        regions.append(desc)
    return regions


async def _read_config(
    client: Client, regions: list[RegionDescription | ClientError], lines: list[str]
) -> _Config | None:
    region = regions[PciRegion.CONFIG] if len(regions) > PciRegion.CONFIG else None
    if not isinstance(region, RegionDescription) or not region.info.size:
        return None
    size = min(CONFIG_READ_SIZE, region.info.size, client.server_max_data_xfer_size)
    try:
        return _Config(await client.region_read(PciRegion.CONFIG, 0, size))
    except ConnectionLost:
        raise
    except ClientError as exc:
        lines.append(f"Config space: read failed: {exc}")
        return None


def _config_header_lines(config: _Config) -> list[str]:
    class_code = config.u32(0x08) >> 8
    return [
        f"Config: vendor:device {config.u16(0x00):04x}:{config.u16(0x02):04x}  "
        f"subsystem {config.u16(0x2C):04x}:{config.u16(0x2E):04x}",
        f"        class {class_code:06x}  revision {config.u8(0x08):02x}  "
        f"header type {config.u8(0x0E):02x}  interrupt pin {config.u8(0x3D)}",
        f"        command {config.u16(0x04):#06x}  status {config.u16(0x06):#06x}",
    ]


async def _irq_lines(client: Client, count: int) -> list[str]:
    lines = []
    for index in range(count):
        name = IRQ_NAMES.get(IrqIndex(index), str(index)) if index < len(IrqIndex) else str(index)
        try:
            irq = await client.get_irq_info(index)
        except ConnectionLost:
            raise
        except ClientError as exc:
            lines.append(f"  {name:<6} error: {exc}")
            continue
        lines.append(f"  {name:<6} count {irq.count}  [{_irq_flags(irq.flags)}]")
    return lines


async def describe(client: Client) -> str:
    """A multi-line report of the device behind ``client``."""
    info = await client.get_info()
    flags = _flag_names(info.flags, [(DeviceFlags.RESET, "RESET"), (DeviceFlags.PCI, "PCI")])
    lines = [
        f"vfio-user device: protocol {client.major}.{client.minor}",
        f"Flags: {flags}  regions: {info.num_regions}  irqs: {info.num_irqs}",
    ]
    if info.num_regions > MAX_REGIONS or info.num_irqs > MAX_IRQS:
        lines.append(f"(listing at most {MAX_REGIONS} regions and {MAX_IRQS} irqs)")

    regions = await _regions(client, min(info.num_regions, MAX_REGIONS))
    config = await _read_config(client, regions, lines)
    if config is not None:
        lines += _config_header_lines(config)

    lines.append("Regions:")
    for index, region in enumerate(regions):
        if isinstance(region, ClientError):
            lines.append(f"  {region_name(index):<8} error: {region}")
        else:
            lines += _region_lines(region, config)

    lines.append("IRQs:")
    lines += await _irq_lines(client, min(info.num_irqs, MAX_IRQS))

    if config is not None:
        lines.append("Capabilities:")
        lines += capability_lines(config)
        lines += extended_capability_lines(config)
    return "\n".join(lines) + "\n"
