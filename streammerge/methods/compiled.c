/* The task-arithmetic family's passes over a chunk, each in one loop, linear's and slerp's, and the
 * engine's NaN/Inf check; see compiled.py.
 *
 * Every value is held as the float32 it widens to; each operation is computed in float32 and
 * rounded to the working dtype after it (ROUND), as torch's CPU kernels do for bfloat16 and
 * float16, in the same order. Built with -ffp-contract=off: a fused multiply-add would round once
 * where torch rounds twice. Returns 0 when a task vector or a result is not finite (the caller
 * merges that chunk on the torch path), else 1.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 2048 /* elements per model held in float32 at once: 8 KiB a row, in L1/L2 */

static inline float f_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t u_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* bfloat16: torch's vectorized conversion rounds to nearest even and writes NaN as 0xFFFF */
static inline float load_bf16(uint16_t v) { return f_of((uint32_t)v << 16); }
static inline float round_bf16(float x) { /* branch-free, so that loops of it vectorize */
    uint32_t u = u_of(x), r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return f_of((u & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFF0000u : r);
}
static inline uint16_t store_bf16(float x) { return (uint16_t)(u_of(x) >> 16); }
static inline int64_t key_bf16(float x) { return (u_of(x) >> 16) & 0x7FFF; }

/* float16: IEEE binary16, round to nearest even (the F16C conversion torch uses) */
static inline float load_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 31) return f_of(sign | 0x7F800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return f_of(sign);
        e = 1;
        while ((m & 0x400u) == 0) { m <<= 1; e -= 1; }
        return f_of(sign | ((e + 112) << 23) | ((m & 0x3FFu) << 13));
    }
    return f_of(sign | ((e + 112) << 23) | (m << 13));
}
static inline uint16_t store_f16(float x) {
    uint32_t u = u_of(x), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u));
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* 65520 and above: infinity */
    if (a >= 0x38800000u) return (uint16_t)(sign | (((a + 0xFFFu + ((a >> 13) & 1u)) >> 13) - (112u << 10)));
    if (a < 0x33000000u) return (uint16_t)sign; /* below half the smallest subnormal */
    uint32_t shift = 126 - (a >> 23), m = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (q & 1u))) q += 1;
    return (uint16_t)(sign | q);
}
static inline float round_f16(float x) { return load_f16(store_f16(x)); }
static inline int64_t key_f16(float x) { return u_of(x) & 0x7FFFFFFF; }

/* float32 */
static inline float load_f32(uint32_t v) { return f_of(v); }
static inline float round_f32(float x) { return x; }
static inline uint32_t store_f32(float x) { return u_of(x); }
static inline int64_t key_f32(float x) { return u_of(x) & 0x7FFFFFFF; }

static inline int finite(float x) { return (u_of(x) & 0x7F800000u) != 0x7F800000u; }
static inline int nonzero(float x) { return (u_of(x) & 0x7FFFFFFFu) != 0; }
static inline uint32_t sign_of(float x) { return u_of(x) >> 31; }

enum { KEEP_ALL, KEEP_AT_LEAST, KEEP_ABOVE, KEEP_MASKED };

/* b = B and d[i] = x_i − B (rounded) for elements [s, s + m); 0 if a δ is not finite */
#define DELTAS(T, K)                                                                          \
    static int deltas_##K(const T *base, const T *const *models, int n, int64_t s, int m,    \
                          float *b, float *d) {                                               \
        int clean = 1;                                                                        \
        for (int j = 0; j < m; j++) b[j] = load_##K(base[s + j]);                             \
        for (int i = 0; i < n; i++) {                                                         \
            const T *x = models[i] + s;                                                       \
            float *di = d + (int64_t)i * BLOCK;                                               \
            for (int j = 0; j < m; j++) di[j] = round_##K(load_##K(x[j]) - b[j]);             \
            for (int j = 0; j < m; j++) clean &= finite(di[j]);                               \
        }                                                                                     \
        return clean;                                                                         \
    }

