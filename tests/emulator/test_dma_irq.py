"""testdev's DMA copy and interrupts over real sockets, memfds and eventfds."""

from __future__ import annotations

import errno
import struct

import pytest
import trio

from devices import testdev as td
from emulator.client.core import Client, ClientError, GuestMemory
from emulator.testing.harness import EventFd, GuestRam, ServedDevice, enable_bus_master
from emulator.transport import receive_chunk
from protocol.constants import IrqIndex
from protocol.header import Header

BAR0 = 0
TRIGGER_EVENTFD = 0x24  # DATA_EVENTFD | ACTION_TRIGGER
NONE_UNMASK = 0x11
NONE_MASK = 0x09
NONE_TRIGGER = 0x21


async def write32(client: Client, offset: int, value: int) -> None:
    await client.region_write(BAR0, offset, struct.pack("<I", value))


async def read32(client: Client, offset: int) -> int:
    return int(struct.unpack("<I", await client.region_read(BAR0, offset, 4))[0])


async def start_copy(client: Client, src: int, dst: int, length: int, ctrl: int = 1) -> int:
    await write32(client, td.REG_DMA_SRC, src & 0xFFFFFFFF)
    await write32(client, td.REG_DMA_SRC + 4, src >> 32)
    await write32(client, td.REG_DMA_DST, dst & 0xFFFFFFFF)
    await write32(client, td.REG_DMA_DST + 4, dst >> 32)
    await write32(client, td.REG_DMA_LEN, length)
    await write32(client, td.REG_DMA_CTRL, ctrl)
    with trio.fail_after(5):
        while (status := await read32(client, td.REG_DMA_STATUS)) == td.DMA_BUSY:
            await trio.sleep(0.001)
    return status


# -- DMA ------------------------------------------------------------------------------------


async def test_dma_copy_through_fd_backed_map(client: Client) -> None:
    with GuestRam(0x40000, base=0x100000) as ram:
        await client.dma_map(0x100000, ram.size, fd=ram.fd)
        pattern = bytes(range(256)) * 64  # 16 KiB, crosses pages
        ram.write(0x101000, pattern)
        assert await start_copy(client, 0x101000, 0x120000 + 7, len(pattern)) == td.DMA_DONE
        assert ram.read(0x120000 + 7, len(pattern)) == pattern
        assert await read32(client, td.REG_DMA_DONE) == 1


async def test_dma_copy_through_message_backed_map(client: Client) -> None:
    memory = GuestMemory(0x200000, 0x20000)
    client.serve_dma(memory)
    await client.dma_map(0x200000, memory.size)  # no fd: DMA_READ/DMA_WRITE messages
    pattern = bytes((i * 7) & 0xFF for i in range(0x5000))  # more than several messages
    memory.write(0x200000, pattern)
    assert await start_copy(client, 0x200000, 0x210000, len(pattern)) == td.DMA_DONE
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
        assert await start_copy(client, 0, 0x2000, 4096) == td.DMA_DONE
        assert seen == [1024] * 4


async def test_dma_across_two_maps_of_different_kinds(client: Client) -> None:
    with GuestRam(0x1000) as ram:
        memory = GuestMemory(0x1000, 0x1000)
        client.serve_dma(memory)
        await client.dma_map(0, 0x1000, fd=ram.fd)
        await client.dma_map(0x1000, 0x1000)
        ram.write(0xF00, b"A" * 0x100)
        memory.write(0x1000, b"B" * 0x100)
        assert await start_copy(client, 0xF00, 0x1800, 0x200) == td.DMA_DONE
        assert memory.read(0x1800, 0x200) == b"A" * 0x100 + b"B" * 0x100


