"""Everything a client may make the server hold, bounded in one place.

The server is attached to VMs and CI fleets, so a misbehaving or hostile client must never
make it allocate, loop or hold fds in proportion to a number the client chose. Each bound
below is checked before the allocation it protects; the README's "Limits" table lists
them with their defaults and the errno a client gets on violation. ``vfio-user-emu serve``
sets them with ``--max-...`` options.

Besides :class:`Limits` (per server, immutable), this module keeps the one piece of state
shared by all servers of a process: which devices have a migration data session open, so
that :attr:`Limits.max_migration_sessions` bounds them across devices (each resuming
session may stage up to 4 GiB).
"""

from __future__ import annotations

import argparse
import socket
import struct
from dataclasses import dataclass, field
from typing import Protocol

from devices.api import Device
from devices.irq import NUM_IRQ_INDEXES
from devices.migration.engine import DEFAULT_MAX_RESUME
from emulator.cli_common import positive_int_arg, positive_size_arg
from protocol.constants import QEMU_MAX_MSG_FDS
from protocol.messages import DmaLayout
from protocol.migration_fsm import DATA_STATES
from protocol.version import ServerCapabilities

#: MSI-X allows at most 2048 vectors per function (PCI spec); no real device needs more.
MSIX_MAX_VECTORS = 2048


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client may make us hold (documented in the README)."""

    #: Largest message accepted, header included; a larger one gets E2BIG and its payload
    #: is skipped without being buffered.
    max_message_size: int = 1024 * 1024 + 4096
    #: fds accepted with one message; more close the connection (the kernel has already
    #: dropped the excess, so the stream's fd attribution can no longer be trusted).
    max_fds_per_message: int = 16
    #: DMA mappings one client may hold (ENOSPC beyond).
    max_dma_maps: int = 65535
    #: Interrupt vectors one SET_IRQS may address, and eventfds one client may keep bound
    #: (E2BIG beyond); also the most vectors a served device may declare per index.
    max_irq_vectors: int = MSIX_MAX_VECTORS
    #: Commands received but not yet answered (held back, in order, while a deferred one
    #: such as a migration arc runs). Past this the reader reads on only so that the DMA
    #: replies the deferred command waits for get through: once the commands held beyond it
    #: reach max_message_size bytes or max_fds_per_message fds, it stops reading the socket,
    #: so the replies we owe the client (our queue of outgoing messages) stay bounded.
    max_queued_replies: int = 1024
    #: Devices of this process with a migration data session open at once (EBUSY beyond).
    max_migration_sessions: int = 4
    #: Bytes of resumed migration stream staged per device (EFBIG beyond); staged in a
    #: memfd, so sessions x this is the memory a resuming process may hold.
    max_migration_stream: int = DEFAULT_MAX_RESUME
    #: Peer uids allowed to connect (SO_PEERCRED); empty = anyone who can open the socket
    #: (it is created 0600, so: its owner and root).
    allowed_uids: frozenset[int] = field(default_factory=frozenset)
    #: mmap DMA_MAP fds the client could still shrink (files on disk, unsealed memfds).
    #: Off: those ranges are reached with pread/pwrite on the fd (hugetlbfs: with messages),
    #: since a file shrunk under our mapping makes the next access a SIGBUS that kills the
    #: server. Only for a trusted client backing guest RAM with such files.
    mmap_unsealed_dma: bool = False
    dma_reply_timeout: float = 10.0
    max_queued_jobs: int = 4096
    #: In-band DMA layout: None = decide per client (QEMU proposes minor 0, see
    #: protocol.messages.DmaLayout), or force one.
    dma_layout: DmaLayout | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_message_size",
            "max_fds_per_message",
            "max_dma_maps",
            "max_irq_vectors",
            "max_queued_replies",
            "max_migration_sessions",
            "max_migration_stream",
            "max_queued_jobs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_message_size < 4096 + 16:
            # VERSION, region infos and error replies must always fit.
            raise ValueError("max_message_size must be at least 4112 bytes")

    @property
    def max_backlog(self) -> int:
        """The connection's name for :attr:`max_queued_replies`."""
        return self.max_queued_replies


def apply_to_device(device: Device, limits: Limits) -> None:
    """Refuse to serve a device that declares more interrupt vectors than the limit; bound
    the migration stream it will stage."""
    for index in range(NUM_IRQ_INDEXES):
        count = device.irq.count(index)
        if count > limits.max_irq_vectors:
            raise ValueError(
                f"{device.type_name}: irq index {index} has {count} vectors, "
                f"more than max_irq_vectors={limits.max_irq_vectors}"
            )
    engine = device.migration
    engine.max_resume = min(engine.max_resume, limits.max_migration_stream)


# -- peer credentials ---------------------------------------------------------------------

_UCRED = struct.Struct("iII")  # pid, uid, gid


