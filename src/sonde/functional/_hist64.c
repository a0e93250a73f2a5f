/*
 * hist64.c -- exact, fast histogram of float32 data into <= 64 equal-width
 * bins, single-threaded.
 *
 * Bin rule (bit-exact with the scalar reference):
 *     p = (v - lo) * scale            (float32, two roundings, no FMA)
 *     p = p > 0 ? p : 0               (NaN -> 0)
 *     p = p < (float)(bins-1) ? p : (float)(bins-1)
 *     bin = (int)p                    (truncation)
 *
 * Technique: "positional population count".  Every element becomes a one-hot
 * bit pattern (1u << bin) held in 32-bit SIMD lanes: one vector for bins 0..31
 * ("lo tree") and, only when bins > 32, one for bins 32..63 ("hi tree",
 * 1u << (bin ^ 32); the variable shift yields 0 for counts >= 32).  The
 * one-hot vectors are summed bit-position-wise with a Harley-Seal carry-save
 * adder network (Klarqvist/Mula/Lemire 2019): 16 input vectors -> persistent
 * ones/twos/fours/eights + one "sixteens" vector; 16 sixteens -> a second
 * Harley-Seal level (weights 16..128) + one "256s" vector; 256s are
 * ripple-added into bit-sliced vertical counters.  Everything is decoded into
 * int64 counts only once, at the end (flush).  The work per element is
 * independent of the data distribution (no scatter, no store-forwarding
 * stalls), so all-equal data is as fast as uniform data.
 *
 * Bin 0 is never decoded: elements whose int32 bin is negative (NaN, p<=-1)
 * produce an all-zero pattern, and counts[0] is derived as
 * (elements processed) - sum(counts[1..bins)).  That removes the max(p,0) op.
 *
 * Paths: AVX2 intrinsics under __AVX2__; otherwise GCC/Clang vector
 * extensions (vector_size(32)), which are portable to any target.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#define EXPORT __attribute__((visibility("default")))
#define INLINE static inline __attribute__((always_inline))

typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
/* unaligned-access variants for loads from user memory */
typedef uint32_t v8u_un __attribute__((vector_size(32), aligned(1)));
typedef float v8f_un __attribute__((vector_size(32), aligned(1)));

#define NR 24 /* ripple levels: weights 2^8 .. 2^31 (vectors) */

/* Internal state.  Must be 32-byte aligned (public API aligns a raw buffer). */
typedef struct {
    v8u l1[2][4];    /* weights 1,2,4,8 (in input vectors) for lo/hi tree */
    v8u l2[2][4];    /* weights 16,32,64,128 */
    v8u buf[16][2];  /* pending "sixteens" */
    v8u rip[2][NR];  /* weights 256 << k */
    int32_t nbuf;    /* pending sixteens in buf */
    int32_t bins;
    int32_t two;     /* 1 if bins > 32 (hi tree active) */
    int32_t pad_;
    uint64_t n256;   /* number of 256-vectors ripple-added */
    int64_t nvec;    /* elements that went through the bit-sliced path */
    int64_t acc[64]; /* exact counts (tails + flushed), bin 0 handled below */
    uint32_t sub[8][64]; /* scalar-path sub-histograms */
} hstate;

/* ------------------------------------------------------------------ */
/* carry-save adder: (h,l) = a + b + c bitwise                         */
#define CSA(h, l, a, b, c)                                                   \
    do {                                                                      \
        v8u a_ = (a), b_ = (b), c_ = (c);                                     \
        v8u u_ = a_ ^ b_;                                                     \
        (h) = (a_ & b_) | (u_ & c_);                                          \
        (l) = u_ ^ c_;                                                        \
    } while (0)

/* Harley-Seal over 16 inputs in[0..15] with state s[0..3]; returns sixteens */
#define HS16(s0, s1, s2, s3, IN, out)                                         \
    do {                                                                      \
        v8u tA, tB, fA, fB, eA, eB;                                           \
        CSA(tA, s0, IN(0), IN(1), s0);                                        \
        CSA(tB, s0, IN(2), IN(3), s0);                                        \
        CSA(fA, s1, tA, tB, s1);                                              \
        CSA(tA, s0, IN(4), IN(5), s0);                                        \
        CSA(tB, s0, IN(6), IN(7), s0);                                        \
        CSA(fB, s1, tA, tB, s1);                                              \
        CSA(eA, s2, fA, fB, s2);                                              \
        CSA(tA, s0, IN(8), IN(9), s0);                                        \
        CSA(tB, s0, IN(10), IN(11), s0);                                      \
        CSA(fA, s1, tA, tB, s1);                                              \
        CSA(tA, s0, IN(12), IN(13), s0);                                      \
        CSA(tB, s0, IN(14), IN(15), s0);                                      \
        CSA(fB, s1, tA, tB, s1);                                              \
        CSA(eB, s2, fA, fB, s2);                                              \
        CSA(out, s3, eA, eB, s3);                                             \
    } while (0)

