// The paged KV cache contract shared by the CPU ops: one layer's k_cache / v_cache are
// [num_blocks, block_size, num_kv_heads, head_dim], contiguous, same shape and dtype.
#pragma once

#include <ATen/core/Tensor.h>

namespace trellis {

inline void check_kv_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, Hkv, D], got ", k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
              " shapes differ");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache dtypes differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu(), "k_cache and v_cache must be CPU tensors");
}

}  // namespace trellis
