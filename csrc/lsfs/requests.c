/* Requests: read, write, zero/trim, flush and block status (extents) of the head or a snapshot.
 *
 * Locks: the vol_* functions take v->lock for their whole duration; vol_write first runs the
 * image back-pressure (image/mover.c), which takes move_lock, ckpt_lock, lock in that order
 * and holds none of them when the write takes v->lock.
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

/* ---------- reads ---------- */

static inline int in_wbuf(vol *v, uint64_t seg, uint64_t off)
{
    return seg == v->active && off >= v->wbase;
}

static int read_bytes(vol *v, uint64_t seg, uint64_t off, void *dst, size_t len)
{
    if (seg == v->active && off + len > v->active_off) /* a map entry past the log's end: damage */
        return lsfs_fail(EBADMSG, "block beyond the end of the log in segment %llu", (unsigned long long)seg);
    if (in_wbuf(v, seg, off)) {
        memcpy(dst, v->wbuf + (off - v->wbase), len);
        return 0;
    }
    seg_info *s = log_seg_find(v, seg);
    if (!s || s->fd < 0 || !s->map)
        return lsfs_fail(EBADMSG, "block refers to missing segment %llu", (unsigned long long)seg);
    if (seg == v->active && off + len > v->wbase) {
        /* straddles file and window: bytes below wbase are in the file */
        size_t a = (size_t)(v->wbase - off);
        memcpy(dst, s->map + off, a);
        memcpy((uint8_t *)dst + a, v->wbuf, len - a);
        return 0;
    }
    uint64_t limit = seg == v->active ? v->written_off : s->file_size;
    if (off + len > limit || off + len > s->map_len)
        return lsfs_fail(EBADMSG, "block beyond the end of segment %llu (truncated file?)", (unsigned long long)seg);
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
            return lsfs_fail(EBADMSG, "corrupt compressed record header in segment %llu at %llu",
                        (unsigned long long)seg, (unsigned long long)off);
        }
        if (read_bytes(v, seg, off + REC_HDR + 4, v->zbuf, plen) < 0)
            return -1;
        if (crc32c(v->zbuf, plen) != e.crc) {
            v->corrupt_reads++;
            return lsfs_fail(EBADMSG, "checksum mismatch in segment %llu at %llu", (unsigned long long)seg,
                        (unsigned long long)off);
        }
        size_t r = ZSTD_decompressDCtx(v->dctx, v->dcache, MAX_COMP_BLOCKS * BS, v->zbuf, plen);
        if (ZSTD_isError(r) || r != (size_t)n * BS) {
            v->corrupt_reads++;
            return lsfs_fail(EBADMSG, "cannot decompress record in segment %llu at %llu",
                        (unsigned long long)seg, (unsigned long long)off);
        }
        v->dcache_loc = key;
    }
    memcpy(dst, v->dcache + (size_t)bm_index(e.loc) * BS, BS);
    return 0;
}

#define FROM_IMAGE UINT64_MAX /* check_blocks' seg for blocks read from the image */

/* Blocks [lba, lba+n) just read into dst, each checked against map's entry CRC, a chunk of CRCs
 * at a time (crc32c_blocks). seg says where they came from, for the message (FROM_IMAGE). */
static int check_blocks(vol *v, const blockmap *map, uint64_t lba, uint64_t n, const uint8_t *dst, uint64_t seg)
{
    uint32_t cc[READ_CHUNK_BLOCKS];
    for (uint64_t c = 0; c < n; c += READ_CHUNK_BLOCKS) {
        uint64_t ce = c + READ_CHUNK_BLOCKS < n ? c + READ_CHUNK_BLOCKS : n;
        crc32c_blocks(dst + c * BS, (size_t)(ce - c), BS, cc);
        for (uint64_t b = c; b < ce; b++)
            if (cc[b - c] != blockmap_get(map, lba + b).crc) {
                v->corrupt_reads++;
                if (seg == FROM_IMAGE)
                    return lsfs_fail(EBADMSG, "checksum mismatch for block %llu (in the image file)",
                                     (unsigned long long)(lba + b));
                return lsfs_fail(EBADMSG, "checksum mismatch for block %llu (segment %llu)",
                                 (unsigned long long)(lba + b), (unsigned long long)seg);
            }
    }
    return 0;
}

