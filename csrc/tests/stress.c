/* Concurrency stress of the engine for the sanitizers (tests/test_sanitizers.py builds it with
 * ASan+UBSan and with TSan): writers, readers, flushes, snapshot create/delete/read/diff,
 * checkpoints, the collector and close/reopen all at once, round after round.
 *
 * Each writer owns a region of the volume and keeps a model of it, so every read it makes can be
 * checked even while the others write; after each round the volume is closed, reopened (a full
 * recovery) and every region compared with its model. Exit 0 = no mismatch and no error; the
 * sanitizers report their own findings on stderr (the test fails on any).
 *
 * With "image" the volume is an image-backend one (docs/IMAGE.md): its image file beside DIR,
 * a 1 MiB journal limit (writers hit back-pressure and move batches themselves) and a mover
 * thread sealing at random, beside everything above.
 *
 *   stress DIR ROUNDS OPS_PER_WRITER [compress|image]
 */
#define _GNU_SOURCE
#include "../volume.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define BS 4096u
#define NWRITERS 2
#define REGION (2u << 20) /* bytes per writer */
#define VOLSIZE (8u << 20)

static vol *v;
static char image_path[4096]; /* "" = lsfs */
static atomic_int stop_bg;
static atomic_int failures;
static uint8_t *model[NWRITERS];
static unsigned ops_per_writer;

#define CHECK(cond, ...)                                                                        \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            fprintf(stderr, "stress: " __VA_ARGS__);                                            \
            fprintf(stderr, " (errno %d: %s)\n", errno, vol_errmsg());                          \
            atomic_fetch_add(&failures, 1);                                                     \
        }                                                                                       \
    } while (0)

static uint64_t rnd(uint64_t *s) /* xorshift64 */
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void *writer(void *arg)
{
    int w = (int)(intptr_t)arg;
    uint64_t seed = 0x9e3779b97f4a7c15ull * (uint64_t)(w + 1) ^ (uint64_t)time(NULL);
    uint64_t base = (uint64_t)w * REGION;
    uint8_t *buf = malloc(256 * 1024), *got = malloc(256 * 1024);
    for (unsigned i = 0; i < ops_per_writer && !atomic_load(&failures); i++) {
        uint64_t len = 1 + rnd(&seed) % (64 * 1024);
        if (rnd(&seed) % 4 == 0)
            len = (1 + rnd(&seed) % 64) * BS;
        uint64_t off = rnd(&seed) % (REGION - len);
        unsigned op = (unsigned)(rnd(&seed) % 10);
        int fua = rnd(&seed) % 8 == 0;
        if (op < 6) {
            for (uint64_t k = 0; k < len; k++)
                buf[k] = (uint8_t)rnd(&seed);
            if (vol_write(v, buf, len, base + off, fua) == 0)
                memcpy(model[w] + off, buf, len);
            else
                CHECK(0, "write failed");
        } else if (op < 8) {
            int trim = op == 7;
            if (vol_zero(v, len, base + off, fua, trim) == 0) {
                if (!trim)
                    memset(model[w] + off, 0, len);
                else { /* trim is advisory for partial blocks: the model learns what it reads */
                    CHECK(vol_read(v, model[w] + off, len, base + off) == 0, "read after trim");
                }
            } else
                CHECK(0, "zero failed");
        } else {
            CHECK(vol_read(v, got, len, base + off) == 0, "read failed");
            CHECK(memcmp(got, model[w] + off, len) == 0, "writer %d read at %llu differs from its model", w,
                  (unsigned long long)off);
        }
    }
    free(buf);
    free(got);
    return NULL;
}

static void *flusher(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_bg))
        CHECK(vol_flush(v) == 0, "flush failed");
    return NULL;
}

static void *checkpointer(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_bg))
        CHECK(vol_checkpoint(v) == 0, "checkpoint failed");
    return NULL;
}

static void *collector(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_bg)) {
        int64_t seg = vol_gc_pick(v, 1.0);
        if (seg > 0) {
            int r = vol_gc_segment(v, (uint64_t)seg);
            CHECK(r == 0 || errno == EINVAL, "gc of segment %lld failed", (long long)seg);
        }
        vol_pool_trim(v, 2);
    }
    return NULL;
}

static void *mover(void *arg)
{
    (void)arg;
    uint64_t seed = 12345;
    while (!atomic_load(&stop_bg))
        CHECK(vol_move(v, 64 * 1024 + rnd(&seed) % (512 * 1024), (int)(rnd(&seed) & 1)) >= 0, "move failed");
    return NULL;
}

