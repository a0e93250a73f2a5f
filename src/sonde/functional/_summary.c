/* sonde's fused tensor summary: one pass over float32 data for the nine statistics and a histogram.
 *
 * Compiled on first use by sonde/functional/native.py with the system's C compiler
 * (`cc -O3 -march=native -fopenmp -shared -fPIC`) and loaded with ctypes; without a compiler
 * sonde falls back to torch reductions. Portable C: GCC/Clang vector extensions, no intrinsics.
 *
 * One call reads each element once (twice for a difference `x - y`) and returns the raw
 * partials sonde.functional.finish_summary expects, plus, optionally, histogram counts over
 * equal-width bins and a copy of the data. Large inputs are split over OpenMP threads: built
 * with -fopenmp after `import torch`, the kernel shares torch's own OpenMP runtime (the same
 * libgomp.so.1), so its threads are the ones torch's operations just used.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#define W 8                 /* floats per vector */
#define BLOCK 2048          /* elements per float32 partial, flushed into float64 sums */
#define MAX_BINS 64      /* the bit-sliced histogram of _hist64.c counts up to 64 bins */
#define MAX_THREADS 64
#define MIN_PER_THREAD (1 << 16)
#define HIST_STATE_BYTES 8192

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }
/* min/max that keep `b` when `a` is NaN (NaN is counted apart): one instruction where there is one. */
#if defined(__AVX__)
#include <immintrin.h>
static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vf vmin(vf a, vf b) { return sel(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
#endif

typedef struct {
    const float *x, *y;     /* the data is x, or x - y when y is given */
    float *copy_to;         /* when given, receives a copy of the data */
    int64_t n;
    float shift;            /* sums are taken of (v - shift), for the variance's precision */
    int32_t bins;           /* 0: no histogram */
    float hlo, hscale;
} job_t;

typedef struct {
    double s1, s2, abs_sum;
    float lo, hi;
    int64_t nonzero;
    int64_t hist[MAX_BINS];
} part_t;

/* _hist64.c: exact histograms by positional population count (no scatter, no store stalls). */
size_t sonde_hist_state_size(void);
void sonde_hist_state_init(void *st, int32_t bins);
void sonde_hist_state_add_f32(void *st, const float *x, int64_t n, float lo, float scale);
void sonde_hist_state_finish(void *st, int64_t *counts);

/* The main loop over [a, b); NaN and Inf are not counted here (see count_nonfinite). */
static inline __attribute__((always_inline)) void run_core(
    const job_t *j, int64_t a, int64_t b, part_t *p, void *st, int has_y, int has_copy, int has_hist)
{
    float diff[BLOCK];   /* a block of x - y, for the histogram to read back from L1 */
    const float *x = j->x, *y = j->y;
    float *copy_to = j->copy_to;
    const float shift = j->shift, hlo = j->hlo, hscale = j->hscale;
    vf lo = {0}, hi = {0}, lo2, hi2;
    lo += INFINITY; hi -= INFINITY; lo2 = lo; hi2 = hi;
    double s1 = 0, s2 = 0, as = 0;
    int64_t nz = 0;
    float tlo = INFINITY, thi = -INFINITY;
    int64_t nv = a + (b - a) / (2 * W) * (2 * W);
    int64_t i = a;
    while (i < nv) {
        int64_t end = i + BLOCK < nv ? i + BLOCK : nv;
        vf a1 = {0}, a2 = {0}, aa = {0}, b1 = {0}, b2 = {0}, ba = {0};
        vi cz = {0};
        for (int64_t k = i; k < end; k += 2 * W) {
            vf v = load(x + k), u = load(x + k + W);
            if (has_y) { v -= load(y + k); u -= load(y + k + W); }
            if (has_copy) { store(copy_to + k, v); store(copy_to + k + W, u); }
            vf c = v - shift, d = u - shift;
            a1 += c; a2 += c * c; b1 += d; b2 += d * d;
            aa += vabs(v); ba += vabs(u);
            lo = vmin(v, lo); hi = vmax(v, hi);
            lo2 = vmin(u, lo2); hi2 = vmax(u, hi2);
            cz -= (v != 0.0f); cz -= (u != 0.0f);
            if (has_hist && has_y) { store(diff + (k - i), v); store(diff + (k - i) + W, u); }
        }
        if (has_hist) sonde_hist_state_add_f32(st, has_y ? diff : x + i, end - i, hlo, hscale);
        a1 += b1; a2 += b2; aa += ba;
        for (int l = 0; l < W; l++) { s1 += a1[l]; s2 += a2[l]; as += aa[l]; nz += cz[l]; }
        i = end;
    }
    for (; i < b; i++) {
        float v = has_y ? x[i] - y[i] : x[i];
        if (has_copy) copy_to[i] = v;
        float c = v - shift;
        s1 += c; s2 += (double)c * c; as += fabsf(v);
        tlo = v < tlo ? v : tlo; thi = v > thi ? v : thi;
        nz += v != 0.0f;
        if (has_hist) sonde_hist_state_add_f32(st, &v, 1, hlo, hscale);
    }
    lo = vmin(lo2, lo); hi = vmax(hi2, hi);
    for (int l = 0; l < W; l++) { tlo = lo[l] < tlo ? lo[l] : tlo; thi = hi[l] > thi ? hi[l] : thi; }
    p->s1 = s1; p->s2 = s2; p->abs_sum = as; p->lo = tlo; p->hi = thi; p->nonzero = nz;
}

static void run_part(const job_t *j, int64_t a, int64_t b, part_t *p)
{
    char st[HIST_STATE_BYTES] __attribute__((aligned(32)));
    if (j->bins) {
        memset(p->hist, 0, sizeof p->hist);
        sonde_hist_state_init(st, j->bins);
    }
    /* Specialised loops: the flags are constants in each, so the branches vanish. */
    if (j->bins) {
        if (j->y) run_core(j, a, b, p, st, 1, 0, 1);
        else if (j->copy_to) run_core(j, a, b, p, st, 0, 1, 1);
        else run_core(j, a, b, p, st, 0, 0, 1);
        sonde_hist_state_finish(st, p->hist);
    } else {
        if (j->y) run_core(j, a, b, p, st, 1, 0, 0);
        else if (j->copy_to) run_core(j, a, b, p, st, 0, 1, 0);
        else run_core(j, a, b, p, st, 0, 0, 0);
    }
}

static void count_nonfinite(const float *x, const float *y, int64_t n, int64_t *nans, int64_t *infs)
{
    int64_t a = 0, b = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = y ? x[i] - y[i] : x[i];
        a += v != v;
        b += fabsf(v) == INFINITY;
    }
    *nans = a; *infs = b;
}

/* Summarise x (or x - y) of n float32 elements.
 *
 * out[10] receives the raw partials (n, shift, s1, s2, min, max, abs_sum, nonzeros, nans, infs)
 * of sonde.functional.summarize_raw. When bins > 0 (at most 64), hist[bins] receives counts of
 * equal-width bins: bin = (int)clamp((v - hlo) * hscale, 0, bins - 1) in float32 arithmetic, NaN
 * not counted. When copy_to is given (and y is not), it receives a copy of x. threads: how many
 * threads may share the work. Returns 0, or -1 when bins is out of range.
 */
int sonde_summarize(const float *x, const float *y, float *copy_to, int64_t n, int32_t bins,
                    float hlo, float hscale, int32_t threads, double *out, int64_t *hist)
{
    if (bins < 0 || bins > MAX_BINS || (bins && sonde_hist_state_size() > HIST_STATE_BYTES)) return -1;
    if (y) copy_to = 0;
    job_t job = {x, y, copy_to, n, 0.0f, bins, hlo, hscale};
    if (n > 0) {
        float first = y ? x[0] - y[0] : x[0];
        job.shift = isfinite(first) ? first : 0.0f;
    }
    int want = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (n / MIN_PER_THREAD < want) want = (int)(n / MIN_PER_THREAD) > 1 ? (int)(n / MIN_PER_THREAD) : 1;
    int used = want;
    part_t local, *results = &local;   /* one partial per thread */
    if (used > 1) {
        results = malloc(sizeof(part_t) * (size_t)used);
        if (!results) used = 1, results = &local;
    }
    int64_t chunk = (n / used) / (2 * W) * (2 * W);
#ifdef _OPENMP
#pragma omp parallel for num_threads(used) schedule(static, 1) if (used > 1)
#endif
    for (int t = 0; t < used; t++)
        run_part(&job, t * chunk, t == used - 1 ? n : (t + 1) * chunk, &results[t]);

    double s1 = 0, s2 = 0, as = 0;
    float lo = INFINITY, hi = -INFINITY;
    int64_t nz = 0;
    for (int t = 0; t < used; t++) {
        part_t *p = &results[t];
        s1 += p->s1; s2 += p->s2; as += p->abs_sum; nz += p->nonzero;
        lo = p->lo < lo ? p->lo : lo;
        hi = p->hi > hi ? p->hi : hi;
        if (bins)
            for (int k = 0; k < bins; k++) hist[k] = (t ? hist[k] : 0) + p->hist[k];
    }
    if (results != &local) free(results);
    int64_t nans = 0, infs = 0;
    if (!isfinite(as)) {   /* rare: count NaN and Inf in a second pass */
        count_nonfinite(x, y, n, &nans, &infs);
        if (nans) {
            lo = NAN; hi = NAN;
            if (bins) hist[0] -= nans;   /* the bin rule sends NaN to bin 0 */
        }
    }
    out[0] = (double)n; out[1] = job.shift; out[2] = s1; out[3] = s2; out[4] = lo; out[5] = hi;
    out[6] = as; out[7] = (double)nz; out[8] = (double)nans; out[9] = (double)infs;
    return 0;
}
