"""Did another run reproduce the reference run? Side by side, from two results.json files.

    python scripts/compare_runs.py figures/results.json build/paper/set-<hash>/figures/results.json

Reads every value that results.json gives with a 95 % CI (Table 1's methods, HRV's 34 concentrations,
chapter 06's organism properties) and the fidelity rates (Wilson CIs from their counts), and prints,
for each, the reference run's value and CI next to the other run's value.

What it tests, and what it cannot promise. A 95 % CI describes how far the reference's estimate
could move over new prompts and images; it is not a tolerance for arithmetic. Two runs of the
paper profile share every seed, prompt and image, so on the same CPU class they agree bit for bit,
and on another CPU (other kernels, fp32 against bf16) a few items of a count flip: a value moves by
a few items' worth, far less than its CI, but with m values one lying just outside its 95 % CI is no
sign of a problem. (Were the runs independent replications, a value would leave the reference's
95 % CI with probability 2 * (1 - Phi(1.96 / sqrt 2)) = 17 %: about 16 of 93.) So each value is put
in one of three classes:

- ``same``: equal to the reference (to 1e-9);
- ``inside``: inside the reference's 95 % CI (an arithmetic difference);
- ``edge``: outside the 95 % CI but inside the family-wise interval: the CI widened from z = 1.96 to
  the Bonferroni z for m values (1 - 0.05 / (2 m) quantile; 3.46 for m = 93): intervals that cover
  all m true values at once with at least 95 % probability. Where the value is a rate over n items
  the line says how many items flipped;
- ``departs``: outside the family-wise interval: a real departure, not arithmetic. The check fails
  (exit status 1) only then.

How the paper profile's denoising steps were chosen (README, "Two commands") used the same check.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

FIDELITY = {"single_color_accuracy": "n_single", "single_shape_accuracy": "n_single", "two_object_binding": "n_two",
            "unseen_color_accuracy": "n_unseen", "unseen_shape_accuracy": "n_unseen"}


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    d = 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [c - h, c + h]


def with_ci(ref: dict, other: dict, prefix: str = "") -> list[tuple[str, float, list[float], float]]:
    """(name, reference value, its CI, other value) for every value with a ``<name>_ci`` beside it:
    either ``x`` and ``x_ci`` in one mapping, or mappings ``x`` and ``x_ci`` keyed alike."""
    rows = []
    for k, v in ref.items():
        if k not in other:
            continue
        base = k[:-3]
        if k.endswith("_ci") and base in ref and base in other:
            if isinstance(v, list) and not isinstance(ref[base], dict):
                rows.append((prefix + base, ref[base], v, other[base]))
            elif isinstance(v, dict):
                rows += [(f"{prefix}{base}.{c}", ref[base][c], ci, other[base][c]) for c, ci in v.items()
                         if isinstance(ci, list) and c in other[base]]
        elif isinstance(v, dict) and not k.endswith("_ci") and isinstance(other[k], dict):
            rows += with_ci(v, other[k], prefix + k + ".")
    return rows


def compare(ref: dict, other: dict) -> list[tuple[str, float, list[float], float]]:
    rows = with_ci(ref, other)
    f, g = ref.get("fidelity", {}), other.get("fidelity", {})
    rows += [(f"fidelity.{k}", f[k], wilson(f[k], f[n]), g[k]) for k, n in FIDELITY.items() if k in f and k in g]
    return rows


def items_of(ref: dict) -> dict[str, int]:
    """Values that are rates over a known number of items: name -> n (the fidelity rates)."""
    f = ref.get("fidelity", {})
    return {f"fidelity.{k}": int(f[n]) for k, n in FIDELITY.items() if k in f and n in f}


def family_z(m: int, level: float = 0.05) -> float:
    """The two-sided Bonferroni z for m intervals at family-wise ``level``."""
    from statistics import NormalDist
    return NormalDist().inv_cdf(1 - level / (2 * max(m, 1)))


def classify(rows, items: dict[str, int] | None = None) -> list[dict]:
    """Each row (name, reference value, its 95 % CI, other value) with its class (module doc):
    same, inside, edge or departs; ``flipped`` items where the value is a rate over known items."""
    z = family_z(len(rows))
    out = []
    for name, v, (lo, hi), w in rows:
        lo_f, hi_f = v - (v - lo) * z / 1.96, v + (hi - v) * z / 1.96  # each side widened alike (Wilson CIs are asymmetric)
        cls = ("same" if abs(w - v) <= 1e-9 else "inside" if lo <= w <= hi else "edge" if lo_f <= w <= hi_f else "departs")
        n = (items or {}).get(name)
        out.append(dict(name=name, ref=v, ci=[lo, hi], family=[lo_f, hi_f], other=w, cls=cls,
                        flipped=None if n is None else round(abs(w - v) * n)))
    return out


def summary(classes: list[dict]) -> str:
    m = len(classes)
    count = {c: sum(r["cls"] == c for r in classes) for c in ("same", "inside", "edge", "departs")}
    lines = [f"{m} values with a CI: {count['same']} identical, {count['inside']} inside their 95 % CI, "
             f"{count['edge']} outside it but inside the family-wise interval (z = {family_z(m):.2f}), "
             f"{count['departs']} departing",
             "  (a 95 % CI bounds sampling noise, not arithmetic: with shared seeds a few values just outside "
             "are expected on another CPU;",
             "   only a value outside the family-wise interval, which covers all m true values at once with "
             "95 % probability, is a departure)"]
    for r in classes:
        if r["cls"] in ("edge", "departs"):
            what = f"{r['flipped']} of its items flipped" if r["flipped"] is not None else f"moved {r['other'] - r['ref']:+.4f}"
            lines.append(f"  {r['cls']}: {r['name']} {r['ref']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] -> {r['other']:.4f} "
                         f"({what}; family-wise [{r['family'][0]:.4f}, {r['family'][1]:.4f}])")
    lines.append("reproduced" if not count["departs"] else "NOT reproduced: see the departing values")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("other", type=Path)
    ap.add_argument("--summary", action="store_true", help="print the summary and the values outside their CI only")
    a = ap.parse_args()
    ref = json.loads(a.reference.read_text())
    classes = classify(compare(ref, json.loads(a.other.read_text())), items_of(ref))
    mark = dict(same="  ", inside="  ", edge="~~", departs="XX")
    for r in ([] if a.summary else classes):
        print(f"{mark[r['cls']]} {r['name']:48s} {r['ref']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]  ->  {r['other']:.4f}")
    print(summary(classes))
    return 1 if any(r["cls"] == "departs" for r in classes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
