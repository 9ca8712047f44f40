/* The volume: open (checkpoint + replay), close, abandon, free, stats, and the error message.
 *
 * Locks: vol_open and vol_free run before/after any other thread knows v; vol_close takes
 * move_lock (via vol_move), ckpt_lock (vol_checkpoint), then v->lock; vol_get_stats takes v->lock.
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

static __thread char errbuf[512];

const char *vol_errmsg(void) { return errbuf; }

int lsfs_fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, sizeof errbuf, fmt, ap);
    va_end(ap);
    errno = err;
    return -1;
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
    if (p->size == 0 || p->size % BS || p->size > VOL_MAX_SIZE) {
        lsfs_fail(EINVAL, "volume size must be a positive multiple of 4096 up to 16 TiB");
        return NULL;
    }
    if (p->segment_size < VOL_SEGMENT_MIN || p->segment_size > VOL_SEGMENT_MAX) {
        lsfs_fail(EINVAL, "segment size must be between 1 MiB and 256 MiB");
        return NULL;
    }
    vol *v = calloc(1, sizeof *v);
    if (!v) {
        lsfs_fail(ENOMEM, "out of memory");
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
        v->p.zstd_level = VOL_ZSTD_LEVEL_DEFAULT;
    v->nblocks = p->size / BS;
    memcpy(&v->uuid8, p->uuid, 8);
    v->gen = 1;
    v->next_seq = 1;
    /* a window holds any record (<= 4 MiB + header) and is a multiple of 2 MiB (folio alignment) */
    v->wbuf_cap = (p->wbuf_size + (2u << 20) - 1) / (2u << 20) * (2u << 20);
    if (v->wbuf_cap < (8u << 20))
        v->wbuf_cap = 8u << 20;
    v->head = blockmap_new(v->nblocks);
    v->hooks.leaf = lsfs_live_hook;
    v->hooks.ctx = v;
    v->next_snap_id = 1;
    v->wbuf = malloc(v->wbuf_cap);
    v->zbuf = malloc(ZSTD_compressBound(MAX_COMP_BLOCKS * BS));
    v->dcache = malloc(MAX_COMP_BLOCKS * BS);
    v->cctx = ZSTD_createCCtx();
    v->dctx = ZSTD_createDCtx();
    if (!v->head || !v->wbuf || !v->zbuf || !v->dcache || !v->cctx || !v->dctx) {
        lsfs_fail(ENOMEM, "out of memory");
        goto err;
    }
    v->dirfd = open(voldir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (v->dirfd < 0) {
        lsfs_fail(errno, "opening volume directory %s: %s", voldir, strerror(errno));
        goto err;
    }
    if (p->image_path) {
        struct stat st;
        v->image_fd = open(p->image_path, (p->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOFOLLOW);
        if (v->image_fd < 0) {
            lsfs_fail(errno == ELOOP ? EBADMSG : errno, "opening the image %s: %s", p->image_path,
                      errno == ELOOP ? "it is a symbolic link (refused: a planted link must not redirect writes)"
                                     : strerror(errno));
            goto err;
        }
        if (fstat(v->image_fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != p->size) {
            lsfs_fail(EBADMSG, "the image %s is %lld bytes, the volume %llu: not this volume's image (or damaged)",
                 p->image_path, (long long)st.st_size, (unsigned long long)p->size);
            goto err;
        }
    }
    if (!p->readonly && io_mkdirat(v->dirfd, "segments", 0700) < 0 && errno != EEXIST) {
        lsfs_fail(errno, "creating segments directory: %s", strerror(errno));
        goto err;
    }
    v->segdirfd = openat(v->dirfd, "segments", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (v->segdirfd < 0) {
        lsfs_fail(errno, "opening segments directory: %s", strerror(errno));
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
        lsfs_fail(e, "listing segments: %s", strerror(e));
        goto err;
    }
    struct dirent *de;
    while ((de = readdir(dir))) {
        unsigned long long id;
        char tail[8];
        if (strlen(de->d_name) == 20 && sscanf(de->d_name, "%16llx%7s", &id, tail) == 2 &&
            strcmp(tail, ".seg") == 0) {
            if (id == 0 || id > SEG_ID_MAX) { /* never written by the engine: refuse to guess */
                lsfs_fail(EBADMSG, "segment file %s has an id out of range (1 to %llu): foreign or damaged",
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
                    lsfs_fail(ENOMEM, "out of memory");
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
        qsort(ids, nids, sizeof *ids, lsfs_cmp_u64);
    uint64_t rseg = 0, roff = SEG_HDR;
    int lc = lsfs_load_checkpoint(v, &rseg, &roff);
    if (lc < 0) {
        free(ids);
        goto err;
    }
    rep->checkpoint_seq = lc == 0 ? v->next_seq : 0;
    if (lc == 1 && nids) { /* no checkpoint: replay everything */
        rseg = ids[0];
        roff = SEG_HDR;
    }
    if (lsfs_replay(v, ids, nids, rseg, roff, rep) < 0) {
        free(ids);
        goto err;
    }
    uint64_t maxid = nids ? ids[nids - 1] : 0;
    if (v->max_seen_id > maxid) /* the newest segment was lost: its id is never given again */
        maxid = v->max_seen_id;
    if (rseg > maxid)
        maxid = rseg;
    free(ids);
    if (lsfs_recount_live(v) < 0)
        goto err;
    v->head->hooks = &v->hooks;
    for (uint32_t i = 0; i < v->nsnaps; i++)
        v->snaps[i].map->hooks = &v->hooks;
    /* segments older than the replay start that nothing references: left by the collector */
    for (size_t i = 0; i < v->nsegs && v->segs[i].id < rseg; i++)
        if (!p->readonly && v->segs[i].fd >= 0 && v->segs[i].live_blocks == 0) {
            log_seg_retire(v, v->segs[i].id, 0);
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
    if (log_create_segment(v, maxid + 1) < 0)
        goto err;
    if (log_sync_all(v) < 0)
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
        r = log_flush_locked(v);
        if (r == 0)
            r = log_sync_all(v);
        pthread_mutex_unlock(&v->lock);
    }
    int e = errno;
    vol_free(v);
    errno = e;
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
