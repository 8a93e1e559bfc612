"""Evaluation images with real masks: COCO-format datasets, read with ``pycocotools``.

A dataset folder holds an instances file (``instances*.json``: images, categories, instance
masks as polygons or RLE), a captions file (``captions*.json``: one or more captions per image)
and the images, under the folder or a subfolder (COCO val2017's ``annotations/`` and ``val2017/``
work as they are). A caption word is scored against the union of the masks of its category; which
words name which category (synonyms, plurals: "dogs", "puppy" -> dog) and which HRV concept a
category belongs to (dog -> Animals) come from a small YAML file the user can edit:
``word_categories.yaml`` in the dataset folder if there is one, else ``data/coco-words.yaml``.

Both the ShapesWorld scenes and such a dataset become :class:`Item` s, which the real-image
protocol (``saam.evaluate.real_image_protocol``) noises, denoises while tracing, and scores: one
scoring path, two readers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .words import split_words



@dataclass
class Word:
    """One scored word of a caption: its truth is ``mask`` (None: its category is not in the image)."""
    word: str
    occurrence: int
    kind: str                  # the concept its head set is chosen for (HRV concept, or color/shape/size)
    mask: np.ndarray | None    # (H, W) bool at the item's image size
    obj: int = -1              # ShapesWorld: the object the word was written for


@dataclass
class Item:
    image: np.ndarray          # (H, W, 3) uint8
    caption: str
    words: list[Word]
    n_objects: int = 1
    source: str = ""           # image file or scene id
    unmapped: list[str] = field(default_factory=list)  # caption words of a category with no concept


def read_word_map(path: Path) -> dict[str, dict]:
    """category -> {"concept": str | None, "words": [str, ...]} from a YAML file, checked."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    out = {}
    for cat, v in data.items():
        if not isinstance(v, dict) or not isinstance(v.get("words", []), list):
            raise ValueError(f"{path}: {cat!r} must map to {{concept: ..., words: [...]}}")
        out[str(cat)] = dict(concept=v.get("concept"), words=[str(w).lower() for w in v.get("words") or [cat]])
    return out


def word_map_for(folder: Path) -> Path:
    from . import paths
    own = Path(folder) / paths.COCO_WORD_FILE
    return own if own.exists() else paths.DATA / "coco-words.yaml"


def _find(folder: Path, pattern: str) -> Path:
    hits = sorted(Path(folder).glob(pattern)) + sorted(Path(folder).glob(f"*/{pattern}"))
    if not hits:
        raise FileNotFoundError(f"no {pattern} in {folder} (a COCO-format dataset: instances and captions "
                                "files, and the images; see saam.datasets)")
    return hits[0]


def _image_file(folder: Path, name: str) -> Path:
    for f in (Path(folder) / name, *(d / name for d in sorted(Path(folder).iterdir()) if d.is_dir())):
        if f.exists():
            return f
    raise FileNotFoundError(f"image {name} is not in {folder} or a subfolder of it")


def read_captions(folder: Path) -> list[str]:
    """Every caption of a COCO-format dataset, in annotation order."""
    caps = json.loads(_find(Path(folder), "captions*.json").read_text())
    return [a["caption"].strip() for a in sorted(caps["annotations"], key=lambda a: a["id"])]


def read_coco(folder: Path, size: tuple[int, int] | None = None, n: int | None = None,
              word_file: Path | None = None) -> list[Item]:
    """Items of a COCO-format dataset, first caption of each image, in image-id order.

    Args:
        size: (H, W) to resize images (bilinear) and masks (nearest) to, e.g. the model's native
            resolution; None keeps them.
        n: at most this many images (those with at least one scored word).
    Returns:
        Items whose words are the caption words that name a category of the word map; a word of
        a category absent from the image has ``mask=None`` (scored apart as missing).
    """
    from PIL import Image
    from pycocotools.coco import COCO
    import contextlib
    import io
    folder = Path(folder)
    wmap = read_word_map(word_file or word_map_for(folder))
    by_word = {w: cat for cat, v in wmap.items() for w in v["words"]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        inst = COCO(str(_find(folder, "instances*.json")))
    caps = json.loads(_find(folder, "captions*.json").read_text())
    captions: dict[int, list[str]] = {}
    for a in sorted(caps["annotations"], key=lambda a: a["id"]):
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    cat_name = {c["id"]: c["name"] for c in inst.loadCats(inst.getCatIds())}
    items = []
    for img_id in sorted(inst.getImgIds()):
        if img_id not in captions:
            continue
        info = inst.loadImgs(img_id)[0]
        h, w = info["height"], info["width"]
        masks: dict[str, np.ndarray] = {}
        anns = inst.loadAnns(inst.getAnnIds(imgIds=img_id, iscrowd=None))
        for a in anns:  # polygons, RLE or compressed RLE
            m = inst.annToMask(a).astype(bool)
            name = cat_name[a["category_id"]]
            masks[name] = masks.get(name, np.zeros((h, w), bool)) | m
        image = np.asarray(Image.open(_image_file(folder, info["file_name"])).convert("RGB"))
        if size is not None and tuple(size) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
            masks = {k: np.asarray(Image.fromarray(m).resize((size[1], size[0]), Image.NEAREST)) for k, m in masks.items()}
        caption = captions[img_id][0]
        counts: dict[str, int] = {}
        words, unmapped = [], []
        for tok in split_words(caption):
            low = tok.lower()
            if low not in by_word:
                continue
            occ = counts.get(low, 0)
            counts[low] = occ + 1
            cat = by_word[low]
            if not wmap[cat]["concept"]:
                unmapped.append(tok)  # reported apart: no concept to pick heads for
                continue
            words.append(Word(tok, occ, wmap[cat]["concept"], masks.get(cat)))
        if words:
            items.append(Item(image, caption, words, n_objects=len(anns), source=info["file_name"], unmapped=unmapped))
        if n is not None and len(items) >= n:
            break
    return items


def shapesworld_items(scenes) -> list[Item]:
    """ShapesWorld scenes as items: rendered image, exact masks; a word's truth is the union of
    the objects sharing its attribute (the same rule as the generation protocol and COCO's)."""
    from .shapes.world import render
    out = []
    for i, s in enumerate(scenes):
        img, masks = render(s)
        words = []
        for w in s.words:
            attr = getattr(s.objects[w.obj], w.kind)
            union = np.any([m for o, m in zip(s.objects, masks) if getattr(o, w.kind) == attr], axis=0)
            words.append(Word(w.word, w.occurrence, w.kind, union, w.obj))
        out.append(Item(img, s.caption, words, len(s.objects), source=f"scene {i}"))
    return out
