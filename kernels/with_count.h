// A runtime count turned into a compile-time one, for kernels unrolled over a few rows or registers.
#pragma once

#include <cstdint>
#include <type_traits>

namespace trellis {

// Calls f(std::integral_constant<int, R>{}) for the runtime count 1 <= r <= Max.
template <int Max, typename F>
inline void with_count(int64_t r, const F& f) {
  if constexpr (Max > 1) {
    if (r < Max) return with_count<Max - 1>(r, f);
  }
  f(std::integral_constant<int, Max>{});
}

}  // namespace trellis
