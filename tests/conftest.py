"""Tests run on the C fast path when it is built (as the server does). Tests that switch
implementations get the installed one back afterwards, so one test cannot slow down (or
change) the rest."""

from collections.abc import Iterator

import pytest

from devices import stream_primitives
from emulator import fastpath

fastpath.install_best()


@pytest.fixture(autouse=True)
def _restore_stream_primitives() -> Iterator[None]:
    installed = stream_primitives.current()
    yield
    stream_primitives.install(installed)
