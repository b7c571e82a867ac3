"""The migration soak harness behind ``vfio-user-emu soak``.

It runs one VM's device on two in-process servers and migrates it back and forth, for a
number of migrations or a time, while a guest keeps the device busy, and after every
migration checks that nothing was lost or duplicated:

* ``testdev``: the guest (:class:`TestdevGuest`) writes scratch registers and the RAM BAR,
  rings doorbells and runs DMA copies with completion interrupts (MSI-X, eventfds shared
  by both servers as a VM's are), keeping a model of what the device must hold; DMA copies
  may be in flight across a migration. After each migration the guest compares the
  device's counters (DMA_DONE, IRQ_COUNT), scratch registers and RAM BAR with its model and
  every interrupt must have arrived exactly once.
* ``e1000``: a second, fixed NIC (A) is wired back to back to the migrating NIC (B) by
  :class:`Cable`; both guests (:class:`emulator.testing.guest_e1000.E1000Guest`) send numbered
  frames continuously in both directions and each receiver checks that every frame
  arrives exactly once and in order; after each migration both directions must progress.
* ``virtio-net``: the same flow between two virtio-nets
  (:class:`emulator.testing.guest_virtio_net.VirtioNetGuest`, :class:`VirtioNetFlow`).

Each migration is driven by :func:`emulator.client.migrate.migrate` over the VM's own
connections (a server serves one client at a time, so the driver is the VMM, as QEMU's
migration code is). The device state the destination loaded is compared with the stopped
source's (a digest of every section, taken in process when the destination leaves STOP).

Faults (``--faults RATE``: the probability that a migration gets one; :class:`FaultKind`)
fire at a random message of the migration or at a random device arc:
the source or destination connection closes before or after a message, half a message is
sent before the connection closes, the migration data written to the destination is
corrupted or cut short, the client dies (both connections close, nobody recovers for it),
the destination server dies (it is restarted with a fresh device, as a supervisor would),
or a device arc fails on either side. After each fault the harness recovers as a
restarted management layer would (:meth:`Soak.recover`): servers restarted, connections
reopened and realized again, the source put back in RUNNING without a reset (its state
must survive; a reset counts as a loss), the destination reset when it holds a partial
state; then the guest verifies the source's state and traffic as after a migration.

Servers are in-process (trio tasks of this process), which keeps a migration in the
millisecond range and lets the harness reach into devices (arc faults, state digests). A
"killed" server is one whose task is cancelled: its listening socket and connection close
at once and its device is discarded, which is what its clients see of a crashed process.
Only the destination may be killed: the source holds the VM's only copy of the state.

Resources (RSS, open fds, threads, trio tasks) are sampled every few migrations and
reported with their least-squares slope per 1000 migrations; a leak shows as a slope. RSS
alone misleads: it moves by hundreds of kB between samples (guest RAM pages the servers map
become resident as devices touch them; malloc keeps freed blocks, see
:mod:`emulator.allocator`), so a short run's RSS slope is mostly noise and warm-up. The
anonymous part of RSS (the heaps, without guest RAM) and the count of live Python objects
are reported beside it: a leak of Python objects keeps that count growing.
"""

from __future__ import annotations

import argparse
import enum
import errno
import gc
import hashlib
import json
import logging
import math
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO, cast

import trio

from devices import testdev as td
from devices.api import Device
from devices.e1000 import E1000, E1000Options
from devices.e1000 import regs as e1000_regs
from devices.errors import DeviceError
from devices.migration.stream import Section
from devices.net import NetDevice, announcement
from devices.testdev import TestDev
from devices.virtio_net import VirtioNet, VirtioNetOptions
from emulator.cli_common import SIGNAL_EXIT, HelpFormatter, enum_list_arg, positive_int_arg
from emulator.client import Client, ClientError
from emulator.client.migrate import (
    DATA_FD_CAPABILITIES,
    MODES,
    TRANSPORTS,
    MigrationError,
    MigrationReport,
    Mode,
    Transport,
    get_state,
    migrate,
    set_state,
)
from emulator.server import DeviceServer
from emulator.testing.guest_e1000 import DriverConfig, E1000Guest
from emulator.testing.guest_virtio_net import GuestConfig, VirtioNetGuest
from emulator.testing.harness import EventFd, GuestRam, NicGuest, enable_bus_master, find_capability
from protocol.constants import Command, IrqIndex, IrqSetFlags, MigState
from protocol.header import HEADER, Header, pack_message

__all__ = [
    "Cut",
    "FaultKind",
    "FaultySocket",
    "SoakConfig",
    "SoakResult",
    "device_digest",
    "run_soak",
]

DEVICES = ("testdev", "e1000", "virtio-net")
BAR0, CONFIG = 0, 7
TRIGGER_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
#: Seconds a guest waits for an interrupt, a DMA copy or traffic before calling it lost.
GUEST_TIMEOUT = 5.0
#: Seconds to get a fresh connection accepted (the server may still be tearing down the
#: previous one, and answers EBUSY meanwhile).
CONNECT_TIMEOUT = 5.0
#: Resources are sampled every this many migrations.
SAMPLE_EVERY = 20
PRECOPY_ROUNDS = 3
#: Frames each e1000 direction must deliver after a migration to prove the flow goes on.
E1000_PROGRESS = 20
#: Frames each e1000 direction may have in flight.
E1000_WINDOW = 128


class SoakFailure(Exception):
    """The harness itself cannot go on (a recovery that failed, a stuck guest)."""


# =============================================================================================
# Faults


class FaultKind(enum.Enum):
    CUT_SOURCE = "cut-source"  # the source connection closes at a message boundary
    CUT_DESTINATION = "cut-destination"  # the destination connection closes likewise
    TRUNCATE_MESSAGE = "truncate-message"  # half a message, then the connection closes
    CORRUPT_STREAM = "corrupt-stream"  # a byte of migration data flipped on its way
    TRUNCATE_STREAM = "truncate-stream"  # migration data to the destination cut short
    KILL_CLIENT = "kill-client"  # both connections close at once; the driver is gone
    KILL_SERVER = "kill-server"  # the destination server dies (and is restarted)
    FAIL_ARC = "fail-arc"  # a device arc fails (DeviceError) on either side


#: Faults that need the migration data to travel in MIG_DATA_WRITE messages.
STREAM_FAULTS = (FaultKind.CORRUPT_STREAM, FaultKind.TRUNCATE_STREAM)


class Cut(enum.Enum):
    """What a :class:`FaultySocket` does to the message it was armed for."""

    BEFORE = "before"  # close the connection instead of sending it
    AFTER = "after"  # send it, then close the connection
    HALF = "half"  # send half of it, then close the connection
    CORRUPT = "corrupt"  # flip one byte of its MIG_DATA payload
    SHORTEN = "shorten"  # send only the first half of its MIG_DATA payload
    PASS = "pass"  # send it unchanged (the trigger's action is the fault)


@dataclass(slots=True)
class Trigger:
    at: int  # the message (counted from 0 after arming, among those ``command`` selects)
    cut: Cut
    command: int | None = None
    then: Callable[[], None] | None = None  # e.g. kill a server, close the other side
    fired: bool = False


