// trellis::panel_linear on CPU (registered as trellis_cpp::panel_linear, and panel_linear_group for
// several weights over one x): y = x @ W^T (+ bias) for a W packed in panels of 16 output features
// (trellis/ops/panels.py is the specification), x in W's dtype:
//   - bf16: panel p holds features 16p .. 16p + 15 with their inputs in pairs, lane c of step j
//     being (W[16p + c][2j], W[16p + c][2j + 1]). That is the operand of AVX512_BF16's vdpbf16ps:
//     one instruction multiplies a pair of one row of x, broadcast, by that pair of 16 features
//     (32 multiply-adds, the products exact, summed in fp32, as oneDNN's bf16 matmul sums them on
//     these CPUs). 16 steps of a panel are also an AMX tile's B operand as they lie, so where the
//     CPU has AMX the same panels are multiplied on its tiles (tile_panels). Results are rounded
//     to bf16 once, after the bias.
//   - fp32: lane c of step j is W[16p + c][j], the operand of one fused multiply-add by x[j]
//     broadcast (AVX-512).
//
// Threads split the panels; on vectors each runs a register block of kMR rows x kNR panels (24 fp32
// accumulators) along K for every kMR rows of x, so a block's panels (K * 256 bytes in fp32, K * 128
// in bf16) are read from memory once and from L2 for the next rows; x is used as it lies (broadcast
// from memory). In fp32 the first rows over a group of panels prefetch ahead of their reads (kAhead;
// in bf16 the hardware prefetcher alone serves them); where more rows follow, they fetch the next
// group between them (Fetch).
// On a 2-core AMD EPYC (AVX512_BF16, no AMX), over SmolLM2's layers (docs/cpu-linear.md): bf16 is
// 1.15-1.55x faster than oneDNN's matmul on its own blocked copy at 8-64 rows and level at 512,
// and 1.3x faster than the streaming kernel (quant_linear over the row-major weight) at 1-4 rows;
// fp32 is 1.5x faster than that streaming kernel at 1-4 rows, 1.25-1.9x faster than oneDNN over
// the row-major weight at 16-64 rows and level at 512. oneDNN's small-M blocking leaves the units
// idle where this block keeps 24 products in flight, and the streaming kernel's reads of
// row-major weights stream slower than the panels' runs.
//
// Where the build or the CPU lacks the instructions (AVX512_BF16 for bf16, an AVX-512 build for
// fp32) the op computes the same sums through ATen (unpacked weights, fp32 matmul, per call).
// Trellis packs panels only where the kernel runs (cpu_linear.panels_serve), so that path serves
// direct calls, and builds whose compiler lacks the intrinsics (GCC < 11, clang < 12), where it is slow.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "amx_tiles.h"
#include "bf16_dots.h"
#include "with_count.h"

// The kernels of both dtypes need an AVX-512 build (bf16's also TRELLIS_BF16_DOTS, which implies one).
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define TRELLIS_PANEL_KERNELS 1
#endif

namespace trellis {
namespace {

constexpr int64_t kPanel = 16;  // output features per panel: one register of fp32 lanes

// Inputs of x per 32-bit lane of a panel: a pair in bf16, one in fp32.
inline int64_t inputs_per_lane(at::ScalarType dtype) { return dtype == at::kBFloat16 ? 2 : 1; }

void check_arguments(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                     int64_t out_features) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kFloat, "panel_linear: x must be bfloat16 or float32, got ",
                   dtype);
  const char* name = dtype == at::kBFloat16 ? "bfloat16" : "float32";
  TORCH_CHECK_TYPE(panels.scalar_type() == dtype, "panel_linear: panels must be ", name, " as x is, got ",
                   panels.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "panel_linear: x must have at least one dimension");
  const int64_t per_lane = inputs_per_lane(dtype);
  TORCH_CHECK_VALUE(panels.dim() == 4 && panels.size(2) == kPanel && panels.size(3) == per_lane,
                    "panel_linear: ", name, " panels must be [panels, in_features / ", per_lane, ", 16, ", per_lane,
                    "], got ", panels.sizes());
  TORCH_CHECK_VALUE(panels.is_contiguous(), "panel_linear: panels must be contiguous");
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(k == per_lane * panels.size(1), "panel_linear: x has ", k, " input features but the panels hold ",
                    per_lane * panels.size(1));
  TORCH_CHECK_VALUE(out_features >= 0 && (out_features + kPanel - 1) / kPanel == panels.size(0),
                    "panel_linear: ", panels.size(0), " panels do not hold ", out_features, " output features");
  TORCH_CHECK_VALUE(x.device().is_cpu() && panels.device().is_cpu(), "panel_linear: x and panels must be CPU tensors");
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, "panel_linear: bias must be ", name, " as x is, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "panel_linear: bias must be [",
                      out_features, "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device().is_cpu(), "panel_linear: bias must be a CPU tensor");
  }
}

