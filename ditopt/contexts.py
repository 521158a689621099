"""Streams named by diffusers' `cache_context`.

diffusers pipelines run each denoising call of the transformer inside
`transformer.cache_context("cond")` or `("uncond")` (its cache hooks key their
state by that name).  ditopt reads the same name, so that a stream is the call
the pipeline says it is, not the n-th call at one timestep.

diffusers hands the context only to its own stateful hooks, so ditopt wraps
`CacheMixin.cache_context` with one that also records the name per model and
otherwise behaves the same.  The wrapper is installed when ditopt is imported
(the `torch.compile(..., backend="ditopt")` call imports it) if diffusers is
loaded, else as soon as diffusers loads its cache mixin (an import hook, so
importing ditopt never costs diffusers' import time).  A runtime names its
streams by context only if its first call ran in one, so it never mixes named
and counted streams; otherwise calls at one timestep are told apart by order.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import sys
import weakref

import torch

_CACHE_UTILS = "diffusers.models.cache_utils"
# module -> (name, step_index) of the cache_context its calls run in now; (None, None) outside one
_CONTEXTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[str | None, int | None]]" = weakref.WeakKeyDictionary()
# every module ditopt compiled or saw in a cache_context: where a graph's parameters are looked up
_KNOWN: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _recording(original):
    @functools.wraps(original)
    @contextlib.contextmanager
    def cache_context(self, name, *args, **kwargs):
        outer = _CONTEXTS.get(self)
        _CONTEXTS[self] = (name, kwargs.get("step_index"))
        _KNOWN.add(self)
        try:
            with original(self, name, *args, **kwargs):
                yield
        finally:
            if outer is None:
                _CONTEXTS.pop(self, None)
            else:
                _CONTEXTS[self] = outer

    cache_context._ditopt_records = True
    return cache_context


def install() -> bool:
    """Record diffusers' cache_context names (idempotent); False when diffusers is not loaded."""
    module = sys.modules.get(_CACHE_UTILS)
    mixin = getattr(module, "CacheMixin", None)
    if mixin is None:
        return False
    if not getattr(mixin.cache_context, "_ditopt_records", False):
        mixin.cache_context = _recording(mixin.cache_context)
    return True


class _InstallOnImport(importlib.abc.MetaPathFinder):
    """Installs the recording wrapper right after diffusers' cache_utils module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _CACHE_UTILS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_install(module):
                exec_module(module)
                install()

            spec.loader.exec_module = exec_then_install
        return spec


class CacheContextReader:
    """The `cache_context` one model's calls currently run in: its name and the pipeline's step index."""

    def __init__(self, module: torch.nn.Module):
        self._module = weakref.ref(module)

    def _current(self) -> tuple[str | None, int | None]:
        module = self._module()
        return _CONTEXTS.get(module, (None, None)) if module is not None else (None, None)

    @property
    def name(self) -> str | None:
        return self._current()[0]

    @property
    def step_index(self) -> int | None:
        """The denoising loop's step, where the pipeline says it (diffusers' pipelines pass step_index)."""
        index = self._current()[1]
        return int(index) if isinstance(index, (int, torch.Tensor)) else None


def reader_for(module: torch.nn.Module | None) -> CacheContextReader | None:
    """A reader of `module`'s diffusers cache context; None when it is not a diffusers CacheMixin."""
    if module is None or not install():
        return None
    from diffusers.models.cache_utils import CacheMixin

    return CacheContextReader(module) if isinstance(module, CacheMixin) else None


def remember(module: torch.nn.Module | None) -> None:
    """Note a module ditopt compiles, so that `owner_of` finds it from one of its parameters."""
    if module is not None:
        _KNOWN.add(module)


def owner_of(param: torch.Tensor | None) -> torch.nn.Module | None:
    """The outermost known module holding `param` (models of one class share a Dynamo graph: the parameters
    a call passes say which model it is).  Scans parameters once per new model, not per call."""
    if param is None:
        return None
    owners = [m for m in list(_KNOWN) if any(p is param for p in m.parameters())]
    if not owners:
        return None
    return max(owners, key=lambda m: sum(1 for _ in m.parameters()))


def module_being_compiled() -> torch.nn.Module | None:
    """The module whose method Dynamo is compiling now (its frame's first argument), if any.

    Reads Dynamo's current frame, a private structure: any failure means "unknown", and streams are
    then told apart by call order, which is right for pipelines that call cond before uncond.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        first = tx.f_code.co_varnames[0] if tx.f_code.co_argcount else None
        module = tx.f_locals.get(first) if first is not None else None
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return module if isinstance(module, torch.nn.Module) else None


if not install() and not any(isinstance(f, _InstallOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _InstallOnImport())
