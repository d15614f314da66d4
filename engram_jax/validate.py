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


def at_most(obj: Any, name: str, limit: str) -> None:
    """``obj.name <= obj.limit``, two fields of one config."""
    value, bound = getattr(obj, name), getattr(obj, limit)
    check(value <= bound, f"{type(obj).__name__}.{name}", f"<= {limit}={bound}", value)


def choice(obj: Any, name: str, choices: tuple) -> None:
    value = getattr(obj, name)
    check(value in choices, f"{type(obj).__name__}.{name}", f"one of {choices}", value)


def bools(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        check(isinstance(value, bool), f"{type(obj).__name__}.{name}", "True or False", value)


def zero_ok(default: int) -> Any:
    """A config ``int`` field that may be 0 (every other ``int`` field must be >= 1):
    ``seed: int = zero_ok(0)``. The bound stands with the field, so a renamed field keeps it."""
    return dataclasses.field(default=default, metadata={"zero_ok": True})


def typed_fields(obj: Any, *, skip: tuple[str, ...] = ()) -> None:
    """Every ``int`` field of the dataclass ``obj`` is an integer >= 1 (>= 0 if declared with
    :func:`zero_ok`), every ``bool`` field True or False; ``skip`` names fields with checks of
    their own. A field added later is checked without being listed."""
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        if f.type in ("int", int):
            pos_int(obj, f.name, allow_zero=f.metadata.get("zero_ok", False))
        elif f.type in ("bool", bool):
            bools(obj, f.name)
