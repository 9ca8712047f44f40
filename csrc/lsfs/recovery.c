/* Recovery: replay of the log after the checkpoint (torn tails, damage, pending requests),
 * applying records to the maps, and the live recount (FORMAT.md §3, §7).
 *
 * Locks: none; runs only inside vol_open, when no other thread knows v.
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

/* ---------- recovery ---------- */

static int apply_rec(vol *v, uint64_t seg, size_t pos, const log_rec *r)
{
    if (r->type == R_WRITE || r->type == R_RELOC) {
        log_seg_find(v, seg)->total_blocks += r->nblocks;
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
                return lsfs_fail(ENOMEM, "out of memory during recovery");
        }
    } else if (r->type == R_ZERO || r->type == R_TRIM) {
        if (lsfs_map_tombstone(v, r->lba, r->nblocks, r->type == R_ZERO ? BM_ZERO : BM_TRIM, r->gen) < 0)
            return -1;
    } else if (r->type == R_SNAP) {
        const uint8_t *p = r->payload;
        uint32_t nl = get32(p + 16);
        char name[VOL_SNAP_NAME_MAX + 1] = {0};
        memcpy(name, p + 20, nl > VOL_SNAP_NAME_MAX ? VOL_SNAP_NAME_MAX : nl);
        int v1 = r->plen == SNAP_V1_PAYLOAD; /* no flags, no uuid: derived (lsfs_snap_add) */
        if (lsfs_snap_add(v, get32(p), get32(p + 4), get64(p + 8), name, v1 ? NULL : p + 96, v1 ? 0 : get32(p + 84),
                     NULL) < 0)
            return -1;
        v->gen = get32(p + 4) + 1;
        return 0;
    } else if (r->type == R_SNAPDEL) {
        lsfs_snap_remove(v, get32(r->payload));
        return 0;
    }
    if (r->gen > v->gen)
        v->gen = r->gen;
    return 0;
}

