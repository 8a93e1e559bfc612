"""Figure functions the notebooks call. Each draws what analysis code computed and returns a
matplotlib Figure; a chapter writes it with ``chapter.Outputs.figure`` (PNG + PDF, shown inline). Palettes are colour-blind safe
(seaborn's ``colorblind``, viridis, cividis for maps)."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


sns.set_theme(style="whitegrid", context="notebook", palette="colorblind")
MAP_CMAP = "cividis"  # word maps over images: perceptually uniform and colour-blind safe


def training_curves(card: dict):
    """VAE PSNR and UNet loss against step; a fine-tuned variant's steps continue the base curve. The
    MM-DiT organism (``saam.shapes.dit``, its VAE the UNet organisms'): its flow-matching loss, and its
    fidelity on the fixed prompt set against the targets it trained to."""
    if card.get("variant") == "mmdit":
        return _dit_curves(card)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, (stage, key, label) in zip(axes, (("vae", "psnr", "reconstruction PSNR (dB)"),
                                              ("unet", "loss", "noise-prediction MSE"))):
        runs = [("trained", card.get("curves", {}).get(stage, []), 0)]
        if stage == "unet" and card.get("finetune_curves", {}).get("unet"):
            runs.append((f"fine-tuned ({card.get('variant')})", card["finetune_curves"]["unet"],
                         card.get("unet_steps", 0)))
        for name, rows, offset in runs:
            if not rows:
                continue
            s = pd.DataFrame(rows)
            ax.plot(s.step + offset, s[key], lw=0.8, label=name)
            if key == "loss":
                ax.set_yscale("log")
        ax.set(title=f"{stage.upper()} training", xlabel="optimiser step", ylabel=label)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _dit_curves(card: dict):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    c = pd.DataFrame(card.get("curves", []))
    if len(c):
        axes[0].plot(c.step, c.loss, lw=0.8)
        axes[0].set_yscale("log")
    axes[0].set(title="MM-DiT training (flow matching)", xlabel="optimiser step", ylabel="velocity-prediction MSE")
    f = pd.DataFrame(card.get("fidelity", []))
    for (key, target), col in zip(card.get("targets", {}).items(), sns.color_palette("colorblind", 3)):
        if key in f:
            axes[1].plot(f.step, f[key], "o-", ms=3, color=col, label=key.replace("_", " "))
        axes[1].axhline(target, color=col, ls="--", lw=0.8)
    if card.get("targets_met_at"):
        axes[1].axvline(card["targets_met_at"], color="k", lw=0.6)
    axes[1].set(title="fidelity on the fixed prompts (dashed: targets)", xlabel="optimiser step", ylabel="accuracy",
                ylim=(0, 1.02))
    axes[1].legend(fontsize=7)
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


def plot_overlay(image, word_map, ax=None, *, alpha: float = 0.6, cmap: str = MAP_CMAP,
                 title: str | None = None, interpolation: str | None = "bilinear", normalise: bool = True):
    """A word's map drawn over its image: the one way this package draws a map on an image (the
    command line's overlays and the chapters' figures), what DAAM's ``plot_overlay`` does.

    Args:
        image: [H, W, 3] array (floats in [0, 1] or uint8) or a PIL image.
        word_map: [h, w] map (``word_map``'s, any size): upsampled bicubically to the image's size
            and min-max normalised to [0, 1] (``aggregate.normalize``), unless ``normalise=False``
            (then it must already be in [0, 1] at the image's size).
        ax: the Axes to draw on (default: a new figure's).
    Returns:
        The Axes.
    """
    import torch
    from .aggregate import normalize
    image = np.asarray(image)
    m = torch.as_tensor(np.asarray(word_map, dtype=np.float32))
    if m.ndim != 2:
        raise ValueError(f"word_map must be a 2-D map, got shape {tuple(m.shape)}")
    if normalise:
        m = normalize(m, tuple(image.shape[:2]))
    elif tuple(m.shape) != tuple(image.shape[:2]):
        raise ValueError(f"normalise=False needs the map at the image's size {image.shape[:2]}, got {tuple(m.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(image, interpolation="nearest")
    ax.imshow(m.numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation=interpolation)
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def word_maps(image: np.ndarray, maps: dict[str, np.ndarray], title: str = ""):
    """The image and each word's normalised map overlaid on it."""
    n = len(maps) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.6))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    for ax, (w, m) in zip(axes[1:], maps.items()):
        plot_overlay(image, m, ax, title=w, normalise=False)
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
        ax.set(title=c, xlabel="heads, most relevant first")
    np.atleast_1d(axes)[0].set_ylabel("relevance (mean over heads = 1)")
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
        sns.heatmap(grid, ax=ax, cmap="viridis", cbar=c == concepts[-1], vmin=0, vmax=np.nanmax(rel.matrix),
                    cbar_kws=dict(label="relevance (mean 1)"))
        ax.set(title=c, xlabel="head")
    np.atleast_1d(axes)[0].set_yticks(np.arange(len(layers)) + 0.5, short, fontsize=7, rotation=0)
    fig.tight_layout()
    return fig


def selection_frequency(rel, selection: dict[str, dict], eligible: np.ndarray):
    """Per word kind, the eligible heads in order of relevance: relevance (bars) and how often each
    lands in the top-k when the relevance prompts are resampled (line; ``saam.selection``)."""
    kinds = list(selection)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 2.8), squeeze=False)
    for ax, c in zip(axes[0], kinds):
        idx = np.flatnonzero(eligible)
        row = rel.row(c)[idx]
        order = idx[np.argsort(-row, kind="stable")]
        x = np.arange(len(order))
        ax.bar(x, rel.row(c)[order], color="0.75", width=0.9, label="relevance")
        ax.set(xlabel="eligible heads, by relevance", ylabel="relevance", title=f"{c}: Jaccard {selection[c]['jaccard']:.2f}")
        tw = ax.twinx()
        tw.plot(x, selection[c]["frequency"][order], "o-", ms=2.5, lw=1, color=sns.color_palette()[0], label="selected")
        tw.set(ylim=(-0.02, 1.02), ylabel="share of resamples in top-k")
        tw.grid(False)
    fig.tight_layout()
    return fig


