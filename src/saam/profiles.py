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
    "guidance": ((int, float, type(None)), True, True),  # null: the pipeline's own (saam.models.guidance_arg)
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
    "precision": ((str,), False, False),       # auto | fp32 | bf16 (CPU: bf16 autocast where the CPU has bf16 instructions)
    "hrv_vectors": ((str, type(None)), False, False),
    "hrv_head_index": ((str, type(None)), False, False),
    "data_dir": ((str, type(None)), False, False),
    "data_split": ((str, type(None)), False, False),  # which annotation files of a folder holding several (e.g. val2017)
    "relevance_variant": ((str,), False, False),  # MM-DiTs: stream | direct (saam.stream)
    # chapter 03's relevance convergence check: a pool of this many relevance prompts (the first
    # n_relevance_prompts shared with the pass), disjoint halves of it compared (saam.selection.convergence)
    "relevance_pool": ((int, type(None)), False, False),
    # chapter 03: the pre-registered mask-free selection rules scored beside top-k (saam.rules.RULES;
    # docs/preregistration.md), and how many independent relevance re-estimates test the two-level CI
    "rules": ((list,), False, False),
    "relevance_reestimates": ((int,), False, False),
}
COUNTS = ("n_eval", "n_fidelity", "n_relevance_prompts", "n_sinks", "n_examples", "batch_size", "steps")
ABLATION_KEYS = ("n_eval", "n_fidelity", "n_relevance_prompts", "n_sinks")
DEFAULTS = dict(concepts="hrv", n_sinks=32, n_examples=6, device="auto", precision="auto", batch_size=16,
                k_sweep=[0.05, 0.1, 0.25, 0.5, 1.0], tau_sweep=[0.3, 0.4, 0.5], strengths=[0.5],
                variants=[], model_path=None, resolution=None, relevance_pool=None, rules=[], relevance_reestimates=0)


class ProfileError(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML would keep the last silently)."""


def _no_duplicates(loader, node, deep=False):
    seen = {}
    for k, _ in node.value:
        key = loader.construct_object(k, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and {k.start_mark.line + 1}); give it once",
                k.start_mark)
        seen[key] = k.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def strict_yaml(text: str):
    """YAML text as data, a key given twice in a mapping an error (profiles, word maps)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


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
        if k in out:
            raise ProfileError(f"override {k!r} is given twice ({text!r}); give it once")
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ProfileError(f"override {item!r}: {v!r} is not a YAML value ({e.problem}); write lists "
                               "without spaces, e.g. k_sweep=[0.1,0.25] (mappings such as ablation belong in the profile file)") from None
    return out


def validate(p: dict, source: str) -> dict:
    """Check keys and types; fill defaults. ``source`` names the file (and overrides) in errors."""
    unknown = sorted(set(p) - set(SCHEMA) - {"profile", "overrides"})
    if unknown:
        raise ProfileError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(SCHEMA)}")
    real = p.get("model", "shapesworld") != "shapesworld"
    missing = [k for k, (_, need_sw, need_real) in SCHEMA.items() if (need_real if real else need_sw) and k not in p]
    if missing:
        raise ProfileError(f"{source}: missing key(s) {missing}; known keys: {sorted(SCHEMA)}")
    for k, v in p.items():
        if k in ("profile", "overrides"):
            continue
        types = SCHEMA[k][0]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ProfileError(f"{source}: key {k!r} must be {names}, got {v!r} ({type(v).__name__})")
    check_ranges(p, source)
    if p.get("concepts", "hrv") not in ("hrv", "ours"):
        raise ProfileError(f"{source}: concepts must be 'hrv' or 'ours', got {p['concepts']!r}")
    if p.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise ProfileError(f"{source}: device must be auto, cpu or cuda, got {p['device']!r}")
    if p.get("precision", "auto") not in ("auto", "fp32", "bf16"):
        raise ProfileError(f"{source}: precision must be auto, fp32 or bf16, got {p['precision']!r}")
    if p.get("relevance_variant", "stream") not in ("stream", "direct"):  # saam.stream.VARIANTS
        raise ProfileError(f"{source}: relevance_variant must be stream or direct, got {p['relevance_variant']!r}")
    return {**DEFAULTS, **p}


