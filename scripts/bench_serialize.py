"""Throughput of the migration stream: memcpy vs C vs pure Python.

Run with the project's virtualenv (the package must be installed, e.g. ``make venv``)::

    .venv/bin/python scripts/bench_serialize.py            # 16 MiB buffers
    .venv/bin/python scripts/bench_serialize.py --large    # also 256 MiB

Two kinds of rows:

* the whole state, as a migration does it (testdev with RAM of the given size, random
  bytes): **serialize** = the source's stop-copy stream (zero-page bitmap, section framing,
  CRC-32C) copied into a buffer, as a transport copies it; **parse+verify** = that stream
  validated and applied into a destination's RAM, whole (decode, then load) or while it
  arrives (the decoder with RAM read in place, as the data-fd path does);
* the primitives alone (CRC-32C, zero-page bitmap).

MB/s means 10^6 bytes (of RAM, for the whole-state rows) per second; each figure is the best
of ``--repeat`` runs. Pure-Python figures are timed on a smaller sample
(``--python-sample-mib``) and their rate is extrapolated, because a whole buffer takes
minutes. This is a benchmark, not a test: it asserts only that C and Python agree.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from devices.migration import fastpath
from devices.migration import primitives as sp
from devices.migration.engine import MemoryStaging, SavingSession
from devices.migration.stream import StreamDecoder, StreamLimits, decode
from devices.testdev import TestDev, TestDevOptions

MIB = 1 << 20


@dataclass(frozen=True)
class Row:
    size: int
    operation: str
    impl: str
    nbytes: int  # bytes actually processed per run
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.nbytes / self.seconds / 1e6


def best_of(repeat: int, func: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def sparse_buffer(size: int, page_size: int, zero_fraction: float, seed: int) -> bytearray:
    """Random pages, with ``zero_fraction`` of them all zero (placed at random)."""
    rng = random.Random(seed)
    buf = bytearray(size)
    noise = os.urandom(min(size, 4 * MIB))
    for start in range(0, size, page_size):
        if rng.random() >= zero_fraction:
            offset = rng.randrange(0, max(1, len(noise) - page_size))
            chunk = noise[offset : offset + page_size]
            buf[start : start + len(chunk)] = chunk[: size - start]
    return buf


def bench_size(
    size: int, page_size: int, sample: int, repeat: int, c_impl: sp.Impl | None
) -> list[Row]:
    rows: list[Row] = []
    data = bytes(sparse_buffer(size, page_size, 0.0, seed=1))
    view = memoryview(data)
    dst = bytearray(size)

    dst_view = memoryview(dst)

    def copy_into() -> None:
        dst[:] = data  # CPython copies a non-bytearray source first: two copies

    def copy_into_view() -> None:
        dst_view[:] = data  # one memcpy into the existing (already faulted-in) buffer

    seconds = best_of(repeat, copy_into)
    rows.append(Row(size, "memcpy (bytearray[:] = bytes)", "-", size, seconds))
    seconds = best_of(repeat, copy_into_view)
    rows.append(Row(size, "memcpy (memoryview[:] = bytes)", "-", size, seconds))
    seconds = best_of(repeat, functools.partial(bytes, view))
    rows.append(Row(size, "memcpy (bytes(memoryview))", "-", size, seconds, "allocates"))

    sample_view = view[: min(sample, size)]
    seconds = best_of(repeat, functools.partial(sp.crc32c, sample_view))
    note = f"timed on {len(sample_view) / MIB:g} MiB, rate extrapolated"
    rows.append(Row(size, "crc32c", "python", len(sample_view), seconds, note))
    if c_impl is not None:
        if c_impl.crc32c(sample_view) != sp.crc32c(sample_view):
            raise SystemExit("C and Python CRC-32C disagree")
        kind = "sse4.2" if fastpath.hardware_crc() else "software tables"
        seconds = best_of(repeat, functools.partial(c_impl.crc32c, view))
        rows.append(Row(size, "crc32c", "c", size, seconds, kind))

    for fraction in (0.5, 0.9):
        sparse = bytes(sparse_buffer(size, page_size, fraction, seed=2))
        operation = f"zero_page_bitmap ({fraction:.0%} zero, {page_size // 1024} KiB)"
        seconds = best_of(repeat, functools.partial(sp.zero_page_bitmap, sparse, page_size))
        rows.append(Row(size, operation, "python", size, seconds))
        if c_impl is not None:
            if c_impl.zero_page_bitmap(sparse, page_size) != sp.zero_page_bitmap(sparse, page_size):
                raise SystemExit("C and Python zero-page bitmaps disagree")
            seconds = best_of(repeat, functools.partial(c_impl.zero_page_bitmap, sparse, page_size))
            rows.append(Row(size, operation, "c", size, seconds))
    return rows


# ---------------------------------------------------------------------------------------------
# the whole state

READ_PIECE = MIB  # what the data-fd pump reads at a time


def testdev_with(ram: bytes) -> TestDev:
    device = TestDev(TestDevOptions(ram_size=len(ram)))
    device.ram.buffer[:] = ram
    return device


def serialize_into(device: TestDev, out: memoryview) -> int:
    """The stop-copy stream as the engine makes it, copied piece by piece into ``out``."""
    session = SavingSession(device.migration_codec(StreamLimits()))
    session.finish(device.stop_copy_sections(after_precopy=False))
    at = 0
    while piece := session.take(READ_PIECE):
        out[at : at + len(piece)] = piece
        at += len(piece)
    return at


def load_whole(device: TestDev, stream: memoryview) -> None:
    """Decode the whole stream, then apply it (a stream staged before it is loaded)."""
    _, sections = decode(stream, device_type=device.type_name, max_model_version=1)
    device.load_state(sections)


def load_arriving(device: TestDev, stream: memoryview) -> None:
    """Decode while it arrives, RAM read in place (the data-fd path), then apply the rest."""
    decoder = StreamDecoder(
        device_type=device.type_name,
        max_model_version=device.model_version,
        sink_for=device.resume_sink,
        store=MemoryStaging(),
    )
    while stream:
        target = decoder.target(READ_PIECE)
        if target is not None:
            size = len(target)
            target[:] = stream[:size]  # the pump's readv from the pipe
            decoder.landed(size)
        else:
            size = decoder.wanted(READ_PIECE)
            decoder.feed(stream[:size])
        stream = stream[size:]
    device.load_state(decoder.sections())
    decoder.commit()


def whole_state_rows(
    size: int, impl_name: str, sample: int, repeat: int, ram_source: bytes
) -> list[Row]:
    """Serialize and parse+verify rows for one implementation (installed by the caller);
    Python runs on ``sample`` bytes of RAM."""
    nbytes = size if impl_name == "c" else min(sample, size)
    ram = ram_source[:nbytes]
    source = testdev_with(ram)
    out = memoryview(bytearray(nbytes + (1 << 16)))  # room for the framing
    length = serialize_into(source, out)  # also faults the buffer in
    seconds = best_of(repeat, functools.partial(serialize_into, source, out))
    note = "" if nbytes == size else f"timed on {nbytes / MIB:g} MiB, rate extrapolated"
    rows = [Row(size, "serialize (stop-copy stream)", impl_name, nbytes, seconds, note)]
    stream = out[:length]
    destination = testdev_with(bytes(nbytes))
    for operation, load in (
        ("parse+verify+apply, whole stream", load_whole),
        ("parse+verify+apply, as it arrives", load_arriving),
    ):
        seconds = fresh_destination_best_of(
            repeat, destination, functools.partial(load, destination, stream)
        )
        if bytes(destination.ram.buffer) != ram:
            raise SystemExit(f"{operation} ({impl_name}) did not restore the RAM")
        rows.append(Row(size, operation, impl_name, nbytes, seconds, note))
    return rows


def fresh_destination_best_of(
    repeat: int, destination: TestDev, load: Callable[[], object]
) -> float:
    """Best time of ``load`` into a destination reset before each run (untimed), as a
    migration's destination is: its RAM zero, so a resume in place keeps no copy of it."""
    best = float("inf")
    for _ in range(repeat):
        destination.reset()
        best = min(best, best_of(1, load))
    return best