def relevance_convergence(conv: pd.DataFrame):
    """Per kind against the number of relevance prompts: the Jaccard index of the top-k sets from
    two disjoint subsets (left; dotted: from two resamples with replacement of one subset, as the
    bootstrap draws them), and top-k's mIoU with +-1 SD over subsets (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for c, g in conv.groupby("kind", sort=False):
        line, = axes[0].plot(g.n_prompts, g.jaccard, marker="o", label=c)
        if "jaccard_bootstrap" in g:  # two resamples with replacement of the same prompts (the bootstrap's view)
            axes[0].plot(g.n_prompts, g.jaccard_bootstrap, ls=":", marker=".", color=line.get_color())
        line, = axes[1].plot(g.n_prompts, g.top_k_miou, marker="o", label=c)
        axes[1].fill_between(g.n_prompts, g.top_k_miou - g.top_k_miou_sd, g.top_k_miou + g.top_k_miou_sd,
                             alpha=0.2, color=line.get_color())
    axes[0].axhline(0.9, color="k", ls="--", lw=0.8)
    axes[0].set(xscale="log", xlabel="relevance prompts per subset", ylabel="Jaccard of top-k sets",
                title="two disjoint subsets", ylim=(0, 1.02))
    axes[1].set(xscale="log", xlabel="relevance prompts", ylabel="top-k mIoU", title="top-k with each subset's heads")
    for ax in axes:
        ax.set_xticks(sorted(conv.n_prompts.unique()), [str(n) for n in sorted(conv.n_prompts.unique())])
        ax.minorticks_off()
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def reestimates(per: pd.DataFrame):
    """``selection.reestimates``' per-estimate table: per kind (and pooled), top-k minus DAAM of the
    verdict's relevance (estimate 0, its two-level CI shaded) and of each independent re-estimate, with
    its own two-level CI (thin) and relevance-only interval (thick)."""
    kinds = list(dict.fromkeys(per.kind))
    fig, axes = plt.subplots(1, len(kinds), figsize=(2.6 * len(kinds), 3.0), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], kinds):
        g = per[per.kind == c].sort_values("estimate")
        main = g[g.estimate == 0].iloc[0]
        ax.axhspan(main.ci_low, main.ci_high, color="C0", alpha=0.15, lw=0)
        ax.vlines(g.estimate, g.ci_low, g.ci_high, color="0.5", lw=0.8)
        ax.vlines(g.estimate, g.rel_low, g.rel_high, color="C1", lw=3, alpha=0.7)
        ax.plot(g.estimate, g["diff"], "ko", ms=4)
        ax.axhline(0, color="k", lw=0.6)
        ax.set(title=c, xlabel="estimate (0: the verdict's)")
    axes[0][0].set_ylabel("top-k minus DAAM (mIoU)")
    fig.tight_layout()
    return fig


def mechanism(heads: pd.DataFrame, profiles: dict):
    """``analyses.mechanism``: per kind (columns), every eligible head's relevance against the share of
    its attention to the word that falls inside the object (colour: its attention level relative to the
    eligible mean, log scale), top-k's heads ringed and the oracle's crossed (top row); the share of the
    heads' votes that go to the kind at each step, top-k's, the oracle's and every eligible head's mean
    (bottom row)."""
    from matplotlib.colors import LogNorm
    kinds = list(dict.fromkeys(heads.kind))
    rows = 2 if profiles else 1
    fig, axes = plt.subplots(rows, len(kinds), figsize=(3.3 * len(kinds), 3.0 * rows), squeeze=False, layout="constrained")
    norm = LogNorm(vmin=max(heads.level.min(), 1e-3), vmax=heads.level.max())
    for j, c in enumerate(kinds):
        g = heads[heads.kind == c]
        ax = axes[0][j]
        sc = ax.scatter(g.relevance, g.inside, c=g.level.clip(lower=norm.vmin), cmap="viridis", norm=norm, s=22, zorder=2)
        t, o = g[g.top], g[g.oracle > 0]
        ax.scatter(t.relevance, t.inside, s=90, facecolors="none", edgecolors="k", lw=1.2, zorder=3, label="top-k")
        ax.scatter(o.relevance, o.inside, s=40, marker="x", color="C3", lw=1.4, zorder=4, label="oracle-k")
        ax.set(title=c, xlabel="relevance to the kind", ylabel="attention inside the object (share)" if j == 0 else None)
        if c in profiles:
            ax2 = axes[1][j]
            for name, v in profiles[c].items():
                style = {"top-k": dict(color="k"), "oracle-k": dict(color="C3", ls="--")}.get(name, dict(color="0.6"))
                ax2.plot(np.arange(1, len(v) + 1), v, label=name, **style)
            ax2.set(xlabel="denoising step (early -> late)", ylabel="votes for the kind (share)" if j == 0 else None)
    axes[0][0].legend(fontsize=8, loc="best")
    if profiles:
        axes[1][0].legend(fontsize=8)
    fig.colorbar(sc, ax=axes[0].tolist(), label="attention level (x mean)", shrink=0.8)
    return fig


def blocks(df: pd.DataFrame):
    """``analyses.blocks``: per kind (columns), each joint block's mIoU [95 % CI] in cross-attention
    and in output space, ConceptAttention's blocks shaded (top row); the block's mean relevance to
    the kind (bars) and its share of top-k's heads (dots) (bottom row)."""
    kinds = list(dict.fromkeys(df.kind))
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.0 * len(kinds), 5.4), squeeze=False, sharex=True,
                             layout="constrained")
    for j, c in enumerate(kinds):
        g = df[df.kind == c]
        ax = axes[0][j]
        for b in g[g.concept_block].block.unique():
            ax.axvspan(b - 0.5, b + 0.5, color="0.92", zorder=0)
        for space, style in (("attention", dict(color="C0", marker="o")), ("output", dict(color="C3", marker="s"))):
            s = g[g.space == space]
            ax.errorbar(s.block, s.mIoU, yerr=[s.mIoU - s.ci_low, s.ci_high - s.mIoU], capsize=2, ms=4,
                        label={"attention": "cross-attention (block's heads)", "output": "output space (ConceptAttention)"}[space],
                        **style)
        ax.set(title=c, ylabel="mIoU" if j == 0 else None)
        ax2 = axes[1][j]
        a = g[g.space == "attention"]
        if a.relevance.notna().any():
            ax2.bar(a.block, a.relevance, color="0.6", label="mean relevance")
            ax3 = ax2.twinx()
            ax3.plot(a.block, a.top_share, "ko", ms=4, label="share of top-k's heads")
            ax3.set_ylim(0, 1)
            if j == len(kinds) - 2:
                ax3.set_ylabel("share of top-k's heads (dots)")
        else:  # pooled: no relevance of its own; the panel holds the legend
            ax2.axis("off")
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("joint block")
            ax2.legend(*axes[0][0].get_legend_handles_labels(), loc="center", fontsize=8,
                       title="shaded: ConceptAttention's blocks", title_fontsize=8)
            continue
        ax2.set(xlabel="joint block", ylabel="mean relevance (bars)" if j == 0 else None)
        ax2.set_xticks(sorted(g.block.unique()))
    return fig


