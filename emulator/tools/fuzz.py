"""Fuzzing the live server: message bytes and fds into real sessions over real sockets.

A *target* serves devices on UNIX sockets: a child process (``ProcessTarget``, the default:
a crash or a hang cannot take the fuzzer with it) or a thread of this process
(``ThreadTarget``, so that atheris sees the server's coverage). Two kinds of case:

* **structure-aware**: a valid VERSION (with varied capabilities), a random set-up (DMA maps
  with and without fds, eventfds, bus mastering, a walk through migration states), then
  messages with valid headers for every command 1-18 (and unknown ones) whose payloads are
  built from valid templates and mutated, with random fds attached;
* **raw**: random bytes (sometimes after a valid VERSION, sometimes made of glued header
  fragments) with fds on random chunks, then end of stream;
* **resume**: the device's own STOP_COPY stream with mutated, dropped, repeated or renamed
  sections (checksums recomputed, so the device's validation is what must refuse it) written
  in RESUMING; a refused stream must leave the device in RESUMING with config space as it
  was.

Invariants, checked per message and per case:

* a command gets exactly one reply with its msg_id and command, well formed (an error reply
  has an errno and no payload); a NO_REPLY command or a reply from us gets nothing (checked
  with a probe); the connection is closed only for unrecoverable framing (size < 16, an
  unknown message type, too many fds, a refused VERSION);
* in raw cases everything the server sends parses as whole, well-formed messages, and the
  server closes the connection once we end the stream;
* after each case a fresh client is served on the same socket, a witness device on another
  socket of the same server keeps answering, the server holds exactly the fds it held
  before the case, logged no traceback, and is still alive.

``python -m emulator.tools.fuzz --seconds N`` runs it (``make fuzz FUZZ_SECONDS=N``); with atheris
installed (``pip install atheris``) ``--engine atheris`` lets libFuzzer drive the choices
with coverage feedback. :func:`fuzz` is the entry point for tests (a bounded pass).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import importlib.util
import json
import logging
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from devices import testdev as td
from devices.migration.stream import StreamError, decode, encode, parse_header
from devices.registry import create_device
from emulator.cli import build_parser
from emulator.limits import limits_from_args
from emulator.server import DeviceServer
from emulator.tools.processes import stop_process
from protocol.constants import (
    FEATURE_GET,
    FEATURE_PROBE,
    FEATURE_SET,
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAGS_TYPE_MASK,
    HEADER_SIZE,
    Command,
    DeviceFeature,
    DmaUnmapFlags,
    IrqSetFlags,
    MigState,
    MsgType,
    PciRegion,
)
from protocol.header import HEADER, Header, pack_message, pack_reply
from protocol.messages import MigDeviceState

log = logging.getLogger("vfio_user_emu.fuzz")

#: Devices fuzzed (one socket each) and the witness that must keep answering meanwhile.
FUZZED_DEVICES = ("testdev", "e1000", "lvu-sample", "virtio-net")
WITNESS_DEVICE = "testdev"
#: The target's limits, small enough for the fuzzer to reach them.
TARGET_MAX_FDS = 8
TARGET_OPTIONS = (
    "--max-data-xfer-size", "65536", "--max-dma-maps", "16", "--max-fds-per-msg", "8",
    "--max-irq-vectors", "64", "--max-queued-replies", "8", "--max-migration-sessions", "2",
)  # fmt: skip
REPLY_TIMEOUT = 15.0
CONFIG = PciRegion.CONFIG
PAGE = 4096
INTERESTING = (
    0, 1, 2, 3, 4, 7, 8, 15, 16, 24, 31, 32, 63, 64, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000,
    0x1001, 0x7FFF, 0xFFFF, 0x10000, 0x10001, 0x100000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE,
    0xFFFFFFFF, 1 << 32, (1 << 32) + 1, 1 << 40, 1 << 63, (1 << 64) - 1,
)  # fmt: skip


class FuzzFailure(AssertionError):
    """An invariant broke; the message says which, for which case."""


# -- where the choices come from ----------------------------------------------------------------


class Source(Protocol):
    def integer(self, low: int, high: int) -> int: ...

    def blob(self, count: int) -> bytes: ...


class RandomSource:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def blob(self, count: int) -> bytes:
        return self.rng.randbytes(count)


class ProviderSource:
    """Choices read from a libFuzzer input (atheris.FuzzedDataProvider)."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    def integer(self, low: int, high: int) -> int:
        return int(self.provider.ConsumeIntInRange(low, high))

    def blob(self, count: int) -> bytes:
        return bytes(self.provider.ConsumeBytes(count))


def pick(source: Source, items: Sequence[Any]) -> Any:
    return items[source.integer(0, len(items) - 1)]


def chance(source: Source, percent: int) -> bool:
    return source.integer(0, 99) < percent


def number(source: Source, bits: int) -> int:
    """An interesting value or a random one, fitting ``bits``."""
    mask = (1 << bits) - 1
    if chance(source, 60):
        return int(pick(source, INTERESTING)) & mask
    return source.integer(0, mask)


# -- the target ------------------------------------------------------------------------------------


class Target(Protocol):
    fuzzed: dict[str, Path]
    witness: Path

    def alive(self) -> bool: ...

    def fds(self) -> list[str]: ...

    def take_errors(self) -> list[str]: ...

    def log_tail(self) -> str: ...

    def close(self) -> None: ...