#define MERGE(T, K)                                                                                  \
    int gta_merge_##K(const T *base, const T *const *models, int n, int64_t size, const int *modes, \
                      const int64_t *thresholds, const uint8_t *const *masks, const float *scales,  \
                      const float *weights, int consensus, int normalize, float divide, float lam,  \
                      T *out) {                                                                     \
        float *scratch = malloc(sizeof(float) * BLOCK * (size_t)(n + 4));                           \
        if (!scratch) return -1;                                                                    \
        float *b = scratch, *t = b + BLOCK, *a = t + BLOCK, *w = a + BLOCK, *d = w + BLOCK;         \
        int clean = 1;                                                                              \
        for (int64_t s = 0; s < size; s += BLOCK) {                                                 \
            int m = size - s < BLOCK ? (int)(size - s) : BLOCK;                                     \
            clean &= deltas_##K(base, models, n, s, m, b, d);                                       \
            for (int i = 0; i < n; i++) {                                                           \
                float *di = d + (int64_t)i * BLOCK;                                                 \
                int64_t limit = thresholds[i];                                                      \
                if (modes[i] == KEEP_AT_LEAST)                                                      \
                    for (int j = 0; j < m; j++) di[j] = key_##K(di[j]) >= limit ? di[j] : 0.0f;     \
                else if (modes[i] == KEEP_ABOVE)                                                    \
                    for (int j = 0; j < m; j++) di[j] = key_##K(di[j]) > limit ? di[j] : 0.0f;      \
                else if (modes[i] == KEEP_MASKED) {                                                 \
                    const uint8_t *mk = masks[i] + s;                                               \
                    for (int j = 0; j < m; j++) di[j] = mk[j] ? di[j] : 0.0f;                       \
                }                                                                                   \
                if (scales[i] != 1.0f)                                                              \
                    for (int j = 0; j < m; j++) di[j] = round_##K(di[j] * scales[i]);               \
                for (int j = 0; j < m; j++) di[j] = round_##K(di[j] * weights[i]);                  \
            }                                                                                       \
            for (int j = 0; j < m; j++) t[j] = d[j];                                                \
            for (int i = 1; i < n; i++)                                                             \
                for (int j = 0; j < m; j++) t[j] += d[(int64_t)i * BLOCK + j];                      \
            for (int j = 0; j < m; j++) t[j] = round_##K(t[j]);                                     \
            if (consensus) {                                                                        \
                /* agreeing: nonzero, with the sign of the rounded Σ δ_i; the others add +0 */      \
                for (int j = 0; j < m; j++) a[j] = w[j] = 0.0f;                                     \
                for (int i = 0; i < n; i++) {                                                       \
                    const float *di = d + (int64_t)i * BLOCK;                                       \
                    float wi = weights[i];                                                          \
                    for (int j = 0; j < m; j++) {                                                   \
                        int agree = nonzero(di[j]) & (sign_of(di[j]) == sign_of(t[j]));          \
                        a[j] += agree ? di[j] : 0.0f;                                               \
                        w[j] += agree ? wi : 0.0f;                                                  \
                    }                                                                               \
                }                                                                                   \
                for (int j = 0; j < m; j++) t[j] = round_##K(a[j]);                                 \
                if (normalize)                                                                      \
                    for (int j = 0; j < m; j++)                                                     \
                        t[j] = round_##K(t[j] / (nonzero(round_##K(w[j])) ? round_##K(w[j]) : 1.0f)); \
            } else if (divide != 0.0f) {                                                            \
                for (int j = 0; j < m; j++) t[j] = round_##K(t[j] / divide);                        \
            }                                                                                       \
            if (lam != 1.0f)                                                                        \
                for (int j = 0; j < m; j++) t[j] = round_##K(t[j] * lam);                           \
            /* three loops, not one: with the check and the narrowing store together gcc did not */ \
            /* vectorize it (2.1 against 1.0 ns an element) */                                      \
            for (int j = 0; j < m; j++) t[j] = round_##K(t[j] + b[j]);                              \
            for (int j = 0; j < m; j++) clean &= finite(t[j]);                                      \
            for (int j = 0; j < m; j++) out[s + j] = store_##K(t[j]);                               \
        }                                                                                           \
        free(scratch);                                                                              \
        return clean;                                                                               \
    }

DELTAS(uint16_t, bf16)
DELTAS(uint16_t, f16)
DELTAS(uint32_t, f32)
MERGE(uint16_t, bf16)
MERGE(uint16_t, f16)
MERGE(uint32_t, f32)

/* gta_merge without keep masks, scales or sign election (plain task arithmetic): the same
 * roundings in one pass per model over a block, not four, and no scratch per model. */
