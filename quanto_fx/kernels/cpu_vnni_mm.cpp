// Weight-only GEMMs on x86 CPUs with AVX512-VNNI: float activations times int8 weights (per-output-channel
// scales) or packed int4 / int2 codes (group-wise scales and zeros, the portable packing of
// quanto_fx/tensor/packing.py, read as is). Two forms of the same integer sums: a GEMV that reads each weight
// row against a few rows of x (small M, int8 weights), and a GEMM for packed weights at larger M. Built and
// loaded by cpu_vnni_mm.py; see its docstring.
//
// Why integer dot products: converting each weight to float costs 2-3 vector instructions per 16 weights, which
// made every float formulation (aten's kernels included) compute bound at about half the memory bandwidth.
// vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and sums them in fours into int32 in one
// instruction, so each row of x is represented as 16-bit integers split in two signed bytes,
// x ~ sx * (256 * h + l), and the weight codes feed the instruction as they are (int4 / int2: masked out of
// their byte; int8: flipped to unsigned by xor 0x80, i.e. q = w + 128). With q the unsigned code and
// w = s * (q - mid) + z for each group:
//     sum_k x_k w_k = sum_groups s * sx * (256 * sum h q + sum l q) + (z - mid * s) * sum_{k in group} x_k.
// The integer sums are exact; the only rounding is x's (|error| <= sx / 2 = max|x| / 65278 per element).
//
// Every index is checked by the Python caller (shapes, contiguity, dtypes, divisibility); nothing here
// validates again.

#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "cpu_simd.h"

namespace {

// Weights stream from memory once per call: prefetching 1 KB ahead in each row took cold-cache int8 from
// 0.88 to 0.79 ms and int4 from 0.77 to 0.67 ms at 4096 x 4096 (2-core Xeon; 256 B: no gain, 2 KB: worse).
// Packed rows are short (2 KB for int4 at K = 4096): also prefetching the same bytes of the next tile's rows
// took int4 from 0.83-0.90 to 0.75-0.78 ms in interleaved runs; int8 lost 4% with it, so it keeps one.
constexpr int64_t PREFETCH_BYTES = 1024;
constexpr float X_LEVELS = 32639.f;  // largest |code| whose high byte (q + 128) >> 8 still fits in int8
constexpr float INT8_LEVELS = 127.f;  // int8's symmetric range (quanto_fx.tensor.quantization.value_range)
// Rows whose largest |x| is below this (~3.8e-34, not 0) would need a subnormal scale sx (1 / sx infinite):
// they are left to the float path, like non-finite rows.
constexpr float MIN_SCALED_MAX = FLT_MIN * X_LEVELS;

// vpdpbusd accumulating in place (acc += the products of u8's unsigned and s8's signed bytes, summed in fours).
// GCC 12's intrinsic copied every accumulator to another register and back around the instruction: the
// GEMM's 16-accumulator loop ran 2 register moves per vpdpbusd and 2 spills a step (int8 512 x 4096 x 4096
// on a 2-core Cascade Lake: 114 -> 70 ms with this).
INLINE __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
}

INLINE __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
}

// The GEMV's vector width: 64-byte chunks of weight bytes. Groups of 32 bytes (int2's default group of 128
// codes, int4 groups of 64) take two per chunk where a row holds an even number of them (4096 x 4096 int2 at
// M = 1 / 2: 0.20 / 0.32x -> 0.15 / 0.22x fp32's time), else 32-byte chunks.
template <int CHUNK>
struct Lanes;

template <>
struct Lanes<64> {
    using I = __m512i;
    using F = __m512;
    static I load(const void* p) { return _mm512_loadu_si512(p); }
    static I zero() { return _mm512_setzero_si512(); }
    static I bytes(char b) { return _mm512_set1_epi8(b); }
    static I and_(I a, I b) { return _mm512_and_si512(a, b); }
    static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
    static I shift_right(I a, unsigned n) { return _mm512_srli_epi16(a, n); }
    static I dpbusd(I acc, I u8, I s8) { return ::dpbusd(acc, u8, s8); }
    static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
    static F fzero() { return _mm512_setzero_ps(); }
    static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static F set1(float v) { return _mm512_set1_ps(v); }
    static float sum(F a) { return _mm512_reduce_add_ps(a); }
    static __m256 sum8(const F* a) { return quanto_fx_cpu::sum8(a); }
};

template <>
struct Lanes<32> {
    using I = __m256i;
    using F = __m256;
    static I load(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
    static I zero() { return _mm256_setzero_si256(); }
    static I bytes(char b) { return _mm256_set1_epi8(b); }
    static I and_(I a, I b) { return _mm256_and_si256(a, b); }
    static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
    static I shift_right(I a, unsigned n) { return _mm256_srli_epi16(a, n); }
    static I dpbusd(I acc, I u8, I s8) { return ::dpbusd(acc, u8, s8); }
    static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
    static F fzero() { return _mm256_setzero_ps(); }
    static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static F set1(float v) { return _mm256_set1_ps(v); }
    static float sum(F a) {
        __m128 half = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        half = _mm_hadd_ps(half, half);
        return _mm_cvtss_f32(_mm_hadd_ps(half, half));
    }
    static __m256 sum8(const F* a) {  // as Lanes<64>::sum8
        const F low = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        const F high = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
    }
};

// Codes of one chunk of weights, for the codes at bit offset `phase * BITS` of every byte.
template <int BITS, class V>
INLINE typename V::I chunk_codes(typename V::I bytes, int phase) {
    if (BITS == 8) return V::xor_(bytes, V::bytes((char)0x80));
    return V::and_(phase ? V::shift_right(bytes, phase * BITS) : bytes, V::bytes((1 << BITS) - 1));
}

// zero_acc[i][r] = sum over groups g of (z - mid * s) * xsum[m0 + i, g], with (s, z) weight row n0 + r's group
// g (int8: z = 0, no zeros stored): the zero points' term of every output of a tile, apart from its K loop. The
// RT rows' (s, z) pairs of a group are contiguous: one vector per group for all RT rows, where scalars per row
// and group had doubled the K loop's group flush (2-vCPU Cascade Lake, 4096 x 4096 at M = 1, weight in L3,
// kernel time / fp32: int4 0.15 -> 0.13-0.14 in three runs; int2 unchanged).
template <int RT, int MT, int BITS>
INLINE void zero_terms(const float* scales, int64_t N, int64_t n0, int64_t G, const float* xsum, int64_t m0,
                       float (&zero_acc)[MT][RT]) {
    static_assert(RT <= 8, "one vector holds a group's (s, z) of at most 8 weight rows");
    constexpr int stride = BITS == 8 ? 1 : 2;
    constexpr float mid = 1 << (BITS - 1);
    const __mmask16 lanes = (__mmask16)((1u << (stride * RT)) - 1);
    __m512 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m512 sz = _mm512_maskz_loadu_ps(lanes, scales + (g * N + n0) * stride);
        // int8: lane r holds -mid * s; int4 / int2: lane 2 r + 1 holds z - mid * s (lane 2 r: s - mid * s, unused)
        const __m512 zero = stride == 1 ? _mm512_mul_ps(sz, _mm512_set1_ps(-mid))
                                        : _mm512_fnmadd_ps(_mm512_moveldup_ps(sz), _mm512_set1_ps(mid), sz);
        for (int i = 0; i < MT; i++) acc[i] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[(m0 + i) * G + g]), acc[i]);
    }
    for (int i = 0; i < MT; i++) {
        alignas(64) float lane[16];
        _mm512_store_ps(lane, acc[i]);
        for (int r = 0; r < RT; r++) zero_acc[i][r] = lane[stride * r + stride - 1];
    }
}

