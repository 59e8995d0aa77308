// trellis_cpp::decoder_layers on CPU: the lean decoder's loop over its layers (the Python loop in
// trellis/runner/decoder.py is the spec), for layers whose projections all run as one of the
// group kinds below (Trellis' panels or quantized blocks, at::linear, oneDNN). Each op below is
// the one the Python loop calls, in the same order on the same tensors, so the results are the
// loop's bit for bit; what this saves is the loop itself: per
// decode step of SmolLM2, ~270 calls from Python into the dispatcher and the Python around them
// (2.5-4 ms a token on a 2-core EPYC, docs/decode-step.md), where a call from here costs well under
// a µs.
//
// Per layer l: norms[2l] and norms[2l+1] with eps[2l], eps[2l+1] (the input and post-attention
// RMSNorms), then four projection groups from `weights`, seven weights a layer in the order
// q, k, v | o | gate, up | down, group g running on kinds[4l+g]: "panels" (panel_linear_group, the
// weights' out_features from `out_features`), "linear" (at::linear per weight, bias-free: what
// F.linear runs for a layer on the BLAS), "onednn" (oneDNN's matmul per weight, bias-free: what
// CPULinear.forward runs on oneDNN), else a quant_linear_group qtype, followed by "@q8" where the
// group rounds x to 8-bit blocks (quantize_x).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

namespace trellis {
namespace {

constexpr int64_t kWeightsPerLayer = 7;  // q, k, v, o, gate, up, down
constexpr int64_t kGroupsPerLayer = 4;   // q/k/v, o, gate/up, down
constexpr int64_t kGroupStart[kGroupsPerLayer] = {0, 3, 4, 6};
constexpr int64_t kGroupSize[kGroupsPerLayer] = {3, 1, 2, 1};
const std::string kQ8Suffix = "@q8";  // a quantized group's kind that rounds x to 8-bit blocks

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The ops a layer calls, looked up once.
struct LayerOps {
  using Norm = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double);
  using Rope = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
  using Attention = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
                         const std::optional<at::Tensor>&);
  using SiluMul = at::Tensor(const at::Tensor&, const at::Tensor&);
  using QuantGroup = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, c10::string_view, bool);
  using PanelGroup = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::IntArrayRef);

  c10::TypedOperatorHandle<Norm> add_rms_norm = find_op<Norm>("trellis_cpp::add_rms_norm");
  c10::TypedOperatorHandle<Rope> rope_store_kv = find_op<Rope>("trellis_cpp::rope_store_kv");
  c10::TypedOperatorHandle<Attention> paged_attention = find_op<Attention>("trellis_cpp::paged_attention");
  c10::TypedOperatorHandle<SiluMul> silu_mul = find_op<SiluMul>("trellis_cpp::silu_mul");
  c10::TypedOperatorHandle<QuantGroup> quant_linear_group = find_op<QuantGroup>("trellis_cpp::quant_linear_group");
  c10::TypedOperatorHandle<PanelGroup> panel_linear_group = find_op<PanelGroup>("trellis_cpp::panel_linear_group");
};

const LayerOps& layer_ops() {
  static const LayerOps found;
  return found;
}

// x @ weight^T by oneDNN's matmul, bias-free, as CPULinear.forward calls it for its kinds "onednn"
// and "packed" (off the panels). Looked up on first use: a torch built without oneDNN lacks the
// op, and never lists the kind.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight) {
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                               c10::string_view, c10::List<std::optional<c10::Scalar>>,
                               std::optional<c10::string_view>);
  static const auto op = find_op<Signature>("mkldnn::_linear_pointwise");
  static const c10::List<std::optional<c10::Scalar>> no_scalars;
  return op.call(x, weight, std::nullopt, "none", no_scalars, "");
}