async def test_dma_outside_the_maps_faults_without_touching_memory(client: Client) -> None:
    with GuestRam(0x2000) as ram:
        await client.dma_map(0, 0x2000, fd=ram.fd)
        ram.write(0, b"\x55" * 0x2000)
        # Destination runs one byte past the mapping: nothing may be written.
        assert await start_copy(client, 0, 0x1001, 0x1000) == td.DMA_FAILED
        assert await read32(client, td.REG_DMA_ERROR) == errno.EFAULT
        assert ram.read(0, 0x2000) == b"\x55" * 0x2000


async def test_dma_never_writes_a_read_only_map(client: Client) -> None:
    with GuestRam(0x2000) as ram:
        await client.dma_map(0, 0x1000, fd=ram.fd, writable=False)
        await client.dma_map(0x1000, 0x1000, fd=ram.fd, offset=0x1000)
        ram.write(0, b"ro" * 0x800)
        ram.write(0x1000, b"rw" * 0x800)
        assert await start_copy(client, 0x1000, 0, 0x100) == td.DMA_FAILED
        assert ram.read(0, 0x1000) == b"ro" * 0x800
        assert await start_copy(client, 0, 0x1000, 0x100) == td.DMA_DONE  # reading it is fine
        assert ram.read(0x1000, 0x100) == b"ro" * 0x80


async def test_dma_after_unmap_faults(client: Client) -> None:
    with GuestRam(0x2000) as ram:
        await client.dma_map(0, 0x2000, fd=ram.fd)
        await client.dma_unmap(0, 0x2000)
        assert await start_copy(client, 0, 0x1000, 16) == td.DMA_FAILED


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


# -- interrupts -----------------------------------------------------------------------------


async def test_intx_automasks_and_resignals_on_unmask(client: Client) -> None:
    irq = EventFd()
    await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[irq.fd])
    await write32(client, td.REG_DOORBELL, 0)
    assert await irq.wait() == 1
    # Automasked: another doorbell does not signal again.
    await write32(client, td.REG_DOORBELL, 1)
    await trio.sleep(0.05)
    assert irq.take() == 0
    # UNMASK while the line is still asserted (IRQ_STATUS not acked): signalled again.
    await client.set_irqs(IrqIndex.INTX, NONE_UNMASK, 0, 1)
    assert await irq.wait() == 1
    # Ack every cause: the line drops; an unmask then signals nothing.
    await write32(client, td.REG_IRQ_STATUS, 0x3)
    await client.set_irqs(IrqIndex.INTX, NONE_UNMASK, 0, 1)
    await trio.sleep(0.05)
    assert irq.take() == 0
    assert await read32(client, td.REG_IRQ_STATUS) == 0
    irq.close()


async def test_intx_resample_eventfd_unmasks(client: Client) -> None:
    """QEMU's KVM pattern: MASK, UNMASK with a resample eventfd, UNMASK."""
    irq, resample = EventFd(), EventFd()
    await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[irq.fd])
    await client.set_irqs(IrqIndex.INTX, NONE_MASK, 0, 1)
    await client.set_irqs(IrqIndex.INTX, 0x14, 0, 1, fds=[resample.fd])
    await client.set_irqs(IrqIndex.INTX, NONE_UNMASK, 0, 1)
    await write32(client, td.REG_DOORBELL, 0)
    assert await irq.wait() == 1
    resample.signal()  # guest EOI while the line is still asserted
    assert await irq.wait() == 1
    irq.close()
    resample.close()


async def enable_msix(client: Client, served: ServedDevice) -> None:
    cap = served.device.config.find_capability(0x11)
    assert cap is not None
    control = struct.unpack("<H", await client.region_read(7, cap + 2, 2))[0]
    await client.region_write(7, cap + 2, struct.pack("<H", control | 0x8000))


async def unmask_vector(client: Client, vector: int, masked: bool = False) -> None:
    await client.region_write(td.BAR_MSIX, vector * 16 + 12, struct.pack("<I", int(masked)))