def _fd_targets(pid: int | str) -> list[str]:
    out = []
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):
            out.append(f"{name}->{os.readlink(f'{directory}/{name}')}")
    return sorted(out)


def _paths(directory: Path) -> tuple[dict[str, Path], Path]:
    fuzzed = {name: directory / f"{name}.sock" for name in FUZZED_DEVICES}
    return fuzzed, directory / "witness.sock"


class ProcessTarget:
    """The devices served by a child process (``python -m emulator.tools.fuzz --serve DIR``)."""

    def __init__(self, directory: Path) -> None:
        self.fuzzed, self.witness = _paths(directory)
        self.log_path = directory / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the target
        self.process = subprocess.Popen(
            [sys.executable, "-m", "emulator.tools.fuzz", "--serve", str(directory)],
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.close()
            raise RuntimeError(f"fuzz target did not start: {line!r}; see {self.log_path}")
        self._log_seen = 0

    def alive(self) -> bool:
        return self.process.poll() is None

    def fds(self) -> list[str]:
        return _fd_targets(self.process.pid)

    def take_errors(self) -> list[str]:
        text = self.log_path.read_bytes()[self._log_seen :]
        self._log_seen += len(text)
        return _tracebacks(text.decode(errors="replace"))

    def log_tail(self, lines: int = 25) -> str:
        text = self.log_path.read_bytes().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


def _tracebacks(text: str) -> list[str]:
    return [chunk for chunk in text.split("\n\n") if "Traceback (most recent call last)" in chunk]


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(self.format(record))


class ThreadTarget:
    """The devices served by a trio thread of this process (for coverage-guided fuzzing)."""

    def __init__(self, directory: Path) -> None:
        self.fuzzed, self.witness = _paths(directory)
        self._errors = _ErrorRecords()
        logging.getLogger("vfio_user_emu").addHandler(self._errors)
        ready = threading.Event()
        self._stop: Callable[[], None] | None = None
        self._failure: BaseException | None = None

        def run() -> None:
            try:
                _serve_targets(directory, ready, self._set_stop)
            except BaseException as exc:  # reported by alive()
                self._failure = exc
                ready.set()

        self.thread = threading.Thread(target=run, name="fuzz-target", daemon=True)
        self.thread.start()
        ready.wait(30)
        if self._failure is not None:
            raise RuntimeError(f"fuzz target did not start: {self._failure!r}")

    def _set_stop(self, stop: Callable[[], None]) -> None:
        self._stop = stop

    def alive(self) -> bool:
        return self.thread.is_alive()

    def fds(self) -> list[str]:
        # The fuzzer's own fds are all closed between cases, so the process's count is the
        # server's.
        return _fd_targets("self")

    def take_errors(self) -> list[str]:
        errors, self._errors.records = self._errors.records, []
        return errors

    def log_tail(self) -> str:
        return "(the server logs to this process's logging)"

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
        self.thread.join(10)
        logging.getLogger("vfio_user_emu").removeHandler(self._errors)


def _serve_targets(
    directory: Path,
    ready: threading.Event | None,
    on_stop: Callable[[Callable[[], None]], None] | None = None,
) -> None:
    """Serve the fuzzed devices and the witness with the target's limits until stopped."""
    fuzzed, witness = _paths(directory)
    args = build_parser().parse_args(["serve", "--socket-path", "-", *TARGET_OPTIONS])
    capabilities, limits = limits_from_args(args, None)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            token = trio.lowlevel.current_trio_token()
            if on_stop is not None:
                on_stop(lambda: token.run_sync_soon(nursery.cancel_scope.cancel))
            servers = [(create_device(name), path) for name, path in fuzzed.items()]
            servers.append((create_device(WITNESS_DEVICE), witness))
            for device, path in servers:
                server = DeviceServer(
                    device, socket_path=path, capabilities=capabilities, limits=limits
                )
                await nursery.start(server.serve)
            if ready is not None:
                ready.set()
            else:
                print("ready", flush=True)

    trio.run(main)


# -- a blocking peer -----------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection."""


class Peer:
    """A blocking vfio-user client speaking raw bytes, answering the server's DMA requests."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(REPLY_TIMEOUT)
        self.sock.connect(str(path))
        self.buffer = b""
        self.next_id = 1
        #: Server commands seen (DMA_READ / DMA_WRITE), answered with EFAULT or data.
        self.server_requests = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = self.sock.sendmsg([data], rights)
        else:
            sent = self.sock.send(data)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def command(self, command: int, payload: bytes, fds: Sequence[int] = (), flags: int = 0) -> int:
        msg_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFF
        self.send(pack_message(msg_id, command, payload, flags), fds)
        return msg_id

    def receive(self) -> tuple[Header, bytes]:
        """The next whole message; raises Closed at end of stream, TimeoutError on a hang."""
        while True:
            if len(self.buffer) >= HEADER_SIZE:
                header = Header.unpack(self.buffer)
                if header.size < HEADER_SIZE:
                    raise FuzzFailure(f"server sent a message of size {header.size}")
                if len(self.buffer) >= header.size:
                    payload = self.buffer[HEADER_SIZE : header.size]
                    self.buffer = self.buffer[header.size :]
                    return header, payload
            data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(raw[: len(raw) - len(raw) % 4])
                    for fd in fds:
                        os.close(fd)
            if not data:
                if self.buffer:
                    raise FuzzFailure(f"server closed after {len(self.buffer)} bytes of a message")
                raise Closed()
            self.buffer += data

    def reply_to(self, msg_id: int) -> tuple[Header, bytes]:
        """Wait for the reply to ``msg_id``, serving DMA requests meanwhile."""
        while True:
            header, payload = self.receive()
            if header.is_command:
                self.serve_request(header, payload)
                continue
            check_reply_shape(header, payload)
            if header.msg_id != msg_id:
                raise FuzzFailure(f"reply to id {header.msg_id} while waiting for {msg_id}")
            return header, payload

    def serve_request(self, header: Header, payload: bytes) -> None:
        if header.command not in (Command.DMA_READ, Command.DMA_WRITE):
            raise FuzzFailure(f"server sent command {header.command_name()}")
        self.server_requests += 1
        if header.command == Command.DMA_READ and len(payload) >= 16:
            address, count = struct.unpack_from("<QQ", payload)
            if count <= 1 << 20:
                reply = struct.pack("<QQ", address, count) + bytes(count)
                self.send(pack_reply(header.msg_id, header.command, reply))
                return
        flags = MsgType.REPLY | FLAG_ERROR
        self.send(HEADER.pack(header.msg_id, header.command, HEADER_SIZE, flags, errno.EFAULT))

    def call(self, command: int, payload: bytes, fds: Sequence[int] = ()) -> tuple[Header, bytes]:
        header, reply = self.reply_to(self.command(command, payload, fds))
        if header.command != command:
            raise FuzzFailure(f"reply carries command {header.command}, sent {command}")
        return header, reply


def check_reply_shape(header: Header, payload: bytes) -> None:
    if not header.is_reply:
        raise FuzzFailure(f"message type {header.msg_type} where a reply was due")
    if header.is_error:
        if payload:
            raise FuzzFailure(f"error reply with {len(payload)} payload bytes")
        if not 0 < header.error < 4096:
            raise FuzzFailure(f"error reply with errno {header.error}")
    elif header.error:
        raise FuzzFailure(f"success reply with error field {header.error}")


# -- fds to attach ---------------------------------------------------------------------------------


class FdPool:
    """fds of every kind a client might pass, closed at the end of the case."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def make(self, source: Source) -> int:
        kind = source.integer(0, 5)
        if kind == 0:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
        elif kind == 1:
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, pick(source, [0, PAGE, 0x10000, 0x100000]))
        elif kind == 2:
            read_end, fd = os.pipe2(os.O_CLOEXEC)
            self.fds.append(read_end)
        elif kind == 3:
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        elif kind == 4:
            mine, theirs = socket.socketpair()
            self.fds.append(mine.detach())
            fd = theirs.detach()
        else:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            os.eventfd_write(fd, 0xFFFFFFFFFFFFFFFE)  # at its maximum: a write would block
        self.fds.append(fd)
        return fd

    def some(self, source: Source, most: int) -> list[int]:
        return [self.make(source) for _ in range(source.integer(0, most))]

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


