"""CPU weights on transparent huge pages: loaded models' weights move there, keep their values,
layouts and identities, stay separate tensors, and the mapping goes when the weights do."""

import copy
import gc
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models import smollm2_dir
from trellis.models.llama import TrellisLlama
from trellis.runner import cpu_linear, huge_pages
from trellis.runner.huge_pages import HUGE_PAGE, place_on_huge_pages, placed

needs_huge_pages = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here")


def mapping_flags(tensor: torch.Tensor) -> list[str]:
    """The kernel's VmFlags of the mapping that holds ``tensor`` (``hg``: advised huge pages)."""
    address, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(bound, 16) for bound in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError("no mapping holds the tensor")


def weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def layers() -> torch.nn.Module:
    """~5 MB of weights: two 1024x512 fp32 layers, one stored input-major, a tied pair, two
    tensors over one storage, a view of part of one, a buffer."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512), torch.nn.Embedding(64, 32),
                                 torch.nn.Linear(32, 64, bias=False))
    module[1].weight.data = module[1].weight.data.t().contiguous().t()  # input-major
    module[3].weight = module[2].weight  # tied
    shared = torch.randn(16)
    module[0].register_parameter("first", torch.nn.Parameter(shared))  # two tensors over one whole storage
    module[0].register_buffer("second", shared.view(4, 4))
    halves = torch.randn(2, 16)
    module[1].register_buffer("part", halves[0])  # a view of part of a storage
    module[0].register_buffer("scale", torch.arange(8.0))
    return module


@needs_huge_pages
def test_weights_move_with_their_values_layouts_and_identities():
    module = layers()
    before = {name: (t.clone(), t.stride(), t) for name, t in module.state_dict(keep_vars=True).items()}
    moved = place_on_huge_pages(weights(module))
    assert moved == 6  # the weights (the tied one once), biases and buffer; not the tensors sharing a storage
    state = module.state_dict(keep_vars=True)
    for name, (values, stride, tensor) in before.items():
        assert state[name] is tensor, name  # the same Parameter objects: optimizers and ties keep them
        assert torch.equal(state[name], values) and state[name].stride() == stride, name
        assert placed(tensor) == (name not in ("0.first", "0.second", "1.part")), name
    assert module[3].weight is module[2].weight
    assert module[1].weight.t().is_contiguous()  # still input-major
    assert module[0].weight.requires_grad and not module[0].scale.requires_grad
    assert "hg" in mapping_flags(module[0].weight)
    assert place_on_huge_pages(weights(module)) == 0  # nothing left to move


@needs_huge_pages
def test_moved_weights_stay_separate_tensors():
    module = layers()
    place_on_huge_pages(weights(module))
    weight, bias = module[0].weight, module[0].bias
    assert weight.untyped_storage().data_ptr() != bias.untyped_storage().data_ptr()
    versions = bias._version
    with torch.no_grad():
        weight.mul_(2)  # an in-place edit is seen on its tensor alone
    assert bias._version == versions
    copied = copy.deepcopy(module)
    assert torch.equal(copied[0].weight, weight) and not placed(copied[0].weight)
    unpickled = pickle.loads(pickle.dumps(module))
    assert torch.equal(unpickled[1].weight, module[1].weight)


@needs_huge_pages
def test_moved_weights_save_and_load(tmp_path):
    module = layers()
    place_on_huge_pages(weights(module))
    state = {name: t.contiguous() for name, t in module.state_dict().items()
             if name not in ("3.weight", "0.first", "0.second", "1.part")}
    save_file(state, tmp_path / "weights.safetensors")  # refuses tensors that share memory
    loaded = load_file(tmp_path / "weights.safetensors")
    assert all(torch.equal(loaded[name], t) for name, t in state.items())


@needs_huge_pages
def test_the_mapping_is_freed_with_the_weights():
    module = layers()
    place_on_huge_pages(weights(module))
    arena = huge_pages._arenas[-1][2]
    assert arena() is not None
    del module
    gc.collect()
    assert arena() is None


@needs_huge_pages
def test_a_weight_laid_out_anew_takes_the_others_along_and_the_old_mapping_is_freed():
    """Else the tensors left in it (a model's embedding and norms, after its linear weights moved
    to another layout) keep the whole mapping resident: 407 MiB for SmolLM2 under onednn."""
    module = layers()
    place_on_huge_pages(weights(module))
    old = huge_pages._arenas[-1][2]
    module[0].weight.data = module[0].weight.data.t().contiguous().t()  # a new layout: off huge pages
    assert not placed(module[0].weight)
    assert place_on_huge_pages(weights(module)) == 6
    assert all(placed(module[i].weight) for i in (0, 1, 2))
    gc.collect()
    assert old() is None


def test_too_few_bytes_or_no_huge_pages_move_nothing(monkeypatch):
    small = torch.nn.Linear(64, 64)
    assert small.weight.numel() * 4 < HUGE_PAGE
    assert place_on_huge_pages(small.parameters()) == 0 and not placed(small.weight)
    monkeypatch.setattr(huge_pages, "available", lambda: False)
    assert place_on_huge_pages(weights(layers())) == 0


@needs_huge_pages
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_models_weights_are_on_huge_pages_and_replaced_ones_follow(dtype):
    model = TrellisLlama.from_pretrained(smollm2_dir(), dtype=dtype, device="cpu", num_blocks=64)
    assert all(placed(p) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "hg" in mapping_flags(model.model.layers[0].mlp.down_proj.weight)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        logits = model(ids).logits
        mlp = model.model.layers[3].mlp  # over 2 MiB of weights in bf16 too
        replaced = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        for linear in replaced:
            linear.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        assert not any(placed(linear.weight) for linear in replaced)
        model.set_linear_kernel(model.linear_kernel)
        assert all(placed(linear.weight) for linear in replaced)
        assert torch.equal(model(ids).logits, logits)
    model.to(torch.float16 if dtype == torch.float32 else torch.float32)
    assert all(placed(p) for p in model.parameters())  # the converted weights, placed anew


PANELS = {torch.bfloat16: "bf16_panels", torch.float32: "fp32_panels"}


@needs_huge_pages
@pytest.mark.parametrize("dtype", PANELS)
def test_packed_panels_are_on_huge_pages(dtype, monkeypatch):
    """Where "packed" keeps Trellis' panels, a decode step reads them rather than the parameters:
    they are made at load and placed too, and made and placed again by ``prefix_cache.reset()``."""
    if not cpu_linear.panels_run(dtype):
        pytest.skip(f"Trellis' {dtype} panels cannot run here")
    monkeypatch.setattr(cpu_linear, PANELS[dtype], lambda: True)
    model = TrellisLlama.from_pretrained(smollm2_dir(), dtype=dtype, device="cpu", num_blocks=64,
                                         linear_kernel="packed")
    layers = [m for m in model.modules() if type(m) is cpu_linear.CPULinear]
    assert layers and all(m._packed[3].dim() == 4 and placed(m._packed[3]) for m in layers)
    mlp = model.model.layers[3].mlp
    for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):  # weights off huge pages, packed once more
        linear.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    model.set_linear_kernel("packed")
    assert all(m._packed[3].dim() == 4 and placed(m._packed[3]) for m in layers)
    copies = [m._packed[3] for m in layers]
    with torch.no_grad():
        model(torch.arange(3, 40)[None])  # the copies were made from the placed weights: none is remade
    assert all(m._packed[3] is copy for m, copy in zip(layers, copies))
    model.prefix_cache.reset()
    assert all(m._packed[3].dim() == 4 and placed(m._packed[3]) for m in layers)
