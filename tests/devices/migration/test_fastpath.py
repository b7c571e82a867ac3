"""The C fast path (``devices.migration.fastpath``) against the pure-Python reference."""

from __future__ import annotations

import errno
import importlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.migration import fastpath
from devices.migration import primitives as sp

C_IMPL = fastpath.load()
needs_c = pytest.mark.skipif(
    C_IMPL is None,
    reason=f"C fast path not built: {fastpath.load_error()} "
    "(pip install -e . with a C compiler builds it)",
)
#: vmsplice needs the extension and a system that allows vmsplice(2) (Linux, no seccomp
#: filter against it); a run that requires the fast path (CI) requires it too.
needs_vmsplice = pytest.mark.skipif(
    C_IMPL is None
    or (
        not fastpath.vmsplice_available()
        and os.environ.get("VFIO_USER_EMU_REQUIRE_FASTPATH", "") in ("", "0")
    ),
    reason="vmsplice unavailable: C fast path not built or vmsplice(2) refused here",
)
LANE = 4096  # VFE_LANE_BIG in fastpath.c: three lanes per hardware block


@pytest.fixture(autouse=True)
def _restore_impl() -> Iterator[None]:
    previous = sp.current()
    yield
    sp.install(previous)


def c_impl() -> sp.Impl:
    assert C_IMPL is not None
    return C_IMPL


def c_lib() -> Any:
    return importlib.import_module(fastpath.MODULE).lib


def soft_crc(data: bytes, crc: int = 0) -> int:
    """The C slicing-by-8 path, whatever the CPU supports."""
    ffi = importlib.import_module(fastpath.MODULE).ffi
    return int(c_lib().vfe_crc32c_soft(crc, ffi.from_buffer(data), len(data)))


@st.composite
def sparse_data(draw: st.DrawFn, max_len: int = 40_000) -> bytes:
    length = draw(st.integers(0, max_len))
    buf = bytearray(length)
    if length:
        for _ in range(draw(st.integers(0, 12))):
            start = draw(st.integers(0, length - 1))
            run = draw(st.integers(1, 3000))
            buf[start : start + run] = bytes([draw(st.integers(1, 255))]) * len(
                buf[start : start + run]
            )
    return bytes(buf)


# --------------------------------------------------------------------------- CRC-32C


@needs_c
def test_c_known_vectors() -> None:
    crc = c_impl().crc32c
    assert c_impl().name == "c"
    assert crc(b"123456789") == 0xE3069283
    assert crc(b"") == 0
    assert crc(b"", 0xDEADBEEF) == 0xDEADBEEF
    assert crc(b"6789", crc(b"12345")) == 0xE3069283
    assert crc(bytes(32)) == 0x8A9136AA
    assert crc(bytes(range(32))) == 0x46DD794E
    assert soft_crc(b"123456789") == 0xE3069283
    with pytest.raises(ValueError, match="CRC"):
        crc(b"x", 1 << 32)
    with pytest.raises(ValueError, match="CRC"):
        crc(b"x", -1)


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=10_000), st.data())
def test_c_crc_matches_python(data: bytes, draw: st.DataObject) -> None:
    crc = c_impl().crc32c
    expected = sp.crc32c(data)
    assert crc(data) == expected
    assert soft_crc(data) == expected
    split = draw.draw(st.integers(0, len(data)))
    assert crc(data[split:], crc(data[:split])) == expected
    # Unaligned starts and ends, through views of the same buffer (no copies).
    start = draw.draw(st.integers(0, min(15, len(data))))
    end = draw.draw(st.integers(start, len(data)))
    view = memoryview(data)[start:end]
    assert crc(view) == sp.crc32c(data[start:end])
    assert crc(bytearray(view)) == sp.crc32c(view)


@needs_c
@pytest.mark.parametrize(
    "length",
    [3 * 256 - 1, 3 * 256, 3 * 256 + 9, 3 * LANE - 1, 3 * LANE, 3 * LANE + 1, 7 * LANE + 3],
)
def test_c_crc_lane_boundaries(length: int) -> None:
    data = os.urandom(length + 3)
    for start in range(4):
        piece = memoryview(data)[start : start + length]
        assert c_impl().crc32c(piece) == sp.crc32c(piece)


@needs_c
def test_c_crc_large_buffer_hardware_and_software_agree() -> None:
    data = os.urandom((4 << 20) + 13)
    crc = c_impl().crc32c(data)
    assert soft_crc(data) == crc
    half = len(data) // 2 + 5
    assert c_impl().crc32c(memoryview(data)[half:], c_impl().crc32c(data[:half])) == crc
    assert sp.crc32c(data[:200_000]) == c_impl().crc32c(memoryview(data)[:200_000])


@needs_c
@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.one_of(st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1)),
)
def test_c_combine_matches_python(crc1: int, crc2: int, length: int) -> None:
    assert c_impl().crc32c_combine(crc1, crc2, length) == sp.crc32c_combine(crc1, crc2, length)


