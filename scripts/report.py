"""Build an HTML report from the executed notebooks: build/report/index.html + one page per chapter.

Figures are embedded in the chapter pages (nbconvert inlines notebook outputs); the front page
carries Table 1 and links every chapter. Run `make all` first.
"""
import argparse
import html
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="paper")
    a = ap.parse_args()
    from nbconvert import HTMLExporter
    import nbformat
    src = ROOT / "build" / a.profile
    out = ROOT / "build" / "report"
    out.mkdir(parents=True, exist_ok=True)
    nbs = sorted(src.glob("[0-9][0-9]-*.ipynb"))
    nbs = [n for n in nbs if not n.stem.endswith(".partial")]
    if not nbs:
        raise SystemExit(f"no executed notebooks in {src}; run `make all PROFILE={a.profile}` first")
    exp = HTMLExporter()
    items = []
    for nb in nbs:
        body, _ = exp.from_notebook_node(nbformat.read(nb, as_version=4))
        (out / f"{nb.stem}.html").write_text(body)
        title = nbformat.read(nb, as_version=4).cells[0].source.splitlines()[0].lstrip("# ")
        items.append(f'<li><a href="{nb.stem}.html">{html.escape(title)}</a></li>')
    figs = ROOT / "figures" if a.profile == "paper" else src / "figures"
    table = (figs / "tab1-miou.csv")
    import pandas as pd
    t1 = pd.read_csv(table).to_html(index=False, float_format="%.3f") if table.exists() else "<p>(no Table 1)</p>"
    img = figs / "fig4-k-sweep.png"
    if img.exists():  # the report folder is self-contained
        import shutil
        shutil.copy(img, out / img.name)
    front = f"""<!doctype html><html><head><meta charset="utf-8"><title>saam report ({a.profile})</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px}}</style></head><body>
<h1>Selective aggregation of attention maps: ShapesWorld report ({a.profile})</h1>
<h2>Table 1: mIoU</h2>{t1}
{f'<h2>mIoU against k</h2><img src="{img.name}" width="600">' if img.exists() else ''}
<h2>Chapters</h2><ol>{''.join(items)}</ol></body></html>"""
    (out / "index.html").write_text(front)
    print(out / "index.html")


if __name__ == "__main__":
    main()