static int open_segment_file(vol *v, uint64_t id, log_segmap *out)
{
    char name[32];
    log_seg_name(name, id);
    int fd = io_openat(v->segdirfd, name, (v->p.readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOFOLLOW, 0);
    if (fd < 0)
        return lsfs_fail(errno, "opening segment %s: %s%s", name, strerror(errno),
                    errno == ELOOP ? " (a symbolic link: refused)" : "");
    if (!log_seg_add(v, id)) {
        close(fd);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return lsfs_fail(e, "stat of segment %s: %s", name, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return lsfs_fail(EBADMSG, "segment %s is not a regular file", name);
    }
    log_seg_find(v, id)->fd = fd;
    log_seg_find(v, id)->file_size = (uint64_t)st.st_size;
    if (log_seg_map(v, id) < 0) {
        log_seg_find(v, id)->fd = -1;
        close(fd);
        return -1;
    }
    out->id = id;
    out->len = (size_t)st.st_size;
    out->d = NULL;
    return 0;
}

int lsfs_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int truncate_seg(vol *v, log_segmap *sm, size_t pos, vol_report *rep)
{
    rep->torn_bytes_dropped += sm->len - pos;
    if (v->p.readonly) { /* leave the files alone: only this process's view ends there */
        if (pos <= SEG_HDR) {
            seg_info *g = log_seg_find(v, sm->id);
            if (g->map)
                munmap(g->map, g->map_len);
            close(g->fd);
            *g = (seg_info){.id = sm->id, .fd = -1};
        } else {
            log_seg_find(v, sm->id)->file_size = pos;
        }
        sm->len = pos;
        return 0;
    }
    if (pos <= SEG_HDR) {
        /* nothing valid in it: delete the file */
        log_seg_retire(v, sm->id, 0);
        rep->segments_deleted++;
    } else {
        if (io_ftruncate(log_seg_find(v, sm->id)->fd, pos) < 0)
            return lsfs_fail(errno, "truncating torn segment: %s", strerror(errno));
        log_seg_find(v, sm->id)->file_size = pos;
        /* synced before vol_open returns (log_sync_all): otherwise a power cut could bring the
         * dropped tail back after newer segments hold durable records, and recovery, meeting
         * damage with no durable marker after it, would drop those too (found by ACE, image) */
        log_seg_find(v, sm->id)->needs_sync = 1;
    }
    sm->len = pos;
    v->dir_dirty = 1;
    return 0;
}

int lsfs_replay(vol *v, uint64_t *ids, size_t nids, uint64_t rseg, uint64_t roff, vol_report *rep)
{
    log_segmap *sm = calloc(nids ? nids : 1, sizeof *sm);
    if (!sm)
        return lsfs_fail(ENOMEM, "out of memory");
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
            sm[i].d = mmap(NULL, sm[i].len, PROT_READ, MAP_PRIVATE, log_seg_find(v, sm[i].id)->fd, 0);
            if (sm[i].d == MAP_FAILED) {
                sm[i].d = NULL;
                r = lsfs_fail(errno, "mapping segment: %s", strerror(errno));
                goto out;
            }
        }
    }
    /* pending records of a multi-record request: applied once its last record arrives */
    struct { size_t si, pos; log_rec r; } *pend = NULL;
    size_t npend = 0, pend_cap = 0;
    size_t resume_si = 0, start_pos = (nsm && sm[0].id == rseg) ? roff : SEG_HDR;
    for (size_t si = 0; si < nsm; si++) {
        log_segmap *s = &sm[si];
        uint8_t *h = s->d;
        if (s->len >= SEG_HDR && get32(h) == SEG_MAGIC && crc32c(h + 8, SEG_HDR - 8) == get32(h + 4) &&
            memcmp(h + 16, v->p.uuid, 16) != 0) {
            r = lsfs_fail(EBADMSG, "segment %016llx.seg belongs to another volume; refusing to open",
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
            if (!log_find_marker_after(v->uuid8, v->nblocks, sm, nsm, si, SEG_HDR, v->next_seq - 1, &fsi, &fpos)) {
                for (size_t k = si; k < nsm; k++)
                    if (truncate_seg(v, &sm[k], SEG_HDR, rep) < 0) { r = -1; goto out_pend; }
                break;
            }
            r = lsfs_fail(EBADMSG, "segment %016llx.seg has a bad header (foreign or damaged file)",
                     (unsigned long long)s->id);
            goto out_pend;
        }
        size_t pos = s->id == rseg || si == resume_si ? start_pos : SEG_HDR;
        if (pos < SEG_HDR)
            pos = SEG_HDR;
        while (pos < s->len) {
            log_rec rc;
            int hdr_ok = log_parse_rec(v->uuid8, v->nblocks, s->d, s->len, pos, &rc) && rc.seq == v->next_seq;
            int data_ok = hdr_ok && log_rec_data_ok(&rc);
            if (!data_ok) {
                size_t fsi, fpos;
                size_t from = hdr_ok ? pos + rc.len : pos + 1;
                int marker = log_find_marker_after(v->uuid8, v->nblocks, sm, nsm, si, from, hdr_ok ? rc.seq : v->next_seq - 1, &fsi, &fpos);
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
                    log_rec nr;
                    log_parse_rec(v->uuid8, v->nblocks, sm[fsi].d, sm[fsi].len, fpos, &nr);
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
                    if (!n) { r = lsfs_fail(ENOMEM, "out of memory"); goto out_pend; }
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

int lsfs_recount_live(vol *v)
{
    for (size_t i = 0; i < v->nsegs; i++)
        v->segs[i].live_blocks = 0;
    leafset ls;
    if (lsfs_leafset_init(&ls, total_leaves(v)) < 0)
        return -1;
    for (uint32_t m = 0; m <= v->nsnaps; m++) {
        blockmap *map = m ? v->snaps[m - 1].map : v->head;
        for (uint64_t li = blockmap_next_leaf(map, 0); li != UINT64_MAX; li = blockmap_next_leaf(map, li + 1)) {
            uint32_t idx;
            const bm_leaf *l = blockmap_leaf(map, li);
            if (lsfs_leafset_add(&ls, l, &idx))
                lsfs_live_hook(v, l, +1);
        }
    }
    lsfs_leafset_free(&ls);
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
