/* Fused CPU loops for FDConv (float32, contiguous memory, OpenMP threads), the CPU kernels of the fdconv
 * operators (layers/ops/).
 *
 * Each function replaces several PyTorch operations that would each make a pass over B x |W| values: the
 * kernel synthesis and its adjoint run as two passes over cache-sized blocks with MKL's FFT inside
 * (synthesize, synthesis_gradient), the backward of the local modulation is one pass, and FBM's band
 * modulation is one loop per plane. Built and loaded by native.py, which validates every argument; the
 * operators' PyTorch code (synthesis.py, bands.py) computes the same values and runs where this library does
 * not load.
 *
 * Every entry point returns a status (FDCONV_OK, or what went wrong) instead of aborting: no exception leaves
 * an OpenMP region, every allocation is checked, and group ids are checked against the number of groups
 * where they are read. Per-thread block buffers come from the caller (`work`, fdconv_workspace_floats), so
 * the caller owns and can free them.
 */
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <new>
#include <omp.h>
#include <vector>
#include <tuple>

#define LANES 16
/* Loops over fewer values than this run on one thread: waking the others costs more than they save. */
#define PARALLEL_WORK 32768

enum { FDCONV_OK = 0, FDCONV_FFT_REFUSED = 1, FDCONV_OUT_OF_MEMORY = 2, FDCONV_BAD_GROUP = 3 };

/* malloc of n floats; null on failure (the caller reports FDCONV_OUT_OF_MEMORY) */
static inline float *alloc_floats(int64_t n) { return static_cast<float *>(malloc(sizeof(float) * (n > 0 ? n : 1))); }
static inline float *calloc_floats(int64_t n) { return static_cast<float *>(calloc(n > 0 ? n : 1, sizeof(float))); }

/* Whether group id g is in [0, n): ids come from checkpoints and must never index outside the attention. */
template <typename Index>
static inline bool valid_group(Index g, int64_t n) {
    return static_cast<uint64_t>(static_cast<int64_t>(g)) < static_cast<uint64_t>(n);
}

/* 16 floats / int32s as one value: gcc and clang map the arithmetic onto whatever SIMD the CPU has. */
typedef float vfloat __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int32_t vint __attribute__((vector_size(4 * LANES), aligned(4)));

static inline vfloat splat(float x) { return vfloat{} + x; }

/* sigmoid(x) = 1 / (1 + e^-x) with e^y = 2^n * p(y - n ln2), n = round(y / ln2), p the degree-6 Taylor
 * polynomial (relative error < 2e-7 on |y - n ln2| <= ln2 / 2); y is clamped to [-88, 88] where float e^y is
 * finite, which saturates the sigmoid at 0 and 1 as it should. */
