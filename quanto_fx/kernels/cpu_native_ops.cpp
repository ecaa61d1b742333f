// CPU kernels of the weight-only ops (quanto_fx::int8_weight_mm, lowbit_weight_mm, float8_weight_mm) and of
// the dynamic-activation ones (int8_dynamic_mm, float8_dynamic_mm) registered with torch's dispatcher, for the
// calls the C++ kernels of cpu_vnni_mm.cpp / cpu_float8_mm.cpp serve as they are. Built with torch's headers
// and loaded by cpu_vnni_mm.py; see its docstring.
//
// Why: the ops' Python implementations (weight_only.py) reach the same kernels, but on a small layer at M = 1
// (384 x 1536: ~35 us in fp32) the dispatcher's round trip into Python, the argument checks and the ctypes
// call cost ~14 us, more than the kernels take. Here a call costs ~2 us above its kernel.
//
// Every call these do not take exactly as they are (another dtype, device or shape, a switched-off kernel, x
// holding a NaN or an infinity, a workspace that cannot be allocated) goes to the Python implementation,
// registered as the ops' CompositeExplicitAutograd kernel, which checks its arguments, raises the errors,
// and computes every other case: one definition of the ops' behaviour; this file only takes the common case
// off its path. cpu_vnni_mm.py registers these kernels after loading the library (quanto_native_register),
// with the limits the kernels take, written once on the Python side.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>

#include "cpu_simd.h"

extern "C" int quanto_weight_mm(int bits, int x_storage, const void* x, int64_t M, int64_t K, const uint8_t* weight,
                                int64_t N, const float* scales, int64_t G, const float* bias, float* out, int threads);
extern "C" int quanto_dynamic_int8_mm(int precision, int x_storage, const void* x, int64_t M, int64_t K,
                                      const int8_t* weight, int64_t N, const float* scales, const float* bias,
                                      float* out, int threads);
extern "C" int quanto_float8_weight_mm(int format, int x_storage, const void* x, int64_t M, int64_t K,
                                       const uint8_t* weight, int64_t N, const float* scale, const float* bias,
                                       float* out, int threads);
extern "C" int quanto_float8_dynamic_mm(int x_format, int w_format, int precision, int x_storage, const void* x,
                                        int64_t M, int64_t K, const uint8_t* weight, int64_t N, const float* scale,
                                        const float* bias, float* out, int threads);

namespace {

struct Limits {  // the constants of cpu_vnni_mm.py, cpu_float8_mm.py and groupwise.py
    int64_t int8_max_m, chunk_bytes, word_bytes, max_in_features, min_group_size;
    int64_t float8_max_in_features, dynamic_int8_max_in_features, int_mm_min_weight_bytes;
};
Limits limits;
std::atomic<bool> registered{false};  // published after `limits`: a kernel never reads them half-written

bool enabled() {
    const char* value = std::getenv("QUANTO_FX_CPU_KERNELS");
    return registered.load(std::memory_order_acquire) && !(value && std::strcmp(value, "0") == 0);
}

// Whether the VNNI kernels serve int8 weights (N, K) at M rows, as cpu_vnni_mm.int8_uses_int_mm decides: past
// int8_max_m rows, weights of int_mm_min_weight_bytes or more go to torch._int_mm, in the Python implementation.
bool vnni_takes_int8(int64_t M, int64_t K, int64_t N) {
    return M <= limits.int8_max_m || K * N < limits.int_mm_min_weight_bytes;
}

bool is_float(const at::Tensor& t) {
    const auto dtype = t.scalar_type();
    return t.is_cpu() && (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16);
}

// x (M, K) and a (N,)-element scale and optional (N,) bias, all float CPU tensors.
bool takes_x_scale_bias(const at::Tensor& x, int64_t K, const at::Tensor& scale, int64_t scale_numel,
                        const std::optional<at::Tensor>& bias, int64_t N) {
    if (!is_float(x) || x.dim() != 2 || x.size(1) != K || !is_float(scale) || scale.numel() != scale_numel)
        return false;
    return !bias.has_value() || (is_float(*bias) && bias->dim() == 1 && bias->size(0) == N);
}

// The dtype whose arithmetic the dynamic kernels reproduce as they quantize x (Precision in cpu_simd.h): torch
// computes a 16-bit x's scales and quotients in its own dtype.
int precision(const at::Tensor& t) {
    return t.scalar_type() == at::kHalf ? 1 : t.scalar_type() == at::kBFloat16 ? 2 : 0;
}

// Conversions of 16-bit arrays in chunks that threads share past this many values.
constexpr int64_t CONVERSION_GRAIN = 1 << 16;

// A float tensor's values as contiguous float32 (the scales and the bias): its own data where it is float32 and
// contiguous, else a copy, converted here from float16 / bfloat16 (exactly) rather than by Tensor::to: a
// dispatcher call and an allocation of ~1 us each, and a 16-bit model's call had converted x, the scales, the
// bias and the output (3-4 us on a 128 x 64 layer whose kernel takes 3).
class Float32 {
   public:
    explicit Float32(const at::Tensor& t)
        : kept_(t.contiguous()),
          data_(quanto_fx_cpu::all_float32(kept_.data_ptr(), precision(t), 1, t.numel(), at::get_num_threads(),
                                           copy_)) {}
    const float* get() const { return data_; }

