"""The migration driver: moves a device's state from one vfio-user server to another.

It plays the part QEMU's generic VFIO migration code plays (facts 8.1.6) over migration v2
as vfio-user maps it (facts 8.2): DEVICE_FEATURE to query capabilities and change the
device state, MIG_DATA_READ on the source and MIG_DATA_WRITE on the destination for the
opaque state stream.

Flows (``source`` and ``destination`` are connected :class:`~emulator.client.core.Client`\\ s):

* stop-copy: destination RUNNING -> RESUMING; source RUNNING -> STOP_COPY; read until the
  source returns no more data, writing each chunk to the destination as soon as it is read;
  source STOP_COPY -> STOP; destination RESUMING -> STOP (the destination validates and
  loads the state here) -> RUNNING.
* pre-copy: as stop-copy, but first source RUNNING -> PRE_COPY and rounds of reading while
  the source keeps running. A round reads until the source has nothing more for now (an
  empty read; vfio-user has no GET_PRECOPY_INFO) or until it has moved twice the source's
  STOP_COPY size estimate. Rounds stop once one moves at most ``precopy_threshold`` bytes
  or after ``precopy_rounds`` rounds; then PRE_COPY -> STOP_COPY sends what is left.

With ``guest_memory`` (:mod:`emulator.client.guest_memory`) guest RAM moves too, as a
VMM moves it: pre-copy starts the source's DMA dirty-page log and copies all of memory
before the source enters PRE_COPY, copies the pages the log names after every round, and
once more (the final REPORT) once the source is stopped (STOP_COPY, then STOP: its DMA
ended when it entered STOP_COPY), then stops the log; stop-copy copies all of memory once
the source is stopped.

The stream is never held in memory: chunks go straight from source to destination, each at
most the smaller of what we advertised to the source (MIG_DATA_READ is bounded by the
*client's* max_data_xfer_size) and the destination server's max_data_xfer_size. Unless the
caller picks ``chunk``, it is also at most the source's STOP_COPY size estimate (as QEMU
sizes its buffer), and after a short read the next read asks for only PROBE_SIZE bytes:
servers may pad every MIG_DATA_READ reply to the size asked for (libvfio-user does), so
oversized requests, and the empty read that ends the stream, would cost a full chunk each.

Downtime is measured from the SET that takes the source out of RUNNING / PRE_COPY (into
STOP_COPY) to the reply of the SET that puts the destination in RUNNING. A source that is
already STOP (a paused guest) is accepted in stop-copy mode; its downtime is then measured
from its STOP -> STOP_COPY.

Failure handling (any :class:`~emulator.client.requests.ClientError`, or anything else raised while
the devices are mid-migration, cancellation included) -- best effort, shielded, bounded in
time, each step recorded in :attr:`MigrationError.recovery`:

* the source goes back to the state it started in (RUNNING, or STOP for a paused guest)
  with SET MIG_DEVICE_STATE (PRE_COPY -> RUNNING and STOP_COPY -> STOP -> RUNNING keep the
  device's state). Only if that is impossible (ERROR, or the SET fails) is it reset with
  DEVICE_RESET, as QEMU does; the guest's device state is then lost, and the note says so.
* the destination is reset with DEVICE_RESET unless it is still RUNNING (an untouched
  destination). Leaving RESUMING without loading valid data is only possible through a
  reset (kernel uapi), and a destination that did load the state (STOP) must not run it
  while the source runs too. A migration destination is a freshly started device, so the
  reset returns it to where it was. (libvfio-user refuses DEVICE_RESET in STOP; there we
  fall back to SET RUNNING followed by DEVICE_RESET.)

Errors before anything was changed (no migration support, no PRE_COPY for pre-copy mode,
devices in the wrong state) raise :class:`MigrationError` without touching either device.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, NoReturn, Protocol, TypeVar, get_args

import trio

from emulator import allocator
from emulator.client.compat import incompatibility
from emulator.client.core import Client
from emulator.client.guest_memory import GuestMemoryMigration, MemoryCopyReport
from emulator.client.requests import ClientError, ConnectionLost, InFlight, InvalidReply
from protocol.constants import (
    FEATURE_GET,
    Command,
    DeviceFeature,
    MigrationCaps,
    MigState,
)
from protocol.messages import DeviceFeatureMsg, MigDeviceState

__all__ = [
    "DEFAULT_PRECOPY_ROUNDS",
    "DEFAULT_PRECOPY_THRESHOLD",
    "MigrationError",
    "MigrationReport",
    "Mode",
    "PrecopyHook",
    "get_caps",
    "get_state",
    "migrate",
    "set_state",
    "stop_copy_size",
]

_T = TypeVar("_T")
Mode = Literal["stop-copy", "pre-copy"]
Transport = Literal["inband", "fd"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)
#: What a client sends in VERSION to be offered migration data fds.
DATA_FD_CAPABILITIES = {
    "max_msg_fds": 16,
    "max_data_xfer_size": 1024 * 1024,
    "migration": {"pgsize": 4096, "data_fd": True},
}
PIPE_CHUNK = 1 << 20
MODES: tuple[str, ...] = get_args(Mode)

#: ``struct vfio_device_feature_mig_state``: device_state, data_fd (-1: unused in vfio-user).
U64 = struct.Struct("<Q")
#: argsz of every migration DEVICE_FEATURE request (8 header + 8 data, as QEMU sends).
FEATURE_ARGSZ = 16

#: At most this many pre-copy rounds by default.
DEFAULT_PRECOPY_ROUNDS = 8
#: Pre-copy stops once a round moves at most this many bytes (default 64 KiB).
DEFAULT_PRECOPY_THRESHOLD = 64 * 1024
#: Bytes a pre-copy round may move when the source gives no STOP_COPY size estimate.
ROUND_LIMIT_WITHOUT_ESTIMATE = 64 * 1024 * 1024
#: Smallest default chunk (when the source's STOP_COPY size estimate is tiny).
MIN_CHUNK = 4096
#: Bytes asked for after a short read, to learn cheaply whether more data follows.
PROBE_SIZE = 4096
#: STOP_COPY reads (and writes) in flight at once.
PIPELINE_DEPTH = 4
#: argsz + size in front of the data of a MIG_DATA_READ reply.
MIG_DATA_HEADER = 8
#: Seconds the whole recovery after a failure may take.
RECOVERY_TIMEOUT = 10.0

#: Called after each pre-copy round with (round number from 1, bytes the round moved);
#: the source device is still running (PRE_COPY) at that point.
PrecopyHook = Callable[[int, int], Awaitable[None]]


class MigrationError(Exception):
    """A migration failed (or could not start). ``stage`` says where, ``errno`` is the
    device's errno when a request failed, ``recovery`` lists what was done afterwards."""

    def __init__(
        self,
        message: str,
        *,
        stage: str,
        errno: int | None = None,
        recovery: list[str] | None = None,
    ) -> None:
        self.message = message
        self.stage = stage
        self.errno = errno
        self.recovery = list(recovery or [])
        super().__init__(message)

    def __str__(self) -> str:
        if not self.recovery:
            return self.message
        return f"{self.message}; recovery: {'; '.join(self.recovery)}"


