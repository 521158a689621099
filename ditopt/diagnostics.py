"""ditopt's warnings (one per reason per process, so that a model that breaks into many graphs, or a loop of
many calls, warns once) and the one-line reason the safety net gives for a failure."""

from __future__ import annotations

import warnings

import torch.fx as fx

_WARNED: set[str] = set()


class OptionError(ValueError):
    """An option that does not fit the model being compiled (a block index out of range, a table of the
    wrong length): the caller's to fix, so the safety net lets it through instead of falling back."""


def warn_once(message: str, stacklevel: int = 3) -> None:
    """Warn with `message` unless this process already did."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=stacklevel)


def forget() -> None:
    """Warn again from now on (tests start each case afresh)."""
    _WARNED.clear()


def failure_reason(err: BaseException, stage: str) -> str:
    """The exception, where in ditopt it was raised, and the graph node being handled, in one line."""
    from .analysis import module_path

    node = failing_node(err)
    where = f" at node {node.name}" + (f" (in {module_path(node)})" if module_path(node) else "") if node else ""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__} in {stage}{where}: {text[:300]}"


def failing_node(err: BaseException) -> fx.Node | None:
    """The FX node the innermost frame of err's traceback was working on (a local holding a node), if any."""
    tb, found = err.__traceback__, None
    while tb is not None:
        nodes = [v for v in tb.tb_frame.f_locals.values() if isinstance(v, fx.Node)]
        if nodes:
            found = nodes[0]
        tb = tb.tb_next
    return found
