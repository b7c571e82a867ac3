"""VERSION negotiation: the capabilities JSON both sides exchange (facts section 3)."""

from __future__ import annotations

import dataclasses
import errno
import json
from dataclasses import dataclass
from typing import Any

from .constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    MAX_DMA_MAPS_LIMIT,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    QEMU_MAX_MSG_FDS,
    QEMU_MAX_XFER_SIZE,
    SPEC_DEFAULT_MAX_MSG_FDS,
)
from .errors import ProtocolError, require
from .messages import VersionPayload

#: A client may advertise at most this many fds per message (libvfio-user's bound).
CLIENT_MAX_MSG_FDS_LIMIT = 1024
#: Largest JSON text we parse; QEMU sends 194 bytes, libvfio-user about 60.
MAX_JSON_TEXT = 4096
PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class ClientCapabilities:
    """What the client told us about itself; defaults are the spec's for absent keys."""

    major: int = PROTOCOL_MAJOR
    minor: int = 0
    max_msg_fds: int = SPEC_DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = MAX_DMA_MAPS_LIMIT
    pgsizes: int = PAGE_SIZE
    write_multiple: bool = False
    twin_socket: bool = False
    migration_pgsize: int | None = None
    #: Extension: the client can take migration data over a passed fd.
    migration_data_fd: bool = False
    #: Extension: the client asks pre-copy sizes with MIG_GET_PRECOPY_INFO.
    migration_precopy_info: bool = False
    #: Extension: the client takes error replies that carry the reason as UTF-8 text.
    error_detail: bool = False


@dataclass(frozen=True, slots=True)
class ServerCapabilities:
    """What we advertise. Kept small: QEMU rejects a reply larger than its 214-byte request."""

    max_msg_fds: int = 8
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = MAX_DMA_MAPS_LIMIT
    pgsizes: int = PAGE_SIZE
    write_multiple: bool = True
    #: Dirty-page granularity advertised as "migration": {"pgsize": N}, as libvfio-user
    #: does when migration is configured (QEMU requires a multiple of 4096).
    migration_pgsize: int | None = PAGE_SIZE
    #: Offer migration data over a passed fd to clients that ask (extension key).
    migration_data_fd: bool = True
    #: Offer MIG_GET_PRECOPY_INFO to clients that ask (extension key).
    migration_precopy_info: bool = True
    #: Offer error replies with the reason's text to clients that ask (extension key).
    error_detail: bool = True

    def __post_init__(self) -> None:
        # QEMU refuses the whole device if any of these is out of its range.
        if not 1 <= self.max_msg_fds <= QEMU_MAX_MSG_FDS:
            raise ValueError(f"max_msg_fds must be 1..{QEMU_MAX_MSG_FDS}")
        if not 4096 <= self.max_data_xfer_size <= QEMU_MAX_XFER_SIZE:
            raise ValueError(f"max_data_xfer_size must be 4096..{QEMU_MAX_XFER_SIZE}")
        if not 1 <= self.max_dma_maps <= MAX_DMA_MAPS_LIMIT:
            raise ValueError(f"max_dma_maps must be 1..{MAX_DMA_MAPS_LIMIT}")
        if self.pgsizes <= 0 or self.pgsizes % PAGE_SIZE:
            raise ValueError("pgsizes must be a non-zero multiple of 4096")
        if self.migration_pgsize is not None and (
            self.migration_pgsize <= 0 or self.migration_pgsize % PAGE_SIZE
        ):
            raise ValueError("migration pgsize must be a non-zero multiple of 4096")

    def to_json(self) -> str:
        caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
        }
        if self.write_multiple:
            caps["write_multiple"] = True
        if self.error_detail:
            caps["error_detail"] = True
        migration: dict[str, Any] = {}
        if self.migration_pgsize is not None:
            migration["pgsize"] = self.migration_pgsize
        if self.migration_data_fd:
            migration["data_fd"] = True
        if self.migration_precopy_info:
            migration["precopy_info"] = True
        if migration:
            caps["migration"] = migration
        return json.dumps({"capabilities": caps}, separators=(",", ":"))


