"""Can the destination device take the source device's state? Asked before a migration
changes anything, so that a destination that would refuse the state (another device type,
another RAM size, another vector count) is found while the source still runs.

A destination refuses such a state only when it loads it (RESUMING -> STOP), after the
source was stopped, and its error reply carries an errno only (EINVAL): the reason is in
the destination server's log. What makes two devices' states exchangeable is visible from
outside, though: the PCI identity in config space, the size of every standard region
(BARs, ROM, config space, VGA) and the count of every interrupt index. Device-specific
regions (index 9 and up, e.g. the v1 migration region of ``migration=both``) are left out:
they do not shape the device state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from emulator.client.core import Client
from emulator.client.requests import ClientError
from emulator.transport import close_fds
from protocol.constants import PCI_NUM_REGIONS, IrqIndex, PciRegion

#: The standard PCI regions (BAR0-5, ROM, config space, VGA).
PCI_REGIONS = PCI_NUM_REGIONS
#: Config space bytes read: the type-0 header up to the subsystem IDs.
CONFIG_HEADER = 0x30


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


def pci_ids(config: bytes) -> dict[str, str]:
    """The identity fields of a config-space header, as lspci shows them."""
    vendor, device = struct.unpack_from("<HH", config, 0x00)
    (revision_class,) = struct.unpack_from("<I", config, 0x08)
    subsystem_vendor, subsystem = struct.unpack_from("<HH", config, 0x2C)
    return {
        "vendor:device": f"{vendor:04x}:{device:04x}",
        "class": f"{revision_class >> 8:06x}",
        "revision": f"{revision_class & 0xFF:02x}",
        "subsystem": f"{subsystem_vendor:04x}:{subsystem:04x}",
    }


@dataclass(frozen=True, slots=True)
class Identity:
    """What must match between a migration's source and destination devices."""

    ids: dict[str, str]
    regions: dict[str, int]
    irqs: dict[str, int]


async def identity(client: Client) -> Identity:
    info = await client.get_info()
    regions: dict[str, int] = {}
    for index in range(min(info.num_regions, PCI_REGIONS)):
        desc = await client.get_region_info(index)
        if desc.fd is not None:
            close_fds([desc.fd])
        regions[region_name(index)] = desc.info.size
    ids: dict[str, str] = {}
    if regions.get(region_name(PciRegion.CONFIG), 0) >= CONFIG_HEADER:
        ids = pci_ids(await client.region_read(PciRegion.CONFIG, 0, CONFIG_HEADER))
    irqs: dict[str, int] = {}
    for index in range(min(info.num_irqs, len(IrqIndex))):
        irqs[IRQ_NAMES[IrqIndex(index)]] = (await client.get_irq_info(index)).count
    return Identity(ids, regions, irqs)


def differences(source: Identity, destination: Identity) -> list[str]:
    """Each way the destination differs from the source, in words (identity, then regions
    in index order, then interrupt indexes)."""
    ours_id, theirs_id = source.ids.get("vendor:device"), destination.ids.get("vendor:device")
    if ours_id != theirs_id:  # another device altogether: the rest says nothing more
        return [f"vendor:device {ours_id} on the source, {theirs_id} on the destination"]
    found = []
    for name in dict.fromkeys([*source.ids, *destination.ids]):
        ours, theirs = source.ids.get(name, "none"), destination.ids.get(name, "none")
        if ours != theirs:
            found.append(f"{name} {ours} on the source, {theirs} on the destination")
    for name in dict.fromkeys([*source.regions, *destination.regions]):
        ours_size, theirs_size = source.regions.get(name, 0), destination.regions.get(name, 0)
        if ours_size != theirs_size:
            found.append(
                f"{name} {human_size(ours_size)} on the source, "
                f"{human_size(theirs_size)} on the destination"
            )
    for name in dict.fromkeys([*source.irqs, *destination.irqs]):
        ours_count, theirs_count = source.irqs.get(name, 0), destination.irqs.get(name, 0)
        if ours_count != theirs_count:
            found.append(
                f"{name} vectors {ours_count} on the source, {theirs_count} on the destination"
            )
    return found


async def incompatibility(source: Client, destination: Client) -> str | None:
    """Why the destination cannot take the source's state, or None when it can (as far as
    can be seen from outside; a device that answers none of this is not judged)."""
    try:
        ours, theirs = await identity(source), await identity(destination)
    except ClientError:
        return None
    found = differences(ours, theirs)
    if not found:
        return None
    return (
        "the destination cannot take this device's state: "
        + "; ".join(found)
        + " (serve the destination with the source's --device options)"
    )
