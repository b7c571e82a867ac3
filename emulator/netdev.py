"""Network backends: where a NIC model's frames go (``serve --netdev TYPE,id=ID,...``).

QEMU-style specs, one backend per NIC (``netdev=ID`` on the device)::

    dgram,id=n0,local=PATH,remote=PATH      UNIX datagram sockets, one frame per datagram
    stream,id=n0,path=PATH[,server=on|off][,reconnect=SECONDS]
                                            UNIX stream socket, 4-byte big-endian length
                                            before every frame (QEMU's -netdev stream)
    tap,id=n0[,ifname=NAME]                 a Linux tap interface (needs /dev/net/tun and
                                            CAP_NET_ADMIN, or a persistent tap we may open)
    vde,id=n0,sock=DIR[,port=N]             a port on a vde_switch (emulator.netdev_vde)

and on any of them ``pcap=FILE`` (every frame both ways, classic pcap, LINKTYPE_ETHERNET),
``txqueue=N`` (frames held while the peer does not read, default 256) and ``rxqueue=N``
(frames held while the device does not accept, default 1024). QEMU's own spellings of the
addresses are accepted too: ``local.type=unix,local.path=PATH`` (and ``remote.``) for dgram,
``addr.type=unix,addr.path=PATH`` for stream. A ``,,`` in a value is a literal comma.

Wire compatibility: ``dgram`` is QEMU's ``-netdev dgram`` with unix addresses (one Ethernet
frame per datagram, no header) and ``stream`` is QEMU's ``-netdev stream`` (length-prefixed
frames), so a QEMU VM's NIC, or another emulator's, can be the peer.

Behaviour:

* A :class:`NetBackend` is the :class:`devices.net.NetPort` of its device. ``transmit``
  sends at once when nothing is queued (no task switch on the data path); when the socket
  is full the frame is queued (at most ``txqueue``, in order) and a task sends it when the
  socket can take it; past the bound ``transmit`` returns False and counts a drop
  (``stats.tx_dropped``, ``stats.extra["tx_queue_full"]``). While there is no peer (dgram
  remote not bound, stream not connected) frames are dropped (``extra["tx_link_down"]``).
* Received frames are handed to ``device.net_receive`` from the backend's task,
  synchronously, while the device accepts (the default once attached). While it does not
  (``set_accepting(False)``) they are queued, at most ``rxqueue`` (``stats.rx_queued_dropped``
  counts the rest), and delivered in order once it accepts again.
* Frames shorter than 14 bytes or longer than :data:`MAX_FRAME_SIZE` are dropped in either
  direction (``extra["tx_bad_size"]`` / ``extra["rx_bad_size"]``).
* ``pcap=FILE`` records a sent frame when the kernel took it and a received frame when it
  arrived (before any queueing), so the file shows the wire. It is flushed twice a second
  and when the backend stops.
* dgram: the ``local`` socket is created (mode 0600; a stale socket file is replaced) and
  removed when the backend stops. The ``remote`` need not exist yet: until it does, and
  after the peer goes away, frames are dropped (counted) and the backend tries to reach
  the peer again every :data:`DGRAM_RETRY_INTERVAL` seconds.
  Throughput is bounded by the kernel's ``net.unix.max_dgram_qlen`` (the peer's queue).
* stream: ``server=on`` listens on ``path`` (mode 0600, removed at the end) and serves one
  peer at a time, as QEMU does: a second peer waits in the listen backlog until the first
  leaves. ``server=off`` (the default, as in QEMU) connects to ``path`` and, when it cannot
  or the peer goes away, tries again every ``reconnect`` seconds (default 1) for as long
  as the backend runs. A length over :data:`MAX_FRAME_SIZE` means the stream cannot be
  trusted: the connection is closed (and re-established as above). Frames queued for a
  peer that leaves are dropped (counted).
* tap: the interface is created (or a persistent one opened) with IFF_TAP|IFF_NO_PI; bring
  it up and address it yourself (``ip link set NAME up``).

Lifecycle: :meth:`NetBackend.open` creates the sockets (errors are :class:`NetdevError`,
with a message for the user), :meth:`NetBackend.run` is the task (inside the server's
nursery: see ``DeviceServer(netdevs=...)``) and closes everything when cancelled;
:meth:`NetBackend.close` is idempotent. A backend runs once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import trio

from devices.net import NetDevice, NetStats
from emulator.pcap import PcapWriter
from emulator.server import ServerError, create_listener, stale_socket

log = logging.getLogger("vfio_user_emu")

MIN_FRAME_SIZE = 14  # an Ethernet header
#: The largest IP packet behind an Ethernet header with one VLAN tag.
MAX_FRAME_SIZE = 65535 + 18
DEFAULT_TX_QUEUE = 256
DEFAULT_RX_QUEUE = 1024
MAX_QUEUE = 1 << 20
#: Frames a receive loop handles before letting other tasks run.
RX_BATCH = 64
#: Frames one sendmsg takes from the stream send queue.
TX_BATCH = 64
PCAP_FLUSH_INTERVAL = 0.5
DGRAM_RETRY_INTERVAL = 0.2
DEFAULT_RECONNECT = 1.0
#: Kernel buffer we ask for on sending sockets (capped by net.core.wmem_max).
SEND_BUFFER = 1 << 20
STREAM_RX_BUFFER = 256 * 1024
_UNIX_PATH_MAX = 107

_LENGTH = struct.Struct(">I")

TUN_DEVICE = "/dev/net/tun"
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFNAMSIZ = 16


class NetdevError(Exception):
    """A ``--netdev`` spec or a backend that cannot be set up; the message is for the user."""


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(RuntimeError):  # outside trio.run nobody can be waiting on it
        trio.lowlevel.notify_closing(sock)
    sock.close()


class NetBackend:
    """The base of every backend: the device's port, queues, counters and pcap.

    A subclass provides the I/O: ``_open``/``_close``, ``_start`` (its receive tasks, which
    call :meth:`_received` per frame), ``_send`` (one frame now, False if the socket is
    full), optionally ``_send_queued`` and ``_link_lost``, and ``_tx_fd`` to wait on.
    """

    kind: ClassVar[str] = ""

    def __init__(
        self,
        netdev_id: str,
        *,
        pcap: str | os.PathLike[str] | None = None,
        tx_queue: int = DEFAULT_TX_QUEUE,
        rx_queue: int = DEFAULT_RX_QUEUE,
    ) -> None:
        if tx_queue < 1 or rx_queue < 0:
            raise ValueError("tx_queue must be >= 1 and rx_queue >= 0")
        self.netdev_id = netdev_id
        self.pcap_path = Path(pcap) if pcap is not None else None
        self.tx_queue_limit = tx_queue
        self.rx_queue_limit = rx_queue
        self.stats = NetStats()
        self.device: NetDevice | None = None
        self._receive: Callable[[bytes], None] = self._no_device
        self._accepting = False
        self._link_up = False
        self._txq: deque[bytes] = deque()
        self._rxq: deque[bytes] = deque()
        self._tx_wake = trio.Event()
        self._rx_wake = trio.Event()
        self._pcap: PcapWriter | None = None
        self._opened = False
        self._closed = False
        self._ran = False

    # -- wiring ---------------------------------------------------------------------------

    def attach(self, device: NetDevice) -> None:
        """Make this backend the device's port. The device accepts frames until it says
        otherwise (it may do so from ``attach_net``)."""
        if self.device is not None:
            raise NetdevError(f"netdev {self.netdev_id} is already attached to a device")
        self.device = device
        self._receive = device.net_receive
        self._accepting = True
        device.attach_net(self)
        if self._rxq and self._accepting:
            self._rx_wake.set()

    # -- NetPort --------------------------------------------------------------------------

    def transmit(self, frame: bytes) -> bool:
        length = len(frame)
        if length < MIN_FRAME_SIZE or length > MAX_FRAME_SIZE:
            return self._drop_tx("tx_bad_size")
        txq = self._txq
        if txq:  # keep the order: behind what is waiting
            if len(txq) >= self.tx_queue_limit:
                return self._drop_tx("tx_queue_full")
            txq.append(frame)
            return True
        if not self._link_up and not self._bring_link_up():
            return self._drop_tx("tx_link_down")
        try:
            done = self._send(frame)
        except OSError as exc:
            self._link_lost(exc)
            return self._drop_tx("tx_link_down")
        if done:
            stats = self.stats
            stats.tx_frames += 1
            stats.tx_bytes += length
            if self._pcap is not None:
                self._pcap.write(frame)
        else:
            txq.append(frame)
            self._tx_wake.set()
        return True

    def set_accepting(self, accepting: bool) -> None:
        self._accepting = accepting
        if accepting and self._rxq:
            self._rx_wake.set()

    # -- state ----------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def link_up(self) -> bool:
        """Whether frames can go to a peer now (dgram: remote reached; stream: connected)."""
        return self._link_up

    @property
    def tx_backlog(self) -> int:
        """Frames waiting for the socket."""
        return len(self._txq)

    @property
    def rx_backlog(self) -> int:
        """Frames waiting for the device to accept."""
        return len(self._rxq)

    def describe(self) -> str:
        text = f"netdev {self.netdev_id}: {self.kind} {self._describe()}"
        if self.pcap_path is not None:
            text += f", pcap {self.pcap_path}"
        return text

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Create the sockets (and the pcap file). Safe to call twice."""
        if self._opened:
            return
        if self._closed:
            raise NetdevError(f"netdev {self.netdev_id} is closed")
        try:
            if self.pcap_path is not None:
                try:
                    self._pcap = PcapWriter(self.pcap_path)
                except OSError as exc:
                    raise NetdevError(
                        f"netdev {self.netdev_id}: cannot write pcap file {self.pcap_path}: "
                        f"{exc.strerror or exc}"
                    ) from None
            self._open()
        except BaseException:
            self.close()
            raise
        self._opened = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Move frames until cancelled, then close. Started with ``nursery.start``, it
        reports started once its sockets exist and its tasks run."""
        if self._ran:
            raise RuntimeError(f"netdev {self.netdev_id} already ran")
        self._ran = True
        try:
            self.open()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tx_loop)
                nursery.start_soon(self._rx_drain_loop)
                if self._pcap is not None:
                    nursery.start_soon(self._pcap_flush_loop)
                self._start(nursery)
                task_status.started()
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._link_up = False
        self._drop_queued_tx()
        try:
            self._close()
        finally:
            if self._pcap is not None:
                self._pcap.close()

    # -- for subclasses -------------------------------------------------------------------

    def _describe(self) -> str:
        raise NotImplementedError

    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _start(self, nursery: trio.Nursery) -> None:
        raise NotImplementedError

    def _send(self, frame: bytes) -> bool:
        """Send one frame now: True if it went out whole, False if the socket is full (the
        frame is then queued; a stream keeps what it already sent of it). OSError: the
        link is gone."""
        raise NotImplementedError

    def _tx_fd(self) -> int | socket.socket | None:
        raise NotImplementedError

    def _bring_link_up(self) -> bool:
        """Try to reach the peer now (called when the device transmits while the link is
        down); True if frames can go."""
        return False

    def _send_queued(self) -> None:
        """Send queued frames until the queue is empty (return) or the socket is full
        (BlockingIOError)."""
        txq = self._txq
        stats = self.stats
        pcap = self._pcap
        while txq:
            frame = txq[0]
            if not self._send(frame):
                raise BlockingIOError
            txq.popleft()
            stats.tx_frames += 1
            stats.tx_bytes += len(frame)
            if pcap is not None:
                pcap.write(frame)

    def _link_lost(self, exc: OSError) -> None:
        """Sending failed with ``exc``: the frames queued behind are dropped."""
        if self._link_up:
            log.warning("netdev %s: peer unreachable: %s", self.netdev_id, exc.strerror or exc)
        self._link_up = False
        self._drop_queued_tx()

    async def _packet_rx_loop(
        self, read_into: Callable[[bytearray], int], waitable: Any, what: str
    ) -> None:
        """Receive one frame per read (datagram sockets, tap) until cancelled."""
        buffer = bytearray(MAX_FRAME_SIZE + 1)  # one more: a frame that fills it is too big
        view = memoryview(buffer)
        received = self._received
        budget = RX_BATCH
        while True:
            try:
                size = read_into(buffer)
            except BlockingIOError:
                budget = RX_BATCH
                await trio.lowlevel.wait_readable(waitable)
                continue
            except OSError as exc:  # nothing expected; do not spin on it
                log.warning("netdev %s: %s: %s", self.netdev_id, what, _oserror_text(exc))
                await trio.sleep(DGRAM_RETRY_INTERVAL)
                continue
            if MIN_FRAME_SIZE <= size <= MAX_FRAME_SIZE:
                received(bytes(view[:size]))
            else:
                self._count("rx_bad_size")
            budget -= 1
            if not budget:
                budget = RX_BATCH
                await trio.lowlevel.checkpoint()

    def _received(self, frame: bytes) -> None:
        """One frame from the wire (sizes checked by the caller)."""
        stats = self.stats
        stats.rx_frames += 1
        stats.rx_bytes += len(frame)
        if self._pcap is not None:
            self._pcap.write(frame)
        if self._accepting and not self._rxq:
            try:
                self._receive(frame)
            except Exception:
                self._count("rx_device_errors")
                log.exception("netdev %s: the device failed on a received frame", self.netdev_id)
        elif len(self._rxq) < self.rx_queue_limit:
            self._rxq.append(frame)
        else:
            stats.rx_queued_dropped += 1

    def _count(self, key: str, count: int = 1) -> None:
        extra = self.stats.extra
        extra[key] = extra.get(key, 0) + count

    # -- internals ------------------------------------------------------------------------

    def _drop_tx(self, reason: str) -> bool:
        self.stats.tx_dropped += 1
        self._count(reason)
        return False

    def _drop_queued_tx(self) -> None:
        if self._txq:
            self.stats.tx_dropped += len(self._txq)
            self._count("tx_link_down", len(self._txq))
            self._txq.clear()

    def _no_device(self, frame: bytes) -> None:
        self._count("rx_no_device")

    async def _tx_loop(self) -> None:
        while True:
            if not self._txq:
                await self._tx_wake.wait()
                self._tx_wake = trio.Event()
                continue
            try:
                self._send_queued()
            except BlockingIOError:
                fd = self._tx_fd()
                if fd is None:
                    self._drop_queued_tx()
                    continue
                try:
                    await trio.lowlevel.wait_writable(fd)
                except (trio.ClosedResourceError, OSError):
                    continue  # the connection went; whoever closed it dropped the queue
            except OSError as exc:
                self._link_lost(exc)
            else:
                await trio.lowlevel.checkpoint()

    async def _rx_drain_loop(self) -> None:
        rxq = self._rxq
        while True:
            await self._rx_wake.wait()
            self._rx_wake = trio.Event()
            budget = RX_BATCH
            while self._accepting and rxq:
                frame = rxq.popleft()
                try:
                    self._receive(frame)
                except Exception:
                    self._count("rx_device_errors")
                    log.exception(
                        "netdev %s: the device failed on a received frame", self.netdev_id
                    )
                budget -= 1
                if not budget:
                    budget = RX_BATCH
                    await trio.lowlevel.checkpoint()

    async def _pcap_flush_loop(self) -> None:
        while True:
            await trio.sleep(PCAP_FLUSH_INTERVAL)
            if self._pcap is not None:
                try:
                    self._pcap.flush()
                except OSError as exc:
                    log.error("netdev %s: pcap file: %s; capture stopped", self.netdev_id, exc)
                    self._pcap.close()
                    self._pcap = None
                    return


# -- UNIX socket helpers -------------------------------------------------------------------


def _check_unix_path(netdev_id: str, key: str, path: str) -> Path:
    if not path:
        raise NetdevError(f"netdev {netdev_id}: {key}= needs a path")
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise NetdevError(
            f"netdev {netdev_id}: {key}={path} is longer than a UNIX socket path may be "
            f"({_UNIX_PATH_MAX} bytes)"
        )
    return Path(path)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _unlink_if_ours(path: Path, inode: tuple[int, int] | None) -> None:
    if inode is not None and _inode(path) == inode:
        path.unlink(missing_ok=True)


def _oserror_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


# -- dgram -------------------------------------------------------------------------------


class DgramBackend(NetBackend):
    """One Ethernet frame per UNIX datagram: received on ``local``, sent to ``remote``.

    Frames are sent from a second, unbound socket connected to ``remote``, so that the
    kernel tells us when the peer's queue is full (and when it has room again) and the
    receiving socket takes datagrams from any sender (QEMU sends with sendto from its own
    local address)."""

    kind = "dgram"

    def __init__(
        self,
        netdev_id: str,
        *,
        local: str | os.PathLike[str],
        remote: str | os.PathLike[str],
        **common: Any,
    ) -> None:
        super().__init__(netdev_id, **common)
        self.local = _check_unix_path(netdev_id, "local", os.fspath(local))
        self.remote = _check_unix_path(netdev_id, "remote", os.fspath(remote))
        if self.local.absolute() == self.remote.absolute():
            raise NetdevError(f"netdev {netdev_id}: local and remote are the same path")
        self._rx_sock: socket.socket | None = None
        self._tx_sock: socket.socket | None = None
        self._local_inode: tuple[int, int] | None = None
        self._retry_at = 0.0

    def _describe(self) -> str:
        return f"local {self.local}, remote {self.remote}"

    def _open(self) -> None:
        path = self.local
        if path.exists() or path.is_symlink():
            if not stale_socket(path, socket.SOCK_DGRAM):
                raise NetdevError(
                    f"netdev {self.netdev_id}: local={path} exists and is not a stale "
                    "datagram socket; refusing to replace it"
                )
            path.unlink()
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            old_umask = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old_umask)
        except OSError as exc:
            sock.close()
            raise NetdevError(
                f"netdev {self.netdev_id}: cannot bind local={path}: {_oserror_text(exc)}"
            ) from None
        self._rx_sock = sock
        self._local_inode = _inode(path)
        tx = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        with contextlib.suppress(OSError):
            tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._tx_sock = tx
        if not self._bring_link_up():
            log.info(
                "netdev %s: remote %s not there yet; frames are dropped until it is",
                self.netdev_id,
                self.remote,
            )

    def _close(self) -> None:
        self._retry_at = math.inf
        for sock in (self._rx_sock, self._tx_sock):
            if sock is not None:
                _close_quietly(sock)
        self._rx_sock = self._tx_sock = None
        _unlink_if_ours(self.local, self._local_inode)
        self._local_inode = None

    def _bring_link_up(self) -> bool:
        now = time.monotonic()
        if now < self._retry_at or self._tx_sock is None:
            return False
        try:
            self._tx_sock.connect(str(self.remote))
        except OSError:
            self._retry_at = now + DGRAM_RETRY_INTERVAL
            return False
        self._link_up = True
        log.info("netdev %s: sending to %s", self.netdev_id, self.remote)
        return True

    def _link_lost(self, exc: OSError) -> None:
        super()._link_lost(exc)
        self._retry_at = time.monotonic() + DGRAM_RETRY_INTERVAL

    def _send(self, frame: bytes) -> bool:
        sock = self._tx_sock
        if sock is None:
            raise OSError(errno.EBADF, "closed")
        try:
            sock.send(frame)
        except BlockingIOError:
            return False
        return True

    def _tx_fd(self) -> socket.socket | None:
        return self._tx_sock

    def _start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._rx_loop)
        nursery.start_soon(self._link_watch)

    async def _link_watch(self) -> None:
        """Reach a peer that was not there, also while the device sends nothing."""
        while True:
            await trio.sleep(DGRAM_RETRY_INTERVAL)
            if not self._link_up:
                self._retry_at = 0.0
                self._bring_link_up()

    async def _rx_loop(self) -> None:
        sock = self._rx_sock
        assert sock is not None
        await self._packet_rx_loop(sock.recv_into, sock, "receive")


# -- stream ------------------------------------------------------------------------------


class StreamBackend(NetBackend):
    """Length-prefixed frames over a UNIX stream socket (QEMU's ``-netdev stream``)."""

    kind = "stream"

    def __init__(
        self,
        netdev_id: str,
        *,
        path: str | os.PathLike[str],
        server: bool = False,
        reconnect: float = DEFAULT_RECONNECT,
        **common: Any,
    ) -> None:
        super().__init__(netdev_id, **common)
        if not reconnect > 0:
            raise NetdevError(f"netdev {netdev_id}: reconnect must be a positive number")
        self.path = _check_unix_path(netdev_id, "path", os.fspath(path))
        self.server = server
        self.reconnect = reconnect
        self._listener: socket.socket | None = None
        self._listener_inode: tuple[int, int] | None = None
        self._conn: socket.socket | None = None
        self._tx_offset = 0  # bytes of the first queued frame (with its length) already sent

    def _describe(self) -> str:
        if self.server:
            return f"server on {self.path}"
        return f"client of {self.path} (reconnect every {self.reconnect:g}s)"

    def _open(self) -> None:
        if not self.server:
            return
        try:
            listener = create_listener(self.path)
        except ServerError as exc:
            raise NetdevError(f"netdev {self.netdev_id}: {exc}") from None
        except OSError as exc:
            raise NetdevError(
                f"netdev {self.netdev_id}: cannot listen on {self.path}: {_oserror_text(exc)}"
            ) from None
        listener.setblocking(False)
        self._listener = listener
        self._listener_inode = _inode(self.path)

    def _close(self) -> None:
        if self._conn is not None:
            self._disconnect(self._conn)
        self._stop_listening()

    def _stop_listening(self) -> None:
        if self._listener is not None:
            _close_quietly(self._listener)
            self._listener = None
            _unlink_if_ours(self.path, self._listener_inode)

    def _start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._connection_loop)

    async def _connection_loop(self) -> None:
        while True:
            sock = await (self._accept() if self.server else self._connect())
            self._conn = sock
            self._tx_offset = 0
            self._link_up = True
            self._count("connections")
            log.info("netdev %s: connected (%s)", self.netdev_id, self.path)
            try:
                await self._rx_loop(sock)
            except (OSError, trio.ClosedResourceError) as exc:
                if self._conn is sock:
                    log.warning("netdev %s: connection lost: %s", self.netdev_id, exc)
            except BaseException:
                # Stopping: stop listening before the peer sees the close, so that it does
                # not reconnect into a listener about to go away.
                self._stop_listening()
                raise
            finally:
                if self._conn is sock:
                    self._disconnect(sock)
            log.info("netdev %s: disconnected (%s)", self.netdev_id, self.path)

    async def _accept(self) -> socket.socket:
        listener = self._listener
        assert listener is not None
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                continue
            sock.setblocking(False)
            return sock

    async def _connect(self) -> socket.socket:
        warned = False
        while True:
            sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
            try:
                code = sock.connect_ex(str(self.path))
                if code in (errno.EAGAIN, errno.EINPROGRESS):
                    await trio.lowlevel.wait_writable(sock)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except BaseException:
                sock.close()
                raise
            if code == 0:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                return sock
            sock.close()
            if not warned:
                warned = True
                log.warning(
                    "netdev %s: cannot connect to %s (%s); retrying every %gs",
                    self.netdev_id,
                    self.path,
                    os.strerror(code),
                    self.reconnect,
                )
            await trio.sleep(self.reconnect)

    def _disconnect(self, sock: socket.socket) -> None:
        self._conn = None
        self._link_up = False
        self._tx_offset = 0
        self._drop_queued_tx()
        _close_quietly(sock)

    def _link_lost(self, exc: OSError) -> None:
        if self._conn is not None:
            log.warning("netdev %s: send failed: %s", self.netdev_id, _oserror_text(exc))
            self._disconnect(self._conn)  # the receive task sees it closed and moves on
        else:
            self._drop_queued_tx()

    def _send(self, frame: bytes) -> bool:
        sock = self._conn
        if sock is None:
            raise OSError(errno.ENOTCONN, "not connected")
        total = len(frame) + 4
        try:
            sent = sock.sendmsg((_LENGTH.pack(len(frame)), frame))
        except BlockingIOError:
            sent = 0
        if sent == total:
            return True
        self._tx_offset = sent
        return False

    def _send_queued(self) -> None:
        sock = self._conn
        if sock is None:
            raise OSError(errno.ENOTCONN, "not connected")
        txq = self._txq
        stats = self.stats
        pack = _LENGTH.pack
        while txq:
            buffers: list[bytes | memoryview] = []
            for index, frame in enumerate(txq):
                if index == TX_BATCH:
                    break
                buffers.append(pack(len(frame)))
                buffers.append(frame)
            offset = self._tx_offset
            if offset:
                buffers[0:2] = [memoryview(pack(len(txq[0])) + txq[0])[offset:]]
            position = offset + sock.sendmsg(buffers)  # BlockingIOError: full
            while txq and position >= len(txq[0]) + 4:
                frame = txq.popleft()
                position -= len(frame) + 4
                stats.tx_frames += 1
                stats.tx_bytes += len(frame)
                if self._pcap is not None:
                    self._pcap.write(frame)
            self._tx_offset = position

    def _tx_fd(self) -> socket.socket | None:
        return self._conn

    async def _rx_loop(self, sock: socket.socket) -> None:
        buffer = bytearray(STREAM_RX_BUFFER)
        view = memoryview(buffer)
        unpack_from = _LENGTH.unpack_from
        received = self._received
        start = end = 0
        budget = RX_BATCH
        while True:
            try:
                count = sock.recv_into(view[end:])
            except BlockingIOError:
                budget = RX_BATCH
                await trio.lowlevel.wait_readable(sock)
                continue
            if count == 0:
                return  # the peer closed
            end += count
            while end - start >= 4:
                (length,) = unpack_from(buffer, start)
                if length > MAX_FRAME_SIZE:
                    self._count("rx_bad_size")
                    log.warning(
                        "netdev %s: peer sent a %d-byte frame (limit %d); disconnecting",
                        self.netdev_id,
                        length,
                        MAX_FRAME_SIZE,
                    )
                    return
                stop = start + 4 + length
                if stop > end:
                    break
                if length >= MIN_FRAME_SIZE:
                    received(bytes(view[start + 4 : stop]))
                    budget -= 1
                else:
                    self._count("rx_bad_size")
                start = stop
            if start == end:
                start = end = 0
            elif len(buffer) - end < MAX_FRAME_SIZE + 4:
                buffer[: end - start] = bytes(view[start:end])  # no overlapping copy
                start, end = 0, end - start
            if budget <= 0:
                budget = RX_BATCH
                await trio.lowlevel.checkpoint()
            if self._conn is not sock:
                return  # closed by a failed send


