"""What fingerprinting a model folder costs: each file read whole (the old way) against streamed
and remembered (``saam.cache.fingerprint``), side by side on one folder, in fresh processes.

    python scripts/fingerprint_bench.py [--model sdxl] [--folder DIR]   # `make bench`

The folder defaults to a full-size random-weight SDXL (``python -m saam.testing full-size sdxl``,
written once under build/bench/, about 14 GB in fp32). Each way runs in a process of its own so
its peak resident memory (``ru_maxrss``) is its own: "whole" reads each file into memory and hashes
it (what ``cache.fingerprint`` did), "streamed, cold" hashes in 8 MB pieces with an empty digest
cache, "streamed, warm" is a later chapter's call (the digests remembered by size and mtime).
Writes figures/bench-fingerprint.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
way, folder = sys.argv[1], Path(sys.argv[2])
t0 = time.perf_counter()
if way == "whole":
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".txt", ".bin"):
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    fp = h.hexdigest()[:16]
else:
    from saam.cache import fingerprint
    fp = fingerprint(folder)
print(json.dumps(dict(fingerprint=fp, seconds=time.perf_counter() - t0,
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def run(way: str, folder: Path, cache: Path) -> dict:
    env = dict(os.environ, SAAM_CACHE=str(cache), PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", CHILD, way, str(folder)], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sdxl")
    ap.add_argument("--folder", type=Path, help="a diffusers folder (default: a full-size random one, written once)")
    a = ap.parse_args()
    folder = a.folder or ROOT / "build" / "bench" / f"{a.model}-fullsize"
    if not (folder / "model_index.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing a full-size random-weight {a.model} to {folder} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "saam.testing", "full-size", a.model, str(folder)], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    biggest = max(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    with tempfile.TemporaryDirectory() as cache:
        rows = {"whole": run("whole", folder, Path(cache)),
                "streamed, cold": run("streamed", folder, Path(cache)),
                "streamed, warm": run("streamed", folder, Path(cache))}
    if len({r["fingerprint"] for r in rows.values()}) != 1:
        raise SystemExit(f"the ways disagree: {rows}")
    from saam.models import machine
    cpu = machine()["cpu"]
    res = dict(model=a.model, folder_gb=size / 1e9, largest_file_gb=biggest / 1e9, cpu=cpu, ways=rows)
    (ROOT / "figures" / "bench-fingerprint.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"fingerprint of a {size / 1e9:.1f} GB {a.model} folder (largest file {biggest / 1e9:.1f} GB; {cpu}):")
    for k, r in rows.items():
        print(f"  {k:16s} {r['seconds']:7.1f} s  peak {r['peak_mb']:8.0f} MB")
    w, c, h = rows["whole"], rows["streamed, cold"], rows["streamed, warm"]
    print(f"  streamed/whole: time {c['seconds'] / w['seconds']:.2f}x, peak memory {c['peak_mb'] / w['peak_mb']:.3f}x; "
          f"a later chapter (warm) {h['seconds']:.2f} s")


if __name__ == "__main__":
    main()
