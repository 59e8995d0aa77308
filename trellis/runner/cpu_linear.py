"""Which kernel runs the linear layers of CPU inference (the BLAS, oneDNN, or Trellis' panels
and streaming kernel), the CPU features that decide it, and ``CPULinear``, the layer that runs it.

PyTorch's x86 wheels hand ``F.linear`` in fp32 to MKL, which takes its tuned code paths on
Intel CPUs only. On AMD EPYC machines (AVX-512 and AVX2, 2 cores) MKL streams a decode step's
weights at ~12 GB/s and runs small batches (2–64 rows) slower per row than one, and oneDNN's JIT
kernels are faster at every batch size that matters to serving; on an AMX Xeon MKL is the faster
of the two at 1, 4 and 512 rows (docs/cpu-linear.md). Trellis' own panels (``ops.panel_linear``)
beat both where the kernels are built for AVX-512: on AMD EPYCs, and on an Ice Lake Xeon 2-3x MKL
at 4 to 16 rows and 1.2x at 64 (level or behind at 256-512). So the fp32 default follows the CPU:

    kind       weights                                        fp32 default
    "blas"     the parameter, through F.linear                Intel CPUs without AVX-512 (or without
                                                              the C++ kernels): transformers' path
    "onednn"   the parameter, via oneDNN (fp32 on Intel:      other x86 CPUs (AMD) without AVX-512
               stored input-major)
    "packed"   a second copy in oneDNN's blocked layout, or   x86 CPUs with AVX-512 (and bf16's
               Trellis' panels: fp32 on x86 CPUs with         default); +1 copy
               AVX-512 (fp32_panels), bf16 on AVX512_BF16
               CPUs, AMX ones included (bf16_panels)

"Input-major" (fp32 on Intel CPUs): the ``[out, in]`` parameter keeps its shape and values but its
storage is the transpose's, ``[in, out]`` row-major (strides ``(1, out)``). That is the layout oneDNN's matmul
reads directly; a row-major ``[out, in]`` weight it re-blocks into a scratch buffer on every call
of more than one row, which makes 4- to 64-row matmuls (a decode step of several sessions, a
chat turn's extend) ~10 % slower on SmolLM2. No memory is added: the storage
is replaced, one layer at a time. A weight that is shared with another module (a tied LM head
and embedding) keeps its layout, so that embedding lookups stay row reads.

Logits move by fp32 reassociation only (at most ~1.3e-4 on SmolLM2, whose logits reach ~39; greedy tokens agree).

bf16 runs on oneDNN too where oneDNN computes it (``onednn_dtypes``), with fp32 accumulation.
There the layouts rank otherwise (docs/dtypes.md, an AMX Xeon): input-major is slower than
row-major at 1 and 4 rows, so ``"onednn"`` keeps bf16 weights row-major (``input_major``), where
it runs about as fast as ``F.linear`` (itself oneDNN in bf16); the blocked copy of ``"packed"`` is
15-30 % faster at 1 to 64 rows, and the bf16 default where there are no panels. On CPUs with
AVX512_BF16 (AMD Zen 4, Intel from Cooper Lake), ``"packed"`` keeps Trellis' panels instead
(``ops.panel_linear``, the same size), whose kernel keeps the dot-product units (AMX tiles where
the CPU has them) busier than oneDNN's at 5 to 256 rows (a chat turn's extend, a batch's decode),
is level with it or ahead beyond, and runs a decode step's rows at least as fast as the streaming
kernel below (``bf16_panels``). fp16 stays on ``F.linear`` under every kind.

Under every kind but those panels, a decode step's few rows (``streamed_rows``: 1 to 4 in bf16,
1 to 8 in fp32 on x86 CPUs) instead stream a row-major parameter (not the input-major fp32 ones of
``"onednn"`` on Intel) through Trellis' own kernel (``ops.quant_linear`` with qtype
``"BF16"`` or ``"F32"``: fp32 accumulation, one rounding), which reads the weights at memory speed
where the libraries' GEMMs do not. On AMD that is why ``"onednn"`` keeps fp32 weights row-major:
the kernel reads no other layout, and it streams a SmolLM2 decode step's weights 1.7x faster than
oneDNN reads the input-major ones (25.8 against 43 ms a step), while oneDNN's prefill over
row-major weights is 1.25-1.5x slower at 16-64 rows and level at 512 (2-core AMD EPYC,
docs/cpu-linear.md). fp32 panels, where they serve, run every row count faster than both.

The kinds run as ``CPULinear``, an ``nn.Linear`` in every other respect: the same parameters and state
dict, and plain ``F.linear`` for training (gradients), other devices and other dtypes. The runner
makes the packed copies up front (``make_packed``) when it lays the weights out (loading,
``.to()``, ``set_linear_kernel``, ``prefix_cache.reset()``), so that no request pays for them; a
copy is made again, on first use, whenever its weight is replaced (another storage, held weakly:
a new one at the old address is not mistaken for it) or changed in place (its version counter);
a replaced weight stays correct in any layout (``set_linear_kernel`` again restores the fast
one). Writes that bypass the version counter (``weight.data.copy_(w)``) are not seen:
``drop_packed`` (which ``model.prefix_cache.reset()`` calls) makes every copy afresh.
"""

