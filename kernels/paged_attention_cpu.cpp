// trellis::paged_attention on CPU (see trellis/ops/reference.py for the spec): argument checks,
// one work item's walk over its key tiles (fp32 online softmax, attention_tile.h), the merge
// of split items, the plan op, and the registration for the CPU dispatch key of trellis_cpp::
// (the C++ library's own namespace; trellis/ops/schema.py defines it). attention_plan.h plans
// the work, once per forward when the caller passes a plan.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "attention_plan.h"
#include "attention_tile.h"
#include "kv_cache_layout.h"
#include "work_plan.h"

namespace trellis {
namespace {

template <typename T>
struct Problem {
  const T* q;        // [T, Hq, D]
  const T* k_cache;  // [N, S, Hkv, D]
  const T* v_cache;
  T* out;            // [T, Hq, D]
  const int32_t* block_table;  // [B, max_blocks]
  int64_t max_blocks, q_heads, kv_heads, group, head_dim, block_size;
  float scale;
  int64_t partial_rows;  // rows of one split slot
  float* partial_out;    // [partials, partial_rows, D]
  float* partial_lse;    // [partials, partial_rows]
  int64_t num_blocks = 0;  // N: the cache's blocks
  bool batch_invariant = false;  // every item on fp32 row vectors (work_plan.h)

  // Row `r` of KV head `h` in an item: token r / group, query head h * group + r % group.
  int64_t q_offset(const WorkItem& w, int64_t h, int64_t r) const {
    return ((w.q_begin + r / group) * q_heads + h * group + r % group) * head_dim;
  }
};

// Where an item's scores come from (attention_tile.h): fp32 vectors over the staged K tile, or
// bf16 pairs of Q against K as it lies in the cache, on AMX tiles or AVX512_BF16 dot products in
// the row-vector layout, or AVX512_BF16 dot products in key lanes (decode's few rows). Items with
// bf16 scores take P @ V from the same unit, the probabilities as bf16 pairs; the others from fp32
// vectors over the staged V tile.
enum class Scores { vectors, amx, dpbf16, key_lanes };

// Per-thread scratch, grown on demand and kept across calls. Per KV head of the item: Q^T
// (D x ldq floats, or D/2 x ldq bf16 pairs for bf16 scores), the output accumulator [rows][D]
// (transposed, [D][ldq], on AMX and for fp32 row vectors), the running max and sum [lanes]. The scores [tile keys][ldq], the
// staged tile as fp32, [kKeyTile][heads][D] for K and for V, and with bf16 scores V as key pairs
// (AMX: V^T, [heads][D][tile keys / 2]; AVX512_BF16: [tile keys / 2][heads][D]) and the
// probabilities as key pairs [tile keys / 2][ldq], and (AMX) a padded key block [16][D]. Key lanes
// (ldq = lanes = rows) keep the same sizes: Q's rows [rows][D] as they are, and the scores and
// probabilities transposed, [rows][tile keys] and [rows][tile keys / 2].
struct Workspace {
  std::vector<float> qt, acc, m, l, st, alpha, limit, k, v;
  std::vector<uint32_t> qp, vp, pp;
  std::vector<c10::BFloat16> pad;

