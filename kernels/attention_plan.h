// The plan of trellis::paged_attention on CPU: made once per forward, used by every layer.
//
// Planning validates the sequences (query ranges, lengths, every block id the kernel will read)
// and cuts the work (work_plan.h) for the threads at::get_num_threads() gives. An encoded plan
// (an int64 tensor from trellis::plan_paged_attention) also records the facts it was validated
// against; with it, the kernel only checks those facts, in O(1): the shapes, and that
// block_table, seq_lens and cu_seqlens_q are the very tensors planned for (same data pointer,
// no in-place change since: same version counter); and that the plan's work stays inside those
// shapes (check_work, O(items)). So a plan is valid for one forward: while
// its tensors live and hold what they held. Inference tensors keep no version counter, so a plan
// cannot vouch for them: over those the kernel validates and plans again, as without a plan.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstring>

#include "attention_tile.h"
#include "work_plan.h"

namespace trellis {

constexpr int64_t kMaxRows = kMaxRowVecs * Vec::size();  // query rows (tokens x query heads) per work item
constexpr int64_t kStagedBytes = 32 * 1024;  // fp32 bytes of K (and of V) one staged tile may hold
constexpr int64_t kMinParallelWork = 1 << 18;  // ~20 us of work on one core

// What a plan was validated against.
struct PlanFacts {
  int64_t tokens, q_heads, batch, max_blocks, num_blocks, block_size, kv_heads, head_dim;
  int64_t table_ptr, table_version, lens_ptr, lens_version, cu_ptr, cu_version;  // version -1: an inference tensor

  bool tracked() const { return table_version >= 0 && lens_version >= 0 && cu_version >= 0; }
};

inline int64_t version_of(const at::Tensor& t) { return t.is_inference() ? -1 : t._version(); }

inline PlanFacts facts_of(int64_t tokens, int64_t q_heads, const at::Tensor& k_cache, const at::Tensor& block_table,
                          const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q) {
  auto address = [](const at::Tensor& t) { return reinterpret_cast<int64_t>(t.const_data_ptr()); };
  return {tokens, q_heads, block_table.size(0), block_table.size(1), k_cache.size(0), k_cache.size(1),
          k_cache.size(2), k_cache.size(3), address(block_table), version_of(block_table), address(seq_lens),
          version_of(seq_lens), address(cu_seqlens_q), version_of(cu_seqlens_q)};
}

inline void check_facts(const PlanFacts& planned, const PlanFacts& given) {
  const PlanFacts& p = planned;
  const PlanFacts& g = given;
  TORCH_CHECK(p.tokens == g.tokens && p.q_heads == g.q_heads && p.head_dim == g.head_dim, "the plan was made for q [",
              p.tokens, ", ", p.q_heads, ", ", p.head_dim, "], got [", g.tokens, ", ", g.q_heads, ", ", g.head_dim, "]");
  TORCH_CHECK(p.num_blocks == g.num_blocks && p.block_size == g.block_size && p.kv_heads == g.kv_heads,
              "the plan was made for a cache [", p.num_blocks, ", ", p.block_size, ", ", p.kv_heads, ", ", p.head_dim,
              "], got [", g.num_blocks, ", ", g.block_size, ", ", g.kv_heads, ", ", g.head_dim, "]");
  TORCH_CHECK(p.batch == g.batch && p.max_blocks == g.max_blocks, "the plan was made for a block_table [", p.batch,
              ", ", p.max_blocks, "], got [", g.batch, ", ", g.max_blocks, "]");
  auto check_same = [](int64_t p_ptr, int64_t p_version, int64_t g_ptr, int64_t g_version, const char* name) {
    TORCH_CHECK(p_ptr == g_ptr, "the plan was made for another ", name, " tensor");
    TORCH_CHECK(p_version == g_version, name, " changed in place after the plan was made (version ", p_version,
                ", now ", g_version, "): plan again");
  };
  check_same(p.table_ptr, p.table_version, g.table_ptr, g.table_version, "block_table");
  check_same(p.lens_ptr, p.lens_version, g.lens_ptr, g.lens_version, "seq_lens");
  check_same(p.cu_ptr, p.cu_version, g.cu_ptr, g.cu_version, "cu_seqlens_q");
}

// The dtypes and shapes of the batch description (its values: check_sequences).
inline void check_sequence_tensors(const at::Tensor& block_table, const at::Tensor& seq_lens,
                                   const at::Tensor& cu_seqlens_q) {
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.is_contiguous(),
              "block_table must be a contiguous int32 [B, max_blocks]");
  const int64_t batch = block_table.size(0);
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == batch,
              "seq_lens must be int32 [", batch, "]");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == batch + 1,
              "cu_seqlens_q must be int32 [", batch + 1, "]");
  // Read through their data pointers, as the block table is.
  TORCH_CHECK(seq_lens.is_contiguous() && cu_seqlens_q.is_contiguous(), "seq_lens and cu_seqlens_q must be contiguous");
  for (const at::Tensor* t : {&block_table, &seq_lens, &cu_seqlens_q})
    TORCH_CHECK(t->device().is_cpu(), "paged_attention tensors must all be on the CPU");
}