class FaultySocket:
    """A trio socket stand-in for :class:`emulator.client.Client` that sees each outgoing
    message whole and can act at a chosen one (:class:`Cut`).

    The client sends every message with one ``sendmsg`` carrying all of it (gathered from
    its parts, which this joins; then more only if the kernel took part), so a message
    starts whenever the previous one is complete.
    ``log`` records the commands sent since arming (for enumerating message boundaries).
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._rest = 0  # bytes of the current message still to be sent
        self.trigger: Trigger | None = None
        self.counted = 0
        self.log: list[int] = []
        self.recording = False
        self.was_cut = False

    def arm(self, trigger: Trigger | None, *, record: bool = True) -> None:
        """Act at ``trigger`` (None: at no message); ``record`` the commands sent."""
        self.trigger = trigger
        self.counted = 0
        self.log = []
        self.recording = record

    def cut(self) -> None:
        """Close the connection now, as a dying peer's kernel would."""
        if not self.was_cut:
            self.was_cut = True
            self._sock.close()

    async def sendmsg(self, buffers: Sequence[Any], *args: Any) -> int:
        if self.was_cut:
            raise OSError(errno.EPIPE, "connection cut by fault injection")
        # The client gathers a message from several buffers (header, then data): whole.
        view = memoryview(buffers[0] if len(buffers) == 1 else b"".join(buffers)).cast("B")
        if self._rest:  # the rest of a partly sent message
            sent = int(await self._sock.sendmsg([view], *args))
            self._rest -= sent
            return sent
        header = Header.unpack(bytes(view[: HEADER.size]))
        if self.recording:
            self.log.append(header.command)
        trigger = self.trigger
        if trigger is not None and not trigger.fired and self._selects(trigger, header.command):
            if self.counted == trigger.at:
                return await self._fire(trigger, header, view, args)
            self.counted += 1
        self._rest = len(view)
        sent = int(await self._sock.sendmsg([view], *args))
        self._rest -= sent
        return sent

    @staticmethod
    def _selects(trigger: Trigger, command: int) -> bool:
        return trigger.command is None or trigger.command == command

    async def _fire(
        self, trigger: Trigger, header: Header, view: memoryview, args: tuple[Any, ...]
    ) -> int:
        trigger.fired = True
        cut = trigger.cut
        if trigger.then is not None:
            trigger.then()
        if cut == Cut.BEFORE:
            self.cut()
            raise OSError(errno.ECONNRESET, "connection cut before a message")
        if cut in (Cut.CORRUPT, Cut.SHORTEN):
            await self._send_whole(self._tampered(cut, header, view), args)
            return len(view)
        if cut == Cut.PASS:
            await self._send_whole(view, args)
            return len(view)
        if cut == Cut.HALF:
            await self._send_whole(view[: max(1, len(view) // 2)], args)
            self.cut()
            raise OSError(errno.EPIPE, "connection cut in the middle of a message")
        await self._send_whole(view, args)  # Cut.AFTER
        self.cut()
        return len(view)

    async def _send_whole(self, data: memoryview | bytes, args: tuple[Any, ...]) -> None:
        view = memoryview(data).cast("B")
        sent = int(await self._sock.sendmsg([view], *args))
        while sent < len(view):
            sent += int(await self._sock.sendmsg([view[sent:]]))

    @staticmethod
    def _tampered(cut: Cut, header: Header, view: memoryview) -> bytes:
        """A MIG_DATA_WRITE with one data byte flipped, or carrying half its data."""
        payload = bytes(view[HEADER.size :])
        data = payload[8:]
        if not data:
            return bytes(view)
        if cut == Cut.CORRUPT:
            spot = random.randrange(len(data))
            data = data[:spot] + bytes([data[spot] ^ 0x5A]) + data[spot + 1 :]
        else:
            data = data[: len(data) // 2]
        body = struct.pack("<II", 8 + len(data), len(data)) + data
        return pack_message(header.msg_id, header.command, body, header.flags)

    async def recvmsg(self, *args: Any) -> Any:
        return await self._sock.recvmsg(*args)

    async def recvmsg_into(self, *args: Any) -> Any:
        return await self._sock.recvmsg_into(*args)

    def close(self) -> None:
        self._sock.close()


@dataclass(slots=True)
class Fault:
    kind: FaultKind
    side: str  # "source" / "destination"
    at: int  # message index, or arc index for FAIL_ARC
    cut: Cut | None = None
    fired: bool = False

    def describe(self) -> str:
        how = f" {self.cut.value}" if self.cut is not None else ""
        unit = "arc" if self.kind == FaultKind.FAIL_ARC else "message"
        return f"{self.kind.value} ({self.side}{how}, {unit} {self.at})"


class FaultPlanner:
    """Chooses faults: which kind, which side, at which message or arc (seeded)."""

    def __init__(
        self,
        rate: float,
        rng: random.Random,
        kinds: Sequence[FaultKind],
    ) -> None:
        self.rate = rate
        self.rng = rng
        self.kinds = list(kinds)
        #: Messages a migration sends on each side (learnt from clean migrations).
        self.messages = {"source": 8, "destination": 8}
        self.data_writes = 1
        self.arcs = {"source": 3, "destination": 4}

    def learn(
        self, source_log: list[int], destination_log: list[int], arcs: dict[str, int]
    ) -> None:
        """Fit the fault points to what a clean migration sends and runs."""
        self.messages["source"] = max(self.messages["source"], len(source_log))
        self.messages["destination"] = len(destination_log)  # no guest traffic there
        self.data_writes = max(1, destination_log.count(Command.MIG_DATA_WRITE))
        for side, count in arcs.items():
            self.arcs[side] = max(1, count)

    def choose(self) -> Fault | None:
        if not self.kinds or self.rng.random() >= self.rate:
            return None
        rng = self.rng
        kind = rng.choice(self.kinds)
        if kind in (FaultKind.CUT_SOURCE, FaultKind.CUT_DESTINATION):
            side = "source" if kind == FaultKind.CUT_SOURCE else "destination"
            cut = rng.choice((Cut.BEFORE, Cut.AFTER))
            return Fault(kind, side, self._message(side, after=cut == Cut.AFTER), cut)
        if kind == FaultKind.TRUNCATE_MESSAGE:
            side = rng.choice(("source", "destination"))
            return Fault(kind, side, rng.randrange(self.messages[side]), Cut.HALF)
        if kind in STREAM_FAULTS:
            cut = Cut.CORRUPT if kind == FaultKind.CORRUPT_STREAM else Cut.SHORTEN
            return Fault(kind, "destination", rng.randrange(self.data_writes), cut)
        if kind == FaultKind.KILL_CLIENT:
            side = rng.choice(("source", "destination"))
            return Fault(kind, side, rng.randrange(self.messages[side]), Cut.BEFORE)
        if kind == FaultKind.KILL_SERVER:
            return Fault(kind, "destination", self._message("destination", after=True), Cut.PASS)
        side = rng.choice(("source", "destination"))
        return Fault(kind, side, rng.randrange(self.arcs[side]))

    def _message(self, side: str, *, after: bool) -> int:
        """A message index on ``side``. Never just after the destination's last message:
        that SET RUNNING completes the migration on the device, and a destination that
        runs the VM while the source resumes too is a split brain no recovery can undo
        (both would drive the guest's memory and wire)."""
        count = self.messages[side]
        if after and side == "destination":
            count -= 1
        return self.rng.randrange(max(count, 1))


# =============================================================================================
# Servers and connections


class ServerSlot:
    """One in-process server; :meth:`kill` is a crash, :meth:`restart` a supervisor."""

    def __init__(
        self, name: str, path: Path, make_device: Callable[[], Device], nursery: trio.Nursery
    ) -> None:
        self.name = name
        self.path = path
        self.make_device = make_device
        self.nursery = nursery
        self.device = make_device()
        self.scope: trio.CancelScope | None = None
        self.stopped = trio.Event()
        self.dead = False
        self.kills = 0

    async def start(self) -> None:
        self.stopped = trio.Event()
        self.dead = False
        await self.nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as scope:
                self.scope = scope
                await DeviceServer(self.device, socket_path=self.path).serve(
                    task_status=task_status
                )
        finally:
            self.stopped.set()

    def kill(self) -> None:
        """A crash: the task ends at its next checkpoint, closing socket and connection."""
        self.kills += 1
        self.dead = True
        if self.scope is not None:
            self.scope.cancel()

    async def restart(self) -> None:
        """A fresh device behind the same socket path (what a supervisor does)."""
        if self.scope is not None:
            self.scope.cancel()
        await self.stopped.wait()
        # What the dead process's exit would have released: a half-received migration
        # stream's staging memfd (the device object itself is dropped).
        self.device.migration.reset()
        self.device = self.make_device()
        await self.start()

    async def stop(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
        await self.stopped.wait()


class Link:
    """One client connection, run in its own task so links open and close in any order."""

    def __init__(self, slot: ServerSlot, capabilities: dict[str, Any] | None) -> None:
        self.slot = slot
        self.capabilities = capabilities
        self.sock: FaultySocket | None = None
        self._client: Client | None = None
        self._close = trio.Event()
        self.done = trio.Event()

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    async def open(self, nursery: trio.Nursery) -> Link:
        with trio.fail_after(CONNECT_TIMEOUT):
            while True:
                try:
                    await nursery.start(self._run)
                    return self
                except (OSError, ClientError) as exc:
                    # EBUSY while the server tears the old session down; ENOENT / ECONNREFUSED
                    # while a restarted server comes up.
                    if not _retryable(exc):
                        raise
                    self.done = trio.Event()
                    await trio.sleep(0.002)

    async def _run(self, *, task_status: trio.TaskStatus[Link]) -> None:
        try:
            raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await raw.connect(os.fspath(self.slot.path))
            except BaseException:
                raw.close()
                raise
            self.sock = FaultySocket(raw)
            sock = cast(trio.socket.SocketType, self.sock)
            async with Client.from_socket(sock, capabilities=self.capabilities) as client:
                self._client = client
                # The server accepts the next client only after a first command of ours
                # succeeded, so an EBUSY refusal shows here rather than later.
                await client.get_info()
                task_status.started(self)
                await self._close.wait()
        finally:
            self.done.set()

    async def close(self) -> None:
        self._close.set()
        if self._client is not None:
            await self._client.aclose()
        await self.done.wait()


def _retryable(exc: BaseException) -> bool:
    code = getattr(exc, "errno", None)
    return code in (errno.EBUSY, errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE)


async def usable(link: Link | None) -> bool:
    """Whether a link still answers (a cheap GET of the device state)."""
    if link is None or link.sock is None or link.sock.was_cut:
        return False
    try:
        with trio.fail_after(GUEST_TIMEOUT):
            await get_state(link.client)
    except (ClientError, trio.TooSlowError):
        return False
    return True


# =============================================================================================
# Verification helpers


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    return b"".join(bytes(piece) for piece in payload)


def device_digest(device: Device) -> str:
    """A digest of everything a migration carries: config space, interrupt state and every
    section of the device's own state (taken while the device is stopped)."""
    digest = hashlib.sha256()
    digest.update(device.config.snapshot())
    digest.update(device.irq.snapshot())
    sections: Sequence[Section] = device.save_state()
    for name, payload in sections:
        digest.update(name.encode())
        digest.update(_payload_bytes(payload))
    return digest.hexdigest()


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _trio_tasks() -> int:
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def _trio_deadline_leftovers() -> int:
    """Objects trio's deadline heap holds after use: each expired or exited deadline stays
    as a tuple with its cancel scope until they outnumber the live deadlines by 1000 (then
    it prunes), so up to ~2000 objects come and go that are no leak. Private trio state,
    read defensively: 0 when it is not there."""
    run_module = getattr(getattr(trio, "_core", None), "_run", None)
    runner = getattr(getattr(run_module, "GLOBAL_RUN_CONTEXT", None), "runner", None)
    deadlines = getattr(runner, "deadlines", None)
    heap, live = getattr(deadlines, "_heap", None), getattr(deadlines, "_active", None)
    if not isinstance(heap, list) or not isinstance(live, int):
        return 0
    return 2 * max(0, len(heap) - live)


@dataclass(slots=True)
class ResourceSample:
    migrations: int
    rss_kb: int
    #: Private anonymous pages (the heaps): RSS without the guest RAM the servers map
    #: (shared pages, resident as the devices touch them) and without file pages.
    anon_kb: int
    #: Python objects alive (gc-tracked), the harness's own samples and trio's deadline
    #: leftovers left out. RSS moves with the allocator (freed blocks kept, fragmentation)
    #: and is noisy by hundreds of kB; a leak of Python objects shows here as a count that
    #: keeps growing.
    py_objects: int
    fds: int
    threads: int
    tasks: int


def sample_resources(migrations: int, samples_held: int = 0) -> ResourceSample:
    """``samples_held``: ResourceSamples the caller keeps (not counted as objects)."""
    gc.collect()  # count what is alive, not garbage waiting for the cycle collector
    return ResourceSample(
        migrations=migrations,
        rss_kb=_status_kb("VmRSS"),
        anon_kb=_status_kb("RssAnon"),
        py_objects=len(gc.get_objects()) - samples_held - _trio_deadline_leftovers(),
        fds=len(os.listdir("/proc/self/fd")),
        threads=_status_kb("Threads"),
        tasks=_trio_tasks(),
    )


# =============================================================================================
# The VM: which server runs its device, and the connections to both


class Gate:
    """Parks the guest (the VM paused for the stop phase of a migration)."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.open.set()
        self.parked = trio.Event()
        #: The guest waits for its connection to come back: it is not running either.
        self.stalled = False

    async def check(self) -> None:
        while not self.open.is_set():  # (closed again before this task ran: park again)
            self.parked.set()
            await self.open.wait()

    async def close(self) -> None:
        """Returns once the guest is parked (each close waits for its own park)."""
        self.open = trio.Event()
        self.parked = trio.Event()
        if not self.stalled:
            await self.parked.wait()

    def reopen(self) -> None:
        self.open.set()


class Vm:
    """The migrating VM's view: two server slots, a link to each, the one it runs on."""

    def __init__(self, slots: list[ServerSlot], capabilities: dict[str, Any] | None) -> None:
        self.slots = slots
        self.capabilities = capabilities
        self.links: list[Link | None] = [None, None]
        self.current = 0
        self.changed = trio.Event()
        self.gate = Gate()

    @property
    def client(self) -> Client:
        link = self.links[self.current]
        assert link is not None
        return link.client

    @property
    def device(self) -> Device:
        return self.slots[self.current].device

    def notify(self) -> None:
        """The guest's connection changed (migrated or reconnected)."""
        self.changed.set()
        self.changed = trio.Event()

    async def wait_replaced(self, old: Client) -> Client:
        """Wait until the guest's connection is no longer ``old`` (after a fault)."""
        self.gate.stalled = True
        self.gate.parked.set()  # (a close() already waiting for the guest returns)
        try:
            with trio.fail_after(60):
                while self.client is old:
                    await self.changed.wait()
        finally:
            self.gate.stalled = False
        await self.gate.check()  # the VM may have been stopped meanwhile
        return self.client


class Guest(Protocol):
    """What a device workload provides to the soak."""

    def make_device(self) -> Device: ...

    async def start(self, vm: Vm, nursery: trio.Nursery) -> None: ...

    async def realize(self, client: Client) -> None: ...

    def switched(self, vm: Vm) -> None: ...

    def device_restarted(self, slot: ServerSlot) -> None: ...

    async def verify(self) -> None: ...

    async def stop(self) -> None: ...

    def losses(self) -> list[str]: ...

    def stats(self) -> dict[str, Any]: ...


# =============================================================================================
# testdev: registers, RAM BAR, doorbells, DMA copies with interrupts


GUEST_RAM_BASE = 0x100000
GUEST_RAM_SIZE = 0x40000
COPY_AREA = 0x10000
MSIX_VECTORS = 4
CAP_ID_MSIX = 0x11
DMA_VECTOR = 2
#: Operations the testdev guest runs between two migrations (besides its check).
OPS_BETWEEN = 4


class TestdevGuest:
    """A guest driver keeping a model of everything it did to the device."""

    __test__ = False

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ram = GuestRam(GUEST_RAM_SIZE, base=GUEST_RAM_BASE)
        self.msix = [EventFd() for _ in range(MSIX_VECTORS)]
        self.scratch = [0] * td.SCRATCH_COUNT
        self.bar = bytearray(td.TestDevOptions().ram_size)
        self.irqs = 0  # interrupts the device must have raised (IRQ_COUNT)
        self.copies = 0  # DMA copies completed (DMA_DONE)
        self.ops = Counter[str]()
        self._losses: list[str] = []
        self._verify_wanted: trio.Event | None = None
        self._ops_done = trio.Event()
        self._op = ""
        self._interrupted: list[str] = []
        self._stop = False
        self._done = trio.Event()
        self.vm: Vm | None = None

    def make_device(self) -> Device:
        return TestDev()

    # -- set-up ------------------------------------------------------------------------------
    async def start(self, vm: Vm, nursery: trio.Nursery) -> None:
        self.vm = vm
        client = vm.client
        await enable_bus_master(client)
        cap = await find_capability(client, CAP_ID_MSIX)
        if cap is None:
            raise SoakFailure("testdev has no MSI-X capability")
        for vector in range(MSIX_VECTORS):
            entry = struct.pack("<IIII", 0xFEE00000 + 0x10 * vector, 0, 0x4000 + vector, 0)
            await client.region_write(td.BAR_MSIX, 16 * vector, entry)
        control = int.from_bytes(await client.region_read(CONFIG, cap + 2, 2), "little")
        await client.region_write(CONFIG, cap + 2, (control | 0x8000).to_bytes(2, "little"))
        nursery.start_soon(self._run)

    async def realize(self, client: Client) -> None:
        """What the VMM does on every server the VM may run on: guest RAM, MSI-X eventfds."""
        await client.dma_map(self.ram.base, self.ram.size, fd=self.ram.fd)
        fds = [fd.fd for fd in self.msix]
        await client.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 0, MSIX_VECTORS, fds=fds)

    def switched(self, vm: Vm) -> None:
        vm.notify()

    def device_restarted(self, slot: ServerSlot) -> None:
        return None

    # -- the guest's loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        assert self.vm is not None
        ops = (self._scratch_op, self._bar_op, self._doorbell_op, self._dma_op)
        try:
            while not self._stop:
                await self.vm.gate.check()
                if self._verify_wanted is not None:
                    await self._check_model()
                    self._verify_wanted.set()
                    self._verify_wanted = None
                    continue
                op = self.rng.choice(ops)
                self._op = op.__name__
                await op()
                await trio.sleep(0)
        finally:
            self._done.set()

    async def _request(self, call: Callable[[Client], Any], *, retry: bool = True) -> Any:
        """One request on the VM's current connection. When a fault takes the connection,
        wait for the harness to reconnect; then send it again (``retry``, for idempotent
        requests) or raise :class:`_Reconnected` (the caller finds out what happened)."""
        assert self.vm is not None
        client = self.vm.client
        while True:
            try:
                return await call(client)
            except ClientError:
                if not _connection_gone(self.vm, client):
                    raise
                client = await self.vm.wait_replaced(client)
                # (which operation a fault interrupted: named in any loss found next)
                self._interrupted.append(f"{self._op} {'retried' if retry else 'resolved'}")
                if not retry:
                    raise _Reconnected from None

    async def _read32(self, offset: int) -> int:
        data = await self._request(lambda c: c.region_read(BAR0, offset, 4))
        return int.from_bytes(data, "little")

    async def _write32(self, offset: int, value: int) -> None:
        data = value.to_bytes(4, "little")
        await self._request(lambda c: c.region_write(BAR0, offset, data))

    async def _scratch_op(self) -> None:
        index = self.rng.randrange(td.SCRATCH_COUNT)
        value = self.rng.getrandbits(32)
        await self._write32(td.REG_SCRATCH + 4 * index, value)
        self.scratch[index] = value
        self.ops["scratch"] += 1
        self._ops_done.set()

    async def _bar_op(self) -> None:
        offset = self.rng.randrange(0, len(self.bar) - 64)
        data = self.rng.randbytes(self.rng.randrange(1, 64))
        await self._request(lambda c: c.region_write(td.BAR_RAM, offset, data))
        self.bar[offset : offset + len(data)] = data
        self.ops["ram-bar"] += 1
        self._ops_done.set()

    async def _doorbell_op(self) -> None:
        """Ring vector v; exactly one interrupt must arrive on its eventfd. A doorbell
        whose reply was lost to a fault may or may not have rung: IRQ_COUNT tells."""
        vector = self.rng.choice((0, 1, 3))
        ring = vector.to_bytes(4, "little")
        try:
            await self._request(lambda c: c.region_write(BAR0, td.REG_DOORBELL, ring), retry=False)
        except _Reconnected:
            if await self._read32(td.REG_IRQ_COUNT) == self.irqs:  # it never rang
                await self._write32(td.REG_DOORBELL, vector)
        self.irqs += 1
        await self._interrupt(vector)
        await self._write32(td.REG_IRQ_STATUS, 1 << vector)
        self.ops["doorbell"] += 1
        self._ops_done.set()

    async def _interrupt(self, vector: int) -> None:
        fd = self.msix[vector]
        try:
            count = await fd.wait(GUEST_TIMEOUT)
        except trio.TooSlowError:
            self._loss(f"interrupt on vector {vector} never arrived")
            return
        if count != 1:
            self._loss(f"vector {vector}: {count} interrupts for one cause")

    async def _dma_op(self) -> None:
        size = self.rng.randrange(64, 8192)
        src = self.ram.base + self.rng.randrange(0, COPY_AREA - size)
        dst = self.ram.base + COPY_AREA + self.rng.randrange(0, COPY_AREA - size)
        data = self.rng.randbytes(size)
        self.ram.write(src, data)
        self.ram.write(dst, bytes(size))
        for offset, value in (
            (td.REG_DMA_SRC, src & 0xFFFFFFFF),
            (td.REG_DMA_SRC + 4, src >> 32),
            (td.REG_DMA_DST, dst & 0xFFFFFFFF),
            (td.REG_DMA_DST + 4, dst >> 32),
            (td.REG_DMA_LEN, size),
        ):
            await self._write32(offset, value)
        ctrl = (td.DMA_CTRL_START | td.DMA_CTRL_IRQ | DMA_VECTOR << 8).to_bytes(4, "little")
        try:
            await self._request(lambda c: c.region_write(BAR0, td.REG_DMA_CTRL, ctrl), retry=False)
        except _Reconnected:
            await self._resolve_copy(ctrl)
        assert self.vm is not None
        await self.vm.gate.check()  # the VM may stop with the copy in flight
        with trio.move_on_after(GUEST_TIMEOUT) as waited:
            while (status := await self._read32(td.REG_DMA_STATUS)) == td.DMA_BUSY:
                await trio.sleep(0.0002)
        if waited.cancelled_caught:
            self._loss("DMA copy never completed (DMA_STATUS stays BUSY)")
            return
        if status != td.DMA_DONE:
            self._loss(f"DMA copy failed: status {status}")
            return
        self.copies += 1
        self.irqs += 1
        await self._interrupt(DMA_VECTOR)
        await self._write32(td.REG_IRQ_STATUS, 1 << DMA_VECTOR)
        if self.ram.read(dst, size) != data:
            self._loss("DMA copy delivered wrong data")
        self.ops["dma"] += 1
        self._ops_done.set()

    async def _resolve_copy(self, ctrl: bytes) -> None:
        """A fault took the connection around the DMA_CTRL write: find out what became of
        the copy and start it (again) unless it is running or done."""
        status = await self._read32(td.REG_DMA_STATUS)
        if status == td.DMA_BUSY or await self._read32(td.REG_DMA_DONE) != self.copies:
            return  # running (or resubmitted for this connection), or completed
        if status == td.DMA_FAILED:
            # It ran and failed when its client vanished mid-DMA: the device raised its
            # completion interrupt (delivered or not, the client being gone) and the
            # driver acknowledges it, then retries.
            self.irqs += 1
            await self._write32(td.REG_IRQ_STATUS, 1 << DMA_VECTOR)
            self.msix[DMA_VECTOR].take()
        await self._request(lambda c: c.region_write(BAR0, td.REG_DMA_CTRL, ctrl))

    # -- verification ------------------------------------------------------------------------
    def _loss(self, what: str) -> None:
        if self._interrupted:
            what += f" (after a fault interrupted: {', '.join(self._interrupted[-3:])})"
        self._losses.append(what)

    async def _check_model(self) -> None:
        """The device holds exactly what this guest did to it (called between operations,
        so nothing is in flight)."""
        done = await self._read32(td.REG_DMA_DONE)
        count = await self._read32(td.REG_IRQ_COUNT)
        status = await self._read32(td.REG_IRQ_STATUS)
        if done != self.copies:
            self._loss(f"DMA_DONE {done}, the guest completed {self.copies} copies")
            self.copies = done
        if count != self.irqs:
            self._loss(f"IRQ_COUNT {count}, the guest caused {self.irqs} interrupts")
            self.irqs = count
        if status:
            self._loss(f"IRQ_STATUS {status:#x} with every interrupt acknowledged")
            await self._write32(td.REG_IRQ_STATUS, status)
        for index, value in enumerate(self.scratch):
            actual = await self._read32(td.REG_SCRATCH + 4 * index)
            if actual != value:
                self._loss(f"SCRATCH{index} {actual:#x}, written {value:#x}")
                self.scratch[index] = actual
        bar = await self._request(lambda c: c.region_read(td.BAR_RAM, 0, len(self.bar)))
        if bar != self.bar:
            self._loss("RAM BAR contents differ from what the guest wrote")
            self.bar[:] = bar
        stray = [fd.take() for fd in self.msix]
        if any(stray):
            self._loss(f"interrupts nobody caused: {stray}")
        self._interrupted.clear()

    async def verify(self) -> None:
        """The guest checks its model at its next operation boundary; then it runs
        OPS_BETWEEN more operations before the harness migrates again."""
        wanted = trio.Event()
        self._verify_wanted = wanted
        with trio.fail_after(60):
            await wanted.wait()
            target = self.ops.total() + OPS_BETWEEN
            while self.ops.total() < target and not self._done.is_set():
                self._ops_done = trio.Event()
                await self._ops_done.wait()

    async def stop(self) -> None:
        self._stop = True
        with trio.fail_after(30):
            await self._done.wait()
        for fd in self.msix:
            fd.close()
        self.ram.close()

    def losses(self) -> list[str]:
        return self._losses

    def stats(self) -> dict[str, Any]:
        return {"operations": dict(self.ops), "dma_copies": self.copies, "interrupts": self.irqs}


class _Reconnected(Exception):
    """A non-idempotent request met a fault; the connection has been replaced."""


def _connection_gone(vm: Vm, client: Client) -> bool:
    for link in vm.links:
        if link is not None and link._client is client:
            return link.sock is None or link.sock.was_cut or client.closed
    return True  # no longer any link's client: replaced meanwhile


# =============================================================================================
# e1000: a frame flow between two wired NICs


MAC_A = bytes.fromhex("525400000a01")
MAC_B = bytes.fromhex("525400000b01")
RAM_BASE_E1000 = 0x40000000
ETHERTYPE_SOAK = 0x88B5


class CablePort:
    """The NetPort of one device on one end of :class:`Cable`."""

    def __init__(self, cable: Cable, side: str, device: NetDevice) -> None:
        self.cable = cable
        self.side = side
        self.device = device
        self.accepting = True

    def transmit(self, frame: bytes) -> bool:
        # The wire belongs to the VM: whichever of its devices sends, the frame goes out.
        self.cable.carry(self.side, frame)
        return True

    def set_accepting(self, accepting: bool) -> None:
        self.accepting = accepting
        if self.cable.active[self.side] is self:
            self.cable.drain(self.side)


class Cable:
    """Two NIC ends wired back to back, in this process. Frames for an end queue (in
    order, unbounded) while its active device does not accept; :meth:`switch` moves an
    end to another device (the wire follows the migrated VM), and devices that are not
    active on an end never receive from it (a reset destination cannot steal frames)."""

    def __init__(self) -> None:
        self.active: dict[str, CablePort | None] = {"a": None, "b": None}
        self.queues: dict[str, deque[bytes]] = {"a": deque(), "b": deque()}
        self._draining = {"a": False, "b": False}
        self.carried = 0

    def plug(self, side: str, device: NetDevice) -> CablePort:
        port = CablePort(self, side, device)
        device.attach_net(port)
        return port

    def switch(self, side: str, port: CablePort) -> None:
        self.active[side] = port
        self.drain(side)

    def carry(self, side: str, frame: bytes) -> None:
        other = "b" if side == "a" else "a"
        self.carried += 1
        self.queues[other].append(frame)
        self.drain(other)

    def drain(self, side: str) -> None:
        if self._draining[side]:
            return
        self._draining[side] = True
        try:
            queue = self.queues[side]
            while queue:
                port = self.active[side]
                if port is None or not port.accepting:
                    return
                port.device.net_receive(queue.popleft())
        finally:
            self._draining[side] = False


def numbered_frame(dst: bytes, src: bytes, seq: int) -> bytes:
    size = 60 + (seq * 97) % 1455  # 60 .. 1514 bytes
    body = dst + src + struct.pack(">HI", ETHERTYPE_SOAK, seq)
    return body + bytes([seq & 0xFF]) * (size - len(body))


def frame_seq(frame: bytes) -> int | None:
    if len(frame) < 20 or struct.unpack_from(">H", frame, 12)[0] != ETHERTYPE_SOAK:
        return None
    seq = int(struct.unpack_from(">I", frame, 14)[0])
    if frame[18:] != bytes([seq & 0xFF]) * (len(frame) - 18):
        return None
    return seq


class FlowCheck:
    """One direction of the flow: every frame exactly once, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent = 0
        self.expected = 0
        self.received = 0
        self.announcements = 0  # a migrated-in NIC's MAC announcements (not flow frames)
        self.problems: list[str] = []

    def receive(self, frame: bytes) -> None:
        if frame == announcement(frame[6:12]):
            self.announcements += 1
            return
        seq = frame_seq(frame)
        if seq is None:
            self.problems.append(f"{self.name}: a damaged or foreign frame")
            return
        if seq != self.expected:
            what = "duplicated or reordered" if seq < self.expected else "lost"
            self.problems.append(f"{self.name}: got frame {seq}, expected {self.expected} ({what})")
        self.expected = max(self.expected, seq + 1)
        self.received += 1


class E1000Flow:
    """Guest A (fixed NIC) and guest B (the migrating NIC) exchanging numbered frames."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.cable = Cable()
        # Rings that hold a whole window: a NIC whose ring is full drops (MPC), as it must.
        self.config = DriverConfig(rx_count=256, tx_count=256, itr=0)
        ram_needed = self._ram_needed()
        self.ram_a = GuestRam(ram_needed, base=RAM_BASE_E1000)
        self.ram_b = GuestRam(ram_needed, base=RAM_BASE_E1000)
        self.ab = FlowCheck("A->B")
        self.ba = FlowCheck("B->A")
        self.ports: dict[int, CablePort] = {}  # id(device) -> its port on end b
        self.device_a = self._nic(MAC_A)
        self.port_a = self.cable.plug("a", cast(NetDevice, self.device_a))
        self.cable.switch("a", self.port_a)
        self.slot_a: ServerSlot | None = None
        self.link_a: Link | None = None
        self.a: NicGuest | None = None
        self.b: NicGuest | None = None
        self.vm: Vm | None = None
        self._stop = False
        self._sending = True
        self._tasks_done = 0
        self._all_done = trio.Event()

    # -- what differs between NICs ---------------------------------------------------------
    def _ram_needed(self) -> int:
        return self.config.ram_needed()

    def _nic(self, mac: bytes) -> Device:
        return E1000(E1000Options(mac=mac))

    async def _bring_up(self, client_a: Client, client_b: Client) -> tuple[NicGuest, NicGuest]:
        a = E1000Guest(client_a, self.ram_a, None, self.config)
        b = E1000Guest(client_b, self.ram_b, None, self.config)
        await a.map_memory()  # (B's memory was mapped when its links were realized)
        for guest in (a, b):
            await guest.probe()
        async with trio.open_nursery() as bring_up:
            bring_up.start_soon(a.open)
            bring_up.start_soon(b.open)
        return a, b

    async def _b_rearm(self, b: NicGuest) -> None:
        """Posted tail writes may have died with the connection: write them again."""
        assert isinstance(b, E1000Guest)
        count = b.config.rx_count
        await b.write(e1000_regs.RDT, (b.rx_filled_to - 1) % count)
        await b.flush_tx()

    def make_device(self) -> Device:
        device = self._nic(MAC_B)
        self.ports[id(device)] = self.cable.plug("b", cast(NetDevice, device))
        return device

    def device_restarted(self, slot: ServerSlot) -> None:
        """make_device plugged the fresh device (inactive until switched to); the dead
        one's port goes, or every restart would keep a device alive."""
        assert self.vm is not None
        alive = {id(each.device) for each in self.vm.slots}
        for key in [key for key in self.ports if key not in alive]:
            del self.ports[key]

    async def start(self, vm: Vm, nursery: trio.Nursery) -> None:
        self.vm = vm
        directory = vm.slots[0].path.parent
        self.slot_a = ServerSlot("nic-a", directory / "nic-a.sock", lambda: self.device_a, nursery)
        await self.slot_a.start()
        self.link_a = await Link(self.slot_a, None).open(nursery)
        self.cable.switch("b", self.ports[id(vm.device)])
        self.a, self.b = await self._bring_up(self.link_a.client, vm.client)
        nursery.start_soon(self._guarded, self._a_sends)
        nursery.start_soon(self._guarded, self._a_receives)
        nursery.start_soon(self._guarded, self._b_runs)

    async def realize(self, client: Client) -> None:
        await client.dma_map(self.ram_b.base, self.ram_b.size, fd=self.ram_b.fd)

    def switched(self, vm: Vm) -> None:
        self.cable.switch("b", self.ports[id(vm.device)])
        vm.notify()

    async def _guarded(self, task: Callable[[], Any]) -> None:
        try:
            await task()
        finally:
            self._tasks_done += 1
            if self._tasks_done == 3:
                self._all_done.set()

    async def _a_sends(self) -> None:
        a = self.a
        assert a is not None
        while not self._stop:
            if not self._sending or self.ab.sent - self.ab.received >= E1000_WINDOW:
                await trio.sleep(0.0005)
                continue
            a.reclaim_tx()
            queued = 0
            while queued < 16 and self.ab.sent - self.ab.received < E1000_WINDOW:
                if not a.queue(numbered_frame(MAC_B, MAC_A, self.ab.sent)):
                    break
                self.ab.sent += 1
                queued += 1
            if queued:
                await a.flush_tx()
            await trio.sleep(0.0002)

    async def _a_receives(self) -> None:
        a = self.a
        assert a is not None
        while not self._stop:
            frames = a.poll_rx()
            for frame in frames:
                self.ba.receive(frame.data)
            await (a.refill_rx() if frames else trio.sleep(0.0003))

    async def _b_runs(self) -> None:
        """B's VM: receive from A and send to A; parks while the VM is paused, and after a
        fault waits for its reconnected device and re-arms the ring tails."""
        b, vm = self.b, self.vm
        assert b is not None and vm is not None
        while not self._stop:
            await vm.gate.check()
            b.client = vm.client
            try:
                await self._b_step(b)
            except ClientError:
                if not _connection_gone(vm, b.client):
                    raise
                await vm.wait_replaced(b.client)
                b.client = vm.client
                await self._b_rearm(b)

    async def _b_step(self, b: NicGuest) -> None:
        frames = b.poll_rx()
        for frame in frames:
            self.ab.receive(frame.data)
        if frames:
            await b.refill_rx()
        b.reclaim_tx()
        queued = 0
        while self._sending and queued < 16 and self.ba.sent - self.ba.received < E1000_WINDOW:
            if not b.queue(numbered_frame(MAC_A, MAC_B, self.ba.sent)):
                break
            self.ba.sent += 1
            queued += 1
        if queued:
            await b.flush_tx()
        if not frames and not queued:
            await trio.sleep(0.0003)

    async def verify(self) -> None:
        """Both directions move on: E1000_PROGRESS more frames each, every one in order."""
        targets = (self.ab.received + E1000_PROGRESS, self.ba.received + E1000_PROGRESS)
        with trio.move_on_after(GUEST_TIMEOUT * 2) as waited:
            while self.ab.received < targets[0] or self.ba.received < targets[1]:
                await trio.sleep(0.001)
        if waited.cancelled_caught:
            self.ab.problems.append(
                f"the flow stalled: A->B {self.ab.received}/{self.ab.sent}, "
                f"B->A {self.ba.received}/{self.ba.sent} received/sent"
            )

    async def stop(self) -> None:
        """Stop sending, let everything in flight arrive, then check the totals."""
        self._sending = False
        with trio.move_on_after(GUEST_TIMEOUT * 2):
            while self.ab.received < self.ab.sent or self.ba.received < self.ba.sent:
                await trio.sleep(0.001)
        self._stop = True
        with trio.fail_after(30):
            await self._all_done.wait()
        for check in (self.ab, self.ba):
            if check.received != check.sent or check.expected != check.sent:
                check.problems.append(
                    f"{check.name}: {check.sent} sent, {check.received} received "
                    f"(next expected {check.expected})"
                )
        if self.link_a is not None:
            await self.link_a.close()
        if self.slot_a is not None:
            await self.slot_a.stop()
        self.ram_a.close()
        self.ram_b.close()

    def losses(self) -> list[str]:
        return self.ab.problems + self.ba.problems

    def stats(self) -> dict[str, Any]:
        return {
            "frames_a_to_b": self.ab.received,
            "frames_b_to_a": self.ba.received,
            "frames_on_the_cable": self.cable.carried,
        }


class VirtioNetFlow(E1000Flow):
    """The same flow between two virtio-nets (the Linux-style virtio driver model)."""

    def __init__(self, rng: random.Random) -> None:
        self.virtio_config = GuestConfig(queue_size=256)
        super().__init__(rng)

    def _ram_needed(self) -> int:
        return self.virtio_config.ram_needed()

    def _nic(self, mac: bytes) -> Device:
        return VirtioNet(VirtioNetOptions(mac=mac))

    async def _bring_up(self, client_a: Client, client_b: Client) -> tuple[NicGuest, NicGuest]:
        a = VirtioNetGuest(client_a, self.ram_a, self.virtio_config)
        b = VirtioNetGuest(client_b, self.ram_b, self.virtio_config)
        await a.init()
        await b.init(map_memory=False)  # (mapped when B's links were realized)
        return a, b

    async def _b_rearm(self, b: NicGuest) -> None:
        """Posted doorbells may have died with the connection: ring both again."""
        assert isinstance(b, VirtioNetGuest)
        await b.kick_all()


# =============================================================================================
# The soak


#: Migrations of a soak given neither --iterations nor --duration.
DEFAULT_ITERATIONS = 100


@dataclass(slots=True)
class SoakConfig:
    device: str = "testdev"
    iterations: int | None = DEFAULT_ITERATIONS
    duration: float | None = None
    mode: Mode = "stop-copy"
    transport: Transport = "inband"
    faults: float = 0.0
    seed: int = 1
    report: Path | None = None
    directory: Path | None = None
    kinds: Sequence[FaultKind] | None = None
    progress: TextIO | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}")
        if not 0.0 <= self.faults <= 1.0:
            raise ValueError("--faults is a probability per migration, 0..1")
        if self.iterations is None and self.duration is None:
            raise ValueError("give --iterations or --duration")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"--iterations must be at least 1, not {self.iterations}")

    def fault_kinds(self) -> list[FaultKind]:
        kinds = list(self.kinds if self.kinds is not None else FaultKind)
        if self.transport == "fd" and self.mode == "stop-copy":
            # The STOP_COPY data travels over pipes, not in MIG_DATA_WRITE messages.
            kinds = [kind for kind in kinds if kind not in STREAM_FAULTS]
        return kinds


@dataclass(slots=True)
class SoakResult:
    config: dict[str, Any]
    migrations: int = 0
    succeeded: int = 0
    failed: int = 0
    faults_injected: Counter[str] = field(default_factory=Counter)
    faults_recovered: Counter[str] = field(default_factory=Counter)
    faults_not_reached: int = 0
    losses: list[str] = field(default_factory=list)
    source_resets: int = 0
    state_mismatches: int = 0
    #: Seconds per completed migration (8 bytes each: the harness's own growth stays small).
    downtimes: array[float] = field(default_factory=lambda: array("d"))
    wall_s: float = 0.0
    samples: list[ResourceSample] = field(default_factory=list)
    guest: dict[str, Any] = field(default_factory=dict)
    failure_notes: Counter[str] = field(default_factory=Counter)
    #: The signal that ended the run early (SIGINT, SIGTERM), if one did.
    interrupted: str | None = None

    @property
    def ok(self) -> bool:
        injected = sum(self.faults_injected.values())
        return not self.losses and injected == sum(self.faults_recovered.values())

    @property
    def warmup(self) -> int:
        """Migrations left out of the slopes: the first 10% (caches, rings and allocator
        arenas fill up once; a leak keeps growing after that)."""
        return self.migrations // 10

    def slope(self, attribute: str) -> float:
        """Least-squares growth of a resource per 1000 migrations, after the warm-up."""
        points = [
            (s.migrations, float(getattr(s, attribute)))
            for s in self.samples
            if s.migrations >= self.warmup
        ]
        return least_squares_slope(points) * 1000

    def summary(self) -> dict[str, Any]:
        ms = [d * 1e3 for d in self.downtimes]
        first = self.samples[0] if self.samples else None
        last = self.samples[-1] if self.samples else None
        return {
            "config": self.config,
            "ok": self.ok,
            "interrupted_by": self.interrupted,
            "migrations": self.migrations,
            "succeeded": self.succeeded,
            "failed_by_faults": self.failed,
            "faults_injected": sum(self.faults_injected.values()),
            "faults_recovered": sum(self.faults_recovered.values()),
            "faults_injected_by_kind": dict(sorted(self.faults_injected.items())),
            "faults_recovered_by_kind": dict(sorted(self.faults_recovered.items())),
            "faults_not_reached": self.faults_not_reached,
            "losses": len(self.losses),
            "loss_details": self.losses[:50],
            "source_resets": self.source_resets,
            "state_mismatches": self.state_mismatches,
            "downtime_ms": {
                "p50": percentile(ms, 0.50),
                "p90": percentile(ms, 0.90),
                "p99": percentile(ms, 0.99),
                "max": max(ms, default=0.0),
            },
            "wall_s": self.wall_s,
            "migrations_per_s": self.migrations / self.wall_s if self.wall_s else 0.0,
            "resources": {
                "samples": len(self.samples),
                "slopes_after_migration": self.warmup,
                **{
                    f"{metric}_{end}": getattr(sample, metric) if sample else 0
                    for metric in ("rss_kb", "py_objects", "fds", "tasks")
                    for end, sample in (("first", first), ("last", last))
                },
                **{
                    f"{metric}_slope_per_1000": self.slope(metric)
                    for metric in ("rss_kb", "anon_kb", "py_objects", "fds", "threads", "tasks")
                },
            },
            "migration_failures": dict(self.failure_notes.most_common(20)),
            "guest": self.guest,
        }


class Soak:
    def __init__(self, config: SoakConfig, directory: Path, stop: trio.Event | None = None) -> None:
        self.config = config
        self.stop = stop
        self.directory = directory
        self.rng = random.Random(config.seed)
        self.planner = FaultPlanner(config.faults, self.rng, config.fault_kinds())
        guest_rng = random.Random(config.seed + 1)
        flows: dict[str, Callable[[random.Random], Guest]] = {
            "testdev": TestdevGuest,
            "e1000": E1000Flow,
            "virtio-net": VirtioNetFlow,
        }
        self.guest = flows[config.device](guest_rng)
        self.capabilities = DATA_FD_CAPABILITIES if config.transport == "fd" else None
        self.result = SoakResult(config=_config_dict(config))
        self.started = 0.0
        self.vm: Vm | None = None
        self.nursery: trio.Nursery | None = None
        self._recovered_ok = True

    # -- set-up --------------------------------------------------------------------------------
    async def run(self) -> SoakResult:
        self.started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            slots = [
                ServerSlot(
                    f"server-{i}", self.directory / f"vm-{i}.sock", self._new_device, nursery
                )
                for i in range(2)
            ]
            for slot in slots:
                await slot.start()
            vm = self.vm = Vm(slots, self.capabilities)
            for index in range(2):
                vm.links[index] = await self._connect(index)
            await self.guest.start(vm, nursery)
            progress = Progress(self, self.config.progress)
            nursery.start_soon(progress.run)
            try:
                await self._loop()
            finally:
                losses_before = len(self.guest.losses())
                await self.guest.stop()
                found = self.guest.losses()[losses_before:]
                self.result.losses.extend(f"at the end: {loss}" for loss in found)
                self.result.guest = self.guest.stats()
                self.result.wall_s = time.perf_counter() - self.started
                progress.finish()
                for link in vm.links:
                    if link is not None:
                        await link.close()
                for slot in slots:
                    await slot.stop()
                nursery.cancel_scope.cancel()
        return self.result

    def _new_device(self) -> Device:
        return self.guest.make_device()

    async def _connect(self, index: int) -> Link:
        assert self.vm is not None and self.nursery is not None
        link = await Link(self.vm.slots[index], self.capabilities).open(self.nursery)
        await self.guest.realize(link.client)
        return link

    def _more(self) -> bool:
        config = self.config
        if self.stop is not None and self.stop.is_set():
            return False
        if config.iterations is not None and self.result.migrations >= config.iterations:
            return False
        if config.duration is not None:
            return time.perf_counter() - self.started < config.duration
        return True

    async def _loop(self) -> None:
        self._sample()
        while self._more():
            await self.migrate_once()
            if self.result.migrations % SAMPLE_EVERY == 0:
                self._sample()
        self._sample()

    def _sample(self) -> None:
        samples = self.result.samples
        samples.append(sample_resources(self.result.migrations, len(samples)))

    # -- one migration ----------------------------------------------------------------------------
    async def migrate_once(self) -> None:
        """One migration (maybe with a fault), recovery when needed, then verification."""
        vm = self.vm
        assert vm is not None
        source, destination = vm.current, 1 - vm.current
        fault = self.planner.choose()
        self.result.migrations += 1
        attempt = Attempt(fault)
        await self._attempt(attempt, source, destination)
        fired = fault is not None and fault.fired
        if fault is not None:
            key = fault.kind.value
            if fired:
                self.result.faults_injected[key] += 1
            else:
                self.result.faults_not_reached += 1
        if attempt.report is not None:
            if fault is None:
                self.planner.learn(attempt.source_log, attempt.destination_log, attempt.arcs)
            self._succeeded(attempt, vm.slots[source].device, destination)
        else:
            self.result.failed += 1
            error = attempt.error
            self.result.failure_notes[f"{type(error).__name__}: {getattr(error, 'stage', '')}"] += 1
            if not fired:
                self.result.losses.append(f"migration failed without a fault: {error}")
        if fired or attempt.report is None:
            await self.recover(source, destination)
        vm.gate.reopen()
        losses_before = len(self.guest.losses())
        await self.guest.verify()
        found = self.guest.losses()[losses_before:]
        context = f"migration {self.result.migrations}"
        if fault is not None:
            context += f" with fault {fault.describe()}{'' if fired else ' (not reached)'}"
        self.result.losses.extend(f"{context}: {loss}" for loss in found)
        clean = not found and self._recovered_ok
        if fault is not None and fired and clean:
            self.result.faults_recovered[fault.kind.value] += 1

    async def _attempt(self, attempt: Attempt, source: int, destination: int) -> None:
        """Run migrate() with the fault armed; the guest parks for the stop phase."""
        vm = self.vm
        assert vm is not None
        source_link, destination_link = vm.links[source], vm.links[destination]
        assert source_link is not None and destination_link is not None
        restore = [
            _hook_arcs(vm.slots[source].device, attempt, "source"),
            _hook_arcs(vm.slots[destination].device, attempt, "destination"),
        ]
        try:
            if self.config.mode == "stop-copy":
                await vm.gate.close()  # (before arming: the fault is the migration's)
            self._arm(attempt.fault, source_link, destination_link)
            attempt.report = await migrate(
                source_link.client,
                destination_link.client,
                mode=self.config.mode,
                transport=self.config.transport,
                precopy_rounds=PRECOPY_ROUNDS,
                precopy_threshold=0,
                on_precopy_round=self._precopy_round if self.config.mode == "pre-copy" else None,
                # Both servers run the same device by construction; comparing them would
                # only put a few dozen queries in front of every migration, where faults
                # aimed at "a random message" would then mostly land.
                check_devices=False,
            )
        except (MigrationError, ClientError) as exc:
            attempt.error = exc
        finally:
            for undo in restore:
                undo()
            for link, log in (
                (source_link, attempt.source_log),
                (destination_link, attempt.destination_log),
            ):
                if link.sock is not None:
                    log.extend(link.sock.log)
                    link.sock.arm(None, record=False)

    async def _precopy_round(self, round_number: int, moved: int) -> None:
        assert self.vm is not None
        await trio.sleep(0.001)  # the VM runs between pre-copy rounds
        if moved <= 0 or round_number >= PRECOPY_ROUNDS:
            await self.vm.gate.close()  # the last round: the VM stops, then the device

    def _succeeded(self, attempt: Attempt, source_dev: Device, destination: int) -> None:
        assert self.vm is not None and attempt.report is not None
        self.result.succeeded += 1
        self.result.downtimes.append(attempt.report.downtime_s)
        if not attempt.captured or attempt.captured[0] != device_digest(source_dev):
            self.result.state_mismatches += 1
            self.result.losses.append(
                f"migration {self.result.migrations}: the destination loaded a state that "
                "differs from the stopped source's"
            )
        self.vm.current = destination
        self.guest.switched(self.vm)
        self._recovered_ok = True

    def _arm(self, fault: Fault | None, source: Link, destination: Link) -> None:
        for link in (source, destination):
            if link.sock is not None:
                link.sock.arm(None)
        if fault is None or fault.cut is None:
            return  # no fault, or FAIL_ARC (see _hook_arcs)
        target = source if fault.side == "source" else destination
        other = destination if target is source else source
        assert target.sock is not None and other.sock is not None
        then: Callable[[], None] | None = None
        command = None
        cut = fault.cut
        if fault.kind == FaultKind.KILL_CLIENT:
            then = other.sock.cut
        elif fault.kind == FaultKind.KILL_SERVER:
            then = destination.slot.kill
        elif fault.kind in STREAM_FAULTS:
            command = Command.MIG_DATA_WRITE

        def fired() -> None:
            fault.fired = True
            if then is not None:
                then()

        target.sock.arm(Trigger(fault.at, cut, command, fired))

    # -- recovery -----------------------------------------------------------------------------
    async def recover(self, source: int, destination: int) -> None:
        """Bring both sides back as a restarted management layer would; the source must
        come back RUNNING with its state (no reset)."""
        vm = self.vm
        assert vm is not None
        self._recovered_ok = True
        for slot in vm.slots:
            if slot.dead:
                await slot.restart()
                self.guest.device_restarted(slot)
        for index in (source, destination):
            link = vm.links[index]
            if not await usable(link):
                if link is not None:
                    await link.close()
                vm.links[index] = await self._connect(index)
                if index == vm.current:
                    vm.notify()
        await self._recover_source(vm.links[source])
        await self._recover_destination(vm.links[destination])

    async def _recover_source(self, link: Link | None) -> None:
        assert link is not None
        lost = await resume_source(link.client)
        if lost is not None:
            self._recovered_ok = False
            self.result.source_resets += 1
            self.result.losses.append(lost)

    async def _recover_destination(self, link: Link | None) -> None:
        assert link is not None
        if not await settle_destination(link.client):
            self._recovered_ok = False
            raise SoakFailure("the destination did not come back after DEVICE_RESET")


async def resume_source(client: Client) -> str | None:
    """After a failed migration: the source back in RUNNING with its state (SET, never a
    reset). Returns None, or what was lost when only a DEVICE_RESET could revive it."""
    state = await get_state(client)
    if state == MigState.RUNNING:
        return None
    try:
        if state == MigState.ERROR:
            raise ClientError(errno.EIO, Command.DEVICE_FEATURE, "the source is in ERROR")
        await set_state(client, MigState.RUNNING)
    except ClientError as exc:
        await client.reset()
        return f"source state lost: it was in {state.name} and needed a reset ({exc})"
    return None


async def settle_destination(client: Client) -> bool:
    """After a failed migration: a destination that can take the next one (RUNNING, or
    STOP holding nothing that runs); a partial state is discarded with DEVICE_RESET."""
    state = await get_state(client)
    if state in (MigState.RUNNING, MigState.STOP):
        return True
    await client.reset()
    return await get_state(client) == MigState.RUNNING


@dataclass(slots=True)
class Attempt:
    """One migration attempt: its fault and what came of it."""

    fault: Fault | None
    report: MigrationReport | None = None
    error: BaseException | None = None
    source_log: list[int] = field(default_factory=list)
    destination_log: list[int] = field(default_factory=list)
    arcs: dict[str, int] = field(default_factory=lambda: {"source": 0, "destination": 0})
    #: Digest of the state the destination loaded, taken as it left STOP for RUNNING.
    captured: list[str] = field(default_factory=list)


def _hook_arcs(device: Device, attempt: Attempt, side: str) -> Callable[[], None]:
    """Wrap the device's migration_arc for this attempt: fail the chosen arc (FAIL_ARC)
    and, on the destination, digest the loaded state as it leaves STOP for RUNNING (before
    the device resumes). Returns the undo."""
    original = device.migration_arc
    fault = attempt.fault
    fail_at = fault.at if fault and fault.kind == FaultKind.FAIL_ARC and fault.side == side else -1

    def arc(step: tuple[MigState, MigState]) -> None:
        index = attempt.arcs[side]
        attempt.arcs[side] += 1
        if index == fail_at and fault is not None and not fault.fired:
            fault.fired = True
            raise DeviceError(errno.EIO, f"injected failure of arc {step[0].name}->{step[1].name}")
        original(step)
        if side == "destination" and step == (MigState.STOP, MigState.RUNNING):
            attempt.captured.append(device_digest(device))

    device.migration_arc = arc  # type: ignore[method-assign,assignment]

    def undo() -> None:
        del device.migration_arc

    return undo


def _config_dict(config: SoakConfig) -> dict[str, Any]:
    return {
        "device": config.device,
        "iterations": config.iterations,
        "duration_s": config.duration,
        "mode": config.mode,
        "transport": config.transport,
        "faults": config.faults,
        "seed": config.seed,
        "fault_kinds": [kind.value for kind in config.fault_kinds()],
    }


# =============================================================================================
# Progress and report


class Progress:
    """A live line on a terminal (plain lines every few seconds otherwise)."""

    def __init__(self, soak: Soak, stream: TextIO | None) -> None:
        self.soak = soak
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self.interval = 0.25 if self.tty else 10.0

    def line(self) -> str:
        result, config = self.soak.result, self.soak.config
        elapsed = max(time.perf_counter() - self.soak.started, 1e-9)
        ms = [d * 1e3 for d in result.downtimes[-2000:]]
        if config.iterations is not None:
            done = result.migrations / config.iterations
        else:
            done = elapsed / (config.duration or 1.0)
        width = 24
        filled = min(width, int(done * width))
        bar = "#" * filled + "-" * (width - filled)
        return (
            f"[{bar}] {result.migrations} migrations {result.migrations / elapsed:.1f}/s "
            f"downtime p50 {percentile(ms, 0.5):.2f} p90 {percentile(ms, 0.9):.2f} "
            f"p99 {percentile(ms, 0.99):.2f} ms | faults {sum(result.faults_injected.values())} "
            f"recovered {sum(result.faults_recovered.values())} | losses "
            f"{len(result.losses)}"
        )

    async def run(self) -> None:
        if self.stream is None:
            return
        while True:
            await trio.sleep(self.interval)
            self._write(self.line())

    def _write(self, text: str) -> None:
        assert self.stream is not None
        if self.tty:
            self.stream.write("\r" + text[: os.get_terminal_size(self.stream.fileno()).columns])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.stream is None:
            return
        self._write(self.line())
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def summary_table(summary: dict[str, Any]) -> str:
    down = summary["downtime_ms"]
    res = summary["resources"]
    rows = [
        (
            "device / mode / transport",
            "{device} / {mode} / {transport}".format(**summary["config"]),
        ),
        ("migrations", f"{summary['migrations']} ({summary['succeeded']} completed)"),
        ("wall time", f"{summary['wall_s']:.1f} s ({summary['migrations_per_s']:.1f}/s)"),
        (
            "downtime p50/p90/p99/max",
            "{p50:.3f} / {p90:.3f} / {p99:.3f} / {max:.3f} ms".format(**down),
        ),
        ("faults injected", str(summary["faults_injected"])),
        ("faults recovered", str(summary["faults_recovered"])),
        ("losses", str(summary["losses"])),
        (
            "RSS",
            f"{res['rss_kb_first']} -> {res['rss_kb_last']} kB, "
            f"slope {res['rss_kb_slope_per_1000']:+.1f} kB/1000 "
            f"(anonymous {res['anon_kb_slope_per_1000']:+.1f})",
        ),
        (
            "Python objects",
            f"{res['py_objects_first']} -> {res['py_objects_last']}, "
            f"slope {res['py_objects_slope_per_1000']:+.1f}/1000",
        ),
        (
            "open fds",
            f"{res['fds_first']} -> {res['fds_last']}, slope {res['fds_slope_per_1000']:+.2f}/1000",
        ),
        (
            "trio tasks",
            f"{res['tasks_first']} -> {res['tasks_last']}, "
            f"slope {res['tasks_slope_per_1000']:+.2f}/1000",
        ),
    ]
    for kind, count in summary["faults_injected_by_kind"].items():
        recovered = summary["faults_recovered_by_kind"].get(kind, 0)
        rows.append((f"  {kind}", f"{count} injected, {recovered} recovered"))
    if summary.get("interrupted_by"):
        rows.insert(1, ("interrupted by", f"{summary['interrupted_by']} (the run ended early)"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines += [f"LOSS: {detail}" for detail in summary["loss_details"][:10]]
    return "\n".join(lines)


async def run_soak(config: SoakConfig, *, stop: trio.Event | None = None) -> SoakResult:
    """Run a soak in this trio run (servers, guest and driver are all tasks here).
    ``stop``, once set, ends it after the migration in progress, as if it were done."""
    if config.directory is not None:
        return await Soak(config, config.directory, stop).run()
    with tempfile.TemporaryDirectory(prefix="vfio-soak-") as tmp:
        return await Soak(config, Path(tmp), stop).run()


# =============================================================================================
# Command line


def parse_duration(text: str) -> float:
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (30, 90s, 10m, 1h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return value


#: An argparse type: comma-separated fault kinds.
parse_fault_kinds = enum_list_arg(FaultKind, "fault kind")


def add_soak_parser(sub: Any) -> argparse.ArgumentParser:
    soak: argparse.ArgumentParser = sub.add_parser(
        "soak",
        help="migrate a busy device back and forth with fault injection, checking for losses",
        description="Start two servers, keep the device busy (e1000: a frame flow between two "
        "wired NICs; testdev: registers, DMA and interrupts), migrate it back and forth and "
        "verify device state and traffic after every migration. Exit status 0 only without "
        "losses and with every injected fault recovered; Ctrl-C (SIGINT) or SIGTERM ends the "
        "run after the migration in progress, prints the summary, writes the report and "
        "exits with 130 or 143.",
        formatter_class=HelpFormatter,
    )
    soak.add_argument("--device", choices=DEVICES, default="testdev", help="the migrating device")
    amount = soak.add_mutually_exclusive_group()
    amount.add_argument(
        "--iterations",
        type=positive_int_arg,
        metavar="N",
        help=f"migrations to run (default {DEFAULT_ITERATIONS} unless --duration)",
    )
    amount.add_argument(
        "--duration", type=parse_duration, help="run this long instead (90s, 10m, 1h)"
    )
    soak.add_argument(
        "--mode", choices=MODES, default="stop-copy", help="each migration's mode (as migrate)"
    )
    soak.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="inband",
        help="each migration's transport (as migrate)",
    )
    soak.add_argument(
        "--faults", type=float, default=0.0, help="probability of a fault per migration (0..1)"
    )
    soak.add_argument(
        "--fault-kinds",
        type=parse_fault_kinds,
        metavar="KIND,...",
        help="only these faults; kinds: " + ", ".join(kind.value for kind in FaultKind),
    )
    soak.add_argument("--seed", type=int, default=1, help="seeds faults and guest activity")
    soak.add_argument("--report", type=Path, metavar="FILE.json", help="write a JSON report")
    soak.add_argument(
        "--quiet",
        action="store_true",
        help="no progress line, and no warnings from the in-process servers (faults make "
        "them expected; -v shows them)",
    )
    soak.add_argument(
        "--json", action="store_true", help="print the report (JSON) instead of the table"
    )
    return soak


async def run_soak_until_signal(config: SoakConfig) -> tuple[SoakResult | None, int | None]:
    """Run a soak; the first SIGINT/SIGTERM ends it after the migration in progress (the
    result is complete up to there), a second one abandons it (no result). Returns the
    result and the signal that stopped it, if any."""
    stop = trio.Event()
    received: list[int] = []
    result: list[SoakResult] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    received.append(signum)
                    if stop.is_set():
                        nursery.cancel_scope.cancel()
                        return
                    stop.set()
                    if config.progress is not None and config.progress.isatty():
                        print(file=sys.stderr)  # off the progress line
                    print(
                        f"vfio-user-emu: soak: {signal.Signals(signum).name}: stopping after "
                        "the migration in progress (again to abandon the run)",
                        file=sys.stderr,
                    )

            nursery.start_soon(watch)
            result.append(await run_soak(config, stop=stop))
            nursery.cancel_scope.cancel()
    return (result[0] if result else None), (received[0] if received else None)


def _iterations(args: argparse.Namespace) -> int | None:
    if args.duration is not None:
        return None
    return DEFAULT_ITERATIONS if args.iterations is None else int(args.iterations)


def run_soak_cli(args: argparse.Namespace) -> int:
    try:
        config = SoakConfig(
            device=args.device,
            iterations=_iterations(args),
            duration=args.duration,
            mode=args.mode,
            transport=args.transport,
            faults=args.faults,
            seed=args.seed,
            report=args.report,
            kinds=args.fault_kinds,
            progress=None if args.quiet or args.json else sys.stderr,
        )
    except ValueError as exc:
        print(f"vfio-user-emu: soak: {exc}", file=sys.stderr)
        return 2
    logger = logging.getLogger("vfio_user_emu")
    level = logger.level
    if args.quiet and not getattr(args, "verbose", False):
        # The servers and devices run in this process and log to the same logger; under
        # --faults their warnings (a DMA to a region the killed client no longer maps,
        # a closed connection) are the faults at work, not news.
        logger.setLevel(logging.ERROR)
    try:
        result, signum = trio.run(run_soak_until_signal, config)
    finally:
        logger.setLevel(level)  # main() may be called again in this process (tests)
    if result is None:
        assert signum is not None
        print(f"vfio-user-emu: soak: {signal.Signals(signum).name}: run abandoned", file=sys.stderr)
        return SIGNAL_EXIT.get(signal.Signals(signum), 128 + signum)
    if signum is not None:
        result.interrupted = signal.Signals(signum).name
    summary = result.summary()
    if config.report is not None:
        config.report.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2) if args.json else summary_table(summary))
    if signum is not None:
        return SIGNAL_EXIT.get(signal.Signals(signum), 128 + signum)
    return 0 if result.ok else 1
