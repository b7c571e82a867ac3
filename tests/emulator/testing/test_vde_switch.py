"""The vde_switch child process helper (emulator.testing.vde_switch), with the real switch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from emulator.netdev_vde import VdeBackend
from emulator.testing.vde_switch import VdeSwitch, VdeSwitchError

StartSwitch = Callable[..., VdeSwitch]


def test_start_command_and_stop(vde_switches: StartSwitch) -> None:
    switch = vde_switches()
    assert switch.running() and (switch.directory / "ctl").exists()
    assert switch.mac_table() == {}
    assert "ctl dir" in switch.command("ds/showinfo")
    # a MAC moves to a new port at its first frame there (a migrated NIC's announcement)
    assert "Min persistence -1 secs" in switch.command("hash/showinfo")
    with pytest.raises(VdeSwitchError, match=r"no/such/command: 1\d{3} "):
        switch.command("no/such/command")
    switch.stop()
    assert not switch.running()
    assert switch.proc is not None and switch.proc.returncode == 0  # closed console: clean exit
    assert "EOF on stdin" in switch.log_text()


def test_port_listing_names_our_backend(vde_switches: StartSwitch) -> None:
    switch = vde_switches(hub=True)
    backend = VdeBackend("n7", sock=switch.directory)
    backend.open()
    try:
        assert "vfio-user-emu netdev n7" in switch.command("port/allprint")
    finally:
        backend.close()


def test_a_switch_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(VdeSwitchError, match="missing-parent is not a directory"):
        VdeSwitch(tmp_path / "missing-parent" / "sw").start()
    (tmp_path / "file").write_text("")
    switch = VdeSwitch(tmp_path / "file")  # vde_switch itself fails: no ctl in a file
    with pytest.raises(VdeSwitchError, match=r"did not start at .*file: .*vde_switch"):
        switch.start(timeout=5)
    assert not switch.running()


def test_no_binary_is_a_clear_error(tmp_path: Path) -> None:
    switch = VdeSwitch(tmp_path / "sw")
    switch.binary = None
    with pytest.raises(VdeSwitchError, match="apt-get install vde2"):
        switch.start()
