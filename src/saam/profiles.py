"""Parameter profiles (``params/<name>.yaml``): loaded, overridden and validated in one place.

A profile is a flat mapping of literal values. Every key is declared here with its type and
whether a profile must give it; a typo (``stpes``), a missing key or a wrong type stops the run
at once with one message naming the file, the key and the known keys. Overrides for one run
(``make all PROFILE=smoke SET="steps=4 n_eval=6"``, or the notebooks' ``overrides`` parameter)
are parsed as YAML values and validated the same way.
"""
from __future__ import annotations

import os

import yaml

from . import paths

NUM = (int, float)
# key -> (accepted types, required for ShapesWorld profiles, required for real-model profiles)
SCHEMA: dict[str, tuple[tuple[type, ...], bool, bool]] = {
    "model": ((str,), True, True),
    "seed": ((int,), True, True),
    "steps": ((int,), True, True),
    "guidance": (NUM, True, True),
    "k": (NUM, True, True),
    "tau": (NUM, True, True),
    "include_mid": ((bool,), True, True),
    "concepts": ((str,), False, False),        # "hrv" (HRV's 34, default) or "ours" (data/concepts.yaml)
    "n_eval": ((int,), True, False),
    "n_fidelity": ((int,), True, False),
    "n_relevance_prompts": ((int,), True, False),
    "n_sinks": ((int,), False, False),
    "n_examples": ((int,), False, False),
    "k_sweep": ((list,), False, False),
    "tau_sweep": ((list,), False, False),
    "strengths": ((list,), False, False),
    "variants": ((list,), False, False),       # organism variants compared in the ablation chapter
    "ablation": ((dict,), False, False),       # sizes for the ablation's per-variant runs
    "model_id": ((str,), False, False),
    "model_path": ((str, type(None)), False, False),
    "resolution": ((int, type(None)), False, False),
    "batch_size": ((int,), False, False),
    "device": ((str,), False, False),          # auto | cpu | cuda
    "hrv_vectors": ((str, type(None)), False, False),
    "hrv_head_index": ((str, type(None)), False, False),
    "data_dir": ((str, type(None)), False, False),
}
DEFAULTS = dict(concepts="hrv", n_sinks=32, n_examples=6, device="auto", batch_size=16,
                k_sweep=[0.05, 0.1, 0.25, 0.5, 1.0], tau_sweep=[0.3, 0.4, 0.5], strengths=[0.5],
                variants=[], model_path=None, resolution=None)


class ProfileError(ValueError):
    pass


def known() -> list[str]:
    return sorted(p.stem for p in paths.PARAMS.glob("*.yaml"))


def parse_overrides(text: str | dict | None) -> dict:
    """``"steps=4 n_eval=6"`` (YAML values) -> {"steps": 4, "n_eval": 6}."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    out = {}
    for item in str(text).split():
        if "=" not in item:
            raise ProfileError(f"override {item!r} is not key=value (e.g. SET=\"steps=4 n_eval=6\")")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def validate(p: dict, source: str) -> dict:
    """Check keys and types; fill defaults. ``source`` names the file (and overrides) in errors."""
    unknown = sorted(set(p) - set(SCHEMA) - {"profile"})
    if unknown:
        raise ProfileError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(SCHEMA)}")
    real = p.get("model", "shapesworld") != "shapesworld"
    missing = [k for k, (_, need_sw, need_real) in SCHEMA.items() if (need_real if real else need_sw) and k not in p]
    if missing:
        raise ProfileError(f"{source}: missing key(s) {missing}; known keys: {sorted(SCHEMA)}")
    for k, v in p.items():
        if k == "profile":
            continue
        types = SCHEMA[k][0]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ProfileError(f"{source}: key {k!r} must be {names}, got {v!r} ({type(v).__name__})")
    if p.get("concepts", "hrv") not in ("hrv", "ours"):
        raise ProfileError(f"{source}: concepts must be 'hrv' or 'ours', got {p['concepts']!r}")
    if p.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise ProfileError(f"{source}: device must be auto, cpu or cuda, got {p['device']!r}")
    return {**DEFAULTS, **p}


def load(profile: str | None = None, overrides: str | dict | None = None) -> dict:
    """Parameters of ``params/<profile>.yaml`` with ``overrides`` applied, validated.

    Also points :data:`saam.paths.FIGURES` at the profile's output folder (``figures/`` for
    ``paper``, ``build/<profile>/figures/`` otherwise), so where results go follows the profile
    however a notebook is run.
    """
    profile = profile or os.environ.get("PROFILE", "paper")
    f = paths.PARAMS / f"{profile}.yaml"
    if not f.exists():
        raise ProfileError(f"no profile {profile!r} ({f}); known profiles: {known()}")
    try:
        p = yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{f}: not valid YAML: {e}") from e
    if not isinstance(p, dict):
        raise ProfileError(f"{f}: a profile is a mapping of keys to values")
    p = validate(p, str(f))
    over = parse_overrides(overrides)
    if over:
        p = validate({**p, **over}, f"{f} with overrides {over}")
    p["profile"] = profile
    paths.use_profile(profile)
    return p
