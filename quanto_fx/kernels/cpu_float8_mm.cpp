// Float8 weight-only GEMMs on x86 CPUs with AVX512: float32 activations (or float16 / bfloat16 ones, widened a
// row at a time; see StoredX in cpu_simd.h) times float8_e4m3fn / float8_e5m2 weights (N, K) with
// per-output-channel scales.
// Built into the same library as cpu_vnni_mm.cpp and loaded by cpu_float8_mm.py; see its docstring.
//
// Why: torch converts float8 to float32 element by element on the CPU (about 55 ms for 4096 x 4096 on a
// 2-core Xeon), which made float8 weights 2 to 30x slower than the fp32 GEMM they replace. Here 32 weights
// become float32 in a few vector instructions, through float16: e5m2 bytes are the high byte of their
// float16 (b << 8); an e4m3fn byte s.eeee.mmm becomes the float16 s.0eeee.mmm0000000, which is the value
// times 2**-8 for normal and subnormal codes alike (e4m3's subnormals are float16 normals or subnormals;
// vcvtph2ps converts both exactly), so 2**8 joins the channel scale. e4m3fn's NaN (s.1111.111) is mapped
// to a float16 NaN explicitly. Two forms: a GEMV that converts each weight chunk per tile of rows of x
// (small M), and a GEMM whose micro-kernel runs every row of x over a converted panel of the weight; on CPUs
// with AVX512-FP16 both compute in float16 (see there). On the others, from BLAS_MIN_M rows on, blocks of the
// weight are converted to float32 for torch's BLAS GEMM.
//
// Every index is checked by the Python caller; nothing here validates again.

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <atomic>
#include <memory>

#include "cpu_simd.h"

// AVX512-FP16 intrinsics need GCC 12 or Clang 14; older compilers build the rest (float32 GEMV only).
#if (defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12)
#define QUANTO_HAS_FP16_INTRINSICS 1
#define FP16_TARGET __attribute__((target("avx512fp16,avx512bw,avx512vl,avx512f")))
#else
#define QUANTO_HAS_FP16_INTRINSICS 0
#endif

namespace {

constexpr int E4M3 = 0, E5M2 = 1;
constexpr float E4M3_SCALE = 256.f;  // the float16 form of an e4m3 code is its value times 2**-8

// The float16 form of 32 e4m3fn codes (value times 2**-8) as 16-bit lanes, but for NaN codes (s.1111.111),
// which become 1.875 (e4m3's largest finite magnitude is 448 = 1.75 * 2**8): sign-extended and shifted left
// by 7, eeee.mmm lands on bits 13..7 and the sign on bits 15 and 14; bit 14 is cleared.
INLINE __m512i e4m3_to_half_but_nan(__m256i raw) {
    return _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(raw), 7), _mm512_set1_epi16((short)0xBFFF));
}

INLINE __m512i e4m3_to_half(__m256i raw) {  // NaN codes mapped to a float16 NaN
    const __mmask32 nan = _mm256_cmpeq_epi8_mask(_mm256_and_si256(raw, _mm256_set1_epi8(0x7F)), _mm256_set1_epi8(0x7F));
    return _mm512_mask_mov_epi16(e4m3_to_half_but_nan(raw), nan, _mm512_set1_epi16(0x7E00));
}

// The float32 values (times E4M3_SCALE for e4m3) of 32 float8 codes: codes 0-15 into lo, 16-31 into hi.
template <int FORMAT>
INLINE void float8_to_float(__m256i raw, __m512& lo, __m512& hi) {
    const __m512i half =
        FORMAT == E5M2 ? _mm512_slli_epi16(_mm512_cvtepu8_epi16(raw), 8) : e4m3_to_half(raw);
    lo = _mm512_cvtph_ps(_mm512_castsi512_si256(half));
    hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(half, 1));
}

// The same for the float8 bytes `lanes` of bytes .. bytes + 31 (the others read as zeros).
template <int FORMAT>
INLINE void float8_to_float(const uint8_t* bytes, __mmask32 lanes, __m512& lo, __m512& hi) {
    float8_to_float<FORMAT>(_mm256_maskz_loadu_epi8(lanes, bytes), lo, hi);
}

INLINE __mmask32 lanes_from(int64_t k, int64_t K) {
    return K - k >= 32 ? (__mmask32)0xFFFFFFFF : (__mmask32)((1u << (K - k)) - 1);
}

// The same for 16 values k .. k + 15 (float32 vectors).
INLINE __mmask16 lanes16_from(int64_t k, int64_t K) { return (__mmask16)lanes_from(k, K); }

// out[m0 + i, n0 + r] = (the lane sum of acc[i][r]) * x_scales[m0 + i] (1 if null) * unit * scale[n0 + r] +
// bias[n0 + r]: the sums 8 at a time (a last group of fewer padded with zeros), the RT outputs of a row of x in
// one vector. A sum and the scalar arithmetic per output, which reloaded scale, bias and out pointers from the
// stack, took a tenth of the float16 GEMV's time at K = 384.
template <int MT, int RT>
INLINE void store_tile(const __m512 (&acc)[MT][RT], const float* x_scales, float unit, const float* scale,
                       const float* bias, float* out, int64_t N, int64_t n0, int64_t m0) {
    static_assert(RT <= 4, "one 128-bit vector of outputs per row of x");
    constexpr int OUTPUTS = MT * RT;
    alignas(32) float dots[(OUTPUTS + 7) / 8 * 8];
    for (int o = 0; o < OUTPUTS; o += 8) {
        __m512 group[8];
        for (int j = 0; j < 8; j++) group[j] = o + j < OUTPUTS ? (&acc[0][0])[o + j] : _mm512_setzero_ps();
        _mm256_store_ps(dots + o, quanto_fx_cpu::sum8(group));
    }
    const __mmask8 lanes = (1u << RT) - 1;
    const __m128 scales = _mm_mul_ps(_mm_maskz_loadu_ps(lanes, scale + n0), _mm_set1_ps(unit));
    const __m128 biases = bias ? _mm_maskz_loadu_ps(lanes, bias + n0) : _mm_setzero_ps();
    for (int i = 0; i < MT; i++) {
        __m128 row;
        if constexpr (RT == 4)
            row = _mm_load_ps(dots + 4 * i);
        else
            row = _mm_maskz_loadu_ps(lanes, dots + RT * i);
        if (x_scales) row = _mm_mul_ps(row, _mm_set1_ps(x_scales[m0 + i]));
        _mm_mask_storeu_ps(out + (m0 + i) * N + n0, lanes, _mm_fmadd_ps(row, scales, biases));
    }
}

// out[m0 + i, n0 + r] for RT weight rows and MT rows of x: each weight chunk is converted once and used by
// MT rows of x.
template <int FORMAT, int RT, int MT>
INLINE void tile(const float* x, int64_t K, const uint8_t* weight, int64_t N, const float* scale,
                 const float* bias, float* out, int64_t n0, int64_t m0) {
    __m512 acc[MT][RT];
    for (int i = 0; i < MT; i++)
        for (int r = 0; r < RT; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 lanes = lanes_from(k, K);
        __m512 x_lo[MT], x_hi[MT];
        for (int i = 0; i < MT; i++) {
            x_lo[i] = _mm512_maskz_loadu_ps((__mmask16)lanes, x + (m0 + i) * K + k);
            x_hi[i] = _mm512_maskz_loadu_ps((__mmask16)(lanes >> 16), x + (m0 + i) * K + k + 16);
        }
        for (int r = 0; r < RT; r++) {
            const uint8_t* row = weight + (n0 + r) * K;
            _mm_prefetch((const char*)(row + k + 1024), _MM_HINT_T0);  // hints: never fault
            __m512 w_lo, w_hi;
            float8_to_float<FORMAT>(row + k, lanes, w_lo, w_hi);
            for (int i = 0; i < MT; i++)
                acc[i][r] = _mm512_fmadd_ps(w_hi, x_hi[i], _mm512_fmadd_ps(w_lo, x_lo[i], acc[i][r]));
        }
    }
    store_tile(acc, nullptr, FORMAT == E4M3 ? E4M3_SCALE : 1.f, scale, bias, out, N, n0, m0);
}

