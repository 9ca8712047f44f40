/* The log writer: the segment table, the write window (flush_wbuf), record appends, rotation,
 * segment creation and recycling (the pool), syncs and FLUSH markers (docs/FORMAT.md §2-3).
 *
 * Locks: every function here runs under v->lock (the caller's), except vol_pool_trim,
 * which takes it.
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

/* ---------- segment table ---------- */

/* The segment table is a dense array sorted by id, searched by bisection (the newest, the
 * active segment, first): its memory follows the segments that exist, not the highest id the
 * log ever used (a long-lived volume, or a hostile file name such as 000000000fffffff.seg). */
size_t log_seg_lower_bound(const vol *v, uint64_t id)
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

seg_info *log_seg_find(vol *v, uint64_t id)
{
    if (v->nsegs && v->segs[v->nsegs - 1].id == id)
        return &v->segs[v->nsegs - 1];
    size_t lo = log_seg_lower_bound(v, id);
    return lo < v->nsegs && v->segs[lo].id == id ? &v->segs[lo] : NULL;
}

seg_info *log_seg_add(vol *v, uint64_t id)
{
    seg_info *f = log_seg_find(v, id);
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
            lsfs_fail(ENOMEM, "out of memory for the segment table");
            return NULL;
        }
        v->segs = n;
        v->nsegs_cap = cap;
    }
    size_t lo = log_seg_lower_bound(v, id);
    memmove(&v->segs[lo + 1], &v->segs[lo], (v->nsegs - lo) * sizeof *v->segs);
    v->segs[lo] = (seg_info){.id = id, .fd = -1};
    v->nsegs++;
    return &v->segs[lo];
}

void log_seg_name(char *buf, uint64_t id) { snprintf(buf, 32, "%016llx.seg", (unsigned long long)id); }

int log_full_pwrite(int fd, const void *buf, size_t len, uint64_t off)
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


int log_flush_wbuf(vol *v)
{
    uint64_t end = v->wbase + v->wbuf_len;
    if (v->written_off >= end)
        return 0;
    size_t from = (size_t)(v->written_off - v->wbase);
    if (log_full_pwrite(log_active_seg(v)->fd, v->wbuf + from, (size_t)(end - v->written_off), v->written_off) < 0)
        return lsfs_fail(errno, "writing segment %llu: %s", (unsigned long long)v->active, strerror(errno));
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
        log_full_pwrite(log_active_seg(v)->fd, v->wbuf + from, (size_t)(end - v->written_off), v->written_off) < 0)
        return lsfs_fail(errno, "writing segment %llu: %s", (unsigned long long)v->active, strerror(errno));
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

int log_seg_map(vol *v, uint64_t id)
{
    seg_info *s = log_seg_find(v, id);
    s->map_len = seg_map_len(v, s->file_size);
    void *m = mmap(NULL, s->map_len, PROT_READ, MAP_SHARED, s->fd, 0);
    if (m == MAP_FAILED) {
        s->map = NULL;
        return lsfs_fail(errno, "mapping segment %llu: %s", (unsigned long long)id, strerror(errno));
    }
    s->map = m;
    return 0;
}