# -- payload templates ---------------------------------------------------------------------


def version_payload(source: Source) -> bytes:
    caps: dict[str, Any] = {}
    if chance(source, 70):
        caps["max_msg_fds"] = source.integer(0, 16)
    if chance(source, 50):
        caps["max_data_xfer_size"] = pick(source, [1, 4096, 65536, 1 << 20, 1 << 32])
    if chance(source, 50):
        caps["migration"] = {"pgsize": 4096, "data_fd": chance(source, 50)}
    if chance(source, 30):
        caps["write_multiple"] = True
    text = json.dumps({"capabilities": caps})
    return struct.pack("<HH", 0, source.integer(0, 3)) + text.encode() + b"\0"


def _feature_payload(source: Source) -> bytes:
    feature = pick(source, [*map(int, DeviceFeature), source.integer(0, 20)])
    op = pick(source, [FEATURE_GET, FEATURE_SET, FEATURE_PROBE, FEATURE_GET | FEATURE_PROBE])
    data = b""
    if feature == DeviceFeature.MIG_DEVICE_STATE:
        data = MigDeviceState(source.integer(0, 9)).pack()
    elif feature == DeviceFeature.DMA_LOGGING_START:
        ranges = [
            (source.integer(0, 16) * PAGE, source.integer(0, 16) * PAGE)
            for _ in range(source.integer(0, 3))
        ]
        data = struct.pack("<QII", pick(source, [4096, 8192, 1000]), len(ranges), 0)
        data += b"".join(struct.pack("<QQ", *r) for r in ranges)
    elif feature == DeviceFeature.DMA_LOGGING_REPORT:
        data = struct.pack("<QQQ", source.integer(0, 16) * PAGE, number(source, 64), 4096)
    argsz = 8 + len(data) + (pick(source, [0, 8, 64, 4096]) if op & FEATURE_GET else 0)
    return struct.pack("<II", argsz, op | feature) + data


