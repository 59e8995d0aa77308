// The math of one key tile of paged attention, in fp32, vectorised with at::vec.
//
// Layout: a work item has `rows` query rows (query tokens x the query heads of one KV head).
// Rows run along the SIMD lanes: Q is held transposed and scores come out as st[key][ldq], so
// K rows are used as they lie in the cache (broadcast, no transposes), the online softmax is
// vertical, and P @ V broadcasts one probability against a chunk of a V row.
//   - Row vectors (ldq = rows rounded up to whole vectors): qt[D][ldq].
//   - Paired, for at most half a vector of rows (decode with small GQA groups): ldq = VL/2 and
//     a vector holds two key slots. qt[D/2][VL] has lane 2r+b = q[r][2m+b], K is broadcast two
//     adjacent elements at a time, and each lane sums every other d; adding the lane pairs
//     gives st[key][row] for two keys. This halves the multiply-adds when rows would fill
//     only half the lanes.
// With bf16 caches, the scores of the row-vector layout come from bf16 dot products instead: AMX
// tiles on AMX-BF16 (qk_scores_amx), AVX512_BF16's vdpbf16ps elsewhere (qk_scores_dpbf16), and
// P @ V takes the tile's probabilities rounded to bf16, on the same units. On AVX512_BF16 decode's
// few rows (at most 8, or 3 where AMX tiles serve) turn the layout around instead (key lanes,
// below): keys along the lanes, scores st[row][key], a softmax per row (key_lane_softmax); P @ V
// as for the row-vector layout.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "amx_tiles.h"
#include "bf16_dots.h"
#include "with_count.h"

namespace trellis {

using Vec = at::vec::Vectorized<float>;

constexpr int kKeyTile = 32;        // keys per tile on vectors; per run of an AMX tile's keys
constexpr int kAmxTileRuns = 4;     // runs of kKeyTile keys per AMX tile (128 keys)
constexpr int kMaxRowVecs = 4;      // row vectors per score micro-kernel call
constexpr int kAccRegs = Vec::size() >= 16 ? 16 : 8;  // accumulators that fit the register file
constexpr int kPvRows = 8;          // rows per P @ V micro-kernel call
constexpr int kPvAccRegs = Vec::size() >= 16 ? 24 : 8;  // P @ V^T's accumulators beside its row vectors

// `keys` rounded up to whole runs of kKeyTile: the depth of an AMX tile's P @ V.
inline int64_t whole_runs(int64_t keys) { return (keys + kKeyTile - 1) / kKeyTile * kKeyTile; }

// `rows` rounded up to whole vectors: ldq of the row-vector layout.
inline int64_t row_vectors(int64_t rows) { return (rows + Vec::size() - 1) / Vec::size() * Vec::size(); }

// ldq for `rows` query rows on vectors: half a vector (paired layout) or whole vectors.
inline int64_t score_stride(int64_t rows, int64_t head_dim) {
  return 2 * rows <= Vec::size() && head_dim % 2 == 0 ? Vec::size() / 2 : row_vectors(rows);
}

// Where q[r][d] goes in qt for the layout of `ldq`.
inline int64_t qt_index(int64_t r, int64_t d, int64_t ldq) {
  return ldq < Vec::size() ? d / 2 * Vec::size() + 2 * r + d % 2 : d * ldq + r;
}

// Lanes of per-row statistics (running max and sum, limits): both key slots in the paired layout.
inline int64_t stat_lanes(int64_t ldq) { return std::max<int64_t>(ldq, Vec::size()); }

// `n` elements of storage type T -> fp32 (a copy for fp32).
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec x;
    if constexpr (std::is_same_v<T, float>) {
      x = Vec::loadu(src + i);
    } else {
      at::vec::load_to_float(src + i, x);
    }
    x.store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// The online softmax's probability exp(s * scale - m_sub) for the lanes of s, one formula for
// every path that stores them (softmax_tile, probability_pairs, key_lane_softmax).
inline Vec tile_probability(const Vec& s, const Vec& scale, const Vec& m_sub) { return (s * scale - m_sub).exp_u20(); }

// acc[r][:] *= alpha[r] for the rows whose running max moved (alpha != 1): P @ V's accumulator
// [rows][head_dim] moved to the tile's max.
inline void rescale_rows(const float* alpha, int64_t rows, int64_t head_dim, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    if (alpha[r] == 1.f) continue;
    const Vec a(alpha[r]);
    at::vec::map([a](Vec x) { return x * a; }, acc + r * head_dim, acc + r * head_dim, head_dim);
  }
}

