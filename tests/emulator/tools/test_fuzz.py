"""A bounded pass of the live-server fuzzer (``make fuzz`` runs it for longer), and checks
that its invariants do catch what they are meant to catch."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from emulator.tools.fuzz import (
    FuzzFailure,
    Peer,
    ProcessTarget,
    Stats,
    Witness,
    check_health,
    check_reply_shape,
    fuzz,
    open_target,
    prepare,
)
from protocol.constants import FLAG_ERROR, Command, MsgType
from protocol.header import Header

#: Seconds of fuzzing in ``make test`` (FUZZ_TEST_SECONDS overrides; 0 skips).
SECONDS = float(os.environ.get("FUZZ_TEST_SECONDS", "15"))
#: Fixed so that a CI failure names a case seed that replays the same case.
SEED = int(os.environ.get("FUZZ_SEED", "8"))


@pytest.mark.skipif(SECONDS <= 0, reason="FUZZ_TEST_SECONDS=0")
def test_live_server_keeps_every_invariant_under_fuzzing() -> None:
    stats = fuzz(SECONDS, SEED)
    print(stats.line())
    assert stats.cases >= 20
    # The pass reached both outcomes the protocol allows: replies (errors among them, with
    # several errnos) and connections closed for broken framing.
    assert stats.replies > stats.errors > 0
    assert stats.closes > 0
    assert len(stats.errnos) >= 3 and errno.EINVAL in stats.errnos
    assert stats.streams_refused > 0  # hostile migration streams met the devices' checks


def test_reply_shape_checks() -> None:
    check_reply_shape(Header(1, 4, 32, MsgType.REPLY), bytes(16))
    check_reply_shape(Header(1, 4, 16, MsgType.REPLY | FLAG_ERROR, errno.EINVAL), b"")
    bad = [
        (Header(1, 4, 16, MsgType.COMMAND), b""),  # not a reply
        (Header(1, 4, 20, MsgType.REPLY | FLAG_ERROR, errno.EINVAL), b"abcd"),  # payload
        (Header(1, 4, 16, MsgType.REPLY | FLAG_ERROR, 0), b""),  # errno 0
        (Header(1, 4, 16, MsgType.REPLY, errno.EIO), b""),  # error field on a success
    ]
    for header, payload in bad:
        with pytest.raises(FuzzFailure):
            check_reply_shape(header, payload)


def test_health_check_notices_held_fds_and_a_dead_server() -> None:
    stats = Stats()
    with open_target() as target:
        witness = Witness(target.witness)
        try:
            baseline, streams = prepare(target)
            assert all(len(stream) > 64 for stream in streams.values())
            check_health(target, witness, baseline, "idle")
            stats.cases += 1
            # A connection the server still holds is an fd more than before.
            peer = Peer(next(iter(target.fuzzed.values())))
            header, _ = peer.call(Command.VERSION, struct.pack("<HH", 0, 2) + b"{}\0")
            assert not header.is_error
            with pytest.raises(FuzzFailure, match="server fds changed"):
                check_health(target, witness, baseline, "held")
            peer.close()
            check_health(target, witness, baseline, "released")
            assert isinstance(target, ProcessTarget)
            target.process.kill()
            target.process.wait()
            with pytest.raises(FuzzFailure, match="died"):
                check_health(target, witness, baseline, "killed")
        finally:
            witness.close()
