/* The lsfs volume engine: log records, segments, recovery, checkpoints, the collector.
 * See volume.h for the design notes and docs/FORMAT.md for every byte on disk.
 *
 * Locking rule for this file: v->lock must be held when you call any static function below
 * that takes a vol (the public vol_* functions take it themselves), except where a function's
 * comment says it runs without it (the unlocked part of checkpoint_serialised, the reading part
 * of vol_gc_segment), and during vol_open/vol_free, when no other thread knows v. ckpt_lock is
 * taken only by vol_checkpoint and vol_gc_segment, always before v->lock. Every system call that
 * changes a file goes through csrc/io.h (fault injection and recording for the tests). */
#define _GNU_SOURCE
#include "volume.h"
#include "blockmap.h"
#include "crc32c.h"
#include "io.h"

#include <dirent.h>
#include <linux/falloc.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zstd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14 */
#endif

#define BS 4096u
#define SEG_HDR 64u
#define REC_HDR 48u
#define SEG_MAGIC 0x47535242u
#define REC_MAGIC 0x43525242u
#define CKPT_MAGIC 0x4b435242u
#define CKPT_VERSION 3u      /* 2 is still read: 96-byte map headers, no flags or uuid */
#define CKPT_MAP_HDR 112u
#define CKPT_V2_MAP_HDR 96u
#define CKPT_HEAD_TOMB_PENDING 1u /* head map's flags: the image is not yet punched where the head is trimmed */
#define MAX_REC_BLOCKS 1024u
#define READ_CHUNK_BLOCKS 16u /* reads copy and verify 64 KiB at a time (read_blocks) */
#define MAX_COMP_BLOCKS 16u
#define MAX_TOMB_BLOCKS (1u << 30)
#define SEG_ID_MAX 0xfffffffull /* 28 bits in a map entry (bm_loc) */

enum { R_WRITE = 1, R_ZERO = 2, R_TRIM = 3, R_RELOC = 4, R_FLUSH = 5, R_SNAP = 6, R_SNAPDEL = 7 };
#define SNAP_PAYLOAD 112u
#define SNAP_V1_PAYLOAD 96u /* written before snapshots had a uuid and flags; still replayed */
#define SNAPDEL_PAYLOAD 8u
enum { F_COMP = 1, F_MORE = 2, F_FIRST = 4 };

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
    seg_info *segs;           /* sorted by id; see seg_find */
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
    int sync_err;             /* errno of a failed fdatasync: sticky until reopen (see sync_all) */
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

#define POOL_MAX 64

static __thread char errbuf[512];

const char *vol_errmsg(void) { return errbuf; }

static int fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, sizeof errbuf, fmt, ap);
    va_end(ap);
    errno = err;
    return -1;
}

static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* ---------- segment table ---------- */

/* The segment table is a dense array sorted by id, searched by bisection (the newest, the
 * active segment, first): its memory follows the segments that exist, not the highest id the
 * log ever used (a long-lived volume, or a hostile file name such as 000000000fffffff.seg). */
