"""Field checks for the frozen configs: each raises ``ValueError`` naming the field, the value
and what is allowed (``engram.layer_ids=(5,) is invalid: must be ...``)."""

from __future__ import annotations

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
