/* Map updates and live accounting: the head map's entries, tombstones, a request's pending
 * changes (all or nothing), per-segment live counts, and the leaf set.
 *
 * Locks: takes none; every function runs under the caller's v->lock (or in vol_open).
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

/* ---------- map updates and live accounting ---------- */

void lsfs_live_hook(void *ctx, const bm_leaf *l, int delta)
{
    vol *v = ctx;
    seg_info *g = NULL;
    for (unsigned i = 0; i < BM_LEAF_ENTRIES; i++) {
        unsigned k = bm_kind(l->e[i].loc);
        if (k != BM_DATA && k != BM_COMP)
            continue;
        uint64_t id = bm_seg(l->e[i].loc);
        if (!g || g->id != id)
            g = log_seg_find(v, id); /* neighbours mostly live in one segment */
        if (!g)
            continue;
        if (delta > 0)
            g->live_blocks++;
        else if (g->live_blocks)
            g->live_blocks--;
    }
}

snap *lsfs_snap_find(vol *v, uint32_t id)
{
    for (uint32_t i = 0; i < v->nsnaps; i++)
        if (v->snaps[i].id == id)
            return &v->snaps[i];
    return NULL;
}

blockmap *lsfs_map_of(vol *v, uint32_t id)
{
    if (id == 0)
        return v->head;
    snap *sn = lsfs_snap_find(v, id);
    if (!sn) {
        lsfs_fail(ENOENT, "no snapshot with id %u", id);
        return NULL;
    }
    return sn->map;
}

static void unref_old(vol *v, bm_entry old)
{
    unsigned k = bm_kind(old.loc);
    if (k == BM_DATA || k == BM_COMP) {
        seg_info *g = log_seg_find(v, bm_seg(old.loc));
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
        return lsfs_fail(ENOMEM, "out of memory for the block map");
    unref_old(v, old);
    unsigned k = bm_kind(e.loc);
    if (k == BM_DATA || k == BM_COMP) {
        seg_info *g = log_seg_find(v, bm_seg(e.loc));
        if (g)
            g->live_blocks++;
        v->head_log_blocks++;
    } else if ((k == BM_ZERO || k == BM_TRIM) && v->image_fd >= 0) {
        v->tomb_pending = 1;
        v->tomb_epoch++;
    }
    return 0;
}

int lsfs_map_tombstone(vol *v, uint64_t lba, uint64_t n, unsigned kind, uint32_t gen)
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

int lsfs_pend_push(vol *v, uint64_t lba, uint64_t n, bm_entry e)
{
    if (v->npend == v->pend_cap) {
        size_t cap = v->pend_cap ? v->pend_cap * 2 : 1024;
        struct pend *p = realloc(v->pend, cap * sizeof *p);
        if (!p)
            return lsfs_fail(ENOMEM, "out of memory for a request");
        v->pend = p;
        v->pend_cap = cap;
    }
    v->pend[v->npend++] = (struct pend){lba, n, e};
    return 0;
}

/* Apply the request's map changes. Cannot fail: lsfs_request_begin made every leaf they touch
 * private (blockmap_prepare), and nothing clones the head in between (the lock is held). */
static void pend_apply(vol *v)
{
    for (size_t i = 0; i < v->npend; i++) {
        struct pend *p = &v->pend[i];
        int r = p->n ? lsfs_map_tombstone(v, p->lba, p->n, bm_kind(p->e.loc), p->e.gen) : map_set(v, p->lba, p->e);
        (void)r; /* 0 by construction */
    }
    v->npend = 0;
}

int lsfs_request_begin(vol *v, uint64_t lba, uint64_t n, int tombstone)
{
    v->npend = 0;
    v->req_first = 1;
    if (blockmap_prepare(v->head, lba, n, tombstone) < 0)
        return lsfs_fail(ENOMEM, "out of memory for the block map");
    return 0;
}

int lsfs_request_end(vol *v, int r, const log_pos *before)
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

static size_t leafset_slot(const leafset *ls, const bm_leaf *l)
{
    size_t h = ((uintptr_t)l >> 4) * 0x9E3779B97F4A7C15ull;
    size_t i = h & (ls->cap - 1);
    while (ls->keys[i] && ls->keys[i] != l)
        i = (i + 1) & (ls->cap - 1);
    return i;
}

int lsfs_leafset_init(leafset *ls, size_t expect)
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
        return lsfs_fail(ENOMEM, "out of memory");
    }
    return 0;
}

int lsfs_leafset_add(leafset *ls, const bm_leaf *l, uint32_t *val)
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

void lsfs_leafset_free(leafset *ls)
{
    free(ls->keys);
    free(ls->vals);
}
