/* Block map: LBA (4 KiB block number) -> where the block's data lives.
 *
 * Notes on the design (see docs/FORMAT.md §4):
 *  - A three-level radix tree: root -> mid (1024 leaf pointers, 2 GiB of volume) -> leaf
 *    (512 entries, 2 MiB). Absent nodes mean "never written", so a sparse 16 TiB volume costs a
 *    root of 8192 pointers and nothing else.
 *  - Mids and leaves are reference counted. blockmap_clone() copies only the root and takes a
 *    reference on each mid: O(mids). A write into a shared node copies it first (copy on write),
 *    so a clone (a snapshot, or the frozen map a checkpoint serialises) never changes.
 *  - Each leaf and mid keeps the maximum generation of the entries below it, so a scan for
 *    "changed since generation G" skips whole subtrees.
 *  - Not thread-safe: the caller (csrc/lsfs/) holds the volume mutex. A clone may be read without
 *    the mutex because nodes it shares are never modified in place (except blockmap_relocate,
 *    which changes only where identical bytes live, never what a block reads as).
 * Errors: functions returning int give 0 or -1 with errno = ENOMEM. */
#ifndef BLOCKREP_BLOCKMAP_H
#define BLOCKREP_BLOCKMAP_H
#include <stdint.h>

#define BM_LEAF_SHIFT 9
#define BM_LEAF_ENTRIES (1u << BM_LEAF_SHIFT)
#define BM_MID_SHIFT 10
#define BM_MID_ENTRIES (1u << BM_MID_SHIFT)

/* Entry kinds (bits 60..63 of loc). */
/* BM_IMAGE (image backend, docs/IMAGE.md §2): the block is in the image file at lba x 4096;
 * seg/offset/index are 0, crc and gen are those of the write that produced it. */
enum { BM_NONE = 0, BM_DATA = 1, BM_COMP = 2, BM_ZERO = 3, BM_TRIM = 4, BM_IMAGE = 5 };

typedef struct bm_entry {
    uint64_t loc; /* offset:28 | seg:28 | index:4 | kind:4 */
    uint32_t crc;
    uint32_t gen;
} bm_entry;

static inline uint64_t bm_loc(unsigned kind, uint64_t seg, uint64_t off, unsigned idx)
{
    return ((uint64_t)kind << 60) | ((uint64_t)(idx & 15) << 56) | ((seg & 0xfffffffULL) << 28) |
           (off & 0xfffffffULL);
}
static inline unsigned bm_kind(uint64_t loc) { return (unsigned)(loc >> 60); }
static inline unsigned bm_index(uint64_t loc) { return (unsigned)(loc >> 56) & 15; }
static inline uint64_t bm_seg(uint64_t loc) { return (loc >> 28) & 0xfffffffULL; }
static inline uint64_t bm_off(uint64_t loc) { return loc & 0xfffffffULL; }

typedef struct bm_leaf {
    uint32_t refs;
    uint32_t maxgen;
    bm_entry e[BM_LEAF_ENTRIES];
} bm_leaf;

typedef struct bm_mid {
    uint32_t refs;
    uint32_t maxgen;
    bm_leaf *leaf[BM_MID_ENTRIES];
} bm_mid;

/* Called when a leaf starts to exist as a distinct copy (+1: a copy made on write, or a new
 * leaf) or stops existing (-1: its last reference dropped), so that the owner can count, per
 * segment, the distinct entries that reference it (what the collector must keep). */
typedef struct bm_hooks {
    void (*leaf)(void *ctx, const bm_leaf *l, int delta);
    void *ctx;
} bm_hooks;

typedef struct blockmap {
    uint64_t nblocks;
    uint64_t nmids;
    bm_mid **mid;
    uint64_t nleaves; /* allocated leaves reachable from this map (memory accounting) */
    const bm_hooks *hooks; /* may be NULL; inherited by clones */
} blockmap;

blockmap *blockmap_new(uint64_t nblocks);   /* NULL + ENOMEM */
blockmap *blockmap_clone(const blockmap *m); /* NULL + ENOMEM */
void blockmap_free(blockmap *m);

/* Read one entry; an absent entry reads as all zero (kind BM_NONE, gen 0). */
bm_entry blockmap_get(const blockmap *m, uint64_t lba);

/* Set one entry, copying shared nodes first. *old (if not NULL) receives the previous entry. */
int blockmap_set(blockmap *m, uint64_t lba, bm_entry e, bm_entry *old);

/* Leaf iteration: the leaf covering leaf index li (lba >> 9), or NULL if absent. */
const bm_leaf *blockmap_leaf(const blockmap *m, uint64_t li);

/* A new unattached leaf holding these entries (refs 0), and attaching one to a map at leaf
 * index li (refs + 1): how a checkpoint's shared leaves are shared again after loading. */
bm_leaf *blockmap_leaf_new(const bm_entry *entries);
int blockmap_attach_leaf(blockmap *m, uint64_t li, bm_leaf *l);
/* Drop a leaf made by blockmap_leaf_new that no map took (refs 0). */
void blockmap_leaf_discard(bm_leaf *l);

/* Next leaf index >= li that is present (skipping absent mids/leaves); returns UINT64_MAX if none. */
uint64_t blockmap_next_leaf(const blockmap *m, uint64_t li);

/* Make the leaves covering [lba, lba+n) private to m (copying shared ones, creating absent ones
 * unless existing_only), so that blockmap_set on them cannot fail until m is cloned again: how a
 * request applies all of its map changes or none. 0, or -1 + ENOMEM (m still reads the same). */
int blockmap_prepare(blockmap *m, uint64_t lba, uint64_t n, int existing_only);

/* Change where a block lives without changing what it reads as (the collector): updates the
 * entry in place even in shared nodes, only if it still equals `expect`. Returns 1 if updated. */
int blockmap_relocate(blockmap *m, uint64_t lba, uint64_t expect_loc, uint64_t new_loc);
/* The same, also setting the entry's crc when set_crc (a compressed entry's crc covers its
 * record; moved out of it, the block's own CRC-32C describes it: the image backend's mover). */
int blockmap_relocate_crc(blockmap *m, uint64_t lba, uint64_t expect_loc, uint64_t new_loc, int set_crc,
                          uint32_t crc);

#endif