/* Index of the first entry whose id is >= id (v->nsegs if none). */
static size_t seg_lower_bound(const vol *v, uint64_t id)
{
    size_t lo = 0, hi = v->nsegs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v->segs[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static seg_info *seg_find(vol *v, uint64_t id)
{
    if (v->nsegs && v->segs[v->nsegs - 1].id == id)
        return &v->segs[v->nsegs - 1];
    size_t lo = seg_lower_bound(v, id);
    return lo < v->nsegs && v->segs[lo].id == id ? &v->segs[lo] : NULL;
}

/* The entry for id, added (fd -1) when absent; entries of retired segments are dropped first.
 * Moves entries: no seg_info pointer survives a call. NULL + ENOMEM. */
static seg_info *seg_add(vol *v, uint64_t id)
{
    seg_info *f = seg_find(v, id);
    if (f)
        return f;
    size_t j = 0;
    for (size_t i = 0; i < v->nsegs; i++) {
        seg_info *g = &v->segs[i];
        if (g->fd < 0 && !g->map && !g->total_blocks && !g->live_blocks)
            continue;
        v->segs[j++] = *g;
    }
    v->nsegs = j;
    if (v->nsegs == v->nsegs_cap) {
        size_t cap = v->nsegs_cap ? v->nsegs_cap * 2 : 64;
        seg_info *n = realloc(v->segs, cap * sizeof *n);
        if (!n) {
            fail(ENOMEM, "out of memory for the segment table");
            return NULL;
        }
        v->segs = n;
        v->nsegs_cap = cap;
    }
    size_t lo = seg_lower_bound(v, id);
    memmove(&v->segs[lo + 1], &v->segs[lo], (v->nsegs - lo) * sizeof *v->segs);
    v->segs[lo] = (seg_info){.id = id, .fd = -1};
    v->nsegs++;
    return &v->segs[lo];
}

static inline seg_info *active_seg(vol *v) { return seg_find(v, v->active); }

static void seg_name(char *buf, uint64_t id) { snprintf(buf, 32, "%016llx.seg", (unsigned long long)id); }

static int full_pwrite(int fd, const void *buf, size_t len, uint64_t off)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = io_pwrite(fd, p, len, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}


/* The write buffer is a window [wbase, wbase + wbuf_cap) of the active segment's file, aligned
 * to its own size. Bytes [written_off, wbase + wbuf_len) are not yet in the file. A full window is
 * written out whole, so those writes end on aligned boundaries: a write that ends mid-folio makes
 * the kernel zero the rest of a (large) folio first, measured at a third of the write path.
 * flush_wbuf writes everything buffered and keeps the window (later appends continue in it).
 * On failure nothing is lost: the bytes stay buffered (and readable), errno says why. */
static int flush_wbuf(vol *v)
{
    uint64_t end = v->wbase + v->wbuf_len;
    if (v->written_off >= end)
        return 0;
    size_t from = (size_t)(v->written_off - v->wbase);
    if (full_pwrite(active_seg(v)->fd, v->wbuf + from, (size_t)(end - v->written_off), v->written_off) < 0)
        return fail(errno, "writing segment %llu: %s", (unsigned long long)v->active, strerror(errno));
    v->written_off = end;
    return 0;
}

/* Append bytes to the window, writing it out and sliding it when it fills. Only called after
 * wb_room() said the bytes fit in this window plus (at most) the next one. */
static int wb_slide(vol *v)
{
    uint64_t end = v->wbase + v->wbuf_cap;
    size_t from = (size_t)(v->written_off - v->wbase);
    if (v->written_off < end &&
        full_pwrite(active_seg(v)->fd, v->wbuf + from, (size_t)(end - v->written_off), v->written_off) < 0)
        return fail(errno, "writing segment %llu: %s", (unsigned long long)v->active, strerror(errno));
    v->written_off = end;
    v->wbase = end;
    v->wbuf_len = 0;
    return 0;
}

static void wb_copy(vol *v, size_t *pos, const void *p, size_t n)
{
    memcpy(v->wbuf + *pos, p, n);
    *pos += n;
}

static size_t seg_map_len(vol *v, uint64_t file_size)
{
    uint64_t want = v->p.segment_size + (5u << 20); /* a record may overrun the target */
    return (size_t)(file_size > want ? file_size : want);
}

static int seg_map(vol *v, uint64_t id)
{
    seg_info *s = seg_find(v, id);
    s->map_len = seg_map_len(v, s->file_size);
    void *m = mmap(NULL, s->map_len, PROT_READ, MAP_SHARED, s->fd, 0);
    if (m == MAP_FAILED) {
        s->map = NULL;
        return fail(errno, "mapping segment %llu: %s", (unsigned long long)id, strerror(errno));
    }
    s->map = m;
    return 0;
}

/* Remove a segment: recycle its file into the pool when there is room, else unlink it. */
static void seg_retire(vol *v, uint64_t id, int recycle)
{
    seg_info *s = seg_find(v, id);
    if (!s)
        return;
    char name[32], fname[32];
    seg_name(name, id);
    if (s->map)
        munmap(s->map, s->map_len);
    if (recycle && v->npool < POOL_MAX) {
        snprintf(fname, sizeof fname, "%016llx.free", (unsigned long long)id);
        if (io_renameat(v->segdirfd, name, fname) == 0) {
            v->pool[v->npool].fd = s->fd;
            v->pool[v->npool].old_id = id;
            v->pool[v->npool].size = s->file_size;
            v->npool++;
            *s = (seg_info){.id = id, .fd = -1};
            v->dir_dirty = 1;
            return;
        }
    }
    close(s->fd);
    (void)io_unlinkat(v->segdirfd, name); /* if it fails, the next open deletes it (unreferenced) */
    *s = (seg_info){.id = id, .fd = -1};
    v->dir_dirty = 1;
}

int vol_pool_trim(vol *v, int keep)
{
    pthread_mutex_lock(&v->lock);
    while (v->npool > keep) {
        char fname[32];
        v->npool--;
        snprintf(fname, sizeof fname, "%016llx.free", (unsigned long long)v->pool[v->npool].old_id);
        close(v->pool[v->npool].fd);
        (void)io_unlinkat(v->segdirfd, fname); /* a leftover .free file is deleted at the next open */
        v->dir_dirty = 1;
    }
    pthread_mutex_unlock(&v->lock);
    return 0;
}

static int create_segment(vol *v, uint64_t id)
{
    char name[32];
    if (id > SEG_ID_MAX) /* a map entry holds 28 bits of segment id (blockmap.h) */
        return fail(EFBIG, "no segment id left after %016llx.seg (the last one, %llu): a misnamed file, "
                    "or a log that used them all (then copy the volume to a new one)",
                    (unsigned long long)(id - 1), (unsigned long long)SEG_ID_MAX);
    if (!seg_add(v, id))
        return -1;
    seg_name(name, id);
    int fd = -1;
    while (v->npool && fd < 0) {
        char fname[32];
        v->npool--;
        snprintf(fname, sizeof fname, "%016llx.free", (unsigned long long)v->pool[v->npool].old_id);
        if (io_renameat(v->segdirfd, fname, name) == 0) {
            fd = v->pool[v->npool].fd;
        } else {
            close(v->pool[v->npool].fd);
            (void)io_unlinkat(v->segdirfd, fname);
        }
    }
    if (fd < 0) /* O_NOFOLLOW: a planted symlink is refused, never truncated through */
        fd = io_openat(v->segdirfd, name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return fail(errno, "creating segment %s: %s", name, strerror(errno));
    uint8_t h[SEG_HDR] = {0};
    put32(h, SEG_MAGIC);
    h[8] = 1;
    put32(h + 12, (uint32_t)id);
    memcpy(h + 16, v->p.uuid, 16);
    put64(h + 32, v->next_seq);
    put32(h + 4, crc32c(h + 8, SEG_HDR - 8));
    if (full_pwrite(fd, h, SEG_HDR, 0) < 0) {
        int e = errno;
        close(fd);
        (void)io_unlinkat(v->segdirfd, name);
        return fail(e, "writing segment header %s: %s", name, strerror(e));
    }
    *seg_find(v, id) = (seg_info){.id = id, .fd = fd, .needs_sync = 1};
    if (seg_map(v, id) < 0) {
        int e = errno;
        close(fd);
        *seg_find(v, id) = (seg_info){.id = id, .fd = -1};
        (void)io_unlinkat(v->segdirfd, name);
        return fail(e, "mapping segment %s: %s", name, strerror(e));
    }
    v->active = id;
    v->active_off = v->written_off = SEG_HDR;
    v->wbase = 0;
    v->wbuf_len = SEG_HDR;
    memcpy(v->wbuf, h, SEG_HDR); /* already in the file; kept so the window mirrors it */
    v->dir_dirty = 1;
    return 0;
}

static int rotate(vol *v)
{
    if (flush_wbuf(v) < 0)
        return -1;
    seg_info *s = active_seg(v); /* not used after create_segment (which moves entries) */
    uint64_t old = v->active, old_off = v->active_off, old_base = v->wbase;
    size_t old_len = v->wbuf_len;
    /* Cut a recycled file's stale tail. Recovery would reject its records (older sequence
     * numbers), but a failure here means the disk refuses changes: say so and keep appending
     * to this segment rather than seal it in an unknown state. */
    if (io_ftruncate(s->fd, v->active_off) < 0)
        return fail(errno, "truncating segment %llu: %s", (unsigned long long)old, strerror(errno));
    s->file_size = v->active_off;
    /* Its pages are in the page cache now: map them all at once, so that reads (a memcpy from
     * the mapping) do not each take a page fault on first touch. Best effort. */
    if (s->map)
        (void)madvise(s->map, (size_t)s->file_size, MADV_POPULATE_READ);
    if (create_segment(v, old + 1) < 0) {
        v->active = old;
        v->active_off = v->written_off = old_off;
        v->wbase = old_base;
        v->wbuf_len = old_len;
        return -1;
    }
    return 0;
}

/* Append one record. Returns the offset of its payload in the active segment via *pay_off. */
static int append_record(vol *v, int type, int flags, uint32_t nblocks, uint64_t lba, uint32_t gen,
                         const uint32_t *crcs, uint32_t ncrc, const void *payload, uint32_t plen,
                         uint64_t *rec_off_out, uint64_t *pay_off)
{
    uint64_t reclen = REC_HDR + 4ull * ncrc + plen;
    if (v->active_off + reclen > v->p.segment_size && v->active_off > SEG_HDR)
        if (rotate(v) < 0)
            return -1;
    if (type != R_FLUSH && v->req_first)
        flags |= F_FIRST;
    uint8_t h[REC_HDR];
    put32(h, REC_MAGIC);
    h[8] = (uint8_t)type;
    h[9] = (uint8_t)flags;
    h[10] = h[11] = 0;
    put32(h + 12, nblocks);
    put32(h + 16, plen);
    put32(h + 20, gen);
    put64(h + 24, v->next_seq);
    put64(h + 32, lba);
    put64(h + 40, v->uuid8);
    uint32_t hc = crc32c(h + 8, REC_HDR - 8);
    if (ncrc)
        hc = crc32c_extend(hc, crcs, 4ull * ncrc);
    put32(h + 4, hc);

    /* Copy the record into the window; a record is never larger than a window, so it spans at
     * most this window and the next. The part that fits is copied first, the window written out,
     * the rest copied: if the write-out fails, wbuf_len is unchanged and nothing happened. */
    uint64_t rec_off = v->active_off;
    const struct { const void *p; size_t n; } parts[3] = {
        {h, REC_HDR}, {crcs, 4ull * ncrc}, {payload, plen}};
    size_t room = v->wbuf_cap - v->wbuf_len;
    size_t pos = v->wbuf_len;
    if (reclen <= room) {
        for (int i = 0; i < 3; i++)
            if (parts[i].n)
                wb_copy(v, &pos, parts[i].p, parts[i].n);
        v->wbuf_len = pos;
    } else {
        size_t left = room;
        int i = 0;
        size_t done_in = 0;
        while (left) { /* fill this window */
            size_t take = parts[i].n - done_in < left ? parts[i].n - done_in : left;
            if (take)
                wb_copy(v, &pos, (const uint8_t *)parts[i].p + done_in, take);
            done_in += take;
            left -= take;
            if (done_in == parts[i].n) {
                i++;
                done_in = 0;
            }
        }
        size_t saved_len = v->wbuf_len;
        v->wbuf_len = v->wbuf_cap;
        if (wb_slide(v) < 0) {
            v->wbuf_len = saved_len;
            return -1;
        }
        pos = 0;
        for (; i < 3; i++, done_in = 0)
            if (parts[i].n > done_in)
                wb_copy(v, &pos, (const uint8_t *)parts[i].p + done_in, parts[i].n - done_in);
        v->wbuf_len = pos;
    }
    v->active_off += reclen;
    v->next_seq++;
    if (type != R_FLUSH)
        v->req_first = 0;
    v->since_ckpt += reclen;
    seg_info *as = active_seg(v);
    as->needs_sync = 1;
    if (type == R_WRITE || type == R_RELOC)
        as->total_blocks += nblocks;
    if (type != R_FLUSH)
        v->records_since_marker = 1;
    if (rec_off_out)
        *rec_off_out = rec_off;
    if (pay_off)
        *pay_off = rec_off + REC_HDR + 4ull * ncrc;
    return 0;
}

/* After an fdatasync fails, what reached the disk is unknown: Linux reports a write-back error
 * once and may have dropped the dirty pages, so a retry can succeed without the data ever being
 * written ("fsyncgate"). So the first failure is sticky, as in PostgreSQL: every later flush,
 * FUA write, snapshot and checkpoint fails until the volume is reopened, and recovery then reads
 * what really is on the disk. */
static int sync_failed(vol *v)
{
    return fail(v->sync_err, "an earlier fdatasync failed (%s): what reached the disk is unknown, so nothing "
                "can be made durable until the volume is reopened (restart the server)", strerror(v->sync_err));
}

static int sync_all(vol *v)
{
    if (v->sync_err)
        return sync_failed(v);
    if (flush_wbuf(v) < 0)
        return -1;
    for (size_t i = 0; i < v->nsegs; i++) {
        seg_info *s = &v->segs[i];
        if (s->fd >= 0 && s->needs_sync) {
            if (io_fdatasync(s->fd) < 0) {
                v->sync_err = errno;
                return fail(errno, "fdatasync of segment %llu: %s", (unsigned long long)s->id,
                            strerror(errno));
            }
            s->needs_sync = 0;
        }
    }
    if (v->dir_dirty) {
        if (io_fsyncdir(v->segdirfd) < 0) {
            v->sync_err = errno;
            return fail(errno, "fsync of the segment directory: %s", strerror(errno));
        }
        v->dir_dirty = 0;
    }
    return 0;
}

static int flush_locked(vol *v)
{
    if (!v->records_since_marker && v->written_off == v->wbase + v->wbuf_len)
        return 0;
    if (sync_all(v) < 0)
        return -1;
    if (v->records_since_marker) {
        /* The marker says: every record before me was synced. It is itself synced by the next
         * flush; until then it is only a hint and recovery never needs it. */
        if (append_record(v, R_FLUSH, 0, 0, 0, v->gen, NULL, 0, NULL, 0, NULL, NULL) < 0)
            return -1;
        v->records_since_marker = 0;
    }
    return 0;
}

/* Where the log ends, so that a record appended after this point can be taken back while its
 * bytes are still only in the window (nothing of it reached the file). */
typedef struct log_pos {
    uint64_t seg, off, seq, since;
    int marker;
} log_pos;

static log_pos log_tell(const vol *v)
{
    return (log_pos){v->active, v->active_off, v->next_seq, v->since_ckpt, v->records_since_marker};
}

/* 1 and the log is as it was at p, or 0 when that is impossible (a rotation since, or a
 * write-out of the window covered bytes after p: they may be on the disk). */
static int log_rewind(vol *v, const log_pos *p)
{
    if (v->active != p->seg || v->written_off > p->off || v->wbase > p->off)
        return 0;
    v->active_off = p->off;
    v->wbuf_len = (size_t)(p->off - v->wbase);
    v->next_seq = p->seq;
    v->since_ckpt = p->since;
    v->records_since_marker = p->marker;
    return 1;
}

/* ---------- map updates and live accounting ---------- */

static void live_hook(void *ctx, const bm_leaf *l, int delta)
{
    vol *v = ctx;
    seg_info *g = NULL;
    for (unsigned i = 0; i < BM_LEAF_ENTRIES; i++) {
        unsigned k = bm_kind(l->e[i].loc);
        if (k != BM_DATA && k != BM_COMP)
            continue;
        uint64_t id = bm_seg(l->e[i].loc);
        if (!g || g->id != id)
            g = seg_find(v, id); /* neighbours mostly live in one segment */
        if (!g)
            continue;
        if (delta > 0)
            g->live_blocks++;
        else if (g->live_blocks)
            g->live_blocks--;
    }
}

static snap *snap_find(vol *v, uint32_t id)
{
    for (uint32_t i = 0; i < v->nsnaps; i++)
        if (v->snaps[i].id == id)
            return &v->snaps[i];
    return NULL;
}

/* The map behind an API id: 0 = the head, else a snapshot. NULL + ENOENT if none. */
static blockmap *map_of(vol *v, uint32_t id)
{
    if (id == 0)
        return v->head;
    snap *sn = snap_find(v, id);
    if (!sn) {
        fail(ENOENT, "no snapshot with id %u", id);
        return NULL;
    }
    return sn->map;
}

static void unref_old(vol *v, bm_entry old)
{
    unsigned k = bm_kind(old.loc);
    if (k == BM_DATA || k == BM_COMP) {
        seg_info *g = seg_find(v, bm_seg(old.loc));
        if (g && g->live_blocks)
            g->live_blocks--;
        if (v->head_log_blocks)
            v->head_log_blocks--;
    }
}

static int map_set(vol *v, uint64_t lba, bm_entry e)
{
    bm_entry old;
    if (blockmap_set(v->head, lba, e, &old) < 0)
        return fail(ENOMEM, "out of memory for the block map");
    unref_old(v, old);
    unsigned k = bm_kind(e.loc);
    if (k == BM_DATA || k == BM_COMP) {
        seg_info *g = seg_find(v, bm_seg(e.loc));
        if (g)
            g->live_blocks++;
        v->head_log_blocks++;
    } else if ((k == BM_ZERO || k == BM_TRIM) && v->image_fd >= 0) {
        v->tomb_pending = 1;
        v->tomb_epoch++;
    }
    return 0;
}

/* Mark [lba, lba+n) as zero/trimmed, skipping blocks that already read as zero (never written,
 * zero, trimmed): they do not change. Mirrors exactly what replay does. */
static int map_tombstone(vol *v, uint64_t lba, uint64_t n, unsigned kind, uint32_t gen)
{
    uint64_t end = lba + n;
    while (lba < end) {
        uint64_t li = lba >> BM_LEAF_SHIFT;
        uint64_t leaf_end = (li + 1) << BM_LEAF_SHIFT;
        if (leaf_end > end)
            leaf_end = end;
        const bm_leaf *l = blockmap_leaf(v->head, li);
        if (!l) {
            uint64_t nl = blockmap_next_leaf(v->head, li);
            if (nl == UINT64_MAX)
                return 0;
            lba = nl << BM_LEAF_SHIFT;
            continue;
        }
        for (; lba < leaf_end; lba++) {
            unsigned k = bm_kind(l->e[lba & (BM_LEAF_ENTRIES - 1)].loc);
            if (k == BM_DATA || k == BM_COMP || k == BM_IMAGE) {
                bm_entry e = {bm_loc(kind, 0, 0, 0), 0, gen};
                if (map_set(v, lba, e) < 0)
                    return -1;
                l = blockmap_leaf(v->head, li); /* may have been copied */
            }
        }
    }
    return 0;
}

static int pend_push(vol *v, uint64_t lba, uint64_t n, bm_entry e)
{
    if (v->npend == v->pend_cap) {
        size_t cap = v->pend_cap ? v->pend_cap * 2 : 1024;
        struct pend *p = realloc(v->pend, cap * sizeof *p);
        if (!p)
            return fail(ENOMEM, "out of memory for a request");
        v->pend = p;
        v->pend_cap = cap;
    }
    v->pend[v->npend++] = (struct pend){lba, n, e};
    return 0;
}

/* Apply the request's map changes. Cannot fail: request_begin made every leaf they touch
 * private (blockmap_prepare), and nothing clones the head in between (the lock is held). */
static void pend_apply(vol *v)
{
    for (size_t i = 0; i < v->npend; i++) {
        struct pend *p = &v->pend[i];
        int r = p->n ? map_tombstone(v, p->lba, p->n, bm_kind(p->e.loc), p->e.gen) : map_set(v, p->lba, p->e);
        (void)r; /* 0 by construction */
    }
    v->npend = 0;
}

/* Start a request touching [lba, lba+n): the leaves it may change are made private first, so
 * that applying its changes at the end cannot fail half-way. tombstone: only leaves that exist
 * (a trim of never-written space changes nothing). */
static int request_begin(vol *v, uint64_t lba, uint64_t n, int tombstone)
{
    v->npend = 0;
    v->req_first = 1;
    if (blockmap_prepare(v->head, lba, n, tombstone) < 0)
        return fail(ENOMEM, "out of memory for the block map");
    return 0;
}

/* End a request: apply its map changes (r == 0) or drop them and, while its records are still
 * only in the window, the records too (a failed request leaves no trace in memory; records
 * already written out end without their last record, which recovery drops, §3). */
static int request_end(vol *v, int r, const log_pos *before)
{
    if (r == 0) {
        pend_apply(v);
        return 0;
    }
    int e = errno;
    v->npend = 0;
    (void)log_rewind(v, before);
    errno = e;
    return -1;
}

/* ---------- reads ---------- */

static inline int in_wbuf(vol *v, uint64_t seg, uint64_t off)
{
    return seg == v->active && off >= v->wbase;
}

static int read_bytes(vol *v, uint64_t seg, uint64_t off, void *dst, size_t len)
{
    if (seg == v->active && off + len > v->active_off) /* a map entry past the log's end: damage */
        return fail(EBADMSG, "block beyond the end of the log in segment %llu", (unsigned long long)seg);
    if (in_wbuf(v, seg, off)) {
        memcpy(dst, v->wbuf + (off - v->wbase), len);
        return 0;
    }
    seg_info *s = seg_find(v, seg);
    if (!s || s->fd < 0 || !s->map)
        return fail(EBADMSG, "block refers to missing segment %llu", (unsigned long long)seg);
    if (seg == v->active && off + len > v->wbase) {
        /* straddles file and window: bytes below wbase are in the file */
        size_t a = (size_t)(v->wbase - off);
        memcpy(dst, s->map + off, a);
        memcpy((uint8_t *)dst + a, v->wbuf, len - a);
        return 0;
    }
    uint64_t limit = seg == v->active ? v->written_off : s->file_size;
    if (off + len > limit || off + len > s->map_len)
        return fail(EBADMSG, "block beyond the end of segment %llu (truncated file?)", (unsigned long long)seg);
    memcpy(dst, s->map + off, len);
    return 0;
}

static int read_compressed(vol *v, bm_entry e, uint8_t *dst)
{
    uint64_t seg = bm_seg(e.loc), off = bm_off(e.loc);
    uint64_t key = e.loc & ~(0xffULL << 56);
    if (v->dcache_loc != key) {
        uint8_t h[REC_HDR + 4];
        if (read_bytes(v, seg, off, h, sizeof h) < 0)
            return -1;
        uint32_t n = get32(h + 12), plen = get32(h + 16);
        if (get32(h) != REC_MAGIC || n == 0 || n > MAX_COMP_BLOCKS || plen > MAX_COMP_BLOCKS * BS) {
            v->corrupt_reads++;
            return fail(EBADMSG, "corrupt compressed record header in segment %llu at %llu",
                        (unsigned long long)seg, (unsigned long long)off);
        }
        if (read_bytes(v, seg, off + REC_HDR + 4, v->zbuf, plen) < 0)
            return -1;
        if (crc32c(v->zbuf, plen) != e.crc) {
            v->corrupt_reads++;
            return fail(EBADMSG, "checksum mismatch in segment %llu at %llu", (unsigned long long)seg,
                        (unsigned long long)off);
        }
        size_t r = ZSTD_decompressDCtx(v->dctx, v->dcache, MAX_COMP_BLOCKS * BS, v->zbuf, plen);
        if (ZSTD_isError(r) || r != (size_t)n * BS) {
            v->corrupt_reads++;
            return fail(EBADMSG, "cannot decompress record in segment %llu at %llu",
                        (unsigned long long)seg, (unsigned long long)off);
        }
        v->dcache_loc = key;
    }
    memcpy(dst, v->dcache + (size_t)bm_index(e.loc) * BS, BS);
    return 0;
}

/* Blocks [lba, lba+n) that map says are in the image (all of kind BM_IMAGE): one pread, then
 * each block checked against its entry's CRC, so a block changed behind the engine's back
 * (another tool writing image.raw while served) is EIO, never served as garbage. */
static int read_image(vol *v, const blockmap *map, uint64_t lba, uint64_t n, uint8_t *dst)
{
    if (v->image_fd < 0) {
        v->corrupt_reads++;
        return fail(EBADMSG, "block %llu is mapped to an image this volume does not have", (unsigned long long)lba);
    }
    size_t len = (size_t)(n * BS), got = 0;
    while (got < len) {
        ssize_t r = pread(v->image_fd, dst + got, len - got, (off_t)(lba * BS + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return fail(errno, "reading the image at block %llu: %s", (unsigned long long)lba, strerror(errno));
        if (r == 0) { /* beyond the end of a truncated image: zeros, which the CRC below judges */
            memset(dst + got, 0, len - got);
            break;
        }
        got += (size_t)r;
    }
    for (uint64_t b = 0; b < n; b++)
        if (crc32c(dst + b * BS, BS) != blockmap_get(map, lba + b).crc) {
            v->corrupt_reads++;
            return fail(EBADMSG, "checksum mismatch for block %llu (in the image file)", (unsigned long long)(lba + b));
        }
    return 0;
}

/* Read whole blocks [lba, lba+n) into dst, coalescing runs that are contiguous on disk. */
static int read_blocks(vol *v, const blockmap *map, uint64_t lba, uint64_t n, uint8_t *dst)
{
    uint64_t i = 0;
    while (i < n) {
        bm_entry e = blockmap_get(map, lba + i);
        unsigned k = bm_kind(e.loc);
        if (k == BM_DATA) {
            uint64_t seg = bm_seg(e.loc), off = bm_off(e.loc);
            int buffered = in_wbuf(v, seg, off);
            uint64_t j = i + 1;
            while (j < n) {
                bm_entry f = blockmap_get(map, lba + j);
                if (bm_kind(f.loc) != BM_DATA || bm_seg(f.loc) != seg ||
                    bm_off(f.loc) != off + (j - i) * BS || in_wbuf(v, seg, bm_off(f.loc)) != buffered)
                    break;
                j++;
            }
            /* copy and check 64 KiB at a time: each block's CRC then reads it from the cache
             * the copy just filled, not from memory a second time */
            for (uint64_t c = i; c < j; c += READ_CHUNK_BLOCKS) {
                uint64_t ce = c + READ_CHUNK_BLOCKS < j ? c + READ_CHUNK_BLOCKS : j;
                if (read_bytes(v, seg, off + (c - i) * BS, dst + c * BS, (size_t)(ce - c) * BS) < 0)
                    return -1;
                for (uint64_t b = c; b < ce; b++) {
                    bm_entry f = b == i ? e : blockmap_get(map, lba + b);
                    if (crc32c(dst + b * BS, BS) != f.crc) {
                        v->corrupt_reads++;
                        return fail(EBADMSG, "checksum mismatch for block %llu (segment %llu)",
                                    (unsigned long long)(lba + b), (unsigned long long)seg);
                    }
                }
            }
            i = j;
        } else if (k == BM_COMP) {
            if (read_compressed(v, e, dst + i * BS) < 0)
                return -1;
            i++;
        } else if (k == BM_IMAGE) {
            uint64_t j = i + 1;
            while (j < n && bm_kind(blockmap_get(map, lba + j).loc) == BM_IMAGE)
                j++;
            if (read_image(v, map, lba + i, j - i, dst + i * BS) < 0)
                return -1;
            i = j;
        } else {
            memset(dst + i * BS, 0, BS);
            i++;
        }
    }
    return 0;
}

static int scratch(vol *v, size_t len)
{
    if (v->scratch_cap >= len)
        return 0;
    uint8_t *n = realloc(v->scratch, len);
    if (!n)
        return fail(ENOMEM, "out of memory");
    v->scratch = n;
    v->scratch_cap = len;
    return 0;
}

static int check_range(vol *v, uint64_t count, uint64_t offset)
{
    if (offset > v->p.size || count > v->p.size - offset)
        return fail(EINVAL, "request [%llu, +%llu) beyond the end of the volume (%llu bytes)",
                    (unsigned long long)offset, (unsigned long long)count,
                    (unsigned long long)v->p.size);
    return 0;
}

static int read_locked(vol *v, const blockmap *map, uint8_t *buf, uint64_t count, uint64_t offset)
{
    uint64_t first = offset / BS, last = (offset + count - 1) / BS;
    if (offset % BS == 0 && count % BS == 0)
        return read_blocks(v, map, first, count / BS, buf);
    uint8_t tmp[BS];
    uint64_t pos = offset, end = offset + count;
    /* head partial block */
    if (pos % BS) {
        if (read_blocks(v, map, first, 1, tmp) < 0)
            return -1;
        uint64_t take = BS - pos % BS;
        if (take > count)
            take = count;
        memcpy(buf, tmp + pos % BS, take);
        pos += take;
    }
    uint64_t mid_end = end - end % BS;
    if (pos < mid_end) {
        if (read_blocks(v, map, pos / BS, (mid_end - pos) / BS, buf + (pos - offset)) < 0)
            return -1;
        pos = mid_end;
    }
    if (pos < end) {
        if (read_blocks(v, map, last, 1, tmp) < 0)
            return -1;
        memcpy(buf + (pos - offset), tmp, end - pos);
    }
    return 0;
}

int vol_read(vol *v, void *buf, uint64_t count, uint64_t offset)
{
    if (count == 0)
        return 0;
    pthread_mutex_lock(&v->lock);
    v->requests++;
    int r = check_range(v, count, offset);
    if (r == 0)
        r = read_locked(v, v->head, buf, count, offset);
    pthread_mutex_unlock(&v->lock);
    return r;
}

int vol_snap_read(vol *v, uint32_t id, void *buf, uint64_t count, uint64_t offset)
{
    if (count == 0)
        return 0;
    pthread_mutex_lock(&v->lock);
    v->requests++;
    const blockmap *map = map_of(v, id);
    int r = map ? check_range(v, count, offset) : -1;
    if (r == 0)
        r = read_locked(v, map, buf, count, offset);
    pthread_mutex_unlock(&v->lock);
    return r;
}

/* ---------- writes ---------- */

/* Append [lba, lba+n) as records of one request; more_after: further records of the same
 * request follow (its last record here then carries MORE too). */
static int write_blocks(vol *v, const uint8_t *data, uint64_t lba, uint64_t n, int type, uint32_t gen,
                        int more_after)
{
    uint32_t crcs[MAX_REC_BLOCKS];
    uint64_t done = 0;
    while (done < n) {
        if (v->p.compress) {
            uint32_t k = (uint32_t)(n - done < MAX_COMP_BLOCKS ? n - done : MAX_COMP_BLOCKS);
            const uint8_t *src = data + done * BS;
            /* Probe the first block: data that does not compress (media, encrypted, already
             * compressed) is stored raw without paying for compressing the whole group. */
            size_t cl = ZSTD_compressCCtx(v->cctx, v->zbuf, ZSTD_compressBound(MAX_COMP_BLOCKS * BS),
                                          src, BS, v->p.zstd_level);
            if (!ZSTD_isError(cl) && cl < BS - BS / 8)
                cl = ZSTD_compressCCtx(v->cctx, v->zbuf, ZSTD_compressBound(MAX_COMP_BLOCKS * BS),
                                       src, (size_t)k * BS, v->p.zstd_level);
            else
                cl = (size_t)k * BS; /* incompressible: raw */
            int more = (done + k < n || more_after) ? F_MORE : 0;
            uint64_t rec_off, pay;
            if (!ZSTD_isError(cl) && cl < (size_t)k * BS - 512) {
                uint32_t c = crc32c(v->zbuf, cl);
                if (append_record(v, type, F_COMP | more, k, lba + done, gen, &c, 1, v->zbuf,
                                  (uint32_t)cl, &rec_off, &pay) < 0)
                    return -1;
                for (uint32_t b = 0; b < k; b++)
                    if (pend_push(v, lba + done + b, 0, (bm_entry){bm_loc(BM_COMP, v->active, rec_off, b), c, gen}) < 0)
                        return -1;
            } else {
                for (uint32_t b = 0; b < k; b++)
                    crcs[b] = crc32c(src + (size_t)b * BS, BS);
                if (append_record(v, type, more, k, lba + done, gen, crcs, k, src, k * BS, &rec_off, &pay) < 0)
                    return -1;
                for (uint32_t b = 0; b < k; b++)
                    if (pend_push(v, lba + done + b, 0, (bm_entry){bm_loc(BM_DATA, v->active, pay + (uint64_t)b * BS, 0), crcs[b], gen}) < 0)
                        return -1;
            }
            done += k;
            continue;
        }
        uint32_t k = (uint32_t)(n - done < MAX_REC_BLOCKS ? n - done : MAX_REC_BLOCKS);
        const uint8_t *src = data + done * BS;
        for (uint32_t b = 0; b < k; b++)
            crcs[b] = crc32c(src + (size_t)b * BS, BS);
        uint64_t pay;
        if (append_record(v, type, (done + k < n || more_after) ? F_MORE : 0, k, lba + done, gen, crcs, k, src,
                          k * BS, NULL, &pay) < 0)
            return -1;
        for (uint32_t b = 0; b < k; b++)
            if (pend_push(v, lba + done + b, 0,
                        (bm_entry){bm_loc(BM_DATA, v->active, pay + (uint64_t)b * BS, 0), crcs[b], gen}) < 0)
                return -1;
        done += k;
    }
    return 0;
}

static int write_locked(vol *v, const uint8_t *buf, uint64_t count, uint64_t offset, int more_after)
{
    if (offset % BS == 0 && count % BS == 0)
        return write_blocks(v, buf, offset / BS, count / BS, R_WRITE, v->gen, more_after);
    /* Unaligned: read-modify-write the partial first and last blocks. */
    uint64_t first = offset / BS, last = (offset + count - 1) / BS;
    uint64_t n = last - first + 1;
    if (scratch(v, n * BS) < 0)
        return -1;
    if (read_blocks(v, v->head, first, 1, v->scratch) < 0)
        return -1;
    if (n > 1 && read_blocks(v, v->head, last, 1, v->scratch + (n - 1) * BS) < 0)
        return -1;
    memcpy(v->scratch + offset % BS, buf, count);
    return write_blocks(v, v->scratch, first, n, R_WRITE, v->gen, more_after);
}

/* Image backend back-pressure (docs/IMAGE.md §3): while the change log holds more than
 * journal_max bytes of head data, the writer moves a batch itself (waiting for the mover, in
 * effect): the write is delayed, never refused. A mover that cannot write the image (sticky
 * error) no longer holds writes back: the log grows, and `info` shows why. */
static void journal_backpressure(vol *v, uint64_t count)
{
    for (;;) {
        pthread_mutex_lock(&v->lock);
        int over = v->head_log_blocks * BS + count > v->p.journal_max && !v->image_err;
        pthread_mutex_unlock(&v->lock);
        if (!over || vol_move(v, 4u << 20, 1) <= 0)
            return;
    }
}

int vol_write(vol *v, const void *buf, uint64_t count, uint64_t offset, int fua)
{
    if (v->p.readonly)
        return fail(EROFS, "volume opened read-only");
    if (count == 0)
        return 0;
    if (v->image_fd >= 0)
        journal_backpressure(v, count);
    pthread_mutex_lock(&v->lock);
    v->requests++;
    int r = check_range(v, count, offset);
    if (r == 0) {
        log_pos before = log_tell(v);
        uint64_t first = offset / BS, last = (offset + count - 1) / BS;
        r = request_begin(v, first, last - first + 1, 0);
        if (r == 0)
            r = write_locked(v, buf, count, offset, 0);
        r = request_end(v, r, &before);
    }
    if (r == 0 && fua)
        r = flush_locked(v);
    pthread_mutex_unlock(&v->lock);
    return r;
}

static int zero_locked(vol *v, uint64_t count, uint64_t offset, int trim)
{
    uint64_t end = offset + count;
    uint64_t a = (offset + BS - 1) / BS * BS, b = end / BS * BS;
    static const uint8_t zeros[2 * BS];
    if (a >= b) { /* inside one or two partial blocks (count < 2 blocks) */
        if (trim)
            return 0; /* trim is advisory: partial blocks keep their data */
        return write_locked(v, zeros, count, offset, 0);
    }
    if (!trim) {
        /* the partial edges and the tombstones are one request: all or nothing at recovery */
        if (offset < a && write_locked(v, zeros, a - offset, offset, 1) < 0)
            return -1;
        if (b < end && write_locked(v, zeros, end - b, b, 1) < 0)
            return -1;
    }
    uint64_t lba = a / BS, n = (b - a) / BS;
    while (n) {
        uint32_t k = (uint32_t)(n < MAX_TOMB_BLOCKS ? n : MAX_TOMB_BLOCKS);
        if (append_record(v, trim ? R_TRIM : R_ZERO, n > k ? F_MORE : 0, k, lba, v->gen, NULL, 0,
                          NULL, 0, NULL, NULL) < 0)
            return -1;
        if (pend_push(v, lba, k, (bm_entry){bm_loc(trim ? BM_TRIM : BM_ZERO, 0, 0, 0), 0, v->gen}) < 0)
            return -1;
        lba += k;
        n -= k;
    }
    return 0;
}

int vol_zero(vol *v, uint64_t count, uint64_t offset, int fua, int trim)
{
    if (v->p.readonly)
        return fail(EROFS, "volume opened read-only");
    if (count == 0)
        return 0;
    pthread_mutex_lock(&v->lock);
    v->requests++;
    int r = check_range(v, count, offset);
    if (r == 0) {
        log_pos before = log_tell(v);
        uint64_t first = offset / BS, last = (offset + count - 1) / BS;
        /* tombstones change only leaves that exist; a zero's partial edge blocks are writes */
        r = request_begin(v, first, last - first + 1, 1);
        if (r == 0 && !trim && offset % BS && blockmap_prepare(v->head, first, 1, 0) < 0)
            r = fail(ENOMEM, "out of memory for the block map");
        if (r == 0 && !trim && (offset + count) % BS && blockmap_prepare(v->head, last, 1, 0) < 0)
            r = fail(ENOMEM, "out of memory for the block map");
        if (r == 0)
            r = zero_locked(v, count, offset, trim);
        r = request_end(v, r, &before);
    }
    if (r == 0 && fua)
        r = flush_locked(v);
    pthread_mutex_unlock(&v->lock);
    return r;
}

int vol_flush(vol *v)
{
    if (v->p.readonly)
        return 0;
    pthread_mutex_lock(&v->lock);
    int r = flush_locked(v);
    pthread_mutex_unlock(&v->lock);
    return r;
}

int vol_snap_extents(vol *v, uint32_t id, uint64_t count, uint64_t offset, uint64_t *out, int max)
{
    if (count == 0 || max <= 0)
        return 0;
    pthread_mutex_lock(&v->lock);
    const blockmap *map = map_of(v, id);
    if (!map || check_range(v, count, offset) < 0) {
        pthread_mutex_unlock(&v->lock);
        return -1;
    }
    uint64_t lba = offset / BS, end = (offset + count + BS - 1) / BS;
    int n = 0;
    uint64_t run_start = lba;
    int run_type = -1;
    while (lba < end) {
        uint64_t li = lba >> BM_LEAF_SHIFT;
        const bm_leaf *l = blockmap_leaf(map, li);
        uint64_t leaf_end = (li + 1) << BM_LEAF_SHIFT;
        if (!l) {
            uint64_t nl = blockmap_next_leaf(map, li);
            uint64_t skip_to = nl == UINT64_MAX ? end : nl << BM_LEAF_SHIFT;
            if (skip_to > end)
                skip_to = end;
            if (run_type != VOL_EXTENT_HOLE) {
                if (run_type >= 0) {
                    out[3 * n] = run_start * BS;
                    out[3 * n + 1] = (lba - run_start) * BS;
                    out[3 * n + 2] = (uint64_t)run_type;
                    if (++n >= max)
                        goto done;
                }
                run_start = lba;
                run_type = VOL_EXTENT_HOLE;
            }
            lba = skip_to > lba ? skip_to : lba + 1;
            continue;
        }
        if (leaf_end > end)
            leaf_end = end;
        for (; lba < leaf_end; lba++) {
            unsigned k = bm_kind(l->e[lba & (BM_LEAF_ENTRIES - 1)].loc);
            int t = (k == BM_DATA || k == BM_COMP || k == BM_IMAGE) ? VOL_EXTENT_DATA : VOL_EXTENT_HOLE;
            if (t != run_type) {
                if (run_type >= 0) {
                    out[3 * n] = run_start * BS;
                    out[3 * n + 1] = (lba - run_start) * BS;
                    out[3 * n + 2] = (uint64_t)run_type;
                    if (++n >= max)
                        goto done;
                }
                run_start = lba;
                run_type = t;
            }
        }
    }
    out[3 * n] = run_start * BS;
    out[3 * n + 1] = (end - run_start) * BS;
    out[3 * n + 2] = (uint64_t)run_type;
    n++;
done:
    pthread_mutex_unlock(&v->lock);
    return n;
}

/* A set of leaf pointers (open addressing), to visit each distinct leaf once and to number
 * leaves in a checkpoint. */
typedef struct leafset {
    const bm_leaf **keys;
    uint32_t *vals;
    size_t cap, n;
} leafset;

static size_t leafset_slot(const leafset *ls, const bm_leaf *l)
{
    size_t h = ((uintptr_t)l >> 4) * 0x9E3779B97F4A7C15ull;
    size_t i = h & (ls->cap - 1);
    while (ls->keys[i] && ls->keys[i] != l)
        i = (i + 1) & (ls->cap - 1);
    return i;
}

static int leafset_init(leafset *ls, size_t expect)
{
    ls->cap = 64;
    while (ls->cap < expect * 2 + 2)
        ls->cap *= 2;
    ls->n = 0;
    ls->keys = calloc(ls->cap, sizeof *ls->keys);
    ls->vals = calloc(ls->cap, sizeof *ls->vals);
    if (!ls->keys || !ls->vals) {
        free(ls->keys);
        free(ls->vals);
        return fail(ENOMEM, "out of memory");
    }
    return 0;
}

/* Insert l; returns 1 if it was new (its value = its insertion number in *val). */
static int leafset_add(leafset *ls, const bm_leaf *l, uint32_t *val)
{
    size_t i = leafset_slot(ls, l);
    if (ls->keys[i]) {
        *val = ls->vals[i];
        return 0;
    }
    ls->keys[i] = l;
    ls->vals[i] = (uint32_t)ls->n++;
    *val = ls->vals[i];
    return 1;
}

static void leafset_free(leafset *ls)
{
    free(ls->keys);
    free(ls->vals);
}

/* ---------- snapshots ---------- */

/* SHA-1 (FIPS 180-4) of a short message, only for the name-based uuid below. */
static uint32_t rol32(uint32_t x, int n) { return x << n | x >> (32 - n); }

static void sha1_block(uint32_t h[5], const uint8_t *b)
{
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)b[4 * i] << 24 | (uint32_t)b[4 * i + 1] << 16 | (uint32_t)b[4 * i + 2] << 8 | b[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], c1 = h[1], c2 = h[2], c3 = h[3], c4 = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20)
            f = (c1 & c2) | (~c1 & c3), k = 0x5a827999u;
        else if (i < 40)
            f = c1 ^ c2 ^ c3, k = 0x6ed9eba1u;
        else if (i < 60)
            f = (c1 & c2) | (c1 & c3) | (c2 & c3), k = 0x8f1bbcdcu;
        else
            f = c1 ^ c2 ^ c3, k = 0xca62c1d6u;
        uint32_t t = rol32(a, 5) + f + c4 + k + w[i];
        c4 = c3, c3 = c2, c2 = rol32(c1, 30), c1 = a, a = t;
    }
    h[0] += a, h[1] += c1, h[2] += c2, h[3] += c3, h[4] += c4;
}

static void sha1(const uint8_t *m, size_t len, uint8_t out[20])
{
    uint32_t h[5] = {0x67452301u, 0xefcdab89u, 0x98badcfeu, 0x10325476u, 0xc3d2e1f0u};
    size_t i = 0;
    for (; i + 64 <= len; i += 64)
        sha1_block(h, m + i);
    uint8_t tail[128] = {0};
    size_t rest = len - i, nb = rest + 9 <= 64 ? 64 : 128;
    memcpy(tail, m + i, rest);
    tail[rest] = 0x80;
    for (int k = 0; k < 8; k++)
        tail[nb - 1 - k] = (uint8_t)(((uint64_t)len * 8) >> (8 * k));
    for (size_t b = 0; b < nb; b += 64)
        sha1_block(h, tail + b);
    for (int k = 0; k < 20; k++)
        out[k] = (uint8_t)(h[k / 4] >> (24 - 8 * (k % 4)));
}

static int uuid_is_nil(const uint8_t *u)
{
    static const uint8_t nil[16];
    return memcmp(u, nil, 16) == 0;
}

static void uuid_format(const uint8_t *u, char out[37])
{
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *o++ = '-';
        *o++ = hex[u[i] >> 4];
        *o++ = hex[u[i] & 15];
    }
    *o = 0;
}

/* The identity of a snapshot recorded without one (a 96-byte SNAP payload, a version 2
 * checkpoint): the RFC 4122 version 5 uuid of the name "snapshot-<id>-<created ns>" in the
 * namespace of the volume uuid, so every open derives the same one (FORMAT.md §8). */
static void snap_legacy_uuid(const vol *v, uint32_t id, uint64_t created, uint8_t out[16])
{
    uint8_t m[16 + 64], d[20];
    memcpy(m, v->p.uuid, 16);
    int n = snprintf((char *)m + 16, sizeof m - 16, "snapshot-%u-%llu", id, (unsigned long long)created);
    sha1(m, 16 + (size_t)n, d);
    memcpy(out, d, 16);
    out[6] = (uint8_t)((out[6] & 0x0f) | 0x50);
    out[8] = (uint8_t)((out[8] & 0x3f) | 0x80);
}

/* A random RFC 4122 version 4 uuid. */
static int uuid_random(uint8_t out[16])
{
    size_t got = 0;
    while (got < 16) {
        ssize_t r = getrandom(out + got, 16 - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return fail(errno, "cannot generate a snapshot uuid: getrandom: %s", strerror(errno));
        got += (size_t)r;
    }
    out[6] = (uint8_t)((out[6] & 0x0f) | 0x40);
    out[8] = (uint8_t)((out[8] & 0x3f) | 0x80);
    return 0;
}

static snap *snap_find_uuid(vol *v, const uint8_t *uuid)
{
    for (uint32_t i = 0; i < v->nsnaps; i++)
        if (memcmp(v->snaps[i].uuid, uuid, 16) == 0)
            return &v->snaps[i];
    return NULL;
}

/* Room for one more snapshot in v->snaps (changes nothing visible). */
static int snaps_reserve(vol *v)
{
    if (v->nsnaps < v->snaps_cap)
        return 0;
    uint32_t cap = v->snaps_cap ? v->snaps_cap * 2 : 16;
    snap *n = realloc(v->snaps, cap * sizeof *n);
    if (!n)
        return fail(ENOMEM, "out of memory for snapshots");
    v->snaps = n;
    v->snaps_cap = cap;
    return 0;
}

/* A snapshot name: 1 to 64 of A-Z a-z 0-9 . _ - (the command-line contract's rule). */
static int snap_name_ok(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > VOL_SNAP_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
              c == '-'))
            return 0;
    }
    return 1;
}

