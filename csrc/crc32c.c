/* CRC-32C: hardware (SSE4.2) with a byte-table fallback. See crc32c.h.
 *
 * Notes on the design: the crc32 instruction has a latency of 3 cycles and a throughput of 1,
 * so one stream of it runs at a third of the CPU's speed. Like Mark Adler's crc32c.c, buffers
 * are cut into three interleaved streams whose CRCs are combined by "shifting" a CRC over the
 * length of the following streams (multiplication by x^(8n) mod P, tabulated once). */
#include "crc32c.h"
#include <pthread.h>
#include <string.h>

#define POLY 0x82F63B78u
#define LONG 1024u /* powers of two (zeros_op needs them): a 4 KiB block is one LONG round, one SHORT round, 256 bytes */
#define SHORT 256u

static uint32_t table[256];
static uint32_t shift_long[4][256], shift_short[4][256];
static int hw;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static uint32_t gf2_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_times(mat, mat[n]);
}

/* The operator that appends len zero bytes to a raw (non-inverted) CRC. */
static void zeros_op(uint32_t *even, size_t len)
{
    uint32_t odd[32];
    odd[0] = POLY;
    uint32_t row = 1;
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_square(even, odd); /* 2 zero bits */
    gf2_square(odd, even); /* 4 zero bits */
    do {
        gf2_square(even, odd);
        len >>= 1;
        if (len == 0)
            return;
        gf2_square(odd, even);
        len >>= 1;
    } while (len);
    memcpy(even, odd, sizeof odd);
}

static void make_shift(uint32_t zeros[4][256], size_t len)
{
    uint32_t op[32];
    zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        zeros[0][n] = gf2_times(op, n);
        zeros[1][n] = gf2_times(op, n << 8);
        zeros[2][n] = gf2_times(op, n << 16);
        zeros[3][n] = gf2_times(op, n << 24);
    }
}

static inline uint32_t shift(uint32_t zeros[4][256], uint32_t crc)
{
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^ zeros[2][(crc >> 16) & 0xff] ^
           zeros[3][crc >> 24];
}

static void init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[i] = c;
    }
    make_shift(shift_long, LONG);
    make_shift(shift_short, SHORT);
#if defined(__x86_64__)
    hw = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t sw_extend(uint32_t crc, const uint8_t *p, size_t len)
{
    crc = ~crc;
    while (len--)
        crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* CRC rounds of 3 x block bytes: three interleaved streams, then the second and third CRC
 * are combined into the first by shifting it over block bytes (zeros[]) each time. */
__attribute__((target("sse4.2")))
static uint64_t three_streams(uint64_t c0, const uint8_t **pp, size_t *lenp, size_t block,
                              uint32_t zeros[4][256])
{
    const uint8_t *p = *pp;
    size_t len = *lenp;
    while (len >= 3 * block) {
        uint64_t c1 = 0, c2 = 0;
        const uint8_t *end = p + block;
        do {
            c0 = _mm_crc32_u64(c0, ld64(p));
            c1 = _mm_crc32_u64(c1, ld64(p + block));
            c2 = _mm_crc32_u64(c2, ld64(p + 2 * block));
            p += 8;
        } while (p < end);
        c0 = shift(zeros, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift(zeros, (uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * block;
        len -= 3 * block;
    }
    *pp = p;
    *lenp = len;
    return c0;
}

__attribute__((target("sse4.2")))
static uint32_t hw_extend(uint32_t crc, const uint8_t *p, size_t len)
{
    uint64_t c0 = ~crc & 0xffffffffu;
    while (len && ((uintptr_t)p & 7)) {
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
        len--;
    }
    c0 = three_streams(c0, &p, &len, LONG, shift_long);
    c0 = three_streams(c0, &p, &len, SHORT, shift_short);
    while (len >= 8) {
        c0 = _mm_crc32_u64(c0, ld64(p));
        p += 8;
        len -= 8;
    }
    while (len--)
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    return ~(uint32_t)c0;
}

/* Each of n consecutive blocks of bs bytes its own CRC, three blocks at a time: three
 * independent streams keep the crc32 unit busy (latency 3, one per cycle) with no combining
 * shift, where one block alone needs two rounds of shifts and a serial tail. */
__attribute__((target("sse4.2")))
static void hw_blocks(const uint8_t *p, size_t n, size_t bs, uint32_t *out)
{
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        const uint8_t *a = p + i * bs, *b = a + bs, *c = b + bs;
        uint64_t c0 = 0xffffffffu, c1 = 0xffffffffu, c2 = 0xffffffffu;
        size_t k = 0;
        for (; k + 8 <= bs; k += 8) {
            c0 = _mm_crc32_u64(c0, ld64(a + k));
            c1 = _mm_crc32_u64(c1, ld64(b + k));
            c2 = _mm_crc32_u64(c2, ld64(c + k));
        }
        for (; k < bs; k++) {
            c0 = _mm_crc32_u8((uint32_t)c0, a[k]);
            c1 = _mm_crc32_u8((uint32_t)c1, b[k]);
            c2 = _mm_crc32_u8((uint32_t)c2, c[k]);
        }
        out[i] = ~(uint32_t)c0;
        out[i + 1] = ~(uint32_t)c1;
        out[i + 2] = ~(uint32_t)c2;
    }
    for (; i < n; i++)
        out[i] = hw_extend(0, p + i * bs, bs);
}
#endif

void crc32c_blocks(const void *buf, size_t nblocks, size_t bs, uint32_t *out)
{
    pthread_once(&once, init);
#if defined(__x86_64__)
    if (hw) {
        hw_blocks(buf, nblocks, bs, out);
        return;
    }
#endif
    for (size_t i = 0; i < nblocks; i++)
        out[i] = sw_extend(0, (const uint8_t *)buf + i * bs, bs);
}

uint32_t crc32c_extend(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&once, init);
#if defined(__x86_64__)
    if (hw)
        return hw_extend(crc, buf, len);
#endif
    return sw_extend(crc, buf, len);
}

uint32_t crc32c_extend_sw(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&once, init);
    return sw_extend(crc, buf, len);
}
