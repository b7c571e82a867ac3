"""Migration v1 over a real socket: the migration region, its bitfield, whole migrations of
testdev and e1000 through the region only (the same device state as a v2 migration), and
DIRTY_PAGES (14) for protocol-0.1 clients."""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from devices import testdev as td
from devices.api import Device
from devices.e1000 import E1000, E1000Options
from devices.e1000 import regs as r
from devices.errors import DeviceError
from devices.migration.engine import ALL_CAPS
from devices.registry import DeviceSpecError, create_device
from devices.testdev import TestDev, TestDevOptions
from emulator.client import Client, ClientError
from emulator.client import migrate as v2
from emulator.client import migrate_v1 as v1
from emulator.client.info import describe
from emulator.testing.harness import GuestRam, flat_sections, served_device
from protocol.constants import Command, MigState
from protocol.messages import NdmaCap, TypeCap
from protocol.migration_v1 import DATA_OFFSET

MIGRATION_REGION = 9
#: What a protocol-0.1 client announces (libvfio-user's old sample client).
CAPS_0_1 = {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "migration": {"pgsize": 4096}}
R, S, RES, N = 1, 2, 4, 8
VALID = {R: "RUNNING", 0: "STOP", S: "STOP_COPY", S | R: "PRE_COPY", RES: "RESUMING"}
VALID_P2P = {N | R: "RUNNING_P2P", N | S | R: "PRE_COPY_P2P"}
INVALID = [R | RES, S | RES, S | R | RES, N, N | S, N | RES, N | R | RES, N | S | RES, 15]


def with_protocols(device: Device, protocols: str) -> Device:
    device.migration_protocols = frozenset({"v1", "v2"} if protocols == "both" else {protocols})
    return device


@asynccontextmanager
async def clients(tmp_path: Path, *devices: Device) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack:
        out = []
        for i, device in enumerate(devices):
            where = tmp_path / f"d{i}"
            where.mkdir()
            served = await stack.enter_async_context(served_device(device, where))
            out.append(
                await stack.enter_async_context(
                    Client.connect(served.socket_path, capabilities=CAPS_0_1, minor=1)
                )
            )
        yield out


def small_testdev() -> TestDev:
    return TestDev(TestDevOptions(ram_size=16 * 1024, msix_vectors=2))


# -- the region -----------------------------------------------------------------------------


async def test_region_is_described_only_when_v1_is_served(tmp_path: Path) -> None:
    p2p = small_testdev()
    p2p.set_migration_caps(ALL_CAPS)
    devices = [with_protocols(small_testdev(), "v2"), with_protocols(p2p, "both")]
    async with clients(tmp_path, *devices) as (plain, both):
        assert (await plain.get_info()).num_regions == 9
        with pytest.raises(ClientError) as info:
            await plain.get_region_info(MIGRATION_REGION)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(v2.MigrationError):
            await v1.find_region(plain)

        assert (await both.get_info()).num_regions == 10
        found = await v1.find_region(both)
        assert found == v1.MigrationRegionInfo(MIGRATION_REGION, DATA_OFFSET + (1 << 20))
        region = await both.get_region_info(MIGRATION_REGION)
        assert region.fd is None
        assert region.caps == [TypeCap(3, 1), NdmaCap()], "NDMA: the device has P2P"
        # v2 still works on a device serving both.
        assert await v2.get_state(both) == MigState.RUNNING


