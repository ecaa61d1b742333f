// Float8 weight-only GEMMs on x86 CPUs with AVX512: float32 activations times float8_e4m3fn / float8_e5m2
// weights (N, K) with per-output-channel scales. Built into the same library as cpu_vnni_mm.cpp and loaded
// by cpu_float8_mm.py; see its docstring.
//
// Why: torch converts float8 to float32 element by element on the CPU (about 55 ms for 4096 x 4096 on a
// 2-core Xeon), which made float8 weights 2 to 30x slower than the fp32 GEMM they replace. Here 16 weights
// become float32 in four vector instructions, through float16: e5m2 bytes are the high byte of their
// float16 (b << 8); an e4m3fn byte s.eeee.mmm becomes the float16 s.0eeee.mmm0000000, which is the value
// times 2**-8 for normal and subnormal codes alike (e4m3's subnormals are float16 normals or subnormals;
// vcvtph2ps converts both exactly), so 2**8 joins the channel scale. e4m3fn's NaN (s.1111.111) is mapped
// to a float16 NaN explicitly.
//
// Every index is checked by the Python caller; nothing here validates again.

#include <immintrin.h>
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

namespace {

constexpr int E4M3 = 0, E5M2 = 1;
constexpr float E4M3_SCALE = 256.f;  // the float16 form of an e4m3 code is its value times 2**-8

// The float32 values (times E4M3_SCALE for e4m3) of the float8 bytes `lanes` of bytes .. bytes + 31 (the
// others read as zeros): codes 0-15 into lo, 16-31 into hi.
template <int FORMAT>
INLINE void float8_to_float(const uint8_t* bytes, __mmask32 lanes, __m512& lo, __m512& hi) {
    const __m256i raw = _mm256_maskz_loadu_epi8(lanes, bytes);
    __m512i half;
    if constexpr (FORMAT == E5M2) {
        half = _mm512_slli_epi16(_mm512_cvtepu8_epi16(raw), 8);
    } else {
        // Sign-extended and shifted left by 7: eeee.mmm lands on bits 13..7 and the sign on bits 15 and 14;
        // bit 14 is cleared.
        half = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(raw), 7), _mm512_set1_epi16((short)0xBFFF));
        const __mmask32 nan = _mm256_cmpeq_epi8_mask(_mm256_and_si256(raw, _mm256_set1_epi8(0x7F)), _mm256_set1_epi8(0x7F));
        half = _mm512_mask_mov_epi16(half, nan, _mm512_set1_epi16(0x7E00));
    }
    lo = _mm512_cvtph_ps(_mm512_castsi512_si256(half));
    hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(half, 1));
}

INLINE __mmask32 lanes_from(int64_t k, int64_t K) {
    return K - k >= 32 ? (__mmask32)0xFFFFFFFF : (__mmask32)((1u << (K - k)) - 1);
}

// out[m0 + i, n0 + r] for RT weight rows and MT rows of x: each weight chunk is converted once and used by
// MT rows of x.
template <int FORMAT, int RT, int MT>
INLINE void tile(const float* x, int64_t K, const uint8_t* weight, int64_t N, const float* scale, float* out,
                 int64_t n0, int64_t m0) {
    __m512 acc[RT][MT];
    for (int r = 0; r < RT; r++)
        for (int i = 0; i < MT; i++) acc[r][i] = _mm512_setzero_ps();
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
                acc[r][i] = _mm512_fmadd_ps(w_hi, x_hi[i], _mm512_fmadd_ps(w_lo, x_lo[i], acc[r][i]));
        }
    }
    const float unit = FORMAT == E4M3 ? E4M3_SCALE : 1.f;
    for (int r = 0; r < RT; r++)
        for (int i = 0; i < MT; i++) out[(m0 + i) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][i]) * unit * scale[n0 + r];
}

template <int FORMAT, int RT>
INLINE void weight_rows(const float* x, int64_t M, int64_t K, const uint8_t* weight, int64_t N, const float* scale,
                        float* out, int64_t n0) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) tile<FORMAT, RT, 4>(x, K, weight, N, scale, out, n0, m0);
    for (; m0 + 2 <= M; m0 += 2) tile<FORMAT, RT, 2>(x, K, weight, N, scale, out, n0, m0);
    for (; m0 < M; m0++) tile<FORMAT, RT, 1>(x, K, weight, N, scale, out, n0, m0);
}

template <int FORMAT>
void float8_gemv(const float* x, int64_t M, int64_t K, const uint8_t* weight, int64_t N, const float* scale,
                 float* out, int threads) {
    constexpr int64_t RT = 4;
    const int64_t full = N - N % RT;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < full; n0 += RT) weight_rows<FORMAT, RT>(x, M, K, weight, N, scale, out, n0);
    for (int64_t n0 = full; n0 < N; n0++) weight_rows<FORMAT, 1>(x, M, K, weight, N, scale, out, n0);
}

template <int FORMAT>
void float8_rows(const uint8_t* weight, int64_t K, const float* scale, int64_t first, int64_t last, float* out,
                 int threads) {
    const float unit = FORMAT == E4M3 ? E4M3_SCALE : 1.f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = first; n < last; n++) {
        const __m512 row_scale = _mm512_set1_ps(scale[n] * unit);
        float* row = out + (n - first) * K;
        for (int64_t k = 0; k < K; k += 32) {
            const __mmask32 lanes = lanes_from(k, K);
            __m512 lo, hi;
            float8_to_float<FORMAT>(weight + n * K + k, lanes, lo, hi);
            _mm512_mask_storeu_ps(row + k, (__mmask16)lanes, _mm512_mul_ps(lo, row_scale));
            _mm512_mask_storeu_ps(row + k + 16, (__mmask16)(lanes >> 16), _mm512_mul_ps(hi, row_scale));
        }
    }
}

}  // namespace

extern "C" {

// out (M, N) float32 = x (M, K) float32 @ (W * scale).T for W (N, K) float8 bytes (format 0: e4m3fn,
// 1: e5m2) and scale (N,) float32. For small M: the weight is converted once per 4 rows of x.
void quanto_float8_gemv(int format, const float* x, int64_t M, int64_t K, const uint8_t* weight, int64_t N,
                        const float* scale, float* out, int threads) {
    if (format == E4M3) float8_gemv<E4M3>(x, M, K, weight, N, scale, out, threads);
    if (format == E5M2) float8_gemv<E5M2>(x, M, K, weight, N, scale, out, threads);
}

// Rows [first, last) of W * scale as float32 into out ((last - first), K): the blocks of the float GEMM
// that serves larger M.
void quanto_float8_rows(int format, const uint8_t* weight, int64_t K, const float* scale, int64_t first,
                        int64_t last, float* out, int threads) {
    if (format == E4M3) float8_rows<E4M3>(weight, K, scale, first, last, out, threads);
    if (format == E5M2) float8_rows<E5M2>(weight, K, scale, first, last, out, threads);
}
}
