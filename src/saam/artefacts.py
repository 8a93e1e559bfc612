"""Every figure and table, declared once: which chapter (notebook) produces it, and for which models.

The notebooks' "Produces" lines, the README's map, the report and the notebook test all read
this declaration instead of keeping lists of their own. Names are stems: figures are written as
``.png`` + ``.pdf``, tables as ``.csv`` + ``.md`` + ``.tex``, other files keep their suffix.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chapter:
    notebook: str
    title: str
    produces: tuple[str, ...]
    shapesworld_only: bool = False  # needs ShapesWorld's renderer or analyzer; says so elsewhere
    real_only: tuple[str, ...] = ()  # of ``produces``: written on real-model (SD) profiles only
    dit_only: tuple[str, ...] = ()  # of ``produces``: written on MM-DiT profiles only (output-space maps)


CHAPTERS = (
    Chapter("00-shapesworld-model", "The ShapesWorld model organism",
            ("fig0-training-curves", "fig0-samples", "analyzer.json", "fidelity.json"), shapesworld_only=True),
    Chapter("01-attention-maps", "Attention maps of one generation (DAAM-style)", ("fig1-word-maps",)),
    Chapter("02-head-relevance", "Head relevance and where attention sinks",
            ("fig2-head-relevance-hist", "fig2-relevance-heatmap", "fig2-timestep-stability", "tab2-concentration",
             "fig2-attention-sinks", "tab2-attention-sinks")),
    Chapter("03-miou", "Table 1: mIoU of DAAM vs selective aggregation",
            ("tab1-miou", "tab1-miou-by-kind", "tab1-tau-sweep", "tab1-paired-grid", "fig3-paired-grid",
             "fig3-selection-frequency", "tab1-relevance-convergence", "fig3-relevance-convergence", "tab1-rules",
             "tab1-relevance-reestimates", "tab1-ci-coverage", "fig3-relevance-reestimates", "results.json")),
    Chapter("04-most-vs-least", "Most vs least relevant heads",
            ("tab2-k-sweep", "fig4-k-sweep", "fig4-examples", "fig4-relevance-vs-localisation",
             "tab2-relevance-vs-localisation", "tab2-mechanism", "fig4-mechanism", "tab2-blocks", "fig4-blocks",
             "explorer.html"), dit_only=("tab2-blocks", "fig4-blocks")),
    Chapter("05-misinterpretation", "Diagnosing misinterpretations",
            ("tab3-binding-auroc", "fig5-roc", "fig5-case-studies", "tab5-polysemy", "fig5-polysemy"),
            real_only=("tab5-polysemy", "fig5-polysemy")),
    Chapter("06-organisms", "Which organism property decides the outcome",
            ("tab4-organisms", "fig6-organisms"), shapesworld_only=True),
)
BY_NOTEBOOK = {c.notebook: c for c in CHAPTERS}
TABLE_SUFFIXES = (".csv", ".md", ".tex")
FIGURE_SUFFIXES = (".png", ".pdf")


def files(name: str) -> list[str]:
    """The files an artefact stem stands for."""
    if "." in name:
        return [name]
    return [name + s for s in (FIGURE_SUFFIXES if name.startswith("fig") else TABLE_SUFFIXES)]


def chapter(notebook: str) -> Chapter:
    if notebook not in BY_NOTEBOOK:
        raise KeyError(f"{notebook!r} is not a declared chapter; chapters: {list(BY_NOTEBOOK)}")
    return BY_NOTEBOOK[notebook]


def produces_markdown(notebook: str, figures_dir: str = "figures") -> str:
    """The chapter's "Produces" line, for its header."""
    c = chapter(notebook)
    names = ", ".join(f"`{n}`" + (" (SD profiles)" if n in c.real_only else " (MM-DiT profiles)" if n in c.dit_only else "")
                      for n in c.produces)
    only = " (ShapesWorld profiles only)" if c.shapesworld_only else ""
    return f"**Produces{only}** in `{figures_dir}/`: {names}."
