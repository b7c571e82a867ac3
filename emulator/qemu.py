"""The QEMU command line that attaches a guest to one of our sockets."""

from __future__ import annotations

import json
import os
import shlex


def device_json(socket_path: str, device_id: str = "vfu0") -> str:
    """QEMU 10.2 only takes the JSON form; ``socket=PATH`` is rejected ("expected: object")."""
    spec = {
        "driver": "vfio-user-pci",
        "id": device_id,
        "socket": {"type": "unix", "path": os.path.abspath(socket_path)},
    }
    return json.dumps(spec, separators=(",", ":"))


def qemu_args(socket_paths: list[str], memory: str = "512M") -> list[str]:
    """Arguments for qemu-system-x86_64: memfd guest RAM shared with the server (share=on)
    so DMA goes through mmap, not messages; -nodefaults avoids SeaBIOS's CD-ROM wait."""
    args = [
        "-machine",
        "q35,memory-backend=mem",
        "-object",
        f"memory-backend-memfd,id=mem,size={memory},share=on",
        "-m",
        memory,
        "-nodefaults",
    ]
    for i, path in enumerate(socket_paths):
        args += ["-device", device_json(path, f"vfu{i}")]
    return args


def qemu_command_line(
    socket_paths: list[str], memory: str = "512M", binary: str = "qemu-system-x86_64"
) -> str:
    extra = ["-accel", "tcg", "-cpu", "max", "-nographic", "-serial", "mon:stdio"]
    return shlex.join([binary, *qemu_args(socket_paths, memory), *extra])
