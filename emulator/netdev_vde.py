"""The ``vde`` netdev: a port on a VDE switch (``vde_switch`` of Debian's ``vde2``).

``--netdev vde,id=ID,sock=DIR[,port=N][,mode=OCTAL][,reconnect=SECONDS]``: DIR is the
switch's directory (``vde_switch -s DIR``), as QEMU's ``-netdev vde,sock=DIR`` names it.
A switch is a segment many processes can join and leave: a migrating NIC's source and
destination emulators both plug into it, and the switch learns from the frames a port sends
which MAC is behind it (hence the announcement a NIC sends after a migration).

The plug protocol (vde2's datasock module, request version 3, as libvdeplug speaks it;
every number in host byte order):

1. Connect a stream socket to ``DIR/ctl``: the control connection. It stays open while
   the port exists; closing it frees the port.
2. Bind a datagram socket of our own (``DIR/.emu-PID-N``: the switch sends our
   frames there) and send one request: u32 magic ``0xfeedface``, u32 version 3, u32 type
   (0, "new control", plus the port asked for shifted left by 8; port 0: any free port),
   a ``struct sockaddr_un`` (u16 family, 108-byte path) naming our socket, then a
   NUL-terminated description the switch shows in ``port/print``.
3. The switch checks it may read and write our socket, connects to it, binds its own
   ``DIR/NNN.FD`` (NNN: the port) and answers with that ``sockaddr_un`` (110 bytes). We
   connect our datagram socket to it; from then on one Ethernet frame per datagram, both
   ways. A switch that cannot give the port (taken, none free, our socket unusable) closes
   the control connection instead of answering.

Behaviour beyond the common :class:`emulator.netdev.NetBackend` rules: the first plug-in
happens in :meth:`~emulator.netdev.NetBackend.open`, so a missing or refusing switch is an
error at start-up (as in QEMU). When the switch goes away later (the control connection
ends) the link is down (frames dropped, counted) and the backend plugs in again every
``reconnect`` seconds (default 1) until a switch answers at DIR again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from emulator.netdev import (
    _BUILDERS,
    BACKEND_TYPES,
    DEFAULT_RECONNECT,
    NETDEV_OPTIONS,
    SEND_BUFFER,
    NetBackend,
    NetdevError,
    _check_unix_path,
    _close_quietly,
    _inode,
    _oserror_text,
    _parse_seconds,
    _unlink_if_ours,
)

log = logging.getLogger("vfio_user_emu")

SWITCH_MAGIC = 0xFEEDFACE
REQUEST_VERSION = 3
REQ_NEW_CONTROL = 0
#: The highest port number a request can name (vde_switch's default has 32 ports).
MAX_PORT = 0xFFFF
SUN_PATH_SIZE = 108
_REQUEST_HEAD = struct.Struct("=IIIH")  # magic, version, type, sockaddr_un.sun_family
SOCKADDR_UN_SIZE = 2 + SUN_PATH_SIZE
#: How long the switch may take to answer a plug request.
HANDSHAKE_TIMEOUT = 5.0
DEFAULT_MODE = 0o600
#: Room for our socket's name, ``/.emu-PID-N``, behind DIR in a socket path.
_DATA_NAME_ROOM = 20

_data_socket_numbers = itertools.count()


@dataclass(slots=True)
class _Plug:
    """One port on the switch: the control connection and our datagram socket."""

    ctl: socket.socket
    data: socket.socket
    local: Path
    local_inode: tuple[int, int] | None
    port: int = 0


def encode_request(local: str, port: int, description: str) -> bytes:
    """The plug request (version 3) for our datagram socket ``local``."""
    path = os.fsencode(local)
    if len(path) >= SUN_PATH_SIZE:
        raise ValueError(f"{local}: longer than a UNIX socket path may be")
    head = _REQUEST_HEAD.pack(
        SWITCH_MAGIC, REQUEST_VERSION, REQ_NEW_CONTROL | (port << 8), socket.AF_UNIX
    )
    text = description.encode("utf-8", "replace")[:127]
    return head + path.ljust(SUN_PATH_SIZE, b"\0") + text + b"\0"


def decode_reply(reply: bytes) -> str:
    """The switch's socket path from its answer (a ``struct sockaddr_un``); ValueError if
    it is not one."""
    if len(reply) != SOCKADDR_UN_SIZE:
        raise ValueError(f"{len(reply)} bytes instead of {SOCKADDR_UN_SIZE}")
    (family,) = struct.unpack_from("=H", reply)
    if family != socket.AF_UNIX:
        raise ValueError(f"address family {family} is not AF_UNIX")
    path = reply[2:].split(b"\0", 1)[0]
    if not path:
        raise ValueError("an empty socket path")
    return os.fsdecode(path)


def port_of(switch_socket: str) -> int:
    """The port number in the switch's ``DIR/NNN.FD`` (0 if the name has another form)."""
    head = Path(switch_socket).name.partition(".")[0]
    return int(head) if head.isdigit() else 0