@needs_c
def test_c_combine_is_the_crc_of_the_concatenation() -> None:
    data = os.urandom((1 << 20) + 77)
    crc = c_impl().crc32c
    for split in (0, 1, 4096, len(data) // 2, len(data)):
        head, tail = data[:split], data[split:]
        assert c_impl().crc32c_combine(crc(head), crc(tail), len(tail)) == crc(data)
    for bad in ((-1, 0, 0), (0, 1 << 32, 0), (0, 0, -1), (0, 0, 1 << 64)):
        with pytest.raises(ValueError):
            c_impl().crc32c_combine(*bad)


@needs_vmsplice
def test_vmsplice_hands_memory_to_a_pipe() -> None:
    import mmap

    assert fastpath.vmsplice_available()  # (only reached unskipped when it must be)
    memory = mmap.mmap(-1, 1 << 20)
    memory[:] = os.urandom(1 << 20)
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)
        view = memoryview(memory)
        handed = fastpath.vmsplice(write_end, view[5:])
        assert 0 < handed <= (1 << 20) - 5
        got = b""
        while len(got) < handed:
            got += os.read(read_end, handed - len(got))
        assert got == memory[5 : 5 + handed]
        while True:  # a full non-blocking pipe: BlockingIOError, as os.write raises
            try:
                fastpath.vmsplice(write_end, view)
            except BlockingIOError:
                break
        view.release()
    finally:
        os.close(read_end)
        os.close(write_end)
        memory.close()
    with pytest.raises(OSError) as info:
        fastpath.vmsplice(write_end, b"closed")  # an fd that is not open any more
    assert info.value.errno == errno.EBADF


@needs_c
def test_c_accepts_other_buffers() -> None:
    import array

    words = array.array("Q", range(1000))
    assert c_impl().crc32c(memoryview(words)) == sp.crc32c(words.tobytes())
    strided = memoryview(bytes(range(256)))[::3]
    assert c_impl().crc32c(strided) == sp.crc32c(strided.tobytes())
    assert c_impl().zero_page_bitmap(strided, 8) == sp.zero_page_bitmap(strided, 8)


# --------------------------------------------------------------------------- bitmaps


@needs_c
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_data(), st.sampled_from([1, 3, 8, 100, 512, 4096, 65536, 1 << 40]), st.data())
def test_c_zero_page_bitmap_matches_python(
    data: bytes, page_size: int, draw: st.DataObject
) -> None:
    assert c_impl().zero_page_bitmap(data, page_size) == sp.zero_page_bitmap(data, page_size)
    start = draw.draw(st.integers(0, min(7, len(data))))
    view = memoryview(data)[start:]
    assert c_impl().zero_page_bitmap(view, page_size) == sp.zero_page_bitmap(view, page_size)


@needs_c
def test_c_zero_page_bitmap_edges() -> None:
    bitmap = c_impl().zero_page_bitmap
    assert bitmap(b"", 4096) == b""
    for page in (300, 4096):
        for where in {0, 63, 64, 255, 256, 299, page - 1}:
            data = bytearray(page * 2)
            data[page + where] = 1
            assert bitmap(data, page) == b"\x01", (page, where)
    with pytest.raises(ValueError, match="page size"):
        bitmap(b"x", 0)


@needs_c
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_data(), st.sampled_from([512, 4096]))
def test_pack_with_c_matches_python(data: bytes, page_size: int) -> None:
    sp.install(c_impl())
    with_c = b"".join(sp.pack_pages(data, page_size))
    sp.use_python()
    assert with_c == b"".join(sp.pack_pages(data, page_size))
    assert sp.unpack_pages(with_c, len(data)) == data


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("value", ["0", "python", " Python "])
def test_env_forces_python(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(fastpath.ENV_VAR, value)
    sp.install(sp.Impl("other", sp.crc32c, sp.zero_page_bitmap, sp.diff_pages))
    impl = fastpath.install_best()
    assert impl is sp.IMPL
    assert sp.current().name == "python"


@pytest.mark.parametrize("value", [None, "", "auto", "1", "c"])
def test_install_best_prefers_c(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(fastpath.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(fastpath.ENV_VAR, value)
    impl = fastpath.install_best()
    assert sp.current() is impl
    assert impl.name == ("python" if C_IMPL is None else "c")
    assert impl.crc32c(b"123456789") == 0xE3069283


def test_unknown_env_value_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(fastpath.ENV_VAR, "turbo")
    with caplog.at_level(logging.INFO, logger="vfio_user_emu.fastpath"):
        fastpath.install_best()
    assert "turbo" in caplog.text


def test_missing_extension_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(fastpath.ENV_VAR, raising=False)
    monkeypatch.setattr(fastpath, "MODULE", "devices.migration.fastpath._not_built")
    monkeypatch.setattr(fastpath, "_module", None)
    monkeypatch.setattr(fastpath, "_load_error", None)
    assert fastpath.load() is None
    assert "_not_built" in (fastpath.load_error() or "")
    assert not fastpath.hardware_crc()
    with caplog.at_level(logging.WARNING, logger="vfio_user_emu.fastpath"):
        assert fastpath.install_best() is sp.IMPL
    assert "unavailable" in caplog.text


@needs_c
def test_broken_c_is_never_installed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(fastpath.ENV_VAR, raising=False)
    broken = sp.Impl("c", lambda data, crc=0: 0, c_impl().zero_page_bitmap, c_impl().diff_pages)
    monkeypatch.setattr(fastpath, "_make_impl", lambda module: broken)
    with caplog.at_level(logging.ERROR, logger="vfio_user_emu.fastpath"):
        assert fastpath.install_best() is sp.IMPL
    assert "check value" in caplog.text


@needs_c
def test_hardware_crc_reports_a_bool() -> None:
    assert isinstance(fastpath.hardware_crc(), bool)