// sum_h[i][r] / sum_l[i][r] += weight row n0 + r's codes in the CHUNK bytes from byte j, times x row m0 + i's
// high / low byte planes there (the chunk's codes of every phase). Each chunk of x's planes is loaded once for
// all RT weight rows: read again per row (as the compiler left it), the loads, not the dot products, bounded
// the loop.
template <int RT, int MT, int BITS, int CHUNK, bool HIGH>
INLINE void add_chunk(const int8_t* h, const int8_t* l, int64_t row_bytes, const uint8_t* weight, int64_t n0,
                      int64_t m0, int64_t j, typename Lanes<CHUNK>::I (&sum_h)[MT][RT],
                      typename Lanes<CHUNK>::I (&sum_l)[MT][RT]) {
    using V = Lanes<CHUNK>;
    constexpr int per_byte = 8 / BITS;
    typename V::I bytes[RT];
    for (int r = 0; r < RT; r++) {
        const uint8_t* at = weight + (n0 + r) * row_bytes + j;
        _mm_prefetch((const char*)(at + PREFETCH_BYTES), _MM_HINT_T0);  // hints: never fault
        if (BITS != 8) _mm_prefetch((const char*)(at + RT * row_bytes), _MM_HINT_T0);  // the next tile
        bytes[r] = V::load(at);
    }
    for (int p = 0; p < per_byte; p++) {
        typename V::I x_h[MT], x_l[MT];
        for (int i = 0; i < MT; i++) {
            const int64_t at = ((m0 + i) * per_byte + p) * row_bytes + j;
            if constexpr (HIGH) x_h[i] = V::load(h + at);
            x_l[i] = V::load(l + at);
        }
        for (int r = 0; r < RT; r++) {
            const typename V::I codes = chunk_codes<BITS, V>(bytes[r], p);
            for (int i = 0; i < MT; i++) {
                if constexpr (HIGH) sum_h[i][r] = V::dpbusd(sum_h[i][r], codes, x_h[i]);
                sum_l[i][r] = V::dpbusd(sum_l[i][r], codes, x_l[i]);
            }
        }
    }
}

// The 8 outputs of a tile of RT weight rows and MT rows of x (RT * MT == 8: (8, 1) and (4, 2)), out rows of RT
// contiguous floats: dots[i * RT + r] times x's row scale, plus the zero points' term and the bias. Built in
// registers: eight scalar stores read back as one vector stalled every tile (failed store-to-load forwarding:
// the hottest instruction in a profile of the int8 GEMV at K = 384).
template <int RT, int MT>
INLINE void store_tile_of_8(__m256 dots, const float* sx, const float (&zero_acc)[MT][RT], const float* bias,
                            float* out, int64_t N, int64_t n0, int64_t m0) {
    static_assert(RT * MT == 8, "8 outputs");
    const auto term = [&](int o) { return zero_acc[o / RT][o % RT] + (bias ? bias[n0 + o % RT] : 0.f); };
    const __m256 terms = _mm256_setr_ps(term(0), term(1), term(2), term(3), term(4), term(5), term(6), term(7));
    const __m256 x_scales = MT == 1 ? _mm256_set1_ps(sx[m0])
                                    : _mm256_setr_ps(sx[m0], sx[m0], sx[m0], sx[m0], sx[m0 + MT - 1],
                                                     sx[m0 + MT - 1], sx[m0 + MT - 1], sx[m0 + MT - 1]);
    alignas(32) float sums[MT][RT];
    _mm256_store_ps(&sums[0][0], _mm256_fmadd_ps(dots, x_scales, terms));
    for (int i = 0; i < MT; i++) memcpy(out + (m0 + i) * N + n0, sums[i], RT * sizeof(float));
}

// tile (below) for 8 weight rows and one row of x where each 64-byte chunk holds GROUPS whole groups (GROUPS =
// 1: int4 groups of 128 codes, int2 of 256; 2: int4 groups of 64, int2 of 128): decode. tile's group flush
// converts and scales both integer sums of every row, 16 conversions and 16 fmas a chunk (a third of the int4
// GEMV's time: bench/RESULTS.md). Here each row's sums are combined in int32 as 256 * sum_h + sum_l (exact:
// int4's 128 codes * 15 * 128 * 257 < 2**26; the shift is a byte shuffle), the 8 rows' vectors are added
// lane-wise down to one vector of two partial sums each (unpacks and lane shuffles), and one conversion and
// one fma by the rows' scales finish the chunk. 2-vCPU Cascade Lake, M = 1, kernel time / fp32 with the weight
// in L3: int4 4096 x 4096 0.15-0.18 -> 0.12, 1536 x 384 0.34-0.37 -> 0.28-0.30; int2 4096 x 4096 0.11 -> 0.07.
// At M = 2 (4 x 2 tiles) the same reduction gained nothing: its x vectors spilled.
template <int BITS, int GROUPS>
INLINE void tile_one_chunk_groups(const int8_t* h, const int8_t* l, const float* sx, const float* xsum, int64_t K,
                                  const uint8_t* weight, int64_t N, const float* scales, int64_t G,
                                  const float* bias, float* out, int64_t n0, int64_t m0) {
    static_assert(BITS != 8, "packed weights");
    using V = Lanes<64>;
    constexpr int RT = 8, MT = 1, per_byte = 8 / BITS;
    const int64_t row_bytes = K / per_byte;
    float zero_acc[MT][RT];
    zero_terms<RT, MT, BITS>(scales, N, n0, G, xsum, m0, zero_acc);
    // Each dword's bytes moved up one (the top byte dropped, a zero byte in): the dword times 256.
    const __m512i times_256 = _mm512_broadcast_i32x4(
        _mm_setr_epi8(-128, 0, 1, 2, -128, 4, 5, 6, -128, 8, 9, 10, -128, 12, 13, 14));
    // Row r's scale (lane 2 r of a group's (s, z) pairs; GROUPS = 2: 16 + 2 r for the second group) where the
    // reduction leaves its sums: rows 0-3 in lanes 0-7, rows 4-7 in lanes 8-15, each group's in its own 4.
    const __m512i scale_lanes = GROUPS == 1
                                    ? _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 8, 10, 12, 14, 8, 10, 12, 14)
                                    : _mm512_setr_epi32(0, 2, 4, 6, 16, 18, 20, 22, 8, 10, 12, 14, 24, 26, 28, 30);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += GROUPS) {
        const int64_t j = g / GROUPS * 64;
        __m512i sum_h[MT][RT], sum_l[MT][RT];
        for (int r = 0; r < RT; r++) sum_h[0][r] = sum_l[0][r] = V::zero();
        add_chunk<RT, MT, BITS, 64, true>(h, l, row_bytes, weight, n0, m0, j, sum_h, sum_l);
        __m512i t[RT], pairs[RT / 2];
        for (int r = 0; r < RT; r++)
            t[r] = _mm512_add_epi32(_mm512_shuffle_epi8(sum_h[0][r], times_256), sum_l[0][r]);
        for (int q = 0; q < RT / 2; q++)  // each 128-bit lane: rows 2q and 2q + 1, two partial sums each
            pairs[q] = _mm512_add_epi32(_mm512_unpacklo_epi32(t[2 * q], t[2 * q + 1]),
                                        _mm512_unpackhi_epi32(t[2 * q], t[2 * q + 1]));
        // each 128-bit lane: rows 0-3 (low) or 4-7 (high), one partial sum each
        const __m512i low = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[0], pairs[1]),
                                             _mm512_unpackhi_epi64(pairs[0], pairs[1]));
        const __m512i high = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2], pairs[3]),
                                              _mm512_unpackhi_epi64(pairs[2], pairs[3]));
        // two partial sums of each row: 128-bit lanes 0 + 2 and 1 + 3 (GROUPS = 2, a group a half: 0 + 1, 2 + 3)
        const __m512i sums = GROUPS == 1 ? _mm512_add_epi32(_mm512_shuffle_i32x4(low, high, 0x44),
                                                            _mm512_shuffle_i32x4(low, high, 0xEE))
                                         : _mm512_add_epi32(_mm512_shuffle_i32x4(low, high, 0x88),
                                                            _mm512_shuffle_i32x4(low, high, 0xDD));
        const float* pairs_sz = scales + (g * N + n0) * 2;  // the 8 rows' (s, z) pairs
        // The next tile's pairs of this group: the next line, N * 8 bytes from its other groups' (no hardware
        // prefetcher follows that stride), read first by its zero_terms loop. Cold int4 4096 x 4096 and 11008
        // at M = 1, time / fp32, 10 A/B pairs: 0.17-0.25 -> 0.17-0.22, lower in 8 (hints: never fault).
        _mm_prefetch((const char*)(pairs_sz + 2 * RT), _MM_HINT_T0);
        const __m512 scale = GROUPS == 1 ? _mm512_permutexvar_ps(scale_lanes, _mm512_loadu_ps(pairs_sz))
                                         : _mm512_permutex2var_ps(_mm512_loadu_ps(pairs_sz), scale_lanes,
                                                                  _mm512_loadu_ps(pairs_sz + 2 * N));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc);
    }
    const __m256 low = _mm512_castps512_ps256(acc);
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
    const __m256 dots = _mm256_set_m128(_mm_add_ps(_mm256_castps256_ps128(high), _mm256_extractf128_ps(high, 1)),
                                        _mm_add_ps(_mm256_castps256_ps128(low), _mm256_extractf128_ps(low, 1)));
    store_tile_of_8<RT, MT>(dots, sx, zero_acc, bias, out, N, n0, m0);
}

