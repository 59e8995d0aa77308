"""Noticing that a model's weights changed, so that K/V computed with the old ones are not reused.

A ``WeightsWatcher`` reduces a model's parameters (their storage and version counters) and its
PEFT adapter state to one number, cheaply enough for every forward: the parameter list is only
re-walked after a module or parameter was registered into a module of a watched model (a
replaced parameter, an added adapter). That takes two process-wide ``torch.nn`` registration
hooks; they are installed when the first watcher is made, not when Trellis is imported.
"""

from __future__ import annotations

import sys
import weakref

import torch

# Bumped whenever a module or parameter is registered into a module of some watched model.
# Registrations elsewhere are ignored: a layer under construction, or the throwaway ModuleList
# that transformers slices from ``model.layers`` on every forward, can only reach a model by
# being attached to one of its modules, which is itself a counted registration.
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
        torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
        _hooks_installed = True


def _peft_tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    if "peft" not in sys.modules:  # no adapters without peft; never import it ourselves
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class WeightsWatcher:
    """``state()`` changes whenever a parameter of ``model`` is replaced or modified in place
    (its version counter), or a PEFT adapter is switched, enabled or disabled."""

    def __init__(self, model: torch.nn.Module) -> None:
        _install_hooks()
        self._model = model
        self._epoch = -1
        self.walks = 0  # how often the parameters were listed again (tests check it stays rare)
        self._params: list[torch.nn.Parameter] = []
        self._adapters: list[torch.nn.Module] = []

    def state(self) -> int:
        if self._epoch != _registrations[0]:
            _watched_modules.update(self._model.modules())
            self._params = list(self._model.parameters())
            self._adapters = _peft_tuner_layers(self._model)
            self._epoch = _registrations[0]
            self.walks += 1
        state = [(p.data_ptr(), p._version) for p in self._params]
        state += [(tuple(m.active_adapters), m.disable_adapters) for m in self._adapters]
        return hash(tuple(state))
