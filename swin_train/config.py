"""Typed configuration: dataclasses, YAML recipes with `_base_` inheritance, dotted overrides, validation.

Order of precedence (later wins): dataclass defaults < `_base_` files < the YAML file < CLI shortcuts
(`data_path`, `output`, `batch_size`) < dotted overrides (`train.epochs=10`).

    cfg = load_config("configs/swin_tiny_patch4_window7_224.yaml", ["train.epochs=10"], data_path="/data")
    model = SwinTransformer(**cfg.model_kwargs())

Every user mistake raises a one-line `ConfigError` that names the key and, where known, the file and line
(`configs/x.yaml:12: ...`) or the override it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from swin_train.errors import ConfigError
from swin_train.models.registry import VARIANTS, variant_arch
from swin_train.models.swin import ATTENTION_BACKENDS

# Architecture used for fields left None when model.name is not given: Swin-T.
SWIN_T_ARCH: dict[str, Any] = dict(
    patch_size=4, in_chans=3, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7
)
ARCH_FIELDS = tuple(SWIN_T_ARCH)

AMP_MODES = ("auto", "bf16", "fp16", "none")
AMP_ALIASES = {"fp32": "none", "float32": "none", "off": "none", "bfloat16": "bf16", "float16": "fp16"}
DATASETS = ("imagefolder", "shapes")
BEST_ON = ("raw", "ema")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")  # timm's PIL names
MIXUP_MODES = ("batch", "pair", "elem")  # timm.data.Mixup
RE_MODES = ("pixel", "rand", "const")  # timm.data.RandomErasing

# keyword arguments of load_config -> the dotted key they set
CLI_SHORTCUTS = {"data_path": "data.data_path", "output": "output", "batch_size": "data.batch_size"}


@dataclass
class ModelConfig:
    name: str | None = None  # registry variant; fills the architecture fields left None
    patch_size: int | None = None
    in_chans: int | None = None
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    window_size: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ape: bool = False
    patch_norm: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    num_classes: int = 1000
    grad_checkpointing: bool = False
    # "auto": scaled_dot_product_attention on CUDA, the same math written out on CPU; "flex": FlexAttention
    # (bias and shift mask inside the kernel): training needs a CUDA GPU of compute capability 8.0+,
    # evaluation and prediction elsewhere fall back to "auto"
    attention: str = "auto"
    pretrained: str | None = None
    head_map: str | None = None


@dataclass
class DataConfig:
    data_path: str | None = None
    dataset: str = "imagefolder"  # "imagefolder" | "shapes" (the generated quick-start set)
    synthetic: bool = False  # in-memory random tensors, no decoding (benchmarks)
    img_size: int = 224  # the single source of the image size
    batch_size: int = 128  # per process
    num_workers: int = 8
    pin_memory: bool = True
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_STD))
    skip_bad_images: bool = False


@dataclass
class TrainConfig:
    epochs: int = 300
    warmup_epochs: int = 20
    base_lr: float = 5e-4  # learning rates are quoted for a global batch of lr_base_batch
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_base_batch: int = 512
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = 5.0  # None: no clipping
    accumulation_steps: int = 1
    layer_decay: float = 1.0
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 25
    compile: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = False
    ema_every: int = 1
    best_on: str = "raw"  # "raw" | "ema"


@dataclass
class AugConfig:
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    hflip: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1


@dataclass
class EvalConfig:
    crop_pct: float = 0.875
    batch_size: int | None = None  # None: data.batch_size


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    amp: str = "auto"  # "auto" (bf16 where supported, resolved at run time) | "bf16" | "fp16" | "none"
    seed: int = 0
    output: str = "output/run"
    save_freq: int = 1
    print_freq: int = 50

    def model_kwargs(self) -> dict[str, Any]:
        """Exactly the keyword arguments of `SwinTransformer(...)` (architecture resolved from model.name)."""
        m, arch = self.model, _resolved_arch(self.model)
        return dict(
            img_size=self.data.img_size,
            patch_size=arch["patch_size"],
            in_chans=arch["in_chans"],
            num_classes=m.num_classes,
            embed_dim=arch["embed_dim"],
            depths=list(arch["depths"]),
            num_heads=list(arch["num_heads"]),
            window_size=arch["window_size"],
            mlp_ratio=m.mlp_ratio,
            qkv_bias=m.qkv_bias,
            drop_rate=m.drop_rate,
            attn_drop_rate=m.attn_drop_rate,
            drop_path_rate=m.drop_path_rate,
            ape=m.ape,
            patch_norm=m.patch_norm,
            grad_checkpointing=m.grad_checkpointing,
            attention=m.attention,
        )


# --------------------------------------------------------------------------------------------------
# Public API


def load_config(
    path: str | os.PathLike | None,
    overrides: typing.Iterable[str] = (),
    *,
    base: dict | None = None,
    **cli: Any,
) -> Config:
    """Load a YAML recipe (None: `base`, a plain config dict such as a checkpoint's, or the defaults), apply
    CLI shortcuts, then dotted overrides; validate."""
    if path is None:
        data, origins = copy.deepcopy(base or {}), {}
    else:
        data, origins = _load_tree(os.fspath(path), ())
    for name, value in cli.items():
        if name not in CLI_SHORTCUTS:
            raise TypeError(f"load_config() got an unexpected keyword argument '{name}'")
        if value is not None:
            key = CLI_SHORTCUTS[name]
            _merge(data, _nest(key, value))
            _record(origins, key, value, f"command line {name}={value!r}")
    for item in overrides:
        key, value = _parse_override(item)
        _merge(data, _nest(key, value))
        _record(origins, key, value, f"override '{item}'")
    return _from_dict(data, origins)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from plain data (e.g. stored in a checkpoint); missing keys take defaults."""
    return _from_dict(copy.deepcopy(d), {})


def config_to_dict(cfg: Config) -> dict:
    """Plain Python types only (str/int/float/bool/None/list/dict), in field order."""
    return _plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    """YAML text that `load_config` reads back to an equal Config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def validate(cfg: Config) -> Config:
    """Fill None architecture fields from model.name (or Swin-T), then check every field; returns cfg."""
    _fill_architecture(cfg)
    _validate(cfg, {})
    return cfg


def all_keys() -> list[str]:
    """Every dotted key the schema knows, sections included (e.g. 'train', 'train.epochs')."""
    keys = []
    for f in dataclasses.fields(Config):
        keys.append(f.name)
        if dataclasses.is_dataclass(_hints(Config)[f.name]):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(_hints(Config)[f.name])]
    return keys


# --------------------------------------------------------------------------------------------------
# YAML reading


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
    try:
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


def _load_tree(path: str, stack: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
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
        base_data, base_origins = _load_tree(base_path, (*stack, real))
        _merge(merged, base_data)
        _update_origins(merged_origins, base_origins)
    _merge(merged, data)
    _update_origins(merged_origins, origins)
    merged_origins.pop("_base_")
    return merged, merged_origins


def _update_origins(dst: dict[str, str], src: dict[str, str]) -> None:
    for k, v in src.items():
        dst.pop(k, None)
        dst[k] = v


def _merge(dst: dict, src: dict) -> dict:
    """Deep merge of mappings (sections); any other value (lists included) replaces the old one."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _record(origins: dict[str, str], key: str, value: Any, label: str) -> None:
    """Remember where `key` (and every key inside it, for a mapping value) was last set."""
    origins.pop(key, None)  # re-insert: the order of `origins` is the order keys were last set
    origins[key] = label
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origins, f"{key}.{k}", v, label)


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.epochs=10")
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override '{item}': cannot parse the value: {problem}") from None
    # For text fields, `output=2024` or `data.data_path=on` mean the text, not a number or a bool.
    if isinstance(value, (bool, int, float)) and _field_type(key) in (str, str | None):
        value = text.strip()
    return key, value


