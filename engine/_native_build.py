"""Build the C hot path (csrc/) into the cffi extension module ``engine._native``.

Run from the repository root: ``python -m engine._native_build`` (scripts/bootstrap.sh does).
API mode: every call releases the GIL, so background threads run beside requests.
"""

import os
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# The C units of the engine (tests/test_sanitizers.py builds the same list into its stress binary).
SOURCES = ("crc32c.c", "blockmap.c", "io.c",
           "log/reader.c", "log/writer.c",
           "lsfs/volume.c", "lsfs/requests.c", "lsfs/map.c", "lsfs/snapshots.c", "lsfs/checkpoint.c",
           "lsfs/recovery.c", "lsfs/collector.c",
           "image/mover.c")

# A hand copy of the public declarations of csrc/volume.h, io.h and crc32c.h (cffi cannot read
# the headers' preprocessor lines); tests/test_native_build.py parses the headers and fails when
# this copy and them disagree (a function, a parameter, a struct field, a constant).
CDEF = """
#define VOL_BLOCK_SIZE ...
#define VOL_MAX_SIZE ...
#define VOL_SEGMENT_MIN ...
#define VOL_SEGMENT_MAX ...
#define VOL_ZSTD_LEVEL_DEFAULT ...
#define VOL_SNAP_NAME_MAX ...
#define VOL_SNAP_NONE ...
#define VOL_EXTENT_DATA ...
#define VOL_EXTENT_HOLE ...
typedef struct vol vol;
typedef struct vol_params {
    uint64_t size; uint8_t uuid[16]; int compress; int zstd_level;
    uint64_t segment_size; uint64_t wbuf_size; int readonly;
    const char *image_path; uint64_t journal_max;
} vol_params;
typedef struct vol_report {
    uint64_t records_replayed; uint64_t bytes_replayed; uint64_t torn_bytes_dropped;
    uint64_t corrupt_records; uint64_t skipped_bytes; uint64_t segments_deleted;
    uint64_t checkpoint_seq;
} vol_report;
typedef struct vol_stats {
    uint64_t size; uint64_t used_bytes; uint64_t live_blocks; uint64_t segments; uint64_t gen;
    uint64_t next_seq; uint64_t log_since_checkpoint; uint64_t corrupt_reads; uint64_t map_bytes;
    uint64_t active_segment; uint64_t gc_segments; uint64_t gc_bytes_moved;
    uint64_t stored_data_bytes; uint64_t dead_segments; uint64_t requests; uint64_t pool_files;
    uint64_t journal_pending_bytes; uint64_t journal_max_bytes; uint64_t image_moved_bytes;
    uint64_t image_cbw_blocks; uint64_t image_current; uint64_t image_error;
} vol_stats;
typedef struct vol_snap_info {
    uint32_t id; uint32_t gen; uint64_t created; char name[65]; uint8_t uuid[16]; uint32_t flags;
} vol_snap_info;
vol *vol_open(const char *voldir, const vol_params *p, vol_report *report);
int vol_close(vol *v);
void vol_abandon(vol *v);
int vol_read(vol *v, void *buf, uint64_t count, uint64_t offset);
int vol_write(vol *v, const void *buf, uint64_t count, uint64_t offset, int fua);
int vol_zero(vol *v, uint64_t count, uint64_t offset, int fua, int trim);
int vol_flush(vol *v);
int vol_checkpoint(vol *v);
int vol_snap_create(vol *v, const char *name, uint64_t created_ns, const uint8_t *uuid, uint32_t flags,
                    uint32_t *id_out);
int vol_snap_delete(vol *v, uint32_t id);
int vol_snap_list(vol *v, vol_snap_info *out, int max);
int vol_snap_read(vol *v, uint32_t id, void *buf, uint64_t count, uint64_t offset);
int vol_snap_extents(vol *v, uint32_t id, uint64_t count, uint64_t offset, uint64_t *out, int max);
int vol_diff(vol *v, uint32_t from_id, uint32_t to_id, uint64_t gran, uint64_t *pos, uint64_t *out, int max);
int64_t vol_snap_pinned(vol *v, uint32_t id);
int64_t vol_gc_pick(vol *v, double ratio);
int vol_gc_segment(vol *v, uint64_t seg);
int vol_get_stats(vol *v, vol_stats *s);
int vol_pool_trim(vol *v, int keep);
int64_t vol_move(vol *v, uint64_t max_bytes, int seal);
const char *vol_errmsg(void);
uint32_t crc32c_extend(uint32_t crc, const void *buf, size_t len);
void vol_io_fault(unsigned mask, uint64_t nth, int err, int persistent);
uint64_t vol_io_calls(void);
uint64_t vol_io_failures(void);
typedef void (*vol_io_recorder)(int op, uint64_t ino, uint64_t dir, const char *name, const char *name2,
                                const void *buf, uint64_t len, uint64_t off, int64_t result);
void vol_io_record(vol_io_recorder fn);
extern "Python" void _io_recorder(int op, uint64_t ino, uint64_t dir, const char *name, const char *name2,
                                  const void *buf, uint64_t len, uint64_t off, int64_t result);
uint32_t crc32c_extend_sw(uint32_t crc, const void *buf, size_t len);
void crc32c_blocks(const void *buf, size_t nblocks, size_t bs, uint32_t *out);
"""

# BLOCKREP_SANITIZE=address,undefined builds an instrumented module (tests/test_sanitizers.py)
SANITIZE = os.environ.get("BLOCKREP_SANITIZE", "")
CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=undefined"] \
    if SANITIZE else ["-O2", "-g"]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "engine._native",
    '#include "volume.h"\n#include "crc32c.h"\n#include "io.h"\n',
    sources=[str(CSRC / n) for n in SOURCES],
    include_dirs=[str(CSRC)],
    libraries=["zstd", "pthread"],
    extra_compile_args=CFLAGS + ["-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    extra_link_args=[f"-fsanitize={SANITIZE}"] if SANITIZE else [],
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose=False)
    # compile() writes the module to tmpdir/engine/; move it next to this file
    built = list((ROOT / "build" / "cffi" / "engine").glob("_native*.so"))
    for so in built:
        so.replace(ROOT / "engine" / so.name)
    print("built", ", ".join(p.name for p in built))
