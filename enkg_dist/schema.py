"""Plumbing of validated settings, shared by the run config (`config`) and the prior's training config
(`priors/training.py`): KEY=VALUE overrides and one-line errors naming the bad key and the allowed values.

Pydantic and YAML only: it imports nothing of the project, so a leaf package (priors) may use it without importing
the run configuration.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line."""



def models_in(annotation) -> list[type[BaseModel]]:
    """The BaseModel classes in an annotation (unwrapping Annotated / Union / Optional)."""
    args = getattr(annotation, "__args__", None)
    if args is None:
        return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []
    return [m for a in args for m in models_in(a)]


def _resolve(loc: tuple, root: type[BaseModel]) -> tuple[list[str], type[BaseModel] | None]:
    """Walk an error location: the user's key path (without union tags) and the model owning its last key."""
    keys, owner, pending = [], root, None
    for part in loc:
        if owner is not None and "kind" in owner.model_fields and owner.model_fields["kind"].default == part:
            continue  # the tag of a one-member union
        if pending is not None:  # a discriminated union names its member by its tag
            owner = next((m for m in pending if m.model_fields["kind"].default == part), None)
            pending = None
            if owner is not None:
                continue
        keys.append(str(part))
        field = owner.model_fields.get(part) if owner is not None and isinstance(part, str) else None
        models = models_in(field.annotation) if field is not None else []
        owner, pending = (models[0], None) if len(models) == 1 else (None, models or None)
    return keys, owner


def one_line_error(exc: ValidationError, root: type[BaseModel], what: str = "config error") -> str:
    """First error of a ValidationError of model `root` as 'config error: a.b: message (allowed: ...)'."""
    err = exc.errors()[0]
    keys, _ = _resolve(err["loc"], root)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        _, owner = _resolve(err["loc"][:-1], root)
        allowed = ", ".join(owner.model_fields) if owner is not None else "?"
        msg = f"unknown key (allowed: {allowed})"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return printable(f"{what}: {'.'.join(keys) or '<root>'}: {msg}{more}")



def parse_value(text: str) -> Any:
    """A --set value: YAML scalar/list/dict syntax (1, 0.5, true, null, [1, 2])."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config error: --set value {text!r} is not valid YAML ({first})") from None


def printable(text: str) -> str:
    """`text` on one line: control characters (a user's value may hold any) written as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply 'a.b.c=value' overrides to a nested dict (creating levels as needed)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config error: --set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"config error: --set {item!r}: the key {key.strip()!r} has an empty part")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = parse_value(value)
    return data
