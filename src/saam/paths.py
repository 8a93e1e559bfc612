"""Every location in the repository, in one place."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("SAAM_ROOT", Path(__file__).resolve().parents[2]))
DATA = ROOT / "data"
MODEL_DIR = DATA / "shapesworld-model"
CONCEPTS = DATA / "concepts.yaml"
CACHE = Path(os.environ.get("SAAM_CACHE", DATA / "cache"))
RUNS = DATA / "runs"
BUILD = ROOT / "build"
# the paper profile writes the committed figures/; any other profile writes under build/<profile>/
_PROFILE = os.environ.get("PROFILE", "paper")
FIGURES = Path(os.environ.get("SAAM_FIGURES", ROOT / "figures" if _PROFILE == "paper"
                              else BUILD / _PROFILE / "figures"))
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params"