def _mig_stream(source: Source) -> bytes:
    sections = [(f"s{i}", source.blob(source.integer(0, 64))) for i in range(source.integer(0, 3))]
    stream = encode(pick(source, ["testdev", "e1000", "other"]), 1, bytes(16), sections)
    if chance(source, 50):
        at = source.integer(0, len(stream) - 1)
        stream = stream[:at] + source.blob(source.integer(0, 8)) + stream[at + 1 :]
    return stream


def template(command: int, source: Source) -> bytes:
    """A payload for ``command`` that is valid or nearly so."""
    region = pick(source, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, number(source, 32)])
    offset = pick(
        source, [0, 4, td.REG_SCRATCH, td.REG_DOORBELL, td.REG_DMA_CTRL, number(source, 64)]
    )
    if command == Command.VERSION:
        return version_payload(source)
    if command == Command.DMA_MAP:
        flags = pick(source, [1, 2, 3, 0, 7])
        return struct.pack(
            "<IIQQQ",
            32,
            flags,
            0,
            source.integer(0, 64) * PAGE,
            pick(source, [PAGE, 0x10000, number(source, 64)]),
        )
    if command == Command.DMA_UNMAP:
        flags = pick(source, [0, 0, int(DmaUnmapFlags.ALL), int(DmaUnmapFlags.GET_DIRTY_BITMAP)])
        return struct.pack(
            "<IIQQ", 24, flags, source.integer(0, 64) * PAGE, pick(source, [PAGE, 0x10000, 0])
        )
    if command == Command.DEVICE_GET_INFO:
        return struct.pack("<IIII", 16, 0, 0, 0)
    if command == Command.DEVICE_GET_REGION_INFO:
        return struct.pack("<IIIIQQ", pick(source, [32, 64, 256, 0xFFFF]), 0, region, 0, 0, 0)
    if command == Command.DEVICE_GET_REGION_IO_FDS:
        return struct.pack("<IIII", pick(source, [16, 56, 4096]), 0, region, 0)
    if command == Command.DEVICE_GET_IRQ_INFO:
        return struct.pack("<IIII", 16, 0, source.integer(0, 6), 0)
    if command == Command.DEVICE_SET_IRQS:
        data_type = pick(
            source,
            [int(IrqSetFlags.DATA_NONE), int(IrqSetFlags.DATA_BOOL), int(IrqSetFlags.DATA_EVENTFD)],
        )
        action = pick(
            source,
            [
                int(IrqSetFlags.ACTION_MASK),
                int(IrqSetFlags.ACTION_UNMASK),
                int(IrqSetFlags.ACTION_TRIGGER),
            ],
        )
        count = pick(source, [0, 1, 2, 4, 65, number(source, 32)])
        start = pick(source, [0, 1, 3, number(source, 32)])
        data = bytes(min(count, 64)) if data_type == IrqSetFlags.DATA_BOOL else b""
        return (
            struct.pack(
                "<IIIII", 20 + len(data), data_type | action, source.integer(0, 5), start, count
            )
            + data
        )
    if command == Command.REGION_READ:
        return struct.pack(
            "<QII", offset, region, pick(source, [1, 2, 4, 8, 0, 4096, number(source, 32)])
        )
    if command == Command.REGION_WRITE:
        data = source.blob(pick(source, [1, 2, 4, 8, 16]))
        return struct.pack("<QII", offset, region, len(data)) + data
    if command == Command.REGION_WRITE_MULTI:
        entries = source.integer(1, 4)
        body = b"".join(
            struct.pack(
                "<QII8s",
                (offset + 4 * i) % (1 << 64),
                region,
                pick(source, [1, 2, 4, 8]),
                source.blob(8),
            )
            for i in range(entries)
        )
        return struct.pack("<Q", entries) + body
    if command == Command.DEVICE_FEATURE:
        return _feature_payload(source)
    if command == Command.MIG_DATA_READ:
        size = pick(source, [0, 1, 64, 4096, 65536, number(source, 32)])
        return struct.pack("<II", (8 + size) & 0xFFFFFFFF, size)
    if command == Command.MIG_DATA_WRITE:
        data = _mig_stream(source) if chance(source, 70) else source.blob(source.integer(0, 128))
        return struct.pack("<II", 8 + len(data), len(data)) + data
    return source.blob(source.integer(0, 64))  # DMA_READ/WRITE from a client, DIRTY_PAGES, unknown


