"""ditopt's warnings: one per reason per process, so that a model that breaks into many graphs, or a loop of
many calls, warns once."""

from __future__ import annotations

import warnings

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
