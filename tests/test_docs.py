"""The documentation is executable: the tutorial runs, the architecture notes name real code,
and the README and the reference pages link, name paths and show commands that exist.

``docs/writing-a-device.md`` is a tutorial whose ```python blocks, concatenated in order,
form one module. Its final ``check_counter`` coroutine serves the tutorial's device and
drives it with the client; running it here proves the tutorial works. The module is
compiled with the markdown's own line numbers, so a traceback points into the document.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
import tomllib
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.irq import InterruptController
from emulator.cli import build_parser
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


# -- the README and the reference pages ----------------------------------------------------------

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_SHELL = re.compile(r"^```sh[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    outside_code = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {anchor(h) for h in re.findall(r"^#+ (.*)$", outside_code, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (fragment and fragment not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_paths_exist(page: Path) -> None:
    named = set(
        re.findall(
            r"(?<![\w/.])((?:protocol|devices|emulator|tests|docs|scripts)/[\w./-]*\w)",
            page.read_text(),
        )
    )
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def shell_commands(text: str) -> Iterator[str]:
    """Every command line of the ```sh blocks (continuations joined, comments cut), and the
    ExecStart= lines of systemd units."""
    for block in _SHELL.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            yield line.split(" #", 1)[0].strip()
    yield from re.findall(r"^ExecStart=(.*)$", text, re.M)


def emulator_commands(text: str) -> Iterator[list[str]]:
    """The arguments of every ``vfio-user-emu`` / ``python -m emulator`` command shown
    (placeholders such as ``...`` left out)."""
    for line in shell_commands(text):
        words = shlex.split(line.rstrip("&").strip().replace("${DEVICE}", "testdev"))
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value command
            words = words[1:]
        if "..." in words or not words:
            continue
        if words[0].endswith("vfio-user-emu"):
            yield words[1:]
        elif words[0].endswith("python") and words[1:3] == ["-m", "emulator"]:
            yield words[3:]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_shown_are_accepted(page: Path) -> None:
    """A command line a page shows parses with today's options (argparse exits on errors)."""
    parser = build_parser()
    for argv in emulator_commands(page.read_text()):
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{page.name}: `vfio-user-emu {shlex.join(argv)}` is refused ({exc})")


def test_commands_are_found() -> None:
    shown = [argv[0] for argv in emulator_commands(README.read_text())]
    assert {"serve", "info", "qemu-args", "migrate", "soak"} <= set(shown)


def _block_after(text: str, heading: str) -> list[str]:
    section = text[text.index(heading) :]
    return [line for line in shell_commands(section[: section.index("\n```\n") + 5]) if line]


def test_quick_start_is_three_commands_and_set_up_two() -> None:
    text = README.read_text()
    assert text.index("## Quick start") < text.index("## Set up") < text.index("## Devices")
    quick = _block_after(text, "## Quick start")
    assert len(quick) == 3 and quick[0].startswith("git clone")
    assert quick[1:] == ["make run", "make vm"]
    assert _block_after(text, "## Set up") == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^vm:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert (
        recipe is not None and "scripts/qemu/run-vm --interactive --socket $(SOCKET)" in recipe[1]
    )
    assert re.search(r"^SOCKET \?= \./vfio-user\.sock$", makefile, re.M)


def test_python_requirement_and_license_match_the_package() -> None:
    text = README.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimum = project["requires-python"].removeprefix(">=")
    assert f"Python {minimum} or later" in text
    assert project["license"] == "MIT"
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n") and "vfio-user-emu contributors" in license_text


def test_systemd_units_start_the_server_on_the_socket_systemd_passes() -> None:
    text = (ROOT / "docs" / "systemd.md").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    argv = next(emulator_commands(f"ExecStart={exec_start}\n"))
    args = build_parser().parse_args(argv)
    assert args.command == "serve" and args.fd == 3  # SD_LISTEN_FDS_START
    assert re.search(r"^ListenStream=/run/vfio-user/%i\.sock$", text, re.M)
    assert "vfio-user-emu@.socket" in text and "vfio-user-emu@.service" in text


@pytest.mark.parametrize("page", [p for p in PAGES if p != TUTORIAL], ids=lambda p: p.name)
def test_python_examples_compile(page: Path) -> None:
    """Each block on its own (the tutorial's blocks form one module: run above)."""
    for first, source in python_blocks(page.read_text()):
        compile("\n" * (first - 1) + source, str(page), "exec")