// The same for the transposed accumulator acc^T[head_dim][ldq] (rows along the lanes), a vector of
// rows at a time: every d of the rows whose vector holds a moved max.
inline void rescale_columns(const float* alpha, int64_t ldq, int64_t head_dim, float* acct) {
  for (int64_t c = 0; c < ldq; c += Vec::size()) {
    const Vec a = Vec::loadu(alpha + c);
    if (at::vec::vec_reduce_all([](Vec x, Vec y) { return at::vec::minimum(x, y); }, a.eq(Vec(1.f))) == 1.f) continue;
    for (int64_t d = 0; d < head_dim; ++d) (Vec::loadu(acct + d * ldq + c) * a).store(acct + d * ldq + c);
  }
}

// P @ V's accumulator [rows][head_dim] rescaled (rescale_rows), then `block(rb, r0)` for each block
// of rows from r0, rb (std::integral_constant, up to kPvRows) rows at a time: the micro-kernel of
// the layout adds the tile's products to those rows.
template <typename Block>
inline void accumulate_rows(const float* alpha, int64_t rows, int64_t head_dim, float* acc, const Block& block) {
  rescale_rows(alpha, rows, head_dim, acc);
  for (int64_t r0 = 0; r0 < rows; r0 += kPvRows) with_count<kPvRows>(rows - r0, [&](auto rb) { block(rb, r0); });
}

// st[b][v] = sum_d k[b][d] * qt[d][v] for KB keys (rows `ldk` apart) and NR row vectors. Only
// `valid` keys exist: the others repeat the last one, and only valid keys' scores are stored
// (KB need not divide a tile: storing them all would run past the end of st).
template <int NR, int KB>
inline void qk_block(const float* qt, int64_t ldq, const float* k, int64_t ldk, int64_t valid, int64_t head_dim,
                     float* st) {
  const float* kb_row[KB];
  for (int b = 0; b < KB; ++b) kb_row[b] = k + std::min<int64_t>(b, valid - 1) * ldk;
  Vec acc[KB][NR];
  for (int b = 0; b < KB; ++b)
    for (int r = 0; r < NR; ++r) acc[b][r] = Vec(0.f);
  for (int64_t d = 0; d < head_dim; ++d) {
    Vec q[NR];
    for (int r = 0; r < NR; ++r) q[r] = Vec::loadu(qt + d * ldq + r * Vec::size());
    for (int b = 0; b < KB; ++b) {
      const Vec kb(kb_row[b][d]);
      for (int r = 0; r < NR; ++r) acc[b][r] = at::vec::fmadd(kb, q[r], acc[b][r]);
    }
  }
  for (int b = 0; b < KB && b < valid; ++b)
    for (int r = 0; r < NR; ++r) acc[b][r].store(st + b * ldq + r * Vec::size());
}

template <int NR>
inline void qk_keys(const float* qt, int64_t ldq, const float* k, int64_t ldk, int64_t n, int64_t head_dim, float* st) {
  constexpr int KB = std::min(8, kAccRegs / NR);
  for (int64_t j = 0; j < n; j += KB) qk_block<NR, KB>(qt, ldq, k + j * ldk, ldk, n - j, head_dim, st + j * ldq);
}

// The paired layout: st[b][:] for KB keys (KB even), two keys per output vector.
template <int KB>
inline void qk_pairs(const float* qt, const float* k, int64_t ldk, int64_t valid, int64_t head_dim, float* st) {
  const float* kb_row[KB];
  for (int b = 0; b < KB; ++b) kb_row[b] = k + std::min<int64_t>(b, valid - 1) * ldk;
  Vec acc[KB];
  for (int b = 0; b < KB; ++b) acc[b] = Vec(0.f);
  for (int64_t d = 0; d < head_dim; d += 2) {
    const Vec q = Vec::loadu(qt + d / 2 * Vec::size());
    for (int b = 0; b < KB; ++b) {
      double pair;  // k[d], k[d + 1], broadcast as one 64-bit element
      std::memcpy(&pair, kb_row[b] + d, sizeof(pair));
      acc[b] = at::vec::fmadd(at::vec::cast<float>(at::vec::Vectorized<double>(pair)), q, acc[b]);
    }
  }
  for (int b = 0; b < KB && b < valid; b += 2) {  // a vector per key pair; an odd tile's last slot is masked
    const auto [even, odd] = at::vec::deinterleave2(acc[b], acc[b + 1]);
    (even + odd).store(st + b * Vec::size() / 2);
  }
}

// Scores st[key][row] = q_row . k_key for the tile's `n` keys, every row.
inline void qk_scores(const float* qt, int64_t ldq, const float* k, int64_t ldk, int64_t n, int64_t head_dim,
                      float* st) {
  if (ldq < Vec::size()) {
    constexpr int KB = 8;
    for (int64_t j = 0; j < n; j += KB) qk_pairs<KB>(qt, k + j * ldk, ldk, n - j, head_dim, st + j * ldq);
    return;
  }
  const int64_t vecs = ldq / Vec::size();
  for (int64_t v0 = 0; v0 < vecs; v0 += kMaxRowVecs) {
    const float* q = qt + v0 * Vec::size();
    float* s = st + v0 * Vec::size();
    with_count<kMaxRowVecs>(vecs - v0, [&](auto nr) { qk_keys<decltype(nr)::value>(q, ldq, k, ldk, n, head_dim, s); });
  }
}