static inline vfloat vsigmoid(vfloat x) {
    vfloat y = -x;
    y = y < -88.0f ? splat(-88.0f) : y;
    y = y > 88.0f ? splat(88.0f) : y;
    const vfloat shifter = splat(12582912.0f);  /* 1.5 * 2^23: adding it rounds to the nearest integer */
    const vfloat n = (y * 1.44269504088896341f + shifter) - shifter;
    const vfloat r = (y - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    vfloat p = splat(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
    vfloat scale;
    memcpy(&scale, &bits, sizeof scale);
    return 1.0f / (1.0f + p * scale);
}

static inline vfloat load(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vfloat v) { memcpy(p, &v, sizeof v); }

static inline float sigmoid1(float x) {
    return vsigmoid(splat(x))[0];
}

/* Windows spread along the weight-matrix columns: spread[b, t, i*k + v] = windows[b, i, t]; null if out of
 * memory. */
static float *spread_windows(const float *windows, int64_t batch, int64_t in_channels, int64_t k, int64_t taps_k) {
    const int64_t cols = in_channels * k;
    float *spread = alloc_floats(batch * taps_k * cols);
    if (!spread)
        return nullptr;
#pragma omp parallel for schedule(static) if (batch * taps_k * cols > PARALLEL_WORK)
    for (int64_t bt = 0; bt < batch * taps_k; ++bt) {
        const int64_t b = bt / taps_k, t = bt % taps_k;
        float *dst = spread + bt * cols;
        for (int64_t i = 0; i < in_channels; ++i)
            for (int64_t v = 0; v < k; ++v)
                dst[i * k + v] = windows[(b * in_channels + i) * taps_k + t];
    }
    return spread;
}

/* The taps of weight-matrix row `row` laid out along one block of 16*k columns:
 * pattern[t, q] = taps[row*k + q % k, t] (the tap pattern of a row repeats every k columns). */
static void fill_pattern(float *pattern, const float *taps, int64_t row, int64_t k, int64_t taps_k,
                         int64_t block) {
    for (int64_t t = 0; t < taps_k; ++t)
        for (int64_t v = 0; v < k; ++v)
            for (int64_t q = v; q < block; q += k)
                pattern[t * block + q] = taps[(row * k + v) * taps_k + t];
}

/* out[i * out_stride] = sum_v spread[i*k + v] for i < in_channels: a spread-layout row back to channels. */
static void sum_spread(const float *spread, float *out, int64_t out_stride, int64_t in_channels, int64_t k) {
    for (int64_t i = 0; i < in_channels; ++i) {
        float sum = 0.0f;
        for (int64_t v = 0; v < k; ++v)
            sum += spread[i * k + v];
        out[i * out_stride] = sum;
    }
}

/* dst[r, :] = spectrum[r, :] * attention[group[r]] * factor for one column of R bins (real/imag pairs);
 * false (and zeros for that bin) where a group id is outside [0, num_groups). */
template <typename Index>
static inline bool scale_column(const float *spectrum, const Index *group, const float *attention, float *dst,
                                int64_t rows, int64_t num_groups, float factor) {
    bool ok = true;
    for (int64_t r = 0; r < rows; ++r) {
        const bool valid = valid_group(group[r], num_groups);
        ok &= valid;
        const float s = valid ? attention[group[r]] * factor : 0.0f;
        dst[2 * r] = spectrum[2 * r] * s;
        dst[2 * r + 1] = spectrum[2 * r + 1] * s;
    }
    return ok;
}

/* Adjoint of the group scaling for one column c of bins (pointers at the column):
 *   grad_spectrum[r] = weight * sum_b grad[b, r] * attention[b, group[r]]
 *   partial[b, g] += sum over bins r of group g: weight * <grad[b, r], spectrum[r]>
 * grad (B, R, 2), spectrum and grad_spectrum (R, 2), group (R), attention and partial (B, n). */
template <typename Index>
static bool adjoint_column(const float *grad, const float *spectrum, const Index *group, float weight,
                           const float *attention, float *grad_spectrum, float *partial, int64_t batch, int64_t rows,
                           int64_t num_groups) {
    for (int64_t r = 0; r < rows; ++r)
        if (!valid_group(group[r], num_groups))
            return false;
    for (int64_t r = 0; r < 2 * rows; ++r)
        grad_spectrum[r] = 0.0f;
    for (int64_t b = 0; b < batch; ++b) {
        const float *g = grad + b * rows * 2, *att = attention + b * num_groups;
        float *part = partial + b * num_groups;
        for (int64_t r = 0; r < rows; ++r) {
            const float a = att[group[r]];
            grad_spectrum[2 * r] += g[2 * r] * a;
            grad_spectrum[2 * r + 1] += g[2 * r + 1] * a;
        }
        float acc = 0.0f;  /* bins of one group are mostly contiguous along r: sum runs, then add */
        Index current = group[0];
        for (int64_t r = 0; r < rows; ++r) {
            if (group[r] != current) {
                part[current] += acc * weight;
                acc = 0.0f;
                current = group[r];
            }
            acc += g[2 * r] * spectrum[2 * r] + g[2 * r + 1] * spectrum[2 * r + 1];
        }
        part[current] += acc * weight;
    }
    for (int64_t r = 0; r < 2 * rows; ++r)
        grad_spectrum[r] *= weight;
    return true;
}

#define TILE 16

/* d[j * dst_stride + i] = s[i * src_stride + j] for i in [i0, i1), j in [j0, j1): one tile of an 8-byte-value
 * (complex64) transposition. Tiles of 16 x 16 (measured fastest here) read and write both sides a cache line
 * at a time. */
static inline void transpose_tile(const uint64_t *s, uint64_t *d, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                                  int64_t src_stride, int64_t dst_stride) {
    for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i)
            d[j * dst_stride + i] = s[i * src_stride + j];
}

/* The whole (n_i, n_j) -> (n_j, n_i) transposition, tile by tile, on the calling thread. */
static void transpose_block(const uint64_t *s, uint64_t *d, int64_t n_i, int64_t n_j, int64_t src_stride,
                            int64_t dst_stride) {
    for (int64_t i0 = 0; i0 < n_i; i0 += TILE)
        for (int64_t j0 = 0; j0 < n_j; j0 += TILE)
            transpose_tile(s, d, i0, i0 + TILE < n_i ? i0 + TILE : n_i, j0, j0 + TILE < n_j ? j0 + TILE : n_j,
                           src_stride, dst_stride);
}

/* Columns [j, cols) of one row of the local modulation (j a multiple of the block), any k and K. */
static inline void modulate_columns(const float *src, float *dst, float *sig, const float *pattern, const float *win,
                                    const float *scale, int64_t j, int64_t cols, int64_t block, int64_t taps_k) {
    int64_t offset = 0;  /* offset = j % block */
    for (; j + LANES <= cols; j += LANES, offset = offset + LANES == block ? 0 : offset + LANES) {
        const float *pat = pattern + offset;  /* fixed-width steps of LANES values */
        vfloat acc = load(pat) * load(win + j);
        for (int64_t t = 1; t < taps_k; ++t)
            acc += load(pat + t * block) * load(win + t * cols + j);
        acc = vsigmoid(acc);
        if (sig)
            store(sig + j, acc);
        store(dst + j, scale ? load(src + j) * acc * load(scale + j) : load(src + j) * acc);
    }
    for (; j < cols; ++j) {
        float s = 0.0f;
        for (int64_t t = 0; t < taps_k; ++t)
            s += pattern[t * block + j % block] * win[t * cols + j];
        s = sigmoid1(s);
        if (sig)
            sig[j] = s;
        dst[j] = scale ? src[j] * s * scale[j] : src[j] * s;
    }
}

/* The same for kernel size K and TAPS known at compile time: the row's whole tap pattern (K phases of TAPS
 * vectors) stays in registers for the whole blocks of 16*K columns. */
template <int K, int TAPS>
static inline void modulate_blocks(const float *src, float *dst, float *sig, const float *pattern, const float *win,
                                   const float *scale, int64_t cols) {
    constexpr int64_t block = LANES * K;
    vfloat pat[K][TAPS];
    for (int phase = 0; phase < K; ++phase)
        for (int t = 0; t < TAPS; ++t)
            pat[phase][t] = load(pattern + t * block + phase * LANES);
    int64_t j = 0;
    for (; j + block <= cols; j += block)
        for (int phase = 0; phase < K; ++phase) {
            const int64_t c = j + phase * LANES;
            vfloat acc = pat[phase][0] * load(win + c);
            for (int t = 1; t < TAPS; ++t)
                acc += pat[phase][t] * load(win + t * cols + c);
            acc = vsigmoid(acc);
            if (sig)
                store(sig + c, acc);
            store(dst + c, scale ? load(src + c) * acc * load(scale + c) : load(src + c) * acc);
        }
    modulate_columns(src, dst, sig, pattern, win, scale, j, cols, block, TAPS);
}

/* One row of the local modulation: dst = src * sigmoid(logits) (* scale), sigmoid(logits) to sig if not null.
 * pattern: the row's taps (fill_pattern), win: the sample's spread windows (spread_windows), scale: the
 * sample's spread channel attention or null. The usual kernel sizes (1, 3) and local conv sizes (3-7: 16 to
 * 16383 input channels) take the compile-time loops. */
static inline void modulate_row(const float *src, float *dst, float *sig, const float *pattern, const float *win,
                                const float *scale, int64_t cols, int64_t block, int64_t taps_k) {
#define FDCONV_MODULATE_CASE(K, TAPS) \
    if (block == LANES * (K) && taps_k == (TAPS)) \
        return modulate_blocks<K, TAPS>(src, dst, sig, pattern, win, scale, cols);
    FDCONV_MODULATE_CASE(1, 3) FDCONV_MODULATE_CASE(1, 5) FDCONV_MODULATE_CASE(1, 7)
    FDCONV_MODULATE_CASE(3, 3) FDCONV_MODULATE_CASE(3, 5) FDCONV_MODULATE_CASE(3, 7)
#undef FDCONV_MODULATE_CASE
    modulate_columns(src, dst, sig, pattern, win, scale, 0, cols, block, taps_k);
}

/* One (row, sample) of fdconv_local_modulation_backward. The columns are taken phase by phase (the columns
 * j = phase*LANES + m*block share one slice of the tap pattern), so the pattern and the tap-gradient
 * accumulators of a phase stay in registers; TAPS is K when known at compile time (0: any K, value by value,
 * no fixed-size arrays). */
template <int TAPS>
static void backward_row(int64_t taps_k, const float *pattern, int64_t block, int64_t cols,
                         const float *p, float *g, const float *win, float *gw, const float *scale,
                         float *column_sum, float *tap_acc, float *pdp_acc) {
    constexpr int kMax = TAPS ? TAPS : 1;
    const int64_t n_taps = TAPS ? TAPS : taps_k;
    vfloat pat[kMax], acc[kMax];  /* per phase: the taps and their gradient sums */
    for (int64_t offset = 0; TAPS && offset < block; offset += LANES) {
        for (int64_t t = 0; t < n_taps; ++t) {
            pat[t] = load(pattern + t * block + offset);
            acc[t] = load(tap_acc + t * block + offset);
        }
        vfloat pdp_sum = load(pdp_acc + offset);
        for (int64_t j = offset; j + LANES <= cols; j += block) {
            vfloat w[kMax] = {};
            for (int64_t t = 0; t < n_taps; ++t)
                w[t] = load(win + t * cols + j);
            vfloat logit = pat[0] * w[0];
            for (int64_t t = 1; t < n_taps; ++t)
                logit += pat[t] * w[t];
            const vfloat sig = vsigmoid(logit), dp = load(g + j), pdp = load(p + j) * dp;
            if (scale) {
                store(g + j, dp * sig * load(scale + j));
                store(column_sum + j, load(column_sum + j) + pdp);
            } else {
                store(g + j, dp * sig);
            }
            pdp_sum += pdp;
            const vfloat dl = pdp * (1.0f - sig);
            for (int64_t t = 0; t < n_taps; ++t) {
                acc[t] += dl * w[t];
                store(gw + t * cols + j, load(gw + t * cols + j) + dl * pat[t]);
            }
        }
        for (int64_t t = 0; t < n_taps; ++t)
            store(tap_acc + t * block + offset, acc[t]);
        store(pdp_acc + offset, pdp_sum);
    }
    for (int64_t j = TAPS ? cols / LANES * LANES : 0; j < cols; ++j) {  /* the last partial vector, value by value */
        const int64_t offset = j % block;
        float logit = 0.0f;
        for (int64_t t = 0; t < n_taps; ++t)
            logit += pattern[t * block + offset] * win[t * cols + j];
        const float sig = sigmoid1(logit), pdp = p[j] * g[j];
        g[j] *= scale ? sig * scale[j] : sig;
        if (scale)
            column_sum[j] += pdp;
        pdp_acc[offset] += pdp;
        const float dl = pdp * (1.0f - sig);
        for (int64_t t = 0; t < n_taps; ++t) {
            tap_acc[t * block + offset] += dl * win[t * cols + j];
            gw[t * cols + j] += dl * pattern[t * block + offset];
        }
    }
}

static void backward_dispatch(int64_t taps_k, const float *pattern, int64_t block, int64_t cols,
                              const float *p, float *g, const float *win, float *gw, const float *scale,
                              float *column_sum, float *tap_acc, float *pdp_acc) {
    switch (taps_k) {  /* the local branch's K: 5 for 64..512 input channels, 7 for 1024..2048 */
        case 3: return backward_row<3>(3, pattern, block, cols, p, g, win, gw, scale, column_sum, tap_acc, pdp_acc);
        case 5: return backward_row<5>(5, pattern, block, cols, p, g, win, gw, scale, column_sum, tap_acc, pdp_acc);
        case 7: return backward_row<7>(7, pattern, block, cols, p, g, win, gw, scale, column_sum, tap_acc, pdp_acc);
        case 9: return backward_row<9>(9, pattern, block, cols, p, g, win, gw, scale, column_sum, tap_acc, pdp_acc);
        default:
            return backward_row<0>(taps_k, pattern, block, cols, p, g, win, gw, scale, column_sum, tap_acc,
                                   pdp_acc);
    }
}

/* Backward of P = M * sigmoid(L) * channel[b, i] (whole matrices, contiguous (B, R, Cin*k); channel may be
 * null: factor 1), the logits L made again from taps (Cout*k*k, K) and windows (B, Cin, K) as in
 * fdconv_local_modulation, given P and grad = dLoss/dP:
 *   grad <- grad * sigmoid(L) * channel                          (= dLoss/dM, in place)
 *   per_tap[b, row, v] = sum_i P * dP  at column i*k + v         (B, R, k): filter and spatial gradients
 *   channel_sums[b, i] = sum_{row, v} P * dP                     (B, Cin), if channel is given
 *   with dL = P * dP * (1 - sigmoid(L)):
 *   grad_taps[row*k + v, t] = sum_{b, i} dL * windows[b, i, t]  (Cout*k*k, K)
 *   grad_windows[b, i, t] = sum_{row, v} dL * taps[row*k + v, t] (B, Cin, K)
 * Rows are split between threads (each owns its rows of grad_taps); grad_windows is summed per thread in the
 * spread layout and reduced at the end. */
extern "C"
int64_t fdconv_local_modulation_backward(const float *product, float *grad, const float *taps,
                                         const float *windows, const float *channel, float *per_tap,
                                         float *grad_taps, float *grad_windows, float *channel_sums, int64_t batch,
                                         int64_t rows, int64_t in_channels, int64_t k, int64_t taps_k) {
    const int64_t cols = in_channels * k, block = LANES * k, spread_size = batch * taps_k * cols;
    /* per thread: grad_windows in the spread layout, then (with channel) the column sums of P * dP */
    const int64_t partial_size = spread_size + (channel ? batch * cols : 0);
    float *spread = spread_windows(windows, batch, in_channels, k, taps_k);
    float *channel_spread = channel ? spread_windows(channel, batch, in_channels, k, 1) : nullptr;
    float *total = calloc_floats(partial_size);
    int64_t failed = !spread || (channel && !channel_spread) || !total;
    if (!failed) {
#pragma omp parallel if (batch * rows * cols > PARALLEL_WORK) reduction(| : failed)
    {
        float *pattern = alloc_floats(taps_k * block);
        float *tap_acc = alloc_floats((taps_k + 1) * block);
        float *grad_spread = calloc_floats(partial_size);
        const bool ready = pattern && tap_acc && grad_spread;
        failed |= !ready;
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            if (!ready)
                continue;
            fill_pattern(pattern, taps, row, k, taps_k, block);
            for (int64_t q = 0; q < taps_k * block; ++q)
                tap_acc[q] = 0.0f;
            float *pdp_acc = tap_acc + taps_k * block;  /* per lane of the block, summed per v at the end */
            for (int64_t b = 0; b < batch; ++b) {
                const float *p = product + (b * rows + row) * cols, *win = spread + b * taps_k * cols;
                float *g = grad + (b * rows + row) * cols, *gw = grad_spread + b * taps_k * cols;
                const float *scale = channel_spread ? channel_spread + b * cols : nullptr;
                float *column_sum = channel ? grad_spread + spread_size + b * cols : nullptr;
                for (int64_t q = 0; q < block; ++q)
                    pdp_acc[q] = 0.0f;
                backward_dispatch(taps_k, pattern, block, cols, p, g, win, gw, scale, column_sum, tap_acc, pdp_acc);
                float *tap = per_tap + (b * rows + row) * k;
                for (int64_t v = 0; v < k; ++v)
                    tap[v] = 0.0f;
                for (int64_t q = 0; q < block; ++q)
                    tap[q % k] += pdp_acc[q];
            }
            for (int64_t t = 0; t < taps_k; ++t)
                for (int64_t q = 0; q < block; ++q)
                    grad_taps[(row * k + q % k) * taps_k + t] += tap_acc[t * block + q];
        }
        if (ready) {
#pragma omp critical
            for (int64_t q = 0; q < partial_size; ++q)
                total[q] += grad_spread[q];
        }
        free(grad_spread);
        free(tap_acc);
        free(pattern);
    }
    }
    if (!failed) {
        for (int64_t bt = 0; bt < batch * taps_k; ++bt) {  /* spread[b, t, i*k + v] -> grad_windows[b, i, t] */
            const int64_t b = bt / taps_k, t = bt % taps_k;
            sum_spread(total + bt * cols, grad_windows + b * in_channels * taps_k + t, taps_k, in_channels, k);
        }
        if (channel)
            for (int64_t b = 0; b < batch; ++b)
                sum_spread(total + spread_size + b * cols, channel_sums + b * in_channels, 1, in_channels, k);
    }
    free(total);
    free(channel_spread);
    free(spread);
    return failed ? FDCONV_OUT_OF_MEMORY : FDCONV_OK;
}

