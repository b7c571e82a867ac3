"""Interrupts bound with SET_IRQS (emulator/irqs.py) over real sockets and eventfds: INTx with
its automask and UNMASK/resample, MSI and MSI-X (masks, pending bits), ERR/REQ notifications,
and the device interrupts that go with them (DMA completion, ioeventfd doorbells, reset)."""

from __future__ import annotations

import errno
import struct

import pytest
import trio

from devices import testdev as td
from emulator.client import Client, ClientError
from emulator.testing.harness import EventFd, GuestRam, ServedDevice
from emulator.testing.testdev_driver import read32, run_copy, write32
from protocol.constants import IrqIndex

BAR0 = 0
TRIGGER_EVENTFD = 0x24  # DATA_EVENTFD | ACTION_TRIGGER
NONE_UNMASK = 0x11
NONE_MASK = 0x09
NONE_TRIGGER = 0x21


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
        assert await run_copy(client, 0, 0x1000, 4, ctrl) == td.DMA_DONE
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
