"""Interrupt logic of a PCI function: INTx, MSI and MSI-X, without any I/O.

The device calls :meth:`InterruptController.notify` (message interrupts or an INTx
assertion, whichever mode the guest enabled in config space) and
:meth:`~InterruptController.raise_intx` / :meth:`~InterruptController.lower_intx` for its
level-triggered line. Delivery goes to an :class:`IrqSink`, which the runtime implements by
writing eventfds the client passed with SET_IRQS.

Semantics follow the kernel's vfio-pci, which QEMU expects:

* INTx is level-triggered and *automasked*: signalling the eventfd masks the line; while
  masked nothing more is signalled; on UNMASK the line is signalled again if the device still
  asserts it.
* MSI-X vectors masked (per-vector bit in the table, the function mask, or a vfio MASK from
  the client) latch their pending bit in the PBA and fire when unmasked.
* MSI with per-vector masking does the same with the capability's mask/pending bits.
* While delivery is suspended (device not running, for migration) every interrupt is
  latched and delivered on resume.
"""

from __future__ import annotations

import contextlib
import enum
import struct
from dataclasses import dataclass, field
from typing import Protocol

from devices.pci import ConfigSpace

INTX, MSI, MSIX, ERR, REQ = range(5)
NUM_IRQ_INDEXES = 5

# vfio irq info flags
EVENTFD, MASKABLE, AUTOMASKED, NORESIZE = 1, 2, 4, 8

MSIX_ENTRY_SIZE = 16
MSIX_CTRL_MASKBIT = 1


class IrqSink(Protocol):
    def fire(self, index: int, vector: int) -> bool:
        """Signal vector ``vector`` of irq index ``index``; False when nothing is bound."""
        ...


class NullSink:
    def fire(self, index: int, vector: int) -> bool:
        return False


class Delivery(enum.Enum):
    ACTIVE = "active"
    SUSPENDED = "suspended"  # device stopped: latch everything, deliver on resume


@dataclass(slots=True)
class _Vectors:
    count: int
    vfio_masked: list[bool] = field(default_factory=list)
    pending: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vfio_masked = [False] * self.count
        self.pending = [False] * self.count

    def clear(self) -> None:
        self.vfio_masked = [False] * self.count
        self.pending = [False] * self.count