// out[m0 + i, n0 + r] for RT rows of weights and MT rows of x, over all of K, chunk by chunk (add_chunk).
// GROUPS groups per pass: 2 for groups of 32 bytes in 64-byte chunks, whose halves are scaled apart (int2 in
// groups of 128 had run in 256-bit lanes, twice the vpdpbusd).
template <int RT, int MT, int BITS, int CHUNK, int GROUPS, bool HIGH>
INLINE void tile(const int8_t* h, const int8_t* l, const float* sx, const float* xsum, int64_t K,
                 const uint8_t* weight, int64_t N, const float* scales, int64_t G, const float* bias, float* out,
                 int64_t n0, int64_t m0) {
    using V = Lanes<CHUNK>;
    constexpr int per_byte = 8 / BITS, scale_stride = BITS == 8 ? 1 : 2;
    const int64_t row_bytes = K / per_byte, group_bytes = row_bytes / G;
    if constexpr (RT == 8 && MT == 1 && BITS != 8 && CHUNK == 64 && HIGH)
        if (group_bytes * GROUPS == CHUNK)
            return tile_one_chunk_groups<BITS, GROUPS>(h, l, sx, xsum, K, weight, N, scales, G, bias, out, n0, m0);
    // Before the K loop: computed after it, GCC 12 spilled x's chunks in the int8 loop of 2-row tiles to the
    // stack and read them back for every weight row (int8 4096 x 4096, x fp32 time: M = 4 0.17-0.18 -> 0.21-0.22,
    // M = 6 0.20-0.22 -> 0.25-0.27).
    float zero_acc[MT][RT];
    zero_terms<RT, MT, BITS>(scales, N, n0, G, xsum, m0, zero_acc);
    typename V::F acc[MT][RT];
    for (int i = 0; i < MT; i++)
        for (int r = 0; r < RT; r++) acc[i][r] = V::fzero();
    for (int64_t g = 0; g < G; g += GROUPS) {
        typename V::I sum_h[MT][RT], sum_l[MT][RT];
        for (int i = 0; i < MT; i++)
            for (int r = 0; r < RT; r++) sum_h[i][r] = sum_l[i][r] = V::zero();
        for (int64_t j = g * group_bytes; j < (g + GROUPS) * group_bytes; j += CHUNK)
            add_chunk<RT, MT, BITS, CHUNK, HIGH>(h, l, row_bytes, weight, n0, m0, j, sum_h, sum_l);
        for (int r = 0; r < RT; r++) {
            const float* sz = scales + (g * N + n0 + r) * scale_stride;
            // The group's scale in every lane, shared by the MT rows of x (their own scales apply once, after
            // the K loop); with GROUPS == 2, lanes 8-15 take group g + 1's.
            typename V::F scale = V::set1(sz[0]);
            if constexpr (GROUPS == 2) scale = _mm512_mask_blend_ps(0xFF00, scale, V::set1(sz[N * scale_stride]));
            for (int i = 0; i < MT; i++) {
                const typename V::F low = V::to_float(sum_l[i][r]);
                const typename V::F dot = HIGH ? V::fmadd(V::to_float(sum_h[i][r]), V::set1(256.f), low) : low;
                acc[i][r] = V::fmadd(dot, scale, acc[i][r]);
            }
        }
    }
    if constexpr (RT * MT == 8) {  // (RT = 8, MT = 1) and (4, 2)
        store_tile_of_8<RT, MT>(V::sum8(&acc[0][0]), sx, zero_acc, bias, out, N, n0, m0);
    } else {
        for (int i = 0; i < MT; i++)
            for (int r = 0; r < RT; r++)
                out[(m0 + i) * N + n0 + r] =
                    V::sum(acc[i][r]) * sx[m0 + i] + zero_acc[i][r] + (bias ? bias[n0 + r] : 0.f);
    }
}

// Rows of x two at a time (4 x 2 tiles keep all 16 integer accumulators in registers); one row of x takes
// 8 weight rows at once, for more independent accumulators.
template <int RT, int BITS, int CHUNK, int GROUPS, bool HIGH>
INLINE void weight_rows(const int8_t* h, const int8_t* l, const float* sx, const float* xsum, int64_t M, int64_t K,
                        const uint8_t* weight, int64_t N, const float* scales, int64_t G, const float* bias,
                        float* out, int64_t n0) {
    int64_t m0 = 0;
    if (RT == 4)
        for (; m0 + 2 <= M; m0 += 2)
            tile<RT, 2, BITS, CHUNK, GROUPS, HIGH>(h, l, sx, xsum, K, weight, N, scales, G, bias, out, n0, m0);
    for (; m0 < M; m0++)
        tile<RT, 1, BITS, CHUNK, GROUPS, HIGH>(h, l, sx, xsum, K, weight, N, scales, G, bias, out, n0, m0);
}

template <int BITS, int CHUNK, int GROUPS, bool HIGH>
void vnni_mm(const int8_t* h, const int8_t* l, const float* sx, const float* xsum, int64_t M, int64_t K,
             const uint8_t* weight, int64_t N, const float* scales, int64_t G, const float* bias, float* out,
             int threads) {
    const int64_t rows = M == 1 ? 8 : 4, full = N - N % rows;
    quanto_fx_cpu::parallel_for(0, full, rows, threads, [&](int64_t n0) {
        if (M == 1)
            weight_rows<8, BITS, CHUNK, GROUPS, HIGH>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, n0);
        else
            weight_rows<4, BITS, CHUNK, GROUPS, HIGH>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, n0);
    });
    for (int64_t n0 = full; n0 < N; n0++)
        weight_rows<1, BITS, CHUNK, GROUPS, HIGH>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, n0);
}