template <int FORMAT, int RT>
INLINE void weight_rows(const float* x, int64_t M, int64_t K, const uint8_t* weight, int64_t N, const float* scale,
                        const float* bias, float* out, int64_t n0) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) tile<FORMAT, RT, 4>(x, K, weight, N, scale, bias, out, n0, m0);
    // 3 rows in one pass over the weight, not 2 + 1 (2-vCPU Cascade Lake, 1536 x 384: M = 3 89 -> 62 us, M = 7
    // 168 -> 136 us)
    if (M - m0 == 3) tile<FORMAT, RT, 3>(x, K, weight, N, scale, bias, out, n0, m0), m0 += 3;
    for (; m0 + 2 <= M; m0 += 2) tile<FORMAT, RT, 2>(x, K, weight, N, scale, bias, out, n0, m0);
    for (; m0 < M; m0++) tile<FORMAT, RT, 1>(x, K, weight, N, scale, bias, out, n0, m0);
}

template <int FORMAT>
void float8_gemv(const float* x, int64_t M, int64_t K, const uint8_t* weight, int64_t N, const float* scale,
                 const float* bias, float* out, int threads) {
    constexpr int64_t RT = 4;
    const int64_t full = N - N % RT;
    quanto_fx_cpu::parallel_for(0, full, RT, threads, [&](int64_t n0) {
        weight_rows<FORMAT, RT>(x, M, K, weight, N, scale, bias, out, n0);
    });
    for (int64_t n0 = full; n0 < N; n0++) weight_rows<FORMAT, 1>(x, M, K, weight, N, scale, bias, out, n0);
}

// -- GEMV in float16 (CPUs with AVX512-FP16) --------------------------------------------------------------
//
// Converting float8 to float32 (above) costs ~13 vector uops per 32 e4m3 weights, which bounds the float32
// GEMV: 0.43x the fp32 GEMV at 4096 x 4096 and 1.2-1.5x on layers that sit in the caches. Their float16 form
// takes 3 uops (e5m2: 2), and one vfmadd231ph multiplies-adds 32 of them. Each row of x is scaled to |x| <=
// x_half_max<FORMAT>() and rounded to float16 (relative 2**-11); the products are summed in float16 over
// FP16_BLOCK inputs per lane and in float32 beyond. The result's relative error is ~5e-4, against the
// formats' own ~3e-2 (e4m3) and ~6e-2 (e5m2).
// 512, not 256: K = 384 in one block, whose float16 sums are flushed to float32 once (384 x 1536 at M = 4 and 8:
// 0.86-0.89x the time).
constexpr int64_t FP16_BLOCK = 512;

// x's scale: a lane's block sum of FP16_BLOCK / 32 = 16 products stays below float16's 65504. e4m3: 16 *
// 1.75 * 2048 = 57344 (2048, not 1: the products of e4m3's smallest codes, 2**-17 in float16 form, with small
// x stay float16 normals; scaled to 1, weights of small codes lost precision: 4.6e-3 relative error at weight
// std 0.003). e5m2 codes are float16 values up to 57344: 16 * 57344 * 2**-4 = 57344.
template <int FORMAT>
constexpr float x_half_max() {
    return FORMAT == E4M3 ? 2048.f : 0.0625f;
}

// x is scaled for e5m2's largest codes (57344): the products of a row whose codes are all small (weights not
// scaled to the format's range) would fall among float16's subnormals, with 2**-24 absolute precision (relative
// error of the outputs 1e-3 at codes <= 2**-8, 1e-2 at <= 2**-11). A GEMV group of 4 weight rows (for every row
// of x) or a GEMM block holding a row with no code of at least 2**-6 (e5m2 magnitude byte 9 << 2) among its
// first 512 inputs is computed by the float32 kernels instead (float32 x), decided before any float16 work on
// it: recomputing such rows one dot product per row of x after the float16 work had made unscaled weights 3x
// (GEMV) to 8x (GEMM) slower than fp32.
constexpr char E5M2_FLOAT16_MIN_CODE = 9 << 2;

// Whether one of the first `count` codes of a weight row has a magnitude (sign bit cleared) of `code` or more,
// 64 codes at a time, stopping at the first.
INLINE bool holds_magnitude(const uint8_t* row, int64_t count, char code) {
    for (int64_t k = 0; k < count; k += 64) {
        const __mmask64 lanes = count - k >= 64 ? ~0ull : (1ull << (count - k)) - 1;
        const __m512i magnitudes = _mm512_and_si512(_mm512_maskz_loadu_epi8(lanes, row + k), _mm512_set1_epi8(0x7F));
        if (_mm512_cmpge_epu8_mask(magnitudes, _mm512_set1_epi8(code))) return true;
    }
    return false;
}

// Whether one of `count` weight rows from row n0 has no code of at least E5M2_FLOAT16_MIN_CODE among its first
// FP16_BLOCK inputs (e5m2 rows the float16 kernels leave to the float32 ones, see there).
INLINE bool holds_row_of_small_e5m2_codes(const uint8_t* weight, int64_t n0, int64_t count, int64_t K) {
    for (int64_t r = 0; r < count; r++)
        if (!holds_magnitude(weight + (n0 + r) * K, std::min(K, FP16_BLOCK), E5M2_FLOAT16_MIN_CODE)) return true;
    return false;
}

// Whether one of RT weight rows (K codes each, from `rows`) holds an e4m3fn NaN code (s.1111.111): their
// largest magnitude, 64 codes at a time without a branch.
template <int RT>
INLINE bool rows_hold_e4m3_nan(const uint8_t* rows, int64_t K) {
    __m512i largest = _mm512_setzero_si512();
    const __m512i magnitude = _mm512_set1_epi8(0x7F);
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
        for (int r = 0; r < RT; r++)
            largest = _mm512_max_epu8(largest, _mm512_and_si512(_mm512_loadu_si512(rows + r * K + k), magnitude));
    for (int r = 0; k < K && r < RT; r++) {
        const __m512i codes = _mm512_maskz_loadu_epi8((1ull << (K - k)) - 1, rows + r * K + k);
        largest = _mm512_max_epu8(largest, _mm512_and_si512(codes, magnitude));
    }
    return _mm512_cmpeq_epi8_mask(largest, _mm512_set1_epi8(0x7F)) != 0;
}

#if QUANTO_HAS_FP16_INTRINSICS
// One chunk of 32 inputs k .. k + 31 of a tile (see tile_fp16); TAIL: the last, partial one (`lanes`), read
// with masks. Whole chunks are read without: their loads fold into the instructions that use them.
template <int FORMAT, int RT, int MT, bool TAIL>
FP16_TARGET INLINE void chunk_fp16(const uint16_t* xh, int64_t K, const uint8_t* weight, int64_t n0, int64_t m0,
                                   int64_t k, __mmask32 lanes, __m512h (&sums)[MT][RT]) {
    __m512h x[MT];
    for (int i = 0; i < MT; i++) {
        const uint16_t* at = xh + (m0 + i) * K + k;
        x[i] = _mm512_castsi512_ph(TAIL ? _mm512_maskz_loadu_epi16(lanes, at) : _mm512_loadu_si512(at));
    }
    for (int r = 0; r < RT; r++) {
        const uint8_t* at = weight + (n0 + r) * K + k;
        _mm_prefetch((const char*)(at + 1024), _MM_HINT_T0);  // hints: never fault
        const __m256i raw = TAIL ? _mm256_maskz_loadu_epi8(lanes, at) : _mm256_loadu_si256((const __m256i*)at);
        const __m512i half =
            FORMAT == E4M3 ? e4m3_to_half_but_nan(raw) : _mm512_slli_epi16(_mm512_cvtepu8_epi16(raw), 8);
        const __m512h w = _mm512_castsi512_ph(half);
        for (int i = 0; i < MT; i++) sums[i][r] = _mm512_fmadd_ph(w, x[i], sums[i][r]);
    }
}