/* ------------------------------------------------------------------ */
/* one-hot generation                                                  */
#ifdef __AVX2__
INLINE v8u onehot_lo(v8i b) {
    return (v8u)_mm256_sllv_epi32(_mm256_set1_epi32(1), (__m256i)b);
}
INLINE v8u onehot_hi(v8i b) {
    return (v8u)_mm256_sllv_epi32(_mm256_set1_epi32(1),
                                  _mm256_xor_si256((__m256i)b, _mm256_set1_epi32(32)));
}
/* f32 -> int32 bin with top clamp only; NaN / p<=-1 -> negative */
INLINE v8i binf(const float *x, __m256 vlo, __m256 vsc, __m256 vtop) {
    /* vlo holds -lo: x + (-lo) is exactly x - lo in IEEE arithmetic, and the
       commutative add lets the compiler fold the unaligned load. */
    __m256 p = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(x), vlo), vsc);
    p = _mm256_min_ps(vtop, p); /* top < p ? top : p  (NaN stays NaN) */
    return (v8i)_mm256_cvttps_epi32(p);
}
#else
INLINE v8u onehot_lo(v8i b) {
    v8u one = {1, 1, 1, 1, 1, 1, 1, 1};
    v8u ub = (v8u)b;
    return (v8u)(ub < 32) & (one << (ub & 31));
}
INLINE v8u onehot_hi(v8i b) {
    v8u one = {1, 1, 1, 1, 1, 1, 1, 1};
    v8u ub = (v8u)b - 32;
    return (v8u)(ub < 32) & (one << (ub & 31));
}
typedef struct { v8f lo, sc, top; } fparams;
INLINE v8i binf_p(const float *x, v8f vlo, v8f vsc, v8f vtop) {
    v8f v = *(const v8f_un *)x;
    v8f p = (v - vlo) * vsc;
    v8i m = p > 0;
    p = (v8f)((v8i)p & m);
    m = p < vtop;
    p = (v8f)(((v8i)p & m) | ((v8i)vtop & ~m));
    return __builtin_convertvector(p, v8i);
}
#endif

/* ------------------------------------------------------------------ */
/* second level: 16 sixteens -> l2 state, 256s rippled                 */
static void level2(hstate *st) {
    for (int t = 0; t <= st->two; t++) {
        v8u s0 = st->l2[t][0], s1 = st->l2[t][1], s2 = st->l2[t][2], s3 = st->l2[t][3];
        v8u out;
#define IN2(i) st->buf[i][t]
        HS16(s0, s1, s2, s3, IN2, out);
#undef IN2
        st->l2[t][0] = s0; st->l2[t][1] = s1; st->l2[t][2] = s2; st->l2[t][3] = s3;
        v8u c = out;
        for (int k = 0; k < NR; k++) {
            v8u r = st->rip[t][k];
            st->rip[t][k] = r ^ c;
            c = r & c;
        }
    }
    st->n256++;
    st->nbuf = 0;
}

/* decode a bit-sliced vector with weight w into acc[off..off+32) */
static void decode(int64_t *acc, int off, v8u v, int64_t w) {
    uint32_t lanes[8];
    memcpy(lanes, &v, 32);
    uint32_t any = 0;
    for (int i = 0; i < 8; i++) any |= lanes[i];
    if (!any) return;
#ifdef __AVX2__
    __m256i x = (__m256i)v;
    for (int j = 0; j < 32; j++) {
        int m = _mm256_movemask_ps(_mm256_castsi256_ps(x));
        acc[off + 31 - j] += w * __builtin_popcount((unsigned)m);
        x = _mm256_slli_epi32(x, 1);
    }
#else
    for (int i = 0; i < 8; i++) {
        uint32_t u = lanes[i];
        while (u) {
            acc[off + __builtin_ctz(u)] += w;
            u &= u - 1;
        }
    }
#endif
}

/* decode everything into st->acc and reset bit-sliced state */
static void flush_state(hstate *st) {
    /* pending sixteens: weight 16 each */
    for (int i = 0; i < st->nbuf; i++)
        for (int t = 0; t <= st->two; t++) decode(st->acc, 32 * t, st->buf[i][t], 16);
    int nlev = 0;
    while (nlev < NR && (st->n256 >> nlev)) nlev++;
    for (int t = 0; t <= st->two; t++) {
        for (int k = 0; k < 4; k++) decode(st->acc, 32 * t, st->l1[t][k], (int64_t)1 << k);
        for (int k = 0; k < 4; k++) decode(st->acc, 32 * t, st->l2[t][k], (int64_t)16 << k);
        for (int k = 0; k < nlev; k++)
            decode(st->acc, 32 * t, st->rip[t][k], (int64_t)256 << k);
    }
    /* bin 0 was not tracked: derive it.  acc[0] gets nvec - sum(acc[1..]) of
       the bit-sliced contribution.  We decoded bit 0 as well (harmless), so
       subtract it back out first. */
    /* (decode added bit-0 counts into acc[0]; we recompute below) */
    memset(st->l1, 0, sizeof st->l1);
    memset(st->l2, 0, sizeof st->l2);
    memset(st->rip, 0, sizeof st->rip);
    st->nbuf = 0;
    st->n256 = 0;
}

