"""Dataclasses from decoded JSON/YAML mappings: the one validator behind the weights manifest, the pre-training
run config and the fine-tuning presets.

:func:`from_mapping` builds a (nested) dataclass, :func:`update` applies a mapping onto an instance (nested
sections are updated, not replaced) and :func:`values` checks the keys a partial mapping sets. Field types come
from the annotations: ``bool``, ``int`` (never a bool), ``float`` (an int is converted), ``str``, ``X | None``,
``Literal[...]``, ``tuple[X, Y]`` / ``tuple[X, ...]`` / ``list[X]`` (from lists), ``dict[K, V]`` /
``Mapping[K, V]``, ``Any`` and dataclasses. ``field(metadata={"choices": (...)})`` restricts a field to listed
values. Unknown and missing keys are errors. Errors are instances of the ``error`` class given, carry ``path``
as ``.path`` and read ``"{source}: {dotted.key}: expected {what}, got {value}."``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from .errors import ConfigError, EcampError

__all__ = ["from_mapping", "update", "values"]

_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null",
          list: "a list", tuple: "a list", dict: "a mapping"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


@dataclass(frozen=True)
class _Ctx:
    error: type[EcampError]
    source: str
    path: object
    noun: str

    def fail(self, where: str, problem: str) -> EcampError:
        return self.error(f"{self.source}: {where + ': ' if where else ''}{problem}.", path=self.path)


def from_mapping(cls: type, data: Any, *, error: type[EcampError] = ConfigError, source: str, where: str = "",
                 path: object = None, noun: str = "key") -> Any:
    """A ``cls`` instance from ``data``; ``where`` is the dotted key of ``data`` inside the ``source`` document,
    ``noun`` what messages call a key ("key", "field")."""
    return _build(cls, data, _Ctx(error, source, path, noun), where)


def update(obj: Any, data: Any, *, error: type[EcampError] = ConfigError, source: str, where: str = "",
           path: object = None, noun: str = "key") -> Any:
    """A copy of dataclass instance ``obj`` with the keys of ``data`` applied (options as :func:`from_mapping`)."""
    return dataclasses.replace(obj, **_fields(type(obj), data, _Ctx(error, source, path, noun), where, obj))


def values(cls: type, data: Any, *, error: type[EcampError] = ConfigError, source: str, where: str = "",
           path: object = None, noun: str = "key") -> dict[str, Any]:
    """The fields ``data`` sets, checked and converted, without building a ``cls`` (for partial files)."""
    return _fields(cls, data, _Ctx(error, source, path, noun), where)


def _build(cls: type, data: Any, ctx: _Ctx, where: str) -> Any:
    vals = _fields(cls, data, ctx, where)
    for f in dataclasses.fields(cls):
        if f.init and f.name not in vals and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise ctx.fail(where, f"missing {ctx.noun} {f.name!r}")
    return cls(**vals)


def _fields(cls: type, data: Any, ctx: _Ctx, where: str, base: Any = None) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ctx.fail(where, f"expected a mapping, got {_given(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ctx.fail(where, f"unknown {ctx.noun}s {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        current = getattr(base, key, None)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):  # update a section in place
            out[key] = dataclasses.replace(current, **_fields(type(current), value, ctx, dotted, current))
        else:
            out[key] = _convert(hints[key], value, dotted, ctx)
        choices = fields[key].metadata.get("choices")
        if choices is not None and out[key] not in choices:
            raise ctx.fail(dotted, f"expected one of {', '.join(map(repr, choices))}, got {_given(value)}")
    return out


def _convert(tp: Any, value: Any, where: str, ctx: _Ctx, shown: Any = None) -> Any:
    """``value`` checked against annotation ``tp`` (lists become tuples where ``tp`` says so)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    shown = tp if shown is None else shown  # the annotation a mismatch names (the whole X | None)
    if tp is Any or tp is object:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, where, ctx, shown=tp)
        for option in options:
            try:
                return _convert(option, value, where, ctx)
            except ctx.error:
                pass
        ok = False
    elif origin is Literal:
        ok = any(value == a and type(value) is type(a) for a in args)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp in (bool, int, str):
        ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
    elif origin in (tuple, list) or tp in (tuple, list):
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        ok = isinstance(value, (list, tuple)) and (not fixed or len(value) == len(args))
        if ok:
            kinds = args if fixed else [args[0] if args else Any] * len(value)
            items = [_convert(k, v, f"{where}[{i}]", ctx) for i, (k, v) in enumerate(zip(kinds, value, strict=True))]
            return tuple(items) if tuple in (origin, tp) else items
    elif origin in (dict, Mapping) or tp in (dict, Mapping):
        ok = isinstance(value, Mapping)
        if ok:
            kt, vt = args or (Any, Any)
            return {_convert(kt, k, where, ctx): _convert(vt, v, f"{where}.{k}", ctx) for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        ok = isinstance(value, Mapping)
        if ok:
            return _build(tp, value, ctx, where)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ctx.fail(where, f"expected {_describe(shown)}, got {_given(value)}")
    return value


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list) or tp in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"a list of {len(args)} {_plural(args[0])}"
            return f"a list [{', '.join(_describe(a) for a in args)}]"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, Mapping) or tp in (dict, Mapping) or dataclasses.is_dataclass(tp):
        return "a mapping"
    return "anything" if tp is Any else _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    if tp in _PLURALS:
        return _PLURALS[tp]
    what = _describe(tp)
    return "lists" + what[len("a list"):] if what.startswith("a list") else f"items ({what})"


def _given(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{_NAMES.get(type(value), type(value).__name__)} {text if len(text) <= 60 else text[:57] + '...'}"