static void *snapshotter(void *arg)
{
    (void)arg;
    static atomic_uint serial;
    uint8_t *buf = malloc(64 * 1024);
    uint64_t pos, out[2 * 64], ext[3 * 64];
    vol_stats st;
    while (!atomic_load(&stop_bg)) {
        char name[32];
        snprintf(name, sizeof name, "s%u", atomic_fetch_add(&serial, 1));
        uint32_t id;
        CHECK(vol_snap_create(v, name, 1, NULL, 0, &id) == 0, "snapshot create failed");
        vol_snap_info info[64];
        int n = vol_snap_list(v, info, 64);
        CHECK(n >= 1, "snapshot list failed");
        CHECK(vol_snap_read(v, id, buf, 64 * 1024, 0) == 0, "snapshot read failed");
        pos = 0;
        CHECK(vol_diff(v, n > 1 ? info[0].id : VOL_SNAP_NONE, 0, BS, &pos, out, 64) >= 0, "diff failed");
        CHECK(vol_snap_extents(v, id, VOLSIZE, 0, ext, 64) >= 1, "extents failed");
        CHECK(vol_snap_pinned(v, id) >= 0, "pinned failed");
        vol_get_stats(v, &st);
        if (n > 3)
            CHECK(vol_snap_delete(v, info[0].id) == 0, "snapshot delete failed");
    }
    free(buf);
    return NULL;
}

static vol *open_vol(const char *dir, int compress, const uint8_t *uuid)
{
    vol_params p = {.size = VOLSIZE, .compress = compress, .zstd_level = 1, .segment_size = 1u << 20,
                    .image_path = image_path[0] ? image_path : NULL, .journal_max = 1u << 20};
    memcpy(p.uuid, uuid, 16);
    vol_report rep;
    vol *h = vol_open(dir, &p, &rep);
    if (!h) {
        fprintf(stderr, "stress: open failed: %s\n", vol_errmsg());
        exit(2);
    }
    return h;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: stress DIR ROUNDS OPS_PER_WRITER [compress]\n");
        return 2;
    }
    const char *dir = argv[1];
    int rounds = atoi(argv[2]);
    ops_per_writer = (unsigned)atoi(argv[3]);
    int compress = argc > 4 && strcmp(argv[4], "compress") == 0;
    if (argc > 4 && strcmp(argv[4], "image") == 0) {
        snprintf(image_path, sizeof image_path, "%s.image", dir);
        int fd = open(image_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        if (fd < 0 || ftruncate(fd, VOLSIZE) < 0)
            return 2;
        close(fd);
    }
    uint8_t uuid[16];
    if (getrandom(uuid, 16, 0) != 16)
        return 2;
    for (int w = 0; w < NWRITERS; w++)
        model[w] = calloc(1, REGION);
    for (int r = 0; r < rounds && !atomic_load(&failures); r++) {
        v = open_vol(dir, compress, uuid);
        for (int w = 0; w < NWRITERS; w++) { /* recovery must give back exactly the models */
            uint8_t *got = malloc(REGION);
            CHECK(vol_read(v, got, REGION, (uint64_t)w * REGION) == 0, "read after reopen");
            CHECK(memcmp(got, model[w], REGION) == 0, "round %d: region %d differs after reopen", r, w);
            free(got);
        }
        atomic_store(&stop_bg, 0);
        pthread_t wt[NWRITERS], bg[5];
        void *(*bgfn[5])(void *) = {flusher, checkpointer, collector, snapshotter, mover};
        int nbg = image_path[0] ? 5 : 4;
        for (int i = 0; i < nbg; i++)
            pthread_create(&bg[i], NULL, bgfn[i], NULL);
        for (int w = 0; w < NWRITERS; w++)
            pthread_create(&wt[w], NULL, writer, (void *)(intptr_t)w);
        for (int w = 0; w < NWRITERS; w++)
            pthread_join(wt[w], NULL);
        atomic_store(&stop_bg, 1);
        for (int i = 0; i < nbg; i++)
            pthread_join(bg[i], NULL);
        CHECK(vol_close(v) == 0, "close failed");
    }
    for (int w = 0; w < NWRITERS; w++)
        free(model[w]);
    if (atomic_load(&failures)) {
        fprintf(stderr, "stress: %d failures\n", atomic_load(&failures));
        return 1;
    }
    printf("stress: %d rounds x %d writers x %u ops: ok\n", rounds, NWRITERS, ops_per_writer);
    return 0;
}
