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
import unicodedata
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


class DatasetError(ValueError):
    """A dataset folder or file that cannot be read as described: the message names the file and the entry."""


class Items(list):
    """The items read, and what was left out and why: ``dropped`` counts images without a caption,
    images whose caption names no category of the word map, and words whose category has no concept."""
    def __init__(self, items=(), dropped: dict | None = None, files: dict | None = None):
        super().__init__(items)
        self.dropped, self.files = dict(dropped or {}), dict(files or {})

    def notes(self) -> str:
        """One line for a table's notes."""
        parts = [f"{v} {k.replace('_', ' ')}" for k, v in self.dropped.items() if v]
        return (f"{len(self)} images scored from {', '.join(str(f) for f in self.files.values())}"
                + (f"; left out: {', '.join(parts)}" if parts else ""))


def read_word_map(path: Path) -> dict[str, dict]:
    """category -> {"concept": str | None, "words": [str, ...]} from a YAML file, checked."""
    try:
        from .profiles import strict_yaml
        data = strict_yaml(Path(path).read_text())
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping category -> {{concept: ..., words: [...]}}")
    out = {}
    for cat, v in data.items():
        if not isinstance(v, dict) or not isinstance(v.get("words", []), list) or set(v) - {"concept", "words"}:
            raise DatasetError(f"{path}: {cat!r} must map to {{concept: ..., words: [...]}}, got {v!r}")
        if v.get("concept") is not None and not isinstance(v["concept"], str):
            raise DatasetError(f"{path}: {cat!r}: concept must be a concept name or null, got {v['concept']!r}")
        words = [str(w).lower() for w in v.get("words") or [cat]]
        if not all(w.strip() and len(split_words(w)) == 1 for w in words):
            raise DatasetError(f"{path}: {cat!r}: each word must be one word (letters or digits), got {words}")
        out[str(cat)] = dict(concept=v.get("concept"), words=words)
    return out


def word_map_for(folder: Path) -> Path:
    from . import paths
    own = Path(folder) / paths.COCO_WORD_FILE
    return own if own.exists() else paths.DATA / "coco-words.yaml"


