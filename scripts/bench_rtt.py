"""Round-trip cost of one message: our server against a plain Python echo server.

Run with the project's virtualenv (``make venv``)::

    .venv/bin/python scripts/bench_rtt.py                   # both placements, all scenarios
    .venv/bin/python scripts/bench_rtt.py --placement same  # client and server on CPU 0
    .venv/bin/python scripts/bench_rtt.py --save-baseline   # update docs/bench/rtt-baseline.json

Same as ``vfio-user-emu bench rtt``. A benchmark, not a test; exits 1 when a figure's ratio
to the floor regressed by more than 10% against the baseline file.
"""

from __future__ import annotations

import sys

from emulator.tools.bench_rtt import main

if __name__ == "__main__":
    sys.exit(main())