def _int_field(caps: dict[str, Any], key: str, low: int, high: int, default: int) -> int:
    if key not in caps:
        return default
    value = caps[key]
    # bool is an int subclass in Python; JSON true is not a number.
    require(
        isinstance(value, int) and not isinstance(value, bool),
        f"VERSION: capability {key!r} must be an integer, got {value!r}",
    )
    require(low <= value <= high, f"VERSION: capability {key}={value} outside {low}..{high}")
    return int(value)


def _bool_field(obj: dict[str, Any], key: str, where: str) -> bool:
    if key not in obj:
        return False
    value = obj[key]
    require(isinstance(value, bool), f"VERSION: {where}{key!r} must be a boolean")
    return bool(value)


def _object_field(obj: dict[str, Any], key: str) -> dict[str, Any]:
    if key not in obj:
        return {}
    value = obj[key]
    require(isinstance(value, dict), f"VERSION: {key!r} must be a JSON object")
    return dict(value)


def parse_capabilities_json(text: str | None) -> dict[str, Any]:
    """The ``capabilities`` object of a VERSION JSON text ({} when absent)."""
    if text is None or not text.strip():
        return {}
    require(len(text) <= MAX_JSON_TEXT, f"VERSION: JSON of {len(text)} bytes is too long")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(errno.EINVAL, f"VERSION: JSON does not parse ({exc})") from None
    require(isinstance(doc, dict), "VERSION: JSON is not an object")
    return _object_field(doc, "capabilities")


def parse_client_version(version: VersionPayload) -> ClientCapabilities:
    """Validate a client's VERSION; unknown keys are accepted and ignored (spec)."""
    require(
        version.major == PROTOCOL_MAJOR,
        f"VERSION: major {version.major} unsupported (we speak {PROTOCOL_MAJOR})",
    )
    caps = parse_capabilities_json(version.json_text)
    migration = _object_field(caps, "migration")
    twin = _object_field(caps, "twin_socket")
    pgsize = None
    if "pgsize" in migration:
        pgsize = _int_field(migration, "pgsize", 1, 1 << 40, PAGE_SIZE)
    return ClientCapabilities(
        major=version.major,
        minor=version.minor,
        max_msg_fds=_int_field(caps, "max_msg_fds", 0, CLIENT_MAX_MSG_FDS_LIMIT, 1),
        max_data_xfer_size=_int_field(
            caps, "max_data_xfer_size", 1, 1 << 32, DEFAULT_MAX_DATA_XFER_SIZE
        ),
        max_dma_maps=_int_field(caps, "max_dma_maps", 0, 1 << 32, MAX_DMA_MAPS_LIMIT),
        pgsizes=_int_field(caps, "pgsizes", 0, 1 << 64, PAGE_SIZE),
        write_multiple=_bool_field(caps, "write_multiple", ""),
        twin_socket=_bool_field(twin, "supported", "twin_socket."),
        migration_pgsize=pgsize,
        migration_data_fd=_bool_field(migration, "data_fd", "migration."),
        migration_precopy_info=_bool_field(migration, "precopy_info", "migration."),
        error_detail=_bool_field(caps, "error_detail", ""),
    )


def negotiate(
    version: VersionPayload, ours: ServerCapabilities
) -> tuple[ClientCapabilities, VersionPayload]:
    """Validate the client's VERSION and build our reply (minor = min(theirs, ours))."""
    client = parse_client_version(version)
    minor = min(version.minor, PROTOCOL_MINOR)
    if ours.migration_data_fd and not (client.migration_data_fd and client.max_msg_fds > 0):
        # Clients that did not ask for the extension (or cannot take fds) see exactly the
        # standard protocol.
        ours = dataclasses.replace(ours, migration_data_fd=False)
    if ours.migration_precopy_info and not client.migration_precopy_info:
        ours = dataclasses.replace(ours, migration_precopy_info=False)
    if ours.error_detail and not client.error_detail:
        ours = dataclasses.replace(ours, error_detail=False)
    return client, VersionPayload(PROTOCOL_MAJOR, minor, ours.to_json())
