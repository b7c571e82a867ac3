/*
 * vfio-user-emu fast path: CRC-32C (Castagnoli) and zero-page detection.
 *
 * Compiled by cffi (API mode) from emulator/fastpath/build.py.  The pure-Python
 * reference implementation lives in devices/stream_primitives.py; both must agree.
 *
 * CRC conventions: the public function takes and returns the *finished* CRC value
 * (initial value and final XOR of 0xFFFFFFFF applied), so vfe_crc32c(0, "123456789", 9)
 * == 0xE3069283 and vfe_crc32c(vfe_crc32c(0, a), b) == vfe_crc32c(0, a || b).
 * Internally the "raw" register is used (reflected, polynomial 0x82F63B78).
 *
 * Register representation: bit 31 holds the coefficient of x^0, bit 0 the coefficient
 * of x^31 (reflected).  Feeding n zero bytes into a raw register c yields c * x^(8n)
 * mod P, and the raw CRC is linear, which is what lets three independent streams be
 * combined (see vfe_crc32c_hw).
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <fcntl.h> /* vmsplice (Python.h, included first by cffi, defines _GNU_SOURCE) */
#include <sys/uio.h>
#endif

#define VFE_POLY 0x82F63B78u

/* Define VFE_NO_HW to compile only the portable slicing-by-8 path (for testing). */

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(VFE_NO_HW)
#define VFE_X86 1
#include <nmmintrin.h>
#else
#define VFE_X86 0
#endif

#if defined(__GNUC__)
#define VFE_CONSTRUCTOR __attribute__((constructor))
#else
#define VFE_CONSTRUCTOR
#endif

/* Slicing-by-8 tables: vfe_table[0] is the classic byte-at-a-time table. */
static uint32_t vfe_table[8][256];
static volatile int vfe_ready;
static int vfe_have_hw;

/* The hardware path is split into three lanes of this many bytes each (multiple of 8). */
#define VFE_LANE_BIG 4096u
#define VFE_LANE_SMALL 256u
/* Shift-by-lane operators, as four byte-indexed tables each. */
static uint32_t vfe_shift_big[4][256];
static uint32_t vfe_shift_small[4][256];

static inline uint32_t vfe_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/* a(x) * b(x) mod P in the reflected representation. */
static uint32_t vfe_multmodp(uint32_t a, uint32_t b)
{
    uint32_t product = 0;
    uint32_t bit = 0x80000000u; /* x^0 */
    while (a != 0 && bit != 0) {
        if (a & bit) {
            product ^= b;
            a &= ~bit;
        }
        bit >>= 1;
        b = (b & 1u) ? (b >> 1) ^ VFE_POLY : b >> 1; /* b *= x */
    }
    return product;
}

/* x^(8 * nbytes) mod P, by square-and-multiply over the bits of nbytes (no overflow). */
static uint32_t vfe_x_pow_8n(uint64_t nbytes)
{
    uint32_t result = 0x80000000u; /* 1 */
    uint32_t square = 0x00800000u; /* x^8: one byte */
    while (nbytes != 0) {
        if (nbytes & 1u)
            result = vfe_multmodp(square, result);
        square = vfe_multmodp(square, square);
        nbytes >>= 1;
    }
    return result;
}

static void vfe_build_shift(uint32_t table[4][256], uint32_t nbytes)
{
    uint32_t factor = vfe_x_pow_8n(nbytes);
    for (unsigned k = 0; k < 4; k++)
        for (unsigned b = 0; b < 256; b++)
            table[k][b] = vfe_multmodp(factor, (uint32_t)b << (8 * k));
}

static inline uint32_t vfe_shift(uint32_t table[4][256], uint32_t crc)
{
    return table[0][crc & 0xffu] ^ table[1][(crc >> 8) & 0xffu] ^
           table[2][(crc >> 16) & 0xffu] ^ table[3][crc >> 24];
}