@dataclass(frozen=True, slots=True)
class MigrationReport:
    mode: Mode
    #: Bytes read from the source and written to the destination (pre-copy + stop-copy).
    bytes_moved: int
    precopy_bytes: int
    stop_copy_bytes: int
    #: From the SET taking the source out of RUNNING/PRE_COPY to the destination RUNNING.
    downtime_s: float
    total_s: float
    #: bytes_moved / time spent reading and writing data (bytes per second).
    throughput: float
    precopy_rounds: int
    #: Guest pages copied by phase, when ``migrate()`` was given guest memory.
    memory: MemoryCopyReport | None = None

    def lines(self) -> list[str]:
        """Human-readable summary (what ``vfio-user-emu migrate`` prints)."""
        return [
            f"mode: {self.mode}",
            f"bytes moved: {self.bytes_moved}",
            f"pre-copy bytes: {self.precopy_bytes} in {self.precopy_rounds} round(s)",
            f"stop-copy bytes: {self.stop_copy_bytes}",
            f"throughput: {self.throughput / 1e6:.2f} MB/s",
            f"downtime: {self.downtime_s * 1e3:.3f} ms",
            f"total time: {self.total_s * 1e3:.3f} ms",
        ] + ([] if self.memory is None else self.memory.lines())


# ---------------------------------------------------------------------------------------------
# DEVICE_FEATURE helpers


