"""cffi (API mode) builder for the C fast path: ``devices.migration.fastpath._fastpath``.

Used by ``setup.py`` (``cffi_modules=["devices/migration/fastpath/build.py:ffibuilder"]``); cffi
executes this file directly rather than importing it.  To rebuild the extension in the
source tree after editing ``fastpath.c`` (same result as ``pip install -e .``)::

    .venv/bin/python devices/migration/fastpath/build.py

The C source is ``fastpath.c`` next to this file.  cffi is imported through importlib so
that mypy --strict does not need stubs for it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

MODULE_NAME = "devices.migration.fastpath._fastpath"

CDEF = """
uint32_t vfe_crc32c(uint32_t crc, const uint8_t *buf, size_t len);
uint32_t vfe_crc32c_soft(uint32_t crc, const uint8_t *buf, size_t len);
int vfe_crc32c_hw_active(void);
uint32_t vfe_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2);
long vfe_vmsplice(int fd, const uint8_t *buf, size_t len);
void vfe_zero_page_bitmap(const uint8_t *buf, size_t len, size_t page, uint8_t *out);
void vfe_diff_pages(const uint8_t *a, const uint8_t *b, size_t len, size_t page, uint8_t *out);
"""

_HERE = Path(__file__).resolve().parent


def make_builder() -> Any:
    cffi = importlib.import_module("cffi")
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(
        MODULE_NAME,
        (_HERE / "fastpath.c").read_text(encoding="utf-8"),
        extra_compile_args=["-O3"],
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    # Rebuild in place exactly as ``pip install -e .`` does (same abi3 file name, generated C
    # kept under build/), without reinstalling anything.
    root = _HERE.parents[2]
    command = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    raise SystemExit(subprocess.run(command, cwd=root, check=False).returncode)
