"""Loading the captured wire traces (/work/shared/interop/*.jsonl) as test vectors.

Each message line becomes a :class:`TraceMessage` whose ``raw`` is the exact message as it
was on the wire (16-byte header rebuilt from the logged fields, then the logged payload).
Tests that need a trace skip when the directory is not there (``VFIO_USER_TRACES`` overrides
the location).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocol.header import Header

TRACE_DIR = Path(os.environ.get("VFIO_USER_TRACES", "/work/shared/interop"))


@dataclass(frozen=True, slots=True)
class TraceMessage:
    seq: int
    conn: str
    from_client: bool
    header: Header
    payload: bytes
    nfds: int

    @property
    def raw(self) -> bytes:
        return self.header.pack() + self.payload


@functools.cache
def _load(name: str) -> tuple[TraceMessage, ...]:
    path = TRACE_DIR / name
    out = []
    with path.open() as f:
        for line in f:
            rec = json.loads(line)
            if "event" in rec:
                continue
            payload = bytes.fromhex(rec["payload_hex"])
            assert len(payload) == rec["payload_len"] == rec["msg_size"] - 16
            header = Header(
                rec["msg_id"], rec["cmd"], rec["msg_size"], rec["flags"], rec["error_no"]
            )
            out.append(
                TraceMessage(
                    seq=rec["seq"],
                    conn=rec["conn"],
                    from_client=rec["direction"] == "client->server",
                    header=header,
                    payload=payload,
                    nfds=rec["nfds"],
                )
            )
    return tuple(out)


def load(name: str) -> tuple[TraceMessage, ...]:
    """All messages of one trace file, in capture order; skips the test if it is missing."""
    if not (TRACE_DIR / name).is_file():
        pytest.skip(f"trace {name} not available under {TRACE_DIR}")
    return _load(name)


def by_seq(name: str, seq: int) -> TraceMessage:
    for msg in load(name):
        if msg.seq == seq:
            return msg
    raise LookupError(f"{name}: no message with seq {seq}")


ALL_TRACES = (
    "qemu-gpio.jsonl",
    "qemu-gpio-nofd.jsonl",
    "qemu-e1000-remote.jsonl",
    "lvu-client-server.jsonl",
    "lvu-v1-client-server.jsonl",
)
QEMU_TRACES = ALL_TRACES[:3]