static void VFE_CONSTRUCTOR vfe_init(void)
{
    if (vfe_ready)
        return;
    for (unsigned i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int j = 0; j < 8; j++)
            c = (c & 1u) ? (c >> 1) ^ VFE_POLY : c >> 1;
        vfe_table[0][i] = c;
    }
    for (unsigned i = 0; i < 256; i++)
        for (unsigned k = 1; k < 8; k++)
            vfe_table[k][i] = (vfe_table[k - 1][i] >> 8) ^ vfe_table[0][vfe_table[k - 1][i] & 0xffu];
    vfe_build_shift(vfe_shift_big, VFE_LANE_BIG);
    vfe_build_shift(vfe_shift_small, VFE_LANE_SMALL);
#if VFE_X86
    __builtin_cpu_init();
    vfe_have_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#endif
    vfe_ready = 1;
}

/* Raw (no pre/post inversion) slicing-by-8 software CRC. */
static uint32_t vfe_crc32c_sw(uint32_t crc, const uint8_t *p, size_t len)
{
    while (len >= 8) {
        uint32_t lo = vfe_le32(p) ^ crc;
        uint32_t hi = vfe_le32(p + 4);
        crc = vfe_table[7][lo & 0xffu] ^ vfe_table[6][(lo >> 8) & 0xffu] ^
              vfe_table[5][(lo >> 16) & 0xffu] ^ vfe_table[4][lo >> 24] ^
              vfe_table[3][hi & 0xffu] ^ vfe_table[2][(hi >> 8) & 0xffu] ^
              vfe_table[1][(hi >> 16) & 0xffu] ^ vfe_table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = vfe_table[0][(crc ^ *p++) & 0xffu] ^ (crc >> 8);
    return crc;
}

#if VFE_X86
#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static inline uint32_t vfe_hw_lanes(
    uint32_t crc, const uint8_t *p, size_t lane, uint32_t shift[4][256])
{
    /* Three independent lanes hide the 3-cycle latency of the crc32 instruction. */
    uint64_t c0 = crc, c1 = 0, c2 = 0;
    const uint8_t *p1 = p + lane, *p2 = p + 2 * lane;
    for (size_t i = 0; i < lane; i += 8) {
        uint64_t w0, w1, w2;
        memcpy(&w0, p + i, 8);
        memcpy(&w1, p1 + i, 8);
        memcpy(&w2, p2 + i, 8);
        c0 = _mm_crc32_u64(c0, w0);
        c1 = _mm_crc32_u64(c1, w1);
        c2 = _mm_crc32_u64(c2, w2);
    }
    /* raw(c, A|B|C) = shift(shift(crcA) ^ crcB) ^ crcC, shifting by one lane. */
    uint32_t r = vfe_shift(shift, (uint32_t)c0) ^ (uint32_t)c1;
    return vfe_shift(shift, r) ^ (uint32_t)c2;
}
#endif

__attribute__((target("sse4.2"))) static uint32_t vfe_crc32c_hw(uint32_t crc, const uint8_t *p,
                                                                 size_t len)
{
#if defined(__x86_64__)
    while (len >= 3 * VFE_LANE_BIG) {
        crc = vfe_hw_lanes(crc, p, VFE_LANE_BIG, vfe_shift_big);
        p += 3 * VFE_LANE_BIG;
        len -= 3 * VFE_LANE_BIG;
    }
    while (len >= 3 * VFE_LANE_SMALL) {
        crc = vfe_hw_lanes(crc, p, VFE_LANE_SMALL, vfe_shift_small);
        p += 3 * VFE_LANE_SMALL;
        len -= 3 * VFE_LANE_SMALL;
    }
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        len -= 8;
    }
    crc = (uint32_t)c;
#else
    while (len >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        crc = _mm_crc32_u32(crc, w);
        p += 4;
        len -= 4;
    }
#endif
    while (len--)
        crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

static uint32_t vfe_crc32c(uint32_t crc, const uint8_t *buf, size_t len)
{
    if (!vfe_ready)
        vfe_init();
    uint32_t raw = ~crc;
#if VFE_X86
    if (vfe_have_hw)
        return ~vfe_crc32c_hw(raw, buf, len);
#endif
    return ~vfe_crc32c_sw(raw, buf, len);
}