#if defined(TRELLIS_BF16_DOTS)
// bf16 scores from bf16 pairs (both below). Q^T in pairs: qp[D/2][ldq], lane r = (q[r][2m],
// q[r][2m+1]); K rows as they lie in the cache. A product of two bf16 is exact in fp32 and both
// units add it in fp32, so the scores are the fp32 path's up to summation order and the scale,
// applied to the sum rather than to q. Inputs and results below fp32's normal range are flushed
// to zero (the units' rule), far below what a score resolves.

// AVX512_BF16 (Zen 4 on, Cooper Lake): st[b][v] for KB keys and NR row vectors, one vdpbf16ps
// per key, row vector and pair of d: 32 multiply-adds an instruction where the fp32 path does 16,
// and K is read as bf16 in place instead of widened into the staged tile first. Only `valid`
// keys exist (as in qk_block).
template <int NR, int KB>
__attribute__((target("avx512f,avx512bf16"))) inline void dpbf16_block(const uint32_t* qp, int64_t ldq,
                                                                        const c10::BFloat16* k, int64_t ldk,
                                                                        int64_t valid, int64_t head_dim, float* st) {
  const c10::BFloat16* kb_row[KB];
  for (int b = 0; b < KB; ++b) kb_row[b] = k + std::min<int64_t>(b, valid - 1) * ldk;
  __m512 acc[KB][NR];
  for (int b = 0; b < KB; ++b)
    for (int r = 0; r < NR; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t m = 0; m < head_dim / 2; ++m) {
    __m512bh q[NR];
    for (int r = 0; r < NR; ++r) q[r] = (__m512bh)_mm512_loadu_si512(qp + m * ldq + r * 16);
    for (int b = 0; b < KB; ++b) {
      uint32_t pair;  // k[2m], k[2m + 1]
      std::memcpy(&pair, kb_row[b] + 2 * m, sizeof(pair));
      const __m512bh kb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int r = 0; r < NR; ++r) acc[b][r] = _mm512_dpbf16_ps(acc[b][r], q[r], kb);
    }
  }
  for (int b = 0; b < KB && b < valid; ++b)
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(st + b * ldq + r * 16, acc[b][r]);
}

// qk_scores for bf16 K (rows `ldk` elements apart) and Q^T in pairs (ldq a multiple of 16),
// unscaled; head_dim even.
inline void qk_scores_dpbf16(const uint32_t* qp, int64_t ldq, const c10::BFloat16* k, int64_t ldk, int64_t n,
                             int64_t head_dim, float* st) {
  const int64_t vecs = ldq / 16;
  for (int64_t v0 = 0; v0 < vecs; v0 += kMaxRowVecs) {
    with_count<kMaxRowVecs>(vecs - v0, [&](auto nr) {
      constexpr int NR = decltype(nr)::value, KB = std::min(8, 16 / NR);
      for (int64_t j = 0; j < n; j += KB)
        dpbf16_block<NR, KB>(qp + v0 * 16, ldq, k + j * ldk, ldk, n - j, head_dim, st + j * ldq + v0 * 16);
    });
  }
}

// bf16 products on AMX tiles, for bf16 caches (in the row-vector layout). Scores: a tile multiply
// of 16 keys by 32 d (K rows as they lie in the cache) and 32 d by 16 query rows (Q^T as bf16
// pairs) gives scores straight in st's [key][row] layout. P @ V runs transposed, acc^T[d][row] +=
// V^T[d][key] P[key][row], so that the probabilities enter as bf16 pairs of keys per row, the
// scores' layout again (softmax_tile's `pairs`), and V^T is staged per tile (value_pairs).

// tile_product over C's columns [0, ldq) (a multiple of 16) in blocks of 32, for A's block at a0
// and, with two_a, at a1.
template <bool kAccumulate>
inline void tile_product_rows(bool two_a, const c10::BFloat16* a0, const c10::BFloat16* a1, int64_t lda,
                              const uint32_t* b, int64_t ldq, int64_t depth, float* c) {
  for (int64_t r = 0; r < ldq; r += 2 * kTileRows) {
    const bool two_b = r + kTileRows < ldq;
    tile_product_blocks<kAccumulate>(two_a, two_b, a0, a1, lda, b + r, two_b ? b + r + kTileRows : nullptr, ldq,
                                     depth, c + r, ldq);
  }
}