async def test_msix_vectors_pending_bits_and_pba(served: ServedDevice, client: Client) -> None:
    fds = [EventFd() for _ in range(4)]
    await enable_msix(client, served)
    await client.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 0, 4, fds=[f.fd for f in fds])
    for vector in range(4):
        await unmask_vector(client, vector)
    await write32(client, td.REG_DOORBELL, 2)
    assert await fds[2].wait() == 1
    assert [f.take() for f in fds] == [0, 0, 0, 0]
    # A masked vector latches its pending bit, visible in the PBA, and fires on unmask.
    await unmask_vector(client, 3, masked=True)
    await write32(client, td.REG_DOORBELL, 3)
    await trio.sleep(0.05)
    assert fds[3].take() == 0
    pba = struct.unpack("<Q", await client.region_read(td.BAR_MSIX, td.PBA_OFFSET, 8))[0]
    assert pba == 1 << 3
    await unmask_vector(client, 3)
    assert await fds[3].wait() == 1
    assert await client.region_read(td.BAR_MSIX, td.PBA_OFFSET, 8) == bytes(8)
    for f in fds:
        f.close()


async def test_msix_vfio_mask_and_chunked_setup(served: ServedDevice, client: Client) -> None:
    """QEMU enables MSI-X with no vectors, then binds vectors one message at a time, and
    masks with DATA_NONE|ACTION_MASK when the device reports MASKABLE."""
    fds = [EventFd() for _ in range(4)]
    await enable_msix(client, served)
    await client.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 0, 1)  # "enable, no vectors"
    for vector in range(4):
        await client.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, vector, 1, fds=[fds[vector].fd])
        await unmask_vector(client, vector)
    await client.set_irqs(IrqIndex.MSIX, NONE_MASK, 1, 1)
    await write32(client, td.REG_DOORBELL, 1)
    await trio.sleep(0.05)
    assert fds[1].take() == 0
    await client.set_irqs(IrqIndex.MSIX, NONE_UNMASK, 1, 1)
    assert await fds[1].wait() == 1
    # Disable the whole index: nothing is delivered any more.
    await client.set_irqs(IrqIndex.MSIX, NONE_TRIGGER, 0, 0)
    await write32(client, td.REG_DOORBELL, 0)
    await trio.sleep(0.05)
    assert fds[0].take() == 0
    for f in fds:
        f.close()


async def test_dma_completion_interrupt(client: Client) -> None:
    irq = EventFd()
    await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[irq.fd])
    with GuestRam(0x2000) as ram:
        await client.dma_map(0, 0x2000, fd=ram.fd)
        ram.write(0, b"irq!")
        ctrl = 1 | 2 | (5 << 8)  # start, interrupt when done, vector 5
        assert await start_copy(client, 0, 0x1000, 4, ctrl) == td.DMA_DONE
        assert await irq.wait() == 1
        assert await read32(client, td.REG_IRQ_STATUS) == 1 << 5
    irq.close()


async def test_ioeventfd_doorbell(client: Client) -> None:
    irq = EventFd()
    await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[irq.fd])
    reply, fds = await client.get_region_io_fds(BAR0)
    assert reply.count == 1 and len(fds) == 1
    entry = reply.entries[0]
    assert (entry.offset, entry.size, entry.fd_index) == (td.REG_IOEVENT, 4, 0)
    doorbell = fds[0]
    import os

    os.write(doorbell, (1).to_bytes(8, "little"))
    assert await irq.wait() == 1
    assert await read32(client, td.REG_IOEVENT_COUNT) == 1
    os.close(doorbell)
    irq.close()


