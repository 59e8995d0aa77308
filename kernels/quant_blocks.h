// GGUF block formats (ggml's layout; trellis/ops/quant.py is the specification) and the
// dequantization of one block of 32 weights into fp32 registers: AVX-512, AVX2, or portable code.
//
// Per block, little-endian:  Q8_0  fp16 d, int8 q[32]           w_i = d * q_i          34 bytes
//                            Q4_0  fp16 d, nibbles[16]          w_i = d * (n_i - 8)    18 bytes
//                            Q4_1  fp16 d, fp16 m, nibbles[16]  w_i = d * n_i + m      20 bytes
//                            BF16  bf16 w[32]                   w_i (exact in fp32)    64 bytes
//                            F32   fp32 w[32]                   w_i                   128 bytes
// n_i is the low nibble of byte i for i < 16, the high nibble of byte i - 16 otherwise. The
// weights are those the reference dequantizes, except that the AVX-512 path fuses Q4_1's multiply
// and add (one rounding fewer; AVX2 and the portable code round twice, as the reference does, the
// builds compiling with -ffp-contract=off); the matmuls differ from it by summation order.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace trellis {
namespace quant {

// One SIMD register of floats and the few operations the kernels use. Native vector types, not
// at::vec::Vectorized: GCC keeps arrays of these in registers, but spills arrays of Vectorized
// accumulators to the stack at every step. The portable build runs on Vectorized.
#if defined(CPU_CAPABILITY_AVX512)
using Reg = __m512;
constexpr int kLanes = 16;
inline Reg load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
inline Reg splat(float x) { return _mm512_set1_ps(x); }
inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
inline Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
inline float sum(Reg v) { return _mm512_reduce_add_ps(v); }
#elif defined(CPU_CAPABILITY_AVX2)
using Reg = __m256;
constexpr int kLanes = 8;
inline Reg load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
inline Reg splat(float x) { return _mm256_set1_ps(x); }
inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
inline Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
inline float sum(Reg v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}
#else
using Reg = at::vec::Vectorized<float>;
constexpr int kLanes = Reg::size();
inline Reg load(const float* p) { return Reg::loadu(p); }
inline void store(float* p, Reg v) { v.store(p); }
inline Reg splat(float x) { return Reg(x); }
inline Reg fmadd(Reg a, Reg b, Reg c) { return at::vec::fmadd(a, b, c); }
inline Reg add(Reg a, Reg b) { return a + b; }
inline float sum(Reg v) {
  float lanes[kLanes];
  v.store(lanes);
  float total = 0.0f;
  for (float lane : lanes) total += lane;
  return total;
}
#endif

// A hint to fetch the cache line at `p` into L2 (prefetcht1); never faults, whatever the address.
// Streamed weights are read once, so L1 is left to x. Against the L1 hint (prefetcht0), alternated
// runs at 5632x2048, one row, 2 threads on the AMD EPYC are within its noise: Q8_0 faster in 3 of
// 4 pairs (up to 1.46x), Q4_0 in 6 of 12 (0.66-1.30x).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

enum class QType { Q8_0, Q4_0, Q4_1, BF16, F32 };

// The formats of scaled integers (the others are plain floats).
constexpr bool block_quantized(QType q) { return q == QType::Q8_0 || q == QType::Q4_0 || q == QType::Q4_1; }

constexpr int kBlock = 32;                             // weights per block, in every format
constexpr int kBlockRegs = kBlock / kLanes;           // registers per block: 2 (AVX-512), 4 (AVX2, portable)

constexpr int64_t block_bytes(QType q) {
  return q == QType::Q8_0 ? 34 : q == QType::Q4_0 ? 18 : q == QType::Q4_1 ? 20 : q == QType::BF16 ? 64 : 128;
}

// fp16 -> fp32 through a table of every half's value (256 KB, of which a layer's scales touch a
// few KB), as llama.cpp does: a scalar load, which the broadcast of a scale rides on, where F16C
// moves the bits into a vector register, converts and broadcasts (three vector uops per block).
struct Fp16Table {
  float value[1 << 16];
  Fp16Table() {
    for (uint32_t bits = 0; bits < (1u << 16); ++bits) {
#ifdef __F16C__
      value[bits] = _cvtsh_ss(static_cast<unsigned short>(bits));
#else
      value[bits] = c10::detail::fp16_ieee_to_fp32_value(static_cast<uint16_t>(bits));
#endif
    }
  }
};
inline const Fp16Table kFp16;

inline float fp16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return kFp16.value[bits];
}

// The 32 weights of one block, in order, into `w` (kBlockRegs registers).
template <QType Q>
inline void load_block(const uint8_t* block, Reg* w);

#if defined(CPU_CAPABILITY_AVX512)

template <>
inline void load_block<QType::Q8_0>(const uint8_t* block, Reg* w) {
  const __m512 d = _mm512_set1_ps(fp16_at(block));
  const __m128i* q = reinterpret_cast<const __m128i*>(block + 2);
  w[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))));
  w[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))));
}

// The 32 weights of a 4-bit block as table[n_i], where `table` holds the block's 16 possible
// weights w(0) .. w(15): vpermps picks lanes by the low 4 bits of each index, so bytes 0-15
// widened to int32 index the low nibbles and, shifted right by 4, the high ones: two permutes
// and one table per block, fewer instructions than masking, converting and scaling the nibbles,
// for the same values.
inline void nibble_weights(const uint8_t* qs, __m512 table, Reg* w) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  w[0] = _mm512_permutexvar_ps(bytes, table);
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
}

