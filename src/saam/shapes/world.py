"""ShapesWorld: seeded synthetic scenes with exact masks and captions.

A scene is 1 to 3 flat-coloured shapes on a plain dark background. Objects sit in distinct
cells of a 3x3 grid (with jitter), so they never overlap and every object's mask is exact:
the set of pixels whose centre falls inside the shape. Rendering is vectorised in torch so the
training loop can draw fresh scenes on the fly, on CPU or GPU, and is bit-identical for the same
seed on the same device.

Vocabulary (the words a caption can use):
    colours: red, green, blue, yellow, purple, orange, pink
    shapes:  circle, square, triangle, diamond, cross
    sizes:   small, large
Some (colour, shape) pairs are held out of training (:data:`HELDOUT_COMBOS`) so evaluation can
probe compositions the model never saw.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

IMAGE_SIZE = 64
GRID = 3
BACKGROUND = (30, 30, 30)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "pink": (250, 150, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES: dict[str, float] = {"small": 5.5, "large": 9.5}  # radius in pixels at 64 px
HELDOUT_COMBOS = frozenset({("red", "triangle"), ("blue", "cross"), ("yellow", "diamond"),
                            ("green", "circle"), ("purple", "square")})
PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ")
JOINERS = (" and ", " and ", ", ", " next to ", " with ")

COLOR_NAMES = tuple(COLORS)
SIZE_NAMES = tuple(SIZES)


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and where it is (centre and radius in pixels)."""
    color: str
    shape: str
    size: str
    cx: float
    cy: float

    @property
    def radius(self) -> float:
        return SIZES[self.size] * IMAGE_SIZE / 64


@dataclass(frozen=True)
class WordRef:
    """A caption word that names an attribute of one object.

    ``occurrence`` counts earlier appearances of the same word in the caption (0 for the first),
    which is how :func:`saam.words.token_positions` tells repeated words apart.
    """
    word: str
    occurrence: int
    kind: str  # "color" | "shape" | "size"
    obj: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    caption: str
    words: tuple[WordRef, ...] = field(default=())


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def caption_for(objects: tuple[SceneObject, ...], rng: random.Random, *,
                p_color: float = 0.9, p_size: float = 0.5) -> tuple[str, tuple[WordRef, ...]]:
    """A varied caption naming every object, and the map from its words to objects.

    The shape noun is always present; colour and size words are optional, so the model also
    learns to fill in unspecified attributes. Objects are mentioned in random order.
    """
    order = list(range(len(objects)))
    rng.shuffle(order)
    prefix = rng.choice(PREFIXES)
    text = prefix
    refs: list[WordRef] = []
    counts: dict[str, int] = {}

    def add(word: str, kind: str, obj: int) -> None:
        refs.append(WordRef(word, counts.get(word, 0), kind, obj))
        counts[word] = counts.get(word, 0) + 1

    # prefix words ("a photo of") never coincide with attribute words, so occurrences stay right
    for n, i in enumerate(order):
        o = objects[i]
        words: list[tuple[str, str]] = []
        if rng.random() < p_size:
            words.append((o.size, "size"))
        if rng.random() < p_color:
            words.append((o.color, "color"))
        words.append((o.shape, "shape"))
        if n > 0:
            text += rng.choice(JOINERS)
        text += _article(words[0][0]) + " " + " ".join(w for w, _ in words)
        for w, kind in words:
            add(w, kind, i)
    return text, tuple(refs)


