// The small ops of a Llama decoder layer, fused, on CPU (registered as trellis_cpp::add_rms_norm,
// trellis_cpp::rope_store_kv and trellis_cpp::silu_mul; trellis/ops/reference.py is the spec).
// Each replaces a chain of ATen ops (RMSNorm alone is six), and so that many dispatcher calls and
// OpenMP regions, in every layer of a decode step, where a row is a few hundred values.
//
// The arithmetic follows transformers' Llama modules step by step, rounding to the storage dtype
// where they do (bf16 and fp16: every op's result; fp32 math in between). The extension is built
// without floating-point contraction (cpp.py), so a product and a sum round apart, as ATen's
// separate ops do. In fp32 the RMSNorm's mean of squares is ATen's own reduction too, so fp32
// results are transformers' bit for bit; in bf16 and fp16 the kernel sums the squares in its own
// order (a difference far below those dtypes' rounding).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kv_cache_layout.h"

namespace trellis {
namespace {

using Vec = at::vec::Vectorized<float>;

// The dtypes the ops take (check_dtype): fp32, bf16, fp16.
#define TRELLIS_DISPATCH_DTYPES(TYPE, NAME, ...)                                             \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                   \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// x as the storage dtype T would hold it (a no-op for float).
template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// The same three for a whole vector: Vec::size() values of T as floats, a vector rounded to T
// and back, and a vector stored as T. Every loop below runs these over whole vectors and its
// scalar twin over the tail; the two round alike (round to nearest even).
template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec x;
    at::vec::load_to_float(p, x);
    return x;
  }
}

template <typename T>
inline Vec round_vec(const Vec& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(x, x)));
  }
}