# -- tap ---------------------------------------------------------------------------------


class TapBackend(NetBackend):
    """A Linux tap interface: one frame per read/write on /dev/net/tun."""

    kind = "tap"

    def __init__(self, netdev_id: str, *, ifname: str | None = None, **common: Any) -> None:
        super().__init__(netdev_id, **common)
        if ifname is not None:
            if not ifname or len(ifname.encode()) >= _IFNAMSIZ:
                raise NetdevError(
                    f"netdev {netdev_id}: ifname must be 1-{_IFNAMSIZ - 1} characters"
                )
            if "/" in ifname or any(char.isspace() for char in ifname):
                raise NetdevError(f"netdev {netdev_id}: ifname {ifname!r} is not a valid name")
        self.ifname = ifname
        self._fd: int | None = None

    def _describe(self) -> str:
        return f"interface {self.ifname or '(kernel chooses)'}"

    def _open(self) -> None:
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetdevError(
                f"netdev {self.netdev_id}: {TUN_DEVICE} does not exist (no tun driver here; "
                "in a container, pass the device in)"
            ) from None
        except OSError as exc:
            raise NetdevError(
                f"netdev {self.netdev_id}: cannot open {TUN_DEVICE}: {_oserror_text(exc)} "
                "(a tap needs CAP_NET_ADMIN, or a persistent tap owned by this user)"
            ) from None
        request = struct.pack(
            f"{_IFNAMSIZ}sH22x", (self.ifname or "").encode(), _IFF_TAP | _IFF_NO_PI
        )
        try:
            answer = fcntl.ioctl(fd, _TUNSETIFF, request)
        except OSError as exc:
            os.close(fd)
            hint = {
                errno.EPERM: " (needs CAP_NET_ADMIN, or a persistent tap owned by this user)",
                errno.EBUSY: " (the interface is in use, or is not a tap)",
                errno.EINVAL: " (the name is taken by an interface that is not a tap)",
            }.get(exc.errno or 0, "")
            raise NetdevError(
                f"netdev {self.netdev_id}: cannot create tap {self.ifname or ''}: "
                f"{_oserror_text(exc)}{hint}"
            ) from None
        self.ifname = answer[:_IFNAMSIZ].split(b"\0", 1)[0].decode()
        self._fd = fd
        self._link_up = True

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self._fd)
            os.close(self._fd)
            self._fd = None

    def _send(self, frame: bytes) -> bool:
        if self._fd is None:
            raise OSError(errno.EBADF, "closed")
        try:
            os.write(self._fd, frame)
        except BlockingIOError:
            return False
        return True

    def _link_lost(self, exc: OSError) -> None:
        # A write the kernel refused (interface down, ...) loses that frame only.
        if self._fd is not None:
            self._drop_queued_tx()
            log.debug("netdev %s: write: %s", self.netdev_id, _oserror_text(exc))
        else:
            super()._link_lost(exc)

    def _bring_link_up(self) -> bool:
        return self._fd is not None

    def _tx_fd(self) -> int | None:
        return self._fd

    def _start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._rx_loop)

    async def _rx_loop(self) -> None:
        fd = self._fd
        assert fd is not None
        await self._packet_rx_loop(lambda buffer: os.readv(fd, [buffer]), fd, "read")


