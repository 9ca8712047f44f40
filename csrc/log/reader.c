/* The log reader: parses and checks the records of segment files (docs/FORMAT.md §3) for
 * recovery (lsfs/recovery.c), the collector (lsfs/collector.c) and the image mover
 * (image/mover.c). Pure functions over bytes in memory: no locks, no I/O, no errno. */
#include "log/reader.h"

#include "crc32c.h"

int log_parse_rec(uint64_t uuid8, uint64_t nblocks, const uint8_t *d, size_t len, size_t pos, log_rec *r)
{
    if (pos + REC_HDR > len || get32(d + pos) != REC_MAGIC)
        return 0;
    const uint8_t *h = d + pos;
    r->type = h[8];
    r->flags = h[9];
    r->nblocks = get32(h + 12);
    r->plen = get32(h + 16);
    r->gen = get32(h + 20);
    r->seq = get64(h + 24);
    r->lba = get64(h + 32);
    if (get64(h + 40) != uuid8 || r->type < R_WRITE || r->type > R_SNAPDEL)
        return 0;
    if (r->type == R_WRITE || r->type == R_RELOC) {
        if (r->flags & F_COMP) {
            if (r->nblocks == 0 || r->nblocks > MAX_COMP_BLOCKS || r->plen > MAX_COMP_BLOCKS * BS)
                return 0;
            r->ncrc = 1;
        } else {
            if (r->nblocks == 0 || r->nblocks > MAX_REC_BLOCKS || r->plen != r->nblocks * BS)
                return 0;
            r->ncrc = r->nblocks;
        }
    } else if (r->type == R_SNAP || r->type == R_SNAPDEL) {
        if ((r->type == R_SNAP ? r->plen != SNAP_PAYLOAD && r->plen != SNAP_V1_PAYLOAD : r->plen != SNAPDEL_PAYLOAD) ||
            r->nblocks || r->lba)
            return 0;
        r->ncrc = 1;
    } else {
        if (r->plen != 0 || (r->type != R_FLUSH && r->nblocks == 0) || r->nblocks > MAX_TOMB_BLOCKS)
            return 0;
        r->ncrc = 0;
    }
    if (r->type != R_FLUSH && r->type < R_SNAP && (r->lba > nblocks || r->nblocks > nblocks - r->lba))
        return 0;
    r->len = REC_HDR + 4ull * r->ncrc + r->plen;
    if (pos + r->len > len)
        return 0;
    uint32_t hc = crc32c(h + 8, REC_HDR - 8);
    if (r->ncrc)
        hc = crc32c_extend(hc, h + REC_HDR, 4ull * r->ncrc);
    if (hc != get32(h + 4))
        return 0;
    r->crcs = h + REC_HDR;
    r->payload = h + REC_HDR + 4ull * r->ncrc;
    return 1;
}

int log_rec_data_ok(const log_rec *r)
{
    if (r->type == R_SNAP || r->type == R_SNAPDEL)
        return crc32c(r->payload, r->plen) == get32(r->crcs);
    if (r->type != R_WRITE && r->type != R_RELOC)
        return 1;
    if (r->flags & F_COMP)
        return crc32c(r->payload, r->plen) == get32(r->crcs);
    uint32_t cc[64];
    for (uint32_t b0 = 0; b0 < r->nblocks; b0 += 64) {
        uint32_t m = r->nblocks - b0 < 64 ? r->nblocks - b0 : 64;
        crc32c_blocks(r->payload + (size_t)b0 * BS, m, BS, cc);
        for (uint32_t b = 0; b < m; b++)
            if (cc[b] != get32(r->crcs + 4 * (b0 + b)))
                return 0;
    }
    return 1;
}

int log_find_marker_after(uint64_t uuid8, uint64_t nblocks, const log_segmap *sm, size_t nsm, size_t si, size_t pos,
                          uint64_t after_seq, size_t *found_si, size_t *found_pos)
{
    int found = 0, marker = 0;
    for (size_t s = si; s < nsm; s++) {
        size_t p = s == si ? pos : SEG_HDR;
        while (p + REC_HDR <= sm[s].len) {
            log_rec r;
            if (get32(sm[s].d + p) == REC_MAGIC && log_parse_rec(uuid8, nblocks, sm[s].d, sm[s].len, p, &r) &&
                r.seq > after_seq) {
                if (!found) {
                    found = 1;
                    *found_si = s;
                    *found_pos = p;
                }
                if (r.type == R_FLUSH)
                    marker = 1;
                p += r.len;
            } else {
                p++;
            }
        }
    }
    if (!found)
        *found_si = nsm;
    return marker;
}
