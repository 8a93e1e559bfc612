"""The ``saam`` command line: a word's map from one generation, and a model's head relevance.

    saam map "a red cube left of a blue ball" --model shapesworld --word cube -o out/
    saam map "a dog on a sofa" --model CompVis/stable-diffusion-v1-4 --word dog --heads top --k 0.25 -o out/
    saam heads --model CompVis/stable-diffusion-v1-4 -o heads/
    saam heads --model /models/sd21 --prompts prompts.txt -o heads/
    saam map "a dog on a sofa" --model /models/sd21 --word dog --heads top --relevance heads/relevance.npz -o out/
    saam explore "a dog on a sofa" "a red car" --model /models/sd3 --relevance heads/relevance.npz -o explore/

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
    from .models import check_model_folder, family_of, load_model, resolve, resolve_device
    try:
        resolve_device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device}: {e}; use --device cpu (or auto)") from None
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
    try:
        family = family_of(path)
    except ValueError as e:
        raise UsageError(f"--model {ref}: {e}") from None
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
    try:
        return load_model(p, path), p
    except (OSError, ValueError, RuntimeError) as e:
        import traceback
        if os.environ.get("SAAM_DEBUG"):
            traceback.print_exc()
        raise UsageError(f"--model {ref}: the weights in {path} do not load ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                         "a truncated or partial download? fetch the folder again (SAAM_DEBUG=1 shows the traceback)") from None


def concepts_for(params: dict) -> dict[str, list[str]]:
    from .relevance import load_concepts
    return load_concepts("hrv" if params.get("concepts", "hrv") == "hrv" else None)


def get_relevance(pipe, params: dict, source: str, prompts: Path | None, n: int | None, steps: int | None,
                  guidance: float | None, max_sequence_length: int | None = None):
    """Head relevance from ``source``: ``auto`` (published vectors where they fit, else the pass),
    ``published``, ``pass``, or the path of a ``relevance.npz`` that ``saam heads`` wrote."""
    from .family import UNET, is_joint
    from .relevance import PUBLISHED, load_published, relevance_pass
    if source not in ("auto", "published", "pass"):
        return relevance_file(Path(source), pipe, params)
    family = params.get("model")
    if source in ("auto", "published") and family in PUBLISHED and not is_joint(pipe):

        try:
            rel = load_published(family, {l: m.heads for l, m in UNET.layers(pipe.unet).items()})
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
        distinct = list(dict.fromkeys(lines))
        if len(distinct) < len(lines):
            print(f"saam: warning: {len(lines) - len(distinct)} of the {len(lines)} prompts repeat an earlier one and are "
                  f"left out ({len(distinct)} distinct): HRV counts votes over varied, unrelated prompts, and a repeat "
                  "adds only new noise", file=sys.stderr)
            lines = distinct
    elif family == "shapesworld":  # the chapters' own pass over ShapesWorld captions, cached per batch
        from .steps import relevance
        return relevance(pipe, dict(params, n_relevance_prompts=n or params["n_relevance_prompts"]))
    else:
        raise UsageError("this model has no published head relevance: give prompts for HRV's pass with "
                         "--prompts FILE (one per line; HRV used a few thousand unrelated prompts, 100+ is a start), "
                         "or --relevance DIR/relevance.npz from `saam heads`")
    # the pipeline's own guidance and steps unless given (the help says so); the organism: its profile's
    kw = dict(guidance=guidance if guidance is not None else params.get("guidance"))
    if is_joint(pipe) and max_sequence_length:
        kw["max_sequence_length"] = max_sequence_length
    steps = steps or params.get("steps") or call_default(pipe, "num_inference_steps")
    bs = params.get("batch_size", 4)
    print(f"saam: HRV's relevance pass over {len(lines)} prompt(s), {len(concepts_for(params))} concepts: "
          f"{-(-len(lines) // bs)} batches of {bs} x {steps} steps (a generation of each prompt, traced)", file=sys.stderr)
    if len(lines) < 16:
        print(f"saam: warning: {len(lines)} prompt(s) give few votes: many heads will tie (often at 0) and a top-k set "
              "is then completed by head order; HRV used thousands, 100+ is a start", file=sys.stderr)
    return relevance_pass(pipe, concepts_for(params), lines, steps=steps,
                          seed=params.get("seed", 0), batch_size=params.get("batch_size", 4), progress=True, **kw)


def call_default(pipe, name: str):
    """A pipeline call's default for ``name`` (``num_inference_steps``, ``guidance_scale``), from its signature."""
    import inspect
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def model_identity(pipe, params: dict) -> dict:
    """What a relevance file records of the model it was measured on: family, head layout, and the
    weights' fingerprint where the model is a folder."""
    from .family import of
    from .models import model_fingerprint
    from .steps import denoiser_heads
    heads = denoiser_heads(pipe)
    fp = None
    if params.get("model_path"):
        try:
            fp = model_fingerprint(params)
        except (OSError, ValueError):
            pass
    return dict(family=of(pipe).name, model=params.get("model"), path=params.get("model_path"), fingerprint=fp,
                n_heads=len(heads), layers=len({h.layer for h in heads}))