# -- specs -------------------------------------------------------------------------------

BACKEND_TYPES: dict[str, type[NetBackend]] = {
    "dgram": DgramBackend,
    "stream": StreamBackend,
    "tap": TapBackend,
}

#: Options every type takes.
COMMON_NETDEV_OPTIONS = {
    "id": "the name devices refer to (netdev=ID)",
    "pcap": "write every frame, both ways, to this pcap file",
    "txqueue": f"frames held while the peer does not read (default {DEFAULT_TX_QUEUE})",
    "rxqueue": f"frames held while the device does not accept (default {DEFAULT_RX_QUEUE})",
}

NETDEV_OPTIONS: dict[str, dict[str, str]] = {
    "dgram": {
        "local": "UNIX datagram socket to create and receive on",
        "remote": "UNIX datagram socket of the peer to send to",
        "local.type": "unix (QEMU's spelling)",
        "local.path": "same as local",
        "remote.type": "unix (QEMU's spelling)",
        "remote.path": "same as remote",
    },
    "stream": {
        "path": "UNIX stream socket",
        "server": "on: listen on path; off (default): connect to it",
        "reconnect": f"client: seconds between connection attempts (default {DEFAULT_RECONNECT:g})",
        "addr.type": "unix (QEMU's spelling)",
        "addr.path": "same as path",
    },
    "tap": {"ifname": "interface name (default: the kernel picks one)"},
}


