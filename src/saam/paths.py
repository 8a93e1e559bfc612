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
POLYSEMY = DATA / "polysemous-colours.yaml"  # chapter 05 on SD: colour words with a second reading
COCO_WORD_FILE = "word_categories.yaml"  # in a COCO-format folder: category -> concept and caption words


def overrides_tag(overrides: str | dict | None) -> str:
    """A run with overrides gets a folder of its own, ``set-<10 hex digits of the overrides>``
    (the Makefile forms the same name from SET): it never overwrites a plain run's outputs."""
    import hashlib
    import json
    if not overrides or (isinstance(overrides, str) and not overrides.strip()):
        return ""
    text = overrides if isinstance(overrides, str) else json.dumps(overrides, sort_keys=True)
    return "set-" + hashlib.sha256(text.encode()).hexdigest()[:10]


# the profiles whose plain runs are committed, and where: the paper profile's figures/, the MM-DiT organism's
# figures/mmdit/ (the Makefile's FIGDIR says the same)
COMMITTED = {"paper": "figures", "mmdit": "figures/mmdit"}


def figures_dir(profile: str, overrides: str | dict | None = None) -> Path:
    """Where a profile's figures and tables go: the committed folder of a plain run of a
    :data:`COMMITTED` profile (``figures/``, ``figures/mmdit/``), ``build/<profile>/figures/`` for
    any other profile, ``build/<profile>/set-<hash>/figures/`` for a run with overrides
    ($SAAM_FIGURES overrides all, for tests)."""
    if os.environ.get("SAAM_FIGURES"):
        return Path(os.environ["SAAM_FIGURES"])
    tag = overrides_tag(overrides)
    if tag:
        return BUILD / profile / tag / "figures"
    return ROOT / COMMITTED[profile] if profile in COMMITTED else BUILD / profile / "figures"


PARAMS = ROOT / "params"