/* ---- Kernel synthesis with the FFT inside the loops (MKL's DFTI, from the libtorch that torch was built with) ----
 *
 * The inverse 2-D FFT of the scaled half spectrum runs as two passes over cache-sized blocks instead of five
 * passes over B x |W| values: (1) for a few columns at a time, scale the bins into a per-thread buffer, inverse
 * FFT along R there and store the block transposed into `columns` (R, B, C/2+1); (2) for a few rows at a time,
 * inverse real FFT along C into a per-thread buffer and apply the local modulation on the way out. DFTI is
 * called sequentially inside the OpenMP threads; its descriptors are cached per thread, a few per thread (the
 * least recently used goes first), and fdconv_release_fft frees them all once no loop runs. */
typedef long (*DftiCreate1d)(void **, int, long);
typedef long (*DftiSet)(void *, int, ...);
typedef long (*DftiCommit)(void *);
typedef long (*DftiCompute)(void *, void *, ...);
typedef long (*DftiFree)(void **);
static DftiCreate1d dfti_create;
static DftiSet dfti_set;
static DftiCommit dfti_commit;
static DftiCompute dfti_backward;
static DftiCompute dfti_forward;
static DftiFree dfti_free;
/* mkl_dfti.h's configuration names and values */
enum { DFTI_NUMBER_OF_TRANSFORMS = 7, DFTI_CONJUGATE_EVEN_STORAGE = 10, DFTI_PLACEMENT = 11,
       DFTI_INPUT_DISTANCE = 14, DFTI_OUTPUT_DISTANCE = 15, DFTI_THREAD_LIMIT = 27, DFTI_COMPLEX = 32,
       DFTI_REAL = 33, DFTI_COMPLEX_COMPLEX = 39, DFTI_NOT_INPLACE = 44 };

