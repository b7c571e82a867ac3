"""Property test: random DMA_MAP / DMA_UNMAP / device DMA against a model of the address
space. fd-backed maps share one memfd (so maps may alias the same bytes, as guest RAM
sections do); message-backed maps reach a dict through a fake message channel."""

from __future__ import annotations

import errno
from collections.abc import Coroutine
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from devices.api import DmaFault
from emulator.dma import DirtyLog, DmaEngine, IovaMap
from emulator.testing.harness import GuestRam
from protocol.errors import ProtocolError
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
