/* The lsfs volume: a log of checksummed records in segment files plus a block map.
 * On-disk format: docs/FORMAT.md. Python wrapper: engine/volume/ (interface.py). The code: csrc/log/
 * (the log both backends use), csrc/lsfs/ (the engine; internal.h has its struct and rules),
 * csrc/image/. engine/_native_build.py copies the declarations below for cffi;
 * tests/test_native_build.py checks that copy against this file.
 *
 * Locking (every function below takes what it needs; callers hold nothing):
 *  - v->lock, one mutex per volume: every public function takes it for its whole duration,
 *    except vol_checkpoint (it freezes clones of the maps under it, then syncs and serialises
 *    them without it) and vol_gc_segment (it takes it per record moved).
 *  - v->ckpt_lock: held by vol_checkpoint for its whole duration (checkpoints take turns: one
 *    writer of checkpoint.tmp) and by vol_gc_segment around each move (blockmap_relocate edits
 *    leaves shared with the frozen clones in place, so a move waits until no checkpoint reads
 *    them). Order: ckpt_lock before lock, never the other way round.
 *  - v->move_lock (image backend): one mover at a time (the background mover, or a writer over
 *    journal_max that moves a batch itself). Order: move_lock, ckpt_lock, lock.
 *  - csrc/io.c's io_lock guards only the test hooks' settings; it is never held across a call.
 *  - cffi releases the GIL around each call, so background work (collector, checkpoints) runs
 *    beside requests. No static buffers: every scratch buffer belongs to a vol or a call.
 *
 * Notes on the design:
 *  - Writes are appended to an in-memory window of the active segment (8 MiB, see log_flush_wbuf in log/writer.c) and reach the file
 *    in 2 MiB-aligned pieces when it fills, and whole on flush/FUA, on rotation and on checkpoint. Reads of buffered blocks copy
 *    from the buffer. A flush writes the buffer, fdatasyncs every segment with unsynced bytes and
 *    the directory if a segment was created, and then appends a FLUSH marker (FORMAT.md §3), so a
 *    marker on disk proves everything before it had been synced.
 *  - If the buffer cannot be written (ENOSPC, EIO) it is kept: acknowledged data stays readable
 *    from memory, new writes fail with the same errno until a later attempt succeeds.
 *  - A failed fdatasync (or directory fsync) is sticky: what reached the disk is unknown (Linux
 *    reports a write-back error once and may drop the dirty pages), so every later flush, FUA
 *    write, snapshot and checkpoint fails until the volume is reopened ("fsyncgate"; PostgreSQL
 *    does the same); reads and buffered writes go on.
 *  - Every function returns 0 (or a count) on success, -1 with errno set on failure; a message
 *    for the last failure of the calling thread is in vol_errmsg(). EBADMSG means damage (a
 *    checksum or a structure on disk); EIO, ENOSPC... are the disk's own errors. A failure
 *    changes nothing, except where noted (vol_snap_create/delete after an fdatasync failure).
 */
#ifndef BLOCKREP_VOLUME_H
#define BLOCKREP_VOLUME_H
#include <stdint.h>

/* Limits, defined once: engine/limits.py holds the same values for Python (checked against
 * these by tests/test_native_build.py through the cffi module). */
#define VOL_BLOCK_SIZE 4096u               /* the block: fixed (FORMAT.md §1) */
#define VOL_MAX_SIZE (16ull << 40)         /* largest volume: 16 TiB */
#define VOL_SEGMENT_MIN (1u << 20)         /* segment_size bounds */
#define VOL_SEGMENT_MAX (256u << 20)
#define VOL_ZSTD_LEVEL_DEFAULT 3           /* vol_params.zstd_level 0 means this */

typedef struct vol vol;

typedef struct vol_params {
    uint64_t size;          /* bytes, multiple of 4096 */
    uint8_t uuid[16];
    int compress;           /* 0 none, 1 zstd */
    int zstd_level;
    uint64_t segment_size;  /* bytes */
    uint64_t wbuf_size;     /* write buffer bytes (0 = default 8 MiB) */
    int readonly;           /* recover in memory only: no file is written, changes fail EROFS */
    /* Image backend (docs/IMAGE.md): voldir is then the change-log directory and the blocks
     * live, once moved, in this raw file of exactly `size` bytes. NULL: the lsfs backend. */
    const char *image_path;
    uint64_t journal_max;   /* bytes of head data the change log may hold unmoved (0 = 1 GiB) */
} vol_params;

typedef struct vol_report {      /* what recovery found, for logs and `blockrep info` */
    uint64_t records_replayed;
    uint64_t bytes_replayed;
    uint64_t torn_bytes_dropped;
    uint64_t corrupt_records;    /* valid header, data fails its CRC (reads give EIO) */
    uint64_t skipped_bytes;      /* unparseable bytes inside the durable log */
    uint64_t segments_deleted;
    uint64_t checkpoint_seq;
} vol_report;

typedef struct vol_stats {
    uint64_t size;
    uint64_t used_bytes;         /* segment files + checkpoint */
    uint64_t live_blocks;        /* blocks whose data is in the log (DATA/COMP entries) */
    uint64_t segments;
    uint64_t gen;
    uint64_t next_seq;
    uint64_t log_since_checkpoint;
    uint64_t corrupt_reads;      /* reads that failed a CRC since open */
    uint64_t map_bytes;          /* memory held by the head map's leaves */
    uint64_t active_segment;
    uint64_t gc_segments;        /* segments reclaimed since open */
    uint64_t gc_bytes_moved;
    uint64_t stored_data_bytes;  /* bytes of payload written into live segments (compressed size) */
    uint64_t dead_segments;      /* sealed segments with no live block: deleted by the next checkpoint */
    uint64_t requests;           /* read/write/zero/trim requests served since open */
    uint64_t pool_files;         /* recycled segment files waiting for reuse (counted in used_bytes) */
    /* image backend (0 for lsfs) */
    uint64_t journal_pending_bytes; /* head blocks still in the change log, x 4096 */
    uint64_t journal_max_bytes;
    uint64_t image_moved_bytes;  /* moved into the image since open */
    uint64_t image_cbw_blocks;   /* image blocks preserved for snapshots before an overwrite */
    uint64_t image_current;      /* 1: the image file alone equals the head (nothing to move or punch) */
    uint64_t image_error;        /* errno of a failed image write/sync: the mover stopped until reopen */
} vol_stats;

