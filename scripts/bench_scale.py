"""Many devices: one ``serve --config`` process for all of them, or one process each.

Run with the project's virtualenv (``make venv``)::

    .venv/bin/python scripts/bench_scale.py                       # 1, 8, 32, 64 devices
    .venv/bin/python scripts/bench_scale.py --devices 1,8 --mode one

Same as ``vfio-user-emu bench scale``. A benchmark, not a test.
"""

from __future__ import annotations

import sys

from emulator.tools.bench_scale import main

if __name__ == "__main__":
    sys.exit(main())
