// Vector helpers, workspaces, OpenMP regions and the thread-count rule shared by cpu_vnni_mm.cpp and
// cpu_float8_mm.cpp. Inline, in a header: called across the two files, sum8 had been a call through the PLT,
// and a call spills every live vector register (the x86-64 ABI saves none of them): ~8% of the int8 GEMV's
// time at K = 384.
#pragma once

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <algorithm>
#include <memory>
#include <new>
#include <vector>

#define INLINE static inline __attribute__((always_inline))

namespace quanto_fx_cpu {

// The largest |x| of a row of K floats, or NaN when the row holds a NaN or an infinity. Four vectors a step:
// with one, each max and add waited for the previous one (4 cycles a vector). The lines 4 KB ahead are
// prefetched, across the row's end into the next one: the hardware's prefetcher stops at each 4 KB page, and
// rows read from L3 (a large x) came at 12 GB/s, 16 with the hints (one core of the 2-core Xeon).
INLINE float row_abs_max(const float* row, int64_t K) {
    constexpr int64_t AHEAD = 4096;
    __m512 vmax[4], nan_if_not_finite[4];  // inf - inf = NaN
    for (int j = 0; j < 4; j++) vmax[j] = nan_if_not_finite[j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
        for (int j = 0; j < 4; j++) {
            _mm_prefetch((const char*)(row + k + 16 * j) + AHEAD, _MM_HINT_T0);  // a hint: never faults
            const __m512 v = _mm512_loadu_ps(row + k + 16 * j);
            vmax[j] = _mm512_max_ps(vmax[j], _mm512_abs_ps(v));
            nan_if_not_finite[j] = _mm512_add_ps(nan_if_not_finite[j], _mm512_sub_ps(v, v));
        }
    for (; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_loadu_ps(row + k);
        vmax[0] = _mm512_max_ps(vmax[0], _mm512_abs_ps(v));
        nan_if_not_finite[0] = _mm512_add_ps(nan_if_not_finite[0], _mm512_sub_ps(v, v));
    }
    const __m512 all_max = _mm512_max_ps(_mm512_max_ps(vmax[0], vmax[1]), _mm512_max_ps(vmax[2], vmax[3]));
    const __m512 all_nan = _mm512_add_ps(_mm512_add_ps(nan_if_not_finite[0], nan_if_not_finite[1]),
                                         _mm512_add_ps(nan_if_not_finite[2], nan_if_not_finite[3]));
    float amax = _mm512_reduce_max_ps(all_max), finite = _mm512_reduce_add_ps(all_nan);
    for (; k < K; k++) amax = fmaxf(amax, fabsf(row[k])), finite += row[k] - row[k];
    return isnan(finite) ? NAN : amax;
}

// The dtype of x whose arithmetic a kernel reproduces while quantizing it: torch computes a float16 or
// bfloat16 operation in float32 and rounds its result to the 16-bit dtype (half to even, subnormals kept;
// bfloat16 by adding 0x7fff plus the kept bits' lowest to the bits, as c10::BFloat16 does, not with
// vcvtneps2bf16, which flushes subnormals). A NaN may come out as another value (narrow keeps it a NaN).
enum Precision { FLOAT32 = 0, FLOAT16 = 1, BFLOAT16 = 2 };

INLINE __m512 round_to(__m512 v, int precision) {
    if (precision == FLOAT16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (precision != BFLOAT16) return v;
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lowest_kept, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u)));
}

INLINE float round_to(float v, int precision) { return _mm512_cvtss_f32(round_to(_mm512_set1_ps(v), precision)); }

// torch.finfo(dtype).tiny: the smallest normal value, which QTensor.quantize's scales are clamped to.
INLINE float smallest_normal(int precision) { return precision == FLOAT16 ? 0x1p-14f : FLT_MIN; }

// n float16 (`precision` FLOAT16) or bfloat16 values as float32, exactly.
INLINE void widen(const uint16_t* in, int precision, int64_t n, float* out) {
    const auto widened = [precision](__m256i h) {
        if (precision == FLOAT16) return _mm512_cvtph_ps(h);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    };
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, widened(_mm256_loadu_si256((const __m256i*)(in + i))));
    const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, tail, widened(_mm256_maskz_loadu_epi16(tail, in + i)));
}

// n float32 values rounded to float16 or bfloat16 as torch's casts round them (half to even; overflow to
// infinity; NaN stays NaN).
INLINE void narrow(const float* in, int precision, int64_t n, uint16_t* out) {
    const auto rounded = [precision](__m512 v) {
        if (precision == FLOAT16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_to(v, BFLOAT16)), 16);
        const __m512i nan = _mm512_set1_epi32(0x7fc0);  // c10::BFloat16's NaN: the rounding could carry past it
        return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), bits, nan));
    };
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i*)(out + i), rounded(_mm512_loadu_ps(in + i)));
    const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(out + i, tail, rounded(_mm512_maskz_loadu_ps(tail, in + i)));
}

