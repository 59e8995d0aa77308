// trellis::quant_linear on CPU (registered as trellis_cpp::quant_linear): y = x @ W^T with W kept
// in a GGUF block format (quant_blocks.h; trellis/ops/quant.py is the specification). Weights are
// dequantized in registers and multiplied in fp32; bf16 activations are widened to fp32 first.
//
// Two paths for float x, by the number of rows M of x:
//   - small M (decode, M <= kSmallM): the weights are streamed once, each block dequantized once
//     and used by every row; threads split the output features. It reads 0.56 (Q4_0), 0.63
//     (Q4_1) or 1.06 (Q8_0) bytes per weight where fp32 weights take 4, prefetching them in
//     software, and at one row of x it is then bound by memory bandwidth.
//   - blocked (prefill): for each chunk of K, threads take panels of kNR output features, unpack
//     the panel into an fp32 tile [Kc][kNR] (each weight once per call), and run a register-
//     blocked kMR x kNR outer-product micro-kernel over every kMR rows of x, accumulating into y.
// With quantize_x, x is rounded to 8-bit blocks (quant_dots.h) and one path, at any M, multiplies
// integers per block: no weight is converted to float (at one row ~3x fewer instructions per
// weight than the small-M path, 2x the speed), and a row of x gets the same result, bit for bit,
// in any batch of rows (a prompt's prefill, a decode step), so that the rounding of x, which a
// last-bit difference can tip, tips alike wherever a token is computed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "quant_blocks.h"
#include "quant_dots.h"
#include "with_count.h"

namespace trellis {
namespace quant {
namespace {

constexpr int kSmallM = 8;
constexpr int kAccRegs = kLanes >= 16 ? 16 : 8;  // accumulators beside the weights and activations
constexpr int kNR = 2 * kLanes;                   // output features per panel: two registers
constexpr int kMR = kLanes >= 16 ? 12 : 6;        // rows of x per micro-kernel call
constexpr int64_t kKc = 256;                      // K per chunk: a panel (32 KB) and a row tile fit L1
// How far ahead of its reads the small-M path prefetches weights: a single core here streams
// ~5 GB/s from memory on the hardware prefetchers alone, ~10-11 GB/s with software prefetch
// 4-32 KB ahead (alike; 1-2 KB leave it short of that).
constexpr int64_t kPrefetchAhead = 8192;

struct Problem {
  const uint8_t* w;   // [N, row_bytes]
  const float* x;     // [M, K]
  float* y;           // [M, N]
  int64_t m, n, k, row_bytes;
  const Q8Rows* xq;   // x in 8-bit blocks, for the integer path (quantize_x); else null
};

// --- small M ------------------------------------------------------------------------------------

// While a step reads its NR weight rows from `row` on, the NR-row group `ahead` bytes on is
// prefetched, block by block, linearly (the rows of a group lie one after another: NR * kBytes
// bytes per block). A thread's task is a run of rows, so that group is the one it reads next (or,
// near its end, a neighbour's).
template <QType Q, int NR>
struct GroupPrefetch {
  static constexpr int64_t kBytes = block_bytes(Q);
  static constexpr int kLines = (NR * kBytes + 63) / 64;  // lines per block, rounded up
  const uint8_t* ahead;

