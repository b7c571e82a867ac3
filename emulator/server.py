"""Serving one device on a UNIX socket (the spec's backend-program conventions).

* The socket is created atomically: bound under a temporary name, chmod 0600, listening,
  then renamed to the final path, so a client that connects as soon as the path exists
  (libvfio-user's sample client does) always finds a listening socket.
* Or an inherited listening socket (``--fd N``, systemd socket activation) is used as is.
* One client at a time: a second connection is answered with EBUSY to its first message and
  closed, without disturbing the first.
* With ``Limits.allowed_uids`` (``--allow-uid``), a peer whose SO_PEERCRED uid is not listed
  is logged and closed at once, before it can send anything.
* On disconnect the client's DMA maps and eventfds go, the device's state stays.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import logging
import mmap
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from devices.api import Device, RamRegion
from devices.migration import fastpath
from emulator.connection import Connection
from emulator.eventfd_signal import signaller
from emulator.handler import RegionFds
from emulator.limits import MIGRATION_SESSIONS, Limits, apply_to_device, peer_allowed, peer_uid
from emulator.trace import Tracer
from emulator.transport import TransportError, close_fds, receive_chunk, send_message
from protocol.constants import HEADER_SIZE
from protocol.errors import ProtocolError
from protocol.header import Header, pack_error_reply
from protocol.version import ServerCapabilities

if TYPE_CHECKING:
    from emulator.netdev import NetBackend

log = logging.getLogger("vfio_user_emu")

REFUSAL_WAIT = 2.0
#: Second clients told EBUSY at once (each held up to REFUSAL_WAIT); more are just closed.
MAX_PENDING_REFUSALS = 16
#: accept() failures that a flood of connections can cause; the server waits and goes on.
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY_DELAY = 0.1
RAM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class ServerState(enum.Enum):
    CREATED = "created"
    LISTENING = "listening"
    SERVING = "serving"  # a client is attached
    CLOSED = "closed"


class ServerError(Exception):
    pass


def stale_socket(path: Path, kind: int = socket.SOCK_STREAM) -> bool:
    """True if ``path`` is a UNIX socket (of ``kind``) nobody serves any more."""
    if not stat.S_ISSOCK(path.lstat().st_mode):
        return False
    probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def _in_use(path: Path) -> str:
    """Why an existing ``path`` is left alone, and what to do instead."""
    mode = path.lstat().st_mode
    if stat.S_ISSOCK(mode):
        return "a server is listening on it (stop that server first, or choose another path)"
    kind = "a directory" if stat.S_ISDIR(mode) else "not a socket"
    return f"it exists and is {kind} (remove it, or choose another path)"


def create_listener(path: Path) -> socket.socket:
    """Bind, restrict to the owner, listen, then rename into place (atomic for clients)."""
    if not path.parent.is_dir():
        raise ServerError(
            f"cannot create the socket {path}: the directory {path.parent} does not exist "
            "(create it first, or choose another path)"
        )
    if path.exists() or path.is_symlink():
        if not stale_socket(path):
            raise ServerError(f"refusing to replace {path}: {_in_use(path)}")
        path.unlink()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(temporary))
        finally:
            os.umask(old_umask)
        os.chmod(temporary, 0o600)
        sock.listen(8)
        os.rename(temporary, path)
    except BaseException:
        sock.close()
        temporary.unlink(missing_ok=True)
        raise
    return sock


def adopt_listener(fd: int) -> socket.socket:
    """An inherited listening socket (``--fd``); checked, not trusted."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ServerError(f"--fd {fd}: {exc}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ServerError(f"--fd {fd} is not a UNIX stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ServerError(f"--fd {fd} is not listening")
    sock.set_inheritable(False)
    return sock


@dataclass
class RamBacking:
    """memfds behind a device's mmap-able regions; clients mmap the same pages."""

    fds: dict[int, int] = field(default_factory=dict)
    maps: list[mmap.mmap] = field(default_factory=list)

    @classmethod
    def for_device(cls, device: Device, name: str) -> RamBacking:
        backing = cls()
        for index, region in device.regions.items():
            if isinstance(region, RamRegion) and region.mmap_areas and region.size:
                fd = os.memfd_create(f"{name}-region{index}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, region.size)
                # The client gets this fd: sealed, so it cannot shrink the file under the
                # device's mapping (our next access would be a SIGBUS killing the server).
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, RAM_SEALS)
                # Populated up front: the device's RAM is resident from the start (as the
                # anonymous buffer it replaces would be), so no page fault lands inside a
                # migration's downtime.
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                mapping = mmap.mmap(fd, region.size, flags)
                region.bind(memoryview(mapping))
                backing.fds[index] = fd
                backing.maps.append(mapping)
        return backing

    def close(self) -> None:
        # The device keeps using the buffers until the process ends; only the fds go.
        close_fds(list(self.fds.values()))
        self.fds.clear()


@functools.cache
def _install_fast_path() -> None:
    """Pick the C fast path for migration streams once per process (or the fallback), and
    make the process's eventfd signaller now: it holds an fd of its own (/dev/zero), which
    belongs to the server from its start, not to the first client that gets an interrupt."""
    fastpath.install_best()
    signaller()


class DeviceServer:
    def __init__(
        self,
        device: Device,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        listen_fd: int | None = None,
        capabilities: ServerCapabilities | None = None,
        limits: Limits | None = None,
        trace: bool = False,
        once: bool = False,
        name: str | None = None,
        netdevs: Sequence[NetBackend] = (),
    ) -> None:
        if (socket_path is None) == (listen_fd is None):
            raise ServerError("give exactly one of socket_path and listen_fd")
        _install_fast_path()
        self.limits = limits or Limits(
            max_message_size=(capabilities or ServerCapabilities()).max_data_xfer_size + 4096
        )
        try:
            apply_to_device(device, self.limits)
        except ValueError as exc:
            raise ServerError(str(exc)) from None
        self.device = device
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.listen_fd = listen_fd
        self.capabilities = capabilities or ServerCapabilities()
        self.name = name or device.type_name
        self.tracer = Tracer(trace, self.name)
        self.once = once
        self.state = ServerState.CREATED
        self.active: Connection | None = None
        self.sessions_served = 0
        #: Connections closed because their peer's uid is not in ``limits.allowed_uids``.
        self.refused_peers = 0
        self._refusing = 0  # second clients being told EBUSY right now
        self._backing: RamBacking | None = None
        #: Network backends (emulator.netdev) run in the server's nursery, stop with it.
        self.netdevs = tuple(netdevs)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (or, with ``once``, until the first client leaves)."""
        raw = (
            create_listener(self.socket_path)
            if self.socket_path is not None
            else adopt_listener(self.listen_fd or 0)
        )
        listener = trio.socket.from_stdlib_socket(raw)
        self._backing = RamBacking.for_device(self.device, self.name)
        self.state = ServerState.LISTENING
        MIGRATION_SESSIONS.register(self.device)
        try:
            async with trio.open_nursery() as nursery:
                for netdev in self.netdevs:
                    await nursery.start(netdev.run)
                task_status.started()
                await self._accept_loop(listener, nursery)
        finally:
            MIGRATION_SESSIONS.unregister(self.device)
            self.state = ServerState.CLOSED
            listener.close()
            if self.socket_path is not None:
                self.socket_path.unlink(missing_ok=True)
            self._backing.close()

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                # Out of fds (a flood of connections) or memory: the clients we serve go on;
                # accepting resumes once something is released.
                log.warning("%s: accept failed (%s); retrying", self.name, exc)
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if not self._peer_allowed(sock):
                sock.close()
                continue
            active = self.active
            if active is not None and active.closed:
                # The previous client is gone and its teardown is finishing: a reconnect
                # right after a disconnect is served, not refused.
                await active.finished.wait()
                active = self.active
            if active is not None:
                if self._refusing >= MAX_PENDING_REFUSALS:
                    sock.close()  # a flood of connections: no EBUSY for each, just closed
                    continue
                nursery.start_soon(self._refuse, sock)
                continue
            nursery.start_soon(self._serve_client, sock, nursery.cancel_scope)

    async def _serve_client(self, sock: trio.socket.SocketType, stop: trio.CancelScope) -> None:
        assert self._backing is not None
        try:
            session = Connection(
                sock,
                self.device,
                capabilities=self.capabilities,
                limits=self.limits,
                region_fds=RegionFds(self._backing.fds),
                tracer=self.tracer,
            )
        except OSError as exc:
            # Out of fds (EMFILE when the session dups the socket) or memory for this one
            # client: it is dropped, the server goes on serving the next one.
            log.warning("%s: cannot serve a client (%s); connection closed", self.name, exc)
            sock.close()
            return
        self.active = session
        self.state = ServerState.SERVING
        log.info("%s: client connected", self.name)
        try:
            await session.run()
        except Exception:
            # Whatever one client does, the server goes on serving the next one.
            log.exception("%s: session failed", self.name)
        finally:
            self.active = None
            self.sessions_served += 1
            self.state = ServerState.LISTENING
            log.info("%s: client disconnected", self.name)
            if self.once:
                stop.cancel()

    def _peer_allowed(self, sock: trio.socket.SocketType) -> bool:
        allowed = self.limits.allowed_uids
        if not allowed:
            return True
        try:
            pid, uid = peer_uid(sock)
        except OSError as exc:
            log.warning("%s: refusing a client: no peer credentials (%s)", self.name, exc)
            return False
        if peer_allowed(uid, allowed):
            return True
        self.refused_peers += 1
        log.warning(
            "%s: refusing a client: uid %d (pid %d) is not allowed (--allow-uid %s)",
            self.name,
            uid,
            pid,
            ",".join(str(u) for u in sorted(allowed)),
        )
        return False

    async def _refuse(self, sock: trio.socket.SocketType) -> None:
        """Tell a second client the device is taken: EBUSY to its first command."""
        log.warning("%s: refusing a second client (device busy)", self.name)
        self._refusing += 1
        try:
            with trio.move_on_after(REFUSAL_WAIT):
                data, fds = await receive_chunk(sock, 4096, self.limits.max_fds_per_message)
                close_fds(fds)
                if len(data) >= HEADER_SIZE:
                    header = Header.unpack(data)
                    if header.is_command:
                        await send_message(
                            sock, pack_error_reply(header.msg_id, header.command, errno.EBUSY)
                        )
        except (OSError, TransportError, ProtocolError):
            pass  # whatever this client sent, it is being turned away anyway
        finally:
            self._refusing -= 1
            sock.close()


async def serve(
    device: Device,
    *,
    socket_path: str | os.PathLike[str] | None = None,
    listen_fd: int | None = None,
    capabilities: ServerCapabilities | None = None,
    limits: Limits | None = None,
    trace: bool = False,
    once: bool = False,
    netdevs: Sequence[NetBackend] = (),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``device`` from a script::

    trio.run(functools.partial(serve, device, socket_path="/tmp/dev.sock"))
    """
    server = DeviceServer(
        device,
        socket_path=socket_path,
        listen_fd=listen_fd,
        capabilities=capabilities,
        limits=limits,
        trace=trace,
        once=once,
        netdevs=netdevs,
    )
    await server.serve(task_status=task_status)
