"""Noticing that anything the cached K/V were computed from changed, so that they are not reused.

A ``WeightsWatcher`` reduces what a forward reads besides its inputs to one number, cheaply
enough for every forward (~80 µs for SmolLM2's 272 parameters and ~400 modules on a 2-core EPYC
with them in cache; ~0.45 ms in the engine, where each forward has streamed the weights through
the caches: 3 % of a four-session decode step). ``state()`` changes when

- a parameter or buffer (RoPE's ``inv_freq`` too) is modified in place: its version counter,
  which every in-place op on the tensor, a view of it or its ``detach()`` bumps;
- a parameter or buffer is replaced (``module.weight = ...``, ``model.to()``), or its storage is
  (``p.data = ...``): its data pointer moves, or the storage it had is freed (below);
- a module, parameter or buffer is registered into the model (modules added, moved, removed),
  or a container's members change without a registration (``del layers[i]``, ``pop``,
  ``insert``);
- the code a forward runs changes (``ModelStructure``): a module replaced, even one without
  parameters (an activation), a module's class, a ``forward`` set on an instance, a forward hook
  or pre-hook set or removed (on the model's modules, or process-wide);
- a setting a forward reads changes: an RMSNorm's eps, attention's scale, the rotary scaling and
  type, and the config fields the layers and the pool are shaped by (``_CONFIG_FIELDS``; not the
  layer count, which decides how many layers run, not what any of them computes);
- a PEFT adapter is switched, enabled, disabled, merged, unmerged or rescaled (``set_scale``).

Storage identity. ``(data_ptr, _version)`` alone is none: ``p.data = p.data * 3;
p.data = p.data.clone()`` frees the first storage, and the last may land at its address with the
parameter's version counter (kept across ``.data`` assignment) unchanged; a storage's own
address (``_cdata``) can be reused the same way. So the state also counts deaths among the
storages in use when it last changed, each watched through a weak reference whose callback
bumps the count. A storage cannot be freed while a watched tensor uses it, so a death means a
replacement; while it lives, nothing else can take its address. The references are re-armed
only when the state changes, so a steady step reads two numbers per tensor and a few settings:
comparing every storage object each step would add half as much again, and holding the
storages strongly would keep replaced weights in memory.

What it cannot see: writes that bypass a tensor's version counter. ``p.data`` is a new tensor
over the same storage with a counter of its own, so ``p.data.mul_(2)`` or ``p.data.copy_(w)``
change values unseen; so do writes through NumPy (``p.detach().numpy()``), DLPack or a raw
pointer. Only reading every value could notice them, which costs as much as the forward itself.
Nor what a hook or an instance's ``forward`` computes while it stays set (a steering hook whose
vector is changed in place). After such an edit call ``model.prefix_cache.reset()``. Not watched
on purpose: the ``inv_freq`` LongRoPE rewrites in every forward (see ``_rewritten_by_forward``),
and transformers' output-capturing hooks, which record outputs and change none.

Re-listing the tensors and settings after a registration takes three process-wide ``torch.nn``
registration hooks; they are installed when the first watcher is made, not at import.
"""

from __future__ import annotations

import operator
import sys
import weakref
from collections.abc import Callable, Iterable
from itertools import chain, repeat

import torch
from torch.utils.hooks import RemovableHandle

# Attributes that transformers' Llama modules read in their forward and that can be changed on a
# built model: RMSNorm's eps, attention's softmax scale, the rotary embedding's scaling and type.
# (peft's LoRA layers keep their per-adapter scales in a ``scaling`` dict; see ``_adapter_state``.)
_MODULE_SETTINGS = ("variance_epsilon", "scaling", "attention_scaling", "rope_type", "q8_activations")
# Config fields the layers and the KV pool are shaped by; transformers also reads LongRoPE's
# parameters at every forward. A change means another model than the K/V came from. Not the layer
# count: a forward runs the first ``num_hidden_layers`` layers, and a layer's K/V depend on the
# layers before it only, so a lower count (transformers' early-exit drafter sets one) leaves every
# cached K/V valid; the runner never caches what such a forward computes (``PagedModelRunner.forward``).
_CONFIG_FIELDS = ("rope_parameters", "head_dim", "rms_norm_eps", "hidden_act", "hidden_size",
                  "num_attention_heads", "num_key_value_heads")

