"""The linear kernels of CPU inference (blas, onednn, packed): same results as nn.Linear up to fp32
reassociation, kept current when weights change, invisible to state dicts, copies and training."""

import copy
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

from tests.models import smollm2_reference, smollm2_tokenizer, smollm2_trellis, tiny_config, tiny_pair
from trellis import ops
from trellis.models.llama import TrellisLlama
from trellis.ops.panels import pack_panels
from trellis.runner import cpu_linear
from trellis.runner import runner as runner_module
from trellis.runner.cpu_linear import CPULinear, linear_kernel_of, set_linear_kernel

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_available(), reason="no oneDNN on this machine or build")
ONEDNN_KINDS = ["onednn", "packed"]
needs_onednn_bf16 = pytest.mark.skipif(torch.bfloat16 not in cpu_linear.onednn_dtypes(),
                                       reason="oneDNN does not compute bf16 on this CPU")
IDS = torch.arange(3, 40)[None]


class RecordOps(TorchDispatchMode):
    """The ops a block of code runs, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_onednn
@pytest.mark.parametrize("kind", ONEDNN_KINDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 5, 48), (0, 48), (48,)])
def test_matches_nn_linear(kind, bias, shape):
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 40, bias=bias)
    layer = copy.deepcopy(plain)
    assert set_linear_kernel(layer, kind) == 1 and type(layer) is CPULinear and linear_kernel_of(layer) == kind
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
        layer.double(), plain.double()  # not fp32: F.linear, exactly (over the weight in its layout)
        assert torch.equal(layer(x.double()), torch.nn.functional.linear(x.double(), layer.weight, layer.bias))
        torch.testing.assert_close(layer(x.double()), plain(x.double()))


@needs_onednn_bf16
@pytest.mark.parametrize("kind", ONEDNN_KINDS)
def test_bf16_runs_on_onednn_within_rounding_of_nn_linear(kind, monkeypatch):
    monkeypatch.setattr(cpu_linear, "bf16_panels", lambda: False)  # as on CPUs without AVX512_BF16
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 40, dtype=torch.bfloat16)
    layer = copy.deepcopy(plain)
    set_linear_kernel(layer, kind)
    x = torch.randn(7, 48, dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), plain.weight.double(), plain.bias.double())
    with torch.no_grad(), RecordOps() as recorded:
        got = layer(x)
    assert "mkldnn._linear_pointwise.default" in recorded.names and got.dtype == torch.bfloat16
    # Both accumulate in fp32 and round once: the same error as nn.Linear's, to within a rounding step.
    assert (got.double() - exact).abs().max() <= 2 * (plain(x).double() - exact).abs().max() + 1e-3
    layer.half()  # fp16: F.linear under every kind (oneDNN's fp16 is the slower here)
    with torch.no_grad(), RecordOps() as recorded:
        assert torch.equal(layer(x.half()), torch.nn.functional.linear(x.half(), layer.weight, layer.bias))
    assert "mkldnn._linear_pointwise.default" not in recorded.names


# (dtype, qtype, kind) of the streamed layers: every kind in bf16, the row-major kinds in fp32 (every
# kind but on Intel CPUs, where "onednn" stores fp32 weights input-major)
STREAMED = [(torch.bfloat16, "BF16", kind) for kind in cpu_linear.LINEAR_KERNELS] + \
           [(torch.float32, "F32", kind) for kind in cpu_linear.LINEAR_KERNELS
            if kind != "onednn" or not cpu_linear.input_major(torch.float32)]


@needs_onednn
@pytest.mark.parametrize(("dtype", "qtype", "kind"), STREAMED)
def test_a_decode_steps_rows_stream_through_trellis_kernel(dtype, qtype, kind, monkeypatch):
    """The few rows of a decode step (streamed_rows: 1-4 in bf16, 1-8 in fp32 on x86 CPUs) read the
    weight with
    quant_linear's streaming kernel (exactly its result); other row counts go to the kind's
    library; a layer with a bias, or whose width is not whole 32-weight blocks, never streams.
    (Where "packed" layers keep panels, those serve every row count: the next test.)"""
    monkeypatch.setattr(cpu_linear, "bf16_panels", lambda: False)
    monkeypatch.setattr(cpu_linear, "fp32_panels", lambda: False)
    rows = cpu_linear.streamed_rows(dtype)
    if rows is None:
        pytest.skip(f"no {dtype} matmul streams on this CPU")
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 40, bias=False, dtype=dtype)
    set_linear_kernel(layer, kind)
    exact = lambda x: torch.nn.functional.linear(x.double(), layer.weight.double())
    first, last = rows
    for count, streamed in [(first - 1, False), (first, True), (last, True), (last + 1, False)]:
        if count == 0:
            continue
        x = torch.randn(count, 64, dtype=dtype)
        with torch.no_grad(), RecordOps() as recorded:
            got = layer(x)
        assert ("trellis_cpp.quant_linear.default" in recorded.names) == streamed, count
        assert got.dtype == dtype and (got.double() - exact(x)).abs().max() <= (1e-2 if dtype == torch.bfloat16 else 1e-5)
        if streamed:
            assert torch.equal(got, ops.quant_linear(x, layer.weight.view(torch.uint8), qtype))
    for other in (torch.nn.Linear(64, 40, dtype=dtype), torch.nn.Linear(48, 40, bias=False, dtype=dtype)):
        set_linear_kernel(other, kind)
        with torch.no_grad(), RecordOps() as recorded:
            other(torch.randn(first, other.in_features, dtype=dtype))
        assert "trellis_cpp.quant_linear.default" not in recorded.names


PANEL_DTYPES = [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not cpu_linear.bf16_panels(),
                                                          reason="no AVX512_BF16 here: oneDNN's copy")),
    pytest.param(torch.float32, marks=pytest.mark.skipif(not cpu_linear.fp32_panels(),
                                                         reason="no AVX-512 build off Intel here: oneDNN's copy")),
]


@pytest.mark.parametrize("dtype", PANEL_DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_layers_keep_panels_for_every_row_count(dtype, bias):
    """Where they serve (bf16: AVX512_BF16, on AMX tiles where there are tiles; fp32: an AVX-512 build on a CPU other than
    Intel's), a "packed" layer's copy is Trellis' panels, which ``panel_linear`` multiplies at
    every row count (none streams, none goes to oneDNN); any other kind does not use them, nor
    the other dtype where its own panels do not serve."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 40, bias=bias, dtype=dtype)
    set_linear_kernel(layer, "packed")
    panels = pack_panels(layer.weight.detach())
    for rows in (1, 4, 5, 9, 64):
        x = torch.randn(rows, 64, dtype=dtype)
        with torch.no_grad(), RecordOps() as recorded:
            got = layer(x)
        assert "trellis_cpp.panel_linear.default" in recorded.names, rows
        assert not {"trellis_cpp.quant_linear.default", "mkldnn._linear_pointwise.default"} & set(recorded.names)
        assert torch.equal(got, ops.panel_linear(x, panels, layer.bias, 40))
    assert layer.streamed_weight(1, dtype) is None
    assert torch.equal(layer._packed[3], panels)  # one copy, the weight's size
    assert "panels" in cpu_linear.rounding_identity("packed", dtype)
    assert "streamed" not in cpu_linear.rounding_identity("packed", dtype)
    assert "panels" not in cpu_linear.rounding_identity("onednn", dtype)
    for kind in ("onednn", "blas"):
        set_linear_kernel(layer, kind)
        with torch.no_grad(), RecordOps() as recorded:
            layer(torch.randn(5, 64, dtype=dtype))
        assert "trellis_cpp.panel_linear.default" not in recorded.names


@needs_onednn_bf16
def test_packed_copies_are_made_when_the_weights_are_laid_out():
    """The runner makes a "packed" model's copies when it lays its weights out (here ``.to()``;
    also loading, ``set_linear_kernel`` and ``prefix_cache.reset()``, which makes them afresh; not
    ``prefix_cache.clear()``), so the first request reads them and makes none; other kinds make none."""
    _, model = tiny_pair()
    model.to(torch.bfloat16)
    assert model.linear_kernel == "packed"
    layers = [m for m in model.modules() if type(m) is CPULinear]
    copies = [m._packed[3] for m in layers if m._packed is not None]
    assert len(copies) == len(layers) == 7 * model.config.num_hidden_layers + 1
    with torch.no_grad():
        first = model(IDS).logits
    assert all(m._packed[3] is copy for m, copy in zip(layers, copies))
    model.prefix_cache.clear()  # the prefixes only: the copies stay
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    assert all(m._packed[3] is copy for m, copy in zip(layers, copies))
    model.prefix_cache.reset()
    assert all(m._packed is not None and m._packed[3] is not copy for m, copy in zip(layers, copies))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, first)
    model.set_linear_kernel("onednn")
    assert all(m._packed is None for m in layers)