// qk_scores for bf16 K (rows `ldk` elements apart; n <= kKeyTile keys) and Q^T in pairs, unscaled;
// ldq a multiple of 16, head_dim a multiple of 32, tiles configured. A last key block of fewer than 16 keys goes
// through `pad` (16 zeroed rows of head_dim), so that no tile reads past the tile's keys.
inline void qk_scores_amx(const uint32_t* qp, int64_t ldq, const c10::BFloat16* k, int64_t ldk, int64_t n,
                          int64_t head_dim, c10::BFloat16* pad, float* st) {
  const c10::BFloat16* blocks[2] = {k, k + kTileRows * ldk};
  int64_t ld[2] = {ldk, ldk};
  const int64_t key_blocks = (n + kTileRows - 1) / kTileRows;
  const int64_t tail = n - (key_blocks - 1) * kTileRows;
  if (tail < kTileRows) {
    std::fill(pad, pad + kTileRows * head_dim, c10::BFloat16(0.f));
    for (int64_t j = 0; j < tail; ++j)
      std::copy(blocks[key_blocks - 1] + j * ldk, blocks[key_blocks - 1] + j * ldk + head_dim, pad + j * head_dim);
    blocks[key_blocks - 1] = pad;
    ld[key_blocks - 1] = head_dim;
  }
  // A key block's stride is its own: run the two blocks together only when they share one.
  const bool two_keys = key_blocks == 2 && ld[0] == ld[1];
  for (int64_t kb = 0; kb < key_blocks; kb += two_keys ? 2 : 1)
    tile_product_rows<false>(two_keys, blocks[kb], two_keys ? blocks[1] : nullptr, ld[kb], qp, ldq, head_dim,
                             st + kb * kTileRows * ldq);
}