// out[m0 + i, n0 + r] for RT weight rows and MT rows of x (rounded to float16 in xh, with scales sx). e4m3fn
// NaN codes come out finite here (see weight_rows_fp16).
template <int FORMAT, int RT, int MT>
FP16_TARGET INLINE void tile_fp16(const uint16_t* xh, const float* sx, int64_t K, const uint8_t* weight, int64_t N,
                                  const float* scale, const float* bias, float* out, int64_t n0, int64_t m0) {
    __m512 acc[MT][RT];
    for (int i = 0; i < MT; i++)
        for (int r = 0; r < RT; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t block = 0; block < K; block += FP16_BLOCK) {
        __m512h sums[MT][RT];
        for (int i = 0; i < MT; i++)
            for (int r = 0; r < RT; r++) sums[i][r] = _mm512_setzero_ph();
        const int64_t end = std::min(K, block + FP16_BLOCK);
        int64_t k = block;
        for (; k + 32 <= end; k += 32) chunk_fp16<FORMAT, RT, MT, false>(xh, K, weight, n0, m0, k, 0, sums);
        if (k < end) chunk_fp16<FORMAT, RT, MT, true>(xh, K, weight, n0, m0, k, lanes_from(k, K), sums);
        for (int i = 0; i < MT; i++)
            for (int r = 0; r < RT; r++) {
                const __m512i bits = _mm512_castph_si512(sums[i][r]);
                const __m512 low = _mm512_cvtph_ps(_mm512_castsi512_si256(bits));
                const __m512 high = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(bits, 1));
                acc[i][r] = _mm512_add_ps(acc[i][r], _mm512_add_ps(low, high));
            }
    }
    store_tile(acc, sx, FORMAT == E4M3 ? E4M3_SCALE : 1.f, scale, bias, out, N, n0, m0);
}

template <int FORMAT, int RT>  // not inlined: called from parallel_for's lambda, which has no target attribute
FP16_TARGET void weight_rows_fp16(const float* x, const uint16_t* xh, const float* sx, int64_t M, int64_t K,
                                  const uint8_t* weight, int64_t N, const float* scale, const float* bias, float* out,
                                  int64_t n0) {
    // Each weight row is checked once here, not in every tile (2 uops per chunk of 32 codes; with the scalar
    // stores of tile_fp16, 384 x 1536 at M = 2-6 took 0.88-1.16x the fp32 time, now 0.75-0.99x): e5m2 rows of
    // small codes take the float32 GEMV (see E5M2_FLOAT16_MIN_CODE); an e4m3fn row holding a NaN code
    // (s.1111.111, not mapped in the tiles) gives NaN outputs. e5m2's inf and NaN codes are float16's own, which
    // float16 arithmetic propagates as float32 would.
    if (FORMAT == E5M2 && holds_row_of_small_e5m2_codes(weight, n0, RT, K))
        return weight_rows<E5M2, RT>(x, M, K, weight, N, scale, bias, out, n0);
    int64_t m0 = 0;
    constexpr int RT8 = RT > 1 ? 2 : 1;  // 8 rows of x: 2 weight rows at a time keep the 16 sums in registers
    for (; m0 + 8 <= M; m0 += 8)
        for (int64_t r = 0; r < RT; r += RT8)
            tile_fp16<FORMAT, RT8, 8>(xh, sx, K, weight, N, scale, bias, out, n0 + r, m0);
    for (; m0 + 4 <= M; m0 += 4) tile_fp16<FORMAT, RT, 4>(xh, sx, K, weight, N, scale, bias, out, n0, m0);
    // The last 1 to 3 rows in one tile: each tile converts the weight again (3 rows as 2 + 1: 1.4x the fp32
    // GEMM's time on 384 x 1536, whose weight stays in L2).
    if (M - m0 == 3) tile_fp16<FORMAT, RT, 3>(xh, sx, K, weight, N, scale, bias, out, n0, m0);
    if (M - m0 == 2) tile_fp16<FORMAT, RT, 2>(xh, sx, K, weight, N, scale, bias, out, n0, m0);
    if (M - m0 == 1) tile_fp16<FORMAT, RT, 1>(xh, sx, K, weight, N, scale, bias, out, n0, m0);
    if (FORMAT == E4M3 && rows_hold_e4m3_nan<RT>(weight + n0 * K, K))
        for (int r = 0; r < RT; r++)
            if (rows_hold_e4m3_nan<1>(weight + (n0 + r) * K, K))
                for (int64_t m = 0; m < M; m++) out[m * N + n0 + r] = NAN;
}

template <int FORMAT>
FP16_TARGET void float8_gemv_fp16(const float* x, const uint16_t* xh, const float* sx, int64_t M, int64_t K,
                                  const uint8_t* weight, int64_t N, const float* scale, const float* bias, float* out,
                                  int threads) {
    constexpr int64_t RT = 4;
    const int64_t full = N - N % RT;
    quanto_fx_cpu::parallel_for(0, full, RT, threads, [&](int64_t n0) {
        weight_rows_fp16<FORMAT, RT>(x, xh, sx, M, K, weight, N, scale, bias, out, n0);
    });
    for (int64_t n0 = full; n0 < N; n0++) weight_rows_fp16<FORMAT, 1>(x, xh, sx, M, K, weight, N, scale, bias, out, n0);
}

bool cpu_has_fp16() {
    static const bool has = __builtin_cpu_supports("avx512fp16");
    return has;
}
#else
bool cpu_has_fp16() { return false; }
#endif

// The float16 scaling of a row whose largest |x| is amax: |x| <= x_half_max after the multiplication by *inverse,
// *sx undoing it; false, for the float32 kernels, when the row cannot be scaled: amax not finite (a NaN or an
// infinity in the row, which float32 propagates), max |x| < 1e-30, or a scale that is not a normal float32
// (flush-to-zero would zero it; with e5m2 weights, max |x| > ~5e36).
INLINE bool half_scale(float amax, float x_half_max, float* sx, float* inverse) {
    if (!isfinite(amax)) return false;
    if (amax > 0.f && (amax < 1e-30f || !isnormal(amax / x_half_max) || !isnormal(x_half_max / amax)))
        return false;
    *sx = amax > 0.f ? amax / x_half_max : 1.f;
    *inverse = amax > 0.f ? x_half_max / amax : 1.f;
    return true;
}

// A row of K values of x as float16 scaled by half_scale (xh_row) and its scale (*sx); false when half_scale
// cannot scale it (row_abs_max is NaN for a row holding a NaN or an infinity).
bool row_to_half(const float* row, int64_t K, float x_half_max, uint16_t* xh_row, float* sx) {
    float inverse;
    if (!half_scale(quanto_fx_cpu::row_abs_max(row, K), x_half_max, sx, &inverse)) return false;
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 lanes = lanes16_from(k, K);
        const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, row + k), _mm512_set1_ps(inverse));
        _mm256_mask_storeu_epi16(xh_row + k, lanes, _mm512_cvtps_ph(scaled, _MM_FROUND_TO_NEAREST_INT));
    }
    return true;
}

// x (M, K) by row_to_half into xh (M, K) and sx (M).
bool x_to_half(const float* x, int64_t M, int64_t K, float x_half_max, uint16_t* xh, float* sx) {
    for (int64_t m = 0; m < M; m++)
        if (!row_to_half(x + m * K, K, x_half_max, xh + m * K, sx + m)) return false;
    return true;
}

// The formats' largest finite value, mantissa bits and smallest normal exponent.
constexpr float FORMAT_MAX[2] = {448.f, 57344.f};
constexpr int FORMAT_MANTISSA[2] = {3, 2}, FORMAT_MIN_EXPONENT[2] = {-6, -14};

// The dynamic float8 quantization of a row of float32 values of the dtype `precision` whose largest |x| is amax,
// as QTensor.quantize(x, qfloat8_*, axis=0) computes it: scale s = max(max|x| / FORMAT_MAX, finfo.tiny), and a
// value's code round(clamp(x / s)) to the format's grid (half to even, subnormals included), the same IEEE
// operations rounded to `precision` as torch rounds them (cpu_simd.h). The reference dequantizes a code as
// codes.float() * s. Every step is monotonic in |x|: the row's largest |code| is that of amax.
struct Float8Grid {
    int precision, mantissa, min_exponent;
    float qmax, s;
    Float8Grid(int format, int precision, float amax)
        : precision(precision),
          mantissa(FORMAT_MANTISSA[format]),
          min_exponent(FORMAT_MIN_EXPONENT[format]),
          qmax(FORMAT_MAX[format]),
          s(std::max(quanto_fx_cpu::round_to(amax / qmax, precision), quanto_fx_cpu::smallest_normal(precision))) {}

    // the codes' values of 16 values of x
    inline __attribute__((always_inline)) __m512 code(__m512 x) const {
        const __m512 quotient = quanto_fx_cpu::round_to(_mm512_div_ps(x, _mm512_set1_ps(s)), precision);
        const __m512 v = _mm512_min_ps(_mm512_max_ps(quotient, _mm512_set1_ps(-qmax)), _mm512_set1_ps(qmax));
        // the grid's step at v: 2**(exponent - mantissa), the exponent no lower than the smallest normal one
        const __m512 exponent = _mm512_max_ps(_mm512_getexp_ps(v), _mm512_set1_ps((float)min_exponent));
        const __m512 shift = _mm512_sub_ps(_mm512_set1_ps((float)mantissa), exponent);
        const __m512 on_grid = _mm512_roundscale_ps(_mm512_scalef_ps(v, shift), _MM_FROUND_TO_NEAREST_INT);
        return _mm512_scalef_ps(on_grid, _mm512_sub_ps(_mm512_setzero_ps(), shift));
    }
};