async def _feature_get(client: Client, feature: DeviceFeature, size: int) -> bytes:
    payload = await client.device_feature(FEATURE_GET | feature, argsz=FEATURE_ARGSZ)
    data = payload[DeviceFeatureMsg.HEADER_SIZE :]
    if len(data) != size:
        raise InvalidReply(
            Command.DEVICE_FEATURE,
            f"GET {feature.name}: {len(data)} data bytes, expected {size}",
        )
    return data


async def get_caps(client: Client) -> int:
    """GET VFIO_DEVICE_FEATURE_MIGRATION: the MigrationCaps bits (STOP_COPY 1, P2P 2,
    PRE_COPY 4). A device without migration answers with an error (ClientError)."""
    (caps,) = U64.unpack(await _feature_get(client, DeviceFeature.MIGRATION, U64.size))
    return int(caps)


async def get_state(client: Client) -> MigState:
    """GET VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE."""
    data = await _feature_get(client, DeviceFeature.MIG_DEVICE_STATE, MigDeviceState.SIZE)
    value = MigDeviceState.unpack(data).device_state
    try:
        return MigState(value)
    except ValueError:
        raise InvalidReply(Command.DEVICE_FEATURE, f"unknown device state {value}") from None


async def set_state(client: Client, state: MigState) -> None:
    """SET VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE (argsz 16, data_fd -1). The server runs the
    whole combination transition before replying; the reply is checked by the client. A
    data fd the server may pass (``data_fd`` extension) is not wanted here and closed."""
    fd = await client.set_mig_state(int(state))
    if fd is not None:
        os.close(fd)


async def set_state_with_fd(client: Client, state: MigState) -> int | None:
    """SET MIG_DEVICE_STATE, keeping the data fd the server passes (caller closes it)."""
    return await client.set_mig_state(int(state))


async def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to a (non-blocking) pipe, waiting when it is full."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


async def pump_pipe(source: int, sink: int) -> int:
    """Move everything from ``source`` to ``sink`` until EOF (both pipes: ``splice``, so
    the bytes never enter Python); returns the byte count."""
    os.set_blocking(source, False)
    os.set_blocking(sink, False)
    moved = 0
    while True:
        try:
            count = os.splice(
                source, sink, PIPE_CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
            )
        except BlockingIOError:
            await _wait_for_pipes(source, sink)
            continue
        if count == 0:
            return moved
        moved += count


async def _wait_for_pipes(source: int, sink: int) -> None:
    """Wait for whichever side blocked the splice: the empty source or the full sink."""
    readable, writable, _ = select.select([source], [sink], [], 0)
    if not readable:
        await trio.lowlevel.wait_readable(source)
    elif not writable:
        await trio.lowlevel.wait_writable(sink)
    else:
        await trio.lowlevel.checkpoint()  # both ready again already


async def stop_copy_size(client: Client) -> int:
    """GET VFIO_DEVICE_FEATURE_MIG_DATA_SIZE (9): estimated STOP_COPY data size. Not part of
    the vfio-user spec; libvfio-user answers EINVAL."""
    (size,) = U64.unpack(await _feature_get(client, DeviceFeature.MIG_DATA_SIZE, U64.size))
    return int(size)