// The 8 sums of a[0] .. a[7] in one vector: a transposing tree of 23 shuffles and adds, where 8 separate
// horizontal sums take ~70 dependent instructions (at K = 384 these made half of the GEMV's time).
INLINE __m256 sum8(const __m512* a) {
    __m512 half[4], quarter[2];
    constexpr int pairs[4][2] = {{0, 2}, {4, 6}, {1, 3}, {5, 7}};  // chosen so that the sums come out in order
    for (int p = 0; p < 4; p++) {  // lanes 0-7: 8 partial sums of the first row, lanes 8-15 of the second
        const __m512 u = a[pairs[p][0]], v = a[pairs[p][1]];
        half[p] = _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x44), _mm512_shuffle_f32x4(u, v, 0xEE));
    }
    for (int p = 0; p < 2; p++)  // each 128-bit quarter: 4 partial sums of one row
        quarter[p] = _mm512_add_ps(_mm512_shuffle_f32x4(half[2 * p], half[2 * p + 1], 0x88),
                                   _mm512_shuffle_f32x4(half[2 * p], half[2 * p + 1], 0xDD));
    const __m512 two = _mm512_add_ps(_mm512_shuffle_ps(quarter[0], quarter[1], 0x44),
                                     _mm512_shuffle_ps(quarter[0], quarter[1], 0xEE));
    const __m512 one = _mm512_add_ps(two, _mm512_shuffle_ps(two, two, 0xB1));  // the sums in lanes 0, 2, .., 14
    return _mm512_castps512_ps256(_mm512_maskz_compress_ps(0x5555, one));
}

// The threads for a call of M x K x N multiply-adds: one below `serial_below`, where waking and joining a
// second thread costs more than it saves, else `threads`. A layer with fewer than 512 outputs needs
// proportionally more work before a second thread pays (N = 64: 8x). 2-core Xeon, two threads against one:
// int8 and int4 at 2**18 with N = 64 to 256 1.15-1.39x the time, 1536 x 384 at M = 1 0.73-0.86x; float8
// at 2**16 to 2**18 with N = 64 and 2**16 to 2**17 with N = 128 1.07-1.35x, at 2**18 with N = 128 0.85-1.00x,
// at 2**17 with N = 256 or 512 0.76-0.93x.
INLINE int threads_for_work(int64_t M, int64_t K, int64_t N, int64_t serial_below, int threads) {
    constexpr int64_t WIDE = 512;
    return M * K * N / WIDE * std::min(N, WIDE) < serial_below ? 1 : threads;
}

// OpenMP regions that cost nothing when one thread runs them: even a region of one thread (num_threads(1),
// if(false)) makes a futex system call on its way out once libgomp's thread pool exists (~0.2 us; a small
// layer's call ran two). Bodies are called, not inlined, across a target attribute (a lambda has none).

// body(i) for i = begin, begin + step, .. below end, shared statically among `threads` threads; with one
// thread, run here, but inside another OpenMP region, where a region of one thread is opened so that the body
// sees omp_get_thread_num() 0 (StoredX's buffers), as in parallel_region.
template <class Body>
INLINE void parallel_for(int64_t begin, int64_t end, int64_t step, int threads, const Body& body) {
    if (threads <= 1 && !omp_in_parallel()) {
        for (int64_t i = begin; i < end; i += step) body(i);
        return;
    }
#pragma omp parallel for num_threads(std::max(threads, 1)) schedule(static)
    for (int64_t i = begin; i < end; i += step) body(i);
}

// body() run by each of `threads` threads, whose `omp for` loops share their iterations; with one thread, run
// here, where those loops (orphaned) run whole and omp_get_thread_num() is 0. Not inside another OpenMP region
// (torch's own, where get_num_threads() is 1): there the orphaned loops would bind to the outer team, so a
// region of one thread is opened as before.
template <class Body>
INLINE void parallel_region(int threads, const Body& body) {
    if (threads <= 1 && !omp_in_parallel()) return body();
#pragma omp parallel num_threads(std::max(threads, 1))
    body();
}

// Workspaces freed on a thread are kept for its next calls, up to KEPT_BYTES in all (the oldest freed first
// past that): a fresh block of 128 KB or more is new memory (glibc maps it, or trims its heap back to the
// system as it is freed), and a call's page faults had cost more than its work (a float8 layer of 128 x 128 at
// M = 4096 in bfloat16: 1863 faults, 2.4 ms of a 0.7 ms call). 64 MB, not 32: the byte planes of a 4096 x 4096
// x (32 MB) and a call's smaller workspaces together exceed 32 MB, and the planes, freed first, were dropped at
// every call. Blocks of HUGE_BLOCK or more, which a call's others can still push out, are placed on 2 MB
// boundaries and asked for transparent huge pages (given on request under THP "madvise"): a bfloat16 x of
// 4096 x 4096 widened to float32 had taken 16 ms in 4 KB page faults.
constexpr size_t KEPT_BYTES = 64 << 20, HUGE_BLOCK = 32 << 20, HUGE_PAGE = 2 << 20;

