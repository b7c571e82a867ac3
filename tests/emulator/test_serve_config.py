"""``serve --config FILE.toml``: many devices in one process, each on its own socket."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from devices.testdev import REG_SCRATCH
from emulator import cli
from emulator.client import Client
from emulator.serve_config import (
    ConfigError,
    ServeConfig,
    build_servers,
    load_config,
    serve_all,
)

DEFAULTS = ServeConfig(devices=())
U32 = struct.Struct("<I")


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "devices.toml"
    path.write_text(text)
    return path


def device_table(socket: Path, spec: str = "testdev", extra: str = "") -> str:
    return f'[[device]]\nsocket = "{socket}"\ndevice = "{spec}"\n{extra}\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('bogus = 1\n[[device]]\nsocket = "a.sock"\n', "unknown key(s) bogus"),
        ('[[device]]\nsocket = "a.sock"\ncolour = "red"\n', "device #1: unknown key(s) colour"),
        ("[[device]]\nsocket = 5\n", "device #1: socket must be str, not int"),
        ("max_dma_maps = true\n[[device]]\nsocket = 'a'\n", "max_dma_maps must be int"),
        ("[[device]]\ndevice = 'testdev'\n", "device #1: socket = PATH is required"),
        ("trace = false\n", "no [[device]] tables"),
        ("[[device]\nsocket = 'a'\n", "not valid TOML"),
        ("dma_layout = 'fast'\n[[device]]\nsocket = 'a'\n", "dma_layout must be one of"),
        ("netdevs = [1]\n[[device]]\nsocket = 'a'\n", "netdevs must be a list of strings"),
        (
            '[[device]]\nsocket = "a.sock"\n[[device]]\nsocket = "./a.sock"\n',
            "device #2: socket a.sock is also device #1's",
        ),
        (
            "[[device]]\nsocket='a'\nname='x'\n[[device]]\nsocket='b'\nname='x'\n",
            "device #2: name 'x' is also device #1's",
        ),
    ],
)
def test_bad_config_files_are_refused_with_a_message(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, text)
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.sock").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "testdev,colour=red",
            "device #2 (",
        ),
        ("e1000,mac=zz", "e1000"),
        ("nosuchdevice", "unknown device type"),
        ("e1000,netdev=n9", "no --netdev ...,id=n9"),
    ],
)
def test_bad_device_options_name_the_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, message: str
) -> None:
    text = device_table(tmp_path / "ok.sock") + device_table(tmp_path / "bad.sock", spec)
    path = write_config(tmp_path, text)
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "ok.sock").exists()  # nothing created when anything is wrong


def test_config_replaces_device_and_netdev_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, device_table(tmp_path / "a.sock"))
    assert cli.main(["serve", "--config", str(path), "--device", "e1000"]) == 2
    assert "--config replaces --device" in capsys.readouterr().err


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "none.toml")


def test_file_values_override_command_line_defaults(tmp_path: Path) -> None:
    text = "max_dma_maps = 7\n" + device_table(tmp_path / "a.sock", extra="trace = true")
    config = load_config(write_config(tmp_path, text), ServeConfig((), max_data_xfer_size=8192))
    assert (config.max_dma_maps, config.max_data_xfer_size) == (7, 8192)
    servers, _ = build_servers(config)
    assert servers[0].tracer.enabled
    assert servers[0].capabilities.max_dma_maps == 7


async def test_many_devices_in_one_process_are_independent(tmp_path: Path) -> None:
    sockets = [tmp_path / f"dev{i}.sock" for i in range(4)]
    text = "".join(device_table(s) for s in sockets[:3]) + device_table(sockets[3], "e1000")
    servers, _ = build_servers(load_config(write_config(tmp_path, text), DEFAULTS))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_all, servers)
        assert all(s.exists() for s in sockets)

        async def use(index: int, results: dict[int, bytes]) -> None:
            async with Client.connect(sockets[index]) as client:
                if index < 3:
                    await client.region_write(0, REG_SCRATCH, U32.pack(0x1000 + index))
                    results[index] = await client.region_read(0, REG_SCRATCH, 4)
                else:
                    results[index] = await client.region_read(7, 0, 4)  # vendor/device id

        results: dict[int, bytes] = {}
        async with trio.open_nursery() as clients:
            for index in range(4):
                clients.start_soon(use, index, results)
        assert [U32.unpack(results[i])[0] for i in range(3)] == [0x1000, 0x1001, 0x1002]
        assert U32.unpack(results[3])[0] == 0x100E8086  # Intel 82540EM
        assert [s.sessions_served for s in servers] == [1, 1, 1, 1]
        nursery.cancel_scope.cancel()
    assert not any(s.exists() for s in sockets)  # every socket removed at shutdown


async def test_netdevs_are_wired_to_their_device(tmp_path: Path) -> None:
    local, remote = tmp_path / "n0.local", tmp_path / "n0.remote"
    text = f'netdevs = ["dgram,id=n0,local={local},remote={remote}"]\n'
    text += device_table(tmp_path / "a.sock") + device_table(tmp_path / "b.sock", "e1000,netdev=n0")
    servers, netdevs = build_servers(load_config(write_config(tmp_path, text), DEFAULTS))
    try:
        assert len(netdevs) == 1
        assert id(netdevs[0].device) == id(servers[1].device)
        assert servers[1].netdevs == (netdevs[0],) and servers[0].netdevs == ()
    finally:
        for netdev in netdevs:
            netdev.close()


def test_serve_config_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    sockets = [tmp_path / "a.sock", tmp_path / "b.sock"]
    path = write_config(tmp_path, "".join(device_table(s) for s in sockets))
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not all(s.exists() for s in sockets):
            assert time.monotonic() < deadline and proc.poll() is None, "sockets never appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "serving testdev#1 on" in out and "serving testdev#2 on" in out
    assert not any(s.exists() for s in sockets)


def test_a_live_socket_in_the_config_is_refused(tmp_path: Path) -> None:
    import socket as _socket

    live = tmp_path / "live.sock"
    holder = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    holder.bind(str(live))
    holder.listen(1)
    try:
        path = write_config(tmp_path, device_table(tmp_path / "a.sock") + device_table(live))
        result = subprocess.run(
            [sys.executable, "-m", "emulator", "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert "a server is listening on it" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "a.sock").exists()  # the device started first is gone again