def _find(folder: Path, pattern: str, split: str | None = None) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
    hits = sorted(folder.glob(pattern)) + sorted(folder.glob(f"*/{pattern}"))
    if split:
        hits = [h for h in hits if split in h.stem]
    if not hits:
        raise FileNotFoundError(f"no {pattern}{f' for split {split!r}' if split else ''} in {folder} (a COCO-format "
                                "dataset: instances and captions files, and the images; see saam.datasets)")
    if len(hits) > 1:
        raise DatasetError(f"{folder} holds {len(hits)} {pattern} files ({', '.join(str(h.relative_to(folder)) for h in hits)}); "
                           "say which split to read: the profile's data_split (e.g. data_split: val2017)")
    return hits[0]


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           "is the file complete?") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
        raise DatasetError(f"{path}: a COCO file needs the lists {list(keys)}; found "
                           f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    return data


def _check_entries(path: Path, entries: list, need: dict[str, type | tuple], what: str) -> None:
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise DatasetError(f"{path}: {what}[{i}] is not an object")
        for k, t in need.items():
            if not isinstance(e.get(k), t) or isinstance(e.get(k), bool):
                raise DatasetError(f"{path}: {what}[{i}] (id {e.get('id')!r}) needs {k!r} "
                                   f"({t.__name__ if isinstance(t, type) else ' or '.join(x.__name__ for x in t)}), "
                                   f"got {e.get(k)!r}")


def _check_unique(path: Path, entries: list, what: str) -> None:
    """Every entry's id once: a repeated image id would give one image two files (pycocotools keeps the last)."""
    first: dict[int, int] = {}
    for i, e in enumerate(entries):
        if e["id"] in first:
            raise DatasetError(f"{path}: {what}[{i}] repeats id {e['id']} of {what}[{first[e['id']]}]; ids must be unique")
        first[e["id"]] = i


def _check_file_name(path: Path, i: int, name: str) -> None:
    """An image's ``file_name`` must name a file inside the dataset folder: a relative path without
    ``..`` (an absolute or escaping name is refused before anything is opened, so the error says
    nothing about files outside)."""
    from pathlib import PurePosixPath, PureWindowsPath
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name.strip() or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() \
            or PureWindowsPath(name).drive or ".." in parts or "\0" in name:
        raise DatasetError(f"{path}: images[{i}] has file_name {name!r}: it must be a relative path inside the "
                           "dataset folder (no absolute path, no '..')")


def _image_file(folder: Path, name: str) -> Path:
    root = Path(folder).resolve()
    for f in (Path(folder) / name, *(d / name for d in sorted(Path(folder).iterdir()) if d.is_dir())):
        if f.exists():
            if not f.resolve().is_relative_to(root):  # a link that leads out of the folder
                raise DatasetError(f"image {name} in {folder} links outside the dataset folder; copy the file in")
            return f
    raise FileNotFoundError(f"image {name} is not in {folder} or a subfolder of it")


def _norm(word: str) -> str:
    """How words and category names are compared: Unicode NFC, case-folded (a caption's "Square",
    a category "square", an NFD "círculo" and an NFC one are each the same word)."""
    return unicodedata.normalize("NFC", word).casefold()


def _check_rle(path: Path, a: dict, h: int, w: int) -> None:
    """An RLE segmentation's size is its image's (height, width), and uncompressed counts cover
    exactly H x W pixels (fewer would leave a wrong mask, a swapped size a broadcast error)."""
    seg = a["segmentation"]
    if not isinstance(seg, dict):
        return
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise DatasetError(f"{path}: annotation id {a['id']}: an RLE segmentation needs size [height, width], got {size!r}")
    if list(size) != [h, w]:
        raise DatasetError(f"{path}: annotation id {a['id']}: RLE size {size} is not its image's [height, width] "
                           f"[{h}, {w}]" + ("; height and width swapped?" if list(size) == [w, h] else ""))
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise DatasetError(f"{path}: annotation id {a['id']}: RLE counts must be non-negative integers")
        if sum(counts) != h * w:
            raise DatasetError(f"{path}: annotation id {a['id']}: RLE counts sum to {sum(counts)} pixels, "
                               f"not the image's {h} x {w} = {h * w}")
    elif not isinstance(counts, str):
        raise DatasetError(f"{path}: annotation id {a['id']}: RLE counts must be a list or a compressed string")


def read_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8: 16-bit and 32-bit greyscale scaled down (not clipped),
    palette, grey and alpha images converted; an unreadable or truncated file is an error naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or a.max() <= 65535 else float(2**32 - 1)
                grey = np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if im.mode == "F":
                raise DatasetError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit")
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: unreadable image ({e})") from None


def _caption_annotations(path: Path) -> list[dict]:
    """A captions file's annotations, checked, in annotation-id order."""
    caps = _read_json(path, ("annotations",))
    _check_entries(path, caps["annotations"], dict(id=int, image_id=int, caption=str), "annotations")
    return sorted(caps["annotations"], key=lambda a: a["id"])


def read_captions(folder: Path, split: str | None = None) -> list[str]:
    """Every caption of a COCO-format dataset, in annotation order."""
    return [a["caption"].strip() for a in _caption_annotations(_find(Path(folder), "captions*.json", split))]


def read_coco(folder: Path, size: tuple[int, int] | None = None, n: int | None = None,
              word_file: Path | None = None, split: str | None = None) -> Items:
    """Items of a COCO-format dataset, first caption of each image, in image-id order.

    Args:
        size: (H, W) to resize images (bilinear) and masks (nearest) to, e.g. the model's native
            resolution; None keeps them.
        n: at most this many images (those with at least one scored word).
        split: the annotation files to read where the folder holds several (their names contain
            it, e.g. "val2017"); a folder with several and no split is an error.
    Returns:
        :class:`Items`: items whose words are the caption words that name a category of the word
        map (a word of a category absent from the image has ``mask=None``: scored apart as
        missing), and the counts of what was left out.
    Raises:
        DatasetError: malformed files or entries, unknown category ids, annotations without a
            segmentation, an image whose size differs from its JSON, or nothing to score; each
            message names the file and the entry.
    """
    from PIL import Image
    from pycocotools.coco import COCO
    import contextlib
    import io
    folder = Path(folder)
    wf = Path(word_file or word_map_for(folder))
    wmap = read_word_map(wf)
    by_word = {_norm(w): cat for cat, v in wmap.items() for w in v["words"]}
    fi, fc = _find(folder, "instances*.json", split), _find(folder, "captions*.json", split)
    data = _read_json(fi, ("images", "annotations", "categories"))
    _check_entries(fi, data["images"], dict(id=int, file_name=str, height=int, width=int), "images")
    _check_entries(fi, data["categories"], dict(id=int, name=str), "categories")
    _check_entries(fi, data["annotations"], dict(id=int, image_id=int, category_id=int, segmentation=(list, dict)),
                   "annotations")
    for what in ("images", "categories", "annotations"):
        _check_unique(fi, data[what], what)
    for i, im in enumerate(data["images"]):
        _check_file_name(fi, i, im["file_name"])
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    cats, imgs = {c["id"] for c in data["categories"]}, {i["id"] for i in data["images"]}
    for i, a in enumerate(data["annotations"]):
        if a["category_id"] not in cats:
            raise DatasetError(f"{fi}: annotations[{i}] (id {a['id']}) has category_id {a['category_id']}, "
                               f"which is not among the file's categories")
        if a["image_id"] not in imgs:
            raise DatasetError(f"{fi}: annotations[{i}] (id {a['id']}) has image_id {a['image_id']}, not among its images")
        if not a["segmentation"]:
            raise DatasetError(f"{fi}: annotations[{i}] (id {a['id']}) has an empty segmentation (a polygon or RLE mask is needed)")
        _check_rle(fi, a, *sizes[a["image_id"]])
    inst = COCO()
    inst.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        inst.createIndex()
    captions: dict[int, list[str]] = {}
    for a in _caption_annotations(fc):
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    cat_name = {c["id"]: c["name"] for c in inst.loadCats(inst.getCatIds())}
    items = Items(files=dict(instances=fi, captions=fc, words=wf))
    dropped = dict(images_without_caption=0, images_without_scored_word=0, words_without_concept=0)
    for img_id in sorted(inst.getImgIds()):
        if img_id not in captions:
            dropped["images_without_caption"] += 1
            continue
        info = inst.loadImgs(img_id)[0]
        h, w = info["height"], info["width"]
        caption = unicodedata.normalize("NFC", captions[img_id][0])  # an NFD accent would split a word
        counts: dict[str, int] = {}
        found, unmapped = [], []
        for tok in split_words(caption):
            low = _norm(tok)
            if low not in by_word:
                continue
            occ = counts.get(low, 0)
            counts[low] = occ + 1
            cat = by_word[low]
            if not wmap[cat]["concept"]:
                unmapped.append(tok)  # reported apart: no concept to pick heads for
                continue
            found.append((tok, occ, cat))
        dropped["words_without_concept"] += len(unmapped)
        if not found:
            dropped["images_without_scored_word"] += 1
            continue
        f = _image_file(folder, info["file_name"])
        image = read_image(f)
        if image.shape[:2] != (h, w):
            raise DatasetError(f"{f}: {image.shape[1]}x{image.shape[0]} pixels, but {fi} says {w}x{h} for image id "
                               f"{img_id}; its masks would not line up (fix the JSON or the file)")
        masks: dict[str, np.ndarray] = {}
        anns = inst.loadAnns(inst.getAnnIds(imgIds=img_id, iscrowd=None))
        for a in anns:  # polygons, RLE or compressed RLE
            try:
                m = inst.annToMask(a).astype(bool)
            except Exception as e:  # pycocotools raises bare errors on malformed masks
                raise DatasetError(f"{fi}: annotation id {a['id']}: unreadable segmentation ({type(e).__name__}: {e})") from None
            name = _norm(cat_name[a["category_id"]])  # "Square" in the file is the word map's "square"
            masks[name] = masks.get(name, np.zeros((h, w), bool)) | m
        if size is not None and tuple(size) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
            masks = {k: np.asarray(Image.fromarray(m).resize((size[1], size[0]), Image.NEAREST)) for k, m in masks.items()}
        words = [Word(tok, occ, wmap[cat]["concept"], masks.get(_norm(cat))) for tok, occ, cat in found]
        items.append(Item(image, caption, words, n_objects=len(anns), source=info["file_name"], unmapped=unmapped))
        if n is not None and len(items) >= n:
            break
    items.dropped = dropped
    if not items:
        raise DatasetError(f"{folder}: nothing to score: no image has a caption with a word that {wf} maps to a "
                           f"category with a concept ({dropped})")
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