// HIGH: x has a high byte plane (16-bit codes); false for int8 codes, whose high bytes are all 0 (half the
// vpdpbusd).
template <int BITS, bool HIGH = true>
void vnni_mm_any_chunk(const int8_t* h, const int8_t* l, const float* sx, const float* xsum, int64_t M, int64_t K,
                       const uint8_t* weight, int64_t N, const float* scales, int64_t G, const float* bias,
                       float* out, int threads) {
    const int64_t group_bytes = K * BITS / 8 / G;
    if (group_bytes % 64 == 0)
        return vnni_mm<BITS, 64, 1, HIGH>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
    if constexpr (BITS != 8)  // (int8 weights hold one group a row)
        if (group_bytes == 32 && G % 2 == 0)
            return vnni_mm<BITS, 64, 2, HIGH>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
    vnni_mm<BITS, 32, 1, HIGH>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
}

// Where x's codes go in a row (see quanto_split_x): PHASE_PLANES, the GEMV's (PB, K / PB) planes, code
// b * PB + p at p * K / PB + b; WORDS, the GEMM's, each 32-bit word of bytes b = 4 d .. 4 d + 3 as its PB
// phases' words in a row, code (4 d + j) * PB + p at (d * PB + p) * 4 + j (a tile then reads one stream a row
// and plane, where phase planes took PB: int2 spent a third of the GEMM's time at K = 128 computing and
// spilling those 32 addresses per group). The same for int8 codes (PB = 1).
enum Layout { PHASE_PLANES, WORDS };

// In a group of 16 codes in order, the phase-plane order: byte (16 / PB) p + i = code PB i + p.
template <int PB>
INLINE __m128i phase_order() {
    return PB == 2 ? _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)
                   : _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
}

// ... and the WORDS order (16 / (4 PB) whole words): byte 4 (PB e + p) + j = code 4 PB e + PB j + p; for PB = 4,
// one word, the phase-plane order.
template <int PB>
INLINE __m128i words_order() {
    if constexpr (PB == 2) return _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    return phase_order<PB>();
}

INLINE int64_t words_offset(int PB, int64_t k) {
    const int64_t b = k / PB;
    return (b / 4 * PB + k % PB) * 4 + b % 4;
}

// Bytes of the 16 codes k .. k + 15 of a row (k a multiple of 16) into the row's bytes in LAYOUT: phase planes
// (PB, K / PB), code k + i * PB + p to plane p, byte k / PB + i; or words.
template <int PB, Layout LAYOUT>
INLINE void store_by_phase(int8_t* planes, int64_t plane_bytes, int64_t k, __m128i bytes) {
    if constexpr (PB == 1) {
        _mm_storeu_si128((__m128i*)(planes + k), bytes);
    } else if constexpr (LAYOUT == WORDS) {
        _mm_storeu_si128((__m128i*)(planes + k), _mm_shuffle_epi8(bytes, words_order<PB>()));
    } else {
        alignas(16) int8_t grouped[16];
        _mm_store_si128((__m128i*)grouped, _mm_shuffle_epi8(bytes, phase_order<PB>()));
        for (int p = 0; p < PB; p++) memcpy(planes + p * plane_bytes + k / PB, grouped + p * (16 / PB), 16 / PB);
    }
}

// Codes k .. k + 63 of a row (k a multiple of 64), as 16-bit lanes in two vectors a (codes k .. k + 31) and b
// (k + 32 .. k + 63) after _mm512_packs_epi32 of their int32 quarters (see split_x), into the row's bytes in
// LAYOUT, packed with signed saturation (exact: every byte value fits). packs interleaves the quarters by
// 128-bit lane (lane j holds codes 16 v + 4 j + t at byte 4 v + t). Phase planes: each plane's bytes take 4
// bytes from each lane; one in-lane shuffle groups them into dwords, a dword permutation moves them to their
// plane's lane, a second in-lane shuffle orders them. WORDS: the permutation puts the codes in order, one
// in-lane shuffle in words.
template <int PB, Layout LAYOUT>
INLINE void store_64_by_phase(int8_t* planes, int64_t plane_bytes, int64_t k, __m512i a, __m512i b) {
    const __m512i bytes = _mm512_packs_epi16(a, b);
    const __m512i dwords = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    if constexpr (PB == 1) {
        _mm512_storeu_si512(planes + k, _mm512_permutexvar_epi32(dwords, bytes));
    } else if constexpr (LAYOUT == WORDS) {
        const __m512i in_order = _mm512_permutexvar_epi32(dwords, bytes);
        _mm512_storeu_si512(planes + k, _mm512_shuffle_epi8(in_order, _mm512_broadcast_i32x4(words_order<PB>())));
    } else {
        const __m512i by_plane = _mm512_broadcast_i32x4(phase_order<PB>());
        const __m512i in_order = _mm512_broadcast_i32x4(
            PB == 2 ? _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)
                    : _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
        const __m512i grouped = _mm512_shuffle_epi8(
            _mm512_permutexvar_epi32(dwords, _mm512_shuffle_epi8(bytes, by_plane)), in_order);
        if constexpr (PB == 2) {
            _mm256_storeu_si256((__m256i*)(planes + k / 2), _mm512_castsi512_si256(grouped));
            _mm256_storeu_si256((__m256i*)(planes + plane_bytes + k / 2), _mm512_extracti64x4_epi64(grouped, 1));
        } else {
            _mm_storeu_si128((__m128i*)(planes + k / 4), _mm512_castsi512_si128(grouped));
            _mm_storeu_si128((__m128i*)(planes + plane_bytes + k / 4), _mm512_extracti32x4_epi32(grouped, 1));
            _mm_storeu_si128((__m128i*)(planes + 2 * plane_bytes + k / 4), _mm512_extracti32x4_epi32(grouped, 2));
            _mm_storeu_si128((__m128i*)(planes + 3 * plane_bytes + k / 4), _mm512_extracti32x4_epi32(grouped, 3));
        }
    }
}

