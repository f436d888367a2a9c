"""Reading YAML recipes: a file with its `_base_` files merged under it, the `file:line` every key came from
(so a config error can point at it), dotted `key=value` overrides, and the dumper that writes a config back.
YAML aliases are refused; `5e-4` reads as a float.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from typing import Any

import yaml

from swin_train.config_types import shorten
from swin_train.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20
_NON_FINITE = ("inf", "+inf", "-inf", "infinity", "-infinity", "nan")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `5e-4` as a float (YAML 1.1 needs `5.0e-4`, a classic recipe trap)."""


_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] != "tag:yaml.org,2002:float"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline (`depths: [2, 2, 6, 2]`), like the recipes in configs/."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return ConfigError(f"{where}{line}: invalid YAML: {problem}")


def _read_yaml(path: str) -> tuple[dict, dict[str, str]]:
    """One file -> (data, origins: dotted key -> 'path:line'). Duplicate keys are errors."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: '{path}'")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{path}': {e}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file '{path}' is {len(text)} bytes; a recipe is at most {MAX_CONFIG_BYTES}"
        )
    try:
        _reject_aliases(text, path)
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    origins: dict[str, str] = {}
    _walk_marks(node, "", path, origins)
    return data, origins


def _reject_aliases(text: str, where: str) -> None:
    """Refuse YAML aliases (`*name`): nested anchors expand exponentially (an "alias bomb") and a recipe
    never needs them (`_base_` files share settings instead)."""
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(
                f"{where}:{event.start_mark.line + 1}: YAML aliases (*{shorten(event.anchor, 20)}) are not "
                "supported in configs; write the value out or share it with _base_"
            )


def _walk_marks(node: yaml.Node, prefix: str, path: str, origins: dict[str, str]) -> None:
    seen = set()
    for key_node, value_node in node.value:
        key = prefix + str(key_node.value)
        where = f"{path}:{key_node.start_mark.line + 1}"
        if key in seen:
            raise ConfigError(f"{where}: duplicate key '{key}'")
        seen.add(key)
        origins[key] = where
        if isinstance(value_node, yaml.MappingNode):
            _walk_marks(value_node, key + ".", path, origins)


def load_tree(path: str, stack: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    """A file with its `_base_` files merged under it (bases first, in order)."""
    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join(os.path.basename(p) for p in (*stack, real))
        raise ConfigError(f"{path}: _base_ inheritance cycle: {chain}")
    data, origins = _read_yaml(path)
    bases = data.pop("_base_", None)
    if bases is None:
        return data, origins
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{origins['_base_']}: _base_ must be a file name or a list of file names")
    merged: dict = {}
    merged_origins: dict[str, str] = {}
    for base in bases:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"{origins['_base_']}: _base_ file not found: '{base_path}'")
        base_data, base_origins = load_tree(base_path, (*stack, real))
        deep_merge(merged, base_data)
        _update_origins(merged_origins, base_origins)
    deep_merge(merged, data)
    _update_origins(merged_origins, origins)
    merged_origins.pop("_base_")
    return merged, merged_origins


def _update_origins(dst: dict[str, str], src: dict[str, str]) -> None:
    for k, v in src.items():
        dst.pop(k, None)
        dst[k] = v


def deep_merge(dst: dict, src: dict) -> dict:
    """Deep merge of mappings (sections); any other value (lists included) replaces the old one."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def record_origin(origins: dict[str, str], key: str, value: Any, label: str) -> None:
    """Remember where `key` (and every key inside it, for a mapping value) was last set."""
    origins.pop(key, None)  # re-insert: the order of `origins` is the order keys were last set
    origins[key] = label
    if isinstance(value, dict):
        for k, v in value.items():
            record_origin(origins, f"{key}.{k}", v, label)


def nested(dotted: str, value: Any) -> dict:
    """`a.b.c`, v -> {'a': {'b': {'c': v}}}."""
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def parse_override(item: str, field_type: Callable[[str], Any]) -> tuple[str, Any]:
    """`key=value` -> (key, value parsed as YAML); `field_type(key)` is the key's annotation, which decides
    whether `2024` is text and `inf` a number."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{shorten(item)}' must look like key=value, e.g. train.epochs=10")
    try:
        _reject_aliases(text, f"override '{shorten(item)}'")
        value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override '{shorten(item)}': cannot parse the value: {problem}") from None
    # For text fields, `output=2024` or `data.data_path=on` mean the text, not a number or a bool.
    if isinstance(value, (bool, int, float)) and field_type(key) in (str, str | None):
        value = text.strip()
    # For number fields, `inf` and `nan` are numbers (the range checks then say why they are refused).
    if isinstance(value, str) and value.lower() in _NON_FINITE and field_type(key) in (float, float | None):
        value = float(value)
    return key, value


def dump_yaml(data: dict) -> str:
    """YAML text of plain config data, sections as blocks and lists inline, in the given key order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
