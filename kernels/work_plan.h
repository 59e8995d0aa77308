// How one paged_attention call is cut into work items for the CPU threads.
//
// An item is (sequence, query tile, group of KV heads, key range). It runs every query head of
// its KV heads, so each K/V row is read once per GQA group. It holds several KV heads when their
// rows fit (decode), so it reads a cache block as one contiguous stretch rather than one head's
// 1/Hkv slices of it (measured here: one head's slices stream at ~60% of the contiguous rate).
// When the items are too few to keep every thread busy (decode of a few sequences), key ranges
// are split ("flash decoding"): split items leave normalised partial outputs and their
// log-sum-exps, merged afterwards. Threads pull items costliest first.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace trellis {

constexpr int64_t kItemsPerThread = 4;  // split keys until there are this many items per thread
constexpr int64_t kMinSplitKeys = 256;  // ... but never into chunks shorter than this

struct WorkItem {
  int64_t seq;
  int64_t kv_head;      // first KV head
  int64_t kv_heads;     // KV heads in the item
  int64_t q_begin;      // packed index of the tile's first query token
  int64_t q_tokens;     // query tokens in the tile
  int64_t first_limit;  // keys visible to the tile's first token; token i sees first_limit + i
  int64_t kv_begin;
  int64_t kv_end;
  int64_t partial;      // slot in the split scratch, or -1: the item writes `out` itself
};

// The split items of one base item: partial slots first_partial .. first_partial + count.
struct SplitGroup {
  WorkItem base;
  int64_t first_partial;
  int64_t count;
};

struct WorkPlan {
  std::vector<WorkItem> items;
  std::vector<SplitGroup> splits;
  int64_t threads = 1;       // the threads the work was cut for
  int64_t partials = 0;      // split items
  int64_t partial_rows = 0;  // query rows of the largest split item
};

// `max_rows`: query rows (tokens x query heads) one item may hold; `max_heads`: KV heads whose
// staged tile fits the cache. `key_tile`: split points are multiples of it.
inline WorkPlan plan_work(const int32_t* cu_seqlens_q, const int32_t* seq_lens, int64_t batch, int64_t kv_heads,
                          int64_t group, int64_t max_rows, int64_t max_heads, int64_t key_tile, int64_t threads) {
  WorkPlan plan;
  plan.threads = threads;
  const int64_t tile_tokens = std::max<int64_t>(1, max_rows / group);
  std::vector<WorkItem> base;
  for (int64_t s = 0; s < batch; ++s) {
    const int64_t q_len = cu_seqlens_q[s + 1] - cu_seqlens_q[s], context = seq_lens[s] - q_len;
    // Decode rows are few: give the item several KV heads (a contiguous read of each block).
    const int64_t rows_per_head = std::min(tile_tokens, std::max<int64_t>(1, q_len)) * group;
    const int64_t heads = std::clamp<int64_t>(max_rows / rows_per_head, 1, std::min(max_heads, kv_heads));
    for (int64_t t0 = 0; t0 < q_len; t0 += tile_tokens) {
      const int64_t tokens = std::min(tile_tokens, q_len - t0);
      for (int64_t h = 0; h < kv_heads; h += heads)
        base.push_back({s, h, std::min(heads, kv_heads - h), cu_seqlens_q[s] + t0, tokens, context + t0 + 1, 0,
                        context + t0 + tokens, -1});
    }
  }
  const int64_t wanted = kItemsPerThread * threads, have = std::max<int64_t>(1, base.size());
  const int64_t splits = threads > 1 ? (wanted + have - 1) / have : 1;
  for (const WorkItem& w : base) {
    const int64_t per_split = std::max(kMinSplitKeys, (w.kv_end + splits - 1) / splits);
    const int64_t chunk = (per_split + key_tile - 1) / key_tile * key_tile;
    const int64_t count = (w.kv_end + chunk - 1) / chunk;
    if (splits == 1 || count <= 1) {
      plan.items.push_back(w);
      continue;
    }
    plan.splits.push_back({w, plan.partials, count});
    plan.partial_rows = std::max(plan.partial_rows, w.kv_heads * w.q_tokens * group);
    for (int64_t c = 0; c < count; ++c) {
      WorkItem part = w;
      part.kv_begin = c * chunk;
      part.kv_end = std::min(w.kv_end, (c + 1) * chunk);
      part.partial = plan.partials++;
      plan.items.push_back(part);
    }
  }
  // Costliest first, so the last items to start are short ones and threads finish together.
  std::stable_sort(plan.items.begin(), plan.items.end(), [](const WorkItem& a, const WorkItem& b) {
    return a.q_tokens * a.kv_heads * (a.kv_end - a.kv_begin) > b.q_tokens * b.kv_heads * (b.kv_end - b.kv_begin);
  });
  return plan;
}

}  // namespace trellis
