"""Typed configuration machinery: dataclass schemas <-> YAML, `--set a.b=c` overrides, strict checking.

Rules:
* a YAML file may name ``base: other.yaml`` (relative to itself); its keys are merged over the base's;
* every key must exist in the schema: an unknown key is an error naming the dotted key and the closest
  valid one; a value of the wrong type is an error naming the key, the expected type and the value;
* a resolved config dumps to YAML (`to_dict` / `dump_yaml`) and reloads to an equal object.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

BASE_KEY = "base"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


#: names from other training codebases, and what this schema calls them
SYNONYMS = {"learning_rate": "lr", "num_epochs": "epochs", "batch_size": "micro_batch_size",
            "train_micro_batch_size_per_gpu": "micro_batch_size", "grad_accum_steps": "gradient_accumulation_steps",
            "max_grad_norm": "gradient_clipping", "num_warmup_steps": "warmup_steps", "save_steps": "save_every_steps",
            "logging_steps": "print_every_steps", "adam_epsilon": "eps", "max_seq_length": "max_length"}


def _closest(name: str, options) -> str:
    options = list(options)
    if SYNONYMS.get(name) in options:
        return f"; did you mean {SYNONYMS[name]!r}?"
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check ``value`` against the annotation ``tp``; convert where the meaning is unambiguous."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: value {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}{_closest(str(value), map(str, get_args(tp)))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, f"{key}.<key>"): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported schema type {_type_name(tp)}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, strictly (unknown keys and wrong types are errors)."""
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in types_:
            raise ConfigError(f"unknown config key {key!r}{_closest(str(name), types_)}")
        kwargs[name] = _coerce(value, types_[name], key)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc
    return obj


def to_dict(obj) -> dict:
    """Plain nested dict (lists for tuples) suitable for YAML."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml_with_bases(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML mapping, resolving a ``base:`` chain (paths relative to each file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular 'base' chain {[str(p) for p in _seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    merged: dict = {}
    for b in bases:
        merged = deep_merge(merged, read_yaml_with_bases(path.parent / b, _seen + (path,)))
    return deep_merge(merged, data)


def apply_override(data: dict, assignment: str, schema) -> dict:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a raw config mapping."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.path=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    # Validate the path against the schema first so a typo is reported with the closest valid key.
    cls = schema
    for i, part in enumerate(parts):
        types_ = _field_types(cls) if dataclasses.is_dataclass(cls) else None
        if types_ is None:
            break
        if part not in types_:
            where = ".".join(parts[:i]) or "<top level>"
            raise ConfigError(f"unknown config key {dotted!r} (no {part!r} under {where}){_closest(part, types_)}")
        cls = types_[part]
        if get_origin(cls) in (Union, types.UnionType):
            inner = [a for a in get_args(cls) if a is not type(None)]
            cls = inner[0] if len(inner) == 1 else cls
    value = yaml.safe_load(raw) if raw.strip() else ""
    out = dict(data)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    return out


def read_settings(schema, path: str | Path | None = None, overrides=()) -> dict:
    """The settings an optional YAML file (with its bases) plus ``key=value`` overrides give, as a dict."""
    data = read_yaml_with_bases(path) if path is not None else {}
    for assignment in overrides:
        data = apply_override(data, assignment, schema)
    return data


def load(schema, path: str | Path | None = None, overrides=()):
    """Load ``schema`` from an optional YAML file plus ``key=value`` overrides."""
    return from_dict(schema, read_settings(schema, path, overrides))


def dump_yaml(obj, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
