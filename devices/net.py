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

#: How a NIC that migrated in announces its MAC: the delay before each round, from the
#: previous one, the first at once when the device resumes. QEMU's announce-self defaults
#: (announce-initial 50 ms, announce-step 100 ms, announce-rounds 5, announce-max 550 ms in
#: migration/options.c; net/announce.c sends the first round at once and then waits
#: initial + (rounds - round - 1) * step), i.e. frames at 0, 50, 200, 450 and 800 ms.
ANNOUNCE_DELAYS = (0.0, 0.05, 0.15, 0.25, 0.35)
ETH_P_RARP = 0x8035
ANNOUNCE_FRAME_SIZE = 60


def announcement(mac: bytes) -> bytes:
    """The gratuitous RARP QEMU's announce-self sends for a NIC (``announce_self_create``
    in net/announce.c): to broadcast from ``mac``, a reverse request (opcode 3) for
    Ethernet/IPv4 whose sender and target hardware addresses are ``mac`` and whose
    protocol addresses are 0, padded to the 60-byte minimum. Switches learn the port from
    the source address; guests ignore it."""
    if len(mac) != 6:
        raise ValueError("a MAC address has 6 bytes")
    rarp = (
        (1).to_bytes(2, "big")  # hardware: Ethernet
        + (0x0800).to_bytes(2, "big")  # protocol: IPv4
        + bytes((6, 4))
        + (3).to_bytes(2, "big")  # reverse request
        + mac
        + bytes(4)
        + mac
        + bytes(4)
    )
    frame = b"\xff" * 6 + mac + ETH_P_RARP.to_bytes(2, "big") + rarp
    return frame.ljust(ANNOUNCE_FRAME_SIZE, b"\0")


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