  GroupPrefetch(const Problem& p, const uint8_t* row) {
    const int64_t group = NR * p.row_bytes;
    ahead = row + (kPrefetchAhead + group - 1) / group * group;
  }
  void operator()(int64_t b) const {
#pragma GCC unroll 4
    for (int l = 0; l < kLines; ++l) prefetch(ahead + b * NR * kBytes + 64 * l);
  }
};

// Weight rows per step of the small-M path for M rows of x: as many as keep the accumulators (M
// * NR of them) in registers; more rows than 1 share each load of x, and give the dequantization
// independent work beside the FMAs.
constexpr int rows_per_step(int m) { return std::clamp(16 / m, 1, 4); }

// y[:, n0 .. n0+NR) for all M rows. NR weight rows at once, and several accumulators per (row,
// feature) pair, keep enough multiply-add chains in flight when M is small. The accumulator count
// is the full step's, also for the single rows at the end of a task, so that a feature sums in
// the same order wherever the tasks split (any thread count, any group). The loops over register
// arrays are unrolled, so that the arrays stay in registers.
template <QType Q, int M, int NR>
inline void gemv_rows(const Problem& p, int64_t n0) {
  constexpr int kAcc = std::clamp(kAccRegs / (M * rows_per_step(M)), 1, kBlockRegs);
  constexpr int64_t kBytes = block_bytes(Q);
  Reg acc[NR * M * kAcc];
#pragma GCC unroll 64
  for (int a = 0; a < NR * M * kAcc; ++a) acc[a] = splat(0.0f);
  const uint8_t* row = p.w + n0 * p.row_bytes;
  const GroupPrefetch<Q, NR> prefetch_group(p, row);
  for (int64_t b = 0; b < p.k / kBlock; ++b) {
    prefetch_group(b);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      Reg w[kBlockRegs];
      load_block<Q>(row + r * p.row_bytes + b * kBytes, w);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        const float* x = p.x + i * p.k + b * kBlock;
#pragma GCC unroll 4
        for (int v = 0; v < kBlockRegs; ++v) {
          Reg& a = acc[(r * M + i) * kAcc + v % kAcc];
          a = fmadd(w[v], load(x + v * kLanes), a);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      Reg total = acc[(r * M + i) * kAcc];
#pragma GCC unroll 4
      for (int a = 1; a < kAcc; ++a) total = add(total, acc[(r * M + i) * kAcc + a]);
      p.y[i * p.n + n0 + r] = sum(total);
    }
  }
}

// y[m0 .. m0+M, n0 .. n0+NR) over x in 8-bit blocks (p.xq): one accumulator per (row, feature)
// pair, and Q4_1's offsets summed apart, m * (d * sum(q)) per block. A feature's sum runs in the
// same order whatever M, NR and m0: a row of x gets the same result bit for bit in any batch.
template <QType Q, int M, int NR>
inline void gemv_rows_q8(const Problem& p, int64_t n0, int64_t m0) {
  constexpr int64_t kBytes = block_bytes(Q);
  const Q8Rows& xq = *p.xq;
  const int64_t blocks = xq.blocks_per_row;
  DotAcc acc[NR * M];
  float offset[NR * M];
#pragma GCC unroll 32
  for (int a = 0; a < NR * M; ++a) {
    acc[a] = dot_zero();
    offset[a] = 0.0f;
  }
  const uint8_t* row = p.w + n0 * p.row_bytes;
  const GroupPrefetch<Q, NR> prefetch_group(p, row);
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_group(b);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const uint8_t* block = row + r * p.row_bytes + b * kBytes;
      const BlockInts w = weight_ints<Q>(block);
      const float d = fp16_at(block);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        const int64_t xb = (m0 + i) * blocks + b;
        dot_add<Q>(w, load_x(xq.q.data() + xb * kBlock), d * xq.d[xb], acc[r * M + i]);
        if constexpr (Q == QType::Q4_1) offset[r * M + i] += fp16_at(block + 2) * xq.s[xb];
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) p.y[(m0 + i) * p.n + n0 + r] = dot_total(acc[r * M + i]) + offset[r * M + i];
  }
}

// Threads split the output features of every weight of the group as if they were one matrix, in
// tasks of at least `grain` features; rows(p, n, stop) computes features [n, stop) of weight p.
template <typename Rows>
void split_features(const std::vector<Problem>& group, int64_t grain, const Rows& rows) {
  int64_t features = 0;
  for (const Problem& p : group) features += p.n;
  at::parallel_for(0, features, grain, [&](int64_t begin, int64_t end) {
    int64_t first = 0;  // the group's index of p's first feature
    for (const Problem& p : group) {
      const int64_t stop = std::min(end, first + p.n) - first;
      const int64_t n = std::max(begin, first) - first;
      if (n < stop) rows(p, n, stop);
      first += p.n;
    }
  });
}

// Enough weight bytes per task that waking a thread pays off (~64 KB).
inline int64_t feature_grain(const std::vector<Problem>& group, int nr) {
  return std::max<int64_t>(nr, 65536 / group.front().row_bytes);
}

template <QType Q, int M>
void small_m(const std::vector<Problem>& group) {
  constexpr int NR = rows_per_step(M);
  split_features(group, feature_grain(group, NR), [](const Problem& p, int64_t n, int64_t stop) {
    for (; n + NR <= stop; n += NR) gemv_rows<Q, M, NR>(p, n);
    for (; n < stop; ++n) gemv_rows<Q, M, 1>(p, n);
  });
}

// Features [n, stop) for rows [m0, m0+M) of x in 8-bit blocks.
template <QType Q, int M>
inline void q8_tile(const Problem& p, int64_t n, int64_t stop, int64_t m0) {
  constexpr int NR = rows_per_step(M);
  for (; n + NR <= stop; n += NR) gemv_rows_q8<Q, M, NR>(p, n, m0);
  for (; n < stop; ++n) gemv_rows_q8<Q, M, 1>(p, n, m0);
}

// x in 8-bit blocks, any number of rows: a few weight rows at a time meet every tile of kSmallM
// rows of x in turn (the weight rows stay in L1; x, a byte a value, in L2), so the weights are
// read from memory once, and each row of x is computed as it is alone.
template <QType Q>
void q8_linear(const std::vector<Problem>& group) {
  constexpr int64_t kFeatures = rows_per_step(1);
  const int64_t m = group.front().m;
  split_features(group, feature_grain(group, kFeatures), [m](const Problem& p, int64_t n, int64_t stop) {
    for (; n < stop; n += kFeatures) {
      const int64_t end = std::min(n + kFeatures, stop);
      for (int64_t m0 = 0; m0 < m; m0 += kSmallM) {
        with_count<kSmallM>(std::min<int64_t>(kSmallM, m - m0),
                            [&](auto rows) { q8_tile<Q, decltype(rows)::value>(p, n, end, m0); });
      }
    }
  });
}

// --- blocked ------------------------------------------------------------------------------------

// Unpacks weight rows [n0, n0+nr) x columns [k0, k0+kc) into panel[kc][kNR] (features past nr: 0).
template <QType Q>
void pack_panel(const Problem& p, int64_t n0, int64_t nr, int64_t k0, int64_t kc, float* panel) {
  constexpr int64_t kBytes = block_bytes(Q);
  alignas(64) float tmp[kBlock];
  for (int64_t r = 0; r < kNR; ++r) {
    if (r >= nr) {
      for (int64_t k = 0; k < kc; ++k) panel[k * kNR + r] = 0.0f;
      continue;
    }
    const uint8_t* row = p.w + (n0 + r) * p.row_bytes + k0 / kBlock * kBytes;
    for (int64_t b = 0; b < kc / kBlock; ++b) {
      Reg w[kBlockRegs];
      load_block<Q>(row + b * kBytes, w);
      for (int v = 0; v < kBlockRegs; ++v) store(tmp + v * kLanes, w[v]);
      float* dst = panel + b * kBlock * kNR + r;
      for (int j = 0; j < kBlock; ++j) dst[j * kNR] = tmp[j];
    }
  }
}

// Rows [m0, m0+kMR) x columns [k0, k0+kc) of x into tile[kc][kMR] (rows past M: 0), so that the
// micro-kernel reads one contiguous stream rather than kMR rows a power of two apart.
void pack_rows(const Problem& p, int64_t m0, int64_t k0, int64_t kc, float* tile) {
  const int64_t mr = std::min<int64_t>(kMR, p.m - m0);
  for (int64_t i = 0; i < kMR; ++i) {
    const float* x = p.x + (m0 + i) * p.k + k0;
    for (int64_t k = 0; k < kc; ++k) tile[k * kMR + i] = i < mr ? x[k] : 0.0f;
  }
}

// c[MR][kNR] (row stride ldc) (+)= rows @ panel over one chunk of K; starts from 0 on the first chunk.
template <int MR>
void micro_kernel(float* c, int64_t ldc, bool first, int64_t kc, const float* rows, const float* panel) {
  // Every loop over MR unrolled, so that the accumulators live in registers.
  Reg lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    lo[i] = first ? splat(0.0f) : load(c + i * ldc);
    hi[i] = first ? splat(0.0f) : load(c + i * ldc + kLanes);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const Reg b0 = load(panel + k * kNR), b1 = load(panel + k * kNR + kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const Reg a = splat(rows[k * kMR + i]);
      lo[i] = fmadd(a, b0, lo[i]);
      hi[i] = fmadd(a, b1, hi[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    store(c + i * ldc, lo[i]);
    store(c + i * ldc + kLanes, hi[i]);
  }
}

// y[m0 .. m0+mr, n0 .. n0+nr) (+)= one chunk; a panel cut short by N goes through a full-width tile.
template <int MR>
void update(const Problem& p, int64_t m0, int64_t n0, int64_t nr, bool first, int64_t kc, const float* rows,
            const float* panel) {
  float* y = p.y + m0 * p.n + n0;
  if (nr == kNR) return micro_kernel<MR>(y, p.n, first, kc, rows, panel);
  alignas(64) float tile[MR * kNR];
  for (int i = 0; i < MR && !first; ++i) std::copy(y + i * p.n, y + i * p.n + nr, tile + i * kNR);
  micro_kernel<MR>(tile, kNR, first, kc, rows, panel);
  for (int i = 0; i < MR; ++i) std::copy(tile + i * kNR, tile + i * kNR + nr, y + i * p.n);
}

template <QType Q>
void blocked(const Problem& p) {
  const int64_t panels = (p.n + kNR - 1) / kNR, row_tiles = (p.m + kMR - 1) / kMR;
  std::vector<float> rows(row_tiles * kKc * kMR);  // x's chunk, packed tile by tile
  for (int64_t k0 = 0; k0 < p.k; k0 += kKc) {
    const int64_t kc = std::min(kKc, p.k - k0);
    at::parallel_for(0, row_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) pack_rows(p, t * kMR, k0, kc, rows.data() + t * kc * kMR);
    });
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> panel(kc * kNR);
      for (int64_t j = begin; j < end; ++j) {
        const int64_t n0 = j * kNR, nr = std::min<int64_t>(kNR, p.n - n0);
        pack_panel<Q>(p, n0, nr, k0, kc, panel.data());
        for (int64_t t = 0; t < row_tiles; ++t) {
          const int64_t m0 = t * kMR;
          with_count<kMR>(std::min<int64_t>(kMR, p.m - m0), [&](auto mr) {
            update<decltype(mr)::value>(p, m0, n0, nr, k0 == 0, kc, rows.data() + t * kc * kMR, panel.data());
          });
        }
      }
    });
  }
}

