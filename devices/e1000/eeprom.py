"""The 82540EM's 64-word Microwire EEPROM and its EECD bit-banging interface.

Image: the words QEMU's e1000 serves (read off the wire in ``qemu-e1000-remote.jsonl`` by
following the driver's bit-banging), with our MAC address in words 0-2 and word 0x3F chosen
so that words 0..0x3F sum to 0xBABA, which Linux's ``e1000_validate_eeprom_checksum``
requires.

Microwire, as the driver drives it through EECD (SK clock, CS chip select, DI data in, DO
data out): raising CS starts a command; on each rising SK edge the EEPROM shifts DI in; the
read command is a start bit and opcode ``110`` then six address bits. After the ninth bit
the part drives DO with the word's bits, most significant first: the first bit appears after
the falling edge that ends the address and each later falling edge moves to the next bit
(reads run on into the next word, as on the real part). DO reads 1 while no read is under
way. Other opcodes (write, erase, enable) are accepted and ignored: the image is read-only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from devices.e1000 import regs

WORDS = 64
CHECKSUM_WORD = 0x3F
CHECKSUM_TARGET = 0xBABA
ADDRESS_BITS = 6
COMMAND_BITS = 3 + ADDRESS_BITS  # start bit, 2-bit opcode, address
READ_COMMAND = 0b110

#: Words 3..0x3E of the image (words 0-2 hold the MAC, 0x3F the checksum).
_TEMPLATE = {
    0x04: 0xFFFF,
    0x08: 0x3000,
    0x09: 0x1000,
    0x0A: 0x6403,  # initialization control 1
    0x0B: regs.DEVICE_ID,  # subsystem ID
    0x0C: regs.VENDOR_ID,  # subsystem vendor ID
    0x0D: regs.DEVICE_ID,
    0x0E: regs.VENDOR_ID,
    0x0F: 0x3040,  # initialization control 2
    0x10: 0x0008,
    0x11: 0x2000,
    0x12: 0x7E14,
    0x13: 0x0048,
    0x14: 0x1000,
    0x15: 0x00D8,
    0x17: 0x2700,
    0x18: 0x6CC9,
    0x19: 0x3150,
    0x1A: 0x0722,
    0x1B: 0x040B,
    0x1C: 0x0984,
    0x1E: 0xC000,
    0x1F: 0x0706,
    0x20: 0x1008,
    0x22: 0x0F04,
    0x23: 0x7FFF,
    0x24: 0x4D01,
    **dict.fromkeys(range(0x25, 0x30), 0xFFFF),
    0x30: 0x0100,
    0x31: 0x4000,
    0x32: 0x121C,
    **dict.fromkeys(range(0x33, 0x3F), 0xFFFF),
}


def image(mac: bytes) -> list[int]:
    """The EEPROM words for ``mac`` (6 bytes), checksum included."""
    if len(mac) != 6:
        raise ValueError("a MAC address is 6 bytes")
    words = [0] * WORDS
    for index, value in _TEMPLATE.items():
        words[index] = value
    for i in range(3):
        words[i] = mac[2 * i] | mac[2 * i + 1] << 8
    words[CHECKSUM_WORD] = (CHECKSUM_TARGET - sum(words[:CHECKSUM_WORD])) & 0xFFFF
    return words


def checksum_ok(words: list[int]) -> bool:
    return len(words) == WORDS and sum(words) & 0xFFFF == CHECKSUM_TARGET


def mac_of(words: list[int]) -> bytes:
    return b"".join(struct.pack("<H", words[i]) for i in range(3))


_STATE = struct.Struct("<IHBhB")  # driven bits, shift register, bits in, output bit, reading


@dataclass(slots=True)
class Microwire:
    """EECD bit-bang state. ``out`` counts output bits from the start of the addressed word
    (-1 before the first falling edge after the address)."""

    driven: int = 0  # SK/CS/DI/FWE/REQ as last written
    shift: int = 0  # command bits received so far
    bits_in: int = 0  # how many (0..9)
    out: int = 0  # output bit position, relative to word ``shift & 0x3f`` bit 15
    reading: bool = False

    def reset(self) -> None:
        self.driven = self.shift = self.bits_in = self.out = 0
        self.reading = False

    def read(self, words: list[int]) -> int:
        value = regs.EECD_PRES | regs.EECD_GNT | self.driven
        if not self.reading or self._bit(words):
            value |= regs.EECD_DO
        return value

    def _bit(self, words: list[int]) -> int:
        position = (self.shift & (WORDS - 1)) * 16 + self.out
        word = words[(position >> 4) & (WORDS - 1)]
        return word >> (15 - (position & 15)) & 1

    def write(self, value: int) -> None:
        before = self.driven
        self.driven = value & regs.EECD_DRIVEN
        if not value & regs.EECD_CS:
            return  # deselected: nothing is clocked
        if not before & regs.EECD_CS:  # CS rising: a new command starts
            self.shift = self.bits_in = self.out = 0
            self.reading = False
        if not (value ^ before) & regs.EECD_SK:
            return
        if not value & regs.EECD_SK:  # falling edge: the next output bit
            if self.reading:
                self.out = min(self.out + 1, WORDS * 16)
            return
        if self.bits_in < COMMAND_BITS:  # rising edge: shift a command bit in
            self.shift = (self.shift << 1 | bool(value & regs.EECD_DI)) & 0x1FF
            self.bits_in += 1
            if self.bits_in == COMMAND_BITS:
                self.reading = self.shift >> ADDRESS_BITS == READ_COMMAND
                self.out = -1

    # -- migration -------------------------------------------------------------------------
    def pack(self) -> bytes:
        return _STATE.pack(self.driven, self.shift, self.bits_in, self.out, self.reading)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Microwire:
        """Raises ValueError on a state the machine cannot reach."""
        if len(data) != _STATE.size:
            raise ValueError(f"EECD state of {len(data)} bytes")
        driven, shift, bits_in, out, reading = _STATE.unpack(data)
        if (
            driven & ~regs.EECD_DRIVEN
            or shift > 0x1FF
            or bits_in > COMMAND_BITS
            or reading > 1
            or not -1 <= out <= WORDS * 16
            or (reading and bits_in != COMMAND_BITS)
        ):
            raise ValueError("EECD state out of range")
        return cls(driven, shift, bits_in, out, bool(reading))

    @staticmethod
    def packed_size() -> int:
        return _STATE.size
