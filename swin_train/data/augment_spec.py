"""`aug.auto_augment`: timm's RandAugment / AugMix / AutoAugment spec strings, checked before a run starts.

Why our own check: timm parses the spec while building the transform, so a typo is an AssertionError from
inside timm at the start of training, and some parts it never applies: a section without a number
(`rand-m9-mstd`), an unknown transform set (`rand-tfoo` takes the default set), a magnitude above `mmax`
(clipped). Here every section must be one timm applies, once, with a value in its range; then timm builds
the transform once, so anything this grammar missed still fails here, as a one-line message.
"""

from __future__ import annotations

import difflib
import math
import re

# the sections each family takes (timm.data.auto_augment), and how their values read
_INT, _FLOAT, _FLAG = "an integer", "a number", "0 or 1"
RAND_SECTIONS = {"m": _INT, "n": _INT, "p": _FLOAT, "mstd": _FLOAT, "mmax": _INT, "inc": _FLAG}
AUGMIX_SECTIONS = {"m": _INT, "w": _INT, "d": _INT, "a": _FLOAT, "b": _FLAG, "mstd": _FLOAT}
AUTO_SECTIONS = {"mstd": _FLOAT}
AUTO_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
RAND_TRANSFORM_SETS = ("weights", "3aw", "3a")  # `t<name>`; timm takes any other name for its default set
DEFAULT_MAX_MAGNITUDE = 10  # timm's _LEVEL_DENOM: magnitudes are clipped to it unless `mmax` raises it


def is_disabled(spec: str | None) -> bool:
    """No augmentation policy: null, or the string "none" (any case) as timm's scripts accept."""
    return spec is None or spec.lower() == "none"


def auto_augment_problem(spec: str) -> str | None:
    """Why timm would reject `spec` or leave part of it unapplied; None when all of it takes effect."""
    if is_disabled(spec):
        return None
    if spec != spec.strip() or not spec:
        return "remove the spaces" if spec.strip() else "it is empty; use null to disable it"
    family, *sections = spec.split("-")
    if spec.startswith("rand"):
        known, head = RAND_SECTIONS, "rand"
    elif spec.startswith("augmix"):
        known, head = AUGMIX_SECTIONS, "augmix"
    else:
        known, head = AUTO_SECTIONS, family
        if family not in AUTO_POLICIES:
            choices = ["rand", "augmix", *AUTO_POLICIES]
            close = difflib.get_close_matches(family.lower(), choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return (
                f"'{family}' is not a policy: a spec starts with rand (RandAugment), augmix or an AutoAugment "
                f"policy ({', '.join(AUTO_POLICIES)}), e.g. rand-m9-mstd0.5-inc1{hint}"
            )
    if family != head:
        return f"a {head} spec starts with '{head}-', got '{family}'"
    values, problem = _sections(sections, known)
    if problem:
        return problem
    return _range_problem(values, head) or _timm_problem(spec)


def _sections(sections: list[str], known: dict[str, str]) -> tuple[dict[str, float | str], str | None]:
    """({key: value}, None) of the sections after the family, or (partial, why one is not applied)."""
    values: dict[str, float | str] = {}
    names = ", ".join([*known, *(["t<set>"] if known is RAND_SECTIONS else [])])
    for section in sections:
        if known is RAND_SECTIONS and section.startswith("t"):  # timm reads any 't...' as a transform set
            key, value = "t", section[1:]
            if value not in RAND_TRANSFORM_SETS:
                sets = ", ".join(f"t{s}" for s in RAND_TRANSFORM_SETS)
                return (
                    values,
                    f"unknown transform set '{section}' (timm would use its default set; known: {sets})",
                )
        else:
            match = re.fullmatch(r"([a-z]*)(\d.*)", section)
            if match is None:
                return values, f"section '{section}' has no number, so timm ignores it (sections: {names})"
            key, text = match.groups()
            if key not in known:
                return values, f"unknown section '{section}' (sections: {names})"
            value = _number(text, known[key])
            if value is None:
                return values, f"section '{section}': {key} takes {known[key]}, got '{text}'"
        if key in values:
            return values, f"section '{key}' appears twice"
        values[key] = value
    return values, None


def _number(text: str, kind: str) -> float | None:
    if kind == _FLAG:
        return float(text) if text in ("0", "1") else None
    if kind == _INT:
        return float(text) if text.isdigit() else None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _range_problem(values: dict[str, float | str], head: str) -> str | None:
    top = values.get("mmax", DEFAULT_MAX_MAGNITUDE)
    if values.get("m", 0) > top:
        return f"magnitude m{values['m']:g} is above the maximum {top:g}, which timm clips it to; set mmax"
    if not 0 <= values.get("p", 0) <= 1:
        return f"p{values['p']:g}: the probability of each op must be in [0, 1]"
    if head == "augmix" and values.get("w", 1) < 1:
        return "w0: AugMix needs a chain width w >= 1"
    if head == "augmix" and values.get("a", 1) <= 0:
        return f"a{values['a']:g}: the mixing weights' Dirichlet alpha must be > 0"
    if head == "augmix" and values.get("d", 1) < 1:
        return "d0: the chain depth d must be >= 1 (leave d out for a random depth of 1-3)"
    return None


def _timm_problem(spec: str) -> str | None:
    """Build the spec with timm (what training will do) and report its error on one line."""
    from timm.data import auto_augment

    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    build = auto_augment.auto_augment_transform
    if spec.startswith("rand"):
        build = auto_augment.rand_augment_transform
    elif spec.startswith("augmix"):
        build = auto_augment.augment_and_mix_transform
    try:
        build(spec, hparams)
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        return f"timm cannot build it ({' '.join(f'{type(e).__name__}: {e}'.split())})"
    return None