// 16 x 16 32-bit elements transposed in registers: r[i] lane j -> r[j] lane i.
__attribute__((target("avx512f"))) inline void transpose_16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: [r_i[j], r_i+1[j], ...] for j = 4L .. 4L+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + k] lane L: column 4L + k of rows g .. g+3
    r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // column 4L + k gathers lane L of r[k], r[4 + k], r[8 + k], r[12 + k]
    const __m512i low_a = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44);
    const __m512i high_a = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xee);
    const __m512i low_b = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44);
    const __m512i high_b = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xee);
    t[k] = _mm512_shuffle_i32x4(low_a, low_b, 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(low_a, low_b, 0xdd);
    t[8 + k] = _mm512_shuffle_i32x4(high_a, high_b, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(high_a, high_b, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Word order (a[r], b[r]) for r in 0..15 from [a 0..15, b 0..15]: two vectors of 16 bf16 as pairs.
struct PairWords {
  int16_t words[32];
};
alignas(64) inline constexpr PairWords kPairWords = [] {
  PairWords order{};
  for (int r = 0; r < 16; ++r) {
    order.words[2 * r] = static_cast<int16_t>(r);
    order.words[2 * r + 1] = static_cast<int16_t>(16 + r);
  }
  return order;
}();

// V^T of one head's run of 32 keys as A of P @ V: vp[d][m] = (v[2m][d], v[2m + 1][d]) for the
// run's 16 key pairs (rows of vp `ldp` pairs apart), keys at or past n zero; `n` keys of head_dim
// (a multiple of 32), rows `ldv` apart. Two key rows interleave into pairs for 16 d at a time
// (one permute), then 16 x 16 pairs transpose.
__attribute__((target("avx512f,avx512bw"))) inline void value_pairs(const c10::BFloat16* v, int64_t ldv, int64_t n,
                                                                    int64_t head_dim, uint32_t* vp, int64_t ldp) {
  alignas(64) static constexpr auto kInterleave = [] {  // words (a[j], b[j]) for j in the low, then the high 16
    struct { int16_t low[32], high[32]; } words{};
    for (int j = 0; j < 16; ++j) {
      words.low[2 * j] = static_cast<int16_t>(j), words.low[2 * j + 1] = static_cast<int16_t>(32 + j);
      words.high[2 * j] = static_cast<int16_t>(16 + j), words.high[2 * j + 1] = static_cast<int16_t>(48 + j);
    }
    return words;
  }();
  auto row32 = [&](int64_t key, int64_t d) {  // 32 bf16 of a key row
    return key < n ? _mm512_loadu_si512(v + key * ldv + d) : _mm512_setzero_si512();
  };
  for (int64_t d = 0; d < head_dim; d += 32) {
    for (int half = 0; half < 2; ++half) {
      const __m512i order = _mm512_load_si512(half == 0 ? kInterleave.low : kInterleave.high);
      __m512i r[16];  // r[m] lane j: the pair of keys 2m, 2m + 1 at d + 16 * half + j
      for (int m = 0; m < 16; ++m) r[m] = _mm512_permutex2var_epi16(row32(2 * m, d), order, row32(2 * m + 1, d));
      transpose_16x16(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(vp + (d + 16 * half + j) * ldp, r[j]);
    }
  }
}

// Probabilities of keys 2m (`even`) and 2m + 1 (`odd`) for 16 rows as B of P @ V: pp[m][r] =
// (p[2m][r], p[2m + 1][r]) rounded to bf16 (to nearest, ties to even). PyTorch's SDPA on CPU and
// Triton's tl.dot take bf16 probabilities into P @ V the same way; the running sums stay those of
// the fp32 probabilities.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void store_probability_pairs(__m512 even, __m512 odd,
                                                                                           uint32_t* pp) {
  const __m512bh both = _mm512_cvtne2ps_pbh(odd, even);
  _mm512_storeu_si512(pp, _mm512_permutexvar_epi16(_mm512_load_si512(kPairWords.words), (__m512i)both));
}

// softmax_tile's probabilities exp(st * scale - m_sub) for the 16 lanes at st (keys `ldq` apart;
// keys at or past n zero) into P @ V's pairs over `depth` keys, returning their sum. Compiled for
// AVX512_BF16 as a whole, so that store_probability_pairs inlines rather than being called (through
// the PLT, its vectors spilled) for every pair of keys.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline Vec probability_pairs(const float* st, int64_t ldq,
                                                                                  int64_t n, int64_t depth,
                                                                                  const Vec& scale, const Vec& m_sub,
                                                                                  uint32_t* pp) {
  auto probability = [&](int64_t j) {
    return j < n ? tile_probability(Vec::loadu(st + j * ldq), scale, m_sub) : Vec(0.f);
  };
  Vec sum(0.f);
  for (int64_t j = 0; j < depth; j += 2) {
    const Vec even = probability(j), odd = probability(j + 1);
    sum = sum + even;
    sum = sum + odd;
    store_probability_pairs(even, odd, pp + j / 2 * ldq);
  }
  return sum;
}

// acc^T[D][ldq] = acc^T * alpha (per row, along the lanes) + V^T P over the tile's `depth` keys (a
// multiple of 32; vp [D][ldv / 2] and pp from value_pairs and softmax_tile); tiles configured,
// head_dim a multiple of 32.
inline void pv_accumulate_amx(const uint32_t* vp, int64_t ldv, const uint32_t* pp, int64_t ldq, const float* alpha,
                              int64_t depth, int64_t head_dim, float* acct) {
  rescale_columns(alpha, ldq, head_dim, acct);
  const auto* v = reinterpret_cast<const c10::BFloat16*>(vp);
  for (int64_t d = 0; d < head_dim; d += 2 * kTileRows)
    tile_product_rows<true>(true, v + d * ldv, v + (d + kTileRows) * ldv, ldv, pp, ldq, depth, acct + d * ldq);
}

// P @ V on AVX512_BF16, for the items whose scores come from its dot products: acc[r][d] +=
// sum_m pp[m][r] . vk[m][d], the probabilities as bf16 key pairs per row (softmax_tile's `pairs`,
// as on AMX) against V as key pairs per d (value_key_pairs), one vdpbf16ps per pair of keys, row
// and 16 d: 32 multiply-adds where an fp32 vector does 16, and V staged in bf16, half the bytes.

// vk[m][d] = (v[2m][d], v[2m + 1][d]) for a run's ceil(n / 2) key pairs (rows of vk `ldp` pairs
// apart), a key at n zero; `n` key rows of head_dim (a multiple of 16), `ldv` apart.
__attribute__((target("avx512f,avx512bw"))) inline void value_key_pairs(const c10::BFloat16* v, int64_t ldv, int64_t n,
                                                                        int64_t head_dim, uint32_t* vk, int64_t ldp) {
  const __m512i order = _mm512_load_si512(kPairWords.words);
  for (int64_t m = 0; 2 * m < n; ++m) {
    const c10::BFloat16* even = v + 2 * m * ldv;
    for (int64_t d = 0; d < head_dim; d += 16) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + d));
      const __m256i b = 2 * m + 1 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + ldv + d))
                                      : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      _mm512_storeu_si512(vk + m * ldp + d, _mm512_permutexvar_epi16(order, both));
    }
  }
}

// acc[i][:] += sum_m pp[m * ldm + i * ldr] . vk[m][:] for RB rows over `pairs` key pairs (the
// probabilities' pairs `ldm` apart a row, rows `ldr` apart); vk rows `ldv` pairs apart. (Blocking
// over 2 or 4 chunks of d as well, broadcasting each pair once for them, ran slower on Zen 4.)
template <int RB>
__attribute__((target("avx512f,avx512bf16"))) inline void pv_pair_rows(const uint32_t* pp, int64_t ldm, int64_t ldr,
                                                                        const uint32_t* vk, int64_t ldv, int64_t pairs,
                                                                        int64_t head_dim, float* acc) {
  for (int64_t c = 0; c < head_dim; c += 16) {
    __m512 a[RB];
    for (int i = 0; i < RB; ++i) a[i] = _mm512_loadu_ps(acc + i * head_dim + c);
    for (int64_t m = 0; m < pairs; ++m) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(vk + m * ldv + c);
      const uint32_t* p = pp + m * ldm;
      for (int i = 0; i < RB; ++i)
        a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_set1_epi32(static_cast<int>(p[i * ldr])), v);
    }
    for (int i = 0; i < RB; ++i) _mm512_storeu_ps(acc + i * head_dim + c, a[i]);
  }
}