class VdeBackend(NetBackend):
    """A port on a VDE switch: frames as UNIX datagrams to and from the switch."""

    kind = "vde"

    def __init__(
        self,
        netdev_id: str,
        *,
        sock: str | os.PathLike[str],
        port: int = 0,
        mode: int = DEFAULT_MODE,
        reconnect: float = DEFAULT_RECONNECT,
        **common: Any,
    ) -> None:
        super().__init__(netdev_id, **common)
        self.switch_dir = _check_unix_path(netdev_id, "sock", os.fspath(sock))
        if len(os.fsencode(os.path.abspath(self.switch_dir))) + _DATA_NAME_ROOM > 107:
            raise NetdevError(
                f"netdev {netdev_id}: sock={sock} is too long for the socket paths inside it "
                f"(at most {107 - _DATA_NAME_ROOM} bytes)"
            )
        if not 0 <= port <= MAX_PORT:
            raise NetdevError(f"netdev {netdev_id}: port={port} is not from 0 to {MAX_PORT}")
        if not 0 <= mode <= 0o777:
            raise NetdevError(f"netdev {netdev_id}: mode={mode:o} is not a permission mode")
        if not reconnect > 0:
            raise NetdevError(f"netdev {netdev_id}: reconnect must be a positive number")
        self.requested_port = port
        self.mode = mode
        self.reconnect = reconnect
        self._plug: _Plug | None = None

    @property
    def port(self) -> int:
        """The switch port we are plugged into (0 while unplugged)."""
        return self._plug.port if self._plug is not None else 0

    def _describe(self) -> str:
        where = f"port {self.port}" if self._plug is not None else "unplugged"
        return f"switch {self.switch_dir}, {where}"

    # -- plugging in ----------------------------------------------------------------------

    def _open(self) -> None:
        plug = self._begin_plug()
        try:
            plug.ctl.settimeout(HANDSHAKE_TIMEOUT)
            try:
                reply = _recv_reply(plug.ctl.recv)
            except TimeoutError:
                raise NetdevError(self._no_answer()) from None
            self._complete_plug(plug, reply)
        except BaseException:
            self._unplug(plug)
            raise

    def _begin_plug(self) -> _Plug:
        """Connect the control socket, bind ours and send the request."""
        ctl_path = self.switch_dir / "ctl"
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            ctl.connect(str(ctl_path))
        except OSError as exc:
            ctl.close()
            raise NetdevError(
                f"netdev {self.netdev_id}: no vde switch at {self.switch_dir} "
                f"({ctl_path}: {_oserror_text(exc)}; start one with vde_switch -s "
                f"{self.switch_dir})"
            ) from None
        try:
            data, local = self._bind_data_socket()
        except BaseException:
            ctl.close()
            raise
        plug = _Plug(ctl=ctl, data=data, local=local, local_inode=_inode(local))
        description = f"vfio-user-emu netdev {self.netdev_id} PID={os.getpid()} SOCK={local}"
        try:
            ctl.sendall(encode_request(str(local), self.requested_port, description))
        except OSError as exc:
            self._unplug(plug)
            raise NetdevError(
                f"netdev {self.netdev_id}: the vde switch at {self.switch_dir} hung up: "
                f"{_oserror_text(exc)}"
            ) from None
        return plug

    def _bind_data_socket(self) -> tuple[socket.socket, Path]:
        data = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(OSError):
            data.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        directory = self.switch_dir.absolute()
        while True:
            local = directory / f".emu-{os.getpid()}-{next(_data_socket_numbers)}"
            try:
                data.bind(str(local))
            except FileExistsError:
                continue  # left by an earlier process with our PID
            except OSError as exc:
                data.close()
                raise NetdevError(
                    f"netdev {self.netdev_id}: cannot create our socket in {directory}: "
                    f"{_oserror_text(exc)}"
                ) from None
            break
        os.chmod(local, self.mode)
        return data, local

    def _no_answer(self) -> str:
        # vde_switch 2.3.2 neither answers nor hangs up when it cannot give the port.
        wanted = f"port {self.requested_port}" if self.requested_port else "any port"
        return (
            f"netdev {self.netdev_id}: the vde switch at {self.switch_dir} did not answer "
            f"within {HANDSHAKE_TIMEOUT:g}s (it cannot give {wanted}: beyond its number of "
            "ports, or none free?)"
        )

    def _complete_plug(self, plug: _Plug, reply: bytes) -> None:
        """Connect to the switch's socket named in ``reply`` (empty: refused)."""
        if not reply:
            wanted = f"port {self.requested_port}" if self.requested_port else "a port"
            raise NetdevError(
                f"netdev {self.netdev_id}: the vde switch at {self.switch_dir} refused "
                f"{wanted} (no such port, none free, or it may not use {plug.local}: "
                f"mode={self.mode:o})"
            )
        try:
            switch_socket = decode_reply(reply)
        except ValueError as exc:
            raise NetdevError(
                f"netdev {self.netdev_id}: {self.switch_dir} answered with {exc}, not a "
                "vde switch's socket"
            ) from None
        try:
            plug.data.connect(switch_socket)
        except OSError as exc:
            raise NetdevError(
                f"netdev {self.netdev_id}: cannot reach the switch's socket {switch_socket}: "
                f"{_oserror_text(exc)}"
            ) from None
        plug.ctl.setblocking(False)
        plug.data.setblocking(False)
        plug.port = port_of(switch_socket)
        self._plug = plug
        self._link_up = True
        log.info(
            "netdev %s: port %d of the vde switch at %s", self.netdev_id, plug.port, self.switch_dir
        )

    async def _replug(self) -> None:
        """Plug in again until a switch at our directory answers."""
        warned = False
        while True:
            try:
                plug = self._begin_plug()
                try:
                    plug.ctl.setblocking(False)
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        reply = await _recv_reply_async(plug.ctl)
                    self._complete_plug(plug, reply)
                    return
                except BaseException:
                    self._unplug(plug)
                    raise
            except (NetdevError, trio.TooSlowError) as exc:
                if not warned:
                    warned = True
                    log.warning(
                        "netdev %s: %s; trying again every %gs",
                        self.netdev_id,
                        exc if isinstance(exc, NetdevError) else self._no_answer(),
                        self.reconnect,
                    )
            await trio.sleep(self.reconnect)

    def _unplug(self, plug: _Plug) -> None:
        if self._plug is plug:
            self._plug = None
            self._link_up = False
            self._drop_queued_tx()
        for sock in (plug.ctl, plug.data):
            if sock.fileno() != -1:
                _close_quietly(sock)
        _unlink_if_ours(plug.local, plug.local_inode)

    def _close(self) -> None:
        if self._plug is not None:
            self._unplug(self._plug)

    # -- running --------------------------------------------------------------------------

    def _start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._port_loop)

    async def _port_loop(self) -> None:
        while True:
            plug = self._plug
            if plug is None:
                await self._replug()
                continue
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._rx_loop, plug.data)
                await _wait_hung_up(plug.ctl)
                nursery.cancel_scope.cancel()
            if self._plug is plug:
                log.warning(
                    "netdev %s: the vde switch at %s went away", self.netdev_id, self.switch_dir
                )
            self._unplug(plug)

    async def _rx_loop(self, data: socket.socket) -> None:
        await self._packet_rx_loop(data.recv_into, data, "receive")

    def _send(self, frame: bytes) -> bool:
        plug = self._plug
        if plug is None:
            raise OSError(107, "not plugged into the switch")  # ENOTCONN
        try:
            plug.data.send(frame)
        except BlockingIOError:
            return False
        return True

    def _tx_fd(self) -> socket.socket | None:
        return self._plug.data if self._plug is not None else None

    def _bring_link_up(self) -> bool:
        return self._plug is not None

    def _link_lost(self, exc: OSError) -> None:
        # The switch's port socket is gone: the switch died or dropped the port. Hang up,
        # so that the port loop plugs in again.
        super()._link_lost(exc)
        if self._plug is not None:
            _close_quietly(self._plug.ctl)