  // Only the buffers of the item's path: a bf16-scores item has no fp32 Q^T or staged K, a vector
  // item no pairs or padded block (the exact build below then catches a path reading the other's).
  void reserve(int64_t heads, int64_t ldq, int64_t lanes, int64_t head_dim, int64_t tile_keys, Scores scores) {
    const bool pairs = scores != Scores::vectors, amx = scores == Scores::amx;
    grow(qt, pairs ? 0 : heads * head_dim * ldq);
    grow(qp, pairs ? heads * head_dim / 2 * ldq : 0);
    grow(acc, heads * ldq * head_dim);
    grow(m, heads * lanes);
    grow(l, heads * lanes);
    grow(st, tile_keys * ldq);
    grow(alpha, lanes);
    grow(limit, lanes);
    grow(k, pairs ? 0 : kKeyTile * heads * head_dim);
    grow(v, pairs ? 0 : kKeyTile * heads * head_dim);
    grow(pad, amx ? 16 * head_dim : 0);
    grow(vp, pairs ? heads * head_dim * tile_keys / 2 : 0);
    grow(pp, pairs ? tile_keys / 2 * ldq : 0);
  }
  // The sanitized test build (TRELLIS_EXACT_WORKSPACE, with libstdc++'s vector annotations) sizes
  // each buffer to exactly this item's need, so an access past it is caught after a larger item too.
  template <typename E>
  static void grow(std::vector<E>& v, int64_t n) {
#ifdef TRELLIS_EXACT_WORKSPACE
    v.resize(n);
#else
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
#endif
  }
};

// Where a bf16 item's scores come from (attention_tile.h): AMX tiles where the CPU has AMX-BF16 and
// head_dim is a multiple of 32, else AVX512_BF16's dot products where it has those (head_dim a
// multiple of 16), P @ V on the same units; items of few rows take key lanes on either.
// On AVX512_BF16, items of at most kKeyLaneRows rows (decode's) take key lanes, the rest the
// row-vector layout. Two threads, SmolLM2's heads (3 rows a KV head per decode token), hot caches:
// one session over 512 keys 17.7-18.7 against 26-32 us, two over 448 shared keys (6 rows) 29
// against 31-37; TinyLlama's 8 rows level (42 against 39-46); 9 rows 10 % and 12 rows 20 % slower
// than the row-vector layout.
// On AMX a tile multiply costs the same for 1 to 16 rows, so key lanes win only at the fewest:
// on the 2-core AMX Xeon, four sessions over 512 keys of three KV heads (D = 64), hot caches, the
// tiles take 65-72 us at every row count from 1 to 8, key lanes 40, 51, 63, 76 and 127 us at 1,
// 2, 3, 4 and 8 rows; SmolLM2's four-session decode step is 0.5-0.8 ms faster (of ~16 ms).
constexpr int64_t kKeyLaneRows = 8;
constexpr int64_t kAmxKeyLaneRows = 3;

template <typename T>
Scores item_scores(int64_t head_dim, int64_t rows) {
#if defined(TRELLIS_BF16_DOTS)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // AMX items round their probabilities with AVX512_BF16's conversion, which every AMX CPU has.
    if (head_dim % 16 == 0 && dpbf16_usable()) {
      const bool tiles = head_dim % 32 == 0 && amx_bf16_usable();
      if (rows <= (tiles ? kAmxKeyLaneRows : kKeyLaneRows)) return Scores::key_lanes;
      return tiles ? Scores::amx : Scores::dpbf16;
    }
  }
#endif
  return Scores::vectors;
}

// How one item's rows sit in the workspace (see attention_tile.h for ldq and lanes).
struct ItemLayout {
  int64_t heads, rows, ldq, lanes;
  Scores scores;
  // A tile's runs (KeyRun) at most: on AMX, several for more than a vector of rows (attend_tiles);
  // decode's few rows keep one, as longer tiles' V^T pairs outgrow L1 for them.
  int64_t tile_runs;

  // `pairs`: whether few rows may take the paired layout (which sums a score in another order).
  ItemLayout(const WorkItem& w, int64_t group, int64_t head_dim, Scores scores, bool pairs)
      : heads(w.kv_heads),
        rows(w.q_tokens * group),
        ldq(scores == Scores::vectors     ? (pairs ? score_stride(rows, head_dim) : row_vectors(rows))
            : scores == Scores::key_lanes ? rows
                                          : row_vectors(rows)),
        lanes(scores == Scores::key_lanes ? rows : stat_lanes(ldq)),
        scores(scores),
        tile_runs(scores == Scores::amx && ldq > Vec::size() ? kAmxTileRuns : 1) {}

  bool pairs() const { return scores != Scores::vectors; }  // Q^T, P and V in bf16 pairs, K read in place
  // acc^T [D][ldq]: P @ V on AMX tiles, or fp32 vectors in row vectors (pv_accumulate_columns).
  bool transposed() const { return scores == Scores::amx || (scores == Scores::vectors && ldq >= Vec::size()); }
  bool key_lanes() const { return scores == Scores::key_lanes; }  // scores and P [rows][tile keys]
  int64_t tile_keys() const { return tile_runs * kKeyTile; }  // a tile's keys at most
  // Where the softmax leaves the probabilities' bf16 key pairs for P @ V: a row's next pair
  // `pair_ld` on, the next row's `row_ld` (key lanes: [rows][tile keys / 2]; else [pairs][ldq]).
  int64_t pair_ld() const { return key_lanes() ? 1 : ldq; }
  int64_t row_ld() const { return key_lanes() ? tile_keys() / 2 : 1; }

