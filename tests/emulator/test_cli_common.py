"""What every subcommand shares (emulator/cli_common.py): option types, what a socket that
cannot be used means for a user, and the exit status of a command stopped by a signal."""

from __future__ import annotations

import argparse
import enum
import errno
import signal
import socket
from pathlib import Path

import pytest

from emulator.cli_common import (
    connect_failure,
    enum_list_arg,
    interrupted,
    positive_int_arg,
    positive_size_arg,
    size_arg,
    socket_problem,
)
from emulator.client import ClientError
from protocol.constants import Command


@pytest.mark.parametrize(
    ("text", "value"), [("4096", 4096), ("64K", 64 << 10), ("1M", 1 << 20), ("4G", 4 << 30)]
)
def test_sizes_take_binary_suffixes(text: str, value: int) -> None:
    assert size_arg(text) == value


@pytest.mark.parametrize("text", ["1X", "", "-1M", "K"])
def test_a_bad_size_is_an_argparse_error_naming_it(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        size_arg(text)


def test_positive_types_refuse_zero() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1 byte"):
        positive_size_arg("0")
    with pytest.raises(argparse.ArgumentTypeError, match="must be at least 1, not 0"):
        positive_int_arg("0")
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not a whole number"):
        positive_int_arg("x")
    assert positive_int_arg("0x10") == 16


def test_socket_problem_says_what_is_at_the_path(tmp_path: Path) -> None:
    missing_dir = tmp_path / "nowhere" / "x.sock"
    assert socket_problem(missing_dir) == (
        f"{missing_dir}: the directory {missing_dir.parent} does not exist"
    )
    missing = tmp_path / "x.sock"
    problem = socket_problem(missing)
    assert problem is not None and "does not exist: no server there" in problem
    regular = tmp_path / "file"
    regular.write_text("")
    assert socket_problem(regular) == f"{regular} is a regular file, not a vfio-user socket"
    assert socket_problem(tmp_path) == f"{tmp_path} is a directory, not a vfio-user socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(missing))
        assert socket_problem(missing) is None


def test_connect_failure_explains_refused_denied_and_busy(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(path))  # a socket file nobody listens on: a stale socket
        assert "a stale socket" in connect_failure(path, ConnectionRefusedError())
        assert "permission denied" in connect_failure(path, PermissionError())
        busy = ClientError(errno.EBUSY, Command.VERSION)
        assert "takes one at a time" in connect_failure(path, busy)
        assert connect_failure(path, OSError("odd")) == f"{path}: odd"
    path.unlink()  # closing a socket leaves its file: the server's job on exit
    assert "does not exist" in connect_failure(path, ConnectionRefusedError())


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_interrupted_prints_one_line_and_returns_the_shells_status(
    capsys: pytest.CaptureFixture[str], signum: int, status: int
) -> None:
    assert interrupted("bench", signum, "nothing measured") == status
    line = capsys.readouterr().err
    assert line.count("\n") == 1
    assert f"bench: interrupted by {signal.Signals(signum).name}; nothing measured" in line


def test_enum_list_arg_parses_a_list_and_names_the_valid_values() -> None:
    class Colour(enum.Enum):
        RED = "red"
        BLUE = "blue"

    parse = enum_list_arg(Colour, "colour")
    assert parse("red, blue,red") == [Colour.RED, Colour.BLUE, Colour.RED]
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse("red,green")
    assert str(refused.value) == "unknown colour 'green' (valid: red, blue)"