#define TASK_SUM(T, K)                                                                               \
    int task_sum_##K(const T *base, const T *const *models, int n, int64_t size,                    \
                     const float *weights, float divide, float lam, T *out) {                       \
        float b[BLOCK], t[BLOCK];                                                                   \
        uint32_t bad = 0; /* OR of every exponent field that is all ones (not finite) */           \
        for (int64_t s = 0; s < size; s += BLOCK) {                                                 \
            int m = size - s < BLOCK ? (int)(size - s) : BLOCK;                                     \
            for (int j = 0; j < m; j++) b[j] = load_##K(base[s + j]);                               \
            for (int i = 0; i < n; i++) {                                                           \
                const T *x = models[i] + s;                                                         \
                float wi = weights[i];                                                              \
                for (int j = 0; j < m; j++) {                                                       \
                    float d = round_##K(load_##K(x[j]) - b[j]);                                     \
                    bad |= ~u_of(d) & 0x7F800000u ? 0u : 1u;                                        \
                    d = round_##K(d * wi);                                                          \
                    t[j] = i == 0 ? d : t[j] + d;                                                   \
                }                                                                                   \
            }                                                                                       \
            for (int j = 0; j < m; j++) t[j] = round_##K(t[j]);                                     \
            if (divide != 0.0f)                                                                     \
                for (int j = 0; j < m; j++) t[j] = round_##K(t[j] / divide);                        \
            if (lam != 1.0f)                                                                        \
                for (int j = 0; j < m; j++) t[j] = round_##K(t[j] * lam);                           \
            for (int j = 0; j < m; j++) {                                                           \
                t[j] = round_##K(t[j] + b[j]);                                                      \
                bad |= ~u_of(t[j]) & 0x7F800000u ? 0u : 1u;                                         \
            }                                                                                       \
            for (int j = 0; j < m; j++) out[s + j] = store_##K(t[j]);                               \
        }                                                                                           \
        return !bad;                                                                                \
    }

TASK_SUM(uint16_t, bf16)
TASK_SUM(uint16_t, f16)
TASK_SUM(uint32_t, f32)

/* |δ| = |x − B| of one model, the subtraction rounded to T and the sign bit cleared, as torch's sub
 * then abs: one pass where torch took two, each with a temporary (DARE's and DELLA's L1 pass).
 * Returns 0 when a δ is not finite. */
#define ABS_DELTA(T, K, SIGN)                                                                        \
    int abs_delta_##K(const T *base, const T *x, int64_t size, T *out) {                            \
        uint32_t bad = 0;                                                                           \
        for (int64_t j = 0; j < size; j++) {                                                        \
            float d = round_##K(load_##K(x[j]) - load_##K(base[j]));                                \
            bad |= ~u_of(d) & 0x7F800000u ? 0u : 1u;                                                \
            out[j] = store_##K(d) & (T)~SIGN;                                                       \
        }                                                                                           \
        return !bad;                                                                                \
    }

ABS_DELTA(uint16_t, bf16, 0x8000u)
ABS_DELTA(uint16_t, f16, 0x8000u)
ABS_DELTA(uint32_t, f32, 0x80000000u)

/* linear_merge in float32 from inputs of type T: out = ((+0 + x_0·w_0) + x_1·w_1 + …) / divisor
 * (no division unless normalize), each step as torch's addcmul_ rounds it on this machine: one
 * fused multiply-add (fused), or a rounded product then a rounded sum. Widened as loaded, where
 * torch first widened every input in a pass of its own. */
#define LINEAR(T, K)                                                                                 \
    int linear_##K(const T *const *models, int n, int64_t size, const float *w, int fused,           \
                   int normalize, float divisor, float *out) {                                      \
        int clean = 1;                                                                              \
        for (int64_t s = 0; s < size; s += BLOCK) {                                                 \
            int m = size - s < BLOCK ? (int)(size - s) : BLOCK;                                     \
            float *o = out + s;                                                                     \
            for (int j = 0; j < m; j++) o[j] = 0.0f;                                                \
            for (int i = 0; i < n; i++) {                                                           \
                const T *x = models[i] + s;                                                         \
                float wi = w[i];                                                                    \
                if (fused)                                                                          \
                    for (int j = 0; j < m; j++) o[j] = __builtin_fmaf(load_##K(x[j]), wi, o[j]);    \
                else                                                                                \
                    for (int j = 0; j < m; j++) o[j] = o[j] + load_##K(x[j]) * wi;                  \
            }                                                                                       \
            if (normalize)                                                                          \
                for (int j = 0; j < m; j++) o[j] = o[j] / divisor;                                  \
            for (int j = 0; j < m; j++) clean &= finite(o[j]);                                      \
        }                                                                                           \
        return clean;                                                                               \
    }

LINEAR(uint16_t, bf16)
LINEAR(uint16_t, f16)
LINEAR(uint32_t, f32)

/* slerp_merge in float32 from two inputs of type T: out = s0·v0 + s1·v1, the weights rounded to
 * float32 as torch rounds a Python scalar for a float32 tensor, each product rounded. */
#define SLERP(T, K)                                                                                  \
    void slerp_##K(const T *v0, const T *v1, int64_t size, float s0, float s1, float *out) {        \
        for (int64_t j = 0; j < size; j++) out[j] = s0 * load_##K(v0[j]) + s1 * load_##K(v1[j]);   \
    }