def timestep_stability(table: pd.DataFrame):
    """``relevance.timestep_stability``'s table: one line per concept over the denoising windows."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for c, g in table.groupby("concept", sort=False):
        ax.plot(g.window, g.jaccard, marker="o", label=c)
    ax.set(xlabel="denoising window (early -> late)", ylabel=f"Jaccard of top-{table.k_heads.iloc[0]} heads with overall",
           ylim=(0, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def k_sweep(df: pd.DataFrame, daam: float | None = None, title: str = ""):
    """mIoU against k (fraction of heads) for each method, with 95 % CI bands (random-k: also its
    spread across draws, +-2 SD, hatched)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m, g in df.groupby("method", sort=False):
        g = g.sort_values("k")
        line, = ax.plot(g.k, g.mIoU, marker="o", label=m)
        ax.fill_between(g.k, g.ci_low, g.ci_high, alpha=0.2)
        if "draw_sd" in g and g.draw_sd.notna().any():
            ax.fill_between(g.k, g.mIoU - 2 * g.draw_sd, g.mIoU + 2 * g.draw_sd, facecolor="none", hatch="///",
                            edgecolor=line.get_color(), lw=0, label=f"{m}: +-2 SD over draws")
    if daam is not None:
        from .select import METHODS
        ax.axhline(daam, color="k", ls="--", lw=1, label=METHODS["daam"])
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
            plot_overlay(row["image"], row[m], axes[r, 2 + j], interpolation=None, normalise=False)
        for j, t in enumerate(["image", "truth", *methods]):
            axes[r, j].set_xticks([]); axes[r, j].set_yticks([])
            if r == 0:
                axes[r, j].set_title(t, fontsize=8)
    fig.tight_layout()
    return fig


