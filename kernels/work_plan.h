// How one paged_attention call is cut into work items for the CPU threads.
//
// An item is (sequence, query tile, group of KV heads, key range). It runs every query head of
// its KV heads, so each K/V row is read once per GQA group. It holds several KV heads when their
// rows fit (decode), so it reads a cache block as one contiguous stretch rather than one head's
// 1/Hkv slices of it (measured here: one head's slices stream at ~60% of the contiguous rate).
// Decode tokens of consecutive sequences whose block tables begin with the same blocks (sessions
// sharing a cached prompt) run those keys as one item whose rows are every session's ("shared
// prefix" items, as cascade attention does on GPUs): the shared K/V are read and staged once for
// all of them, and the score and P @ V products fill more SIMD lanes; each session's own keys are
// an item of their own, and the pieces are merged by their log-sum-exps. When the items are too
// few to keep every thread busy (decode of a few sequences), key ranges are split ("flash
// decoding"): split items leave normalised partial outputs and their log-sum-exps, merged
// afterwards. Threads pull items costliest first.
//
// A batch-invariant plan sums each query row in one order whatever else the call holds: no
// shared-prefix items, and every item's keys split at the same absolute positions (multiples of
// kInvariantSplitKeys), whatever the thread count. A row's keys then fall into the same pieces,
// tile for tile, in a decode step and in a prefill (where a piece past a row's causal limit adds
// nothing: its weight is exp(-inf) = 0), and merging one piece gives back its output exactly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace trellis {

constexpr int64_t kItemsPerThread = 4;  // split keys until there are this many items per thread
constexpr int64_t kMinSplitKeys = 256;  // ... but never into chunks shorter than this
constexpr int64_t kMinSharedKeys = 32;  // shared prefixes shorter than this run per sequence
constexpr int64_t kInvariantSplitKeys = 256;  // a batch-invariant plan's key pieces

struct WorkItem {
  int64_t seq;          // the sequence whose block table the item reads
  int64_t kv_head;      // first KV head
  int64_t kv_heads;     // KV heads in the item
  int64_t q_begin;      // packed index of the tile's first query token
  int64_t q_tokens;     // query tokens in the tile (a shared-prefix item: one per sequence sharing it)
  int64_t first_limit;  // keys visible to the tile's first token; token i sees first_limit + i
  int64_t kv_begin;
  int64_t kv_end;
  int64_t partial;      // slot in the split scratch, or -1: the item writes `out` itself
};

// One partial output of a merged group: its slot, and where the group's rows lie in it. An item's
// slot holds row r of its KV head hi at hi * rows + r (rows: the item's query rows per KV head);
// the group's row r of its KV head hi is the slot's row hi * rows + offset + r.
struct MergePart {
  int64_t partial;
  int64_t rows;
  int64_t offset;
};

// The rows of `base` (a query tile x KV heads, whose outputs it names) as the merge of partial
// outputs parts[first_part .. first_part + count): a key range split, or a shared prefix and a
// sequence's own keys.
struct SplitGroup {
  WorkItem base;
  int64_t first_part;
  int64_t count;
};

struct WorkPlan {
  std::vector<WorkItem> items;
  std::vector<SplitGroup> splits;
  std::vector<MergePart> parts;
  int64_t threads = 1;       // the threads the work was cut for
  int64_t partials = 0;      // items writing partial outputs
  int64_t partial_rows = 0;  // query rows of the largest of those
  bool batch_invariant = false;
};

// Keys [0, n) that sequences a and b read from the same cache slots: their leading common blocks.
inline int64_t common_keys(const int32_t* table, int64_t max_blocks, int64_t block_size, int64_t a, int64_t b,
                           int64_t n) {
  const int32_t *ta = table + a * max_blocks, *tb = table + b * max_blocks;
  int64_t blocks = 0;
  while (blocks * block_size < n && ta[blocks] == tb[blocks]) ++blocks;
  return std::min(n, blocks * block_size);
}

// A run of consecutive decode sequences [first, end) that share their first `keys` keys.
struct SharedRun {
  int64_t first, end, keys;
};

