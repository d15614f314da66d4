"""A :class:`~engram_jax.config.Config` from text: a stored ``config.json`` dict (strict: an
unknown key is an error naming it) and the CLI's dotted-key overrides
(``--set engram.layer_ids=[1] --set train.steps=50``: values parsed as JSON or a Python literal,
never evaluated, coerced to the field's type; unknown keys answered with the nearest valid
ones)."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
from typing import TYPE_CHECKING, Any

from engram_jax.validate import check

if TYPE_CHECKING:
    from engram_jax.config import Config


def from_dict(cls: type[Config], d: dict) -> Config:
    """``cls(**d)`` with each section built from its sub-dict; missing keys take their defaults,
    an unknown top-level or section key raises ``ValueError`` naming it and the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, sub in d.items():
        if name not in fields:
            raise ValueError(f"unknown config key {name!r} (valid: {', '.join(fields)})")
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            known = [g.name for g in dataclasses.fields(default)]
            bad = sorted(set(sub) - set(known)) if isinstance(sub, dict) else [""]
            if bad:
                raise ValueError(
                    f"unknown config key '{name}.{bad[0]}' (valid {name} keys: {', '.join(known)})"
                )
            sub = type(default)(**sub)
        kwargs[name] = sub
    return cls(**kwargs)


def valid_keys(cfg: Config) -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(sub)]
        else:
            keys.append(f.name)
    return keys


def parse_value(text: str) -> Any:
    """JSON or a Python literal, never evaluated as code; anything else stays a string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        return tuple(value) if isinstance(value, list) else value
    return text


def _coerce(value: Any, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        check(isinstance(value, bool), key, "true or false", value)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, tuple) and isinstance(value, (int, str)):
        raise ValueError(f"{key}={value!r} is invalid: must be a list, e.g. {key}=[...]")
    elif isinstance(current, str) and not isinstance(value, str):
        value = str(value)
    return value


def override(cfg: Config, assignments: list[str] | tuple[str, ...]) -> Config:
    """Apply ``key=value`` strings with dotted keys; unknown keys list the nearest valid ones."""
    keys = valid_keys(cfg)
    changes: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=5, cutoff=0.4)
            prefix = key.split(".")[0] + "."
            near = near or [k for k in keys if k.startswith(prefix)][:8] or keys[:8]
            raise ValueError(f"unknown config key {key!r}; valid keys nearby: {', '.join(near)}")
        value = parse_value(text)
        if "." in key:
            section, name = key.split(".", 1)
            current = getattr(getattr(cfg, section), name)
            changes.setdefault(section, {})[name] = _coerce(value, current, key)
        else:
            top[key] = _coerce(value, getattr(cfg, key), key)
    try:
        new = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in changes.items()}
        return dataclasses.replace(cfg, **new, **top)
    except TypeError as e:  # e.g. a tuple given where an int belongs
        raise ValueError(f"bad --set value: {e}") from None