/* slerp's dot pass: the terms of ⟨v0, v1⟩, ‖v0‖² and ‖v1‖², each a float64 product of values
 * widened from T (exactly), into out[0, size), [size, 2·size) and [2·size, 3·size) for torch to
 * sum row by row; torch took a pass to widen each input and one per product. */
#define PRODUCTS(T, K)                                                                               \
    void products_##K(const T *v0, const T *v1, int64_t size, double *out) {                        \
        for (int64_t j = 0; j < size; j++) {                                                        \
            double a = load_##K(v0[j]), b = load_##K(v1[j]);                                        \
            out[j] = a * b;                                                                         \
            out[size + j] = a * a;                                                                  \
            out[2 * size + j] = b * b;                                                              \
        }                                                                                           \
    }

SLERP(uint16_t, bf16)
SLERP(uint16_t, f16)
SLERP(uint32_t, f32)
PRODUCTS(uint16_t, bf16)
PRODUCTS(uint16_t, f16)
PRODUCTS(uint32_t, f32)

/* Per wanted model, counts of the bfloat16 magnitude keys of x_i − B (hists: n × 2^15 int64) */
int gta_histograms_bf16(const uint16_t *base, const uint16_t *const *models, int n, int64_t size,
                        const uint8_t *wanted, int64_t *hists) {
    float *scratch = malloc(sizeof(float) * BLOCK * (size_t)(n + 1));
    if (!scratch) return -1;
    float *b = scratch, *d = b + BLOCK;
    int clean = 1;
    for (int64_t s = 0; s < size; s += BLOCK) {
        int m = size - s < BLOCK ? (int)(size - s) : BLOCK;
        clean &= deltas_bf16(base, models, n, s, m, b, d);
        for (int i = 0; i < n; i++) {
            if (!wanted[i]) continue;
            int64_t *h = hists + ((int64_t)i << 15);
            const float *di = d + (int64_t)i * BLOCK;
            for (int j = 0; j < m; j++) h[key_bf16(di[j])] += 1;
        }
    }
    free(scratch);
    return clean;
}

/* random.Stream's j-th draw from start = first·φ + key: murmur3's fmix32 of start + j·φ (mod 2^32) */
static inline uint32_t draw(uint32_t start, int64_t j) {
    uint32_t x = start + (uint32_t)j * 0x9E3779B9u;
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    return x ^ (x >> 16);
}

/* random.Stream.below: out[j] = [draw < bound], bound = ⌈p·2^24⌉·2^8, in one loop where torch
 * made eight passes */
void stream_below(uint32_t start, int64_t count, uint32_t bound, uint8_t *out) {
    for (int64_t j = 0; j < count; j++) out[j] = draw(start, j) < bound;
}

/* DELLA's keep mask: per row of bfloat16 scores (rows × cols), rank is the element's 0-based
 * position in the row sorted by |score| ascending (the 15 bits below the sign as the key), equal
 * keys in index order (torch's argsort(stable=True).argsort()), p = low + ((rank / (cols − 1)) · 2)
 * · ε in float64, in task_arithmetic's order, and out[j] = [u_j < p] with u_j = m·2^-24,
 * m = draw >> 8, random.Stream's uniform: that is m < ⌈p·2^24⌉, exactly. Element j draws from the
 * last run with offsets[run] ≤ j: draw(starts[run], j − offsets[run]), a run per key block the
 * chunk spans.
 *
 * Ranks by a counting sort over the row's range of keys: a pass counts them, numbering each
 * element among its equals as it goes, and one adds its key's first rank, where torch's comparison
 * sort took 45-65 ns an element, twice (a pass to count, then one to place, took 10% longer). Key
 * 0 (δ = 0) gets the bucket below the row's least nonzero key: |δ| of a row spans few exponents, 0
 * aside. p depends on the rank alone, so all rows share one table of bounds, and the draws are
 * compared in a loop of their own, which vectorizes; a float64 p per element, written and then read
 * to draw, cost more than the ranking.
 * Returns 0 where a score is NaN (a key above 0x7F80), whose payloads torch sorts as equal, else 1. */
