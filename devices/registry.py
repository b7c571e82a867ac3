"""Device types by name, built from ``TYPE[,key=value,...]`` specs (``--device``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from devices.api import Device
from devices.e1000 import DEFAULT_MAC, E1000, E1000Options, parse_mac
from devices.lvu_sample import LvuSample
from devices.migration.engine import parse_mig_caps
from devices.testdev import TestDev, TestDevOptions
from devices.virtio_net import DEFAULT_MAC as VIRTIO_NET_MAC
from devices.virtio_net import VirtioNet, VirtioNetOptions


class DeviceSpecError(ValueError):
    """A ``--device`` spec that names no device or carries a bad option."""


_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``16M``, ``1G`` (binary units)."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    suffix = raw[-1:] if raw[-1:] in _SIZE_SUFFIXES else ""
    number = raw[: len(raw) - len(suffix)]
    if not number.isdigit():
        raise DeviceSpecError(f"{text!r} is not a size (examples: 4096, 64K, 16M)")
    return int(number) * _SIZE_SUFFIXES[suffix]


def parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise DeviceSpecError(f"{text!r} is not a number") from None


@dataclass(frozen=True)
class DeviceType:
    name: str
    summary: str
    options: dict[str, str]  # option -> help
    build: Callable[[dict[str, str]], Device]


def _build_testdev(opts: dict[str, str]) -> Device:
    kwargs: dict[str, int] = {}
    if "ram-size" in opts:
        kwargs["ram_size"] = parse_size(opts["ram-size"])
    if "vectors" in opts:
        kwargs["msix_vectors"] = parse_int(opts["vectors"])
    try:
        return TestDev(TestDevOptions(**kwargs))
    except ValueError as exc:
        raise DeviceSpecError(f"testdev: {exc}") from None


def _build_lvu_sample(opts: dict[str, str]) -> Device:
    # Its BAR0 timer sleeps with DeviceContext.sleep. With migration=v1 it is the older
    # (protocol 0.1) sample: BAR1 0x3000, one DMA round, the v1 region's raw segments.
    return LvuSample(legacy_v1=parse_migration_protocols(opts.get("migration", "v2")) == {"v1"})


def _build_e1000(opts: dict[str, str]) -> Device:
    try:
        mac = parse_mac(opts["mac"]) if "mac" in opts else DEFAULT_MAC
        netdev = opts.get("netdev")
        if netdev == "":
            raise ValueError("netdev= needs an id")
        return E1000(E1000Options(mac=mac, netdev=netdev))
    except ValueError as exc:
        raise DeviceSpecError(f"e1000: {exc}") from None


def _build_virtio_net(opts: dict[str, str]) -> Device:
    try:
        mac = parse_mac(opts["mac"]) if "mac" in opts else VIRTIO_NET_MAC
        netdev = opts.get("netdev")
        if netdev == "":
            raise ValueError("netdev= needs an id")
        mtu = parse_int(opts["mtu"]) if "mtu" in opts else 1500
        queue_size = parse_int(opts.get("queue-size", "256"))
        options = VirtioNetOptions(mac=mac, netdev=netdev, mtu=mtu, queue_size=queue_size)
        return VirtioNet(options)
    except ValueError as exc:
        raise DeviceSpecError(f"virtio-net: {exc}") from None


DEVICE_TYPES: dict[str, DeviceType] = {
    "testdev": DeviceType(
        "testdev",
        "test device: scratch registers, doorbell interrupts, DMA copy, RAM BAR, MSI-X",
        {
            "ram-size": "RAM BAR size, migrated with the device (power of two, default 64K)",
            "vectors": "MSI-X vectors (1-32)",
        },
        _build_testdev,
    ),
    "lvu-sample": DeviceType(
        "lvu-sample",
        "libvfio-user's sample server device (dead:beef): BAR0 time_t timer raising INTx and "
        "DMA, 16 KiB sparse-mmap RAM BAR1, raw PRE_COPY/STOP_COPY stream",
        {},
        _build_lvu_sample,
    ),
    "e1000": DeviceType(
        "e1000",
        "Intel 82540EM Gigabit Ethernet (8086:100e): EEPROM, PHY, checksum offload, TSO, "
        "INTx; frames through a --netdev backend",
        {
            "mac": "MAC address (default 52:54:00:12:34:56)",
            "netdev": "id of the --netdev backend carrying its frames",
        },
        _build_e1000,
    ),
    "virtio-net": DeviceType(
        "virtio-net",
        "virtio 1.x network device (1af4:1041, modern PCI transport): MSI-X or INTx, "
        "mergeable buffers, checksum offload, control queue; frames through a --netdev backend",
        {
            "mac": "MAC address (default 52:54:00:12:34:57)",
            "netdev": "id of the --netdev backend carrying its frames",
            "mtu": "MTU the device reports (68-65517, default 1500)",
            "queue-size": "receive/transmit queue size (power of two 2-1024, default 256)",
        },
        _build_virtio_net,
    ),
}

DEFAULT_DEVICE = "testdev"


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.strip().partition(",")
    options: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeviceSpecError(f"device option {item!r} is not key=value")
        if key in options:
            raise DeviceSpecError(f"device option {key!r} given twice")
        options[key.strip()] = value.strip()
    return name, options


#: Options every device type takes.
COMMON_OPTIONS = {
    "mig-caps": "migration capabilities to advertise: stop_copy[+p2p][+pre_copy] "
    "(default stop_copy+pre_copy, as libvfio-user), or none (the device does not migrate)",
    "migration": "migration interface: v2 (DEVICE_FEATURE, default), v1 (the legacy "
    "migration region, for protocol-0.1 clients) or both",
}

MIGRATION_PROTOCOLS = {
    "v1": frozenset({"v1"}),
    "v2": frozenset({"v2"}),
    "both": frozenset({"v1", "v2"}),
}


def parse_migration_protocols(text: str) -> frozenset[str]:
    """``v1`` / ``v2`` / ``both`` -> the set of interfaces served."""
    protocols = MIGRATION_PROTOCOLS.get(text.strip())
    if protocols is None:
        raise DeviceSpecError(f"migration={text!r}: expected v1, v2 or both")
    return protocols


def create_device(spec: str) -> Device:
    name, options = parse_spec(spec)
    device_type = DEVICE_TYPES.get(name)
    if device_type is None:
        known = ", ".join(sorted(DEVICE_TYPES))
        raise DeviceSpecError(f"unknown device type {name!r} (known: {known})")
    accepted = set(device_type.options) | set(COMMON_OPTIONS)
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted))
        raise DeviceSpecError(f"{name}: unknown option(s) {', '.join(unknown)} (valid: {valid})")
    mig_caps = options.pop("mig-caps", None)
    protocols = parse_migration_protocols(options.get("migration", "v2"))
    device = device_type.build(options)
    device.migration_protocols = protocols
    if mig_caps is not None:
        try:
            device.set_migration_caps(parse_mig_caps(mig_caps))
        except ValueError as exc:
            raise DeviceSpecError(f"{name}: mig-caps: {exc}") from None
    return device