def relevance_vs_localisation(rel, head_iou: dict[str, np.ndarray], table: pd.DataFrame, eligible: np.ndarray):
    """Each eligible head's relevance to a concept against its own mIoU on that concept's words;
    the titles quote the Spearman rho of ``table`` (the same heads, one number per concept)."""
    rho = dict(zip(table.concept, table.spearman_rho))
    fig, axes = plt.subplots(1, len(head_iou), figsize=(3.6 * len(head_iou), 3.2), squeeze=False)
    for ax, (c, iou) in zip(axes[0], head_iou.items()):
        ax.scatter(rel.row(c)[eligible], iou[eligible], s=12)
        ax.set(xlabel=f"relevance to {c} (mean 1)", ylabel="single-head mIoU",
               title=f"{c}: Spearman rho = {rho.get(c, float('nan')):.2f}")
    fig.tight_layout()
    return fig


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str = ""):
    """ROC curves, one per method: {label: (fpr, tpr, auroc)}."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for m, (fpr, tpr, a) in curves.items():
        ax.plot(fpr, tpr, label=f"{m} (AUROC {a:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def attention_budget(budget: pd.DataFrame, title: str = ""):
    """Stacked shares of attention on start token / words / end / padding, per block and region.

    ``budget``: ``saam.sinks.attention_budget`` rows (one per head and region)."""
    from .heads import BLOCKS
    from .sinks import classes
    CLASSES = classes(budget)
    g = budget.groupby(["block", "region"], sort=False)[CLASSES].mean()
    g = g.reindex([(b, r) for b in BLOCKS for r in ("object", "background", "all") if (b, r) in g.index])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    left = np.zeros(len(g))
    labels = [f"{b} / {r}" for b, r in g.index]
    for c, col in zip(CLASSES, sns.color_palette("colorblind", len(CLASSES))):
        ax.barh(labels, g[c], left=left, color=col, label=c)
        left += g[c].to_numpy()
    ax.invert_yaxis()
    ax.set(xlabel="share of cross-attention (mean over heads)", xlim=(0, 1), title=title)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    return fig


def organisms(table: pd.DataFrame, reference: dict[str, float]):
    """Ablation at a glance: concentration per concept (with CI) and Table 1's DAAM vs top-k per
    variant; dashed lines are SD v1.4's concentration from HRV's published vectors."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ax = axes[0]
    concepts = [c for c in ("color", "shape", "size") if f"conc_{c}" in table]
    x = np.arange(len(table))
    w = 0.8 / len(concepts)
    for i, (c, col) in enumerate(zip(concepts, sns.color_palette("colorblind", len(concepts)))):
        lo = table[f"conc_{c}"] - table[f"conc_{c}_ci"].map(lambda v: v[0])
        hi = table[f"conc_{c}_ci"].map(lambda v: v[1]) - table[f"conc_{c}"]
        ax.bar(x + i * w, table[f"conc_{c}"], w, yerr=[lo, hi], color=col, label=c, capsize=2)
        if c in reference:
            ax.axhline(reference[c], color=col, ls="--", lw=1)
    ax.set_xticks(x + w * (len(concepts) - 1) / 2, table.variant)
    ax.set(ylabel="relevance share of top 25 % heads", ylim=(0, 1.05), xlabel="organism variant",
           title="head specialisation (dashed: SD v1.4)")
    ax.legend(fontsize=7)
    ax = axes[1]
    from .select import METHODS
    for i, (m, col) in enumerate(zip(("daam", "top", "bottom"), sns.color_palette("colorblind", 3))):
        v = table[f"miou_{m}"]
        ci = table[f"miou_{m}_ci"]
        ax.bar(x + i * 0.27, v, 0.27, yerr=[v - ci.map(lambda c: c[0]), ci.map(lambda c: c[1]) - v],
               color=col, capsize=2, label=METHODS[m])
    ax.set_xticks(x + 0.27, table.variant)
    ax.set(ylabel="mIoU (generation protocol)", xlabel="organism variant", title="Table 1 on each organism")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def paired_grid(grid: pd.DataFrame, title: str = ""):
    """The paired difference (a method minus DAAM) over k and tau; cells whose 95 % CI excludes 0
    are marked (+ better, - worse)."""
    piv = grid.pivot_table(index="tau", columns="k", values="diff")
    lo = grid.pivot_table(index="tau", columns="k", values="ci_low")
    hi = grid.pivot_table(index="tau", columns="k", values="ci_high")
    lim = float(np.nanmax(np.abs(piv.to_numpy()))) or 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * piv.shape[1], 0.9 + 0.5 * piv.shape[0]))
    im = ax.imshow(piv.to_numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(piv.shape[0]):
        for j in range(piv.shape[1]):
            mark = "+" if lo.iat[i, j] > 0 else "-" if hi.iat[i, j] < 0 else ""
            ax.text(j, i, f"{piv.iat[i, j]:+.3f}{mark}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(piv.shape[1]), [f"{k:g}" for k in piv.columns])
    ax.set_yticks(range(piv.shape[0]), [f"{t:g}" for t in piv.index])
    ax.set(xlabel="k (fraction of eligible heads)", ylabel="tau", title=title)
    fig.colorbar(im, ax=ax, label="paired difference in IoU")
    fig.tight_layout()
    return fig


def polysemy(rows: list[dict]):
    """One row per (prompt, seed): the image, then the word's map from each head set over it."""
    import textwrap
    names = list(rows[0]["maps"])
    ncol = 1 + len(names)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol + 0.6, 2.0 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row["image"], interpolation="nearest")
        axes[r, 0].set_ylabel("\n".join(textwrap.wrap(row["title"], 30)), fontsize=7)
        for j, name in enumerate(names):
            plot_overlay(row["image"], row["maps"][name], axes[r, 1 + j], interpolation=None, normalise=False)
        for j, t in enumerate(["image", *names]):
            axes[r, j].set_xticks([]); axes[r, j].set_yticks([])
            if r == 0:
                axes[r, j].set_title(t if j < 2 else ("intended" if j == 2 else "competing"), fontsize=8)
    fig.tight_layout()
    return fig