template <QType Q>
void run(const std::vector<Problem>& group) {
  const int64_t m = group.front().m;
  if constexpr (block_quantized(Q)) {
    if (group.front().xq != nullptr) return q8_linear<Q>(group);
  }
  if (m > kSmallM) {
    for (const Problem& p : group) blocked<Q>(p);
    return;
  }
  with_count<kSmallM>(m, [&](auto rows) { small_m<Q, decltype(rows)::value>(group); });
}

QType parse_qtype(c10::string_view name) {
  if (name == "Q8_0") return QType::Q8_0;
  if (name == "Q4_0") return QType::Q4_0;
  if (name == "Q4_1") return QType::Q4_1;
  if (name == "BF16") return QType::BF16;
  if (name == "F32") return QType::F32;
  TORCH_CHECK_VALUE(false, "unsupported qtype '", name, "'; choose one of Q8_0, Q4_0, Q4_1, BF16, F32");
}

// x @ W^T for every W of `weights` (one qtype, rows of x.shape[-1] weights each): x is converted
// once, and a few rows of x stream all the weights in one parallel region.
std::vector<at::Tensor> linear_group(const char* op, const at::Tensor& x, at::TensorList weights,
                                     c10::string_view qtype, bool quantize_x) {
  const QType q = parse_qtype(qtype);
  TORCH_CHECK_VALUE(!quantize_x || block_quantized(q), op,
                    ": quantize_x rounds x for block-quantized weights (Q8_0, Q4_0, Q4_1), not ", qtype);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
                   ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x and weight must be CPU tensors");
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(k % kBlock == 0, op, ": in_features (x.shape[-1] = ", k, ") must be a multiple of ", kBlock);
  // BF16 and F32 blocks are plain weights: the [out, in] weight itself, or its bytes.
  const auto plain = q == QType::BF16 ? at::kBFloat16 : q == QType::F32 ? at::kFloat : at::kByte;
  for (const at::Tensor& weight : weights) {
    TORCH_CHECK_TYPE(weight.scalar_type() == at::kByte || weight.scalar_type() == plain, op,
                     ": weight must be uint8 blocks", plain == at::kByte ? "" : " or the plain weight",
                     " (", qtype, "), got ", weight.scalar_type());
    TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [out_features, blocks * bytes per block], got ",
                      weight.sizes());
    TORCH_CHECK_VALUE(weight.device().is_cpu(), op, ": x and weight must be CPU tensors");
    const int64_t bytes = weight.size(1) * weight.element_size();
    TORCH_CHECK_VALUE(bytes == k / kBlock * block_bytes(q), op, ": weight rows of ", bytes, " bytes do not hold ", k,
                      " ", qtype, " weights (", k / kBlock * block_bytes(q), " bytes)");
  }
  // x as [M, K] fp32, contiguous: x itself where it is (fp32 decode rows). bf16 is widened, and
  // results narrowed, by loops here rather than `to` (three dispatches and an allocation each:
  // ~1 ms of a bf16 decode step, which converts 330 times).
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const bool fp32 = x.scalar_type() == at::kFloat;
  const at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  at::Tensor xf = xc;
  if (!fp32) {
    xf = at::empty({m, k}, xc.options().dtype(at::kFloat));
    at::vec::convert(xc.const_data_ptr<c10::BFloat16>(), xf.data_ptr<float>(), m * k);
  }
  Q8Rows xq;  // x in 8-bit blocks, whose integers the kernels multiply
  if (quantize_x && m > 0) round_rows(xf.const_data_ptr<float>(), m, k, xq);
  std::vector<at::Tensor> contiguous, outputs;
  std::vector<Problem> group;
  for (const at::Tensor& weight : weights) {
    contiguous.push_back(weight.contiguous());
    outputs.push_back(at::empty({m, weight.size(0)}, xf.options().dtype(at::kFloat)));
    if (m > 0 && weight.size(0) > 0) {
      group.push_back({static_cast<const uint8_t*>(contiguous.back().const_data_ptr()), xf.const_data_ptr<float>(),
                       outputs.back().data_ptr<float>(), m, weight.size(0), k, weight.size(1) * weight.element_size(),
                       quantize_x ? &xq : nullptr});
    }
  }
  if (k == 0) {
    for (at::Tensor& y : outputs) y.zero_();
  } else if (!group.empty()) {
    if (q == QType::Q8_0) {
      run<QType::Q8_0>(group);
    } else if (q == QType::Q4_0) {
      run<QType::Q4_0>(group);
    } else if (q == QType::Q4_1) {
      run<QType::Q4_1>(group);
    } else if (q == QType::BF16) {
      run<QType::BF16>(group);
    } else {
      run<QType::F32>(group);
    }
  }
  for (at::Tensor& y : outputs) {
    if (!fp32) {
      at::Tensor narrow = at::empty(y.sizes(), y.options().dtype(x.scalar_type()));
      at::vec::convert(y.const_data_ptr<float>(), narrow.data_ptr<c10::BFloat16>(), y.numel());
      y = narrow;
    }
    if (x.dim() != 2) {
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      shape.back() = y.size(1);
      y = y.view(shape);
    }
  }
  return outputs;
}

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& weight, c10::string_view qtype, bool quantize_x) {
  return linear_group("quant_linear", x, {weight}, qtype, quantize_x).front();
}

std::vector<at::Tensor> quant_linear_group_cpu(const at::Tensor& x, at::TensorList weights, c10::string_view qtype,
                                               bool quantize_x) {
  return linear_group("quant_linear_group", x, weights, qtype, quantize_x);
}

}  // namespace
}  // namespace quant

TORCH_LIBRARY_IMPL(trellis_cpp, CPU, m) {
  m.impl("quant_linear", &quant::quant_linear_cpu);
  m.impl("quant_linear_group", &quant::quant_linear_group_cpu);
}

}  // namespace trellis