// The per-sequence values the kernel trusts: query ranges, lengths, and every used block id.
inline void check_sequences(const int32_t* cu, const int32_t* kv_lens, const int32_t* table, const PlanFacts& f) {
  TORCH_CHECK(cu[0] == 0 && cu[f.batch] == f.tokens, "cu_seqlens_q must run from 0 to T = ", f.tokens);
  for (int64_t s = 0; s < f.batch; ++s) {
    const int64_t q_len = cu[s + 1] - cu[s], kv_len = kv_lens[s];
    TORCH_CHECK(q_len >= 0 && q_len <= kv_len, "sequence ", s, ": ", q_len, " queries but seq_lens = ", kv_len);
    TORCH_CHECK(kv_len <= f.max_blocks * f.block_size, "sequence ", s, ": seq_lens = ", kv_len,
                " exceeds its block table (", f.max_blocks, " blocks of ", f.block_size, ")");
    const int64_t used = q_len > 0 ? (kv_len + f.block_size - 1) / f.block_size : 0;
    for (int64_t b = 0; b < used; ++b) {
      const int32_t id = table[s * f.max_blocks + b];
      TORCH_CHECK(id >= 0 && id < f.num_blocks, "block_table[", s, ", ", b, "] = ", id, " is outside the cache (",
                  f.num_blocks, " blocks)");
    }
  }
}

// Validates the sequences described by `f` and cuts their work for this call's threads.
inline WorkPlan make_plan(const PlanFacts& f, const at::Tensor& block_table, const at::Tensor& seq_lens,
                          const at::Tensor& cu_seqlens_q, bool batch_invariant) {
  const int32_t* cu = cu_seqlens_q.const_data_ptr<int32_t>();
  const int32_t* kv_lens = seq_lens.const_data_ptr<int32_t>();
  check_sequences(cu, kv_lens, block_table.const_data_ptr<int32_t>(), f);
  // Waking threads costs microseconds (milliseconds when another process holds a core): small
  // calls, e.g. decode over short contexts, run on the calling thread.
  int64_t work = 0;  // query-key pairs x query heads x head_dim, causal masking aside
  for (int64_t s = 0; s < f.batch; ++s) work += static_cast<int64_t>(cu[s + 1] - cu[s]) * kv_lens[s];
  work *= f.q_heads * f.head_dim;
  const int64_t threads = work < kMinParallelWork ? 1 : at::get_num_threads();
  const int64_t max_heads = std::max<int64_t>(1, kStagedBytes / (kKeyTile * f.head_dim * sizeof(float)));
  return plan_work(cu, kv_lens, block_table.const_data_ptr<int32_t>(), f.max_blocks, f.block_size, f.batch, f.kv_heads,
                   f.q_heads / f.kv_heads, kMaxRows, Vec::size(), max_heads, kKeyTile, threads, batch_invariant);
}

// An encoded plan: this header, then the items, the merge groups and their parts as they lie in memory.
struct PlanHeader {
  int64_t magic;
  PlanFacts facts;
  int64_t threads, partials, partial_rows, items, splits, parts, batch_invariant;
};
constexpr int64_t kPlanMagic = 0x4e414c5053525424;  // "$TRSPLAN": a plan from plan_paged_attention
static_assert(sizeof(PlanHeader) % sizeof(int64_t) == 0 && sizeof(WorkItem) % sizeof(int64_t) == 0 &&
              sizeof(SplitGroup) % sizeof(int64_t) == 0 && sizeof(MergePart) % sizeof(int64_t) == 0);

inline at::Tensor encode_plan(const PlanFacts& facts, const WorkPlan& work) {
  const PlanHeader header{kPlanMagic,
                          facts,
                          work.threads,
                          work.partials,
                          work.partial_rows,
                          static_cast<int64_t>(work.items.size()),
                          static_cast<int64_t>(work.splits.size()),
                          static_cast<int64_t>(work.parts.size()),
                          work.batch_invariant};
  const size_t item_bytes = work.items.size() * sizeof(WorkItem), split_bytes = work.splits.size() * sizeof(SplitGroup),
               part_bytes = work.parts.size() * sizeof(MergePart);
  at::Tensor encoded =
      at::empty({static_cast<int64_t>((sizeof(header) + item_bytes + split_bytes + part_bytes) / sizeof(int64_t))},
                at::TensorOptions().dtype(at::kLong));
  char* dst = static_cast<char*>(encoded.data_ptr());
  std::memcpy(dst, &header, sizeof(header));
  std::memcpy(dst + sizeof(header), work.items.data(), item_bytes);
  std::memcpy(dst + sizeof(header) + item_bytes, work.splits.data(), split_bytes);
  std::memcpy(dst + sizeof(header) + item_bytes + split_bytes, work.parts.data(), part_bytes);
  return encoded;
}