// A row of K values of x in `precision` -> its dynamic float8 quantization, dequantized (Float8Grid), into
// `values`. Returns false when the row holds a NaN or an infinity.
bool dequantized_float8_row(int format, int precision, const float* row, int64_t K, float* values) {
    const float amax = quanto_fx_cpu::row_abs_max(row, K);
    if (isnan(amax)) return false;
    const Float8Grid grid(format, precision, amax);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 lanes = lanes16_from(k, K);
        const __m512 value = _mm512_mul_ps(grid.code(_mm512_maskz_loadu_ps(lanes, row + k)), _mm512_set1_ps(grid.s));
        _mm512_mask_storeu_ps(values + k, lanes, value);
    }
    return true;
}

// Values of x below which dequantized_float8_rows runs on one thread (as it does 1 or 2 rows of any length): a
// team for a few short rows cost more than their work (2-vCPU Cascade Lake, modules, e4m3fn dynamic / fp32, from
// more than 2 rows on before: 256 x 256 at M = 6 1.24-1.30 -> 1.04-1.08, at 8 1.48-1.49 -> 1.03-1.18; 384 x 384
// at M = 3 1.46-1.66 -> 1.00-1.05).
constexpr int64_t SERIAL_X_BELOW_VALUES = 1 << 15;

// x (M, K) by dequantized_float8_row into `values` (M, K), rows shared among the threads. Returns 1 when x
// holds a NaN or an infinity.
int dequantized_float8_rows(int format, int precision, const float* x, int64_t M, int64_t K, float* values,
                            int threads) {
    std::atomic<bool> bad{false};
    quanto_fx_cpu::parallel_for(0, M, 1, M > 2 && M * K >= SERIAL_X_BELOW_VALUES ? threads : 1, [&](int64_t m) {
        if (!dequantized_float8_row(format, precision, x + m * K, K, values + m * K))
            bad.store(true, std::memory_order_relaxed);
    });
    return bad.load();
}

// row_to_half of dequantized_float8_row's values, in one pass over the row after its max: the values' largest
// magnitude is that of amax's code (Float8Grid), and each value is computed, scaled and rounded to float16 as
// those two functions do (the same results, without writing the values and reading them twice). False for a
// row holding a NaN or an infinity, and for one whose scale overflows x's dtype (float16 rows past 65504 *
// FORMAT_MAX, which torch's float16 x cannot hold: s infinite, the values NaN), as there.
bool dequantized_float8_row_to_half(int format, int precision, const float* row, int64_t K, float x_half_max,
                                    uint16_t* xh_row, float* sx) {
    const float amax = quanto_fx_cpu::row_abs_max(row, K);
    if (isnan(amax)) return false;  // (checked here: Float8Grid's clamp would turn a NaN into a finite code)
    const Float8Grid grid(format, precision, amax);
    float inverse;
    const float largest = _mm512_cvtss_f32(grid.code(_mm512_set1_ps(amax))) * grid.s;
    if (!half_scale(largest, x_half_max, sx, &inverse)) return false;
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 lanes = lanes16_from(k, K);
        const __m512 value = _mm512_mul_ps(grid.code(_mm512_maskz_loadu_ps(lanes, row + k)), _mm512_set1_ps(grid.s));
        const __m512 scaled = _mm512_mul_ps(value, _mm512_set1_ps(inverse));
        _mm256_mask_storeu_epi16(xh_row + k, lanes, _mm512_cvtps_ph(scaled, _MM_FROUND_TO_NEAREST_INT));
    }
    return true;
}

// The rows of x the float16 GEMM converts (float8_gemm_fp16): float8_weight_mm's x as it is ...
template <int FORMAT>
struct GivenRows {
    quanto_fx_cpu::StoredX x;
    // for e5m2 blocks of small codes, which run the float32 GEMM on all of x: float32 storage only (callers
    // with a 16-bit x and e5m2 weights check first that no block holds such codes)
    const float* float32() const {
        return x.storage == quanto_fx_cpu::FLOAT32 ? static_cast<const float*>(x.data) : nullptr;
    }
    bool to_half(int64_t m, uint16_t* xh_row, float* sx) const {
        return row_to_half(x.row(m), x.K, x_half_max<FORMAT>(), xh_row, sx);
    }
};

// ... or float8_dynamic_mm's x, each row quantized and dequantized on the way, for e4m3fn weights (which need no
// float32 rows).
struct DynamicRows {
    quanto_fx_cpu::StoredX x;
    int x_format, precision;
    const float* float32() const { return nullptr; }
    bool to_half(int64_t m, uint16_t* xh_row, float* sx) const {
        return dequantized_float8_row_to_half(x_format, precision, x.row(m), x.K, x_half_max<E4M3>(), xh_row, sx);
    }
};

// -- GEMM (larger M) ------------------------------------------------------------------------------------
//
// The GEMV converts each weight chunk once per tile of rows of x and reduces it horizontally: past M = 16 it
// is slower than the fp32 GEMM. Here rows n0 .. n0 + 16 NR of the weight are converted once into a panel of
// float32 vectors, one output column per lane (panel[k * NR + c] = rows n0 + 16 c .. + 15 at input k), and
// every row of x in the chunk runs over it with broadcast FMAs, as a float GEMM's micro-kernel does.
constexpr int GEMM_COLUMN_BLOCKS = 2;
// Rows of x per pass over the weight (each pass converts it once). 4096 x 4096, M = 512 (2-core Xeon, x fp32
// time): 1 MB chunks 1.11x, 4 MB 1.03x, 8 MB 0.96x; M = 256: 8 MB 0.90x.
constexpr int64_t GEMM_X_CHUNK_BYTES = 8 << 20;

struct alignas(64) Vector {  // storage for one __m512 (std containers of __m512 drop its alignment)
    float lanes[16];
};

// Inputs k .. k + 3 of 16 weight rows from `rows` (K bytes apart; rows outside `valid` read as 0): their
// 32-bit words gathered and the bytes regrouped by input (bytes 16 j .. 16 j + 15 = input k + j of the rows).
INLINE __m512i gather_inputs(const uint8_t* rows, int64_t K, int64_t k, __mmask16 valid) {
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i row_offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32((int)K));
    const __m512i by_input = _mm512_set4_epi32(0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400);
    const __m512i by_lane = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, row_offsets, rows + k, 1);
    return _mm512_permutexvar_epi32(by_lane, _mm512_shuffle_epi8(words, by_input));
}

// Input k of up to 32 weight rows from `rows` (K bytes apart; rows outside `valid` as 0), one byte at a time:
// the K % 4 inputs past the gathered words.
INLINE __m256i input_codes(const uint8_t* rows, int64_t K, int64_t k, __mmask32 valid) {
    alignas(32) uint8_t column[32] = {};
    for (int r = 0; r < 32; r++)
        if (valid >> r & 1) column[r] = rows[r * K + k];
    return _mm256_load_si256((const __m256i*)column);
}

// panel (K * NR vectors) from rows n0 .. n0 + 16 NR, converted to float32.
template <int FORMAT, int NR>
void gather_panel(const uint8_t* weight, int64_t n0, int64_t K, __mmask16 last_lanes, __m512* panel) {
    const int64_t whole_words = K - K % 4;
    for (int c = 0; c < NR; c++) {
        const __mmask16 valid = c == NR - 1 ? last_lanes : (__mmask16)0xFFFF;
        const uint8_t* rows = weight + (n0 + 16 * c) * K;
        __m512 v[4];
        for (int64_t k = 0; k < whole_words; k += 4) {
            const __m512i codes = gather_inputs(rows, K, k, valid);
            float8_to_float<FORMAT>(_mm512_castsi512_si256(codes), v[0], v[1]);
            float8_to_float<FORMAT>(_mm512_extracti64x4_epi64(codes, 1), v[2], v[3]);
            for (int j = 0; j < 4; j++) panel[(k + j) * NR + c] = v[j];
        }
        for (int64_t k = whole_words; k < K; k++) {
            float8_to_float<FORMAT>(input_codes(rows, K, k, valid), v[0], v[1]);
            panel[k * NR + c] = v[0];
        }
    }
}