class _Socket(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def peer_uid(sock: _Socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


def peer_allowed(uid: int, allowed: frozenset[int]) -> bool:
    return not allowed or uid in allowed


# -- migration sessions, process-wide ------------------------------------------------------


class MigrationSessions:
    """The devices served by this process, to count open migration data sessions."""

    def __init__(self) -> None:
        self._devices: list[Device] = []

    def register(self, device: Device) -> None:
        self._devices.append(device)

    def unregister(self, device: Device) -> None:
        for at, known in enumerate(self._devices):
            if known is device:
                del self._devices[at]
                return

    def open_sessions(self, excluding: Device | None = None) -> int:
        return sum(
            1
            for device in self._devices
            if device is not excluding and device.migration.state in DATA_STATES
        )

    def may_open(self, device: Device, target: int, limit: int) -> bool:
        """Can ``device`` go to ``target`` without exceeding ``limit`` open sessions?"""
        if target not in DATA_STATES or device.migration.state in DATA_STATES:
            return True  # opens nothing new (or keeps the session it has)
        return self.open_sessions(excluding=device) < limit


#: One per process: the bound is on the memory all of this process's devices may stage.
MIGRATION_SESSIONS = MigrationSessions()


# -- command-line options -------------------------------------------------------------------

#: Room for a message's header and fixed fields next to the largest data transfer.
MESSAGE_OVERHEAD = 4096


#: The count limits' options: (option, Limits field, what it counts, what happens beyond).
_COUNT_OPTIONS = (
    ("--max-dma-maps", "max_dma_maps", "DMA mappings per client", "more: ENOSPC"),
    (
        "--max-fds-per-msg",
        "max_fds_per_message",
        "fds accepted with one message",
        "more: the connection is closed",
    ),
    (
        "--max-irq-vectors",
        "max_irq_vectors",
        "vectors per SET_IRQS and eventfds bound per client",
        "more: E2BIG",
    ),
    (
        "--max-queued-replies",
        "max_queued_replies",
        "commands awaiting their reply while one waits, e.g. for a migration arc",
        "beyond, the socket is read only for the DMA replies the device waits for, within"
        " --max-msg-size bytes",
    ),
    (
        "--max-migration-sessions",
        "max_migration_sessions",
        "devices of this process with migration data open at once",
        "more: EBUSY",
    ),
)


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """``serve``'s limit options (one block, documented in the README's "Limits")."""
    defaults = Limits()
    group = parser.add_argument_group("limits (what one client may make the server hold)")
    group.add_argument(
        "--max-msg-size",
        type=positive_size_arg,
        metavar="SIZE",
        help="largest message accepted, header included (default: the transfer size + 4 KiB;"
        " larger: E2BIG, payload skipped); also caps --max-data-xfer-size",
    )
    for option, field_name, what, beyond in _COUNT_OPTIONS:
        default = getattr(defaults, field_name)
        group.add_argument(
            option,
            type=positive_int_arg,
            default=default,
            metavar="N",
            help=f"{what} (default {default}; {beyond})",
        )
    group.add_argument(
        "--max-migration-stream",
        type=positive_size_arg,
        default=defaults.max_migration_stream,
        metavar="SIZE",
        help="resumed migration stream staged per device (default 4 GiB; more: EFBIG)",
    )
    group.add_argument(
        "--dma-mmap-unsealed",
        action="store_true",
        help="also mmap DMA fds the client could shrink (files, unsealed memfds): faster"
        " for a trusted client, but it could then crash the server (SIGBUS)",
    )
    group.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="only peers with this uid (SO_PEERCRED) may connect; repeatable"
        " (default: whoever can open the 0600 socket)",
    )


def limits_from_args(
    args: argparse.Namespace, layout: DmaLayout | None
) -> tuple[ServerCapabilities, Limits]:
    """What ``serve`` advertises in VERSION and the limits it enforces; ValueError when the
    options contradict each other or are out of range."""
    xfer = args.max_data_xfer_size
    max_message = args.max_msg_size
    if max_message is None:
        max_message = xfer + MESSAGE_OVERHEAD
    elif max_message < 2 * MESSAGE_OVERHEAD:
        raise ValueError(f"--max-msg-size must be at least {2 * MESSAGE_OVERHEAD}")
    else:
        # Never advertise a transfer that would not fit in a message we accept.
        xfer = min(xfer, max_message - MESSAGE_OVERHEAD)
    capabilities = ServerCapabilities(
        max_data_xfer_size=xfer,
        max_dma_maps=args.max_dma_maps,
        max_msg_fds=max(1, min(args.max_fds_per_msg, QEMU_MAX_MSG_FDS)),
    )
    limits = Limits(
        max_message_size=max_message,
        max_fds_per_message=args.max_fds_per_msg,
        max_dma_maps=args.max_dma_maps,
        max_irq_vectors=args.max_irq_vectors,
        max_queued_replies=args.max_queued_replies,
        max_migration_sessions=args.max_migration_sessions,
        max_migration_stream=args.max_migration_stream,
        allowed_uids=frozenset(args.allow_uid),
        mmap_unsealed_dma=args.dma_mmap_unsealed,
        dma_layout=layout,
    )
    return capabilities, limits
