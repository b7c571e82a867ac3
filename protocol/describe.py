"""One-line human descriptions of messages, for ``--trace`` and test failure output."""

from __future__ import annotations

import errno
from collections.abc import Callable

from .constants import Command, IrqIndex
from .errors import ProtocolError
from .header import Header
from .messages import (
    QEMU_DMA_RW,
    DeviceFeatureMsg,
    DeviceInfo,
    DmaLayout,
    DmaMap,
    DmaRw,
    DmaUnmap,
    IrqInfo,
    IrqSet,
    MigData,
    MigDataRead,
    PrecopyInfo,
    RegionAccess,
    RegionInfo,
    RegionIoFds,
    RegionWriteMulti,
    VersionPayload,
)
from .migration_v1 import BITMAP_RANGE, DIRTY_HEADER


def _version(p: bytes, reply: bool) -> str:
    v = VersionPayload.unpack(p)
    return f"v{v.major}.{v.minor} json={v.json_text!r}"


def _region_access(p: bytes, reply: bool) -> str:
    a = RegionAccess.unpack(p)
    return f"region={a.region} offset={a.offset:#x} count={a.count} data={len(p) - 16}B"


def _irq_set(p: bytes, reply: bool) -> str:
    s = IrqSet.unpack(p)
    try:
        index = IrqIndex(s.index).name
    except ValueError:
        index = str(s.index)
    return f"index={index} flags={s.flags:#x} start={s.start} count={s.count}"


def _irq_info(p: bytes, reply: bool) -> str:
    i = IrqInfo.unpack(p)
    return f"index={i.index} flags={i.flags:#x} count={i.count}"


def _region_info(p: bytes, reply: bool) -> str:
    r = RegionInfo.unpack(p)
    return (
        f"index={r.index} argsz={r.argsz} flags={r.flags:#x} cap_offset={r.cap_offset} "
        f"size={r.size:#x} offset={r.offset:#x}"
    )


def _dma_map(p: bytes, reply: bool) -> str:
    m = DmaMap.unpack(p)
    return f"address={m.address:#x} size={m.size:#x} offset={m.offset:#x} flags={m.flags:#x}"


def _dma_unmap(p: bytes, reply: bool) -> str:
    u = DmaUnmap.unpack(p)
    return f"address={u.address:#x} size={u.size:#x} flags={u.flags:#x}"


def _dma_rw(p: bytes, reply: bool, layout: DmaLayout = DmaLayout.SPEC) -> str:
    if layout is DmaLayout.QEMU and len(p) >= QEMU_DMA_RW.size:
        address, count = QEMU_DMA_RW.unpack_from(p)
        return f"address={address:#x} count={count} data={len(p) - 16}B (qemu layout)"
    d = DmaRw.unpack(p)
    return f"address={d.address:#x} count={d.count} data={len(p) - 16}B"


def _info(p: bytes, reply: bool) -> str:
    i = DeviceInfo.unpack(p)
    return f"flags={i.flags:#x} regions={i.num_regions} irqs={i.num_irqs}"


def _io_fds(p: bytes, reply: bool) -> str:
    r = RegionIoFds.unpack(p)
    return f"index={r.index} argsz={r.argsz} count={r.count}"


def _multi(p: bytes, reply: bool) -> str:
    if reply:
        return f"written={int.from_bytes(p[:8], 'little')}"
    return f"entries={len(RegionWriteMulti.unpack(p).entries)}"


def _feature(p: bytes, reply: bool) -> str:
    f = DeviceFeatureMsg.unpack(p)
    return f"argsz={f.argsz} flags={f.flags:#x} data={f.data.hex()}"


def _mig_data(p: bytes, reply: bool) -> str:
    if reply or len(p) > 8:
        m = MigData.unpack(p)
        return f"argsz={m.argsz} size={m.size}"
    r = MigDataRead.unpack(p)
    return f"argsz={r.argsz} size={r.size}"


def _precopy_info(p: bytes, reply: bool) -> str:
    info = PrecopyInfo.unpack(p)
    return f"initial_bytes={info.initial_bytes} dirty_bytes={info.dirty_bytes}"


def _dirty_pages(p: bytes, reply: bool) -> str:
    if len(p) < DIRTY_HEADER.size:
        raise ProtocolError(errno.EINVAL, "DIRTY_PAGES: payload too short")
    argsz, flags = DIRTY_HEADER.unpack_from(p)
    text = f"argsz={argsz} flags={flags:#x}"
    end = DIRTY_HEADER.size + BITMAP_RANGE.size
    if len(p) >= end:
        iova, size, pgsize, bitmap_size = BITMAP_RANGE.unpack_from(p, DIRTY_HEADER.size)
        text += f" iova={iova:#x} size={size:#x} pgsize={pgsize:#x} bitmap={bitmap_size}B"
    return text


_DECODERS: dict[int, Callable[[bytes, bool], str]] = {
    Command.VERSION: _version,
    Command.DMA_MAP: _dma_map,
    Command.DMA_UNMAP: _dma_unmap,
    Command.DEVICE_GET_INFO: _info,
    Command.DEVICE_GET_REGION_INFO: _region_info,
    Command.DEVICE_GET_REGION_IO_FDS: _io_fds,
    Command.DEVICE_GET_IRQ_INFO: _irq_info,
    Command.DEVICE_SET_IRQS: _irq_set,
    Command.REGION_READ: _region_access,
    Command.REGION_WRITE: _region_access,
    Command.DMA_READ: _dma_rw,
    Command.DMA_WRITE: _dma_rw,
    Command.REGION_WRITE_MULTI: _multi,
    Command.DEVICE_FEATURE: _feature,
    Command.MIG_DATA_READ: _mig_data,
    Command.MIG_DATA_WRITE: _mig_data,
    Command.MIG_GET_PRECOPY_INFO: _precopy_info,
    Command.DIRTY_PAGES: _dirty_pages,
}


def describe(
    header: Header, payload: bytes, nfds: int = 0, dma_layout: DmaLayout = DmaLayout.SPEC
) -> str:
    kind = "reply" if header.is_reply else "cmd"
    flags = []
    if header.no_reply:
        flags.append("no-reply")
    if header.is_error:
        flags.append(f"error={header.error}")
    head = (
        f"id={header.msg_id} {header.command_name()} {kind} size={header.size}"
        + (f" fds={nfds}" if nfds else "")
        + (" " + ",".join(flags) if flags else "")
    )
    decoder = _DECODERS.get(header.command)
    if decoder is None or not payload:
        return head
    try:
        if header.command in (Command.DMA_READ, Command.DMA_WRITE):
            # In-band DMA is laid out per connection (QEMU's differs from the spec).
            return f"{head} {_dma_rw(payload, header.is_reply, dma_layout)}"
        return f"{head} {decoder(payload, header.is_reply)}"
    except ProtocolError as exc:
        return f"{head} (undecodable: {exc})"