  // Where row r's d of head hi accumulates.
  int64_t acc_index(int64_t hi, int64_t r, int64_t d, int64_t head_dim) const {
    return transposed() ? (hi * head_dim + d) * ldq + r : (hi * rows + r) * head_dim + d;
  }
};

// Keys that lie evenly spaced in the cache: at most kKeyTile, within one block, from cache slot
// `slot` on.
struct KeyRun {
  int64_t slot, n;
};

// Loads one word of every cache line of `n` keys' K and V rows (`run_bytes` each, `ld_bytes`
// apart), in address order. The bf16 pairs path then reads them per head: K strided by the other
// heads, V per head for its pairs. From DRAM those strided reads keep few misses in flight; loads
// in order do. Decode over 4 sessions sharing 448 keys, SmolLM2's heads, each layer's cache cold
// as in a model: 84 against 106 us a layer on 2 threads, 141-143 against 175 on one; a cached
// tile costs ~a hundred L1 hits.
template <typename T>
void touch_run(const T* k, const T* v, int64_t n, int64_t run_bytes, int64_t ld_bytes) {
  const char* kb = reinterpret_cast<const char*>(k);
  const char* vb = reinterpret_cast<const char*>(v);
  int64_t sink = 0;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t byte = 0; byte < run_bytes; byte += 64) {
      sink += *reinterpret_cast<const volatile int64_t*>(kb + j * ld_bytes + byte);
      sink += *reinterpret_cast<const volatile int64_t*>(vb + j * ld_bytes + byte);
    }
  }
  asm volatile("" : : "r"(sink));  // the loads are the point
}

// Prefetches (into L2) part `part` of `parts` of the K and V lines that the heads h0 .. h0+L.heads
// of a tile's runs lie in: what touch_run loads when the tile is staged. Items with bf16 scores
// fetch the next tile this way, a part before each head's products, so that the misses stay in
// flight while the units work; one burst of the whole tile (~400 lines for SmolLM2) stalls the core
// until most of them have come (SmolLM2's four-session bf16 decode attention ~6 % slower that way
// on the AMD EPYC); prefill takes the same time either way.
template <typename T>
void prefetch_tile_part(const Problem<T>& p, const KeyRun* runs, int64_t count, int64_t h0, const ItemLayout& L,
                        int64_t part, int64_t parts) {
  const int64_t key_lines = (L.heads * p.head_dim * static_cast<int64_t>(sizeof(T)) + 63) / 64;  // a key's heads
  const int64_t ld_bytes = p.kv_heads * p.head_dim * static_cast<int64_t>(sizeof(T));
  int64_t lines = 0;
  for (int64_t r = 0; r < count; ++r) lines += runs[r].n * key_lines;
  const int64_t from = lines * part / parts, to = lines * (part + 1) / parts;
  for (int64_t r = 0, first = 0; r < count && first < to; first += runs[r++].n * key_lines) {
    const char* k = reinterpret_cast<const char*>(p.k_cache + (runs[r].slot * p.kv_heads + h0) * p.head_dim);
    const char* v = reinterpret_cast<const char*>(p.v_cache + (runs[r].slot * p.kv_heads + h0) * p.head_dim);
    const int64_t end = std::min(to - first, runs[r].n * key_lines);
    for (int64_t i = std::max<int64_t>(0, from - first); i < end;) {  // line i: key i / key_lines
      const int64_t key = i / key_lines, line = i % key_lines, last = std::min(key_lines, line + end - i);
      for (int64_t c = line; c < last; ++c) {
        __builtin_prefetch(k + key * ld_bytes + c * 64, 0, 2);
        __builtin_prefetch(v + key * ld_bytes + c * 64, 0, 2);
      }
      i += last - line;
    }
  }
}

