"""The QEMU command line that attaches a guest to one of our sockets."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from devices.registry import DeviceSpecError, parse_size

MIB = 1 << 20


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


def memory_arg(text: str) -> str:
    """An argparse type for guest RAM: a whole number of MiB, as QEMU's ``-m`` takes it
    (``512M``, ``2G``, ``1073741824``), given back as ``<n>M`` so that ``-m`` (MiB
    without a suffix) and the memory backend's ``size=`` (bytes) agree."""
    try:
        size = parse_size(text)
    except DeviceSpecError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; guest RAM is e.g. 512M or 2G") from None
    if size < MIB or size % MIB:
        raise argparse.ArgumentTypeError(f"{text!r}: guest RAM is a whole number of MiB, e.g. 512M")
    return f"{size // MIB}M"


def cache_dir() -> Path:
    """Where scripts/qemu/build-qemu and build-guest put QEMU and the test guest."""
    if os.environ.get("VFIO_USER_EMU_CACHE"):
        return Path(os.environ["VFIO_USER_EMU_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "vfio-user-emu"


def guest_hint(socket_paths: list[str], cache: Path | None = None) -> list[str]:
    """Lines saying how to attach a guest: the QEMU command line, with the QEMU binary,
    kernel and initrd that scripts/qemu/build-qemu and build-guest left in the cache when
    they exist (that guest lists its PCI devices and powers off), else placeholders and
    where to get them; and the interactive way, ``make vm``."""
    cache = cache_dir() if cache is None else cache
    built_qemu = cache / "qemu" / "install" / "bin" / "qemu-system-x86_64"
    kernel, initrd = cache / "guest" / "vmlinuz", cache / "guest" / "initramfs.cpio.gz"
    binary = str(built_qemu) if built_qemu.is_file() else "qemu-system-x86_64"
    line = qemu_command_line(socket_paths, binary=binary)
    lines = ["attach a guest with (QEMU 10.1.1 or later):"]
    if kernel.is_file() and initrd.is_file():
        boot = shlex.join(
            ["-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0"]
        )
        lines.append(f"  {line} {boot}")
    else:
        lines.append(f"  {line} -kernel KERNEL -initrd INITRD -append console=ttyS0")
        lines.append(
            f"  (no test guest in {cache} yet: scripts/qemu/build-guest makes one, "
            "scripts/qemu/build-qemu builds QEMU)"
        )
    sockets = " ".join(f"--socket {shlex.quote(path)}" for path in socket_paths)
    lines.append(
        "or boot the test guest with a shell (builds QEMU and the guest the first time): "
        f"make vm, or scripts/qemu/run-vm --interactive {sockets}"
    )
    return lines
