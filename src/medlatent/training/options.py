"""The fields of the training configuration: each option carries its help text, and its type is its contract.

The help strings are the single source of the configuration reference (``medlatent train --reference``,
``docs/training-config.md``), so a new option cannot be added without saying what it does.

A field's annotation says everything a value must satisfy (``PositiveInt``, ``Literal[...]``, an ``Interval``,
a validator for a pair's order), and pydantic enforces it: :func:`coerce` turns plain YAML values into the
typed ones (YAML 1.1 reads ``2e-4`` as a string; ``[0.5, 0.9]`` becomes a tuple) and refuses the rest with a
message that names the key and the broken rule: the type for a value of the wrong kind (``optim.base_lr must be
a number, got 'fast'``), the whole rule for one out of bounds (``optim.base_lr must be a number > 0, got 0``).
Each section's ``__post_init__`` runs :func:`check_fields`, so a section is valid however it was built; and
:func:`describe` writes the rule of every key into the configuration reference.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Annotated, Any, Callable, Literal, Union

import annotated_types
from pydantic import AllowInfNan, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

HELP = "help"

# a number where text is expected (a run folder named 2024, `export_name: 7`) is the text it reads as
_PYDANTIC = ConfigDict(coerce_numbers_to_str=True)
_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
# pydantic error types of a value that is not of the field's type at all (as opposed to one out of its bounds)
_WRONG_KIND = ("_type", "_parsing", "int_from_float")


class ConfigError(ValueError):
    """A training configuration that cannot run; the message names the key and what to do (defined beside the
    field helpers so that every section raises it; :mod:`medlatent.training.config` exports it)."""


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a default (or ``factory`` for mutable defaults) and its help text."""
    if not help:
        raise ValueError("every training option needs a help text")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={HELP: help})
    return dataclasses.field(default=default, metadata={HELP: help})


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get(HELP, "")


@functools.cache
def _adapters(cls: type) -> dict[str, tuple[Any, TypeAdapter]]:
    """``{field: (annotation, its pydantic validator)}`` of a config dataclass (built once per class)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (hints[f.name], TypeAdapter(hints[f.name], config=_PYDANTIC)) for f in dataclasses.fields(cls)}


def check_keys(cls: type, values: dict[str, Any], section: str, error: type[Exception]) -> None:
    """Refuse a key that ``cls`` has no field for, suggesting the closest ones (``section.key``, or ``'key'``
    when ``section`` is empty)."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            label = (lambda k: f"{section}.{k}") if section else repr
            close = difflib.get_close_matches(key, known, n=2)
            hint = f" (did you mean {' or '.join(label(c) for c in close)}?)" if close else ""
            raise error(f"unknown key {label(key)}{hint}; known: {', '.join(known)}")


def coerce(cls: type, values: dict[str, Any], section: str, error: type[Exception]) -> dict[str, Any]:
    """``values`` (field name → plain value) converted to the types of ``cls``'s fields and checked against
    their constraints; the first failure raises ``error`` naming ``section.key``, the rule and the value."""
    adapters = _adapters(cls)
    out = {}
    for key, value in values.items():
        hint, adapter = adapters[key]
        try:
            out[key] = adapter.validate_python(value)
        except ValidationError as e:
            raise error(_message(f"{section}.{key}", hint, e.errors()[0])) from None
    return out


def check_fields(obj: Any, section: str, error: type[Exception]) -> None:
    """Convert and check every field of the config dataclass ``obj`` in place (each section's ``__post_init__``;
    a second pass over values :func:`coerce` already converted changes nothing)."""
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in coerce(type(obj), {k: getattr(obj, k) for k in names}, section, error).items():
        setattr(obj, key, value)


def _message(key: str, hint: Any, err: ErrorDetails) -> str:
    # a validator's own ValueError says the rule ("must satisfy 0 < low ≤ high ≤ 1"); otherwise the annotation
    # does: its type alone for a value of the wrong kind ('heavy' for a weight), with its bounds for the rest
    ctx = err.get("ctx") or {}
    if err["type"] == "value_error":
        rule = str(ctx["error"])
    else:
        rule = f"must be {describe(hint, bounds=not err['type'].endswith(_WRONG_KIND))}"
    return f"{key} {rule}, got {err['input']!r}"


def describe(hint: Any, *, bounds: bool = True) -> str:
    """What a field's annotation accepts, in words: ``Annotated[int, Ge(1)] | None`` → ``an integer ≥ 1 or null``
    (``bounds=False``: the type alone, ``an integer or null``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, meta = args[0], hint.__metadata__
        if not bounds:
            return describe(base, bounds=False)
        if base is float and any(isinstance(m, AllowInfNan) and not m.allow_inf_nan for m in meta):
            text = "a finite number"
        elif base is str and any(isinstance(m, annotated_types.MinLen) and m.min_length > 0 for m in meta):
            text = "non-empty text"
        else:
            text = describe(base)
        return text + _bounds(meta)
    if origin in (Union, types.UnionType):
        some = [a for a in args if a is not type(None)]
        text = " or ".join(describe(a, bounds=bounds) for a in some)
        return f"{text} or null" if len(some) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers" if all(a is float for a in args) else f"a list of {len(args)}"
    if origin is list or hint is list:
        return "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return _SCALARS.get(hint, str(hint))


def _bounds(metadata: tuple[Any, ...]) -> str:
    """`` ≥ 1``, `` > 0`` or `` in [0, 1)`` from annotated-types bounds (other metadata says nothing)."""
    low = high = None
    for m in metadata:
        for name, value in _bound_items(m):
            if name in ("ge", "gt"):
                low = (value, name == "ge")
            else:
                high = (value, name == "le")
    if low and high:
        return f" in {'[' if low[1] else '('}{low[0]:g}, {high[0]:g}{']' if high[1] else ')'}"
    if low:
        return f" {'≥' if low[1] else '>'} {low[0]:g}"
    if high:
        return f" {'≤' if high[1] else '<'} {high[0]:g}"
    return ""


def _bound_items(m: Any) -> list[tuple[str, float]]:
    if isinstance(m, annotated_types.Interval):
        return [(n, getattr(m, n)) for n in ("ge", "gt", "le", "lt") if getattr(m, n) is not None]
    for cls, name in ((annotated_types.Ge, "ge"), (annotated_types.Gt, "gt"), (annotated_types.Le, "le"),
                      (annotated_types.Lt, "lt")):
        if isinstance(m, cls):
            return [(name, getattr(m, name))]
    return []
