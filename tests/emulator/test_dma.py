"""The DMA map and engine (emulator/dma.py).

A property test: random DMA_MAP / DMA_UNMAP / device DMA against a model of the address
space. fd-backed maps share one memfd (so maps may alias the same bytes, as guest RAM
sections do); message-backed maps reach a dict through a fake message channel."""

from __future__ import annotations

import errno
import struct
from collections.abc import Coroutine
from typing import Any

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from devices import testdev as td
from devices.api import DmaFault
from emulator.client import Client, ClientError, GuestMemory
from emulator.dma import DirtyLog, DmaEngine, IovaMap
from emulator.testing.harness import GuestRam, ServedDevice, enable_bus_master
from emulator.testing.testdev_driver import read32, run_copy, write32
from emulator.transport import receive_chunk
from protocol.errors import ProtocolError
from protocol.header import Header
from protocol.messages import DmaMap

SPACE = 0x4000  # IOVAs 0..16 KiB
FILE_SIZE = 0x4000


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never really suspends (fd maps and the fake channel)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("coroutine suspended")


class FakeChannel:
    max_transfer = 100  # small, so transfers split into several messages

    def __init__(self) -> None:
        self.memory: dict[int, int] = {}
        self.messages = 0

    async def checkpoint(self) -> None:
        return None

    async def dma_read(self, address: int, count: int) -> bytes:
        assert count <= self.max_transfer
        self.messages += 1
        return bytes(self.memory.get(address + i, 0) for i in range(count))

    async def dma_write(self, address: int, data: bytes) -> None:
        assert len(data) <= self.max_transfer
        self.messages += 1
        for i, byte in enumerate(data):
            self.memory[address + i] = byte


addresses = st.integers(0, SPACE - 1)
sizes = st.integers(1, 0x1800)


class DmaModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ram = GuestRam(FILE_SIZE)
        self.channel = FakeChannel()
        self.maps = IovaMap(max_maps=6)
        self.dirty = DirtyLog()
        self.dirty_pages: set[int] = set()  # 256-byte pages the engine said it wrote
        self.dirty.sink = self._record_dirty
        self.engine = DmaEngine(self.maps, self.channel, self.dirty)
        # model: iova range -> (writable, file offset or None for message-backed)
        self.model: dict[tuple[int, int], tuple[bool, int | None]] = {}
        self.file = bytearray(FILE_SIZE)

    def _record_dirty(self, iova: int, length: int) -> None:
        if length:
            self.dirty_pages.update(range(iova // 0x100, (iova + length - 1) // 0x100 + 1))

    def teardown(self) -> None:
        self.maps.clear()
        self.ram.close()

    def _where(self, iova: int) -> tuple[bool, int | None, int] | None:
        for (start, size), (writable, offset) in self.model.items():
            if start <= iova < start + size:
                return writable, offset, iova - start
        return None

    @rule(
        address=addresses,
        size=sizes,
        use_fd=st.booleans(),
        writable=st.booleans(),
        file_offset=st.integers(0, FILE_SIZE - 1),
    )
    def map(self, address: int, size: int, use_fd: bool, writable: bool, file_offset: int) -> None:
        if use_fd:
            size = min(size, FILE_SIZE - file_offset)
        offset = file_offset if use_fd else 0
        request = DmaMap(32, 1 | (2 if writable else 0), offset, address, size)
        fd = None
        if use_fd:
            import os

            fd = os.dup(self.ram.fd)
        overlaps = [r for r in self.model if r[0] < address + size and address < r[0] + r[1]]
        identical = overlaps == [(address, size)] and self.model[(address, size)] == (
            writable,
            offset if use_fd else None,
        )
        try:
            self.maps.add(request, fd)
        except ProtocolError as exc:
            if overlaps and not identical:
                assert exc.errno == errno.EEXIST
            else:
                assert len(self.model) >= self.maps.max_maps and exc.errno == errno.ENOSPC
            return
        assert not overlaps or identical
        self.model[(address, size)] = (writable, offset if use_fd else None)

    @rule(data=st.data())
    def unmap(self, data: st.DataObject) -> None:
        choices = [*self.model, (data.draw(addresses), data.draw(sizes))]
        address, size = data.draw(st.sampled_from(choices))
        try:
            self.maps.remove(address, size)
        except ProtocolError as exc:
            assert exc.errno == errno.ENOENT and (address, size) not in self.model
            return
        del self.model[(address, size)]

    @rule(iova=addresses, length=st.integers(0, 0x800), fill=st.integers(0, 255))
    def write(self, iova: int, length: int, fill: int) -> None:
        data = bytes((fill + i) & 0xFF for i in range(length))
        places = [self._where(iova + i) for i in range(length)]
        allowed = all(p is not None and p[0] for p in places)
        before_file, before_msgs = bytes(self.ram.map[:]), dict(self.channel.memory)
        try:
            run(self.engine.write(iova, data))
        except DmaFault:
            assert not allowed
            # nothing moved: no partial writes into memory
            assert bytes(self.ram.map[:]) == before_file and self.channel.memory == before_msgs
            return
        assert allowed
        for i, place in enumerate(places):
            assert place is not None
            _, offset, inner = place
            if offset is not None:
                self.file[offset + inner] = data[i]
        assert self.dirty_pages >= {(iova + i) // 0x100 for i in range(length)}

    @rule(iova=addresses, length=st.integers(0, 0x800))
    def read(self, iova: int, length: int) -> None:
        places = [self._where(iova + i) for i in range(length)]
        try:
            got = run(self.engine.read(iova, length))
        except DmaFault:
            assert any(p is None for p in places)
            return
        assert all(p is not None for p in places)
        for i, place in enumerate(places):
            assert place is not None
            _, offset, inner = place
            if offset is not None:
                assert got[i] == self.file[offset + inner]
            else:
                assert got[i] == self.channel.memory.get(iova + i, 0)

    @invariant()
    def file_matches_model(self) -> None:
        assert bytes(self.ram.map[:]) == bytes(self.file)

    @invariant()
    def map_count_matches(self) -> None:
        assert len(self.maps) == len(self.model)


TestDmaModel = DmaModel.TestCase
TestDmaModel.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_scatter_gather_checks_every_segment_before_moving_a_byte() -> None:
    with GuestRam(0x4000) as ram:
        import os

        maps = IovaMap(max_maps=4)
        maps.add(DmaMap(32, 3, 0, 0x0, 0x2000), os.dup(ram.fd))
        maps.add(DmaMap(32, 1, 0x2000, 0x2000, 0x1000), os.dup(ram.fd))  # read-only
        engine = DmaEngine(maps, FakeChannel(), DirtyLog())
        ram.write(0x0, b"AAAA")
        ram.write(0x1FFE, b"BBCC")  # straddles the two maps
        assert run(engine.read_sg([(0x0, 4), (0x1FFE, 4)])) == b"AAAABBCC"
        run(engine.write_sg([(0x100, 2), (0x1000, 3)], b"xyzzy"))
        assert ram.read(0x100, 2) == b"xy" and ram.read(0x1000, 3) == b"zzy"
        # One segment into the read-only map: nothing at all is written.
        try:
            run(engine.write_sg([(0x200, 2), (0x2000, 2)], b"1234"))
        except DmaFault:
            pass
        else:
            raise AssertionError("a write into a read-only map must fault")
        assert ram.read(0x200, 2) == bytes(2)
        try:
            run(engine.write_sg([(0x0, 2)], b"toolong"))
        except DmaFault:
            pass
        else:
            raise AssertionError("segments and data of different lengths must fault")
        maps.clear()


def test_device_writes_keep_nothing_without_a_logging_session() -> None:
    """A connection's DMA writes go to its dirty-page logging, which keeps pages only while
    a session runs: writing every page of 16 MiB of guest memory leaves no per-page objects
    behind (the dirty log once kept a set of every page ever written, which nothing read)."""
    import gc
    import os
    import sys

    from emulator.dirty import LoggingFeature

    pages = 4096
    with GuestRam(pages * 0x1000) as ram:
        maps = IovaMap(max_maps=1)
        maps.add(DmaMap(32, 3, 0, 0x0, pages * 0x1000), os.dup(ram.fd))
        dirty = DirtyLog()
        logging = LoggingFeature(lambda iova, length: True)
        dirty.sink = logging.record  # as a connection wires them
        engine = DmaEngine(maps, FakeChannel(), dirty)
        run(engine.write(0x0, b"warm"))
        gc.collect()
        blocks_before = sys.getallocatedblocks()
        for page in range(pages):
            run(engine.write(page * 0x1000 + 8, b"x"))
        gc.collect()
        grown = sys.getallocatedblocks() - blocks_before
        assert logging.session is None
        assert grown < pages // 8, f"{grown} blocks kept after writing {pages} pages"
        assert ram.read(0x3000 + 8, 1) == b"x"
        maps.clear()


# -- device DMA over a real socket (testdev's copy engine) --------------------------------


async def test_dma_copy_through_fd_backed_map(client: Client) -> None:
    with GuestRam(0x40000, base=0x100000) as ram:
        await client.dma_map(0x100000, ram.size, fd=ram.fd)
        pattern = bytes(range(256)) * 64  # 16 KiB, crosses pages
        ram.write(0x101000, pattern)
        assert await run_copy(client, 0x101000, 0x120000 + 7, len(pattern)) == td.DMA_DONE
        assert ram.read(0x120000 + 7, len(pattern)) == pattern
        assert await read32(client, td.REG_DMA_DONE) == 1


async def test_dma_copy_through_message_backed_map(client: Client) -> None:
    memory = GuestMemory(0x200000, 0x20000)
    client.serve_dma(memory)
    await client.dma_map(0x200000, memory.size)  # no fd: DMA_READ/DMA_WRITE messages
    pattern = bytes((i * 7) & 0xFF for i in range(0x5000))  # more than several messages
    memory.write(0x200000, pattern)
    assert await run_copy(client, 0x200000, 0x210000, len(pattern)) == td.DMA_DONE
    assert memory.read(0x210000, len(pattern)) == pattern


async def test_dma_messages_respect_the_clients_transfer_size(served: ServedDevice) -> None:
    async with Client.connect(
        served.socket_path, capabilities={"max_msg_fds": 8, "max_data_xfer_size": 1024}
    ) as client:
        await enable_bus_master(client)
        seen: list[int] = []

        class Recording(GuestMemory):
            def read(self, address: int, count: int) -> bytes:
                seen.append(count)
                return super().read(address, count)

        memory = Recording(0, 0x4000)
        client.serve_dma(memory)
        await client.dma_map(0, memory.size)
        assert await run_copy(client, 0, 0x2000, 4096) == td.DMA_DONE
        assert seen == [1024] * 4


async def test_dma_across_two_maps_of_different_kinds(client: Client) -> None:
    with GuestRam(0x1000) as ram:
        memory = GuestMemory(0x1000, 0x1000)
        client.serve_dma(memory)
        await client.dma_map(0, 0x1000, fd=ram.fd)
        await client.dma_map(0x1000, 0x1000)
        ram.write(0xF00, b"A" * 0x100)
        memory.write(0x1000, b"B" * 0x100)
        assert await run_copy(client, 0xF00, 0x1800, 0x200) == td.DMA_DONE
        assert memory.read(0x1800, 0x200) == b"A" * 0x100 + b"B" * 0x100


async def test_dma_outside_the_maps_faults_without_touching_memory(client: Client) -> None:
    with GuestRam(0x2000) as ram:
        await client.dma_map(0, 0x2000, fd=ram.fd)
        ram.write(0, b"\x55" * 0x2000)
        # Destination runs one byte past the mapping: nothing may be written.
        assert await run_copy(client, 0, 0x1001, 0x1000) == td.DMA_FAILED
        assert await read32(client, td.REG_DMA_ERROR) == errno.EFAULT
        assert ram.read(0, 0x2000) == b"\x55" * 0x2000


async def test_dma_never_writes_a_read_only_map(client: Client) -> None:
    with GuestRam(0x2000) as ram:
        await client.dma_map(0, 0x1000, fd=ram.fd, writable=False)
        await client.dma_map(0x1000, 0x1000, fd=ram.fd, offset=0x1000)
        ram.write(0, b"ro" * 0x800)
        ram.write(0x1000, b"rw" * 0x800)
        assert await run_copy(client, 0x1000, 0, 0x100) == td.DMA_FAILED
        assert ram.read(0, 0x1000) == b"ro" * 0x800
        assert await run_copy(client, 0, 0x1000, 0x100) == td.DMA_DONE  # reading it is fine
        assert ram.read(0x1000, 0x100) == b"ro" * 0x80


async def test_dma_after_unmap_faults(client: Client) -> None:
    with GuestRam(0x2000) as ram:
        await client.dma_map(0, 0x2000, fd=ram.fd)
        await client.dma_unmap(0, 0x2000)
        assert await run_copy(client, 0, 0x1000, 16) == td.DMA_FAILED


async def test_dma_map_rules(served: ServedDevice, client: Client) -> None:
    with GuestRam(0x4000) as ram:
        await client.dma_map(0, 0x2000, fd=ram.fd)
        await client.dma_map(0, 0x2000, fd=ram.fd)  # identical re-map: accepted
        with pytest.raises(ClientError) as exc:
            await client.dma_map(0x1000, 0x2000, fd=ram.fd, offset=0x1000)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(ClientError) as exc:
            await client.dma_unmap(0, 0x1000)  # not the exact range
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(ClientError) as exc:
            await client.dma_map(0x10000, 0x8000, fd=ram.fd)  # file too small
        assert exc.value.errno == errno.EINVAL
        await client.dma_map(0x2000, 0x1000)
        await client.dma_unmap(unmap_all=True)
        session = served.server.active
        assert session is not None and len(session.maps) == 0


async def test_dma_map_limit(tmp_path) -> None:
    from devices.testdev import TestDev
    from emulator.testing.harness import served_device
    from protocol.version import ServerCapabilities

    caps = ServerCapabilities(max_dma_maps=3)
    async with (
        served_device(TestDev(), tmp_path, capabilities=caps) as served,
        Client.connect(served.socket_path) as client,
    ):
        for i in range(3):
            await client.dma_map(i * 0x1000, 0x1000)
        with pytest.raises(ClientError) as exc:
            await client.dma_map(0x10000, 0x1000)
        assert exc.value.errno == errno.ENOSPC


async def test_unmap_during_message_dma_stops_the_transfer(client: Client) -> None:
    """A copy in flight over DMA messages must not touch a range once its unmap is
    answered: the device sees a fault, the rest of the range is never accessed."""
    unmapped = trio.Event()
    first_read = trio.Event()
    reads_after_unmap: list[int] = []

    class Slow(GuestMemory):
        def read(self, address: int, count: int) -> bytes:
            if unmapped.is_set():
                reads_after_unmap.append(address)
            first_read.set()
            return super().read(address, count)

    memory = Slow(0, 0x40000)
    client.serve_dma(memory)
    await client.dma_map(0, 0x40000)
    for reg, value in [(td.REG_DMA_SRC, 0), (td.REG_DMA_DST, 0x30000), (td.REG_DMA_LEN, 0x8000)]:
        await write32(client, reg, value)
    await write32(client, td.REG_DMA_CTRL, 1)
    await first_read.wait()
    await client.dma_unmap(0, 0x40000)
    unmapped.set()
    with trio.fail_after(5):
        while (status := await read32(client, td.REG_DMA_STATUS)) == td.DMA_BUSY:
            await trio.sleep(0.001)
    # The 32 KiB copy needs 32 one-KiB... (1 MiB transfer size: 1 read); either the copy
    # finished before the unmap was processed, or it failed and stopped reading.
    assert status in (td.DMA_DONE, td.DMA_FAILED)
    if status == td.DMA_FAILED:
        assert reads_after_unmap == []


async def test_in_band_dma_with_qemu_layout(served: ServedDevice) -> None:
    """A client proposing minor 0 (QEMU) gets DMA_WRITE with data at payload offset 12 and
    has its DMA_READ replies parsed that way, even when the data starts with zeros."""
    from emulator.transport import send_message
    from protocol.constants import Command as C
    from protocol.header import pack_message, pack_reply
    from protocol.messages import DmaMap, RegionAccess, RegionData, VersionPayload
    from tests.emulator.test_connection import raw_socket, receive_message

    sock = await raw_socket(served.socket_path)
    source = b"\0\0\0\0QEMU layout data" * 4
    guest: dict[int, bytes] = {}

    async def call(msg_id: int, command: int, payload: bytes) -> bytes:
        await send_message(sock, pack_message(msg_id, command, payload))
        while True:
            header, body = await receive_message(sock)
            if header.is_reply:
                assert header.msg_id == msg_id and not header.is_error
                return body
            # A DMA request from the server, in QEMU's layout.
            address, count = struct.unpack_from("<QI", body)
            if header.command == C.DMA_READ:
                reply = struct.pack("<QI", address, count) + source[:count] + b"\xee" * 4
            else:
                guest[address] = body[12 : 12 + count]
                reply = b""  # QEMU answers DMA_WRITE header-only
            await send_message(sock, pack_reply(header.msg_id, header.command, reply))

    await call(1, C.VERSION, VersionPayload(0, 0, "{}").pack())
    await call(2, C.REGION_WRITE, RegionData(4, 7, 2, b"\x06\x00").pack())  # memory + bus master
    await call(2, C.DMA_MAP, DmaMap(32, 3, 0, 0x10000, 0x10000).pack())
    for msg_id, (reg, value) in enumerate(
        [
            (td.REG_DMA_SRC, 0x10000),
            (td.REG_DMA_DST, 0x18000),
            (td.REG_DMA_LEN, len(source)),
            (td.REG_DMA_CTRL, 1),
        ],
        start=3,
    ):
        await call(msg_id, C.REGION_WRITE, RegionData(reg, 0, 4, struct.pack("<I", value)).pack())
    with trio.fail_after(5):
        while True:
            body = await call(20, C.REGION_READ, RegionAccess(td.REG_DMA_STATUS, 0, 4).pack())
            if struct.unpack_from("<I", body, 16)[0] != td.DMA_BUSY:
                break
    assert struct.unpack_from("<I", body, 16)[0] == td.DMA_DONE
    assert guest == {0x18000: source}
    sock.close()


async def test_reset_during_large_message_dma_keeps_the_stream_intact(
    served: ServedDevice,
) -> None:
    """DEVICE_RESET arrives while the device is blocked half-way through sending a 1 MiB
    DMA_WRITE (the client stopped reading): the message still goes out whole, the reset is
    answered, and the byte stream stays in sync."""
    from emulator.transport import send_message
    from protocol.constants import Command as C
    from protocol.header import pack_message, pack_reply
    from protocol.messages import DmaMap, RegionData, VersionPayload
    from tests.emulator.test_connection import raw_socket, receive_message

    size = 1 << 20
    sock = await raw_socket(served.socket_path)

    async def command(msg_id: int, cmd: int, payload: bytes) -> None:
        await send_message(sock, pack_message(msg_id, cmd, payload))

    await command(1, C.VERSION, VersionPayload(0, 2, "{}").pack())
    assert (await receive_message(sock))[0].msg_id == 1
    await command(2, C.DMA_MAP, DmaMap(32, 3, 0, 0, 4 * size).pack())
    assert (await receive_message(sock))[0].msg_id == 2
    await command(2, C.REGION_WRITE, RegionData(4, 7, 2, b"\x06\x00").pack())  # bus master on
    assert (await receive_message(sock))[0].msg_id == 2
    for msg_id, (reg, value) in enumerate(
        [
            (td.REG_DMA_SRC, 0),
            (td.REG_DMA_DST, size),
            (td.REG_DMA_LEN, 2 * size),
            (td.REG_DMA_CTRL, 1),
        ],
        start=3,
    ):
        await command(
            msg_id, C.REGION_WRITE, RegionData(reg, 0, 4, struct.pack("<I", value)).pack()
        )
    with trio.fail_after(10):
        # Answer the DMA_READs until the first DMA_WRITE starts, then read only its header.
        while True:
            data = b""
            while len(data) < 16:
                chunk, _ = await receive_chunk(sock, 16 - len(data), 0)
                data += chunk
            header = Header.unpack(data)
            if header.command == C.DMA_WRITE:
                break
            if header.is_reply:
                await read_rest(sock, header)
                continue
            body = await read_rest(sock, header)
            address, count = struct.unpack_from("<QQ", body)
            reply = struct.pack("<QQ", address, count) + bytes(count)
            await send_message(sock, pack_reply(header.msg_id, header.command, reply))
        await trio.sleep(0.2)  # the server is now blocked mid-message: its socket buffer is full
        await command(50, C.DEVICE_RESET, b"")
        rest = await read_rest(sock, header)  # the rest of the DMA_WRITE must arrive intact
        assert len(rest) == header.payload_size
        await send_message(sock, pack_reply(header.msg_id, C.DMA_WRITE, b""))
        while True:
            answer, _ = await receive_message(sock)
            if answer.is_reply and answer.msg_id == 50:
                break
            assert answer.command in (C.DMA_WRITE, C.REGION_WRITE), answer  # well-formed
        assert not answer.is_error
    sock.close()


async def read_rest(sock: trio.socket.SocketType, header: Header) -> bytes:
    body = b""
    while len(body) < header.payload_size:
        chunk, _ = await receive_chunk(sock, header.payload_size - len(body), 0)
        assert chunk, "connection closed mid-message"
        body += chunk
    return body