/* Blocks [lba, lba+n) that map says are in the image (all of kind BM_IMAGE): one pread, then
 * each block checked against its entry's CRC, so a block changed behind the engine's back
 * (another tool writing image.raw while served) is EIO, never served as garbage. */
static int read_image(vol *v, const blockmap *map, uint64_t lba, uint64_t n, uint8_t *dst)
{
    if (v->image_fd < 0) {
        v->corrupt_reads++;
        return lsfs_fail(EBADMSG, "block %llu is mapped to an image this volume does not have", (unsigned long long)lba);
    }
    if (image_pread(v, dst, (size_t)(n * BS), lba * BS) < 0)
        return -1;
    return check_blocks(v, map, lba, n, dst, FROM_IMAGE);
}

int lsfs_read_blocks(vol *v, const blockmap *map, uint64_t lba, uint64_t n, uint8_t *dst)
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
                if (read_bytes(v, seg, off + (c - i) * BS, dst + c * BS, (size_t)(ce - c) * BS) < 0 ||
                    check_blocks(v, map, lba + c, ce - c, dst + c * BS, seg) < 0)
                    return -1;
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
        return lsfs_fail(ENOMEM, "out of memory");
    v->scratch = n;
    v->scratch_cap = len;
    return 0;
}

static int check_range(vol *v, uint64_t count, uint64_t offset)
{
    if (offset > v->p.size || count > v->p.size - offset)
        return lsfs_fail(EINVAL, "request [%llu, +%llu) beyond the end of the volume (%llu bytes)",
                    (unsigned long long)offset, (unsigned long long)count,
                    (unsigned long long)v->p.size);
    return 0;
}

