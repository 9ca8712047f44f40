/* Copy-on-write radix block map. See blockmap.h for the design notes. */
#include "blockmap.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>

blockmap *blockmap_new(uint64_t nblocks)
{
    blockmap *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->nblocks = nblocks;
    m->nmids = (nblocks + ((uint64_t)BM_LEAF_ENTRIES * BM_MID_ENTRIES) - 1) >>
               (BM_LEAF_SHIFT + BM_MID_SHIFT);
    if (m->nmids == 0)
        m->nmids = 1;
    m->mid = calloc(m->nmids, sizeof *m->mid);
    if (!m->mid) {
        free(m);
        errno = ENOMEM;
        return NULL;
    }
    return m;
}

blockmap *blockmap_clone(const blockmap *m)
{
    blockmap *c = blockmap_new(m->nblocks);
    if (!c)
        return NULL;
    for (uint64_t i = 0; i < m->nmids; i++) {
        c->mid[i] = m->mid[i];
        if (c->mid[i])
            c->mid[i]->refs++;
    }
    c->nleaves = m->nleaves;
    c->hooks = m->hooks;
    return c;
}

static void leaf_put(const bm_hooks *hk, bm_leaf *l)
{
    if (l && --l->refs == 0) {
        if (hk)
            hk->leaf(hk->ctx, l, -1);
        free(l);
    }
}

static void mid_put(const bm_hooks *hk, bm_mid *md)
{
    if (!md || --md->refs)
        return;
    for (unsigned i = 0; i < BM_MID_ENTRIES; i++)
        leaf_put(hk, md->leaf[i]);
    free(md);
}

void blockmap_free(blockmap *m)
{
    if (!m)
        return;
    for (uint64_t i = 0; i < m->nmids; i++)
        mid_put(m->hooks, m->mid[i]);
    free(m->mid);
    free(m);
}

bm_entry blockmap_get(const blockmap *m, uint64_t lba)
{
    bm_entry z = {0, 0, 0};
    const bm_mid *md = m->mid[lba >> (BM_LEAF_SHIFT + BM_MID_SHIFT)];
    if (!md)
        return z;
    const bm_leaf *l = md->leaf[(lba >> BM_LEAF_SHIFT) & (BM_MID_ENTRIES - 1)];
    if (!l)
        return z;
    return l->e[lba & (BM_LEAF_ENTRIES - 1)];
}

const bm_leaf *blockmap_leaf(const blockmap *m, uint64_t li)
{
    uint64_t mi = li >> BM_MID_SHIFT;
    if (mi >= m->nmids || !m->mid[mi])
        return NULL;
    return m->mid[mi]->leaf[li & (BM_MID_ENTRIES - 1)];
}

uint64_t blockmap_next_leaf(const blockmap *m, uint64_t li)
{
    for (uint64_t mi = li >> BM_MID_SHIFT; mi < m->nmids; mi++) {
        const bm_mid *md = m->mid[mi];
        if (!md) {
            li = (mi + 1) << BM_MID_SHIFT;
            continue;
        }
        for (uint64_t j = li & (BM_MID_ENTRIES - 1); j < BM_MID_ENTRIES; j++)
            if (md->leaf[j])
                return (mi << BM_MID_SHIFT) | j;
        li = (mi + 1) << BM_MID_SHIFT;
    }
    return UINT64_MAX;
}

/* Return a privately owned (refs == 1) leaf slot for writing, copying shared nodes. */
static bm_leaf *writable_leaf(blockmap *m, uint64_t lba)
{
    uint64_t mi = lba >> (BM_LEAF_SHIFT + BM_MID_SHIFT);
    unsigned li = (lba >> BM_LEAF_SHIFT) & (BM_MID_ENTRIES - 1);
    bm_mid *md = m->mid[mi];
    if (!md) {
        md = calloc(1, sizeof *md);
        if (!md)
            goto nomem;
        md->refs = 1;
        m->mid[mi] = md;
    } else if (md->refs > 1) {
        bm_mid *c = malloc(sizeof *c);
        if (!c)
            goto nomem;
        memcpy(c, md, sizeof *c);
        c->refs = 1;
        for (unsigned i = 0; i < BM_MID_ENTRIES; i++)
            if (c->leaf[i])
                c->leaf[i]->refs++;
        md->refs--;
        m->mid[mi] = md = c;
    }
    bm_leaf *l = md->leaf[li];
    if (!l) {
        l = calloc(1, sizeof *l);
        if (!l)
            goto nomem;
        l->refs = 1;
        md->leaf[li] = l;
        m->nleaves++;
    } else if (l->refs > 1) {
        bm_leaf *c = malloc(sizeof *c);
        if (!c)
            goto nomem;
        memcpy(c, l, sizeof *c);
        c->refs = 1;
        l->refs--;
        md->leaf[li] = l = c;
        if (m->hooks)
            m->hooks->leaf(m->hooks->ctx, c, +1);
    }
    return l;
nomem:
    errno = ENOMEM;
    return NULL;
}

