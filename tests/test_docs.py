"""The documentation is executable: the tutorial runs, and the architecture notes name real code.

``docs/writing-a-device.md`` is a tutorial whose ```python blocks, concatenated in order,
form one module. Its final ``check_counter`` coroutine serves the tutorial's device and
drives it with the client; running it here proves the tutorial works. The module is
compiled with the markdown's own line numbers, so a traceback points into the document.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.irq import InterruptController
from emulator.dma import DmaEngine

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "writing-a-device.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
CHECK_FUNCTION = "check_counter"

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block, in order."""
    return [
        (text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in _FENCE.finditer(text)
    ]


def tutorial_source(text: str) -> str:
    """The blocks joined into one module whose line numbers are the markdown's."""
    lines = [""] * (text.count("\n") + 1)
    for first, source in python_blocks(text):
        for i, line in enumerate(source.splitlines()):
            lines[first - 1 + i] = line
    return "\n".join(lines) + "\n"


def load_tutorial() -> types.ModuleType:
    """Exec the tutorial as one fresh module (not ``__main__``, so its entry point idles)."""
    module = types.ModuleType("writing_a_device")
    module.__file__ = str(TUTORIAL)
    code = compile(tutorial_source(TUTORIAL.read_text()), str(TUTORIAL), "exec")
    exec(code, module.__dict__)
    return module


@pytest.fixture
def tutorial() -> types.ModuleType:
    return load_tutorial()


def leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


async def run_check(module: types.ModuleType, directory: Path) -> None:
    check: Callable[[Path], Awaitable[None]] = getattr(module, CHECK_FUNCTION)
    assert inspect.iscoroutinefunction(check), f"{CHECK_FUNCTION} must be an async function"
    with trio.fail_after(30):
        await check(directory)


async def expect_check_failure(module: types.ModuleType, directory: Path) -> None:
    """The tutorial's check must notice a misbehaving device (assertion or timeout).

    Checked twice: as written, and with the offline step disabled, so that the part that
    goes through the server and the client is shown to notice it too.
    """
    for attempt, skip_offline in enumerate((False, True)):
        if skip_offline:
            vars(module)["check_offline"] = lambda: None
        where = directory / f"attempt{attempt}"
        where.mkdir()
        try:
            await run_check(module, where)
        except BaseException as exc:
            kinds = {type(leaf) for leaf in leaves(exc)}
            if not kinds & {AssertionError, trio.TooSlowError}:
                raise
        else:
            pytest.fail(
                "the tutorial's check passed although the device misbehaves"
                + (" (offline step skipped)" if skip_offline else "")
            )


# -- the tutorial ------------------------------------------------------------------------------


def test_tutorial_has_code() -> None:
    blocks = python_blocks(TUTORIAL.read_text())
    assert len(blocks) >= 8
    assert all(source.strip() for _, source in blocks)


def test_line_numbers_match_the_markdown() -> None:
    text = TUTORIAL.read_text()
    doc_lines = text.splitlines()
    for number, line in enumerate(tutorial_source(text).splitlines(), start=1):
        if line:
            assert doc_lines[number - 1] == line


def test_device_model_imports_no_runtime() -> None:
    """The device half of the tutorial (before "Serving it") follows the layering rule."""
    text = TUTORIAL.read_text()
    device_part = text[: text.index("## 6. Serving it")]
    imports = re.findall(r"^(?:from|import) +([\w.]+)", tutorial_source(device_part), re.M)
    assert imports
    assert all(name.split(".")[0] not in {"trio", "protocol", "emulator"} for name in imports)


async def test_tutorial_runs(tutorial: types.ModuleType, tmp_path: Path) -> None:
    assert tutorial.__name__ != "__main__"
    await run_check(tutorial, tmp_path)


async def test_tutorial_notices_a_miscounting_device(
    tutorial: types.ModuleType, tmp_path: Path
) -> None:
    class MiscountingDevice(tutorial.CounterDevice):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            for reg in self.regs.registers():
                if reg.name == "INCREMENT":
                    assert reg.on_write is not None
                    correct = reg.on_write
                    reg.on_write = lambda value, correct=correct: correct(value + 1)

    vars(tutorial)["CounterDevice"] = MiscountingDevice
    await expect_check_failure(tutorial, tmp_path)


async def test_tutorial_notices_a_missing_interrupt(
    tutorial: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(InterruptController, "notify", lambda self, vector=0: None)
    await expect_check_failure(tutorial, tmp_path)


async def test_tutorial_notices_an_interrupt_that_never_drops(
    tutorial: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(InterruptController, "lower_intx", lambda self: None)
    await expect_check_failure(tutorial, tmp_path)


async def test_tutorial_notices_wrong_dma_data(
    tutorial: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    correct = DmaEngine.write

    async def corrupting(self: DmaEngine, iova: int, data: bytes | bytearray | memoryview) -> None:
        await correct(self, iova, bytes(b ^ 0xFF for b in bytes(data)))

    monkeypatch.setattr(DmaEngine, "write", corrupting)
    await expect_check_failure(tutorial, tmp_path)


async def test_tutorial_notices_lost_state(
    tutorial: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that forgot its registers on disconnect would break the protocol's rule."""
    original_detach = tutorial.CounterDevice.on_detach

    def forgetful(self: Any) -> None:
        original_detach(self)
        self.regs.reset()

    monkeypatch.setattr(tutorial.CounterDevice, "on_detach", forgetful)
    await expect_check_failure(tutorial, tmp_path)


# -- the architecture notes --------------------------------------------------------------------

_PATH = re.compile(r"\b((?:protocol|devices|emulator|tests|docs)/[\w./-]*\w)")
_DOTTED = re.compile(r"`((?:protocol|devices|emulator)(?:\.\w+)+)")


def test_architecture_paths_exist() -> None:
    paths = set(_PATH.findall(ARCHITECTURE.read_text()))
    assert len(paths) >= 8, paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and walk the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            target = getattr(target, attr)
        return target
    raise ModuleNotFoundError(dotted)


def test_architecture_names_resolve() -> None:
    names = set(_DOTTED.findall(ARCHITECTURE.read_text()))
    assert names
    broken = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            broken.append(f"{name}: {exc}")
    assert not broken, broken