class InterruptController:
    def __init__(self, config: ConfigSpace, *, msi_vectors: int = 0, msix_vectors: int = 0) -> None:
        self.config = config
        self.sink: IrqSink = NullSink()
        self.delivery = Delivery.ACTIVE
        intx_count = 1 if config.interrupt_pin else 0
        self._vectors = {
            INTX: _Vectors(intx_count),
            MSI: _Vectors(msi_vectors),
            MSIX: _Vectors(msix_vectors),
            ERR: _Vectors(1),
            REQ: _Vectors(1),
        }
        self.intx_line = False
        self.msix_table = bytearray(MSIX_ENTRY_SIZE * msix_vectors)
        self._reset_msix_table()
        self.delivered = [0] * NUM_IRQ_INDEXES  # counters, for tests and statistics
        config.add_write_listener(self._config_written)

    # -- what GET_IRQ_INFO reports ---------------------------------------------------------
    def count(self, index: int) -> int:
        return self._vectors[index].count

    def info_flags(self, index: int) -> int:
        if self.count(index) == 0:
            return EVENTFD
        if index == INTX:
            return EVENTFD | MASKABLE | AUTOMASKED
        if index == MSI:
            return EVENTFD | MASKABLE | NORESIZE
        if index == MSIX:
            return EVENTFD | MASKABLE
        return EVENTFD

    # -- device-facing API -----------------------------------------------------------------
    def notify(self, vector: int = 0) -> None:
        """Raise interrupt ``vector`` in whichever mode the guest enabled."""
        if self.config.msix_enabled and self.count(MSIX):
            self._message(MSIX, vector)
        elif self.config.msi_enabled and self.count(MSI):
            self._message(MSI, vector)
        else:
            self.raise_intx()

    def vectors_in_use(self) -> int:
        """Vectors of the mode the guest enabled (1 for INTx)."""
        if self.config.msix_enabled and self.count(MSIX):
            return self.count(MSIX)
        if self.config.msi_enabled and self.count(MSI):
            return max(self.config.msi_vectors_enabled, 1)
        return 1

    def raise_intx(self) -> None:
        self.intx_line = True
        self.config.set_interrupt_status(True)
        self._intx_update()

    def lower_intx(self) -> None:
        self.intx_line = False
        self.config.set_interrupt_status(False)
        self._vectors[INTX].pending[:] = [False] * self.count(INTX)

    def signal_error(self) -> bool:
        """ERR: tells QEMU to stop the VM. Only for unrecoverable device failures."""
        return self._fire(ERR, 0)

    def request_release(self) -> bool:
        """REQ: asks the client to release (unplug) the device."""
        return self._fire(REQ, 0)

    # -- client-facing (SET_IRQS actions) ----------------------------------------------------
    def mask(self, index: int, vector: int) -> None:
        self._vectors[index].vfio_masked[vector] = True

    def unmask(self, index: int, vector: int) -> None:
        self._vectors[index].vfio_masked[vector] = False
        if index == INTX:
            self._intx_update()
        else:
            self._retry_pending(index, vector)

    def trigger(self, index: int, vector: int) -> None:
        """A client-injected (loopback) trigger: deliver as if the device raised it."""
        if index == INTX:
            self.raise_intx()
        elif index in (MSI, MSIX):
            self._message(index, vector)
        else:
            self._fire(index, vector)

    def disable(self, index: int) -> None:
        """The client disabled the index (SET_IRQS DATA_NONE|TRIGGER count 0)."""
        self._vectors[index].pending[:] = [False] * self.count(index)

    # -- MSI-X table and PBA (the device maps them into a BAR) ------------------------------
    def msix_vector_masked(self, vector: int) -> bool:
        ctrl = struct.unpack_from("<I", self.msix_table, vector * MSIX_ENTRY_SIZE + 12)[0]
        return bool(ctrl & MSIX_CTRL_MASKBIT)

    def msix_table_write(self, offset: int, data: bytes) -> None:
        self.msix_table[offset : offset + len(data)] = data
        first = offset // MSIX_ENTRY_SIZE
        last = (offset + len(data) - 1) // MSIX_ENTRY_SIZE
        for vector in range(first, last + 1):
            self._retry_pending(MSIX, vector)

    def program_msix_vector(self, vector: int, live: bool) -> None:
        """The client bound (live) or released an eventfd for ``vector``.

        As the host kernel does for a vfio-pci device: binding programs the vector into the
        function's table unmasked, releasing masks it. A client that emulates the table itself
        (QEMU) never writes ours, and without this every vector would stay masked from reset.
        """
        if not 0 <= vector < self.count(MSIX):
            return
        at = vector * MSIX_ENTRY_SIZE + 12
        ctrl = struct.unpack_from("<I", self.msix_table, at)[0]
        ctrl = ctrl & ~MSIX_CTRL_MASKBIT if live else ctrl | MSIX_CTRL_MASKBIT
        self.msix_table_write(at, struct.pack("<I", ctrl))

    def pba_bytes(self) -> bytes:
        pending = self._vectors[MSIX].pending
        words = (len(pending) + 63) // 64
        value = sum(1 << i for i, bit in enumerate(pending) if bit)
        return value.to_bytes(8 * words, "little")

    # -- migration ---------------------------------------------------------------------------
    _SNAP_HEAD = struct.Struct("<BBI")  # format 1, INTx line level, MSI-X table bytes

    def _pending_bytes(self, index: int) -> int:
        return (self.count(index) + 7) // 8

    def snapshot(self) -> bytes:
        """Interrupt state that belongs to the device: MSI-X table, pending bits, INTx line.
        (vfio masks and eventfds belong to the client connection and are not saved.)"""
        parts = [self._SNAP_HEAD.pack(1, int(self.intx_line), len(self.msix_table))]
        parts.append(bytes(self.msix_table))
        for index in range(NUM_IRQ_INDEXES):
            bits = sum(1 << i for i, p in enumerate(self._vectors[index].pending) if p)
            parts.append(bits.to_bytes(self._pending_bytes(index), "little"))
        return b"".join(parts)

    def restore(self, blob: bytes | bytearray | memoryview) -> None:
        """Inverse of :meth:`snapshot`; raises ValueError (changing nothing) on a bad blob."""
        head = self._SNAP_HEAD
        expected = head.size + len(self.msix_table)
        expected += sum(self._pending_bytes(i) for i in range(NUM_IRQ_INDEXES))
        if len(blob) != expected:
            raise ValueError(f"interrupt state of {len(blob)} bytes, expected {expected}")
        version, line, table_size = head.unpack_from(blob)
        if version != 1 or line > 1 or table_size != len(self.msix_table):
            raise ValueError("interrupt state: bad version, line level or MSI-X table size")
        pos = head.size + table_size
        pending: list[list[bool]] = []
        for index in range(NUM_IRQ_INDEXES):
            width = self._pending_bytes(index)
            bits = int.from_bytes(blob[pos : pos + width], "little")
            if bits >> self.count(index):
                raise ValueError(f"interrupt state: pending bits beyond index {index}'s vectors")
            pending.append([bool(bits >> i & 1) for i in range(self.count(index))])
            pos += width
        self.msix_table[:] = blob[head.size : head.size + table_size]
        for index, bits_list in enumerate(pending):
            self._vectors[index].pending = bits_list
        self.intx_line = bool(line)
        self.config.set_interrupt_status(self.intx_line)

    # -- run state -----------------------------------------------------------------------
    def suspend(self) -> None:
        self.delivery = Delivery.SUSPENDED

    def resume(self) -> None:
        self.delivery = Delivery.ACTIVE
        self.resync()

    def reset(self) -> None:
        for vectors in self._vectors.values():
            vectors.clear()
        self.intx_line = False
        self.config.set_interrupt_status(False)
        self._reset_msix_table()

    def client_gone(self) -> None:
        """The client's eventfds are gone; vfio masks are per-connection state."""
        for vectors in self._vectors.values():
            vectors.vfio_masked = [False] * vectors.count

    # -- internals -----------------------------------------------------------------------
    def _reset_msix_table(self) -> None:
        for vector in range(self.count(MSIX)):
            # Entries come out of reset masked (PCI spec 6.8.2.9).
            struct.pack_into("<IIII", self.msix_table, vector * MSIX_ENTRY_SIZE, 0, 0, 0, 1)

    def _masked(self, index: int, vector: int) -> bool:
        if self._vectors[index].vfio_masked[vector]:
            return True
        if index == MSIX:
            return self.config.msix_function_masked or self.msix_vector_masked(vector)
        if index == MSI:
            return self.config.msi_vector_masked(vector)
        return False

    def _message(self, index: int, vector: int) -> None:
        vectors = self._vectors[index]
        if not 0 <= vector < vectors.count:
            raise ValueError(f"vector {vector} out of range for irq index {index}")
        if index == MSI and vector >= self.config.msi_vectors_enabled:
            return  # the guest enabled fewer vectors; the message is not generated
        if self.delivery is Delivery.SUSPENDED or self._masked(index, vector):
            self._set_pending(index, vector, True)
            return
        self._set_pending(index, vector, False)
        self._fire(index, vector)

    def _set_pending(self, index: int, vector: int, pending: bool) -> None:
        self._vectors[index].pending[vector] = pending
        if index == MSI:
            # Mirror into the capability's Pending Bits, where the function has them.
            with contextlib.suppress(ValueError):
                self.config.set_msi_pending(vector, pending)

    def _retry_pending(self, index: int, vector: int) -> None:
        vectors = self._vectors[index]
        if 0 <= vector < vectors.count and vectors.pending[vector]:
            self._message(index, vector)

    def _intx_update(self) -> None:
        vectors = self._vectors[INTX]
        if not vectors.count or not self.intx_line:
            return
        if self.config.msix_enabled or self.config.msi_enabled or self.config.intx_disabled:
            return
        if vectors.vfio_masked[0] or self.delivery is Delivery.SUSPENDED:
            vectors.pending[0] = True
            return
        vectors.pending[0] = False
        if self._fire(INTX, 0):
            vectors.vfio_masked[0] = True  # automask, as vfio-pci does

    def resync(self) -> None:
        self._intx_update()
        for index in (MSI, MSIX):
            for vector in range(self.count(index)):
                self._retry_pending(index, vector)

    def _fire(self, index: int, vector: int) -> bool:
        if self.delivery is Delivery.SUSPENDED:
            self._vectors[index].pending[vector] = True
            return False
        delivered = self.sink.fire(index, vector)
        if delivered:
            self.delivered[index] += 1
        return delivered

    def _config_written(self, offset: int, length: int) -> None:
        # Enable/mask changes in config space may release latched interrupts.
        self.resync()
