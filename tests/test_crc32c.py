"""csrc/crc32c.c: the three-stream hardware CRC equals the byte-table reference for every length
and alignment, and matches the published check value."""

import os
import random

from engine import _native

ffi, lib = _native.ffi, _native.lib


def crc(fn, data, start=0):
    return fn(start, ffi.from_buffer(data), len(data))


def test_check_value():
    assert crc(lib.crc32c_extend, b"123456789") == 0xE3069283
    assert crc(lib.crc32c_extend_sw, b"123456789") == 0xE3069283


def test_every_length_and_alignment_matches_the_reference():
    rnd = random.Random(1)
    buf = os.urandom(20000)
    lengths = list(range(0, 800)) + [4095, 4096, 4097, 4032, 4033, 8192, 12288, 16384] + \
        [rnd.randrange(0, 19990) for _ in range(300)]
    for n in lengths:
        for align in (0, 1, 3, 7):
            data = buf[align:align + n]
            assert crc(lib.crc32c_extend, data) == crc(lib.crc32c_extend_sw, data), (n, align)


def test_extending_equals_one_pass():
    data = os.urandom(10000)
    part = crc(lib.crc32c_extend, data[:3333])
    assert crc(lib.crc32c_extend, data[3333:], part) == crc(lib.crc32c_extend, data)
