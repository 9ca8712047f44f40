/* The lsfs engine's internals, shared by the files of csrc/lsfs/, csrc/log/writer.c and csrc/image/mover.c.
 * Public API and design notes: csrc/volume.h. Bytes on disk: docs/FORMAT.md, docs/IMAGE.md.
 *
 * Locking rule (every function declared here, unless its comment says otherwise):
 *  - v->lock must be held by the caller of any function below that takes a vol; the public vol_*
 *    functions take it themselves. Exceptions: the unlocked parts of lsfs_checkpoint_serialised
 *    (sync and write of checkpoint.tmp) and of vol_gc_segment (reading the victim), and
 *    vol_open/vol_free, when no other thread knows v.
 *  - Lock order: move_lock (image mover), then ckpt_lock (vol_checkpoint, vol_gc_segment around
 *    each move, the mover), then lock. Never the other way round; never two vols at once.
 *  - Every system call that changes a file goes through csrc/io.h (fault injection and
 *    recording for the tests).
 *
 * Error contract (all int-returning functions here): 0 (or a count) on success, -1 with errno
 * set and a message in vol_errmsg() (lsfs_fail) on failure; a failure changes nothing unless
 * the function's comment says what it leaves behind. */
#ifndef BLOCKREP_LSFS_INTERNAL_H
#define BLOCKREP_LSFS_INTERNAL_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "volume.h"
#include "blockmap.h"
#include "crc32c.h"
#include "io.h"
#include "log/format.h"
#include "log/reader.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <zstd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14 */
#endif

#define CKPT_MAGIC 0x4b435242u
#define CKPT_VERSION 3u      /* 2 is still read: 96-byte map headers, no flags or uuid */
#define CKPT_MAP_HDR 112u
#define CKPT_V2_MAP_HDR 96u
#define CKPT_HEAD_TOMB_PENDING 1u /* head map's flags: the image is not yet punched where the head is trimmed */
#define READ_CHUNK_BLOCKS 16u /* reads copy and verify 64 KiB at a time (lsfs_read_blocks) */
#define POOL_MAX 64

typedef struct seg_info {
    uint64_t id;
    int fd;               /* -1 when the segment does not exist */
    uint8_t *map;         /* read-only shared mapping of the file (reads are memcpy, no syscall) */
    size_t map_len;
    uint8_t needs_sync;
    uint64_t total_blocks;
    uint64_t live_blocks;
    uint64_t file_size;   /* for sealed segments; active: v->active_off */
} seg_info;

typedef struct snap {
    uint32_t id;       /* > 0; 0 names the head in the API */
    uint32_t gen;      /* every entry of its map has gen <= this */
    uint64_t created;  /* unix time, ns */
    char name[VOL_SNAP_NAME_MAX + 1];
    uint8_t uuid[16];  /* identity, unique in the volume, never nil (FORMAT.md §8) */
    uint32_t flags;    /* kept for the caller, no meaning to the engine */
    blockmap *map;     /* a frozen clone of the head: never changed, except relocations */
} snap;