// Copies (as fp32) the K/V rows of heads h0 .. h0+heads of a run of keys into the staged tile
// [n][heads][D] at the run's `offset` in the tile, and prefetches (into L2) those of the `next`
// run. Items whose scores come from bf16 pairs read K in place and stage V as bf16 key pairs
// instead (AMX: V^T per head), after loading the run's lines in order (touch_run); their next
// tile comes from prefetch_tile_part.
// Decode reads every byte of K/V once, from DRAM, so this is where its time goes: each key's
// heads are read as one run, key after key, which keeps the reads sequential within a block; the
// prefetch covers the jump to the next block, which a scattered block table makes unguessable,
// and interleaving it with the copy keeps the memory system busy without stalling on a burst.
// (Reading the cache in place instead saves the copy, about 20% on cache-resident data, but
// costs more than that once the data comes from DRAM, which in a model is every call: the other
// layers evict it. bf16 scores read K in place all the same: they have no fp32 copy to make.)
template <typename T>
void stage_tile(const Problem<T>& p, const KeyRun& keys, const KeyRun& next, int64_t offset, int64_t h0,
                const ItemLayout& L, Workspace& ws) {
  const int64_t run = L.heads * p.head_dim, ld = p.kv_heads * p.head_dim;
  const int64_t run_bytes = run * static_cast<int64_t>(sizeof(T)), ld_bytes = ld * static_cast<int64_t>(sizeof(T));
  const T* k = p.k_cache + (keys.slot * p.kv_heads + h0) * p.head_dim;
  const T* v = p.v_cache + (keys.slot * p.kv_heads + h0) * p.head_dim;
  if (!L.pairs()) {
    const char* k_next = reinterpret_cast<const char*>(p.k_cache + (next.slot * p.kv_heads + h0) * p.head_dim);
    const char* v_next = reinterpret_cast<const char*>(p.v_cache + (next.slot * p.kv_heads + h0) * p.head_dim);
    for (int64_t j = 0; j < std::max(keys.n, next.n); ++j) {
      for (int64_t byte = 0; j < next.n && byte < run_bytes; byte += 64) {
        __builtin_prefetch(k_next + j * ld_bytes + byte, 0, 2);
        __builtin_prefetch(v_next + j * ld_bytes + byte, 0, 2);
      }
      if (j < keys.n) {
        to_float(k + j * ld, ws.k.data() + (offset + j) * run, run);
        to_float(v + j * ld, ws.v.data() + (offset + j) * run, run);
      }
    }
    return;
  }
  touch_run(k, v, keys.n, run_bytes, ld_bytes);
#if defined(TRELLIS_BF16_DOTS)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t ldp = L.tile_keys() / 2;
    for (int64_t hi = 0; hi < L.heads; ++hi) {
      const c10::BFloat16* vh = v + hi * p.head_dim;
      if (L.scores == Scores::amx) {
        value_pairs(vh, ld, keys.n, p.head_dim, ws.vp.data() + hi * p.head_dim * ldp + offset / 2, ldp);
      } else {
        value_key_pairs(vh, ld, keys.n, p.head_dim, ws.vp.data() + (offset / 2 * L.heads + hi) * p.head_dim, run);
      }
    }
    return;
  }
#endif
  TORCH_CHECK(false, "V pairs are only staged for bf16 caches on AMX-BF16 or AVX512_BF16");
}

// Q^T per head (padding lanes zero): fp32 and pre-scaled, or bf16 pairs as they are for bf16
// scores (which scale the sums). Each lane's causal limit (padding lanes take the last
// row's), and fresh running statistics.
template <typename T>
void begin_item(const Problem<T>& p, const WorkItem& w, const ItemLayout& L, Workspace& ws) {
  const int64_t D = p.head_dim;
  if (L.key_lanes()) {
    for (int64_t hi = 0; hi < L.heads; ++hi)
      for (int64_t r = 0; r < L.rows; ++r)
        std::memcpy(ws.qp.data() + (hi * L.rows + r) * D / 2, p.q + p.q_offset(w, w.kv_head + hi, r), D * sizeof(T));
  } else if (L.pairs()) {
    std::fill(ws.qp.begin(), ws.qp.begin() + L.heads * D / 2 * L.ldq, 0u);
    for (int64_t hi = 0; hi < L.heads; ++hi) {
      uint32_t* qp = ws.qp.data() + hi * D / 2 * L.ldq;
      for (int64_t r = 0; r < L.rows; ++r) {
        const T* q = p.q + p.q_offset(w, w.kv_head + hi, r);
        for (int64_t m = 0; m < D / 2; ++m) std::memcpy(qp + m * L.ldq + r, q + 2 * m, sizeof(uint32_t));
      }
    }
  } else {
    std::fill(ws.qt.begin(), ws.qt.begin() + L.heads * D * L.ldq, 0.f);
    for (int64_t hi = 0; hi < L.heads; ++hi) {
      float* qt = ws.qt.data() + hi * D * L.ldq;
      for (int64_t r = 0; r < L.rows; ++r) {
        const T* q = p.q + p.q_offset(w, w.kv_head + hi, r);
        for (int64_t d = 0; d < D; ++d) qt[qt_index(r, d, L.ldq)] = p.scale * static_cast<float>(q[d]);
      }
    }
  }
  for (int64_t lane = 0; lane < L.lanes; ++lane)
    ws.limit[lane] = static_cast<float>(w.first_limit + std::min(lane % L.ldq, L.rows - 1) / p.group);
  std::fill(ws.m.begin(), ws.m.begin() + L.heads * L.lanes, -std::numeric_limits<float>::infinity());
  std::fill(ws.l.begin(), ws.l.begin() + L.heads * L.lanes, 0.f);
  std::fill(ws.acc.begin(), ws.acc.begin() + L.heads * (L.transposed() ? L.ldq : L.rows) * D, 0.f);
}