@needs_onednn
def test_fp32_panels_serve_on_avx512_builds_whatever_the_vendor(vendor, monkeypatch):
    """fp32 panels are the fp32 default where the kernels are built for AVX-512, on Intel's CPUs as
    on AMD's; without an AVX-512 build the default is MKL's "blas" on Intel, "onednn" elsewhere."""
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and ops.default_backend(torch.device("cpu")) == "cpp"
    intel_library = "blas" if torch.backends.mkl.is_available() else "onednn"
    for name, library in (("AuthenticAMD", "onednn"), ("GenuineIntel", intel_library)):
        vendor(name)
        assert cpu_linear.fp32_panels() == avx512 == cpu_linear.panels_serve("packed", torch.float32)
        assert cpu_linear.default_linear_kernel(torch.float32) == ("packed" if avx512 else library)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpu_linear.fp32_panels.cache_clear()
    assert not cpu_linear.fp32_panels() and cpu_linear.default_linear_kernel(torch.float32) == intel_library
    vendor("AuthenticAMD")
    assert cpu_linear.default_linear_kernel(torch.float32) == "onednn"


@needs_onednn
def test_input_major_fp32_weights_do_not_stream(intel):
    layer = torch.nn.Linear(64, 40, bias=False)
    set_linear_kernel(layer, "onednn")  # input-major in fp32: the kernel reads row-major weights only
    with torch.no_grad(), RecordOps() as recorded:
        torch.testing.assert_close(layer(torch.ones(4, 64)), torch.ones(4, 64) @ layer.weight.T)
    assert "trellis_cpp.quant_linear.default" not in recorded.names
    assert "mkldnn._linear_pointwise.default" in recorded.names