struct vol {
    pthread_mutex_t lock;
    pthread_mutex_t ckpt_lock; /* one checkpoint at a time (taken before lock, never inside it) */
    bm_hooks hooks;           /* keeps segs[].live_blocks = distinct entries referencing each */
    snap *snaps;              /* ordered by gen (creation) */
    uint32_t nsnaps, snaps_cap, next_snap_id;
    int dirfd, segdirfd;
    vol_params p;
    uint64_t nblocks;
    uint64_t uuid8;
    blockmap *head;
    uint32_t gen;
    uint64_t next_seq;
    seg_info *segs;           /* sorted by id; see log_seg_find */
    size_t nsegs, nsegs_cap;
    uint64_t active;          /* id of the active segment */
    uint64_t active_off;      /* logical end of the active segment (file + buffer) */
    uint64_t wbase;           /* file offset of wbuf[0]: a multiple of wbuf_cap (the window) */
    uint64_t written_off;     /* bytes of the active segment already written to the file */
    uint8_t *wbuf;
    size_t wbuf_len, wbuf_cap;
    int dir_dirty;
    int records_since_marker;
    int req_first;            /* the next record appended starts a request (F_FIRST) */
    uint64_t requests;        /* client requests served (the collector's measure of "busy") */
    uint64_t since_ckpt;
    uint64_t ckpt_size;
    uint64_t corrupt_reads;
    uint64_t gc_segments, gc_bytes_moved;
    uint64_t gc_busy;         /* segment being collected (0: none): never retired meanwhile */
    int sync_err;             /* errno of a failed fdatasync: sticky until reopen (see log_sync_all) */
    uint64_t max_seen_id;     /* highest segment id in the checkpoint: never reused */
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    uint8_t *zbuf;            /* compression scratch */
    uint8_t *dcache;          /* last decompressed record */
    uint64_t dcache_loc;      /* loc (without index) of dcache, 0 = empty */
    uint8_t *scratch;         /* RMW scratch for unaligned requests */
    size_t scratch_cap;
    /* The map changes of the request being appended: applied once all of its records are in
     * the log, dropped (with the records, where still possible) if one cannot be appended, so
     * a request is all or nothing in memory as it is at recovery. */
    struct pend { uint64_t lba, n; bm_entry e; } *pend; /* n > 0: a tombstone run of kind e */
    size_t npend, pend_cap;
    /* Recycled segment files: dead segments are renamed to NNN.free and reused for new
     * segments, so appends overwrite page-cache pages and disk blocks already allocated
     * (as PostgreSQL recycles WAL files). Stale records in them have older sequence numbers,
     * which recovery never accepts (FORMAT.md §3). */
    struct { int fd; uint64_t old_id; uint64_t size; } pool[64];
    int npool;
    /* Image backend (docs/IMAGE.md); image_fd < 0 for lsfs. */
    int image_fd;
    int image_err;            /* errno of a failed image pwrite/punch/fdatasync: sticky (fsyncgate) */
    pthread_mutex_t move_lock; /* one mover at a time; taken before ckpt_lock */
    uint64_t head_log_blocks; /* head entries of kind DATA/COMP: what the mover has still to move */
    uint64_t move_seg;        /* the mover's cursor: sealed segments below it hold no head block */
    int tomb_pending;         /* the head gained ZERO/TRIM entries since the image was last punched */
    uint64_t tomb_epoch;      /* counts those changes: a punch pass clears tomb_pending only if none came meanwhile */
    uint64_t moved_bytes, cbw_blocks;
};


/* A set of leaf pointers (open addressing), to visit each distinct leaf once and to number
 * leaves in a checkpoint (lsfs/map.c). */
typedef struct leafset {
    const bm_leaf **keys;
    uint32_t *vals;
    size_t cap, n;
} leafset;

/* Where the log ends, so that a record appended after this point can be taken back while its
 * bytes are still only in the window (nothing of it reached the file). log/writer.c. */
typedef struct log_pos {
    uint64_t seg, off, seq, since;
    int marker;
} log_pos;

/* ---------- lsfs/volume.c ---------- */
/* Set errno = err and this thread's vol_errmsg() to the message; returns -1 (so: return lsfs_fail(...)). */
int lsfs_fail(int err, const char *fmt, ...);

/* ---------- log/writer.c ---------- */
/* Index of the first entry whose id is >= id (v->nsegs if none). */
size_t log_seg_lower_bound(const vol *v, uint64_t id);
/* The table entry for segment id, or NULL (no errno, no message). Pointers die at the next log_seg_add. */
seg_info *log_seg_find(vol *v, uint64_t id);
/* The entry for id, added (fd -1) when absent; entries of retired segments are dropped first.
 * Moves entries: no seg_info pointer survives a call. NULL + ENOMEM. */
seg_info *log_seg_add(vol *v, uint64_t id);
/* "%016llx.seg" into buf (32 bytes). */
void log_seg_name(char *buf, uint64_t id);
/* pwrite all of buf through io_pwrite (EINTR retried): 0, or -1 + errno with no message (the
 * caller says what was being written). */