def relevance_file(f: Path, pipe, params: dict):
    """A ``relevance.npz`` (and its .json) from ``saam heads``, refused when its heads are not this
    model's (another model's file would pick heads by position), with a warning when its weights'
    fingerprint differs (a fine-tune of the same layout)."""
    from .relevance import Relevance
    from .steps import denoiser_heads
    if not f.exists() or not f.with_suffix(".json").exists():
        raise UsageError(f"--relevance {f}: no such file (with its .json beside it); "
                         "write one with `saam heads --model ... -o DIR` (DIR/relevance.npz)")
    try:
        rel = Relevance.load(f)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one message
        raise UsageError(f"--relevance {f}: not a relevance file written by `saam heads` ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    have, mine = list(rel.heads), denoiser_heads(pipe)
    said = rel.params.get("model_identity") or {}
    if have != mine:
        where = f" (it says it was measured on {said.get('family')} at {said.get('path')})" if said else ""
        raise UsageError(f"--relevance {f}: its {len(have)} heads in {len({h.layer for h in have})} layers are not this "
                         f"model's {len(mine)} heads in {len({h.layer for h in mine})} layers{where}: relevance from "
                         "another model would pick heads by position; run `saam heads` on this model")
    fp = model_identity(pipe, params)["fingerprint"]
    if said.get("fingerprint") and fp and said["fingerprint"] != fp:
        print(f"saam: warning: --relevance {f} was measured on weights with fingerprint {said['fingerprint']}, this "
              f"model's is {fp} (same heads, other weights: a fine-tune?); its head ranking may not hold", file=sys.stderr)
    elif not said:
        print(f"saam: warning: --relevance {f} does not say which model it came from (written before saam recorded "
              "it); its heads match this model's layout", file=sys.stderr)
    return rel


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
    from .capture import trace
    from .family import is_joint
    from .models import guidance_arg
    kw = dict(generator=torch.Generator().manual_seed(a.seed), output_type="np")
    steps = a.steps or params.get("steps")
    guidance = a.guidance if a.guidance is not None else params.get("guidance")
    if steps:
        kw["num_inference_steps"] = steps
    kw.update(guidance_arg(guidance))
    if a.size:
        kw.update(height=a.size, width=a.size)
        import inspect
        if "use_resolution_binning" in inspect.signature(type(pipe).__call__).parameters:
            kw["use_resolution_binning"] = False  # PixArt would generate at its nearest trained size and resize
    if a.max_sequence_length:
        kw["max_sequence_length"] = a.max_sequence_length
    with trace(pipe, words=None if is_joint(pipe) else words) as tc:
        image = pipe(prompt=a.prompt, **kw).images[0]
    return image, tc[0]


def check_out(out: Path, marker: str = "maps.json", command: str = "saam map") -> Path:
    """The output folder, checked before any work: not a file, in a writable place, and either new,
    empty or a previous output of the command (``marker`` in it), which a successful run replaces."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: a file is there; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise UsageError(f"-o {out}: the folder holds other files and no {marker} of an earlier `{command}`; "
                         "give a new or empty folder (nothing was written)")
    parent = next((d for d in (out, *out.parents) if d.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {out}: cannot write in {parent}")
    return out


def check_size(pipe, size: int | None) -> None:
    """``--size`` must give whole latent patches: a multiple of the VAE's factor times the
    denoiser's (UNet: its down-sampling; MM-DiT: its patch, packed 2x2 where the family packs)."""
    if not size:
        return
    from .family import of
    fam = of(pipe)
    den = fam.denoiser(pipe)
    vae = getattr(pipe, "vae_scale_factor", 8)
    cfg = den.config
    if "down_block_types" in cfg:  # a UNet
        inner = 2 ** (len(cfg["down_block_types"]) - 1)
    else:  # a transformer: whole patches (Flux-style packing: 2 x 2 latents a token)
        inner = int(cfg.get("patch_size") or 1) * (2 if fam.packed else 1)
    step = vae * inner
    if size % step:
        raise UsageError(f"--size {size}: this model needs a multiple of {step} pixels (the VAE's {vae} x the "
                         f"denoiser's {inner}); e.g. {max(step, size // step * step)} or {(size // step + 1) * step}")


def check_words(pipe, prompt: str, words: list[str]) -> None:
    """Every ``--word`` is a word of the prompt inside the text encoders' windows, before generating."""
    from .family import of
    from .words import WordNotFound, split_words, token_positions
    fam = of(pipe)
    for w in words:
        if not w.strip():
            raise UsageError("--word '': give a word of the prompt")
    if fam.dit:
        segs = fam.text_segments(pipe, 10**6)  # the windows past the first are the pipeline's (checked after tracing)
    else:
        segs = [(0, pipe.tokenizer, pipe.tokenizer.model_max_length)]
    for w in words:
        errors = []
        for _, tok, length in segs:
            try:
                token_positions(prompt, w, tok, max_length=length if length < 10**5 else None)
                break
            except (WordNotFound, ValueError) as e:
                errors.append(str(e))
        else:
            raise UsageError(f"--word {w!r}: {errors[0]} (the prompt's words: {', '.join(split_words(prompt))}; nothing "
                             "was generated)")


def _stems(words: list[str]) -> dict[str, str]:
    """A distinct file stem per word (words that sanitise alike, such as emoji, get -2, -3, ...)."""
    out, used = {}, set()
    for w in words:
        base = _safe(w)
        stem, n = base, 1
        while stem in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem)
        out[w] = stem
    return out