// Whether this build and CPU run the kernel for `dtype` (else ATen computes the same sums).
bool kernel_runs(at::ScalarType dtype) {
#if defined(TRELLIS_BF16_DOTS)
  if (dtype == at::kBFloat16) return dpbf16_usable();
#endif
#if defined(TRELLIS_PANEL_KERNELS)
  if (dtype == at::kFloat) return true;
#endif
  return false;
}

#if defined(TRELLIS_PANEL_KERNELS)

constexpr int kMR = 6;          // rows of x per register block
constexpr int kNR = 4;          // panels per register block: kMR * kNR accumulators
constexpr int64_t kMc = 192;    // rows of x per pass over a thread's panels: their steps stay in L2
// Prefetch distance of the fp32 blocks' first rows, in steps (of kNR panels: 16 KB). The hardware
// prefetcher follows each panel's run but restarts at every new group of panels; reads this far
// ahead keep the memory busy across those jumps.
constexpr int64_t kAhead = 64;

// One weight's problem. T: x's and y's dtype; the panels are 32-bit lanes (bf16 pairs, fp32 values).
template <typename T>
struct Problem {
  const T* x;         // [M, K]
  const T* x_tail;    // for AMX tiles: x's last M % 16 rows, at the start of 16 (tail_rows); else null
  const void* w;      // panels: [P][steps][16] lanes
  const float* bias;  // [P * 16] (zero past N), or null
  T* y;               // [M, N]
  int64_t m, n, steps;  // steps = K / inputs per lane

  const uint32_t* lanes() const { return static_cast<const uint32_t*>(w); }
};

// Prefetches, for step j of a block over the NR panels at w, the step kAhead on: in these panels,
// else in the `next_panels` after them.
template <int NR>
inline void prefetch_ahead(const uint32_t* w, int64_t steps, int64_t j, int64_t next_panels) {
  const int64_t jj = j + kAhead;
  if (jj < steps) {
    for (int c = 0; c < NR; ++c) __builtin_prefetch(w + (c * steps + jj) * kPanel, 0, 2);
  } else if (next_panels > 0 && jj - steps < steps) {
    const uint32_t* next = w + NR * steps * kPanel;
    for (int c = 0; c < next_panels; ++c) __builtin_prefetch(next + (c * steps + jj - steps) * kPanel, 0, 2);
  }
}

// What a register block fetches toward L2 as it runs along K. The first rows over a group of panels
// read `ahead` of themselves (in fp32: prefetch_ahead; in bf16 nothing, see bf16_block). Where a
// pass runs several blocks of rows over the group (a prefill's rows), the blocks after the first
// fetch the `next` group (its panels lie in one run), one line a step, each from the start of its
// share of the run on and past it (`fetch`: that start's distance from the block's first panel, in
// lanes; 0 where there is no next group, which prefetches the line the block reads anyway; a
// prefetch past the weights faults nothing). The next group's first rows then find it in L2 rather
// than waiting on memory: SmolLM2's layers at 64 rows from memory run 1-3 % slower than from L3
// (~10 % without the fetch).
// A compile-time choice: a test inside the loop along K costs it more than the prefetch.
enum class Fetch { ahead, next };

// The lanes of panel c of a block from p that hold features (W's last panel may hold fewer than 16).
inline __mmask16 stored_lanes(int64_t n, int64_t p, int c) {
  const int64_t features = std::min<int64_t>(kPanel, n - (p + c) * kPanel);
  return features == kPanel ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << features) - 1);
}

