"""The interrupt logic of a PCI function (devices/irq.py), driven directly: INTx automask and
UNMASK, MSI-X per-vector and function masks with the PBA, MSI with per-vector masking,
suspension for migration, reset, and the migration snapshot."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices import irq
from devices.pci import (
    COMMAND,
    COMMAND_INTX_DISABLE,
    MSI_ENABLE,
    MSIX_CONTROL,
    MSIX_ENABLE,
    MSIX_FUNCTION_MASK,
    BarKind,
    BarSpec,
    ConfigSpace,
)

VECTORS = 4


class Recorder:
    """An IrqSink that records what the runtime would signal."""

    def __init__(self) -> None:
        self.fired: list[tuple[int, int]] = []

    def fire(self, index: int, vector: int) -> bool:
        self.fired.append((index, vector))
        return True


def function() -> tuple[ConfigSpace, irq.InterruptController, Recorder, int, int]:
    config = ConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000)
    config.add_bar(BarSpec(0, 0x1000, BarKind.MEM32))
    msi = config.add_msi_capability(1)
    msix = config.add_msix_capability(
        VECTORS, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800
    )
    controller = irq.InterruptController(config, msi_vectors=1, msix_vectors=VECTORS)
    sink = Recorder()
    controller.sink = sink
    return config, controller, sink, msi, msix


def enable_msix(config: ConfigSpace, msix: int, *, function_mask: bool = False) -> None:
    control = MSIX_ENABLE | (MSIX_FUNCTION_MASK if function_mask else 0)
    config.write(msix + MSIX_CONTROL, struct.pack("<H", control))


def unmask_entry(controller: irq.InterruptController, vector: int, masked: bool = False) -> None:
    controller.msix_table_write(vector * irq.MSIX_ENTRY_SIZE + 12, struct.pack("<I", masked))


def test_intx_is_automasked_until_unmask_and_resignalled_while_asserted() -> None:
    _, controller, sink, _, _ = function()
    controller.notify()
    controller.notify()  # masked by the first: latched, not signalled
    assert sink.fired == [(irq.INTX, 0)]
    controller.unmask(irq.INTX, 0)  # the line is still asserted: signalled again
    assert sink.fired == [(irq.INTX, 0)] * 2
    controller.lower_intx()
    controller.unmask(irq.INTX, 0)
    assert sink.fired == [(irq.INTX, 0)] * 2


def test_intx_disabled_in_command_register_signals_nothing() -> None:
    config, controller, sink, _, _ = function()
    config.write(COMMAND, struct.pack("<H", COMMAND_INTX_DISABLE))
    controller.notify()
    assert sink.fired == []
    config.write(COMMAND, struct.pack("<H", 0))  # the guest enables it: the level shows
    assert sink.fired == [(irq.INTX, 0)]


def test_msix_entries_come_out_of_reset_masked_and_latch_their_pending_bit() -> None:
    config, controller, sink, _, msix = function()
    enable_msix(config, msix)
    controller.notify(2)
    assert sink.fired == []
    assert controller.pba_bytes() == (1 << 2).to_bytes(8, "little")
    unmask_entry(controller, 2)
    assert sink.fired == [(irq.MSIX, 2)]
    assert controller.pba_bytes() == bytes(8)


def test_msix_function_mask_holds_every_vector() -> None:
    config, controller, sink, _, msix = function()
    for vector in range(VECTORS):
        unmask_entry(controller, vector)
    enable_msix(config, msix, function_mask=True)
    controller.notify(0)
    controller.notify(3)
    assert sink.fired == []
    enable_msix(config, msix)  # the function mask cleared: both fire
    assert sorted(sink.fired) == [(irq.MSIX, 0), (irq.MSIX, 3)]


def test_vfio_mask_from_the_client_latches_and_unmask_releases() -> None:
    config, controller, sink, _, msix = function()
    enable_msix(config, msix)
    controller.program_msix_vector(1, live=True)  # what binding an eventfd does
    controller.mask(irq.MSIX, 1)
    controller.notify(1)
    assert sink.fired == []
    controller.unmask(irq.MSIX, 1)
    assert sink.fired == [(irq.MSIX, 1)]
    controller.program_msix_vector(1, live=False)  # released: masked in the table again
    assert controller.msix_vector_masked(1)


def test_msi_uses_the_capabilitys_per_vector_mask() -> None:
    config, controller, sink, msi, _ = function()
    config.write(msi + 2, struct.pack("<H", MSI_ENABLE))
    assert controller.vectors_in_use() == 1
    controller.notify(0)
    assert sink.fired == [(irq.MSI, 0)]
    mask_offset = msi + 0x10  # 64-bit layout: control, address lo/hi, data, mask
    config.write(mask_offset, struct.pack("<I", 1))
    controller.notify(0)
    assert sink.fired == [(irq.MSI, 0)]
    config.write(mask_offset, struct.pack("<I", 0))  # unmasked: the pending one fires
    assert sink.fired == [(irq.MSI, 0)] * 2


def test_suspended_delivery_latches_everything_until_resume() -> None:
    config, controller, sink, _, msix = function()
    enable_msix(config, msix)
    unmask_entry(controller, 0)
    controller.suspend()
    controller.notify(0)
    assert controller.signal_error() is False
    assert sink.fired == []
    controller.resume()
    assert sink.fired == [(irq.MSIX, 0)]


def test_a_vector_out_of_range_is_refused() -> None:
    config, controller, _, _, msix = function()
    enable_msix(config, msix)
    with pytest.raises(ValueError, match="out of range"):
        controller.notify(VECTORS)


def test_reset_masks_the_table_and_forgets_pending_interrupts() -> None:
    config, controller, sink, _, msix = function()
    enable_msix(config, msix)
    controller.notify(1)
    controller.reset()
    assert controller.pba_bytes() == bytes(8)
    assert all(controller.msix_vector_masked(v) for v in range(VECTORS))
    unmask_entry(controller, 1)
    assert sink.fired == []


def test_info_flags_are_what_vfio_pci_reports() -> None:
    _, controller, _, _, _ = function()
    assert controller.info_flags(irq.INTX) == irq.EVENTFD | irq.MASKABLE | irq.AUTOMASKED
    assert controller.info_flags(irq.MSI) == irq.EVENTFD | irq.MASKABLE | irq.NORESIZE
    assert controller.info_flags(irq.MSIX) == irq.EVENTFD | irq.MASKABLE
    assert controller.info_flags(irq.ERR) == irq.EVENTFD
    assert controller.count(irq.MSIX) == VECTORS


@given(
    pending=st.lists(st.integers(0, VECTORS - 1), max_size=VECTORS),
    masked=st.lists(st.booleans(), min_size=VECTORS, max_size=VECTORS),
    line=st.booleans(),
)
def test_snapshot_round_trips_table_pending_bits_and_line(
    pending: list[int], masked: list[bool], line: bool
) -> None:
    config, source, _, _, msix = function()
    enable_msix(config, msix)
    for vector, is_masked in enumerate(masked):
        unmask_entry(source, vector, is_masked)
    source.suspend()  # every interrupt latches
    for vector in pending:
        source.notify(vector)
    if line:
        source.intx_line = True
    blob = source.snapshot()
    _, target, _, _, _ = function()
    target.restore(blob)
    assert target.snapshot() == blob
    assert target.pba_bytes() == source.pba_bytes()


def test_a_bad_snapshot_changes_nothing() -> None:
    _, controller, _, _, _ = function()
    before = controller.snapshot()
    for bad in (before[:-1], b"\x02" + before[1:], before[:-1] + b"\xff"):
        with pytest.raises(ValueError):
            controller.restore(bad)
        assert controller.snapshot() == before
