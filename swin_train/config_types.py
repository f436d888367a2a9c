"""Plain data -> typed dataclasses, for the config: each value checked against its field's annotation
(int, float, bool, str, lists of them, `X | None`), with one-line messages that name the key, where it was
set, and for an unknown key the likeliest intended one. Knows nothing of Swin: `config.py` holds the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any

from swin_train.errors import ConfigError


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields (cached: the schema does not change)."""
    return typing.get_type_hints(cls)


def field_type(root: type, dotted: str) -> Any:
    """The annotation of a dotted key under the dataclass `root` (None for an unknown key)."""
    cls: Any = root
    for part in dotted.split("."):
        hints = field_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def with_origin(where: str | None, msg: str) -> str:
    """`msg` prefixed with where its value was set ('configs/x.yaml:12', 'override ...'), when known."""
    return f"{where}: {msg}" if where else msg


def _closest(word: str, words: list[str]) -> str | None:
    close = difflib.get_close_matches(word, words, n=1)
    return close[0] if close else None


def _unknown_key(root: type, key: str) -> str:
    """'unknown key ...' with the likeliest intended key, else the keys that exist at that level."""
    known = all_keys(root)
    top = [k for k in known if "." not in k]
    section, _, leaf = key.rpartition(".")
    here = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
    by_leaf = {k.rpartition(".")[2]: k for k in reversed(known)}  # leaf -> first full key with it

    guess = by_leaf.get(leaf)  # the right name in the wrong place: 'epochs' -> 'train.epochs'
    if guess is None and _closest(leaf, here):  # a misspelling at this level: 'train.epoch'
        guess = f"{section}.{_closest(leaf, here)}" if section else _closest(leaf, here)
    if guess is None and _closest(leaf, list(by_leaf)):  # both: 'train.batchsize' -> 'data.batch_size'
        guess = by_leaf[_closest(leaf, list(by_leaf))]
    if guess is None and section and section not in top:  # a misspelt section: 'trian.x' -> 'train'
        guess = _closest(section, top)
    if guess is not None:
        return f"unknown key '{key}'; did you mean '{guess}'?"
    if section in top:
        return f"unknown key '{key}'; known keys in '{section}': {', '.join(here)}"
    return f"unknown key '{key}'; known keys: {', '.join(top)}"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        null = " or null" if type(None) in typing.get_args(tp) else ""
        return " or ".join(_describe(a) for a in inner) + null
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return {int: "an int", float: "a float", bool: "a bool", str: "a str"}[tp]


def coerce(value: Any, tp: Any, key: str, where: str | None) -> Any:
    """Check `value` against the annotation `tp`; ints become floats for float fields, tuples lists."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner:  # `bool | str`: the first type that takes the value
            try:
                return coerce(value, option, key, where)
            except ConfigError:
                if typing.get_origin(option) is list and isinstance(value, (list, tuple)):
                    raise  # a bad element: keep its precise message
        raise ConfigError(with_origin(where, f"{key} must be {_describe(tp)}, got {describe_value(value)}"))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                with_origin(where, f"{key} must be {_describe(tp)}, got {describe_value(value)}")
            )
        item = typing.get_args(tp)[0]
        return [coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(with_origin(where, f"{key} must be {_describe(tp)}, got {describe_value(value)}"))
    return float(value) if tp is float else value


def describe_value(value: Any) -> str:
    """A value as a message shows it: its type and (shortened) repr, or null."""
    return "null" if value is None else f"{type(value).__name__} {shorten(repr(value))}"


def shorten(text: str, limit: int = 80) -> str:
    """`text` shortened for a one-line message (a value may be huge)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_typed(root: type, data: Any, origins: dict[str, str]) -> Any:
    """The dataclass `root` from plain data (nested mappings for nested dataclasses), every value checked
    against its annotation; a ConfigError names the key and, from `origins`, where it was set."""
    return _build(root, root, data, "", origins)


def _build(root: type, cls: type, data: Any, prefix: str, origins: dict[str, str]) -> Any:
    if not isinstance(data, dict):
        key = prefix.rstrip(".") or "the config"
        raise ConfigError(
            with_origin(origins.get(key), f"{key} must be a mapping of keys, got {describe_value(data)}")
        )
    hints = field_hints(cls)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in hints:
            while isinstance(v, dict) and v:  # name the full key: 'trian.epochs', not 'trian'
                k, v = next(iter(v.items()))
                key = f"{key}.{k}"
            raise ConfigError(with_origin(origins.get(key), _unknown_key(root, key)))
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build(root, hints[k], v, key + ".", origins)
        else:
            kwargs[k] = coerce(v, hints[k], key, origins.get(key))
    return cls(**kwargs)


def plain_data(x: Any) -> Any:
    """`x` with tuples as lists and every mapping key a str: what YAML and a checkpoint hold."""
    if isinstance(x, dict):
        return {str(k): plain_data(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_data(v) for v in x]
    return x


def all_keys(root: type) -> list[str]:
    """Every dotted key of the dataclass `root` and its dataclass fields (e.g. 'train', 'train.epochs')."""
    keys = []
    for f in dataclasses.fields(root):
        keys.append(f.name)
        if dataclasses.is_dataclass(field_hints(root)[f.name]):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(field_hints(root)[f.name])]
    return keys