// acc[rows][D] = acc * alpha (per row) + P @ V over the tile's `n` keys, from bf16 pairs (`ldm`
// and `ldr` as in pv_pair_rows); head_dim a multiple of 16.
inline void pv_accumulate_pairs(const uint32_t* pp, int64_t ldm, int64_t ldr, const float* alpha, const uint32_t* vk,
                                int64_t ldv, int64_t n, int64_t rows, int64_t head_dim, float* acc) {
  accumulate_rows(alpha, rows, head_dim, acc, [&](auto rb, int64_t r0) {
    pv_pair_rows<decltype(rb)::value>(pp + r0 * ldr, ldm, ldr, vk, ldv, (n + 1) / 2, head_dim, acc + r0 * head_dim);
  });
}

// Key lanes, for decode's few rows on AVX512_BF16: the row-vector layout gives 3 rows (SmolLM2's
// GQA group) 16 lanes, and pays a vdpbf16ps and a broadcast per key, row vector and pair of d.
// Here lanes run along keys instead: a key's row times a query row is a vdpbf16ps per 32 d, the
// 16 partial sums of 16 keys added across lanes at once (sum_lanes_16), and the softmax takes
// 16 keys a vector. Scores st[row][key] and probabilities pp[row][pair] (rows a tile apart),
// rounded to bf16 at the same key tiles as in the other layouts; P @ V is pv_accumulate_pairs'.

// Lane j: the sum of acc[j]'s 16 lanes.
__attribute__((target("avx512f"))) inline __m512 sum_lanes_16(const __m512 acc[16]) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128 bits: (a0 + a2, b0 + b2, a1 + a3, b1 + b3) of a, b = acc[2i], acc[2i + 1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                             _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128 bits: the partial sums of acc[4i .. 4i + 3]
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // 128-bit chunk c of the result: the four chunks of quads[c] added.
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xee));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], 0xee));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xdd));
}

// st[r][j] (rows `lds` apart) = q_r . k_j for `rows` query rows (bf16, head_dim each, one after
// the other) and n <= lds keys (rows `ldk` apart), unscaled; any head_dim (the last 32 d are
// masked; item_scores plans key lanes for multiples of 16). Keys past n repeat the last one and
// are not stored.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void key_lane_scores(
    const c10::BFloat16* q, int64_t rows, const c10::BFloat16* k, int64_t ldk, int64_t n, int64_t head_dim, float* st,
    int64_t lds) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const c10::BFloat16* key[16];
    for (int b = 0; b < 16; ++b) key[b] = k + std::min<int64_t>(j0 + b, n - 1) * ldk;
    const __mmask16 stored = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - j0)) - 1);
    for (int64_t r = 0; r < rows; ++r) {
      __m512 acc[16];
      for (int b = 0; b < 16; ++b) acc[b] = _mm512_setzero_ps();
      for (int64_t d = 0; d < head_dim; d += 32) {  // the last 32 d masked where head_dim is not a multiple
        const __mmask32 dims = head_dim - d >= 32 ? ~__mmask32(0) : (__mmask32(1) << (head_dim - d)) - 1;
        const __m512bh qd = (__m512bh)_mm512_maskz_loadu_epi16(dims, q + r * head_dim + d);
        for (int b = 0; b < 16; ++b)
          acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)_mm512_maskz_loadu_epi16(dims, key[b] + d), qd);
      }
      _mm512_mask_storeu_ps(st + r * lds + j0, stored, sum_lanes_16(acc));
    }
  }
}

