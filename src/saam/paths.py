"""Every location in the repository, in one place."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("SAAM_ROOT", Path(__file__).resolve().parents[2]))
DATA = ROOT / "data"
MODEL_DIR = DATA / "shapesworld-model"
CONCEPTS = DATA / "concepts.yaml"
HRV = DATA / "hrv"                     # HRV's published vectors and concept list (Apache-2.0)
HRV_CONCEPTS = HRV / "340_final_text_list.csv"
VARIANTS = DATA / "variants"           # organism variants of the ablation (issue 10)
CACHE = Path(os.environ.get("SAAM_CACHE", DATA / "cache"))
RUNS = DATA / "runs"
BUILD = ROOT / "build"
COCO_WORD_FILE = "word_categories.yaml"  # in a COCO-format folder: category -> concept and caption words


def figures_dir(profile: str) -> Path:
    """Where a profile's figures and tables go: the committed ``figures/`` for ``paper``,
    ``build/<profile>/figures/`` for any other ($SAAM_FIGURES overrides both, for tests)."""
    if os.environ.get("SAAM_FIGURES"):
        return Path(os.environ["SAAM_FIGURES"])
    return ROOT / "figures" if profile == "paper" else BUILD / profile / "figures"


FIGURES = figures_dir(os.environ.get("PROFILE", "paper"))


def use_profile(profile: str) -> Path:
    """Point :data:`FIGURES` at ``profile``'s folder (``saam.profiles.load`` calls this)."""
    global FIGURES
    FIGURES = figures_dir(profile)
    return FIGURES
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params"