def cmd_map(a) -> None:
    import shutil
    import tempfile
    import numpy as np
    from PIL import Image
    from .aggregate import normalize, word_map
    from .family import of
    from .headmaps import CaptureError
    from .select import boundary_ties, eligible, head_set, resolve_k
    out = check_out(a.out)
    words = list(dict.fromkeys(a.word))  # a word given twice is mapped once
    pipe, params = open_model(a.model, a.device, a.precision)
    pipe.set_progress_bar_config(disable=a.quiet)
    check_size(pipe, a.size)
    check_words(pipe, a.prompt, words)
    rel, concepts = None, {}
    if a.heads != "daam":
        rel = get_relevance(pipe, params, a.relevance, a.prompts, a.n_prompts, a.steps, a.guidance,
                            a.max_sequence_length)
        for word in words:
            concepts[word] = a.concept or infer_concept(word, rel)
            try:
                rel.row(concepts[word])
            except KeyError as e:
                raise UsageError(f"--concept: {e.args[0]}") from None
        try:
            resolve_k(a.k, len(rel.heads))
        except ValueError as e:
            raise UsageError(f"--k {a.k}: {e}") from None
    image, hm = _generate(pipe, params, a, words)
    fam = of(pipe)
    img8 = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    steps = a.steps or params.get("steps") or call_default(pipe, "num_inference_steps")
    guidance = a.guidance if a.guidance is not None else params.get("guidance")
    about = dict(prompt=a.prompt, model=a.model, model_path=params.get("model_path"), family=fam.name,
                 steps=steps, guidance=guidance if guidance is not None else f"the pipeline's ({call_default(pipe, 'guidance_scale')})",
                 size=list(img8.shape[:2]), seed=a.seed, device=a.device, precision=a.precision, heads=a.heads,
                 k=a.k if a.heads in ("top", "bottom") else None, words={})
    stems = _stems(words)
    arrays, results = {}, {}
    for word in words:
        try:
            hm.token_positions(word)
        except (KeyError, ValueError, CaptureError) as e:
            raise UsageError(f"--word {word!r}: {e}") from None
        if rel is None:
            m = word_map(hm, word)
            info = dict(heads=f"DAAM's ({fam.daam_heads})")
        else:
            try:
                hs = head_set(a.heads, rel.heads, rel.row(concepts[word]), a.k,
                              mask=eligible(rel.heads, factors=hm.layer_factors), concept=concepts[word])
            except ValueError as e:
                raise UsageError(f"--heads {a.heads} --k {a.k}: {e}") from None
            m = word_map(hm, word, heads=hs.heads, weights=hs.weights)
            info = dict(concept=concepts[word], k=a.k, heads=[str(h) for h in hs.heads])
            if a.heads in ("top", "bottom"):
                mask = eligible(rel.heads, factors=hm.layer_factors)
                ties = boundary_ties(rel.row(concepts[word]), hs.index, mask)
                if ties:
                    last = float(rel.row(concepts[word])[hs.index[-1]])
                    info["tied_left_out"] = ties
                    print(f"saam: warning: --word {word!r}: the {a.heads}-k set's last head has relevance {last:.4g}, and "
                          f"{ties} eligible head(s) left out have the same: the set was completed by head order, not "
                          "relevance (more relevance prompts break such ties)", file=sys.stderr)
        full = normalize(m, img8.shape[:2]).numpy()
        arrays[word], arrays[f"{word}@image"] = m.numpy(), full
        info["files"] = [f"{stems[word]}-map.png", f"{stems[word]}-overlay.png"]
        about["words"][word] = info
        results[word] = full
    # every file of the run in a fresh folder beside the output, then swapped in whole: all or nothing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        import matplotlib.pyplot as plt
        from .plots import MAP_CMAP, plot_overlay
        Image.fromarray(img8).save(tmp / "image.png")
        for word, full in results.items():
            plt.imsave(tmp / f"{stems[word]}-map.png", full, cmap=MAP_CMAP, vmin=0, vmax=1)
            fig, ax = plt.subplots(figsize=(4, 4))
            plot_overlay(img8, full, ax, normalise=False)
            ax.set_axis_off()
            fig.savefig(tmp / f"{stems[word]}-overlay.png", bbox_inches="tight", pad_inches=0, dpi=max(100, img8.shape[0] // 3))
            plt.close(fig)
        np.savez_compressed(tmp / "maps.npz", **arrays)
        (tmp / "maps.json").write_text(json.dumps(about, indent=1, ensure_ascii=False))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saam: wrote {out}/image.png, " + ", ".join(f"{stems[w]}-map.png, {stems[w]}-overlay.png" for w in words)
          + ", maps.npz (each word's map at latent size, and '<word>@image' at image size) and maps.json")


def cmd_explore(a) -> None:
    """The head explorer (``explorer.write_page``) for one's own model and prompts: each prompt
    generated and traced, each word's heads ranked by relevance to its concept, with their maps;
    no masks, so no IoU."""
    import argparse as _ap
    from .aggregate import DAAM_TAU
    from .cache import atomic_write
    from .evaluate import records_of
    from .explorer import write_page
    from .relevance import load_concepts
    from .select import eligible
    from .steps import denoiser_heads
    from .words import split_words
    out = check_out(a.out, "explorer.html", "saam explore")
    pipe, params = open_model(a.model, a.device, a.precision)
    pipe.set_progress_bar_config(disable=a.quiet)
    check_size(pipe, a.size)
    rel = get_relevance(pipe, params, a.relevance, a.prompts, a.n_prompts, a.steps, a.guidance, a.max_sequence_length)
    lists = load_concepts("hrv")
    plan = []  # per prompt: [(word, concept)]
    for prompt in a.prompt:
        if a.word:
            words = [w for w in dict.fromkeys(a.word) if w.lower() in (t.lower() for t in split_words(prompt))]
        else:  # every word that one HRV concept's word list holds
            words = [w for w in dict.fromkeys(split_words(prompt))
                     if sum(w.lower() in (x.lower() for x in ws) for c, ws in lists.items() if c in rel.concepts) == 1]
        check_words(pipe, prompt, words)
        plan.append([(w, a.concept or infer_concept(w, rel)) for w in words])
    if not any(plan):
        raise UsageError("no word to explore: none of the prompts' words is in an HRV concept's word list; name them with "
                         "--word (and --concept)")
    heads = denoiser_heads(pipe)
    recs, images, mask = [], [], None
    for i, (prompt, words) in enumerate(zip(a.prompt, plan)):
        image, hm = _generate(pipe, params, _ap.Namespace(**{**vars(a), "prompt": prompt, "seed": a.seed + i}), None)
        images.append(image)
        recs += records_of(hm, prompt, [(w, 0, c, 0, None, None) for w, c in words], i, heads, n_objects=0)
        mask = eligible(rel.heads, factors=hm.layer_factors)
    p = dict(k=a.k, tau=DAAM_TAU, profile=f"{a.model}")
    out.mkdir(parents=True, exist_ok=True)
    page = write_page(out / ".explorer.html.part", recs, rel, images, p, n_images=len(images), mask=mask,
                      require_masks=False)
    os.replace(page, out / "explorer.html")
    atomic_write(out / "explore.json", json.dumps(dict(prompts=a.prompt, model=a.model, words=[dict(plan_) for plan_ in plan],
                                                       k=a.k, seed=a.seed), indent=1, ensure_ascii=False).encode())
    print(f"saam: wrote {out}/explorer.html ({len(recs)} word(s) in {len(images)} image(s); open it in a browser) "
          "and explore.json")


def cmd_heads(a) -> None:
    import numpy as np
    import pandas as pd
    from .plots import relevance_histograms
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: a file is there; give a folder")
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
    rel.params["model_identity"] = model_identity(pipe, params)
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
    import math
    if not math.isfinite(v) or v <= 0 or (v > 1 and not v.is_integer()):
        raise argparse.ArgumentTypeError(f"{text}: a fraction in (0, 1] or a whole number of heads")
    return int(v) if v > 1 else v


def _guidance(text: str) -> float:
    import math
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text}: a guidance scale is a finite number >= 0 (1: no guidance)")
    return v


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
    sub = ap.add_subparsers(dest="command", required=True, metavar="{map,heads,explore}")

    def common(p):
        p.add_argument("--model", required=True, help="a diffusers folder, a Hugging Face repo id in the local cache, or 'shapesworld'")
        p.add_argument("-o", "--out", required=True, help="output folder (created)")
        p.add_argument("--relevance", default="auto", help="auto (default) | published | pass | PATH of a relevance.npz from `saam heads`")
        p.add_argument("--prompts", type=Path, help="a text file of prompts (one per line) for HRV's relevance pass")
        p.add_argument("--n-prompts", type=_positive, help="use only the first N prompts")
        p.add_argument("--concept", action="append", help="an HRV concept (e.g. Color, Animals); map: the word's, else inferred from HRV's word lists")
        p.add_argument("--steps", type=_positive, help="denoising steps (default: the pipeline's; shapesworld: the paper profile's)")
        p.add_argument("--guidance", type=_guidance, help="classifier-free guidance scale (default: the pipeline's; shapesworld: the paper profile's)")
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
    e = sub.add_parser("explore", help="the head explorer for your model and prompts: one HTML page",
                       description="Generate each PROMPT, trace it, and write explorer.html: for each word, DAAM's, top-k's "
                                   "and bottom-k's maps and every head's own map, ranked by relevance to the word's concept "
                                   "(no masks: no IoU).",
                       epilog="examples:\n" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("prompt", nargs="+", help="one or more prompts to generate and explore")
    common(e)
    e.add_argument("--word", action="append", help="words to explore (default: every word in an HRV concept's list)")
    e.add_argument("--k", type=_k, default=0.25, help="top/bottom-k shown (a fraction of the eligible heads or a count)")
    e.add_argument("--seed", type=int, default=0, help="the first prompt's seed (the next prompts': seed + 1, ...)")
    e.add_argument("--size", type=_positive, help="image height and width in pixels (default: the model's)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(run=cmd_explore)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if a.command == "map" and a.concept and len(a.concept) > 1:
        ap.error("map: give --concept once (the words' concept), or leave it out to infer each word's")
    if a.command in ("map", "explore"):
        if a.command == "explore" and a.concept and len(a.concept) > 1:
            ap.error("explore: give --concept once, or leave it out to infer each word's")
        a.concept = a.concept[0] if a.concept else None
    if a.command == "map":
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