struct KeptBlocks {
    struct Block {
        void* data;
        size_t bytes;
    };
    std::vector<Block> blocks;  // oldest first
    size_t total = 0;
    ~KeptBlocks() {
        for (const Block& block : blocks) free(block.data);
    }
};

inline KeptBlocks& kept_blocks() {
    thread_local KeptBlocks kept;
    return kept;
}

struct Free {
    size_t bytes = 0;  // the block's size (0 for an empty unique_ptr's deleter, which never runs)
    void operator()(void* data) const {
        if (bytes > KEPT_BYTES) return free(data);
        KeptBlocks& kept = kept_blocks();
        while (kept.total + bytes > KEPT_BYTES) {
            free(kept.blocks.front().data);
            kept.total -= kept.blocks.front().bytes;
            kept.blocks.erase(kept.blocks.begin());
        }
        try {
            kept.blocks.push_back({data, bytes});
        } catch (const std::bad_alloc&) {  // a deleter must not throw: the block is freed instead
            return free(data);
        }
        kept.total += bytes;
    }
};

// A workspace of `count` T starting on a cache line (and so every row of x whose bytes are a multiple of 64):
// the smallest kept block that holds it but is at most twice its size, else a new one; throws std::bad_alloc.
// (Without that bound a call's small workspaces, allocated first, took its large ones' blocks: a float16 x's
// row buffers took the 32 MB planes block of a 4096 x 4096 int4 layer, whose planes were then new memory, 8192
// page faults, at every call.) The kernels read x's rows in 64-byte loads: from new[]'s 16-byte alignment,
// every one of them could split two lines (the float16 GEMV on 4096 x 4096 at M = 4 ran 1.4x slower in a
// process whose heap placed its x 16 bytes off).
template <class T>
std::unique_ptr<T[], Free> aligned_workspace(int64_t count) {
    const size_t bytes = std::max<size_t>(64, ((size_t)count * sizeof(T) + 63) / 64 * 64);
    KeptBlocks& kept = kept_blocks();
    int64_t best = -1;
    for (int64_t i = 0; i < (int64_t)kept.blocks.size(); i++) {
        const size_t size = kept.blocks[i].bytes;
        if (size >= bytes && size / 2 <= bytes && (best < 0 || size < kept.blocks[best].bytes)) best = i;
    }
    if (best >= 0) {
        const KeptBlocks::Block block = kept.blocks[best];
        kept.blocks.erase(kept.blocks.begin() + best);
        kept.total -= block.bytes;
        return std::unique_ptr<T[], Free>(static_cast<T*>(block.data), Free{block.bytes});
    }
    const bool huge = bytes >= HUGE_BLOCK;
    const size_t size = huge ? (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE : bytes;
    void* data = aligned_alloc(huge ? HUGE_PAGE : 64, size);
    if (!data) throw std::bad_alloc();
    if (huge) madvise(data, size, MADV_HUGEPAGE);  // advice: a refusal changes nothing
    return std::unique_ptr<T[], Free>(static_cast<T*>(data), Free{size});
}

// x as the caller stores it: float32, or float16 / bfloat16 (`storage`, a Precision), K values a row. A 16-bit
// row is widened into its thread's buffer of K floats (in L1 or L2) as it is needed: widening all of a 16-bit x
// into float32 first had cost a 4096 x 4096 float16 x ~6 ms and a 64 MB workspace. row() is called from the
// bodies of parallel_for / parallel_region with at most as many threads as `buffers` holds rows (row_buffers),
// where omp_get_thread_num() is below that count.
struct StoredX {
    const void* data;
    int storage;
    int64_t K;
    float* buffers;  // K floats per thread, for 16-bit storage
    const float* row(int64_t m) const {
        if (storage == FLOAT32) return static_cast<const float*>(data) + m * K;
        float* buffer = buffers + omp_get_thread_num() * K;
        widen(static_cast<const uint16_t*>(data) + m * K, storage, K, buffer);
        return buffer;
    }
};

// StoredX's per-thread row buffers: K floats for each of `threads` threads where x is stored in 16 bits.
INLINE std::unique_ptr<float[], Free> row_buffers(int storage, int threads, int64_t K) {
    if (storage == FLOAT32) return nullptr;
    return aligned_workspace<float>(std::max(threads, 1) * K);
}

// All of x as float32: x itself, or a 16-bit x widened into `widened` (shared among the threads in blocks).
INLINE const float* all_float32(const void* x, int storage, int64_t M, int64_t K, int threads,
                                std::unique_ptr<float[], Free>& widened) {
    if (storage == FLOAT32) return static_cast<const float*>(x);
    constexpr int64_t BLOCK = 1 << 16;
    const int64_t count = M * K;
    widened = aligned_workspace<float>(count);
    float* out = widened.get();
    parallel_for(0, count, BLOCK, count > BLOCK ? threads : 1, [&](int64_t i) {
        widen(static_cast<const uint16_t*>(x) + i, storage, std::min(BLOCK, count - i), out + i);
    });
    return out;
}

}  // namespace quanto_fx_cpu