// Whether scores from bf16 pairs are scaled in softmax_tile, after their max (which a positive
// scale commutes with, rounding being monotonic), rather than by score_pairs before it.
template <typename T>
bool scaled_after_max(const Problem<T>& p) {
  return p.scale > 0.f;
}

// Scores [keys.n][ldq] at st (key lanes: [ldq][tile keys]) of a run of keys against KV head `h`'s
// query rows qp, from bf16 pairs over K as it lies in the cache (item_scores; AMX tiles
// configured); scaled here only where the softmax does not scale them (scaled_after_max).
template <typename T>
void score_pairs(const Problem<T>& p, const ItemLayout& L, const KeyRun& keys, int64_t h, const uint32_t* qp,
                 float* st, Workspace& ws) {
#if defined(TRELLIS_BF16_DOTS)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t ld = p.kv_heads * p.head_dim;
    const c10::BFloat16* k = p.k_cache + (keys.slot * p.kv_heads + h) * p.head_dim;
    if (L.scores == Scores::amx) {
      qk_scores_amx(qp, L.ldq, k, ld, keys.n, p.head_dim, ws.pad.data(), st);
    } else if (L.key_lanes()) {
      key_lane_scores(reinterpret_cast<const c10::BFloat16*>(qp), L.rows, k, ld, keys.n, p.head_dim, st,
                      L.tile_keys());
    } else {
      qk_scores_dpbf16(qp, L.ldq, k, ld, keys.n, p.head_dim, st);
    }
    if (scaled_after_max(p)) return;
    const Vec scale(p.scale);
    const int64_t scored = L.key_lanes() ? L.rows * L.tile_keys() : keys.n * L.ldq;
    return at::vec::map([scale](Vec x) { return x * scale; }, st, st, scored);
  }
#endif
  TORCH_CHECK(false, "bf16 scores are only planned for bf16 caches on AMX-BF16 or AVX512_BF16");
}

// The factor softmax_tile applies to the scores: the scale where they come unscaled from bf16
// pairs (scaled_after_max), else 1 (score_pairs scaled them, or fp32 scores' queries were).
template <typename T>
float softmax_scale(const Problem<T>& p, const ItemLayout& L) {
  return L.pairs() && scaled_after_max(p) ? p.scale : 1.f;
}

// The accumulator of head hi += P @ V for items with bf16 scores: the probabilities of the
// tile's n keys as bf16 pairs (from softmax_tile) against V's pairs (staged by stage_tile), on
// AMX tiles (acc^T) or AVX512_BF16's dot products.
template <typename T>
void values_from_pairs(const ItemLayout& L, int64_t hi, int64_t n, int64_t head_dim, Workspace& ws) {
#if defined(TRELLIS_BF16_DOTS)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (L.scores == Scores::amx)
      return pv_accumulate_amx(ws.vp.data() + hi * head_dim * L.tile_keys() / 2, L.tile_keys(), ws.pp.data(), L.ldq,
                               ws.alpha.data(), whole_runs(n), head_dim, ws.acc.data() + hi * head_dim * L.ldq);
    return pv_accumulate_pairs(ws.pp.data(), L.pair_ld(), L.row_ld(), ws.alpha.data(), ws.vp.data() + hi * head_dim,
                               L.heads * head_dim, n, L.rows, head_dim, ws.acc.data() + hi * L.rows * head_dim);
  }
#endif
  TORCH_CHECK(false, "P @ V from bf16 pairs is only planned for bf16 caches on AMX-BF16 or AVX512_BF16");
}

// softmax_tile for key-lane items (key_lane_softmax): scores and probabilities [rows][tile keys].
inline void softmax_key_lanes(const ItemLayout& L, int64_t n, int64_t key0, float scale, float* m, float* l,
                              Workspace& ws) {
#if defined(TRELLIS_BF16_DOTS)
  key_lane_softmax(ws.st.data(), L.tile_keys(), L.rows, n, key0, ws.limit.data(), scale, m, l, ws.alpha.data(),
                   ws.pp.data(), L.row_ld());
#else
  TORCH_CHECK(false, "key lanes are only planned for bf16 caches on AVX512_BF16");
#endif
}

