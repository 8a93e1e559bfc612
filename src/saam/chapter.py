"""What every chapter does first and last: load its profile, and write its figures and tables.

    p, out = start("03-miou", profile, overrides)
    out.table(tab, "tab1-miou")          # <figures>/tab1-miou.csv, .md, .tex
    out.figure(fig, "fig3-paired-grid")  # .png + .pdf, shown inline
    out.results(table1=...)              # merged into <figures>/results.json

Where outputs go is the profile's ``figures`` folder (``saam.profiles.load``): ``figures/`` for a
plain ``paper`` run, ``build/<profile>/...`` otherwise. Every write is atomic.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from . import paths
from .cache import atomic_write


class Outputs:
    """A chapter's writer into one figures folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def figure(self, fig, name: str) -> None:
        """<name>.png and .pdf (no timestamps, so re-runs are byte-identical); the PNG is shown inline
        when running in a notebook (so executed chapters and the report carry every figure)."""
        import matplotlib.pyplot as plt
        png = b""
        for ext in ("png", "pdf"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=130, bbox_inches="tight",
                        metadata={"CreationDate": None} if ext == "pdf" else {"Software": None})
            atomic_write(self.folder / f"{name}.{ext}", buf.getvalue())
            png = png or buf.getvalue()
        plt.close(fig)
        _show_inline(png)

    def table(self, df, name: str, floatfmt: str = ".3f") -> None:
        """<name>.csv, .md and .tex."""
        atomic_write(self.folder / f"{name}.csv", df.to_csv(index=False).encode())
        atomic_write(self.folder / f"{name}.md", df.to_markdown(index=False, floatfmt=floatfmt).encode())
        atomic_write(self.folder / f"{name}.tex",
                     df.to_latex(index=False, float_format=lambda x: format(x, floatfmt)).encode())

    def json(self, name: str, data: dict) -> None:
        """<name>.json, keys sorted."""
        write_json(self.folder / f"{name}.json", data)

    def read(self, name: str) -> dict | None:
        """<name>.json as written by an earlier chapter, or None."""
        f = self.folder / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def results(self, **entries) -> dict:
        """Merge headline numbers into results.json; returns the whole of it."""
        cur = self.read("results") or {}
        cur.update(entries)
        self.json("results", cur)
        return cur

    def verdicts(self, **verdicts) -> dict:
        """Merge verdicts (``saam.paired.verdict``) into results.json's ``verdict`` entry."""
        return self.results(verdict={**(self.read("results") or {}).get("verdict", {}), **verdicts})


def write_json(path: Path, data: dict) -> None:
    atomic_write(Path(path), json.dumps(data, indent=1, sort_keys=True, default=float).encode())


def _show_inline(png: bytes) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and type(shell).__name__ != "TerminalInteractiveShell":
        display(Image(data=png, format="png"))


def load(profile: str | None = None, overrides: str | dict | None = None) -> dict:
    """A profile's parameters (``saam.profiles.load``), with its model folder checked (and every
    organism variant it compares): a run stops before any chapter writes anything if one is absent,
    incomplete or of the wrong kind."""
    from .profiles import load as load_profile
    p = load_profile(profile, overrides)
    from .models import model_path  # imports torch: only where weights are to be checked
    model_path(p)
    if p["model"] == "shapesworld":
        from .shapes.model import variant_folder
        for v in p.get("variants") or []:
            try:
                folder = variant_folder(v)
            except ValueError as e:
                raise ValueError(f"{p['profile']}: variants: {e}") from None
            model_path(dict(p, model_path=str(folder)))
    return p


def start(notebook: str, profile: str, overrides: str | dict | None = None) -> tuple[dict, Outputs]:
    """Load and validate the chapter's profile (real models: stop here if the weights are absent),
    seed torch, record what made the outputs, and say what the chapter produces and where.
    Returns the parameters and the chapter's :class:`Outputs`."""
    import torch
    from IPython.display import Markdown, display
    from .artefacts import produces_markdown
    p = load(profile, overrides)
    out = Outputs(p["figures"])
    out.results(run=dict(profile=profile, overrides=p["overrides"]))
    torch.manual_seed(p["seed"])
    where = out.folder.relative_to(paths.ROOT) if out.folder.is_relative_to(paths.ROOT) else out.folder
    display(Markdown(produces_markdown(notebook, str(where)) + f" Profile `{profile}`"
                     + (f" with overrides `{overrides}`" if overrides else "") + "."))
    return p, out


def shapesworld_only(params: dict, why: str) -> bool:
    """True on ShapesWorld profiles; otherwise says in one line why the chapter (or section) is skipped."""
    if params["model"] == "shapesworld":
        return True
    from IPython.display import Markdown, display
    display(Markdown(f"*Skipped for `{params['model']}`: {why}*"))
    return False