extern "C"
void fdconv_set_fft(void *create_single_1d, void *set_value, void *commit, void *compute_backward,
                    void *compute_forward, void *free_descriptor) {
    dfti_create = reinterpret_cast<DftiCreate1d>(create_single_1d);
    dfti_set = reinterpret_cast<DftiSet>(set_value);
    dfti_commit = reinterpret_cast<DftiCommit>(commit);
    dfti_backward = reinterpret_cast<DftiCompute>(compute_backward);
    dfti_forward = reinterpret_cast<DftiCompute>(compute_forward);
    dfti_free = reinterpret_cast<DftiFree>(free_descriptor);
}

/* Every descriptor of every thread is listed in `all_plans`, so that fdconv_release_fft can free them: it waits
 * until no loop runs (the loops hold `plans_in_use` shared), frees them and bumps the generation, which tells each
 * thread that the pointers it cached are gone. */
#define PLANS_PER_THREAD 8
static std::shared_mutex plans_in_use;
static std::mutex all_plans_lock;
static std::set<void *> all_plans;
static std::atomic<int64_t> plans_generation{0};

typedef std::tuple<bool, int64_t, int64_t, bool> PlanKey;
struct ThreadPlans {
    int64_t generation = -1;
    std::vector<std::pair<PlanKey, void *>> entries;  /* the most recently used last */
};

static void free_plan(void *plan) {
    {
        std::lock_guard<std::mutex> hold(all_plans_lock);
        all_plans.erase(plan);
    }
    dfti_free(&plan);
}