_data_ptr: Callable[[torch.Tensor], int] = torch.Tensor.data_ptr
_version: Callable[[torch.Tensor], int] = operator.attrgetter("_version")


def version_of(tensor: torch.Tensor) -> int:
    """``tensor``'s version counter; -1 for an inference tensor (made under ``torch.inference_mode``,
    by ``model.to()`` or a load there), which has none: it can be changed in place only inside
    inference mode, unseen, as ``.data`` writes are."""
    return -1 if tensor.is_inference() else tensor._version

# Bumped whenever a module, parameter or buffer is registered into a module of some watched
# model. Registrations elsewhere are ignored: a layer under construction, or the throwaway
# ModuleList that transformers slices from ``model.layers`` on every forward, can only reach a
# model by being attached to one of its modules, which is itself a counted registration.
_registrations = [0]
_watched_modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_hooks_installed = False


def _count_registration(parent: torch.nn.Module, name: str, value: object) -> None:
    if parent in _watched_modules:
        _registrations[0] += 1


def _install_hooks() -> None:
    global _hooks_installed
    if not _hooks_installed:
        torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
        torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)
        torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
        _hooks_installed = True


def watch_registrations(modules: list[torch.nn.Module]) -> None:
    """Count registrations into ``modules`` from now on (``registration_count``)."""
    _install_hooks()
    _watched_modules.update(modules)


def registration_count() -> int:
    """A count that changes whenever a module, parameter or buffer is registered into a module of
    a watched model (or of ``watch_registrations``): one number to read to notice that a model's
    structure may have changed."""
    return _registrations[0]


_NN = torch.nn.modules.module
_GLOBAL_HOOKS = (_NN._global_forward_hooks, _NN._global_forward_pre_hooks)
# Containers whose methods change their members without a registration: ``del layers[i]`` and
# ``pop`` replace ``_modules`` with a renumbered dict, ``insert`` writes into it.
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


