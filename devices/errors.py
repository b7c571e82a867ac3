"""Errors a device reports to the runtime; ``errno`` is what the client is answered with."""

from __future__ import annotations

import errno


class DeviceError(Exception):
    """A device refuses an access or operation; ``errno`` is what the client is told."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class DmaFault(DeviceError):
    """A DMA access outside the client's mappings or against their permissions."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EFAULT, message)
