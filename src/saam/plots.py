"""Figure functions the notebooks call. Each returns a matplotlib Figure; ``save`` writes PNG + PDF."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from . import paths  # noqa: E402
from .cache import atomic_write  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def save(fig, name: str) -> Path:
    """figures/<name>.png and .pdf, written atomically; returns the PNG path."""
    out = paths.FIGURES / f"{name}.png"
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=130, bbox_inches="tight",
                    metadata={"CreationDate": None} if ext == "pdf" else {"Software": None})
        atomic_write(paths.FIGURES / f"{name}.{ext}", buf.getvalue())
    return out


def training_curves(card: dict):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, (stage, key, label) in zip(axes, (("vae", "psnr", "reconstruction PSNR (dB)"),
                                              ("unet", "loss", "epsilon MSE"))):
        rows = card.get("curves", {}).get(stage, [])
        if rows:
            s = pd.DataFrame(rows)
            ax.plot(s.step, s[key], lw=0.8)
            if key == "loss":
                ax.plot(s.step, s[key].rolling(10, min_periods=1).mean(), lw=2)
                ax.set_yscale("log")
        ax.set(title=f"{stage.upper()} training", xlabel="step", ylabel=label)
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 4,
               size: float = 2.2, wrap: int = 28):
    import textwrap
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size + 0.45)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            if titles:
                ax.set_title("\n".join(textwrap.wrap(titles[i], wrap)), fontsize=7)
    fig.tight_layout()
    return fig


def word_maps(image: np.ndarray, maps: dict[str, np.ndarray], title: str = ""):
    """The image and each word's normalised map overlaid on it."""
    n = len(maps) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.6))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    for ax, (w, m) in zip(axes[1:], maps.items()):
        ax.imshow(image, interpolation="nearest")
        ax.imshow(m, cmap="jet", alpha=0.55, vmin=0, vmax=1, interpolation="bilinear")
        ax.set_title(w, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def relevance_histograms(rel, concepts: Sequence[str] | None = None):
    """The paper's histograms: each concept's relevance over heads, sorted descending."""
    concepts = list(concepts or rel.concepts)
    fig, axes = plt.subplots(1, len(concepts), figsize=(2.6 * len(concepts), 2.6), sharey=True)
    for ax, c in zip(np.atleast_1d(axes), concepts):
        r = np.sort(rel.row(c))[::-1]
        ax.bar(np.arange(len(r)), r, width=1.0, color=sns.color_palette()[0])
        ax.axhline(1.0, color="k", lw=0.6, ls="--")
        ax.set(title=c, xlabel="head (sorted)")
    np.atleast_1d(axes)[0].set_ylabel("relevance (mean 1)")
    fig.tight_layout()
    return fig


def relevance_heatmaps(rel, concepts: Sequence[str] | None = None):
    """Layer x head heatmap of relevance per concept (rows: layers in forward order)."""
    concepts = list(concepts or rel.concepts)
    lh = rel.layer_heads
    layers = list(dict.fromkeys(h.layer for h in rel.heads))
    width = max(lh.values())
    fig, axes = plt.subplots(1, len(concepts), figsize=(2.0 * len(concepts) + 2, 0.28 * len(layers) + 1.2),
                             sharey=True)
    short = [l.replace(".transformer_blocks.", ".tb").replace("attentions.", "a").replace("_blocks", "")
             .replace(".attn2", "") for l in layers]
    for ax, c in zip(np.atleast_1d(axes), concepts):
        grid = np.full((len(layers), width), np.nan)
        for h, v in zip(rel.heads, rel.row(c)):
            grid[layers.index(h.layer), h.head] = v
        sns.heatmap(grid, ax=ax, cmap="viridis", cbar=False, vmin=0, vmax=np.nanmax(rel.matrix))
        ax.set(title=c, xlabel="head")
    np.atleast_1d(axes)[0].set_yticks(np.arange(len(layers)) + 0.5, short, fontsize=7, rotation=0)
    fig.tight_layout()
    return fig


def concentration(rel, top: float = 0.25) -> pd.DataFrame:
    """Share of each concept's relevance held by its top ``top`` fraction of heads."""
    k = max(1, int(round(top * rel.matrix.shape[1])))
    return pd.DataFrame([dict(concept=c, top_share=float(np.sort(rel.row(c))[::-1][:k].sum() / rel.row(c).sum()))
                         for c in rel.concepts])


def timestep_stability(rel, concepts: Sequence[str], k: float = 0.25, windows: int = 5):
    """Overlap (Jaccard) of each timestep window's top-k heads with the overall top-k."""
    per = rel.per_timestep()  # [T, C, H]
    T, _, H = per.shape
    kk = max(1, int(round(k * H)))
    edges = np.linspace(0, T, windows + 1).astype(int)
    fig, ax = plt.subplots(figsize=(5, 3))
    for c in concepts:
        ci = rel.concepts.index(c)
        overall = set(np.argsort(-rel.matrix[ci])[:kk])
        ys = []
        for a, b in zip(edges[:-1], edges[1:]):
            win = set(np.argsort(-per[a:b, ci].mean(0))[:kk])
            ys.append(len(win & overall) / len(win | overall))
        ax.plot(np.arange(windows) + 1, ys, marker="o", label=c)
    ax.set(xlabel="denoising window (early -> late)", ylabel=f"Jaccard of top-{kk} heads with overall",
           ylim=(0, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def k_sweep(df: pd.DataFrame, daam: float | None = None, title: str = ""):
    """mIoU against k (fraction of heads) for each method, with 95 % CI bands."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m, g in df.groupby("method", sort=False):
        g = g.sort_values("k")
        ax.plot(g.k, g.mIoU, marker="o", label=m)
        ax.fill_between(g.k, g.ci_low, g.ci_high, alpha=0.2)
    if daam is not None:
        ax.axhline(daam, color="k", ls="--", lw=1, label="DAAM (all heads)")
    ax.set(xlabel="k (fraction of eligible heads)", ylabel="mIoU", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def examples(rows: list[dict], methods: Sequence[str]):
    """Rows of (image, ground truth, one map per method); each row a dict with keys image, gt,
    title and one entry per method name."""
    ncol = 2 + len(methods)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol + 0.6, 2.0 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row["image"], interpolation="nearest")
        import textwrap
        axes[r, 0].set_ylabel("\n".join(textwrap.wrap(row["title"], 32)), fontsize=7)
        axes[r, 1].imshow(row["gt"], cmap="gray", interpolation="nearest")
        for j, m in enumerate(methods):
            axes[r, 2 + j].imshow(row["image"], interpolation="nearest")
            axes[r, 2 + j].imshow(row[m], cmap="jet", alpha=0.55, vmin=0, vmax=1)
        for j, t in enumerate(["image", "truth", *methods]):
            axes[r, j].set_xticks([]); axes[r, j].set_yticks([])
            if r == 0:
                axes[r, j].set_title(t, fontsize=8)
    fig.tight_layout()
    return fig


def relevance_vs_localisation(rel, head_iou: dict[str, np.ndarray]):
    """Scatter of each head's relevance to a concept against its own IoU on that concept's words."""
    from scipy.stats import spearmanr
    fig, axes = plt.subplots(1, len(head_iou), figsize=(3.6 * len(head_iou), 3.2), squeeze=False)
    for ax, (c, iou) in zip(axes[0], head_iou.items()):
        r = rel.row(c)
        rho = spearmanr(r, iou).statistic if len(iou) else float("nan")
        ax.scatter(r, iou, s=12)
        ax.set(xlabel=f"relevance to {c}", ylabel="single-head mIoU", title=f"{c}: Spearman rho = {rho:.2f}")
    fig.tight_layout()
    return fig