// out[m0 .. m0 + MR, n0 .. n0 + 16 NR] = x rows times the panel, times the columns' scales.
template <int MR, int NR>
INLINE void gemm_tile(const __m512* panel, const float* x, int64_t K, int64_t m0, const __m512* column_scales,
                      const __m512* column_bias, float* out, int64_t N, int64_t n0, __mmask16 last_lanes) {
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int c = 0; c < NR; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 w[NR];
        for (int c = 0; c < NR; c++) w[c] = panel[k * NR + c];
        for (int i = 0; i < MR; i++) {
            const __m512 xs = _mm512_set1_ps(x[(m0 + i) * K + k]);
            for (int c = 0; c < NR; c++) acc[i][c] = _mm512_fmadd_ps(w[c], xs, acc[i][c]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int c = 0; c < NR; c++) {
            const __mmask16 valid = c == NR - 1 ? last_lanes : (__mmask16)0xFFFF;
            const __m512 value = _mm512_fmadd_ps(acc[i][c], column_scales[c], column_bias[c]);
            _mm512_mask_storeu_ps(out + (m0 + i) * N + n0 + 16 * c, valid, value);
        }
}

// Rows first .. last of x over one panel: tiles of GEMM_ROWS rows (8 x 2 vectors: 16 accumulators; 12 x 2
// and 6 x 4 ran no faster), then smaller ones.
constexpr int GEMM_ROWS = 8;

template <int FORMAT, int NR>
void gemm_block(const uint8_t* weight, const float* x, int64_t first, int64_t last, int64_t K, const float* scale,
                const float* bias, float* out, int64_t N, int64_t n0, __mmask16 last_lanes, __m512* panel) {
    gather_panel<FORMAT, NR>(weight, n0, K, last_lanes, panel);
    const float unit = FORMAT == E4M3 ? E4M3_SCALE : 1.f;
    __m512 column_scales[NR], column_bias[NR];
    for (int c = 0; c < NR; c++) {
        const __mmask16 valid = c == NR - 1 ? last_lanes : (__mmask16)0xFFFF;
        column_scales[c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, scale + n0 + 16 * c), _mm512_set1_ps(unit));
        column_bias[c] = bias ? _mm512_maskz_loadu_ps(valid, bias + n0 + 16 * c) : _mm512_setzero_ps();
    }
    int64_t m = first;
    for (; m + GEMM_ROWS <= last; m += GEMM_ROWS)
        gemm_tile<GEMM_ROWS, NR>(panel, x, K, m, column_scales, column_bias, out, N, n0, last_lanes);
    for (; m + 4 <= last; m += 4) gemm_tile<4, NR>(panel, x, K, m, column_scales, column_bias, out, N, n0, last_lanes);
    for (; m < last; m++) gemm_tile<1, NR>(panel, x, K, m, column_scales, column_bias, out, N, n0, last_lanes);
}

template <int FORMAT>
void float8_gemm(const float* x, int64_t M, int64_t K, const uint8_t* weight, int64_t N, const float* scale,
                 const float* bias, float* out, int threads) {
    constexpr int NR = GEMM_COLUMN_BLOCKS;
    const int64_t wide_blocks = N / (16 * NR), narrow_blocks = (N - wide_blocks * 16 * NR + 15) / 16;
    const __mmask16 tail_lanes = N % 16 ? (__mmask16)((1u << (N % 16)) - 1) : (__mmask16)0xFFFF;
    const int64_t chunk = std::max<int64_t>(GEMM_ROWS, GEMM_X_CHUNK_BYTES / (4 * K));
    // One panel per thread (not zeroed: every vector is written), allocated where a failure can still reach
    // the caller (std::bad_alloc, not inside the parallel region).
    std::unique_ptr<Vector[]> panels(new Vector[threads * K * NR]);
    quanto_fx_cpu::parallel_region(threads, [&] {
        __m512* panel = reinterpret_cast<__m512*>(panels.get() + omp_get_thread_num() * K * NR);
        for (int64_t first = 0; first < M; first += chunk) {
            const int64_t last = std::min(M, first + chunk);
#pragma omp for schedule(static) nowait
            for (int64_t b = 0; b < wide_blocks + narrow_blocks; b++) {
                if (b < wide_blocks) {
                    gemm_block<FORMAT, NR>(weight, x, first, last, K, scale, bias, out, N, b * 16 * NR, 0xFFFF, panel);
                } else {
                    const int64_t n0 = wide_blocks * 16 * NR + (b - wide_blocks) * 16;
                    const __mmask16 lanes = n0 + 16 > N ? tail_lanes : (__mmask16)0xFFFF;
                    gemm_block<FORMAT, 1>(weight, x, first, last, K, scale, bias, out, N, n0, lanes, panel);
                }
            }
        }
    });
}

// -- GEMM through BLAS (larger M, CPUs without AVX512-FP16) -----------------------------------------------
//
// In float32, converting the codes is float8's only work beyond the fp32 GEMM's, and torch's BLAS GEMM
// (at::mm: MKL or oneDNN) runs the multiply-adds nearer the FMA units' peak than float8_gemm's panels. So
// blocks of weight rows become float32 values (times their channel's scale) in a workspace, and addmm writes
// those columns of out: BLAS's time plus one conversion of the weight and its float32 block written and read
// once. That pays at large M only (2-vCPU Cascade Lake, kernels alone, time / fp32 F.linear, panels / BLAS,
// 128 x 128 to 4096 x 4096, two noisy runs: M = 64 0.61-0.87 / 1.12-1.30; M = 512 0.82-1.31 / 0.97-1.34; M =
// 1024 0.95-1.40 / 0.99-1.06; M = 4096 0.96-1.57 / 0.90-1.17). BLAS follows torch's float32 matmul settings,
// as F.linear does: torch.set_float32_matmul_precision("medium") may let oneDNN compute it in bfloat16.
constexpr int64_t BLAS_MIN_M = 1024;
// Workspace of float32 weight rows per block: BLAS reads all of x once per block, so few blocks (a 4096 x
// 4096 weight in four), but each one converted before BLAS reads it, not all of a large weight at once.
constexpr int64_t BLAS_BLOCK_BYTES = 16 << 20;

// values (rows, K) = weight rows n0 .. n0 + rows as float32, times their channel's scale.
template <int FORMAT>
void dequantize_rows(const uint8_t* weight, int64_t K, const float* scale, int64_t n0, int64_t rows, float* values,
                     int threads) {
    const float unit = FORMAT == E4M3 ? E4M3_SCALE : 1.f;
    quanto_fx_cpu::parallel_for(0, rows, 1, threads, [&](int64_t r) {
        const uint8_t* row = weight + (n0 + r) * K;
        float* into = values + r * K;
        const __m512 channel = _mm512_set1_ps(scale[n0 + r] * unit);
        for (int64_t k = 0; k < K; k += 32) {
            const __mmask32 lanes = lanes_from(k, K);
            __m512 lo, hi;
            float8_to_float<FORMAT>(row + k, lanes, lo, hi);
            _mm512_mask_storeu_ps(into + k, (__mmask16)lanes, _mm512_mul_ps(lo, channel));
            _mm512_mask_storeu_ps(into + k + 16, (__mmask16)(lanes >> 16), _mm512_mul_ps(hi, channel));
        }
    });
}

// out = x @ (W * scale).T + bias by blocks of weight rows (the columns of out) through BLAS; the conversion on
// `threads` threads, BLAS on torch's.
template <int FORMAT>
void float8_gemm_blas(const float* x, int64_t M, int64_t K, const uint8_t* weight, int64_t N, const float* scale,
                      const float* bias, float* out, int threads) {
    const int64_t block_rows = std::min(N, std::max<int64_t>(16, BLAS_BLOCK_BYTES / (4 * std::max<int64_t>(K, 1))));
    const auto values = quanto_fx_cpu::aligned_workspace<float>(block_rows * K);
    const at::Tensor x_matrix = at::from_blob(const_cast<float*>(x), {M, K}, at::kFloat);
    for (int64_t n0 = 0; n0 < N; n0 += block_rows) {
        const int64_t rows = std::min(block_rows, N - n0);
        dequantize_rows<FORMAT>(weight, K, scale, n0, rows, values.get(), threads);
        const at::Tensor w_t = at::from_blob(values.get(), {K, rows}, {1, K}, at::kFloat);  // (rows, K) transposed
        at::Tensor columns = at::from_blob(out + n0, {M, rows}, {N, 1}, at::kFloat);  // strided: BLAS's ldc
        // at::cpu's kernels, called directly rather than through the dispatcher
        if (bias) {
            const at::Tensor bias_rows = at::from_blob(const_cast<float*>(bias) + n0, {rows}, at::kFloat);
            at::cpu::addmm_out(columns, bias_rows, x_matrix, w_t);
        } else {
            at::cpu::mm_out(columns, x_matrix, w_t);
        }
    }
}

