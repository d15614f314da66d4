"""Field checks for the frozen configs: each raises ``ValueError`` naming the field, the value
and what is allowed (``engram.layer_ids=(5,) is invalid: must be ...``)."""

from __future__ import annotations

import dataclasses
from typing import Any


def check(cond: bool, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


def pos_int(obj: Any, name: str, *, allow_zero: bool = False) -> None:
    value = getattr(obj, name)
    lo = 0 if allow_zero else 1
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= lo,
        f"{type(obj).__name__}.{name}",
        f"an integer >= {lo}",
        value,
    )


def choice(obj: Any, name: str, choices: tuple) -> None:
    value = getattr(obj, name)
    check(value in choices, f"{type(obj).__name__}.{name}", f"one of {choices}", value)


def bools(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        check(isinstance(value, bool), f"{type(obj).__name__}.{name}", "True or False", value)


def typed_fields(obj: Any, *, zero_ok: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """Every ``int`` field of the dataclass ``obj`` is an integer >= 1 (>= 0 for ``zero_ok``),
    every ``bool`` field True or False; ``skip`` names fields with checks of their own. A field
    added later is checked without being listed."""
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        if f.type in ("int", int):
            pos_int(obj, f.name, allow_zero=f.name in zero_ok)
        elif f.type in ("bool", bool):
            bools(obj, f.name)
