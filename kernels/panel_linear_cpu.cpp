// trellis::panel_linear on CPU (registered as trellis_cpp::panel_linear, and panel_linear_group for
// several weights over one x): y = x @ W^T (+ bias) for
// bf16 x and a bf16 W packed in panels (trellis/ops/panels.py is the specification): panel p holds
// output features 16p .. 16p + 15 with their inputs in pairs, lane c of pair j being
// (W[16p + c][2j], W[16p + c][2j + 1]). That is the operand of AVX512_BF16's vdpbf16ps: one
// instruction multiplies a pair of one row of x, broadcast, by that pair of 16 features (32
// multiply-adds, the products exact, summed in fp32, as oneDNN's bf16 matmul sums them on these
// CPUs). Results are rounded to bf16 once, after the bias.
//
// Threads split the panels; each runs a register block of kMR rows x kNR panels (24 fp32
// accumulators) along K for every kMR rows of x, so a block's panels (K * 128 bytes) are read from
// memory once and from L2 for the next rows; x is used as it lies (pairs broadcast from memory).
// On a 2-core AMD EPYC (AVX512_BF16, no AMX), over SmolLM2's layers this is 1.35-1.55x faster
// than oneDNN's matmul on its own blocked copy at 8-64 rows and level from 256, and 1.3x faster
// than the streaming kernel (quant_linear over the row-major weight) at 1-4 rows
// (docs/cpu-linear.md): oneDNN's small-M blocking leaves the units idle where this block keeps 24
// products in flight, and the streaming kernel widens every weight to fp32 first.
//
// Where the build or the CPU has no AVX512_BF16 the op computes the same sums through ATen
// (unpacked weights, fp32 matmul, per call). Trellis packs panels only on CPUs that have it
// (cpu_linear.bf16_panels), so that path serves direct calls, and builds whose compiler lacks the
// intrinsics (GCC < 11, clang < 12), where it is slow.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "bf16_dots.h"
#include "with_count.h"

namespace trellis {
namespace {

constexpr int64_t kPanel = 16;  // output features per panel: one register of fp32 lanes

void check_arguments(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                     int64_t out_features) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, "panel_linear: x must be bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(panels.scalar_type() == at::kBFloat16, "panel_linear: panels must be bfloat16, got ",
                   panels.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "panel_linear: x must have at least one dimension");
  TORCH_CHECK_VALUE(panels.dim() == 4 && panels.size(2) == kPanel && panels.size(3) == 2,
                    "panel_linear: panels must be [panels, in_features / 2, 16, 2], got ", panels.sizes());
  TORCH_CHECK_VALUE(panels.is_contiguous(), "panel_linear: panels must be contiguous");
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(k == 2 * panels.size(1), "panel_linear: x has ", k, " input features but the panels hold ",
                    2 * panels.size(1));
  TORCH_CHECK_VALUE(out_features >= 0 && (out_features + kPanel - 1) / kPanel == panels.size(0),
                    "panel_linear: ", panels.size(0), " panels do not hold ", out_features, " output features");
  TORCH_CHECK_VALUE(x.device().is_cpu() && panels.device().is_cpu(), "panel_linear: x and panels must be CPU tensors");
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kBFloat16, "panel_linear: bias must be bfloat16, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "panel_linear: bias must be [",
                      out_features, "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device().is_cpu(), "panel_linear: bias must be a CPU tensor");
  }
}

#if defined(TRELLIS_BF16_DOTS)

constexpr int kMR = 6;          // rows of x per register block
constexpr int kNR = 4;          // panels per register block: kMR * kNR accumulators
constexpr int64_t kMc = 192;    // rows of x per pass over a thread's panels: their pairs stay in L2
// Prefetch distance, in pairs (of NR panels: 16 KB at NR = 4). The hardware prefetcher follows each
// panel's run but restarts at every new group of panels; reads this far ahead keep the memory busy
// across those jumps: 1.15-1.25x at 1-8 rows (a decode step) on the 2-core AMD EPYC.
constexpr int64_t kAhead = 64;

