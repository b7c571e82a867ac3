"""What every ``vfio-user-emu`` subcommand shares: help formatting, option types, the
diagnosis of a socket that cannot be reached, and clean exits on signals and closed pipes.

Kept apart from :mod:`emulator.cli` because the benchmark and soak modules build their own
subparsers with it (and :mod:`emulator.cli` imports them).
"""

from __future__ import annotations

import argparse
import enum
import errno
import os
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from devices.registry import DeviceSpecError, parse_size
from emulator.client import ClientError

E = TypeVar("E", bound=enum.Enum)

PROG = "vfio-user-emu"
#: Exit status of a command stopped by a signal, as a shell reports it (128 + signal).
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
#: Exit status after the reader of our output went away (128 + SIGPIPE, as `yes | head`).
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs as written, and every option's default in its help (unless the help text
    already names it, or there is none worth showing: a flag, or no default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def size_arg(text: str) -> int:
    """An argparse type: a byte count with an optional binary suffix (4096, 64K, 1M, 4G)."""
    try:
        return parse_size(text)
    except DeviceSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_size_arg(text: str) -> int:
    size = size_arg(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 byte")
    return size


def positive_int_arg(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the option in the message)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def enum_list_arg(kind: type[E], what: str) -> Callable[[str], list[E]]:
    """An argparse type: comma-separated values of ``kind``; an unknown one is named with the
    valid ones (``what`` says what they are, e.g. "fault kind")."""

    def parse(text: str) -> list[E]:
        values = []
        for name in (part.strip() for part in text.split(",")):
            try:
                values.append(kind(name))
            except ValueError:
                valid = ", ".join(str(member.value) for member in kind)
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {name!r} (valid: {valid})"
                ) from None
        return values

    return parse


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """``-v`` on a subcommand too (``vfio-user-emu info -v ...``). SUPPRESS keeps the
    subcommand from resetting what the top-level ``-v`` set."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log connections"
    )


def error(command: str, message: str) -> None:
    """One line on stderr, named after the program and the subcommand."""
    print(f"{PROG}: {command}: {message}", file=sys.stderr)


# -- why a socket cannot be used ---------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a socket"


def socket_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a server's socket, by looking at it (None: it may be one)."""
    where = Path(path)
    try:
        mode = where.stat().st_mode
    except FileNotFoundError:
        if not where.parent.is_dir():
            return f"{where}: the directory {where.parent} does not exist"
        return (
            f"{where} does not exist: no server there "
            f"(start one with `{PROG} serve --socket-path {where}`)"
        )
    except OSError as exc:
        return f"{where}: {exc.strerror}"
    if not stat.S_ISSOCK(mode):
        return f"{where} is {_kind(mode)}, not a vfio-user socket"
    return None


def connect_failure(path: str | os.PathLike[str], exc: BaseException) -> str:
    """What a failed connection to ``path`` means for a user, and what to do next."""
    problem = socket_problem(path)
    if problem is not None:
        return problem
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"{path}: no server listens on this socket any more (a stale socket); "
            f"start one with `{PROG} serve --socket-path {path}`"
        )
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied (the socket is mode 0600: run as its owner or root)"
    if isinstance(exc, ClientError) and exc.errno == errno.EBUSY:
        return (
            f"{path} is busy: its server already serves another client (QEMU or another "
            f"{PROG} command) and takes one at a time; detach that client first"
        )
    return f"{path}: {exc}"


# -- exits ------------------------------------------------------------------------------------


def quiet_broken_pipe() -> int:
    """Our reader went away (``... | head``): stop writing, without a traceback. stdout is
    pointed at /dev/null so that the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_EXIT


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def interrupted(command: str, signum: int, detail: str = "") -> int:
    """One line for a command stopped by a signal; the shell's exit status for it."""
    error(command, f"interrupted by {signal_name(signum)}" + (f"; {detail}" if detail else ""))
    return SIGNAL_EXIT.get(signal.Signals(signum), 128 + signum)