template <typename T>
inline void store_as(T* p, const Vec& x) {
  if constexpr (std::is_same_v<T, float>) {
    x.store(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    // The converted half as one 32-byte store. at::vec's partial store is a masked 64-byte store,
    // and a load from the next 32 bytes (the next vector of a row updated in place) then waits
    // for it to retire: it made the bf16 residual add ~3x slower.
    const __m512i both = at::vec::convert_from_float<T>(x, x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(both));
#else
    at::vec::convert_from_float<T>(x, x).store(p, Vec::size());
#endif
  }
}

// A per-thread fp32 row buffer of at least n floats, kept across calls.
float* scratch(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// Rows per parallel task: about `bytes_per_task` of work each, so that a decode step's single
// row (or a few) runs on the calling thread and never wakes the pool.
int64_t grain_for(int64_t row_bytes, int64_t bytes_per_task = 64 << 10) {
  return std::max<int64_t>(1, bytes_per_task / std::max<int64_t>(1, row_bytes));
}

void check_dtype(const char* op, const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
                   " must be float32, bfloat16 or float16, got ", dtype);
}

void check_rows(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be [T, H], got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " must have a contiguous last dim");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

// --- add_rms_norm -------------------------------------------------------------------------------

// mean(x^2) over a row of n floats, summed in SIMD lanes, then across them.
inline float mean_of_squares(const float* x, int64_t n) {
  Vec squares(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    squares = squares + v * v;
  }
  if (i < n) {
    const Vec v = Vec::loadu(x + i, n - i);  // the lanes past n load as 0
    squares = squares + v * v;
  }
  float lanes[Vec::size()];
  squares.store(lanes);
  float sum = 0.0f;
  for (const float lane : lanes) sum += lane;
  return sum / static_cast<float>(n);
}

// transformers' LlamaRMSNorm of one row, after `stream += update` (rounded to T, as `residual +
// hidden_states` is): weight * T(x * rsqrt(mean(x^2) + eps)), x = stream in fp32. `mean_square`
// is the row's mean of x^2 when the caller has it (fp32: ATen's), else the row sums it here.
template <typename T>
void norm_row(T* stream, const T* update, const T* weight, T* out, int64_t h, float eps,
              const float* mean_square) {
  float* x = scratch(h);
  int64_t i = 0;
  for (; i + Vec::size() <= h; i += Vec::size()) {
    Vec value = load_float(stream + i);
    if (update != nullptr) {
      value = round_vec<T>(value + load_float(update + i));
      store_as(stream + i, value);
    }
    value.store(x + i);
  }
  for (; i < h; ++i) {
    float value = static_cast<float>(stream[i]);
    if (update != nullptr) {
      value = round_to<T>(value + static_cast<float>(update[i]));
      stream[i] = static_cast<T>(value);
    }
    x[i] = value;
  }
  const float inv_rms = 1.0f / std::sqrt((mean_square != nullptr ? *mean_square : mean_of_squares(x, h)) + eps);
  const Vec inv(inv_rms);
  int64_t j = 0;
  for (; j + Vec::size() <= h; j += Vec::size()) {
    store_as(out + j, load_float(weight + j) * round_vec<T>(Vec::loadu(x + j) * inv));
  }
  for (; j < h; ++j) {
    out[j] = static_cast<T>(static_cast<float>(weight[j]) * round_to<T>(x[j] * inv_rms));
  }
}

// In fp32: `stream += update` and the squares of every row first, then ATen's sum of each row's
// squares (the reduction of transformers' `pow(2).mean(-1)`, in its order; ATen's mean is that sum
// divided by the row length, as here), then each row normalised. One ATen call, where
// `add_`, `pow` and `mean` took four dispatches and three allocations.
void add_rms_norm_fp32(const at::Tensor& stream, const std::optional<at::Tensor>& update, const at::Tensor& w,
                       at::Tensor& out, double eps) {
  const int64_t rows = stream.size(0), h = stream.size(1), grain = grain_for(h * sizeof(float));
  float* x = stream.data_ptr<float>();
  const float* u = update.has_value() ? update->const_data_ptr<float>() : nullptr;
  const int64_t x_stride = stream.stride(0), u_stride = update.has_value() ? update->stride(0) : 0;
  at::Tensor squares = at::empty({rows, h}, stream.options());
  float* sq = squares.data_ptr<float>();
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = x + r * x_stride;
      const float* add = u == nullptr ? nullptr : u + r * u_stride;
      float* squared = sq + r * h;
      int64_t i = 0;
      for (; i + Vec::size() <= h; i += Vec::size()) {
        Vec value = Vec::loadu(row + i);
        if (add != nullptr) {
          value = value + Vec::loadu(add + i);
          value.store(row + i);
        }
        (value * value).store(squared + i);
      }
      for (; i < h; ++i) {
        if (add != nullptr) row[i] += add[i];
        squared[i] = row[i] * row[i];
      }
    }
  });
  const at::Tensor sums = squares.sum(-1);  // [rows], contiguous
  const float* s = sums.const_data_ptr<float>();
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float mean_square = s[r] / static_cast<float>(h);
      norm_row<float>(x + r * x_stride, nullptr, w.const_data_ptr<float>(), out.data_ptr<float>() + r * h, h,
                      static_cast<float>(eps), &mean_square);
    }
  });
}

at::Tensor add_rms_norm_cpu(const at::Tensor& stream, const std::optional<at::Tensor>& update,
                            const at::Tensor& weight, double eps) {
  constexpr const char* op = "add_rms_norm";
  check_rows(op, stream, "x");
  check_dtype(op, stream, "x");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == stream.size(1), op, ": weight must be [",
                    stream.size(1), "], got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == stream.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
                   " != x dtype ", stream.scalar_type());
  TORCH_CHECK_VALUE(weight.device().is_cpu(), op, ": weight must be a CPU tensor");
  if (update.has_value()) {
    check_rows(op, *update, "residual");
    TORCH_CHECK_VALUE(update->sizes() == stream.sizes(), op, ": residual ", update->sizes(), " != x ",
                      stream.sizes());
    TORCH_CHECK_TYPE(update->scalar_type() == stream.scalar_type(), op, ": residual dtype ",
                     update->scalar_type(), " != x dtype ", stream.scalar_type());
    TORCH_CHECK_VALUE(at::has_internal_overlap(stream) != at::MemOverlap::Yes, op, ": x is updated in place, and "
                      "more than one element of it refers to a single memory location (an expanded tensor)");
    // A residual that is x itself is read before each write; one that overlaps x in part would
    // read rows already updated.
    TORCH_CHECK_VALUE(at::get_overlap_status(stream, *update) != at::MemOverlapStatus::Partial, op,
                      ": residual and x overlap in part (x is updated in place): pass separate tensors");
  }
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(stream.sizes(), stream.options());
  if (stream.scalar_type() == at::kFloat) {
    add_rms_norm_fp32(stream, update, w, out, eps);
    return out;
  }
  const int64_t rows = stream.size(0), h = stream.size(1);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(stream.scalar_type(), "add_rms_norm", [&] {
    scalar_t* x = stream.data_ptr<scalar_t>();
    const scalar_t* u = update.has_value() ? update->const_data_ptr<scalar_t>() : nullptr;
    const int64_t x_stride = stream.stride(0), u_stride = update.has_value() ? update->stride(0) : 0;
    at::parallel_for(0, rows, grain_for(h * stream.element_size()), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        norm_row(x + r * x_stride, u == nullptr ? nullptr : u + r * u_stride, w.const_data_ptr<scalar_t>(),
                 out.data_ptr<scalar_t>() + r * h, h, static_cast<float>(eps), nullptr);
      }
    });
  });
  return out;
}