/* Add a snapshot with this map (taken over), or a clone of the head when map is NULL. A nil
 * uuid (recorded by an older version) is replaced by the derived one; a name that is not a valid
 * name (only a forged or mis-written record has one) by damaged-name-ID, so that the volume
 * still opens and the snapshot can be listed, read and deleted. */
static int snap_add(vol *v, uint32_t id, uint32_t gen, uint64_t created, const char *name,
                    const uint8_t *uuid, uint32_t flags, blockmap *map)
{
    if (snaps_reserve(v) < 0)
        return -1;
    blockmap *clone = map ? map : blockmap_clone(v->head);
    if (!clone)
        return fail(ENOMEM, "out of memory for a snapshot");
    snap *sn = &v->snaps[v->nsnaps++];
    sn->id = id;
    sn->gen = gen;
    sn->created = created;
    if (snap_name_ok(name))
        snprintf(sn->name, sizeof sn->name, "%s", name);
    else
        snprintf(sn->name, sizeof sn->name, "damaged-name-%u", id);
    if (uuid && !uuid_is_nil(uuid))
        memcpy(sn->uuid, uuid, 16);
    else
        snap_legacy_uuid(v, id, created, sn->uuid);
    sn->flags = flags;
    sn->map = clone;
    if (id >= v->next_snap_id)
        v->next_snap_id = id + 1;
    return 0;
}

