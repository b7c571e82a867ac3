"""The pure-Python stream primitives: CRC-32C, zero-page bitmaps, page elision."""

from __future__ import annotations

import array
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.migration import primitives as sp

PAGE_SIZES = [512, 1024, 4096, 65536, 1 << 20]


@pytest.fixture(autouse=True)
def _restore_impl() -> Iterator[None]:
    previous = sp.current()
    yield
    sp.install(previous)


def bitwise_crc32c(data: bytes, crc: int = 0) -> int:
    """The definition, one bit at a time (independent of the table-driven code)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def naive_bitmap(data: bytes, page_size: int) -> bytes:
    pages = [data[i : i + page_size] for i in range(0, len(data), page_size)]
    out = bytearray((len(pages) + 7) // 8)
    for k, page in enumerate(pages):
        if not any(page):
            out[k // 8] |= 1 << (k % 8)
    return bytes(out)


@st.composite
def sparse_data(draw: st.DrawFn, max_len: int = 40_000) -> bytes:
    """Mostly-zero data with a few non-zero bytes and runs."""
    length = draw(st.integers(0, max_len))
    buf = bytearray(length)
    if length:
        for _ in range(draw(st.integers(0, 12))):
            start = draw(st.integers(0, length - 1))
            run = draw(st.integers(1, 3000))
            value = draw(st.integers(1, 255))
            buf[start : start + run] = bytes([value]) * len(buf[start : start + run])
    return bytes(buf)


# --------------------------------------------------------------------------- CRC-32C


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"123456789", 0xE3069283),
        (b"a", 0xC1D04330),
        # RFC 3720 (iSCSI), appendix B.4
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert sp.crc32c(data) == expected
    assert bitwise_crc32c(data) == expected
    assert sp.CRC32C_CHECK == 0xE3069283


def test_crc32c_chaining_and_buffer_types() -> None:
    a, b = b"12345", b"6789"
    assert sp.crc32c(b, sp.crc32c(a)) == 0xE3069283
    assert sp.crc32c(b"", 0x12345678) == 0x12345678
    data = bytes(range(256)) * 5
    expected = sp.crc32c(data)
    assert sp.crc32c(bytearray(data)) == expected
    assert sp.crc32c(memoryview(data)) == expected
    words = array.array("I", data)
    assert sp.crc32c(memoryview(words)) == sp.crc32c(words.tobytes())
    strided = memoryview(data)[1::3]
    assert sp.crc32c(strided) == sp.crc32c(data[1::3])


@pytest.mark.parametrize("crc", [-1, 1 << 32])
def test_crc32c_rejects_out_of_range_crc(crc: int) -> None:
    with pytest.raises(ValueError, match="CRC"):
        sp.crc32c(b"x", crc)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), st.data())
def test_crc32c_matches_bitwise_definition_and_chains(data: bytes, draw: st.DataObject) -> None:
    assert sp.crc32c(data) == bitwise_crc32c(data)
    split = draw.draw(st.integers(0, len(data)))
    assert sp.crc32c(data[split:], sp.crc32c(data[:split])) == sp.crc32c(data)
    offset = draw.draw(st.integers(0, len(data)))
    assert sp.crc32c(memoryview(data)[offset:]) == bitwise_crc32c(data[offset:])


# --------------------------------------------------------------------------- bitmaps


def test_zero_page_bitmap_layout() -> None:
    page = 512
    data = bytearray(page * 10 + 7)  # 11 pages, the last partial
    data[page * 1] = 1  # page 1
    data[page * 9 - 1] = 1  # last byte of page 8
    data[-1] = 1  # the partial page 10
    bitmap = sp.zero_page_bitmap(data, page)
    assert len(bitmap) == 2
    zero = [k for k in range(11) if bitmap[k // 8] >> (k % 8) & 1]
    assert zero == [0, 2, 3, 4, 5, 6, 7, 9]
    assert sp.zero_page_bitmap(b"", page) == b""
    assert sp.zero_page_bitmap(bytes(5), page) == b"\x01"
    assert sp.zero_page_bitmap(b"\x00\x00\x01", page) == b"\x00"
    assert sp.zero_page_bitmap(bytes(100), 1 << 70) == b"\x01"


@pytest.mark.parametrize("page_size", [0, -4096])
def test_zero_page_bitmap_rejects_bad_page_size(page_size: int) -> None:
    with pytest.raises(ValueError, match="page size"):
        sp.zero_page_bitmap(b"abc", page_size)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_data(), st.sampled_from([1, 3, 7, 512, 1000, 4096, 65536]))
def test_zero_page_bitmap_matches_naive(data: bytes, page_size: int) -> None:
    assert sp.zero_page_bitmap(data, page_size) == naive_bitmap(data, page_size)


# --------------------------------------------------------------------------- pack / unpack


def test_pack_pages_layout_and_zero_copy() -> None:
    page = 4096
    data = bytearray(page * 5 + 100)
    data[page * 1 : page * 3] = b"\xaa" * (2 * page)  # pages 1-2: one run
    data[-1] = 0x55  # partial last page
    pieces = sp.pack_pages(data, page)
    head = pieces[0]
    assert isinstance(head, bytes)
    assert struct.unpack_from("<IQ", head) == (page, len(data))
    assert head[12:] == bytes([0b011001])  # pages 0, 3, 4 are zero
    views = pieces[1:]
    assert [len(v) for v in views] == [2 * page, 100]
    for view in views:
        assert isinstance(view, memoryview)
        assert view.obj is data  # a view of the caller's buffer, not a copy
    payload = b"".join(pieces)
    assert len(payload) == 12 + 1 + 2 * page + 100
    assert sp.unpack_pages(payload, len(data)) == data


@pytest.mark.parametrize("page_size", [0, 256, 1000, 4097, 2 << 20])
def test_pack_pages_rejects_bad_page_size(page_size: int) -> None:
    with pytest.raises(ValueError, match="page size"):
        sp.pack_pages(b"abc", page_size)


def test_pack_empty_and_all_zero() -> None:
    assert b"".join(sp.pack_pages(b"", 512)) == struct.pack("<IQ", 512, 0)
    assert sp.unpack_pages(struct.pack("<IQ", 512, 0), 0) == b""
    zeros = bytes(1 << 20)
    payload = b"".join(sp.pack_pages(zeros, 4096))
    assert len(payload) == 12 + 32
    assert sp.unpack_pages(payload, len(zeros)) == zeros


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_data(), st.sampled_from(PAGE_SIZES[:3]))
def test_pack_unpack_round_trip(data: bytes, page_size: int) -> None:
    payload = b"".join(sp.pack_pages(data, page_size))
    assert sp.unpack_pages(payload, len(data)) == data
    dest = bytearray(b"\xee" * len(data))  # garbage that zero pages must overwrite
    sp.unpack_pages_into(payload, memoryview(dest))
    assert dest == data
    if data:
        with pytest.raises(ValueError, match="allowed"):
            sp.unpack_pages(payload, len(data) - 1)


def _valid_payload() -> tuple[bytes, bytes]:
    data = bytearray(512 * 9 + 17)
    data[600] = 1
    data[512 * 4 : 512 * 5] = b"\x07" * 512
    data[-3] = 9
    return bytes(data), b"".join(sp.pack_pages(data, 512))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "shorter than its header"),
        (b"\x00" * 11, "shorter than its header"),
        (struct.pack("<IQ", 0, 0), "page size"),
        (struct.pack("<IQ", 4000, 0), "page size"),
        (struct.pack("<IQ", 256, 0), "page size"),
        (struct.pack("<IQ", 2 << 20, 0), "page size"),
        (struct.pack("<IQ", 4096, 1 << 63), "allowed"),
        (struct.pack("<IQ", 512, 4096), "bitmap"),  # 8 pages need 1 bitmap byte
        (struct.pack("<IQ", 512, 512 * 3) + b"\xff", "beyond the last page"),
        (struct.pack("<IQ", 512, 512 * 8) + b"\xff" + b"x", "expected 0"),
        (struct.pack("<IQ", 512, 512 * 2) + b"\x01" + b"x" * 511, "expected 512"),
        (struct.pack("<IQ", 512, 700) + b"\x01" + b"x" * 187, "expected 188"),
        (struct.pack("<IQ", 512, 700) + b"\x01" + b"x" * 512, "expected 188"),
    ],
)
def test_unpack_rejects_defects(payload: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sp.unpack_pages(payload, 1 << 20)
    dest = bytearray(b"\xee" * 700)
    with pytest.raises(ValueError):
        sp.unpack_pages_into(payload, memoryview(dest))
    assert dest == b"\xee" * 700


def test_unpack_into_checks_destination() -> None:
    data, payload = _valid_payload()
    for wrong in (len(data) - 1, len(data) + 1):
        dest = bytearray(b"\xee" * wrong)
        with pytest.raises(ValueError):
            sp.unpack_pages_into(payload, memoryview(dest))
        assert dest == b"\xee" * wrong  # nothing written
    with pytest.raises(ValueError, match="read-only"):
        sp.unpack_pages_into(payload, memoryview(bytes(len(data))))
    strided = memoryview(bytearray(2 * len(data)))[::2]
    with pytest.raises(ValueError, match="contiguous"):
        sp.unpack_pages_into(payload, strided)
    words = array.array("B", bytes(len(data)))
    sp.unpack_pages_into(payload, memoryview(words))
    assert words.tobytes() == data


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_unpack_hostile_mutations_raise_only_value_error(draw: st.DataObject) -> None:
    data, payload = _valid_payload()
    mutated = bytearray(payload)
    action = draw.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if action == "flip":
        for _ in range(draw.draw(st.integers(1, 4))):
            index = draw.draw(st.integers(0, len(mutated) - 1))
            mutated[index] ^= 1 << draw.draw(st.integers(0, 7))
    elif action == "truncate":
        del mutated[draw.draw(st.integers(0, len(mutated) - 1)) :]
    elif action == "extend":
        mutated += draw.draw(st.binary(min_size=1, max_size=600))
    else:
        start = draw.draw(st.integers(0, 40))
        mutated[start : start + 8] = draw.draw(st.binary(max_size=16))
    try:
        out = sp.unpack_pages(mutated, len(data))
    except ValueError:
        return
    # Accepted mutations only change page contents, never the structure.
    assert len(out) == len(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_unpack_random_bytes_raise_only_value_error(payload: bytes) -> None:
    try:
        out = sp.unpack_pages(payload, 1 << 16)
    except ValueError:
        return
    assert len(out) <= 1 << 16


# --------------------------------------------------------------------------- selection


def test_install_current_use_python() -> None:
    assert sp.IMPL.name == "python"
    assert sp.IMPL.crc32c is sp.crc32c
    assert sp.IMPL.zero_page_bitmap is sp.zero_page_bitmap
    calls: list[int] = []

    def fake_crc(data: sp.Buffer, crc: int = 0) -> int:
        calls.append(len(data))
        return 7

    fake = sp.Impl(
        name="fake", crc32c=fake_crc, zero_page_bitmap=sp.zero_page_bitmap, diff_pages=sp.diff_pages
    )
    installed = sp.current()  # the suite runs with the best implementation installed
    previous = sp.install(fake)
    try:
        assert previous is installed
        assert sp.current() is fake
        assert sp.current().crc32c(b"abc") == 7
        assert calls == [3]
        assert sp.use_python() is fake
        assert sp.current() is sp.IMPL
        assert sp.current().crc32c(b"123456789") == 0xE3069283
    finally:
        sp.install(installed)


def test_pack_pages_uses_the_current_bitmap() -> None:
    seen: list[int] = []

    def counting_bitmap(data: sp.Buffer, page_size: int) -> bytes:
        seen.append(page_size)
        return sp.zero_page_bitmap(data, page_size)

    sp.install(
        sp.Impl(
            name="counting",
            crc32c=sp.crc32c,
            zero_page_bitmap=counting_bitmap,
            diff_pages=sp.diff_pages,
        )
    )
    sp.pack_pages(bytes(4096), 1024)
    assert seen == [1024]


# --------------------------------------------------------------------------- arriving pages


class JournalLike:
    """A PageSink over a plain buffer that records its calls."""

    def __init__(self, dest: bytearray) -> None:
        self.dest = dest
        self.calls: list[tuple[str, int, int]] = []

    def write(self, offset: int, data: memoryview) -> None:
        self.calls.append(("write", offset, len(data)))
        self.dest[offset : offset + len(data)] = data

    def clear(self, offset: int, count: int) -> None:
        self.calls.append(("clear", offset, count))
        self.dest[offset : offset + count] = bytes(count)

    def prepare(self, offset: int, count: int) -> memoryview:
        self.calls.append(("prepare", offset, count))
        return memoryview(self.dest)[offset : offset + count]


def receive(payload: bytes, dest: bytearray, cuts: list[int], max_total: int) -> int:
    receiver = sp.PagesReceiver(len(payload), max_total, JournalLike(dest))
    at = 0
    for number, cut in enumerate([*sorted(set(cuts)), len(payload)]):
        piece = memoryview(payload)[at:cut]
        at = max(at, cut)
        while number % 2 and piece and (target := receiver.target(len(piece))) is not None:
            target[:] = piece[: len(target)]  # read in place, as the runtime does
            receiver.landed(len(target))
            piece = piece[len(target) :]
        receiver.feed(piece)
    return receiver.finish()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_data(), st.sampled_from(PAGE_SIZES[:3]), st.lists(st.integers(0, 50_000)))
def test_receiver_rebuilds_what_unpack_into_does(
    data: bytes, page_size: int, cuts: list[int]
) -> None:
    payload = b"".join(sp.pack_pages(data, page_size))
    dest = bytearray(b"\xee" * len(data))
    assert receive(payload, dest, cuts, len(data)) == len(data)
    assert dest == data


@pytest.mark.parametrize("cut", [0, 5, 12, 13])
def test_receiver_rejects_what_unpack_rejects_before_writing(cut: int) -> None:
    for payload in [
        b"\x00" * 11,
        struct.pack("<IQ", 4000, 0),
        struct.pack("<IQ", 4096, 1 << 63),
        struct.pack("<IQ", 512, 4096),
        struct.pack("<IQ", 512, 512 * 3) + b"\xff",
        struct.pack("<IQ", 512, 512 * 2) + b"\x01" + b"x" * 511,
        struct.pack("<IQ", 512, 700) + b"\x01" + b"x" * 512,
    ]:
        dest = bytearray(b"\xee" * 4096)
        sink = JournalLike(dest)
        receiver = sp.PagesReceiver(len(payload), 1 << 20, sink)
        with pytest.raises(ValueError):
            receiver.feed(payload[:cut])
            receiver.feed(payload[cut:])
            receiver.finish()
        assert sink.calls == [] and dest == b"\xee" * 4096


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_receiver_and_unpack_agree_on_mutations(draw: st.DataObject) -> None:
    data, payload = _valid_payload()
    mutated = bytearray(payload)
    for _ in range(draw.draw(st.integers(1, 3))):
        mutated[draw.draw(st.integers(0, len(mutated) - 1))] ^= 1 << draw.draw(st.integers(0, 7))
    if draw.draw(st.booleans()):
        del mutated[draw.draw(st.integers(0, len(mutated))) :]
    cuts = draw.draw(st.lists(st.integers(0, len(mutated))))
    expected = bytearray(len(data))
    try:
        sp.unpack_pages_into(mutated, memoryview(expected))
    except ValueError:
        expected_ok = False
    else:
        expected_ok = True
    dest = bytearray(len(data))
    try:
        got_ok = receive(bytes(mutated), dest, cuts, len(data)) == len(data)
    except ValueError:
        got_ok = False
    assert got_ok == expected_ok
    if expected_ok:
        assert dest == expected


def test_receiver_refuses_bytes_past_its_length() -> None:
    _, payload = _valid_payload()
    receiver = sp.PagesReceiver(len(payload) - 1, 1 << 20, JournalLike(bytearray(1 << 13)))
    with pytest.raises(ValueError):
        receiver.feed(payload)


@given(st.binary(min_size=1, max_size=20_000), st.lists(st.integers(0, 20_000)))
def test_a_raw_receiver_writes_plain_data_fed_or_read_in_place(
    data: bytes, cuts: list[int]
) -> None:
    dest = bytearray(b"\xee" * len(data))
    sink = JournalLike(dest)
    receiver = sp.PagesReceiver.raw(len(data), sink)
    at = 0
    for number, cut in enumerate([*sorted(set(cuts)), len(data)]):
        piece = memoryview(data)[at:cut]
        at = max(at, cut)
        while number % 2 and piece and (target := receiver.target(len(piece))) is not None:
            target[:] = piece[: len(target)]
            receiver.landed(len(target))
            piece = piece[len(target) :]
        receiver.feed(piece)
    assert receiver.finish() == len(data) and dest == data
    assert not [call for call in sink.calls if call[0] == "clear"]


def test_a_raw_receiver_refuses_more_or_less_than_announced() -> None:
    receiver = sp.PagesReceiver.raw(10, JournalLike(bytearray(10)))
    with pytest.raises(ValueError):
        receiver.feed(b"x" * 11)
    receiver.feed(b"x" * 9)
    with pytest.raises(ValueError, match="truncated"):
        receiver.finish()


@pytest.mark.parametrize("size", [0, 1, 4095, (2 << 20) + 3])
def test_fill_zero_clears_exactly_the_view(size: int) -> None:
    buf = bytearray(b"\xff" * (size + 2))
    sp.fill_zero(memoryview(buf)[1 : 1 + size])
    assert buf == b"\xff" + bytes(size) + b"\xff"


def _naive_set_runs(bitmap: bytes, pages: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for page in range(pages):
        if bitmap[page >> 3] >> (page & 7) & 1:
            if runs and runs[-1][1] == page:
                runs[-1] = (runs[-1][0], page + 1)
            else:
                runs.append((page, page + 1))
    return runs


@given(bitmap=st.binary(max_size=64), data=st.data())
def test_set_runs_are_the_maximal_runs_of_set_bits(bitmap: bytes, data: st.DataObject) -> None:
    pages = data.draw(st.integers(0, len(bitmap) * 8))
    assert sp.set_runs(bitmap, pages) == _naive_set_runs(bitmap, pages)


def test_set_runs_join_across_full_bytes_and_stop_at_the_page_count() -> None:
    assert sp.set_runs(b"\x80\xff\x01\x00\x02", 40) == [(7, 17), (33, 34)]
    assert sp.set_runs(b"\xff", 3) == [(0, 3)]
    assert sp.set_runs(bytes(1 << 13), 1 << 16) == []
