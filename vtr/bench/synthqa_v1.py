"""Synthetic visual question answering: the measuring instrument for token-reduction quality.

This is the generator the bundled ``tiny-vqa-llava`` was trained on and ``vtr bench quality`` measures it
with. :mod:`vtr.bench.synthqa` is its successor (descriptions, clips, word-level answers with an end token)
for the next bundled model; the two stay apart because a model is only measured on its own distribution.

Every image is 224x224 with a few small coloured shapes on a noisy, textured grey background, so each
answer depends on a handful of small regions — exactly what visual token reduction can destroy.
Everything is deterministic: sample ``i`` of a split is a pure function of ``(split, i, seed)``.

Question types (single-word answers):

* ``colour``   — "what colour is the circle ?" (the shape is unique in the image)
* ``shape``    — "what shape is the red object ?" (the colour is unique in the image)
* ``count``    — "how many circles are there ?" / "how many red objects are there ?" (zero..six)
* ``exist``    — "is there a red circle ?" (yes/no, balanced; negatives often share colour and shape
  with other objects)
* ``location`` — "is the red circle on the left or the right ?" / "... at the top or the bottom ?"

:class:`Scene` also carries per-patch labels (colour and shape of the object under each 16x16 patch)
for auxiliary training losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ANSWERS",
    "COLOURS",
    "COUNT_WORDS",
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "QUESTION_TYPES",
    "SHAPES",
    "SPLIT_SIZES",
    "WORDS",
    "Obj",
    "Sample",
    "Scene",
    "ask",
    "make_scene",
    "prompt_messages",
    "sample",
    "split",
    "to_pil",
]

IMAGE_SIZE = 224
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "exist", "location")

#: Every possible answer word.
ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *COUNT_WORDS, "yes", "no", "left", "right", "top", "bottom")

#: Tokenizer vocabulary: chat scaffolding plus every word a question or answer uses.
WORDS: list[str] = [
    "USER",
    ":",
    "ASSISTANT",
    "?",
    ".",
    ",",
    "what",
    "colour",
    "shape",
    "is",
    "the",
    "object",
    "objects",
    "how",
    "many",
    "are",
    "there",
    "a",
    "on",
    "or",
    "at",
    "image",
    *PLURALS.values(),
    *ANSWERS,
]

#: Number of questions in the fixed evaluation splits (``train`` is unbounded).
SPLIT_SIZES: dict[str, int] = {"validation": 1000, "test": 2000}
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}

_RGB = np.array([[215, 35, 35], [35, 175, 55], [40, 75, 225], [230, 210, 30], [150, 50, 200]], dtype=np.float32)
_MARGIN = 24  # location questions only about objects this far (px) from the midline


@dataclass(frozen=True)
class Obj:
    """One object: ``colour``/``shape`` names, centre ``(cx, cy)`` in pixels and radius ``r``."""

    colour: str
    shape: str
    cx: float
    cy: float
    r: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """An image and what is in it.

    ``patch_colour``/``patch_shape`` are ``(14, 14)`` int arrays: 0 for background, else 1 + index in
    :data:`COLOURS`/:data:`SHAPES` of the object covering most of that patch (at least 1/8 of it).
    """

    image: np.ndarray  # (224, 224, 3) uint8
    objects: list[Obj]
    patch_colour: np.ndarray
    patch_shape: np.ndarray


@dataclass
class Sample:
    """One visual QA item."""

    scene: Scene = field(repr=False)
    question: str
    answer: str
    qtype: str
    index: int = -1

    @property
    def image(self) -> np.ndarray:
        return self.scene.image


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.82 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # apex up
        t = (dy + r) / (1.85 * r)
        return (dy >= -r) & (dy <= 0.85 * r) & (np.abs(dx) <= t * r)
    if shape == "cross":
        w = r / 3.0
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(shape)


def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(85, 165)
    tint = rng.uniform(-12, 12, size=3)
    coarse = rng.normal(0.0, 18.0, size=(8, 8, 3)).astype(np.float32)
    # bilinear-ish upsampling of the coarse texture with a smooth kron + box blur
    tex = np.kron(coarse, np.ones((28, 28, 1), dtype=np.float32))
    k = 14
    tex = np.cumsum(np.pad(tex, ((k, k), (0, 0), (0, 0)), mode="edge"), axis=0)
    tex = (tex[2 * k :] - tex[: -2 * k])[:IMAGE_SIZE] / (2 * k)
    tex = np.cumsum(np.pad(tex, ((0, 0), (k, k), (0, 0)), mode="edge"), axis=1)
    tex = (tex[:, 2 * k :] - tex[:, : -2 * k])[:, :IMAGE_SIZE] / (2 * k)
    return base + tint + tex


def make_scene(rng: np.random.Generator, n_objects: tuple[int, int] = (3, 6)) -> Scene:
    """Draw a random scene: ``n_objects`` (inclusive range) non-overlapping shapes, radius 10-17 px."""
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    objs: list[Obj] = []
    tries = 0
    while len(objs) < n and tries < 400:
        tries += 1
        r = float(rng.uniform(10.0, 17.0))
        cx, cy = (float(v) for v in rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2))
        if any((cx - o.cx) ** 2 + (cy - o.cy) ** 2 < (r + o.r + 6) ** 2 for o in objs):
            continue
        objs.append(Obj(COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))], cx, cy, r))

    img = _background(rng)
    owner = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int64)
    for k, o in enumerate(objs):
        x0, x1 = int(max(0, o.cx - o.r - 1)), int(min(IMAGE_SIZE, o.cx + o.r + 2))
        y0, y1 = int(max(0, o.cy - o.r - 1)), int(min(IMAGE_SIZE, o.cy + o.r + 2))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        m = _shape_mask(o.shape, xx + 0.5 - o.cx, yy + 0.5 - o.cy, o.r)
        rgb = _RGB[COLOURS.index(o.colour)] + rng.uniform(-18, 18, size=3).astype(np.float32)
        img[y0:y1, x0:x1][m] = rgb
        owner[y0:y1, x0:x1][m] = k
    img = img + rng.normal(0.0, 10.0, size=img.shape).astype(np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)

    patch_colour = np.zeros((GRID, GRID), dtype=np.int64)
    patch_shape = np.zeros((GRID, GRID), dtype=np.int64)
    if objs:
        cover = np.stack(
            [(owner == k).reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).sum((1, 3)) for k in range(len(objs))]
        )
        best = cover.argmax(0)
        hit = cover.max(0) >= PATCH_SIZE * PATCH_SIZE // 8
        col = np.array([1 + COLOURS.index(o.colour) for o in objs])
        shp = np.array([1 + SHAPES.index(o.shape) for o in objs])
        patch_colour = np.where(hit, col[best], 0)
        patch_shape = np.where(hit, shp[best], 0)
    return Scene(image, objs, patch_colour, patch_shape)


def _unique(objs: list[Obj], attr: str) -> list[Obj]:
    vals = [getattr(o, attr) for o in objs]
    return [o for o in objs if vals.count(getattr(o, attr)) == 1]


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A ``(question, answer)`` of type ``qtype`` about ``scene``, or ``None`` if the scene has none."""
    objs = scene.objects
    if qtype == "colour":
        cands = _unique(objs, "shape")
        if not cands:
            return None
        o = cands[rng.integers(len(cands))]
        return f"what colour is the {o.shape} ?", o.colour
    if qtype == "shape":
        cands = _unique(objs, "colour")
        if not cands:
            return None
        o = cands[rng.integers(len(cands))]
        return f"what shape is the {o.colour} object ?", o.shape
    if qtype == "count":
        if rng.random() < 0.5:
            s = SHAPES[rng.integers(len(SHAPES))]
            n = sum(o.shape == s for o in objs)
            q = f"how many {PLURALS[s]} are there ?"
        else:
            c = COLOURS[rng.integers(len(COLOURS))]
            n = sum(o.colour == c for o in objs)
            q = f"how many {c} objects are there ?"
        return (q, COUNT_WORDS[n]) if n < len(COUNT_WORDS) else None
    if qtype == "exist":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5 and objs:
            o = objs[rng.integers(len(objs))]
            return f"is there a {o.colour} {o.shape} ?", "yes"
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        cols = {o.colour for o in objs}
        shps = {o.shape for o in objs}
        hard = [(c, s) for c, s in absent if c in cols and s in shps]
        pool = hard if hard and rng.random() < 0.7 else absent
        if not pool:
            return None
        c, s = pool[rng.integers(len(pool))]
        return f"is there a {c} {s} ?", "no"
    if qtype == "location":
        names = [o.name for o in objs]
        cands = []
        for o in objs:
            if names.count(o.name) != 1:
                continue
            if abs(o.cx - IMAGE_SIZE / 2) >= _MARGIN:
                cands.append((o, "lr"))
            if abs(o.cy - IMAGE_SIZE / 2) >= _MARGIN:
                cands.append((o, "tb"))
        if not cands:
            return None
        o, axis = cands[rng.integers(len(cands))]
        if axis == "lr":
            return f"is the {o.name} on the left or the right ?", "left" if o.cx < IMAGE_SIZE / 2 else "right"
        return f"is the {o.name} at the top or the bottom ?", "top" if o.cy < IMAGE_SIZE / 2 else "bottom"
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def sample(split_name: str, index: int, seed: int = 0) -> Sample:
    """Item ``index`` of ``split_name`` (``train``/``validation``/``test``); type cycles over the five."""
    if split_name not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split_name!r}; expected one of {sorted(_SPLIT_IDS)}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split_name], index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        scene = make_scene(rng)
        qa = ask(scene, qtype, rng)
        if qa is not None:
            return Sample(scene, qa[0], qa[1], qtype, index)


def split(split_name: str, n: int | None = None, seed: int = 0) -> list[Sample]:
    """The first ``n`` items of a split (default: the whole fixed ``validation``/``test`` split).

    Train, validation and test use disjoint random streams; question types are balanced.
    """
    if n is None:
        if split_name not in SPLIT_SIZES:
            raise ValueError(f"split {split_name!r} is unbounded: pass n")
        n = SPLIT_SIZES[split_name]
    return [sample(split_name, i, seed) for i in range(n)]


def to_pil(image: np.ndarray):
    """The ``(H, W, 3)`` uint8 array as a PIL image."""
    from PIL import Image

    return Image.fromarray(image, mode="RGB")


def prompt_messages(question: str) -> list[dict]:
    """Chat messages for ``processor.apply_chat_template``: one user turn with the image and question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