#define VOL_SNAP_NAME_MAX 64
#define VOL_SNAP_NONE 0xffffffffu

typedef struct vol_snap_info {
    uint32_t id;
    uint32_t gen;
    uint64_t created; /* unix ns */
    char name[VOL_SNAP_NAME_MAX + 1];
    uint8_t uuid[16]; /* identity, RFC 4122 byte order; unique in the volume, never nil */
    uint32_t flags;   /* as given to vol_snap_create (0 for snapshots recorded without) */
} vol_snap_info;

#define VOL_EXTENT_DATA 0
#define VOL_EXTENT_HOLE 3 /* NBD_STATE_HOLE | NBD_STATE_ZERO */

vol *vol_open(const char *voldir, const vol_params *p, vol_report *report);
int vol_close(vol *v);             /* (image: drain the log) flush, checkpoint, free; v is freed even on error */
void vol_abandon(vol *v);          /* free without writing anything: a simulated process crash */
int vol_read(vol *v, void *buf, uint64_t count, uint64_t offset);
int vol_write(vol *v, const void *buf, uint64_t count, uint64_t offset, int fua);
int vol_zero(vol *v, uint64_t count, uint64_t offset, int fua, int trim);
int vol_flush(vol *v);
int vol_checkpoint(vol *v);

/* Snapshots (FORMAT.md §5, §8). Ids are > 0; id 0 names the head where a map is asked for.
 * create: a SNAP record, a clone of the head's map, a new generation, a flush (durable when it
 * returns). uuid: 16 bytes, the snapshot's identity (a DR snapshot passes the primary's), or
 * NULL for a new random (version 4) one; flags: stored and listed, no meaning to the engine.
 * Errors: EROFS read-only; EINVAL a name outside [A-Za-z0-9._-]{1,64} or the nil uuid; EEXIST a
 * snapshot with that name, or with that uuid, exists (a volume never holds two snapshots with
 * one identity; the message says which); ENOMEM; an errno of getrandom; or the errno of the
 * flush of earlier writes, of the append or of the sync (ENOSPC, EIO): each of these changes
 * nothing. A sync that fails while the record is still only in the write window takes it back;
 * one that fails after its bytes reached the file (fdatasync EIO) drops it from memory and
 * appends a SNAPDEL record, but a failed fdatasync is sticky (below), so after a crash the
 * snapshot may be there: the message says so (only if even that append fails is the snapshot
 * left made, and the message says that).
 * delete: earlier writes flushed, a SNAPDEL record, a sync, then the map dropped; ENOENT. A
 * sync failure takes the record back (nothing changed) or, after the bytes reached the file,
 * completes the delete in memory too (memory never disagrees with the log); the message says
 * which. */
int vol_snap_create(vol *v, const char *name, uint64_t created_ns, const uint8_t *uuid, uint32_t flags,
                    uint32_t *id_out);
int vol_snap_delete(vol *v, uint32_t id);
/* Fills up to max entries, oldest first; returns the number of snapshots. */
int vol_snap_list(vol *v, vol_snap_info *out, int max);
int vol_snap_read(vol *v, uint32_t id, void *buf, uint64_t count, uint64_t offset);
/* Block status of map id (0 = head): fill out[3*i..] with (offset, length, type) runs covering
 * [offset, offset+count) at block granularity, at most max runs; returns the number of runs. */
int vol_snap_extents(vol *v, uint32_t id, uint64_t count, uint64_t offset, uint64_t *out, int max);
int vol_diff(vol *v, uint32_t from_id, uint32_t to_id, uint64_t gran, uint64_t *pos, uint64_t *out, int max);
int64_t vol_snap_pinned(vol *v, uint32_t id);
/* The sealed segment most worth collecting, or 0 when disk use is within ratio x live data. */
int64_t vol_gc_pick(vol *v, double ratio);
/* Move the live blocks of sealed segment seg to the head of the log (RELOC records, same
 * generation). The segment is then dead and the next vol_checkpoint deletes it. */
int vol_gc_segment(vol *v, uint64_t seg);
int vol_get_stats(vol *v, vol_stats *s);
/* Image backend: move up to max_bytes of head blocks from the change log into the image, oldest
 * segment first (docs/IMAGE.md §3): copy-before-write of image blocks a snapshot still maps,
 * fdatasync of the log, pwrite + fdatasync of the image, then the maps say IMAGE. seal: when no
 * sealed segment has head blocks left, seal the active one and go on, and once nothing is left
 * in the log punch the image where the head reads as trimmed/zeroed (what a drain does).
 * Returns bytes moved (0: nothing to do), or -1: EINVAL (lsfs volume), EROFS, or the errno of
 * the log or image I/O (an image write or sync failure is sticky: the mover stops until the
 * volume is reopened; writes go on into the log). Takes move_lock, then ckpt_lock, then lock. */
int64_t vol_move(vol *v, uint64_t max_bytes, int seal);
/* Unlink recycled segment files beyond `keep` (idle: give the disk space back). */
int vol_pool_trim(vol *v, int keep);
const char *vol_errmsg(void);

#endif