def mutate(payload: bytes, source: Source) -> bytes:
    data = bytearray(payload)
    for _ in range(source.integer(1, 3)):
        kind = source.integer(0, 5)
        if kind == 0 and data:
            bit = source.integer(0, len(data) * 8 - 1)
            data[bit // 8] ^= 1 << (bit % 8)
        elif kind == 1 and len(data) >= 4:
            at = source.integer(0, len(data) // 4 - 1) * 4
            data[at : at + 4] = struct.pack("<I", number(source, 32))
        elif kind == 2 and len(data) >= 8:
            at = source.integer(0, len(data) // 8 - 1) * 8
            data[at : at + 8] = struct.pack("<Q", number(source, 64))
        elif kind == 3:
            del data[source.integer(0, len(data)) :]
        elif kind == 4:
            data += source.blob(source.integer(1, 32))
        else:
            data[:] = source.blob(source.integer(0, 48))
    return bytes(data)


# -- one case --------------------------------------------------------------------------------------


@dataclass
class Stats:
    cases: int = 0
    messages: int = 0
    replies: int = 0
    errors: int = 0
    closes: int = 0
    #: Hostile migration streams resumed: applied, or refused with the device unchanged.
    streams_applied: int = 0
    streams_refused: int = 0
    errnos: dict[int, int] = field(default_factory=dict)

    def line(self) -> str:
        top = sorted(self.errnos.items(), key=lambda kv: -kv[1])[:6]
        names = ", ".join(f"{errno.errorcode.get(k, k)}={v}" for k, v in top)
        return (
            f"{self.cases} cases, {self.messages} messages: {self.replies} replies, "
            f"{self.errors} error replies ({names}), {self.closes} closed connections; "
            f"hostile streams: {self.streams_refused} refused, {self.streams_applied} applied"
        )


def _expect_reply(peer: Peer, msg_id: int, command: int, stats: Stats) -> None:
    header, _ = peer.reply_to(msg_id)
    if header.command != command:
        raise FuzzFailure(f"reply carries command {header.command}, sent {command}")
    stats.replies += 1
    if header.is_error:
        stats.errors += 1
        stats.errnos[header.error] = stats.errnos.get(header.error, 0) + 1


def _probe(peer: Peer, stats: Stats) -> None:
    """A valid command whose reply must be the very next reply (nothing stray before it)."""
    msg_id = peer.command(Command.REGION_READ, struct.pack("<QII", 0, CONFIG, 2))
    _expect_reply(peer, msg_id, Command.REGION_READ, stats)


def _setup(peer: Peer, source: Source, pool: FdPool, stats: Stats) -> None:
    """Bring the session into varied states with valid commands (their errors are fine)."""
    steps: list[tuple[int, bytes, list[int]]] = []
    if chance(source, 60):
        ram = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(ram, 0x10000)
        pool.fds.append(ram)
        steps.append((Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 0x10000), [ram]))
    if chance(source, 60):
        steps.append((Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x100000, 0x10000), []))
    if chance(source, 60):
        steps.append((Command.REGION_WRITE, struct.pack("<QIIH", 4, CONFIG, 2, 0x6), []))
    if chance(source, 50):
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
        pool.fds.extend(fds)
        flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
        steps.append((Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, flags, 2, 0, 2), fds))
    if chance(source, 30):  # a DMA copy in flight (fd-less source: DMA_READ messages)
        for reg, value in (
            (td.REG_DMA_SRC, 0x100000),
            (td.REG_DMA_DST, 0),
            (td.REG_DMA_LEN, 256),
            (td.REG_DMA_CTRL, 1),
        ):
            steps.append(
                (
                    Command.REGION_WRITE,
                    struct.pack("<QII", reg, 0, 4) + struct.pack("<I", value),
                    [],
                )
            )
    for _ in range(source.integer(0, 3)):
        state = pick(source, [int(s) for s in MigState])
        data = struct.pack("<IIIi", 16, FEATURE_SET | DeviceFeature.MIG_DEVICE_STATE, state, -1)
        steps.append((Command.DEVICE_FEATURE, data, []))
    for command, payload, fds in steps:
        stats.messages += 1
        _expect_reply(peer, peer.command(command, payload, fds), command, stats)


def structured_case(path: Path, source: Source, stats: Stats) -> None:
    pool = FdPool()
    peer = Peer(path)
    try:
        stats.messages += 1
        header, _ = peer.call(Command.VERSION, version_payload(source))
        if header.is_error:
            raise FuzzFailure(f"valid VERSION refused with errno {header.error}")
        _setup(peer, source, pool, stats)
        for _ in range(source.integer(1, 24)):
            if not _mutated_message(peer, source, pool, stats):
                return
    except Closed:
        raise FuzzFailure("connection closed without a framing error") from None
    finally:
        peer.close()
        pool.close()


@dataclass
class Planned:
    """One mutated message and what the server may do with it."""

    data: bytes
    fds: list[int]
    msg_id: int
    command: int
    flags: int
    #: Unrecoverable framing (or too many fds): the server must close the connection.
    closes: bool

    @property
    def expects_reply(self) -> bool:
        is_command = (self.flags & FLAGS_TYPE_MASK) == MsgType.COMMAND
        return is_command and not self.flags & FLAG_NO_REPLY

    def describe(self) -> str:
        return (
            f"id={self.msg_id} command={self.command} flags={self.flags:#x} "
            f"fds={len(self.fds)} bytes={self.data.hex()}"
        )


def _header_flags(source: Source) -> tuple[int, bool]:
    """Message flags, and whether they make the message unrecoverable."""
    roll = source.integer(0, 99)
    if roll < 8:
        return FLAG_NO_REPLY, False
    if roll < 12:
        return MsgType.REPLY, False  # a reply matching nothing: dropped, nothing sent
    if roll < 14:
        return source.integer(2, FLAGS_TYPE_MASK), True  # neither command nor reply
    if roll < 16:
        return number(source, 32) & ~FLAGS_TYPE_MASK, False  # unknown flag bits
    return 0, False