   private:
    at::Tensor kept_;
    std::unique_ptr<float[], quanto_fx_cpu::Free> copy_;  // declared before data_, whose initializer fills it
    const float* data_;
};

// The op's Python implementation (its CompositeExplicitAutograd kernel) on the same arguments.
at::Tensor python_implementation(const c10::OperatorHandle& op, std::vector<c10::IValue> arguments) {
    torch::jit::Stack stack(std::move(arguments));
    op.callBoxedForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd, stack);
    return stack.back().toTensor();
}

c10::OperatorHandle handle(const char* name) {  // looked up once per op: a static in each caller
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// The C++ kernels' result in x's dtype (a 16-bit one rounded as Tensor::to rounds it), or nullopt when they
// returned a status (1: x not finite or too small to scale; 2: no workspace) for the Python implementation to
// handle. The kernel gets x's own contiguous values (precision(x) says their dtype): the kernels widen a 16-bit x
// a row at a time.
template <class Kernel>
std::optional<at::Tensor> run(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias,
                              Kernel kernel) {
    const int64_t M = x.size(0);
    const at::Tensor x_stored = x.contiguous();
    std::optional<Float32> bias32;
    if (bias) bias32.emplace(*bias);
    const at::Tensor out = at::empty({M, N}, x.options());
    const bool narrow = x.scalar_type() != at::kFloat;
    std::unique_ptr<float[], quanto_fx_cpu::Free> out32;
    if (narrow) out32 = quanto_fx_cpu::aligned_workspace<float>(M * N);
    float* out_data = narrow ? out32.get() : out.data_ptr<float>();
    const float* bias_data = bias32 ? bias32->get() : nullptr;
    if (kernel(x_stored.data_ptr(), bias_data, out_data, at::get_num_threads())) return std::nullopt;
    if (narrow) {
        auto* out16 = static_cast<uint16_t*>(out.data_ptr());
        at::parallel_for(0, M * N, CONVERSION_GRAIN, [&](int64_t begin, int64_t end) {
            quanto_fx_cpu::narrow(out_data + begin, precision(x), end - begin, out16 + begin);
        });
    }
    return out;
}

at::Tensor int8_weight_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                          const std::optional<at::Tensor>& bias) {
    const int64_t N = w.dim() == 2 ? w.size(0) : 0, K = w.dim() == 2 ? w.size(1) : 0;
    if (enabled() && w.is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2 &&
        takes_x_scale_bias(x, K, scale, N, bias, N) && vnni_takes_int8(x.size(0), K, N) && K > 0 &&
        K <= limits.max_in_features && K % limits.chunk_bytes == 0) {
        const at::Tensor w_ = w.contiguous();
        const Float32 scale32(scale);
        auto out = run(x, N, bias, [&](const void* xd, const float* bd, float* od, int threads) {
            const auto* w8 = reinterpret_cast<const uint8_t*>(w_.data_ptr<int8_t>());
            return quanto_weight_mm(8, precision(x), xd, x.size(0), K, w8, N, scale32.get(), 1, bd, od, threads);
        });
        if (out) return *out;
    }
    static const c10::OperatorHandle op = handle("quanto_fx::int8_weight_mm");
    return python_implementation(op, {x, w, scale, bias});
}