int log_full_pwrite(int fd, const void *buf, size_t len, uint64_t off);
/* The write buffer is a window [wbase, wbase + wbuf_cap) of the active segment's file, aligned
 * to its own size. Bytes [written_off, wbase + wbuf_len) are not yet in the file. A full window is
 * written out whole, so those writes end on aligned boundaries: a write that ends mid-folio makes
 * the kernel zero the rest of a (large) folio first, measured at a third of the write path.
 * log_flush_wbuf writes everything buffered and keeps the window (later appends continue in it).
 * On failure nothing is lost: the bytes stay buffered (and readable), errno says why. */
int log_flush_wbuf(vol *v);
/* Map segment id (its fd open) read-only: 0, or -1 + errno + message (s->map then NULL). */
int log_seg_map(vol *v, uint64_t id);
/* Remove a segment: recycle its file into the pool when there is room, else unlink it. */
void log_seg_retire(vol *v, uint64_t id, int recycle);
/* Create (or take from the pool) segment id, write its header and make it the active segment,
 * with an empty window. -1 + errno + message (EFBIG: no id left): no file is left behind. */
int log_create_segment(vol *v, uint64_t id);
/* Seal the active segment (write out the window, cut it to its end) and create the next one.
 * -1 + errno + message: the old segment stays active, as it was. */
int log_rotate(vol *v);
/* Append one record (rotating first if it does not fit). Returns the offset of its payload in the
 * active segment via *pay_off. -1 + errno + message: nothing appended (the window unchanged). */
int log_append_record(vol *v, int type, int flags, uint32_t nblocks, uint64_t lba, uint32_t gen,
                      const uint32_t *crcs, uint32_t ncrc, const void *payload, uint32_t plen,
                      uint64_t *rec_off_out, uint64_t *pay_off);
/* After an fdatasync fails, what reached the disk is unknown: Linux reports a write-back error
 * once and may have dropped the dirty pages, so a retry can succeed without the data ever being
 * written ("fsyncgate"). So the first failure is sticky, as in PostgreSQL: every later flush,
 * FUA write, snapshot and checkpoint fails until the volume is reopened, and recovery then reads
 * what really is on the disk. */
int log_sync_failed(vol *v);
/* Write out the window and fdatasync every segment that needs it, then the directory if a name
 * changed. -1 + errno + message; a failed fdatasync/fsync is sticky (v->sync_err, above). */
int log_sync_all(vol *v);
/* An NBD flush: log_sync_all, then a FLUSH marker if records came since the last one. -1 + errno
 * + message (the marker is not appended). */
int log_flush_locked(vol *v);
/* The log's end now, for log_rewind. Cannot fail. */
log_pos log_tell(const vol *v);
/* 1 and the log is as it was at p, or 0 when that is impossible (a rotation since, or a
 * write-out of the window covered bytes after p: they may be on the disk). */
int log_rewind(vol *v, const log_pos *p);
static inline seg_info *log_active_seg(vol *v) { return log_seg_find(v, v->active); }

/* ---------- lsfs/map.c ---------- */
/* bm_hooks callback (ctx = vol): a leaf gained (+1) or lost (-1) a reference; keeps
 * segs[].live_blocks. Cannot fail. */
void lsfs_live_hook(void *ctx, const bm_leaf *l, int delta);
/* The snapshot with this id, or NULL (no errno, no message). */
snap *lsfs_snap_find(vol *v, uint32_t id);
/* The map behind an API id: 0 = the head, else a snapshot. NULL + ENOENT if none. */
blockmap *lsfs_map_of(vol *v, uint32_t id);
/* Mark [lba, lba+n) as zero/trimmed, skipping blocks that already read as zero (never written,
 * zero, trimmed): they do not change. Mirrors exactly what replay does. */
