"""``lspci -vv``-like description of a vfio-user device, gathered through a :class:`Client`."""

from __future__ import annotations

import struct
from typing import Any

from emulator.client.compat import IRQ_NAMES, human_size, pci_ids, region_name
from emulator.client.core import Client, RegionDescription
from emulator.client.migrate import get_caps, get_state
from emulator.client.migrate_v1 import get_device_state, state_name
from emulator.client.requests import ClientError, ConnectionLost
from emulator.transport import close_fds
from protocol.constants import (
    DeviceFlags,
    IrqIndex,
    IrqInfoFlags,
    MigrationCaps,
    PciRegion,
    RegionFlags,
)
from protocol.messages import IrqInfo, NdmaCap, SparseMmapCap, TypeCap

#: The TYPE cap of a v1 migration region.
MIGRATION_REGION_TYPE = TypeCap(3, 1)
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


def _flag_names(value: int, names: list[tuple[int, str]]) -> str:
    parts = [name for bit, name in names if value & bit]
    unknown = value & ~sum(bit for bit, _ in names)
    if unknown:
        parts.append(f"{unknown:#x}")
    return "/".join(parts) if parts else "-"


def _device_flags(flags: int) -> str:
    return _flag_names(flags, [(DeviceFlags.RESET, "RESET"), (DeviceFlags.PCI, "PCI")])


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


async def _irqs(client: Client, count: int) -> list[tuple[str, IrqInfo | ClientError]]:
    """(name, info or the error it got) of every interrupt index; a lost connection ends
    the report."""
    irqs: list[tuple[str, IrqInfo | ClientError]] = []
    for index in range(count):
        name = IRQ_NAMES.get(IrqIndex(index), str(index)) if index < len(IrqIndex) else str(index)
        try:
            irqs.append((name, await client.get_irq_info(index)))
        except ConnectionLost:
            raise
        except ClientError as exc:
            irqs.append((name, exc))
    return irqs


async def _irq_lines(client: Client, count: int) -> list[str]:
    return [
        f"  {name:<6} error: {irq}"
        if isinstance(irq, ClientError)
        else f"  {name:<6} count {irq.count}  [{_irq_flags(irq.flags)}]"
        for name, irq in await _irqs(client, count)
    ]


async def describe(client: Client) -> str:
    """A multi-line report of the device behind ``client``."""
    info = await client.get_info()
    flags = _device_flags(info.flags)
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

    lines += _migration_lines(await migration_status(client, regions))

    if config is not None:
        lines.append("Capabilities:")
        lines += capability_lines(config)
        lines += extended_capability_lines(config)
    return "\n".join(lines) + "\n"


async def migration_status(
    client: Client, regions: list[RegionDescription | ClientError]
) -> dict[str, Any]:
    """What the device offers for migration and where it is: v2 (DEVICE_FEATURE: the
    capabilities and the state) and v1 (the migration region's ``device_state``); a
    protocol the device does not serve is None."""
    status: dict[str, Any] = {"v2": None, "v1": None}
    try:
        caps = await get_caps(client)
        state = await get_state(client)
    except ConnectionLost:
        raise
    except ClientError:
        pass
    else:
        names = [flag.name for flag in MigrationCaps if caps & flag and flag.name]
        status["v2"] = {"capabilities": names, "state": state.name}
    for region in regions:
        if isinstance(region, RegionDescription) and MIGRATION_REGION_TYPE in region.caps:
            try:
                bits = await get_device_state(client, region.info.index)
            except ConnectionLost:
                raise
            except ClientError as exc:
                status["v1"] = {"region": region.info.index, "error": str(exc)}
            else:
                status["v1"] = {"region": region.info.index, "state": state_name(bits)}
            break
    return status


def _migration_lines(status: dict[str, Any]) -> list[str]:
    lines = ["Migration:"]
    v2, v1 = status["v2"], status["v1"]
    if v2 is not None:
        caps = "|".join(v2["capabilities"]) or "nothing"
        lines.append(f"  v2 (DEVICE_FEATURE)  {caps}  state {v2['state']}")
    if v1 is not None:
        where = f"region {v1['region']}"
        lines.append(
            f"  v1 ({where})  state {v1['state']}"
            if "state" in v1
            else f"  v1 ({where})  {v1['error']}"
        )
    if v2 is None and v1 is None:
        lines.append("  not supported")
    return lines


async def describe_json(client: Client) -> dict[str, Any]:
    """What :func:`describe` reports, as one JSON-ready object (for scripts)."""
    info = await client.get_info()
    regions = await _regions(client, min(info.num_regions, MAX_REGIONS))
    problems: list[str] = []
    config = await _read_config(client, regions, problems)
    irqs = [
        {"index": index, "name": name, "error": str(irq)}
        if isinstance(irq, ClientError)
        else {
            "index": index,
            "name": name,
            "count": irq.count,
            "flags": _flag_list(_irq_flags(irq.flags)),
        }
        for index, (name, irq) in enumerate(await _irqs(client, min(info.num_irqs, MAX_IRQS)))
    ]
    return {
        "protocol": f"{client.major}.{client.minor}",
        "flags": _flag_list(_device_flags(info.flags)),
        "regions": [_region_json(index, region) for index, region in enumerate(regions)],
        "irqs": irqs,
        "config": None if config is None else pci_ids(config.data),
        "config_error": problems[0] if problems else None,
        "capabilities": []
        if config is None
        else [
            line.strip() for line in capability_lines(config) + extended_capability_lines(config)
        ],
        "migration": await migration_status(client, regions),
    }


def _flag_list(names: str) -> list[str]:
    """``R/W/MMAP`` as a list (``-``: none)."""
    return [] if names == "-" else names.split("/")


def _region_json(index: int, region: RegionDescription | ClientError) -> dict[str, Any]:
    if isinstance(region, ClientError):
        return {"index": index, "name": region_name(index), "error": str(region)}
    info = region.info
    return {
        "index": index,
        "name": region_name(index),
        "size": info.size,
        "flags": _flag_list(_region_flags(info.flags)),
        "offset": info.offset,
        "v1_migration_region": MIGRATION_REGION_TYPE in region.caps,
    }
