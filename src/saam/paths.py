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
FIGURES = ROOT / "figures"
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params"
BUILD = ROOT / "build"