async def test_every_bitfield_transition_and_the_invalid_ones(tmp_path: Path) -> None:
    device = small_testdev()
    device.set_migration_caps(ALL_CAPS)
    async with clients(tmp_path, with_protocols(device, "v1")) as (client,):
        region = (await v1.find_region(client)).index

        async def read() -> int:
            return await v1.get_device_state(client, region)

        assert await read() == R
        for bits, name in {**VALID, **VALID_P2P}.items():
            if bits == N | S | R:
                await v1.set_device_state(client, region, S | R)  # NDMA quiesces pre-copy
            await v1.set_device_state(client, region, bits)
            assert await read() == bits and device.migration.state.name == name
            await client.reset()  # the one way back from every state (v1 table)
            assert await read() == R
        for bits in INVALID:
            for start in (R, S | R):
                await v1.set_device_state(client, region, start)
                with pytest.raises(ClientError) as info:
                    await client.region_write(region, 0, struct.pack("<I", bits))
                assert info.value.errno == errno.EINVAL, bits
                assert await read() == start, "an invalid write changes nothing"
            await client.reset()
        # STOP_COPY -> PRE_COPY is refused (v1 table and FSM), and changes nothing.
        await v1.set_device_state(client, region, S)
        with pytest.raises(ClientError):
            await v1.set_device_state(client, region, S | R)
        assert await read() == S
        # DEVICE_RESET returns device_state to RUNNING.
        await client.reset()
        assert await read() == R
        # Reserved bits: ignored on write, read back as the device keeps them (0).
        await client.region_write(region, 0, struct.pack("<I", 0xABCD_0000 | S | R))
        assert await read() == S | R
        await client.reset()
        # The v2 interface is not offered with migration=v1.
        with pytest.raises(ClientError) as info:
            await v2.get_state(client)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(ClientError):
            await client.mig_data_read(16)


#: The vfio-user v1 allowed-transition table, hand-copied from the facts (8.3.2): from
#: (rows) -> to (columns STOP, RUNNING, STOP_COPY, PRE_COPY, RESUMING); "-" same state.
FACTS_V1_TABLE = {
    0: "- y n n n",
    R: "y - y y y",
    S: "y y - n n",
    S | R: "n n y - n",
    RES: "n y n n -",
}
FACTS_V1_COLUMNS = [0, R, S, S | R, RES]
#: Our NDMA rows (the kernel v2 direct arcs touching RUNNING_P2P / PRE_COPY_P2P).
NDMA_ARCS = {(R, N | R), (N | R, R), (N | R, 0), (S | R, N | S | R), (N | S | R, S | R)}
NDMA_ARCS |= {(N | S | R, S)}


def v1_allows(start: int, target: int) -> bool:
    if start == target:
        return True
    if start in FACTS_V1_TABLE and target in FACTS_V1_COLUMNS:
        return FACTS_V1_TABLE[start].split()[FACTS_V1_COLUMNS.index(target)] == "y"
    return (start, target) in NDMA_ARCS


async def test_every_from_to_pair_follows_the_v1_table(tmp_path: Path) -> None:
    """Every (from, to) pair of the seven writable states over the socket: the allowed
    ones succeed, the others get EINVAL and leave device_state as it was."""
    device = small_testdev()
    device.set_migration_caps(ALL_CAPS)
    states = [*VALID, *VALID_P2P]
    async with clients(tmp_path, with_protocols(device, "v1")) as (client,):
        region = (await v1.find_region(client)).index
        for start in states:
            for target in states:
                await client.reset()
                device.migration.set_state(MigState[{**VALID, **VALID_P2P}[start]])
                assert await v1.get_device_state(client, region) == start
                if start == RES and target != RES:
                    # Leaving RESUMING loads the stream; an empty one is refused by the
                    # device, not by the table: allowed shows as "not EINVAL from the
                    # table", i.e. the state the engine reached or kept.
                    if not v1_allows(start, target):
                        with pytest.raises(ClientError) as info:
                            await v1.set_device_state(client, region, target)
                        assert info.value.errno == errno.EINVAL
                        assert await v1.get_device_state(client, region) == start
                    continue
                if v1_allows(start, target):
                    await v1.set_device_state(client, region, target)
                    assert await v1.get_device_state(client, region) == target, (start, target)
                else:
                    with pytest.raises(ClientError) as info:
                        await v1.set_device_state(client, region, target)
                    assert info.value.errno == errno.EINVAL, (start, target)
                    assert await v1.get_device_state(client, region) == start, (start, target)


