"""ditopt's warnings: one per reason per process, so that a model that breaks into many graphs, or a loop of
many calls, warns once."""

from __future__ import annotations

import warnings

_WARNED: set[str] = set()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """Warn with `message` unless this process already did."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=stacklevel)


def forget() -> None:
    """Warn again from now on (tests start each case afresh)."""
    _WARNED.clear()