/* Drop a snapshot's map: leaves only it held are freed (the hook un-counts them). */
static void snap_remove(vol *v, uint32_t id)
{
    for (uint32_t i = 0; i < v->nsnaps; i++)
        if (v->snaps[i].id == id) {
            blockmap_free(v->snaps[i].map);
            memmove(&v->snaps[i], &v->snaps[i + 1], (v->nsnaps - i - 1) * sizeof *v->snaps);
            v->nsnaps--;
            return;
        }
}

static int append_snap_record(vol *v, int type, const uint8_t *payload, uint32_t plen, uint32_t gen)
{
    uint32_t c = crc32c(payload, plen);
    v->req_first = 1;
    return append_record(v, type, 0, 0, 0, gen, &c, 1, payload, plen, NULL, NULL);
}

int vol_snap_create(vol *v, const char *name, uint64_t created_ns, const uint8_t *uuid, uint32_t flags,
                    uint32_t *id_out)
{
    if (v->p.readonly)
        return fail(EROFS, "volume opened read-only");
    size_t nl = strlen(name);
    if (!snap_name_ok(name))
        return fail(EINVAL, "snapshot name must be 1 to %d of A-Z a-z 0-9 . _ -", VOL_SNAP_NAME_MAX);
    if (uuid && uuid_is_nil(uuid))
        return fail(EINVAL, "the nil uuid cannot identify a snapshot");
    pthread_mutex_lock(&v->lock);
    int r = -1;
    blockmap *clone = NULL;
    uint8_t u[16];
    char us[37];
    for (uint32_t i = 0; i < v->nsnaps; i++)
        if (strcmp(v->snaps[i].name, name) == 0) {
            fail(EEXIST, "a snapshot named %s already exists", name);
            goto out;
        }
    if (uuid) {
        memcpy(u, uuid, 16);
        snap *dup = snap_find_uuid(v, u);
        if (dup) {
            uuid_format(u, us);
            fail(EEXIST, "a snapshot with uuid %s already exists (named %s)", us, dup->name);
            goto out;
        }
    } else {
        do /* a repeat is as good as impossible; never hand out one identity twice anyway */
            if (uuid_random(u) < 0)
                goto out;
        while (snap_find_uuid(v, u));
    }
    /* Everything that can fail without touching the log first (the flush of earlier writes, room,
     * the clone), then the record: if it cannot be written, nothing changed. Then the snapshot,
     * the new epoch and a sync, so the snapshot is durable when this returns. If the sync fails
     * while the record is still only in the window, it is taken back (nothing changed); if its
     * bytes may be in the file, a SNAPDEL record follows it, so no later flush can make the
     * snapshot appear (the message says which). */
    if (flush_locked(v) < 0)
        goto out;
    if (snaps_reserve(v) < 0)
        goto out;
    if (!(clone = blockmap_clone(v->head))) {
        fail(ENOMEM, "out of memory for a snapshot");
        goto out;
    }
    uint32_t id = v->next_snap_id, gen = v->gen;
    uint8_t p[SNAP_PAYLOAD] = {0};
    put32(p, id);
    put32(p + 4, gen);
    put64(p + 8, created_ns);
    put32(p + 16, (uint32_t)nl);
    memcpy(p + 20, name, nl);
    put32(p + 84, flags);
    memcpy(p + 96, u, 16);
    log_pos before = log_tell(v);
    if (append_snap_record(v, R_SNAP, p, SNAP_PAYLOAD, gen) < 0)
        goto out;
    snap_add(v, id, gen, created_ns, name, u, flags, clone); /* cannot fail: room and map are ready */
    clone = NULL;
    v->snaps[v->nsnaps - 1].map->hooks = &v->hooks;
    v->gen = gen + 1;
    if (sync_all(v) < 0) {
        int e = errno;
        char why[200];
        snprintf(why, sizeof why, "%.199s", errbuf);
        if (log_rewind(v, &before)) {
            snap_remove(v, id);
            v->gen = gen;
            v->next_snap_id = id;
            fail(e, "%s (snapshot %s not made)", why, name);
        } else {
            uint8_t d[SNAPDEL_PAYLOAD] = {0};
            put32(d, id);
            if (append_snap_record(v, R_SNAPDEL, d, SNAPDEL_PAYLOAD, v->gen) == 0) {
                snap_remove(v, id);
                fail(e, "%s (snapshot %s not made; its record may have reached the disk, and until the "
                        "volume is reopened its deletion cannot be made durable: after a crash the "
                        "snapshot may be there)", why, name);
            } else {
                fail(e, "%s (snapshot %s was made but is not durable yet: a later flush makes it so)",
                     why, name);
            }
        }
        goto out;
    }
    (void)flush_locked(v); /* the marker: a hint only; if it fails the next flush writes one */
    *id_out = id;
    r = 0;
out:
    blockmap_free(clone);
    pthread_mutex_unlock(&v->lock);
    return r;
}

int vol_snap_delete(vol *v, uint32_t id)
{
    if (v->p.readonly)
        return fail(EROFS, "volume opened read-only");
    pthread_mutex_lock(&v->lock);
    int r = -1;
    if (!snap_find(v, id)) {
        fail(ENOENT, "no snapshot with id %u", id);
        goto out;
    }
    /* As in create: earlier writes flushed first, the record, a sync; the snapshot goes from
     * memory only once its deletion is durable. If the sync fails while the record is still only
     * in the window it is taken back (nothing changed); if it may be in the file the deletion
     * is completed in memory too (memory never disagrees with the log) and the error says so. */
    if (flush_locked(v) < 0)
        goto out;
    uint8_t p[SNAPDEL_PAYLOAD] = {0};
    put32(p, id);
    log_pos before = log_tell(v);
    if (append_snap_record(v, R_SNAPDEL, p, SNAPDEL_PAYLOAD, v->gen) < 0)
        goto out;
    if (sync_all(v) < 0) {
        int e = errno;
        char why[200];
        snprintf(why, sizeof why, "%.199s", errbuf);
        if (log_rewind(v, &before)) {
            fail(e, "%s (snapshot not deleted)", why);
        } else {
            snap_remove(v, id);
            fail(e, "%s (the snapshot is deleted, but its deletion is not durable yet)", why);
        }
        goto out;
    }
    snap_remove(v, id);
    (void)flush_locked(v);
    r = 0;
out:
    pthread_mutex_unlock(&v->lock);
    return r;
}

int vol_snap_list(vol *v, vol_snap_info *out, int max)
{
    pthread_mutex_lock(&v->lock);
    int n = 0;
    for (uint32_t i = 0; i < v->nsnaps && n < max; i++, n++) {
        out[n].id = v->snaps[i].id;
        out[n].gen = v->snaps[i].gen;
        out[n].created = v->snaps[i].created;
        memcpy(out[n].name, v->snaps[i].name, sizeof out[n].name);
        memcpy(out[n].uuid, v->snaps[i].uuid, 16);
        out[n].flags = v->snaps[i].flags;
    }
    int total = (int)v->nsnaps;
    pthread_mutex_unlock(&v->lock);
    return total;
}

/* Changed extents between two maps: every block whose entry in `to` has a generation newer than
 * `from` (a snapshot, or from_id = VOL_SNAP_NONE for "since the volume was created"), coalesced
 * at gran bytes, starting at *pos; fills out[2*i] = offset, out[2*i+1] = length and advances *pos
 * to where it stopped (the volume size when done). The per-leaf maximum generation skips
 * leaves that cannot hold a change, so the cost follows the changes, not the volume size. */
int vol_diff(vol *v, uint32_t from_id, uint32_t to_id, uint64_t gran, uint64_t *pos, uint64_t *out, int max)
{
    if (gran < BS || (gran & (gran - 1)) || max <= 0)
        return fail(EINVAL, "granularity must be a power of two >= 4096");
    pthread_mutex_lock(&v->lock);
    int n = -1;
    uint32_t from_gen = 0, to_gen;
    if (from_id != VOL_SNAP_NONE) {
        snap *f = snap_find(v, from_id);
        if (!f) {
            fail(ENOENT, "no snapshot with id %u", from_id);
            goto out;
        }
        from_gen = f->gen;
    }
    const blockmap *map = map_of(v, to_id);
    if (!map)
        goto out;
    to_gen = to_id ? snap_find(v, to_id)->gen : v->gen;
    if (from_gen > to_gen) {
        fail(EINVAL, "the first snapshot must be older than the second");
        goto out;
    }
    n = 0;
    uint64_t gb = gran / BS; /* blocks per granule */
    uint64_t lba = *pos / BS, end = v->nblocks;
    uint64_t run_s = 0, run_e = 0; /* current run in granules [s, e) */
    int have = 0;
    while (lba < end) {
        uint64_t li = lba >> BM_LEAF_SHIFT;
        const bm_leaf *l = blockmap_leaf(map, li);
        if (!l || l->maxgen <= from_gen) {
            uint64_t nl = blockmap_next_leaf(map, li + 1);
            lba = nl == UINT64_MAX ? end : nl << BM_LEAF_SHIFT;
            continue;
        }
        uint64_t leaf_end = (li + 1) << BM_LEAF_SHIFT;
        if (leaf_end > end)
            leaf_end = end;
        uint64_t next = leaf_end;
        for (; lba < leaf_end; lba++) {
            if (l->e[lba & (BM_LEAF_ENTRIES - 1)].gen <= from_gen)
                continue;
            uint64_t g = lba / gb;
            if (have && g <= run_e) { /* extends (or is inside) the current run */
                if (g == run_e)
                    run_e = g + 1;
            } else {
                if (have) {
                    if (n == max) { /* full: resume at this run next time */
                        *pos = run_s * gran;
                        goto out;
                    }
                    out[2 * n] = run_s * gran;
                    out[2 * n + 1] = (run_e - run_s) * gran;
                    n++;
                }
                run_s = g;
                run_e = g + 1;
                have = 1;
            }
            uint64_t gend = (g + 1) * gb; /* the rest of this granule is covered */
            if (gend >= leaf_end) {
                next = gend;
                break;
            }
            lba = gend - 1;
        }
        lba = next;
    }
    if (have) {
        if (n == max) {
            *pos = run_s * gran;
            goto out;
        }
        uint64_t e_off = run_e * gran;
        out[2 * n] = run_s * gran;
        out[2 * n + 1] = (e_off > v->p.size ? v->p.size : e_off) - run_s * gran;
        n++;
    }
    *pos = v->p.size;
out:
    pthread_mutex_unlock(&v->lock);
    return n;
}

/* Bytes of data that snapshot id alone keeps (its entries that differ from the next newer
 * snapshot's, or the head's): what deleting it would let the collector reclaim at most. */
int64_t vol_snap_pinned(vol *v, uint32_t id)
{
    pthread_mutex_lock(&v->lock);
    int64_t r = -1;
    uint32_t i;
    for (i = 0; i < v->nsnaps && v->snaps[i].id != id; i++)
        ;
    if (i == v->nsnaps) {
        fail(ENOENT, "no snapshot with id %u", id);
        goto out;
    }
    const blockmap *a = v->snaps[i].map, *b = i + 1 < v->nsnaps ? v->snaps[i + 1].map : v->head;
    uint64_t blocks = 0;
    for (uint64_t li = blockmap_next_leaf(a, 0); li != UINT64_MAX; li = blockmap_next_leaf(a, li + 1)) {
        const bm_leaf *la = blockmap_leaf(a, li), *lb = blockmap_leaf(b, li);
        if (la == lb)
            continue; /* shared: nothing here is the snapshot's alone */
        for (unsigned k = 0; k < BM_LEAF_ENTRIES; k++) {
            unsigned kind = bm_kind(la->e[k].loc);
            if ((kind == BM_DATA || kind == BM_COMP) && (!lb || lb->e[k].loc != la->e[k].loc))
                blocks++;
        }
    }
    r = (int64_t)(blocks * BS);
out:
    pthread_mutex_unlock(&v->lock);
    return r;
}

/* ---------- checkpoints ---------- */

/* A buffered writer for checkpoint.tmp: its own heap buffer (checkpoints on two threads never
 * share one), written with io_pwrite so faults and the recorder see every byte. */
typedef struct wctx {
    int fd;
    uint8_t *buf;
    size_t len, cap;
    uint64_t off;   /* bytes already in the file */
    uint32_t crc;
    int err;
} wctx;

static void wdrain(wctx *w)
{
    if (!w->err && w->len && full_pwrite(w->fd, w->buf, w->len, w->off) < 0)
        w->err = errno ? errno : EIO;
    w->off += w->len;
    w->len = 0;
}

static void wraw(wctx *w, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n && !w->err) {
        size_t k = w->cap - w->len < n ? w->cap - w->len : n;
        memcpy(w->buf + w->len, b, k);
        w->len += k;
        b += k;
        n -= k;
        if (w->len == w->cap)
            wdrain(w);
    }
}

static void wout(wctx *w, const void *p, size_t n)
{
    if (w->err)
        return;
    w->crc = crc32c_extend(w->crc, p, n);
    wraw(w, p, n);
}

/* Free checkpoint clones under the lock: leaf reference counts are shared with live maps. */
static void free_clones(vol *v, blockmap **maps, uint32_t n)
{
    pthread_mutex_lock(&v->lock);
    for (uint32_t i = 0; i < n; i++)
        blockmap_free(maps[i]);
    pthread_mutex_unlock(&v->lock);
    free(maps);
}

static int checkpoint_serialised(vol *v);

/* Checkpoints drop v->lock while they write checkpoint.tmp (one shared buffer, O_TRUNC): two at
 * once (the maintain thread and a control-socket flush) would interleave in one file. ckpt_lock
 * makes them take turns; requests still run beside the one that writes. */
int vol_checkpoint(vol *v)
{
    if (v->p.readonly)
        return fail(EROFS, "volume opened read-only");
    pthread_mutex_lock(&v->ckpt_lock);
    int r = checkpoint_serialised(v);
    pthread_mutex_unlock(&v->ckpt_lock);
    return r;
}