extern "C"
void fdconv_release_fft() {
    std::unique_lock<std::shared_mutex> no_loop_runs(plans_in_use);
    std::lock_guard<std::mutex> hold(all_plans_lock);
    for (void *plan : all_plans)
        dfti_free(&plan);
    all_plans.clear();
    plans_generation.fetch_add(1);
}

extern "C"
int64_t fdconv_fft_plans() {
    std::lock_guard<std::mutex> hold(all_plans_lock);
    return static_cast<int64_t>(all_plans.size());
}

/* `howmany` unnormalised transforms of length n, one thread: complex in place (contiguous transforms, either
 * direction), or real out of place, conjugate-even (n/2+1 complex) to real for the inverse (`forward` false)
 * and real to conjugate-even for the forward transform. Null if DFTI refuses. */
static void *fft_plan(bool real, int64_t n, int64_t howmany, bool forward = false) {
    static thread_local ThreadPlans cache;
    const int64_t generation = plans_generation.load();
    if (cache.generation != generation) {  /* released since this thread last looked: the pointers are gone */
        cache.entries.clear();
        cache.generation = generation;
    }
    forward = forward && real;  /* a complex plan serves both directions */
    const PlanKey key = std::make_tuple(real, n, howmany, forward);
    for (auto entry = cache.entries.begin(); entry != cache.entries.end(); ++entry)
        if (entry->first == key) {
            std::rotate(entry, entry + 1, cache.entries.end());
            return cache.entries.back().second;
        }
    void *plan = nullptr;
    long status = dfti_create(&plan, real ? DFTI_REAL : DFTI_COMPLEX, static_cast<long>(n));
    if (!status)
        status = dfti_set(plan, DFTI_NUMBER_OF_TRANSFORMS, static_cast<long>(howmany));
    if (!status)
        status = dfti_set(plan, DFTI_THREAD_LIMIT, 1L);
    if (!status && real)
        status = dfti_set(plan, DFTI_CONJUGATE_EVEN_STORAGE, static_cast<int>(DFTI_COMPLEX_COMPLEX));
    if (!status && real)
        status = dfti_set(plan, DFTI_PLACEMENT, static_cast<int>(DFTI_NOT_INPLACE));
    const long complex_distance = real ? n / 2 + 1 : n;  /* distances of the computation's input and output */
    if (!status)
        status = dfti_set(plan, DFTI_INPUT_DISTANCE, forward ? static_cast<long>(n) : complex_distance);
    if (!status)
        status = dfti_set(plan, DFTI_OUTPUT_DISTANCE, forward ? complex_distance : static_cast<long>(n));
    if (!status)
        status = dfti_commit(plan);
    if (status) {
        if (plan)
            dfti_free(&plan);
        return nullptr;
    }
    try {
        if (cache.entries.size() >= PLANS_PER_THREAD) {
            free_plan(cache.entries.front().second);
            cache.entries.erase(cache.entries.begin());
        }
        std::lock_guard<std::mutex> hold(all_plans_lock);
        all_plans.insert(plan);
        cache.entries.emplace_back(key, plan);
    } catch (...) {  /* out of memory (or a lock error): not cached, not used */
        {
            std::lock_guard<std::mutex> hold(all_plans_lock);
            all_plans.erase(plan);
        }
        dfti_free(&plan);
        return nullptr;
    }
    return plan;
}

/* This thread's part of the caller's workspace: `per_thread` floats for each thread of the team. */
static inline float *thread_work(float *work, int64_t per_thread) { return work + omp_get_thread_num() * per_thread; }

/* Values per block of the two passes (complex bins of pass 1, real values of pass 2): 512 and 256 KB, which
 * keeps each thread's block in its L2 cache (measured best of 128 KB - 2 MB here). */
#define COLUMN_BLOCK 65536
#define ROW_BLOCK 65536

/* Block sizes of the synthesis: columns per block of pass 1, rows (of R*B) per block of pass 2. */
static void synthesis_blocks(int64_t batch, int64_t rows, int64_t cols, int64_t *width, int64_t *height) {
    const int64_t w = COLUMN_BLOCK / (batch * rows), h = ROW_BLOCK / cols;
    *width = w < 1 ? 1 : w > 16 ? 16 : w;
    *height = h < 1 ? 1 : h;
}

/* Block sizes of the adjoint: rows (of B*R) per block of pass 1, columns per block of pass 2. */
static void gradient_blocks(int64_t batch, int64_t rows, int64_t cols, int64_t *height, int64_t *width) {
    const int64_t h = ROW_BLOCK / cols, w = COLUMN_BLOCK / (batch * rows);
    *height = h < 1 ? 1 : h;
    *width = w < 1 ? 1 : w;
}

static int64_t synthesis_work(int64_t batch, int64_t rows, int64_t cols) {
    int64_t width, height;
    synthesis_blocks(batch, rows, cols, &width, &height);
    const int64_t pass1 = 2 * width * batch * rows, pass2 = height * cols;
    return pass1 > pass2 ? pass1 : pass2;
}

static int64_t gradient_work(int64_t batch, int64_t rows, int64_t cols) {
    int64_t width, height;
    gradient_blocks(batch, rows, cols, &height, &width);
    return 2 * height * (cols / 2 + 1);
}

/* FBM: the zero-padded bases, shared by the threads, and each thread's part. */
static void band_work(int64_t height, int64_t width, int64_t rh, int64_t rw, int64_t bands, int64_t *shared,
                      int64_t *per_thread) {
    const int64_t rwp = (rw + LANES - 1) / LANES * LANES, wp = (width + LANES - 1) / LANES * LANES;
    *shared = height * rh + width * rwp + rw * wp;
    *per_thread = (height + rh) * rwp + bands * rh * wp + 2 * wp;
}

/* Floats of the `work` argument of fdconv_synthesize_* (kind 0: batch, rows, cols), fdconv_synthesis_gradient_*
 * (kind 1: the same) and fdconv_band_modulation (kind 2: height, width, max rank_h, max rank_w, bands) for a
 * team of omp_get_max_threads() threads. */
extern "C"
int64_t fdconv_workspace_floats(int64_t kind, int64_t a, int64_t b, int64_t c, int64_t d, int64_t e) {
    const int64_t threads = omp_get_max_threads();
    if (kind == 0)
        return threads * synthesis_work(a, b, c);
    if (kind == 1)
        return threads * gradient_work(a, b, c);
    int64_t shared, per_thread;
    band_work(a, b, c, d, e, &shared, &per_thread);
    return shared + threads * per_thread;
}