int blockmap_prepare(blockmap *m, uint64_t lba, uint64_t n, int existing_only)
{
    if (n == 0)
        return 0;
    uint64_t li = lba >> BM_LEAF_SHIFT, last = (lba + n - 1) >> BM_LEAF_SHIFT;
    while (li <= last) {
        if (existing_only) {
            li = blockmap_next_leaf(m, li);
            if (li == UINT64_MAX || li > last)
                return 0;
        }
        if (!writable_leaf(m, li << BM_LEAF_SHIFT))
            return -1;
        li++;
    }
    return 0;
}

int blockmap_set(blockmap *m, uint64_t lba, bm_entry e, bm_entry *old)
{
    bm_leaf *l = writable_leaf(m, lba);
    if (!l)
        return -1;
    bm_entry *p = &l->e[lba & (BM_LEAF_ENTRIES - 1)];
    if (old)
        *old = *p;
    *p = e;
    if (e.gen > l->maxgen)
        l->maxgen = e.gen;
    bm_mid *md = m->mid[lba >> (BM_LEAF_SHIFT + BM_MID_SHIFT)];
    if (e.gen > md->maxgen)
        md->maxgen = e.gen;
    return 0;
}

bm_leaf *blockmap_leaf_new(const bm_entry *entries)
{
    bm_leaf *l = malloc(sizeof *l);
    if (!l) {
        errno = ENOMEM;
        return NULL;
    }
    l->refs = 0;
    memcpy(l->e, entries, sizeof l->e);
    l->maxgen = 0;
    for (unsigned i = 0; i < BM_LEAF_ENTRIES; i++)
        if (entries[i].gen > l->maxgen)
            l->maxgen = entries[i].gen;
    return l;
}

void blockmap_leaf_discard(bm_leaf *l)
{
    if (l && l->refs == 0)
        free(l);
}

int blockmap_attach_leaf(blockmap *m, uint64_t li, bm_leaf *l)
{
    uint64_t mi = li >> BM_MID_SHIFT;
    if (mi >= m->nmids) {
        errno = EINVAL;
        return -1;
    }
    bm_mid *md = m->mid[mi];
    if (!md) {
        md = calloc(1, sizeof *md);
        if (!md) {
            errno = ENOMEM;
            return -1;
        }
        md->refs = 1;
        m->mid[mi] = md;
    }
    bm_leaf **slot = &md->leaf[li & (BM_MID_ENTRIES - 1)];
    if (*slot) {
        errno = EEXIST;
        return -1;
    }
    *slot = l;
    l->refs++;
    m->nleaves++;
    if (l->maxgen > md->maxgen)
        md->maxgen = l->maxgen;
    return 0;
}

int blockmap_relocate(blockmap *m, uint64_t lba, uint64_t expect_loc, uint64_t new_loc)
{
    return blockmap_relocate_crc(m, lba, expect_loc, new_loc, 0, 0);
}

int blockmap_relocate_crc(blockmap *m, uint64_t lba, uint64_t expect_loc, uint64_t new_loc, int set_crc,
                          uint32_t crc)
{
    bm_mid *md = m->mid[lba >> (BM_LEAF_SHIFT + BM_MID_SHIFT)];
    if (!md)
        return 0;
    bm_leaf *l = md->leaf[(lba >> BM_LEAF_SHIFT) & (BM_MID_ENTRIES - 1)];
    if (!l)
        return 0;
    bm_entry *p = &l->e[lba & (BM_LEAF_ENTRIES - 1)];
    if (p->loc != expect_loc)
        return 0;
    p->loc = new_loc;
    if (set_crc)
        p->crc = crc;
    return 1;
}
