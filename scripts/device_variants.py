"""Fine-tune the organism variants (issue 10) on a lent GPU in one call, then assemble them here.

The device tool carries at most 64 MiB and brings back files of at most 16 MiB, while the frozen
text encoder alone is 45 MB. So the job travels light and comes back in pieces:

    python scripts/device_variants.py pack                 # here: .dev/device (encoder rows the captions use, wheels)
    python scripts/device_variants.py train --minutes 7    # there: B, C, D in parallel -> $OUT/<v>.part<i>
    python scripts/device_variants.py unpack DIR           # here: join the parts, write data/variants/<v>

``pack`` keeps every encoder weight except the rows of the token-embedding table that no
ShapesWorld caption can contain (captions are built only from the world's vocabulary, checked
below); the encoder's outputs on training captions are therefore exactly the full encoder's.
Without a GPU, ``make model VARIANT=C`` trains the same thing on CPU, checkpointed and resumable.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".dev" / "device"
PART = 15 * 2**20  # bytes per returned piece (the tool returns files of at most 16 MiB)


def caption_vocabulary() -> list[str]:
    from saam.shapes import world as W
    words = {"a", "an", ","} | set(W.COLORS) | set(W.SHAPES) | set(W.SIZES)
    for phrase in (*W.PREFIXES, *W.JOINERS):
        words |= set(phrase.replace(",", " , ").split())
    return sorted(words)


def pack() -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from saam import paths
    from saam.shapes.model import load_text_encoder
    from saam.shapes.world import sample_scene
    _, tok = load_text_encoder()
    keep = set(tok.all_special_ids)
    for w in caption_vocabulary():
        keep |= set(tok(w, add_special_tokens=False).input_ids)
    for i in range(20_000):  # the vocabulary really covers the captions
        ids = set(tok(sample_scene(i).caption).input_ids)
        assert ids <= keep, (sample_scene(i).caption, ids - keep)
    te = paths.MODEL_DIR / "text_encoder"
    sd = load_file(te / "model.safetensors")
    name = next(k for k in sd if k.endswith("word_embeddings.weight"))
    rows = torch.tensor(sorted(keep))
    sd[name + ".rows"], sd[name] = rows, sd[name][rows].contiguous()
    shutil.rmtree(PACK, ignore_errors=True)
    (PACK / "te").mkdir(parents=True)
    save_file(sd, PACK / "te" / "pruned.safetensors")
    shutil.copy(te / "config.json", PACK / "te" / "config.json")
    for f in (paths.MODEL_DIR / "tokenizer").iterdir():
        shutil.copy(f, PACK / "te" / f.name)
    (PACK / "whl").mkdir()
    for w in (ROOT / ".dev" / "whl").glob("*.whl"):
        shutil.copy(w, PACK / "whl" / w.name)
    size = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    print(f"packed {len(keep)} embedding rows; {size / 2**20:.1f} MiB in {PACK}")


def expand(src: Path, dst: Path) -> None:
    """Rebuild a loadable text-encoder folder from the pruned weights (unused rows are zero)."""
    import torch
    from safetensors.torch import load_file, save_file
    sd = load_file(src / "pruned.safetensors")
    name = next(k for k in sd if k.endswith("word_embeddings.weight"))
    rows = sd.pop(name + ".rows")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    full = torch.zeros(vocab, sd[name].shape[1], dtype=sd[name].dtype)
    full[rows] = sd[name]
    sd[name] = full
    dst.mkdir(parents=True, exist_ok=True)
    save_file(sd, dst / "model.safetensors")
    for f in src.iterdir():
        if f.name != "pruned.safetensors":
            shutil.copy(f, dst / f.name)


def train(minutes: float, steps: int, variants: list[str], out: Path) -> None:
    te = Path("/tmp/saam-te")
    expand(PACK / "te", te)
    env = dict(os.environ, SAAM_TEXT_ENCODER=str(te), PYTHONPATH=f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}")
    workers = max(2, (os.cpu_count() or 8) // len(variants) - 1)
    procs = {}
    for v in variants:
        run = Path("/tmp/saam-runs") / v
        cmd = [sys.executable, "-m", "saam.shapes.train", "unet", "--run", str(run), "--variant", v,
               "--init", str(ROOT / "data/shapesworld-model"), "--minutes", str(minutes), "--steps", str(steps),
               "--batch", "256", "--lr", "3e-4", "--warmup", "100", "--workers", str(workers)]
        procs[v] = (subprocess.Popen(cmd, env=env, stdout=open(f"/tmp/saam-{v}.log", "w"), stderr=subprocess.STDOUT), run)
    t0 = time.time()
    for v, (p, run) in procs.items():
        p.wait()
        print(f"{v}: exit {p.returncode} after {time.time() - t0:.0f}s", flush=True)
    # at most 8 files come back: two pieces per variant, one log, one set of curves
    (out / "train.log").write_text("".join(f"== {v}\n" + Path(f"/tmp/saam-{v}.log").read_text()[-4000:] for v in procs))
    curves = {v: [json.loads(l) for l in open(run / "unet-log.jsonl")] for v, (_, run) in procs.items()
              if (run / "unet-log.jsonl").exists()}
    (out / "curves.json").write_text(json.dumps(curves))
    for v, (p, run) in procs.items():
        if not (run / "unet.pt").exists():
            continue
        import torch
        st = torch.load(run / "unet.pt", map_location="cpu", weights_only=True)
        blob_path = run / "unet-fp16.pt"
        torch.save(dict(model={k: t.half() for k, t in st["model"].items()}, step=st["step"]), blob_path)
        blob = blob_path.read_bytes()
        for i in range(0, len(blob), PART):
            (out / f"{v}.part{i // PART}").write_bytes(blob[i:i + PART])
        print(f"{v}: step {st['step']}, {len(blob) / 2**20:.1f} MiB", flush=True)


def unpack(src: Path, variants: list[str]) -> None:
    from saam import paths
    from saam.shapes.train import assemble
    for v in variants:
        parts = sorted(src.glob(f"{v}.part*"), key=lambda f: int(f.suffix[5:]))
        if not parts:
            print(f"{v}: nothing came back")
            continue
        run = paths.RUNS / v
        run.mkdir(parents=True, exist_ok=True)
        (run / "unet.pt").write_bytes(b"".join(f.read_bytes() for f in parts))
        curves = json.loads((src / "curves.json").read_text()).get(v, []) if (src / "curves.json").exists() else []
        (run / "unet-log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curves))
        assemble(run, paths.DATA / "variants" / v, seed=0, variant=v, init=paths.MODEL_DIR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["pack", "train", "unpack"])
    ap.add_argument("src", nargs="?", type=Path)
    ap.add_argument("--minutes", type=float, default=7.0)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--variants", default="B,C,D")
    a = ap.parse_args()
    variants = a.variants.split(",")
    if a.stage == "pack":
        pack()
    elif a.stage == "train":
        out = Path(os.environ.get("OUT", "/tmp/saam-out"))
        out.mkdir(parents=True, exist_ok=True)
        train(a.minutes, a.steps, variants, out)
    else:
        unpack(a.src, variants)


if __name__ == "__main__":
    main()
