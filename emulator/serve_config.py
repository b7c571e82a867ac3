"""``vfio-user-emu serve --config FILE.toml``: many devices in one process.

Each device gets its own listening socket and :class:`~emulator.server.DeviceServer` (one
client per device, as always); all of them, and their network backends, run in one trio
nursery. The file::

    # optional; the command-line values are the defaults
    max_data_xfer_size = 1048576
    max_dma_maps = 65535
    dma_layout = "auto"          # auto | spec | qemu
    trace = false
    netdevs = ["dgram,id=n0,local=/tmp/n0.sock,remote=/tmp/peer0.sock"]   # as --netdev

    [[device]]
    socket = "/tmp/nic0.sock"    # required, one per device
    device = "e1000,netdev=n0"   # as --device (default testdev)
    name = "nic0"                # optional, names the device in logs
    trace = false                # optional, this device only

Everything is checked before anything is created on disk: unknown keys, wrong types,
duplicate sockets or names, bad device specs and netdev wiring give one clear message.
"""

from __future__ import annotations

import signal
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from devices.registry import DEFAULT_DEVICE, DeviceSpecError, create_device
from emulator.client.qemu_args import guest_hint
from emulator.limits import Limits
from emulator.netdev import NetBackend, NetdevError, setup_netdevs
from emulator.server import DeviceServer, ServerError
from protocol.messages import DmaLayout
from protocol.version import ServerCapabilities

TOP_KEYS = {
    "max_data_xfer_size": int,
    "max_dma_maps": int,
    "dma_layout": str,
    "trace": bool,
    "netdevs": list,
    "device": list,
}
DEVICE_KEYS = {"socket": str, "device": str, "name": str, "trace": bool}
DMA_LAYOUTS = ("auto", "spec", "qemu")


class ConfigError(Exception):
    """A configuration file that cannot be served; the message says where and why."""


@dataclass(frozen=True)
class DeviceEntry:
    socket: Path
    spec: str
    name: str | None = None
    trace: bool = False


@dataclass(frozen=True)
class ServeConfig:
    devices: tuple[DeviceEntry, ...]
    netdevs: tuple[str, ...] = ()
    max_data_xfer_size: int = 1024 * 1024
    max_dma_maps: int = 65535
    dma_layout: DmaLayout | None = None
    trace: bool = False


def _check_keys(table: Mapping[str, Any], known: Mapping[str, type], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    for key, kind in known.items():
        value = table.get(key)
        # bool is an int in Python; a size given as true is still a mistake.
        if value is not None and (
            not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        ):
            raise ConfigError(f"{where}: {key} must be {kind.__name__}, not {type(value).__name__}")


def parse_config(data: Mapping[str, Any], source: str, defaults: ServeConfig) -> ServeConfig:
    """Check a parsed TOML document; ``defaults`` supplies the values it leaves out."""
    _check_keys(data, TOP_KEYS, source)
    layout_text = data.get("dma_layout", "auto" if defaults.dma_layout is None else None)
    layout = defaults.dma_layout
    if layout_text is not None:
        if layout_text not in DMA_LAYOUTS:
            raise ConfigError(f"{source}: dma_layout must be one of {', '.join(DMA_LAYOUTS)}")
        layout = None if layout_text == "auto" else DmaLayout(layout_text)
    netdevs = data.get("netdevs", list(defaults.netdevs))
    if not all(isinstance(spec, str) for spec in netdevs):
        raise ConfigError(f"{source}: netdevs must be a list of strings like --netdev")
    tables = data.get("device", [])
    if not tables:
        raise ConfigError(f"{source}: no [[device]] tables: nothing to serve")
    devices = []
    sockets: dict[Path, int] = {}
    names: dict[str, int] = {}
    for number, table in enumerate(tables, 1):
        where = f"{source}: device #{number}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table ([[device]])")
        _check_keys(table, DEVICE_KEYS, where)
        if "socket" not in table:
            raise ConfigError(f"{where}: socket = PATH is required")
        socket = Path(table["socket"])
        key = socket.absolute()
        if key in sockets:
            raise ConfigError(f"{where}: socket {socket} is also device #{sockets[key]}'s")
        sockets[key] = number
        name = table.get("name")
        if name is not None:
            if name in names:
                raise ConfigError(f"{where}: name {name!r} is also device #{names[name]}'s")
            names[name] = number
        devices.append(
            DeviceEntry(
                socket, table.get("device", DEFAULT_DEVICE), name, table.get("trace", False)
            )
        )
    return ServeConfig(
        devices=tuple(devices),
        netdevs=tuple(netdevs),
        max_data_xfer_size=data.get("max_data_xfer_size", defaults.max_data_xfer_size),
        max_dma_maps=data.get("max_dma_maps", defaults.max_dma_maps),
        dma_layout=layout,
        trace=data.get("trace", defaults.trace),
    )


