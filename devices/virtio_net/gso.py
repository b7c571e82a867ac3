"""TCP segmentation for HOST_TSO4/HOST_TSO6: a driver hands the device one large TCP
packet (``gso_type`` TCPV4 or TCPV6, ``gso_size`` = MSS) and the device puts MSS-sized
segments on the wire, because the peer behind a backend is assumed to take only frames of
its MTU. Pure: no DMA, no device state.

Each segment carries a copy of the headers with: the IPv4 total length, identification
(+1 per segment) and header checksum, or the IPv6 payload length; the TCP sequence number
advanced by the payload already sent; FIN and PSH only on the last segment, CWR only on
the first (ECN); and a TCP checksum computed afresh over the pseudo header and segment (so
the partial sum the driver left in the field does not matter).
"""

from __future__ import annotations

import struct

from devices.e1000.packet import checksum, pseudo_header_sum

GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 1, 3, 4
GSO_ECN = 0x80
ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN = 0x0800, 0x86DD, 0x8100
IPPROTO_TCP = 6
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
#: Fewest payload bytes per segment the device accepts (a smaller MSS is a driver error).
MIN_MSS = 8


def segment_tcp(frame: bytes, gso_type: int, mss: int) -> list[bytes] | None:
    """The segments of a TSO packet; None when it is not a TCP packet of that type or
    its headers do not fit (the device then drops it)."""
    if mss < MIN_MSS or len(frame) < 14:
        return None
    l3 = 14
    ethertype = struct.unpack_from(">H", frame, 12)[0]
    if ethertype == ETHERTYPE_VLAN and len(frame) >= 18:
        ethertype = struct.unpack_from(">H", frame, 16)[0]
        l3 = 18
    kind = gso_type & ~GSO_ECN
    if kind == GSO_TCPV4 and ethertype == ETHERTYPE_IPV4 and len(frame) >= l3 + 20:
        ihl = (frame[l3] & 0x0F) * 4
        if ihl < 20 or frame[l3 + 9] != IPPROTO_TCP:
            return None
        l4 = l3 + ihl
    elif kind == GSO_TCPV6 and ethertype == ETHERTYPE_IPV6 and len(frame) >= l3 + 40:
        if frame[l3 + 6] != IPPROTO_TCP:
            return None  # extension headers: not taken apart here
        l4 = l3 + 40
    else:
        return None
    if len(frame) < l4 + 20:
        return None
    header_end = l4 + (frame[l4 + 12] >> 4) * 4
    if header_end < l4 + 20 or header_end > len(frame):
        return None
    payload = memoryview(frame)[header_end:]
    if not payload:
        return None
    ipv4 = kind == GSO_TCPV4
    seq = struct.unpack_from(">I", frame, l4 + 4)[0]
    ident = struct.unpack_from(">H", frame, l3 + 4)[0] if ipv4 else 0
    src, dst = (
        (frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20])
        if ipv4
        else (frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40])
    )
    segments = []
    for number, offset in enumerate(range(0, len(payload), mss)):
        chunk = payload[offset : offset + mss]
        last = offset + mss >= len(payload)
        out = bytearray(frame[:header_end])
        out += chunk
        l4_length = header_end - l4 + len(chunk)
        if ipv4:
            struct.pack_into(">HH", out, l3 + 2, l4 - l3 + l4_length, (ident + number) & 0xFFFF)
            struct.pack_into(">H", out, l3 + 10, 0)
            struct.pack_into(">H", out, l3 + 10, checksum(out, l3, l4))
        else:
            struct.pack_into(">H", out, l3 + 4, l4_length)
        struct.pack_into(">I", out, l4 + 4, (seq + offset) & 0xFFFFFFFF)
        flags = frame[l4 + 13]
        if not last:
            flags &= ~(TCP_FIN | TCP_PSH)
        if number:
            flags &= ~TCP_CWR
        out[l4 + 13] = flags
        struct.pack_into(">H", out, l4 + 16, 0)
        pseudo = pseudo_header_sum(src, dst, IPPROTO_TCP, l4_length)
        struct.pack_into(">H", out, l4 + 16, checksum(out, l4, None, pseudo))
        segments.append(bytes(out))
    return segments