def _cap_names(caps: int) -> str:
    names = [flag.name or str(int(flag)) for flag in MigrationCaps if caps & flag]
    return "|".join(names) or "nothing"


# ---------------------------------------------------------------------------------------------
# the driver


class _Migration:
    def __init__(
        self,
        source: Client,
        destination: Client,
        *,
        mode: Mode,
        chunk: int | None,
        precopy_rounds: int,
        precopy_threshold: int,
        on_precopy_round: PrecopyHook | None,
        transport: Transport = "inband",
        guest_memory: GuestMemoryMigration | None = None,
        check_devices: bool = True,
    ) -> None:
        self.check_devices = check_devices
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if chunk is not None and chunk <= 0:
            raise ValueError("chunk must be positive")
        if precopy_rounds < 1:
            raise ValueError("precopy_rounds must be at least 1")
        if precopy_threshold < 0:
            raise ValueError("precopy_threshold must not be negative")
        if source is destination:
            raise ValueError("source and destination are the same connection")
        self.source = source
        self.destination = destination
        self.mode: Mode = mode
        limit = min(source.max_data_xfer_size, destination.server_max_data_xfer_size)
        self.chunk = limit if chunk is None else min(chunk, limit)
        self.chunk_default = chunk is None
        self.max_rounds = precopy_rounds
        self.threshold = precopy_threshold
        self.on_precopy_round = on_precopy_round
        self.stage = "checking the devices"
        self.source_initial = MigState.RUNNING
        self.destination_initial = MigState.RUNNING
        self.source_touched = False
        self.destination_touched = False
        self.round_limit = ROUND_LIMIT_WITHOUT_ESTIMATE
        self.rounds = 0
        self.precopy_bytes = 0
        self.transfer_s = 0.0
        self.transport: Transport = transport
        self.destination_fd: int | None = None
        self.memory = guest_memory

    # -- before anything changes -------------------------------------------------------------
    async def preflight(self) -> None:
        caps = await self._checked("source", get_caps(self.source), "supports no migration")
        dst_caps = await self._checked(
            "destination", get_caps(self.destination), "supports no migration"
        )
        for side, value in (("source", caps), ("destination", dst_caps)):
            if not value & MigrationCaps.STOP_COPY:
                raise MigrationError(
                    f"{side} advertises {_cap_names(value)}, without the mandatory STOP_COPY",
                    stage=self.stage,
                )
        if self.mode == "pre-copy" and not caps & MigrationCaps.PRE_COPY:
            raise MigrationError(
                f"pre-copy mode needs PRE_COPY, but the source advertises only "
                f"{_cap_names(caps)} (use stop-copy mode)",
                stage=self.stage,
            )
        src_state = await self._checked("source", get_state(self.source), "has no device state")
        dst_state = await self._checked(
            "destination", get_state(self.destination), "has no device state"
        )
        allowed = (
            (MigState.RUNNING,) if self.mode == "pre-copy" else (MigState.RUNNING, MigState.STOP)
        )
        if src_state not in allowed:
            names = " or ".join(s.name for s in allowed)
            raise MigrationError(
                f"source is in {src_state.name}; {self.mode} migration starts from {names}",
                stage=self.stage,
            )
        if dst_state not in (MigState.RUNNING, MigState.STOP):
            # RUNNING: a fresh device; STOP: e.g. the source of an earlier migration, so a
            # device can be migrated back and forth (STOP -> RESUMING is a direct arc).
            raise MigrationError(
                f"destination is in {dst_state.name}; it must be RUNNING or STOP",
                stage=self.stage,
            )
        self.source_initial = src_state
        self.destination_initial = dst_state
        if self.check_devices:
            self.stage = "comparing the devices"
            problem = await incompatibility(self.source, self.destination)
            if problem is not None:
                raise MigrationError(problem, stage=self.stage)
        if self.memory is not None and self.mode == "pre-copy":
            await self._checked(
                "source", self.memory.check_logging(self.source), "has no DMA dirty-page logging"
            )
        try:
            estimate = await stop_copy_size(self.source)
        except ClientError:
            return  # optional feature (not in the vfio-user spec): keep the defaults
        if self.chunk_default:
            # As QEMU: no bigger buffer than the whole state (servers may pad replies).
            self.chunk = min(self.chunk, max(estimate, MIN_CHUNK))
        self.round_limit = 2 * max(estimate, self.chunk)

    async def _checked(self, side: str, request: Awaitable[_T], meaning: str) -> _T:
        self.stage = f"checking the {side}"
        try:
            return await request
        except ConnectionLost as exc:
            raise MigrationError(f"{side}: {exc}", stage=self.stage, errno=exc.errno) from exc
        except ClientError as exc:
            raise MigrationError(
                f"{side} {meaning}: {exc}", stage=self.stage, errno=exc.errno
            ) from exc

    # -- the migration --------------------------------------------------------------------------
    async def _set(self, client: Client, state: MigState, stage: str) -> None:
        self.stage = stage
        await set_state(client, state)

    async def transfer(self, started: float) -> MigrationReport:
        src, dst = self.source, self.destination
        self.destination_touched = True
        if self.transport == "fd":
            if not (src.data_fd_negotiated and dst.data_fd_negotiated):
                raise MigrationError(
                    "fd transport needs both servers to offer migration data fds "
                    '(connect with "migration": {"data_fd": true})',
                    stage=self.stage,
                )
            self.stage = f"moving the destination {self.destination_initial.name} -> RESUMING"
            self.destination_fd = await set_state_with_fd(dst, MigState.RESUMING)
            if self.destination_fd is None:
                raise MigrationError("destination passed no data fd", stage=self.stage)
        else:
            await self._set(
                dst,
                MigState.RESUMING,
                f"moving the destination {self.destination_initial.name} -> RESUMING",
            )
        if self.mode == "pre-copy":
            await self._memory_precopy_start()
            self.source_touched = True
            await self._set(src, MigState.PRE_COPY, "moving the source RUNNING -> PRE_COPY")
            await self._precopy()
        before = "PRE_COPY" if self.mode == "pre-copy" else self.source_initial.name
        stopped = time.perf_counter()
        self.source_touched = True
        if self.transport == "fd":
            self.stage = f"moving the source {before} -> STOP_COPY"
            source_fd = await set_state_with_fd(src, MigState.STOP_COPY)
            if source_fd is None:
                raise MigrationError("source passed no data fd", stage=self.stage)
            stop_copy_bytes = await self._pump(source_fd)
        else:
            await self._set(src, MigState.STOP_COPY, f"moving the source {before} -> STOP_COPY")
            stop_copy_bytes = await self._pipelined_drain("stop-copy")
        await self._set(src, MigState.STOP, "moving the source STOP_COPY -> STOP")
        await self._memory_stopped()
        await self._set(
            dst,
            MigState.STOP,
            "loading the state into the destination (RESUMING -> STOP)",
        )
        await self._set(dst, MigState.RUNNING, "starting the destination (STOP -> RUNNING)")
        done = time.perf_counter()
        moved = self.precopy_bytes + stop_copy_bytes
        return MigrationReport(
            mode=self.mode,
            bytes_moved=moved,
            precopy_bytes=self.precopy_bytes,
            stop_copy_bytes=stop_copy_bytes,
            downtime_s=done - stopped,
            total_s=done - started,
            throughput=moved / self.transfer_s if self.transfer_s > 0 else 0.0,
            precopy_rounds=self.rounds,
            memory=None if self.memory is None else self.memory.report(),
        )

    async def _pump(self, source_fd: int) -> int:
        """STOP_COPY data from the source's fd to the destination's, then EOF to it."""
        assert self.destination_fd is not None
        self.stage = "stop-copy: moving migration data between the data fds"
        began = time.perf_counter()
        try:
            return await pump_pipe(source_fd, self.destination_fd)
        finally:
            self.transfer_s += time.perf_counter() - began
            os.close(source_fd)
            os.close(self.destination_fd)  # the destination reads to EOF: the whole stream
            self.destination_fd = None

    async def _precopy(self) -> None:
        while True:
            moved = await self._drain(self.round_limit, f"pre-copy round {self.rounds + 1}")
            self.rounds += 1
            self.precopy_bytes += moved
            memory_moved = await self._memory_round()
            if self.on_precopy_round is not None:
                self.stage = f"running the hook after pre-copy round {self.rounds}"
                await self.on_precopy_round(self.rounds, moved)
            if moved + memory_moved <= self.threshold or self.rounds >= self.max_rounds:
                return

    # -- guest memory (emulator.client.guest_memory) -----------------------------------------
    async def _memory_precopy_start(self) -> None:
        """Device dirty logging on, then a first copy of all guest memory (the device may
        write it meanwhile: the log has those pages)."""
        if self.memory is None:
            return
        self.memory.begin()
        self.stage = "starting DMA dirty-page logging on the source"
        await self.memory.start_logging(self.source)
        self.stage = "pre-copy: copying all guest memory"
        await self.memory.copy_all()

    async def _memory_round(self) -> int:
        """After a pre-copy round: copy the guest pages dirtied since; returns their bytes."""
        if self.memory is None:
            return 0
        self.stage = f"pre-copy round {self.rounds}: copying dirty guest pages"
        return await self.memory.sync_round(self.source) * self.memory.page_size

    async def _memory_stopped(self) -> None:
        """The source is stopped (STOP_COPY -> STOP; its DMA finished when it entered
        STOP_COPY, the engine waits for work in progress): the rest of guest memory."""
        if self.memory is None:
            return
        if self.mode == "stop-copy":
            self.memory.begin()
            self.stage = "stop-copy: copying all guest memory"
            await self.memory.copy_all_stopped()
            return
        self.stage = "stop-copy: copying the last dirty guest pages"
        await self.memory.sync_stopped(self.source)
        self.stage = "stopping DMA dirty-page logging on the source"
        await self.memory.stop_logging(self.source)

    async def _drain(self, limit: int | None, what: str) -> int:
        """Copy chunks until the source has no more data (or ``limit`` bytes moved)."""
        reading = f"{what}: reading migration data from the source"
        writing = f"{what}: writing migration data to the destination"
        moved = 0
        want = self.chunk
        # Replies are received into one reused buffer (free again once the data is sent on).
        (buffer,) = self.source.receive_buffers(1, MIG_DATA_HEADER + self.chunk)
        began = time.perf_counter()
        try:
            while limit is None or moved < limit:
                size = want if limit is None else min(want, limit - moved)
                self.stage = reading
                sent = await self.source.mig_data_read_send(size, into=buffer)
                data = await self.source.mig_data_read_reply(sent, size)
                if not data:
                    break
                self.stage = writing
                if self.destination_fd is not None:
                    await write_all(self.destination_fd, data)
                else:
                    await self.destination.mig_data_write(data)
                moved += len(data)
                # A short read usually means the end of the data for now; the read that
                # confirms it asks for little, as a server may pad every reply to the size
                # asked for (libvfio-user does).
                want = self.chunk if len(data) == size else min(PROBE_SIZE, self.chunk)
        finally:
            self.transfer_s += time.perf_counter() - began
        return moved

    async def _pipelined_drain(self, what: str) -> int:
        """STOP_COPY data with up to ``PIPELINE_DEPTH`` reads and as many writes in flight,
        so that the source, this driver and the destination work at the same time.

        Requests on one connection are served in order, so the chunks come back, and are
        written, in stream order. The stream ends with an empty read; reads already sent
        after it come back empty too (the data is complete in STOP_COPY), and after a short
        read new reads ask for PROBE_SIZE only (servers may pad replies to the size asked).
        """
        reading = f"{what}: reading migration data from the source"
        writing = f"{what}: writing migration data to the destination"
        # Each read's reply is received into a buffer of its own, which is free again once
        # its data went out to the destination (the kernel has it when the send returns).
        free = deque(self.source.receive_buffers(PIPELINE_DEPTH, MIG_DATA_HEADER + self.chunk))
        reads: deque[tuple[InFlight, int, bytearray]] = deque()
        writes: deque[InFlight] = deque()
        moved = 0
        want = self.chunk
        ended = False
        began = time.perf_counter()
        try:
            while True:
                self.stage = reading
                while not ended and free:
                    buffer = free.popleft()
                    sent = await self.source.mig_data_read_send(want, into=buffer)
                    reads.append((sent, want, buffer))
                if not reads:
                    break
                sent, size, buffer = reads.popleft()
                data = await self.source.mig_data_read_reply(sent, size)
                if not data:
                    ended = True
                    free.append(buffer)
                    continue
                if len(data) < size:
                    want = min(PROBE_SIZE, self.chunk)
                self.stage = writing
                writes.append(await self.destination.mig_data_write_send(data))
                free.append(buffer)
                moved += len(data)
                while len(writes) > PIPELINE_DEPTH:
                    await self.destination.mig_data_write_reply(writes.popleft())
            self.stage = writing
            while writes:
                await self.destination.mig_data_write_reply(writes.popleft())
        finally:
            for sent, _, _ in reads:
                sent.abandon()
            for sent in writes:
                sent.abandon()
            self.transfer_s += time.perf_counter() - began
        return moved

    # -- after a failure ------------------------------------------------------------------------
    async def recover(self) -> list[str]:
        if self.destination_fd is not None:
            os.close(self.destination_fd)
            self.destination_fd = None
        notes: list[str] = []
        with trio.CancelScope(shield=True), trio.move_on_after(RECOVERY_TIMEOUT) as scope:
            if self.memory is not None and self.memory.logging:
                notes.append(await self._stop_logging())
            if self.source_touched:
                notes.append(await self._recover_source())
            if self.destination_touched:
                notes.append(await self._recover_destination())
        if scope.cancelled_caught:
            notes.append(f"recovery gave up after {RECOVERY_TIMEOUT:g}s")
        return notes

    async def _stop_logging(self) -> str:
        assert self.memory is not None
        try:
            await self.memory.stop_logging(self.source)
        except ClientError as exc:
            self.memory.logging = False  # a lost connection ends the session's logging
            return f"source DMA logging not stopped ({exc})"
        return "source DMA logging stopped"

    async def _recover_source(self) -> str:
        client, target = self.source, self.source_initial
        try:
            state = await get_state(client)
        except ClientError as exc:
            return f"source unreachable, left as it is ({exc})"
        if state == target:
            return f"source still {target.name}"
        why = "it is in ERROR"
        if state != MigState.ERROR:
            try:
                await set_state(client, target)
            except ClientError as exc:
                why = f"SET {target.name} failed ({exc})"
            else:
                return f"source {state.name} -> {target.name}"
        try:
            await client.reset()
            if target != MigState.RUNNING:
                await set_state(client, target)
        except ClientError as exc:
            return f"source stuck in {state.name}: {why}, DEVICE_RESET failed ({exc})"
        return f"source reset to {target.name} because {why} (its device state is lost)"

    async def _recover_destination(self) -> str:
        client = self.destination
        try:
            state = await get_state(client)
        except ClientError as exc:
            return f"destination unreachable, left as it is ({exc})"
        if state == MigState.RUNNING:
            return "destination still RUNNING, unchanged"
        try:
            await client.reset()
        except ClientError as exc:
            if state != MigState.STOP:
                return f"destination stuck in {state.name}: DEVICE_RESET failed ({exc})"
            try:  # libvfio-user refuses DEVICE_RESET in STOP
                await set_state(client, MigState.RUNNING)
                await client.reset()
            except ClientError as again:
                return f"destination stuck in {state.name}: DEVICE_RESET failed ({again})"
        return f"destination {state.name}: DEVICE_RESET -> RUNNING (partial state discarded)"


