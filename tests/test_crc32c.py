"""csrc/crc32c.c: the three-stream hardware CRC equals the byte-table reference for every length
and alignment, and matches the published check value; crc32c_blocks (three blocks interleaved)
equals one CRC per block."""

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


def test_blocks_equal_one_crc_per_block_for_every_count_size_and_alignment():
    rnd = random.Random(2)
    buf = os.urandom(70000)
    for bs in (1, 7, 8, 9, 512, 4096):
        for n in (0, 1, 2, 3, 4, 5, 6, 7, 16, 17):
            for align in (0, 1, 5):
                if align + n * bs > len(buf):
                    continue
                data = buf[align:align + n * bs]
                out = ffi.new("uint32_t[]", max(n, 1))
                lib.crc32c_blocks(ffi.from_buffer(data), n, bs, out)
                want = [crc(lib.crc32c_extend_sw, data[i * bs:(i + 1) * bs]) for i in range(n)]
                assert list(out)[:n] == want, (bs, n, align)
    # a flipped bit changes exactly its own block's CRC
    data = bytearray(os.urandom(8 * 4096))
    before = ffi.new("uint32_t[]", 8)
    lib.crc32c_blocks(ffi.from_buffer(data), 8, 4096, before)
    i = rnd.randrange(len(data))
    data[i] ^= 1 << rnd.randrange(8)
    after = ffi.new("uint32_t[]", 8)
    lib.crc32c_blocks(ffi.from_buffer(data), 8, 4096, after)
    assert [b != a for b, a in zip(before, after, strict=True)] == [k == i // 4096 for k in range(8)]
