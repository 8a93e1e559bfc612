"""Execute one notebook with papermill and a profile, recording its wall time.

    python scripts/run_notebook.py notebooks/03-miou.ipynb build/paper/03-miou.ipynb --profile paper
    python scripts/run_notebook.py --timings build/paper        # print the recorded times
    accelerate launch --num_processes 8 scripts/run_notebook.py SRC DST --profile sd14   # 8 GPUs

Under ``accelerate launch`` every process executes the notebook; the generating steps split their
batches between the processes through the shared cache (``saam.runs``); only rank 0 writes the
executed notebook, figures and tables where they belong (the others under ``<dst folder>/rank<r>/``).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path


def check(profile: str, overrides: str, say: bool = False) -> dict:
    """A bad profile or override, or missing weights, stop here, before any kernel starts; with
    ``say`` (``make check``) the run's size is printed, and a warning where it is past an hour.
    Returns the loaded profile."""
    from saam.chapter import load
    try:
        p = load(profile, overrides)
        if say:
            from saam.tables import check_k
            check_k(p)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if say:
        from saam.models import precision, resolve_device
        from saam.profiles import estimate
        device = resolve_device(p.get("device", "auto"))[0]
        line, warn = estimate(p, precision(p), "cpu" if device == "cpu" else "cuda")
        print(line)
        if warn:
            print(warn, file=sys.stderr)
    return p


def deps(outdir: str, notebooks: list[str]) -> str:
    """Make rules: each executed chapter depends on the package modules it imports and what they
    import in turn (``saam.cache.closure``), not on all of ``src``: editing the ablation re-runs
    chapter 06 alone."""
    import re
    from saam.cache import PACKAGE, closure, module_file
    rules = []
    for nb in notebooks:
        code = "\n".join("".join(c["source"]) for c in json.loads(Path(nb).read_text())["cells"] if c["cell_type"] == "code")
        mods = set()
        for m in re.finditer(r"from saam(?:\.([\w.]+))? import ([\w, ]+)", code):
            if m.group(1):
                mods.add(m.group(1))
            else:
                mods.update(n.strip() for n in m.group(2).split(",") if module_file(n.strip()).exists())
        files = [module_file(x).relative_to(PACKAGE.parents[1]) for x in closure(*sorted(mods))]
        rules.append(f"{outdir}/{Path(nb).name}: src/saam/__init__.py " + " ".join(map(str, files)))
    return "\n".join(rules) + "\n"


def record(f: Path, name: str, start: float, end: float, ran_on: dict | None = None) -> None:
    """Add a chapter's start and end (epoch seconds) and what it ran on (``ran_on``: the machine and
    the UNet's arithmetic) to timings.json (under a lock: two chapters may finish at once)."""
    import fcntl
    with open(f.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t = json.loads(f.read_text()) if f.exists() else {}
        t[name] = dict(start=start, end=end, seconds=end - start, **({"ran_on": ran_on} if ran_on else {}))
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(t, indent=1))
        os.replace(tmp, f)


def ran_on(m: dict) -> str:
    """A chapter's machine in words: "2 cores of an Intel(R) Xeon(R) Processor, torch at AVX512, bf16"."""
    where = f"{m['cuda']} (CUDA)" if m.get("cuda") else f"{m['cores']} cores of an {m['cpu']}, torch at {m['capability']}"
    return f"{where}, {m['precision']}"


def timings_report(folder: Path) -> str:
    """Each chapter's time and the wall time from the first start to the last end."""
    f = folder / "timings.json"
    t = {k: v for k, v in (json.loads(f.read_text()) if f.exists() else {}).items() if isinstance(v, dict)}
    on = {k: ran_on(v["ran_on"]) for k, v in t.items() if "ran_on" in v}
    kinds = set(on.values())
    one = kinds.pop() if len(kinds) == 1 and len(on) == len(t) else None
    lines = [f"notebook times ({folder}" + (f"; {one}" if one else "") + "):"]
    lines += [f"  {k:32s} {t[k]['seconds']:7.1f} s" + ("" if one or k not in on else f"  ({on[k]})") for k in sorted(t)]
    if t:
        wall = max(v["end"] for v in t.values()) - min(v["start"] for v in t.values())
        lines += [f"  {'sum':32s} {sum(v['seconds'] for v in t.values()):7.1f} s",
                  f"  {'wall (first start to last end)':32s} {wall:7.1f} s"]
    return "\n".join(lines)


def destination(dst: Path, rank: int) -> tuple[Path, Path | None]:
    """Where process ``rank``'s executed chapter goes, and its figures folder (None: the profile's).
    Under `accelerate launch` the other processes share the batches and only rank 0's outputs land;
    the others write beside it, under ``rank<r>/``: absolute paths, since the kernel runs in
    ``notebooks/`` (a relative one once put rank 1's figures under ``notebooks/build/``)."""
    if not rank:
        return dst, None
    dst = dst.resolve().parent / f"rank{rank}" / dst.name
    return dst, dst.parent / "figures"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="?")
    ap.add_argument("dst", nargs="?")
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--set", default="", help='one-run profile overrides, e.g. "steps=4 n_eval=6"')
    ap.add_argument("--timings")
    ap.add_argument("more", nargs="*", help="with --deps: the rest of the notebooks")
    ap.add_argument("--deps", metavar="OUTDIR", help="print make rules: OUTDIR's chapters on their import closures")
    ap.add_argument("--check", action="store_true", help="only validate the profile (and a real model's weights)")
    a = ap.parse_args()
    if a.check:
        check(a.profile, a.set, say=True)
        return
    if a.timings:
        print(timings_report(Path(a.timings)))
        return
    if a.deps:
        print(deps(a.deps, [a.src, *([a.dst] if a.dst else []), *a.more]), end="")
        return
    from saam.runs import processes
    rank = processes()[0]
    dst, figures = destination(Path(a.dst), rank)
    if figures is not None:
        os.environ["SAAM_FIGURES"] = str(figures)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.stem + ".partial.ipynb")
    t0 = time.time()
    import papermill as pm
    p = check(a.profile, a.set)
    # the kernel is stopped at once after its last cell (whose outputs have all arrived and whose files
    # are written: every write in a cell is synchronous); a graceful shutdown waited 2.4 s per chapter
    # for the interpreter to tear down torch
    pm.execute_notebook(a.src, str(tmp), parameters=dict(profile=a.profile, overrides=a.set),
                        kernel_name="python3", cwd=str(Path(a.src).resolve().parent), progress_bar=False,
                        report_mode=False, shutdown_kernel="immediate",
                        # the kernel listens on 127.0.0.1 only; its start-up warning about TCP without
                        # encryption (once per chapter) said nothing about this run: kernel log at ERROR
                        extra_arguments=["--IPKernelApp.log_level=ERROR"])
    os.replace(tmp, dst)  # only a finished notebook counts as built
    if not rank:
        from saam.models import machine, precision
        record(dst.parent / "timings.json", dst.stem, t0, time.time(), dict(machine(), precision=precision(p)))
    print(f"{dst}: {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