INLINE void scalar_f32(int64_t *acc, const float *x, int64_t n, float lo, float scale,
                       float top) {
    for (int64_t i = 0; i < n; i++) {
        float p = (x[i] - lo) * scale;
        p = p > 0.0f ? p : 0.0f;
        p = p < top ? p : top;
        acc[(int)p]++;
    }
}

/* ------------------------------------------------------------------ */
/* main loop                                                           */
/* A group is 16 + NSC vectors of 8 elements.  The first 16 vectors go
   through the Harley-Seal network (vector pipes); the remaining NSC vectors
   are counted with scalar increments into 8 interleaved uint32
   sub-histograms (integer/load-store pipes), which run in parallel with
   the vector work on an out-of-order core.  NSC is tuned per tree count. */
#ifndef NSC_TWO
#define NSC_TWO 0
#endif
#ifndef NSC_ONE
#define NSC_ONE 0
#endif

#ifdef __AVX2__
INLINE v8i vmax0(v8i b) { return (v8i)_mm256_max_epi32((__m256i)b, _mm256_setzero_si256()); }
#else
INLINE v8i vmax0(v8i b) { return b & ~(b < 0); }
#endif

#define MAIN_LOOP(TWO, NSC, BIN_EXPR)                                         \
    do {                                                                      \
        const v8u z = {0, 0, 0, 0, 0, 0, 0, 0};                               \
        v8u a0 = st->l1[0][0], a1 = st->l1[0][1], a2 = st->l1[0][2],          \
            a3 = st->l1[0][3];                                                \
        v8u b0 = st->l1[1][0], b1 = st->l1[1][1], b2 = st->l1[1][2],          \
            b3 = st->l1[1][3];                                                \
        uint32_t(*sub)[64] = st->sub;                                         \
        /* indices for the scalar part, software-pipelined by one group:     \
           group g's indices are counted while group g+1 runs */             \
        int32_t tb_[8 * NSC + 8] __attribute__((aligned(32)));                \
        for (int j = 0; j < 8 * NSC; j++) tb_[j] = 0;                         \
        int first_ = 1;                                                       \
        for (int64_t g = 0; g < ngroups; g++) {                               \
            v8i bb[16 + NSC];                                                 \
            for (int i = 0; i < 16 + NSC; i++) bb[i] = BIN_EXPR(i);           \
            v8u outA, outB = z;                                               \
            if (NSC) {                                                        \
                __asm__("" : "+m"(tb_));                                      \
                if (!first_)                                                  \
                    for (int j = 0; j < NSC; j++)                             \
                        for (int l = 0; l < 8; l++) sub[l][tb_[8 * j + l]]++; \
                first_ = 0;                                                   \
                __asm__("" : "+m"(tb_));                                      \
                for (int j = 0; j < NSC; j++) {                               \
                    v8i mx_ = vmax0(bb[16 + j]);                              \
                    memcpy(tb_ + 8 * j, &mx_, 32);                            \
                }                                                             \
            }                                                                 \
            HS16(a0, a1, a2, a3, INLO, outA);                                 \
            if (TWO) HS16(b0, b1, b2, b3, INHI, outB);                        \
            st->buf[st->nbuf][0] = outA;                                      \
            if (TWO) st->buf[st->nbuf][1] = outB;                             \
            if (++st->nbuf == 16) level2(st);                                 \
            x += 8 * (16 + NSC);                                              \
        }                                                                     \
        if (NSC && !first_) {                                                 \
            __asm__("" : "+m"(tb_));                                          \
            for (int j = 0; j < NSC; j++)                                     \
                for (int l = 0; l < 8; l++) sub[l][tb_[8 * j + l]]++;         \
        }                                                                     \
        st->l1[0][0] = a0; st->l1[0][1] = a1; st->l1[0][2] = a2;              \
        st->l1[0][3] = a3;                                                    \
        st->l1[1][0] = b0; st->l1[1][1] = b1; st->l1[1][2] = b2;              \
        st->l1[1][3] = b3;                                                    \
    } while (0)
#define INLO(i) onehot_lo(bb[i])
#define INHI(i) onehot_hi(bb[i])

