"""Limits shared with the C engine, defined once for Python.

The C side is in csrc/volume.h (VOL_BLOCK_SIZE, VOL_MAX_SIZE, VOL_SEGMENT_MIN/MAX,
VOL_ZSTD_LEVEL_DEFAULT, VOL_SNAP_NAME_MAX, VOL_SNAP_NONE); the cffi module exports those, and
tests/test_native_build.py checks that every value here equals its C twin. Import from here,
never restate a number.
"""

BLOCK = 4096  # VOL_BLOCK_SIZE: the block, fixed (docs/FORMAT.md §1)
MAX_SIZE = 16 << 40  # VOL_MAX_SIZE: largest volume, 16 TiB
SEGMENT_MIN = 1 << 20  # VOL_SEGMENT_MIN / VOL_SEGMENT_MAX: segment_size bounds
SEGMENT_MAX = 256 << 20
ZSTD_LEVEL_DEFAULT = 3  # VOL_ZSTD_LEVEL_DEFAULT: what the engine uses when zstd_level is 0
ZSTD_LEVEL = 1  # what engine/volume.py asks for: the fastest standard level (the request path pays for it)
SNAP_NAME_MAX = 64  # VOL_SNAP_NAME_MAX
NO_SNAPSHOT = 0xFFFFFFFF  # VOL_SNAP_NONE: vol_diff's "since the volume was created"

# Python name -> C name, for tests/test_native_build.py
C_NAMES = {
    "BLOCK": "VOL_BLOCK_SIZE",
    "MAX_SIZE": "VOL_MAX_SIZE",
    "SEGMENT_MIN": "VOL_SEGMENT_MIN",
    "SEGMENT_MAX": "VOL_SEGMENT_MAX",
    "ZSTD_LEVEL_DEFAULT": "VOL_ZSTD_LEVEL_DEFAULT",
    "SNAP_NAME_MAX": "VOL_SNAP_NAME_MAX",
    "NO_SNAPSHOT": "VOL_SNAP_NONE",
}