def netdev_help() -> str:
    lines = ["netdev types (--netdev TYPE,id=ID,...):"]
    for kind, options in NETDEV_OPTIONS.items():
        lines.append(f"  {kind}:")
        for key, text in options.items():
            if "." not in key:
                lines.append(f"      {key}=...  {text}")
    lines.append("options of every netdev type:")
    for key, text in COMMON_NETDEV_OPTIONS.items():
        lines.append(f"      {key}=...  {text}")
    return "\n".join(lines)


def split_spec(spec: str) -> list[str]:
    """Split at commas; ``,,`` is a comma inside a value (QEMU's escape)."""
    items: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(spec):
        char = spec[index]
        if char == ",":
            if spec.startswith(",,", index):
                current.append(",")
                index += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    items.append("".join(current))
    return items


def _parse_bool(netdev_id: str, key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("on", "yes", "true", "1"):
        return True
    if lowered in ("off", "no", "false", "0"):
        return False
    raise NetdevError(f"netdev {netdev_id}: {key}={value!r} is not on or off")


def _parse_count(netdev_id: str, key: str, value: str, minimum: int) -> int:
    try:
        number = int(value, 0)
    except ValueError:
        number = -1
    if not minimum <= number <= MAX_QUEUE:
        raise NetdevError(
            f"netdev {netdev_id}: {key}={value!r} is not a number from {minimum} to {MAX_QUEUE}"
        )
    return number


def _parse_seconds(netdev_id: str, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 < number < 86400:
        raise NetdevError(f"netdev {netdev_id}: {key}={value!r} is not a number of seconds")
    return number


def _address(netdev_id: str, options: dict[str, str], name: str, prefix: str) -> str | None:
    """``name=PATH`` or QEMU's ``prefix.type=unix,prefix.path=PATH``."""
    kind = options.pop(f"{prefix}.type", "unix")
    if kind != "unix":
        raise NetdevError(
            f"netdev {netdev_id}: {prefix}.type={kind} is not supported (only unix addresses)"
        )
    plain = options.pop(name, None)
    dotted = options.pop(f"{prefix}.path", None)
    if plain is not None and dotted is not None:
        raise NetdevError(f"netdev {netdev_id}: give {name}= or {prefix}.path=, not both")
    return plain if plain is not None else dotted


def parse_netdev(spec: str) -> NetBackend:
    """A backend (not opened yet) from ``TYPE,id=ID,key=value,...``."""
    items = split_spec(spec.strip())
    kind = items[0].strip()
    if not kind:
        raise NetdevError(f"--netdev {spec!r}: missing the type (dgram, stream or tap)")
    if "=" in kind:
        raise NetdevError(f"--netdev {spec!r}: start with the type (dgram, stream or tap)")
    backend_type = BACKEND_TYPES.get(kind)
    if backend_type is None:
        known = ", ".join(BACKEND_TYPES)
        raise NetdevError(f"--netdev {spec!r}: unknown netdev type {kind!r} (known: {known})")
    options: dict[str, str] = {}
    for item in items[1:]:
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise NetdevError(f"--netdev {spec!r}: option {item!r} is not key=value")
        if key in options:
            raise NetdevError(f"--netdev {spec!r}: option {key!r} given twice")
        options[key] = value
    netdev_id = options.pop("id", "").strip()
    if not netdev_id:
        raise NetdevError(f"--netdev {spec!r}: missing id=ID")
    accepted = set(NETDEV_OPTIONS[kind]) | set(COMMON_NETDEV_OPTIONS)
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted))
        raise NetdevError(
            f"netdev {netdev_id}: unknown option(s) {', '.join(unknown)} for {kind} "
            f"(valid: {valid})"
        )
    common: dict[str, Any] = {}
    if "pcap" in options:
        pcap = options.pop("pcap")
        if not pcap:
            raise NetdevError(f"netdev {netdev_id}: pcap= needs a file name")
        common["pcap"] = pcap
    if "txqueue" in options:
        common["tx_queue"] = _parse_count(netdev_id, "txqueue", options.pop("txqueue"), 1)
    if "rxqueue" in options:
        common["rx_queue"] = _parse_count(netdev_id, "rxqueue", options.pop("rxqueue"), 0)
    return _BUILDERS[kind](netdev_id, options, common)


