"""Frame-level work of the e1000: Internet checksums, the transmit assembler (checksum
offload and TCP segmentation) and receive checksum checking. Pure: no DMA, no registers.

Transmit offload semantics (8254x manual, as Linux's e1000 uses them):

* A *context descriptor* sets IPCSS/IPCSO/IPCSE (IP header checksum start, offset, end
  inclusive), TUCSS/TUCSO/TUCSE (TCP/UDP checksum start, offset, end inclusive, 0 = end of
  packet), TUCMD (TCP vs UDP, IPv4 vs IPv6, TSE), PAYLEN, HDRLEN and MSS.
* *Data descriptors* carry POPTS: IXSM inserts the IP header checksum, TXSM the TCP/UDP
  checksum. The hardware sums the covered bytes as they are and stores the complement at the
  offset; the driver has put the pseudo-header sum (with the L4 length) in the L4 checksum
  field, or zero in the IP checksum field.
* With TSE the packet (header HDRLEN bytes, then payload) is cut into segments of MSS
  payload bytes, each sent with a copy of the header in which the IPv4 total length and
  identification (+1 per segment) or the IPv6 payload length, the TCP sequence number
  (+payload already sent; FIN and PSH only in the last segment) or the UDP length are
  updated. For TSO the driver leaves the pseudo-header sum *without* the length in the L4
  checksum field: the hardware adds each segment's L4 length.
* Legacy descriptors with IC insert a checksum from CSS to the end at CSO.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from devices.e1000 import regs

MIN_FRAME = 60  # without FCS
#: Bytes one packet may collect (the 82540's 64 KiB transmit assembly buffer).
MAX_TX_PACKET = 0x10000
MAX_TSO_HEADER = 255

ETH_HEADER = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_FIN = 0x01
TCP_PSH = 0x08

Buffer = bytes | bytearray | memoryview


def ones_sum(data: Buffer, start: int = 0, end: int | None = None) -> int:
    """The 16-bit ones' complement sum (RFC 1071) of ``data[start:end]``; big-endian words,
    an odd last byte padded with zero. Returns 0 only for all-zero input."""
    chunk = bytes(data[start:end])
    if len(chunk) & 1:
        chunk += b"\0"
    value = int.from_bytes(chunk, "big")
    if not value:
        return 0
    # 2**16 == 1 (mod 0xffff): the number is congruent to the sum of its 16-bit words.
    return value % 0xFFFF or 0xFFFF


def add16(a: int, b: int) -> int:
    """Ones' complement addition of two 16-bit sums."""
    total = a + b
    return (total & 0xFFFF) + (total >> 16)


