// The CPU's bf16 dot-product units, where the build can use them: AMX tiles (Sapphire Rapids on)
// and AVX512_BF16's vdpbf16ps (Cooper Lake, Zen 4 on). Both multiply bf16 pairs exactly and add
// in fp32; inputs and results below fp32's normal range are flushed to zero.
#pragma once

// AVX-512 builds on Linux (which grants a process tile data on request) with a compiler that has
// the intrinsics (GCC 11, clang 12 on).
#if defined(CPU_CAPABILITY_AVX512) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define TRELLIS_BF16_DOTS 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace trellis {

inline bool dpbf16_usable() {
  static const bool usable = __builtin_cpu_supports("avx512bf16");
  return usable;
}

// AMX-BF16 present, and the kernel lets this process use tile data (Linux asks every process to
// request it once).
inline bool amx_bf16_usable() {
  static const bool usable = [] {
    if (!__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

}  // namespace trellis
#endif