// A block's sums for panel c, with the bias (fp32, zero past N) where there is one.
inline __m512 with_bias(const float* bias, int64_t p, int c, __m512 sums) {
  return bias == nullptr ? sums : _mm512_add_ps(sums, _mm512_loadu_ps(bias + (p + c) * kPanel));
}

// y[MR rows][NR panels from p] for the MR rows of x at `row`, fp32, fetching as F says: `ahead`
// into the `next_panels` after these at the end, or `next` from `fetch` on (Fetch).
template <int MR, int NR, Fetch F>
void fp32_block(const Problem<float>& pr, int64_t row, int64_t p, int64_t next_panels, int64_t fetch) {
  const int64_t steps = pr.steps;
  const uint32_t* lanes = pr.lanes() + p * steps * kPanel;
  const float* w = reinterpret_cast<const float*>(lanes);
  const float* x = pr.x + row * steps;
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < steps; ++j) {
    if constexpr (F == Fetch::ahead) prefetch_ahead<NR>(lanes, steps, j, next_panels);
    if constexpr (F == Fetch::next) __builtin_prefetch(lanes + fetch + j * kPanel, 0, 2);
    __m512 b[NR];
    for (int c = 0; c < NR; ++c) b[c] = _mm512_loadu_ps(w + (c * steps + j) * kPanel);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * steps + j]);
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* y = pr.y + (row + r) * pr.n + p * kPanel;
    for (int c = 0; c < NR; ++c) {
      _mm512_mask_storeu_ps(y + c * kPanel, stored_lanes(pr.n, p, c), with_bias(pr.bias, p, c, acc[r][c]));
    }
  }
}

#if defined(TRELLIS_BF16_DOTS)
// A panel's 16 fp32 results, rounded to bf16, into the lanes of y that hold features.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void store_rounded(c10::BFloat16* y,
                                                                                          __mmask16 lanes,
                                                                                          __m512 sums) {
  _mm256_mask_storeu_epi16(y, lanes, (__m256i)_mm512_cvtneps_pbh(sums));
}

// fp32_block for bf16 pairs on vdpbf16ps, rounded to bf16 once. The first rows (Fetch::ahead) issue
// no prefetch of their own, leaving the memory to the hardware prefetcher: on a 2-core Zen 5 EPYC,
// prefetch_ahead in this loop made one-row passes over SmolLM2's layers 5-10 % slower and neither
// four-row passes nor the engine's four-session steps faster (alternating processes). (GCC 12
// inlines prefetch_ahead into the fp32 blocks but not into these, which its target attribute sets
// apart, and drops a call to a function that only prefetches: a prefetch wanted here goes in the
// loop itself.)
template <int MR, int NR, Fetch F>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_block(const Problem<c10::BFloat16>& pr,
                                                                                  int64_t row, int64_t p,
                                                                                  int64_t next_panels, int64_t fetch) {
  const int64_t steps = pr.steps;
  const uint32_t* w = pr.lanes() + p * steps * kPanel;
  const c10::BFloat16* x = pr.x + row * 2 * steps;
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < steps; ++j) {
    if constexpr (F == Fetch::next) __builtin_prefetch(w + fetch + j * kPanel, 0, 2);
    __m512bh b[NR];
    for (int c = 0; c < NR; ++c) b[c] = (__m512bh)_mm512_loadu_si512(w + (c * steps + j) * kPanel);
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;  // x[row + r][2j], x[row + r][2j + 1]
      std::memcpy(&pair, x + r * 2 * steps + 2 * j, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    c10::BFloat16* y = pr.y + (row + r) * pr.n + p * kPanel;
    for (int c = 0; c < NR; ++c) {
      store_rounded(y + c * kPanel, stored_lanes(pr.n, p, c), with_bias(pr.bias, p, c, acc[r][c]));
    }
  }
}
#endif