static int checkpoint_serialised(vol *v)
{
    /* Under the lock: write out the window, freeze clones of every map (head and snapshots,
     * O(mids) each), note which segments must be synced (those with live data: the clones
     * reference them) and which are already dead (only those may be deleted after the commit:
     * a segment that dies later is still referenced by this checkpoint). The fdatasyncs and the
     * write run without the lock, so requests go on meanwhile. needs_sync flags are left for
     * NBD flushes to clear. */
    pthread_mutex_lock(&v->lock);
    if (v->sync_err || flush_wbuf(v) < 0) {
        if (v->sync_err)
            sync_failed(v);
        pthread_mutex_unlock(&v->lock);
        return -1;
    }
    uint32_t nmaps = v->nsnaps + 1;
    blockmap **maps = calloc(nmaps, sizeof *maps);
    snap *meta = calloc(nmaps, sizeof *meta);
    uint64_t nsegs = 0;
    for (size_t i = 0; i < v->nsegs; i++)
        nsegs += v->segs[i].fd >= 0;
    uint64_t *segtab = malloc((nsegs ? nsegs : 1) * 16);
    int *syncfds = malloc((nsegs ? nsegs : 1) * sizeof *syncfds);
    uint64_t *dead = malloc((nsegs ? nsegs : 1) * sizeof *dead);
    int nomem = !maps || !meta || !segtab || !syncfds || !dead;
    for (uint32_t m = 0; m < nmaps && !nomem; m++) {
        maps[m] = blockmap_clone(m ? v->snaps[m - 1].map : v->head);
        nomem = !maps[m];
        if (m) {
            meta[m] = v->snaps[m - 1];
            meta[m].map = NULL;
        }
    }
    if (nomem) {
        pthread_mutex_unlock(&v->lock);
        if (maps)
            free_clones(v, maps, nmaps);
        free(meta);
        free(segtab);
        free(syncfds);
        free(dead);
        return fail(ENOMEM, "out of memory for a checkpoint");
    }
    meta[0].gen = v->gen;
    meta[0].flags = v->tomb_pending ? CKPT_HEAD_TOMB_PENDING : 0; /* image backend (docs/IMAGE.md §2) */
    uint64_t j = 0, nsync = 0, ndead = 0;
    int dup_err = 0;
    for (size_t si = 0; si < v->nsegs; si++) {
        seg_info *g = &v->segs[si];
        uint64_t i = g->id;
        if (g->fd < 0)
            continue;
        segtab[2 * j] = i;
        segtab[2 * j + 1] = g->total_blocks;
        j++;
        if (i != v->active && g->live_blocks == 0 && i != v->gc_busy) {
            dead[ndead++] = i;
        } else if (g->needs_sync) {
            /* a descriptor of our own: the segment may be retired (closed) while we sync */
            if ((syncfds[nsync] = fcntl(g->fd, F_DUPFD_CLOEXEC, 0)) < 0) {
                dup_err = errno; /* EMFILE: this checkpoint could not prove the segment durable */
                break;
            }
            nsync++;
        }
    }
    uint64_t next_seq = v->next_seq, rseg = v->active, roff = v->active_off;
    uint32_t gen = v->gen, next_snap_id = v->next_snap_id;
    uint64_t since = v->since_ckpt;
    size_t leaves_hint = 0;
    for (uint32_t m = 0; m < nmaps; m++)
        leaves_hint += maps[m]->nleaves;
    pthread_mutex_unlock(&v->lock);

    int err = dup_err;
    for (uint64_t i = 0; i < nsync; i++) {
        if (!err && io_fdatasync(syncfds[i]) < 0)
            err = errno;
        close(syncfds[i]);
    }
    free(syncfds);
    if (!err && io_fsyncdir(v->segdirfd) < 0)
        err = errno;
    if (err) {
        if (err != dup_err) { /* a sync failed (it shares the descriptors' error state): sticky */
            pthread_mutex_lock(&v->lock);
            if (!v->sync_err)
                v->sync_err = err;
            pthread_mutex_unlock(&v->lock);
        }
        free_clones(v, maps, nmaps);
        free(meta);
        free(segtab);
        free(dead);
        return fail(err, "syncing segments for a checkpoint: %s", strerror(err));
    }

    /* Number the distinct leaves (shared leaves are written once, FORMAT.md §4). */
    leafset ls;
    if (leafset_init(&ls, leaves_hint) < 0) {
        free_clones(v, maps, nmaps);
        free(meta);
        free(segtab);
        free(dead);
        return -1;
    }
    const bm_leaf **order = malloc((leaves_hint ? leaves_hint : 1) * sizeof *order);
    uint64_t *order_li = malloc((leaves_hint ? leaves_hint : 1) * sizeof *order_li);
    if (!order || !order_li)
        err = ENOMEM;
    for (uint32_t m = 0; m < nmaps && !err; m++)
        for (uint64_t li = blockmap_next_leaf(maps[m], 0); li != UINT64_MAX; li = blockmap_next_leaf(maps[m], li + 1)) {
            uint32_t idx;
            const bm_leaf *l = blockmap_leaf(maps[m], li);
            if (leafset_add(&ls, l, &idx)) {
                order[idx] = l;
                order_li[idx] = li;
            }
        }

    uint64_t size = 0;
    int fd = err ? -1 : io_openat(v->dirfd, "checkpoint.tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (!err && fd < 0)
        err = errno;
    uint8_t *fbuf = err ? NULL : malloc(1 << 20);
    if (!err && !fbuf) {
        close(fd);
        err = ENOMEM;
    }
    if (!err) {
        wctx w = {.fd = fd, .buf = fbuf, .cap = 1 << 20};
        uint8_t h[64] = {0};
        put32(h, CKPT_MAGIC);
        put32(h + 4, CKPT_VERSION);
        memcpy(h + 8, v->p.uuid, 16);
        put64(h + 24, next_seq);
        put64(h + 32, rseg);
        put64(h + 40, roff);
        put32(h + 48, gen);
        put32(h + 52, nmaps);
        put32(h + 56, (uint32_t)nsegs);
        put32(h + 60, next_snap_id);
        wout(&w, h, 64);
        wout(&w, segtab, nsegs * 16);
        uint64_t nl = ls.n;
        wout(&w, &nl, 8);
        for (uint64_t i = 0; i < nl; i++) {
            wout(&w, &order_li[i], 8);
            wout(&w, order[i]->e, sizeof order[i]->e);
        }
        for (uint32_t m = 0; m < nmaps; m++) {
            uint8_t mh[CKPT_MAP_HDR] = {0}; /* the head's (m = 0) has no name, flags or uuid */
            put32(mh, m ? meta[m].id : 0);
            put32(mh + 4, meta[m].gen);
            put64(mh + 8, meta[m].created);
            put32(mh + 16, (uint32_t)strlen(meta[m].name));
            memcpy(mh + 20, meta[m].name, strlen(meta[m].name));
            put32(mh + 84, meta[m].flags);
            put64(mh + 88, maps[m]->nleaves);
            memcpy(mh + 96, meta[m].uuid, 16);
            wout(&w, mh, sizeof mh);
            uint64_t written = 0;
            for (uint64_t li = blockmap_next_leaf(maps[m], 0); li != UINT64_MAX; li = blockmap_next_leaf(maps[m], li + 1)) {
                uint32_t idx;
                leafset_add(&ls, blockmap_leaf(maps[m], li), &idx);
                wout(&w, &idx, 4);
                written++;
            }
            if (written != maps[m]->nleaves && !w.err)
                w.err = EIO; /* accounting bug: refuse to write an inconsistent checkpoint */
        }
        uint32_t c = w.crc;
        wraw(&w, &c, 4);
        wdrain(&w);
        if (!w.err && io_fsync(fd) < 0)
            w.err = errno;
        size = w.off;
        close(fd);
        free(fbuf);
        err = w.err;
        if (!err && io_renameat(v->dirfd, "checkpoint.tmp", "checkpoint") < 0)
            err = errno;
        if (!err && io_fsyncdir(v->dirfd) < 0)
            err = errno;
    }
    leafset_free(&ls);
    free(order);
    free(order_li);
    free(meta);
    free(segtab);
    free_clones(v, maps, nmaps);
    if (err) {
        free(dead);
        (void)io_unlinkat(v->dirfd, "checkpoint.tmp"); /* or the next open deletes it */
        return fail(err, "writing checkpoint: %s", strerror(err));
    }
    pthread_mutex_lock(&v->lock);
    v->since_ckpt -= since;
    v->ckpt_size = size;
    for (uint64_t i = 0; i < ndead; i++) /* dead when frozen: no checkpoint needs them now */
    {
        seg_info *g = seg_find(v, dead[i]);
        if (g && g->fd >= 0 && g->live_blocks == 0 && dead[i] != v->gc_busy)
            seg_retire(v, dead[i], 1);
    }
    pthread_mutex_unlock(&v->lock);
    free(dead);
    return 0;
}

static int load_checkpoint(vol *v, uint64_t *rseg, uint64_t *roff)
{
    int fd = io_openat(v->dirfd, "checkpoint", O_RDONLY | O_CLOEXEC | O_NOFOLLOW, 0);
    if (fd < 0) {
        if (errno == ENOENT)
            return 1;
        return fail(errno, "opening checkpoint: %s", strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return fail(errno, "stat checkpoint: %s", strerror(errno));
    }
    size_t len = (size_t)st.st_size;
    uint8_t *d = len ? mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    close(fd);
    if (d == MAP_FAILED)
        return fail(EBADMSG, "checkpoint is empty or unreadable");
    int r = -1;
    bm_leaf **leaves = NULL;
    uint64_t nl = 0;
    size_t leaf_rec = 8 + sizeof(((bm_leaf *)0)->e);
    if (len < 64 + 8 + 4 || get32(d) != CKPT_MAGIC) {
        fail(EBADMSG, "checkpoint is corrupt (bad magic or too short)");
        goto out;
    }
    uint32_t version = get32(d + 4);
    if (version != CKPT_VERSION && version != 2) {
        fail(EPROTO, "checkpoint has unsupported version %u", version);
        goto out;
    }
    size_t mhlen = version == 2 ? CKPT_V2_MAP_HDR : CKPT_MAP_HDR;
    if (memcmp(d + 8, v->p.uuid, 16) != 0) {
        fail(EBADMSG, "checkpoint belongs to another volume (uuid mismatch)");
        goto out;
    }
    if (crc32c(d, len - 4) != get32(d + len - 4)) {
        fail(EBADMSG, "checkpoint is corrupt (checksum mismatch)");
        goto out;
    }
    size_t end = len - 4;
    v->next_seq = get64(d + 24);
    *rseg = get64(d + 32);
    *roff = get64(d + 40);
    v->gen = get32(d + 48);
    uint32_t nmaps = get32(d + 52), nsegs = get32(d + 56);
    v->next_snap_id = get32(d + 60) ? get32(d + 60) : 1;
    size_t pos = 64;
    if (nmaps == 0 || (uint64_t)nsegs * 16 + 8 > end - pos) {
        fail(EBADMSG, "checkpoint is corrupt (header)");
        goto out;
    }
    for (uint32_t i = 0; i < nsegs; i++, pos += 16) {
        uint64_t id = get64(d + pos);
        seg_info *g = id > SEG_ID_MAX || id == 0 ? NULL : seg_add(v, id);
        if (!g) {
            fail(EBADMSG, "checkpoint is corrupt (segment id)");
            goto out;
        }
        g->total_blocks = get64(d + pos + 8);
        if (id > v->max_seen_id)
            v->max_seen_id = id;
    }
    nl = get64(d + pos);
    pos += 8;
    if (nl > (end - pos) / leaf_rec) {
        fail(EBADMSG, "checkpoint is corrupt (leaf table)");
        goto out;
    }
    uint64_t maxleaf = (v->nblocks + BM_LEAF_ENTRIES - 1) >> BM_LEAF_SHIFT;
    leaves = calloc(nl ? nl : 1, sizeof *leaves);
    uint64_t *lis = calloc(nl ? nl : 1, sizeof *lis);
    if (!leaves || !lis) {
        free(lis);
        fail(ENOMEM, "out of memory loading checkpoint");
        goto out;
    }
    for (uint64_t i = 0; i < nl; i++, pos += leaf_rec) {
        lis[i] = get64(d + pos);
        bm_entry tmp[BM_LEAF_ENTRIES];
        memcpy(tmp, d + pos + 8, sizeof tmp);
        if (lis[i] >= maxleaf || !(leaves[i] = blockmap_leaf_new(tmp))) {
            int beyond = lis[i] >= maxleaf;
            free(lis);
            if (beyond)
                fail(EBADMSG, "checkpoint is corrupt (leaf beyond the volume)");
            else
                fail(ENOMEM, "out of memory loading checkpoint");
            goto out;
        }
    }
    for (uint32_t m = 0; m < nmaps; m++) {
        if (mhlen > end - pos) {
            free(lis);
            fail(EBADMSG, "checkpoint is corrupt (map header)");
            goto out;
        }
        const uint8_t *mh = d + pos;
        uint32_t id = get32(mh), mgen = get32(mh + 4), namelen = get32(mh + 16);
        uint64_t cnt = get64(mh + 88);
        uint32_t mflags = version == 2 ? 0 : get32(mh + 84);
        const uint8_t *muuid = version == 2 ? NULL : mh + 96; /* NULL, nil: derived (snap_add) */
        pos += mhlen;
        if ((m == 0) != (id == 0) || namelen > VOL_SNAP_NAME_MAX || cnt > (end - pos) / 4) {
            free(lis);
            fail(EBADMSG, "checkpoint is corrupt (map %u)", m);
            goto out;
        }
        blockmap *map = v->head;
        if (!m)
            v->tomb_pending = (mflags & CKPT_HEAD_TOMB_PENDING) != 0;
        if (m) {
            char name[VOL_SNAP_NAME_MAX + 1] = {0};
            memcpy(name, mh + 20, namelen);
            blockmap *sm = blockmap_new(v->nblocks);
            if (!sm || snap_add(v, id, mgen, get64(mh + 8), name, muuid, mflags, sm) < 0) {
                blockmap_free(sm);
                free(lis);
                fail(ENOMEM, "out of memory loading checkpoint");
                goto out;
            }
            map = sm;
        }
        for (uint64_t k = 0; k < cnt; k++, pos += 4) {
            uint32_t idx = get32(d + pos);
            if (idx >= nl || blockmap_attach_leaf(map, lis[idx], leaves[idx]) < 0) {
                free(lis);
                fail(EBADMSG, "checkpoint is corrupt (leaf reference)");
                goto out;
            }
        }
    }
    free(lis);
    if (pos != end) {
        fail(EBADMSG, "checkpoint is corrupt (trailing bytes)");
        goto out;
    }
    v->ckpt_size = len;
    r = 0;
out:
    if (leaves)
        for (uint64_t i = 0; i < nl; i++)
            blockmap_leaf_discard(leaves[i]); /* only those no map took */
    free(leaves);
    munmap(d, len);
    return r;
}

/* ---------- recovery ---------- */

typedef struct segmap {
    uint64_t id;
    uint8_t *d;
    size_t len;
} segmap;

typedef struct rec {
    int type, flags;
    uint32_t nblocks, plen, gen, ncrc;
    uint64_t seq, lba;
    size_t len;
    const uint8_t *crcs, *payload;
} rec;

/* Parse the record header at d[pos]; 1 if its header is valid and it lies inside len. */
static int parse_rec(vol *v, const uint8_t *d, size_t len, size_t pos, rec *r)
{
    if (pos + REC_HDR > len || get32(d + pos) != REC_MAGIC)
        return 0;
    const uint8_t *h = d + pos;
    r->type = h[8];
    r->flags = h[9];
    r->nblocks = get32(h + 12);
    r->plen = get32(h + 16);
    r->gen = get32(h + 20);
    r->seq = get64(h + 24);
    r->lba = get64(h + 32);
    if (get64(h + 40) != v->uuid8 || r->type < R_WRITE || r->type > R_SNAPDEL)
        return 0;
    if (r->type == R_WRITE || r->type == R_RELOC) {
        if (r->flags & F_COMP) {
            if (r->nblocks == 0 || r->nblocks > MAX_COMP_BLOCKS || r->plen > MAX_COMP_BLOCKS * BS)
                return 0;
            r->ncrc = 1;
        } else {
            if (r->nblocks == 0 || r->nblocks > MAX_REC_BLOCKS || r->plen != r->nblocks * BS)
                return 0;
            r->ncrc = r->nblocks;
        }
    } else if (r->type == R_SNAP || r->type == R_SNAPDEL) {
        if ((r->type == R_SNAP ? r->plen != SNAP_PAYLOAD && r->plen != SNAP_V1_PAYLOAD : r->plen != SNAPDEL_PAYLOAD) ||
            r->nblocks || r->lba)
            return 0;
        r->ncrc = 1;
    } else {
        if (r->plen != 0 || (r->type != R_FLUSH && r->nblocks == 0) || r->nblocks > MAX_TOMB_BLOCKS)
            return 0;
        r->ncrc = 0;
    }
    if (r->type != R_FLUSH && r->type < R_SNAP && (r->lba > v->nblocks || r->nblocks > v->nblocks - r->lba))
        return 0;
    r->len = REC_HDR + 4ull * r->ncrc + r->plen;
    if (pos + r->len > len)
        return 0;
    uint32_t hc = crc32c(h + 8, REC_HDR - 8);
    if (r->ncrc)
        hc = crc32c_extend(hc, h + REC_HDR, 4ull * r->ncrc);
    if (hc != get32(h + 4))
        return 0;
    r->crcs = h + REC_HDR;
    r->payload = h + REC_HDR + 4ull * r->ncrc;
    return 1;
}

static int rec_data_ok(const rec *r)
{
    if (r->type == R_SNAP || r->type == R_SNAPDEL)
        return crc32c(r->payload, r->plen) == get32(r->crcs);
    if (r->type != R_WRITE && r->type != R_RELOC)
        return 1;
    if (r->flags & F_COMP)
        return crc32c(r->payload, r->plen) == get32(r->crcs);
    for (uint32_t b = 0; b < r->nblocks; b++)
        if (crc32c(r->payload + (size_t)b * BS, BS) != get32(r->crcs + 4 * b))
            return 0;
    return 1;
}

static int apply_rec(vol *v, uint64_t seg, size_t pos, const rec *r)
{
    if (r->type == R_WRITE || r->type == R_RELOC) {
        seg_find(v, seg)->total_blocks += r->nblocks;
        for (uint32_t b = 0; b < r->nblocks; b++) {
            bm_entry e;
            if (r->flags & F_COMP)
                e = (bm_entry){bm_loc(BM_COMP, seg, pos, b), get32(r->crcs), r->gen};
            else
                e = (bm_entry){bm_loc(BM_DATA, seg, pos + REC_HDR + 4ull * r->ncrc + (uint64_t)b * BS, 0),
                               get32(r->crcs + 4 * b), r->gen};
            if (r->type == R_RELOC) {
                /* The collector moved this version of the block (same generation, same bytes);
                 * the maps that still hold that version (the head, snapshots, or only a
                 * snapshot) now find it here. A map holding a newer version is left alone. */
                for (uint32_t m = 0; m <= v->nsnaps; m++) {
                    blockmap *map = m ? v->snaps[m - 1].map : v->head;
                    bm_entry cur = blockmap_get(map, r->lba + b);
                    unsigned k = bm_kind(cur.loc);
                    /* BM_IMAGE: the mover's copy-before-write (docs/IMAGE.md §3) */
                    if ((k == BM_DATA || k == BM_COMP || k == BM_IMAGE) && cur.gen == e.gen && cur.crc == e.crc &&
                        (k == BM_COMP) == !!(r->flags & F_COMP))
                        blockmap_relocate(map, r->lba + b, cur.loc, e.loc);
                }
                continue;
            }
            if (blockmap_set(v->head, r->lba + b, e, NULL) < 0)
                return fail(ENOMEM, "out of memory during recovery");
        }
    } else if (r->type == R_ZERO || r->type == R_TRIM) {
        if (map_tombstone(v, r->lba, r->nblocks, r->type == R_ZERO ? BM_ZERO : BM_TRIM, r->gen) < 0)
            return -1;
    } else if (r->type == R_SNAP) {
        const uint8_t *p = r->payload;
        uint32_t nl = get32(p + 16);
        char name[VOL_SNAP_NAME_MAX + 1] = {0};
        memcpy(name, p + 20, nl > VOL_SNAP_NAME_MAX ? VOL_SNAP_NAME_MAX : nl);
        int v1 = r->plen == SNAP_V1_PAYLOAD; /* no flags, no uuid: derived (snap_add) */
        if (snap_add(v, get32(p), get32(p + 4), get64(p + 8), name, v1 ? NULL : p + 96, v1 ? 0 : get32(p + 84),
                     NULL) < 0)
            return -1;
        v->gen = get32(p + 4) + 1;
        return 0;
    } else if (r->type == R_SNAPDEL) {
        snap_remove(v, get32(r->payload));
        return 0;
    }
    if (r->gen > v->gen)
        v->gen = r->gen;
    return 0;
}

/* From (si, pos), find the next valid record header (resynchronising byte by byte) with
 * seq > after_seq; report whether any FLUSH marker follows the damaged point. */
static int find_marker_after(vol *v, segmap *sm, size_t nsm, size_t si, size_t pos, uint64_t after_seq,
                             size_t *found_si, size_t *found_pos)
{
    int found = 0, marker = 0;
    for (size_t s = si; s < nsm; s++) {
        size_t p = s == si ? pos : SEG_HDR;
        while (p + REC_HDR <= sm[s].len) {
            rec r;
            if (get32(sm[s].d + p) == REC_MAGIC && parse_rec(v, sm[s].d, sm[s].len, p, &r) &&
                r.seq > after_seq) {
                if (!found) {
                    found = 1;
                    *found_si = s;
                    *found_pos = p;
                }
                if (r.type == R_FLUSH)
                    marker = 1;
                p += r.len;
            } else {
                p++;
            }
        }
    }
    if (!found)
        *found_si = nsm;
    return marker;
}

static int open_segment_file(vol *v, uint64_t id, segmap *out)
{
    char name[32];
    seg_name(name, id);
    int fd = io_openat(v->segdirfd, name, (v->p.readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOFOLLOW, 0);
    if (fd < 0)
        return fail(errno, "opening segment %s: %s%s", name, strerror(errno),
                    errno == ELOOP ? " (a symbolic link: refused)" : "");
    if (!seg_add(v, id)) {
        close(fd);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return fail(e, "stat of segment %s: %s", name, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return fail(EBADMSG, "segment %s is not a regular file", name);
    }
    seg_find(v, id)->fd = fd;
    seg_find(v, id)->file_size = (uint64_t)st.st_size;
    if (seg_map(v, id) < 0) {
        seg_find(v, id)->fd = -1;
        close(fd);
        return -1;
    }
    out->id = id;
    out->len = (size_t)st.st_size;
    out->d = NULL;
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int truncate_seg(vol *v, segmap *sm, size_t pos, vol_report *rep)
{
    rep->torn_bytes_dropped += sm->len - pos;
    if (v->p.readonly) { /* leave the files alone: only this process's view ends there */
        if (pos <= SEG_HDR) {
            seg_info *g = seg_find(v, sm->id);
            if (g->map)
                munmap(g->map, g->map_len);
            close(g->fd);
            *g = (seg_info){.id = sm->id, .fd = -1};
        } else {
            seg_find(v, sm->id)->file_size = pos;
        }
        sm->len = pos;
        return 0;
    }
    if (pos <= SEG_HDR) {
        /* nothing valid in it: delete the file */
        seg_retire(v, sm->id, 0);
        rep->segments_deleted++;
    } else {
        if (io_ftruncate(seg_find(v, sm->id)->fd, pos) < 0)
            return fail(errno, "truncating torn segment: %s", strerror(errno));
        seg_find(v, sm->id)->file_size = pos;
        /* synced before vol_open returns (sync_all): otherwise a power cut could bring the
         * dropped tail back after newer segments hold durable records, and recovery, meeting
         * damage with no durable marker after it, would drop those too (found by ACE, image) */
        seg_find(v, sm->id)->needs_sync = 1;
    }
    sm->len = pos;
    v->dir_dirty = 1;
    return 0;
}

static int replay(vol *v, uint64_t *ids, size_t nids, uint64_t rseg, uint64_t roff, vol_report *rep)
{
    segmap *sm = calloc(nids ? nids : 1, sizeof *sm);
    if (!sm)
        return fail(ENOMEM, "out of memory");
    size_t nsm = 0;
    int r = 0;
    for (size_t i = 0; i < nids; i++) {
        if (open_segment_file(v, ids[i], &sm[nsm]) < 0) {
            r = -1;
            goto out;
        }
        if (ids[i] >= rseg)
            nsm++;
    }
    for (size_t i = 0; i < nsm; i++) {
        if (sm[i].len) {
            sm[i].d = mmap(NULL, sm[i].len, PROT_READ, MAP_PRIVATE, seg_find(v, sm[i].id)->fd, 0);
            if (sm[i].d == MAP_FAILED) {
                sm[i].d = NULL;
                r = fail(errno, "mapping segment: %s", strerror(errno));
                goto out;
            }
        }
    }
    /* pending records of a multi-record request: applied once its last record arrives */
    struct { size_t si, pos; rec r; } *pend = NULL;
    size_t npend = 0, pend_cap = 0;
    size_t resume_si = 0, start_pos = (nsm && sm[0].id == rseg) ? roff : SEG_HDR;
    for (size_t si = 0; si < nsm; si++) {
        segmap *s = &sm[si];
        uint8_t *h = s->d;
        if (s->len >= SEG_HDR && get32(h) == SEG_MAGIC && crc32c(h + 8, SEG_HDR - 8) == get32(h + 4) &&
            memcmp(h + 16, v->p.uuid, 16) != 0) {
            r = fail(EBADMSG, "segment %016llx.seg belongs to another volume; refusing to open",
                     (unsigned long long)s->id);
            goto out_pend;
        }
        /* a header that never reached the disk, or the old header of a recycled file whose new
         * one never did: nothing in it was ever synced, unless a durable log follows (damage) */
        if (s->len < SEG_HDR || get32(h) != SEG_MAGIC || crc32c(h + 8, SEG_HDR - 8) != get32(h + 4) ||
            get32(h + 12) != (uint32_t)s->id) {
            /* A segment created but whose header never reached the disk, or a foreign file. Any
             * fdatasync of this segment would have made its header durable, and a FLUSH marker
             * follows only synced data: with no marker after this point nothing from here on was
             * ever synced (records of it may have reached the disk in any order), so the log ends
             * here. A marker after it means the header was synced and is now damaged: refuse. */
            size_t fsi, fpos;
            if (!find_marker_after(v, sm, nsm, si, SEG_HDR, v->next_seq - 1, &fsi, &fpos)) {
                for (size_t k = si; k < nsm; k++)
                    if (truncate_seg(v, &sm[k], SEG_HDR, rep) < 0) { r = -1; goto out_pend; }
                break;
            }
            r = fail(EBADMSG, "segment %016llx.seg has a bad header (foreign or damaged file)",
                     (unsigned long long)s->id);
            goto out_pend;
        }
        size_t pos = s->id == rseg || si == resume_si ? start_pos : SEG_HDR;
        if (pos < SEG_HDR)
            pos = SEG_HDR;
        while (pos < s->len) {
            rec rc;
            int hdr_ok = parse_rec(v, s->d, s->len, pos, &rc) && rc.seq == v->next_seq;
            int data_ok = hdr_ok && rec_data_ok(&rc);
            if (!data_ok) {
                size_t fsi, fpos;
                size_t from = hdr_ok ? pos + rc.len : pos + 1;
                int marker = find_marker_after(v, sm, nsm, si, from, hdr_ok ? rc.seq : v->next_seq - 1, &fsi, &fpos);
                if (!marker) {
                    /* torn tail: drop this record, any pending request, and everything after */
                    size_t cut_si = si, cut_pos = pos;
                    if (npend) {
                        cut_si = pend[0].si;
                        cut_pos = pend[0].pos;
                        v->next_seq = pend[0].r.seq; /* new records continue from the cut */
                        npend = 0;
                    }
                    for (size_t k = cut_si; k < nsm; k++)
                        if (truncate_seg(v, &sm[k], k == cut_si ? cut_pos : SEG_HDR, rep) < 0) {
                            r = -1;
                            goto out_pend;
                        }
                    goto done;
                }
                if (!hdr_ok) {
                    /* damage inside the durable log: skip to the next valid record */
                    uint64_t skipped = 0;
                    if (fsi == si) {
                        skipped = fpos - pos;
                    } else {
                        skipped = s->len - pos;
                        for (size_t k = si + 1; k < fsi; k++)
                            skipped += sm[k].len;
                        skipped += fpos - SEG_HDR;
                    }
                    rep->skipped_bytes += skipped;
                    rec nr;
                    parse_rec(v, sm[fsi].d, sm[fsi].len, fpos, &nr);
                    v->next_seq = nr.seq;
                    npend = 0;
                    if (fsi != si) {
                        resume_si = fsi; /* continue in a later segment at fpos */
                        start_pos = fpos;
                        si = fsi - 1;
                        goto next_seg;
                    }
                    pos = fpos;
                    continue;
                }
                rep->corrupt_records++; /* header fine, data not: reads of it give EIO */
            }
            v->next_seq++;
            rep->records_replayed++;
            rep->bytes_replayed += rc.len;
            if (rc.type == R_FLUSH) {
                pos += rc.len;
                continue;
            }
            if (npend && (rc.flags & F_FIRST))
                npend = 0; /* a request that failed half-way: its records are dropped */
            if (rc.flags & F_MORE) {
                if (npend == pend_cap) {
                    pend_cap = pend_cap ? pend_cap * 2 : 16;
                    void *n = realloc(pend, pend_cap * sizeof *pend);
                    if (!n) { r = fail(ENOMEM, "out of memory"); goto out_pend; }
                    pend = n;
                }
                pend[npend].si = si;
                pend[npend].pos = pos;
                pend[npend].r = rc;
                npend++;
            } else {
                for (size_t k = 0; k < npend; k++)
                    if (apply_rec(v, sm[pend[k].si].id, pend[k].pos, &pend[k].r) < 0) { r = -1; goto out_pend; }
                npend = 0;
                if (apply_rec(v, s->id, pos, &rc) < 0) { r = -1; goto out_pend; }
            }
            pos += rc.len;
        }
        continue;
    next_seg:;
    }
    if (npend) { /* the log ends inside a request: it was never acknowledged */
        size_t cut_si = pend[0].si, cut_pos = pend[0].pos;
        v->next_seq = pend[0].r.seq;
        for (size_t k = cut_si; k < nsm; k++)
            if (truncate_seg(v, &sm[k], k == cut_si ? cut_pos : SEG_HDR, rep) < 0) { r = -1; goto out_pend; }
    }
done:
out_pend:
    free(pend);
out:
    for (size_t i = 0; i < nsm; i++)
        if (sm[i].d)
            munmap(sm[i].d, sm[i].len ? sm[i].len : 1);
    free(sm);
    return r;
}

static size_t total_leaves(vol *v)
{
    size_t n = v->head->nleaves;
    for (uint32_t i = 0; i < v->nsnaps; i++)
        n += v->snaps[i].map->nleaves;
    return n;
}

static int recount_live(vol *v)
{
    for (size_t i = 0; i < v->nsegs; i++)
        v->segs[i].live_blocks = 0;
    leafset ls;
    if (leafset_init(&ls, total_leaves(v)) < 0)
        return -1;
    for (uint32_t m = 0; m <= v->nsnaps; m++) {
        blockmap *map = m ? v->snaps[m - 1].map : v->head;
        for (uint64_t li = blockmap_next_leaf(map, 0); li != UINT64_MAX; li = blockmap_next_leaf(map, li + 1)) {
            uint32_t idx;
            const bm_leaf *l = blockmap_leaf(map, li);
            if (leafset_add(&ls, l, &idx))
                live_hook(v, l, +1);
        }
    }
    leafset_free(&ls);
    v->head_log_blocks = 0; /* tomb_pending: from the checkpoint, then set by replayed tombstones */
    for (uint64_t li = blockmap_next_leaf(v->head, 0); li != UINT64_MAX; li = blockmap_next_leaf(v->head, li + 1)) {
        const bm_leaf *l = blockmap_leaf(v->head, li);
        for (unsigned i = 0; i < BM_LEAF_ENTRIES; i++) {
            unsigned k = bm_kind(l->e[i].loc);
            v->head_log_blocks += k == BM_DATA || k == BM_COMP;
        }
    }
    return 0;
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void vol_free(vol *v)
{
    if (!v)
        return;
    for (size_t i = 0; i < v->nsegs; i++) {
        if (v->segs[i].map)
            munmap(v->segs[i].map, v->segs[i].map_len);
        if (v->segs[i].fd >= 0)
            close(v->segs[i].fd);
    }
    for (int i = 0; i < v->npool; i++)
        close(v->pool[i].fd);
    free(v->segs);
    if (v->head)
        v->head->hooks = NULL; /* tearing down: no accounting */
    blockmap_free(v->head);
    for (uint32_t i = 0; i < v->nsnaps; i++) {
        v->snaps[i].map->hooks = NULL;
        blockmap_free(v->snaps[i].map);
    }
    free(v->snaps);
    if (v->dirfd >= 0)
        close(v->dirfd);
    if (v->segdirfd >= 0)
        close(v->segdirfd);
    ZSTD_freeCCtx(v->cctx);
    ZSTD_freeDCtx(v->dctx);
    free(v->zbuf);
    free(v->dcache);
    free(v->wbuf);
    free(v->scratch);
    free(v->pend);
    if (v->image_fd >= 0)
        close(v->image_fd);
    pthread_mutex_destroy(&v->lock);
    pthread_mutex_destroy(&v->ckpt_lock);
    pthread_mutex_destroy(&v->move_lock);
    free(v);
}

vol *vol_open(const char *voldir, const vol_params *p, vol_report *rep)
{
    raise_nofile();
    memset(rep, 0, sizeof *rep);
    if (p->size == 0 || p->size % BS || p->size > (16ull << 40)) {
        fail(EINVAL, "volume size must be a positive multiple of 4096 up to 16 TiB");
        return NULL;
    }
    if (p->segment_size < (1u << 20) || p->segment_size > (256u << 20)) {
        fail(EINVAL, "segment size must be between 1 MiB and 256 MiB");
        return NULL;
    }
    vol *v = calloc(1, sizeof *v);
    if (!v) {
        fail(ENOMEM, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&v->lock, NULL);
    pthread_mutex_init(&v->ckpt_lock, NULL);
    pthread_mutex_init(&v->move_lock, NULL);
    v->dirfd = v->segdirfd = v->image_fd = -1;
    v->p = *p;
    v->p.image_path = NULL; /* the caller's string is not ours to keep */
    if (!v->p.journal_max)
        v->p.journal_max = 1ull << 30;
    if (!v->p.zstd_level)
        v->p.zstd_level = 3;
    v->nblocks = p->size / BS;
    memcpy(&v->uuid8, p->uuid, 8);
    v->gen = 1;
    v->next_seq = 1;
    /* a window holds any record (<= 4 MiB + header) and is a multiple of 2 MiB (folio alignment) */
    v->wbuf_cap = (p->wbuf_size + (2u << 20) - 1) / (2u << 20) * (2u << 20);
    if (v->wbuf_cap < (8u << 20))
        v->wbuf_cap = 8u << 20;
    v->head = blockmap_new(v->nblocks);
    v->hooks.leaf = live_hook;
    v->hooks.ctx = v;
    v->next_snap_id = 1;
    v->wbuf = malloc(v->wbuf_cap);
    v->zbuf = malloc(ZSTD_compressBound(MAX_COMP_BLOCKS * BS));
    v->dcache = malloc(MAX_COMP_BLOCKS * BS);
    v->cctx = ZSTD_createCCtx();
    v->dctx = ZSTD_createDCtx();
    if (!v->head || !v->wbuf || !v->zbuf || !v->dcache || !v->cctx || !v->dctx) {
        fail(ENOMEM, "out of memory");
        goto err;
    }
    v->dirfd = open(voldir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (v->dirfd < 0) {
        fail(errno, "opening volume directory %s: %s", voldir, strerror(errno));
        goto err;
    }
    if (p->image_path) {
        struct stat st;
        v->image_fd = open(p->image_path, (p->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOFOLLOW);
        if (v->image_fd < 0) {
            fail(errno == ELOOP ? EBADMSG : errno, "opening the image %s: %s", p->image_path,
                 errno == ELOOP ? "it is a symbolic link (refused: a planted link must not redirect writes)"
                                : strerror(errno));
            goto err;
        }
        if (fstat(v->image_fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != p->size) {
            fail(EBADMSG, "the image %s is %lld bytes, the volume %llu: not this volume's image (or damaged)",
                 p->image_path, (long long)st.st_size, (unsigned long long)p->size);
            goto err;
        }
    }
    if (!p->readonly && io_mkdirat(v->dirfd, "segments", 0700) < 0 && errno != EEXIST) {
        fail(errno, "creating segments directory: %s", strerror(errno));
        goto err;
    }
    v->segdirfd = openat(v->dirfd, "segments", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (v->segdirfd < 0) {
        fail(errno, "opening segments directory: %s", strerror(errno));
        goto err;
    }
    /* list segments */
    uint64_t *ids = NULL;
    size_t nids = 0, cap = 0;
    int dfd = fcntl(v->segdirfd, F_DUPFD_CLOEXEC, 0);
    DIR *dir = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!dir) {
        int e = errno;
        if (dfd >= 0)
            close(dfd);
        fail(e, "listing segments: %s", strerror(e));
        goto err;
    }
    struct dirent *de;
    while ((de = readdir(dir))) {
        unsigned long long id;
        char tail[8];
        if (strlen(de->d_name) == 20 && sscanf(de->d_name, "%16llx%7s", &id, tail) == 2 &&
            strcmp(tail, ".seg") == 0) {
            if (id == 0 || id > SEG_ID_MAX) { /* never written by the engine: refuse to guess */
                fail(EBADMSG, "segment file %s has an id out of range (1 to %llu): foreign or damaged",
                     de->d_name, (unsigned long long)SEG_ID_MAX);
                closedir(dir); /* after the message: it frees de */
                free(ids);
                goto err;
            }
            if (nids == cap) {
                cap = cap ? cap * 2 : 64;
                uint64_t *n = realloc(ids, cap * sizeof *ids);
                if (!n) {
                    closedir(dir);
                    free(ids);
                    fail(ENOMEM, "out of memory");
                    goto err;
                }
                ids = n;
            }
            ids[nids++] = id;
        } else if (strlen(de->d_name) == 21 && strcmp(de->d_name + 16, ".free") == 0) {
            if (!p->readonly)
                (void)io_unlinkat(v->segdirfd, de->d_name); /* a recycling pool left by the last owner */
        }
    }
    closedir(dir);
    if (!p->readonly)
        (void)io_unlinkat(v->dirfd, "checkpoint.tmp"); /* an interrupted checkpoint: never committed */
    if (nids)
        qsort(ids, nids, sizeof *ids, cmp_u64);
    uint64_t rseg = 0, roff = SEG_HDR;
    int lc = load_checkpoint(v, &rseg, &roff);
    if (lc < 0) {
        free(ids);
        goto err;
    }
    rep->checkpoint_seq = lc == 0 ? v->next_seq : 0;
    if (lc == 1 && nids) { /* no checkpoint: replay everything */
        rseg = ids[0];
        roff = SEG_HDR;
    }
    if (replay(v, ids, nids, rseg, roff, rep) < 0) {
        free(ids);
        goto err;
    }
    uint64_t maxid = nids ? ids[nids - 1] : 0;
    if (v->max_seen_id > maxid) /* the newest segment was lost: its id is never given again */
        maxid = v->max_seen_id;
    if (rseg > maxid)
        maxid = rseg;
    free(ids);
    if (recount_live(v) < 0)
        goto err;
    v->head->hooks = &v->hooks;
    for (uint32_t i = 0; i < v->nsnaps; i++)
        v->snaps[i].map->hooks = &v->hooks;
    /* segments older than the replay start that nothing references: left by the collector */
    for (size_t i = 0; i < v->nsegs && v->segs[i].id < rseg; i++)
        if (!p->readonly && v->segs[i].fd >= 0 && v->segs[i].live_blocks == 0) {
            seg_retire(v, v->segs[i].id, 0);
            rep->segments_deleted++;
        }
    for (size_t i = 0; i < v->nsegs; i++) {
        seg_info *g = &v->segs[i];
        if (g->id >= rseg && g->fd >= 0)
            v->since_ckpt += g->file_size - (g->id == rseg && g->file_size >= roff ? roff - SEG_HDR : 0);
    }
    if (p->readonly) {
        v->active = UINT64_MAX; /* no segment to append to: every change is refused (EROFS) */
        return v;
    }
    if (create_segment(v, maxid + 1) < 0)
        goto err;
    if (sync_all(v) < 0)
        goto err;
    return v;
err:;
    int e = errno;
    vol_free(v);
    errno = e;
    return NULL;
}

void vol_abandon(vol *v)
{
    vol_free(v); /* what SIGKILL leaves: the file contents, not the window */
}

int vol_close(vol *v)
{
    if (v->p.readonly) {
        vol_free(v);
        return 0;
    }
    int r = 0;
    if (v->image_fd >= 0) { /* drain: the image alone is then the volume (docs/IMAGE.md §1) */
        /* best effort: a mover that cannot write the image (full, failing) leaves the blocks in
         * the change log, which the checkpoint below and the next open keep */
        while (vol_move(v, 64u << 20, 1) > 0)
            ;
    }
    r = vol_checkpoint(v);
    if (r == 0) {
        pthread_mutex_lock(&v->lock);
        r = flush_locked(v);
        if (r == 0)
            r = sync_all(v);
        pthread_mutex_unlock(&v->lock);
    }
    int e = errno;
    vol_free(v);
    errno = e;
    return r;
}

/* ---------- collector ---------- */

int64_t vol_gc_pick(vol *v, double ratio)
{
    if (v->p.readonly)
        return 0;
    pthread_mutex_lock(&v->lock);
    uint64_t used = 0, live = 0;
    int64_t best = 0;
    double best_ratio = 2.0;
    for (size_t si = 0; si < v->nsegs; si++) {
        seg_info *s = &v->segs[si];
        uint64_t i = s->id;
        if (s->fd < 0 || (i != v->active && s->live_blocks == 0))
            continue; /* dead segments go at the next checkpoint: not the collector's work */
        uint64_t fsz = i == v->active ? v->active_off : s->file_size;
        used += fsz;
        /* live bytes estimated from the segment's own bytes per block (compression-aware) */
        live += s->total_blocks ? (uint64_t)((double)fsz * s->live_blocks / s->total_blocks) : 0;
        if (i == v->active || s->total_blocks == 0)
            continue;
        double r = (double)s->live_blocks / (double)s->total_blocks;
        if (r < best_ratio) {
            best_ratio = r;
            best = (int64_t)i;
        }
    }
    /* worth it while disk use exceeds ratio x live data and the victim frees >= 10% of itself */
    if (!(best && best_ratio < 0.9 && (double)used > ratio * (double)live))
        best = 0;
    pthread_mutex_unlock(&v->lock);
    return best;
}

/* Does any map (head or snapshot) reference this block at this location? */
static int referenced(vol *v, uint64_t lba, uint64_t loc)
{
    for (uint32_t m = 0; m <= v->nsnaps; m++)
        if (blockmap_get(m ? v->snaps[m - 1].map : v->head, lba).loc == loc)
            return 1;
    return 0;
}

/* Point every distinct leaf entry that references old_loc at new_loc (identical bytes). */
static void relocate_all(vol *v, uint64_t lba, uint64_t old_loc, uint64_t new_loc)
{
    for (uint32_t m = 0; m <= v->nsnaps; m++)
        if (blockmap_relocate(m ? v->snaps[m - 1].map : v->head, lba, old_loc, new_loc)) {
            seg_info *os = seg_find(v, bm_seg(old_loc)), *ns = seg_find(v, bm_seg(new_loc));
            if (os && os->live_blocks)
                os->live_blocks--;
            if (ns)
                ns->live_blocks++;
        }
}

int vol_gc_segment(vol *v, uint64_t seg)
{
    if (v->p.readonly)
        return fail(EROFS, "volume opened read-only");
    pthread_mutex_lock(&v->lock);
    seg_info *victim = seg_find(v, seg);
    if (!victim || victim->fd < 0 || seg == v->active || v->gc_busy) {
        pthread_mutex_unlock(&v->lock);
        return fail(EINVAL, "segment %llu is not a sealed segment (or a collection is running)",
                    (unsigned long long)seg);
    }
    /* While we read it without the lock, a checkpoint must not retire it: once its last live
     * block moves, it is dead, and a recycled file would be truncated and rewritten under our
     * mapping (SIGBUS, found by the sanitizer stress). gc_busy keeps it until we are done. */
    v->gc_busy = seg;
    size_t len = (size_t)victim->file_size;
    uint8_t *d = len ? mmap(NULL, len, PROT_READ, MAP_PRIVATE, victim->fd, 0) : MAP_FAILED;
    int merr = errno;
    pthread_mutex_unlock(&v->lock);
    if (d == MAP_FAILED) {
        pthread_mutex_lock(&v->lock);
        v->gc_busy = 0;
        pthread_mutex_unlock(&v->lock);
        return fail(len ? merr : EINVAL, "mapping segment %llu for collection: %s", (unsigned long long)seg,
                    len ? strerror(merr) : "empty");
    }
    int r = 0;
    size_t pos = SEG_HDR;
    uint32_t crcs[MAX_REC_BLOCKS];
    while (pos < len) {
        rec rc;
        if (!parse_rec(v, d, len, pos, &rc))
            break; /* the remainder holds nothing the map can reference */
        if (rc.type != R_WRITE && rc.type != R_RELOC) {
            pos += rc.len;
            continue;
        }
        /* blockmap_relocate edits leaves in place, and those leaves are shared with the frozen
         * clones a checkpoint serialises without v->lock: a move during that window could be
         * recorded before its RELOC record is in the file. So each move waits for a running
         * checkpoint (ckpt_lock, taken before lock), and a checkpoint waits for one move. */
        pthread_mutex_lock(&v->ckpt_lock);
        pthread_mutex_lock(&v->lock);
        if (rc.flags & F_COMP) {
            uint64_t want = bm_loc(BM_COMP, seg, pos, 0) & ~(0xffULL << 56);
            int live = 0;
            for (uint32_t b = 0; b < rc.nblocks && !live; b++)
                for (uint32_t m = 0; m <= v->nsnaps && !live; m++) {
                    bm_entry e = blockmap_get(m ? v->snaps[m - 1].map : v->head, rc.lba + b);
                    live = bm_kind(e.loc) == BM_COMP && (e.loc & ~(0xffULL << 56)) == want;
                }
            if (live) {
                uint64_t nro, pay;
                uint32_t c = get32(rc.crcs);
                v->req_first = 1;
                if (append_record(v, R_RELOC, F_COMP, rc.nblocks, rc.lba, rc.gen, &c, 1, rc.payload,
                                  rc.plen, &nro, &pay) < 0) {
                    r = -1;
                    pthread_mutex_unlock(&v->lock);
                    pthread_mutex_unlock(&v->ckpt_lock);
                    break;
                }
                for (uint32_t b = 0; b < rc.nblocks; b++)
                    relocate_all(v, rc.lba + b, bm_loc(BM_COMP, seg, pos, b), bm_loc(BM_COMP, v->active, nro, b));
                v->gc_bytes_moved += rc.plen;
            }
        } else {
            uint64_t base = pos + REC_HDR + 4ull * rc.ncrc;
            uint32_t b = 0;
            while (b < rc.nblocks) {
                if (!referenced(v, rc.lba + b, bm_loc(BM_DATA, seg, base + (uint64_t)b * BS, 0))) {
                    b++;
                    continue;
                }
                uint32_t s = b;
                while (b < rc.nblocks && referenced(v, rc.lba + b, bm_loc(BM_DATA, seg, base + (uint64_t)b * BS, 0)))
                    b++;
                uint32_t k = b - s;
                memcpy(crcs, rc.crcs + 4 * s, 4ull * k);
                uint64_t pay;
                v->req_first = 1;
                if (append_record(v, R_RELOC, 0, k, rc.lba + s, rc.gen, crcs, k,
                                  rc.payload + (size_t)s * BS, k * BS, NULL, &pay) < 0) {
                    r = -1;
                    break;
                }
                for (uint32_t j = 0; j < k; j++)
                    relocate_all(v, rc.lba + s + j, bm_loc(BM_DATA, seg, base + (uint64_t)(s + j) * BS, 0),
                                 bm_loc(BM_DATA, v->active, pay + (uint64_t)j * BS, 0));
                v->gc_bytes_moved += (uint64_t)k * BS;
            }
        }
        pthread_mutex_unlock(&v->lock);
        pthread_mutex_unlock(&v->ckpt_lock);
        if (r < 0)
            break;
        pos += rc.len;
    }
    munmap(d, len);
    pthread_mutex_lock(&v->lock);
    v->gc_busy = 0;
    if (r == 0)
        v->gc_segments++;
    pthread_mutex_unlock(&v->lock);
    /* The segment is now dead; the next checkpoint makes the relocated copies the ones
     * recovery knows, and it deletes segments that were already dead when it froze the map. */
    return r;
}

int vol_get_stats(vol *v, vol_stats *s)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_lock(&v->lock);
    s->size = v->p.size;
    for (size_t si = 0; si < v->nsegs; si++) {
        seg_info *g = &v->segs[si];
        uint64_t i = g->id;
        if (g->fd < 0)
            continue;
        s->segments++;
        if (i != v->active && g->live_blocks == 0)
            s->dead_segments++;
        uint64_t fsz = i == v->active ? v->active_off : g->file_size;
        s->used_bytes += fsz;
        s->live_blocks += g->live_blocks;
        if (g->total_blocks)
            s->stored_data_bytes += (uint64_t)((double)fsz * g->live_blocks / g->total_blocks);
    }
    s->used_bytes += v->ckpt_size;
    for (int i = 0; i < v->npool; i++)
        s->used_bytes += v->pool[i].size;
    s->pool_files = (uint64_t)v->npool;
    s->gen = v->gen;
    s->next_seq = v->next_seq;
    s->log_since_checkpoint = v->since_ckpt;
    s->corrupt_reads = v->corrupt_reads;
    s->map_bytes = v->head->nleaves * sizeof(bm_leaf) + v->head->nmids * sizeof(void *);
    s->active_segment = v->active;
    s->gc_segments = v->gc_segments;
    s->gc_bytes_moved = v->gc_bytes_moved;
    s->requests = v->requests;
    if (v->image_fd >= 0) {
        s->journal_pending_bytes = v->head_log_blocks * BS;
        s->journal_max_bytes = v->p.journal_max;
        s->image_moved_bytes = v->moved_bytes;
        s->image_cbw_blocks = v->cbw_blocks;
        s->image_current = v->head_log_blocks == 0 && !v->tomb_pending;
        s->image_error = (uint64_t)v->image_err;
    }
    pthread_mutex_unlock(&v->lock);
    return 0;
}

/* ---------- the image mover (docs/IMAGE.md §3) ----------
 *
 * Notes on the design:
 *  - A batch has three phases. A (move_lock, ckpt_lock, lock): pick the head blocks still in
 *    the change log, oldest sealed segment first (a cursor: sealed segments never gain head
 *    blocks, new writes and the collector's moves go to the active one); preserve, as RELOC
 *    records, the image blocks a snapshot still maps (copy-before-write); copy the blocks to
 *    move into the mover's buffer; sync the log. B (move_lock only): pwrite them into the
 *    image, fdatasync it. C (move_lock, ckpt_lock, lock): every map entry still holding one of
 *    those versions becomes IMAGE (same crc, same generation).
 *  - Invariant: at every LBA, all IMAGE entries of all maps hold the one version that is in the
 *    image. Phase A makes it safe for B to overwrite: no map holds an IMAGE entry at a block
 *    being moved (only the mover creates IMAGE entries and clones copy what the head holds,
 *    which is not IMAGE there). Reads never wait for B.
 *  - Crash safety: the moved records and the preserved copies are durable before B writes
 *    the image; IMAGE entries exist only after the image's fdatasync, so a checkpoint never
 *    records one the disk does not hold; a crash before the next checkpoint replays the log,
 *    which still has every moved record (dead segments are deleted only by a checkpoint that
 *    no longer references them).
 *  - A failed image write or sync is sticky (image_err): what reached the image is unknown,
 *    so nothing more is moved until the volume is reopened and recovery replays the log.
 */

#define IMAGE_LOC bm_loc(BM_IMAGE, 0, 0, 0)

typedef struct mv_cand {
    uint64_t lba, loc;
    uint8_t *data; /* the block's bytes in the mover's buffer */
    uint32_t crc;  /* CRC-32C of those bytes (what the IMAGE entry will carry) */
} mv_cand;

static int cand_by_lba(const void *a, const void *b)
{
    uint64_t x = ((const mv_cand *)a)->lba, y = ((const mv_cand *)b)->lba;
    return x < y ? -1 : x > y;
}

static int image_pread(vol *v, void *buf, size_t len, uint64_t off)
{
    size_t got = 0;
    while (got < len) {
        ssize_t r = pread(v->image_fd, (uint8_t *)buf + got, len - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return fail(errno, "reading the image: %s", strerror(errno));
        if (r == 0) {
            memset((uint8_t *)buf + got, 0, len - got);
            break;
        }
        got += (size_t)r;
    }
    return 0;
}

/* Copy-before-write of the image block at lba, if a snapshot maps it (kind IMAGE): append it
 * as a RELOC record with the entry's generation and CRC (a block already damaged in the image
 * stays damaged, it is never "repaired" into unchecked bytes) and point those entries at it.
 * Caller holds ckpt_lock and lock. */
static int preserve_image_block(vol *v, uint64_t lba, uint8_t *tmp)
{
    bm_entry found = {0};
    int any = 0;
    for (uint32_t m = 0; m < v->nsnaps && !any; m++) {
        found = blockmap_get(v->snaps[m].map, lba);
        any = bm_kind(found.loc) == BM_IMAGE;
    }
    if (!any)
        return 0;
    if (image_pread(v, tmp, BS, lba * BS) < 0)
        return -1;
    uint32_t c = found.crc;
    uint64_t pay;
    v->req_first = 1;
    if (append_record(v, R_RELOC, 0, 1, lba, found.gen, &c, 1, tmp, BS, NULL, &pay) < 0)
        return -1;
    uint64_t nl = bm_loc(BM_DATA, v->active, pay, 0);
    seg_info *ns = seg_find(v, v->active);
    for (uint32_t m = 0; m < v->nsnaps; m++) {
        bm_entry e = blockmap_get(v->snaps[m].map, lba);
        if (bm_kind(e.loc) == BM_IMAGE && e.gen == found.gen && blockmap_relocate(v->snaps[m].map, lba, e.loc, nl) &&
            ns)
            ns->live_blocks++;
    }
    v->cbw_blocks++;
    return 1;
}

/* Phase A's pick: head blocks of WRITE/RELOC records from the cursor on, up to max blocks
 * (whole records). Seals the active segment when seal is set and it holds the rest. */
static size_t pick_candidates(vol *v, mv_cand *c, size_t max, int seal)
{
    size_t n = 0;
    int sealed_once = 0;
    for (;;) {
        size_t si = seg_lower_bound(v, v->move_seg);
        for (; si < v->nsegs && n < max; si++) {
            seg_info *s = &v->segs[si];
            if (s->id == v->active)
                break;
            v->move_seg = s->id;
            if (s->fd < 0 || !s->map || s->live_blocks == 0) {
                v->move_seg = s->id + 1;
                continue;
            }
            size_t len = (size_t)(s->file_size < s->map_len ? s->file_size : s->map_len);
            size_t pos = SEG_HDR;
            int done = 1;
            while (pos < len) {
                rec rc;
                if (!parse_rec(v, s->map, len, pos, &rc))
                    break;
                if ((rc.type == R_WRITE || rc.type == R_RELOC) && n + rc.nblocks > max && n) {
                    done = 0; /* the rest of this segment is for the next batch */
                    break;
                }
                if (rc.type == R_WRITE || rc.type == R_RELOC) {
                    uint64_t base = pos + REC_HDR + 4ull * rc.ncrc;
                    for (uint32_t b = 0; b < rc.nblocks; b++) {
                        uint64_t loc = rc.flags & F_COMP ? bm_loc(BM_COMP, s->id, pos, b)
                                                         : bm_loc(BM_DATA, s->id, base + (uint64_t)b * BS, 0);
                        if (blockmap_get(v->head, rc.lba + b).loc == loc)
                            c[n++] = (mv_cand){rc.lba + b, loc, NULL, 0};
                    }
                }
                pos += rc.len;
            }
            if (!done)
                return n; /* blocks already taken are skipped next time: the head moved on */
            v->move_seg = s->id + 1;
        }
        if (n || !seal || sealed_once || v->head_log_blocks == 0)
            return n;
        seg_info *a = active_seg(v);
        if (!a || a->live_blocks == 0 || v->active_off <= SEG_HDR || rotate(v) < 0)
            return n;
        sealed_once = 1;
    }
}

/* Make everything in the log durable *and provably so* before the image changes: sync, a FLUSH
 * marker, sync again. Recovery replays records past a damaged spot (say a stale tail left in
 * an older segment) only when a durable marker follows it (FORMAT.md §3); without one it
 * would drop records whose blocks the image already holds, and IMAGE entries of the
 * checkpoint would then meet newer bytes (found by the ACE crash states). */
static int log_barrier(vol *v)
{
    /* The bulk of the bytes is synced without v->lock (requests go on meanwhile; the caller's
     * ckpt_lock keeps the collector and checkpoints away); needs_sync stays set, so a client
     * flush meanwhile still syncs for itself. Then, under the lock, what came meanwhile, the
     * marker, and the marker itself: small. */
    if (v->sync_err)
        return sync_failed(v);
    if (flush_wbuf(v) < 0)
        return -1;
    int *fds = malloc((v->nsegs ? v->nsegs : 1) * sizeof *fds);
    if (!fds)
        return fail(ENOMEM, "out of memory for the mover");
    size_t n = 0;
    for (size_t i = 0; i < v->nsegs; i++)
        if (v->segs[i].fd >= 0 && v->segs[i].needs_sync) {
            int d = fcntl(v->segs[i].fd, F_DUPFD_CLOEXEC, 0);
            if (d >= 0)
                fds[n++] = d;
        }
    pthread_mutex_unlock(&v->lock);
    int err = 0;
    for (size_t i = 0; i < n; i++) {
        if (!err && io_fdatasync(fds[i]) < 0)
            err = errno;
        close(fds[i]);
    }
    free(fds);
    pthread_mutex_lock(&v->lock);
    if (err) {
        if (!v->sync_err)
            v->sync_err = err;
        return fail(err, "fdatasync of the change log before moving blocks: %s", strerror(err));
    }
    if (flush_locked(v) < 0)
        return -1;
    return sync_all(v);
}

static int image_write_all(vol *v, const uint8_t *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = io_pwrite(v->image_fd, buf + done, len - done, off + done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

static int64_t image_failed(vol *v, const char *what)
{
    int e = errno ? errno : EIO;
    pthread_mutex_lock(&v->lock);
    v->move_seg = 0; /* the cursor passed blocks that did not get moved: scan again */
    pthread_mutex_unlock(&v->lock);
    /* A full image filesystem refused the bytes before they were anything: nothing is unknown,
     * the next batch tries again once space returns. Any other failure (and every failed
     * fdatasync) leaves the image's contents unknown: sticky. */
    if (e == ENOSPC && strcmp(what, "syncing") != 0)
        return fail(e, "%s the image: %s (the mover retries; the change log keeps every block)", what, strerror(e));
    pthread_mutex_lock(&v->lock);
    if (!v->image_err)
        v->image_err = e;
    pthread_mutex_unlock(&v->lock);
    return fail(e, "%s the image: %s (the mover stops until the volume is reopened; the change log keeps every block)",
                what, strerror(e));
}

/* The punch pass: where the head reads as zero/trimmed, make the image read as zeros too
 * (after preserving what snapshots map there). Runs when nothing is left to move. */
static int64_t punch_pass(vol *v)
{
    pthread_mutex_lock(&v->ckpt_lock);
    pthread_mutex_lock(&v->lock);
    size_t nr = 0, cap = 0;
    uint64_t *runs = NULL; /* (lba, n) pairs */
    uint8_t tmp[BS];
    int r = 0;
    /* Every tombstone of the head, not only those since the last pass: generations advance only
     * at snapshots, so "newer than the last pass" cannot be told from them (a block trimmed,
     * rewritten, moved and trimmed again keeps one generation). Not done: a list of the ranges
     * trimmed since the last pass. */
    for (uint64_t li = blockmap_next_leaf(v->head, 0); li != UINT64_MAX && r == 0;
         li = blockmap_next_leaf(v->head, li + 1)) {
        for (unsigned i = 0; i < BM_LEAF_ENTRIES; i++) {
            const bm_leaf *l = blockmap_leaf(v->head, li);
            unsigned k = bm_kind(l->e[i].loc);
            if (k != BM_ZERO && k != BM_TRIM)
                continue;
            uint64_t lba = (li << BM_LEAF_SHIFT) + i;
            if (preserve_image_block(v, lba, tmp) < 0) {
                r = -1;
                break;
            }
            if (nr && runs[2 * (nr - 1)] + runs[2 * (nr - 1) + 1] == lba) {
                runs[2 * (nr - 1) + 1]++;
                continue;
            }
            if (nr == cap) {
                size_t nc = cap ? cap * 2 : 256;
                uint64_t *np = realloc(runs, nc * 2 * sizeof *runs);
                if (!np) {
                    r = fail(ENOMEM, "out of memory for the image punch pass");
                    break;
                }
                runs = np;
                cap = nc;
            }
            runs[2 * nr] = lba;
            runs[2 * nr + 1] = 1;
            nr++;
        }
    }
    uint64_t epoch = v->tomb_epoch; /* before the barrier drops the lock: later tombstones are not punched here */
    if (r == 0 && nr)
        r = log_barrier(v); /* the preserved copies are durable before the image loses them */
    pthread_mutex_unlock(&v->lock);
    pthread_mutex_unlock(&v->ckpt_lock);
    if (r < 0) {
        free(runs);
        return -1;
    }
    for (size_t i = 0; i < nr; i++)
        if (io_punch(v->image_fd, runs[2 * i + 1] * BS, runs[2 * i] * BS) < 0) {
            free(runs);
            return image_failed(v, "punching");
        }
    free(runs);
    if (nr && io_fdatasync(v->image_fd) < 0)
        return image_failed(v, "syncing");
    pthread_mutex_lock(&v->lock);
    if (v->tomb_epoch == epoch) /* (a checkpoint meanwhile recorded "pending": a later one clears it) */
        v->tomb_pending = 0;
    pthread_mutex_unlock(&v->lock);
    return 0;
}

static int64_t move_batch(vol *v, uint64_t max_blocks, int seal)
{
    mv_cand *c = malloc((max_blocks + MAX_REC_BLOCKS) * sizeof *c);
    if (!c)
        return fail(ENOMEM, "out of memory for the mover");
    pthread_mutex_lock(&v->ckpt_lock);
    pthread_mutex_lock(&v->lock);
    if (v->image_err) {
        int e = v->image_err;
        pthread_mutex_unlock(&v->lock);
        pthread_mutex_unlock(&v->ckpt_lock);
        free(c);
        return fail(e, "an earlier write or sync of the image failed (%s): the mover stops until the volume is "
                    "reopened", strerror(e));
    }
    size_t n = pick_candidates(v, c, (size_t)max_blocks, seal);
    uint8_t *buf = n ? malloc(n * BS) : NULL;
    int r = 0;
    if (n && !buf)
        r = fail(ENOMEM, "out of memory for the mover");
    uint8_t tmp[BS];
    size_t keep = 0;
    for (size_t i = 0; i < n && r == 0; i++) {
        if (preserve_image_block(v, c[i].lba, tmp) < 0) {
            r = -1;
            break;
        }
        /* the version the head maps, checked against its CRC: a damaged block stays in the log
         * (its reads keep failing) rather than reach the image */
        if (read_blocks(v, v->head, c[i].lba, 1, buf + keep * BS) == 0) {
            c[keep] = c[i];
            c[keep].data = buf + keep * BS;
            c[keep].crc = crc32c(c[keep].data, BS);
            keep++;
        }
    }
    if (r == 0 && n)
        r = log_barrier(v);
    if (r == 0 && !n && seal && v->head_log_blocks == 0 && v->tomb_pending) {
        pthread_mutex_unlock(&v->lock);
        pthread_mutex_unlock(&v->ckpt_lock);
        free(c);
        return punch_pass(v);
    }
    if (r < 0)
        v->move_seg = 0; /* nothing of this batch moved: its segments are scanned again */
    pthread_mutex_unlock(&v->lock);
    pthread_mutex_unlock(&v->ckpt_lock);
    if (r < 0 || keep == 0) {
        free(buf);
        free(c);
        return r < 0 ? -1 : n ? -2 : 0; /* -2: only damaged blocks were picked; pick again */
    }
    /* B: into the image in LBA order, runs of consecutive blocks (adjacent in the buffer too)
     * in one pwrite */
    qsort(c, keep, sizeof *c, cand_by_lba);
    for (size_t i = 0; i < keep;) {
        size_t j = i + 1;
        while (j < keep && c[j].lba == c[j - 1].lba + 1 && c[j].data == c[j - 1].data + BS)
            j++;
        if (image_write_all(v, c[i].data, (j - i) * BS, c[i].lba * BS) < 0) {
            free(buf);
            free(c);
            return image_failed(v, "writing");
        }
        i = j;
    }
    free(buf);
    if (io_fdatasync(v->image_fd) < 0) {
        free(c);
        return image_failed(v, "syncing");
    }
    /* C: the entries still holding those versions now read from the image */
    pthread_mutex_lock(&v->ckpt_lock);
    pthread_mutex_lock(&v->lock);
    uint64_t moved = 0;
    for (size_t i = 0; i < keep; i++) {
        int any = 0;
        /* a compressed entry's crc is its record's; in the image the block's own CRC describes it */
        int comp = bm_kind(c[i].loc) == BM_COMP;
        for (uint32_t m = 0; m <= v->nsnaps; m++) {
            blockmap *map = m ? v->snaps[m - 1].map : v->head;
            if (blockmap_relocate_crc(map, c[i].lba, c[i].loc, IMAGE_LOC, comp, c[i].crc)) {
                seg_info *os = seg_find(v, bm_seg(c[i].loc));
                if (os && os->live_blocks)
                    os->live_blocks--;
                if (m == 0 && v->head_log_blocks)
                    v->head_log_blocks--;
                any = 1;
            }
        }
        moved += any;
    }
    v->moved_bytes += moved * BS;
    pthread_mutex_unlock(&v->lock);
    pthread_mutex_unlock(&v->ckpt_lock);
    free(c);
    return (int64_t)(keep * BS);
}

int64_t vol_move(vol *v, uint64_t max_bytes, int seal)
{
    if (v->image_fd < 0)
        return fail(EINVAL, "not an image-backend volume: nothing to move");
    if (v->p.readonly)
        return fail(EROFS, "volume opened read-only");
    uint64_t blocks = max_bytes / BS;
    if (blocks < 1)
        blocks = 1;
    if (blocks > (64u << 20) / BS)
        blocks = (64u << 20) / BS;
    pthread_mutex_lock(&v->move_lock);
    int64_t r;
    while ((r = move_batch(v, blocks, seal)) == -2)
        ; /* the cursor has passed those segments: this ends */
    pthread_mutex_unlock(&v->move_lock);
    return r;
}
