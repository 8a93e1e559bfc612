"""Is one run's every result inside another run's CIs? Side by side, from two results.json files.

    python scripts/compare_runs.py figures/results.json build/paper/set-<hash>/figures/results.json

Reads every value that results.json gives with a 95 % CI (Table 1's methods, HRV's 34 concentrations,
chapter 06's organism properties) and the fidelity rates (Wilson CIs from their counts), and prints,
for each, the reference run's value and CI next to the other run's value, marking those outside.
How the paper profile's denoising steps were chosen (README, "Two commands").
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("other", type=Path)
    a = ap.parse_args()
    rows = compare(json.loads(a.reference.read_text()), json.loads(a.other.read_text()))
    out = [r for r in rows if not r[2][0] <= r[3] <= r[2][1]]
    for name, v, ci, w in rows:
        mark = "  " if ci[0] <= w <= ci[1] else "XX"
        print(f"{mark} {name:48s} {v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  ->  {w:.4f}")
    print(f"{len(rows)} values with a CI; {len(rows) - len(out)} inside, {len(out)} outside"
          + ("".join(f"\n  outside: {n} {v:.4f} [{c[0]:.4f}, {c[1]:.4f}] -> {w:.4f}" for n, v, c, w in out)))


if __name__ == "__main__":
    main()