#if defined(TRELLIS_BF16_DOTS)
// bf16 on AMX tiles (amx_tiles.h), where the CPU has them and K is a multiple of 32: a panel's
// steps are B's rows as they lie (16 pairs of 64 bytes a tile), x's rows A's. A block of 32 rows
// by two panels keeps four products on the tiles along K; its sums go through a scratch C to the
// bias and the rounding of the vector path. On the 2-core AMX Xeon, over SmolLM2's 210 layers,
// 1.25-1.45x faster than oneDNN's packed matmul at 1-64 rows, 1.05-1.15x at 256-512, and level
// with the streaming kernel or ahead at 1-4 rows (docs/cpu-linear.md#on-amx-tiles).

// Whether this call's bf16 matmul runs on AMX tiles: steps (K / 2) whole tiles of pairs.
bool tiles_run(int64_t steps) { return steps % kTileRows == 0 && amx_bf16_usable(); }

// y's `rows` rows from `row` on, panels p .. p + panels - 1, from the block's sums c[row][32].
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void store_tile_block(
    const Problem<c10::BFloat16>& pr, const float* c, int64_t row, int64_t rows, int64_t p, int panels) {
  for (int64_t r = 0; r < rows; ++r) {
    c10::BFloat16* y = pr.y + (row + r) * pr.n + p * kPanel;
    for (int i = 0; i < panels; ++i) {
      const __m512 sums = _mm512_loadu_ps(c + r * 2 * kPanel + i * kPanel);
      store_rounded(y + i * kPanel, stored_lanes(pr.n, p, i), with_bias(pr.bias, p, i, sums));
    }
  }
}

// x's last m % 16 rows at the start of 16 rows, for the tiles, which read 16 rows at a time: a
// buffer of the calling thread, kept across calls. The rows after them hold whatever they held;
// their products land in rows of C that are never stored.
const c10::BFloat16* tail_rows(const c10::BFloat16* x, int64_t m, int64_t k) {
  thread_local std::vector<c10::BFloat16> rows;
  if (static_cast<int64_t>(rows.size()) < kTileRows * k) rows.resize(kTileRows * k);
  const int64_t whole = m / kTileRows * kTileRows;
  std::copy(x + whole * k, x + m * k, rows.begin());
  return rows.data();
}

// Panels [p0, p1) of one weight for every row of x, on the tiles (configured by the caller).
void tile_panels(const Problem<c10::BFloat16>& pr, int64_t p0, int64_t p1) {
  constexpr int64_t kBlockRows = 2 * kTileRows;
  alignas(64) float c[kBlockRows * 2 * kPanel];
  const int64_t k = 2 * pr.steps, whole = pr.m / kTileRows * kTileRows;
  auto a = [&](int64_t row) { return row < whole ? pr.x + row * k : pr.x_tail; };  // 16 rows from `row`
  for (int64_t p = p0; p < p1; p += 2) {
    const bool two_panels = p + 1 < p1;
    const uint32_t* b0 = pr.lanes() + p * pr.steps * kPanel;
    const uint32_t* b1 = b0 + pr.steps * kPanel;
    for (int64_t row = 0; row < pr.m; row += kBlockRows) {
      const bool two_rows = row + kTileRows < pr.m;
      const c10::BFloat16* a1 = two_rows ? a(row + kTileRows) : nullptr;
      tile_product_blocks<false>(two_rows, two_panels, a(row), a1, k, b0, b1, kPanel, k, c, 2 * kPanel);
      store_tile_block(pr, c, row, std::min(kBlockRows, pr.m - row), p, two_panels ? 2 : 1);
    }
  }
}
#endif

template <int MR, int NR, Fetch F, typename T>
void register_block(const Problem<T>& pr, int64_t row, int64_t p, int64_t next_panels, int64_t fetch) {
  if constexpr (std::is_same_v<T, float>) {
    fp32_block<MR, NR, F>(pr, row, p, next_panels, fetch);
  } else {
#if defined(TRELLIS_BF16_DOTS)
    bf16_block<MR, NR, F>(pr, row, p, next_panels, fetch);
#endif
  }
}

