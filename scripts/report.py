"""Build the HTML report from a profile's executed chapters: build/<profile>/report/.

    python scripts/report.py --profile paper      # after `make all`

A front page (the claim, what we found, Table 1, the key figures, the organism's fidelity and head
specialisation, links), then one page per chapter with its figures inline and a table of contents.
The folder is self-contained: chapter figures are embedded by nbconvert, front-page figures are
copied beside it, so it opens from disk. Parameter cells that papermill superseded, and stderr
streams, are left out of the pages.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;line-height:1.45;color:#222}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%}nav a{margin-right:1em}figure{margin:1em 0}figcaption{font-size:0.85em;color:#555}
.note{background:#f7f7f0;border-left:4px solid #cc9;padding:0.5em 1em}"""
KEY_FIGURES = (("fig4-k-sweep", "mIoU against k: most relevant, least relevant and random heads vs DAAM"),
               ("fig6-organisms", "Head specialisation and Table 1 on each organism variant"),
               ("fig2-attention-sinks", "Where cross-attention goes: start token, words, end, padding"),
               ("fig4-examples", "Word maps from DAAM's heads, the most and the least relevant heads"))


WIDGET = "application/vnd.jupyter.widget-view+json"


def clean(nb):
    """Drop the parameters cell papermill superseded, stderr streams (progress, warnings) and live
    widgets (they need a kernel or a widget manager from a CDN; the report has the head explorer as
    a static page, ``explorer.html``, instead)."""
    injected = any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    cells = []
    for c in nb.cells:
        tags = c.metadata.get("tags", [])
        if injected and "parameters" in tags:
            continue
        if c.cell_type == "code":
            c.outputs = [o for o in c.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")
                         and WIDGET not in o.get("data", {})]
        cells.append(c)
    nb.cells = cells
    nb.metadata.pop("widgets", None)  # the saved widget state: nbconvert would load a widget manager for it
    return nb


def contents(nb, stems: list[str]) -> str:
    """Markdown for the top of a chapter page: links to the report's pages and the chapter's sections."""
    nav = "[report](index.html) · " + " · ".join(f"[{s[:2]}]({s}.html)" for s in stems)
    heads = [line[3:].strip() for c in nb.cells if c.cell_type == "markdown"
             for line in c.source.splitlines() if line.startswith("## ")]
    toc = "".join(f"\n- [{h}](#{h.replace(' ', '-')})" for h in heads)
    return nav + ("\n\n**Contents**" + toc if toc else "")


CODE_TOGGLE = ("<style>body[data-code='hidden'] .jp-CodeCell .jp-Cell-inputWrapper{display:none}"
               "#code-toggle{position:fixed;top:.5em;right:.5em;z-index:10;font:13px sans-serif}</style>"
               "<button id='code-toggle' type='button' onclick=\"var b=document.body,h=b.dataset.code==='hidden';"
               "b.dataset.code=h?'shown':'hidden';this.textContent=h?'hide code':'show code'\">show code</button>")


def chapter_pages(src: Path, out: Path) -> list[tuple[str, str]]:
    import nbformat
    from nbconvert import HTMLExporter
    exp = HTMLExporter(template_name="lab")
    exp.exclude_input_prompt = exp.exclude_output_prompt = True
    pages = []
    nbs = [n for n in sorted(src.glob("[0-9][0-9]-*.ipynb")) if not n.stem.endswith(".partial")]
    stems = [f.stem for f in nbs]
    for f in nbs:
        nb = clean(nbformat.read(f, as_version=4))
        nb.cells.insert(1, nbformat.v4.new_markdown_cell(contents(nb, stems)))
        title = nb.cells[0].source.splitlines()[0].lstrip("# ").strip()
        body, _ = exp.from_notebook_node(nb, resources=dict(metadata=dict(name=title)))
        # self-contained and offline: drop the template's CDN scripts (require.js for widgets, MathJax
        # for LaTeX); the chapters use neither, and a report opened from disk must not reach out
        body = re.sub(r'<script[^>]*src="https?://[^"]*"[^>]*>\s*</script>', "", body)
        # code folds behind one toggle, so a chapter reads as question, method, tables, figures, meaning
        body = body.replace("<body", "<body data-code='hidden'", 1)
        body = re.sub(r"(<body[^>]*>)", r"\1" + CODE_TOGGLE, body, count=1)
        (out / f"{f.stem}.html").write_text(body)
        pages.append((f.stem, title))
    return pages


