"""Sans-IO vfio-user protocol: bytes in, typed objects out. No sockets, no trio, no fd I/O."""

from .connection import (
    CommandReceived,
    ConnState,
    Fatal,
    Negotiated,
    Rejected,
    ReplyReceived,
    ServerConnection,
)
from .constants import Command, MigState
from .errors import ProtocolError
from .framer import Message, MessageFramer, Oversized
from .header import Header
from .version import ClientCapabilities, ServerCapabilities

__all__ = [
    "ClientCapabilities",
    "Command",
    "CommandReceived",
    "ConnState",
    "Fatal",
    "Header",
    "Message",
    "MessageFramer",
    "MigState",
    "Negotiated",
    "Oversized",
    "ProtocolError",
    "Rejected",
    "ReplyReceived",
    "ServerCapabilities",
    "ServerConnection",
]