def _recv_reply(recv: Callable[[int], bytes]) -> bytes:
    """Read the switch's answer: the whole ``sockaddr_un``, or b"" if it hung up."""
    reply = b""
    while len(reply) < SOCKADDR_UN_SIZE:
        chunk = recv(SOCKADDR_UN_SIZE - len(reply))
        if not chunk:
            return b""
        reply += chunk
    return reply


async def _recv_reply_async(ctl: socket.socket) -> bytes:
    reply = b""
    while len(reply) < SOCKADDR_UN_SIZE:
        try:
            chunk = ctl.recv(SOCKADDR_UN_SIZE - len(reply))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(ctl)
            continue
        except OSError:
            return b""
        if not chunk:
            return b""
        reply += chunk
    return reply


async def _wait_hung_up(ctl: socket.socket) -> None:
    """Until the switch closes the control connection (or we close it)."""
    while True:
        try:
            await trio.lowlevel.wait_readable(ctl)
            if not ctl.recv(4096):
                return
        except BlockingIOError:
            continue
        except (OSError, trio.ClosedResourceError):
            return


# -- spec ----------------------------------------------------------------------------------

VDE_OPTIONS = {
    "sock": "directory of the vde_switch (vde_switch -s DIR)",
    "port": "switch port to ask for (default 0: any free port)",
    "mode": f"permissions of our socket the switch writes to (octal, default {DEFAULT_MODE:o})",
    "reconnect": f"seconds between attempts after the switch went away (default "
    f"{DEFAULT_RECONNECT:g})",
}