def front_page(profile: str, figs: Path, out: Path, pages: list[tuple[str, str]]) -> str:
    import pandas as pd
    res = json.loads((figs / "results.json").read_text()) if (figs / "results.json").exists() else {}
    parts = [f"<h1>Selective aggregation of attention maps: the {html.escape(profile)} report</h1>",
             "<nav>" + "".join(f'<a href="{s}.html">{html.escape(s[:2])}</a>' for s, _ in pages) + "</nav>",
             "<h2>The claim</h2><p>DAAM explains a text-to-image diffusion model by averaging the cross-attention maps "
             "of every head for a word. The paper (Park, Ko, Byun, Rhee, 2026) averages only the heads most relevant to "
             "the word's concept (head relevance as in HRV) and reports better segmentation (mIoU), far worse maps from "
             "the least relevant heads, and maps that diagnose prompt misinterpretations.</p>"]
    run = res.get("run")
    if run:
        parts.append(f"<p class='note'>Made by profile <code>{html.escape(str(run['profile']))}</code>"
                     + (f" with overrides <code>{html.escape(str(run['overrides']))}</code>" if run.get("overrides") else
                        " without overrides") + ".</p>")
    from saam.ablation import sd14_reference
    from saam.paired import verdict_lines
    from saam.shapes.analyzer import FIDELITY_TARGETS
    lines = verdict_lines(res)
    if lines:  # the sentences results.json holds: the same in the README and chapter 03
        bold = lambda s: re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(s))  # noqa: E731
        parts.append("<h2>What we found</h2><p class='note'>Each method against DAAM on the same words (paired "
                     "bootstrap 95 % CI of the difference; for top-k two-level, over the relevance prompts and the "
                     "words, with the words-only CI beside it; better or worse only where it excludes 0; by word "
                     "kind first):</p><ul>"
                     + "".join(f"<li>{bold(s)}</li>" for s in lines) + "</ul>")
    side = two_organisms()
    if side is not None and profile in ("paper", "mmdit"):
        parts.append("<h2>Two organisms, one question</h2><p class='note'>Per word kind, on the generation protocol: "
                     "each method minus DAAM's all-head average on the same words [95 % CI; top-k's over the relevance "
                     "prompts and the words], organism D (UNet, <code>figures/</code>) beside the MM-DiT organism "
                     "(<code>figures/mmdit/</code>).</p>" + side.to_html(index=False, escape=True))
    if (figs / "tab1-miou.csv").exists():
        parts.append("<h2>Table 1: mIoU</h2>" + pd.read_csv(figs / "tab1-miou.csv").to_html(index=False, float_format="%.3f"))
    fid, conc = res.get("fidelity"), res.get("concentration_top25_hrv34") or res.get("concentration_top25")
    if fid or conc:
        items = []
        if fid:
            items.append(f"<li>fidelity: colour {fid['single_color_accuracy']:.0%}, shape {fid['single_shape_accuracy']:.0%}, "
                         f"two-object binding {fid['two_object_binding']:.0%} (targets "
                         + " / ".join(f"{t:.0%}" for t in FIDELITY_TARGETS.values()) + ")</li>")
        if conc:
            items.append("<li>head specialisation (relevance share of the top 25 % of heads): "
                         + ", ".join(f"{c} {conc[c]:.2f}" for c in conc if c.lower() in ("color", "shape", "size"))
                         + " (SD v1.4, HRV's published vectors: "
                         + " / ".join(f"{r['conc']:.2f}" for r in sd14_reference().values()) + ")</li>")
        parts.append("<h2>The model these results come from</h2><ul>" + "".join(items) + "</ul>")
    for name, caption in KEY_FIGURES:
        png = figs / f"{name}.png"
        if png.exists():
            shutil.copy(png, out / png.name)
            parts.append(f'<figure><img src="{png.name}" alt="{html.escape(caption)}"><figcaption>'
                         f"{html.escape(caption)} (<code>{name}</code>)</figcaption></figure>")
    if (figs / "explorer.html").exists():  # chapter 04's head explorer, a page of its own
        shutil.copy(figs / "explorer.html", out / "explorer.html")
        parts.append("<h2>Head explorer</h2><p><a id='explorer' href='explorer.html'>Every head's map of a word</a>, "
                     "ordered by relevance to its concept, with relevance and single-head IoU (chapter 04).</p>")
    parts.append("<h2>Chapters</h2><ol start='0'>" + "".join(
        f'<li><a href="{s}.html">{html.escape(t)}</a></li>' for s, t in pages) + "</ol>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>saam report ({html.escape(profile)})"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def two_organisms():
    """Organism D and the MM-DiT organism side by side, per kind, from the two committed runs'
    results.json (``make all`` and ``make all PROFILE=mmdit``): top-k's and bottom-k's verdicts against
    DAAM, ConceptAttention's and oracle-k's differences; None until both runs exist."""
    import pandas as pd
    from saam import paths
    runs = {"organism D (UNet)": paths.figures_dir("paper"), "MM-DiT organism": paths.figures_dir("mmdit")}
    if not all((f / "results.json").exists() for f in runs.values()):
        return None
    rows = []
    for name, folder in runs.items():
        res = json.loads((folder / "results.json").read_text())
        verdicts, by_kind = res.get("verdict", {}).get("table1_by_kind", {}), res["table1"].get("by_kind", {})
        for kind in sorted(verdicts):
            v, m = verdicts[kind], by_kind.get(kind, {})
            diff = lambda key: (f"{m[key]['diff']:+.3f} [{m[key]['diff_ci'][0]:+.3f}, {m[key]['diff_ci'][1]:+.3f}]"  # noqa: E731
                                if key in m else "")
            rows.append({"organism": name, "kind": kind, "DAAM": f"{m['daam']['miou']:.3f}" if "daam" in m else "",
                         "top-k": f"{v['diff']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}] {v['call']}",
                         "bottom-k": diff("bottom"), "ConceptAttention": diff("output"), "oracle-k (bound)": diff("oracle")})
    return pd.DataFrame(rows)


def build(profile: str, overrides: str = "") -> Path:
    from saam import paths
    src = paths.BUILD / profile / paths.overrides_tag(overrides)
    out = src / "report"
    if not any(src.glob("[0-9][0-9]-*.ipynb")):
        raise SystemExit(f"no executed chapters in {src}; run `make all PROFILE={profile}"
                         + (f' SET="{overrides}"' if overrides else "") + "` first")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pages = chapter_pages(src, out)
    (out / "index.html").write_text(front_page(profile, paths.figures_dir(profile, overrides), out, pages))
    return out / "index.html"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--set", default="", help="the overrides of the run to report (as given to make all SET=...)")
    a = ap.parse_args()
    print(build(a.profile, a.set))


if __name__ == "__main__":
    main()
