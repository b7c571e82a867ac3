"""``vfio-user-emu``: serve devices, inspect them, print QEMU arguments."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import trio

from devices.registry import (
    COMMON_OPTIONS,
    DEFAULT_DEVICE,
    DEVICE_TYPES,
    DeviceSpecError,
    create_device,
)
from emulator import allocator
from emulator.cli_common import (
    PROG,
    HelpFormatter,
    add_verbose,
    connect_failure,
    error,
    interrupted,
    positive_int_arg,
    positive_size_arg,
    quiet_broken_pipe,
    size_arg,
    socket_problem,
)
from emulator.client import Client, ClientError
from emulator.client.info import describe, describe_json
from emulator.client.migrate import (
    DATA_FD_CAPABILITIES,
    DEFAULT_PRECOPY_ROUNDS,
    DEFAULT_PRECOPY_THRESHOLD,
    MigrationError,
    migrate,
)
from emulator.client.migrate_v1 import migrate as migrate_v1
from emulator.client.qemu_args import guest_hint, memory_arg, qemu_args
from emulator.limits import add_limit_options, limits_from_args
from emulator.netdev import NetdevError, netdev_help, setup_netdevs
from emulator.serve_config import ServeConfig, run_config
from emulator.server import DeviceServer, ServerError
from emulator.tools import bench_nic, bench_rtt, bench_scale
from emulator.tools.bench_migration import add_bench_parser, run_bench
from emulator.tools.qemu_soak import add_qemu_soak_arguments, run_qemu_soak_cli
from emulator.tools.soak import add_soak_parser, run_soak_cli
from protocol.messages import DmaLayout

log = logging.getLogger("vfio_user_emu")


def _device_help(only: str | None = None) -> str:
    """Every device type with its options (``--device help``), or one type's
    (``--device TYPE,help``)."""
    lines = ["device types:" if only is None else f"{only} options:"]
    for dtype in DEVICE_TYPES.values():
        if only not in (None, dtype.name):
            continue
        lines.append(f"  {dtype.name}: {dtype.summary}")
        for key, text in dtype.options.items():
            lines.append(f"      {key}=...  {text}")
    lines.append("options of every device type:")
    for key, text in COMMON_OPTIONS.items():
        lines.append(f"      {key}=...  {text}")
    return "\n".join(lines)


def _device_help_request(spec: str) -> str | None:
    """What ``--device help`` / ``--device TYPE,help`` asks for: "" for all types, the
    type's name, or None (a device spec to serve)."""
    parts = [part.strip() for part in spec.split(",")]
    if parts == ["help"]:
        return ""
    if len(parts) >= 2 and "help" in parts[1:]:
        return parts[0]
    return None


def _version() -> str:
    try:
        return metadata.version("vfio-user-emu")
    except metadata.PackageNotFoundError:  # run from a tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Userspace PCI device emulator serving the vfio-user protocol.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log connections")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_info(sub)
    _add_qemu_args(sub)
    _add_migrate(sub)
    _add_benchmarks(sub)
    soak = add_soak_parser(sub)
    add_qemu_soak_arguments(soak)
    add_verbose(soak)
    return parser


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a device on a UNIX socket",
        epilog=_device_help() + "\n" + netdev_help(),
        formatter_class=HelpFormatter,
    )
    serve.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help="TYPE[,key=value,...] (types and options below; `--device help` lists them, "
        "`--device TYPE,help` one type's)",
    )
    # One of these is required, unless --device asks for help (checked in main()).
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket-path", help="create the listening socket here (mode 0600)")
    where.add_argument("--fd", type=int, help="use an inherited listening socket (systemd: --fd=3)")
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
    serve.add_argument(
        "--print-qemu", action="store_true", help="print a QEMU command line that attaches"
    )
    serve.add_argument(
        "--max-data-xfer-size",
        type=positive_size_arg,
        default=1024 * 1024,
        metavar="SIZE",
        help="largest region/DMA transfer per message (default 1M)",
    )
    add_limit_options(serve)
    serve.set_defaults(subparser=serve)
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
    add_verbose(serve)


