"""Execute one notebook with papermill and a profile, recording its wall time.

    python scripts/run_notebook.py notebooks/03-miou.ipynb build/paper/03-miou.ipynb --profile paper
    python scripts/run_notebook.py --timings build/paper        # print the recorded times
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path


def check(profile: str, overrides: str) -> None:
    """A bad profile or override, or missing weights, stop here, before any kernel starts."""
    from saam.experiments import load_params
    try:
        load_params(profile, overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="?")
    ap.add_argument("dst", nargs="?")
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--set", default="", help='one-run profile overrides, e.g. "steps=4 n_eval=6"')
    ap.add_argument("--timings")
    ap.add_argument("--check", action="store_true", help="only validate the profile (and a real model's weights)")
    a = ap.parse_args()
    if a.check:
        check(a.profile, a.set)
        return
    if a.timings:
        f = Path(a.timings) / "timings.json"
        t = json.loads(f.read_text()) if f.exists() else {}
        total = 0.0
        print(f"notebook times ({a.timings}):")
        for k in sorted(t):
            print(f"  {k:32s} {t[k]:7.1f} s")
            total += t[k]
        print(f"  {'total':32s} {total:7.1f} s")
        return
    import papermill as pm
    dst = Path(a.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.stem + ".partial.ipynb")
    t0 = time.time()
    check(a.profile, a.set)
    pm.execute_notebook(a.src, str(tmp), parameters=dict(profile=a.profile, overrides=a.set),
                        kernel_name="python3", cwd=str(Path(a.src).resolve().parent), progress_bar=False,
                        report_mode=False)
    os.replace(tmp, dst)  # only a finished notebook counts as built
    f = dst.parent / "timings.json"
    t = json.loads(f.read_text()) if f.exists() else {}
    t[dst.stem] = time.time() - t0
    f.write_text(json.dumps(t, indent=1))
    print(f"{dst}: {t[dst.stem]:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
