"""The ``saam`` command line: a word's map from one generation, and a model's head relevance.

    saam map "a red cube left of a blue ball" --model shapesworld --word cube -o out/
    saam map "a dog on a sofa" --model CompVis/stable-diffusion-v1-4 --word dog --heads top --k 0.25 -o out/
    saam heads --model CompVis/stable-diffusion-v1-4 -o heads/
    saam heads --model /models/sd21 --prompts prompts.txt -o heads/
    saam map "a dog on a sofa" --model /models/sd21 --word dog --heads top --relevance heads/relevance.npz -o out/

``--model`` is a diffusers folder, a Hugging Face repo id already in the local Hugging Face cache
(never downloaded: ``models.resolve``) or ``shapesworld`` (the paper profile's organism). Head sets
other than DAAM's need head relevance for the word's concept: HRV's published vectors where they
exist for the model (SD v1.4 layout, SDXL), else HRV's pass over prompts you give (``--prompts``),
or a ``relevance.npz`` that ``saam heads`` wrote. Everything runs offline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXAMPLES = __doc__.split("\n\n")[1]
HEADS = ("daam", "top", "bottom", "soft")


class UsageError(Exception):
    """Bad input from the command line: printed as ``saam: error: ...`` with what to do."""


# ------------------------------------------------------------------ model and relevance

def open_model(ref: str, device: str = "auto", precision: str = "auto"):
    """(pipeline, params) for ``--model``: the organism, a folder or a cached repo id."""
    from .models import check_model_folder, family_of, load_model, resolve
    if ref == "shapesworld":
        from .profiles import load as load_profile
        p = load_profile("paper")
        p.update(device=device, precision=precision)
        return load_model(p), p
    try:
        path = resolve(ref)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if not (path / "model_index.json").exists():
        raise UsageError(f"--model {ref}: {path} has no model_index.json; give a diffusers folder, a Hugging Face "
                         "repo id in the local cache, or 'shapesworld'")
    family = family_of(path)
    p = dict(profile=f"--model {ref}", model=family or "other", model_path=str(path), device=device,
             precision=precision, steps=None, guidance=None, batch_size=4, seed=0, concepts="hrv")
    if family == "shapesworld":
        from .profiles import load as load_profile
        p = dict(load_profile("paper"), model_path=str(path), device=device, precision=precision)
    elif family is not None:
        try:
            check_model_folder(path, family, p["profile"])
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
    return load_model(p, path), p


def concepts_for(params: dict) -> dict[str, list[str]]:
    from .relevance import load_concepts
    return load_concepts("hrv" if params.get("concepts", "hrv") == "hrv" else None)


def get_relevance(pipe, params: dict, source: str, prompts: Path | None, n: int | None, steps: int | None,
                  guidance: float | None, max_sequence_length: int | None = None):
    """Head relevance from ``source``: ``auto`` (published vectors where they fit, else the pass),
    ``published``, ``pass``, or the path of a ``relevance.npz`` that ``saam heads`` wrote."""
    from .capture import is_dit
    from .relevance import PUBLISHED, Relevance, load_published, relevance_pass
    if source not in ("auto", "published", "pass"):
        f = Path(source)
        if not f.exists() or not f.with_suffix(".json").exists():
            raise UsageError(f"--relevance {source}: no such file (with its .json beside it); "
                             "write one with `saam heads --model ... -o DIR` (DIR/relevance.npz)")
        return Relevance.load(f)
    family = params.get("model")
    if source in ("auto", "published") and family in PUBLISHED and not is_dit(pipe):
        from .capture import cross_attention_layers
        try:
            rel = load_published(family, {l: m.heads for l, m in cross_attention_layers(pipe.unet).items()})
            print(f"saam: head relevance from HRV's published {family} vectors (data/hrv)", file=sys.stderr)
            return rel
        except ValueError as e:
            if source == "published":
                raise UsageError(f"HRV's published {family} vectors do not fit this model: {e}") from None
    elif source == "published":
        raise UsageError(f"HRV published vectors for {sorted(PUBLISHED)} only; this model is {family!r}: "
                         "use --relevance pass --prompts FILE")
    if prompts is not None:
        if not prompts.exists():
            raise UsageError(f"--prompts {prompts}: no such file (one prompt per line)")
        lines = [l.strip() for l in prompts.read_text(encoding="utf-8").splitlines() if l.strip()]
        if not lines:
            raise UsageError(f"--prompts {prompts}: no prompts in it (one per line)")
        lines = lines[:n] if n else lines
    elif family == "shapesworld":  # the chapters' own pass over ShapesWorld captions, cached per batch
        from .steps import relevance
        return relevance(pipe, dict(params, n_relevance_prompts=n or params["n_relevance_prompts"]))
    else:
        raise UsageError("this model has no published head relevance: give prompts for HRV's pass with "
                         "--prompts FILE (one per line; HRV used a few thousand unrelated prompts, 100+ is a start), "
                         "or --relevance DIR/relevance.npz from `saam heads`")
    kw = {} if guidance is None else dict(guidance=guidance)
    if is_dit(pipe) and max_sequence_length:
        kw["max_sequence_length"] = max_sequence_length
    print(f"saam: HRV's relevance pass over {len(lines)} prompt(s), {len(concepts_for(params))} concepts", file=sys.stderr)
    return relevance_pass(pipe, concepts_for(params), lines, steps=steps or params.get("steps") or 30,
                          seed=params.get("seed", 0), batch_size=params.get("batch_size", 4), progress=True, **kw)


def infer_concept(word: str, rel) -> str:
    """The HRV concept whose word list holds ``word`` (HRV's 34 concepts, ten words each)."""
    from .relevance import load_concepts
    hits = [c for c, ws in load_concepts("hrv").items() if word.lower() in (w.lower() for w in ws) and c in rel.concepts]
    if len(hits) != 1:
        raise UsageError(f"--concept is needed for --heads top/bottom/soft: the word {word!r} is "
                         + ("in none of" if not hits else f"in several of ({', '.join(hits)})")
                         + f" the concepts' word lists; choose one of: {', '.join(rel.concepts)}")
    return hits[0]


# ------------------------------------------------------------------ commands

def _generate(pipe, params: dict, a, words: list[str] | None):
    import torch
    from .capture import is_dit, trace
    from .models import guidance_arg
    kw = dict(generator=torch.Generator().manual_seed(a.seed), output_type="np")
    steps = a.steps or params.get("steps")
    guidance = a.guidance if a.guidance is not None else params.get("guidance")
    if steps:
        kw["num_inference_steps"] = steps
    kw.update(guidance_arg(guidance))
    if a.size:
        kw.update(height=a.size, width=a.size)
    if a.max_sequence_length:
        kw["max_sequence_length"] = a.max_sequence_length
    with trace(pipe, words=None if is_dit(pipe) else words) as tc:
        image = pipe(prompt=a.prompt, **kw).images[0]
    return image, tc[0]


def cmd_map(a) -> None:
    import numpy as np
    from PIL import Image
    from .aggregate import normalize, word_map
    from .headmaps import CaptureError
    from .select import eligible, head_set
    pipe, params = open_model(a.model, a.device, a.precision)
    pipe.set_progress_bar_config(disable=a.quiet)
    image, hm = _generate(pipe, params, a, a.word)
    rel = None
    if a.heads != "daam":
        rel = get_relevance(pipe, params, a.relevance, a.prompts, a.n_prompts, a.steps, a.guidance,
                            a.max_sequence_length)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    img8 = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(img8).save(out / "image.png")
    arrays, about = {}, dict(prompt=a.prompt, model=a.model, heads=a.heads, seed=a.seed, words={})
    for word in a.word:
        try:
            hm.token_positions(word)
        except (KeyError, ValueError, CaptureError) as e:
            raise UsageError(f"--word {word!r}: {e}") from None
        if rel is None:
            m, info = word_map(hm, word), dict(heads="DAAM's (every down and up block head)")
        else:
            concept = a.concept or infer_concept(word, rel)
            try:
                row = rel.row(concept)
            except KeyError as e:
                raise UsageError(f"--concept: {e.args[0]}") from None
            hs = head_set(a.heads, rel.heads, row, a.k, mask=eligible(rel.heads, factors=hm.layer_factors),
                          concept=concept)
            m = word_map(hm, word, heads=hs.heads, weights=hs.weights)
            info = dict(concept=concept, k=a.k, heads=[str(h) for h in hs.heads])
        about["words"][word] = info
        full = normalize(m, img8.shape[:2]).numpy()
        arrays[word] = m.numpy()
        arrays[f"{word}@image"] = full
        stem = _safe(word)
        import matplotlib.pyplot as plt
        from .plots import MAP_CMAP, plot_overlay
        plt.imsave(out / f"{stem}-map.png", full, cmap=MAP_CMAP, vmin=0, vmax=1)
        fig, ax = plt.subplots(figsize=(4, 4))
        plot_overlay(img8, full, ax, normalise=False)
        ax.set_axis_off()
        fig.savefig(out / f"{stem}-overlay.png", bbox_inches="tight", pad_inches=0, dpi=max(100, img8.shape[0] // 3))
        plt.close(fig)
    np.savez_compressed(out / "maps.npz", **arrays)
    (out / "maps.json").write_text(json.dumps(about, indent=1))
    print(f"saam: wrote {out}/image.png, " + ", ".join(f"{_safe(w)}-map.png, {_safe(w)}-overlay.png" for w in a.word)
          + ", maps.npz (each word's map at latent size, and '<word>@image' at image size) and maps.json")


def cmd_heads(a) -> None:
    import numpy as np
    import pandas as pd
    from .plots import relevance_histograms
    pipe, params = open_model(a.model, a.device, a.precision)
    pipe.set_progress_bar_config(disable=True)
    rel = get_relevance(pipe, params, a.relevance, a.prompts, a.n_prompts, a.steps, a.guidance,
                            a.max_sequence_length)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    concepts = a.concept or rel.concepts
    for c in concepts:
        try:
            rel.row(c)
        except KeyError as e:
            raise UsageError(f"--concept: {e.args[0]}") from None
    rel.save(out / "relevance.npz")
    rows = []
    for c in concepts:
        r = rel.row(c)
        for rank, i in enumerate(np.argsort(-r, kind="stable")[:a.top], 1):
            rows.append(dict(concept=c, rank=rank, head=str(rel.heads[i]), relevance=float(r[i])))
    table = pd.DataFrame(rows)
    table.to_csv(out / "top-heads.csv", index=False)
    (out / "top-heads.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")
    fig = relevance_histograms(rel, concepts[:a.histograms])
    fig.savefig(out / "relevance-hist.png", dpi=120, bbox_inches="tight")
    for c in concepts[:3]:
        print(f"{c}: " + ", ".join(f"{r.head} {r.relevance:.2f}" for r in table[table.concept == c].itertuples()))
    print(f"saam: wrote {out}/relevance.npz (+ .json: reuse with `saam map --relevance`), top-heads.csv, "
          "top-heads.md, relevance-hist.png")


def _safe(word: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in word) or "word"


def _k(text: str) -> float | int:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: a fraction in (0, 1] or a head count") from None
    if v <= 0 or (v > 1 and not v.is_integer()):
        raise argparse.ArgumentTypeError(f"{text}: a fraction in (0, 1] or a whole number of heads")
    return int(v) if v > 1 else v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return v


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="saam", description="Selectively aggregated attention maps of diffusion models.",
                                 epilog="examples:\n" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{map,heads}")

    def common(p):
        p.add_argument("--model", required=True, help="a diffusers folder, a Hugging Face repo id in the local cache, or 'shapesworld'")
        p.add_argument("-o", "--out", required=True, help="output folder (created)")
        p.add_argument("--relevance", default="auto", help="auto (default) | published | pass | PATH of a relevance.npz from `saam heads`")
        p.add_argument("--prompts", type=Path, help="a text file of prompts (one per line) for HRV's relevance pass")
        p.add_argument("--n-prompts", type=_positive, help="use only the first N prompts")
        p.add_argument("--concept", action="append", help="an HRV concept (e.g. Color, Animals); map: the word's, else inferred from HRV's word lists")
        p.add_argument("--steps", type=_positive, help="denoising steps (default: the pipeline's; shapesworld: the paper profile's)")
        p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
        p.add_argument("--device", default="auto", help="auto (CUDA in fp16 where present, else CPU) | cpu | cuda | cuda:N")
        p.add_argument("--max-sequence-length", type=_positive, help="MM-DiTs: T5's window (the pipeline's max_sequence_length)")
        p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="CPU arithmetic (default: bf16 where the CPU has it)")

    m = sub.add_parser("map", help="generate an image and write a word's map and overlay",
                       description="Generate PROMPT, trace it, and write image.png, <word>-map.png, <word>-overlay.png, maps.npz.",
                       epilog="examples:\n" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("prompt")
    common(m)
    m.add_argument("--word", action="append", required=True, help="a word of the prompt (repeat for several)")
    m.add_argument("--heads", choices=HEADS, default="daam", help="daam (every head DAAM hooks; default), top / bottom (the k most / least relevant to the concept), soft (relevance-weighted)")
    m.add_argument("--k", type=_k, default=0.25, help="top/bottom: a fraction of the eligible heads (default 0.25) or a count")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--size", type=_positive, help="image height and width in pixels (default: the model's)")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    m.set_defaults(run=cmd_map)
    h = sub.add_parser("heads", help="a model's head relevance: histogram and top heads per concept",
                       description="Head relevance (HRV) of a model: relevance.npz, top-heads.csv/.md, relevance-hist.png.",
                       epilog="examples:\n" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(h)
    h.add_argument("--top", type=_positive, default=10, help="heads listed per concept (default 10)")
    h.add_argument("--histograms", type=_positive, default=6, help="concepts drawn in the histogram figure (default 6)")
    h.set_defaults(run=cmd_heads)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if a.command == "map" and a.concept and len(a.concept) > 1:
        ap.error("map: give --concept once (the words' concept), or leave it out to infer each word's")
    if a.command == "map":
        a.concept = a.concept[0] if a.concept else None
        if a.heads == "daam" and (a.concept or a.relevance != "auto" or a.prompts):
            ap.error("--concept, --relevance and --prompts choose relevant heads: use them with --heads top, bottom or soft")
    try:
        a.run(a)
    except UsageError as e:
        print(f"saam: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
