/* The collector: pick a sealed segment worth collecting and move its live blocks to the head
 * of the log as RELOC records.
 *
 * Locks: vol_gc_pick takes v->lock; vol_gc_segment takes v->lock to start and end, reads the
 * victim without it, and takes ckpt_lock then v->lock around each record moved. Order: ckpt_lock, lock.
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
            seg_info *os = log_seg_find(v, bm_seg(old_loc)), *ns = log_seg_find(v, bm_seg(new_loc));
            if (os && os->live_blocks)
                os->live_blocks--;
            if (ns)
                ns->live_blocks++;
        }
}

int vol_gc_segment(vol *v, uint64_t seg)
{
    if (v->p.readonly)
        return lsfs_fail(EROFS, "volume opened read-only");
    pthread_mutex_lock(&v->lock);
    seg_info *victim = log_seg_find(v, seg);
    if (!victim || victim->fd < 0 || seg == v->active || v->gc_busy) {
        pthread_mutex_unlock(&v->lock);
        return lsfs_fail(EINVAL, "segment %llu is not a sealed segment (or a collection is running)",
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
        return lsfs_fail(len ? merr : EINVAL, "mapping segment %llu for collection: %s", (unsigned long long)seg,
                    len ? strerror(merr) : "empty");
    }
    int r = 0;
    size_t pos = SEG_HDR;
    uint32_t crcs[MAX_REC_BLOCKS];
    while (pos < len) {
        log_rec rc;
        if (!log_parse_rec(v->uuid8, v->nblocks, d, len, pos, &rc))
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
                if (log_append_record(v, R_RELOC, F_COMP, rc.nblocks, rc.lba, rc.gen, &c, 1, rc.payload,
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
                if (log_append_record(v, R_RELOC, 0, k, rc.lba + s, rc.gen, crcs, k,
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