// Greedily, from each decode sequence on: the next decode sequences that share at least kMinSharedKeys
// keys with it, and then at least as many as the first two share (so the shared range never
// shrinks), as long as the run's rows fit an item. A sequence that shares less than half as many
// keys with the next as the next shares with the one after stays alone, so that those two start a
// longer shared run (sequences sorted by block ids: one with a short common prefix, the chat
// template's, before a group over one system prompt).
inline std::vector<SharedRun> shared_runs(const int32_t* cu_seqlens_q, const int32_t* seq_lens, const int32_t* table,
                                          int64_t max_blocks, int64_t block_size, int64_t batch, int64_t group,
                                          int64_t max_rows) {
  std::vector<SharedRun> runs;
  auto decode = [&](int64_t s) { return s < batch && cu_seqlens_q[s + 1] - cu_seqlens_q[s] == 1; };
  auto common = [&](int64_t a, int64_t b) {  // 0 unless both are decode sequences
    return decode(a) && decode(b)
               ? common_keys(table, max_blocks, block_size, a, b, std::min(seq_lens[a], seq_lens[b]))
               : int64_t{0};
  };
  for (int64_t s = 0; s < batch;) {
    int64_t end = s + 1;
    const int64_t keys = common(s, s + 1);
    if (keys >= kMinSharedKeys && 2 * keys >= common(s + 1, s + 2)) {
      while (end < batch && (end - s + 1) * group <= max_rows && common(s, end) >= keys) ++end;
      if (end - s > 1) runs.push_back({s, end, keys});
    }
    s = end;
  }
  return runs;
}

// The query tiles of a sequence's q_len new tokens (`group` rows each, at most `max_rows` rows a
// tile): how many tokens each holds. An item pads its rows to whole vectors of `lanes` rows and
// pays for every vector, full or not, so the fewest tiles that hold the tokens share the fewest
// vectors that do, evenly: SmolLM2's 51 tokens x 3 rows, 64 rows a tile, are 16 + 15 + 20 tokens
// in 3 + 3 + 4 vectors of 16 rows where 17 + 17 + 17 took 4 + 4 + 4. (Not as many full tiles as
// fit and a short last one: that would read and stage every key for a few rows.)
inline std::vector<int64_t> query_tiles(int64_t q_len, int64_t group, int64_t max_rows, int64_t lanes) {
  const int64_t tile_tokens = std::max<int64_t>(1, max_rows / group);
  const int64_t tiles = std::max<int64_t>(1, (q_len + tile_tokens - 1) / tile_tokens);
  std::vector<int64_t> tokens(tiles);
  // Ends by vecs = tiles * max_rows / lanes, where every tile holds tile_tokens.
  for (int64_t vecs = (q_len * group + lanes - 1) / lanes;; ++vecs) {
    int64_t total = 0;
    for (int64_t t = 0; t < tiles; ++t) {  // a tile of b vectors holds b * lanes / group tokens (one at least)
      const int64_t b = vecs * (t + 1) / tiles - vecs * t / tiles;
      tokens[t] = std::max<int64_t>(1, std::min(b * lanes, max_rows) / group);
      total += tokens[t];
    }
    if (total < q_len) continue;
    const int64_t spare = total - q_len;  // taken from the tiles evenly
    for (int64_t t = 0; t < tiles; ++t) tokens[t] -= spare * (t + 1) / tiles - spare * t / tiles;
    return tokens;
  }
}