// -- GEMM in float16 (e4m3fn weights, CPUs with AVX512-FP16) ------------------------------------------------
//
// The GEMM above does fp32's multiply-adds plus the conversion (0.8-1.06x the fp32 GEMM past M = 128). Here
// the panel holds the codes' float16 form, one vector of 32 weight rows per input, and x's float16 rows
// (scaled as for the GEMV) are broadcast from memory into vfmadd231ph: 32 multiply-adds per instruction. Each
// lane sums FP16_GEMM_BLOCK products of one output in float16 (the GEMV's bound: 16), then float32. The panel
// is built FP16_GEMM_KC inputs at a time so that it stays in L1 while every row of x in the chunk runs over it;
// the sums so far wait in out. NaN codes map to float16 NaNs, which propagate. e5m2 blocks holding a row of
// small codes run the float32 GEMM's block (see E5M2_FLOAT16_MIN_CODE).
#if QUANTO_HAS_FP16_INTRINSICS
constexpr int64_t FP16_GEMM_BLOCK = FP16_BLOCK / 32;
// Inputs per panel block: 512 x 64 B = 32 KB, in L1 (256: 0.74-0.90x fp32 where 512 gave 0.62-0.89x).
constexpr int64_t FP16_GEMM_KC = 512;
// 12 rows x 32 columns: 12 float16 sums in registers, each widened into two float32 vectors in L1 every
// FP16_GEMM_BLOCK inputs (24 more vectors would not fit the 32 registers). 8 rows, all in registers, ran 5-15%
// slower (8 chains of multiply-adds, 4 cycles each, barely fill the 2 FMA ports); 14 and 16 no faster than 12.
// 4 rows x 64 columns ran no faster than the float32 GEMM (each broadcast of x, used twice, took a shuffle
// uop beside the FMAs).
constexpr int FP16_GEMM_ROWS = 12;
// Rows of x per pass over the weight: 1 MB of float16 x (384 x 1536 at M = 2048, x fp32 time: 8 MB 1.02x, 2 MB
// 0.97x, 1 MB 0.87x; 4096 x 4096 at M = 512: 0.99x / 0.94x / 0.88x).
constexpr int64_t FP16_GEMM_X_CHUNK_BYTES = 1 << 20;

// The float16 form of input k of 32 weight rows (e4m3fn: times 2**-8, NaN codes as float16 NaNs; e5m2: as is).
template <int FORMAT>
FP16_TARGET INLINE __m512h panel_vector(__m256i codes) {
    if constexpr (FORMAT == E4M3) return _mm512_castsi512_ph(e4m3_to_half(codes));
    return _mm512_castsi512_ph(_mm512_slli_epi16(_mm512_cvtepu8_epi16(codes), 8));
}

// panel (kc float16 vectors) from weight rows n0 .. n0 + 31 (valid[0], valid[1]: the rows that exist),
// inputs k0 .. k0 + kc.
template <int FORMAT>
FP16_TARGET void gather_panel_fp16(const uint8_t* weight, int64_t n0, int64_t K, int64_t k0, int64_t kc,
                                   const __mmask16* valid, __m512h* panel) {
    const uint8_t* rows = weight + n0 * K + k0;
    const int64_t whole_words = kc - kc % 4;
    alignas(64) uint8_t bytes[2][64];  // gather_inputs of rows 0-15 and 16-31
    for (int64_t k = 0; k < whole_words; k += 4) {
        for (int h = 0; h < 2; h++) _mm512_store_si512(bytes[h], gather_inputs(rows + 16 * h * K, K, k, valid[h]));
        for (int j = 0; j < 4; j++) {
            const __m256i codes = _mm256_set_m128i(_mm_load_si128((const __m128i*)(bytes[1] + 16 * j)),
                                                   _mm_load_si128((const __m128i*)(bytes[0] + 16 * j)));
            panel[k + j] = panel_vector<FORMAT>(codes);
        }
    }
    const __mmask32 all_valid = (__mmask32)valid[0] | (__mmask32)valid[1] << 16;
    for (int64_t k = whole_words; k < kc; k++)
        panel[k] = panel_vector<FORMAT>(input_codes(rows, K, k, all_valid));
}

// out[m0 .. m0 + MR, n0 .. n0 + 31] over inputs k0 .. k0 + kc, xh and sx holding those rows' float16 values and
// scales from row m0 on; the last block scales the sums and adds the bias.
template <int MR>
FP16_TARGET INLINE void gemm_tile_fp16(const __m512h* panel, const uint16_t* xh, const float* sx, int64_t K,
                                       int64_t k0, int64_t kc, int64_t m0, const __m512* column_scales,
                                       const __m512* column_bias, const __mmask16* valid, float* out, int64_t N,
                                       int64_t n0) {
    // The float32 sums wait in L1, the float16 ones and the panel's vector in registers (see FP16_GEMM_ROWS).
    alignas(64) float acc[MR][32];
    for (int i = 0; i < MR; i++)
        for (int h = 0; h < 2; h++) {
            const float* so_far = out + (m0 + i) * N + n0 + 16 * h;  // the sums of the blocks before k0
            const __m512 sum = k0 ? _mm512_maskz_loadu_ps(valid[h], so_far) : _mm512_setzero_ps();
            _mm512_store_ps(acc[i] + 16 * h, sum);
        }
    const _Float16* x = reinterpret_cast<const _Float16*>(xh) + k0;
    for (int64_t block = 0; block < kc; block += FP16_GEMM_BLOCK) {
        __m512h sums[MR];
        for (int i = 0; i < MR; i++) sums[i] = _mm512_setzero_ph();
        const int64_t end = std::min(kc, block + FP16_GEMM_BLOCK);
        if (end - block == FP16_GEMM_BLOCK) {
#pragma GCC unroll 16
            for (int64_t k = block; k < block + FP16_GEMM_BLOCK; k++)
                for (int i = 0; i < MR; i++) sums[i] = _mm512_fmadd_ph(panel[k], _mm512_set1_ph(x[i * K + k]), sums[i]);
        } else {
            for (int64_t k = block; k < end; k++)
                for (int i = 0; i < MR; i++) sums[i] = _mm512_fmadd_ph(panel[k], _mm512_set1_ph(x[i * K + k]), sums[i]);
        }
        for (int i = 0; i < MR; i++) {
            const __m512i bits = _mm512_castph_si512(sums[i]);
            const __m512 halves[2] = {_mm512_cvtph_ps(_mm512_castsi512_si256(bits)),
                                      _mm512_cvtph_ps(_mm512_extracti64x4_epi64(bits, 1))};
            for (int h = 0; h < 2; h++)
                _mm512_store_ps(acc[i] + 16 * h, _mm512_add_ps(_mm512_load_ps(acc[i] + 16 * h), halves[h]));
        }
    }
    const bool last = k0 + kc == K;
    for (int i = 0; i < MR; i++)
        for (int h = 0; h < 2; h++) {
            const __m512 sum = _mm512_load_ps(acc[i] + 16 * h);
            const __m512 scaled = _mm512_mul_ps(sum, _mm512_set1_ps(sx[i]));
            const __m512 value = last ? _mm512_fmadd_ps(scaled, column_scales[h], column_bias[h]) : sum;
            _mm512_mask_storeu_ps(out + (m0 + i) * N + n0 + 16 * h, valid[h], value);
        }
}

