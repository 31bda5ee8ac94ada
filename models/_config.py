"""Config files plus environment overrides, into frozen dataclasses (one per service).

Precedence, lowest first: dataclass defaults < TOML file < ``FEDASYNC_*`` environment < CLI flags.

Every value is checked against its field's type hint before the dataclass is built, so a wrong
value is one `ConfigError` naming the layer that gave it, the key with its table path, the
expected type and what it got: ``config file a.toml: broker must be a string (e.g.
"mqtt://127.0.0.1:1883"), got integer 1883``. Ranges are declared with the dataclass's fields
(`models._bounds`) and checked by its ``__post_init__``. A file that is not UTF-8 (TOML's
encoding) is one `ConfigError` naming the first bad byte, its offset, line and column.

Environment names: ``FEDASYNC_BROKER`` for a top-level key, ``FEDASYNC_RULE__BUFFER_SIZE`` for
``[rule] buffer_size``. A value is converted by its field's type, never guessed: a string field
takes the text as it is (``FEDASYNC_DEVICE_ID=123`` is ``"123"``), numbers are parsed, booleans
are true/false/yes/no/on/off/1/0, lists are a TOML array or comma-separated text, and an
optional field is unset by an empty value. A variable whose first part names no setting of this
service is ignored (one log line lists them): a host or a systemd EnvironmentFile shared by the
agent and the coordinator is normal. Under a table this service has (``FEDASYNC_RULE__...``), an
unknown key is an error, and so is any unknown key in the TOML file: a typo must not silently
fall back to a default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from fedasync_iot.models._errors import ConfigError, FedAsyncError
from fedasync_iot.models._logging import check_level

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")
ENV_PREFIX = "FEDASYNC_"
DEFAULT_SOURCE = "config"

log = logging.getLogger("fedasync.config")

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def load_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    text = read_utf8(path, "config file", hint="TOML files must be UTF-8")
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return data


def read_utf8(path: Path, what: str, *, hint: str, key: str | None = None) -> str:
    """The text of a file a person wrote, or one `ConfigError` naming `what` and, for a byte
    that is not UTF-8, where it is: decoded here, not by the parser, whose UnicodeDecodeError is
    no ConfigError (a file saved as Latin-1 ended the CLIs with a traceback instead of a line)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}", key=key) from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8: {_undecodable(raw, exc.start)}; "
                          f"{hint} (re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8)",
                          key=key) from exc


def _undecodable(raw: bytes, offset: int) -> str:
    """Where the byte at `offset` of `raw` is, for a person with an editor: ``byte 0xe9 at
    offset 38 (line 2, column 6)``, the column counted in bytes from 1."""
    line = raw.count(b"\n", 0, offset) + 1
    column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    return f"byte 0x{raw[offset]:02x} at offset {offset} (line {line}, column {column})"


def load(cls: type[T], path: Path | None, *, environ: Mapping[str, str] | None,
         overrides: Mapping[str, Any] | None, required: str, hint: str) -> T:
    """Defaults < TOML file < FEDASYNC_* environment < `overrides` (the CLI's flags), built
    into `cls`; `required` names the one setting with no default and `hint` how to give it.

    Each layer is checked on its own first, so an error says which one gave the bad value."""
    layers = [check_layer(cls, load_toml(path), source=f"config file {path}")]
    env, ignored = env_layer(cls, os.environ if environ is None else environ)
    if ignored:
        _log_ignored(cls, ignored)
    layers += [_log_level(env, f"{ENV_PREFIX}LOG_LEVEL"),
               check_layer(cls, overrides or {}, source="command line")]
    data = merge(*layers)
    if required not in data:
        raise ConfigError(f"no {required}: {hint}", key=required)
    return build(cls, data)


def check_layer(cls: type, data: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """`data` with every key known to `cls` and every value of its field's type (lists become
    tuples, integers in float fields floats); else a `ConfigError` that starts with `source`."""
    return _log_level(_check_table(cls, data, source=source, where=""), source)


def env_layer(cls: type, environ: Mapping[str, str], *, prefix: str = ENV_PREFIX
              ) -> tuple[dict[str, Any], list[str]]:
    """``FEDASYNC_A__B=v`` -> ``{"a": {"b": v}}`` with `v` converted by field ``a.b``'s type,
    plus the variables ignored because their first part names no field of `cls`."""
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(prefix) or len(name) == len(prefix):
            continue
        parts = name[len(prefix):].lower().split("__")
        node, table, where = out, cls, ""
        for depth, part in enumerate(parts):
            fields = _fields(table)
            key = _join(where, part)
            if part not in fields:
                if depth == 0:
                    ignored.append(name)
                    break
                raise ConfigError(f"{name}: unknown setting {key}{_did_you_mean(part, fields)}",
                                  key=key)
            hint, default = fields[part]
            if depth == len(parts) - 1:
                if isinstance(node.get(part), dict):
                    raise ConfigError(f"{name} conflicts with another FEDASYNC_ variable",
                                      key=name)
                node[part] = _from_env(hint, raw, name=name, key=key, default=default)
                break
            target = _dataclass_in(hint)
            if target is None:
                raise ConfigError(f"{name}: {key} is not a table, so it has no "
                                  f"{parts[depth + 1]}", key=key)
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name} conflicts with another FEDASYNC_ variable", key=name)
            node, table, where = child, target, key
    return out, ignored


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