def _add_info(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    info = sub.add_parser(
        "info",
        help="describe the device behind a socket (like lspci -vv)",
        formatter_class=HelpFormatter,
    )
    info.add_argument("--socket-path", required=True, help="the server's socket")
    info.add_argument("--json", action="store_true", help="print one JSON object instead")
    add_verbose(info)


def _add_qemu_args(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    qemu = sub.add_parser(
        "qemu-args",
        help="print QEMU arguments that attach to our sockets",
        description="Print the QEMU arguments (shell-quoted, ready to paste) that attach a "
        "guest to the servers on these sockets.",
        formatter_class=HelpFormatter,
    )
    qemu.add_argument(
        "--socket-path", action="append", required=True, help="a server's socket (repeatable)"
    )
    qemu.add_argument(
        "--memory", type=memory_arg, default="512M", help="guest RAM (memfd, share=on)"
    )
    qemu.add_argument(
        "--lines", action="store_true", help="one argument per line, unquoted (for scripts)"
    )
    qemu.add_argument(
        "--no-check", action="store_true", help="do not check that a server listens there"
    )
    add_verbose(qemu)


def _add_migrate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mig = sub.add_parser(
        "migrate",
        help="migrate a device's state from one server to another (migration v2 or v1)",
        description="Move the state of the device behind --from to the device behind --to: "
        "on success the source is stopped (STOP) and the destination runs (RUNNING). "
        "Device state only: the command has no guest memory (from Python, "
        "emulator.client.migrate.migrate(guest_memory=...) migrates that too).",
        formatter_class=HelpFormatter,
    )
    mig.add_argument(
        "--from", dest="source", required=True, metavar="SRC_SOCKET", help="the source's socket"
    )
    mig.add_argument(
        "--to",
        dest="destination",
        required=True,
        metavar="DST_SOCKET",
        help="the destination's socket (another server, serving the same --device)",
    )
    mig.add_argument(
        "--mode",
        choices=["stop-copy", "pre-copy"],
        default="stop-copy",
        help="pre-copy: move data while the source still runs, then stop it",
    )
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
    mig.add_argument(
        "--chunk",
        type=positive_size_arg,
        metavar="SIZE",
        help="bytes per MIG_DATA_READ/WRITE (default: the servers' transfer size, at most "
        "the state's size)",
    )
    mig.add_argument(
        "--precopy-rounds",
        type=positive_int_arg,
        default=DEFAULT_PRECOPY_ROUNDS,
        metavar="N",
        help="at most this many pre-copy rounds",
    )
    mig.add_argument(
        "--precopy-threshold",
        type=size_arg,
        default=DEFAULT_PRECOPY_THRESHOLD,
        metavar="SIZE",
        help="stop pre-copy once a round moves at most this many bytes",
    )
    mig.add_argument(
        "--no-device-check",
        action="store_true",
        help="skip comparing the devices first (the destination then refuses a state it "
        "cannot take only after the source was stopped)",
    )
    mig.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_verbose(mig)


def _add_benchmarks(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    benchmarks = add_bench_parser(sub)
    add_verbose(benchmarks.choices["migration"])
    # bench rtt / bench scale (emulator/tools/bench_rtt.py, emulator/tools/bench_scale.py)
    rtt = benchmarks.add_parser(
        "rtt",
        help="per-message round trip vs a Python echo floor (scripts/bench_rtt.py)",
        description="Round trip of single messages (region read/write, DMA, interrupts) "
        "against a Python echo server on the same socket: the floor (a benchmark, not a "
        "test).",
        formatter_class=HelpFormatter,
    )
    bench_rtt.add_arguments(rtt)
    rtt.set_defaults(run_benchmark=bench_rtt.run_from_args)
    add_verbose(rtt)
    scale = benchmarks.add_parser(
        "scale",
        help="many devices in one process or many (scripts/bench_scale.py)",
        description="Message rate of many devices served by one process against one "
        "process per device (a benchmark, not a test).",
        formatter_class=HelpFormatter,
    )
    bench_scale.add_arguments(scale)
    scale.set_defaults(run_benchmark=bench_scale.run_from_args)
    add_verbose(scale)
    nic = benchmarks.add_parser(
        "nic",
        help="our NICs against QEMU's own: two guests each, ping and bulk (needs QEMU)",
        description="Two TCG guests per pair: ours against QEMU's in-process e1000 and "
        "virtio-net-pci, ping and 16 MiB over TCP side by side with the ratios, one run (a "
        "benchmark, not a test; emulator/tools/bench_nic.py).",
        formatter_class=HelpFormatter,
    )
    bench_nic.add_arguments(nic)
    nic.set_defaults(run_benchmark=bench_nic.run_from_args)
    add_verbose(nic)


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
        return await run_config(args.config, defaults, print_qemu=args.print_qemu)
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
                for line in guest_hint([args.socket_path]):
                    print(line, flush=True)
                print("stop with Ctrl-C (or SIGTERM)", flush=True)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
    return 0


async def run_until_signal(work: Callable[[trio.CancelScope], Awaitable[int]]) -> int:
    """Run ``work``, which puts what a signal may interrupt in the scope it is given:
    SIGINT/SIGTERM cancel that scope (only: connections opened outside it keep working,
    e.g. for a migration's recovery). Returns ``work``'s status, or -signal when the
    signal interrupted it (one that came after the scope's work was done changes nothing)."""
    received: list[int] = []
    scope = trio.CancelScope()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    received.append(signum)
                    scope.cancel()
                    return

            nursery.start_soon(watch)
            status = await work(scope)
            nursery.cancel_scope.cancel()
    return -received[0] if scope.cancelled_caught else status


def _same_socket(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return os.path.realpath(first) == os.path.realpath(second)


#: A migration the destination refused while loading the state (v2, then v1 stage names).
_LOAD_STAGES = ("loading the state into the destination", "destination RESUMING -> RUNNING")


def _migration_failure(exc: MigrationError, protocol: str) -> str:
    """The error's text, with the next step where one is known."""
    text = str(exc)
    if protocol == "v2" and "supports no migration" in text:
        text += (
            " (a device served with migration=v1 migrates with --protocol v1; "
            f"`{PROG} serve --device TYPE,help` lists the migration options)"
        )
    if exc.stage.startswith(_LOAD_STAGES):
        # The reason in the text is the destination's own (the error_detail extension).
        text += "; the destination refused the state (serve it with --trace for the exchange)"
    return text


async def _migrate(args: argparse.Namespace) -> int:
    if _same_socket(args.source, args.destination):
        error(
            "migrate",
            f"--from and --to are the same socket {args.source}: migrate between two servers "
            f"(start the destination with `{PROG} serve --socket-path OTHER.sock` and the "
            "source's --device)",
        )
        return 2
    notes: list[str] = []
    output: list[str] = []
    status = await run_until_signal(
        functools.partial(_migrate_connected, args, output=output, notes=notes)
    )
    if status < 0:
        return interrupted("migrate", -status, "; ".join(notes))
    # Printed here, outside the nursery: a closed stdout raises a plain BrokenPipeError.
    for line in output:
        print(line)
    return status


async def _migrate_connected(
    args: argparse.Namespace,
    interruptible: trio.CancelScope,
    *,
    output: list[str],
    notes: list[str],
) -> int:
    """Connect, then migrate within ``interruptible``; the report's lines go to
    ``output``, what recovery did after an interruption to ``notes``."""

    def fail(message: str) -> int:
        error("migrate", message)
        return 1

    async with AsyncExitStack() as stack:
        clients: list[Client] = []
        for side, path in (("source", args.source), ("destination", args.destination)):
            try:
                caps = DATA_FD_CAPABILITIES if args.transport == "fd" else None
                connection = Client.connect(path, capabilities=caps)
                clients.append(await stack.enter_async_context(connection))
            except (OSError, ClientError) as exc:
                return fail(f"cannot connect to the {side}: {connect_failure(path, exc)}")
        check = not args.no_device_check
        try:
            with interruptible:
                report, lines = await _run_migration(args, clients, check, notes)
        except MigrationError as exc:
            return fail(_migration_failure(exc, args.protocol))
        except ValueError as exc:
            return fail(str(exc))
    if interruptible.cancelled_caught:
        return 1  # run_until_signal reports the signal
    if args.json:
        report = {"source": args.source, "destination": args.destination, **report}
        output.append(json.dumps(report, indent=2))
    else:
        output += [f"migrated {args.source} -> {args.destination}", *lines]
    return 0


async def _run_migration(
    args: argparse.Namespace, clients: list[Client], check: bool, notes: list[str]
) -> tuple[dict[str, object], list[str]]:
    """The migration itself: its report (for --json) and its lines."""
    try:
        if args.protocol == "v1":
            legacy = await migrate_v1(clients[0], clients[1], mode=args.mode, check_devices=check)
            return {"protocol": "v1", **asdict(legacy)}, legacy.lines()
        result = await migrate(
            clients[0],
            clients[1],
            mode=args.mode,
            chunk=args.chunk,
            precopy_rounds=args.precopy_rounds,
            precopy_threshold=args.precopy_threshold,
            transport=args.transport,
            check_devices=check,
        )
    except trio.Cancelled as exc:  # recovery has run: its note says what it did
        notes.extend(getattr(exc, "__notes__", []))
        raise
    return {"protocol": "v2", "transport": args.transport, **asdict(result)}, result.lines()


async def _info(args: argparse.Namespace) -> int:
    """The report, or a one-line error; a signal (a server that never answers) ends it
    with one line too."""
    report: list[str] = []

    async def work(interruptible: trio.CancelScope) -> int:
        with interruptible:
            try:
                async with Client.connect(args.socket_path) as client:
                    if args.json:
                        report.append(json.dumps(await describe_json(client), indent=2) + "\n")
                    else:
                        report.append(await describe(client))
            except (OSError, ClientError) as exc:
                error("info", connect_failure(args.socket_path, exc))
                return 1
        return 0

    status = await run_until_signal(work)
    if status < 0:
        return interrupted("info", -status)
    print("".join(report), end="")
    return status


def _qemu_args(args: argparse.Namespace) -> int:
    if not args.no_check:
        for path in args.socket_path:
            problem = socket_problem(path)
            if problem is not None:
                error("qemu-args", f"{problem} (--no-check prints the arguments anyway)")
                return 1
    words = qemu_args(args.socket_path, args.memory)
    print("\n".join(words) if args.lines else shlex.join(words))
    return 0


def _device_help_only(args: argparse.Namespace) -> int | None:
    """``serve --device help`` / ``--device TYPE,help``: print and exit (None: serve)."""
    wanted = _device_help_request(args.device)
    if wanted is None:
        return None
    if wanted and wanted not in DEVICE_TYPES:
        known = ", ".join(DEVICE_TYPES)
        error("serve", f"unknown device type {wanted!r} (known: {known})")
        return 2
    print(_device_help(wanted or None))
    return 0


class _Terminated(Exception):
    """SIGTERM outside a command's own signal handling (trio commands and the soak take it
    themselves while they run): ends the command like Ctrl-C does, with its cleanup."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        status = _run(args)
        sys.stdout.flush()  # here, where a closed pipe is still ours to handle
    except BrokenPipeError:
        return quiet_broken_pipe()
    except KeyboardInterrupt:  # before or after a command's own signal handling
        return interrupted(args.command, signal.SIGINT)
    except _Terminated:
        return interrupted(args.command, signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return status


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        helped = _device_help_only(args)
        if helped is not None:
            return helped
        if args.socket_path is None and args.fd is None and args.config is None:
            args.subparser.error("one of the arguments --socket-path --fd --config is required")
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
        return run_qemu_soak_cli(args) if args.qemu else run_soak_cli(args)
    if args.command == "qemu-args":
        return _qemu_args(args)
    raise AssertionError(args.command)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
