"""emulator.allocator: malloc keeps message-sized buffers (no page faults per copy)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from emulator import allocator

GLIBC = platform.libc_ver()[0] == "glibc"

#: A message's life: a 1 MiB buffer built, copied once, both freed; 100 times.
_COPIES = textwrap.dedent(
    """
    import resource, sys
    from emulator import allocator
    if sys.argv[1] == "tuned":
        assert allocator.keep_large_buffers()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        message = bytes(bytearray(1 << 20))
        copy = bytes(memoryview(message)[1:])
        del message, copy
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def page_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _COPIES, mode],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_keep_large_buffers_is_done_once_and_reports_glibc() -> None:
    first = allocator.keep_large_buffers()
    assert allocator.keep_large_buffers() is first  # cached: once per process
    if GLIBC:
        assert first is True


@pytest.mark.skipif(not GLIBC, reason="malloc tuning is glibc only")
def test_tuned_malloc_reuses_message_buffers_instead_of_faulting_them_in() -> None:
    # Untuned, every 1 MiB block is a fresh mmap: ~256 faults per MiB copied (~50000 here).
    tuned, untuned = page_faults("tuned"), page_faults("untuned")
    assert untuned > 100 * 256 // 2
    assert tuned * 10 < untuned


def test_constructing_a_server_leaves_the_host_programs_malloc_alone() -> None:
    probe = textwrap.dedent(
        """
        from devices.testdev import TestDev
        from emulator import allocator
        from emulator.server import DeviceServer
        DeviceServer(TestDev(), socket_path="/nonexistent/never-bound.sock")
        print(allocator.keep_large_buffers.cache_info().currsize)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"  # keep_large_buffers was never called
