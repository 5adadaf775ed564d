"""Dataclasses from decoded JSON/YAML mappings: the one validator behind the weights manifest, the pre-training
run config and the fine-tuning presets.

:func:`from_mapping` builds a (nested) dataclass, :func:`update` applies a mapping onto an instance (nested
sections are updated, not replaced) and :func:`values` checks the keys a partial mapping sets. Field types come
from the annotations: ``bool``, ``int`` (never a bool), ``float`` (an int is converted), ``str``, ``X | None``,
``Literal[...]``, ``tuple[X, Y]`` / ``tuple[X, ...]`` / ``list[X]`` (from lists), ``dict[K, V]`` /
``Mapping[K, V]``, ``Any`` and dataclasses. ``field(metadata={"choices": (...)})`` restricts a field to listed
values. Unknown and missing keys are errors. Errors are instances of the ``error`` class given, carry ``path``
as ``.path`` and read ``"{source}: {dotted.key}: expected {what}, got {value}."``.

A document is bounded before it is looked at (:func:`check_bounds`): at most ``ECAMP_MAX_CONFIG_DEPTH`` (64)
levels of nesting and ``ECAMP_MAX_CONFIG_NODES`` (200,000) values, counting every use of a YAML alias, so a few
hundred bytes of nested aliases cannot expand to billions of values. :func:`load_yaml` applies the depth bound
while the YAML is parsed.
"""

from __future__ import annotations

import dataclasses
import os
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from .errors import ConfigError, EcampError

__all__ = ["from_mapping", "update", "values", "check_bounds", "load_yaml", "max_bound", "brief"]

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


def max_bound(name: str, default: int) -> int:
    """The bound ``ECAMP_MAX_<name>`` from the environment (a positive integer), else ``default``."""
    raw = os.environ.get(f"ECAMP_MAX_{name}")
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"ECAMP_MAX_{name}={raw[:40]!r} is not a positive integer; unset it or give one.")
    return int(raw)


def check_bounds(data: Any, *, source: str, error: type[EcampError] = ConfigError, path: object = None) -> None:
    """Refuse a decoded document nested deeper than ``ECAMP_MAX_CONFIG_DEPTH`` or holding more values than
    ``ECAMP_MAX_CONFIG_NODES`` (shared YAML aliases counted at every use); stops at the first excess, so the walk
    itself is cheap."""
    depth_max, nodes_max = max_bound("CONFIG_DEPTH", 64), max_bound("CONFIG_NODES", 200_000)
    stack, seen = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > nodes_max:
            raise error(f"{source}: holds more than {nodes_max} values (nested YAML aliases?); no config is that "
                        f"large (raise ECAMP_MAX_CONFIG_NODES if yours is).", path=path)
        if isinstance(value, (Mapping, list, tuple)):
            if depth > depth_max:
                raise error(f"{source}: nested more than {depth_max} levels deep; no config is (raise "
                            f"ECAMP_MAX_CONFIG_DEPTH if yours is).", path=path)
            items = value.values() if isinstance(value, Mapping) else value
            stack.extend((v, depth + 1) for v in items)
            if isinstance(value, Mapping):
                stack.extend((k, depth + 1) for k in value)


def load_yaml(text: str, *, source: str, loader: type | None = None, path: object = None) -> Any:
    """``yaml.load(text, Loader=loader)`` (default ``yaml.SafeLoader``) with :func:`check_bounds`' bounds: the
    nesting depth while parsing (a deep document would exhaust the stack), the number of values after (aliases
    are shared while parsing, so building costs nothing); a malformed document raises :class:`ConfigError`."""
    import yaml

    depth_max = max_bound("CONFIG_DEPTH", 64)

    class Bounded(loader or yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent, index):
            self._depth += 1
            try:
                if self._depth > depth_max:
                    raise ConfigError(f"{source}: nested more than {depth_max} levels deep; no config is (raise "
                                      f"ECAMP_MAX_CONFIG_DEPTH if yours is).", path=path)
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    try:
        data = yaml.load(text, Loader=Bounded)  # noqa: S506 - Bounded derives from a safe loader
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {str(e)[:300]}", path=path) from e
    check_bounds(data, source=source, path=path)
    return data


def from_mapping(cls: type, data: Any, *, error: type[EcampError] = ConfigError, source: str, where: str = "",
                 path: object = None, noun: str = "key") -> Any:
    """A ``cls`` instance from ``data``; ``where`` is the dotted key of ``data`` inside the ``source`` document,
    ``noun`` what messages call a key ("key", "field")."""
    check_bounds(data, source=source, error=error, path=path)
    return _build(cls, data, _Ctx(error, source, path, noun), where)


def update(obj: Any, data: Any, *, error: type[EcampError] = ConfigError, source: str, where: str = "",
           path: object = None, noun: str = "key") -> Any:
    """A copy of dataclass instance ``obj`` with the keys of ``data`` applied (options as :func:`from_mapping`)."""
    check_bounds(data, source=source, error=error, path=path)
    return dataclasses.replace(obj, **_fields(type(obj), data, _Ctx(error, source, path, noun), where, obj))


def values(cls: type, data: Any, *, error: type[EcampError] = ConfigError, source: str, where: str = "",
           path: object = None, noun: str = "key") -> dict[str, Any]:
    """The fields ``data`` sets, checked and converted, without building a ``cls`` (for partial files)."""
    check_bounds(data, source=source, error=error, path=path)
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


_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 6, 60, 60


def brief(value: Any) -> str:
    """``repr(value)`` for a message, bounded in length and depth (a deep or alias-built value has no full repr)."""
    return _REPR.repr(value)


def _given(value: Any) -> str:
    if value is None:
        return "null"
    text = brief(value)  # bounded: repr() of a value built from nested aliases would be gigabytes
    return f"{_NAMES.get(type(value), type(value).__name__)} {text if len(text) <= 60 else text[:57] + '...'}"