def load_config(path: Path, defaults: ServeConfig | None = None) -> ServeConfig:
    defaults = defaults or ServeConfig(devices=())
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path), defaults)


def build_servers(config: ServeConfig) -> tuple[list[DeviceServer], list[NetBackend]]:
    """Create every device, wire and open the netdevs, and a server per device (sockets
    are created later, by ``serve``)."""
    try:
        capabilities = ServerCapabilities(
            max_data_xfer_size=config.max_data_xfer_size, max_dma_maps=config.max_dma_maps
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    devices = []
    for number, entry in enumerate(config.devices, 1):
        try:
            devices.append(create_device(entry.spec))
        except (DeviceSpecError, ValueError) as exc:
            raise ConfigError(f"device #{number} ({entry.socket}): {exc}") from None
    try:
        netdevs = setup_netdevs(config.netdevs, devices)
    except (NetdevError, ValueError, OSError) as exc:
        raise ConfigError(f"netdevs: {exc}") from None
    limits = Limits(
        max_message_size=capabilities.max_data_xfer_size + 4096,
        max_dma_maps=capabilities.max_dma_maps,
        dma_layout=config.dma_layout,
    )
    servers = []
    for number, (entry, device) in enumerate(zip(config.devices, devices, strict=True), 1):
        servers.append(
            DeviceServer(
                device,
                socket_path=entry.socket,
                capabilities=capabilities,
                limits=limits,
                trace=config.trace or entry.trace,
                name=entry.name or f"{device.type_name}#{number}",
                # Each backend runs in the nursery of the server of the device it feeds.
                netdevs=[n for n in netdevs if getattr(n, "device", None) is device],
            )
        )
    return servers, netdevs


async def serve_all(
    servers: list[DeviceServer], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve every device until cancelled; started once all sockets listen."""
    async with trio.open_nursery() as nursery:
        for server in servers:
            await nursery.start(server.serve)
        task_status.started()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


async def run_config(path: Path, defaults: ServeConfig, *, print_qemu: bool = False) -> int:
    """The ``serve --config`` command: 0 on a clean stop, 1/2 with a message on errors.
    ``print_qemu``: also print a QEMU command line attaching one guest to every device."""
    try:
        servers, netdevs = build_servers(load_config(path, defaults))
    except ConfigError as exc:
        print(f"vfio-user-emu: {exc}", file=sys.stderr)
        return 2
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            failures: list[str] = []
            try:
                await nursery.start(serve_all, servers)
            except* (ServerError, OSError) as group:
                failures = [str(exc) for exc in _leaves(group)]
            if failures:
                for netdev in netdevs:
                    netdev.close()
                for failure in failures:
                    print(f"vfio-user-emu: {failure}", file=sys.stderr)
                return 1
            for server in servers:
                print(f"serving {server.name} on {server.socket_path}", flush=True)
            for netdev in netdevs:
                print(netdev.describe(), flush=True)
            if print_qemu:
                paths = [str(server.socket_path) for server in servers if server.socket_path]
                for line in guest_hint(paths):
                    print(line, flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    return 0