static int read_locked(vol *v, const blockmap *map, uint8_t *buf, uint64_t count, uint64_t offset)
{
    uint64_t first = offset / BS, last = (offset + count - 1) / BS;
    if (offset % BS == 0 && count % BS == 0)
        return lsfs_read_blocks(v, map, first, count / BS, buf);
    uint8_t tmp[BS];
    uint64_t pos = offset, end = offset + count;
    /* head partial block */
    if (pos % BS) {
        if (lsfs_read_blocks(v, map, first, 1, tmp) < 0)
            return -1;
        uint64_t take = BS - pos % BS;
        if (take > count)
            take = count;
        memcpy(buf, tmp + pos % BS, take);
        pos += take;
    }
    uint64_t mid_end = end - end % BS;
    if (pos < mid_end) {
        if (lsfs_read_blocks(v, map, pos / BS, (mid_end - pos) / BS, buf + (pos - offset)) < 0)
            return -1;
        pos = mid_end;
    }
    if (pos < end) {
        if (lsfs_read_blocks(v, map, last, 1, tmp) < 0)
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
    const blockmap *map = lsfs_map_of(v, id);
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
                if (log_append_record(v, type, F_COMP | more, k, lba + done, gen, &c, 1, v->zbuf,
                                  (uint32_t)cl, &rec_off, &pay) < 0)
                    return -1;
                for (uint32_t b = 0; b < k; b++)
                    if (lsfs_pend_push(v, lba + done + b, 0, (bm_entry){bm_loc(BM_COMP, v->active, rec_off, b), c, gen}) < 0)
                        return -1;
            } else {
                crc32c_blocks(src, k, BS, crcs);
                if (log_append_record(v, type, more, k, lba + done, gen, crcs, k, src, k * BS, &rec_off, &pay) < 0)
                    return -1;
                for (uint32_t b = 0; b < k; b++)
                    if (lsfs_pend_push(v, lba + done + b, 0, (bm_entry){bm_loc(BM_DATA, v->active, pay + (uint64_t)b * BS, 0), crcs[b], gen}) < 0)
                        return -1;
            }
            done += k;
            continue;
        }
        uint32_t k = (uint32_t)(n - done < MAX_REC_BLOCKS ? n - done : MAX_REC_BLOCKS);
        const uint8_t *src = data + done * BS;
        crc32c_blocks(src, k, BS, crcs);
        uint64_t pay;
        if (log_append_record(v, type, (done + k < n || more_after) ? F_MORE : 0, k, lba + done, gen, crcs, k, src,
                          k * BS, NULL, &pay) < 0)
            return -1;
        for (uint32_t b = 0; b < k; b++)
            if (lsfs_pend_push(v, lba + done + b, 0,
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
    if (lsfs_read_blocks(v, v->head, first, 1, v->scratch) < 0)
        return -1;
    if (n > 1 && lsfs_read_blocks(v, v->head, last, 1, v->scratch + (n - 1) * BS) < 0)
        return -1;
    memcpy(v->scratch + offset % BS, buf, count);
    return write_blocks(v, v->scratch, first, n, R_WRITE, v->gen, more_after);
}

int vol_write(vol *v, const void *buf, uint64_t count, uint64_t offset, int fua)
{
    if (v->p.readonly)
        return lsfs_fail(EROFS, "volume opened read-only");
    if (count == 0)
        return 0;
    if (v->image_fd >= 0)
        image_journal_backpressure(v, count);
    pthread_mutex_lock(&v->lock);
    v->requests++;
    int r = check_range(v, count, offset);
    if (r == 0) {
        log_pos before = log_tell(v);
        uint64_t first = offset / BS, last = (offset + count - 1) / BS;
        r = lsfs_request_begin(v, first, last - first + 1, 0);
        if (r == 0)
            r = write_locked(v, buf, count, offset, 0);
        r = lsfs_request_end(v, r, &before);
    }
    if (r == 0 && fua)
        r = log_flush_locked(v);
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
        if (log_append_record(v, trim ? R_TRIM : R_ZERO, n > k ? F_MORE : 0, k, lba, v->gen, NULL, 0,
                          NULL, 0, NULL, NULL) < 0)
            return -1;
        if (lsfs_pend_push(v, lba, k, (bm_entry){bm_loc(trim ? BM_TRIM : BM_ZERO, 0, 0, 0), 0, v->gen}) < 0)
            return -1;
        lba += k;
        n -= k;
    }
    return 0;
}

int vol_zero(vol *v, uint64_t count, uint64_t offset, int fua, int trim)
{
    if (v->p.readonly)
        return lsfs_fail(EROFS, "volume opened read-only");
    if (count == 0)
        return 0;
    pthread_mutex_lock(&v->lock);
    v->requests++;
    int r = check_range(v, count, offset);
    if (r == 0) {
        log_pos before = log_tell(v);
        uint64_t first = offset / BS, last = (offset + count - 1) / BS;
        /* tombstones change only leaves that exist; a zero's partial edge blocks are writes */
        r = lsfs_request_begin(v, first, last - first + 1, 1);
        if (r == 0 && !trim && offset % BS && blockmap_prepare(v->head, first, 1, 0) < 0)
            r = lsfs_fail(ENOMEM, "out of memory for the block map");
        if (r == 0 && !trim && (offset + count) % BS && blockmap_prepare(v->head, last, 1, 0) < 0)
            r = lsfs_fail(ENOMEM, "out of memory for the block map");
        if (r == 0)
            r = zero_locked(v, count, offset, trim);
        r = lsfs_request_end(v, r, &before);
    }
    if (r == 0 && fua)
        r = log_flush_locked(v);
    pthread_mutex_unlock(&v->lock);
    return r;
}

int vol_flush(vol *v)
{
    if (v->p.readonly)
        return 0;
    pthread_mutex_lock(&v->lock);
    int r = log_flush_locked(v);
    pthread_mutex_unlock(&v->lock);
    return r;
}

int vol_snap_extents(vol *v, uint32_t id, uint64_t count, uint64_t offset, uint64_t *out, int max)
{
    if (count == 0 || max <= 0)
        return 0;
    pthread_mutex_lock(&v->lock);
    const blockmap *map = lsfs_map_of(v, id);
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
