"""Typed configs: dataclasses with named presets, `--set section.key=value`
overrides checked against the declared types, and YAML in and out.

A job declares its config as nested dataclasses and a `Presets` registry:

    PRESETS = Presets(JobConfig)
    PRESETS.register("tiny", lambda: JobConfig(...))
    cfg = PRESETS.from_args(args)       # after PRESETS.add_arguments(parser)

Field types supported: int, float, str, bool, `X | None`, tuple/list of
those, dict[str, scalar] and nested dataclasses.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import types
import typing
from typing import Any, Callable, Generic, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A preset, override key or value does not fit the config's declared types."""


# ------------------------------------------------------------------ type checks


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `where`."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: None is not allowed (expected {_type_name(tp)})")
    tp = inner
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, value_type = typing.get_args(tp) or (str, Any)
        return {str(k): coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `--set run.name=123`
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------- dict and YAML


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build `cls` from a dict; unknown keys and wrong types are errors."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in sorted(unknown))}; "
                          f"{cls.__name__} has: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def from_yaml(cls: type[T], text: str) -> T:
    return from_dict(cls, yaml.safe_load(text) or {})


def flatten(config: Any) -> dict[str, Any]:
    """{"section.key": value} for every leaf (how MLflow params are logged)."""
    return flatten_dict(to_dict(config))


def flatten_dict(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ------------------------------------------------------------------ overrides


def apply_override(config: T, assignment: str) -> T:
    """Return a copy of `config` with one `a.b.c=value` assignment applied.
    The value is parsed as YAML (so `3`, `0.5`, `true`, `[1, 2]`, `null` work)
    and checked against the field's declared type."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {assignment!r}: cannot parse value: {error}") from error
    updated = copy.deepcopy(config)
    node = updated
    for depth, key in enumerate(keys):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown key {'.'.join(keys[:depth + 1])!r}: {'.'.join(keys[:depth])} is not a section")
        names = [f.name for f in dataclasses.fields(node)]
        if key not in names:
            where = ".".join(keys[:depth]) or type(updated).__name__
            raise ConfigError(f"unknown key {'.'.join(keys[:depth + 1])!r}; {where} has: {', '.join(names)}")
        if depth == len(keys) - 1:
            hint = _field_types(type(node))[key]
            if value is not None and _accepts_raw_string(hint):
                value = raw  # keep strings like "007" or "1e-3" literally where a str is declared
            object.__setattr__(node, key, coerce(value, hint, path))
        else:
            node = getattr(node, key)
    return updated


def _accepts_raw_string(hint: Any) -> bool:
    return _is_optional(hint)[1] is str


def apply_overrides(config: T, assignments: list[str] | None) -> T:
    for assignment in assignments or []:
        config = apply_override(config, assignment)
    return config


# -------------------------------------------------------------------- presets


class Presets(Generic[T]):
    """Named factories for one config class."""

    def __init__(self, cls: type[T]):
        self.cls = cls
        self._factories: dict[str, Callable[[], T]] = {}

    def register(self, name: str, factory: Callable[[], T]) -> None:
        self._factories[name] = factory

    @property
    def names(self) -> list[str]:
        return list(self._factories)

    def get(self, name: str, overrides: list[str] | None = None) -> T:
        if name not in self._factories:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(self.names)}")
        return apply_overrides(self._factories[name](), overrides)

    def add_arguments(self, parser: argparse.ArgumentParser, default: str = "tiny") -> None:
        parser.add_argument("--preset", default=default, choices=self.names, help="named config preset")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override one config value, e.g. --set train.steps=10 (repeatable)")
        parser.add_argument("--config", dest="config_file", default=None,
                            help="YAML file with a full config (replaces the preset)")
        parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")

    def from_args(self, args: argparse.Namespace) -> T:
        if getattr(args, "config_file", None):
            with open(args.config_file) as stream:
                config = from_yaml(self.cls, stream.read())
            return apply_overrides(config, args.overrides)
        return self.get(args.preset, args.overrides)


def inert_fields(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted fields that the config's current settings leave without effect: what each nested
    dataclass names in its `inert_fields()` (e.g. a shuffle window when nothing is shuffled in
    windows). They stay out of fingerprints, so adding an option leaves the fingerprints of
    configs that do not use it unchanged."""
    if not dataclasses.is_dataclass(cfg):
        return []
    found = [prefix + name for name in cfg.inert_fields()] if hasattr(cfg, "inert_fields") else []
    for field in dataclasses.fields(cfg):
        found += inert_fields(getattr(cfg, field.name), f"{prefix}{field.name}.")
    return found


def fingerprint(cfg: Any, ignore: tuple[str, ...] = (), **extra: Any) -> str:
    """16 hex digits naming what decides a job's result: the config as a dict without the
    `ignore`d fields (dotted for nested ones: names, locations, switches, resources), plus
    `extra` resolved inputs."""
    data = to_dict(cfg)
    for dotted in (*ignore, *inert_fields(cfg)):
        *parents, key = dotted.split(".")
        node = data
        for parent in parents:
            node = node.get(parent, {})
        node.pop(key, None)
    data.update(extra)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def job_main(argv: list[str] | None, presets: "Presets[T]", default: str, shorthands: tuple[str, ...],
             run: Callable[[T], Any], description: str) -> int:
    """The command line of a preset-configured job: `--preset`, `--set`, `--config`,
    `--print-config`, plus `--<field> VALUE` shorthands for top-level fields. A ValueError or
    FileNotFoundError from `run` (bad input) is printed and exits 2, nothing else is caught."""
    parser = argparse.ArgumentParser(description=description)
    presets.add_arguments(parser, default=default)
    for name in shorthands:
        parser.add_argument(f"--{name}", default=None, help=f"shorthand for --set {name}=…")
    args = parser.parse_args(argv)
    cfg = presets.from_args(args)
    for name in shorthands:
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