// Rows first .. last of x (their float16 values and scales in xh and sx from row first on) times weight rows
// n0 .. n0 + 31 (those below N). e5m2: x (float32) and a float32 panel (K * GEMM_COLUMN_BLOCKS vectors) for
// blocks of small codes.
template <int FORMAT>
FP16_TARGET void gemm_block_fp16(const uint8_t* weight, const float* x, const uint16_t* xh, const float* sx,
                                 int64_t first, int64_t last, int64_t K, const float* scale, const float* bias,
                                 float* out, int64_t N, int64_t n0, __m512h* panel, __m512* panel32) {
    __mmask16 valid[2];
    __m512 column_scales[2], column_bias[2];
    for (int h = 0; h < 2; h++) {
        const int64_t rows = std::min<int64_t>(16, std::max<int64_t>(0, N - n0 - 16 * h));
        valid[h] = rows == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);
        const __m512 channel_scales = _mm512_maskz_loadu_ps(valid[h], scale + n0 + 16 * h);
        column_scales[h] = _mm512_mul_ps(channel_scales, _mm512_set1_ps(FORMAT == E4M3 ? E4M3_SCALE : 1.f));
        column_bias[h] = bias ? _mm512_maskz_loadu_ps(valid[h], bias + n0 + 16 * h) : _mm512_setzero_ps();
    }
    if (FORMAT == E5M2 && holds_row_of_small_e5m2_codes(weight, n0, std::min<int64_t>(32, N - n0), K)) {
        if (valid[1])
            gemm_block<E5M2, 2>(weight, x, first, last, K, scale, bias, out, N, n0, valid[1], panel32);
        else
            gemm_block<E5M2, 1>(weight, x, first, last, K, scale, bias, out, N, n0, valid[0], panel32);
        return;
    }
    for (int64_t k0 = 0; k0 < K; k0 += FP16_GEMM_KC) {
        const int64_t kc = std::min(FP16_GEMM_KC, K - k0);
        gather_panel_fp16<FORMAT>(weight, n0, K, k0, kc, valid, panel);
        int64_t m = first;
        for (; m + FP16_GEMM_ROWS <= last; m += FP16_GEMM_ROWS)
            gemm_tile_fp16<FP16_GEMM_ROWS>(panel, xh + (m - first) * K, sx + (m - first), K, k0, kc, m, column_scales,
                                           column_bias, valid, out, N, n0);
        for (; m + 4 <= last; m += 4)
            gemm_tile_fp16<4>(panel, xh + (m - first) * K, sx + (m - first), K, k0, kc, m, column_scales, column_bias,
                              valid, out, N, n0);
        for (; m < last; m++)
            gemm_tile_fp16<1>(panel, xh + (m - first) * K, sx + (m - first), K, k0, kc, m, column_scales, column_bias,
                              valid, out, N, n0);
    }
}

// x's rows are converted to float16 (Rows::to_half) one chunk at a time by the threads, before they run over it:
// converting all of x first, on one thread, into a fresh M x K workspace took ~60% of the time at M = 4096,
// K = 4096, N = 128 (2.2x the fp32 GEMM's time). Returns false, out partly written, when a row cannot be
// scaled: the caller then runs the float32 GEMM, which writes all of out.
template <int FORMAT, class Rows>
FP16_TARGET bool float8_gemm_fp16(const Rows& rows, int64_t M, int64_t K, const uint8_t* weight, int64_t N,
                                  const float* scale, const float* bias, float* out, int threads) {
    const int64_t blocks = (N + 31) / 32;
    const int64_t chunk = std::max<int64_t>(FP16_GEMM_ROWS, FP16_GEMM_X_CHUNK_BYTES / (2 * K));
    const auto xh = quanto_fx_cpu::aligned_workspace<uint16_t>(std::min(M, chunk) * K);
    std::unique_ptr<float[]> sx(new float[std::min(M, chunk)]);
    std::atomic<bool> scalable{true};
    // Per thread, allocated outside the team: the float16 panel, and for e5m2 a float32 one (see above).
    const int64_t panel32_vectors = FORMAT == E5M2 ? K * GEMM_COLUMN_BLOCKS : 0;
    std::unique_ptr<Vector[]> panels(new Vector[threads * (FP16_GEMM_KC + panel32_vectors)]);
    quanto_fx_cpu::parallel_region(threads, [&] {
        Vector* own = panels.get() + omp_get_thread_num() * (FP16_GEMM_KC + panel32_vectors);
        __m512h* panel = reinterpret_cast<__m512h*>(own);
        __m512* panel32 = reinterpret_cast<__m512*>(own + FP16_GEMM_KC);
        for (int64_t first = 0; first < M; first += chunk) {
            const int64_t last = std::min(M, first + chunk);
#pragma omp for schedule(static)
            for (int64_t m = first; m < last; m++)
                if (!rows.to_half(m, xh.get() + (m - first) * K, &sx[m - first]))
                    scalable.store(false, std::memory_order_relaxed);
            // past the loop's barrier every thread reads the same value (none is written until the next one)
            if (!scalable.load(std::memory_order_relaxed)) break;
#pragma omp for schedule(static)
            for (int64_t b = 0; b < blocks; b++)
                gemm_block_fp16<FORMAT>(weight, rows.float32(), xh.get(), sx.get(), first, last, K, scale, bias, out,
                                        N, 32 * b, panel, panel32);
            // (the loop's barrier: the next chunk's conversion overwrites xh)
        }
    });
    return scalable.load();
}
#endif

// The form by M, chosen here for every caller (4096 x 4096, 1024 x 4096, 4096 x 11008, 384 x 1536 and 1536 x
// 384, 2-core Xeon, GEMV / GEMM time interleaved): the float32 GEMV (CPUs without AVX512-FP16) up to M = 11
// (its path's CPU, a 2-vCPU Cascade Lake, 3-row tiles, 256 x 256 to 4096 x 4096: at M = 7-8 0.59-0.80, at
// 9-11 0.86-1.00, at 12 0.96-1.06, at 13-16 1.09-1.31); the float16 GEMV up to M = 16 (at 13-14: 0.53-0.77,
// at 16: 0.72-1.01 but one noisy e5m2 run at 4096 x 4096, 1.21; at 20-24: 0.8-1.3).
// Past M = 16, the float16 GEMM on those CPUs; on the others the float32 GEMM, through BLAS from BLAS_MIN_M.
constexpr int64_t GEMV_MAX_M = 11, FLOAT16_GEMV_MAX_M = 16;
enum Path { FLOAT32_GEMM = 0, FLOAT32_GEMV = 1, FLOAT16_GEMV = 2, FLOAT16_GEMM = 3, FLOAT32_BLAS_GEMM = 4 };

// The float32 GEMM for M rows: the paths' own, and the float16 paths' for x they cannot scale.
Path float32_gemm(int64_t M) { return M >= BLAS_MIN_M ? FLOAT32_BLAS_GEMM : FLOAT32_GEMM; }

Path path_for(int64_t M) {  // the same for both formats
    if (QUANTO_HAS_FP16_INTRINSICS && cpu_has_fp16()) {
        return M <= FLOAT16_GEMV_MAX_M ? FLOAT16_GEMV : FLOAT16_GEMM;
    }
    return M <= GEMV_MAX_M ? FLOAT32_GEMV : float32_gemm(M);
}

// The power of two by which quanto_float8_weight_mm divides x with e5m2 weights: max |x| * 57344 * K (a bound
// on the float32 kernels' sums before the channel scale) kept below FLT_MAX / 4; 0 for x below that already
// (max |x| < ~3.6e29 at K = 4096: any activation in practice).
int e5m2_x_shift(const float* x, int64_t M, int64_t K) {
    float amax = 0.f;  // rows holding a NaN or an infinity are skipped: they propagate either way
    for (int64_t m = 0; m < M; m++) amax = fmaxf(amax, quanto_fx_cpu::row_abs_max(x + m * K, K));
    const float limit = FLT_MAX / 4.f / (57344.f * (float)K);
    return amax > limit ? ilogbf(amax / limit) + 1 : 0;
}

// One thread below this many multiply-adds with 512 outputs or more (fewer outputs need more, see
// threads_for_work): the conversions make float8's work per weight larger than int8's, so two threads pay
// from smaller layers on (2-core Xeon, e4m3, one / two threads: 128 x 512 at M = 2 (2**17), 14.7 / 11.2 us;
// 64 x 512 at M = 4, 9.1 / 7.3 us; 256 x 256 at M = 1, 5.4 / 5.6 us, at M = 2, 6.7 / 6.2 us).
constexpr int64_t SERIAL_BELOW_WORK = 1 << 16;

}  // namespace