from __future__ import annotations

import functools
import platform
import weakref
from collections import Counter

import torch
import torch.nn.functional as F

from trellis import ops
from trellis.ops import panels, quant
from trellis.runner.weights_watcher import version_of

LINEAR_KERNELS = ("blas", "onednn", "packed")
_CPU = torch.device("cpu")


def onednn_available() -> bool:
    """oneDNN's linear ops are in this PyTorch build and JIT-compile for this CPU (x86-64)."""
    return (_x86_64() and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes whose linear layers run on oneDNN here: fp32, and bf16 where oneDNN computes it
    on this CPU (from AVX-512 on; natively with AVX512_BF16 or AMX). Not fp16: even with
    AVX512_FP16, oneDNN's fp16 decode step is slower than ``F.linear``'s (docs/dtypes.md)."""
    if not onednn_available():
        return (torch.float32,)
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def input_major(dtype: torch.dtype) -> bool:
    """Whether the ``"onednn"`` kind stores weights of ``dtype`` input-major (else row-major).
    fp32 on Intel CPUs only, where oneDNN reads them faster at 4 to 64 rows (module docstring); its
    decode rows then do not stream (``streamed_rows``: the kernel reads row-major weights only).
    Elsewhere those rows stream, so fp32 weights stay row-major; and in bf16, oneDNN reads
    input-major weights slower at 1 and 4 rows (TinyLlama's
    layers at one row: 375 ms against 270 row-major, one thread; docs/dtypes.md)."""
    return dtype == torch.float32 and intel_cpu()


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in Linux's ``/proc/cpuinfo``; None elsewhere."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_vendor() -> str:
    """The x86 CPU's vendor string (``"GenuineIntel"``, ``"AuthenticAMD"``); "" where unknown."""
    vendor = _cpuinfo("vendor_id")
    if vendor is not None:
        return vendor
    processor = platform.processor()  # Windows names the vendor here
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        if vendor in processor:
            return vendor
    return "GenuineIntel" if platform.system() == "Darwin" and platform.machine() == "x86_64" else ""  # an Intel Mac


def intel_cpu() -> bool:
    """Whether this is an Intel CPU, where MKL takes its tuned paths: the fp32 choices follow it
    (``default_linear_kernel``, ``input_major``)."""
    return cpu_vendor() == "GenuineIntel"


def default_linear_kernel(dtype: torch.dtype = torch.float32) -> str:
    """The kind ``dtype`` runs fastest on here. bf16 defaults to ``"packed"``: oneDNN reads its
    blocked layout 15-30 % faster than any plain one at 1 to 64 rows (docs/dtypes.md), Trellis'
    panels faster still where they serve, and the copy costs what fp32 weights would (the parameter
    stays, for state dicts and training). fp32 defaults to ``"packed"`` where Trellis' panels serve
    it (``fp32_panels``: on SmolLM2 1.35x a decode step and 1.45x a 64-token extend on AMD, 1.15x
    and 1.25-1.35x over MKL on an Ice Lake Xeon, for a second copy of the weights), else to ``"blas"`` on
    Intel CPUs, where MKL runs it, and to ``"onednn"`` on other x86 CPUs, where MKL's generic code
    is the slower (module docstring)."""
    if onednn_available() and ((dtype == torch.bfloat16 and dtype in onednn_dtypes()) or panels_serve("packed", dtype)):
        return "packed"
    return unpacked_linear_kernel(dtype)


def unpacked_linear_kernel(dtype: torch.dtype) -> str:
    """The fastest kind that keeps no second copy of ``dtype``'s weights: ``"blas"`` (MKL) for fp32
    on Intel CPUs and wherever oneDNN is missing, else ``"onednn"``; what runs where the default
    ``"packed"`` copy would not fit in memory (``PagedModelRunner._default_linear_kernel``)."""
    if not onednn_available():
        return "blas"
    if dtype != torch.float32 and dtype in onednn_dtypes():
        return "onednn"
    return "blas" if intel_cpu() and torch.backends.mkl.is_available() else "onednn"


def packed_copy_bytes(model: torch.nn.Module) -> int:
    """The bytes the ``"packed"`` kind's copies of ``model``'s linear weights take (as many as the
    weights: the same values in another layout), a tied LM head's included."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if linear_kernel_of(m) is not None and m.weight.is_cpu and m.weight.dtype in onednn_dtypes())


@functools.cache
def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.cache
def bf16_panels() -> bool:
    """Whether ``"packed"`` keeps bf16 weights as Trellis' panels (``ops.panel_linear``) instead of
    oneDNN's blocked copy, and runs every row count on them (decode rows too, which stream
    otherwise): on CPUs with AVX512_BF16 dot products (AMD Zen 4 on, Intel from Cooper Lake), with
    the C++ kernels built for AVX-512 and loaded. On the 2-core AMD EPYC the panels' kernel runs
    SmolLM2's layers 1.3x faster than the streaming kernel at 1 to 4 rows, 1.15-1.55x faster than
    oneDNN at 8 to 64 rows and level at 512; where the CPU has AMX it multiplies on the tiles, as
    oneDNN does: on the 2-core AMX Xeon 1.05-1.45x faster than oneDNN's packed matmul at 1 to 512
    rows, and level with the streaming kernel at a decode step's rows in the engine, SmolLM2's and
    TinyLlama's (docs/cpu-linear.md)."""
    return panels_run(torch.bfloat16)