def sample_objects(rng: random.Random, n_objects: int | None = None, *,
                   first_heldout: bool = False,
                   image_size: int = IMAGE_SIZE) -> tuple[SceneObject, ...]:
    """Draw 1-3 objects with distinct colours in distinct grid cells.

    Held-out (colour, shape) pairs are never drawn, except that ``first_heldout`` makes the
    first object one of them.
    """
    n = n_objects if n_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= GRID * GRID:
        raise ValueError(f"n_objects must be in 1..{GRID * GRID}, got {n}")
    cells = rng.sample(range(GRID * GRID), n)
    pairs: list[tuple[str, str]] = []
    if first_heldout:
        pairs.append(rng.choice(sorted(HELDOUT_COMBOS)))
    while len(pairs) < n:
        color = rng.choice([c for c in COLOR_NAMES if c not in {p[0] for p in pairs}])
        shape = rng.choice([s for s in SHAPES if (color, s) not in HELDOUT_COMBOS])
        pairs.append((color, shape))
    cell = image_size / GRID
    out = []
    for c, (color, shape) in zip(cells, pairs):
        size = rng.choice(SIZE_NAMES)
        r = SIZES[size] * image_size / 64
        slack = max(cell / 2 - r - 1.0, 0.0)
        cx = (c % GRID + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (c // GRID + 0.5) * cell + rng.uniform(-slack, slack)
        out.append(SceneObject(color, shape, size, cx, cy))
    return tuple(out)


def sample_scene(seed: int, n_objects: int | None = None, *, split: str = "train",
                 p_color: float = 0.9, p_size: float = 0.5) -> Scene:
    """One scene, fully determined by ``seed`` and ``split``.

    Splits: ``train`` (held-out combos excluded), ``test`` (same distribution as train, drawn
    from a disjoint seed stream), ``unseen`` (the first object is a held-out combo).
    """
    if split not in ("train", "test", "unseen"):
        raise ValueError(f"unknown split {split!r}; use 'train', 'test' or 'unseen'")
    salt = {"train": 0, "test": 1_000_003, "unseen": 2_000_029}[split]
    rng = random.Random(seed * 7919 + salt)
    objects = sample_objects(rng, n_objects, first_heldout=(split == "unseen"))
    caption, refs = caption_for(objects, rng, p_color=p_color, p_size=p_size)
    return Scene(objects, caption, refs)


# ---------------------------------------------------------------- rendering (vectorised)

def inside(shape_idx: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Point-in-shape test in shape-normalised coordinates (radius 1)."""
    au, av = u.abs(), v.abs()
    tests = torch.stack([
        u * u + v * v <= 1.0,                                           # circle
        torch.maximum(au, av) <= 0.82,                                   # square
        (v <= 0.75) & (au <= 0.98 * (v + 1.0) / 1.75),                   # triangle (apex up)
        au + av <= 1.05,                                                 # diamond
        ((au <= 0.36) & (av <= 1.0)) | ((av <= 0.36) & (au <= 1.0)),     # cross
    ])
    return tests.gather(0, shape_idx.unsqueeze(0)).squeeze(0)


def render_params(objects: list[tuple[SceneObject, ...]], image_size: int = IMAGE_SIZE):
    """Pack scenes into padded tensors: (B, K) shape index, (B, K, 3) colour, (B, K, 3) cx/cy/r, (B, K) valid."""
    k = max(1, max(len(o) for o in objects))
    b = len(objects)
    shape = np.zeros((b, k), dtype=np.int64)
    color = np.zeros((b, k, 3), dtype=np.float32)
    geom = np.zeros((b, k, 3), dtype=np.float32)
    valid = np.zeros((b, k), dtype=bool)
    scale = image_size / IMAGE_SIZE
    for i, objs in enumerate(objects):
        for j, o in enumerate(objs):
            shape[i, j] = SHAPES.index(o.shape)
            color[i, j] = COLORS[o.color]
            geom[i, j] = (o.cx * scale, o.cy * scale, o.radius * scale)
            valid[i, j] = True
    return (torch.from_numpy(shape), torch.from_numpy(color / 255), torch.from_numpy(geom),
            torch.from_numpy(valid))


def render_batch(objects: list[tuple[SceneObject, ...]], image_size: int = IMAGE_SIZE,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Render scenes.

    Returns:
        images: (B, 3, H, W) float in [0, 1].
        masks:  (B, K, H, W) bool, K = most objects in any scene; mask k of a scene with fewer
                objects is empty. Objects never overlap, so masks are disjoint.
    """
    params = (t.to(device) for t in render_params(objects, image_size))
    return render_from_params(*params, image_size=image_size)


def render_from_params(shape: torch.Tensor, color: torch.Tensor, geom: torch.Tensor,
                       valid: torch.Tensor, image_size: int = IMAGE_SIZE):
    """:func:`render_batch` from packed parameters (see :func:`render_params`)."""
    device = shape.device
    coords = torch.arange(image_size, device=device, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cx, cy, r = (geom[..., i, None, None] for i in range(3))
    u = (xx - cx) / r
    v = (yy - cy) / r
    masks = inside(shape[..., None, None].expand_as(u), u, v) & valid[..., None, None]
    bg = torch.tensor(BACKGROUND, device=device, dtype=torch.float32) / 255
    img = bg.view(1, 3, 1, 1).expand(shape.shape[0], 3, image_size, image_size)
    m = masks.float()
    # disjoint masks: background where no object, else the object's colour
    img = img * (1 - m.sum(1, keepdim=True)) + torch.einsum("bkhw,bkc->bchw", m, color)
    return img, masks


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene. Returns (H, W, 3) uint8 image and (K, H, W) bool masks."""
    img, masks = render_batch([scene.objects], image_size)
    arr = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return arr, masks[0, : len(scene.objects)].numpy()


# ---------------------------------------------------------------- export as a COCO-format dataset

def export_coco(folder, n: int, seed: int = 0, split: str = "test", overwrite: bool = False) -> None:
    """Write ``n`` scenes as a COCO-format dataset that ``saam.datasets.read_coco`` reads.

    Rendered images (PNG, lossless), exact instance masks (RLE), one caption per image, and a
    ``word_categories.yaml``. Every object is annotated three times, under its colour, its shape
    and its size category, so a caption word's truth is the union of the objects that share its
    attribute, exactly as in the native protocols. A folder that is not empty is refused unless
    ``overwrite`` (then what an earlier export wrote there is replaced, nothing else is touched).
    """
    import json
    from pathlib import Path
    from PIL import Image
    from pycocotools import mask as mask_utils
    from .. import paths
    folder = Path(folder)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty; export into a new folder, or pass --overwrite to replace "
                              "an earlier export there")
    others = sorted(f.name for f in folder.glob("*.json") if f.name not in ("instances_shapesworld.json", "captions_shapesworld.json")) \
        if folder.exists() else []
    if others:
        raise FileExistsError(f"{folder} holds other annotation files ({others}); a dataset folder holds one export")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    cats = [*COLOR_NAMES, *SHAPES, *SIZE_NAMES]
    cat_id = {c: i + 1 for i, c in enumerate(cats)}
    images, anns, caps = [], [], []
    for i in range(n):
        scene = sample_scene(seed + i, split=split, p_color=1.0)
        img, masks = render(scene)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(folder / "images" / name)
        images.append(dict(id=i + 1, file_name=f"images/{name}", height=IMAGE_SIZE, width=IMAGE_SIZE))
        caps.append(dict(id=i + 1, image_id=i + 1, caption=scene.caption))
        for o, m in zip(scene.objects, masks):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            for attr in (o.color, o.shape, o.size):
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cat_id[attr], segmentation=rle,
                                 area=int(m.sum()), bbox=[float(v) for v in mask_utils.toBbox(rle)], iscrowd=0))
    categories = [dict(id=cat_id[c], name=c, supercategory=k) for k, names in
                  (("color", COLOR_NAMES), ("shape", SHAPES), ("size", SIZE_NAMES)) for c in names]
    (folder / "instances_shapesworld.json").write_text(json.dumps(dict(images=images, annotations=anns, categories=categories)))
    (folder / "captions_shapesworld.json").write_text(json.dumps(dict(images=images, annotations=caps)))
    lines = ["# ShapesWorld categories: the word kind each scores as (its concept) and the words naming it"]
    for kind, names in (("color", COLOR_NAMES), ("shape", SHAPES), ("size", SIZE_NAMES)):
        lines += [f"{c}: {{concept: {kind}, words: [{c}]}}" for c in names]
    (folder / paths.COCO_WORD_FILE).write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="ShapesWorld scenes as a COCO-format evaluation dataset")
    ap.add_argument("--export-coco", metavar="DIR", required=True)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test", choices=["train", "test", "unseen"])
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier export in a non-empty folder")
    a = ap.parse_args(argv)
    try:
        export_coco(a.export_coco, a.n, a.seed, a.split, a.overwrite)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{a.n} scenes written to {a.export_coco}")


if __name__ == "__main__":
    main()