// The item's key range, tile by tile. A tile is one run of keys (KeyRun), or on AMX up to
// kAmxTileRuns of them while each before the last is whole: its runs then start kKeyTile keys
// apart in the tile, where the pairs of P @ V and the 16-key blocks of the scores stay aligned.
// Longer tiles take the accumulator tiles' loads and stores and its rescaling once per 128 keys.
template <typename T>
void attend_tiles(const Problem<T>& p, const WorkItem& w, const ItemLayout& L, Workspace& ws) {
  const int64_t D = p.head_dim;
  const int32_t* blocks = p.block_table + w.seq * p.max_blocks;
  auto run_at = [&](int64_t key) -> KeyRun {  // up to kKeyTile keys from `key` (< kv_end), in its block and the item
    // Checked again here (one compare a run): a plan trusts the block table it was made for, and a
    // write that bypasses the version counter (through .data, or NumPy) would reach outside the cache.
    const int64_t index = key / p.block_size, block = index < p.max_blocks ? blocks[index] : -1;
    TORCH_CHECK_VALUE(block >= 0 && block < p.num_blocks, "paged_attention: block ", index, " of sequence ", w.seq,
                      " is ", block, ", outside the cache (", p.num_blocks, " blocks): the block table or the plan "
                      "changed after the plan was made, unseen by their version counters");
    return {block * p.block_size + key % p.block_size,
            std::min<int64_t>({kKeyTile, w.kv_end - key, p.block_size - key % p.block_size})};
  };
  struct Tile {
    KeyRun runs[kAmxTileRuns];
    int64_t count = 0, n = 0;  // none past the item's keys
  };
  auto tile_at = [&](int64_t key0) {
    Tile t;
    while (key0 + t.n < w.kv_end && t.count < L.tile_runs && (t.count == 0 || t.runs[t.count - 1].n == kKeyTile)) {
      t.runs[t.count] = run_at(key0 + t.n);
      t.n += t.runs[t.count++].n;
    }
    return t;
  };
  const float scale = softmax_scale(p, L);
  int64_t key0 = w.kv_begin;
  for (Tile tile = tile_at(key0); tile.count > 0;) {
    const Tile next = tile_at(key0 + tile.n);
    const int64_t n = tile.n;
    const bool masked = key0 + n > w.first_limit;  // some row's causal limit falls in this tile
    for (int64_t r = 0; r < tile.count; ++r)  // (fp32 staging: fetching the next tile's keys meanwhile)
      stage_tile(p, tile.runs[r], r < next.count ? next.runs[r] : KeyRun{0, 0}, r * kKeyTile, w.kv_head, L, ws);
    for (int64_t hi = 0; hi < L.heads; ++hi) {  // head hi's key j: staged row j, offset hi * D
      float *m = ws.m.data() + hi * L.lanes, *l = ws.l.data() + hi * L.lanes;
      if (L.pairs()) {
        prefetch_tile_part(p, next.runs, next.count, w.kv_head, L, hi, L.heads);
        for (int64_t r = 0; r < tile.count; ++r)
          score_pairs(p, L, tile.runs[r], w.kv_head + hi, ws.qp.data() + hi * D / 2 * L.ldq,
                      ws.st.data() + r * kKeyTile * L.ldq, ws);
      } else {
        qk_scores(ws.qt.data() + hi * D * L.ldq, L.ldq, ws.k.data() + hi * D, L.heads * D, n, D, ws.st.data());
      }
      if (L.key_lanes()) {
        softmax_key_lanes(L, n, key0, scale, m, l, ws);
      } else {
        softmax_tile(ws.st.data(), L.ldq, n, key0, masked, ws.limit.data(), scale, m, l, ws.alpha.data(),
                     L.pairs() ? ws.pp.data() : nullptr);
      }
      if (L.pairs()) {
        values_from_pairs<T>(L, hi, n, D, ws);
      } else if (L.transposed()) {
        pv_accumulate_columns(ws.st.data(), L.ldq, ws.alpha.data(), ws.v.data() + hi * D, L.heads * D, n, D,
                              ws.acc.data() + hi * D * L.ldq);
      } else {
        pv_accumulate(ws.st.data(), L.ldq, ws.alpha.data(), ws.v.data() + hi * D, L.heads * D, n, L.rows, D,
                      ws.acc.data() + hi * L.rows * D);
      }
    }
    key0 += n;
    tile = next;
  }
}

// Normalised rows to `out`, or (split items) to the split scratch with their log-sum-exps.
template <typename T>
void finish_item(const Problem<T>& p, const WorkItem& w, const ItemLayout& L, const Workspace& ws) {
  const int64_t D = p.head_dim;
  for (int64_t i = 0; i < L.heads * L.rows; ++i) {  // i = hi * rows + r
    const int64_t hi = i / L.rows, r = i % L.rows;
    const float* lane_sums = ws.l.data() + hi * L.lanes;
    const float l = L.lanes > L.ldq ? lane_sums[r] + lane_sums[r + L.ldq] : lane_sums[r];  // paired: 2 slots
    const float inv = l > 0.f ? 1.f / l : 0.f;  // l == 0: a split wholly past this row's causal limit
    auto acc = [&](int64_t d) { return ws.acc[L.acc_index(hi, r, d, D)]; };
    if (w.partial < 0) {
      T* o = p.out + p.q_offset(w, w.kv_head + hi, r);
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc(d) * inv);
    } else {
      const int64_t slot = w.partial * p.partial_rows + i;
      for (int64_t d = 0; d < D; ++d) p.partial_out[slot * D + d] = acc(d) * inv;
      p.partial_lse[slot] = l > 0.f ? ws.m[hi * L.lanes + r] + std::log(l) : -INFINITY;
    }
  }
}

