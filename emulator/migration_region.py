"""The legacy (v1) migration region, served from the device's one migration engine.

A device started with ``migration=v1`` (or ``both``) shows one more region, right after its
own (index 9 for a device with the nine PCI regions): the v1 migration region of
:mod:`protocol.migration_v1` (layout, bitfield rules, allowed-transition table). Writes
of ``device_state`` that the v1 table allows become v2 SETs of
:class:`devices.migration.engine.MigrationEngine`, so v1 and v2 clients drive the same states,
arcs, pausing and stream; only the way the data moves differs.

The data moves in *segments* through the data window (``DATA_OFFSET``, ``window`` bytes):

* saving (PRE_COPY, PRE_COPY_P2P, STOP_COPY): reading ``data_offset`` takes the next
  segment (up to ``window`` bytes) out of the saving stream -- once; until it is
  acknowledged, ``data_offset`` and ``data_size`` keep describing the same segment and its
  bytes can be read (in any pieces) from the window. Reading ``pending_bytes`` acknowledges
  it and returns what the stream still holds (in PRE_COPY, after asking the device for
  changes). 0 in STOP_COPY means the stream is complete.
* resuming (RESUMING): ``data_offset`` says where to write; the client writes a segment
  into the window (in any pieces) and then writes its length to ``data_size``, which
  appends exactly those bytes to the resumed stream, in order. The stream is validated and
  applied when RESUMING is left, as for v2 (all or nothing).

The segment state belongs to the device, not to a connection (the migration state
survives a reconnect, so does a prepared segment). It is dropped when the data session it
belongs to ends (however the state changed) and on DEVICE_RESET.

The region is trapped only (no mmap): REGION_READ / REGION_WRITE reach it.
"""

from __future__ import annotations

import errno
import struct
import weakref
from collections.abc import Awaitable, Callable

from devices.api import Device
from devices.errors import DeviceError
from protocol.constants import MigrationCaps, MigState, RegionFlags
from protocol.errors import ProtocolError, require
from protocol.messages import NdmaCap, RegionInfo, TypeCap, pack_region_caps
from protocol.migration_fsm import SAVING_STATES
from protocol.migration_v1 import (
    DATA_OFFSET,
    REGION_SUBTYPE_MIGRATION,
    REGION_TYPE_MIGRATION,
    check_transition,
    register_at,
    register_value,
    requested_state,
)

#: Runs a state change of the device's engine (waiting for the device's work first).
StateChanger = Callable[[int], Awaitable[object]]

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

#: Device -> its v1 region (kept with the device, like its migration state).
_REGIONS: weakref.WeakKeyDictionary[Device, MigrationRegion] = weakref.WeakKeyDictionary()


def region_for(device: Device) -> MigrationRegion | None:
    """The device's v1 migration region, or None if it does not serve migration v1."""
    if "v1" not in device.migration_protocols:
        return None
    region = _REGIONS.get(device)
    if region is None:
        region = _REGIONS[device] = MigrationRegion(device)
    return region


class _Written:
    """Which bytes of the data window a resuming client wrote: one mask byte per window
    byte, so a write costs its own length and ``covers`` one C-level scan -- a client
    sending many tiny scattered writes cannot make each one cost more than the last."""

    def __init__(self) -> None:
        self.mask = bytearray()

    def add(self, start: int, end: int) -> None:
        if len(self.mask) < end:
            self.mask.extend(bytes(end - len(self.mask)))
        self.mask[start:end] = b"\x01" * (end - start)

    def covers(self, size: int) -> bool:
        """Was every byte of ``[0, size)`` written?"""
        return size <= len(self.mask) and self.mask.find(0, 0, size) == -1


