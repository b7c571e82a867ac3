"""Live-migration throughput and downtime: testdev between two ``serve`` processes.

Run with the project's virtualenv (the package must be installed, e.g. ``make venv``)::

    .venv/bin/python scripts/bench_migration.py --quick             # 16 MiB only
    .venv/bin/python scripts/bench_migration.py                     # 16 MiB, 256 MiB, 1 GiB
    .venv/bin/python scripts/bench_migration.py --mode both --precopy-compare --json out.json

Same as ``vfio-user-emu bench migration``; the code lives in
:mod:`emulator.tools.bench_migration`. For each
RAM size and transport (in-band MIG_DATA messages, or the data fds) it migrates testdev
with its RAM full of incompressible data between two fresh server processes and prints
MB/s (10^6 bytes per second: bytes moved / total migration time), downtime, the servers'
peak memory, and the same byte count through a plain UNIX-socket copy between two
processes and through memcpy, with the migration's rate as a share of both. Each figure is
the best of ``--repeat`` runs (default 3; 2 from 1 GiB). This is a benchmark, not a test:
it only checks that the destination's RAM ends up equal to the source's.
"""

from __future__ import annotations

from collections.abc import Sequence

from emulator.tools.bench_migration import migration_main


def main(argv: Sequence[str] | None = None) -> int:
    return migration_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
