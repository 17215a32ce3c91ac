"""Settings: the one parser from plain dicts to the dataclasses that define every setting.

Each setting is defined once, as a dataclass field with its type, its default and a comment on why (the model's
in rgpt/nn/model.py, the data's in rgpt/data/dataset.py, training's in rgpt/training/settings.py, decoding's
in rgpt/inference/generate.py, each command's beside it). The entry points register those defaults with
Hydra (rgpt/cli/schema.py), so a YAML file only overrides them, and turn the composed config back into the
dataclasses here. Nothing below the entry points sees an omegaconf object.
"""

import dataclasses
import types
import typing
from functools import cache


class ConfigError(Exception):
    """A bad configuration value; the message is one line naming the key."""


def check(ok: bool, key: str, value, why: str) -> None:
    """ConfigError("key=value: why") unless ok."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


FLAT = {"flat": True}  # field metadata: the dataclass's own keys sit beside its parent's (chat's `method=`)
INTERNAL = {"internal": True}  # field metadata: set by the program, never by a config file or command line


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _kind(tp) -> tuple[object, bool]:
    """(the type, whether None is allowed) of an annotation such as `int | None`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


WORDS = {int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "a group"}


def _coerce(value, tp, key: str):
    """value as annotation tp: numbers as the declared kind, text as str; ConfigError if it cannot be."""
    tp, optional = _kind(tp)
    origin = typing.get_origin(tp) or tp
    name = WORDS.get(origin, getattr(origin, "__name__", str(origin)))
    try:
        if optional and isinstance(value, str) and value.strip().lower() in ("null", "none"):
            value = None  # a value typed in a chat's /set
        if value is None:
            if optional or origin not in (int, float, bool):
                return None
            raise ValueError  # e.g. train.batch_size=null
        if origin in (int, float) and isinstance(value, bool):
            raise ValueError  # e.g. train.batch_size=true
        if origin is int:
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if origin is float:
            return float(value)
        if origin is bool and not isinstance(value, bool):
            raise ValueError
        if origin is str:
            return str(value)  # prompt=123 arrives as an int
        if origin is list and not isinstance(value, list):
            raise ValueError
        if origin is dict and not isinstance(value, dict):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}={value!r} is not {name}") from None
    return value


def _keys(cls) -> dict[str, str]:
    """{key as written: field name}: a flat field's own keys stand in for it."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if f.metadata.get("flat"):
            out.update(dict.fromkeys(_keys(_hints(cls)[f.name]), f.name))
        else:
            out[f.name] = f.name
    return out


def parse(cls, d: dict, prefix: str = ""):
    """Build dataclass `cls` from dict `d`: unknown keys refused, values coerced to the declared types,
    nested dataclasses from nested dicts, missing keys at their defaults. The checks of the values are the
    dataclass's own (its validate()), called by whoever holds the whole config."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a group of settings, got {d!r}")
    keys = _keys(cls)
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(keys))})")
    hints, kwargs = _hints(cls), {}
    for f in dataclasses.fields(cls):
        tp = _kind(hints[f.name])[0]
        if f.metadata.get("flat"):
            kwargs[f.name] = parse(tp, {k: v for k, v in d.items() if keys[k] == f.name}, prefix)
        elif f.name not in d:
            continue
        elif dataclasses.is_dataclass(tp):
            kwargs[f.name] = parse(tp, d[f.name] or {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(d[f.name], hints[f.name], prefix + f.name)
    return cls(**kwargs)


def load(cls, d: dict):
    """parse(cls, d), then the dataclass's own checks (its validate(), where it has one)."""
    out = parse(cls, d)
    return out.validate() if hasattr(out, "validate") else out


def defaults(cls) -> dict:
    """Every key of `cls` with its default, as nested dicts (flat fields' keys beside their parent's,
    internal ones left out): what rgpt/cli/schema.py hands Hydra to compose the YAML files over."""
    out, example = {}, cls()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        value = getattr(example, f.name)
        if f.metadata.get("flat"):
            out.update(defaults(type(value)))
        elif dataclasses.is_dataclass(value):
            out[f.name] = defaults(type(value))
        else:
            out[f.name] = value
    return out