// `max_rows`: query rows (tokens x query heads) one item may hold, in vectors of `lanes` rows;
// `max_heads`: KV heads whose staged tile fits the cache. `key_tile`: split points are multiples
// of it. `table`: the block table [batch, max_blocks] of blocks of `block_size` keys (which
// sequences share a prefix). `batch_invariant`: see above.
inline WorkPlan plan_work(const int32_t* cu_seqlens_q, const int32_t* seq_lens, const int32_t* table,
                          int64_t max_blocks, int64_t block_size, int64_t batch, int64_t kv_heads, int64_t group,
                          int64_t max_rows, int64_t lanes, int64_t max_heads, int64_t key_tile, int64_t threads,
                          bool batch_invariant) {
  WorkPlan plan;
  plan.threads = threads;
  plan.batch_invariant = batch_invariant;
  auto heads_for = [&](int64_t rows_per_head) {  // few rows (decode): several KV heads, read contiguously
    return std::clamp<int64_t>(max_rows / rows_per_head, 1, std::min(max_heads, kv_heads));
  };
  // Items before splitting. Those of a shared run write into the merged outputs of its sequences
  // (`into`): the shared-prefix item into every one of them, a sequence's own keys into its own.
  struct Base {
    WorkItem item;
    std::vector<std::pair<int64_t, int64_t>> into;  // (index in `merged`, offset of its rows in the item)
  };
  std::vector<Base> base;
  std::vector<WorkItem> merged;  // each decode token (x KV heads) of a shared run
  std::vector<std::vector<MergePart>> merged_parts;
  const std::vector<SharedRun> runs =
      batch_invariant ? std::vector<SharedRun>{}
                      : shared_runs(cu_seqlens_q, seq_lens, table, max_blocks, block_size, batch, group, max_rows);
  size_t next_run = 0;
  for (int64_t s = 0; s < batch;) {
    if (next_run < runs.size() && runs[next_run].first == s) {
      const SharedRun& run = runs[next_run++];
      const int64_t sessions = run.end - run.first, heads = heads_for(sessions * group);
      for (int64_t h = 0; h < kv_heads; h += heads) {
        const int64_t hs = std::min(heads, kv_heads - h);
        Base shared{{run.first, h, hs, cu_seqlens_q[run.first], sessions, run.keys, 0, run.keys, -1}, {}};
        for (int64_t m = run.first; m < run.end; ++m) {
          const int64_t out = static_cast<int64_t>(merged.size());
          merged.push_back({m, h, hs, cu_seqlens_q[m], 1, seq_lens[m], 0, seq_lens[m], -1});
          merged_parts.emplace_back();
          shared.into.push_back({out, (m - run.first) * group});
          if (seq_lens[m] > run.keys)  // its own keys: all but the shared ones
            base.push_back({{m, h, hs, cu_seqlens_q[m], 1, seq_lens[m], run.keys, seq_lens[m], -1}, {{out, 0}}});
        }
        base.push_back(std::move(shared));
      }
      s = run.end;
      continue;
    }
    const int64_t q_len = cu_seqlens_q[s + 1] - cu_seqlens_q[s], context = seq_lens[s] - q_len;
    if (q_len > 0) {
      const std::vector<int64_t> tiles = query_tiles(q_len, group, max_rows, lanes);
      const int64_t heads = heads_for(*std::max_element(tiles.begin(), tiles.end()) * group);
      int64_t t0 = 0;  // the tile's first token
      for (const int64_t tokens : tiles) {
        for (int64_t h = 0; h < kv_heads; h += heads)
          base.push_back({{s, h, std::min(heads, kv_heads - h), cu_seqlens_q[s] + t0, tokens, context + t0 + 1, 0,
                           context + t0 + tokens, -1}, {}});
        t0 += tokens;
      }
    }
    ++s;
  }
  auto add_group = [&](const WorkItem& output, const std::vector<MergePart>& parts) {  // an output merged from parts
    plan.splits.push_back({output, static_cast<int64_t>(plan.parts.size()), static_cast<int64_t>(parts.size())});
    plan.parts.insert(plan.parts.end(), parts.begin(), parts.end());
  };
  const int64_t wanted = kItemsPerThread * threads, have = std::max<int64_t>(1, base.size());
  const int64_t splits = threads > 1 ? (wanted + have - 1) / have : 1;
  for (const Base& b : base) {
    const WorkItem& w = b.item;
    const int64_t keys = w.kv_end - w.kv_begin;
    const int64_t per_split =
        batch_invariant ? kInvariantSplitKeys : std::max(kMinSplitKeys, (keys + splits - 1) / splits);
    const int64_t chunk = (per_split + key_tile - 1) / key_tile * key_tile;
    const int64_t count = splits == 1 && !batch_invariant ? 1 : (keys + chunk - 1) / chunk;
    if (count <= 1 && b.into.empty()) {
      plan.items.push_back(w);
      continue;
    }
    std::vector<MergePart> pieces;  // each leaves a partial output
    const int64_t rows = w.q_tokens * group;
    plan.partial_rows = std::max(plan.partial_rows, w.kv_heads * rows);
    for (int64_t c = 0; c < count; ++c) {
      WorkItem piece = w;
      piece.kv_begin = w.kv_begin + c * chunk;
      piece.kv_end = std::min(w.kv_end, w.kv_begin + (c + 1) * chunk);
      piece.partial = plan.partials++;
      plan.items.push_back(piece);
      pieces.push_back({piece.partial, rows, 0});
    }
    if (b.into.empty()) add_group(w, pieces);
    for (const auto& [out, offset] : b.into)
      for (const MergePart& piece : pieces) merged_parts[out].push_back({piece.partial, piece.rows, offset});
  }
  for (size_t out = 0; out < merged.size(); ++out) add_group(merged[out], merged_parts[out]);
  // Costliest first, so the last items to start are short ones and threads finish together.
  std::stable_sort(plan.items.begin(), plan.items.end(), [](const WorkItem& a, const WorkItem& b) {
    return a.q_tokens * a.kv_heads * (a.kv_end - a.kv_begin) > b.q_tokens * b.kv_heads * (b.kv_end - b.kv_begin);
  });
  return plan;
}

}  // namespace trellis
