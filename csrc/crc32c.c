/* CRC-32C: hardware (SSE4.2) with a byte-table fallback. See crc32c.h. */
#include "crc32c.h"
#include <string.h>

static uint32_t table[256];
static int have_table;
static int hw = -1;

static void make_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[i] = c;
    }
    have_table = 1;
}

static uint32_t sw_extend(uint32_t crc, const uint8_t *p, size_t len)
{
    if (!have_table)
        make_table();
    crc = ~crc;
    while (len--)
        crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>
__attribute__((target("sse4.2")))
static uint32_t hw_extend(uint32_t crc, const uint8_t *p, size_t len)
{
    uint64_t c = ~crc & 0xffffffffu;
    while (len && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        len -= 8;
    }
    while (len--)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

uint32_t crc32c_extend(uint32_t crc, const void *buf, size_t len)
{
#if defined(__x86_64__)
    if (hw < 0)
        hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    if (hw)
        return hw_extend(crc, buf, len);
#endif
    return sw_extend(crc, buf, len);
}