@functools.cache
def fp32_panels() -> bool:
    """Whether ``"packed"`` keeps fp32 weights as Trellis' panels (``ops.panel_linear``) instead of
    oneDNN's blocked copy, and runs every row count on them: on x86-64 CPUs with the C++ kernels
    built for AVX-512 and loaded. On the 2-core AMD EPYC the panels run SmolLM2's layers 1.5x faster
    than the streaming kernel at 1 to 4 rows, 1.25-1.9x faster than oneDNN over row-major weights
    at 16 to 64 rows, 1.1-1.3x faster than oneDNN's own blocked copy there, and level with both at
    512; on the 2-core Ice Lake Xeon 1.0-1.1x the streaming kernel at 4 to 8 rows and 1.2-3.0x MKL
    at 16 to 64, MKL level or up to 12 % faster at 256-512 (docs/cpu-linear.md)."""
    return _x86_64() and panels_run(torch.float32)


def panels_run(dtype: torch.dtype) -> bool:
    """Whether Trellis' panel kernels of ``dtype`` can run here, whether or not ``"packed"`` picks
    them (``bf16_panels``, ``fp32_panels``): the C++ kernels built for AVX-512 and loaded, and for
    bf16 the CPU's AVX512_BF16 dot products."""
    return (torch.backends.cpu.get_cpu_capability() == "AVX512" and ops.default_backend(_CPU) == "cpp"
            and (dtype == torch.float32 or torch.cpu.get_capabilities().get("avx512_bf16", False)))


def panels_serve(kind: str, dtype: torch.dtype) -> bool:
    """Whether layers of ``kind`` in ``dtype`` run on Trellis' panels here (``bf16_panels``, ``fp32_panels``)."""
    return kind == "packed" and ((dtype == torch.bfloat16 and bf16_panels()) or
                                 (dtype == torch.float32 and fp32_panels()))


