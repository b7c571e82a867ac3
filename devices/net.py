"""The network side of a device model: how a NIC exchanges frames with a backend.

The runtime (``emulator.netdev``) owns the backend (UNIX datagram/stream sockets, tap, pcap)
and gives the device a :class:`NetPort`. The device hands frames to send to
:meth:`NetPort.transmit` and receives frames through :meth:`NetDevice.net_receive`, which
the runtime calls only while the device accepts frames (:meth:`NetPort.set_accepting`):
a device that is stopped (migration states other than RUNNING/PRE_COPY) or has receive
disabled says so, and the runtime queues arriving frames up to a bound (counting drops
beyond it) and delivers them, in order, once the device accepts again. Nothing here does
I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class NetStats:
    """Counters a backend keeps (for tests, the soak harness and ``info``)."""

    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    tx_dropped: int = 0  # backend full (back-pressure) or link down
    rx_queued_dropped: int = 0  # arrived while the device did not accept, queue full
    extra: dict[str, int] = field(default_factory=dict)


class NetPort(Protocol):
    """What the runtime gives a NIC model."""

    def transmit(self, frame: bytes) -> bool:
        """Send one Ethernet frame (no FCS). False when the backend dropped it (full or
        disconnected): the device counts it, the guest's frame is not retried."""
        ...

    def set_accepting(self, accepting: bool) -> None:
        """Whether :meth:`NetDevice.net_receive` may be called now. While False the
        runtime queues frames (bounded) and delivers them after it becomes True."""
        ...


class NetDevice(Protocol):
    """What a NIC model implements for the runtime."""

    #: The ``netdev=ID`` the device was configured with (None: not wired).
    netdev_id: str | None

    def attach_net(self, port: NetPort) -> None: ...

    def net_receive(self, frame: bytes) -> None:
        """One frame from the wire. The device filters it, DMAs it into a receive buffer
        (through a submitted job) or counts a drop when it has no buffer."""
        ...


class DetachedPort:
    """The port of a NIC not wired to any backend: frames go nowhere (counted)."""

    def __init__(self) -> None:
        self.stats = NetStats()

    def transmit(self, frame: bytes) -> bool:
        self.stats.tx_dropped += 1
        return False

    def set_accepting(self, accepting: bool) -> None:
        return None