@needs_onednn
def test_onednn_keeps_fp32_weights_row_major_and_streams_decode_rows_off_intel(vendor, monkeypatch):
    """On AMD (any x86 CPU but Intel's), a decode step's fp32 rows, one to eight, stream through
    Trellis' kernel under every kind but fp32 panels, which reads row-major weights: so ``"onednn"``,
    the fp32 default there where panels do not serve, keeps them row-major, as bf16 does; nine rows
    on go to oneDNN."""
    vendor("AuthenticAMD")
    monkeypatch.setattr(cpu_linear, "fp32_panels", lambda: False)
    assert cpu_linear.streamed_rows(torch.float32) == (1, 8) and not cpu_linear.input_major(torch.float32)
    ref, model = tiny_pair()
    assert model.linear_kernel == "onednn"
    assert all(m.weight.is_contiguous() for m in model.modules() if linear_kernel_of(m))
    for rows, library in [(1, False), (8, False), (9, True)]:
        x = torch.randn(rows, model.config.hidden_size)
        with torch.no_grad(), RecordOps() as recorded:
            got = model.lm_head(x)
        assert ("trellis_cpp.quant_linear.default" in recorded.names) != library, rows
        assert ("mkldnn._linear_pointwise.default" in recorded.names) == library, rows
        torch.testing.assert_close(got, ref.lm_head(x), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=0, atol=1e-4)
    vendor("GenuineIntel")
    assert cpu_linear.streamed_rows(torch.float32) == (1, 8) and cpu_linear.input_major(torch.float32)