// That the work of a decoded plan stays inside the tensors `f` describes: its items' query rows,
// KV heads, key ranges and split slots, and its merges' parts. (What reads the cache is checked
// where it is read: attend_tiles' run_at.) A plan from plan_paged_attention always passes; an
// edited one could otherwise write outside `out` or the split scratch.
inline void check_work(const WorkPlan& w, const PlanFacts& f) {
  constexpr const char* kEdited = "plan: its work reaches outside the tensors it was made for (an edited plan?): ";
  const int64_t group = f.q_heads / f.kv_heads;
  TORCH_CHECK(w.threads >= 1 && w.partials >= 0 && w.partials <= static_cast<int64_t>(w.items.size()) &&
                  w.partial_rows >= 0 && w.partial_rows <= f.tokens * f.q_heads,
              kEdited, "threads ", w.threads, ", split slots ", w.partials, " of ", w.partial_rows, " rows");
  auto check_item = [&](const WorkItem& item, const char* what, size_t index) {
    TORCH_CHECK(item.seq >= 0 && item.seq < f.batch && item.kv_head >= 0 && item.kv_heads >= 1 &&
                    item.kv_heads <= f.kv_heads - item.kv_head && item.q_tokens >= 1 && item.q_begin >= 0 &&
                    item.q_tokens <= f.tokens - item.q_begin && item.kv_begin >= 0 && item.kv_begin <= item.kv_end &&
                    item.kv_end <= f.max_blocks * f.block_size,
                kEdited, what, " ", index, " (sequence ", item.seq, ", KV heads ", item.kv_head, " + ", item.kv_heads,
                ", queries ", item.q_begin, " + ", item.q_tokens, ", keys ", item.kv_begin, " to ", item.kv_end, ")");
  };
  for (size_t i = 0; i < w.items.size(); ++i) {
    const WorkItem& item = w.items[i];
    check_item(item, "item", i);
    TORCH_CHECK(item.partial >= -1 && item.partial < w.partials &&
                    (item.partial < 0 || item.kv_heads * item.q_tokens * group <= w.partial_rows),
                kEdited, "item ", i, " writes split slot ", item.partial);
  }
  for (size_t g = 0; g < w.splits.size(); ++g) {
    const SplitGroup& split = w.splits[g];
    check_item(split.base, "merge", g);
    TORCH_CHECK(split.first_part >= 0 && split.count >= 1 &&
                    split.count <= static_cast<int64_t>(w.parts.size()) - split.first_part,
                kEdited, "merge ", g, " reads parts ", split.first_part, " + ", split.count);
    const int64_t rows = split.base.q_tokens * group;  // the merge's rows per KV head
    for (int64_t k = split.first_part; k < split.first_part + split.count; ++k) {
      const MergePart& part = w.parts[k];
      TORCH_CHECK(part.partial >= 0 && part.partial < w.partials && part.rows >= 0 && part.rows <= w.partial_rows &&
                      part.offset >= 0 && part.offset <= w.partial_rows &&
                      (split.base.kv_heads - 1) * part.rows + part.offset + rows <= w.partial_rows,
                  kEdited, "merge ", g, " reads outside split slot ", part.partial);
    }
  }
}

// The work of an encoded plan; refuses a plan made for other tensors than `given` describes.
inline WorkPlan decode_plan(const at::Tensor& encoded, const PlanFacts& given) {
  constexpr const char* kNotAPlan = "plan is not a C++ plan from trellis::plan_paged_attention";
  TORCH_CHECK(encoded.scalar_type() == at::kLong && encoded.dim() == 1 && encoded.is_contiguous() &&
                  encoded.device().is_cpu() && encoded.nbytes() >= sizeof(PlanHeader),
              kNotAPlan);
  PlanHeader header;
  const char* src = static_cast<const char*>(encoded.const_data_ptr());
  std::memcpy(&header, src, sizeof(header));
  // (Negative counts become huge: refused by the bounds.)
  const auto items = static_cast<size_t>(header.items), splits = static_cast<size_t>(header.splits),
             parts = static_cast<size_t>(header.parts);
  const size_t bytes = encoded.nbytes();
  TORCH_CHECK(header.magic == kPlanMagic && items <= bytes / sizeof(WorkItem) && splits <= bytes / sizeof(SplitGroup) &&
                  parts <= bytes / sizeof(MergePart) &&
                  bytes == sizeof(header) + items * sizeof(WorkItem) + splits * sizeof(SplitGroup) +
                               parts * sizeof(MergePart),
              kNotAPlan);
  check_facts(header.facts, given);
  WorkPlan work;
  work.threads = header.threads;
  work.partials = header.partials;
  work.partial_rows = header.partial_rows;
  work.batch_invariant = header.batch_invariant != 0;
  work.items.resize(items);
  work.splits.resize(splits);
  work.parts.resize(parts);
  src += sizeof(header);
  std::memcpy(work.items.data(), src, items * sizeof(WorkItem));
  std::memcpy(work.splits.data(), src + items * sizeof(WorkItem), splits * sizeof(SplitGroup));
  std::memcpy(work.parts.data(), src + items * sizeof(WorkItem) + splits * sizeof(SplitGroup),
              parts * sizeof(MergePart));
  check_work(work, header.facts);
  return work;
}

}  // namespace trellis
