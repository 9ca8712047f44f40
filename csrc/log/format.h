/* The log's on-disk layout: what the writer (log/writer.c) and the reader (log/reader.c) share,
 * and nothing else. Every byte is described in docs/FORMAT.md (§2 segments, §3 records); both
 * backends use this log (lsfs: the volume itself; image: the change log, docs/IMAGE.md).
 * Little-endian on disk (put/get below are memcpy: the engine runs on little-endian hosts). */
#ifndef BLOCKREP_LOG_FORMAT_H
#define BLOCKREP_LOG_FORMAT_H
#include <stdint.h>
#include <string.h>

#include "volume.h"

#define BS VOL_BLOCK_SIZE     /* a block: the unit of every map entry and record */
#define SEG_HDR 64u           /* segment header: magic, crc, version, id, volume uuid, first seq */
#define REC_HDR 48u           /* record header, then 4-byte crcs, then the payload */
#define SEG_MAGIC 0x47535242u
#define REC_MAGIC 0x43525242u
#define MAX_REC_BLOCKS 1024u  /* blocks of one raw WRITE/RELOC record */
#define MAX_COMP_BLOCKS 16u   /* blocks of one compressed (F_COMP) record */
#define MAX_TOMB_BLOCKS (1u << 30) /* blocks of one ZERO/TRIM record */
#define SEG_ID_MAX 0xfffffffull /* 28 bits in a map entry (bm_loc) */

/* record types (header byte 8) */
enum { R_WRITE = 1, R_ZERO = 2, R_TRIM = 3, R_RELOC = 4, R_FLUSH = 5, R_SNAP = 6, R_SNAPDEL = 7 };
#define SNAP_PAYLOAD 112u
#define SNAP_V1_PAYLOAD 96u /* written before snapshots had a uuid and flags; still replayed */
#define SNAPDEL_PAYLOAD 8u
/* record flags (header byte 9): compressed payload, more records of this request follow, the
 * first record of a request */
enum { F_COMP = 1, F_MORE = 2, F_FIRST = 4 };

static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

#endif
