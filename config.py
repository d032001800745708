"""Typed configs: dataclasses loaded from YAML or dicts, where an unknown key is an error.

    @dataclass
    class TrainConfig:
        steps: int = 100
        lr: float = 1e-3

    cfg = load_config(TrainConfig, "launch/fm/tiny.yaml", overrides={"steps": 10})

Nested dataclass fields are filled from nested mappings. A key that no field reads
raises `ConfigError` naming the key and the config class, so a misspelled option never
goes silently unused.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config names a key that no field reads, or a value of the wrong kind."""


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields."""
    data = dict(data or {})
    where = where or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = from_dict(kind, value, f"{where}.{name}")
        elif kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = kind(value)
        elif kind is tuple or typing.get_origin(kind) is tuple:
            args = typing.get_args(kind)
            if args and dataclasses.is_dataclass(args[0]):   # tuple[SomeConfig, ...]: each from a mapping
                value = tuple(from_dict(args[0], v, f"{where}.{name}[{i}]") if isinstance(v, Mapping) else v
                              for i, v in enumerate(value))
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> T:
    """Load `cls` from a YAML file (may be None), then apply dotted `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(cls, data, where=f"{cls.__name__} ({path})" if path else "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['a.b=3', 'c=x'] -> {'a.b': 3, 'c': 'x'}; values parsed as YAML scalars."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out