def build_vde(netdev_id: str, options: dict[str, str], common: dict[str, Any]) -> NetBackend:
    """``--netdev vde,...`` (the generic parser has checked the option names)."""
    sock = options.pop("sock", "")
    if not sock:
        raise NetdevError(f"netdev {netdev_id}: vde needs sock=DIR (the vde_switch directory)")
    settings: dict[str, Any] = {}
    if "port" in options:
        text = options.pop("port")
        if not text.isdigit() or int(text) > MAX_PORT:
            raise NetdevError(f"netdev {netdev_id}: port={text!r} is not from 0 to {MAX_PORT}")
        settings["port"] = int(text)
    if "mode" in options:
        text = options.pop("mode")
        try:
            settings["mode"] = int(text, 8)
        except ValueError:
            settings["mode"] = -1
        if not 0 <= settings["mode"] <= 0o777:
            raise NetdevError(f"netdev {netdev_id}: mode={text!r} is not an octal mode")
    if "reconnect" in options:
        settings["reconnect"] = _parse_seconds(netdev_id, "reconnect", options.pop("reconnect"))
    return VdeBackend(netdev_id, sock=sock, **settings, **common)


BACKEND_TYPES["vde"] = VdeBackend
NETDEV_OPTIONS["vde"] = VDE_OPTIONS
_BUILDERS["vde"] = build_vde
