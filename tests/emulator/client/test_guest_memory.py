"""Guest memory migrated with the device through the source's DMA dirty-page log.

Two testdev servers, each with its OWN guest memory (a memfd mapped with DMA_MAP, or memory
the client serves with DMA_READ/DMA_WRITE messages): the source device copies data around
its guest memory by DMA while it is migrated, and afterwards the destination's memory must
be the source's memory as the source device left it when it stopped. With the log's pages
ignored (everything else the same) the destination's memory is stale: the log is what
makes the device+memory migration consistent.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import testdev as td
from devices.e1000 import E1000, E1000Options
from devices.e1000 import regs as e1000_regs
from emulator.client import Client, ClientError, GuestMemory
from emulator.client import guest_memory as gmm
from emulator.client.guest_memory import GuestMemoryMigration, MemoryCopyReport
from emulator.client.migrate import (
    DATA_FD_CAPABILITIES,
    MigrationError,
    Transport,
    get_state,
    migrate,
)
from emulator.testing.guest_e1000 import DriverConfig, E1000Guest
from emulator.testing.harness import GuestRam, enable_bus_master, served_device
from emulator.testing.testdev_driver import copy, program_copy, read32
from protocol.constants import FEATURE_GET, FEATURE_SET, DeviceFeature, MigState
from tests.scenarios.test_e1000_pair import nic_pair, numbered, seq_of

BAR0 = 0
RAM_BASE = 0x100000
RAM_SIZE = 0x40000  # 64 pages
PAGE = 4096
Memory = GuestRam | GuestMemory


def contents(memory: Memory) -> bytes:
    return memory.read(RAM_BASE, RAM_SIZE)


def differing_pages(a: bytes, b: bytes) -> list[int]:
    return [
        p for p in range(len(a) // PAGE) if a[p * PAGE : (p + 1) * PAGE] != b[p * PAGE :][:PAGE]
    ]


@dataclass
class Rig:
    src: Client
    dst: Client
    src_mem: Memory
    dst_mem: Memory

    def pair(self, kind: type[GuestMemoryMigration] = GuestMemoryMigration) -> GuestMemoryMigration:
        return kind.between(self.src_mem, self.dst_mem)


@asynccontextmanager
async def rig(
    directory: Path, *, messages: bool = False, transport: Transport = "inband"
) -> AsyncIterator[Rig]:
    """Two served testdevs; each client maps its own guest memory (memfd by default, or
    memory served with DMA messages), the source's filled with random bytes. Clients for
    the fd transport negotiate migration data fds."""
    wanted = DATA_FD_CAPABILITIES if transport == "fd" else None
    async with (
        served_device(td.TestDev(), directory, name="src.sock") as src_served,
        served_device(td.TestDev(), directory, name="dst.sock") as dst_served,
        Client.connect(src_served.socket_path, capabilities=wanted) as src,
        Client.connect(dst_served.socket_path, capabilities=wanted) as dst,
    ):
        memories: list[Memory] = []
        try:
            for client in (src, dst):
                if messages:
                    memories.append(GuestMemory(RAM_BASE, RAM_SIZE))
                    client.serve_dma(memories[-1])
                    await client.dma_map(RAM_BASE, RAM_SIZE)
                else:
                    ram = GuestRam(RAM_SIZE, base=RAM_BASE)
                    memories.append(ram)
                    await client.dma_map(RAM_BASE, RAM_SIZE, fd=ram.fd)
            memories[0].write(RAM_BASE, os.urandom(RAM_SIZE))
            await enable_bus_master(src)
            yield Rig(src, dst, memories[0], memories[1])
        finally:
            for memory in memories:
                if isinstance(memory, GuestRam):
                    memory.close()


class IgnoringTheLog(GuestMemoryMigration):
    """A driver that reads (and so clears) the device's log but copies none of its pages:
    what migrating without device dirty tracking amounts to."""

    async def read_dirty_log(self, client: Client) -> set[int]:
        await super().read_dirty_log(client)
        return set()


async def logging_started(client: Client) -> bool:
    request = struct.pack("<QQQ", RAM_BASE, PAGE, PAGE)
    try:
        await client.device_feature(
            FEATURE_GET | DeviceFeature.DMA_LOGGING_REPORT, request, argsz=8 + 24 + 8
        )
    except ClientError as exc:
        assert exc.errno == errno.EINVAL
        return False
    return True


def round_copies(
    rig_: Rig, moves: list[list[tuple[int, int, int]]]
) -> Callable[[int, int], Awaitable[None]]:
    """A pre-copy hook: in round r the device does the DMA copies ``moves[r - 1]``."""

    async def hook(round_number: int, moved: int) -> None:
        assert await get_state(rig_.src) == MigState.PRE_COPY
        for src, dst, length in moves[round_number - 1] if round_number <= len(moves) else []:
            await copy(rig_.src, RAM_BASE + src, RAM_BASE + dst, length)

    return hook


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["inband", "fd"])
@pytest.mark.parametrize("ignore_log", [False, True], ids=["log-used", "log-ignored"])
async def test_the_dirty_log_makes_precopy_consistent(
    tmp_path: Path, ignore_log: bool, transport: Transport
) -> None:
    async with rig(tmp_path, transport=transport) as r:
        # Round r: the device copies page 2r (random bytes) onto page 40 + r, a page that
        # went to the destination in the first full copy.
        moves = [[(2 * n * PAGE, (40 + n) * PAGE, PAGE)] for n in range(1, 4)]
        before = contents(r.src_mem)
        pair = r.pair(IgnoringTheLog if ignore_log else GuestMemoryMigration)
        report = await migrate(
            r.src,
            r.dst,
            mode="pre-copy",
            precopy_rounds=3,
            precopy_threshold=0,
            on_precopy_round=round_copies(r, moves),
            guest_memory=pair,
            transport=transport,
        )
        assert await get_state(r.dst) == MigState.RUNNING
        memory = report.memory
        assert memory is not None and memory.initial_pages == RAM_SIZE // PAGE
        assert "guest pages copied" in "\n".join(report.lines())
        written = differing_pages(before, contents(r.src_mem))
        # Ignoring the log, round 2 looks clean (no device data, no dirty pages): pre-copy
        # "converges" after it, and round 3's copy never happens.
        assert written == ([41, 42] if ignore_log else [41, 42, 43])
        stale = differing_pages(contents(r.src_mem), contents(r.dst_mem))
        if ignore_log:
            assert stale == written  # exactly the pages the device wrote after the first copy
            assert memory.precopy_pages == memory.stop_copy_pages == 0
            assert report.precopy_rounds == 2
        else:
            assert stale == []
            # Round n's copy lands after round n's REPORT: it goes with round n + 1, the
            # last one with the source stopped.
            assert memory.round_pages == (0, 1, 1)
            assert memory.stop_copy_pages == 1
        assert not await logging_started(r.src)  # stopped at the end


@pytest.mark.parametrize("ignore_log", [False, True], ids=["log-used", "log-ignored"])
@pytest.mark.parametrize("messages", [False, True], ids=["memfd", "dma-messages"])
async def test_device_dma_running_throughout_the_migration(
    tmp_path: Path, messages: bool, ignore_log: bool
) -> None:
    """The guest keeps the device copying while it migrates (no pause between copies, and
    the copies race the driver's REPORTs and the stop). The destination's memory is the
    source's as of the stop -- plus the one copy that may have been queued and not run on
    the source, which the destination runs on resume. Ignoring the log, it is not."""
    rng = random.Random(7 + messages)
    async with rig(tmp_path, messages=messages) as r:
        copies = 0

        async def guest() -> None:
            nonlocal copies
            while True:
                length = rng.randrange(1, 3 * PAGE)
                src = rng.randrange(0, RAM_SIZE - length)
                dst = rng.randrange(0, RAM_SIZE - length)
                try:
                    await program_copy(r.src, RAM_BASE + src, RAM_BASE + dst, length)
                except ClientError as exc:  # BAR0 refuses writes in STOP_COPY: the VM
                    assert exc.errno == errno.EINVAL  # is stopped, so are its vCPUs
                    return
                while await read32(r.src, td.REG_DMA_STATUS) == td.DMA_BUSY:
                    await trio.sleep(0)
                copies += 1

        async def round_takes_a_while(round_number: int, moved: int) -> None:
            done = copies  # the guest runs on meanwhile: a few more copies at least
            with trio.fail_after(5):
                while copies < done + 2:
                    await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest)
            await trio.sleep(0.01)
            before = copies
            report = await migrate(
                r.src, r.dst, mode="pre-copy", precopy_rounds=4, precopy_threshold=0,
                on_precopy_round=round_takes_a_while,
                guest_memory=r.pair(IgnoringTheLog if ignore_log else GuestMemoryMigration),
            )  # fmt: skip
            nursery.cancel_scope.cancel()
        assert copies - before >= 4  # copies completed while migrating
        expected = bytearray(contents(r.src_mem))  # nothing writes the stopped source's memory
        with trio.fail_after(5):
            while await read32(r.dst, td.REG_DMA_STATUS) == td.DMA_BUSY:
                await trio.sleep(0.001)
        if await read32(r.dst, td.REG_DMA_DONE) == await read32(r.src, td.REG_DMA_DONE) + 1:
            # A copy was queued when the source stopped: the destination ran it.
            src = await read32(r.dst, td.REG_DMA_SRC) - RAM_BASE
            dst = await read32(r.dst, td.REG_DMA_DST) - RAM_BASE
            length = await read32(r.dst, td.REG_DMA_LEN)
            expected[dst : dst + length] = expected[src : src + length]
        stale = differing_pages(bytes(expected), contents(r.dst_mem))
        memory = report.memory
        assert memory is not None and memory.initial_pages == RAM_SIZE // PAGE
        if ignore_log:
            assert stale != []
        else:
            assert stale == []
            assert report.precopy_rounds == 4 and memory.precopy_pages > 0


async def test_stop_copy_copies_all_memory_once_the_source_is_stopped(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await copy(r.src, RAM_BASE, RAM_BASE + 0x8000, 0x2000)
        report = await migrate(r.src, r.dst, guest_memory=r.pair())
        assert report.memory == MemoryCopyReport(
            page_size=PAGE,
            total_pages=RAM_SIZE // PAGE,
            initial_pages=0,
            precopy_pages=0,
            stop_copy_pages=RAM_SIZE // PAGE,
        )
        assert contents(r.dst_mem) == contents(r.src_mem)
        assert not await logging_started(r.src)  # stop-copy needs no log


async def test_cpu_writes_marked_dirty_are_copied(tmp_path: Path) -> None:
    """Writes the VMM tracks itself (the guest's CPU) come along when announced."""
    async with rig(tmp_path) as r:
        pair = r.pair()

        async def cpu_writes(round_number: int, moved: int) -> None:
            address = RAM_BASE + (10 + round_number) * PAGE + 100
            r.src_mem.write(address, b"cpu %d" % round_number)
            pair.mark_dirty(address, 5)

        report = await migrate(
            r.src, r.dst, mode="pre-copy", precopy_rounds=2, precopy_threshold=0,
            on_precopy_round=cpu_writes, guest_memory=pair,
        )  # fmt: skip
        assert contents(r.dst_mem) == contents(r.src_mem)
        assert report.memory is not None and report.memory.round_pages == (0, 1)


async def test_failed_migration_stops_the_log(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:

        async def lose_destination(round_number: int, moved: int) -> None:
            await r.dst.aclose()

        with pytest.raises(MigrationError) as info:
            await migrate(
                r.src, r.dst, mode="pre-copy", on_precopy_round=lose_destination,
                guest_memory=r.pair(),
            )  # fmt: skip
        assert "source DMA logging stopped" in info.value.recovery
        assert await get_state(r.src) == MigState.RUNNING
        assert not await logging_started(r.src)


async def test_logging_started_by_someone_else_fails_cleanly(tmp_path: Path) -> None:
    """DMA_LOGGING_START with other parameters than a session already running is refused
    (EINVAL): the migration fails and both devices are as before."""
    async with rig(tmp_path) as r:
        other = struct.pack("<QII", 2 * PAGE, 0, 0)
        await r.src.device_feature(FEATURE_SET | DeviceFeature.DMA_LOGGING_START, other)
        with pytest.raises(MigrationError) as info:
            await migrate(r.src, r.dst, mode="pre-copy", guest_memory=r.pair())
        assert info.value.errno == errno.EINVAL
        assert "logging" in info.value.stage
        assert await get_state(r.src) == MigState.RUNNING
        assert await get_state(r.dst) == MigState.RUNNING


def test_memory_pairs_are_checked() -> None:
    with GuestRam(0x4000, base=0x1000) as a, GuestRam(0x4000, base=0x2000) as b:
        with pytest.raises(ValueError, match="not where"):
            GuestMemoryMigration.between(a, b)
        with pytest.raises(ValueError, match="aligned"):
            GuestMemoryMigration(a, b, [(0x1000, 0x800)])
        with pytest.raises(ValueError, match="overlaps"):
            GuestMemoryMigration(a, b, [(0x1000, 0x2000), (0x2000, 0x1000)])
        with pytest.raises(ValueError, match="page size"):
            GuestMemoryMigration(a, b, [(0x1000, 0x1000)], page_size=6000)
        with pytest.raises(ValueError, match="same"):
            GuestMemoryMigration(a, a, [(0x1000, 0x1000)])


# -- randomized: any DMA writes in any rounds ------------------------------------------------

moves_st = st.lists(
    st.lists(
        st.tuples(
            st.integers(0, RAM_SIZE - 1), st.integers(0, RAM_SIZE - 1), st.integers(1, 3 * PAGE)
        ).map(lambda m: (min(m[0], RAM_SIZE - m[2]), min(m[1], RAM_SIZE - m[2]), m[2])),
        max_size=4,
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=25, deadline=None)
@given(moves_st, st.booleans())
def test_random_dma_writes_in_precopy_rounds(
    moves: list[list[tuple[int, int, int]]], ignore_log: bool
) -> None:
    """Whatever the device writes in whichever rounds, the destination ends up with the
    source's memory; with the log ignored, exactly the pages changed after the first full
    copy are stale."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as directory:
            async with rig(Path(directory)) as r:
                before = contents(r.src_mem)
                pair = r.pair(IgnoringTheLog if ignore_log else GuestMemoryMigration)
                await migrate(
                    r.src, r.dst, mode="pre-copy", precopy_rounds=len(moves), precopy_threshold=0,
                    on_precopy_round=round_copies(r, moves), guest_memory=pair,
                )  # fmt: skip
                after = contents(r.src_mem)
                stale = differing_pages(after, contents(r.dst_mem))
                if ignore_log:
                    assert stale == differing_pages(before, after)
                else:
                    assert stale == []

    trio.run(scenario)


# -- e1000: received frames are device writes into guest memory ------------------------------


def frames_landed(guest: E1000Guest) -> int:
    """Receive descriptors the NIC has written back (DD set) from the guest's next one on:
    read-only, as the guest has not looked yet."""
    count = 0
    index = guest.rx_next
    while count < guest.config.rx_count:
        status = guest.ram.read(guest.rx_ring + 16 * index + 12, 1)[0]
        if not status & e1000_regs.RXD_STAT_DD:
            break
        count += 1
        index = (index + 1) % guest.config.rx_count
    return count


@pytest.mark.parametrize("ignore_log", [False, True], ids=["log-used", "log-ignored"])
async def test_e1000_frames_received_during_precopy_reach_the_destination(
    tmp_path: Path, ignore_log: bool
) -> None:
    """NIC B is migrated to a server with its own guest RAM while NIC A sends to it; B's
    guest is idle (no CPU writes), so every change to B's RAM is the NIC writing receive
    buffers and descriptors. Afterwards B's guest, now on the destination's RAM, finds every
    frame in its ring -- unless the driver ignored the device's dirty log."""
    per_round, rounds = 8, 3
    async with nic_pair(tmp_path, None, DriverConfig(rx_count=64), irq=False) as pair:
        a, b = pair.a, pair.b
        dev_b2 = E1000(E1000Options(mac=bytes.fromhex("020000000bbb")))  # the MAC comes along
        async with (
            served_device(dev_b2, tmp_path, name="b2.sock") as served_b2,
            Client.connect(served_b2.socket_path) as client_b2,
        ):
            with GuestRam(b.ram.size, base=b.ram.base) as dst_ram:
                await client_b2.dma_map(dst_ram.base, dst_ram.size, fd=dst_ram.fd)
                pair.cable.b.successor(dev_b2)
                for seq in range(4):  # traffic before the migration, received as usual
                    await a.send(numbered(a, b, seq))
                assert [seq_of(f.data) for f in await b.receive_many(4)] == list(range(4))
                sent = 4

                async def a_sends(round_number: int, moved: int) -> None:
                    nonlocal sent
                    waiting = frames_landed(b)
                    for _ in range(per_round):
                        await a.send(numbered(a, b, sent))
                        sent += 1
                    with trio.fail_after(5):  # B's NIC writes them into B's RAM
                        while frames_landed(b) < waiting + per_round:
                            await trio.sleep(0.0005)

                kind = IgnoringTheLog if ignore_log else GuestMemoryMigration
                report = await migrate(
                    b.client, client_b2, mode="pre-copy", precopy_rounds=rounds,
                    precopy_threshold=0, on_precopy_round=a_sends,
                    guest_memory=kind.between(b.ram, dst_ram),
                )  # fmt: skip
                # (Ignoring the log, round 2 looks clean and pre-copy ends after it.)
                assert report.precopy_rounds == (2 if ignore_log else rounds)
                src_ram = b.ram
                stale = differing_pages(src_ram.read(src_ram.base, src_ram.size), dst_ram.map[:])
                b.migrated_to(client_b2)
                b.ram = dst_ram  # B's VM continues on the destination, with its own RAM
                received = [seq_of(f.data) for f in b.poll_rx()]
                if ignore_log:
                    assert stale != [] and received == []
                    return
                assert stale == []
                assert received == list(range(4, sent))
                memory = report.memory
                assert memory is not None and memory.round_pages[1:] != (0,) * (rounds - 1)
                # And the migrated NIC keeps receiving into the destination's RAM.
                await b.refill_rx()
                await a.send(numbered(a, b, sent))
                assert seq_of((await b.receive()).data) == sent


async def test_reports_split_into_spans_and_ranges_with_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guest memory in two ranges with a hole between them (not migrated), each reported in
    spans of 5 pages (bitmaps not a multiple of 64 bits): exactly the written pages come
    back, at the right addresses, and a second read finds nothing."""
    monkeypatch.setattr(gmm, "REPORT_SPAN", 5 * PAGE)
    low, high = (RAM_BASE, 16 * PAGE), (RAM_BASE + 24 * PAGE, 40 * PAGE)
    async with rig(tmp_path) as r:
        pair = GuestMemoryMigration(r.src_mem, r.dst_mem, [high, low])
        await pair.start_logging(r.src)
        targets = [3, 4, 5, 14, 24, 29, 30, 63]  # page indexes from RAM_BASE
        for page in targets:
            await copy(r.src, RAM_BASE + 20 * PAGE, RAM_BASE + page * PAGE + 8, 16)
        await copy(r.src, RAM_BASE, RAM_BASE + 20 * PAGE, 16)  # in the hole: not logged
        first = RAM_BASE // PAGE
        assert await pair.read_dirty_log(r.src) == {first + page for page in targets}
        assert await pair.read_dirty_log(r.src) == set()
        await pair.stop_logging(r.src)
        assert not await logging_started(r.src)
        # The whole-memory copy skips the hole too.
        assert await pair.copy_all() == 56
        dst, src = contents(r.dst_mem), contents(r.src_mem)
        assert differing_pages(src, dst) == list(range(16, 24))