// Rows of x per register block in a pass of `m` rows: kMR, except that bf16 passes of 2 to kMR
// rows (a decode step's sessions) run as two blocks of half of them. The first streams the group
// of panels from memory with half the products a line, the second reads it from L2 and fetches
// the next group meanwhile (Fetch::next). On a 2-core Zen 5 EPYC, alternating processes: SmolLM2's
// 210 layers at 2-4 rows 1.0-1.05x in the host's slow spells and 1.1-1.25x in its fast ones, the
// 56 MB LM head at 4 rows 1.05-1.3x; the engine's four-session decode step 8.32 against 8.54 ms
// (medians of 10 rounds, 8 of them faster). fp32 passes, whose first rows prefetch ahead, ran
// 2-5 % slower split so (the layers at 2 and 4 rows, five rounds): they keep one block.
template <typename T>
int64_t block_rows(int64_t m) {
  return std::is_same_v<T, c10::BFloat16> && m > 1 && m <= kMR ? (m + 1) / 2 : kMR;
}

// Panels [p0, p1) of one weight for every row of x.
template <typename T>
void run_panels(const Problem<T>& pr, int64_t p0, int64_t p1, bool tiles) {
#if defined(TRELLIS_BF16_DOTS)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (tiles) return tile_panels(pr, p0, p1);
  }
#endif
  for (int64_t m0 = 0; m0 < pr.m; m0 += kMc) {
    const int64_t m1 = std::min(pr.m, m0 + kMc);
    const int64_t rows = block_rows<T>(m1 - m0);
    for (int64_t p = p0; p < p1; p += kNR) {
      with_count<kNR>(std::min<int64_t>(kNR, p1 - p), [&](auto nr) {
        constexpr int NR = decltype(nr)::value;
        const int64_t next_panels = std::min<int64_t>(kNR, p1 - p - NR);  // after these, in this range
        // The next group's lines (next_panels * steps, from panel p + NR on), split between the blocks
        // after the first: block b > 0 fetches from line (b - 1) * share on.
        const int64_t later_blocks = (m1 - m0 - 1) / rows;
        const int64_t share = later_blocks > 0 ? (next_panels * pr.steps + later_blocks - 1) / later_blocks : 0;
        auto block = [&](auto mr, int64_t row) {
          constexpr int MR = decltype(mr)::value;
          const int64_t b = (row - m0) / rows;
          if (b == 0) return register_block<MR, NR, Fetch::ahead>(pr, row, p, next_panels, 0);
          const int64_t fetch = next_panels == 0 ? 0 : (NR * pr.steps + (b - 1) * share) * kPanel;
          register_block<MR, NR, Fetch::next>(pr, row, p, next_panels, fetch);
        };
        for (int64_t row = m0, n; row < m1; row += n) {
          n = std::min(rows, m1 - row);
          with_count<kMR>(n, [&](auto mr) { block(mr, row); });
        }
      });
    }
  }
}

// Every problem's panels in one parallel region: threads take contiguous runs of the panels of all
// (so a small weight, k or v's 12 panels, is not split alone); on AMX `tiles`, each configuring them.
template <typename T>
void run_problems(const std::vector<Problem<T>>& problems, bool tiles) {
  std::vector<int64_t> first_panel{0};  // of each problem, in the panels of all
  for (const Problem<T>& pr : problems) {
    first_panel.push_back(first_panel.back() + (pr.m > 0 ? (pr.n + kPanel - 1) / kPanel : 0));
  }
  at::parallel_for(0, first_panel.back(), 1, [&](int64_t g0, int64_t g1) {
#if defined(TRELLIS_BF16_DOTS)
    if (tiles) configure_product_tiles();
#endif
    for (size_t i = 0; i < problems.size(); ++i) {
      const int64_t p0 = std::max(g0, first_panel[i]), p1 = std::min(g1, first_panel[i + 1]);
      if (p0 < p1) run_panels(problems[i], p0 - first_panel[i], p1 - first_panel[i], tiles);
    }
#if defined(TRELLIS_BF16_DOTS)
    if (tiles) release_tiles();
#endif
  });
}