struct Problem {
  const c10::BFloat16* x;  // [M, K]
  const uint32_t* w;       // panels as pairs: [P][K / 2][16]
  const float* bias;       // [P * 16] (zero past N), or null
  c10::BFloat16* y;        // [M, N]
  int64_t m, n, pairs;
};

// y[MR rows][NR panels from p] for the MR rows of x at `row`. The first rows over these panels
// (`prefetch`) also prefetch, kAhead pairs ahead of their reads, the rest of these panels and then
// the first pairs of the `next_panels` after them.
template <int MR, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void register_block(const Problem& pr, int64_t row,
                                                                                      int64_t p, bool prefetch,
                                                                                      int64_t next_panels) {
  const int64_t pairs = pr.pairs;
  const uint32_t* w = pr.w + p * pairs * kPanel;
  const c10::BFloat16* x = pr.x + row * 2 * pairs;
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < pairs; ++j) {
    if (prefetch) {
      const int64_t jj = j + kAhead;
      if (jj < pairs) {
        for (int c = 0; c < NR; ++c) __builtin_prefetch(w + (c * pairs + jj) * kPanel, 0, 2);
      } else if (next_panels > 0 && jj - pairs < pairs) {
        const uint32_t* next = w + NR * pairs * kPanel;
        for (int c = 0; c < next_panels; ++c) __builtin_prefetch(next + (c * pairs + jj - pairs) * kPanel, 0, 2);
      }
    }
    __m512bh b[NR];
    for (int c = 0; c < NR; ++c) b[c] = (__m512bh)_mm512_loadu_si512(w + (c * pairs + j) * kPanel);
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;  // x[row + r][2j], x[row + r][2j + 1]
      std::memcpy(&pair, x + r * 2 * pairs + 2 * j, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  // The last panel of W may hold fewer than 16 features.
  const int64_t last = std::min<int64_t>(kPanel, pr.n - (p + NR - 1) * kPanel);
  const __mmask16 last_mask = static_cast<__mmask16>((1u << last) - 1);
  for (int r = 0; r < MR; ++r) {
    c10::BFloat16* y = pr.y + (row + r) * pr.n + p * kPanel;
    for (int c = 0; c < NR; ++c) {
      __m512 v = acc[r][c];
      if (pr.bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(pr.bias + (p + c) * kPanel));
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(v);
      if (c < NR - 1 || last == kPanel) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c * kPanel), out);
      } else {
        _mm256_mask_storeu_epi16(y + c * kPanel, last_mask, out);
      }
    }
  }
}

// Panels [p0, p1) of one weight for every row of x.
void run_panels(const Problem& pr, int64_t p0, int64_t p1) {
  for (int64_t m0 = 0; m0 < pr.m; m0 += kMc) {
    const int64_t m1 = std::min(pr.m, m0 + kMc);
    for (int64_t p = p0; p < p1; p += kNR) {
      with_count<kNR>(std::min<int64_t>(kNR, p1 - p), [&](auto nr) {
        constexpr int NR = decltype(nr)::value;
        const int64_t next_panels = std::min<int64_t>(kNR, p1 - p - NR);  // after these, in this range
        int64_t row = m0;
        for (; row + kMR <= m1; row += kMR) register_block<kMR, NR>(pr, row, p, row == m0, next_panels);
        if (row < m1) {
          with_count<kMR - 1>(m1 - row, [&](auto mr) {
            register_block<decltype(mr)::value, NR>(pr, row, p, row == m0, next_panels);
          });
        }
      });
    }
  }
}

