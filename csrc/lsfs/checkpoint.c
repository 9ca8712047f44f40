/* Checkpoints: freeze clones of the maps, write checkpoint.tmp without the lock, commit; and
 * loading one at open (FORMAT.md §6).
 *
 * Locks: vol_checkpoint takes ckpt_lock for its whole duration and v->lock inside it, twice
 * (freeze, commit); the sync and write between run with ckpt_lock only. Order: ckpt_lock, lock.
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
    if (!w->err && w->len && log_full_pwrite(w->fd, w->buf, w->len, w->off) < 0)
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
        return lsfs_fail(EROFS, "volume opened read-only");
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
    if (v->sync_err || log_flush_wbuf(v) < 0) {
        if (v->sync_err)
            log_sync_failed(v);
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
        return lsfs_fail(ENOMEM, "out of memory for a checkpoint");
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
        return lsfs_fail(err, "syncing segments for a checkpoint: %s", strerror(err));
    }

    /* Number the distinct leaves (shared leaves are written once, FORMAT.md §4). */
    leafset ls;
    if (lsfs_leafset_init(&ls, leaves_hint) < 0) {
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
            if (lsfs_leafset_add(&ls, l, &idx)) {
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
                lsfs_leafset_add(&ls, blockmap_leaf(maps[m], li), &idx);
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
    lsfs_leafset_free(&ls);
    free(order);
    free(order_li);
    free(meta);
    free(segtab);
    free_clones(v, maps, nmaps);
    if (err) {
        free(dead);
        (void)io_unlinkat(v->dirfd, "checkpoint.tmp"); /* or the next open deletes it */
        return lsfs_fail(err, "writing checkpoint: %s", strerror(err));
    }
    pthread_mutex_lock(&v->lock);
    v->since_ckpt -= since;
    v->ckpt_size = size;
    for (uint64_t i = 0; i < ndead; i++) /* dead when frozen: no checkpoint needs them now */
    {
        seg_info *g = log_seg_find(v, dead[i]);
        if (g && g->fd >= 0 && g->live_blocks == 0 && dead[i] != v->gc_busy)
            log_seg_retire(v, dead[i], 1);
    }
    pthread_mutex_unlock(&v->lock);
    free(dead);
    return 0;
}

int lsfs_load_checkpoint(vol *v, uint64_t *rseg, uint64_t *roff)
{
    int fd = io_openat(v->dirfd, "checkpoint", O_RDONLY | O_CLOEXEC | O_NOFOLLOW, 0);
    if (fd < 0) {
        if (errno == ENOENT)
            return 1;
        return lsfs_fail(errno, "opening checkpoint: %s", strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return lsfs_fail(errno, "stat checkpoint: %s", strerror(errno));
    }
    size_t len = (size_t)st.st_size;
    uint8_t *d = len ? mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    close(fd);
    if (d == MAP_FAILED)
        return lsfs_fail(EBADMSG, "checkpoint is empty or unreadable");
    int r = -1;
    bm_leaf **leaves = NULL;
    uint64_t nl = 0;
    size_t leaf_rec = 8 + sizeof(((bm_leaf *)0)->e);
    if (len < 64 + 8 + 4 || get32(d) != CKPT_MAGIC) {
        lsfs_fail(EBADMSG, "checkpoint is corrupt (bad magic or too short)");
        goto out;
    }
    uint32_t version = get32(d + 4);
    if (version != CKPT_VERSION && version != 2) {
        lsfs_fail(EPROTO, "checkpoint has unsupported version %u", version);
        goto out;
    }
    size_t mhlen = version == 2 ? CKPT_V2_MAP_HDR : CKPT_MAP_HDR;
    if (memcmp(d + 8, v->p.uuid, 16) != 0) {
        lsfs_fail(EBADMSG, "checkpoint belongs to another volume (uuid mismatch)");
        goto out;
    }
    if (crc32c(d, len - 4) != get32(d + len - 4)) {
        lsfs_fail(EBADMSG, "checkpoint is corrupt (checksum mismatch)");
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
        lsfs_fail(EBADMSG, "checkpoint is corrupt (header)");
        goto out;
    }
    for (uint32_t i = 0; i < nsegs; i++, pos += 16) {
        uint64_t id = get64(d + pos);
        seg_info *g = id > SEG_ID_MAX || id == 0 ? NULL : log_seg_add(v, id);
        if (!g) {
            lsfs_fail(EBADMSG, "checkpoint is corrupt (segment id)");
            goto out;
        }
        g->total_blocks = get64(d + pos + 8);
        if (id > v->max_seen_id)
            v->max_seen_id = id;
    }
    nl = get64(d + pos);
    pos += 8;
    if (nl > (end - pos) / leaf_rec) {
        lsfs_fail(EBADMSG, "checkpoint is corrupt (leaf table)");
        goto out;
    }
    uint64_t maxleaf = (v->nblocks + BM_LEAF_ENTRIES - 1) >> BM_LEAF_SHIFT;
    leaves = calloc(nl ? nl : 1, sizeof *leaves);
    uint64_t *lis = calloc(nl ? nl : 1, sizeof *lis);
    if (!leaves || !lis) {
        free(lis);
        lsfs_fail(ENOMEM, "out of memory loading checkpoint");
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
                lsfs_fail(EBADMSG, "checkpoint is corrupt (leaf beyond the volume)");
            else
                lsfs_fail(ENOMEM, "out of memory loading checkpoint");
            goto out;
        }
    }
    for (uint32_t m = 0; m < nmaps; m++) {
        if (mhlen > end - pos) {
            free(lis);
            lsfs_fail(EBADMSG, "checkpoint is corrupt (map header)");
            goto out;
        }
        const uint8_t *mh = d + pos;
        uint32_t id = get32(mh), mgen = get32(mh + 4), namelen = get32(mh + 16);
        uint64_t cnt = get64(mh + 88);
        uint32_t mflags = version == 2 ? 0 : get32(mh + 84);
        const uint8_t *muuid = version == 2 ? NULL : mh + 96; /* NULL, nil: derived (lsfs_snap_add) */
        pos += mhlen;
        if ((m == 0) != (id == 0) || namelen > VOL_SNAP_NAME_MAX || cnt > (end - pos) / 4) {
            free(lis);
            lsfs_fail(EBADMSG, "checkpoint is corrupt (map %u)", m);
            goto out;
        }
        blockmap *map = v->head;
        if (!m)
            v->tomb_pending = (mflags & CKPT_HEAD_TOMB_PENDING) != 0;
        if (m) {
            char name[VOL_SNAP_NAME_MAX + 1] = {0};
            memcpy(name, mh + 20, namelen);
            blockmap *sm = blockmap_new(v->nblocks);
            if (!sm || lsfs_snap_add(v, id, mgen, get64(mh + 8), name, muuid, mflags, sm) < 0) {
                blockmap_free(sm);
                free(lis);
                lsfs_fail(ENOMEM, "out of memory loading checkpoint");
                goto out;
            }
            map = sm;
        }
        for (uint64_t k = 0; k < cnt; k++, pos += 4) {
            uint32_t idx = get32(d + pos);
            if (idx >= nl || blockmap_attach_leaf(map, lis[idx], leaves[idx]) < 0) {
                free(lis);
                lsfs_fail(EBADMSG, "checkpoint is corrupt (leaf reference)");
                goto out;
            }
        }
    }
    free(lis);
    if (pos != end) {
        lsfs_fail(EBADMSG, "checkpoint is corrupt (trailing bytes)");
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