def checksum(data: Buffer, start: int = 0, end: int | None = None, extra: int = 0) -> int:
    """The Internet checksum (complement of the sum) of a range plus an extra partial sum."""
    return ~add16(ones_sum(data, start, end), extra) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Partial sum of the IPv4/IPv6 pseudo header."""
    total = ones_sum(src + dst)
    total = add16(total, proto)
    total = add16(total, length & 0xFFFF)
    return add16(total, length >> 16)


# ---------------------------------------------------------------------------------------------
# Transmit


_CONTEXT = struct.Struct("<BBHBBHIBHB")


@dataclass(slots=True)
class TxContext:
    """The offload context of the last context descriptor."""

    ipcss: int = 0
    ipcso: int = 0
    ipcse: int = 0
    tucss: int = 0
    tucso: int = 0
    tucse: int = 0
    paylen: int = 0
    hdr_len: int = 0
    mss: int = 0
    tucmd: int = 0

    @classmethod
    def from_descriptor(cls, address: int, lower: int, upper: int) -> TxContext:
        return cls(
            ipcss=address & 0xFF,
            ipcso=address >> 8 & 0xFF,
            ipcse=address >> 16 & 0xFFFF,
            tucss=address >> 32 & 0xFF,
            tucso=address >> 40 & 0xFF,
            tucse=address >> 48 & 0xFFFF,
            paylen=lower & 0xFFFFF,
            tucmd=lower >> 24,
            hdr_len=upper >> 8 & 0xFF,
            mss=upper >> 16,
        )

    def pack(self) -> bytes:
        return _CONTEXT.pack(
            self.ipcss,
            self.ipcso,
            self.ipcse,
            self.tucss,
            self.tucso,
            self.tucse,
            self.paylen,
            self.hdr_len,
            self.mss,
            self.tucmd,
        )

    @classmethod
    def unpack(cls, data: Buffer) -> TxContext:
        ctx = cls(*_CONTEXT.unpack(data))
        if ctx.paylen > 0xFFFFF:
            raise ValueError("TX context PAYLEN beyond 20 bits")
        return ctx


@dataclass(slots=True)
class TxFrame:
    data: bytearray
    vlan: int | None  # TCI to insert (CTRL.VME and VLE), else None
    tso: bool = False


_PACKET = struct.Struct("<BBBBBBBiIIII")  # see TxAssembler.pack


@dataclass(slots=True)
class TxAssembler:
    """Collects data descriptors into frames. State between descriptors is what a partly
    transmitted packet leaves behind (migrated with the device)."""

    ctx: TxContext = field(default_factory=TxContext)
    in_packet: bool = False
    tse: bool = False  # this packet is segmented
    extended: bool = False  # extended (DEXT) data descriptors, else legacy
    popts: int = 0
    legacy_ic: bool = False
    legacy_cso: int = 0
    legacy_css: int = 0
    vlan: int = -1  # TCI to insert, -1 for none
    data: bytearray = field(default_factory=bytearray)  # non-TSO packet, or TSO header
    segment: bytearray = field(default_factory=bytearray)  # TSO: payload of the segment
    segments: int = 0  # TSO: segments sent so far
    payload_sent: int = 0  # TSO: payload bytes in them

    def reset(self) -> None:
        self.ctx = TxContext()
        self.drop_packet()

    def drop_packet(self) -> None:
        self.in_packet = self.tse = self.extended = self.legacy_ic = False
        self.popts = self.legacy_cso = self.legacy_css = 0
        self.vlan = -1
        self.data = bytearray()
        self.segment = bytearray()
        self.segments = self.payload_sent = 0

    def context(self, address: int, lower: int, upper: int) -> None:
        self.ctx = TxContext.from_descriptor(address, lower, upper)

    def add(
        self,
        payload: Buffer,
        *,
        cmd: int,
        extended: bool,
        popts: int = 0,
        special: int = 0,
        legacy_cso: int = 0,
        legacy_css: int = 0,
        vlan_enabled: bool = False,
    ) -> list[TxFrame]:
        """One data (or legacy) descriptor's buffer; returns the frames it completes."""
        if not self.in_packet:
            self.in_packet = True
            self.extended = extended
            self.popts = popts if extended else 0
            ctx = self.ctx
            self.tse = bool(extended and cmd & regs.TXD_CMD_TSE and ctx.mss and ctx.hdr_len)
            if not extended:
                self.legacy_ic = bool(cmd & regs.TXD_CMD_IC)
                self.legacy_cso, self.legacy_css = legacy_cso, legacy_css
        if vlan_enabled and cmd & regs.TXD_CMD_VLE:
            self.vlan = special
        frames: list[TxFrame] = []
        if self.tse:
            self._add_tso(payload, frames)
        else:
            room = MAX_TX_PACKET - len(self.data)
            self.data += payload[:room] if len(payload) > room else payload
        if cmd & regs.TXD_CMD_EOP:
            if self.tse:
                if self.segment or not self.segments:
                    frames.append(self._segment(last=True))
            else:
                frames.append(self._finish())
            self.drop_packet_keep_context()
        return frames

    def copy(self) -> TxAssembler:
        """An independent copy (the context is never changed in place, only replaced)."""
        return replace(self, data=bytearray(self.data), segment=bytearray(self.segment))

    def drop_packet_keep_context(self) -> None:
        ctx = self.ctx
        self.drop_packet()
        self.ctx = ctx

    # -- plain packets -------------------------------------------------------------------
    def _finish(self) -> TxFrame:
        frame = self.data
        if self.extended:
            ctx = self.ctx
            if self.popts & regs.TXD_POPTS_IXSM:
                _insert(frame, ctx.ipcss, ctx.ipcso, ctx.ipcse)
            if self.popts & regs.TXD_POPTS_TXSM:
                _insert(frame, ctx.tucss, ctx.tucso, ctx.tucse)
        elif self.legacy_ic:
            _insert(frame, self.legacy_css, self.legacy_cso, 0)
        return TxFrame(frame, self.vlan if self.vlan >= 0 else None)

    # -- segmentation --------------------------------------------------------------------
    def _add_tso(self, payload: Buffer, frames: list[TxFrame]) -> None:
        ctx = self.ctx
        view = memoryview(payload)
        pos = 0
        while pos < len(view):
            if len(self.data) < ctx.hdr_len:
                take = min(ctx.hdr_len - len(self.data), len(view) - pos)
                self.data += view[pos : pos + take]
                pos += take
                continue
            if len(self.segment) >= ctx.mss:
                # More payload follows, so the full segment is not the last one.
                frames.append(self._segment(last=False))
            take = min(ctx.mss - len(self.segment), len(view) - pos)
            self.segment += view[pos : pos + take]
            pos += take

    def _segment(self, *, last: bool) -> TxFrame:
        ctx = self.ctx
        frame = self.data + self.segment
        total = len(frame)
        l3, l4 = ctx.ipcss, ctx.tucss
        if ctx.tucmd & regs.TUCMD_IP:
            if l3 + 6 <= total:
                struct.pack_into(">H", frame, l3 + 2, (total - l3) & 0xFFFF)
                ident = struct.unpack_from(">H", frame, l3 + 4)[0]
                struct.pack_into(">H", frame, l3 + 4, (ident + self.segments) & 0xFFFF)
        elif l3 + 6 <= total:
            struct.pack_into(">H", frame, l3 + 4, max(total - l3 - 40, 0) & 0xFFFF)
        l4_length = total - l4
        if ctx.tucmd & regs.TUCMD_TCP:
            if l4 + 14 <= total:
                seq = struct.unpack_from(">I", frame, l4 + 4)[0]
                struct.pack_into(">I", frame, l4 + 4, (seq + self.payload_sent) & 0xFFFFFFFF)
                if not last:
                    frame[l4 + 13] &= ~(TCP_FIN | TCP_PSH) & 0xFF
        elif l4 + 6 <= total:
            struct.pack_into(">H", frame, l4 + 4, l4_length & 0xFFFF)
        if self.popts & regs.TXD_POPTS_IXSM and ctx.tucmd & regs.TUCMD_IP:
            _insert(frame, l3, ctx.ipcso, ctx.ipcse)
        if self.popts & regs.TXD_POPTS_TXSM:
            _insert(frame, l4, ctx.tucso, ctx.tucse, extra=max(l4_length, 0))
        self.segments += 1
        self.payload_sent += len(self.segment)
        self.segment = bytearray()
        return TxFrame(frame, self.vlan if self.vlan >= 0 else None, tso=True)

    # -- migration -----------------------------------------------------------------------
    def pack(self) -> bytes:
        head = _PACKET.pack(
            self.in_packet,
            self.tse,
            self.extended,
            self.popts,
            self.legacy_ic,
            self.legacy_cso,
            self.legacy_css,
            self.vlan,
            self.segments,
            self.payload_sent,
            len(self.data),
            len(self.segment),
        )
        return b"".join((self.ctx.pack(), head, self.data, self.segment))

    @classmethod
    def unpack(cls, blob: Buffer) -> TxAssembler:
        """Raises ValueError (or struct.error) on anything inconsistent."""
        data = memoryview(blob).cast("B")
        fixed = _CONTEXT.size + _PACKET.size
        if len(data) < fixed:
            raise ValueError("TX state too short")
        ctx = TxContext.unpack(data[: _CONTEXT.size])
        (in_packet, tse, extended, popts, legacy_ic, cso, css, vlan) = _PACKET.unpack_from(
            data, _CONTEXT.size
        )[:8]
        segments, payload_sent, data_len, segment_len = _PACKET.unpack_from(data, _CONTEXT.size)[8:]
        if max(in_packet, tse, extended, legacy_ic) > 1:
            raise ValueError("TX state flags out of range")
        if not -1 <= vlan <= 0xFFFF:
            raise ValueError("TX state VLAN tag out of range")
        if len(data) != fixed + data_len + segment_len:
            raise ValueError("TX state buffers do not match their lengths")
        if data_len > MAX_TX_PACKET or (tse and (data_len > ctx.hdr_len or segment_len > ctx.mss)):
            raise ValueError("TX state buffers larger than the packet they belong to")
        if not tse and (segment_len or segments or payload_sent):
            raise ValueError("TX state holds segmentation progress outside a TSO packet")
        if tse and not (extended and ctx.mss and ctx.hdr_len):
            raise ValueError("TX state segments without a segmentation context")
        if not in_packet and (data_len or segment_len or tse or segments):
            raise ValueError("TX state holds data outside a packet")
        if payload_sent > segments * 0xFFFF:
            raise ValueError("TX state payload count impossible for its segments")
        state = cls(
            ctx=ctx,
            in_packet=bool(in_packet),
            tse=bool(tse),
            extended=bool(extended),
            popts=popts,
            legacy_ic=bool(legacy_ic),
            legacy_cso=cso,
            legacy_css=css,
            vlan=vlan,
            segments=segments,
            payload_sent=payload_sent,
        )
        state.data = bytearray(data[fixed : fixed + data_len])
        state.segment = bytearray(data[fixed + data_len :])
        return state