void log_seg_retire(vol *v, uint64_t id, int recycle)
{
    seg_info *s = log_seg_find(v, id);
    if (!s)
        return;
    char name[32], fname[32];
    log_seg_name(name, id);
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

int log_create_segment(vol *v, uint64_t id)
{
    char name[32];
    if (id > SEG_ID_MAX) /* a map entry holds 28 bits of segment id (blockmap.h) */
        return lsfs_fail(EFBIG, "no segment id left after %016llx.seg (the last one, %llu): a misnamed file, "
                    "or a log that used them all (then copy the volume to a new one)",
                    (unsigned long long)(id - 1), (unsigned long long)SEG_ID_MAX);
    if (!log_seg_add(v, id))
        return -1;
    log_seg_name(name, id);
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
        return lsfs_fail(errno, "creating segment %s: %s", name, strerror(errno));
    uint8_t h[SEG_HDR] = {0};
    put32(h, SEG_MAGIC);
    h[8] = 1;
    put32(h + 12, (uint32_t)id);
    memcpy(h + 16, v->p.uuid, 16);
    put64(h + 32, v->next_seq);
    put32(h + 4, crc32c(h + 8, SEG_HDR - 8));
    if (log_full_pwrite(fd, h, SEG_HDR, 0) < 0) {
        int e = errno;
        close(fd);
        (void)io_unlinkat(v->segdirfd, name);
        return lsfs_fail(e, "writing segment header %s: %s", name, strerror(e));
    }
    *log_seg_find(v, id) = (seg_info){.id = id, .fd = fd, .needs_sync = 1};
    if (log_seg_map(v, id) < 0) {
        int e = errno;
        close(fd);
        *log_seg_find(v, id) = (seg_info){.id = id, .fd = -1};
        (void)io_unlinkat(v->segdirfd, name);
        return lsfs_fail(e, "mapping segment %s: %s", name, strerror(e));
    }
    v->active = id;
    v->active_off = v->written_off = SEG_HDR;
    v->wbase = 0;
    v->wbuf_len = SEG_HDR;
    memcpy(v->wbuf, h, SEG_HDR); /* already in the file; kept so the window mirrors it */
    v->dir_dirty = 1;
    return 0;
}

int log_rotate(vol *v)
{
    if (log_flush_wbuf(v) < 0)
        return -1;
    seg_info *s = log_active_seg(v); /* not used after log_create_segment (which moves entries) */
    uint64_t old = v->active, old_off = v->active_off, old_base = v->wbase;
    size_t old_len = v->wbuf_len;
    /* Cut a recycled file's stale tail. Recovery would reject its records (older sequence
     * numbers), but a failure here means the disk refuses changes: say so and keep appending
     * to this segment rather than seal it in an unknown state. */
    if (io_ftruncate(s->fd, v->active_off) < 0)
        return lsfs_fail(errno, "truncating segment %llu: %s", (unsigned long long)old, strerror(errno));
    s->file_size = v->active_off;
    /* Its pages are in the page cache now: map them all at once, so that reads (a memcpy from
     * the mapping) do not each take a page fault on first touch. Best effort. */
    if (s->map)
        (void)madvise(s->map, (size_t)s->file_size, MADV_POPULATE_READ);
    if (log_create_segment(v, old + 1) < 0) {
        v->active = old;
        v->active_off = v->written_off = old_off;
        v->wbase = old_base;
        v->wbuf_len = old_len;
        return -1;
    }
    return 0;
}

int log_append_record(vol *v, int type, int flags, uint32_t nblocks, uint64_t lba, uint32_t gen,
                         const uint32_t *crcs, uint32_t ncrc, const void *payload, uint32_t plen,
                         uint64_t *rec_off_out, uint64_t *pay_off)
{
    uint64_t reclen = REC_HDR + 4ull * ncrc + plen;
    if (v->active_off + reclen > v->p.segment_size && v->active_off > SEG_HDR)
        if (log_rotate(v) < 0)
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
    seg_info *as = log_active_seg(v);
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

int log_sync_failed(vol *v)
{
    return lsfs_fail(v->sync_err, "an earlier fdatasync failed (%s): what reached the disk is unknown, so nothing "
                "can be made durable until the volume is reopened (restart the server)", strerror(v->sync_err));
}

int log_sync_all(vol *v)
{
    if (v->sync_err)
        return log_sync_failed(v);
    if (log_flush_wbuf(v) < 0)
        return -1;
    for (size_t i = 0; i < v->nsegs; i++) {
        seg_info *s = &v->segs[i];
        if (s->fd >= 0 && s->needs_sync) {
            if (io_fdatasync(s->fd) < 0) {
                v->sync_err = errno;
                return lsfs_fail(errno, "fdatasync of segment %llu: %s", (unsigned long long)s->id,
                            strerror(errno));
            }
            s->needs_sync = 0;
        }
    }
    if (v->dir_dirty) {
        if (io_fsyncdir(v->segdirfd) < 0) {
            v->sync_err = errno;
            return lsfs_fail(errno, "fsync of the segment directory: %s", strerror(errno));
        }
        v->dir_dirty = 0;
    }
    return 0;
}

int log_flush_locked(vol *v)
{
    if (!v->records_since_marker && v->written_off == v->wbase + v->wbuf_len)
        return 0;
    if (log_sync_all(v) < 0)
        return -1;
    if (v->records_since_marker) {
        /* The marker says: every record before me was synced. It is itself synced by the next
         * flush; until then it is only a hint and recovery never needs it. */
        if (log_append_record(v, R_FLUSH, 0, 0, 0, v->gen, NULL, 0, NULL, 0, NULL, NULL) < 0)
            return -1;
        v->records_since_marker = 0;
    }
    return 0;
}

log_pos log_tell(const vol *v)
{
    return (log_pos){v->active, v->active_off, v->next_seq, v->since_ckpt, v->records_since_marker};
}

int log_rewind(vol *v, const log_pos *p)
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
