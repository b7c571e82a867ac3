"""QEMU's QMP monitor through the QEMU project's own library, ``qemu.qmp`` (its synchronous
``legacy`` interface; a dependency of the ``test`` extra), for the real-QEMU tests and
``vfio-user-emu soak --qemu``."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError


def connect_qmp(path: Path, timeout: float = 60) -> QEMUMonitorProtocol:
    """QEMU's QMP monitor at ``path`` (``-qmp unix:PATH,server=on,wait=off``); waits for
    QEMU to create the socket."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU made no QMP socket at {path}")
        time.sleep(0.05)
    while True:
        qmp = QEMUMonitorProtocol(str(path))
        try:
            qmp.connect()
        except ConnectError as exc:
            # QEMU binds the socket before it listens: on a loaded machine a connect can
            # fall between the two (ECONNREFUSED). Anything else, or past the deadline, is
            # a QEMU that will not answer.
            refused = isinstance(exc.exc, ConnectionRefusedError)
            if not refused or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        qmp.settimeout(timeout)
        return qmp


def close_qmp(qmp: QEMUMonitorProtocol) -> None:
    """Close the monitor connection (QEMU may have closed it already, e.g. after ``quit``)."""
    with contextlib.suppress(EOFError, OSError):
        qmp.close()
