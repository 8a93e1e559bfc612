"""The head explorer: which heads carry a word's concept, and what each head sees.

For one image and one of its caption's words: DAAM's map, top-k's and bottom-k's, then every
eligible head's own map ordered by its relevance to the concept, each with its relevance and its
single-head IoU against the word's mask (the truth the tables score against).

- :class:`Explorer`: in JupyterLab (ipywidgets): pick an image and a word, change the concept or k,
  and the view is redrawn.
- :func:`write_page`: the same view as one static HTML page (thumbnails precomputed and embedded,
  a little JavaScript, no server), which the report links to: clicking a word shows its heads, and
  a k slider marks the top-k.

Maps come from the records the chapters already traced (``evaluate.WordRecord``), so nothing is
generated here; the aggregation is the tables' own (``aggregate.mean_map``, ``select.head_set``).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .aggregate import mean_map, normalize
from .evaluate import WordRecord, mask_ious
from .select import head_set

THUMB = 72  # px of each head's thumbnail in the static page


def heads_of(rec: WordRecord, rel, concept: str, mask: np.ndarray, tau: float) -> pd.DataFrame:
    """The eligible heads for ``rec``'s word, most relevant to ``concept`` first: index, head,
    relevance, rank (top-k are ranks 1..k), bottom_rank (bottom-k are bottom ranks 1..k: the order
    ``select.bottom_k`` takes, so among tied heads the explorer marks the very heads bottom-k
    averages), single-head IoU (NaN where the word's object is missing)."""
    from .select import bottom_k, top_k
    row = rel.row(concept)
    n = int(np.asarray(mask, bool).sum())
    idx = top_k(row, n, mask)
    ious = mask_ious(rec.maps[idx], rec.gt, [tau])[:, 0] if rec.gt is not None else np.full(len(idx), np.nan)
    t = pd.DataFrame(dict(index=idx, head=[str(rel.heads[i]) for i in idx], relevance=row[idx], iou=ious))
    t["rank"] = np.arange(1, len(t) + 1)
    t["bottom_rank"] = t["index"].map({int(h): r for r, h in enumerate(bottom_k(row, n, mask), 1)})
    return t


def method_maps(rec: WordRecord, rel, concept: str, k, mask: np.ndarray, size) -> dict[str, np.ndarray]:
    """DAAM's, top-k's and bottom-k's map of the word at image size, normalised."""
    out = {}
    for m in ("daam", "top", "bottom"):
        s = head_set(m, rel.heads, None if m == "daam" else rel.row(concept), k, mask=mask, concept=concept)
        out[m] = normalize(mean_map(rec.maps[s.index], s.weights), size).numpy()
    return out


def overlay_rgb(image: np.ndarray, m: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """A map (any size, normalised here) blended over its image as uint8 RGB, in the package's map
    colours: the thumbnails' version of ``plots.plot_overlay``."""
    from matplotlib import colormaps
    from .plots import MAP_CMAP
    img = np.asarray(image)
    img = img.astype(np.float32) / 255 if img.dtype == np.uint8 else img.astype(np.float32)
    m = normalize(np.asarray(m, np.float32), img.shape[:2]).numpy()
    rgb = colormaps[MAP_CMAP](m)[..., :3]
    return (np.clip((1 - alpha) * img + alpha * rgb, 0, 1) * 255).round().astype(np.uint8)


def _jpeg(rgb: np.ndarray, max_side: int = 2 * THUMB) -> str:
    """A data URI of the image as JPEG (the page scales it; smooth maps compress several-fold better
    than as PNG), at most ``max_side`` px a side."""
    from PIL import Image
    im = Image.fromarray(rgb)
    if max(im.size) > max_side:
        im = im.resize((max_side, max_side * im.size[1] // im.size[0]), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class Explorer:
    """The explorer in JupyterLab: ``Explorer(recs, rel, images, params).widget``.

    ``shown`` is what the view draws now: (image, word, concept, k), for tests and for a reader's
    code. Changing any control redraws it."""

    def __init__(self, recs: Sequence[WordRecord], rel, images, params: dict, mask: np.ndarray | None = None):
        import ipywidgets as W
        from .tables import eligible
        self.recs, self.rel, self.images, self.params = list(recs), rel, images, params
        self.mask = eligible(params, rel.heads) if mask is None else mask
        self.by_image: dict[int, list[WordRecord]] = {}
        check_inputs(self.recs, rel, images, self.mask)
        for r in self.recs:
            self.by_image.setdefault(r.image, []).append(r)
        first = next(iter(self.by_image))
        self.image = W.Dropdown(options=[(f"{i}: {rs[0].caption}", i) for i, rs in self.by_image.items()], value=first,
                                description="image", layout=W.Layout(width="60%"))
        self.word = W.Dropdown(description="word")
        self.concept = W.Dropdown(options=list(rel.concepts), description="concept")
        self.k = W.FloatSlider(value=float(params["k"]) if params["k"] <= 1 else 0.25, min=0.05, max=1.0, step=0.05,
                               description="k", continuous_update=False)
        self.view = W.Image(format="png")  # the drawn figure as PNG bytes: the same in a kernel and outside one
        self.shown: tuple | None = None
        self._words()
        self.image.observe(lambda _: self._words(), "value")
        for w in (self.word, self.concept, self.k):
            w.observe(lambda _: self.render(), "value")
        self.widget = W.VBox([W.HBox([self.image, self.word]), W.HBox([self.concept, self.k]), self.view])
        self.render()

    def _words(self) -> None:
        rs = self.by_image[self.image.value]
        self._busy = True
        self.word.options = [(f"{r.word} ({r.kind})", j) for j, r in enumerate(rs)]
        self.word.value = 0
        self._busy = False
        self.concept.value = self._concept(rs[0].kind)
        self.render()

    def _concept(self, kind: str) -> str:
        return self.rel.concepts[self.rel.index(kind)]

    def render(self) -> None:
        if getattr(self, "_busy", False) or self.word.value is None:
            return
        import matplotlib.pyplot as plt
        from .plots import plot_overlay
        r = self.by_image[self.image.value][self.word.value]
        img = self.images[r.image]
        heads = heads_of(r, self.rel, self.concept.value, self.mask, self.params["tau"])
        maps = method_maps(r, self.rel, self.concept.value, self.k.value, self.mask, img.shape[:2])
        n_top = len(head_set("top", self.rel.heads, self.rel.row(self.concept.value), self.k.value, mask=self.mask).index)
        cols = 8
        rows = 1 + int(np.ceil(len(heads) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.55 * rows), squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        axes[0, 0].imshow(img, interpolation="nearest")
        axes[0, 0].set_title("image", fontsize=7)
        for ax, (m, label) in zip(axes[0, 1:], (("daam", "DAAM"), ("top", f"top-k ({n_top})"), ("bottom", "bottom-k"))):
            plot_overlay(img, maps[m], ax, normalise=False, title=label)
            ax.title.set_fontsize(7)
        for ax, h in zip(axes[1:].flat, heads.itertuples()):
            plot_overlay(img, r.maps[h.index], ax)
            ax.set_title(f"#{h.rank} rel {h.relevance:.2f}\nIoU {h.iou:.2f}", fontsize=6,
                         color="C3" if h.rank <= n_top else "C0" if h.bottom_rank <= n_top else "k")
        fig.suptitle(f"'{r.word}' in: {r.caption} (concept {self.concept.value}; red: top-k, blue: bottom-k)", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        self.view.value = buf.getvalue()
        self.shown = (r.image, r.word, self.concept.value, self.k.value)


def check_inputs(recs: Sequence[WordRecord], rel, images, mask: np.ndarray) -> None:
    """What the explorer draws must exist: records, an image for each, one map per head of the
    relevance and a mask over those heads; each a ValueError that says which."""
    if not len(recs):
        raise ValueError("no word records to explore (with masks, where the page needs them): nothing to draw")
    n = len(rel.heads)
    if np.shape(mask) != (n,):
        raise ValueError(f"an eligibility mask of {np.shape(mask)} for a relevance over {n} heads")
    for r in recs:
        if not 0 <= r.image < len(images):
            raise ValueError(f"word record {r.word!r} is of image {r.image}, but {len(images)} image(s) were given")
        if len(r.maps) != n:
            raise ValueError(f"word record {r.word!r} has maps of {len(r.maps)} heads, the relevance {n}: records and "
                             "relevance must come from the same model")


def _script_json(data) -> str:
    """JSON that is safe inside an inline ``<script>``: no ``<``, ``>`` or ``&`` (a name holding
    ``</script>`` cannot end the element), line separators escaped too."""
    text = json.dumps(data)  # ensure_ascii: U+2028/U+2029 are escaped already
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_page(path: Path, recs: Sequence[WordRecord], rel, images, params: dict, n_images: int = 4,
               mask: np.ndarray | None = None, require_masks: bool = True) -> Path:
    """The explorer as one self-contained HTML page (thumbnails embedded): the first ``n_images``
    images with scored words; clicking a word shows its heads ordered by relevance to its kind,
    with relevance and single-head IoU; the k slider marks the top-k.

    Every name (words, kinds, concepts, head names, captions) reaches the page as data: JSON
    escaped for the script element, and HTML-escaped by the page's script where it is shown, so
    a name from a shared relevance file cannot inject markup or script. ``require_masks=False``
    shows records without masks too (their IoU as '-')."""
    from .tables import eligible
    mask = eligible(params, rel.heads) if mask is None else np.asarray(mask, bool)
    by_image: dict[int, list[WordRecord]] = {}
    for r in recs:
        if (r.gt is not None or not require_masks) and (r.image in by_image or len(by_image) < n_images):
            by_image.setdefault(r.image, []).append(r)
    check_inputs([r for rs in by_image.values() for r in rs], rel, images, mask)
    data = []
    for i, rs in by_image.items():
        img = images[i]
        words = []
        for r in rs:
            concept = rel.concepts[rel.index(r.kind)]
            heads = heads_of(r, rel, concept, mask, params["tau"])
            maps = method_maps(r, rel, concept, params["k"], mask, img.shape[:2])
            words.append(dict(word=r.word, kind=r.kind, concept=concept,
                              methods={m: _jpeg(overlay_rgb(img, v)) for m, v in maps.items()},
                              heads=[dict(head=h.head, rank=int(h.rank), bottom=int(h.bottom_rank),
                                          relevance=round(float(h.relevance), 4),
                                          iou=None if np.isnan(h.iou) else round(float(h.iou), 4),
                                          src=_jpeg(overlay_rgb(img, r.maps[h.index]), THUMB)) for h in heads.itertuples()]))
        data.append(dict(image=int(i), caption=rs[0].caption, src=_jpeg(np.asarray(img if img.dtype == np.uint8 else
                                                                                    (np.clip(img, 0, 1) * 255).round().astype(np.uint8))),
                         words=words))
    n_eligible = int(mask.sum())
    k0 = params["k"] if params["k"] > 1 else max(1, int(round(params["k"] * n_eligible)))
    page = PAGE.replace("__K__", str(int(k0))).replace("__N__", str(n_eligible))
    page = page.replace("__T__", str(THUMB)).replace("__M__", str(2 * THUMB))
    page = page.replace("__TITLE__", html.escape(f"Head explorer: {params.get('profile', '')}"))
    page = page.replace("__DATA__", _script_json(data))  # last: no placeholder is looked for inside the data
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
.words button{margin:2px;padding:3px 8px;border:1px solid #999;background:#f6f6f6;cursor:pointer}
.words button.on{background:#333;color:#fff}.img{margin:1.2em 0;border-top:1px solid #ddd;padding-top:.6em}
.methods figure,.grid figure{display:inline-block;margin:3px;text-align:center;font-size:11px}
.grid img{width:__T__px;height:__T__px;image-rendering:pixelated}.methods img{width:__M__px;height:__M__px;image-rendering:pixelated}
.grid figure.top img{outline:3px solid #c33}.grid figure.bottom img{outline:3px dashed #36c}figcaption{line-height:1.2}</style></head><body>
<h1>__TITLE__</h1>
<p>For each image, click a word: DAAM's map, top-k's and bottom-k's (at the profile's k), then every
eligible head's own map, most relevant to the word's concept first, with its relevance and its
single-head IoU against the word's mask. The slider marks the top k heads (red frame) and the bottom k
(blue dashes: the heads bottom-k averages, ties broken as it breaks them).</p>
<p><label>k = <span id="kval">__K__</span> of __N__ eligible heads
<input id="k" type="range" min="1" max="__N__" value="__K__"></label></p>
<div id="root"></div>
<script>
const DATA = __DATA__;
function esc(s){return String(s).replace(/[&<>"'`]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;', '`': '&#96;'}[c]));}
function k(){return +document.getElementById('k').value;}
function show(i, j){
  const d = DATA[i], w = d.words[j], box = document.getElementById('img' + i);
  box.querySelectorAll('.words button').forEach((b, n) => b.classList.toggle('on', n === j));
  box.querySelector('.methods').innerHTML = ['daam', 'top', 'bottom'].map(m =>
    `<figure><img src="${esc(w.methods[m])}"><figcaption>${{daam: 'DAAM', top: 'top-k', bottom: 'bottom-k'}[m]}</figcaption></figure>`).join('');
  const g = box.querySelector('.grid');
  g.dataset.word = w.word;
  g.innerHTML = w.heads.map(h => `<figure data-rank="${h.rank}" data-bottom="${h.bottom}"><img src="${esc(h.src)}" title="${esc(h.head)}">
    <figcaption>#${h.rank} rel ${h.relevance.toFixed(2)}<br>IoU ${h.iou === null ? '-' : h.iou.toFixed(2)}</figcaption></figure>`).join('');
  mark();
}
function mark(){
  document.getElementById('kval').textContent = k();
  document.querySelectorAll('.grid figure').forEach(f => {
    f.classList.toggle('top', +f.dataset.rank <= k());
    f.classList.toggle('bottom', +f.dataset.bottom <= k());
  });
}
document.getElementById('k').addEventListener('input', mark);
document.getElementById('root').innerHTML = DATA.map((d, i) => `<div class="img" id="img${i}">
  <figure style="float:left;margin:0 1em 0 0"><img src="${esc(d.src)}"></figure><p>${esc(d.caption)}</p>
  <div class="words">${d.words.map((w, j) => `<button onclick="show(${i},${j})">${esc(w.word)} <small>(${esc(w.kind)})</small></button>`).join('')}</div>
  <div class="methods" style="clear:both"></div><div class="grid"></div></div>`).join('');
DATA.forEach((d, i) => show(i, 0));
</script></body></html>"""
