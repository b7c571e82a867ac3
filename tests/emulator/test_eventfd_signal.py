"""Client eventfds: signalled without blocking, read without blocking, and their file
status flags (the client's) never changed; over real sockets with a blocking eventfd as
libvfio-user's sample client makes it, and a hostile client saturating its own counter."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from devices import testdev as td
from devices.testdev import TestDev
from emulator import eventfd_signal
from emulator.client import Client
from emulator.eventfd_signal import AioSignaller, Signaller, ThreadSignaller, read_nowait
from emulator.testing.harness import EventFd, enable_bus_master, served_device
from protocol.constants import IrqIndex

TRIGGER_EVENTFD = 0x24  # DATA_EVENTFD | ACTION_TRIGGER
UNMASK_EVENTFD = 0x14  # DATA_EVENTFD | ACTION_UNMASK
MAX_COUNT = 0xFFFFFFFFFFFFFFFE  # an eventfd write blocks while the counter is here


def blocking_eventfd() -> int:
    """An eventfd as libvfio-user's client makes its INTx one: ``eventfd(0, 0)``."""
    return os.eventfd(0, 0)


@pytest.fixture(params=["aio", "thread"])
def each_signaller(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Signaller:
    """The server's signaller, as the process picks it (AIO) and as the fallback."""
    chosen: Signaller = AioSignaller() if request.param == "aio" else ThreadSignaller()
    monkeypatch.setattr(eventfd_signal, "_signaller", chosen)
    return chosen


# -- the signallers on their own ---------------------------------------------------------------


def test_the_process_signals_through_aio_here() -> None:
    # This kernel has AIO: the fallback is for kernels without it, not the normal path.
    assert eventfd_signal.signaller().name == "aio"


@pytest.mark.parametrize("make", [AioSignaller, ThreadSignaller])
def test_each_signal_adds_one_and_flags_stay(make: type[Signaller]) -> None:
    signaller = make()
    fd = blocking_eventfd()
    try:
        for _ in range(3):
            assert signaller.signal(fd)
        deadline = time.monotonic() + 5
        total = 0
        while total < 3 and time.monotonic() < deadline:
            total += os.eventfd_read(fd)  # blocking, as the client reads
        assert total == 3
        assert os.get_blocking(fd)
    finally:
        signaller.forget(fd)
        os.close(fd)


@pytest.mark.parametrize("make", [AioSignaller, ThreadSignaller])
def test_a_saturated_counter_never_blocks_the_signaller(make: type[Signaller]) -> None:
    signaller = make()
    fd = blocking_eventfd()
    try:
        os.eventfd_write(fd, MAX_COUNT)
        started = time.monotonic()
        for _ in range(100):
            signaller.signal(fd)  # a blocking write() would wait for a reader forever
        assert time.monotonic() - started < 2
        assert os.get_blocking(fd)
    finally:
        os.eventfd_read(fd)  # lets a fallback writer thread finish its write
        signaller.forget(fd)
        os.close(fd)


def test_aio_says_no_for_what_is_not_an_eventfd() -> None:
    signaller = AioSignaller()
    read_end, write_end = os.pipe()
    try:
        assert not signaller.signal(write_end)
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 8)  # nothing went into the pipe
    finally:
        os.close(read_end)
        os.close(write_end)
    closed = blocking_eventfd()
    os.close(closed)
    assert not signaller.signal(closed)


def test_aio_reaps_more_completions_than_its_ring_holds() -> None:
    signaller = AioSignaller()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        rounds = 3 * eventfd_signal._RING_EVENTS
        assert all(signaller.signal(fd) for _ in range(rounds))
        assert os.eventfd_read(fd) == rounds
    finally:
        os.close(fd)


def test_read_nowait_reads_a_count_and_never_blocks() -> None:
    fd = blocking_eventfd()
    try:
        assert not read_nowait(fd)  # empty: a plain read() would block here
        os.eventfd_write(fd, 5)
        assert read_nowait(fd)
        assert not read_nowait(fd)
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


# -- over a real socket ------------------------------------------------------------------------


async def read_blocking(fd: int) -> int:
    """The client's blocking ``read()`` of its eventfd, off the trio thread."""
    with trio.fail_after(5):
        return await trio.to_thread.run_sync(os.eventfd_read, fd, abandon_on_cancel=True)