template <typename T>
void run_item(const Problem<T>& p, const WorkItem& w, Workspace& ws) {
  // A batch-invariant plan's rows all take fp32 row vectors, where a row's score, softmax and
  // P @ V run lane by lane in one order however many rows share the item.
  const ItemLayout layout(w, p.group, p.head_dim,
                          p.batch_invariant ? Scores::vectors : item_scores<T>(p.head_dim, w.q_tokens * p.group),
                          !p.batch_invariant);
  ws.reserve(layout.heads, layout.ldq, layout.lanes, p.head_dim, layout.tile_keys(), layout.scores);
  begin_item(p, w, layout, ws);
#if defined(TRELLIS_BF16_DOTS)
  // Per item: other code (oneDNN) may use the tiles in between.
  if (layout.scores == Scores::amx) configure_product_tiles();
#endif
  attend_tiles(p, w, layout, ws);
#if defined(TRELLIS_BF16_DOTS)
  if (layout.scores == Scores::amx) release_tiles();
#endif
  finish_item(p, w, layout, ws);
}

// out = sum_s exp(lse_s - max) * o_s / sum_s exp(lse_s - max), per row, over the group's parts.
template <typename T>
void merge_splits(const Problem<T>& p, const SplitGroup& g, const MergePart* parts, std::vector<float>& row) {
  const WorkItem& w = g.base;
  const int64_t D = p.head_dim, rows = w.q_tokens * p.group;
  row.resize(D);
  auto slot_of = [&](const MergePart& part, int64_t i) {  // the part's row for the group's row i
    return part.partial * p.partial_rows + i / rows * part.rows + part.offset + i % rows;
  };
  for (int64_t i = 0; i < w.kv_heads * rows; ++i) {
    float max_lse = -INFINITY;
    for (int64_t s = 0; s < g.count; ++s) max_lse = std::max(max_lse, p.partial_lse[slot_of(parts[s], i)]);
    std::fill(row.begin(), row.end(), 0.f);
    float total = 0.f;
    for (int64_t s = 0; s < g.count; ++s) {
      const int64_t slot = slot_of(parts[s], i);
      const float weight = std::exp(p.partial_lse[slot] - max_lse);
      total += weight;
      const Vec wv(weight);
      at::vec::map2([wv](Vec acc, Vec o) { return at::vec::fmadd(wv, o, acc); }, row.data(), row.data(),
                    p.partial_out + slot * D, D);
    }
    T* o = p.out + p.q_offset(w, w.kv_head + i / rows, i % rows);
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(row[d] / total);
  }
}

// Runs f(i) for i in [0, n) on `threads` threads, each taking the next index from a shared counter.
template <typename F>
void parallel_pull(int64_t n, int64_t threads, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(n, threads), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i);
  });
}

// The head counts, before anything divides by them.
void check_heads(int64_t num_q_heads, const at::Tensor& k_cache) {
  TORCH_CHECK(k_cache.size(2) > 0 && k_cache.size(3) > 0, "the cache needs a KV head and a head_dim of 1 or more, got ",
              k_cache.sizes());
  TORCH_CHECK(num_q_heads > 0, "q needs a query head, got ", num_q_heads);
  TORCH_CHECK(num_q_heads % k_cache.size(2) == 0, "query heads ", num_q_heads, " not a multiple of KV heads ",
              k_cache.size(2));
}

