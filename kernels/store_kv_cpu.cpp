// trellis::store_kv on CPU (registered as trellis_cpp::store_kv): copy each new token's K/V rows
// [Hkv, D] into its cache slot. A plain byte copy, so every dtype works; slots are checked
// against the cache size.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "kv_cache_layout.h"

namespace trellis {
namespace {

// Rows of one token: `src` [T, Hkv, D] (head_dim contiguous) -> cache slot `slot`.
void copy_token(const at::Tensor& src, int64_t t, char* cache, int64_t slot) {
  const int64_t heads = src.size(1), row_bytes = src.size(2) * src.element_size();
  const char* base = static_cast<const char*>(src.const_data_ptr()) + t * src.stride(0) * src.element_size();
  char* dst = cache + slot * heads * row_bytes;
  if (src.stride(1) == src.size(2)) {  // heads adjacent: one copy for the token
    std::memcpy(dst, base, heads * row_bytes);
    return;
  }
  for (int64_t h = 0; h < heads; ++h) {
    std::memcpy(dst + h * row_bytes, base + h * src.stride(1) * src.element_size(), row_bytes);
  }
}

void store_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  check_kv_cache(k_cache, v_cache);
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), "k and v must both be [T, Hkv, D], got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), "k heads/dim ", k.sizes().slice(1),
              " != cache ", k_cache.sizes().slice(2));
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(), "k/v dtypes ",
              k.scalar_type(), "/", v.scalar_type(), " != cache dtype ", k_cache.scalar_type());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0),
              "slot_mapping must be int64 [T]");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && slot_mapping.device().is_cpu(),
              "store_kv tensors must all be on the CPU");
  // Rows need a contiguous head_dim; anything else (rare) is copied once here.
  const at::Tensor kc = k.stride(2) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(2) == 1 ? v : v.contiguous();
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, k.size(1) * k.size(2) * k.element_size()));
  at::parallel_for(0, k.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot_mapping[", t, "] = ", slot[t], " is outside the cache (",
                  num_slots, " slots)");
      copy_token(kc, t, k_dst, slot[t]);
      copy_token(vc, t, v_dst, slot[t]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(trellis_cpp, CPU, m) { m.impl("store_kv", &store_kv_cpu); }

}  // namespace trellis