// --- rope_store_kv ------------------------------------------------------------------------------

// One head's row rotated as transformers' apply_rotary_pos_emb does: x * cos + rotate_half(x) * sin,
// rotate_half(x) = cat(-x[D/2:], x[:D/2]); each product and the sum rounded to T.
template <typename T>
inline void rotate_row(const T* x, const T* cos, const T* sin, T* out, int64_t d) {
  const int64_t half = d / 2;
  // Elements [begin, end) pair with those `offset` away: -x[i + half] in the first half, x[i - half] after.
  auto rotate = [&](int64_t begin, int64_t end, int64_t offset, bool negate) {
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const Vec partner = load_float(x + i + offset);
      const Vec a = round_vec<T>(load_float(x + i) * load_float(cos + i));
      const Vec b = round_vec<T>((negate ? partner.neg() : partner) * load_float(sin + i));
      store_as(out + i, a + b);
    }
    for (; i < end; ++i) {
      const float partner = static_cast<float>(x[i + offset]);
      const float a = round_to<T>(static_cast<float>(x[i]) * static_cast<float>(cos[i]));
      const float b = round_to<T>((negate ? -partner : partner) * static_cast<float>(sin[i]));
      out[i] = static_cast<T>(a + b);
    }
  };
  rotate(0, half, half, true);
  rotate(half, d, -half, false);
}

at::Tensor rope_store_kv_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                             const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& slot_mapping) {
  constexpr const char* op = "rope_store_kv";
  check_kv_cache(k_cache, v_cache);
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes(), op,
                    ": q must be [T, Hq, D] and k, v both [T, Hkv, D], got ", q.sizes(), ", ", k.sizes(), ", ",
                    v.sizes());
  const int64_t tokens = q.size(0), q_heads = q.size(1), kv_heads = k.size(1), d = q.size(2);
  TORCH_CHECK_VALUE(k.size(0) == tokens && k.size(2) == d, op, ": k ", k.sizes(), " does not fit q ", q.sizes());
  TORCH_CHECK_VALUE(d % 2 == 0, op, ": head_dim ", d, " must be even");
  TORCH_CHECK_VALUE(kv_heads == k_cache.size(2) && d == k_cache.size(3), op, ": k heads/dim ", k.sizes().slice(1),
                    " != cache ", k_cache.sizes().slice(2));
  TORCH_CHECK_VALUE(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == tokens && cos.size(1) == d, op,
                    ": cos and sin must both be [", tokens, ", ", d, "], got ", cos.sizes(), ", ", sin.sizes());
  TORCH_CHECK_VALUE(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                        slot_mapping.size(0) == tokens,
                    op, ": slot_mapping must be int64 [T]");
  check_dtype(op, q, "q");
  for (const at::Tensor* t : {&k, &v, &cos, &sin, &k_cache}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": q, k, v, cos, sin and the caches must share a dtype, ",
                     "got ", t->scalar_type(), " beside q's ", q.scalar_type());
  }
  for (const at::Tensor* t : {&q, &k, &v, &cos, &sin, &slot_mapping}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": tensors must all be on the CPU");
  }
  // Rows are read with a contiguous head_dim and adjacent heads (a projection's output viewed as
  // [T, H, D], or a column slice of a fused one); anything else is copied once here.
  auto rows = [](const at::Tensor& t) { return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous(); };
  const at::Tensor qc = rows(q), kc = rows(k), vc = rows(v), cc = cos.contiguous(), sc = sin.contiguous();
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  at::Tensor q_out = at::empty({tokens, q_heads, d}, q.options());
  TRELLIS_DISPATCH_DTYPES(q.scalar_type(), "rope_store_kv", [&] {
    const int64_t row_bytes = (q_heads + 2 * kv_heads) * d * static_cast<int64_t>(sizeof(scalar_t));
    at::parallel_for(0, tokens, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        TORCH_CHECK_VALUE(slot[t] >= 0 && slot[t] < num_slots, "slot_mapping[", t, "] = ", slot[t],
                          " is outside the cache (", num_slots, " slots)");
        const scalar_t* c = cc.const_data_ptr<scalar_t>() + t * d;
        const scalar_t* s = sc.const_data_ptr<scalar_t>() + t * d;
        const scalar_t* qt = qc.const_data_ptr<scalar_t>() + t * qc.stride(0);
        for (int64_t h = 0; h < q_heads; ++h) {
          rotate_row(qt + h * d, c, s, q_out.data_ptr<scalar_t>() + (t * q_heads + h) * d, d);
        }
        const scalar_t* kt = kc.const_data_ptr<scalar_t>() + t * kc.stride(0);
        scalar_t* k_dst = k_cache.data_ptr<scalar_t>() + slot[t] * kv_heads * d;
        for (int64_t h = 0; h < kv_heads; ++h) rotate_row(kt + h * d, c, s, k_dst + h * d, d);
        const scalar_t* vt = vc.const_data_ptr<scalar_t>() + t * vc.stride(0);
        std::copy(vt, vt + kv_heads * d, v_cache.data_ptr<scalar_t>() + slot[t] * kv_heads * d);
      }
    });
  });
  return q_out;
}