// The arguments every call checks (the batch description: check_sequence_tensors).
void check_arguments(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& out) {
  check_kv_cache(k_cache, v_cache);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "paged_attention supports float32, float16 and bfloat16, got ", dtype);
  TORCH_CHECK(q.dim() == 3, "q must be [T, Hq, D], got ", q.sizes());
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "q and out must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == dtype, "out must match q in shape and dtype");
  TORCH_CHECK(k_cache.scalar_type() == dtype, "q dtype ", dtype, " != cache dtype ", k_cache.scalar_type());
  TORCH_CHECK(q.size(2) == k_cache.size(3), "q head_dim ", q.size(2), " != cache head_dim ", k_cache.size(3));
  check_heads(q.size(1), k_cache);
  TORCH_CHECK(q.device().is_cpu() && out.device().is_cpu(), "paged_attention tensors must all be on the CPU");
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
         double scale, const at::Tensor& out, const WorkPlan& plan) {
  const int64_t kv_heads = k_cache.size(2), group = q.size(1) / kv_heads;
  Problem<T> p{q.const_data_ptr<T>(), k_cache.const_data_ptr<T>(), v_cache.const_data_ptr<T>(), out.data_ptr<T>(),
               block_table.const_data_ptr<int32_t>(), block_table.size(1), q.size(1), kv_heads, group, q.size(2),
               k_cache.size(1), static_cast<float>(scale), plan.partial_rows, nullptr, nullptr, k_cache.size(0),
               plan.batch_invariant};
  at::Tensor scratch;
  if (plan.partials > 0) {  // [partials, partial_rows, D] outputs, then [partials, partial_rows] log-sum-exps
    scratch = at::empty({plan.partials * p.partial_rows * (p.head_dim + 1)}, q.options().dtype(at::kFloat));
    p.partial_out = scratch.data_ptr<float>();
    p.partial_lse = p.partial_out + plan.partials * p.partial_rows * p.head_dim;
  }
  parallel_pull(static_cast<int64_t>(plan.items.size()), plan.threads, [&](int64_t i) {
    thread_local Workspace ws;
    run_item(p, plan.items[i], ws);
  });
  parallel_pull(static_cast<int64_t>(plan.splits.size()), plan.threads, [&](int64_t i) {
    thread_local std::vector<float> row;
    merge_splits(p, plan.splits[i], plan.parts.data() + plan.splits[i].first_part, row);
  });
}

void paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                         double scale, const at::Tensor& out, const std::optional<at::Tensor>& plan) {
  check_arguments(q, k_cache, v_cache, out);
  check_sequence_tensors(block_table, seq_lens, cu_seqlens_q);
  const PlanFacts facts = facts_of(q.size(0), q.size(1), k_cache, block_table, seq_lens, cu_seqlens_q);
  WorkPlan work;
  if (plan.has_value()) work = decode_plan(*plan, facts);  // refuses a plan made for other tensors
  if (!plan.has_value() || !facts.tracked())  // (a plan over inference tensors: planned again, as it was asked for)
    work = make_plan(facts, block_table, seq_lens, cu_seqlens_q, work.batch_invariant);
  switch (q.scalar_type()) {
    case at::kFloat: return run<float>(q, k_cache, v_cache, block_table, scale, out, work);
    case at::kHalf: return run<at::Half>(q, k_cache, v_cache, block_table, scale, out, work);
    default: return run<at::BFloat16>(q, k_cache, v_cache, block_table, scale, out, work);
  }
}

// Validates the sequences and cuts their work, for every layer of one forward. max_q_len and
// max_kv_len are not needed here, but must be right: the Triton backend sizes its grid by them.
at::Tensor plan_paged_attention_cpu(const at::Tensor& k_cache, const at::Tensor& block_table,
                                    const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q, int64_t num_q_heads,
                                    int64_t max_q_len, int64_t max_kv_len, bool batch_invariant) {
  check_sequence_tensors(block_table, seq_lens, cu_seqlens_q);
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, Hkv, D], got ", k_cache.sizes());
  check_heads(num_q_heads, k_cache);
  const int64_t batch = block_table.size(0);
  const int32_t* cu = cu_seqlens_q.const_data_ptr<int32_t>();
  const int32_t* kv_lens = seq_lens.const_data_ptr<int32_t>();
  const PlanFacts facts = facts_of(cu[batch], num_q_heads, k_cache, block_table, seq_lens, cu_seqlens_q);
  const WorkPlan work = make_plan(facts, block_table, seq_lens, cu_seqlens_q, batch_invariant);
  int64_t longest_q = 0, longest_kv = 0;
  for (int64_t s = 0; s < batch; ++s) {
    longest_q = std::max<int64_t>(longest_q, cu[s + 1] - cu[s]);
    longest_kv = std::max<int64_t>(longest_kv, kv_lens[s]);
  }
  TORCH_CHECK(max_q_len == longest_q && max_kv_len == longest_kv, "max_q_len, max_kv_len = ", max_q_len, ", ",
              max_kv_len, " but the longest query and context are ", longest_q, ", ", longest_kv);
  return encode_plan(facts, work);
}

}  // namespace

TORCH_LIBRARY_IMPL(trellis_cpp, CPU, m) {
  m.impl("paged_attention", &paged_attention_cpu);
  m.impl("plan_paged_attention", &plan_paged_attention_cpu);
}

}  // namespace trellis
