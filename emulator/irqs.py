"""Eventfds the client bound with SET_IRQS, and the SET_IRQS rules (facts section 6).

The interrupt *logic* (masking, pending bits, INTx automask) lives in
:mod:`devices.irq`; this module owns the fds and implements the device's
:class:`~devices.irq.IrqSink` by writing them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Protocol

from devices.irq import ERR, INTX, MSI, MSIX, NUM_IRQ_INDEXES, REQ, InterruptController
from emulator.eventfd_signal import signaller
from protocol.constants import IrqSetFlags
from protocol.errors import ProtocolError, require
from protocol.messages import IrqSet


def signal_eventfd(fd: int) -> bool:
    """Add 1 to a client's eventfd without blocking and without changing its file status
    flags (they are the client's: see :mod:`emulator.eventfd_signal`). False when nothing
    was delivered (not an eventfd)."""
    return signaller().signal(fd)


def close_eventfd(fd: int) -> None:
    signaller().forget(fd)
    os.close(fd)


class FdWatcher(Protocol):
    """Runs ``callback`` whenever ``fd`` becomes readable (provided by the connection)."""

    def watch(self, fd: int, callback: Callable[[], None]) -> None: ...

    def unwatch(self, fd: int) -> None:
        """Stop watching; must be called before the fd is closed."""
        ...


class IrqBindings:
    """Trigger eventfds per (index, vector), and INTx unmask (resample) eventfds."""

    def __init__(self, controller: InterruptController, watcher: FdWatcher) -> None:
        self.controller = controller
        self.triggers: list[dict[int, int]] = [{} for _ in range(NUM_IRQ_INDEXES)]
        #: eventfds the client signals to unmask INTx (QEMU's KVM resample pattern).
        self.unmask_fds: dict[int, int] = {}
        self.watcher = watcher

    # IrqSink
    def fire(self, index: int, vector: int) -> bool:
        fd = self.triggers[index].get(vector)
        return fd is not None and signal_eventfd(fd)

    def fd_count(self) -> int:
        return sum(len(t) for t in self.triggers) + len(self.unmask_fds)

    def bound_in(self, index: int, start: int, count: int) -> int:
        """How many trigger eventfds are bound to vectors [start, start+count) of ``index``."""
        if index >= NUM_IRQ_INDEXES:
            return 0
        return sum(1 for vector in self.triggers[index] if start <= vector < start + count)

    def close_all(self) -> None:
        for table in self.triggers:
            for fd in table.values():
                close_eventfd(fd)
            table.clear()
        self._drop_unmask_fd()

    # -- SET_IRQS ------------------------------------------------------------------------
    def set_irqs(self, request: IrqSet, fds: list[int]) -> None:
        """Apply one SET_IRQS. Takes the fds it keeps out of ``fds`` (the rest stay there
        for the caller to close)."""
        index, start, count = request.index, request.start, request.count
        require(index < NUM_IRQ_INDEXES, f"SET_IRQS: irq index {index} does not exist")
        available = self.controller.count(index)
        data, action = request.data_type, request.action
        require(data == IrqSetFlags.DATA_EVENTFD or not fds, "SET_IRQS: fds without DATA_EVENTFD")
        if count == 0:
            require(
                data == IrqSetFlags.DATA_NONE and action == IrqSetFlags.ACTION_TRIGGER,
                "SET_IRQS: count 0 is only DATA_NONE|ACTION_TRIGGER (disable)",
            )
            require(start == 0, "SET_IRQS: disable needs start 0")
            require(available > 0, f"SET_IRQS: irq index {index} has no vectors")
            self._disable(index)
            return
        require(
            start < available and start + count <= available,
            f"SET_IRQS: vectors [{start}, {start + count}) outside {available} of index {index}",
        )
        if index in (ERR, REQ):
            require(action == IrqSetFlags.ACTION_TRIGGER, "SET_IRQS: ERR/REQ only trigger")
        if data == IrqSetFlags.DATA_EVENTFD:
            self._eventfds(request, fds)
            return
        if data == IrqSetFlags.DATA_BOOL:
            vectors = [start + i for i, flag in enumerate(request.data) if flag]
        else:
            vectors = list(range(start, start + count))
        for vector in vectors:
            self._act(action, index, vector)

    def _act(self, action: IrqSetFlags, index: int, vector: int) -> None:
        if action == IrqSetFlags.ACTION_MASK:
            self.controller.mask(index, vector)
        elif action == IrqSetFlags.ACTION_UNMASK:
            self.controller.unmask(index, vector)
        else:
            self.controller.trigger(index, vector)

    def _eventfds(self, request: IrqSet, fds: list[int]) -> None:
        index, start, count = request.index, request.start, request.count
        action = request.action
        require(len(fds) in (0, count), f"SET_IRQS: {len(fds)} fds for count {count}")
        if action == IrqSetFlags.ACTION_TRIGGER:
            table = self.triggers[index]
            for i in range(count):
                old = table.pop(start + i, None)
                if old is not None:
                    close_eventfd(old)
                if index == MSIX:
                    self.controller.program_msix_vector(start + i, live=bool(fds))
            if fds:
                for i in range(count):
                    table[start + i] = fds.pop(0)
                # A newly bound vector may have an interrupt waiting for it.
                self.controller.resync()
            elif index in (MSI, MSIX) and start == 0 and count == 1 and not table:
                pass  # QEMU's "enable MSI-X with no vectors": nothing bound yet, nothing to do
            return
        if action == IrqSetFlags.ACTION_UNMASK and index == INTX:
            # Kernel semantics: an eventfd the client signals to unmask (KVM resample).
            self._drop_unmask_fd()
            if fds:
                fd = fds.pop(0)
                self.unmask_fds[0] = fd
                self.watcher.watch(fd, self._resampled)
            return
        raise ProtocolError(
            errno.ENOTSUP, f"SET_IRQS: eventfd with {action!r} on index {index} not supported"
        )

    def _disable(self, index: int) -> None:
        table = self.triggers[index]
        for vector, fd in table.items():
            close_eventfd(fd)
            if index == MSIX:
                self.controller.program_msix_vector(vector, live=False)
        table.clear()
        if index == INTX:
            self._drop_unmask_fd()
        self.controller.disable(index)

    def _drop_unmask_fd(self) -> None:
        old = self.unmask_fds.pop(0, None)
        if old is not None:
            self.watcher.unwatch(old)
            os.close(old)

    def _resampled(self) -> None:
        self.controller.unmask(INTX, 0)