async def test_set_irqs_rules(client: Client) -> None:
    a, b = EventFd(), EventFd()
    cases = [
        # (index, flags, start, count, fds, errno)
        (IrqIndex.MSIX, TRIGGER_EVENTFD, 0, 2, [a.fd], errno.EINVAL),  # fds != count
        (IrqIndex.ERR, NONE_MASK, 0, 1, [], errno.EINVAL),  # ERR only triggers
        (IrqIndex.INTX, NONE_TRIGGER, 1, 0, [], errno.EINVAL),  # disable needs start 0
        (IrqIndex.INTX, NONE_UNMASK, 0, 0, [], errno.EINVAL),  # count 0 is disable only
        (IrqIndex.MSIX, NONE_TRIGGER, 0, 5, [], errno.EINVAL),  # beyond 4 vectors
        (IrqIndex.INTX, 0x21, 0, 1, [a.fd], errno.EINVAL),  # fds with DATA_NONE
    ]
    for index, flags, start, count, fds, expected in cases:
        with pytest.raises(ClientError) as exc:
            await client.set_irqs(index, flags, start, count, fds=fds)
        assert exc.value.errno == expected, (index, flags, start, count)
    # Valid forms are accepted; zero fds with DATA_EVENTFD de-assigns.
    await client.set_irqs(IrqIndex.ERR, TRIGGER_EVENTFD, 0, 1, fds=[b.fd])
    await client.set_irqs(IrqIndex.ERR, TRIGGER_EVENTFD, 0, 1)
    await client.set_irqs(IrqIndex.INTX, NONE_TRIGGER, 0, 0)
    await client.set_irqs(IrqIndex.MSIX, 0x22, 0, 2, data=b"\x01\x00")  # DATA_BOOL trigger
    a.close()
    b.close()


async def test_reset_stops_device_work_and_clears_interrupts(client: Client) -> None:
    irq = EventFd()
    await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[irq.fd])
    await write32(client, td.REG_DOORBELL, 0)
    assert await irq.wait() == 1
    await client.reset()
    assert await read32(client, td.REG_IRQ_STATUS) == 0
    await client.set_irqs(IrqIndex.INTX, NONE_UNMASK, 0, 1)
    await trio.sleep(0.05)
    assert irq.take() == 0  # the line went down with the reset
    irq.close()


async def test_msi_vector_with_per_vector_mask(served: ServedDevice, client: Client) -> None:
    config = served.device.config
    cap = config.find_capability(0x05)
    assert cap is not None
    irq = EventFd()
    control = struct.unpack("<H", await client.region_read(7, cap + 2, 2))[0]
    await client.region_write(7, cap + 2, struct.pack("<H", control | 1))  # MSI enable
    await client.set_irqs(IrqIndex.MSI, TRIGGER_EVENTFD, 0, 1, fds=[irq.fd])
    await write32(client, td.REG_DOORBELL, 0)
    assert await irq.wait() == 1
    mask_offset = cap + 0x10  # 64-bit capability: mask bits after the data register
    await client.region_write(7, mask_offset, struct.pack("<I", 1))
    await write32(client, td.REG_DOORBELL, 0)
    await trio.sleep(0.05)
    assert irq.take() == 0
    assert config.msi_vector_pending(0)  # visible to the guest in the Pending Bits
    await client.region_write(7, mask_offset, struct.pack("<I", 0))
    assert await irq.wait() == 1
    assert not config.msi_vector_pending(0)
    irq.close()


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


async def test_err_and_req_notifications(served: ServedDevice, client: Client) -> None:
    """ERR makes QEMU stop the VM, REQ asks it to unplug the device: both are eventfds the
    client binds, signalled only when the device model asks."""
    err, req = EventFd(), EventFd()
    irq = served.device.irq
    assert not irq.signal_error()  # nothing bound yet: not delivered
    await client.set_irqs(IrqIndex.ERR, TRIGGER_EVENTFD, 0, 1, fds=[err.fd])
    await client.set_irqs(IrqIndex.REQ, TRIGGER_EVENTFD, 0, 1, fds=[req.fd])
    assert irq.signal_error() and await err.wait() == 1
    assert irq.request_release() and await req.wait() == 1
    assert err.take() == req.take() == 0
    err.close()
    req.close()