at::Tensor int8_dynamic_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias) {
    const int64_t N = w.dim() == 2 ? w.size(0) : 0, K = w.dim() == 2 ? w.size(1) : 0;
    if (enabled() && w.is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2 &&
        takes_x_scale_bias(x, K, w_scale, N, bias, N) && x.size(0) > 0 && vnni_takes_int8(x.size(0), K, N) && K > 0 &&
        K <= limits.dynamic_int8_max_in_features && K % limits.chunk_bytes == 0) {
        const at::Tensor w_ = w.contiguous();
        const Float32 scale32(w_scale);
        auto out = run(x, N, bias, [&](const void* xd, const float* bd, float* od, int threads) {
            return quanto_dynamic_int8_mm(precision(x), precision(x), xd, x.size(0), K, w_.data_ptr<int8_t>(), N,
                                          scale32.get(), bd, od, threads);
        });
        if (out) return *out;
    }
    static const c10::OperatorHandle op = handle("quanto_fx::int8_dynamic_mm");
    return python_implementation(op, {x, w, w_scale, bias});
}

at::Tensor lowbit_weight_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zeros,
                            const std::optional<at::Tensor>& kernel_layout, int64_t bits, int64_t group_size,
                            const std::optional<at::Tensor>& bias) {
    const int64_t N = packed.dim() == 2 ? packed.size(0) : 0, per_byte = bits == 2 || bits == 4 ? 8 / bits : 0;
    const int64_t K = packed.dim() == 2 ? packed.size(1) * per_byte : 0;
    const bool groups = per_byte && group_size >= limits.min_group_size && (group_size & (group_size - 1)) == 0 &&
                        K % group_size == 0 && group_size * bits % 8 == 0;  // as groupwise.check_group_size
    const int64_t group_bytes = groups ? group_size * bits / 8 : 0, G = groups ? K / group_size : 0;
    if (enabled() && groups && group_bytes % limits.word_bytes == 0 && K > 0 && K <= limits.max_in_features &&
        packed.is_cpu() && packed.scalar_type() == at::kByte && scale_zeros.dim() == 3 &&
        scale_zeros.size(0) == G && scale_zeros.size(1) == N &&
        takes_x_scale_bias(x, K, scale_zeros, G * N * 2, bias, N)) {
        const at::Tensor packed_ = packed.contiguous();
        const Float32 scales32(scale_zeros);
        auto out = run(x, N, bias, [&](const void* xd, const float* bd, float* od, int threads) {
            return quanto_weight_mm((int)bits, precision(x), xd, x.size(0), K, packed_.data_ptr<uint8_t>(), N,
                                    scales32.get(), G, bd, od, threads);
        });
        if (out) return *out;
    }
    static const c10::OperatorHandle op = handle("quanto_fx::lowbit_weight_mm");
    return python_implementation(op, {x, packed, scale_zeros, kernel_layout, bits, group_size, bias});
}