// See quanto_split_x. INT8_CODES: x's codes are its dynamic int8 quantization instead, as QTensor.quantize(x,
// qint8, axis=0) computes it for x in `precision` (scale = max(max|x| / 127, finfo.tiny), code =
// round-half-even(x / scale) in [-127, 127], the same IEEE operations and roundings): l holds the codes, h
// (their high bytes, all 0) is not written and may be null, and the kernels' products are those of the int8
// GEMM of the codes.
template <int PB, Layout LAYOUT, bool INT8_CODES = false>
int split_x(const quanto_fx_cpu::StoredX& x, int64_t M, int64_t K, int64_t group, int8_t* h, int8_t* l, float* sx,
            float* xsum, int threads, int precision = quanto_fx_cpu::FLOAT32) {
    using quanto_fx_cpu::round_to;
    const int64_t G = K / group, plane_bytes = K / PB;
    std::atomic<bool> bad{false};
    // One thread for a row or two: a team costs ~7 us, more than splitting them.
    quanto_fx_cpu::parallel_for(0, M, 1, M > 2 ? threads : 1, [&](int64_t m) {
        const float* row = x.row(m);
        int8_t *row_h = INT8_CODES ? nullptr : h + m * K, *row_l = l + m * K;
        const float amax = quanto_fx_cpu::row_abs_max(row, K);
        if (isnan(amax) || (!INT8_CODES && amax > 0.f && amax < MIN_SCALED_MAX)) {
            bad.store(true, std::memory_order_relaxed);
            return;
        }
        const float s = INT8_CODES ? std::max(round_to(amax / INT8_LEVELS, precision),
                                              quanto_fx_cpu::smallest_normal(precision))
                                   : amax > 0.f ? amax / X_LEVELS : 1.f;
        const float inverse = 1.f / s;
        const __m512 vinverse = _mm512_set1_ps(inverse), vs = _mm512_set1_ps(s);
        sx[m] = s;
        for (int64_t g = 0; g < G; g++) {
            __m512i vtotal = _mm512_setzero_si512();  // per lane <= K / 16 * 32639: int32 up to K = 2**20
            int64_t total = 0;  // the group's sum: past int32 from 65,796 elements
            int64_t k = g * group;
            const int64_t end = k + group;
            // cvtps rounds half to even, as nearbyintf below
            const auto codes = [&](int64_t at) {
                const __m512 v = _mm512_loadu_ps(row + at);
                if constexpr (INT8_CODES) {
                    const __m512i q = _mm512_cvtps_epi32(round_to(_mm512_div_ps(v, vs), precision));
                    return _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
                } else {
                    return _mm512_cvtps_epi32(_mm512_mul_ps(v, vinverse));
                }
            };
            // 64 codes at a time as 16-bit lanes (|q| <= 32639: packs is exact, and so are q + 128 and 256 hi)
            for (; k + 64 <= end && k % 64 == 0; k += 64) {
                __m512i hi[2], lo[2];
                for (int half = 0; half < 2; half++) {
                    const int64_t at = k + 32 * half;
                    const __m512i q = _mm512_packs_epi32(codes(at), codes(at + 16));
                    hi[half] = _mm512_srai_epi16(_mm512_add_epi16(q, _mm512_set1_epi16(128)), 8);
                    lo[half] = _mm512_sub_epi16(q, _mm512_slli_epi16(hi[half], 8));
                    vtotal = _mm512_add_epi32(vtotal, _mm512_madd_epi16(q, _mm512_set1_epi16(1)));
                }
                if constexpr (!INT8_CODES) store_64_by_phase<PB, LAYOUT>(row_h, plane_bytes, k, hi[0], hi[1]);
                store_64_by_phase<PB, LAYOUT>(row_l, plane_bytes, k, lo[0], lo[1]);
            }
            for (; k + 16 <= end && k % 16 == 0; k += 16) {
                const __m512i q = codes(k);
                const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
                const __m512i lo = _mm512_sub_epi32(q, _mm512_slli_epi32(hi, 8));
                if constexpr (!INT8_CODES) store_by_phase<PB, LAYOUT>(row_h, plane_bytes, k, _mm512_cvtepi32_epi8(hi));
                store_by_phase<PB, LAYOUT>(row_l, plane_bytes, k, _mm512_cvtepi32_epi8(lo));
                vtotal = _mm512_add_epi32(vtotal, q);
            }
            for (; k < end; k++) {
                const int32_t q =
                    INT8_CODES ? (int32_t)std::clamp(nearbyintf(round_to(row[k] / s, precision)), -127.f, 127.f)
                               : (int32_t)nearbyintf(row[k] * inverse);
                const int32_t hi = (q + 128) >> 8;
                const int64_t at = LAYOUT == WORDS ? words_offset(PB, k) : (k % PB) * plane_bytes + k / PB;
                if (!INT8_CODES) row_h[at] = (int8_t)hi;
                row_l[at] = (int8_t)(q - hi * 256);
                total += q;
            }
            const __m512i wide = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(vtotal)),
                                                  _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(vtotal, 1)));
            xsum[m * G + g] = s * (float)(total + _mm512_reduce_add_epi64(wide));
        }
    });
    return bad.load();
}


// -- GEMM (larger M): the outer-product form of the same integer sums ---------------------------------------
//
// The GEMV above reduces 64 weight bytes of one row against 64 bytes of x, which costs a horizontal sum and
// float conversions per group and row: fine when the weight's bytes are the bottleneck, no faster than the
// fp32 GEMM once x has many rows. Here each int32 lane is one output column: lane j of a code vector holds 4
// codes of weight row n0 + j (one phase of a 32-bit word of its packed bytes), and x's 4 matching phase bytes
// are broadcast to all lanes, so one vpdpbusd does 64 multiply-adds for 16 columns and the group scales
// apply to whole vectors. The weight is transposed once per block of 16 * NR rows (into code vectors, or
// whole words whose phases each tile takes: see transpose_code_vectors) and reused by every row of x in the
// chunk (GEMM_X_CHUNK_BYTES of x planes stay in L2). At K = N = 4096 on a 2-core
// Xeon: 0.26x the fp32 GEMM's time at M = 4, 0.35x at 32, 0.5x at 128 to 512 (the dequantize-then-fp32-GEMM
// it replaced: 0.9 to 1.2x); the GEMV stays ahead at small M (quanto_weight_mm_uses_gemv), where
// transposing the weight costs more than it saves. int8 weights: one phase per byte, codes xor 0x80,
// per-channel scales, no zero.
constexpr int64_t GEMM_X_CHUNK_BYTES = 1 << 20;

struct alignas(64) Vector {  // storage for one __m512 / __m512i (std containers of those drop the alignment)
    char bytes[64];
};

// The 16 x 16 transpose of 32-bit words: v[r] word d becomes v[d] word r, in 64 shuffles (4 per vector).
INLINE void transpose_words(__m512i v[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2)  // per 128-bit block b: t[i] = words 4b, 4b + 1 of rows i, i + 1
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    for (int i = 0; i < 16; i += 4) {  // block b of v[i + e]: word 4b + e of rows i .. i + 3
        v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]), v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]), v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int e = 0; e < 4; e++) {  // collect block b of v[e], v[4 + e], v[8 + e], v[12 + e] into word 4b + e
        const __m512i even_low = _mm512_shuffle_i32x4(v[e], v[4 + e], 0x88);
        const __m512i odd_low = _mm512_shuffle_i32x4(v[e], v[4 + e], 0xDD);
        const __m512i even_high = _mm512_shuffle_i32x4(v[8 + e], v[12 + e], 0x88);
        const __m512i odd_high = _mm512_shuffle_i32x4(v[8 + e], v[12 + e], 0xDD);
        t[e] = _mm512_shuffle_i32x4(even_low, even_high, 0x88);
        t[8 + e] = _mm512_shuffle_i32x4(even_low, even_high, 0xDD);
        t[4 + e] = _mm512_shuffle_i32x4(odd_low, odd_high, 0x88);
        t[12 + e] = _mm512_shuffle_i32x4(odd_low, odd_high, 0xDD);
    }
    for (int d = 0; d < 16; d++) v[d] = t[d];
}