class MigrationRegion:
    def __init__(self, device: Device) -> None:
        # Weak: the region is the value of _REGIONS, keyed weakly by this very device; a
        # strong reference here would keep every device that ever served v1 alive.
        self._device = weakref.ref(device)
        self.index = device.num_regions
        self.window = device.migration_v1_window
        self.size = DATA_OFFSET + self.window
        self._segment: bytes | None = None  # saving: prepared, not yet acknowledged
        self._incoming = bytearray()  # resuming: the window's contents
        self._written = _Written()
        #: The engine and data sessions the segment state belongs to.
        self._seen: tuple[object, ...] | None = None

    @property
    def device(self) -> Device:
        device = self._device()
        if device is None:
            raise DeviceError(errno.ENODEV, "migration region: the device is gone")
        return device

    # -- description --------------------------------------------------------------------------
    def region_info(self, argsz: int) -> bytes:
        """GET_REGION_INFO: read/write, trapped, TYPE cap 3/1 (+ NDMA with P2P)."""
        caps: list[TypeCap | NdmaCap] = [TypeCap(REGION_TYPE_MIGRATION, REGION_SUBTYPE_MIGRATION)]
        if self.device.migration.caps & MigrationCaps.P2P:
            caps.append(NdmaCap())
        flags = RegionFlags.READ | RegionFlags.WRITE
        body = pack_region_caps(caps, RegionInfo.SIZE)
        needed = RegionInfo.SIZE + len(body)
        if argsz < needed:
            return RegionInfo(needed, flags, self.index, 0, self.size, 0).pack()
        info = RegionInfo(
            needed, flags | RegionFlags.CAPS, self.index, RegionInfo.SIZE, self.size, 0
        )
        return info.pack() + body

    # -- state tracking -------------------------------------------------------------------------
    def _sync(self) -> MigState:
        """The engine's state; drops what belongs to a data session that ended. A prepared
        segment survives PRE_COPY -> STOP_COPY (one saving session: its bytes were taken
        from the stream and must still reach the client)."""
        engine = self.device.migration
        seen = (engine, engine.saving, engine.resuming)
        if self._seen is None or any(a is not b for a, b in zip(seen, self._seen, strict=True)):
            self._drop()
            self._seen = seen
        return engine.state

    def _drop(self) -> None:
        self._segment = None
        self._incoming = bytearray()
        self._written = _Written()

    def reset(self) -> None:
        """DEVICE_RESET: the engine is back in RUNNING; nothing is in flight."""
        self._drop()
        self._seen = None

    # -- access ---------------------------------------------------------------------------------
    def _check_span(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise DeviceError(
                errno.EINVAL,
                f"migration region: [{offset:#x}, +{count:#x}) outside {self.size:#x} bytes",
            )

    def read(self, offset: int, count: int) -> bytes:
        self._check_span(offset, count)
        state = self._sync()
        if offset >= DATA_OFFSET:
            return self._read_window(state, offset - DATA_OFFSET, count)
        name = register_at(offset, count)
        if name == "device_state":
            return U32.pack(register_value(state))
        if name == "reserved":
            return U32.pack(0)
        if name == "pending_bytes":
            return U64.pack(self._pending(state))
        if name == "data_offset":
            self._prepare(state)
            return U64.pack(DATA_OFFSET)
        # data_size: the prepared segment's length (0 when none is prepared).
        return U64.pack(len(self._segment) if self._segment is not None else 0)

    def write(self, offset: int, data: bytes) -> MigState | None:
        """Apply a write; a ``device_state`` write returns the state to move to (with
        :meth:`transition`: it may wait for the device's outstanding DMA), everything else
        completes here."""
        self._check_span(offset, len(data))
        state = self._sync()
        if offset >= DATA_OFFSET:
            self._write_window(state, offset - DATA_OFFSET, data)
            return None
        name = register_at(offset, len(data))
        if name == "device_state":
            # EINVAL before anything changes: invalid bits, or not a v1 arc from here.
            target = requested_state(U32.unpack(data)[0])
            check_transition(state, target)
            return target
        if name == "reserved":
            return None
        if name == "data_size":
            self._consume(state, U64.unpack(data)[0])
            return None
        raise ProtocolError(errno.EINVAL, f"migration region: {name} is read-only")

    async def transition(self, target: MigState, change_state: StateChanger) -> None:
        """Move the device to ``target`` with ``change_state`` (the runtime's: see
        emulator.worker.DeviceWorker.change_state), as a v2 SET of the same state would."""
        # Again when it runs: another client may have moved the engine since the write.
        check_transition(self.device.migration.state, target)
        try:
            await change_state(target)
        finally:
            self._sync()

    # -- saving ---------------------------------------------------------------------------------
    def _pending(self, state: MigState) -> int:
        if state not in SAVING_STATES:
            return 0
        self._segment = None  # acknowledged
        return self.device.migration.pending_data()

    def _prepare(self, state: MigState) -> None:
        if state in SAVING_STATES and self._segment is None:
            self._segment = self.device.migration.read_data(self.window)

    def _read_window(self, state: MigState, at: int, count: int) -> bytes:
        require(state in SAVING_STATES, f"migration data read in {state.name}")
        segment = self._segment
        require(segment is not None, "migration data read before data_offset")
        assert segment is not None
        require(
            at + count <= len(segment),
            f"migration data [{at:#x}, +{count:#x}) beyond the {len(segment):#x}-byte segment",
        )
        return segment[at : at + count]

    # -- resuming -------------------------------------------------------------------------------
    def _write_window(self, state: MigState, at: int, data: bytes) -> None:
        require(state == MigState.RESUMING, f"migration data written in {state.name}")
        end = at + len(data)
        if len(self._incoming) < end:
            self._incoming.extend(bytes(end - len(self._incoming)))
        self._incoming[at:end] = data
        self._written.add(at, end)

    def _consume(self, state: MigState, size: int) -> None:
        require(state == MigState.RESUMING, f"data_size written in {state.name}")
        require(size <= self.window, f"data_size {size:#x} exceeds the {self.window:#x} window")
        require(self._written.covers(size), f"data_size {size:#x}: the segment was not written")
        segment = bytes(self._incoming[:size])
        self._incoming = bytearray()
        self._written = _Written()
        self.device.migration.write_data(segment)