def build(cls: type[T], data: Mapping[str, Any], *, where: str = "",
          source: str = DEFAULT_SOURCE) -> T:
    """Construct dataclass `cls` from plain data, recursing into dataclass-typed fields.

    Unknown keys and values of the wrong type are errors; lists become tuples; a dataclass
    with a ``parse`` classmethod also takes its text form (``staleness = "hinge:10,4"``); range
    checks are the dataclass's own ``__post_init__``.
    """
    return _construct(cls, _check_table(cls, data, source=source, where=where), where)


# ---------------------------------------------------------------------------- checking


def _check_table(cls: type, data: object, *, source: str, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where or 'config'} must be a table, got {_show(data)}",
                          key=where or None)
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(f"{source}: unknown setting {_join(where, unknown[0])}"
                          f"{_did_you_mean(unknown[0], fields)}{more}",
                          key=_join(where, unknown[0]))
    out: dict[str, Any] = {}
    for name, value in data.items():
        hint, default = fields[name]
        out[name] = _check_value(hint, value, key=_join(where, name), source=source,
                                 default=default)
    return out


def _check_value(hint: Any, value: object, *, key: str, source: str, default: object) -> Any:
    target = _dataclass_in(hint)
    if target is not None:
        if isinstance(value, Mapping):
            return _check_table(target, value, source=source, where=key)
        if isinstance(value, target) or (value is None and _optional(hint)):
            return value
        if isinstance(value, str) and hasattr(target, "parse"):
            return value  # its text form: parsed when built
        expected = "a table" + (" or its text form" if hasattr(target, "parse") else "")
        raise ConfigError(f"{source}: {key} must be {expected}, got {_show(value)}", key=key)
    ok, normal = _conform(hint, value)
    if not ok:
        raise ConfigError(f"{source}: {key} must be {_describe(hint)}"
                          f"{_example(hint, default)}, got {_show(value)}", key=key)
    return normal