@functools.cache
def streamed_rows(dtype: torch.dtype) -> tuple[int, int] | None:
    """The row counts (first, last) of a ``dtype`` matmul that Trellis' streaming kernel
    (``ops.quant_linear``) computes here, over the row-major parameter; None where it computes none.

    A matmul of a few rows reads every weight once and is bound by memory bandwidth, where the
    libraries' GEMMs are not always (docs/cpu-linear.md, the 2-core AMX Xeon):
    - bf16, 1 to 4 rows, where oneDNN computes bf16 (and the panels do not serve: CPUs without
      AVX512_BF16): as fast as oneDNN's packed matmul at one row, 1.3-1.4x faster at two to four
      on the AMX Xeon; from eight oneDNN (AMX) is the faster.
    - fp32, 1 to 8 rows, on x86-64. On Intel, MKL reads 4 to 8 rows 1.4-1.5x slower than this
      kernel does, and with the weights on huge pages (``huge_pages``) one and two rows slower
      too: a SmolLM2 decode step (AMX Xeon, the lean loop in C++) 22.0-22.1 against 23.3-24.7 ms
      at one row, 23.8-24.3 against 25.6-26.2 at two, 41.4-42.5 against 45.0-45.3 at one row on
      one thread; from 9 rows on MKL is faster. On AMD EPYC neither MKL nor oneDNN streams even one
      row at memory speed (oneDNN over input-major weights: a SmolLM2 decode step's matmuls 33 ms
      against this kernel's 19; the LM head at 2-4 rows 2-5x slower).
    """
    if dtype == torch.bfloat16 and dtype in onednn_dtypes():
        return (1, 4)
    if dtype == torch.float32 and _x86_64():
        return (1, 8)
    return None


def streams(rows: int, dtype: torch.dtype) -> bool:
    """Whether Trellis' streaming kernel computes a ``dtype`` matmul of ``rows`` rows here (``streamed_rows``)."""
    span = streamed_rows(dtype)
    return span is not None and span[0] <= rows <= span[1]


# Bumped whenever set_linear_kernel sets kinds or drop_packed frees packed copies (``choices_changed``).
_choices_changed = [0]


def choices_changed() -> int:
    """How often linear kernels were set or packed copies dropped (``set_linear_kernel``,
    ``drop_packed``): while it and a model's weights stay the same, every ``CPULinear`` computes
    inputs of the same ``kernel_choice`` with the same kernel and weights, so a caller may keep the
    weights and kernels it listed (``LeanDecoder._cpp_loop_arguments``)."""
    return _choices_changed[0]


def kernel_choice(rows: int, dtype: torch.dtype) -> tuple[bool, bool, bool]:
    """What decides, besides its weight, its kind and ``choices_changed``, which kernel and packed
    copy a ``CPULinear`` computes a CPU inference input of ``rows`` rows in ``dtype`` with: whether
    the rows stream and whether panels serve. (A decode step's few rows give one value, a
    prefill's many another.)"""
    return streams(rows, dtype), bf16_panels(), fp32_panels()


def rounding_identity(kind: str, dtype: torch.dtype) -> str:
    """``kind`` with what else decides how its CPU matmuls in ``dtype`` round here: the layout
    ``"onednn"`` gives the weights, the decode rows Trellis' kernel streams (``streamed_rows``), and
    whether ``"packed"`` keeps the weights as panels (``panels_serve``).
    Two models whose identities differ compute K/V that differ in the last bits, so a prefix-cache
    file records it and refuses another (``TrellisLlama.load_prefix_cache``)."""
    transposed = kind == "onednn" and input_major(dtype)
    details = ["input-major"] if transposed else []
    rows = streamed_rows(dtype)
    if panels_serve(kind, dtype):
        details.append("panels")  # every row count: none streams
    elif rows is not None and not transposed:  # the kernel streams row-major weights only
        details.append(f"{rows[0]}-{rows[1]} rows streamed")
    return f"{kind} ({', '.join(details)})" if details else kind


_QTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}  # quant_linear's names of plain weights