async def migrate(
    source: Client,
    destination: Client,
    *,
    mode: Mode = "stop-copy",
    chunk: int | None = None,
    precopy_rounds: int = DEFAULT_PRECOPY_ROUNDS,
    precopy_threshold: int = DEFAULT_PRECOPY_THRESHOLD,
    on_precopy_round: PrecopyHook | None = None,
    transport: Transport = "inband",
    guest_memory: GuestMemoryMigration | None = None,
    check_devices: bool = True,
) -> MigrationReport:
    """Migrate the device behind ``source`` to the device behind ``destination``.

    ``transport`` "fd" moves the STOP_COPY data over the data fds the servers pass (both
    clients must have negotiated ``data_fd``: see :data:`DATA_FD_CAPABILITIES`); pre-copy
    data still goes in-band.

    ``chunk`` bounds each MIG_DATA_READ / MIG_DATA_WRITE (default and upper bound: the
    smaller of the source client's and the destination server's max_data_xfer_size).
    ``precopy_rounds`` / ``precopy_threshold`` bound pre-copy (see the module docstring);
    ``on_precopy_round`` runs after each pre-copy round while the source still runs.

    ``guest_memory`` (:class:`~emulator.client.guest_memory.GuestMemoryMigration`: the
    source's and a separate destination's guest memory) is migrated too, consistently with
    the device: in pre-copy mode with the source's DMA dirty-page log (DMA_LOGGING_START
    before a first full copy, REPORT and copy of the dirtied pages after each round and
    once more with the source stopped, then DMA_LOGGING_STOP); in stop-copy mode all of it
    once the source is stopped. Pre-copy then also needs the source to offer dirty
    logging. Counts land in :attr:`MigrationReport.memory`; a round's dirty pages count
    towards ``precopy_threshold``.

    Before anything changes, the devices are compared (:mod:`emulator.client.compat`: PCI
    identity, region sizes, vector counts) and a destination that could not take the state
    is refused with the differences; ``check_devices=False`` skips that (the destination
    then refuses the state as it loads it, after the source was stopped).

    On success the source is in STOP and the destination in RUNNING. Raises
    :class:`MigrationError` (after recovery, see the module docstring) when a request fails,
    ValueError for bad arguments.
    """
    # The whole stream passes through this process in message-sized buffers (in-band).
    allocator.keep_large_buffers()
    started = time.perf_counter()
    run = _Migration(
        source,
        destination,
        mode=mode,
        chunk=chunk,
        precopy_rounds=precopy_rounds,
        precopy_threshold=precopy_threshold,
        on_precopy_round=on_precopy_round,
        transport=transport,
        guest_memory=guest_memory,
        check_devices=check_devices,
    )
    await run.preflight()
    try:
        return await run.transfer(started)
    except BaseException as exc:
        await fail_after_recovery(run, exc, "migration")


class Recoverable(Protocol):
    """A migration run: where it is, and how to undo what it did so far."""

    stage: str

    async def recover(self) -> list[str]: ...


async def fail_after_recovery(run: Recoverable, exc: BaseException, what: str) -> NoReturn:
    """Recover from ``exc`` (the source back to RUNNING, the destination reset: best
    effort), then raise: a failed request as :class:`MigrationError` naming the stage and
    the errno, anything else as itself with a note saying where it struck and what
    recovery did."""
    notes = await run.recover()
    if isinstance(exc, ClientError):
        raise MigrationError(
            f"{what} failed while {run.stage}: {exc}",
            stage=run.stage,
            errno=exc.errno,
            recovery=notes,
        ) from exc
    if isinstance(exc, MigrationError):  # it names its stage already
        exc.add_note(f"recovery: {'; '.join(notes) or 'nothing to undo'}")
    else:
        exc.add_note(f"{what} failed while {run.stage}; recovery: {'; '.join(notes)}")
    raise exc