def plan_message(source: Source, pool: FdPool) -> Planned:
    command = pick(source, [*range(1, 19), *range(2, 19), number(source, 16)])
    payload = template(command, source)
    if chance(source, 70):
        payload = mutate(payload, source)
    flags, closes = _header_flags(source)
    fds = pool.some(source, 2) if chance(source, 25) else []
    if chance(source, 2):
        fds = [pool.make(source) for _ in range(TARGET_MAX_FDS + 1)]
        closes = True  # more fds than the server accepts: the connection goes
    msg_id = source.integer(0, 0xFFFF)
    size = HEADER_SIZE + len(payload)
    if chance(source, 2):
        size = source.integer(0, HEADER_SIZE - 1)  # a size below the header: fatal framing
        closes = True
    data = HEADER.pack(msg_id, command, size, flags, 0) + payload
    return Planned(data, fds, msg_id, command, flags, closes)


def _drain_until_closed(peer: Peer) -> None:
    """Replies to earlier messages may still come; then the connection must close."""
    try:
        while True:
            header, payload = peer.receive()
            if header.is_command:
                peer.serve_request(header, payload)
    except (Closed, ConnectionResetError):
        return


def _mutated_message(peer: Peer, source: Source, pool: FdPool, stats: Stats) -> bool:
    """Send one mutated message and check what comes back; False once closed (allowed)."""
    planned = plan_message(source, pool)
    stats.messages += 1
    try:
        peer.send(planned.data, planned.fds)
        if planned.closes:
            _drain_until_closed(peer)
            stats.closes += 1
            return False
        if planned.expects_reply:
            _expect_reply(peer, planned.msg_id, planned.command, stats)
            peer.next_id = (planned.msg_id + 1) & 0xFFFF
        else:
            _probe(peer, stats)
    except (BrokenPipeError, ConnectionResetError) as exc:
        if planned.closes:
            stats.closes += 1
            return False
        raise FuzzFailure(f"{exc!r} after {planned.describe()}") from None
    except (Closed, FuzzFailure) as exc:
        raise FuzzFailure(f"{exc!r} after {planned.describe()}") from None
    return True


def raw_case(path: Path, source: Source, stats: Stats) -> None:
    pool = FdPool()
    peer = Peer(path)
    try:
        chunks: list[bytes] = []
        if chance(source, 50):
            chunks.append(pack_message(1, Command.VERSION, version_payload(source)))
        for _ in range(source.integer(1, 6)):
            if chance(source, 50):
                size = pick(
                    source, [0, 15, 16, 17, 24, 64, source.integer(0, 300), 1 << 20, 0xFFFFFFFF]
                )
                head = HEADER.pack(
                    source.integer(0, 0xFFFF),
                    source.integer(0, 20),
                    size,
                    source.integer(0, 0x3F),
                    0,
                )
                chunks.append(head + source.blob(source.integer(0, 64)))
            else:
                chunks.append(source.blob(source.integer(1, 128)))
        stats.messages += len(chunks)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for chunk in chunks:
                peer.send(chunk, pool.some(source, 2) if chance(source, 20) else [])
            peer.sock.shutdown(socket.SHUT_WR)
        try:
            while True:
                header, payload = peer.receive()
                if header.is_command:
                    peer.serve_request(header, payload)
                    continue
                check_reply_shape(header, payload)
                stats.replies += 1
        except (Closed, ConnectionResetError, BrokenPipeError):
            stats.closes += 1
    finally:
        peer.close()
        pool.close()


# -- resuming a hostile stream -------------------------------------------------------------------

CONFIG_SNAPSHOT = struct.pack("<QII", 0, CONFIG, 256)
MIG_CHUNK = 32 * 1024


def _set_state(peer: Peer, state: int) -> Header:
    data = struct.pack("<IIIi", 16, FEATURE_SET | DeviceFeature.MIG_DEVICE_STATE, state, -1)
    header, _ = peer.call(Command.DEVICE_FEATURE, data)
    return header


def _get_state(peer: Peer) -> int:
    data = struct.pack("<II", 16, FEATURE_GET | DeviceFeature.MIG_DEVICE_STATE) + bytes(8)
    header, payload = peer.call(Command.DEVICE_FEATURE, data)
    if header.is_error or len(payload) < 12:
        raise FuzzFailure(f"GET MIG_DEVICE_STATE failed (errno {header.error})")
    return int(struct.unpack_from("<I", payload, 8)[0])


def save_stream(path: Path) -> bytes:
    """The device's real STOP_COPY stream (in-band), to mutate into hostile ones."""
    peer = Peer(path)
    try:
        peer.call(Command.VERSION, struct.pack("<HH", 0, 2) + b"{}\0")
        if _set_state(peer, MigState.STOP_COPY).is_error:
            raise FuzzFailure(f"{path.name}: cannot enter STOP_COPY")
        stream = b""
        while True:
            header, payload = peer.call(
                Command.MIG_DATA_READ, struct.pack("<II", 8 + MIG_CHUNK, MIG_CHUNK)
            )
            size = struct.unpack_from("<I", payload, 4)[0] if not header.is_error else 0
            if not size:
                break
            stream += payload[8 : 8 + size]
        peer.call(Command.DEVICE_RESET, b"")
        return stream
    finally:
        peer.close()


