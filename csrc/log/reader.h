/* The log reader: what recovery, the collector and the mover need to walk segment files.
 * Every function here is pure (bytes in memory, no I/O, no locks, errno untouched), so any
 * thread may call it on a mapping it owns. */
#ifndef BLOCKREP_LOG_READER_H
#define BLOCKREP_LOG_READER_H
#include <stddef.h>
#include <stdint.h>

#include "log/format.h"

/* One segment file mapped for reading (recovery). */
typedef struct log_segmap {
    uint64_t id;
    uint8_t *d;
    size_t len;
} log_segmap;

/* One parsed record: header fields, and pointers into the mapping. */
typedef struct log_rec {
    int type, flags;
    uint32_t nblocks, plen, gen, ncrc;
    uint64_t seq, lba;
    size_t len;
    const uint8_t *crcs, *payload;
} log_rec;

/* Parse the record header at d[pos] of a segment of the volume with this uuid8 (bytes 16..24 of
 * its uuid) and size in blocks. Returns 1 if the header is valid (magic, type, sizes within the
 * format's limits and the volume, header+crcs checksum) and the whole record lies inside len,
 * else 0 (r is then partly filled and meaningless). The payload is not checked: see below. */
int log_parse_rec(uint64_t uuid8, uint64_t nblocks, const uint8_t *d, size_t len, size_t pos, log_rec *r);
/* 1 if the payload of a parsed record matches its crcs (types without payload: 1), else 0. */
int log_rec_data_ok(const log_rec *r);
/* From (si, pos), find the next valid record header (resynchronising byte by byte) with
 * seq > after_seq: *found_si, *found_pos (found_si = nsm if none). Returns 1 if any FLUSH marker
 * follows the damaged point (then the damage is inside the durable log), else 0. */
int log_find_marker_after(uint64_t uuid8, uint64_t nblocks, const log_segmap *sm, size_t nsm, size_t si, size_t pos,
                          uint64_t after_seq, size_t *found_si, size_t *found_pos);

#endif