def _build_dgram(netdev_id: str, options: dict[str, str], common: dict[str, Any]) -> NetBackend:
    local = _address(netdev_id, options, "local", "local")
    remote = _address(netdev_id, options, "remote", "remote")
    missing = [name for name, value in (("local", local), ("remote", remote)) if not value]
    if missing:
        raise NetdevError(
            f"netdev {netdev_id}: dgram needs {' and '.join(f'{m}=PATH' for m in missing)}"
        )
    return DgramBackend(netdev_id, local=cast(str, local), remote=cast(str, remote), **common)


def _build_stream(netdev_id: str, options: dict[str, str], common: dict[str, Any]) -> NetBackend:
    path = _address(netdev_id, options, "path", "addr")
    if not path:
        raise NetdevError(f"netdev {netdev_id}: stream needs path=PATH")
    server = _parse_bool(netdev_id, "server", options.pop("server", "off"))
    reconnect = DEFAULT_RECONNECT
    if "reconnect" in options:
        if server:
            raise NetdevError(f"netdev {netdev_id}: reconnect= is for server=off")
        reconnect = _parse_seconds(netdev_id, "reconnect", options.pop("reconnect"))
    return StreamBackend(netdev_id, path=path, server=server, reconnect=reconnect, **common)


def _build_tap(netdev_id: str, options: dict[str, str], common: dict[str, Any]) -> NetBackend:
    return TapBackend(netdev_id, ifname=options.pop("ifname", None), **common)