def hostile_stream(stream: bytes, source: Source) -> bytes:
    """A real stream with mutated section payloads, re-encoded so its checksums hold and
    the device's own validation is what has to refuse it (raw bytes for other layouts)."""
    try:
        header = parse_header(stream)
        _, sections = decode(stream, device_type=header.device_type, max_model_version=1 << 31)
    except StreamError:
        return mutate(stream, source) if chance(source, 80) else stream
    named = [(name, bytes(payload)) for name, payload in sections]
    for _ in range(source.integer(1, 3)):
        kind = source.integer(0, 4)
        if not named:
            break
        at = source.integer(0, len(named) - 1)
        name, payload = named[at]
        if kind <= 1:
            named[at] = (name, mutate(payload, source))
        elif kind == 2:
            del named[at]
        elif kind == 3:
            named.insert(source.integer(0, len(named)), (name, payload))  # a repeated section
        else:
            named[at] = (pick(source, [name + "x", "pci.config", "pci.irq", "regs"]), payload)
    return encode(header.device_type, header.model_version, header.session_id, named)


def resume_case(path: Path, stream: bytes, source: Source, stats: Stats) -> None:
    """RESUMING with a hostile stream: accepted, or refused leaving the device as it was."""
    peer = Peer(path)
    try:
        peer.call(Command.VERSION, struct.pack("<HH", 0, 2) + b"{}\0")
        _, before = peer.call(Command.REGION_READ, CONFIG_SNAPSHOT)
        if _set_state(peer, MigState.RESUMING).is_error:
            raise FuzzFailure(f"{path.name}: cannot enter RESUMING")
        data = hostile_stream(stream, source)
        for at in range(0, len(data), MIG_CHUNK):
            piece = data[at : at + MIG_CHUNK]
            stats.messages += 1
            peer.call(
                Command.MIG_DATA_WRITE, struct.pack("<II", 8 + len(piece), len(piece)) + piece
            )
        stats.messages += 3
        header = _set_state(peer, MigState.STOP)
        if not header.is_error:
            stats.replies += 1
            stats.streams_applied += 1
            return  # a valid stream (the mutation kept it meaningful): applied
        stats.streams_refused += 1
        stats.errors += 1
        stats.errnos[header.error] = stats.errnos.get(header.error, 0) + 1
        if _get_state(peer) != MigState.RESUMING:
            raise FuzzFailure(f"{path.name}: a refused stream moved the device out of RESUMING")
        _, after = peer.call(Command.REGION_READ, CONFIG_SNAPSHOT)
        if after != before:
            raise FuzzFailure(f"{path.name}: a refused stream changed config space")
    except Closed:
        raise FuzzFailure(f"{path.name}: connection closed while resuming") from None
    finally:
        peer.close()


# -- health between cases ------------------------------------------------------------------------


def _fresh_client_served(path: Path) -> None:
    """A new client is served (retrying while the previous one's teardown finishes)."""
    deadline = time.monotonic() + REPLY_TIMEOUT
    while True:
        peer = Peer(path)
        try:
            header, _ = peer.call(Command.VERSION, struct.pack("<HH", 0, 2) + b"{}\0")
            if header.is_error and header.error == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.005)
                continue
            if header.is_error:
                raise FuzzFailure(f"a fresh client's VERSION got errno {header.error}")
            header, _ = peer.call(Command.DEVICE_RESET, b"")
            if header.is_error:
                raise FuzzFailure(f"DEVICE_RESET of a fresh client got errno {header.error}")
            header, payload = peer.call(Command.REGION_READ, struct.pack("<QII", 0, CONFIG, 4))
            if header.is_error or len(payload) != 20:
                raise FuzzFailure("a fresh client cannot read config space")
            return
        except Closed:
            if time.monotonic() < deadline:
                time.sleep(0.005)
                continue
            raise FuzzFailure("a fresh client was not served") from None
        finally:
            peer.close()


class Witness:
    """A long-lived client of another device of the same server."""

    def __init__(self, path: Path) -> None:
        self.peer = Peer(path)
        header, _ = self.peer.call(Command.VERSION, struct.pack("<HH", 0, 2) + b"{}\0")
        assert not header.is_error
        self.expected = self._read()

    def _read(self) -> bytes:
        header, payload = self.peer.call(Command.REGION_READ, struct.pack("<QII", 0, CONFIG, 4))
        if header.is_error:
            raise FuzzFailure(f"the witness device answered errno {header.error}")
        return payload

    def check(self) -> None:
        try:
            if self._read() != self.expected:
                raise FuzzFailure("the witness device's config space changed")
        except (Closed, TimeoutError, OSError) as exc:
            raise FuzzFailure(f"the witness device stopped answering: {exc!r}") from None

    def close(self) -> None:
        self.peer.close()


def _settled_fds(target: Target, baseline: list[str]) -> list[str]:
    """The target's fds, allowing a moment for closes done off the main task."""
    deadline = time.monotonic() + 2
    while True:
        now = target.fds()
        if now == baseline or time.monotonic() > deadline:
            return now
        time.sleep(0.01)


def check_health(target: Target, witness: Witness, baseline: list[str], label: str) -> None:
    if not target.alive():
        raise FuzzFailure(f"{label}: the server died")
    errors = target.take_errors()
    if errors:
        raise FuzzFailure(f"{label}: the server logged a traceback:\n{errors[0]}")
    witness.check()
    now = _settled_fds(target, baseline)
    if now != baseline:
        gained = sorted(set(now) - set(baseline))
        lost = sorted(set(baseline) - set(now))
        raise FuzzFailure(f"{label}: server fds changed: +{gained} -{lost}")