/* matrix[b] = irfft2(spectrum * attention[b, group]) (norm "backward"), times the local modulation if taps
 * is not null: sigmoid(logits) * channel[b, i] (channel may be null), the logits as in the backward below.
 * spectrum (H, R, 2) column-major half spectrum, H = C/2+1; group (H, R); attention (B, n); columns: scratch of
 * R*B*H complex values; matrix (B, R, C); work: fdconv_workspace_floats(0, ...). */
template <typename Index>
static int64_t synthesize(const float *spectrum, const Index *group, const float *attention, float *columns,
                          float *matrix, const float *taps, const float *windows, const float *channel, float *work,
                          int64_t batch, int64_t rows, int64_t cols, int64_t num_groups, int64_t k, int64_t taps_k) {
    std::shared_lock<std::shared_mutex> plans_stay(plans_in_use);  /* fdconv_release_fft waits */
    const int64_t half = cols / 2 + 1, per_thread = synthesis_work(batch, rows, cols);
    const float factor = 1.0f / static_cast<float>(rows * cols);
    int64_t width, height;
    synthesis_blocks(batch, rows, cols, &width, &height);
    const int64_t n_col_blocks = (half + width - 1) / width, n_row_blocks = (rows * batch + height - 1) / height;
    const bool parallel = batch * rows * cols > PARALLEL_WORK;
    int64_t refused = 0, bad_group = 0;
#pragma omp parallel if (parallel) reduction(| : refused, bad_group)
    {
        float *buffer = thread_work(work, per_thread);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < n_col_blocks; ++blk) {
            const int64_t c0 = blk * width, n = c0 + width <= half ? width : half - c0;
            for (int64_t j = 0; j < n; ++j)
                for (int64_t b = 0; b < batch; ++b)
                    bad_group |= !scale_column(spectrum + (c0 + j) * rows * 2, group + (c0 + j) * rows,
                                               attention + b * num_groups, buffer + (j * batch + b) * rows * 2, rows,
                                               num_groups, factor);
            void *plan = fft_plan(false, rows, n * batch);
            if (!plan || dfti_backward(plan, buffer)) {
                refused = 1;
                continue;
            }
            const uint64_t *src = reinterpret_cast<const uint64_t *>(buffer);  /* complex values as 8 bytes */
            uint64_t *dst = reinterpret_cast<uint64_t *>(columns) + c0;
            for (int64_t b = 0; b < batch; ++b)  /* (n, R) of sample b -> (R, n) of its rows of columns */
                transpose_block(src + b * rows, dst + b * half, n, rows, batch * rows, batch * half);
        }
    }
    if (bad_group)
        return FDCONV_BAD_GROUP;
    if (refused)
        return FDCONV_FFT_REFUSED;
    const int64_t block = LANES * k;
    float *spread = taps ? spread_windows(windows, batch, cols / k, k, taps_k) : nullptr;
    float *channel_spread = taps && channel ? spread_windows(channel, batch, cols / k, k, 1) : nullptr;
    int64_t out_of_memory = taps && (!spread || (channel && !channel_spread));
    if (!out_of_memory) {
#pragma omp parallel if (parallel) reduction(| : refused, out_of_memory)
    {
        float *buffer = thread_work(work, per_thread);
        float *pattern = taps ? alloc_floats(taps_k * block) : nullptr;
        const bool ready = !taps || pattern;
        out_of_memory |= !ready;
        int64_t pattern_row = -1;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < n_row_blocks; ++blk) {  /* rows in (R, B) order: one tap pattern per row */
            if (!ready)
                continue;
            const int64_t g0 = blk * height, n = g0 + height <= rows * batch ? height : rows * batch - g0;
            /* one sample: the rows are in the matrix's order, transform into it and modulate in place */
            float *transformed = batch == 1 ? matrix + g0 * cols : buffer;
            void *plan = fft_plan(true, cols, n);
            if (!plan || dfti_backward(plan, columns + 2 * g0 * half, transformed)) {
                refused = 1;
                continue;
            }
            for (int64_t g = g0; g < g0 + n; ++g) {
                const int64_t r = g / batch, b = g % batch;
                const float *src = transformed + (g - g0) * cols;
                float *dst = matrix + (b * rows + r) * cols;
                if (!taps) {
                    if (src != dst)
                        memcpy(dst, src, sizeof(float) * cols);
                    continue;
                }
                if (r != pattern_row) {
                    fill_pattern(pattern, taps, r, k, taps_k, block);
                    pattern_row = r;
                }
                modulate_row(src, dst, nullptr, pattern,
                             spread + b * taps_k * cols, channel_spread ? channel_spread + b * cols : nullptr, cols,
                             block, taps_k);
            }
        }
        free(pattern);
    }
    }
    free(channel_spread);
    free(spread);
    return out_of_memory ? FDCONV_OUT_OF_MEMORY : refused ? FDCONV_FFT_REFUSED : FDCONV_OK;
}

extern "C"
int64_t fdconv_synthesize_u8(const float *spectrum, const uint8_t *group, const float *attention, float *columns,
                             float *matrix, const float *taps, const float *windows, const float *channel,
                             float *work, int64_t batch, int64_t rows, int64_t cols, int64_t num_groups, int64_t k,
                             int64_t taps_k) {
    return synthesize(spectrum, group, attention, columns, matrix, taps, windows, channel, work, batch, rows, cols,
                      num_groups, k, taps_k);
}

extern "C"
int64_t fdconv_synthesize_i32(const float *spectrum, const int32_t *group, const float *attention, float *columns,
                              float *matrix, const float *taps, const float *windows, const float *channel,
                              float *work, int64_t batch, int64_t rows, int64_t cols, int64_t num_groups, int64_t k,
                              int64_t taps_k) {
    return synthesize(spectrum, group, attention, columns, matrix, taps, windows, channel, work, batch, rows, cols,
                      num_groups, k, taps_k);
}