// 0 - offset, 1 - offset, ..., 15 - offset.
inline __m512 nibble_values(float offset) {
  return _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(offset));
}

template <>
inline void load_block<QType::Q4_0>(const uint8_t* block, Reg* w) {
  // d * (n - 8) is exact in fp32 (an 11-bit by 4-bit product).
  nibble_weights(block + 2, _mm512_mul_ps(_mm512_set1_ps(fp16_at(block)), nibble_values(8)), w);
}

template <>
inline void load_block<QType::Q4_1>(const uint8_t* block, Reg* w) {
  // d * n + m with one rounding (fused): within an ulp of the reference's d * n, then + m.
  nibble_weights(block + 4, _mm512_fmadd_ps(_mm512_set1_ps(fp16_at(block)), nibble_values(0),
                                            _mm512_set1_ps(fp16_at(block + 2))), w);
}

// A bf16 is the high half of the fp32 of the same value: widen each to 32 bits and shift.
template <>
inline void load_block<QType::BF16>(const uint8_t* block, Reg* w) {
  const __m256i* h = reinterpret_cast<const __m256i*>(block);
  w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(h)), 16));
  w[1] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(h + 1)), 16));
}

#elif defined(CPU_CAPABILITY_AVX2)

// Bytes 0-7 and 8-15 of `bytes` as int32 lanes, signed or not.
inline __m256i widen_lo(__m128i bytes, bool is_signed) {
  return is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
}
inline __m256i widen_hi(__m128i bytes, bool is_signed) { return widen_lo(_mm_unpackhi_epi64(bytes, bytes), is_signed); }

template <>
inline void load_block<QType::Q8_0>(const uint8_t* block, Reg* w) {
  const __m256 d = _mm256_set1_ps(fp16_at(block));
  const __m128i* q = reinterpret_cast<const __m128i*>(block + 2);
  for (int half = 0; half < 2; ++half) {
    const __m128i bytes = _mm_loadu_si128(q + half);
    w[2 * half] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(widen_lo(bytes, true)));
    w[2 * half + 1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(widen_hi(bytes, true)));
  }
}

// The 32 nibbles as int32 lanes, in weight order, minus `offset`.
inline void nibbles(const uint8_t* qs, int offset, __m256i* out) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m256i off = _mm256_set1_epi32(offset);
  out[0] = _mm256_sub_epi32(widen_lo(lo, false), off);
  out[1] = _mm256_sub_epi32(widen_hi(lo, false), off);
  out[2] = _mm256_sub_epi32(widen_lo(hi, false), off);
  out[3] = _mm256_sub_epi32(widen_hi(hi, false), off);
}

template <>
inline void load_block<QType::Q4_0>(const uint8_t* block, Reg* w) {
  const __m256 d = _mm256_set1_ps(fp16_at(block));
  __m256i q[4];
  nibbles(block + 2, 8, q);
  for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q[i]));
}

template <>
inline void load_block<QType::Q4_1>(const uint8_t* block, Reg* w) {
  const __m256 d = _mm256_set1_ps(fp16_at(block));
  const __m256 m = _mm256_set1_ps(fp16_at(block + 2));
  __m256i q[4];
  nibbles(block + 4, 0, q);
  for (int i = 0; i < 4; ++i) w[i] = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q[i])), m);
}

template <>
inline void load_block<QType::BF16>(const uint8_t* block, Reg* w) {
  const __m128i* h = reinterpret_cast<const __m128i*>(block);
  for (int i = 0; i < 4; ++i)
    w[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h + i)), 16));
}

#else  // portable: through a small buffer

template <QType Q>
inline void load_block(const uint8_t* block, Reg* w) {
  float out[kBlock];
  const float d = Q == QType::BF16 ? 0.0f : fp16_at(block);
  if constexpr (Q == QType::BF16) {
    for (int i = 0; i < kBlock; ++i) {
      uint16_t half;
      std::memcpy(&half, block + 2 * i, sizeof half);
      const uint32_t bits = static_cast<uint32_t>(half) << 16;
      std::memcpy(out + i, &bits, sizeof bits);
    }
  } else if constexpr (Q == QType::Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(block + 2);
    for (int i = 0; i < kBlock; ++i) out[i] = d * static_cast<float>(q[i]);
  } else {
    const uint8_t* qs = block + (Q == QType::Q4_0 ? 2 : 4);
    const float m = Q == QType::Q4_1 ? fp16_at(block + 2) : 0.0f;
    for (int i = 0; i < kBlock / 2; ++i) {
      const int lo = qs[i] & 0x0F, hi = qs[i] >> 4;
      if constexpr (Q == QType::Q4_0) {
        out[i] = d * static_cast<float>(lo - 8);
        out[i + kBlock / 2] = d * static_cast<float>(hi - 8);
      } else {
        out[i] = d * static_cast<float>(lo) + m;
        out[i + kBlock / 2] = d * static_cast<float>(hi) + m;
      }
    }
  }
  for (int i = 0; i < kBlockRegs; ++i) w[i] = load(out + i * kLanes);
}

#endif

// fp32 weights are read as they are (the portable build's general template does not handle them).
template <>
inline void load_block<QType::F32>(const uint8_t* block, Reg* w) {
  const float* values = reinterpret_cast<const float*>(block);
  for (int i = 0; i < kBlockRegs; ++i) w[i] = load(values + i * kLanes);
}

}  // namespace quant
}  // namespace trellis