// Rows n0 .. n0 + 16 NR of the weight as vectors of 16 lanes, one per column: with SPLIT, for 32-bit word d of
// the row's bytes, phase p and column block c, the word's 4 codes of that phase at (d * PB + p) * NR + c, taken
// once for every tile of x's rows; without, the word itself at d * NR + c, its phases taken in gemm_tile
// (stored split, a call of one tile writes PB times the weight's bytes to read them once: int4 1536 x 384 at M
// = 3 spent 40% of its time in this function, a third of that in those stores); then per group and block the
// scale and (z - mid * s) vectors of the 16 columns. Lanes past `last_lanes` of the last block (the weight's
// last rows when N is not a multiple of 16) read nothing. The rows are read 64 bytes at a time and transposed
// in registers: with a 16-lane gather per word (and per group's scales), the int8 GEMM on 384 x 1536 had run
// 1.3x the fp32 GEMM's time at M = 2 (0.9x now), 0.74x at M = 8 (0.6x).
template <int BITS, int NR, bool SPLIT>
void transpose_code_vectors(const uint8_t* weight, int64_t n0, int64_t K, int64_t N, const float* scales, int64_t G,
                            __mmask16 last_lanes, __m512i* codes, __m512* group_scales) {
    constexpr int per_byte = 8 / BITS, mid = 1 << (BITS - 1), scale_stride = BITS == 8 ? 1 : 2;
    const int64_t row_bytes = K / per_byte, words = row_bytes / 4;
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int c = 0; c < NR; c++) {
        const __mmask16 valid = c == NR - 1 ? last_lanes : (__mmask16)0xFFFF;
        const uint8_t* rows = weight + (n0 + 16 * c) * row_bytes;
        for (int64_t d0 = 0; d0 < words; d0 += 16) {
            const int64_t count = std::min<int64_t>(16, words - d0);
            const __mmask16 in_row = (__mmask16)((1u << count) - 1);
            __m512i v[16];
            for (int r = 0; r < 16; r++)
                v[r] = (valid >> r) & 1 ? _mm512_maskz_loadu_epi32(in_row, rows + r * row_bytes + 4 * d0)
                                        : _mm512_setzero_si512();
            transpose_words(v);
            for (int64_t d = 0; d < count; d++) {
                if constexpr (SPLIT) {
                    for (int p = 0; p < per_byte; p++)
                        codes[((d0 + d) * per_byte + p) * NR + c] = chunk_codes<BITS, Lanes<64>>(v[d], p);
                } else {
                    codes[(d0 + d) * NR + c] = v[d];
                }
            }
        }
        // The (scale, zero) pairs of the 16 columns are 32 floats in a row: two loads and two permutes (two
        // gathers per group had been this function's hottest instructions at K = 384). int8: 16 scales.
        const int pair_floats = 2 * __builtin_popcount(valid);  // valid lanes are a prefix
        const __mmask16 first_half = pair_floats >= 16 ? 0xFFFF : (__mmask16)((1u << pair_floats) - 1);
        const __mmask16 second_half = pair_floats > 16 ? (__mmask16)((1u << (pair_floats - 16)) - 1) : 0;
        const __m512i evens = _mm512_add_epi32(lanes, lanes), odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
        for (int64_t g = 0; g < G; g++) {
            const float* at = scales + (g * N + n0 + 16 * c) * scale_stride;
            __m512 s, z = _mm512_setzero_ps();
            if constexpr (BITS == 8) {
                s = _mm512_maskz_loadu_ps(valid, at);
            } else {
                const __m512 low = _mm512_maskz_loadu_ps(first_half, at);
                const __m512 high = _mm512_maskz_loadu_ps(second_half, at + 16);
                s = _mm512_permutex2var_ps(low, evens, high), z = _mm512_permutex2var_ps(low, odds, high);
            }
            group_scales[(g * NR + c) * 2] = s;
            group_scales[(g * NR + c) * 2 + 1] = _mm512_fnmadd_ps(s, _mm512_set1_ps((float)mid), z);
        }
    }
}

// out[m0 .. m0 + MR, n0 .. n0 + 16 NR] from the transposed code vectors and x's byte planes in WORDS (Layout).
template <int BITS, int MR, int NR, bool SPLIT, bool HIGH>
INLINE void gemm_tile(const __m512i* codes, const __m512* group_scales, const int8_t* h, const int8_t* l,
                      const float* sx, const float* xsum, int64_t m0, int64_t K, int64_t G, const float* bias,
                      float* out, int64_t N, int64_t n0, __mmask16 last_lanes) {
    constexpr int per_byte = 8 / BITS;
    const int64_t row_bytes = K / per_byte, words = row_bytes / 4 / G;
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int c = 0; c < NR; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512i sum_h[MR][NR], sum_l[MR][NR];
        for (int i = 0; i < MR; i++)
            for (int c = 0; c < NR; c++) sum_h[i][c] = sum_l[i][c] = _mm512_setzero_si512();
        for (int64_t d = g * words; d < (g + 1) * words; d++)
            for (int p = 0; p < per_byte; p++) {
                __m512i step[NR];
                for (int c = 0; c < NR; c++) {
                    if constexpr (SPLIT) step[c] = codes[(d * per_byte + p) * NR + c];
                    else step[c] = chunk_codes<BITS, Lanes<64>>(codes[d * NR + c], p);
                }
                for (int i = 0; i < MR; i++) {
                    const int64_t at = (m0 + i) * K + (d * per_byte + p) * 4;  // WORDS
                    int32_t word_h = 0, word_l;
                    if constexpr (HIGH) memcpy(&word_h, h + at, 4);
                    memcpy(&word_l, l + at, 4);
                    const __m512i xh = _mm512_set1_epi32(word_h), xl = _mm512_set1_epi32(word_l);
                    for (int c = 0; c < NR; c++) {
                        if constexpr (HIGH) sum_h[i][c] = dpbusd(sum_h[i][c], step[c], xh);
                        sum_l[i][c] = dpbusd(sum_l[i][c], step[c], xl);
                    }
                }
            }
        // Scale and zero per column, applied to the exact sums; sx multiplies the whole row at the end, so the
        // zero term takes the group's sum of x's codes (xsum / sx).
        for (int i = 0; i < MR; i++) {
            const __m512 x_codes_sum = _mm512_set1_ps(xsum[(m0 + i) * G + g] / sx[m0 + i]);
            for (int c = 0; c < NR; c++) {
                const __m512 low = _mm512_cvtepi32_ps(sum_l[i][c]);
                const __m512 dot = HIGH ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_h[i][c]), _mm512_set1_ps(256.f), low)
                                        : low;
                acc[i][c] = _mm512_fmadd_ps(dot, group_scales[(g * NR + c) * 2], acc[i][c]);
                acc[i][c] = _mm512_fmadd_ps(group_scales[(g * NR + c) * 2 + 1], x_codes_sum, acc[i][c]);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int c = 0; c < NR; c++) {
            const __mmask16 valid = c == NR - 1 ? last_lanes : (__mmask16)0xFFFF;
            const __m512 shift = bias ? _mm512_maskz_loadu_ps(valid, bias + n0 + 16 * c) : _mm512_setzero_ps();
            _mm512_mask_storeu_ps(out + (m0 + i) * N + n0 + 16 * c, valid,
                                  _mm512_add_ps(_mm512_mul_ps(acc[i][c], _mm512_set1_ps(sx[m0 + i])), shift));
        }
}

// Rows of x in tiles of 4 (4 x 2 tiles of 16 columns: 16 integer accumulators; 3 x 3 and 2 x 4 ran as fast,
// 6 x 1 and 3 x 2 slower), the last 1 to 3 rows in one tile: row by row, the 4 accumulators of a row wait on
// vpdpbusd's latency (int4 on 384 x 1536 at M = 3: ~1.1x the fp32 GEMM's time, against 0.67x at M = 4).
constexpr int GEMM_ROWS = 4, GEMM_COLUMN_BLOCKS = 2;
// Packed weights up to this M keep their transposed words whole (see transpose_code_vectors): taking the
// phases in every tile costs more past it (x fp32 time, split / whole, 2-core Xeon: 1536 x 384 int4 at M = 3
// 1.08-1.11 / 0.87-0.92, at 16 0.25 / 0.23, at 32 0.37-0.38 / 0.34-0.38, at 512 0.64 / 0.70; 4096 x 4096 int4
// at M = 3 0.43 / 0.34, at 128 0.44 / 0.50). int8 weights have one phase: always split, xor-ed once.
constexpr int64_t GEMM_WORDS_MAX_M = 16;

template <int BITS, int NR, bool SPLIT, bool HIGH>
void gemm_rows(const __m512i* codes, const __m512* group_scales, const int8_t* h, const int8_t* l, const float* sx,
               const float* xsum, int64_t first, int64_t last, int64_t K, int64_t G, const float* bias,
               float* out, int64_t N, int64_t n0, __mmask16 last_lanes) {
    int64_t m = first;
    for (; m + GEMM_ROWS <= last; m += GEMM_ROWS)
        gemm_tile<BITS, GEMM_ROWS, NR, SPLIT, HIGH>(codes, group_scales, h, l, sx, xsum, m, K, G, bias, out, N, n0,
                                              last_lanes);
    if (last - m == 3)
        gemm_tile<BITS, 3, NR, SPLIT, HIGH>(codes, group_scales, h, l, sx, xsum, m, K, G, bias, out, N, n0, last_lanes);
    if (last - m == 2)
        gemm_tile<BITS, 2, NR, SPLIT, HIGH>(codes, group_scales, h, l, sx, xsum, m, K, G, bias, out, N, n0, last_lanes);
    if (last - m == 1)
        gemm_tile<BITS, 1, NR, SPLIT, HIGH>(codes, group_scales, h, l, sx, xsum, m, K, G, bias, out, N, n0, last_lanes);
}