// Every problem's panels in one parallel region: threads take contiguous runs of the panels of all
// (so a small weight, k or v's 12 panels, is not split alone).
void run_problems(const std::vector<Problem>& problems) {
  std::vector<int64_t> first_panel{0};  // of each problem, in the panels of all
  for (const Problem& pr : problems) {
    first_panel.push_back(first_panel.back() + (pr.m > 0 ? (pr.n + kPanel - 1) / kPanel : 0));
  }
  at::parallel_for(0, first_panel.back(), 1, [&](int64_t g0, int64_t g1) {
    for (size_t i = 0; i < problems.size(); ++i) {
      const int64_t p0 = std::max(g0, first_panel[i]), p1 = std::min(g1, first_panel[i + 1]);
      if (p0 < p1) run_panels(problems[i], p0 - first_panel[i], p1 - first_panel[i]);
    }
  });
}

#endif

at::Tensor panel_linear_cpu(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                            int64_t out_features);

// panel_linear of one x by several bias-free weights (a layer's q/k/v; gate/up) in one parallel
// region over all their panels, where separate calls would each wake the threads.
std::vector<at::Tensor> panel_linear_group_cpu(const at::Tensor& x, at::TensorList panels,
                                               at::IntArrayRef out_features) {
  TORCH_CHECK_VALUE(panels.size() == out_features.size(), "panel_linear_group: ", panels.size(),
                    " panel tensors but ", out_features.size(), " output widths");
  for (size_t i = 0; i < panels.size(); ++i) check_arguments(x, panels[i], std::nullopt, out_features[i]);
  std::vector<at::Tensor> outputs;
#if defined(TRELLIS_BF16_DOTS)
  if (dpbf16_usable()) {
    const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
    const at::Tensor xc = x.contiguous();
    std::vector<Problem> problems;
    for (size_t i = 0; i < panels.size(); ++i) {
      outputs.push_back(at::empty({m, out_features[i]}, x.options()));
      problems.push_back({xc.const_data_ptr<c10::BFloat16>(), static_cast<const uint32_t*>(panels[i].const_data_ptr()),
                          nullptr, outputs.back().data_ptr<c10::BFloat16>(), m, out_features[i], x.size(-1) / 2});
    }
    run_problems(problems);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    for (size_t i = 0; i < outputs.size(); ++i) {
      shape.back() = out_features[i];
      outputs[i] = outputs[i].view(shape);
    }
    return outputs;
  }
#endif
  for (size_t i = 0; i < panels.size(); ++i) {
    outputs.push_back(panel_linear_cpu(x, panels[i], std::nullopt, out_features[i]));
  }
  return outputs;
}

at::Tensor panel_linear_cpu(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                            int64_t out_features) {
  check_arguments(x, panels, bias, out_features);
  const int64_t k = x.size(-1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
#if defined(TRELLIS_BF16_DOTS)
  if (dpbf16_usable()) {
    const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({m, out_features}, x.options());
    at::Tensor bias_f;  // fp32, zero past the last feature, so a partial panel reads no further
    if (bias.has_value()) {
      bias_f = at::zeros({panels.size(0) * kPanel}, x.options().dtype(at::kFloat));
      bias_f.narrow(0, 0, out_features).copy_(*bias);
    }
    run_problems({{xc.const_data_ptr<c10::BFloat16>(), static_cast<const uint32_t*>(panels.const_data_ptr()),
                   bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr, y.data_ptr<c10::BFloat16>(), m,
                   out_features, k / 2}});
    return y.view(shape);
  }
#endif
  // The same products, summed in fp32 by ATen, rounded once.
  const at::Tensor weight =
      panels.permute({0, 2, 1, 3}).reshape({panels.size(0) * kPanel, k}).narrow(0, 0, out_features);
  const std::optional<at::Tensor> bias_f = bias.has_value() ? std::optional(bias->to(at::kFloat)) : std::nullopt;
  return at::linear(x.to(at::kFloat), weight.to(at::kFloat), bias_f).to(at::kBFloat16).view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(trellis_cpp, CPU, m) {
  m.impl("panel_linear", &panel_linear_cpu);
  m.impl("panel_linear_group", &panel_linear_group_cpu);
}

}  // namespace trellis
