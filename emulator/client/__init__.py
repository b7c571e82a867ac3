"""The client side of vfio-user: a trio client, the migration drivers, device descriptions.

Nothing here serves a device; everything here talks to a server over its socket.

The names below are the client's public API (``from emulator.client import Client``); the
modules behind them are :mod:`emulator.client.core` (the typed commands) and
:mod:`emulator.client.requests` (the request machinery). The migration drivers, guest memory
migration, ``info`` and QEMU arguments are modules of their own (``emulator.client.migrate``
...), imported by name.
"""

from emulator.client.core import Client, RegionDescription
from emulator.client.requests import (
    ClientError,
    ConnectionLost,
    DmaMemory,
    GuestMemory,
    InFlight,
    InvalidReply,
)

__all__ = [
    "Client",
    "ClientError",
    "ConnectionLost",
    "DmaMemory",
    "GuestMemory",
    "InFlight",
    "InvalidReply",
    "RegionDescription",
]
