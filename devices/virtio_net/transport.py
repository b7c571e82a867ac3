"""The modern virtio PCI transport (virtio 1.x section 4.1), no legacy interface.

Layout of a :class:`VirtioPciFunction`:

* BAR1 (32-bit memory, 4 KiB): the MSI-X table at 0, its PBA at 0x800.
* BAR4 (64-bit prefetchable memory, 16 KiB), as QEMU's virtio-pci lays it out: common
  configuration at 0x0000, ISR status at 0x1000, device configuration at 0x2000, notify
  area at 0x3000 (queue ``i`` at ``i * NOTIFY_MULTIPLIER``).
* Vendor capabilities (ID 0x09) pointing at each structure, and the PCI configuration
  access window (``VIRTIO_PCI_CAP_PCI_CFG``): ``bar``/``offset``/``length`` select an access
  of 1, 2 or 4 bytes in a BAR, performed when ``pci_cfg_data`` is read or written.

Device status follows the spec: FEATURES_OK stays clear when the driver's features are not
acceptable (not a subset of the offered ones, no VERSION_1, a missing dependency); writing 0
resets the device (queues, features, status, ISR, vectors; the MSI-X table belongs to PCI);
a driver error sets DEVICE_NEEDS_RESET, sends a configuration-change interrupt once
DRIVER_OK is set, and stops all queue processing until the reset.

Interrupts: with MSI-X enabled, a queue's or the configuration's vector (none when
NO_VECTOR); otherwise the ISR bit (0 queue, 1 configuration) and INTx, which a read of the
ISR (read-to-clear) lowers.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from devices.api import (
    REGION_CONFIG,
    ConfigRegion,
    Device,
    MsixPbaRegion,
    MsixTableRegion,
    Region,
    SplitRegion,
)
from devices.irq import InterruptController
from devices.pci import BarKind, BarSpec, ConfigSpace
from devices.virtio_net.virtqueue import NO_VECTOR, VirtQueue, VirtqueueError

log = logging.getLogger("vfio_user_emu")

VENDOR_ID = 0x1AF4
MODERN_DEVICE_BASE = 0x1040  # + virtio device id
SUBSYSTEM_ID = 0x1100  # as QEMU's modern virtio devices
REVISION = 1  # modern-only device (virtio 4.1.2.1)

MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
PBA_OFFSET = 0x800
VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x1000
ISR_OFFSET, ISR_SIZE = 0x1000, 0x1000
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_SIZE = 0x3000, 0x1000
NOTIFY_MULTIPLIER = 4

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5

# device status
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
NEEDS_RESET, FAILED = 0x40, 0x80
STATUS_DRIVER_BITS = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED

# transport features
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

ISR_QUEUE, ISR_CONFIG = 1, 2

# common configuration fields: offset -> (width, name)
COMMON_FIELDS: dict[int, tuple[int, str]] = {
    0x00: (4, "device_feature_select"),
    0x04: (4, "device_feature"),
    0x08: (4, "driver_feature_select"),
    0x0C: (4, "driver_feature"),
    0x10: (2, "config_msix_vector"),
    0x12: (2, "num_queues"),
    0x14: (1, "device_status"),
    0x15: (1, "config_generation"),
    0x16: (2, "queue_select"),
    0x18: (2, "queue_size"),
    0x1A: (2, "queue_msix_vector"),
    0x1C: (2, "queue_enable"),
    0x1E: (2, "queue_notify_off"),
    0x20: (4, "queue_desc_lo"),
    0x24: (4, "queue_desc_hi"),
    0x28: (4, "queue_driver_lo"),
    0x2C: (4, "queue_driver_hi"),
    0x30: (4, "queue_device_lo"),
    0x34: (4, "queue_device_hi"),
    0x38: (2, "queue_notify_data"),
    0x3A: (2, "queue_reset"),
}
COMMON_LENGTH = 0x3C

# the transport's migrated state (see save_transport)
_COMMON_STATE = struct.Struct("<QIIBBBHHB")
_QUEUE_STATE = struct.Struct("<HBHQQQHHi")


def _vendor_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """A virtio_pci_cap after the ID and next pointer: cap_len, cfg_type, bar, id, padding,
    offset, length (and a cfg_type's trailing fields)."""
    cap_len = 16 + len(extra)
    return struct.pack("<BBBB2xII", cap_len, cfg_type, bar, 0, offset, length) + extra


class _Structure(Region):
    """One of the BAR4 structures, handled by its owner's methods."""

    def __init__(self, size: int, owner: VirtioPciFunction, kind: str) -> None:
        self.size = size
        self.owner = owner
        self.kind = kind

    def read(self, offset: int, count: int) -> bytes:
        return self.owner.structure_read(self.kind, offset, count)

    def write(self, offset: int, data: bytes) -> None:
        self.owner.structure_write(self.kind, offset, data)


class _ConfigWithWindow(ConfigRegion):
    """Config space whose VIRTIO_PCI_CAP_PCI_CFG data field reaches into the BARs."""

    def __init__(self, config: ConfigSpace, owner: VirtioPciFunction, cap: int) -> None:
        super().__init__(config)
        self.owner = owner
        self.data_at = cap + 16  # pci_cfg_data

    def _window(self) -> tuple[Region, int, int] | None:
        fields = self.config.read(self.data_at - 12, 12)
        bar = fields[0]
        offset, length = struct.unpack_from("<II", fields, 4)
        region = self.owner.regions.get(bar) if bar < 6 else None
        if region is None or length not in (1, 2, 4) or offset % length:
            return None
        if offset + length > region.size:
            return None
        return region, offset, length

    def _overlaps(self, offset: int, count: int) -> bool:
        return offset < self.data_at + 4 and self.data_at < offset + count

    def read(self, offset: int, count: int) -> bytes:
        data = bytearray(super().read(offset, count))
        if self._overlaps(offset, count):
            window = self._window()
            value = bytearray(4)
            if window is not None:
                region, at, length = window
                value[:length] = region.read(at, length)
            for i in range(count):
                pos = offset + i - self.data_at
                if 0 <= pos < 4:
                    data[i] = value[pos]
        return bytes(data)

    def write(self, offset: int, data: bytes) -> None:
        if not self._overlaps(offset, len(data)):
            super().write(offset, data)
            return
        window = self._window()
        if window is None or offset != self.data_at or len(data) < window[2]:
            return  # no valid window, or a partial data write: nothing happens
        region, at, length = window
        region.write(at, bytes(data[:length]))


class VirtioPciFunction(Device):
    """A virtio device over the modern PCI transport. Subclasses give the device ID, the
    offered features, the queues and their handling, and the device configuration."""

    virtio_device_id = 0
    class_code = 0xFF0000
    msix_vectors = 4

    def __init__(self, queue_sizes: Sequence[int], offered_features: int) -> None:
        config = ConfigSpace(
            vendor_id=VENDOR_ID,
            device_id=MODERN_DEVICE_BASE + self.virtio_device_id,
            subsystem_vendor_id=VENDOR_ID,
            subsystem_id=SUBSYSTEM_ID,
            class_code=self.class_code,
            revision=REVISION,
            interrupt_pin=1,
        )
        config.add_bar(BarSpec(MSIX_BAR, MSIX_BAR_SIZE, BarKind.MEM32))
        config.add_bar(BarSpec(VIRTIO_BAR, VIRTIO_BAR_SIZE, BarKind.MEM64, prefetchable=True))
        caps = (
            (CAP_COMMON, COMMON_OFFSET, COMMON_SIZE, b""),
            (CAP_ISR, ISR_OFFSET, ISR_SIZE, b""),
            (CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE, b""),
            (CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_SIZE, struct.pack("<I", NOTIFY_MULTIPLIER)),
        )
        for cfg_type, offset, length, extra in caps:
            config.add_vendor_capability(_vendor_cap(cfg_type, VIRTIO_BAR, offset, length, extra))
        # The access window: bar (byte 2 of the body), offset, length and data are writable.
        window_mask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        window_cap = config.add_vendor_capability(
            _vendor_cap(CAP_PCI_CFG, 0, 0, 0, bytes(4)), writable=window_mask
        )
        config.add_msix_capability(
            self.msix_vectors,
            table_bar=MSIX_BAR,
            table_offset=0,
            pba_bar=MSIX_BAR,
            pba_offset=PBA_OFFSET,
        )
        super().__init__(config, InterruptController(config, msix_vectors=self.msix_vectors))
        self.regions[REGION_CONFIG] = _ConfigWithWindow(config, self, window_cap)
        self.add_region(
            MSIX_BAR,
            SplitRegion(
                MSIX_BAR_SIZE,
                [(0, MsixTableRegion(self.irq)), (PBA_OFFSET, MsixPbaRegion(self.irq))],
            ),
        )
        self.add_region(
            VIRTIO_BAR,
            SplitRegion(
                VIRTIO_BAR_SIZE,
                [
                    (COMMON_OFFSET, _Structure(COMMON_SIZE, self, "common")),
                    (ISR_OFFSET, _Structure(ISR_SIZE, self, "isr")),
                    (DEVICE_OFFSET, _Structure(DEVICE_SIZE, self, "device")),
                    (NOTIFY_OFFSET, _Structure(NOTIFY_SIZE, self, "notify")),
                ],
            ),
        )
        self.offered_features = offered_features | F_VERSION_1
        self.queues = [VirtQueue(i, size) for i, size in enumerate(queue_sizes)]
        self.driver_features = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.status = 0
        self.needs_reset = False
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.config_generation = 0
        self.isr = 0

    # =========================================================================================
    # What a device adds

    def device_config(self) -> bytes:
        """The device configuration structure's current bytes."""
        return b""

    def queue_notified(self, queue: VirtQueue) -> None:
        """The driver notified ``queue`` (only while DRIVER_OK and running)."""

    def driver_ok(self) -> None:
        """DRIVER_OK was set: start the queues."""

    def features_acceptable(self, features: int) -> bool:
        """Device-specific feature dependencies (the transport checks the rest)."""
        return True

    def virtio_reset(self) -> None:
        """The device's part of a virtio reset (status 0 or a PCI reset)."""

    # =========================================================================================
    # State

    def has(self, feature: int) -> bool:
        return bool(self.driver_features & feature)

    @property
    def running(self) -> bool:
        """The driver is done setting up and the device is not broken."""
        return bool(self.status & DRIVER_OK) and not self.needs_reset

    def transport_reset(self) -> None:
        self.driver_features = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.status = 0
        self.needs_reset = False
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.isr = 0
        for queue in self.queues:
            queue.reset()
        self.irq.lower_intx()
        self.virtio_reset()

    def reset(self) -> None:
        super().reset()
        self.transport_reset()

    def driver_error(self, why: str) -> None:
        """The driver broke a rule: DEVICE_NEEDS_RESET, and tell it once it listens."""
        if self.needs_reset:
            return
        log.warning("%s: driver error, device needs reset: %s", self.type_name, why)
        self.needs_reset = True
        if self.status & DRIVER_OK:
            self.config_changed()

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.isr |= ISR_CONFIG
        self._interrupt(self.config_vector)

    def notify_queue(self, queue: VirtQueue) -> None:
        if self.config.msix_enabled:
            self._interrupt(queue.vector)
            return
        self.isr |= ISR_QUEUE
        self._interrupt(queue.vector)

    def _interrupt(self, vector: int) -> None:
        if self.config.msix_enabled:
            if vector < self.msix_vectors:
                self.irq.notify(vector)
            return
        if self.isr:
            self.irq.raise_intx()

    # =========================================================================================
    # BAR4 structures

    def structure_read(self, kind: str, offset: int, count: int) -> bytes:
        if kind == "common":
            return self._common_read(offset, count)
        if kind == "isr":
            if offset != 0:
                return bytes(count)
            value = self.isr
            self.isr = 0
            self.irq.lower_intx()
            return value.to_bytes(count, "little")
        if kind == "device":
            data = self.device_config()
            return data[offset : offset + count].ljust(count, b"\0")
        return bytes(count)  # notify: reads mean nothing

    def structure_write(self, kind: str, offset: int, data: bytes) -> None:
        if kind == "common":
            self._common_write(offset, data)
        elif kind == "notify":
            self._notify_write(offset)
        # ISR and device configuration (read-only for net with VERSION_1): ignored

    def _notify_write(self, offset: int) -> None:
        # Queue i's doorbell is at i * multiplier; the written value (its index) adds
        # nothing without VIRTIO_F_NOTIFICATION_DATA.
        if offset % NOTIFY_MULTIPLIER:
            return
        index = offset // NOTIFY_MULTIPLIER
        if index < len(self.queues) and self.running and self.queues[index].enabled:
            self.queue_notified(self.queues[index])

    def _selected(self) -> VirtQueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_value(self, name: str) -> int:
        queue = self._selected()
        if name == "device_feature_select":
            return self.device_feature_select
        if name == "device_feature":
            if self.device_feature_select > 1:
                return 0
            return self.offered_features >> (32 * self.device_feature_select) & 0xFFFFFFFF
        if name == "driver_feature_select":
            return self.driver_feature_select
        if name == "driver_feature":
            if self.driver_feature_select > 1:
                return 0
            return self.driver_features >> (32 * self.driver_feature_select) & 0xFFFFFFFF
        if name == "config_msix_vector":
            return self.config_vector
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self.status | (NEEDS_RESET if self.needs_reset else 0)
        if name == "config_generation":
            return self.config_generation
        if name == "queue_select":
            return self.queue_select
        if queue is None:
            return 0  # a queue that does not exist: size 0 tells the driver
        if name in ("queue_notify_off", "queue_notify_data"):
            return queue.index
        fields = {
            "queue_size": queue.size,
            "queue_msix_vector": queue.vector,
            "queue_enable": int(queue.enabled),
            "queue_desc_lo": queue.desc & 0xFFFFFFFF,
            "queue_desc_hi": queue.desc >> 32,
            "queue_driver_lo": queue.driver & 0xFFFFFFFF,
            "queue_driver_hi": queue.driver >> 32,
            "queue_device_lo": queue.device & 0xFFFFFFFF,
            "queue_device_hi": queue.device >> 32,
        }
        return fields.get(name, 0)

    def _common_read(self, offset: int, count: int) -> bytes:
        out = bytearray(count)
        for field_offset, (width, name) in COMMON_FIELDS.items():
            start, end = max(offset, field_offset), min(offset + count, field_offset + width)
            if start < end:
                value = self._common_value(name).to_bytes(width, "little")
                lo, hi = start - field_offset, end - field_offset
                out[start - offset : end - offset] = value[lo:hi]
        return bytes(out)

    def _common_write(self, offset: int, data: bytes) -> None:
        field = COMMON_FIELDS.get(offset)
        if field is None or field[0] != len(data):
            return  # only whole, aligned fields (what drivers do); anything else is ignored
        self._common_set(field[1], int.from_bytes(data, "little"))

    def _common_set(self, name: str, value: int) -> None:
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            self._set_driver_features(value)
        elif name == "config_msix_vector":
            self.config_vector = value if value < self.msix_vectors else NO_VECTOR
        elif name == "device_status":
            self._set_status(value)
        elif name == "queue_select":
            self.queue_select = value
        else:
            self._queue_set(name, value)

    def _set_driver_features(self, value: int) -> None:
        if self.status & FEATURES_OK or self.driver_feature_select > 1:
            return  # features are fixed once accepted
        shift = 32 * self.driver_feature_select
        features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift
        self.driver_features = features

    def _queue_set(self, name: str, value: int) -> None:
        queue = self._selected()
        if queue is None or (self.status & DRIVER_OK and name != "queue_msix_vector"):
            return  # queue layout is fixed once the driver is running
        if name == "queue_msix_vector":
            queue.vector = value if value < self.msix_vectors else NO_VECTOR
            return
        if queue.enabled:
            return  # an enabled queue's geometry is fixed
        if name == "queue_size":
            queue.size = value
        elif name == "queue_enable":
            if value == 1:
                self._enable(queue)
        elif name.endswith(("_lo", "_hi")):
            attribute = name[len("queue_") : -3]
            current = getattr(queue, attribute)
            if name.endswith("_lo"):
                current = current & ~0xFFFFFFFF | value
            else:
                current = current & 0xFFFFFFFF | value << 32
            setattr(queue, attribute, current)

    def _enable(self, queue: VirtQueue) -> None:
        try:
            queue.check_layout()
        except VirtqueueError as exc:
            self.driver_error(str(exc))
            return
        queue.enabled = True
        queue.last_avail = queue.used_idx = 0
        queue.signalled_used = None

    def _set_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.transport_reset()
            return
        old = self.status
        new = value & STATUS_DRIVER_BITS
        if new & FEATURES_OK and not old & FEATURES_OK and not self._features_ok():
            new &= ~FEATURES_OK  # not acceptable: the driver reads it back clear
        if new & DRIVER_OK and not new & FEATURES_OK:
            new &= ~DRIVER_OK  # DRIVER_OK without accepted features is a driver error
            self.driver_error("DRIVER_OK before FEATURES_OK")
        self.status = new
        if new & DRIVER_OK and not old & DRIVER_OK and not self.needs_reset:
            self.driver_ok()

    def _features_ok(self) -> bool:
        features = self.driver_features
        if features & ~self.offered_features or not features & F_VERSION_1:
            return False
        return self.features_acceptable(features)

    # =========================================================================================
    # Migration: the transport's part

    def save_transport(self) -> bytes:
        head = _COMMON_STATE.pack(
            self.driver_features,
            self.device_feature_select,
            self.driver_feature_select,
            self.status,
            int(self.needs_reset),
            self.isr,
            self.config_vector,
            self.queue_select,
            self.config_generation,
        )
        queues = b"".join(
            _QUEUE_STATE.pack(
                q.size,
                int(q.enabled),
                q.vector,
                q.desc,
                q.driver,
                q.device,
                q.last_avail,
                q.used_idx,
                -1 if q.signalled_used is None else q.signalled_used,
            )
            for q in self.queues
        )
        return head + queues

    def parse_transport(self, blob: memoryview) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        """Validate a saved transport state (ValueError on any defect)."""
        expected = _COMMON_STATE.size + _QUEUE_STATE.size * len(self.queues)
        if len(blob) != expected:
            raise ValueError(f"transport state of {len(blob)} bytes, expected {expected}")
        head = _COMMON_STATE.unpack_from(blob)
        features, _, _, status, needs_reset, isr, config_vector, _, _ = head
        if features & ~self.offered_features:
            raise ValueError("driver features beyond the offered ones")
        if status & ~STATUS_DRIVER_BITS or needs_reset > 1 or isr & ~(ISR_QUEUE | ISR_CONFIG):
            raise ValueError("status or ISR bits out of range")
        if status & FEATURES_OK and not (
            features & F_VERSION_1 and self.features_acceptable(features)
        ):
            raise ValueError("FEATURES_OK with features the device would not accept")
        if config_vector != NO_VECTOR and config_vector >= self.msix_vectors:
            raise ValueError("configuration vector out of range")
        queues = []
        for i, queue in enumerate(self.queues):
            fields = _QUEUE_STATE.unpack_from(blob, _COMMON_STATE.size + i * _QUEUE_STATE.size)
            size, enabled, vector, desc, driver, device, _, _, signalled = fields
            probe = VirtQueue(i, queue.max_size)
            probe.size, probe.desc, probe.driver, probe.device = size, desc, driver, device
            if enabled > 1 or (vector != NO_VECTOR and vector >= self.msix_vectors):
                raise ValueError(f"queue {i}: enable flag or vector out of range")
            if not 0 <= size <= queue.max_size or not -1 <= signalled <= 0xFFFF:
                raise ValueError(f"queue {i}: size or event index out of range")
            if enabled:
                try:
                    probe.check_layout()
                except VirtqueueError as exc:
                    raise ValueError(str(exc)) from None
            queues.append(fields)
        return head, queues

    def load_transport(self, head: tuple[int, ...], queues: list[tuple[int, ...]]) -> None:
        (
            self.driver_features,
            self.device_feature_select,
            self.driver_feature_select,
            self.status,
            needs_reset,
            self.isr,
            self.config_vector,
            self.queue_select,
            self.config_generation,
        ) = head
        self.needs_reset = bool(needs_reset)
        for queue, fields in zip(self.queues, queues, strict=True):
            size, enabled, vector, desc, driver, device, last_avail, used_idx, signalled = fields
            queue.size, queue.enabled, queue.vector = size, bool(enabled), vector
            queue.desc, queue.driver, queue.device = desc, driver, device
            queue.last_avail, queue.used_idx = last_avail, used_idx
            queue.signalled_used = None if signalled < 0 else signalled
