/* Snapshots: uuids, SNAP/SNAPDEL records, create/delete/list, diff and pinned bytes (FORMAT.md §5, §8).
 *
 * Locks: the vol_* functions take v->lock for their whole duration; the static helpers run
 * under it.
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
            return lsfs_fail(errno, "cannot generate a snapshot uuid: getrandom: %s", strerror(errno));
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
        return lsfs_fail(ENOMEM, "out of memory for snapshots");
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

int lsfs_snap_add(vol *v, uint32_t id, uint32_t gen, uint64_t created, const char *name,
                    const uint8_t *uuid, uint32_t flags, blockmap *map)
{
    if (snaps_reserve(v) < 0)
        return -1;
    blockmap *clone = map ? map : blockmap_clone(v->head);
    if (!clone)
        return lsfs_fail(ENOMEM, "out of memory for a snapshot");
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

void lsfs_snap_remove(vol *v, uint32_t id)
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
    return log_append_record(v, type, 0, 0, 0, gen, &c, 1, payload, plen, NULL, NULL);
}

int vol_snap_create(vol *v, const char *name, uint64_t created_ns, const uint8_t *uuid, uint32_t flags,
                    uint32_t *id_out)
{
    if (v->p.readonly)
        return lsfs_fail(EROFS, "volume opened read-only");
    size_t nl = strlen(name);
    if (!snap_name_ok(name))
        return lsfs_fail(EINVAL, "snapshot name must be 1 to %d of A-Z a-z 0-9 . _ -", VOL_SNAP_NAME_MAX);
    if (uuid && uuid_is_nil(uuid))
        return lsfs_fail(EINVAL, "the nil uuid cannot identify a snapshot");
    pthread_mutex_lock(&v->lock);
    int r = -1;
    blockmap *clone = NULL;
    uint8_t u[16];
    char us[37];
    for (uint32_t i = 0; i < v->nsnaps; i++)
        if (strcmp(v->snaps[i].name, name) == 0) {
            lsfs_fail(EEXIST, "a snapshot named %s already exists", name);
            goto out;
        }
    if (uuid) {
        memcpy(u, uuid, 16);
        snap *dup = snap_find_uuid(v, u);
        if (dup) {
            uuid_format(u, us);
            lsfs_fail(EEXIST, "a snapshot with uuid %s already exists (named %s)", us, dup->name);
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
    if (log_flush_locked(v) < 0)
        goto out;
    if (snaps_reserve(v) < 0)
        goto out;
    if (!(clone = blockmap_clone(v->head))) {
        lsfs_fail(ENOMEM, "out of memory for a snapshot");
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
    lsfs_snap_add(v, id, gen, created_ns, name, u, flags, clone); /* cannot fail: room and map are ready */
    clone = NULL;
    v->snaps[v->nsnaps - 1].map->hooks = &v->hooks;
    v->gen = gen + 1;
    if (log_sync_all(v) < 0) {
        int e = errno;
        char why[200];
        snprintf(why, sizeof why, "%.199s", vol_errmsg());
        if (log_rewind(v, &before)) {
            lsfs_snap_remove(v, id);
            v->gen = gen;
            v->next_snap_id = id;
            lsfs_fail(e, "%s (snapshot %s not made)", why, name);
        } else {
            uint8_t d[SNAPDEL_PAYLOAD] = {0};
            put32(d, id);
            if (append_snap_record(v, R_SNAPDEL, d, SNAPDEL_PAYLOAD, v->gen) == 0) {
                lsfs_snap_remove(v, id);
                lsfs_fail(e, "%s (snapshot %s not made; its record may have reached the disk, and until the "
                        "volume is reopened its deletion cannot be made durable: after a crash the "
                        "snapshot may be there)", why, name);
            } else {
                lsfs_fail(e, "%s (snapshot %s was made but is not durable yet: a later flush makes it so)",
                     why, name);
            }
        }
        goto out;
    }
    (void)log_flush_locked(v); /* the marker: a hint only; if it fails the next flush writes one */
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
        return lsfs_fail(EROFS, "volume opened read-only");
    pthread_mutex_lock(&v->lock);
    int r = -1;
    if (!lsfs_snap_find(v, id)) {
        lsfs_fail(ENOENT, "no snapshot with id %u", id);
        goto out;
    }
    /* As in create: earlier writes flushed first, the record, a sync; the snapshot goes from
     * memory only once its deletion is durable. If the sync fails while the record is still only
     * in the window it is taken back (nothing changed); if it may be in the file the deletion
     * is completed in memory too (memory never disagrees with the log) and the error says so. */
    if (log_flush_locked(v) < 0)
        goto out;
    uint8_t p[SNAPDEL_PAYLOAD] = {0};
    put32(p, id);
    log_pos before = log_tell(v);
    if (append_snap_record(v, R_SNAPDEL, p, SNAPDEL_PAYLOAD, v->gen) < 0)
        goto out;
    if (log_sync_all(v) < 0) {
        int e = errno;
        char why[200];
        snprintf(why, sizeof why, "%.199s", vol_errmsg());
        if (log_rewind(v, &before)) {
            lsfs_fail(e, "%s (snapshot not deleted)", why);
        } else {
            lsfs_snap_remove(v, id);
            lsfs_fail(e, "%s (the snapshot is deleted, but its deletion is not durable yet)", why);
        }
        goto out;
    }
    lsfs_snap_remove(v, id);
    (void)log_flush_locked(v);
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
        return lsfs_fail(EINVAL, "granularity must be a power of two >= 4096");
    pthread_mutex_lock(&v->lock);
    int n = -1;
    uint32_t from_gen = 0, to_gen;
    if (from_id != VOL_SNAP_NONE) {
        snap *f = lsfs_snap_find(v, from_id);
        if (!f) {
            lsfs_fail(ENOENT, "no snapshot with id %u", from_id);
            goto out;
        }
        from_gen = f->gen;
    }
    const blockmap *map = lsfs_map_of(v, to_id);
    if (!map)
        goto out;
    to_gen = to_id ? lsfs_snap_find(v, to_id)->gen : v->gen;
    if (from_gen > to_gen) {
        lsfs_fail(EINVAL, "the first snapshot must be older than the second");
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
        lsfs_fail(ENOENT, "no snapshot with id %u", id);
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