def _k_ok(k) -> bool:
    """A head count (int >= 1) or a fraction of the eligible heads (float in (0, 1])."""
    return (isinstance(k, int) and not isinstance(k, bool) and k >= 1) or (isinstance(k, float) and 0 < k <= 1)


def _tau_ok(t) -> bool:
    """A threshold on min-max normalised maps: strictly between 0 and 1."""
    return isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1


def check_ranges(p: dict, source: str) -> None:
    """Values by meaning, not only by type: counts >= 1, k a count or a fraction in (0, 1], tau in
    (0, 1), strengths that leave at least one denoising step, sweeps non-empty."""
    def bad(key, why):
        raise ProfileError(f"{source}: {key} {why}")
    for key in COUNTS:
        if key in p and p[key] < 1:
            bad(key, f"must be at least 1, got {p[key]}")
    if "seed" in p and p["seed"] < 0:
        bad("seed", f"must be >= 0, got {p['seed']}")
    if p.get("guidance") is not None and p["guidance"] < 0:
        bad("guidance", f"must be >= 0, got {p['guidance']}")
    if "k" in p and not _k_ok(p["k"]):
        bad("k", f"must be a head count (int >= 1) or a fraction of the eligible heads in (0, 1], got {p['k']!r}")
    if "tau" in p and not _tau_ok(p["tau"]):
        bad("tau", f"is a threshold on maps normalised to [0, 1] and must lie in (0, 1), got {p['tau']!r}")
    for key, ok, what in (("k_sweep", _k_ok, "head counts or fractions in (0, 1]"), ("tau_sweep", _tau_ok, "thresholds in (0, 1)"),
                          ("strengths", lambda s: isinstance(s, (int, float)) and 0 < s <= 1, "fractions in (0, 1]")):
        if key in p and (not p[key] or not all(ok(v) for v in p[key])):
            bad(key, f"must be a non-empty list of {what}, got {p[key]!r}")
    for key in ("k_sweep", "tau_sweep", "strengths", "variants"):
        seen = [v for v in p.get(key) or []]
        dup = sorted({str(v) for v in seen if seen.count(v) > 1})
        if dup:
            bad(key, f"lists {', '.join(dup)} more than once ({p[key]!r}): each value is one row of its table; give it once")
    if "variants" in p and p.get("model", "shapesworld") == "shapesworld" and not p["variants"]:
        bad("variants", "must list at least one organism variant (chapter 06 compares them), got []")  # names: make check
    from .rules import RULES
    unknown = [r for r in p.get("rules") or [] if r not in RULES]
    if unknown or len(set(map(str, p.get("rules") or []))) != len(p.get("rules") or []):
        bad("rules", f"lists the pre-registered rules ({', '.join(RULES)}) at most once each, got {p['rules']!r}; "
                     "a rule not registered before the table was seen is not scored")
    if p.get("relevance_reestimates", 0) < 0:
        bad("relevance_reestimates", f"must be 0 (none) or more, got {p['relevance_reestimates']!r}")
    if p.get("relevance_reestimates") and p.get("model", "shapesworld") != "shapesworld":
        bad("relevance_reestimates", "independent re-estimates need new relevance prompts, which ShapesWorld's caption stream "
                                     "has and a dataset's captions do not: set it on ShapesWorld profiles only")
    pool = p.get("relevance_pool")
    if pool is not None and (pool < 4 or pool < p.get("n_relevance_prompts", 0)):
        bad("relevance_pool", f"must be at least 4 and at least n_relevance_prompts ({p.get('n_relevance_prompts')}), "
                              f"got {pool} (or null for no convergence check)")
    for s in p.get("strengths") or []:
        if "steps" in p and int(p["steps"] * s) < 1:
            bad("strengths", f"{s} of {p['steps']} steps leaves no denoising step (strength x steps must be >= 1)")
    if p.get("resolution") is not None and (p["resolution"] < 64 or p["resolution"] % 8):
        bad("resolution", f"must be a multiple of 8 of at least 64 pixels, got {p['resolution']}")
    abl = p.get("ablation") or {}
    for key, v in abl.items():
        if key not in ABLATION_KEYS or not isinstance(v, int) or isinstance(v, bool) or v < 1:
            bad("ablation", f"maps {list(ABLATION_KEYS)} to counts >= 1, got {key}: {v!r}")


