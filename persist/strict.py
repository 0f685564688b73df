"""Frozen dataclasses from plain data (YAML, JSON), strictly. Standard library only.

An unknown key, a missing required key or a value of the wrong type raises `ConfigError` naming the dotted path of
the bad key (`train.lrr`), with "did you mean" when a field is spelt alike, so a typo never silently falls back to a
default. Values in messages are shown with a bounded repr: a config file cannot make an error message (and the
memory it takes) grow with the data it holds, however large or self-referencing that is.

    cfg = dataclass_from_dict(TrainConfig, {"steps": 10, "lrr": 1e-3}, source="run.yaml", prefix="train")
    # ConfigError: run.yaml: unknown config key 'train.lrr' (did you mean 'train.lr'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import reprlib
import types
import typing
from typing import Any, Iterable, TypeVar, Union

T = TypeVar("T")

MAX_REPR = 80      # characters of a value shown in an error message
MAX_MESSAGE = 400  # characters of a dataclass's own validation message kept in ours
# Keys diffusers writes into every config.json that say nothing about the network.
DIFFUSERS_METADATA = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


class ConfigError(ValueError):
    """Data (a config file, an override) that does not match the dataclasses."""


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict = 3, 6, 6, 6
_repr.maxstring = _repr.maxother = _repr.maxlong = MAX_REPR


def bounded_repr(value: Any, limit: int = MAX_REPR) -> str:
    """repr(value) in at most about `limit` characters, built without ever formatting all of `value` (reprlib stops
    at a few items per level and a few levels deep), so that a billion-laughs list costs nothing to show."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dataclass_from_dict(cls: type[T], data: Any, *, source: str = "", prefix: str = "",
                        ignore: Iterable[str] = ()) -> T:
    """Build the (nested, frozen) dataclass `cls` from plain data, strictly.

    Lists become tuples where a field is typed so; a float field accepts what float() accepts (YAML 1.1 reads `2e-4`
    as a string). Keys in `ignore` are dropped at the top level (metadata another library writes). Unknown keys,
    missing required keys, values of the wrong type and values the dataclass's own checks reject raise `ConfigError`
    naming the dotted key (under `prefix`), preceded by `source` (the file) when given.
    """
    if isinstance(data, dict) and ignore:
        data = {k: v for k, v in data.items() if k not in set(ignore)}
    try:
        return _convert(cls, data, prefix)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def dataclass_from_diffusers_config(cls: type[T], data: Any, class_name: str, *, source: str = "") -> T:
    """The content of a diffusers model's `config.json` as `cls`, the dataclass of that model's init arguments.

    diffusers' metadata keys (`DIFFUSERS_METADATA`) are ignored and missing keys take the dataclass's defaults (which
    are diffusers'); another `_class_name` than `class_name` is refused, the rest as `dataclass_from_dict`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: must hold a JSON object, got {type(data).__name__}")
    if data.get("_class_name", class_name) != class_name:
        raise ConfigError(f"{source or 'config'}: _class_name is {bounded_repr(data['_class_name'])}, "
                          f"expected {class_name!r}")
    return dataclass_from_dict(cls, data, source=source, ignore=DIFFUSERS_METADATA)


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass `obj` as plain YAML/JSON-able data (tuples become lists)."""
    return _plain(dataclasses.asdict(obj))


def _convert(tp: Any, value: Any, path: str) -> Any:
    where = path or "<root>"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {bounded_repr(value)} matches none of {tp}: {'; '.join(errors)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {bounded_repr(value)}")
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {bounded_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {bounded_repr(value)}")
        return value
    if tp is float:
        # YAML 1.1 reads `2e-4` (no dot) as a string; accept anything float() accepts.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {bounded_repr(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {bounded_repr(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {bounded_repr(value)}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _convert_dataclass(cls: type, value: Any, path: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {bounded_repr(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key)[:MAX_REPR], fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{_bounded_text(str(key))}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        # The dataclass's own check formats its values as it likes: keep the message, bounded.
        raise ConfigError(f"{path or cls.__name__}: {_bounded_text(str(e), MAX_MESSAGE)}") from None


def _bounded_text(text: str, limit: int = MAX_REPR) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
