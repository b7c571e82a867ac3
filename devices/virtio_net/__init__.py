"""The virtio-net NIC model (modern virtio 1.x over PCI): see :mod:`devices.virtio_net.device`."""

from devices.virtio_net.device import DEFAULT_MAC, OFFERED, VirtioNet, VirtioNetOptions

__all__ = ["DEFAULT_MAC", "OFFERED", "VirtioNet", "VirtioNetOptions"]
