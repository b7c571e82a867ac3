"""The QEMU command line that attaches a guest to our sockets (emulator/client/qemu_args.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from emulator.client.qemu_args import guest_hint, qemu_args


def test_qemu_args() -> None:
    args = qemu_args(["/run/a.sock", "/run/b.sock"], "1G")
    assert "memory-backend-memfd,id=mem,size=1G,share=on" in args
    devices = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-device"]
    assert [d["socket"] for d in devices] == [
        {"type": "unix", "path": "/run/a.sock"},
        {"type": "unix", "path": "/run/b.sock"},
    ]
    assert all(d["driver"] == "vfio-user-pci" for d in devices)


def test_guest_hint_names_what_the_cache_holds(tmp_path: Path) -> None:
    empty = guest_hint(["/run/a.sock"], cache=tmp_path)
    assert "-kernel KERNEL -initrd INITRD" in empty[1]
    assert "scripts/qemu/build-guest" in empty[2] and "make vm" in empty[-1]
    binary = tmp_path / "qemu" / "install" / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    (tmp_path / "guest").mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        (tmp_path / "guest" / name).write_text("")
    built = guest_hint(["/run/a.sock"], cache=tmp_path)
    words = shlex.split(built[1])
    assert words[0] == str(binary)
    assert words[words.index("-kernel") + 1] == str(tmp_path / "guest" / "vmlinuz")
    assert words[words.index("-initrd") + 1] == str(tmp_path / "guest" / "initramfs.cpio.gz")
    assert "run-vm --interactive --socket /run/a.sock" in built[-1]