async def test_a_blocking_intx_eventfd_gets_its_interrupt_with_its_flags_kept(
    tmp_path: Path, each_signaller: Signaller
) -> None:
    async with (
        served_device(TestDev(), tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        fd = blocking_eventfd()
        try:
            await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[fd])
            assert os.get_blocking(fd)
            await client.region_write(0, td.REG_DOORBELL, struct.pack("<I", 0))
            assert await read_blocking(fd) == 1
            assert os.get_blocking(fd)
        finally:
            await client.set_irqs(IrqIndex.INTX, 0x21, 0, 0)  # unbind before closing ours
            os.close(fd)


async def test_a_blocking_resample_eventfd_unmasks_and_keeps_its_flags(tmp_path: Path) -> None:
    async with (
        served_device(TestDev(), tmp_path) as served,
        Client.connect(served.socket_path) as client,
    ):
        irq = EventFd()
        resample = blocking_eventfd()
        try:
            await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[irq.fd])
            await client.set_irqs(IrqIndex.INTX, UNMASK_EVENTFD, 0, 1, fds=[resample])
            await client.region_write(0, td.REG_DOORBELL, struct.pack("<I", 0))
            assert await irq.wait() == 1
            for _ in range(3):  # the guest's EOIs while the line is still asserted
                os.eventfd_write(resample, 1)
                assert await irq.wait() == 1
            assert os.get_blocking(resample)
            # The server read each count without blocking; nothing is left for it.
            await trio.sleep(0.05)
            assert not read_nowait(resample)
        finally:
            await client.set_irqs(IrqIndex.INTX, 0x21, 0, 0)
            irq.close()
            os.close(resample)


def saturate(fd: int) -> None:
    """What a hostile client does to its own blocking eventfd: take the count and put it
    within a few of the maximum, so the device's next signals fill it. From then on a
    blocking ``write()`` of 1 waits for a reader. (Called between the client's own
    requests, so no signal of the server lands between its read and its write, and the
    write never blocks the test itself.)"""
    read_nowait(fd)
    os.eventfd_write(fd, MAX_COUNT - 4)


class Rescuer:
    """Takes the hostile eventfd's count every ``HOLD`` seconds from a thread of its own:
    a server that blocks in write() on it is released that much later (and the test then
    fails on its deadline) instead of hanging the test process for ever."""

    HOLD = 2.5  # longer than the other client's patience below

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.HOLD):
            read_nowait(self.fd)

    def __enter__(self) -> Rescuer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.fixture
def hostile_fd() -> Iterator[int]:
    fd = blocking_eventfd()
    yield fd
    os.close(fd)


async def test_a_client_saturating_its_eventfd_in_a_loop_disturbs_no_one(
    tmp_path: Path, hostile_fd: int
) -> None:
    """Two devices in one process; the first one's client re-saturates its MSI-X eventfd
    in a loop while its device fires as fast as the client rings; the second device's client
    is served throughout, and the first device itself keeps answering. (A server that wrote
    the eventfd with a blocking write() stalls here until the Rescuer frees it.) With the
    process's own signaller: the thread fallback writes from other threads, which could land
    between saturate()'s read and write and block the test's own write; its never-blocking
    is tested above without a socket."""
    async with (
        served_device(TestDev(), tmp_path, name="hostile.sock") as hostile_served,
        served_device(TestDev(), tmp_path, name="other.sock") as other_served,
        Client.connect(hostile_served.socket_path) as hostile,
        Client.connect(other_served.socket_path) as other,
    ):
        await enable_bus_master(hostile)
        cap = hostile_served.device.config.find_capability(0x11)
        assert cap is not None
        control = struct.unpack("<H", await hostile.region_read(7, cap + 2, 2))[0]
        await hostile.region_write(7, cap + 2, struct.pack("<H", control | 0x8000))
        await hostile.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 0, 1, fds=[hostile_fd])
        await hostile.region_write(td.BAR_MSIX, 12, struct.pack("<I", 0))  # unmask vector 0
        fired = 0
        answered = 0
        saturations = 0
        with Rescuer(hostile_fd):

            async def ring() -> None:
                nonlocal fired, saturations
                while True:
                    if fired % 8 == 0:
                        saturate(hostile_fd)
                        saturations += 1
                    await hostile.region_write(0, td.REG_DOORBELL, struct.pack("<I", 0))
                    fired += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ring)
                deadline = trio.current_time() + 1.5
                while trio.current_time() < deadline:
                    with trio.fail_after(2):  # a stalled server hangs right here
                        value = await other.region_read(0, td.REG_ID, 4)
                    assert value == struct.pack("<I", td.ID_VALUE)
                    answered += 1
                nursery.cancel_scope.cancel()
            assert saturations > 2
        with trio.fail_after(2):
            assert await hostile.region_read(0, td.REG_ID, 4) == struct.pack("<I", td.ID_VALUE)
        assert fired > 20 and answered > 20
        assert os.get_blocking(hostile_fd)
        await hostile.set_irqs(IrqIndex.MSIX, 0x21, 0, 0)