def _conform(hint: Any, value: object) -> tuple[bool, Any]:
    """Whether `value` is of type `hint`, and the value normalised (lists -> tuples, int ->
    float for a float field). Types this loader does not know pass: their dataclass checks."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint)), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, normal = _conform(arg, value)
            if ok:
                return True, normal
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            return False, value
        items = []
        for arg, item in zip(args, value, strict=True):
            ok, normal = _conform(arg, item)
            if not ok:
                return False, value
            items.append(normal)
        return True, tuple(items)
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value


def _log_level(layer: dict[str, Any], source: str) -> dict[str, Any]:
    """Every service has ``log_level`` and applies it only once loaded, so a bad one would
    surface late (or never, for commands that do not log) and without its source: check here."""
    level = layer.get("log_level")
    if isinstance(level, str):
        try:
            layer["log_level"] = check_level(level)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}", key="log_level") from None
    return layer


# ---------------------------------------------------------------------------- environment


def _from_env(hint: Any, raw: str, *, name: str, key: str, default: object) -> Any:
    target = _dataclass_in(hint)
    if target is not None:
        if raw.strip().startswith("{"):  # a TOML inline table
            return _check_table(target, _toml_value(raw, name), source=name, where=key)
        if hasattr(target, "parse"):
            return raw
        first = dataclasses.fields(target)[0].name.upper()
        raise ConfigError(f"{name}: {key} is a table: set its keys one by one, e.g. "
                          f"{name}__{first}", key=key)
    value = _convert(hint, raw, name)
    ok, normal = _conform(hint, value)
    if not ok:
        raise ConfigError(f"{name}: {key} must be {_describe(hint)}"
                          f"{_example(hint, default)}, got {raw!r}", key=key)
    return normal


def _convert(hint: Any, raw: str, name: str) -> Any:
    """The environment's text as a value of type `hint`, or the text itself when it is not one
    (the type check then names the variable and the type)."""
    text = raw.strip()
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if not text and type(None) in args and str not in args:
            return None
        for arg in args:
            value = _convert(arg, raw, name)
            if _conform(arg, value)[0]:
                return value
        return raw
    if origin is Literal:
        return next((a for a in typing.get_args(hint) if str(a) == text), raw)
    if hint is bool:
        low = text.lower()
        return True if low in _TRUE else False if low in _FALSE else raw
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            return raw
    if origin is tuple:
        if text.startswith("["):
            return _toml_value(raw, name)
        args = typing.get_args(hint)
        parts = [p.strip() for p in text.split(",")] if text else []
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(parts)
        if len(args) != len(parts):
            return raw
        return tuple(_convert(a, p, name) for a, p in zip(args, parts, strict=True))
    if hint is str:
        return raw
    try:  # a type this loader does not know: read the text as TOML, else keep it
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _toml_value(raw: str, name: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not a valid TOML value ({exc}): {raw!r}", key=name) from exc


_reported: set[tuple[type, str]] = set()  # say it once per process, however often we load


def _log_ignored(cls: type, names: list[str]) -> None:
    service = cls.__name__.removesuffix("Config").lower() or cls.__name__
    fields = _fields(cls)
    quiet = []
    for name in names:  # one that looks like a typo of ours deserves a warning of its own
        if (cls, name) in _reported:
            continue
        _reported.add((cls, name))
        close = _closest(name[len(ENV_PREFIX):].lower(), fields)
        if close is None:
            quiet.append(name)
        else:
            log.warning("ignoring %s: not a setting of the %s (did you mean %s%s?)", name,
                        service, ENV_PREFIX, close.upper())
    if quiet:
        log.info("ignoring %s: %s of the %s (another service's?)", ", ".join(quiet),
                 "not settings" if len(quiet) > 1 else "not a setting", service)


# ---------------------------------------------------------------------------- building


def _construct(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    fields = _fields(cls)
    missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
               if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        key = _join(where, missing[0])
        raise ConfigError(f"{DEFAULT_SOURCE}: {key} is required ({_describe(fields[missing[0]][0])}"
                          f")", key=key)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = _join(where, name)
        target = _dataclass_in(fields[name][0])
        if target is not None and isinstance(value, Mapping):
            kwargs[name] = _construct(target, value, key)
        elif target is not None and isinstance(value, str):
            kwargs[name] = _parse(target, value, key)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if not where:
            raise
        raise ConfigError(f"[{where}] {exc}", key=exc.key) from exc
    except (FedAsyncError, TypeError, ValueError) as exc:
        raise ConfigError(f"{DEFAULT_SOURCE}: invalid {where or 'config'}: {exc}",
                          key=where or None) from exc


def _parse(target: type, text: str, key: str) -> Any:
    try:
        return target.parse(text)  # type: ignore[attr-defined]
    except (FedAsyncError, ValueError) as exc:
        raise ConfigError(f"{DEFAULT_SOURCE}: {key}: {exc}", key=key) from exc


# ---------------------------------------------------------------------------- helpers


def _fields(cls: type) -> dict[str, tuple[Any, object]]:
    """name -> (type hint, default or MISSING) of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default)
            for f in dataclasses.fields(cls)}


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in ``X`` or ``X | None``, if any."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _optional(hint: Any) -> bool:
    return (typing.get_origin(hint) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(hint))


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
_PLURALS = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}


def _describe(hint: Any) -> str:
    """`hint` in words, as TOML sees it: ``tuple[str, ...]`` is "an array of strings"."""
    origin = typing.get_origin(hint)
    if hint in _NAMES:
        return _NAMES[hint]
    if origin is Literal:
        return "one of " + ", ".join(_toml(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"an array of {_PLURALS.get(args[0], _describe(args[0]))}"
        if len(set(args)) == 1:
            return f"an array of {len(args)} {_PLURALS.get(args[0], _describe(args[0]))}"
        return f"an array of {len(args)} items ({', '.join(_describe(a) for a in args)})"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return getattr(hint, "__name__", str(hint))


def _example(hint: Any, default: object) -> str:
    """The default as an example, where the type's description does not already say it all."""
    if (default is dataclasses.MISSING or default is None or hint is bool
            or typing.get_origin(hint) is Literal):
        return ""
    return f" (e.g. {_toml(default)})"


_KINDS = ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
          ((list, tuple), "array"), (Mapping, "table"))


def _show(value: object) -> str:
    """A value as the user wrote it, with its TOML type: ``integer 1883``."""
    kind = next((name for t, name in _KINDS if isinstance(value, t)), type(value).__name__)
    text = _toml(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _did_you_mean(name: str, known: Mapping[str, object]) -> str:
    close = _closest(name, known)
    return f" (did you mean {close}?)" if close else ""


def _closest(name: str, known: Mapping[str, object]) -> str | None:
    import difflib  # only on an error: the agent starts without it

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return close[0] if close else None