async def test_the_error_state_refuses_every_write_until_reset(tmp_path: Path) -> None:
    class Fragile(TestDev):
        fail: frozenset[tuple[MigState, MigState]] = frozenset()

        def migration_arc(self, arc: tuple[MigState, MigState]) -> None:
            if arc in self.fail:
                raise DeviceError(errno.EIO, f"arc {arc} fails")

    device = Fragile(TestDevOptions(ram_size=16 * 1024, msix_vectors=2))
    async with clients(tmp_path, with_protocols(device, "v1")) as (client,):
        region = (await v1.find_region(client)).index
        # RUNNING -> STOP -> STOP_COPY fails, and so does the walk back: ERROR.
        device.fail = frozenset(
            {(MigState.STOP, MigState.STOP_COPY), (MigState.STOP, MigState.RUNNING)}
        )
        with pytest.raises(ClientError):
            await v1.set_device_state(client, region, S)
        assert await v1.get_device_state(client, region) == S | RES
        device.fail = frozenset()
        for bits in [*VALID, *VALID_P2P]:
            with pytest.raises(ClientError) as info:
                await client.region_write(region, 0, struct.pack("<I", bits))
            assert info.value.errno == errno.EINVAL, bits
            assert await v1.get_device_state(client, region) == S | RES
        await client.reset()
        assert await v1.get_device_state(client, region) == R


async def test_scattered_tiny_window_writes_stay_cheap_and_are_checked(tmp_path: Path) -> None:
    """A resuming client writing the data window one byte at a time, every other byte:
    the last writes must cost about what the first did (the old interval list made each
    write dearer, until the server stalled), and data_size still sees the gaps."""
    count = 8000
    async with clients(tmp_path, with_protocols(small_testdev(), "v1")) as (client,):
        await v1.set_device_state(client, MIGRATION_REGION, RES)
        quarter = count // 4
        took = []
        for first in range(0, count, quarter):
            began = time.perf_counter()
            for k in range(first, first + quarter):
                await client.region_write(MIGRATION_REGION, DATA_OFFSET + 2 * k, b"x")
            took.append(time.perf_counter() - began)
        assert took[-1] < 3 * took[0], f"{took}: writes grow dearer"
        data_size = struct.pack("<Q", 2 * count)
        with pytest.raises(ClientError) as info:  # the odd bytes were never written
            await client.region_write(MIGRATION_REGION, 0x18, data_size)
        assert info.value.errno == errno.EINVAL
        await client.reset()


async def test_write_multi_cannot_reach_the_v1_region(tmp_path: Path) -> None:
    async with clients(tmp_path, with_protocols(small_testdev(), "v1")) as (client,):
        entry = (MIGRATION_REGION, 0, struct.pack("<I", S | R))
        with pytest.raises(ClientError) as info:
            await client.region_write_multi([entry], posted=False)
        assert info.value.errno == errno.EINVAL
        assert await v1.get_device_state(client, MIGRATION_REGION) == R


async def test_without_pre_copy_saving_running_is_refused(tmp_path: Path) -> None:
    device = small_testdev()
    device.set_migration_caps(1)  # STOP_COPY only
    async with clients(tmp_path, with_protocols(device, "v1")) as (client,):
        with pytest.raises(ClientError) as info:
            await v1.set_device_state(client, MIGRATION_REGION, S | R)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(ClientError):
            await v1.set_device_state(client, MIGRATION_REGION, N | R)  # no P2P either
        assert await v1.get_device_state(client, MIGRATION_REGION) == R


# -- whole migrations: v1 gives the same device state as v2 ------------------------------------


def device_state(device: Device) -> dict[str, Any]:
    return {
        "own": flat_sections(device.save_state()),
        "config": bytes(device.config.snapshot()),
        "irq": bytes(device.irq.snapshot()),
    }