extern "C" {

// The kernel quanto_float8_weight_mm runs for M rows of x with weights in `format` on this machine (a Path),
// but for x that the float16 paths cannot scale, which takes the float32 GEMV or GEMM.
int quanto_float8_path(int format, int64_t M) { return path_for(M); }

// out (M, N) float32 = x (M, K) @ (W * scale).T + bias for x stored as `x_storage` (a Precision: float32, float16
// or bfloat16 values), W (N, K) float8 bytes (format 0: e4m3fn, 1: e5m2), scale (N,) float32 and bias (N,)
// float32 or null, the bias added as each output is stored: a GEMV for small M (each weight chunk converted once
// per 4 rows of x, 8 in the float16 GEMV), else a GEMM (each block of weight rows converted once into a panel
// that every row of x in a chunk reuses, or into float32 rows for BLAS), by quanto_float8_path. The float16
// GEMM reads x's rows as stored, but for e5m2 weights with blocks of small codes (see E5M2_FLOAT16_MIN_CODE) or
// float32 x; every other kernel reads all of x as float32 (a 16-bit x widened first). Returns 2 when a
// workspace cannot be allocated, else 0.
int quanto_float8_weight_mm(int format, int x_storage, const void* x_data, int64_t M, int64_t K,
                            const uint8_t* weight, int64_t N, const float* scale, const float* bias, float* out,
                            int threads) try {
    const Path path = path_for(M);
    threads = quanto_fx_cpu::threads_for_work(M, K, N, SERIAL_BELOW_WORK, threads);
#if QUANTO_HAS_FP16_INTRINSICS
    // e5m2 with float32 x goes below, after the x shift the float32 blocks of small codes need (the weight is
    // scanned on this path only: at the GEMVs' M it would cost as much as their own pass over it)
    const bool as_stored = path == FLOAT16_GEMM &&
                           (format == E4M3 || (x_storage != quanto_fx_cpu::FLOAT32 &&
                                               !holds_row_of_small_e5m2_codes(weight, 0, N, K)));
    if (as_stored) {
        const auto buffers = quanto_fx_cpu::row_buffers(x_storage, threads, K);
        const quanto_fx_cpu::StoredX stored{x_data, x_storage, K, buffers.get()};
        bool done;
        if (format == E4M3)
            done = float8_gemm_fp16<E4M3>(GivenRows<E4M3>{stored}, M, K, weight, N, scale, bias, out, threads);
        else
            done = float8_gemm_fp16<E5M2>(GivenRows<E5M2>{stored}, M, K, weight, N, scale, bias, out, threads);
        if (done) return 0;
    }  // else (a row that float16 cannot scale) the float32 GEMM below
#endif
    std::unique_ptr<float[], quanto_fx_cpu::Free> widened;
    const float* x = quanto_fx_cpu::all_float32(x_data, x_storage, M, K, threads, widened);
    // e5m2 codes reach 57344 and the float32 kernels sum x times codes before the channel scale: x that would
    // overflow those sums (where the result need not) is divided by a power of two and the channel scales
    // multiplied by it, both exactly. (The BLAS GEMM's float32 weights hold the scales: its path skips the scan.)
    const int shift = format == E5M2 && path != FLOAT32_BLAS_GEMM ? e5m2_x_shift(x, M, K) : 0;
    std::unique_ptr<float[], quanto_fx_cpu::Free> scaled_x, scaled_scale;
    if (shift) {
        scaled_x = quanto_fx_cpu::aligned_workspace<float>(M * K);
        scaled_scale = quanto_fx_cpu::aligned_workspace<float>(N);
        const float down = ldexpf(1.f, -shift), up = ldexpf(1.f, shift);
        for (int64_t i = 0; i < M * K; i++) scaled_x[i] = x[i] * down;
        for (int64_t n = 0; n < N; n++) scaled_scale[n] = scale[n] * up;
        x = scaled_x.get(), scale = scaled_scale.get();
    }
#if QUANTO_HAS_FP16_INTRINSICS
    if (path == FLOAT16_GEMM && !as_stored) {  // e5m2 weights
        const GivenRows<E5M2> rows{{x, quanto_fx_cpu::FLOAT32, K, nullptr}};
        if (float8_gemm_fp16<E5M2>(rows, M, K, weight, N, scale, bias, out, threads)) return 0;
    }
    if (path == FLOAT16_GEMV) {
        const auto xh = quanto_fx_cpu::aligned_workspace<uint16_t>(M * K);
        std::unique_ptr<float[]> sx(new float[M]);
        const float x_max = format == E4M3 ? x_half_max<E4M3>() : x_half_max<E5M2>();
        if (x_to_half(x, M, K, x_max, xh.get(), sx.get())) {
            if (format == E4M3)
                float8_gemv_fp16<E4M3>(x, xh.get(), sx.get(), M, K, weight, N, scale, bias, out, threads);
            else
                float8_gemv_fp16<E5M2>(x, xh.get(), sx.get(), M, K, weight, N, scale, bias, out, threads);
            return 0;
        }
    }
#endif
    // float32: by path, or x that the float16 paths cannot scale
    const bool gemv = path == FLOAT32_GEMV || path == FLOAT16_GEMV;
    const bool blas = !gemv && float32_gemm(M) == FLOAT32_BLAS_GEMM;
    if (gemv && format == E4M3) float8_gemv<E4M3>(x, M, K, weight, N, scale, bias, out, threads);
    if (gemv && format == E5M2) float8_gemv<E5M2>(x, M, K, weight, N, scale, bias, out, threads);
    if (blas && format == E4M3) float8_gemm_blas<E4M3>(x, M, K, weight, N, scale, bias, out, threads);
    if (blas && format == E5M2) float8_gemm_blas<E5M2>(x, M, K, weight, N, scale, bias, out, threads);
    if (!gemv && !blas && format == E4M3) float8_gemm<E4M3>(x, M, K, weight, N, scale, bias, out, threads);
    if (!gemv && !blas && format == E5M2) float8_gemm<E5M2>(x, M, K, weight, N, scale, bias, out, threads);
    return 0;
} catch (const std::bad_alloc&) {
    return 2;
} catch (const c10::Error&) {  // torch's CPU allocator, for addmm's buffers, throws c10::Error when out of memory
    return 2;
}

// QLinear's dynamic float8 forward: x (M, K) stored as `x_storage` (as for quanto_float8_weight_mm), values of the
// dtype `precision` (Precision in cpu_simd.h), quantized per row to `x_format` in that dtype's arithmetic (see
// dequantized_float8_rows), times W (N, K) in `w_format` as quanto_float8_weight_mm computes it. Returns 1 when x
// holds a NaN or an infinity (out then holds no result: the float16 GEMM may have written the chunks before that
// row); 2 when a workspace cannot be allocated.
int quanto_float8_dynamic_mm(int x_format, int w_format, int precision, int x_storage, const void* x_data,
                             int64_t M, int64_t K, const uint8_t* weight, int64_t N, const float* scale,
                             const float* bias, float* out, int threads) try {
    // a second thread for x's rows only where the GEMM takes one too (a team costs more on small layers)
    const int x_threads = quanto_fx_cpu::threads_for_work(M, K, N, SERIAL_BELOW_WORK, threads);
#if QUANTO_HAS_FP16_INTRINSICS
    // e4m3fn weights on the float16 GEMM: x's rows quantized inside it, chunk by chunk, where writing all of them
    // first (M x K float32, then read back) made the op 2.4x the fp32 GEMM's time at M = 4096, K = 4096, N = 128,
    // against 1.1x for float8_weight_mm
    if (w_format == E4M3 && path_for(M) == FLOAT16_GEMM) {
        const auto buffers = quanto_fx_cpu::row_buffers(x_storage, x_threads, K);
        const DynamicRows rows{{x_data, x_storage, K, buffers.get()}, x_format, precision};
        if (float8_gemm_fp16<E4M3>(rows, M, K, weight, N, scale, bias, out, x_threads)) return 0;
    }  // else (a row that float16 cannot scale, or not finite) as below, which finds it again
#endif
    std::unique_ptr<float[], quanto_fx_cpu::Free> widened;
    const float* x = quanto_fx_cpu::all_float32(x_data, x_storage, M, K, x_threads, widened);
    const auto values = quanto_fx_cpu::aligned_workspace<float>(M * K);
    if (dequantized_float8_rows(x_format, precision, x, M, K, values.get(), x_threads)) return 1;
    return quanto_float8_weight_mm(w_format, quanto_fx_cpu::FLOAT32, values.get(), M, K, weight, N, scale, bias, out,
                                   threads);
} catch (const std::bad_alloc&) {
    return 2;
}
}
