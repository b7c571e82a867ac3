"""Throughput of the migration-stream primitives: memcpy vs C vs pure Python.

Run with the project's virtualenv (the package must be installed, e.g. ``make venv``)::

    .venv/bin/python scripts/bench_serialize.py            # 16 MiB buffers
    .venv/bin/python scripts/bench_serialize.py --large    # also 256 MiB

MB/s means 10^6 bytes per second; each figure is the best of ``--repeat`` runs.  The
pure-Python CRC-32C is timed on a smaller sample (``--python-sample-mib``) and its rate is
extrapolated per MB to the full size, because timing it on the whole buffer takes minutes.
This is a benchmark, not a test: it asserts only that C and Python agree.
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

from devices import stream_primitives as sp
from emulator import fastpath

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=16, help="buffer size (default 16)")
    parser.add_argument("--large", action="store_true", help="also run with 256 MiB buffers")
    parser.add_argument("--page-size", type=int, default=4096, help="bitmap page size")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best kept)")
    parser.add_argument(
        "--python-sample-mib", type=int, default=1, help="sample size for the Python CRC"
    )
    args = parser.parse_args(argv)

    c_impl = fastpath.load()
    if c_impl is None:
        print(f"C fast path unavailable ({fastpath.load_error()}); Python figures only.")
    sizes = [args.size_mib * MIB] + ([256 * MIB] if args.large else [])
    rows: list[Row] = []
    for size in sizes:
        rows += bench_size(
            size, args.page_size, args.python_sample_mib * MIB, max(1, args.repeat), c_impl
        )
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; MB = 10^6 bytes\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