async def set_up_testdev(client: Client) -> None:
    for i in range(8):
        await client.region_write(td.BAR_REGS, td.REG_SCRATCH + 4 * i, struct.pack("<I", 7 * i))
    await client.region_write(td.BAR_RAM, 0x100, bytes(range(256)) * 8)
    await client.region_write(td.BAR_RAM, 0x3000, b"end of ram")
    await client.region_write(7, 0x04, struct.pack("<H", 0x0006))  # memory + bus master


async def set_up_e1000(client: Client) -> None:
    for offset, value in (
        (r.IMS, 0x9D),
        (r.ITR, 3906),
        (r.RA + 8, 0x11223344),
        (r.RA + 12, 0x5566 | r.RAH_AV),
        (r.MTA + 40, 0x800),
        (r.RDBAL, 0x10000),
        (r.RDLEN, 0x1000),
        (r.TDBAL, 0x20000),
        (r.TDLEN, 0x1000),
    ):
        await client.region_write(0, offset, struct.pack("<I", value))
    await client.region_write(7, 0x04, struct.pack("<H", 0x0006))


def fixed_clock() -> float:
    return 1000.0


MODELS = {
    "testdev": (small_testdev, set_up_testdev),
    "e1000": (lambda: E1000(E1000Options(clock=fixed_clock)), set_up_e1000),
}


@pytest.mark.parametrize("mode", ["stop-copy", "pre-copy"])
@pytest.mark.parametrize("model", sorted(MODELS))
async def test_v1_migration_gives_the_v2_result(tmp_path: Path, model: str, mode: v2.Mode):
    make, set_up = MODELS[model]
    source = with_protocols(make(), "both")
    by_v1, by_v2 = with_protocols(make(), "v1"), with_protocols(make(), "v2")
    async with clients(tmp_path, source, by_v1, by_v2) as (src, dst1, dst2):
        await set_up(src)
        expected = device_state(source)
        assert expected != device_state(by_v1), "the destinations start different"

        report = await v1.migrate(src, dst1, mode=mode)
        assert report.bytes_moved > 0 and report.segments >= 1
        if mode == "pre-copy":
            assert report.precopy_bytes > 0
        assert source.migration.state == MigState.STOP
        assert by_v1.migration.state == MigState.RUNNING
        assert await v1.get_device_state(dst1, MIGRATION_REGION) == R

        # The same source, back to RUNNING through its region, migrated the v2 way.
        await v1.set_device_state(src, MIGRATION_REGION, R)
        await v2.migrate(src, dst2, mode=mode)
        assert by_v2.migration.state == MigState.RUNNING
        assert device_state(by_v1) == device_state(by_v2) == expected


async def test_v1_migration_refused_by_the_destination_recovers(tmp_path: Path) -> None:
    source = with_protocols(small_testdev(), "v1")
    other = with_protocols(E1000(E1000Options(clock=fixed_clock)), "v1")
    async with clients(tmp_path, source, other) as (src, dst):
        with pytest.raises(v2.MigrationError) as info:
            await v1.migrate(src, dst)  # refused before anything changes
        assert info.value.stage == "comparing the devices" and info.value.errno is None
        assert "vendor:device 1b36:0f00 on the source, 8086:100e on the destination" in str(
            info.value
        )
        assert source.migration.state == other.migration.state == MigState.RUNNING
        with pytest.raises(v2.MigrationError) as info:
            await v1.migrate(src, dst, check_devices=False)
        assert info.value.errno == errno.EINVAL  # a testdev stream into an e1000
        assert source.migration.state == MigState.RUNNING
        assert other.migration.state == MigState.RUNNING


