"""Config files plus environment overrides, into frozen dataclasses (one per service).

Precedence, lowest first: dataclass defaults < TOML file < ``FEDASYNC_*`` environment < CLI flags.
Environment names: ``FEDASYNC_BROKER`` for a top-level key, ``FEDASYNC_RULE__BUFFER_SIZE`` for
``[rule] buffer_size``. A value is read as a TOML literal when it is one (``10``, ``true``,
``["eth*"]``), else as a plain string, so ``FEDASYNC_FLEET=lab`` needs no quotes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from models._errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")
ENV_PREFIX = "FEDASYNC_"


def load_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
            return data
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def env_layer(environ: Mapping[str, str], *, prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """``FEDASYNC_A__B=v`` -> ``{"a": {"b": v}}``."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(prefix) or len(name) == len(prefix):
            continue
        path = name[len(prefix):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name} conflicts with another FEDASYNC_ variable", key=name)
        node[path[-1]] = _literal(raw)
    return out


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge dicts, later layers win."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            elif isinstance(value, Mapping):
                out[key] = merge(value)
            else:
                out[key] = value
    return out


def load(cls: type[T], path: Path | None, *, environ: Mapping[str, str] | None,
         overrides: Mapping[str, Any] | None, required: str, hint: str) -> T:
    """Defaults < TOML file < FEDASYNC_* environment < `overrides` (the CLI's flags), built
    into `cls`; `required` names the one setting with no default and `hint` how to give it."""
    data = merge(load_toml(path), env_layer(os.environ if environ is None else environ),
                 overrides or {})
    if required not in data:
        raise ConfigError(f"no {required}: {hint}", key=required)
    return build(cls, data)


def build(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Construct dataclass `cls` from plain data, recursing into dataclass-typed fields.

    Unknown keys are errors (a typo must not silently fall back to a default); lists become
    tuples; validation itself is the dataclass's own ``__post_init__``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where or 'config'}: {', '.join(unknown)}",
                          key=unknown[0])
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        target = _dataclass_in(hints[name])
        if target is not None and isinstance(value, Mapping):
            kwargs[name] = build(target, value, where=key)
        elif isinstance(value, list):
            kwargs[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {where or 'config'}: {exc}") from exc


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in ``X`` or ``X | None``, if any."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _literal(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
