"""``virtio-net`` without a server: PCI layout and saved states (round trip, hostile states
rejected without any change)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.api import DeviceError
from devices.pci import BarKind
from devices.virtio_net import VirtioNet, VirtioNetOptions
from devices.virtio_net import device as vn
from devices.virtio_net import transport as t
from devices.virtio_net import virtqueue as vq
from emulator.testing.harness import flat_sections


def test_pci_identity_and_capabilities() -> None:
    dev = VirtioNet()
    config = dev.config
    assert config.read(0, 4) == struct.pack("<HH", 0x1AF4, 0x1041)
    assert config.read(8, 1) == b"\x01"  # revision 1: modern only
    assert config.read(0x0B, 1) == b"\x02"  # network controller
    bars = config.bars()
    assert set(bars) == {1, 4} and all(b.kind is not BarKind.IO for b in bars.values())
    types = []
    for cap_id, offset in config.capabilities():
        if cap_id == 0x09:
            types.append(config.read(offset + 3, 1)[0])
    assert types == [t.CAP_COMMON, t.CAP_ISR, t.CAP_DEVICE, t.CAP_NOTIFY, t.CAP_PCI_CFG]
    assert config.msix_table_size == 4


# =============================================================================================
# Saved state


def busy_device() -> VirtioNet:
    dev = VirtioNet(VirtioNetOptions(mac=bytes.fromhex("525400000042"), queue_size=512))
    dev.driver_features = vn.OFFERED
    dev.status = t.ACKNOWLEDGE | t.DRIVER | t.FEATURES_OK | t.DRIVER_OK
    dev.config_vector = 0
    for i, queue in enumerate(dev.queues):
        queue.size = 256 if i < 2 else 64
        queue.enabled = True
        queue.vector = i + 1 if i < 2 else vq.NO_VECTOR
        queue.desc, queue.driver, queue.device = (
            0x100000 * (i + 1),
            0x100000 * (i + 1) + 0x1000,
            0x100000 * (i + 1) + 0x2000,
        )
        queue.last_avail, queue.used_idx, queue.signalled_used = 0xFFF0 + i, 0xFFEE, 0xFFE0
    dev.filter.promisc = False
    dev.filter.multicast = [bytes.fromhex("01005e000001")]
    dev.rx_frames.extend([bytes(60), bytes(range(200))])
    dev.rx_bytes = 260
    dev._irq_due.add(0)
    return dev


def test_state_round_trip() -> None:
    source = busy_device()
    saved = flat_sections(source.save_state())
    target = VirtioNet(VirtioNetOptions(queue_size=512))
    target.pause()
    target.load_state(saved)
    assert flat_sections(target.save_state()) == saved
    assert target.filter.mac == bytes.fromhex("525400000042")
    assert list(target.rx_frames) == list(source.rx_frames)
    assert target.queues[1].last_avail == 0xFFF1


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_hostile_states_are_refused_without_change(data: st.DataObject) -> None:
    saved = flat_sections(busy_device().save_state())
    index = data.draw(st.integers(0, len(saved) - 1))
    name, payload = saved[index]
    position = data.draw(st.integers(0, max(len(payload) - 1, 0)))
    value = data.draw(st.integers(0, 255))
    mutated = bytearray(payload)
    if mutated:
        mutated[position] = value
    cut = data.draw(st.booleans())
    if cut:
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    hostile = list(saved)
    hostile[index] = (name, bytes(mutated))
    target = VirtioNet(VirtioNetOptions(queue_size=512))
    target.pause()
    before = flat_sections(target.save_state())
    try:
        target.load_state(hostile)
    except DeviceError as exc:
        assert exc.errno == errno.EINVAL
        assert flat_sections(target.save_state()) == before
    else:
        # accepted: a state the device could have been in, saved back identically
        assert flat_sections(target.save_state()) == hostile


def test_state_with_unknown_features_or_a_bad_queue_is_refused() -> None:
    dev = busy_device()
    dev.driver_features |= vn.F_GUEST_TSO4  # not offered
    target = VirtioNet(VirtioNetOptions(queue_size=512))
    with pytest.raises(DeviceError):
        target.load_state(flat_sections(dev.save_state()))
    dev = busy_device()
    dev.queues[0].size = 100  # not a power of two
    with pytest.raises(DeviceError):
        target.load_state(flat_sections(dev.save_state()))
