/* CRC-32C (Castagnoli), the checksum of every blockrep record: see docs/FORMAT.md.
 * Uses the SSE4.2 crc32 instruction when the CPU has it, a slicing table otherwise.
 * Thread-safe after the first call (the table is built once, idempotently). */
#ifndef BLOCKREP_CRC32C_H
#define BLOCKREP_CRC32C_H
#include <stddef.h>
#include <stdint.h>

/* crc32c_extend: continue a CRC over more bytes; start with crc = 0. Never fails. */
uint32_t crc32c_extend(uint32_t crc, const void *buf, size_t len);
/* crc32c_extend_sw: the byte-table implementation (the reference the tests compare with). */
uint32_t crc32c_extend_sw(uint32_t crc, const void *buf, size_t len);
/* crc32c_blocks: out[i] = crc32c of block i of nblocks consecutive blocks of bs bytes each
 * (faster than one call per block). Never fails. */
void crc32c_blocks(const void *buf, size_t nblocks, size_t bs, uint32_t *out);
static inline uint32_t crc32c(const void *buf, size_t len) { return crc32c_extend(0, buf, len); }

#endif
