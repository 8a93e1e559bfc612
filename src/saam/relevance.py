"""Head relevance to visual concepts, as HRV measures it, and HRV's published vectors.

At every cross-attention call of an ordinary generation, one random word per concept is drawn
for each image, from that image's own seeded stream (HRV generates one image at a time; here a
batch of 16 draws what 16 batches of 1 draw, so the votes do not depend on the batch size);
the words, each encoded alone with the pipeline's own text encoder (start/end tokens dropped),
are concatenated into a pseudo-context and projected by *that layer's* key projection. As in
HRV's code, the first word keeps its start token (``start_token=True``): it sits in every softmax
denominator and is never scored, and where the model uses the start token as an attention sink
(SD) it takes the mass that idle pixels would otherwise spread over the concept words. Softmax
attention from the layer's conditional-branch queries over the pseudo-context is averaged over
pixels and over each word's tokens, giving a [heads, concepts] score; each head votes for its
argmax concept. Votes are counted per (image, step). Relevance normalises them as HRV does:
per head, the fraction of (image, step) pairs each concept wins; then each concept's row is
rescaled to sum to H, so mean relevance is 1. Generation itself is untouched: the probe runs
beside the original attention processor (tested).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from .cache import cached
from .capture import Observer, check_pipeline, install
from .crossattn import keys, probs
from .family import is_joint
from .heads import HeadId, from_hrv_names, head_ids
from .rules import RuleStats
from .models import guidance_arg
from .votes import VoteCounter, normalize_votes
from .words import token_positions


@dataclass
class Relevance:
    """Relevance of every head to every concept.

    Attributes:
        concepts: concept names (rows).
        heads: head ids (columns), HRV order (down, mid, up).
        matrix: [concepts, heads]; each row sums to H (mean 1).
        votes: [timesteps, heads, concepts] vote counts (None for published vectors).
        timesteps: scheduler timestep of each votes row.
        prompt_votes: [prompts, heads, concepts] vote counts per prompt (for CIs over prompts).
        params: what produced it.
        prompt_stats: per prompt, what the pre-registered mask-free rules read (``saam.rules``):
            name -> [prompts, heads, concepts]; None where the pass kept none (published vectors,
            an MM-DiT's concept stream).
    """
    concepts: list[str]
    heads: list[HeadId]
    matrix: np.ndarray
    votes: np.ndarray | None = None
    timesteps: list[int] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    prompt_votes: np.ndarray | None = None
    prompt_stats: dict[str, np.ndarray] | None = None

    def row(self, concept: str) -> np.ndarray:
        """A concept's relevance over heads; the name matches case-insensitively ("color" = "Color")."""
        return self.matrix[self.index(concept)]

    def index(self, concept: str) -> int:
        if concept in self.concepts:
            return self.concepts.index(concept)
        hits = [i for i, c in enumerate(self.concepts) if c.lower() == str(concept).lower()]
        if len(hits) != 1:
            raise KeyError(f"unknown concept {concept!r}; known: {self.concepts}")
        return hits[0]

    def per_timestep(self) -> np.ndarray:
        """[timesteps, concepts, heads] relevance from each step's votes alone."""
        if self.votes is None:
            raise ValueError("no votes kept (published vectors carry none)")
        return np.stack([normalize_votes(v) for v in self.votes])

    @property
    def layer_heads(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.heads:
            out[h.layer] = max(out.get(h.layer, 0), h.head + 1)
        return out

    def save(self, path: Path) -> None:
        from .cache import atomic_write
        import io
        buf = io.BytesIO()
        np.savez(buf, matrix=self.matrix, votes=self.votes if self.votes is not None else np.zeros(0),
                 timesteps=np.array(self.timesteps),
                 prompt_votes=self.prompt_votes if self.prompt_votes is not None else np.zeros(0),
                 **{f"stat_{k}": v for k, v in (self.prompt_stats or {}).items()})
        atomic_write(Path(path), buf.getvalue())
        meta = dict(concepts=self.concepts, heads=[list(h) for h in self.heads], params=self.params)
        atomic_write(Path(path).with_suffix(".json"), json.dumps(meta, indent=1, default=str).encode())

    @classmethod
    def load(cls, path: Path) -> "Relevance":
        z = np.load(Path(path))
        meta = json.loads(Path(path).with_suffix(".json").read_text())
        votes = z["votes"] if z["votes"].size else None
        pv = z["prompt_votes"] if "prompt_votes" in z and z["prompt_votes"].size else None
        stats = {k[5:]: z[k] for k in z.files if k.startswith("stat_")} or None
        return cls(meta["concepts"], [HeadId(l, int(h)) for l, h in meta["heads"]], z["matrix"],
                   votes, [int(t) for t in z["timesteps"]], meta["params"], pv, stats)


def timestep_stability(rel: Relevance, concepts: Sequence[str], k: float = 0.25, windows: int = 5):
    """How stable each concept's top-k heads are over the denoising: the Jaccard overlap of each
    timestep window's top-k (from that window's votes alone) with the overall top-k.

    Returns:
        a table with columns concept, window (1 = earliest), jaccard, k_heads.
    """
    import pandas as pd
    per = rel.per_timestep()  # [T, C, H]
    T, _, H = per.shape
    kk = max(1, int(round(k * H)))
    edges = np.linspace(0, T, windows + 1).astype(int)
    rows = []
    for c in concepts:
        ci = rel.index(c)
        overall = set(np.argsort(-rel.matrix[ci])[:kk])
        for w, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            win = set(np.argsort(-per[a:b, ci].mean(0))[:kk])
            rows.append(dict(concept=c, window=w + 1, jaccard=len(win & overall) / len(win | overall), k_heads=kk))
    return pd.DataFrame(rows)


def concentration(matrix_row: np.ndarray, top: float = 0.25) -> float:
    """Share of a concept's relevance held by its ``top`` fraction of heads (SD v1.4's: ``analyses.published_concentration``)."""
    r = np.sort(np.asarray(matrix_row, dtype=np.float64))[::-1]
    k = max(1, int(round(top * len(r))))
    return float(r[:k].sum() / r.sum()) if r.sum() > 0 else float("nan")


def specialisation(matrix_row: np.ndarray) -> float:
    """1 - the normalised entropy of a concept's relevance over heads: 0 when every head is equally
    relevant, 1 when one head holds it all. Unlike the top-25 % share it does not depend on the
    number of heads (a uniform row scores 0 at any head count), so models with 44 and 88 heads
    compare like with like."""
    r = np.asarray(matrix_row, dtype=np.float64)
    if r.sum() <= 0 or len(r) < 2:
        return float("nan")
    q = r / r.sum()
    q = q[q > 0]
    return float(1 + (q * _log(q)).sum() / np.log(len(r)))


def _log(x: np.ndarray) -> np.ndarray:
    """``np.log(x)`` computed on 64-byte aligned copies: numpy's vectorised log rounds some last
    bits differently depending on where its arrays start in memory, so the memory allocator
    (glibc's, or the tcmalloc ``make all`` preloads) would otherwise decide them (tested)."""
    buf = np.empty(2 * x.size + 16, np.float64)
    i = (-buf.ctypes.data % 64) // 8
    j = i + x.size + (-x.size % 8)
    a, out = buf[i:i + x.size], buf[j:j + x.size]
    a[:] = x
    return np.log(a, out=out).copy()


def concentration_table(rel: "Relevance", concepts: list[str] | None = None, top: float = 0.25,
                        n_boot: int = 1000, seed: int = 0):
    """Concentration per concept (``top_share``) and the head-count-free :func:`specialisation`
    (``spec``), each with a percentile bootstrap 95 % CI over prompts.

    Prompts are resampled with replacement and the relevance renormalised from their votes, so
    the CI shows how much the share would move with another prompt set (fewer prompts give a
    noisier and, by chance, larger share).
    """
    import pandas as pd
    idx = [rel.index(c) for c in (concepts or rel.concepts)]
    concepts = [rel.concepts[i] for i in idx]
    point = [concentration(rel.matrix[i], top) for i in idx]
    spec = [specialisation(rel.matrix[i]) for i in idx]
    lo = hi = slo = shi = [float("nan")] * len(idx)
    if rel.prompt_votes is not None and len(rel.prompt_votes) > 1:
        pv = rel.prompt_votes
        rng = np.random.default_rng(seed)
        boots = np.array([[(concentration(m[i], top), specialisation(m[i])) for i in idx]
                          for m in (normalize_votes(pv[rng.integers(0, len(pv), len(pv))]) for _ in range(n_boot))])
        lo, hi = np.nanquantile(boots[..., 0], 0.025, axis=0), np.nanquantile(boots[..., 0], 0.975, axis=0)
        slo, shi = np.nanquantile(boots[..., 1], 0.025, axis=0), np.nanquantile(boots[..., 1], 0.975, axis=0)
    n = len(rel.prompt_votes) if rel.prompt_votes is not None else rel.params.get("n_prompts")
    return pd.DataFrame(dict(concept=concepts, top_share=point, ci_low=lo, ci_high=hi, spec=spec, spec_ci_low=slo,
                             spec_ci_high=shi, n_prompts=n, top=top))


def load_concepts(path: Path | str | None = None) -> dict[str, list[str]]:
    """Concept -> words: our YAML list (default ``data/concepts.yaml``), ``"hrv"`` for HRV's 34
    concepts (``data/hrv/340_final_text_list.csv``), or any YAML / HRV-style CSV path."""
    from . import paths
    if path == "hrv":
        path = paths.HRV_CONCEPTS
    if str(path or "").endswith(".csv"):
        return read_hrv_concepts(Path(path))
    data = yaml.safe_load(Path(path or paths.CONCEPTS).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
        raise ValueError(f"{path}: expected a mapping concept -> non-empty list of words")
    return {str(k): [str(w) for w in v] for k, v in data.items()}


@torch.no_grad()
def encode_words(pipe, words: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each word encoded alone by the pipeline's text encoder(s).

    Returns one (start, tokens) pair per word: the start token's state [1, dim] and the word's
    token states [n_tokens, dim] (end token and padding dropped), dim as the UNet's
    cross-attention expects (SDXL: both encoders' states concatenated, as its ``encode_prompt``
    returns them).
    """
    from .family import of
    fam = of(pipe)
    den = fam.denoiser(pipe)
    dev = den.device
    emb = pipe.encode_prompt(prompt=words, device=dev, num_images_per_prompt=1,
                             do_classifier_free_guidance=False)[0]
    emb = fam.context(den, emb)  # as the layers' key projections receive them (PixArt: projected)
    dtype, out = den.dtype, []  # (diffusers finds a model's dtype by walking its modules: once)
    for i, w in enumerate(words):
        pos = token_positions(w, w, pipe.tokenizer)
        out.append((emb[i, :1].to(dtype), emb[i, pos].to(dtype)))
    return out


class VoteRecorder(Observer):
    """At every cross-attention call, each head of each image votes for the concept it attends to
    most in a fresh pseudo-context drawn for that image (see the module doc)."""

    def __init__(self, words: list[list[tuple[torch.Tensor, torch.Tensor]]] | None, layers: dict[str, object],
                 start_token: bool):
        """``words``: per concept, each word's (start, tokens) states (``encode_words``); may be set
        later, before the first generation. ``rngs``: one ``random.Random`` per image of the next
        pipeline call (``runs.item_rngs``), set before it starts: image i draws its words from its own."""
        self.words, self.start_token = words, start_token
        self.rngs: list[random.Random] = []
        self.counter = VoteCounter(layers)
        self.heads = self.counter.heads
        self.stats = RuleStats(self.counter.offset, len(self.heads))

    def prepare(self, pipe, concepts: dict[str, list[str]], rngs: list[random.Random],
                cache: tuple[str, dict] | None = None) -> None:
        """Before a pipeline call: the concepts' words encoded (once, and only when some batch runs;
        cached under ``cache``, kept in float32, which holds any half-precision state exactly) and one
        random stream per image of the call (``runs.item_rngs``)."""
        if self.words is None:
            def encode():
                return [[(s.float().cpu().numpy(), t.float().cpu().numpy()) for s, t in encode_words(pipe, ws)]
                        for ws in concepts.values()]
            from .family import of
            dtype = of(pipe).denoiser(pipe).dtype
            self.words = [[(torch.as_tensor(s).to(dtype), torch.as_tensor(t).to(dtype)) for s, t in ws]
                          for ws in (cached(*cache, encode) if cache else encode())]
        self.rngs = rngs

    def start(self, n, latent, token_ids):
        if len(self.rngs) != n:
            raise RuntimeError(f"the vote recorder has {len(self.rngs)} random streams for {n} images")
        self.counter.start(n)
        self.stats.start(n, latent)

    def step(self, index, timestep):
        self.counter.step(index, timestep)

    def _bank(self, device, dtype) -> torch.Tensor:
        """Every word's states in one table (row 0: zeros, the padding), on ``device`` in ``dtype``,
        and ``self._rows[c][j]``: the rows of concept c's word j (start token first)."""
        if getattr(self, "_banked", (None,))[0] is not self.words:
            states, self._rows, n = [torch.zeros_like(self.words[0][0][0])], [], 1
            for ws in self.words:
                self._rows.append([])
                for start, tokens in ws:
                    states += [start, tokens]
                    self._rows[-1].append(list(range(n, n + 1 + len(tokens))))
                    n += 1 + len(tokens)
            self._banked = (self.words, torch.cat(states), {})
        on = self._banked[2]
        if (device, dtype) not in on:
            on[(device, dtype)] = self._banked[1].to(device, dtype)
        return on[(device, dtype)]

    def context(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One pseudo-context per image, drawn from its own stream: (states [n, L, dim] padded,
        concept of each position [n, L] (-1: padding), additive mask [n, L], start-token count)."""
        c, bank = len(self.words), self._bank(device, dtype)
        rows, segs = [], []
        for rng in self.rngs:
            picks = [self._rows[i][rng.randrange(len(ws))] for i, ws in enumerate(self.words)]
            rows.append(picks[0][:1] if self.start_token else [])
            segs.append([c] * len(rows[-1]))
            for i, r in enumerate(picks):
                rows[-1] += r[1:]
                segs[-1] += [i] * (len(r) - 1)
        L = max(len(r) for r in rows)
        index = torch.tensor([r + [0] * (L - len(r)) for r in rows])
        seg = torch.tensor([g + [-1] * (L - len(g)) for g in segs])
        mask = torch.where(seg >= 0, 0.0, float("-inf"))
        seg = torch.where(seg == c, -1, seg)  # the start token takes attention but is never scored
        return bank[index.to(device)], seg.to(device), mask.to(device), c

    def observe(self, attn, layer, q, k, attention_mask) -> None:
        ctx, seg, mask, c = self.context(q.device, q.dtype)
        full = probs(attn, q, keys(attn, ctx), mask[:, None, :])  # [n, heads, pixels, L]
        pr = full.mean(2)  # [n, heads, L]: mean over pixels
        keep = (seg >= 0).float()[:, None, :]
        one = torch.nn.functional.one_hot(seg.clamp_min(0), c).float() * keep.transpose(1, 2)  # [n, L, c]
        per = (pr @ one) / one.sum(1, keepdim=True).clamp_min(1)  # mean over each word's tokens: [n, heads, concepts]
        self.counter.vote(layer, per)
        # the same attention per pixel, for the pre-registered rules (saam.rules)
        self.stats.add(layer, (full @ one[:, None]) / one.sum(1, keepdim=True)[:, None].clamp_min(1), per.argmax(-1))

    def take(self) -> dict:
        """The votes of the pipeline call just made (:meth:`VoteCounter.take`) and, under ``stats``,
        the rules' per-image statistics (:meth:`saam.rules.RuleStats.take`)."""
        return dict(self.counter.take(), stats=self.stats.take())


def from_votes(concepts: dict[str, list[str]], heads: list[HeadId], parts: list[dict], params: dict,
               n: int | None = None) -> Relevance:
    """A :class:`Relevance` from the ``VoteRecorder.take()`` of consecutive batches, over their first
    ``n`` images (default all): votes per step summed over images, and per image over steps."""
    votes = np.concatenate([p["votes"] for p in parts])[:n].astype(np.int64)  # [images, steps, heads, concepts]
    if n is not None and len(votes) < n:
        raise ValueError(f"{n} images' votes asked for, {len(votes)} recorded")
    per_step = votes.sum(0)
    stats = ({k: np.concatenate([p["stats"][k] for p in parts])[:n] for k in parts[0]["stats"]}
             if all("stats" in p for p in parts) else None)
    return Relevance(list(concepts), heads, normalize_votes(per_step), per_step, parts[0]["timesteps"],
                     dict(params, n_prompts=len(votes)), votes.sum(1), stats)


def relevance_pass(pipe, concepts: dict[str, list[str]], prompts: list[str], *, steps: int = 30,
                   guidance: float = 5.0, seed: int = 0, batch_size: int = 8, height: int | None = None,
                   width: int | None = None, start_token: bool = True, progress: bool = True,
                   cache: tuple[str, dict] | None = None, words_cache: tuple[str, dict] | None = None,
                   variant: str | None = None, max_sequence_length: int | None = None) -> Relevance:
    """Count HRV votes over the generation of ``prompts`` and normalise them (see module doc).

    Args:
        concepts: concept -> words (``load_concepts()``, or ``load_concepts("hrv")`` for HRV's 34).
        prompts: generation prompts, unrelated to the concepts (HRV: ImageNet classes, PromptHero).
        start_token: keep the first word's start token in the pseudo-context, as HRV's code does.
        cache: cache each batch's votes under this (name, key) (``saam.runs.run_batches``).
        words_cache: cache the concepts' encoded words under this (name, key): its key must name the
            text encoder(s) and tokenizer(s) (``models.text_fingerprint``) and the concepts.
        variant: MM-DiTs (SD3, FLUX, Qwen-Image) only: ``"stream"`` (default) or ``"direct"`` (``saam.stream``).
        max_sequence_length: MM-DiTs only: T5's window, as the pipeline is called with it.
    """
    from .runs import item_rngs, run_batches
    if is_joint(pipe):
        from .stream import stream_votes
        heads, parts = stream_votes(pipe, concepts, prompts, steps=steps, guidance=guidance, seed=seed,
                                    batch_size=batch_size, variant=variant or "stream", height=height, width=width,
                                    progress=progress, cache=cache, words_cache=words_cache,
                                    max_sequence_length=max_sequence_length)
        return from_votes(concepts, heads, parts, dict(concepts=concepts, steps=steps, guidance=guidance, seed=seed,
                                                       variant=variant or "stream"))
    if variant not in (None, "direct") or max_sequence_length is not None:
        raise ValueError("variant and max_sequence_length are for MM-DiT pipelines; a UNet's pass is HRV's own")
    den = check_pipeline(pipe)
    from .family import of
    fam = of(pipe)
    start_token = start_token and fam.start_token  # T5 (PixArt) has no start token to keep
    if not isinstance(concepts, dict) or not concepts or not all(
            isinstance(ws, (list, tuple)) and ws and all(isinstance(w, str) and w.strip() for w in ws) for ws in concepts.values()):
        raise ValueError(f"concepts must map each concept to a non-empty list of words, got {concepts!r}")
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of prompts, got {prompts!r}")
    layers = fam.layers(den)
    rec = VoteRecorder(None, layers, start_token)

    def batch(prompts, gens, start):
        rec.prepare(pipe, concepts, item_rngs(seed, start, len(prompts)), words_cache)
        pipe(prompt=prompts, num_inference_steps=steps, **guidance_arg(guidance), generator=gens,
             height=height, width=width, output_type="latent")
        return rec.take()
    with install(pipe, rec):
        parts = run_batches(prompts, batch_size, seed, batch, cache=cache,
                            desc="relevance" if progress else None)
    return from_votes(concepts, rec.heads, parts, dict(concepts=concepts, steps=steps, guidance=guidance, seed=seed,
                                                       start_token=start_token))


# ------------------------------------------------------------------ HRV's published files

def read_hrv_concepts(csv_path: Path) -> dict[str, list[str]]:
    """Parse HRV's ``340_final_text_list.csv`` (a concept line, then numbered words)."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in Path(csv_path).read_text(encoding="utf-8-sig").splitlines():
        line = line.strip().strip('"').strip()
        if not line:
            continue
        parts = line.split(".", 1)
        if parts[0].isdigit() and cur is not None:
            out[cur].append(parts[1].strip())
        else:
            cur = line
            out[cur] = []
    return out


# HRV's shipped files per model (data/hrv): relevance vectors, head index
PUBLISHED = {"sd14": ("category_vectors_sd_v1_4.npy", "head_index_sd_v1_4.npy"),
             "sdxl": ("category_vectors_sd_xl_base_1_0.npy", "head_index_sd_xl_base_1_0.npy")}


def _published_files(model: str) -> tuple[str, str]:
    if model not in PUBLISHED:
        raise KeyError(f"HRV published vectors for {sorted(PUBLISHED)} only, not {model!r}; run relevance_pass instead")
    return PUBLISHED[model]


def published(model: str = "sd14") -> tuple[list[str], np.ndarray]:
    """HRV's published relevance as shipped in ``data/hrv``: (34 concept names, [34, heads] matrix),
    in HRV's own head order (use :func:`load_hrv` to place the heads on a UNet)."""
    from . import paths
    vectors, _ = _published_files(model)
    return list(read_hrv_concepts(paths.HRV_CONCEPTS)), np.load(paths.HRV / vectors).astype(np.float32)


def load_published(model: str, layer_heads: dict[str, int]) -> Relevance:
    """HRV's shipped vectors for ``model`` ("sd14" or "sdxl") placed on a UNet's heads
    (``HeadMaps.layer_heads``), with HRV's 34 concept names."""
    from . import paths
    from .heads import block_of
    dit = sorted({block_of(l) for l in layer_heads} & {"transformer", "single"})
    if dit:
        raise ValueError(f"HRV's published {model} vectors are for a UNet's cross-attention heads (down/mid/up blocks); "
                         f"these heads are an MM-DiT's ({', '.join(dit)} blocks), for which none are published: measure "
                         "relevance on this model with relevance_pass(pipe, load_concepts('hrv'), prompts) (the concept "
                         "stream), or `saam heads --model ... --prompts FILE`")
    v, i = _published_files(model)
    return load_hrv(paths.HRV / v, paths.HRV / i, layer_heads, paths.HRV_CONCEPTS)


def _load_array(path: Path, what: str) -> np.ndarray:
    """A plain .npy array; pickled objects are refused (they can run code), never unpickled."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a plain .npy file of {what} ({e}); pickled .npy files are refused "
                         "because loading them can run code") from None


def load_hrv(vectors: Path, head_index: Path, layer_heads: dict[str, int],
             concepts: list[str] | Path | None = None) -> Relevance:
    """HRV's published relevance (``category_vectors_*.npy``, ``head_index_*.npy``) on our head ids.

    Args:
        vectors: (concepts, heads) array; head_index: (heads,) names like "up, layer: 8, head: 3".
        layer_heads: this UNet's cross-attention layers and head counts (``HeadMaps.layer_heads``
            or ``{l: m.heads for l, m in UNET.layers(unet).items()}``).
        concepts: concept names, or the path of HRV's concept list CSV (default: "concept i").
    Raises:
        ValueError: a published head that this UNet does not have, or mismatched shapes.
    """
    m, names = _load_array(vectors, "relevance vectors"), _load_array(head_index, "head names")
    if m.dtype.kind not in "fiu" or names.dtype.kind != "U":
        raise ValueError(f"{vectors} must hold numbers and {head_index} head names as text "
                         f"(got {m.dtype} and {names.dtype})")
    m = m.astype(np.float32)
    if m.ndim != 2 or m.shape[1] != len(names):
        raise ValueError(f"{vectors}: shape {m.shape} does not match {len(names)} head names")
    heads = from_hrv_names([str(n) for n in names], layer_heads)
    if isinstance(concepts, (str, Path)):
        concepts = list(read_hrv_concepts(Path(concepts)))
    concepts = list(concepts) if concepts is not None else [f"concept {i}" for i in range(m.shape[0])]
    if len(concepts) != m.shape[0]:
        raise ValueError(f"{len(concepts)} concept names for {m.shape[0]} rows")
    # reorder columns into our HRV-order head list
    ours = head_ids(layer_heads)
    col = {h: i for i, h in enumerate(heads)}
    missing = [h for h in ours if h not in col]
    if missing:
        raise ValueError(f"{len(missing)} heads of this UNet have no published relevance, e.g. {missing[0]}")
    matrix = m[:, [col[h] for h in ours]]
    return Relevance(concepts, ours, matrix, None, [], dict(source=str(vectors)))