// x [..., K] by each of `panels` (with `bias` for the first, where given) on the kernel.
template <typename T>
std::vector<at::Tensor> run_kernel(const at::Tensor& x, at::TensorList panels, at::IntArrayRef out_features,
                                   const std::optional<at::Tensor>& bias) {
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor xc = x.contiguous();
  at::Tensor bias_f;  // fp32, zero past the last feature, so a partial panel reads no further
  if (bias.has_value()) {
    bias_f = at::zeros({panels[0].size(0) * kPanel}, x.options().dtype(at::kFloat));
    bias_f.narrow(0, 0, out_features[0]).copy_(*bias);
  }
  bool tiles = false;
  const T* x_tail = nullptr;
#if defined(TRELLIS_BF16_DOTS)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    tiles = tiles_run(panels[0].size(1));  // every weight has x's K, so the same steps
    if (tiles && m % kTileRows != 0) x_tail = tail_rows(xc.const_data_ptr<T>(), m, x.size(-1));
  }
#endif
  std::vector<at::Tensor> outputs;
  std::vector<Problem<T>> problems;
  for (size_t i = 0; i < panels.size(); ++i) {
    outputs.push_back(at::empty({m, out_features[i]}, x.options()));
    problems.push_back({xc.const_data_ptr<T>(), x_tail,
                        panels[i].const_data_ptr(), i == 0 && bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr,
                        outputs.back().data_ptr<T>(), m, out_features[i], panels[i].size(1)});
  }
  run_problems(problems, tiles);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  for (size_t i = 0; i < outputs.size(); ++i) {
    shape.back() = out_features[i];
    outputs[i] = outputs[i].view(shape);
  }
  return outputs;
}

#endif

// Without the kernel: the same products, summed in fp32 by ATen, rounded once to x's dtype. x as
// one contiguous [M, K] matrix, so that its layout and leading dims do not change the BLAS's sums.
at::Tensor through_aten(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                        int64_t out_features) {
  const int64_t k = x.size(-1);
  const at::Tensor weight =
      panels.permute({0, 2, 1, 3}).reshape({panels.size(0) * kPanel, k}).narrow(0, 0, out_features);
  const std::optional<at::Tensor> bias_f = bias.has_value() ? std::optional(bias->to(at::kFloat)) : std::nullopt;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor rows = x.reshape({m, k}).contiguous().to(at::kFloat);
  return at::linear(rows, weight.to(at::kFloat), bias_f).to(x.scalar_type()).view(shape);
}

std::vector<at::Tensor> compute(const at::Tensor& x, at::TensorList panels, at::IntArrayRef out_features,
                                const std::optional<at::Tensor>& bias) {
#if defined(TRELLIS_PANEL_KERNELS)
  if (kernel_runs(x.scalar_type())) {
    return x.scalar_type() == at::kFloat ? run_kernel<float>(x, panels, out_features, bias)
                                         : run_kernel<c10::BFloat16>(x, panels, out_features, bias);
  }
#endif
  std::vector<at::Tensor> outputs;
  for (size_t i = 0; i < panels.size(); ++i) {
    outputs.push_back(through_aten(x, panels[i], i == 0 ? bias : std::nullopt, out_features[i]));
  }
  return outputs;
}

// panel_linear of one x by several bias-free weights (a layer's q/k/v; gate/up) in one parallel
// region over all their panels, where separate calls would each wake the threads.
std::vector<at::Tensor> panel_linear_group_cpu(const at::Tensor& x, at::TensorList panels,
                                               at::IntArrayRef out_features) {
  TORCH_CHECK_VALUE(panels.size() == out_features.size(), "panel_linear_group: ", panels.size(),
                    " panel tensors but ", out_features.size(), " output widths");
  for (size_t i = 0; i < panels.size(); ++i) check_arguments(x, panels[i], std::nullopt, out_features[i]);
  if (panels.empty()) return {};
  return compute(x, panels, out_features, std::nullopt);
}

at::Tensor panel_linear_cpu(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                            int64_t out_features) {
  check_arguments(x, panels, bias, out_features);
  return compute(x, {panels}, {out_features}, bias)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(trellis_cpp, CPU, m) {
  m.impl("panel_linear", &panel_linear_cpu);
  m.impl("panel_linear_group", &panel_linear_group_cpu);
}

}  // namespace trellis