class CPULinear(torch.nn.Linear):
    """An ``nn.Linear`` whose CPU inference runs on ``kind`` (one of ``LINEAR_KERNELS``), but for a
    decode step's few rows (``streamed_rows``), which stream the parameter through Trellis' kernel."""

    kind = "blas"  # set per instance by set_linear_kernel
    # (weight storage (weakly), data_ptr and version, packed weight: oneDNN's blocked layout, or
    # Trellis' panels (bf16 or fp32), 4-D); never in state dicts, copies or pickles
    _packed: tuple[weakref.ref, int, int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        # Under torch.compile, F.linear: the compiler picks its own GEMMs (Inductor cannot lower
        # the oneDNN op over an input-major weight). A parametrized layer (torch.nn.utils.parametrize
        # makes it a subclass) computes its weight at each call: F.linear over that.
        # (Cheap checks first, attributes over device objects: this runs 200 times a decode step.)
        if ((torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)) or not (x.is_cpu and weight.is_cpu)
                or x.dtype != weight.dtype or type(self) is not CPULinear or torch.compiler.is_compiling()):
            return F.linear(x, weight, self.bias)
        streamed = self.streamed_weight(x.numel() // max(self.in_features, 1), x.dtype)
        if streamed is not None:
            return ops.quant_linear(x, *streamed, backend="cpp")
        if self.kind == "blas" or weight.dtype not in onednn_dtypes():
            return F.linear(x, weight, self.bias)
        if self.kind == "packed":
            weight = self._packed_weight()
            if weight.dim() == 4:  # Trellis' panels
                return ops.panel_linear(x, weight, self.bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")

    def streamed_weight(self, rows: int, dtype: torch.dtype, backend: str | None = None
                        ) -> tuple[torch.Tensor, str] | None:
        """The weight and its ``ops.quant_linear`` qtype (``"BF16"``, ``"F32"``: that kernel takes a
        plain weight as it is), where it computes this layer for a CPU input of ``rows`` rows in
        ``dtype``: a row count ``streamed_rows`` names for the weight's dtype, a row-major weight of
        whole 32-weight blocks, no bias (the libraries add it before rounding), and the C++ kernels
        (``backend``; by default the CPU's). None where another kernel runs it."""
        # The parameters from their dict: Module.__getattr__ costs ~1 µs, and this runs 200 times a step.
        params = self._parameters
        weight = params["weight"]
        # Rows first: most calls (a prefill, one fp32 row) end there. (The panels, where they serve,
        # are faster than streaming.)
        if (not streams(rows, weight.dtype) or panels_serve(self.kind, weight.dtype)
                or dtype != weight.dtype or params["bias"] is not None or self.in_features % quant.BLOCK
                or not weight.is_contiguous() or (backend or ops.default_backend(_CPU)) != "cpp"):
            return None
        return weight, _QTYPES[weight.dtype]

    def linear_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The parameter, where ``forward`` computes a CPU inference input in ``dtype`` whose rows do
        not stream as plain bias-free ``F.linear`` (kind ``"blas"``, or a dtype oneDNN does not
        compute: fp16): the lean decoder's C++ loop calls the same ``at::linear``. Else None."""
        params = self._parameters
        weight = params["weight"]
        if (dtype != weight.dtype or params["bias"] is not None or not weight.is_cpu
                or (self.kind != "blas" and dtype in onednn_dtypes())):
            return None
        return weight

    def onednn_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The weight ``forward`` hands oneDNN's matmul (``mkldnn._linear_pointwise``) for a CPU
        inference input in ``dtype`` whose rows do not stream, for a bias-free layer: the parameter
        (kind ``"onednn"``) or its packed copy (``"packed"`` off the panels); the lean decoder's C++
        loop makes the same call. Else None."""
        params = self._parameters
        weight = params["weight"]
        if (dtype != weight.dtype or params["bias"] is not None or not weight.is_cpu or self.kind == "blas"
                or dtype not in onednn_dtypes()):
            return None
        if self.kind != "packed":
            return weight
        packed = self._packed_weight()
        return None if packed.dim() == 4 else packed

    def grouped_panels(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The panels ``forward`` would multiply a CPU inference input in ``dtype`` by, for a
        bias-free layer: the lean decoder runs such layers reading one input (q/k/v, gate/up) as one
        ``panel_linear_group`` call. None where another kernel runs it, or it has a bias."""
        params = self._parameters
        weight = params["weight"]
        if (dtype != weight.dtype or params["bias"] is not None or not panels_serve(self.kind, weight.dtype)
                or not weight.is_cpu):
            return None
        packed = self._packed_weight()
        return packed if packed.dim() == 4 else None

    def _packed_weight(self) -> torch.Tensor:
        weight = self._parameters["weight"]
        storage, key = weight.untyped_storage(), (weight.data_ptr(), version_of(weight))
        packed = self._packed
        if packed is None or packed[0]() is not storage or packed[1:3] != key:
            if panels_serve(self.kind, weight.dtype) and self.in_features % panels.inputs_per_lane(weight.dtype) == 0:
                copy = panels.pack_panels(weight.detach())
            else:  # the batch-size hint only tunes the blocking; 64 serves decode and prefill alike
                copy = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
            packed = (weakref.ref(storage), *key, copy)
            self._packed = packed
        return packed[3]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_packed", None)  # oneDNN's opaque tensors cannot be copied; repacked on use
        return state


def check_linear_kernel(kind: str) -> None:
    """Refuse a kind that is not one of ``LINEAR_KERNELS``, or that this machine cannot run."""
    if kind not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel {kind!r}; choose one of {LINEAR_KERNELS}")
    if kind != "blas" and not onednn_available():
        raise RuntimeError(f"the {kind!r} linear kernel needs oneDNN on an x86-64 CPU (torch.backends.mkldnn), "
                           f"which this machine or PyTorch build lacks; use 'blas'")


def set_linear_kernel(model: torch.nn.Module, kind: str) -> int:
    """Run every plain ``nn.Linear`` of ``model`` on ``kind`` (one of ``LINEAR_KERNELS``) and give
    its CPU weight the layout that kind reads fastest in its dtype; returns how many layers changed kind.
    Idempotent: calling it again after weights were loaded or replaced only fixes their layout.
    Subclasses of ``nn.Linear`` (adapter layers, quantized layers) are left alone: their forward is
    not plain ``F.linear``. An adapter's base layer, a plain ``nn.Linear``, is included."""
    check_linear_kernel(kind)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    changed = 0
    for module in model.modules():
        current = linear_kernel_of(module)
        if current is None:
            continue
        if type(module) is not CPULinear or current != kind:
            module.__dict__.pop("_packed", None)  # frees a packed copy
            module.__class__ = CPULinear
            module.kind = kind
            changed += current != kind
        if uses[id(module.weight)] == 1:
            _set_layout(module.weight, input_major=kind == "onednn" and input_major(module.weight.dtype))
    _choices_changed[0] += 1
    return changed


def make_packed(model: torch.nn.Module) -> list[torch.Tensor]:
    """Make the packed copy of every layer of ``model`` whose CPU inference reads one (kind
    ``"packed"``, a dtype oneDNN computes) now, not in the first request (~130 ms of SmolLM2's
    first bf16 prompt on the AMX Xeon); returns the copies that are plain tensors (Trellis'
    panels; oneDNN's blocked copies are opaque)."""
    copies = []
    for module in model.modules():
        if (type(module) is CPULinear and module.kind == "packed" and module.weight.is_cpu
                and module.weight.dtype in onednn_dtypes()):
            copy = module._packed_weight()
            if copy.dim() == 4:
                copies.append(copy)
    return copies


def drop_packed(model: torch.nn.Module) -> None:
    """Free every packed copy in ``model``; each is made again, from the weight as it is, by
    ``make_packed`` or on first use."""
    for module in model.modules():
        if type(module) is CPULinear:
            module.__dict__.pop("_packed", None)
    _choices_changed[0] += 1


def _set_layout(weight: torch.nn.Parameter, input_major: bool) -> None:
    """Store a CPU ``[out, in]`` weight input-major (``[in, out]`` row-major) or row-major. Any
    dtype: ``.to()`` keeps an fp32 weight's input-major strides in the dtype it converts to."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return
    if input_major and not weight.t().is_contiguous():
        weight.data = weight.data.t().contiguous().t()
    elif not input_major and not weight.is_contiguous():
        weight.data = weight.data.contiguous()


def linear_kernel_of(module: torch.nn.Module) -> str | None:
    """The kind a linear layer runs on (a plain ``nn.Linear``: ``"blas"``, ``F.linear``); None for
    anything but a plain ``nn.Linear`` or a ``CPULinear``."""
    if type(module) is torch.nn.Linear:
        return "blas"
    if type(module) is CPULinear:
        return module.kind
    return None
