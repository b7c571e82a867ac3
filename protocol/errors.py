"""The one exception the protocol layer raises."""

from __future__ import annotations

import errno as _errno


class ProtocolError(Exception):
    """Malformed or refused input. ``errno`` is what the peer is answered with.

    ``fatal`` marks framing damage after which the byte stream cannot be trusted, so the
    connection has to be closed instead of answered.
    """

    def __init__(self, errno: int, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message
        self.fatal = fatal

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.message}"


def invalid(message: str) -> ProtocolError:
    return ProtocolError(_errno.EINVAL, message)


def require(condition: bool, message: str, errno: int = _errno.EINVAL) -> None:
    """Raise :class:`ProtocolError` with ``errno`` unless ``condition`` holds."""
    if not condition:
        raise ProtocolError(errno, message)