def _capture_hook(hook: object) -> bool:
    """transformers' output-capturing hook (installed for good once hidden states were asked for):
    it records outputs only while a forward asks for them, and changes none."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _settings_of(module: torch.nn.Module) -> list[str]:
    """The ``_MODULE_SETTINGS`` ``module`` has as plain values (peft's per-adapter ``scaling`` dicts are not)."""
    own = vars(module)
    return [name for name in _MODULE_SETTINGS if isinstance(own.get(name), (int, float, str))]


def module_identity(model: torch.nn.Module) -> str:
    """What a forward of ``model`` runs besides its tensors, as text for a saved prefix cache's
    identity: each module's path and class, the settings its forward reads (``_MODULE_SETTINGS``),
    and the forwards set on instances and forward hooks (process-wide ones too), named by their
    code's qualified name (what a hook computes is not read: two hooks of one name are alike)."""

    def code(function: object) -> str:
        function = getattr(function, "func", function)  # a functools.partial: the function it calls
        return f"{getattr(function, '__module__', None)}.{getattr(function, '__qualname__', type(function).__qualname__)}"

    lines = [f"hook {code(hook)}" for table in _GLOBAL_HOOKS for hook in table.values() if not _capture_hook(hook)]
    for name, module in model.named_modules(remove_duplicate=False):
        own = vars(module)
        parts = [name or "-", f"{type(module).__module__}.{type(module).__qualname__}"]
        parts += [f"{setting}={own[setting]!r}" for setting in _settings_of(module)]
        if "forward" in own:
            parts.append(f"forward={code(own['forward'])}")
        parts += [f"hook={code(hook)}" for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
                  if not _capture_hook(hook)]
        lines.append(" ".join(parts))
    return "\n".join(lines)


class ModelStructure:
    """What code a forward over some modules runs, besides their tensors and settings: the
    modules themselves and their classes, forwards set on instances, forward hooks and pre-hooks
    (process-wide ones too; not transformers' output-capturing hooks), and the members of
    containers. ``state()`` is a number that changes when any of them does (~20 µs for SmolLM2's
    ~400 modules: a class and an instance attribute read per module)."""

    def __init__(self) -> None:
        self.modules: list[torch.nn.Module] = []
        self._ids: tuple[int, ...] = ()  # the modules' ids: held here, so no other module can take one
        self._dicts: list[dict] = []  # their __dict__s: a forward set on an instance lands there
        self._hook_tables: list[dict] = []  # their forward (pre-)hooks by handle id, and the global ones
        self._containers: list[dict] = []  # the __dict__s of the containers among them
        self._hooks_listed_at: tuple | None = None  # (handle counter, hooks in the tables that had some)
        self._hooked_tables: list[dict] = []
        self._hook_ids: tuple[int, ...] = ()
        self._seen: tuple | None = None
        self._version = 0

    def watch(self, modules: Iterable[torch.nn.Module]) -> None:
        """Watch ``modules`` (listed again by the caller after a registration, or ``members_changed``)."""
        self.modules = list(modules)
        self._ids = tuple(map(id, self.modules))
        self._dicts = [vars(m) for m in self.modules]
        self._hook_tables = [*_GLOBAL_HOOKS, *chain.from_iterable((m._forward_hooks, m._forward_pre_hooks)
                                                                  for m in self.modules)]
        self._containers = [vars(m) for m in self.modules if isinstance(m, _CONTAINERS)]
        self._hooks_listed_at = None

    def hooks(self) -> tuple[int, ...]:
        """The handle ids of the forward hooks and pre-hooks set (a hook removed and another set
        have different ids). Listed again only when a hook was set anywhere (the handle counter
        moved) or one of those listed was removed."""
        listed_at = (RemovableHandle.next_id, sum(map(len, self._hooked_tables)))
        if listed_at != self._hooks_listed_at:
            self._hooked_tables = [table for table in self._hook_tables if table]
            self._hook_ids = tuple(i for table in self._hooked_tables for i, hook in table.items()
                                   if not _capture_hook(hook))
            self._hooks_listed_at = (RemovableHandle.next_id, sum(map(len, self._hooked_tables)))
        return self._hook_ids

    def instance_forwards(self) -> list:
        """Each module's ``forward`` set on the instance (None where its class's runs)."""
        return list(map(dict.get, self._dicts, repeat("forward")))

    def members_changed(self) -> bool:
        """Whether a container's members changed without a registration (the caller lists the
        modules again, and ``watch``es them)."""
        return self._seen is not None and self._members() != self._seen[-1]

    def state(self) -> int:
        seen = (self._ids, self.hooks(), list(map(type, self.modules)), self.instance_forwards(), self._members())
        if seen != self._seen:  # (unchanged lists compare item by item, each by identity first)
            self._seen = seen
            self._version += 1
        return self._version

    def _members(self) -> list[tuple]:
        return [tuple(d["_modules"].values()) for d in self._containers]


def _peft_tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    if "peft" not in sys.modules:  # no adapters without peft; never import it ourselves
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_state(layer: torch.nn.Module) -> tuple:
    """What a peft tuner layer's forward depends on besides its parameters. Its other per-adapter
    settings (rank, alpha, DoRA, ...) are fixed when an adapter is added, a registration."""
    active, scaling = layer.active_adapter, getattr(layer, "scaling", None)  # (not ``active_adapters``: 5x slower)
    return (active if isinstance(active, str) else tuple(active), layer.disable_adapters, tuple(layer.merged_adapters),
            tuple(scaling.items()) if isinstance(scaling, dict) else scaling)


def _rewritten_by_forward(module: torch.nn.Module, name: str) -> bool:
    """transformers' LongRoPE embedding rewrites ``inv_freq`` in every forward, from the sequence
    length, its ``original_inv_freq`` buffer and the config (all watched): watching it would
    change the state at every step."""
    return name == "inv_freq" and vars(module).get("rope_type") == "longrope"


def _column(pairs: list[tuple], i: int) -> list:
    return [pair[i] for pair in pairs]


class WeightsWatcher:
    """``state()`` changes whenever something a forward of ``model`` reads, other than its
    inputs, may have changed (see the module docstring for what is and is not seen)."""

    def __init__(self, model: torch.nn.Module) -> None:
        _install_hooks()
        self._model = model
        self._epoch = -1
        self.walks = 0  # how often the model was listed again (tests check it stays rare)
        # Each a pair of lists: the dicts (a module's _parameters or _buffers; its __dict__) and the keys
        self._tensors: tuple[list[dict[str, torch.Tensor | None]], list[str]] = ([], [])
        self._settings: tuple[list[dict[str, object]], list[str]] = ([], [])
        self._adapters: list[torch.nn.Module] = []
        self._structure = ModelStructure()
        self._freed = [0]  # watched storages freed since; bumped by the weak references' callbacks
        self._storage_refs: list[weakref.ref] = []
        self._state: int | None = None

    def state(self) -> int:
        if self._epoch != _registrations[0] or self._structure.members_changed():
            self._walk()
        try:
            tensors, settings = self._read()
        except KeyError:  # ``del module.weight`` is no registration
            self._walk()
            tensors, settings = self._read()
        config = getattr(self._model, "config", None)
        # Read through vars(): a transformers config's getattr takes ~3 µs a field.
        fields = None if config is None else repr(tuple(map(vars(config).get, _CONFIG_FIELDS)))
        try:
            versions = tuple(map(_version, tensors))
        except RuntimeError:  # an inference tensor among them
            versions = tuple(map(version_of, tensors))
        state = hash((tuple(map(_data_ptr, tensors)), versions, settings,
                      tuple(map(_adapter_state, self._adapters)), fields, self._freed[0], self._structure.state()))
        if state != self._state:
            self._watch_storages(tensors)
            self._state = state
        return state

    @property
    def adapter_layers(self) -> list[torch.nn.Module]:
        """The model's peft tuner layers as of the last ``state()``."""
        return self._adapters

    def adapter_state(self) -> tuple:
        """Each peft tuner layer's active, disabled and merged adapters and scales (what the
        adapters' weights alone do not say), as of the last ``state()``."""
        return tuple(map(_adapter_state, self._adapters))

    def forget(self) -> None:
        """List the model again at the next ``state()`` (``prefix_cache.reset()`` calls it)."""
        self._epoch = -1

    def _read(self) -> tuple[list[torch.Tensor], tuple]:
        # Through the modules' dicts: ``model.to()`` replaces buffers (and, across some devices,
        # parameters) there directly, without a registration.
        return list(map(dict.__getitem__, *self._tensors)), tuple(map(dict.__getitem__, *self._settings))

    def _walk(self) -> None:
        modules = list(self._model.modules())
        _watched_modules.update(modules)
        self._structure.watch(modules)
        tensors = [(d, name) for m in modules for d in (m._parameters, m._buffers) for name, t in d.items()
                   if t is not None and not _rewritten_by_forward(m, name)]
        settings = [(vars(m), name) for m in modules for name in _settings_of(m)]
        self._tensors = (_column(tensors, 0), _column(tensors, 1))
        self._settings = (_column(settings, 0), _column(settings, 1))
        self._adapters = _peft_tuner_layers(self._model)
        self._epoch = _registrations[0]
        self.walks += 1

    def _watch_storages(self, tensors: list[torch.Tensor]) -> None:
        freed = self._freed  # the callback must not keep the watcher alive

        def count(_: weakref.ref) -> None:
            freed[0] += 1

        # Dropping the old references drops their callbacks: storages replaced before this state
        # was computed are already in it.
        self._storage_refs = [weakref.ref(t.untyped_storage(), count) for t in tensors]