// softmax_tile in key lanes, for a tile of n <= 32 keys from absolute position key0: row r's
// scores st[r][0 .. n) (rows `lds` apart), keys at or past limit[r] masked, turn into
// probabilities exp(s * scale - m_sub) against the running max m[r] (tile_probability's formula),
// stored as bf16 key pairs at pp[r][0 .. 16) (rows `ldp` pairs apart; keys from n on zero);
// updates the running sum l[r] and returns alpha[r] as softmax_tile does.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void key_lane_softmax(
    const float* st, int64_t lds, int64_t rows, int64_t n, int64_t key0, const float* limit, float scale, float* m,
    float* l, float* alpha, uint32_t* pp, int64_t ldp) {
  const Vec neg_inf(-std::numeric_limits<float>::infinity()), scale_v(scale);
  const Vec first = Vec::arange(static_cast<float>(key0), 1.f), second = first + Vec(16.f);  // the lanes' keys
  const Vec tile_end(static_cast<float>(key0 + n));
  auto max_op = [](Vec x, Vec y) { return at::vec::maximum(x, y); };
  for (int64_t r = 0; r < rows; ++r) {
    const Vec lim = at::vec::minimum(Vec(limit[r]), tile_end);
    const Vec s0 = Vec::blendv(Vec::loadu(st + r * lds), neg_inf, first >= lim);
    const Vec s1 = n > 16 ? Vec::blendv(Vec::loadu(st + r * lds + 16), neg_inf, second >= lim) : neg_inf;
    const Vec m_old(m[r]);
    const Vec m_new = at::vec::maximum(m_old, Vec(at::vec::vec_reduce_all(max_op, at::vec::maximum(s0, s1))) * scale_v);
    const Vec m_sub = Vec::blendv(m_new, Vec(0.f), m_new == neg_inf);  // as in softmax_tile
    const Vec p0 = tile_probability(s0, scale_v, m_sub), p1 = n > 16 ? tile_probability(s1, scale_v, m_sub) : Vec(0.f);
    _mm512_storeu_si512(pp + r * ldp, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    const float a = _mm512_cvtss_f32((m_old - m_sub).exp_u20());
    l[r] = l[r] * a + at::vec::vec_reduce_all([](Vec x, Vec y) { return x + y; }, p0 + p1);
    m[r] = _mm512_cvtss_f32(m_new);
    alpha[r] = a;
  }
}
#endif

// [x[VL/2:], x[:VL/2]]
inline Vec halves_swapped(const Vec& x) {
  float twice[2 * Vec::size()];
  x.store(twice);
  x.store(twice + Vec::size());
  return Vec::loadu(twice + Vec::size() / 2);
}

// Online softmax over one tile, lane by lane: scores st * scale (scale > 0: scaling after the max
// gives the same max, rounding being monotonic, so st is read as it is), keys at or past each
// row's `limit` (causal, absolute key positions as floats) masked when `masked`, turn into
// probabilities against the running max m, in st or, where `pairs` is given (items whose scores
// come from bf16 pairs), straight into P @ V's bf16 pairs (probability_pairs; keys from n to the next
// multiple of kKeyTile zero); updates the running sum l, and returns in `alpha` the factor that
// moves the row's accumulator to the new max. In the paired layout m, l, alpha and limit have a lane per
// (row, key slot): the slots' maxima are merged every tile, so both copies of a row agree on
// m and alpha, and the row's sum is l[r] + l[r + VL/2].
inline void softmax_tile(float* st, int64_t ldq, int64_t n, int64_t key0, bool masked, const float* limit, float scale,
                         float* m, float* l, float* alpha, uint32_t* pairs) {
  const Vec neg_inf(-std::numeric_limits<float>::infinity()), scale_v(scale);
  const bool paired = ldq < Vec::size();
  const int slots = paired ? 2 : 1;  // keys per vector
  const Vec slot = paired ? Vec::blendv(Vec(0.f), Vec(1.f), Vec::arange(0.f, 1.f) >= Vec(ldq)) : Vec(0.f);
  masked = masked || n % slots != 0;  // an odd tile leaves the last vector's second slot empty
  const Vec tile_end(static_cast<float>(key0 + n));
  for (int64_t c = 0; c < stat_lanes(ldq); c += Vec::size()) {
    const Vec lim = at::vec::minimum(Vec::loadu(limit + c), tile_end);
    auto scores = [&](int64_t j) {  // keys j (and j + 1 paired) of these lanes, the masked ones -inf
      float* ptr = st + j * ldq + c;
      Vec s = Vec::loadu(ptr);
      if (masked) {
        s = Vec::blendv(s, neg_inf, Vec(static_cast<float>(key0 + j)) + slot >= lim);
        s.store(ptr);
      }
      return s;
    };
    // Four running maxima, so that each max waits on the one four keys back rather than the last.
    Vec maxima[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
    int64_t j = 0;
    for (; j + 3 * slots < n; j += 4 * slots)
      for (int i = 0; i < 4; ++i) maxima[i] = at::vec::maximum(maxima[i], scores(j + i * slots));
    for (; j < n; j += slots) maxima[0] = at::vec::maximum(maxima[0], scores(j));
    Vec tile_max = at::vec::maximum(at::vec::maximum(maxima[0], maxima[1]), at::vec::maximum(maxima[2], maxima[3]));
    if (paired) tile_max = at::vec::maximum(tile_max, halves_swapped(tile_max));
    const Vec m_old = Vec::loadu(m + c);
    const Vec m_new = at::vec::maximum(m_old, tile_max * scale_v);
    // A row with no visible key yet keeps m = -inf; subtract 0 then so exp gives 0, not NaN.
    const Vec m_sub = Vec::blendv(m_new, Vec(0.f), m_new == neg_inf);
    Vec sum(0.f);
#if defined(TRELLIS_BF16_DOTS)
    if (pairs != nullptr) sum = probability_pairs(st + c, ldq, n, whole_runs(n), scale_v, m_sub, pairs + c);
#endif
    for (int64_t j = 0; pairs == nullptr && j < n; j += slots) {
      const Vec p = tile_probability(Vec::loadu(st + j * ldq + c), scale_v, m_sub);
      p.store(st + j * ldq + c);
      sum = sum + p;
    }
    const Vec a = (m_old - m_sub).exp_u20();
    (Vec::loadu(l + c) * a + sum).store(l + c);
    m_new.store(m + c);
    a.store(alpha + c);
  }
}

// acc[i][:] += sum_j pt[j][i] * v[j][:] for RB rows; V rows are `ldv` apart.
template <int RB>
inline void pv_rows(const float* pt, int64_t ldq, const float* v, int64_t ldv, int64_t n, int64_t head_dim,
                    float* acc) {
  int64_t c = 0;
  for (; c + Vec::size() <= head_dim; c += Vec::size()) {
    Vec a[RB];
    for (int i = 0; i < RB; ++i) a[i] = Vec::loadu(acc + i * head_dim + c);
    for (int64_t j = 0; j < n; ++j) {
      const Vec vj = Vec::loadu(v + j * ldv + c);
      const float* p = pt + j * ldq;
      for (int i = 0; i < RB; ++i) a[i] = at::vec::fmadd(Vec(p[i]), vj, a[i]);
    }
    for (int i = 0; i < RB; ++i) a[i].store(acc + i * head_dim + c);
  }
  for (; c < head_dim; ++c)  // head_dim not a multiple of the vector width
    for (int i = 0; i < RB; ++i)
      for (int64_t j = 0; j < n; ++j) acc[i * head_dim + c] += pt[j * ldq + i] * v[j * ldv + c];
}

// acc[rows][D] = acc * alpha (per row) + P @ V over the tile's `n` keys.
inline void pv_accumulate(const float* pt, int64_t ldq, const float* alpha, const float* v, int64_t ldv, int64_t n,
                          int64_t rows, int64_t head_dim, float* acc) {
  accumulate_rows(alpha, rows, head_dim, acc, [&](auto rb, int64_t r0) {
    pv_rows<decltype(rb)::value>(pt + r0, ldq, v, ldv, n, head_dim, acc + r0 * head_dim);
  });
}

// P @ V into the transposed accumulator, for fp32 items in row vectors: acc^T[d][r] += sum_j
// v[j][d] * pt[j][r] for DB values of d and NR row vectors, each probability vector loaded once a
// key for DB d and each V element broadcast once for NR vectors (pv_rows loads a V vector and
// broadcasts a probability per row: a load for each multiply-add). The same products summed in
// the same order as pv_rows', so the same results; ~1.5x faster over 64 rows on an Ice Lake Xeon.
template <int DB, int NR>
inline void pv_columns(const float* pt, int64_t ldq, const float* v, int64_t ldv, int64_t n, float* acct) {
  Vec a[DB][NR];
  for (int b = 0; b < DB; ++b)
    for (int r = 0; r < NR; ++r) a[b][r] = Vec::loadu(acct + b * ldq + r * Vec::size());
  for (int64_t j = 0; j < n; ++j) {
    Vec p[NR];
    for (int r = 0; r < NR; ++r) p[r] = Vec::loadu(pt + j * ldq + r * Vec::size());
    for (int b = 0; b < DB; ++b) {
      const Vec vb(v[j * ldv + b]);
      for (int r = 0; r < NR; ++r) a[b][r] = at::vec::fmadd(p[r], vb, a[b][r]);
    }
  }
  for (int b = 0; b < DB; ++b)
    for (int r = 0; r < NR; ++r) a[b][r].store(acct + b * ldq + r * Vec::size());
}

// acc^T[D][ldq] = acc^T * alpha (per row) + V^T P over the tile's `n` keys, for fp32 items in row
// vectors (ldq a multiple of the vector width; any head_dim).
inline void pv_accumulate_columns(const float* pt, int64_t ldq, const float* alpha, const float* v, int64_t ldv,
                                  int64_t n, int64_t head_dim, float* acct) {
  rescale_columns(alpha, ldq, head_dim, acct);
  const int64_t vecs = ldq / Vec::size();
  for (int64_t v0 = 0; v0 < vecs; v0 += kMaxRowVecs) {
    with_count<kMaxRowVecs>(vecs - v0, [&](auto nr) {
      constexpr int NR = decltype(nr)::value, DB = std::min(12, kPvAccRegs / NR);
      for (int64_t d = 0; d < head_dim; d += DB)
        with_count<DB>(head_dim - d, [&](auto db) {
          pv_columns<decltype(db)::value, NR>(pt + v0 * Vec::size(), ldq, v + d, ldv, n,
                                              acct + d * ldq + v0 * Vec::size());
        });
    });
  }
}

}  // namespace trellis