at::Tensor float8_weight_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias) {
    const int64_t N = w.dim() == 2 ? w.size(0) : 0, K = w.dim() == 2 ? w.size(1) : 0;
    const auto format = w.scalar_type();
    if (enabled() && w.is_cpu() && (format == at::kFloat8_e4m3fn || format == at::kFloat8_e5m2) && w.dim() == 2 &&
        takes_x_scale_bias(x, K, scale, N, bias, N) && K > 0 && K <= limits.float8_max_in_features) {
        const at::Tensor w_ = w.contiguous();
        const Float32 scale32(scale);
        auto out = run(x, N, bias, [&](const void* xd, const float* bd, float* od, int threads) {
            return quanto_float8_weight_mm(format == at::kFloat8_e4m3fn ? 0 : 1, precision(x), xd, x.size(0), K,
                                           static_cast<const uint8_t*>(w_.data_ptr()), N, scale32.get(),
                                           bd, od, threads);
        });
        if (out) return *out;
    }
    static const c10::OperatorHandle op = handle("quanto_fx::float8_weight_mm");
    return python_implementation(op, {x, w, scale, bias});
}

int float8_format(at::ScalarType dtype) {  // cpu_float8_mm.FORMATS; -1: not float8
    return dtype == at::kFloat8_e4m3fn ? 0 : dtype == at::kFloat8_e5m2 ? 1 : -1;
}

at::Tensor float8_dynamic_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                             const std::optional<at::Tensor>& bias, at::ScalarType x_dtype) {
    const int64_t N = w.dim() == 2 ? w.size(0) : 0, K = w.dim() == 2 ? w.size(1) : 0;
    const int x_format = float8_format(x_dtype), w_format = float8_format(w.scalar_type());
    if (enabled() && w.is_cpu() && x_format >= 0 && w_format >= 0 && w.dim() == 2 &&
        takes_x_scale_bias(x, K, w_scale, N, bias, N) && x.size(0) > 0 && K > 0 &&
        K <= limits.float8_max_in_features) {
        const at::Tensor w_ = w.contiguous();
        const Float32 scale32(w_scale);
        auto out = run(x, N, bias, [&](const void* xd, const float* bd, float* od, int threads) {
            return quanto_float8_dynamic_mm(x_format, w_format, precision(x), precision(x), xd, x.size(0), K,
                                            static_cast<const uint8_t*>(w_.data_ptr()), N, scale32.get(),
                                            bd, od, threads);
        });
        if (out) return *out;
    }
    static const c10::OperatorHandle op = handle("quanto_fx::float8_dynamic_mm");
    return python_implementation(op, {x, w, w_scale, bias, x_dtype});
}

}  // namespace

extern "C" {

// Register the kernels above for the ops' CPU dispatch key, with the limits the C++ kernels take. Returns 0,
// or 1 when torch refuses the registration (e.g. a schema that no longer matches these signatures; the
// message is in `error`, `error_size` bytes at most), the ops then keeping their Python implementations.
int quanto_native_register(int64_t int8_max_m, int64_t chunk_bytes, int64_t word_bytes, int64_t max_in_features,
                           int64_t min_group_size, int64_t float8_max_in_features,
                           int64_t dynamic_int8_max_in_features, int64_t int_mm_min_weight_bytes, char* error,
                           int64_t error_size) try {
    static std::unique_ptr<torch::Library> library;
    if (library) return 0;
    limits = {int8_max_m,           chunk_bytes,           word_bytes, max_in_features, min_group_size,
              float8_max_in_features, dynamic_int8_max_in_features, int_mm_min_weight_bytes};
    // Kept only once complete: a registration that fails half-way is undone as its Library is destroyed.
    auto candidate = std::make_unique<torch::Library>(torch::Library::IMPL, "quanto_fx", c10::DispatchKey::CPU,
                                                      __FILE__, __LINE__);
    candidate->impl("int8_weight_mm", &int8_weight_mm);
    candidate->impl("lowbit_weight_mm", &lowbit_weight_mm);
    candidate->impl("float8_weight_mm", &float8_weight_mm);
    candidate->impl("int8_dynamic_mm", &int8_dynamic_mm);
    candidate->impl("float8_dynamic_mm", &float8_dynamic_mm);
    library = std::move(candidate);
    registered.store(true, std::memory_order_release);
    return 0;
} catch (const std::exception& failure) {
    std::snprintf(error, error_size, "%s", failure.what());
    return 1;
}
}
