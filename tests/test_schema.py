"""ecamp.schema: dataclasses from mappings, the validator behind the manifest, the run config and the presets."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from ecamp.errors import ConfigError, ManifestError
from ecamp.schema import from_mapping, update, values


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    names: tuple[str, ...] = ()


@dataclass
class Outer:
    steps: int
    flag: bool = False
    label: str = "x"
    maybe: int | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    mode: Literal["a", "b"] = "a"
    kind: str = field(default="sgd", metadata={"choices": ("sgd", "adamw")})
    inner: Inner = field(default_factory=Inner)


def build(data, **kw):
    return from_mapping(Outer, data, source="test.yaml", **kw)


def test_builds_nested_and_converts():
    out = build({"steps": 3, "pair": [1, 2], "tags": ["p"], "extra": {"k": [1]}, "mode": "b", "kind": "adamw",
                 "inner": {"rate": 1, "names": ["u", "v"]}, "maybe": None})
    assert out == Outer(3, pair=(1.0, 2.0), tags=["p"], extra={"k": [1]}, mode="b", kind="adamw",
                        inner=Inner(1.0, ("u", "v")))
    assert isinstance(out.pair, tuple) and isinstance(out.inner.rate, float) and isinstance(out.inner.names, tuple)
    assert build({"steps": 1, "maybe": 4}).maybe == 4


@pytest.mark.parametrize("data, message", [
    ({"steps": 1, "stepz": 2}, "test.yaml: unknown keys ['stepz']; known: ["),
    ({"steps": 1, "inner": {"rat": 1}}, "inner: unknown keys ['rat']"),
    ({}, "missing key 'steps'"),
    ({"steps": True}, "steps: expected an integer, got a boolean True"),
    ({"steps": 1.0}, "steps: expected an integer, got a number 1.0"),
    ({"steps": 1, "flag": 1}, "flag: expected a boolean, got an integer 1"),
    ({"steps": 1, "inner": {"rate": True}}, "inner.rate: expected a number, got a boolean"),
    ({"steps": 1, "inner": {"rate": "0.5"}}, "inner.rate: expected a number, got a string '0.5'"),
    ({"steps": 1, "label": 3}, "label: expected a string"),
    ({"steps": 1, "maybe": "x"}, "maybe: expected an integer or null, got a string 'x'"),
    ({"steps": 1, "pair": [1]}, "pair: expected a list of 2 numbers, got a list [1]"),
    ({"steps": 1, "pair": "ab"}, "pair: expected a list of 2 numbers"),
    ({"steps": 1, "tags": ["a", 2]}, "tags[1]: expected a string, got an integer 2"),
    ({"steps": 1, "inner": {"names": "abc"}}, "inner.names: expected a list of strings, got a string 'abc'"),
    ({"steps": 1, "extra": [1]}, "extra: expected a mapping"),
    ({"steps": 1, "inner": 5}, "inner: expected a mapping, got an integer 5"),
    ({"steps": 1, "mode": "c"}, "mode: expected one of 'a', 'b', got a string 'c'"),
    ({"steps": 1, "kind": "adam"}, "kind: expected one of 'sgd', 'adamw', got a string 'adam'"),
    ([1, 2], "test.yaml: expected a mapping, got a list"),
])
def test_rejects_with_source_dotted_key_expected_and_given(data, message):
    with pytest.raises(ConfigError) as err:
        build(data)
    assert message in str(err.value)


def test_error_class_path_noun_and_where():
    with pytest.raises(ManifestError) as err:
        from_mapping(Outer, {"steps": "1"}, error=ManifestError, source="m.json", where="models['x']",
                     path="/tmp/m.json", noun="field")
    assert str(err.value) == "m.json: models['x'].steps: expected an integer, got a string '1'."
    assert err.value.path == "/tmp/m.json" and isinstance(err.value, ValueError)
    assert pickle.loads(pickle.dumps(err.value)).path == "/tmp/m.json"
    with pytest.raises(ManifestError, match="missing field 'steps'"):
        from_mapping(Outer, {}, error=ManifestError, source="m.json", noun="field")
    with pytest.raises(ConfigError) as err:
        build({"steps": 1, "nope": 1})
    assert err.value.path is None


def test_update_merges_sections_and_values_checks_partial_mappings():
    base = Outer(5, inner=Inner(0.25, ("a",)))
    new = update(base, {"label": "y", "inner": {"names": ["b"]}}, source="override")
    assert new == Outer(5, label="y", inner=Inner(0.25, ("b",))) and base.label == "x"  # a copy; base unchanged
    assert update(base, {}, source="s") == base
    with pytest.raises(ConfigError, match=r"override: inner.rate: expected a number"):
        update(base, {"inner": {"rate": "fast"}}, source="override")
    assert values(Outer, {"pair": [0, 1]}, source="p") == {"pair": (0.0, 1.0)}  # no missing-key check
    with pytest.raises(ConfigError, match=r"unknown keys \['x'\]"):
        values(Outer, {"x": 1}, source="p")