int lsfs_map_tombstone(vol *v, uint64_t lba, uint64_t n, unsigned kind, uint32_t gen);
/* Queue a map change of the request being appended (n > 0: a tombstone run of kind e).
 * -1 + ENOMEM + message. */
int lsfs_pend_push(vol *v, uint64_t lba, uint64_t n, bm_entry e);
/* Start a request touching [lba, lba+n): the leaves it may change are made private first, so
 * that applying its changes at the end cannot fail half-way. tombstone: only leaves that exist
 * (a trim of never-written space changes nothing). */
int lsfs_request_begin(vol *v, uint64_t lba, uint64_t n, int tombstone);
/* End a request: apply its map changes (r == 0) or drop them and, while its records are still
 * only in the window, the records too (a failed request leaves no trace in memory; records
 * already written out end without their last record, which recovery drops, §3). */
int lsfs_request_end(vol *v, int r, const log_pos *before);
/* An empty set sized for expect leaves. -1 + ENOMEM + message (nothing to free). */
int lsfs_leafset_init(leafset *ls, size_t expect);
/* Insert l; returns 1 if it was new (its value = its insertion number in *val). */
int lsfs_leafset_add(leafset *ls, const bm_leaf *l, uint32_t *val);
/* Free the set's memory (not the leaves). */
void lsfs_leafset_free(leafset *ls);

/* ---------- lsfs/requests.c ---------- */
/* Read whole blocks [lba, lba+n) into dst, coalescing runs that are contiguous on disk. */
int lsfs_read_blocks(vol *v, const blockmap *map, uint64_t lba, uint64_t n, uint8_t *dst);

/* ---------- lsfs/snapshots.c ---------- */
/* Add a snapshot with this map (taken over), or a clone of the head when map is NULL. A nil
 * uuid (recorded by an older version) is replaced by the derived one; a name that is not a valid
 * name (only a forged or mis-written record has one) by damaged-name-ID, so that the volume
 * still opens and the snapshot can be listed, read and deleted. */
int lsfs_snap_add(vol *v, uint32_t id, uint32_t gen, uint64_t created, const char *name, const uint8_t *uuid,
                  uint32_t flags, blockmap *map);
/* Drop a snapshot's map: leaves only it held are freed (the hook un-counts them). */
void lsfs_snap_remove(vol *v, uint32_t id);

/* ---------- lsfs/checkpoint.c ---------- */
/* Load VOL/checkpoint into the maps (at open): 0 and *rseg, *roff = where replay starts, 1 if there
 * is no checkpoint, -1 + errno + message (EBADMSG: damaged). */
int lsfs_load_checkpoint(vol *v, uint64_t *rseg, uint64_t *roff);

/* ---------- lsfs/recovery.c ---------- */
/* qsort comparator of uint64_t. */
int lsfs_cmp_u64(const void *a, const void *b);
/* Open segments ids[0..nids) (sorted) and replay the log from (rseg, roff) into the maps, cutting
 * a torn tail and counting damage in rep. -1 + errno + message (EBADMSG: damage recovery must not
 * guess past, e.g. a foreign segment). */
int lsfs_replay(vol *v, uint64_t *ids, size_t nids, uint64_t rseg, uint64_t roff, vol_report *rep);
/* Recompute segs[].live_blocks and head_log_blocks from the maps. -1 + ENOMEM + message. */
int lsfs_recount_live(vol *v);

/* ---------- image/mover.c ---------- */
/* Image backend back-pressure (docs/IMAGE.md §3): while the change log holds more than
 * journal_max bytes of head data, the writer moves a batch itself (waiting for the mover, in
 * effect): the write is delayed, never refused. A mover that cannot write the image (sticky
 * error) no longer holds writes back: the log grows, and `info` shows why. */
void image_journal_backpressure(vol *v, uint64_t count);
/* pread of the image, whole or until its end (zeros after a truncated end: the caller checks
 * CRCs); -1 with errno and a message on a read error. Needs no lock of its own (the image fd
 * lives as long as v). */
int image_pread(vol *v, void *buf, size_t len, uint64_t off);

#endif
