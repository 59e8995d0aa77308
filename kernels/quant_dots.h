// x rounded to 8-bit blocks, and integer dot products of such a block with a weight block
// (quant_linear's quantize_x; trellis/ops/quant.py's round_to_q8 is the specification).
//
// A block of 32 values of x becomes q_i * d, d = amax / 127, q_i = round(x_i * (127 / amax)) in
// [-127, 127]: the very fp32 operations of the reference, so both hold the same integers. A weight
// block's dot product with it is then an integer sum times scales:
//     Q8_0, Q4_0:  sum_i (d_w w_i)(d q_i)      = d_w d * sum_i w_i q_i       (w_i = q_i or n_i - 8)
//     Q4_1:        sum_i (d_w n_i + m)(d q_i)  = d_w d * sum_i n_i q_i + m * (d * sum_i q_i)
// where the integer sums are exact: AVX2 multiplies 32 byte pairs and adds them in pairs and
// fours (vpmaddubsw, vpmaddwd; unsigned by signed bytes, so a signed weight lends x its sign),
// well inside int16 and int32. What rounds is the fp32 scaling and the sum over blocks.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "quant_blocks.h"

namespace trellis {
namespace quant {

// Rows of x as 8-bit blocks: q [M, K]; per block its scale d and d * sum(q) [M, K / 32].
struct Q8Rows {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int64_t blocks_per_row = 0;
};

// The scale of a block whose largest magnitude is `amax`, and the factor that takes it to [-127, 127].
// A block holding an infinity or a NaN scales by NaN, so that the outputs it reaches are NaN, as
// the reference's are.
inline void block_scale(float amax, bool finite, float* d, float* inverse) {
  *inverse = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
  *d = finite ? amax / 127.0f : std::nanf("");
}

// One block of 32 values: its integers q, its scale d, and d * sum(q) (s).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
inline void round_block(const float* x, int8_t* q, float* d, float* s) {
  const __m256 zero = _mm256_setzero_ps(), magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4], amax = zero, nonfinite = zero;
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
    nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(_mm256_sub_ps(v[i], v[i]), zero, _CMP_NEQ_UQ));  // x - x: NaN
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float inverse;
  block_scale(_mm_cvtss_f32(m4), _mm256_movemask_ps(nonfinite) == 0, d, &inverse);
  const __m256 factor = _mm256_set1_ps(inverse);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // half to even, as nearbyint rounds
  __m256i ints[4];
  for (int i = 0; i < 4; ++i) ints[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], factor), kNearest));
  // Narrowed to bytes: the packs work within 128-bit lanes, the permute puts the eight groups of four back in order.
  const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
  __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
  sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4E));
  sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xB1));
  *s = *d * static_cast<float>(_mm_cvtsi128_si32(sum4));
}
#else
inline void round_block(const float* x, int8_t* q, float* d, float* s) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < kBlock; ++i) {
    amax = std::max(amax, std::fabs(x[i]));
    finite = finite && std::isfinite(x[i]);
  }
  float inverse;
  block_scale(amax, finite, d, &inverse);
  int total = 0;
  for (int i = 0; i < kBlock; ++i) {
    q[i] = finite ? static_cast<int8_t>(std::nearbyint(x[i] * inverse)) : 0;  // (half to even: the default mode)
    total += q[i];
  }
  *s = *d * static_cast<float>(total);
}
#endif

// Rows x [M, K] (K a multiple of 32) into `out`.
inline void round_rows(const float* x, int64_t m, int64_t k, Q8Rows& out) {
  const int64_t blocks = m * (k / kBlock);
  out.blocks_per_row = k / kBlock;
  out.q.resize(m * k);
  out.d.resize(blocks);
  out.s.resize(blocks);
  at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      round_block(x + b * kBlock, out.q.data() + b * kBlock, &out.d[b], &out.s[b]);
  });
}

// The weights' integers of a block, in weight order: q_i (Q8_0), n_i - 8 (Q4_0), n_i (Q4_1); and
// their integer dot product with an x block, accumulated into float by a scale.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)

using BlockInts = __m256i;
using DotAcc = __m256;  // 8 lanes of partial sums over blocks

inline BlockInts load_x(const int8_t* q) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)); }

inline __m256i nibble_bytes(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
}

template <QType Q>
inline BlockInts weight_ints(const uint8_t* block) {
  if constexpr (Q == QType::Q8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
  if constexpr (Q == QType::Q4_0) return _mm256_sub_epi8(nibble_bytes(block + 2), _mm256_set1_epi8(8));
  return nibble_bytes(block + 4);
}

// acc += scale * sum_i w_i x_i, the sum in 8 int32 lanes of four products each.
template <QType Q>
inline void dot_add(BlockInts w, BlockInts x, float scale, DotAcc& acc) {
  __m256i pairs;
  if constexpr (Q == QType::Q4_1) {
    pairs = _mm256_maddubs_epi16(w, x);  // nibbles are unsigned
  } else {
    pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));  // |w| times x signed as w
  }
  const __m256i fours = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fours), _mm256_set1_ps(scale), acc);
}

inline DotAcc dot_zero() { return _mm256_setzero_ps(); }
inline float dot_total(DotAcc acc) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

#else  // portable

struct BlockInts {
  int8_t v[kBlock];
};
using DotAcc = float;

inline BlockInts load_x(const int8_t* q) {
  BlockInts x;
  std::memcpy(x.v, q, kBlock);
  return x;
}

template <QType Q>
inline BlockInts weight_ints(const uint8_t* block) {
  BlockInts w;
  if constexpr (Q == QType::Q8_0) {
    std::memcpy(w.v, block + 2, kBlock);
  } else {
    const uint8_t* qs = block + (Q == QType::Q4_0 ? 2 : 4);
    const int offset = Q == QType::Q4_0 ? 8 : 0;
    for (int i = 0; i < kBlock / 2; ++i) {
      w.v[i] = static_cast<int8_t>((qs[i] & 0x0F) - offset);
      w.v[i + kBlock / 2] = static_cast<int8_t>((qs[i] >> 4) - offset);
    }
  }
  return w;
}

template <QType Q>
inline void dot_add(const BlockInts& w, const BlockInts& x, float scale, DotAcc& acc) {
  int32_t total = 0;
  for (int i = 0; i < kBlock; ++i) total += static_cast<int32_t>(w.v[i]) * x.v[i];
  acc += scale * static_cast<float>(total);
}

inline DotAcc dot_zero() { return 0.0f; }
inline float dot_total(DotAcc acc) { return acc; }

#endif

}  // namespace quant
}  // namespace trellis