async def test_v1_migration_failing_in_pre_copy_returns_the_source_to_running(
    tmp_path: Path,
) -> None:
    """PRE_COPY -> RUNNING is not a v1 transition: recovery goes through stop-and-copy."""

    class SmallWindow(TestDev):
        migration_v1_window = 4096

    source = with_protocols(small_testdev(), "v1")
    other = with_protocols(SmallWindow(TestDevOptions(ram_size=16 * 1024, msix_vectors=2)), "v1")
    async with clients(tmp_path, source, other) as (src, dst):
        await src.region_write(td.BAR_RAM, 0, bytes(range(256)) * 32)  # 8 KiB to pre-copy
        with pytest.raises(v2.MigrationError) as info:
            await v1.migrate(src, dst, mode="pre-copy")
        assert info.value.stage == "source pre-copy"
        assert info.value.errno == errno.EINVAL  # a segment larger than the window
        assert "source -> RUNNING" in info.value.recovery
        assert source.migration.state == MigState.RUNNING
        assert other.migration.state == MigState.RUNNING


async def test_an_empty_segment_in_stop_and_copy_is_a_short_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source claiming pending bytes but handing out an empty segment in stop-and-copy
    would end the stream early; the driver refuses it instead of loading half a state."""
    source = with_protocols(small_testdev(), "v1")
    destination = with_protocols(small_testdev(), "v1")
    real_read = source.migration.read_data

    def short_stream(size: int) -> bytes:
        if source.migration.state == MigState.STOP_COPY:
            return b""
        return real_read(size)

    monkeypatch.setattr(source.migration, "read_data", short_stream)
    async with clients(tmp_path, source, destination) as (src, dst):
        with pytest.raises(v2.MigrationError) as info:
            await v1.migrate(src, dst)
        assert info.value.stage == "source stop-and-copy"
        assert info.value.errno == errno.EPROTO
        assert source.migration.state == MigState.RUNNING
        assert destination.migration.state == MigState.RUNNING


# -- DIRTY_PAGES (14) -----------------------------------------------------------------------


async def test_dirty_pages_track_device_dma(tmp_path: Path) -> None:
    device = with_protocols(small_testdev(), "v1")
    with GuestRam(0x4000) as ram:
        async with clients(tmp_path, device) as (client,):
            await client.dma_map(0x100000, 0x4000, fd=ram.fd)
            with pytest.raises(ClientError):  # before START
                await v1.dirty_bitmap(client, 0x100000, 0x4000)
            await v1.dirty_pages_start(client)
            await v1.dirty_pages_start(client)  # again, identical: fine
            assert await v1.dirty_bitmap(client, 0x100000, 0x4000) == bytes(8)
            await client.region_write(7, 0x04, struct.pack("<H", 0x0006))
            await device.context.dma.write(0x102000, b"dirty")  # the device writes a page
            assert await v1.dirty_bitmap(client, 0x100000, 0x4000) == b"\x04" + bytes(7)
            assert await v1.dirty_bitmap(client, 0x100000, 0x4000) == bytes(8), "cleared"
            with pytest.raises(ClientError) as info:
                await v1.dirty_bitmap(client, 0x200000, 0x1000)  # not mapped
            assert info.value.errno == errno.ENOENT

            # argsz too small for the reply: the pair alone, saying what is needed.
            small = struct.pack("<IIQQQQ", 8, 4, 0x100000, 0x4000, 4096, 8)
            _, payload, _ = await client.request(Command.DIRTY_PAGES, small)
            assert payload == struct.pack("<II", 48, 4)

            await v1.dirty_pages_stop(client)
            with pytest.raises(ClientError):
                await v1.dirty_bitmap(client, 0x100000, 0x4000)


async def test_dirty_pages_need_the_capability_and_a_v1_device(tmp_path: Path) -> None:
    async with (
        served_device(with_protocols(small_testdev(), "both"), tmp_path) as served,
        Client.connect(served.socket_path) as client,  # no ``migration`` capability
    ):
        with pytest.raises(ClientError) as info:
            await v1.dirty_pages_start(client)
        assert info.value.errno == errno.EINVAL
    # A protocol-0.1 client, but the device serves only v2 (the default): migration (v1)
    # is not configured, which old libvfio-user answered with ENOTSUP (facts 9.3).
    async with clients(tmp_path, small_testdev()) as (client,):
        for request in (v1.dirty_pages_start, v1.dirty_pages_stop):
            with pytest.raises(ClientError) as info:
                await request(client)
            assert info.value.errno == errno.ENOTSUP
        with pytest.raises(ClientError) as info:
            await v1.dirty_bitmap(client, 0, 4096)
        assert info.value.errno == errno.ENOTSUP


async def test_large_single_region_accesses(tmp_path: Path) -> None:
    # Protocol-0.1 clients write 12 KiB at once whatever they advertised.
    async with clients(tmp_path, small_testdev()) as (client,):
        data = bytes(range(256)) * 48
        await client.region_write(td.BAR_RAM, 0, data)
        assert await client.region_read(td.BAR_RAM, 0, len(data)) == data


def test_migration_option() -> None:
    assert create_device("testdev").migration_protocols == {"v2"}
    assert create_device("testdev,migration=v1").migration_protocols == {"v1"}
    assert create_device("e1000,migration=both").migration_protocols == {"v1", "v2"}
    legacy = create_device("lvu-sample,migration=v1")
    assert legacy.regions[1].size == 0x3000
    assert create_device("lvu-sample,migration=both").regions[1].size == 0x4000
    with pytest.raises(DeviceSpecError):
        create_device("testdev,migration=v3")


def unmap(address: int, argsz: int = 48, bitmap_size: int = 8) -> bytes:
    """DMA_UNMAP of 8 KiB at ``address`` with GET_DIRTY_BITMAP at 4 KiB pages."""
    return struct.pack("<IIQQQQ", argsz, 1, address, 0x2000, 4096, bitmap_size)


async def test_dma_unmap_with_dirty_bitmap(tmp_path: Path) -> None:
    device = with_protocols(small_testdev(), "v1")
    with GuestRam(0x4000) as ram:
        async with clients(tmp_path, device) as (client,):
            await client.dma_map(0x100000, 0x2000, fd=ram.fd)
            await client.dma_map(0x102000, 0x2000, fd=ram.fd, offset=0x2000)
            await client.region_write(7, 0x04, struct.pack("<H", 0x0006))

            with pytest.raises(ClientError):  # dirty logging not started
                await client.request(Command.DMA_UNMAP, unmap(0x100000))
            await v1.dirty_pages_start(client)
            await device.context.dma.write(0x101000, b"x")
            for bad, code in (
                (unmap(0x100000, argsz=40), errno.EINVAL),  # no room for the bitmap
                (unmap(0x100000, bitmap_size=0), errno.EINVAL),
                (unmap(0x101000), errno.ENOENT),  # not exactly one mapping
            ):
                with pytest.raises(ClientError) as info:
                    await client.request(Command.DMA_UNMAP, bad)
                assert info.value.errno == code
            _, payload, _ = await client.request(Command.DMA_UNMAP, unmap(0x100000))
            assert payload == unmap(0x100000) + b"\x02" + bytes(7)
            assert [slot for slot in device.context.dma.regions() if slot] == [(0x102000, 0x2000)]
            # Without the protocol-0.1 capability the flag is refused.
        (tmp_path / "plain").mkdir()
        async with (
            served_device(with_protocols(small_testdev(), "both"), tmp_path / "plain") as served,
            Client.connect(served.socket_path) as plain,
        ):
            await plain.dma_map(0x100000, 0x2000, fd=ram.fd)
            with pytest.raises(ClientError) as info:
                await plain.request(Command.DMA_UNMAP, unmap(0x100000))
            assert info.value.errno == errno.EINVAL


async def test_info_names_the_migration_region(tmp_path: Path) -> None:
    device = small_testdev()
    device.set_migration_caps(ALL_CAPS)
    async with clients(tmp_path, with_protocols(device, "v1")) as (client,):
        report = await describe(client)
    assert "type 3, subtype 1 (v1 migration region)" in report
    assert "NDMA (P2P quiescing)" in report