# -- driving -------------------------------------------------------------------------------


def run_case(
    target: Target, source: Source, stats: Stats, streams: dict[str, bytes] | None = None
) -> None:
    name = pick(source, list(target.fuzzed))
    path = target.fuzzed[name]
    try:
        roll = source.integer(0, 99)
        if streams and roll < 15:
            resume_case(path, streams[name], source, stats)
        elif roll < 80:
            structured_case(path, source, stats)
        else:
            raw_case(path, source, stats)
    except TimeoutError:
        raise FuzzFailure(f"{name}: no reply within {REPLY_TIMEOUT}s (a hang)") from None
    _fresh_client_served(path)
    stats.cases += 1


@contextlib.contextmanager
def open_target(kind: str = "process") -> Iterator[Target]:
    with tempfile.TemporaryDirectory(prefix="vfio-user-fuzz-") as directory:
        target: Target = (
            ProcessTarget(Path(directory)) if kind == "process" else ThreadTarget(Path(directory))
        )
        try:
            yield target
        finally:
            target.close()


def prepare(target: Target) -> tuple[list[str], dict[str, bytes]]:
    """The fds the target holds at rest, and each fuzzed device's real migration stream."""
    streams = {name: save_stream(path) for name, path in target.fuzzed.items()}
    for path in target.fuzzed.values():
        _fresh_client_served(path)  # lazily created state exists before the baseline
    return _settled_fds(target, []), streams


def fuzz(
    seconds: float, seed: int, *, kind: str = "process", max_cases: int | None = None
) -> Stats:
    """Random-source fuzzing for ``seconds``; raises FuzzFailure naming the case's seed."""
    stats = Stats()
    with open_target(kind) as target:
        witness = Witness(target.witness)
        try:
            baseline, streams = prepare(target)
            target.take_errors()
            deadline = time.monotonic() + seconds
            case = 0
            while time.monotonic() < deadline and (max_cases is None or case < max_cases):
                case_seed = seed * 1_000_003 + case
                try:
                    run_case(target, RandomSource(case_seed), stats, streams)
                    check_health(target, witness, baseline, f"case seed {case_seed}")
                except FuzzFailure as exc:
                    raise FuzzFailure(
                        f"{exc}\nserver log:\n{target.log_tail()}"
                        f"\nreproduce: python -m emulator.tools.fuzz --case {case_seed}"
                    ) from None
                case += 1
        finally:
            witness.close()
    return stats


def replay(case_seed: int, kind: str = "process") -> Stats:
    stats = Stats()
    with open_target(kind) as target:
        witness = Witness(target.witness)
        try:
            baseline, streams = prepare(target)
            run_case(target, RandomSource(case_seed), stats, streams)
            check_health(target, witness, baseline, f"case seed {case_seed}")
        finally:
            witness.close()
    return stats


def fuzz_atheris(seconds: float, corpus: Sequence[str]) -> None:
    """libFuzzer-driven choices against an in-process target (coverage feedback)."""
    import atheris  # type: ignore[import-untyped]  # noqa: PLC0415 - optional extra

    atheris.instrument_all()  # the server's code is already loaded: instrument it in place
    logging.getLogger("vfio_user_emu").setLevel(logging.ERROR)  # tracebacks still count
    stats = Stats()
    with open_target("thread") as target:
        witness = Witness(target.witness)
        baseline, streams = prepare(target)
        target.take_errors()

        def one_input(data: bytes) -> None:
            source = ProviderSource(atheris.FuzzedDataProvider(data))
            run_case(target, source, stats, streams)
            check_health(target, witness, baseline, "atheris input")

        atheris.Setup(
            [
                sys.argv[0],
                f"-max_total_time={int(seconds)}",
                "-timeout=60",
                "-max_len=4096",
                "-len_control=0",  # long inputs from the start: each byte is a choice
                *corpus,
            ],
            one_input,
        )
        atheris.Fuzz()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emulator.tools.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--case", type=int, help="replay one case by its seed")
    parser.add_argument(
        "--engine",
        choices=["auto", "random", "atheris"],
        default="random",
        help="who makes the choices: a seeded PRNG, or libFuzzer through atheris with coverage"
        " feedback (auto: atheris when installed)",
    )
    parser.add_argument("--target", choices=["process", "thread"], default="process")
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("corpus", nargs="*", help="atheris corpus directories")
    args = parser.parse_args(argv)
    if args.serve:
        logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
        _serve_targets(Path(args.serve), None)
        return 0
    if args.case is not None:
        print(replay(args.case, args.target).line())
        return 0
    if args.engine == "auto":
        args.engine = "atheris" if importlib.util.find_spec("atheris") else "random"
    if args.engine == "atheris":
        fuzz_atheris(args.seconds, args.corpus)
        return 0
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"fuzzing the live server for {args.seconds:g}s, seed {seed}", flush=True)
    try:
        stats = fuzz(args.seconds, seed, kind=args.target)
    except FuzzFailure as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(stats.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