def whole_state(size: int, sample: int, repeat: int, c_impl: sp.Impl | None) -> list[Row]:
    ram = bytes(sparse_buffer(size, 4096, 0.0, seed=3))
    previous = sp.current()
    rows: list[Row] = []
    try:
        for impl in [sp.PYTHON] + ([c_impl] if c_impl is not None else []):
            sp.install(impl)
            name = "python" if impl is sp.PYTHON else "c"
            rows += whole_state_rows(size, name, sample, repeat, ram)
    finally:
        sp.install(previous)
    return rows


def print_table(rows: list[Row]) -> None:
    memcpy = {
        r.size: max(x.rate for x in rows if x.size == r.size and x.operation.startswith("memcpy"))
        for r in rows
    }
    python = {(r.size, r.operation): r.rate for r in rows if r.impl == "python"}
    header = (
        f"{'size':>8}  {'operation':<40} {'impl':<6} {'MB/s':>10} "
        f"{'C/Python':>9} {'C/memcpy':>9}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        vs_python = vs_memcpy = ""
        if r.impl == "c":
            py = python.get((r.size, r.operation))
            vs_python = f"{r.rate / py:8.1f}x" if py else ""
            vs_memcpy = f"{r.rate / memcpy[r.size]:8.2f}x"
        print(
            f"{r.size // MIB:>5} MiB  {r.operation:<40} {r.impl:<6} {r.rate:>10,.0f} "
            f"{vs_python:>9} {vs_memcpy:>9}  {r.note}"
        )
    print("\nC/memcpy: against the best memcpy row of the same size.")
    print("whole-state rows: MB of RAM per second (the stream is a little larger).")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``prog``: the name in usage lines (``vfio-user-emu bench serialize`` runs this)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size-mib", type=int, default=16, help="buffer size in MiB")
    parser.add_argument("--large", action="store_true", help="also run with 256 MiB buffers")
    parser.add_argument("--page-size", type=int, default=4096, help="bitmap page size")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best kept)")
    parser.add_argument(
        "--python-sample-mib", type=int, default=1, help="sample size for the Python rows"
    )
    args = parser.parse_args(argv)

    c_impl = fastpath.load()
    if c_impl is None:
        print(f"C fast path unavailable ({fastpath.load_error()}); Python figures only.")
    sizes = [args.size_mib * MIB] + ([256 * MIB] if args.large else [])
    rows: list[Row] = []
    for size in sizes:
        rows += whole_state(size, args.python_sample_mib * MIB, max(1, args.repeat), c_impl)
        rows += bench_size(
            size, args.page_size, args.python_sample_mib * MIB, max(1, args.repeat), c_impl
        )
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; MB = 10^6 bytes\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
