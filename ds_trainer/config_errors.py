"""A config's validation errors as the CLI prints them: one line per dotted key, an unknown key with
the closest valid one (a typo would otherwise fall back to a default silently), values cut short."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from pydantic import BaseModel, ValidationError

from ds_trainer.config_yaml import cut, echo


def _section_at(root: type[BaseModel], path: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `path` (for did-you-mean suggestions)."""
    model = root
    for part in path[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _unknown_key_message(root: type[BaseModel], path: Sequence[str | int]) -> str:
    dotted = cut(".".join(str(p) for p in path))
    model = _section_at(root, path)
    if model is None:
        return f"unknown key {dotted}"
    prefix = ".".join(str(p) for p in path[:-1])
    valid = list(model.model_fields)
    close = difflib.get_close_matches(str(path[-1])[:100], valid, n=1, cutoff=0.6)
    if close:
        full = f"{prefix}.{close[0]}" if prefix else close[0]
        return f"unknown key {dotted} — did you mean {full}?"
    where = f"{prefix}" if prefix else "the top level"
    return f"unknown key {dotted} — valid keys in {where}: {', '.join(valid)}"


def validation_message(exc: ValidationError, source: str, root: type[BaseModel]) -> str:
    """pydantic's errors as one line per key: the dotted key, what is wrong, a short prefix of the value."""
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        dotted = cut(".".join(str(p) for p in loc))
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(root, loc))
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "value_error" or not dotted:
            lines.append(f"{dotted or 'config'}: {msg}" if dotted else msg)
        else:
            lines.append(f"{dotted}: {msg} (got {echo(err.get('input'), loc)})")
    body = "\n".join(f"  {line}" for line in lines)  # each value in it already cut by echo()
    return f"invalid configuration in {source}:\n{body}"