/* ---- Frequency band modulation (FBM) of the input, without autograd ----
 *   out = A_1 * x + sum_j (A_{j+1} - A_j) * LP_j(x),  A_{J+1} = 1,  LP_j(x) = Bh_j Bh_j^T x Bw_j Bw_j^T
 * for each (sample, channel) plane x (H, W), with Bh_j = basis_h[:, :rank_h[j]] and Bw_j likewise: the low-pass
 * coefficients C = Bh^T x Bw of the widest band are made once per plane, every band's map is a corner of them,
 * and each output row is accumulated in registers from the bands' row factors T_j = C_j Bw_j^T: one write per
 * value instead of two matrix products, a map and a product-sum pass per band. */
struct BandBases {
    const float *h;   /* (H, RH) */
    const float *w;   /* (W, RWP): zero-padded to whole vectors */
    const float *wt;  /* (RW, WP): transposed, zero-padded to whole vectors */
    int64_t rh, rwp, wp;
};

/* out_p[q*LANES + m] = sum_i coef_p[i * coef_stride] * rows[i * row_stride + q*LANES + m] for Q vectors and P
 * coefficient sets (P = 1, 2) sharing the rows: P*Q independent accumulation chains, so the products run at
 * the FMA units' throughput rather than their latency. */
template <int P, int Q>
static inline void dot_rows_pq(const float *coef, int64_t coef_offset, int64_t coef_stride, const float *rows,
                               int64_t row_stride, int64_t count, float *out, int64_t out_offset) {
    vfloat acc[P][Q];
    for (int p = 0; p < P; ++p)
        for (int q = 0; q < Q; ++q)
            acc[p][q] = splat(0.0f);
    for (int64_t i = 0; i < count; ++i)
        for (int q = 0; q < Q; ++q) {
            const vfloat v = load(rows + i * row_stride + q * LANES);
            for (int p = 0; p < P; ++p)
                acc[p][q] += coef[p * coef_offset + i * coef_stride] * v;
        }
    for (int p = 0; p < P; ++p)
        for (int q = 0; q < Q; ++q)
            store(out + p * out_offset + q * LANES, acc[p][q]);
}

/* The same for `vectors` vectors, four at a time, and `sets` coefficient sets coef_offset apart whose results go
 * out_offset apart, two at a time. */
static void dot_rows(const float *coef, int64_t coef_offset, int64_t coef_stride, const float *rows,
                     int64_t row_stride, int64_t count, float *out, int64_t out_offset, int64_t sets,
                     int64_t vectors) {
    for (int64_t p = 0; p < sets; p += 2) {
        const float *c = coef + p * coef_offset;
        float *o = out + p * out_offset;
        const bool pair = p + 1 < sets;
        for (int64_t v = 0; v < vectors; v += 4) {
            const float *r = rows + v * LANES;
            float *ov = o + v * LANES;
            switch ((vectors - v < 4 ? vectors - v : 4) + (pair ? 4 : 0)) {
                case 1: dot_rows_pq<1, 1>(c, coef_offset, coef_stride, r, row_stride, count, ov, out_offset); break;
                case 2: dot_rows_pq<1, 2>(c, coef_offset, coef_stride, r, row_stride, count, ov, out_offset); break;
                case 3: dot_rows_pq<1, 3>(c, coef_offset, coef_stride, r, row_stride, count, ov, out_offset); break;
                case 4: dot_rows_pq<1, 4>(c, coef_offset, coef_stride, r, row_stride, count, ov, out_offset); break;
                case 5: dot_rows_pq<2, 1>(c, coef_offset, coef_stride, r, row_stride, count, ov, out_offset); break;
                case 6: dot_rows_pq<2, 2>(c, coef_offset, coef_stride, r, row_stride, count, ov, out_offset); break;
                case 7: dot_rows_pq<2, 3>(c, coef_offset, coef_stride, r, row_stride, count, ov, out_offset); break;
                default: dot_rows_pq<2, 4>(c, coef_offset, coef_stride, r, row_stride, count, ov, out_offset);
            }
        }
    }
}

static void band_plane(const float *x, const float *scale, float *out, const BandBases &basis, const int64_t *rank_h,
                       const int64_t *rank_w, int64_t bands, int64_t height, int64_t width, float *work) {
    const int64_t plane = height * width, rh = basis.rh, rwp = basis.rwp, wp = basis.wp;
    float *projected = work;                         /* x Bw: (H, RWP) */
    float *coefficients = projected + height * rwp;  /* Bh^T x Bw: (RH, RWP) */
    float *factors = coefficients + rh * rwp;        /* T_j = C_j Bw_j^T: (RH, WP) per band */
    float *low = factors + bands * rh * wp;          /* two rows of a band's low-pass map: (2, WP) */
    dot_rows(x, width, 1, basis.w, rwp, width, projected, rwp, height, rwp / LANES);
    dot_rows(basis.h, 1, rh, projected, rwp, height, coefficients, rwp, rh, rwp / LANES);
    for (int64_t j = 0; j < bands; ++j)
        dot_rows(coefficients, rwp, 1, basis.wt, wp, rank_w[j], factors + j * rh * wp, wp, rank_h[j], wp / LANES);
    for (int64_t h0 = 0; h0 < height; h0 += 2) {  /* two rows at a time: they share the factors' loads */
        const int64_t pair = h0 + 1 < height ? 2 : 1;
        for (int64_t w = 0; w < pair * width; ++w)
            out[h0 * width + w] = scale[h0 * width + w] * x[h0 * width + w];
        for (int64_t j = 0; j < bands; ++j) {
            dot_rows(basis.h + h0 * rh, rh, 1, factors + j * rh * wp, wp, rank_h[j], low, wp, pair, wp / LANES);
            for (int64_t h = h0; h < h0 + pair; ++h) {
                const float *a = scale + j * plane + h * width, *next = j + 1 < bands ? a + plane : nullptr;
                const float *l = low + (h - h0) * wp;
                float *row = out + h * width;
                int64_t w = 0;
                for (; w + LANES <= width; w += LANES) {
                    const vfloat weight = (next ? load(next + w) : splat(1.0f)) - load(a + w);
                    store(row + w, load(row + w) + weight * load(l + w));
                }
                for (; w < width; ++w)
                    row[w] += ((next ? next[w] : 1.0f) - a[w]) * l[w];
            }
        }
    }
}

/* FBM over x (B, C, H, W) with band scales A (B, J, H, W) into out (B, C, H, W); basis_h (H, ldh) and basis_w
 * (W, ldw) hold the orthonormal real Fourier bases (bands.fourier_basis), ranks (J) of each band; work:
 * fdconv_workspace_floats(2, ...). */
