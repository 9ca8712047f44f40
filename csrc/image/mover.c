/* The image backend's mover (docs/IMAGE.md §3) and the writers' back-pressure; it uses the
 * lsfs internals (the change log is an lsfs log).
 *
 * Locks: vol_move takes move_lock for its whole duration, and ckpt_lock then v->lock around
 * phases A and C (never across the image pwrite/fdatasync). Order: move_lock, ckpt_lock, lock.
 * image_journal_backpressure takes v->lock only to read the depth, then calls vol_move unlocked.
 * Rules and error contract: csrc/lsfs/internal.h. */
#define _GNU_SOURCE
#include "lsfs/internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
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

void image_journal_backpressure(vol *v, uint64_t count)
{
    for (;;) {
        pthread_mutex_lock(&v->lock);
        int over = v->head_log_blocks * BS + count > v->p.journal_max && !v->image_err;
        pthread_mutex_unlock(&v->lock);
        if (!over || vol_move(v, 4u << 20, 1) <= 0)
            return;
    }
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

int image_pread(vol *v, void *buf, size_t len, uint64_t off)
{
    size_t got = 0;
    while (got < len) {
        ssize_t r = pread(v->image_fd, (uint8_t *)buf + got, len - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return lsfs_fail(errno, "reading the image at byte %llu: %s", (unsigned long long)(off + got),
                             strerror(errno));
        if (r == 0) { /* beyond the end of a truncated image: zeros, which the caller's CRC judges */
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
    if (log_append_record(v, R_RELOC, 0, 1, lba, found.gen, &c, 1, tmp, BS, NULL, &pay) < 0)
        return -1;
    uint64_t nl = bm_loc(BM_DATA, v->active, pay, 0);
    seg_info *ns = log_seg_find(v, v->active);
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
        size_t si = log_seg_lower_bound(v, v->move_seg);
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
                log_rec rc;
                if (!log_parse_rec(v->uuid8, v->nblocks, s->map, len, pos, &rc))
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
        seg_info *a = log_active_seg(v);
        if (!a || a->live_blocks == 0 || v->active_off <= SEG_HDR || log_rotate(v) < 0)
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
        return log_sync_failed(v);
    if (log_flush_wbuf(v) < 0)
        return -1;
    int *fds = malloc((v->nsegs ? v->nsegs : 1) * sizeof *fds);
    if (!fds)
        return lsfs_fail(ENOMEM, "out of memory for the mover");
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
        return lsfs_fail(err, "fdatasync of the change log before moving blocks: %s", strerror(err));
    }
    if (log_flush_locked(v) < 0)
        return -1;
    return log_sync_all(v);
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
        return lsfs_fail(e, "%s the image: %s (the mover retries; the change log keeps every block)", what, strerror(e));
    pthread_mutex_lock(&v->lock);
    if (!v->image_err)
        v->image_err = e;
    pthread_mutex_unlock(&v->lock);
    return lsfs_fail(e, "%s the image: %s (the mover stops until the volume is reopened; the change log keeps every block)",
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
                    r = lsfs_fail(ENOMEM, "out of memory for the image punch pass");
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
        return lsfs_fail(ENOMEM, "out of memory for the mover");
    pthread_mutex_lock(&v->ckpt_lock);
    pthread_mutex_lock(&v->lock);
    if (v->image_err) {
        int e = v->image_err;
        pthread_mutex_unlock(&v->lock);
        pthread_mutex_unlock(&v->ckpt_lock);
        free(c);
        return lsfs_fail(e, "an earlier write or sync of the image failed (%s): the mover stops until the volume is "
                    "reopened", strerror(e));
    }
    size_t n = pick_candidates(v, c, (size_t)max_blocks, seal);
    uint8_t *buf = n ? malloc(n * BS) : NULL;
    int r = 0;
    if (n && !buf)
        r = lsfs_fail(ENOMEM, "out of memory for the mover");
    uint8_t tmp[BS];
    size_t keep = 0;
    for (size_t i = 0; i < n && r == 0; i++) {
        if (preserve_image_block(v, c[i].lba, tmp) < 0) {
            r = -1;
            break;
        }
        /* the version the head maps, checked against its CRC: a damaged block stays in the log
         * (its reads keep failing) rather than reach the image */
        if (lsfs_read_blocks(v, v->head, c[i].lba, 1, buf + keep * BS) == 0) {
            c[keep] = c[i];
            c[keep].data = buf + keep * BS;
            /* an uncompressed entry's crc is the block's own (lsfs_read_blocks just checked
             * it); a compressed one's is its record's */
            c[keep].crc = bm_kind(c[keep].loc) == BM_COMP ? crc32c(c[keep].data, BS)
                                                          : blockmap_get(v->head, c[keep].lba).crc;
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
                seg_info *os = log_seg_find(v, bm_seg(c[i].loc));
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
        return lsfs_fail(EINVAL, "not an image-backend volume: nothing to move");
    if (v->p.readonly)
        return lsfs_fail(EROFS, "volume opened read-only");
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