// --- silu_mul -----------------------------------------------------------------------------------

// silu(gate) * up as LlamaMLP computes it: silu in fp32 (x / (1 + exp(-x))), rounded to T, times
// up, rounded to T. The row is split as ATen's elementwise loop splits it (pairs of vectors, then
// the scalar formula with std::exp for the rest), so each element takes the same exp as in F.silu
// (vectorised and scalar exp can differ in the last bit); F.silu sees a whole contiguous [T, n]
// as one run, so its rows split alike where n is a multiple of two vectors (every Llama's width).
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  float* g = scratch(n);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) load_float(gate + i).store(g + i);
  for (; i < n; ++i) g[i] = static_cast<float>(gate[i]);
  const Vec one(1.0f);
  const int64_t vectorized = n / (2 * Vec::size()) * (2 * Vec::size());  // whole pairs of vectors
  for (i = 0; i < vectorized; i += Vec::size()) {
    const Vec x = Vec::loadu(g + i);
    (x / (one + x.neg().exp())).store(g + i);
  }
  for (; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i]));
  for (i = 0; i + Vec::size() <= n; i += Vec::size()) {
    store_as(out + i, round_vec<T>(Vec::loadu(g + i)) * load_float(up + i));
  }
  for (; i < n; ++i) out[i] = static_cast<T>(round_to<T>(g[i]) * static_cast<float>(up[i]));
}

at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  constexpr const char* op = "silu_mul";
  check_rows(op, gate, "gate");
  check_rows(op, up, "up");
  check_dtype(op, gate, "gate");
  TORCH_CHECK_VALUE(gate.sizes() == up.sizes(), op, ": gate ", gate.sizes(), " != up ", up.sizes());
  TORCH_CHECK_TYPE(gate.scalar_type() == up.scalar_type(), op, ": gate dtype ", gate.scalar_type(), " != up dtype ",
                   up.scalar_type());
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  const int64_t rows = gate.size(0), n = gate.size(1);
  TRELLIS_DISPATCH_DTYPES(gate.scalar_type(), "silu_mul", [&] {
    at::parallel_for(0, rows, grain_for(3 * n * gate.element_size()), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        silu_mul_row(gate.const_data_ptr<scalar_t>() + r * gate.stride(0),
                     up.const_data_ptr<scalar_t>() + r * up.stride(0), out.data_ptr<scalar_t>() + r * n, n);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(trellis_cpp, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("rope_store_kv", &rope_store_kv_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
}

}  // namespace trellis