@needs_onednn_bf16
def test_the_kind_follows_the_dtype_unless_chosen():
    model = TrellisLlama(tiny_config())
    fp32_default = cpu_linear.default_linear_kernel(torch.float32)
    assert model.linear_kernel == fp32_default and not model.runner.linear_kernel_chosen
    model.to(torch.bfloat16)  # bf16's default, packed, not fp32's
    assert model.linear_kernel == "packed" and linear_kernel_of(model.lm_head) == "packed"
    model.float()
    assert model.linear_kernel == fp32_default == linear_kernel_of(model.model.layers[0].mlp.up_proj)
    model.set_linear_kernel("onednn")  # chosen: kept through conversions and copies
    model.to(torch.bfloat16)
    copied = copy.deepcopy(model)
    assert model.linear_kernel == copied.linear_kernel == "onednn" and copied.runner.linear_kernel_chosen
    assert all(m.weight.is_contiguous() for m in model.modules() if linear_kernel_of(m))  # bf16's layout
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, copied(IDS).logits)


@needs_onednn_bf16
def test_onednn_keeps_bf16_weights_row_major(intel):
    """Input-major pays in fp32 only (cpu_linear.input_major): converting the model lays out the
    weights that ``.to()`` converted with their fp32 strides, and converting back restores them."""
    _, model = tiny_pair()
    model.set_linear_kernel("onednn")
    assert _input_major(model.model.layers[0].mlp.up_proj.weight)
    model.to(torch.bfloat16)
    assert all(m.weight.is_contiguous() for m in model.modules() if linear_kernel_of(m))
    model.float()
    assert _input_major(model.model.layers[0].mlp.up_proj.weight)