int della_keep(const uint16_t *scores, int64_t rows, int64_t cols, double low, double eps,
               const int64_t *offsets, const uint32_t *starts, int runs, uint8_t *out) {
    int64_t *count = malloc(sizeof(int64_t) << 15);
    uint32_t *bound = malloc(sizeof(uint32_t) * (size_t)cols); /* ⌈p·2^24⌉ by rank */
    uint32_t *rank = malloc(sizeof(uint32_t) * (size_t)cols);
    if (!count || !bound || !rank) { free(count); free(bound); free(rank); return -1; }
    double last = (double)(cols - 1);
    for (int64_t at = 0; at < cols; at++) {
        double q = ceil((low + (((double)at / last) * 2.0) * eps) * 0x1p24);
        bound[at] = q <= 0 ? 0u : q >= 0x1p24 ? 1u << 24 : (uint32_t)q;
    }
    int run = 0;
    int64_t r = 0;
    for (; r < rows; r++) {
        const uint16_t *k = scores + r * cols;
#define KEY(j) (k[j] & 0x7FFF) /* |score|'s bits order as |score| */
        uint16_t lo = 0x7FFF, hi = 0;
        for (int64_t j = 0; j < cols; j++) {
            uint16_t key = KEY(j), nonzero = key ? key : 0x7FFF;
            lo = nonzero < lo ? nonzero : lo;
            hi = key > hi ? key : hi;
        }
        if (hi > 0x7F80) break; /* NaN */
        lo = lo > hi ? hi : lo; /* a row of zeros */
#define BUCKET(x) ((x) ? (x) - lo + 1 : 0)
        memset(count, 0, sizeof(int64_t) * (size_t)(hi - lo + 2));
        for (int64_t j = 0; j < cols; j++) rank[j] = (uint32_t)count[BUCKET(KEY(j))]++; /* among equals */
        for (int64_t b = 0, at = 0; b <= hi - lo + 1; b++) { int64_t n = count[b]; count[b] = at; at += n; }
        for (int64_t j = 0; j < cols; j++) rank[j] += (uint32_t)count[BUCKET(KEY(j))];
#undef BUCKET
#undef KEY
        for (int64_t j = 0, flat = r * cols; j < cols;) { /* a piece of the row within one run */
            while (run + 1 < runs && flat + j >= offsets[run + 1]) run++;
            int64_t end = run + 1 < runs && offsets[run + 1] - flat < cols ? offsets[run + 1] - flat : cols;
            uint32_t start = starts[run];
            int64_t first = flat - offsets[run];
            for (; j < end; j++) out[flat + j] = (draw(start, first + j) >> 8) < bound[rank[j]];
        }
    }
    free(count);
    free(bound);
    free(rank);
    return r == rows;
}

/* random.Stream.uniform(...) < p elementwise: u = (draw >> 8)·2^-24 (exact in float32, and in the
 * double it is compared as) against float64 p[j] */
void stream_uniform_below(uint32_t start, int64_t count, const double *p, uint8_t *out) {
    for (int64_t j = 0; j < count; j++) out[j] = (double)(draw(start, j) >> 8) * 0x1p-24 < p[j];
}

/* 1 when no element of x (bfloat16, float16 or float32 bits) is NaN or Inf: an exponent field
 * of all ones. A comparison per element, where torch's sum widened each one first. */
#define ALL_FINITE(T, K, EXP)                                                                        \
    int all_finite_##K(const T *x, int64_t size) {                                                  \
        T bad = 0;                                                                                  \
        for (int64_t s = 0; s < size; s += BLOCK) {                                                 \
            int64_t m = size - s < BLOCK ? size - s : BLOCK;                                        \
            for (int64_t j = 0; j < m; j++) bad |= (T)((x[s + j] & EXP) == EXP);                    \
            if (bad) return 0;                                                                      \
        }                                                                                           \
        return 1;                                                                                   \
    }

ALL_FINITE(uint16_t, bf16, 0x7F80u)
ALL_FINITE(uint16_t, f16, 0x7C00u)
ALL_FINITE(uint32_t, f32, 0x7F800000u)
