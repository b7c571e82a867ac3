"""What a guest driver of ``testdev`` does, played over a vfio-user :class:`Client`.

The register-level steps the tests repeat: 32-bit register access in BAR 0 and the DMA
copy engine (program the addresses and length, start, poll the status). The register map is
:mod:`devices.testdev`'s.
"""

from __future__ import annotations

import struct

import trio

from devices import testdev as td
from emulator.client import Client

#: How long a copy may stay busy before a test calls the device stuck.
COPY_TIMEOUT = 5.0


async def write32(client: Client, offset: int, value: int) -> None:
    """Write one 32-bit register of BAR 0."""
    await client.region_write(td.BAR_REGS, offset, struct.pack("<I", value))


async def read32(client: Client, offset: int) -> int:
    """Read one 32-bit register of BAR 0."""
    return int(struct.unpack("<I", await client.region_read(td.BAR_REGS, offset, 4))[0])


async def program_copy(
    client: Client, src: int, dst: int, length: int, ctrl: int = td.DMA_CTRL_START
) -> None:
    """Program the copy engine and write DMA_CTRL (the device runs the copy on its own)."""
    for reg, value in [
        (td.REG_DMA_SRC, src & 0xFFFFFFFF), (td.REG_DMA_SRC + 4, src >> 32),
        (td.REG_DMA_DST, dst & 0xFFFFFFFF), (td.REG_DMA_DST + 4, dst >> 32),
        (td.REG_DMA_LEN, length), (td.REG_DMA_CTRL, ctrl),
    ]:  # fmt: skip
        await write32(client, reg, value)


async def wait_copy(client: Client, poll: float = 0.001) -> int:
    """Poll DMA_STATUS until the copy is no longer busy; the final status."""
    with trio.fail_after(COPY_TIMEOUT):
        while (status := await read32(client, td.REG_DMA_STATUS)) == td.DMA_BUSY:
            await trio.sleep(poll)
    return status


async def run_copy(
    client: Client, src: int, dst: int, length: int, ctrl: int = td.DMA_CTRL_START
) -> int:
    """Program a copy and wait for it; the final DMA_STATUS."""
    await program_copy(client, src, dst, length, ctrl)
    return await wait_copy(client)


async def copy(client: Client, src: int, dst: int, length: int) -> None:
    """A copy that must succeed."""
    status = await run_copy(client, src, dst, length)
    assert status == td.DMA_DONE, f"DMA_STATUS {status}, expected DONE"