_BUILDERS: dict[str, Callable[[str, dict[str, str], dict[str, Any]], NetBackend]] = {
    "dgram": _build_dgram,
    "stream": _build_stream,
    "tap": _build_tap,
}


def wire_netdevs(devices: Iterable[object], netdevs: Mapping[str, NetBackend]) -> None:
    """Attach each device with a ``netdev_id`` to that backend. Every device must find its
    backend and every backend must have a device."""
    used: dict[str, object] = {}
    pairs: list[tuple[NetBackend, NetDevice]] = []
    for device in devices:
        netdev_id = getattr(device, "netdev_id", None)
        if netdev_id is None:
            continue
        name = getattr(device, "type_name", type(device).__name__)
        if not (hasattr(device, "attach_net") and hasattr(device, "net_receive")):
            raise NetdevError(f"device {name} has netdev={netdev_id} but is not a network device")
        backend = netdevs.get(netdev_id)
        if backend is None:
            given = ", ".join(sorted(netdevs)) or "none"
            raise NetdevError(
                f"device {name} uses netdev={netdev_id}, but no --netdev ...,id={netdev_id} "
                f"was given (netdevs given: {given})"
            )
        if netdev_id in used:
            raise NetdevError(f"netdev {netdev_id} is used by two devices")
        used[netdev_id] = device
        pairs.append((backend, cast(NetDevice, device)))
    unused = sorted(set(netdevs) - set(used))
    if unused:
        raise NetdevError(
            f"--netdev {', '.join(unused)}: no device uses it (give the device netdev=ID)"
        )
    for backend, device in pairs:
        backend.attach(device)


def setup_netdevs(specs: Sequence[str], devices: Iterable[object]) -> list[NetBackend]:
    """``serve --netdev``: parse the specs, attach the devices that name them, then open
    the backends (nothing is created on disk unless everything checks out)."""
    backends: dict[str, NetBackend] = {}
    pcaps: dict[Path, str] = {}
    for spec in specs:
        backend = parse_netdev(spec)
        if backend.netdev_id in backends:
            raise NetdevError(f"--netdev id={backend.netdev_id} given twice")
        if backend.pcap_path is not None:
            key = backend.pcap_path.absolute()
            if key in pcaps:
                raise NetdevError(
                    f"netdev {backend.netdev_id}: pcap={backend.pcap_path} is also the "
                    f"capture file of netdev {pcaps[key]}"
                )
            pcaps[key] = backend.netdev_id
        backends[backend.netdev_id] = backend
    wire_netdevs(devices, backends)
    opened: list[NetBackend] = []
    try:
        for backend in backends.values():
            backend.open()
            opened.append(backend)
    except BaseException:
        for backend in opened:
            backend.close()
        raise
    return opened


# The vde backend lives in its own module (built on the classes above); importing it adds
# "vde" to the tables above.
import emulator.netdev_vde  # noqa: E402,F401