# --------------------------------------------------------------------------------------------------
# Building and type checking


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_type(dotted: str) -> Any:
    cls: Any = Config
    for part in dotted.split("."):
        hints = _hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _at(where: str | None, msg: str) -> str:
    return f"{where}: {msg}" if where else msg


def _closest(word: str, words: list[str]) -> str | None:
    close = difflib.get_close_matches(word, words, n=1)
    return close[0] if close else None


def _unknown_key(key: str) -> str:
    """'unknown key ...' with the likeliest intended key, else the keys that exist at that level."""
    known = all_keys()
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
        return " or ".join(_describe(a) for a in inner) + " or null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return {int: "an int", float: "a float", bool: "a bool", str: "a str"}[tp]


def _coerce(value: Any, tp: Any, key: str, where: str | None) -> Any:
    """Check `value` against the annotation `tp`; ints become floats for float fields, tuples lists."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner, key, where)
        except ConfigError:
            if typing.get_origin(inner) is list and isinstance(value, (list, tuple)):
                raise  # a bad element: keep its precise message
            raise ConfigError(_at(where, f"{key} must be {_describe(tp)}, got {_show(value)}")) from None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(_at(where, f"{key} must be {_describe(tp)}, got {_show(value)}"))
        item = typing.get_args(tp)[0]
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(_at(where, f"{key} must be {_describe(tp)}, got {_show(value)}"))
    return float(value) if tp is float else value


def _show(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _build(cls: type, data: Any, prefix: str, origins: dict[str, str]) -> Any:
    if not isinstance(data, dict):
        key = prefix.rstrip(".") or "the config"
        raise ConfigError(_at(origins.get(key), f"{key} must be a mapping of keys, got {_show(data)}"))
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in hints:
            while isinstance(v, dict) and v:  # name the full key: 'trian.epochs', not 'trian'
                k, v = next(iter(v.items()))
                key = f"{key}.{k}"
            raise ConfigError(_at(origins.get(key), _unknown_key(key)))
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build(hints[k], v, key + ".", origins)
        else:
            kwargs[k] = _coerce(v, hints[k], key, origins.get(key))
    return cls(**kwargs)


def _from_dict(data: Any, origins: dict[str, str]) -> Config:
    cfg = _build(Config, data, "", origins)
    _fill_architecture(cfg, origins)
    _validate(cfg, origins)
    return cfg


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------------
# Architecture resolution and validation


def _resolved_arch(m: ModelConfig, origins: dict[str, str] | None = None) -> dict[str, Any]:
    """Architecture fields with None taken from the named variant (or Swin-T); does not mutate `m`."""
    if m.name is not None:
        try:
            src = {"in_chans": 3, **variant_arch(m.name)}
        except KeyError as e:
            raise ConfigError(_at((origins or {}).get("model.name"), f"model.name: {e.args[0]}")) from None
    else:
        src = SWIN_T_ARCH
    out = {}
    for f in ARCH_FIELDS:
        v = getattr(m, f)
        out[f] = (list(src[f]) if isinstance(src[f], (list, tuple)) else src[f]) if v is None else v
    return out


def _fill_architecture(cfg: Config, origins: dict[str, str] | None = None) -> None:
    for f, v in _resolved_arch(cfg.model, origins).items():
        setattr(cfg.model, f, v)


def _window_hint(res: list[int], window: int, unit: int) -> str:
    """Suggest the valid window closest to `window` (ties: larger), and the image sizes that keep it."""

    def fits(w: int) -> bool:
        return all(r <= w or r % w == 0 for r in res)

    cands = [w for w in range(2, max(res) + 1) if fits(w)]
    best = min(cands, key=lambda w: (abs(w - window), -w)) if cands else max(res)
    return f"use model.window_size={best} or a data.img_size that is a multiple of {unit * window}"


def _check_architecture(cfg: Config, where: typing.Callable[..., str | None]) -> None:
    m, img = cfg.model, cfg.data.img_size

    def fail(keys: str | tuple[str, ...], msg: str) -> typing.NoReturn:
        raise ConfigError(_at(where(*([keys] if isinstance(keys, str) else keys)), msg))

    for key in ("patch_size", "in_chans", "embed_dim", "window_size"):
        if getattr(m, key) < 1:
            fail((f"model.{key}", "model.name"), f"model.{key} must be >= 1, got {getattr(m, key)}")
    if not m.depths or any(d < 1 for d in m.depths):
        fail("model.depths", f"model.depths must be a non-empty list of ints >= 1, got {m.depths}")
    if any(h < 1 for h in m.num_heads):
        fail("model.num_heads", f"model.num_heads must be ints >= 1, got {m.num_heads}")
    if len(m.depths) != len(m.num_heads):
        fail(
            ("model.num_heads", "model.depths"),
            f"model.num_heads has {len(m.num_heads)} entries but model.depths has {len(m.depths)} stages; "
            "give one head count per stage",
        )
    for i, h in enumerate(m.num_heads):
        dim = m.embed_dim * 2**i
        if dim % h:
            fail(
                ("model.num_heads", "model.embed_dim"),
                f"model.num_heads[{i}]={h} does not divide stage {i} width {dim} "
                f"(model.embed_dim={m.embed_dim} * 2**{i}); use a divisor of {dim}",
            )
    if img % m.patch_size:
        fail(
            ("data.img_size", "model.patch_size"),
            f"data.img_size={img} is not divisible by model.patch_size={m.patch_size}",
        )
    res = [img // m.patch_size]  # side of the token grid per stage
    for i in range(len(m.depths) - 1):
        if res[i] % 2:
            fail(
                ("data.img_size", "model.patch_size", "model.depths"),
                f"stage {i} resolution {res[i]}x{res[i]} (data.img_size={img} / model.patch_size="
                f"{m.patch_size} / 2**{i}) is odd and cannot be patch-merged; use a data.img_size that is "
                f"a multiple of {m.patch_size * 2 ** (len(m.depths) - 1)}",
            )
        res.append(res[i] // 2)
    # Swin's window rule: a stage no larger than the window uses one window of its own size (no shift);
    # a larger stage must tile into whole windows.
    for i, r in enumerate(res):
        if r > m.window_size and r % m.window_size:
            hint = _window_hint(res, m.window_size, m.patch_size * 2 ** (len(res) - 1))
            built = VARIANTS.get(m.name or "", {}).get("img_size")
            if built is not None and built != img:
                hint += f" (model.name '{m.name}' is built for data.img_size={built})"
            fail(
                ("model.window_size", "data.img_size", "model.patch_size", "model.depths", "model.name"),
                f"model.window_size={m.window_size} does not tile stage {i} (resolution {r}x{r} for "
                f"data.img_size={img}, model.patch_size={m.patch_size}); {hint}",
            )


def _validate(cfg: Config, origins: dict[str, str]) -> None:
    """Cross-field and range checks on a built, architecture-resolved Config."""

    order = {k: i for i, k in enumerate(origins)}

    def where(*keys: str) -> str | None:
        """Origin of the most recently set of `keys` (the likely culprit of a cross-field error)."""
        known = [k for k in keys if k in origins]
        return origins[max(known, key=order.__getitem__)] if known else None

    # Re-check types: a Config built in Python (not from YAML) may hold anything.
    for section in ("model", "data", "train", "aug", "eval"):
        sub = getattr(cfg, section)
        for f, tp in _hints(type(sub)).items():
            setattr(sub, f, _coerce(getattr(sub, f), tp, f"{section}.{f}", where(f"{section}.{f}")))
    for f, tp in _hints(Config).items():
        if not dataclasses.is_dataclass(tp):
            setattr(cfg, f, _coerce(getattr(cfg, f), tp, f, where(f)))

    m, d, t, a, e = cfg.model, cfg.data, cfg.train, cfg.aug, cfg.eval
    for key, value, choices in (
        ("amp", cfg.amp, AMP_MODES),
        ("model.attention", m.attention, ATTENTION_BACKENDS),
        ("data.dataset", d.dataset, DATASETS),
        ("data.interpolation", d.interpolation, INTERPOLATIONS),
        ("train.best_on", t.best_on, BEST_ON),
        ("aug.mixup_mode", a.mixup_mode, MIXUP_MODES),
        ("aug.remode", a.remode, RE_MODES),
    ):
        if value not in choices:
            close = [AMP_ALIASES[value.lower()]] if key == "amp" and value.lower() in AMP_ALIASES else []
            close = close or difflib.get_close_matches(value, choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            options = ", ".join(repr(c) for c in choices)
            raise ConfigError(_at(where(key), f"{key} must be one of {options}, got {value!r}{hint}"))

    def positive(x: float) -> bool:
        return x > 0

    def non_negative(x: float) -> bool:
        return x >= 0

    def at_least_one(x: int) -> bool:
        return x >= 1

    def prob(x: float) -> bool:
        return 0 <= x <= 1

    def drop(x: float) -> bool:
        return 0 <= x < 1

    rules: list[tuple[str, Any, typing.Callable[[Any], bool], str]] = [
        ("model.mlp_ratio", m.mlp_ratio, positive, "> 0"),
        ("model.drop_rate", m.drop_rate, drop, "in [0, 1)"),
        ("model.attn_drop_rate", m.attn_drop_rate, drop, "in [0, 1)"),
        ("model.drop_path_rate", m.drop_path_rate, drop, "in [0, 1)"),
        ("model.num_classes", m.num_classes, at_least_one, ">= 1"),
        ("data.img_size", d.img_size, at_least_one, ">= 1"),
        ("data.batch_size", d.batch_size, at_least_one, ">= 1"),
        ("data.num_workers", d.num_workers, non_negative, ">= 0"),
        ("train.epochs", t.epochs, at_least_one, ">= 1"),
        ("train.warmup_epochs", t.warmup_epochs, non_negative, ">= 0"),
        ("train.base_lr", t.base_lr, positive, "> 0"),
        ("train.warmup_lr", t.warmup_lr, non_negative, ">= 0"),
        ("train.min_lr", t.min_lr, non_negative, ">= 0"),
        ("train.lr_base_batch", t.lr_base_batch, at_least_one, ">= 1"),
        ("train.weight_decay", t.weight_decay, non_negative, ">= 0"),
        ("train.eps", t.eps, positive, "> 0"),
        ("train.accumulation_steps", t.accumulation_steps, at_least_one, ">= 1"),
        ("train.layer_decay", t.layer_decay, lambda x: 0 < x <= 1, "in (0, 1]"),
        ("train.checkpoint_every_steps", t.checkpoint_every_steps, non_negative, ">= 0 (0: epoch ends only)"),
        ("train.keep_checkpoints", t.keep_checkpoints, at_least_one, ">= 1"),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps, at_least_one, ">= 1"),
        ("train.ema_decay", t.ema_decay, lambda x: 0 < x < 1, "in (0, 1)"),
        ("train.ema_every", t.ema_every, at_least_one, ">= 1"),
        ("aug.color_jitter", a.color_jitter, non_negative, ">= 0"),
        ("aug.reprob", a.reprob, prob, "in [0, 1]"),
        ("aug.recount", a.recount, at_least_one, ">= 1"),
        ("aug.hflip", a.hflip, prob, "in [0, 1]"),
        ("aug.mixup", a.mixup, non_negative, ">= 0 (a Beta alpha; 0 disables)"),
        ("aug.cutmix", a.cutmix, non_negative, ">= 0 (a Beta alpha; 0 disables)"),
        ("aug.mixup_prob", a.mixup_prob, prob, "in [0, 1]"),
        ("aug.mixup_switch_prob", a.mixup_switch_prob, prob, "in [0, 1]"),
        ("aug.label_smoothing", a.label_smoothing, drop, "in [0, 1)"),
        ("eval.crop_pct", e.crop_pct, lambda x: 0 < x <= 1, "in (0, 1]"),
        ("seed", cfg.seed, non_negative, ">= 0"),
        ("save_freq", cfg.save_freq, at_least_one, ">= 1"),
        ("print_freq", cfg.print_freq, at_least_one, ">= 1"),
    ]
    if t.clip_grad is not None:
        rules.append(("train.clip_grad", t.clip_grad, positive, "> 0 (use null to disable clipping)"))
    if e.batch_size is not None:
        rules.append(("eval.batch_size", e.batch_size, at_least_one, ">= 1 (or null: data.batch_size)"))
    for key, value, ok, requirement in rules:
        if not ok(value):  # also catches NaN
            raise ConfigError(_at(where(key), f"{key} must be {requirement}, got {value!r}"))

    def fail(keys: str | tuple[str, ...], msg: str) -> typing.NoReturn:
        raise ConfigError(_at(where(*([keys] if isinstance(keys, str) else keys)), msg))

    if t.warmup_epochs > t.epochs:
        fail(
            ("train.warmup_epochs", "train.epochs"),
            f"train.warmup_epochs={t.warmup_epochs} is larger than train.epochs={t.epochs}; "
            f"set train.warmup_epochs to at most {t.epochs}",
        )
    if t.min_lr > t.base_lr:
        fail(
            ("train.min_lr", "train.base_lr"),
            f"train.min_lr={t.min_lr} is larger than train.base_lr={t.base_lr}",
        )
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        fail("train.betas", f"train.betas must be two numbers in [0, 1), got {t.betas}")
    if t.best_on == "ema" and not t.ema:
        fail(("train.best_on", "train.ema"), "train.best_on='ema' needs train.ema=true")
    if len(a.crop_scale) != 2 or not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1:
        fail("aug.crop_scale", f"aug.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {a.crop_scale}")
    if a.auto_augment is not None and not a.auto_augment.strip():
        fail("aug.auto_augment", "aug.auto_augment is empty; use null to disable it")
    if not cfg.output.strip():
        fail("output", "output must be a non-empty directory path")
    for key, value in (("model.pretrained", m.pretrained), ("model.head_map", m.head_map)):
        if value is not None and not value.strip():
            fail(key, f"{key} is empty; use null to leave it unset")
    _check_architecture(cfg, where)
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        if len(values) != m.in_chans:
            fail((key, "model.in_chans"), f"{key} has {len(values)} values but model.in_chans={m.in_chans}")
    if not all(s > 0 for s in d.std):
        fail("data.std", f"data.std values must be > 0, got {d.std}")


__all__ = [
    "AugConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "all_keys",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "validate",
]
