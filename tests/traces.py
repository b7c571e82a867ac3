"""Streaming loader for the captured wire traces in ``tests/data/interop/*.jsonl.xz``.

The traces were captured between independent vfio-user implementations (see the README
there) and ship with the repository, xz-compressed, so a bare clone runs every interop test.
Each message line of a trace becomes a :class:`TraceMessage`; proxy notes (lines with an
``event`` key) are skipped. Files are read line by line, so a caller that stops iterating
early never decompresses the rest of a large trace (the e1000 one is 8.7 MB).
"""

from __future__ import annotations

import functools
import json
import lzma
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from protocol.constants import FLAG_NO_REPLY, HEADER_SIZE
from protocol.header import Header

#: Where the traces are: the repository's copy unless VFIO_USER_TRACES points elsewhere
#: (there, a trace may be plain ``NAME`` or compressed ``NAME.xz``).
TRACE_DIR = Path(
    os.environ.get("VFIO_USER_TRACES") or Path(__file__).resolve().parent / "data" / "interop"
)

LVU_CLIENT = "lvu-client-server.jsonl"
LVU_V1_CLIENT = "lvu-v1-client-server.jsonl"
QEMU_GPIO = "qemu-gpio.jsonl"
QEMU_GPIO_NOFD = "qemu-gpio-nofd.jsonl"
QEMU_E1000 = "qemu-e1000-remote.jsonl"


@dataclass(frozen=True, slots=True)
class TraceMessage:
    """One message as it was on the wire: ``raw`` is byte-identical to what was sent."""

    seq: int
    conn: str
    from_client: bool
    header: Header
    payload: bytes
    nfds: int
    decoded: str

    @property
    def raw(self) -> bytes:
        return self.header.pack() + self.payload

    @property
    def msg_id(self) -> int:
        return self.header.msg_id

    @property
    def command(self) -> int:
        return self.header.command

    @property
    def posted(self) -> bool:
        """A request that carries NO_REPLY (QEMU's posted BAR writes)."""
        return bool(self.header.flags & FLAG_NO_REPLY)

    def __str__(self) -> str:
        side = "C>S" if self.from_client else "S>C"
        return f"#{self.seq} {side} id={self.msg_id} {self.header.command_name()} {self.decoded}"


def trace_path(name: str) -> Path:
    """Path of a trace, plain or xz-compressed. A missing trace is an error, not a skip: the
    traces are part of the repository."""
    for candidate in (TRACE_DIR / name, TRACE_DIR / f"{name}.xz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"interop trace {name} not found under {TRACE_DIR}")


def open_trace(path: Path) -> TextIO:
    """A trace file's lines as text, decompressing an .xz on the fly."""
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _parse(line: str) -> TraceMessage | None:
    rec = json.loads(line)
    if "event" in rec:
        return None
    payload = bytes.fromhex(rec["payload_hex"])
    if len(payload) != rec["payload_len"] or rec["msg_size"] != HEADER_SIZE + len(payload):
        raise ValueError(f"trace line seq {rec.get('seq')}: payload does not match msg_size")
    header = Header(rec["msg_id"], rec["cmd"], rec["msg_size"], rec["flags"], rec["error_no"])
    return TraceMessage(
        seq=rec["seq"],
        conn=rec["conn"],
        from_client=rec["direction"] == "client->server",
        header=header,
        payload=payload,
        nfds=rec["nfds"],
        decoded=rec.get("decoded", ""),
    )


def messages(
    name: str, *, conn: str | None = None, max_seq: int | None = None
) -> Iterator[TraceMessage]:
    """Messages of one trace in capture order (both directions), read lazily.

    ``conn`` keeps one connection's messages; iteration stops after ``max_seq``.
    """
    with open_trace(trace_path(name)) as lines:
        for line in lines:
            msg = _parse(line)
            if msg is None:
                continue
            if max_seq is not None and msg.seq > max_seq:
                return
            if conn is None or msg.conn == conn:
                yield msg


def requests(
    name: str, *, conn: str | None = None, max_seq: int | None = None
) -> Iterator[TraceMessage]:
    """Only the client->server messages."""
    return (msg for msg in messages(name, conn=conn, max_seq=max_seq) if msg.from_client)


def first_request(name: str, command: int, *, conn: str | None = None) -> TraceMessage:
    """The first client request of ``command`` in a trace."""
    for msg in requests(name, conn=conn):
        if msg.command == command:
            return msg
    raise LookupError(f"{name}: no client request with command {command}")


def conversation(
    name: str, conn: str, first: int, last: int, *, skip: Collection[int] = ()
) -> list[tuple[TraceMessage, TraceMessage]]:
    """(client request, recorded reply) pairs of one connection with seq in [first, last];
    ``skip`` leaves out messages by seq (e.g. server->client DMA requests and replies)."""
    pairs = []
    pending: TraceMessage | None = None
    for msg in messages(name, conn=conn, max_seq=last):
        if msg.seq < first or msg.seq in skip:
            continue
        if msg.from_client:
            assert pending is None, f"{msg}: two requests in a row"
            pending = msg
        else:
            assert pending is not None and pending.msg_id == msg.msg_id, msg
            pairs.append((pending, msg))
            pending = None
    assert pending is None
    return pairs


ALL_TRACES = (
    QEMU_GPIO,
    QEMU_GPIO_NOFD,
    QEMU_E1000,
    LVU_CLIENT,
    LVU_V1_CLIENT,
)
QEMU_TRACES = ALL_TRACES[:3]


@functools.cache
def _load(name: str) -> tuple[TraceMessage, ...]:
    return tuple(messages(name))


def load(name: str) -> tuple[TraceMessage, ...]:
    """All messages of one trace file, in capture order."""
    trace_path(name)
    return _load(name)


def by_seq(name: str, seq: int) -> TraceMessage:
    for msg in load(name):
        if msg.seq == seq:
            return msg
    raise LookupError(f"{name}: no message with seq {seq}")