/* Software-only variant, exposed so tests can check both paths on SSE4.2 hosts. */
static uint32_t vfe_crc32c_soft(uint32_t crc, const uint8_t *buf, size_t len)
{
    if (!vfe_ready)
        vfe_init();
    return ~vfe_crc32c_sw(~crc, buf, len);
}

/*
 * CRC-32C of A || B from crc1 = CRC(A), crc2 = CRC(B) and len2 = |B| (finished values):
 * the inversions cancel, so CRC(A || B) = CRC(A) * x^(8 len2) mod P  xor  CRC(B).
 */
static uint32_t vfe_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2)
{
    if (!vfe_ready)
        vfe_init();
    return vfe_multmodp(vfe_x_pow_8n(len2), crc1) ^ crc2;
}

/* 1 when the CRC uses the SSE4.2 instruction, 0 for the slicing-by-8 tables. */
static int vfe_crc32c_hw_active(void)
{
    if (!vfe_ready)
        vfe_init();
    return vfe_have_hw;
}

static int vfe_is_zero(const uint8_t *p, size_t len)
{
    /* Most non-zero pages differ early: look at the first bytes before the bulk loop. */
    size_t head = len < 64 ? len : 64;
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return 0;
    p += head;
    len -= head;
    while (len >= 256) {
        uint64_t acc = 0;
        for (size_t i = 0; i < 256; i += 8) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            acc |= w;
        }
        if (acc)
            return 0;
        p += 256;
        len -= 256;
    }
    uint8_t tail = 0;
    while (len--)
        tail |= *p++;
    return tail == 0;
}

/*
 * One bit per page of `page` bytes (LSB first: page k is bit k % 8 of out[k / 8]); the
 * bit is set when the page is all zero.  The last page may be partial.  `out` must hold
 * ceil(ceil(len / page) / 8) bytes; it is fully overwritten.  page == 0 writes nothing.
 */
static void vfe_zero_page_bitmap(const uint8_t *buf, size_t len, size_t page, uint8_t *out)
{
    if (page == 0)
        return;
    size_t pages = len / page + (len % page != 0);
    memset(out, 0, (pages + 7) / 8);
    for (size_t k = 0; k < pages; k++) {
        size_t off = k * page;
        size_t n = len - off < page ? len - off : page;
        if (vfe_is_zero(buf + off, n))
            out[k / 8] |= (uint8_t)(1u << (k % 8));
    }
}

/*
 * One bit per page (LSB first), set when the page differs between `a` and `b` (both `len`
 * bytes): finding the pages a guest changed through its mmap of device RAM.
 */
static void vfe_diff_pages(const uint8_t *a, const uint8_t *b, size_t len, size_t page,
                           uint8_t *out)
{
    if (page == 0)
        return;
    size_t pages = len / page + (len % page != 0);
    memset(out, 0, (pages + 7) / 8);
    for (size_t k = 0; k < pages; k++) {
        size_t off = k * page;
        size_t n = len - off < page ? len - off : page;
        if (memcmp(a + off, b + off, n) != 0)
            out[k / 8] |= (uint8_t)(1u << (k % 8));
    }
}

/*
 * Hand `len` bytes at `buf` to the pipe `fd` without copying them (vmsplice): the pipe
 * refers to the caller's pages, so they must not change until the reader consumed them.
 * Non-blocking.  Returns the bytes handed over, or -errno (-EAGAIN: the pipe is full;
 * -ENOSYS where vmsplice does not exist).
 */
static long vfe_vmsplice(int fd, const uint8_t *buf, size_t len)
{
#if defined(__linux__) && defined(SPLICE_F_NONBLOCK)
    struct iovec iov = {(void *)buf, len};
    ssize_t n = vmsplice(fd, &iov, 1, SPLICE_F_NONBLOCK);
    return n < 0 ? -(long)errno : (long)n;
#else
    (void)fd;
    (void)buf;
    (void)len;
    return -ENOSYS;
#endif
}
