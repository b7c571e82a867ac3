"""The client's public API is ``emulator.client``: its ``__all__`` names what exists, and
code outside the package imports the client from there, not from the modules behind it."""

from __future__ import annotations

import ast
from pathlib import Path

import emulator.client

REPO = Path(__file__).resolve().parents[3]
#: The modules behind the package's public names (see emulator/client/__init__.py).
PRIVATE = {"emulator.client.core", "emulator.client.requests"}


def test_every_public_name_exists_and_comes_from_the_package() -> None:
    names = emulator.client.__all__
    assert names == sorted(names)
    for name in names:
        value = getattr(emulator.client, name)
        assert value.__module__.startswith("emulator.client."), name


def test_code_outside_the_package_imports_the_public_names() -> None:
    offenders = []
    for path in sorted(REPO.glob("[!.]*/**/*.py")):
        relative = path.relative_to(REPO)
        if relative.parts[:2] == ("emulator", "client") or ".venv" in relative.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in PRIVATE:
                offenders.append(f"{relative}:{node.lineno}: from {node.module} import ...")
    assert not offenders, "\n".join(offenders)