@needs_onednn
def test_non_contiguous_input():
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 40)
    layer = copy.deepcopy(plain)
    set_linear_kernel(layer, "onednn")
    x = torch.randn(7, 3, 48).transpose(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_repacks_when_the_weight_changes():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    set_linear_kernel(layer, "packed")
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight = torch.nn.Parameter(torch.randn(8, 16))  # replaced: a new data pointer
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(before, layer(x))


@needs_onednn
@pytest.mark.parametrize("kind", ONEDNN_KINDS)
def test_training_takes_the_plain_path_and_gets_gradients(kind):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    set_linear_kernel(layer, kind)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.weight.grad is not None and layer._packed is None


def test_subclasses_of_linear_are_left_alone():
    class Adapter(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(Adapter(4, 4), torch.nn.ReLU())
    assert set_linear_kernel(model, "blas") == 0 and type(model[0]) is Adapter


def test_bad_kinds_are_refused_and_nothing_changes(monkeypatch):
    _, model = tiny_pair()
    kind = model.linear_kernel
    with pytest.raises(ValueError, match="unknown linear kernel 'mkl'"):
        model.set_linear_kernel("mkl")
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs oneDNN on an x86-64 CPU"):
        model.set_linear_kernel("packed")
    assert model.linear_kernel == kind and linear_kernel_of(model.lm_head) == kind
    assert cpu_linear.default_linear_kernel() == "blas"


def test_a_bad_kind_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    _, model = tiny_pair()
    model.save_pretrained(tmp_path)
    loads = []
    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    with pytest.raises(ValueError, match="unknown linear kernel 'fpga'"):
        TrellisLlama.from_pretrained(tmp_path, device="cpu", linear_kernel="fpga")
    assert loads == []


@needs_onednn
def test_the_fp32_default_follows_the_cpu_vendor(vendor):
    vendor("AuthenticAMD")
    model = TrellisLlama(tiny_config())
    amd = "packed" if cpu_linear.fp32_panels() else "onednn"  # panels where the build is AVX-512
    assert model.linear_kernel == amd and type(model.lm_head) is CPULinear and model.lm_head.kind == amd
    assert all(linear_kernel_of(m) in (None, amd) for m in model.modules())
    vendor("GenuineIntel")  # MKL's own CPUs: MKL where the panels do not serve
    expected = "packed" if cpu_linear.fp32_panels() else "blas" if torch.backends.mkl.is_available() else "onednn"
    assert cpu_linear.default_linear_kernel() == expected == TrellisLlama(tiny_config()).linear_kernel


@needs_onednn
def test_the_default_adds_no_copy_of_the_weights_where_it_would_not_fit(monkeypatch):
    """Where the dtype's default kind is "packed" but its copy of the weights would take more than
    half the free memory, a model runs the fastest kind without a copy, and a warning says so; with
    room for the copy, or with "packed" chosen, the copy is made."""
    dtype = next((d for d in (torch.float32, torch.bfloat16) if cpu_linear.default_linear_kernel(d) == "packed"), None)
    if dtype is None:
        pytest.skip("no dtype's default kind keeps a copy of the weights here")
    copy = cpu_linear.packed_copy_bytes(TrellisLlama._from_config(tiny_config(), dtype=dtype))
    layers = [m for m in TrellisLlama._from_config(tiny_config(), dtype=dtype).modules() if linear_kernel_of(m)]
    assert copy == sum(m.weight.nbytes for m in layers) > 0
    monkeypatch.setattr(runner_module, "free_memory", lambda device: 2 * copy + 1)
    assert TrellisLlama._from_config(tiny_config(), dtype=dtype).linear_kernel == "packed"
    monkeypatch.setattr(runner_module, "free_memory", lambda device: 2 * copy - 1)
    unpacked = cpu_linear.unpacked_linear_kernel(dtype)
    with pytest.warns(UserWarning, match=rf"'packed' linear kernel would add a \d+\.\d GiB copy of the weights, more "
                                         rf"than half of the \d+\.\d GiB of free memory; running '{unpacked}'"):
        model = TrellisLlama._from_config(tiny_config(), dtype=dtype)
    assert model.linear_kernel == unpacked != "packed" and not model.runner.linear_kernel_chosen
    with torch.no_grad():
        model(IDS)
    assert all(getattr(m, "_packed", None) is None for m in model.modules())
    model.set_linear_kernel("packed")  # chosen: kept, copy and all
    with torch.no_grad():
        model(IDS)
    assert model.linear_kernel == "packed" and any(getattr(m, "_packed", None) is not None for m in model.modules())


@needs_onednn_bf16
def test_packed_is_the_bf16_default_where_onednn_computes_it():
    assert TrellisLlama._from_config(tiny_config(), dtype=torch.bfloat16).linear_kernel == "packed"
    fp16 = TrellisLlama._from_config(tiny_config(), dtype=torch.float16)
    assert fp16.linear_kernel == ("blas" if cpu_linear.intel_cpu() and torch.backends.mkl.is_available()
                                  else "onednn")  # fp32's library kind: F.linear in fp16 under every kind


@needs_onednn
def test_model_state_dict_copies_pickles_and_switching_back():
    _, model = tiny_pair()
    keys = set(model.state_dict())
    model.set_linear_kernel("onednn")  # (where fp32 panels serve, "packed" is the default)
    assert model.set_linear_kernel("packed") == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    with torch.no_grad():
        model(IDS)  # packs
    assert set(model.state_dict()) == keys
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert clone.linear_kernel == "packed" and clone.lm_head.kind == "packed" and clone.lm_head._packed is None
    with torch.no_grad():
        torch.testing.assert_close(clone(IDS).logits, model(IDS).logits)
    assert model.set_linear_kernel("blas") == 15 and linear_kernel_of(model.lm_head) == "blas"
    assert "_packed" not in model.lm_head.__dict__
    assert model.set_linear_kernel("blas") == 0


def _input_major(weight: torch.Tensor) -> bool:
    return weight.t().is_contiguous() and not weight.is_contiguous()


@needs_onednn
def test_onednn_stores_weights_input_major_and_other_kinds_row_major(intel):
    _, model = tiny_pair()
    layer = model.model.layers[0].mlp.up_proj
    param, values = layer.weight, layer.weight.detach().clone()
    model.set_linear_kernel("onednn")
    assert _input_major(layer.weight) and layer.weight is param and torch.equal(layer.weight, values)
    assert all(_input_major(m.weight) for m in model.modules() if linear_kernel_of(m))
    for kind in ("packed", "blas", "onednn", "blas"):
        model.set_linear_kernel(kind)
        assert _input_major(layer.weight) == (kind == "onednn") and torch.equal(layer.weight, values)
    assert layer.weight is param  # optimizers and hooks holding the parameter still see it


@needs_onednn
def test_a_tied_lm_head_keeps_the_embedding_row_major(intel):
    model = TrellisLlama(tiny_config(tie_word_embeddings=True))
    model.set_linear_kernel("onednn")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_contiguous()
    assert _input_major(model.model.layers[0].self_attn.q_proj.weight)


@needs_onednn
def test_loaded_and_saved_weights_keep_their_values(tmp_path, intel):
    ref, model = tiny_pair()
    model.set_linear_kernel("onednn")
    model.save_pretrained(tmp_path)  # safetensors takes contiguous tensors only: transformers copies
    loaded = TrellisLlama.from_pretrained(tmp_path, device="cpu", linear_kernel="onednn")
    assert loaded.linear_kernel == "onednn" and _input_major(loaded.model.layers[1].mlp.down_proj.weight)
    for (name, a), b in zip(ref.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ref(IDS).logits, rtol=0, atol=1e-4)


@needs_onednn
def test_a_replaced_row_major_weight_is_still_right(intel):
    layer = torch.nn.Linear(16, 8)
    set_linear_kernel(layer, "onednn")
    layer.weight = torch.nn.Parameter(torch.randn(8, 16))  # row-major: the slower oneDNN path, same result
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    set_linear_kernel(layer, "onednn")
    assert _input_major(layer.weight)


@needs_onednn
@pytest.mark.parametrize("kind", cpu_linear.LINEAR_KERNELS)
def test_tiny_model_matches_transformers_with_cache_hits(kind):
    ref, model = tiny_pair()
    model.set_linear_kernel(kind)
    with torch.no_grad():
        expected = ref(IDS).logits
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(model(IDS, logits_to_keep=1).logits, expected[:, -1:], rtol=0, atol=1e-4)
    assert model.prefix_cache.stats()["hit_tokens"] > 0
    assert torch.equal(model.generate(IDS, max_new_tokens=12, do_sample=False),
                       ref.generate(IDS, max_new_tokens=12, do_sample=False))


@needs_onednn
def test_switching_kernels_drops_the_cache_and_refuses_its_handles():
    _, model = tiny_pair()
    with torch.no_grad():
        out = model(IDS)
        model.set_linear_kernel("onednn" if model.linear_kernel == "packed" else "packed")
        assert model.prefix_cache.stats()["cached_blocks"] == 0
        with pytest.raises(RuntimeError, match="another KV cache"):
            model(IDS[:, :1], past_key_values=out.past_key_values)


@needs_onednn
@pytest.mark.parametrize("kind", ONEDNN_KINDS)
def test_smollm2_greedy_tokens_match_transformers(kind):
    tok, ref = smollm2_tokenizer(), smollm2_reference()
    model = smollm2_trellis(num_blocks=64, linear_kernel=kind)
    assert model.linear_kernel == kind
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    expected = ref.generate(ids, max_new_tokens=24, do_sample=False)
    for _ in range(2):  # cold, then with the prompt cached
        assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False), expected)
    with torch.no_grad():  # fp32 reassociation across 30 layers: measured 1.1e-4 to 1.3e-4 (|logits| up to ~39)
        got, want = model(ids).logits, ref(ids).logits
    assert (got - want).abs().max() <= 5e-4