extern "C"
int64_t fdconv_band_modulation(const float *x, const float *scale, float *out, const float *basis_h, int64_t ldh,
                               const float *basis_w, int64_t ldw, const int64_t *rank_h, const int64_t *rank_w,
                               float *work, int64_t batch, int64_t channels, int64_t bands, int64_t height,
                               int64_t width) {
    int64_t rh = 0, rw = 0;
    for (int64_t j = 0; j < bands; ++j) {
        rh = rank_h[j] > rh ? rank_h[j] : rh;
        rw = rank_w[j] > rw ? rank_w[j] : rw;
    }
    const int64_t rwp = (rw + LANES - 1) / LANES * LANES, wp = (width + LANES - 1) / LANES * LANES;
    int64_t shared, per_thread;
    band_work(height, width, rh, rw, bands, &shared, &per_thread);
    float *padded = work;
    memset(padded, 0, sizeof(float) * shared);
    const BandBases basis = {padded, padded + height * rh, padded + height * rh + width * rwp, rh, rwp, wp};
    for (int64_t h = 0; h < height; ++h)
        memcpy(padded + h * rh, basis_h + h * ldh, sizeof(float) * rh);
    for (int64_t w = 0; w < width; ++w)
        for (int64_t s = 0; s < rw; ++s) {
            padded[height * rh + w * rwp + s] = basis_w[w * ldw + s];
            padded[height * rh + width * rwp + s * wp + w] = basis_w[w * ldw + s];
        }
    const int64_t plane = height * width;
#pragma omp parallel if (batch * channels * plane > PARALLEL_WORK)
    {
        float *buffer = thread_work(work + shared, per_thread);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < batch * channels; ++p)
            band_plane(x + p * plane, scale + p / channels * bands * plane, out + p * plane, basis, rank_h, rank_w,
                       bands, height, width, buffer);
    }
    return FDCONV_OK;
}

/* Adjoint of `synthesize` without its modulation (the modulation's backward has run): from dLoss/dmatrix
 * (B, R, C) to grad_spectrum (H, R, 2) and, added to grad_attention (B, n), the attention's gradient, with the
 * bins of column c weighted by weight[c]. Two passes over cache-sized blocks again: (1) rows: real FFT along C,
 * stored transposed into `columns` (H, B, R); (2) columns: FFT along R in place, then the adjoint of the group
 * scaling (adjoint_column). work: fdconv_workspace_floats(1, ...). */
template <typename Index>
static int64_t synthesis_gradient(const float *grad, const float *spectrum, const Index *group, const float *weight,
                                  const float *attention, float *columns, float *grad_spectrum,
                                  float *grad_attention, float *work, int64_t batch, int64_t rows, int64_t cols,
                                  int64_t num_groups) {
    std::shared_lock<std::shared_mutex> plans_stay(plans_in_use);  /* fdconv_release_fft waits */
    const int64_t half = cols / 2 + 1, total = batch * rows, per_thread = gradient_work(batch, rows, cols);
    int64_t width, height;
    gradient_blocks(batch, rows, cols, &height, &width);
    const int64_t n_row_blocks = (total + height - 1) / height, n_col_blocks = (half + width - 1) / width;
    const bool parallel = total * cols > PARALLEL_WORK;
    int64_t refused = 0, bad_group = 0, out_of_memory = 0;
#pragma omp parallel if (parallel) reduction(| : refused)
    {
        float *buffer = thread_work(work, per_thread);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < n_row_blocks; ++blk) {
            const int64_t g0 = blk * height, n = g0 + height <= total ? height : total - g0;
            void *plan = fft_plan(true, cols, n, true);
            if (!plan || dfti_forward(plan, const_cast<float *>(grad) + g0 * cols, buffer)) {
                refused = 1;
                continue;
            }
            const uint64_t *src = reinterpret_cast<const uint64_t *>(buffer);  /* complex values as 8 bytes */
            transpose_block(src, reinterpret_cast<uint64_t *>(columns) + g0, n, half, half, total);
        }
    }
    if (refused)
        return FDCONV_FFT_REFUSED;
#pragma omp parallel if (parallel) reduction(| : refused, bad_group, out_of_memory)
    {
        float *partial = calloc_floats(batch * num_groups);
        out_of_memory |= !partial;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < n_col_blocks; ++blk) {
            if (!partial)
                continue;
            const int64_t c0 = blk * width, n = c0 + width <= half ? width : half - c0;
            void *plan = fft_plan(false, rows, n * batch);
            if (!plan || dfti_forward(plan, columns + 2 * c0 * total)) {
                refused = 1;
                continue;
            }
            for (int64_t c = c0; c < c0 + n; ++c)
                bad_group |= !adjoint_column(columns + 2 * c * total, spectrum + c * rows * 2, group + c * rows,
                                             weight[c], attention, grad_spectrum + c * rows * 2, partial, batch, rows,
                                             num_groups);
        }
        if (partial) {
#pragma omp critical
            for (int64_t i = 0; i < batch * num_groups; ++i)
                grad_attention[i] += partial[i];
        }
        free(partial);
    }
    return bad_group ? FDCONV_BAD_GROUP : out_of_memory ? FDCONV_OUT_OF_MEMORY
                                                       : refused ? FDCONV_FFT_REFUSED : FDCONV_OK;
}

extern "C"
int64_t fdconv_synthesis_gradient_u8(const float *grad, const float *spectrum, const uint8_t *group,
                                     const float *weight, const float *attention, float *columns,
                                     float *grad_spectrum, float *grad_attention, float *work, int64_t batch,
                                     int64_t rows, int64_t cols, int64_t num_groups) {
    return synthesis_gradient(grad, spectrum, group, weight, attention, columns, grad_spectrum, grad_attention,
                              work, batch, rows, cols, num_groups);
}

extern "C"
int64_t fdconv_synthesis_gradient_i32(const float *grad, const float *spectrum, const int32_t *group,
                                      const float *weight, const float *attention, float *columns,
                                      float *grad_spectrum, float *grad_attention, float *work, int64_t batch,
                                      int64_t rows, int64_t cols, int64_t num_groups) {
    return synthesis_gradient(grad, spectrum, group, weight, attention, columns, grad_spectrum, grad_attention,
                              work, batch, rows, cols, num_groups);
}