at::Tensor decoder_layers_cpu(const at::Tensor& hidden, at::TensorList norms, at::ArrayRef<double> eps,
                              const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_caches,
                              at::TensorList v_caches, const at::Tensor& slot_mapping, const at::Tensor& block_table,
                              const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                              const std::optional<at::Tensor>& plan, double scale, at::TensorList weights,
                              const c10::List<std::string>& kinds, at::IntArrayRef out_features, int64_t head_dim) {
  constexpr const char* op = "decoder_layers";
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK_VALUE(layers > 0, op, ": no layers (k_caches is empty)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(v_caches.size()) == layers, op, ": ", layers, " k_caches but ",
                    v_caches.size(), " v_caches");
  TORCH_CHECK_VALUE(static_cast<int64_t>(norms.size()) == 2 * layers && static_cast<int64_t>(eps.size()) == 2 * layers,
                    op, ": ", layers, " layers need ", 2 * layers, " norms and eps, got ", norms.size(), " and ",
                    eps.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == kWeightsPerLayer * layers &&
                        static_cast<int64_t>(out_features.size()) == kWeightsPerLayer * layers,
                    op, ": ", layers, " layers need ", kWeightsPerLayer * layers, " weights and out_features, got ",
                    weights.size(), " and ", out_features.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(kinds.size()) == kGroupsPerLayer * layers, op, ": ", layers,
                    " layers need ", kGroupsPerLayer * layers, " kinds, got ", kinds.size());
  TORCH_CHECK_VALUE(hidden.dim() == 2, op, ": hidden must be [T, H], got ", hidden.sizes());
  TORCH_CHECK_VALUE(head_dim > 0, op, ": head_dim must be positive, got ", head_dim);
  const LayerOps& ops = layer_ops();
  const int64_t tokens = hidden.size(0);

  // Group g of layer l over x: its outputs, in the order of its weights.
  auto project = [&](const at::Tensor& x, int64_t l, int64_t g) {
    const int64_t first = l * kWeightsPerLayer + kGroupStart[g];
    const at::TensorList group = weights.slice(first, kGroupSize[g]);
    const std::string kind = kinds.get(l * kGroupsPerLayer + g);
    if (kind == "panels") return ops.panel_linear_group.call(x, group, out_features.slice(first, kGroupSize[g]));
    if (kind == "linear" || kind == "onednn") {
      std::vector<at::Tensor> outputs;
      for (const at::Tensor& weight : group)
        outputs.push_back(kind == "linear" ? at::linear(x, weight) : onednn_linear(x, weight));
      return outputs;
    }
    const bool quantize_x = kind.size() > kQ8Suffix.size() &&
                            kind.compare(kind.size() - kQ8Suffix.size(), kQ8Suffix.size(), kQ8Suffix) == 0;
    const std::string qtype = quantize_x ? kind.substr(0, kind.size() - kQ8Suffix.size()) : kind;
    return ops.quant_linear_group.call(x, group, qtype, quantize_x);
  };
  std::optional<at::Tensor> update;  // what the last sublayer adds to the stream
  for (int64_t l = 0; l < layers; ++l) try {
    at::Tensor x = ops.add_rms_norm.call(hidden, update, norms[2 * l], eps[2 * l]);
    const std::vector<at::Tensor> qkv = project(x, l, 0);
    const at::Tensor q = ops.rope_store_kv.call(qkv[0].view({tokens, -1, head_dim}),
                                                qkv[1].view({tokens, -1, head_dim}),
                                                qkv[2].view({tokens, -1, head_dim}), cos, sin, k_caches[l],
                                                v_caches[l], slot_mapping);
    const at::Tensor attended = at::empty_like(q);
    ops.paged_attention.call(q, k_caches[l], v_caches[l], block_table, seq_lens, cu_seqlens_q, scale, attended, plan);
    update = project(attended.view({tokens, -1}), l, 1)[0];
    x = ops.add_rms_norm.call(hidden, update, norms[2 * l + 1], eps[2 * l + 1]);
    const std::vector<at::Tensor> gate_up = project(x, l, 2);
    update = project(ops.silu_mul.call(gate_up[0], gate_up[1]), l, 3)[0];
  } catch (c10::Error& error) {  // the same exception, saying where
    error.add_context(std::string(op) + ": in layer " + std::to_string(l));
    throw;
  }
  return *update;
}

}  // namespace

TORCH_LIBRARY_IMPL(trellis_cpp, CPU, m) { m.impl("decoder_layers", &decoder_layers_cpu); }
// oneDNN's packed weights are MkldnnCPU tensors, which pick the dispatch key when they are listed.
TORCH_LIBRARY_IMPL(trellis_cpp, MkldnnCPU, m) { m.impl("decoder_layers", &decoder_layers_cpu); }

}  // namespace trellis