// Rows of x whose planes one pass over the weight takes (GEMM_X_CHUNK_BYTES of them).
INLINE int64_t gemm_rows_per_pass(int64_t K) { return std::max<int64_t>(1, GEMM_X_CHUNK_BYTES / (2 * K)); }

template <int BITS, bool SPLIT, bool HIGH = true>
void vnni_gemm(const int8_t* h, const int8_t* l, const float* sx, const float* xsum, int64_t M, int64_t K,
               const uint8_t* weight, int64_t N, const float* scales, int64_t G, const float* bias, float* out,
               int threads) {
    static_assert(SPLIT || BITS != 8, "int8 codes are taken once, split");
    constexpr int NR = GEMM_COLUMN_BLOCKS;
    const int64_t wide_blocks = N / (16 * NR), narrow_blocks = (N - wide_blocks * 16 * NR + 15) / 16;
    const __mmask16 tail_lanes = N % 16 ? (__mmask16)((1u << (N % 16)) - 1) : (__mmask16)0xFFFF;
    const int64_t chunk = gemm_rows_per_pass(K);
    // Per thread: the code vectors of 16 NR weight rows (split: K codes a byte each; whole: K / PB bytes) and
    // their group scales; allocated here, where a failure can still reach the caller (std::bad_alloc, not inside
    // the parallel region).
    const int64_t code_vectors = (SPLIT ? K : K / (8 / BITS)) / 4 * NR;
    const int64_t per_thread = code_vectors + G * NR * 2;
    std::unique_ptr<Vector[]> buffers(new Vector[threads * per_thread]);
    quanto_fx_cpu::parallel_region(threads, [&] {
        Vector* own = buffers.get() + omp_get_thread_num() * per_thread;
        __m512i* codes = reinterpret_cast<__m512i*>(own);
        __m512* group_scales = reinterpret_cast<__m512*>(own + code_vectors);
        for (int64_t first = 0; first < M; first += chunk) {
            const int64_t last = std::min(M, first + chunk);
#pragma omp for schedule(static) nowait
            for (int64_t b = 0; b < wide_blocks + narrow_blocks; b++) {
                if (b < wide_blocks) {
                    const int64_t n0 = b * 16 * NR;
                    transpose_code_vectors<BITS, NR, SPLIT>(weight, n0, K, N, scales, G, 0xFFFF, codes, group_scales);
                    gemm_rows<BITS, NR, SPLIT, HIGH>(codes, group_scales, h, l, sx, xsum, first, last, K, G, bias, out,
                                                     N, n0, 0xFFFF);
                } else {
                    const int64_t n0 = wide_blocks * 16 * NR + (b - wide_blocks) * 16;
                    const __mmask16 lanes = n0 + 16 > N ? tail_lanes : (__mmask16)0xFFFF;
                    transpose_code_vectors<BITS, 1, SPLIT>(weight, n0, K, N, scales, G, lanes, codes, group_scales);
                    gemm_rows<BITS, 1, SPLIT, HIGH>(codes, group_scales, h, l, sx, xsum, first, last, K, G, bias, out,
                                                    N, n0, lanes);
                }
            }
        }
    });
}

// The GEMM of packed codes: their transposed words kept whole where a pass over the weight takes up to
// GEMM_WORDS_MAX_M rows of x, split by phase past it.
template <int BITS>
void packed_gemm(const int8_t* h, const int8_t* l, const float* sx, const float* xsum, int64_t M, int64_t K,
                 const uint8_t* weight, int64_t N, const float* scales, int64_t G, const float* bias, float* out,
                 int threads) {
    if (std::min(M, gemm_rows_per_pass(K)) > GEMM_WORDS_MAX_M)
        vnni_gemm<BITS, true>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
    else
        vnni_gemm<BITS, false>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
}

}  // namespace

extern "C" {

// x (M, K) float32 -> per row a scale sx and the codes q = round(x / sx) in [-32639, 32639] split in signed
// bytes h = (q + 128) >> 8 and l = q - 256 h, each (M, per_byte, K / per_byte) by phase: plane p of row m
// holds the codes k = b * per_byte + p, the elements that meet the code at bit offset p * bits of weight byte
// b. xsum[m][g] = sx * the sum of q over group g (of `group` elements) of row m. Vectorized and parallel over
// rows: this runs on every call, at M = 2048 too. Returns 1 when x holds a NaN, an infinity or a row too small
// to scale (see MIN_SCALED_MAX).
int quanto_split_x(const float* x, int64_t M, int64_t K, int per_byte, int64_t group, int8_t* h, int8_t* l,
                   float* sx, float* xsum, int threads) {
    const quanto_fx_cpu::StoredX rows{x, quanto_fx_cpu::FLOAT32, K, nullptr};
    if (per_byte == 2) return split_x<2, PHASE_PLANES>(rows, M, K, group, h, l, sx, xsum, threads);
    if (per_byte == 4) return split_x<4, PHASE_PLANES>(rows, M, K, group, h, l, sx, xsum, threads);
    return split_x<1, PHASE_PLANES>(rows, M, K, group, h, l, sx, xsum, threads);
}

// out (M, N) = (256 * products[m] + products[M + m]) * sx[m] * scale[n], products (2M, N) int32 from the
// int8 GEMM of x's high and low byte planes stacked: one pass where torch ops took five.
void quanto_combine_planes(const int32_t* products, int64_t M, int64_t N, const float* sx, const float* scale,
                           float* out, int threads) {
    quanto_fx_cpu::parallel_for(0, M, 1, threads, [&](int64_t m) {
        const int32_t *high = products + m * N, *low = products + (M + m) * N;
        const __m512 row_scale = _mm512_set1_ps(sx[m]);
        int64_t n = 0;
        for (; n + 16 <= N; n += 16) {
            const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(high + n)), _mm512_set1_ps(256.f),
                                               _mm512_cvtepi32_ps(_mm512_loadu_si512(low + n)));
            _mm512_storeu_ps(out + m * N + n, _mm512_mul_ps(_mm512_mul_ps(dot, row_scale), _mm512_loadu_ps(scale + n)));
        }
        for (; n < N; n++) out[m * N + n] = (256.f * (float)high[n] + (float)low[n]) * sx[m] * scale[n];
    });
}

