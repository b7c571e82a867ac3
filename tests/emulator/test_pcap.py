"""Classic pcap files: what the writer puts on disk, the reader, and real tools reading it."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from emulator.pcap import (
    LINKTYPE_ETHERNET,
    MAGIC_MICROSECONDS,
    MAGIC_NANOSECONDS,
    PcapError,
    PcapWriter,
    parse_pcap,
    read_pcap,
)

ARP_REQUEST = bytes.fromhex(
    "ffffffffffff020000000a0a0806"  # broadcast from 02:00:00:00:0a:0a, ARP
    "000108000604000102000000" + "0a0a0a090001" + "000000000000" + "0a090002"
)


def ipv4_udp(payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 4444, 5555, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, b"\n\t\0\2", b"\n\t\0\1"
    )
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip = ip[:10] + struct.pack("!H", ~total & 0xFFFF) + ip[12:]
    return bytes.fromhex("020000000b0b020000000a0a0800") + ip + udp


def test_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    with PcapWriter(path) as writer:
        writer.write(ARP_REQUEST, timestamp_ns=1_700_000_000_123_456_789)
    data = path.read_bytes()
    order = "<" if sys.byteorder == "little" else ">"
    assert struct.unpack_from(order + "IHHiIII", data) == (
        MAGIC_MICROSECONDS,
        2,
        4,
        0,
        0,
        262144,
        LINKTYPE_ETHERNET,
    )
    assert struct.unpack_from(order + "IIII", data, 24) == (
        1_700_000_000,
        123_456,
        len(ARP_REQUEST),
        len(ARP_REQUEST),
    )
    assert data[40:] == ARP_REQUEST
    assert writer.closed and writer.frames_written == 1


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    frames = [ARP_REQUEST, ipv4_udp(b"hello"), bytes(range(256)) * 6]
    with PcapWriter(path) as writer:
        for index, frame in enumerate(frames):
            writer.write(frame, timestamp_ns=(10 + index) * 1_000_000_000 + 500_000)
        writer.write(bytearray(b"\x01" * 60))
        writer.write(memoryview(b"\x02" * 60))
    pcap = read_pcap(path)
    assert pcap.linktype == LINKTYPE_ETHERNET and pcap.version == (2, 4)
    assert not pcap.nanoseconds and pcap.byte_order == sys.byteorder
    assert pcap.frames == [*frames, b"\x01" * 60, b"\x02" * 60]
    assert [r.timestamp for r in pcap.records[:3]] == [10.0005, 11.0005, 12.0005]
    assert [r.original_length for r in pcap.records] == [len(f) for f in pcap.frames]


def test_snaplen_cuts_and_keeps_the_original_length(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    with PcapWriter(path, snaplen=20) as writer:
        writer.write(bytes(range(100)))
    (record,) = read_pcap(path).records
    assert record.frame == bytes(range(20)) and record.original_length == 100
    with pytest.raises(ValueError):
        PcapWriter(tmp_path / "y.pcap", snaplen=0)


def test_flush_makes_frames_visible_and_closed_writer_refuses(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    writer = PcapWriter(path)
    writer.write(ARP_REQUEST)
    writer.flush()
    assert read_pcap(path).frames == [ARP_REQUEST]
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(ARP_REQUEST)


def test_reader_takes_big_endian_and_nanosecond_files() -> None:
    header = struct.pack(">IHHiIII", MAGIC_NANOSECONDS, 2, 4, 0, 0, 65535, 1)
    record = struct.pack(">IIII", 5, 250_000_000, 14, 60) + bytes(14)
    pcap = parse_pcap(header + record)
    assert pcap.byte_order == "big" and pcap.nanoseconds and pcap.snaplen == 65535
    (only,) = pcap.records
    assert only.timestamp == 5.25 and only.frame == bytes(14) and only.original_length == 60


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xd4\xc3\xb2", "too short"),
        (b"\x0a\x0d\x0d\x0a" + bytes(20), "not a classic pcap file"),  # pcapng
        (struct.pack("<IHHiIII", MAGIC_MICROSECONDS, 2, 4, 0, 0, 9, 1) + bytes(8), "header cut"),
        (
            struct.pack("<IHHiIII", MAGIC_MICROSECONDS, 2, 4, 0, 0, 9, 1)
            + struct.pack("<IIII", 0, 0, 60, 60)
            + bytes(10),
            "data cut short",
        ),
    ],
)
def test_reader_errors(data: bytes, message: str) -> None:
    with pytest.raises(PcapError, match=message):
        parse_pcap(data)


def _capture_tool() -> list[str] | None:
    tshark = shutil.which("tshark")
    if tshark is not None:
        return [tshark, "-n", "-r"]
    tcpdump = shutil.which("tcpdump")
    if tcpdump is not None:
        return [tcpdump, "-n", "-r"]
    return None


def test_read_by_tshark_or_tcpdump(tmp_path: Path) -> None:
    tool = _capture_tool()
    if tool is None:
        pytest.skip("neither tshark nor tcpdump is installed")
    path = tmp_path / "x.pcap"
    with PcapWriter(path) as writer:
        writer.write(ARP_REQUEST)
        writer.write(ipv4_udp(b"hello"))
    result = subprocess.run(
        [*tool, str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "ARP" in lines[0] and "10.9.0.2" in lines[0]
    assert "10.9.0.2" in lines[1] and "10.9.0.1" in lines[1] and "UDP" in lines[1].upper()