/* max elements through the bit-sliced path between internal flushes:
   per lane-bit capacity is 2^(8+NR) - 1 vectors and the uint32
   sub-histograms get <= NSC/16 of that; stay far below both limits. */
#define MAX_BETWEEN_FLUSH ((int64_t)1 << 32)

static void maybe_flush(hstate *st, int64_t upcoming);

/* runs the group loop over as many whole groups as fit; returns #elements */
#define RUN_GROUPS(TWO, NSC, BIN_EXPR)                                        \
    do {                                                                      \
        const int64_t G = 8 * (16 + NSC);                                     \
        int64_t ngroups_total = n / G;                                        \
        while (ngroups_total > 0) {                                           \
            int64_t ngroups = ngroups_total;                                  \
            if (ngroups > MAX_BETWEEN_FLUSH / 128)                            \
                ngroups = MAX_BETWEEN_FLUSH / 128;                            \
            maybe_flush(st, ngroups * 128);                                   \
            MAIN_LOOP(TWO, NSC, BIN_EXPR);                                    \
            st->nvec += ngroups * 128;                                        \
            ngroups_total -= ngroups;                                         \
            done += ngroups * G;                                              \
        }                                                                     \
    } while (0)

static void add_f32(hstate *st, const float *x, int64_t n, float lo, float scale) {
    float top = (float)(st->bins - 1);
    int64_t done = 0;
    const float *x0 = x;
#ifdef __AVX2__
    __m256 vlo = _mm256_set1_ps(-lo), vsc = _mm256_set1_ps(scale), vtop = _mm256_set1_ps(top);
#define BINF(i) binf(x + 8 * (i), vlo, vsc, vtop)
#else
    v8f vlo = {lo, lo, lo, lo, lo, lo, lo, lo};
    v8f vsc = {scale, scale, scale, scale, scale, scale, scale, scale};
    v8f vtop = {top, top, top, top, top, top, top, top};
#define BINF(i) binf_p(x + 8 * (i), vlo, vsc, vtop)
#endif
    if (st->two) RUN_GROUPS(1, NSC_TWO, BINF);
    else RUN_GROUPS(0, NSC_ONE, BINF);
#undef BINF
    scalar_f32(st->acc, x0 + done, n - done, lo, scale, top);
}

/* Decode the bit-sliced state into acc (bin 0 derived), reset it. */
static void finalize_into_acc(hstate *st) {
    int64_t before[64];
    memcpy(before, st->acc, sizeof before);
    flush_state(st);
    int64_t sum = 0;
    for (int b = 1; b < 64; b++) sum += st->acc[b] - before[b];
    st->acc[0] = before[0] + (st->nvec - sum);
    st->nvec = 0;
    for (int l = 0; l < 8; l++)
        for (int b = 0; b < 64; b++) st->acc[b] += st->sub[l][b];
    memset(st->sub, 0, sizeof st->sub);
}

static void maybe_flush(hstate *st, int64_t upcoming) {
    if (st->nvec + upcoming > MAX_BETWEEN_FLUSH) finalize_into_acc(st);
}

static void init_state(hstate *st, int32_t bins) {
    memset(st, 0, sizeof *st);
    st->bins = bins;
    st->two = bins > 32;
}

/* ================================================================== */
/* public API                                                          */

/* ---- streaming (block) interface ----
 * The state lives in a caller-provided buffer of sonde_hist_state_size()
 * bytes (any alignment; it is aligned internally).  Usage:
 *     sonde_hist_state_init(buf, bins);
 *     sonde_hist_state_add_f32(buf, ...); // any number of times, any n >= 0
 *     sonde_hist_state_finish(buf, counts); // ADDS into counts[0..bins), resets
 * Blocks of any size are fine (e.g. 4096 elements each).  Elements are
 * processed in groups of 128; the remainder of each call is counted exactly
 * with scalar code, so prefer block sizes that are multiples of 128. */
INLINE hstate *aligned_state(void *buf) {
    return (hstate *)(((uintptr_t)buf + 31) & ~(uintptr_t)31);
}
EXPORT size_t sonde_hist_state_size(void) { return sizeof(hstate) + 32; }
EXPORT void sonde_hist_state_init(void *buf, int32_t bins) {
    if (bins < 1) bins = 1;
    if (bins > 64) bins = 64;
    init_state(aligned_state(buf), bins);
}
/* float32 data, the bin rule at the top of this file */
EXPORT void sonde_hist_state_add_f32(void *buf, const float *x, int64_t n, float lo,
                                     float scale) {
    if (n > 0) add_f32(aligned_state(buf), x, n, lo, scale);
}
EXPORT void sonde_hist_state_finish(void *buf, int64_t *counts) {
    hstate *st = aligned_state(buf);
    finalize_into_acc(st);
    for (int b = 0; b < st->bins; b++) counts[b] += st->acc[b];
    memset(st->acc, 0, sizeof st->acc);
}