// Whether quanto_weight_mm runs the GEMV (else the GEMM) for M rows of x: the GEMM from fewer rows when K <=
// 512, where the GEMV's work per output (a horizontal sum, the group flushes) weighs most against its K loop.
// int8 weights: up to M = 6, M = 2 for K <= 512; and past 2**16 input features (the GEMM sums all K products
// of up to 128 * 255 of an int8 row in one int32 lane). 2-core Xeon, x fp32 time, GEMV / GEMM: 384 x 1536 at
// M = 3 1.05 / 0.90, at 8 0.87 / 0.61; 1536 x 384 at M = 6 0.92 / 0.93; 4096 x 4096 at M = 6 0.28 / 0.32, at 8
// 0.31 / 0.25. Packed weights: up to M = 2, M = 1 for K <= 512, with groups of whole 32-byte GEMV chunks (at
// M = 2, int4 / int2: 384 x 1536 1.14 / 1.23 against 0.88 / 0.95, 384 x 384 1.13 / 1.23 against 0.95 / 0.94;
// 1536 x 384 1.07 / 1.14 against 1.32 / 1.02, 4096 x 4096 0.28 / 0.32 against 0.40 / 0.36).
int quanto_weight_mm_uses_gemv(int bits, int64_t M, int64_t K, int64_t G) {
    constexpr int64_t SMALL_K = 512, INT8_GEMV_MAX_M = 6, INT8_SMALL_K_GEMV_MAX_M = 2, INT8_GEMM_MAX_K = 1 << 16;
    constexpr int64_t PACKED_GEMV_MAX_M = 2, PACKED_SMALL_K_GEMV_MAX_M = 1, GEMV_CHUNK_BYTES = 32;
    if (bits == 8) return M <= (K <= SMALL_K ? INT8_SMALL_K_GEMV_MAX_M : INT8_GEMV_MAX_M) || K > INT8_GEMM_MAX_K;
    const int64_t max_m = K <= SMALL_K ? PACKED_SMALL_K_GEMV_MAX_M : PACKED_GEMV_MAX_M;
    return M <= max_m && (K * bits / 8 / G) % GEMV_CHUNK_BYTES == 0;
}

// One thread below this many multiply-adds with 512 outputs or more (fewer outputs need more, see
// threads_for_work; 2-core Xeon, int8, one / two threads: 128 x 64 at M = 1 and 4, 3.6 / 4.3 and 3.9 / 6.1
// us; 384 x 384 at M = 1, 6.3 / 6.3 us; 384 x 768 at M = 1, 8.9 / 7.8 us; 512 x 512 at M = 1, 7.9 / 7.3 us).
constexpr int64_t SERIAL_BELOW_WORK = 1 << 18;

// quanto_weight_mm and quanto_dynamic_int8_mm (int8_codes: x as dynamic int8 codes computed in
// `precision`, int8 weights only).
static int weight_mm(int bits, bool int8_codes, int precision, int x_storage, const void* x_data, int64_t M,
                     int64_t K, const uint8_t* weight, int64_t N, const float* scales, int64_t G, const float* bias,
                     float* out, int threads) {
    const int per_byte = 8 / bits;
    const bool gemv = quanto_weight_mm_uses_gemv(bits, M, K, G);
    threads = quanto_fx_cpu::threads_for_work(M, K, N, SERIAL_BELOW_WORK, threads);
    const auto buffers = quanto_fx_cpu::row_buffers(x_storage, threads, K);
    const quanto_fx_cpu::StoredX x{x_data, x_storage, K, buffers.get()};
    const int64_t plane_bytes = (M * K + 63) / 64 * 64;  // each plane on cache lines
    // all written, not zeroed; int8 codes have no high byte plane
    const auto planes = quanto_fx_cpu::aligned_workspace<int8_t>((int8_codes ? 1 : 2) * plane_bytes);
    // written by split_x for every row (kept workspaces: a vector's 512 KB at M = 4096 was new memory per call)
    const auto scale_buffer = quanto_fx_cpu::aligned_workspace<float>(M);
    const auto sum_buffer = quanto_fx_cpu::aligned_workspace<float>(M * G);
    float *sx = scale_buffer.get(), *xsum = sum_buffer.get();
    int8_t *l = planes.get(), *h = int8_codes ? nullptr : planes.get() + plane_bytes;
    int bad;
    if (int8_codes) bad = split_x<1, PHASE_PLANES, true>(x, M, K, K, h, l, sx, xsum, threads, precision);
    else if (per_byte == 4 && gemv) bad = split_x<4, PHASE_PLANES>(x, M, K, K / G, h, l, sx, xsum, threads);
    else if (per_byte == 4) bad = split_x<4, WORDS>(x, M, K, K / G, h, l, sx, xsum, threads);
    else if (per_byte == 2 && gemv) bad = split_x<2, PHASE_PLANES>(x, M, K, K / G, h, l, sx, xsum, threads);
    else if (per_byte == 2) bad = split_x<2, WORDS>(x, M, K, K / G, h, l, sx, xsum, threads);
    else bad = split_x<1, PHASE_PLANES>(x, M, K, K / G, h, l, sx, xsum, threads);
    if (bad) return 1;
    if (int8_codes) {  // x's high byte plane is all 0
        if (gemv) vnni_mm_any_chunk<8, false>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
        else vnni_gemm<8, true, false>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
        return 0;
    }
    if (bits == 8 && gemv) vnni_mm_any_chunk<8>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
    if (bits == 8 && !gemv) vnni_gemm<8, true>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
    if (bits == 4 && gemv) vnni_mm_any_chunk<4>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
    if (bits == 2 && gemv) vnni_mm_any_chunk<2>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
    if (bits == 4 && !gemv) packed_gemm<4>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
    if (bits == 2 && !gemv) packed_gemm<2>(h, l, sx, xsum, M, K, weight, N, scales, G, bias, out, threads);
    return 0;
}

// out (M, N) float32 = x @ W.T + bias for x (M, K) stored as `x_storage` (a Precision: float32, float16 or
// bfloat16 values, each row widened to float32 as it is split) and the weight in `bits` (8: int8 (N, K), scales
// (N,); 4 / 2: uint8 (N, K * bits / 8) packed codes, scales (G, N, 2) = (scale, zero) pairs), bias (N,) or
// null: x split as by quanto_split_x into a workspace (in WORDS for the GEMM, see Layout), then the GEMV or the
// GEMM (groups of whole 32-bit words) by quanto_weight_mm_uses_gemv, the bias added as each output is stored
// (a separate serial pass over a 2048 x 1536 output had cost more than the GEMM). One call where three Python-side
// allocations and two calls cost ~30 us a layer at M = 1. Returns 1, out untouched, when x holds a NaN, an
// infinity or a row too small to scale (see MIN_SCALED_MAX); 2 when the workspace cannot be allocated.
int quanto_weight_mm(int bits, int x_storage, const void* x, int64_t M, int64_t K, const uint8_t* weight, int64_t N,
                     const float* scales, int64_t G, const float* bias, float* out, int threads) try {
    return weight_mm(bits, false, quanto_fx_cpu::FLOAT32, x_storage, x, M, K, weight, N, scales, G, bias, out, threads);
} catch (const std::bad_alloc&) {
    return 2;
}

// quanto_weight_mm for int8 weights with x quantized as dynamic int8 activations (per row, see split_x's
// INT8_CODES; their high byte plane, all 0, is not multiplied): out = (sum_k code_x * w) * scale_x * scale_w
// + bias, the products exact in int32, the epilogue in float32 (its rounding, not the reference's order: up
// to ~1e-4 of the output's max at K = 2**16, dynamic_mm.INT8_CPU_KERNEL_ERROR). x holds values of the dtype
// `precision` (Precision in cpu_simd.h), stored as `x_storage` (as for quanto_weight_mm: a 16-bit x itself, or
// converted to float32 exactly), whose arithmetic the codes and scales reproduce. The whole of QLinear's
// dynamic W8A8 forward in one call, where torch ops (quantize, aten._int_mm, rescale) took ~90 us at M = 1 on a
// 384 x 1536 layer. Returns 1, out untouched, when x holds a NaN or an infinity; 2 when the workspace cannot be
// allocated.
int quanto_dynamic_int8_mm(int precision, int x_storage, const void* x, int64_t M, int64_t K, const int8_t* weight,
                           int64_t N, const float* scales, const float* bias, float* out, int threads) try {
    const auto w = reinterpret_cast<const uint8_t*>(weight);
    return weight_mm(8, true, precision, x_storage, x, M, K, w, N, scales, 1, bias, out, threads);
} catch (const std::bad_alloc&) {
    return 2;
}
}
