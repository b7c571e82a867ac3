"""Build hook for the optional C fast path; all other metadata lives in pyproject.toml.

cffi compiles ``devices.migration.fastpath._fastpath`` from
``devices/migration/fastpath/build.py``.  If that
fails (no C compiler, missing Python headers, ...) a warning is printed and the install
carries on without the extension: ``devices.migration.primitives`` then uses its pure-Python
implementation.  ``pip install -e .`` places the extension in the source tree.

setuptools ships no type information, so it is imported through importlib and the command
class is assembled with ``type()``; this keeps ``mypy --strict setup.py`` clean.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

_setuptools: Any = importlib.import_module("setuptools")
_errors: Any = importlib.import_module("setuptools.errors")
_build_ext: Any = importlib.import_module("setuptools.command.build_ext").build_ext

_BUILD_ERRORS: tuple[type[BaseException], ...] = (
    _errors.BaseError,
    _errors.CCompilerError,
    OSError,
)


def _warn(what: str, exc: BaseException) -> None:
    line = "=" * 78
    print(
        f"\n{line}\nWARNING: could not build {what}: {exc}\n"
        "The pure-Python fallback will be used (correct, but much slower for CRC-32C and\n"
        "zero-page scans). Install a C compiler and the Python headers, then reinstall\n"
        f"to get the C fast path.\n{line}\n",
        file=sys.stderr,
        flush=True,
    )


def _run(self: Any) -> None:
    try:
        _build_ext.run(self)
    except _BUILD_ERRORS as exc:
        _warn("the C extensions", exc)


def _build_extension(self: Any, ext: Any) -> None:
    try:
        _build_ext.build_extension(self, ext)
    except _BUILD_ERRORS as exc:
        ext.optional = True  # so the in-place (editable) copy step skips the missing file
        _warn(f"extension {ext.name!r}", exc)


#: ``build_ext`` that degrades to the pure-Python fallback instead of failing the install.
OptionalBuildExt: Any = type(
    "OptionalBuildExt",
    (_build_ext,),
    {"run": _run, "build_extension": _build_extension, "__doc__": __doc__},
)

_setuptools.setup(
    cffi_modules=["devices/migration/fastpath/build.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
)