def load(profile: str | None = None, overrides: str | dict | None = None) -> dict:
    """Parameters of ``params/<profile>.yaml`` with ``overrides`` applied, validated.

    The parameters carry ``profile`` and ``overrides`` (what made the outputs) and ``figures``,
    the folder its outputs go to (``saam.paths.figures_dir``: ``figures/`` for a plain ``paper``
    run, ``build/<profile>/figures/`` otherwise, ``build/<profile>/set-<hash>/`` with overrides).
    Nothing global changes.
    """
    profile = profile or os.environ.get("PROFILE", "paper")
    f = paths.PARAMS / f"{profile}.yaml"
    if not f.exists():
        raise ProfileError(f"no profile {profile!r} ({f}); known profiles: {known()}")
    try:
        p = strict_yaml(f.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{f}: not valid YAML: {e}") from e
    if not isinstance(p, dict):
        raise ProfileError(f"{f}: a profile is a mapping of keys to values")
    p = validate(p, str(f))
    over = parse_overrides(overrides)
    if over:
        p = validate({**p, **over}, f"{f} with overrides {over}")
    p["profile"] = profile
    p["overrides"] = overrides if isinstance(overrides, str) else (over or "")
    p["figures"] = str(paths.figures_dir(profile, overrides))
    return p


# Cold `make all` runs of the paper profile as measured (docs/performance.md tells each), declared once:
# `make check` estimates with their seconds per image-step (wall time over :func:`run_size`'s image-steps,
# so relevance's 1.17x, the VAE, scoring and kernel starts are in it; the slowest measured machine of an
# arithmetic), `make bench` and the README quote them with their machines.
MEASURED_RUNS = (
    dict(when="2026-12-03", machine="2 cores of an Intel(R) Xeon(R) Processor with AMX-BF16", arithmetic="bf16",
         minutes=8.7, image_steps=32_400),
    dict(when="2026-12-03", machine="that Xeon with torch, MKL and oneDNN held to AVX2, an emulation",
         arithmetic="fp32", minutes=16.6, image_steps=32_400),
    dict(when="2026-11, issue 26, before chapter 03's convergence pool", machine="2 cores of an AVX2-only CPU",
         arithmetic="fp32", minutes=31.8, image_steps=30_000),
)
# Real models on a 2-core CPU, the denoiser alone: figures/bench-fullsize.json (512/768/1024 px). None on a GPU yet.
RATES = {**{("shapesworld", a): max(r["minutes"] * 60 / r["image_steps"] for r in MEASURED_RUNS if r["arithmetic"] == a)
            for a in {r["arithmetic"] for r in MEASURED_RUNS}},
         ("sd14", "fp32"): 12.9, ("sd14", "bf16"): 4.0, ("sd15", "fp32"): 12.9, ("sd15", "bf16"): 4.0,
         ("sd21", "fp32"): 47.8, ("sd21", "bf16"): 18.5, ("sdxl", "fp32"): 77.8, ("sdxl", "bf16"): 14.2}


def measured_runs() -> list[str]:
    """Each measured cold `make all` of the paper profile in words, with its machine."""
    return [f"{r['minutes']:.1f} min in {r['arithmetic']} on {r['machine']} ({r['when']})" for r in MEASURED_RUNS]


HOUR = 3600.0
MAX_BATCH = 64  # the largest batch measured (organism, paper profile: 48 and 64 no faster than 32)


def _reused(part: int, whole: int, batch: int) -> bool:
    """Whether the first ``part`` items of a pass are batches the ``whole`` pass already cached: every
    batch the same items (``saam.runs`` keys a batch on its start, size and items)."""
    return part == whole or (part <= whole and part % batch == 0)


def run_size(p: dict) -> dict[str, int]:
    """Images x denoising steps each pass of a profile's chapters generates (a relevance pass counted
    as generations). Batches an earlier pass cached count once: the generation run feeds the word
    records and the attention budget, the relevance pass's prompts are the first of its convergence
    pool, and chapter 06 generates nothing for the organism the other chapters ran where the ablation's
    counts are whole batches of theirs (or the same counts)."""
    steps, strengths = p["steps"], p.get("strengths") or []
    real = p.get("model", "shapesworld") != "shapesworld"
    rel = max(p.get("n_relevance_prompts") or 64, p.get("relevance_pool") or 0)
    out = {}
    if not real:
        from .models import model_path
        from .shapes.model import variant_of
        ran = variant_of(model_path(p))["variant"]
        b = p.get("batch_size", 16)
        gen = max(p["n_eval"], p.get("n_sinks", 32))
        out["generation"] = gen * steps
        out["fidelity"] = 3 * p["n_fidelity"] * steps
        for v in p.get("variants") or []:
            a = {**{k: p.get(k, 0) for k in ABLATION_KEYS}, **(p.get("ablation") or {})}
            passes = [(max(a["n_eval"], a["n_sinks"]), gen), (a["n_fidelity"], p["n_fidelity"]),
                      (a["n_fidelity"], p["n_fidelity"]), (a["n_relevance_prompts"], rel)]  # fidelity: single, two
            if v == ran and all(_reused(x, whole, b) for x, whole in passes):
                continue
            out[f"organism {v}"] = sum(x for x, _ in passes) * steps
    n_eval = p.get("n_eval") or 0
    for s in strengths:
        out[f"real images (strength {s})"] = int(n_eval * steps * s)
    if not (real and p.get("hrv_vectors")):  # published vectors need no relevance pass
        out["relevance"] = rel * steps
    if p.get("relevance_reestimates"):  # chapter 03: each re-estimate a pass of new prompts
        out["relevance re-estimates"] = p["relevance_reestimates"] * (p.get("n_relevance_prompts") or 64) * steps
    if real:
        out["attention budget"] = p.get("n_sinks", 32) * steps
    return out


def estimate(p: dict, arithmetic: str, device: str) -> tuple[str, str | None]:
    """What `make check` says of a run's size: (a line, a warning or None). The time comes from
    :data:`RATES` where one is measured for the model and arithmetic on this kind of device."""
    size = run_size(p)
    total = sum(size.values())
    line = f"{p['profile']}: about {total:,} image-steps (" + ", ".join(f"{k} {v:,}" for k, v in size.items()) + ")"
    rate = RATES.get((p.get("model", "shapesworld"), arithmetic)) if device == "cpu" else None
    warn = None
    if rate is not None:
        hours = total * rate / HOUR
        line += f"; at {rate * 1000:.0f} ms per image-step ({arithmetic}, CPU, measured) about " + (f"{hours * 60:,.0f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s")
        if hours > 1:
            warn = (f"warning: this run would take about {hours:,.1f} hours on this machine's CPU "
                    f"(more than an hour: lower steps or the n_* counts, or use a GPU)")
    largest = max([p.get(k) or 0 for k in ("n_eval", "n_fidelity", "n_relevance_prompts", "n_sinks")] + [1])
    batch = min(p.get("batch_size", 16), largest)
    line += f"; batches of at most {batch:,} images" + (f" (batch_size {p['batch_size']:,} is more than any pass holds)"
                                                         if p.get("batch_size", 16) > largest else "")
    if batch > MAX_BATCH:
        w = (f"warning: batches of {batch:,} images: memory grows with the batch, and the largest measured is "
             f"{MAX_BATCH} (make bench); lower batch_size if the run runs out of memory")
        warn = w if warn is None else warn + "\n" + w
    return line, warn
