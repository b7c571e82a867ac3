"""``vfio-user-emu``: serve devices, inspect them, print QEMU arguments."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from devices.registry import (
    COMMON_OPTIONS,
    DEFAULT_DEVICE,
    DEVICE_TYPES,
    DeviceSpecError,
    create_device,
)
from protocol.messages import DmaLayout

from . import allocator, bench_rtt, bench_scale
from .bench import add_bench_parser, run_bench
from .client import Client, ClientError
from .info import describe
from .limits import add_limit_options, limits_from_args
from .migration import (
    DATA_FD_CAPABILITIES,
    DEFAULT_PRECOPY_ROUNDS,
    DEFAULT_PRECOPY_THRESHOLD,
    MigrationError,
    migrate,
)
from .migration_v1 import migrate as migrate_v1
from .netdev import NetdevError, netdev_help, setup_netdevs
from .qemu import qemu_args, qemu_command_line
from .serve_config import ServeConfig, run_config
from .server import DeviceServer, ServerError
from .soak import add_soak_parser, run_soak_cli

log = logging.getLogger("vfio_user_emu")


def _device_help() -> str:
    lines = ["device types:"]
    for dtype in DEVICE_TYPES.values():
        lines.append(f"  {dtype.name}: {dtype.summary}")
        for key, text in dtype.options.items():
            lines.append(f"      {key}=...  {text}")
    lines.append("options of every device type:")
    for key, text in COMMON_OPTIONS.items():
        lines.append(f"      {key}=...  {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfio-user-emu",
        description="Userspace PCI device emulator serving the vfio-user protocol.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log connections")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve a device on a UNIX socket",
        epilog=_device_help() + "\n" + netdev_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--device", default=DEFAULT_DEVICE, help="TYPE[,key=value,...]")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-path", help="create the listening socket here (mode 0600)")
    where.add_argument("--fd", type=int, help="use an inherited listening socket")
    # serve --config: many devices in one process (emulator/serve_config.py).
    where.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="serve every [[device]] of this file, each on its own socket, in one process",
    )
    serve.add_argument(
        "--netdev",
        action="append",
        default=[],
        metavar="TYPE,id=ID,...",
        help="a network backend for the device with netdev=ID (repeatable; types below)",
    )
    serve.add_argument("--trace", action="store_true", help="log every message, decoded")
    serve.add_argument("--once", action="store_true", help="exit when the first client leaves")
    serve.add_argument("--print-qemu", action="store_true", help="print the QEMU command line")
    serve.add_argument(
        "--max-data-xfer-size",
        type=int,
        default=1024 * 1024,
        help="largest region/DMA transfer per message (default 1 MiB)",
    )
    add_limit_options(serve)
    serve.add_argument(
        "--no-data-fd",
        action="store_true",
        help="offer no migration data fd (the data_fd extension): data moves in band",
    )
    serve.add_argument(
        "--no-precopy-info",
        action="store_true",
        help="offer no MIG_GET_PRECOPY_INFO (the precopy_info extension): QEMU then "
        "migrates the device with stop-copy only",
    )
    serve.add_argument(
        "--dma-layout",
        choices=["auto", "spec", "qemu"],
        default="auto",
        help="in-band DMA message layout (auto: QEMU's for clients proposing minor 0)",
    )

    info = sub.add_parser("info", help="describe the device behind a socket (like lspci -vv)")
    info.add_argument("--socket-path", required=True)

    qemu = sub.add_parser("qemu-args", help="print QEMU arguments that attach to our sockets")
    qemu.add_argument("--socket-path", action="append", required=True)
    qemu.add_argument("--memory", default="512M", help="guest RAM (memfd, share=on)")

    mig = sub.add_parser(
        "migrate",
        help="migrate a device's state from one server to another (VFIO migration v2)",
        description="Move the state of the device behind --from to the device behind --to: "
        "on success the source is stopped (STOP) and the destination runs (RUNNING). "
        "Device state only: the command has no guest memory (from Python, "
        "emulator.migration.migrate(guest_memory=...) migrates that too).",
    )
    mig.add_argument("--from", dest="source", required=True, metavar="SRC_SOCKET")
    mig.add_argument("--to", dest="destination", required=True, metavar="DST_SOCKET")
    mig.add_argument("--mode", choices=["stop-copy", "pre-copy"], default="stop-copy")
    mig.add_argument(
        "--protocol",
        choices=["v2", "v1"],
        default="v2",
        help="v2: DEVICE_FEATURE and MIG_DATA; v1: the legacy migration region (devices "
        "served with migration=v1 or both; --transport/--chunk/--precopy-* do not apply)",
    )
    mig.add_argument(
        "--transport",
        choices=["inband", "fd"],
        default="inband",
        help="STOP_COPY data in MIG_DATA messages, or over data fds passed by the servers",
    )
    mig.add_argument("--chunk", type=int, help="bytes per MIG_DATA_READ/WRITE (default: auto)")
    mig.add_argument(
        "--precopy-rounds", type=int, default=DEFAULT_PRECOPY_ROUNDS, help="at most this many"
    )
    mig.add_argument(
        "--precopy-threshold",
        type=int,
        default=DEFAULT_PRECOPY_THRESHOLD,
        help="stop pre-copy once a round moves at most this many bytes",
    )
    benchmarks = add_bench_parser(sub)
    # bench rtt / bench scale (emulator/bench_rtt.py, emulator/bench_scale.py)
    rtt = benchmarks.add_parser(
        "rtt", help="per-message round trip vs a Python echo floor (scripts/bench_rtt.py)"
    )
    bench_rtt.add_arguments(rtt)
    rtt.set_defaults(run_benchmark=bench_rtt.run_from_args)
    scale = benchmarks.add_parser(
        "scale", help="many devices in one process or many (scripts/bench_scale.py)"
    )
    bench_scale.add_arguments(scale)
    scale.set_defaults(run_benchmark=bench_scale.run_from_args)
    add_soak_parser(sub)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    if args.config is not None:  # serve --config (emulator/serve_config.py)
        if args.netdev or args.device != DEFAULT_DEVICE:
            print("vfio-user-emu: --config replaces --device and --netdev", file=sys.stderr)
            return 2
        defaults = ServeConfig(
            devices=(),
            max_data_xfer_size=args.max_data_xfer_size,
            max_dma_maps=args.max_dma_maps,
            dma_layout=None if args.dma_layout == "auto" else DmaLayout(args.dma_layout),
            trace=args.trace,
        )
        return await run_config(args.config, defaults)
    try:
        device = create_device(args.device)
        layout = None if args.dma_layout == "auto" else DmaLayout(args.dma_layout)
        capabilities, limits = limits_from_args(args, layout)
        capabilities = dataclasses.replace(
            capabilities,
            migration_data_fd=not args.no_data_fd,
            migration_precopy_info=not args.no_precopy_info,
        )
        netdevs = setup_netdevs(args.netdev, [device])
    except (DeviceSpecError, NetdevError, ValueError) as exc:
        print(f"vfio-user-emu: {exc}", file=sys.stderr)
        return 2
    try:
        server = DeviceServer(
            device,
            socket_path=args.socket_path,
            listen_fd=args.fd,
            capabilities=capabilities,
            limits=limits,
            trace=args.trace,
            once=args.once,
            netdevs=netdevs,
        )
    except ServerError as exc:
        for netdev in netdevs:
            netdev.close()
        print(f"vfio-user-emu: {exc}", file=sys.stderr)
        return 2
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_server(*, task_status: trio.TaskStatus[None]) -> None:
                await server.serve(task_status=task_status)
                nursery.cancel_scope.cancel()  # --once: the client left

            try:
                await nursery.start(run_server)
            except (ServerError, OSError) as exc:
                for netdev in netdevs:
                    netdev.close()
                print(f"vfio-user-emu: {exc}", file=sys.stderr)
                return 1
            where = args.socket_path or f"fd {args.fd}"
            print(f"serving {device.type_name} on {where}", flush=True)
            for netdev in netdevs:
                print(netdev.describe(), flush=True)
            if args.print_qemu and args.socket_path:
                print("attach a guest with:", flush=True)
                print(
                    f"  {qemu_command_line([args.socket_path])} -kernel ... -initrd ...", flush=True
                )
                print("stop with Ctrl-C (or SIGTERM)", flush=True)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"vfio-user-emu: migrate: {message}", file=sys.stderr)
        return 1

    async with AsyncExitStack() as stack:
        clients: list[Client] = []
        for side, path in (("source", args.source), ("destination", args.destination)):
            try:
                caps = DATA_FD_CAPABILITIES if args.transport == "fd" else None
                connection = Client.connect(path, capabilities=caps)
                clients.append(await stack.enter_async_context(connection))
            except (OSError, ClientError) as exc:
                return fail(f"cannot connect to the {side} {path}: {exc}")
        try:
            if args.protocol == "v1":
                legacy = await migrate_v1(clients[0], clients[1], mode=args.mode)
                return _print_migrated(args, legacy.lines())
            report = await migrate(
                clients[0],
                clients[1],
                mode=args.mode,
                chunk=args.chunk,
                precopy_rounds=args.precopy_rounds,
                precopy_threshold=args.precopy_threshold,
                transport=args.transport,
            )
        except (MigrationError, ValueError) as exc:
            return fail(str(exc))
    return _print_migrated(args, report.lines())


def _print_migrated(args: argparse.Namespace, lines: list[str]) -> int:
    print(f"migrated {args.source} -> {args.destination}")
    for line in lines:
        print(line)
    return 0


async def _info(args: argparse.Namespace) -> int:
    try:
        async with Client.connect(args.socket_path) as client:
            print(await describe(client))
    except (OSError, ClientError) as exc:
        print(f"vfio-user-emu: {args.socket_path}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or getattr(args, "trace", False) else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if args.command in ("serve", "migrate", "bench"):
        # Bulk data moves through messages: reuse freed buffers (process-wide malloc
        # tuning, more RSS; see emulator/allocator.py), for these commands only.
        allocator.keep_large_buffers()
    if args.command == "serve":
        return trio.run(_serve, args)
    if args.command == "info":
        return trio.run(_info, args)
    if args.command == "migrate":
        return trio.run(_migrate, args)
    if args.command == "bench":
        runner = getattr(args, "run_benchmark", None)
        return int(runner(args)) if runner is not None else run_bench(args)
    if args.command == "soak":
        return run_soak_cli(args)
    if args.command == "qemu-args":
        print(" ".join(qemu_args(args.socket_path, args.memory)))
        return 0
    raise AssertionError(args.command)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
