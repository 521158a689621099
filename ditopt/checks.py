"""Small validators shared by the method configs: each raises ValueError saying what is valid."""

from __future__ import annotations

from typing import Any


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"ditopt: {name}={value!r} is not valid; choose one of {list(choices)}")


def check_ratio(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"ditopt: {name} must be a fraction of tokens removed, 0 <= ratio < 1; got {value!r}")


def check_table(name: str, table: Any, valid) -> None:
    if not isinstance(table, (list, tuple)) or not table or not all(
            isinstance(row, (list, tuple)) and row and all(valid(v) for v in row) for row in table):
        raise ValueError(f"ditopt: {name} must be a non-empty list per block of non-empty lists per step of "
                         f"valid values; got {table!r}")


def number_keys(name: str, mapping: dict) -> dict:
    """Thresholds may come as strings from JSON ("0.08", "inf"); numbers stay as they are."""
    out = {}
    for key, value in mapping.items():
        if isinstance(key, str):
            try:
                key = float(key)
            except ValueError:
                raise ValueError(f"ditopt: {name} threshold {key!r} is not a number") from None
        out[key] = value
    return out