def _insert(frame: bytearray, start: int, offset: int, end: int, extra: int = 0) -> None:
    """Store the checksum of ``frame[start:end+1]`` (``end`` 0: to the end) at ``offset``."""
    stop = end + 1 if end else len(frame)
    if start >= len(frame) or offset + 2 > len(frame) or stop <= start:
        return  # a context that does not fit this frame: leave it alone
    struct.pack_into(">H", frame, offset, checksum(frame, start, min(stop, len(frame)), extra))


def insert_vlan(frame: bytearray, tpid: int, tci: int) -> bytearray:
    return frame[:12] + struct.pack(">HH", tpid, tci) + frame[12:]


# ---------------------------------------------------------------------------------------------
# Receive


def rx_checksum(frame: Buffer, rxcsum: int, l3: int) -> tuple[int, int, int]:
    """(status bits, error bits, packet checksum) for a received frame whose network header
    starts at ``l3``, as RXCSUM asks: IPCS/IPE for IPv4 headers (IPOFL), TCPCS/TCPE for
    TCP and UDP over unfragmented IPv4 (TUOFL); IXSM when no offload is enabled."""
    offloads = rxcsum & (regs.RXCSUM_IPOFL | regs.RXCSUM_TUOFL)
    if not offloads:
        return regs.RXD_STAT_IXSM, 0, 0
    packet_sum = ones_sum(frame, rxcsum & regs.RXCSUM_PCSS_MASK)
    status = errors = 0
    if len(frame) < l3 + 20 or struct.unpack_from(">H", frame, l3 - 2)[0] != ETHERTYPE_IPV4:
        return status, errors, packet_sum
    version_ihl = frame[l3]
    ihl = (version_ihl & 0x0F) * 4
    total = struct.unpack_from(">H", frame, l3 + 2)[0]
    if version_ihl >> 4 != 4 or ihl < 20 or total < ihl or l3 + total > len(frame):
        return status, errors, packet_sum
    if rxcsum & regs.RXCSUM_IPOFL:
        status |= regs.RXD_STAT_IPCS
        if ones_sum(frame, l3, l3 + ihl) != 0xFFFF:
            errors |= regs.RXD_ERR_IPE
    fragment = struct.unpack_from(">H", frame, l3 + 6)[0] & 0x3FFF
    proto = frame[l3 + 9]
    if rxcsum & regs.RXCSUM_TUOFL and not fragment and proto in (IPPROTO_TCP, IPPROTO_UDP):
        start, end = l3 + ihl, l3 + total
        field_at = start + (16 if proto == IPPROTO_TCP else 6)
        if field_at + 2 > end:
            return status, errors, packet_sum
        if proto == IPPROTO_UDP and not struct.unpack_from(">H", frame, field_at)[0]:
            return status, errors, packet_sum  # UDP without a checksum
        status |= regs.RXD_STAT_TCPCS
        pseudo = pseudo_header_sum(
            bytes(frame[l3 + 12 : l3 + 16]), bytes(frame[l3 + 16 : l3 + 20]), proto, end - start
        )
        if add16(ones_sum(frame, start, end), pseudo) != 0xFFFF:
            errors |= regs.RXD_ERR_TCPE
    return status, errors, packet_sum


def size_bucket(length: int) -> int:
    """Index into the 64/127/255/511/1023/max size counters (length with FCS)."""
    if length <= 64:
        return 0
    if length <= 127:
        return 1
    if length <= 255:
        return 2
    if length <= 511:
        return 3
    if length <= 1023:
        return 4
    return 5
