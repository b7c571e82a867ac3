"""The man in the middle of QEMU's migration stream, over real loopback sockets."""

from __future__ import annotations

import socket
import threading

from devices.migration.stream import MAGIC
from emulator.tools.migration_proxy import FLIP_OFFSET, MigrationProxy


def carry(data: bytes, pieces: list[int], *, corrupt: bool) -> tuple[bytes, bytes, int]:
    """Send ``data`` through a proxy in pieces of the given sizes; returns what the far end
    received, what came back on the return path and how many envelopes were flipped."""
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def far_end() -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"return path")
            while chunk := connection.recv(4096):
                received.extend(chunk)

    thread = threading.Thread(target=far_end)
    thread.start()
    proxy = MigrationProxy(server.getsockname()[1], corrupt=corrupt)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            back = client.recv(64)
            pos = 0
            for size in pieces:
                client.sendall(data[pos : pos + size])
                pos += size
            client.sendall(data[pos:])
        thread.join(timeout=10)
    finally:
        proxy.close()
        server.close()
    return bytes(received), back, proxy.flipped


STREAM = b"qemu header " * 50 + MAGIC + bytes(range(256)) * 4 + MAGIC + bytes(100)


def test_forwards_untouched_unless_asked() -> None:
    received, back, flipped = carry(STREAM, [100, 7, 500], corrupt=False)
    assert received == STREAM and back == b"return path" and flipped == 0


def test_flips_one_byte_of_the_first_envelope_even_across_pieces() -> None:
    magic_at = STREAM.index(MAGIC)
    # cut inside the magic and again just before the byte to flip
    received, _, flipped = carry(STREAM, [magic_at + 3, FLIP_OFFSET - 4], corrupt=True)
    assert flipped == 1
    differing = [i for i, (a, b) in enumerate(zip(received, STREAM, strict=True)) if a != b]
    assert differing == [magic_at + FLIP_OFFSET]
    assert received[magic_at + FLIP_OFFSET] == STREAM[magic_at + FLIP_OFFSET] ^ 0xFF
