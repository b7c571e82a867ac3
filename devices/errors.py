"""Errors a device reports to the runtime; ``errno`` is what the client is answered with."""

from __future__ import annotations

import errno


class DeviceError(Exception):
    """A device refuses an access or operation; ``errno`` is what the client is told."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class MigrationRefused(DeviceError):
    """A migration request the device's state does not allow (an impossible transition, data
    read or written in the wrong state): EINVAL, and nothing changed. Its own type so the
    runtime can tell it from an arc that failed (which ends a data session)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class DmaFault(DeviceError):
    """A DMA access outside the client's mappings or against their permissions."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EFAULT, message)


class ClientGone(DmaFault):
    """The DMA could not be done because the client's connection is going away (the request
    could not be sent). Not a fault of the access: the work it belongs to dies with the
    connection, and a device that keeps such work pending runs it for the next client."""
