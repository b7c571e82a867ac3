"""The Intel 82540EM (``e1000``) NIC model: see :mod:`devices.e1000.device`."""

from devices.e1000.device import DEFAULT_MAC, E1000, E1000Options, format_mac, parse_mac

__all__ = ["DEFAULT_MAC", "E1000", "E1000Options", "format_mac", "parse_mac"]
