"""``--trace``: one log line per message, decoded. Costs nothing when off."""

from __future__ import annotations

import logging

from protocol.constants import Command
from protocol.describe import describe
from protocol.errors import ProtocolError
from protocol.header import Header, pack_message
from protocol.messages import DmaLayout

log = logging.getLogger("vfio_user_emu.trace")


class Tracer:
    def __init__(self, enabled: bool, name: str = "") -> None:
        self.enabled = enabled
        self.name = name
        #: How the connection lays out in-band DMA (set when the client is known).
        self.dma_layout = DmaLayout.SPEC

    def message(self, direction: str, header: Header, payload: bytes, nfds: int) -> None:
        if self.enabled:
            text = describe(header, payload, nfds, self.dma_layout)
            log.info("%s %s %s", self.name, direction, text)

    def reply(self, request: Header, payload: bytes, nfds: int) -> None:
        if self.enabled:
            reply = Header.unpack(pack_message(request.msg_id, request.command, payload, 1))
            log.info("%s -> %s", self.name, describe(reply, payload, nfds))

    def request(self, msg_id: int, command: Command, payload: bytes) -> None:
        if self.enabled:
            header = Header.unpack(pack_message(msg_id, command, payload))
            log.info("%s -> %s", self.name, describe(header, payload, 0, self.dma_layout))

    def failed(self, request: Header, err: int, reason: str) -> None:
        if self.enabled:
            log.info(
                "%s -> id=%d %s error=%d (%s)",
                self.name,
                request.msg_id,
                request.command_name(),
                err,
                reason,
            )

    def rejected(self, header: Header, error: ProtocolError) -> None:
        # Refusals are worth a line even without --trace: they point at a broken client.
        log.warning(
            "%s rejected id=%d %s: %s", self.name, header.msg_id, header.command_name(), error
        )
