"""A loopback TCP proxy between a source QEMU and a destination QEMU's ``-incoming`` port,
which can corrupt our device's state on its way: a man in the middle on the migration's
data path.

QEMU's migration stream carries our device's migration data as it is (the vfio section's
DEV_DATA_STATE chunks), so the proxy finds our envelope by its magic (``VFUSTATE``,
devices/migration/stream.py) in the source's bytes and flips one byte of the header that
follows; the destination emulator's checksum must catch it. Everything else, and the
return path (destination -> source), is forwarded untouched. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from devices.migration.stream import MAGIC

#: The byte flipped, counted from the magic: inside the header's session id, which the
#: header CRC covers.
FLIP_OFFSET = 24


class MigrationProxy:
    """``127.0.0.1:port`` -> ``127.0.0.1:target``, one connection at a time, in a thread.
    ``corrupt``: flip one byte of the first device state envelope that passes."""

    def __init__(self, target: int, *, corrupt: bool = False) -> None:
        self.target = target
        self.corrupt = corrupt
        self.flipped = 0  # envelopes corrupted so far
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept, name="migration-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._carry, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _carry(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        tamper = _Tamper() if self.corrupt else None
        with client, server:
            peers = {client: server, server: client}
            while not self._closing:
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    if sock is client and tamper is not None:
                        data = tamper.feed(data)
                        self.flipped = tamper.flipped
                    with contextlib.suppress(OSError):
                        peers[sock].sendall(data)

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        self._thread.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)


class _Tamper:
    """Flips the byte FLIP_OFFSET after the first MAGIC in a byte stream fed in pieces."""

    def __init__(self) -> None:
        self.seen = 0  # bytes fed so far
        self.tail = b""  # the last bytes of the previous piece (a magic may straddle)
        self.target: int | None = None  # stream offset of the byte to flip
        self.flipped = 0

    def feed(self, data: bytes) -> bytes:
        start = self.seen
        self.seen += len(data)
        if self.flipped:
            return data
        if self.target is None:
            window = self.tail + data
            found = window.find(MAGIC)
            if found < 0:
                self.tail = window[-(len(MAGIC) - 1) :]
                return data
            self.target = start - len(self.tail) + found + FLIP_OFFSET
        if not start <= self.target < self.seen:
            return data
        out = bytearray(data)
        out[self.target - start] ^= 0xFF
        self.flipped = 1
        return bytes(out)
