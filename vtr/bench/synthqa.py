"""Synthetic visual QA, descriptions and short clips: the measuring instrument for token-reduction quality.

Three tasks, every item a pure function of ``(task, split, index, seed)``:

* ``image``    — 224x224 scenes with 3-6 small coloured shapes on a noisy, textured background and one
  question with a one-word answer: ``colour`` ("what colour is the circle ?"), ``shape`` ("what shape is
  the red object ?"), ``count`` ("how many circles are there ?"), ``exist`` ("is there a red circle ?"),
  ``left_right`` ("is the red circle on the left or the right ?"), ``top_bottom`` ("... at the top or the
  bottom ?"). Each answer depends on a handful of small regions: exactly what token reduction can destroy.
* ``describe`` — the same scenes with "describe the image ." (or a paraphrase), answered with every object
  in raster order of its coarse cell: "a red circle at the top left , a blue square on the right ." The
  location is the 3x3 cell of the object's centre (centres stay :data:`THIRD_MARGIN` px away from the
  third lines, so it is well defined).
* ``video``    — 16-frame 112x112 clips (8 frame groups of 2 frames, the Qwen2-VL temporal patch) in which
  2-4 objects appear, disappear and move, all events aligned to frame groups. Question types:
  ``few_frames`` ("what colour is the star ?" about an object visible in only 1-2 frame groups),
  ``exist`` (anywhere in the clip), ``when`` ("when does the red circle appear ?": start / middle / end)
  and ``describe`` ("describe the video .": every object in order of first appearance).

Answers are written in a word-level vocabulary (:data:`WORDS`); the model appends its end token.
Descriptions are scored by object-level precision/recall/F1 (:func:`parse_description`,
:func:`description_counts`), not by string match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ANSWERS",
    "CELL",
    "COLOURS",
    "COUNT_WORDS",
    "DESCRIBE_PROMPTS",
    "FRAMES_PER_GROUP",
    "IMAGE_QUESTION_TYPES",
    "IMAGE_SIZE",
    "LOCATIONS",
    "SHAPES",
    "SPLIT_SIZES",
    "TASKS",
    "VIDEO_DESCRIBE_PROMPTS",
    "VIDEO_FRAMES",
    "VIDEO_GROUPS",
    "VIDEO_QUESTION_TYPES",
    "VIDEO_SIZE",
    "WHEN_GROUPS",
    "WORDS",
    "Clip",
    "Obj",
    "Sample",
    "Scene",
    "Track",
    "VideoSample",
    "ask",
    "ask_clip",
    "clip_cells",
    "describe_clip",
    "describe_scene",
    "description_counts",
    "location_of",
    "make_clip",
    "make_scene",
    "parse_description",
    "prompt_messages",
    "sample",
    "split",
    "to_pil",
]

IMAGE_SIZE = 224
CELL = 28  # one LLM token of the bundled Qwen2-VL model: a 2x2 merge unit of 14-px patches
GRID = IMAGE_SIZE // CELL
VIDEO_SIZE = 112
VIDEO_FRAMES = 16
FRAMES_PER_GROUP = 2  # Qwen2-VL's temporal patch: one frame group = one temporal step
VIDEO_GROUPS = VIDEO_FRAMES // FRAMES_PER_GROUP

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
PLURALS: dict[str, str] = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
IMAGE_QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "exist", "left_right", "top_bottom")
VIDEO_QUESTION_TYPES: tuple[str, ...] = ("few_frames", "exist", "when", "describe")
TASKS: tuple[str, ...] = ("image", "describe", "video")

#: 3x3 location phrases, indexed by (row third, column third) of the object's centre.
LOCATIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the middle",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
DESCRIBE_PROMPTS: tuple[str, ...] = (
    "describe the image .",
    "describe this picture .",
    "what is in the image ?",
    "what do you see in the picture ?",
)
VIDEO_DESCRIBE_PROMPTS: tuple[str, ...] = (
    "describe the video .",
    "describe this clip .",
    "what is in the video ?",
    "what do you see in the clip ?",
)
#: Frame groups at which an object's first appearance counts as the ``start``, ``middle`` or ``end`` of
#: a clip (groups 2 and 5 are never asked about: too close to a boundary).
WHEN_GROUPS: dict[str, tuple[int, ...]] = {"start": (0, 1), "middle": (3, 4), "end": (6, 7)}

#: Every one-word answer (image and video QA); descriptions are sentences over :data:`WORDS`.
ANSWERS: tuple[str, ...] = (
    *COLOURS,
    *SHAPES,
    *COUNT_WORDS,
    "yes",
    "no",
    "left",
    "right",
    "top",
    "bottom",
    *WHEN_GROUPS,
)

#: Tokenizer vocabulary: chat scaffolding plus every word a prompt or answer uses (checked by the tests).
_SCAFFOLD = (
    "USER : ASSISTANT ? . , what colour shape is the object objects how many are there a on or at in image picture "
    "video clip describe this do you see when does appear middle"
)
WORDS: list[str] = list(dict.fromkeys([*_SCAFFOLD.split(), *PLURALS.values(), *ANSWERS]))

#: Number of items in the fixed evaluation splits, per task (``train`` is unbounded).
SPLIT_SIZES: dict[str, dict[str, int]] = {
    "image": {"validation": 600, "test": 1200},
    "describe": {"validation": 200, "test": 300},
    "video": {"validation": 400, "test": 480},
}
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
_TASK_IDS = {"image": 0, "describe": 1, "video": 2}

_RGB = np.array([[215, 35, 35], [35, 175, 55], [40, 75, 225], [230, 210, 30], [150, 50, 200]], dtype=np.float32)
_MARGIN = 24  # left/right and top/bottom questions only about objects this far (px) from the midline
THIRD_MARGIN = 8  # object centres stay this far (px) from the lines between thirds


# ---------------------------------------------------------------------------------------------- images
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

    ``cell_colour``/``cell_shape`` are ``(8, 8)`` int arrays over the 28-px cells (one LLM token each):
    0 for background, else 1 + index in :data:`COLOURS`/:data:`SHAPES` of the object covering most of
    that cell (at least 1/8 of it).
    """

    image: np.ndarray  # (224, 224, 3) uint8
    objects: list[Obj]
    cell_colour: np.ndarray
    cell_shape: np.ndarray


@dataclass
class Sample:
    """One image item: a question (or description prompt) and its answer."""

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
    if shape == "star":  # five points, apex up: radius alternates between 1.15 r and 0.5 r
        ang = np.arctan2(dx, -dy)  # 0 at the top, clockwise
        rad = np.sqrt(dx * dx + dy * dy)
        phase = np.mod(ang, 2 * np.pi / 5) / (2 * np.pi / 5)  # 0 at a point, 0.5 between points
        edge = 1.15 * r - 0.65 * r * (1 - np.abs(1 - 2 * phase))
        return rad <= edge
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(85, 165)
    tint = rng.uniform(-12, 12, size=3)
    n = size // CELL  # one texture blob per 28 px, whatever the frame size
    coarse = rng.normal(0.0, 18.0, size=(n, n, 3)).astype(np.float32)
    block = size // n
    tex = np.kron(coarse, np.ones((block, block, 1), dtype=np.float32))
    k = block // 2  # box blur of the blocky texture: smooth blobs
    tex = np.cumsum(np.pad(tex, ((k, k), (0, 0), (0, 0)), mode="edge"), axis=0)
    tex = (tex[2 * k :] - tex[: -2 * k])[:size] / (2 * k)
    tex = np.cumsum(np.pad(tex, ((0, 0), (k, k), (0, 0)), mode="edge"), axis=1)
    tex = (tex[:, 2 * k :] - tex[:, : -2 * k])[:, :size] / (2 * k)
    return base + tint + tex


def _paint(img: np.ndarray, owner: np.ndarray | None, o: Obj, rgb: np.ndarray, key: int) -> None:
    h, w = img.shape[:2]
    ext = 1.2 * o.r  # stars reach 1.15 r
    x0, x1 = int(max(0, o.cx - ext - 1)), int(min(w, o.cx + ext + 2))
    y0, y1 = int(max(0, o.cy - ext - 1)), int(min(h, o.cy + ext + 2))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    m = _shape_mask(o.shape, xx + 0.5 - o.cx, yy + 0.5 - o.cy, o.r)
    img[y0:y1, x0:x1][m] = rgb
    if owner is not None:
        owner[y0:y1, x0:x1][m] = key


def _near_third_line(v: float, size: int) -> bool:
    return any(abs(v - size * k / 3) < THIRD_MARGIN for k in (1, 2))


def make_scene(rng: np.random.Generator, n_objects: tuple[int, int] = (3, 6)) -> Scene:
    """Draw a random scene: ``n_objects`` (inclusive range) non-overlapping shapes, radius 10-17 px.

    Centres avoid a band of :data:`THIRD_MARGIN` px around the third lines, so every object has one
    well-defined 3x3 location (:func:`location_of`).
    """
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    objs: list[Obj] = []
    tries = 0
    while len(objs) < n and tries < 400:
        tries += 1
        r = float(rng.uniform(10.0, 17.0))
        cx, cy = (float(v) for v in rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2))
        if _near_third_line(cx, IMAGE_SIZE) or _near_third_line(cy, IMAGE_SIZE):
            continue
        if any((cx - o.cx) ** 2 + (cy - o.cy) ** 2 < (r + o.r + 6) ** 2 for o in objs):
            continue
        objs.append(Obj(COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))], cx, cy, r))

    img = _background(rng, IMAGE_SIZE)
    owner = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int64)
    for k, o in enumerate(objs):
        rgb = _RGB[COLOURS.index(o.colour)] + rng.uniform(-18, 18, size=3).astype(np.float32)
        _paint(img, owner, o, rgb, k)
    img = img + rng.normal(0.0, 10.0, size=img.shape).astype(np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)

    cell_colour, cell_shape = _cell_labels([owner], objs)
    return Scene(image, objs, cell_colour, cell_shape)


def _cell_labels(owners: list[np.ndarray], objs: list) -> tuple[np.ndarray, np.ndarray]:
    """Colour and shape labels of the 28-px cells: the object covering most of a cell, summed over the frames
    ``owners`` (pixel -> object index, -1 for background), if it covers at least 1/8 of it on average."""
    n = owners[0].shape[0] // CELL
    if not objs:
        return np.zeros((n, n), dtype=np.int64), np.zeros((n, n), dtype=np.int64)
    cover = sum(
        np.stack([(owner == k).reshape(n, CELL, n, CELL).sum((1, 3)) for k in range(len(objs))]) for owner in owners
    )
    best = cover.argmax(0)
    hit = cover.max(0) >= len(owners) * CELL * CELL // 8
    col = np.array([1 + COLOURS.index(o.colour) for o in objs])
    shp = np.array([1 + SHAPES.index(o.shape) for o in objs])
    return np.where(hit, col[best], 0), np.where(hit, shp[best], 0)


def location_of(o: Obj, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """``(row third, column third)`` of the object's centre, each in ``0..2``."""
    return min(2, int(3 * o.cy / size)), min(2, int(3 * o.cx / size))


def _unique(objs: list[Obj], attr: str) -> list[Obj]:
    vals = [getattr(o, attr) for o in objs]
    return [o for o in objs if vals.count(getattr(o, attr)) == 1]


def _exist(objs: list, rng: np.random.Generator, prefer: list | None = None) -> tuple[str, str] | None:
    present = {(o.colour, o.shape) for o in objs}
    if rng.random() < 0.5 and objs:
        pool = prefer if prefer and rng.random() < 0.6 else objs
        o = pool[rng.integers(len(pool))]
        return f"is there a {o.colour} {o.shape} ?", "yes"
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    cols = {o.colour for o in objs}
    shps = {o.shape for o in objs}
    hard = [(c, s) for c, s in absent if c in cols and s in shps]  # both words occur, not together
    pool = hard if hard and rng.random() < 0.7 else absent
    if not pool:
        return None
    c, s = pool[rng.integers(len(pool))]
    return f"is there a {c} {s} ?", "no"


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A ``(question, answer)`` of type ``qtype`` (:data:`IMAGE_QUESTION_TYPES` or ``"describe"``) about
    ``scene``, or ``None`` if the scene has no well-defined question of that type."""
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
        return _exist(objs, rng)
    if qtype in ("left_right", "top_bottom"):
        names = [o.name for o in objs]
        mid = IMAGE_SIZE / 2
        if qtype == "left_right":
            cands = [o for o in objs if names.count(o.name) == 1 and abs(o.cx - mid) >= _MARGIN]
        else:
            cands = [o for o in objs if names.count(o.name) == 1 and abs(o.cy - mid) >= _MARGIN]
        if not cands:
            return None
        o = cands[rng.integers(len(cands))]
        if qtype == "left_right":
            return f"is the {o.name} on the left or the right ?", "left" if o.cx < mid else "right"
        return f"is the {o.name} at the top or the bottom ?", "top" if o.cy < mid else "bottom"
    if qtype == "describe":
        return DESCRIBE_PROMPTS[rng.integers(len(DESCRIBE_PROMPTS))], describe_scene(scene)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {(*IMAGE_QUESTION_TYPES, 'describe')}")


def describe_scene(scene: Scene) -> str:
    """Every object as "a <colour> <shape> <location>", in raster order of its 3x3 cell (then x, y)."""
    objs = sorted(scene.objects, key=lambda o: (*location_of(o), o.cx, o.cy))
    return " , ".join(f"a {o.colour} {o.shape} {LOCATIONS[location_of(o)]}" for o in objs) + " ."


# ---------------------------------------------------------------------------------------------- videos
@dataclass(frozen=True)
class Track:
    """One object of a clip: visible in frame groups ``first..last`` (inclusive), centre per frame."""

    colour: str
    shape: str
    r: float
    first: int
    last: int
    xs: tuple[float, ...]  # centre per frame (VIDEO_FRAMES values; meaningful where visible)
    ys: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def groups(self) -> int:
        """Number of frame groups in which the object is visible."""
        return self.last - self.first + 1

    def visible(self, frame: int) -> bool:
        return self.first <= frame // FRAMES_PER_GROUP <= self.last


@dataclass
class Clip:
    """A short video: ``frames`` ``(16, 112, 112, 3)`` uint8 and the objects in it."""

    frames: np.ndarray
    tracks: list[Track]


@dataclass
class VideoSample:
    """One video item: a question (or description prompt) about a clip, and its answer."""

    clip: Clip = field(repr=False)
    question: str
    answer: str
    qtype: str
    index: int = -1

    @property
    def frames(self) -> np.ndarray:
        return self.clip.frames


def _span(rng: np.random.Generator, kind: str) -> tuple[int, int]:
    g = VIDEO_GROUPS
    if kind == "stays":
        return 0, g - 1
    if kind == "enters":  # appears in the middle or at the end and stays
        first = int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.1, 0.1, 0.2, 0.2, 0.1, 0.3]))
        return first, g - 1
    if kind == "leaves":
        return 0, int(rng.integers(1, g - 2))
    # "few": visible in one or two frame groups, anywhere
    length = int(rng.integers(1, 3))
    first = int(rng.integers(0, g - length + 1))
    return first, first + length - 1


def make_clip(rng: np.random.Generator, n_objects: tuple[int, int] = (2, 4)) -> Clip:
    """Draw a random clip: ``n_objects`` objects with distinct (colour, shape), radius 9-13 px.

    Each object stays, enters, leaves, or is visible in only one or two frame groups (a "few frames"
    object, in about 60% of clips); about half of them move in a straight line (up to 1.5 px/frame).
    Objects never overlap in a frame where both are visible. Appearance and disappearance happen at
    frame-group boundaries (2 frames), the granularity at which the model sees time.
    """
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    picks = rng.permutation(len(combos))[:n]
    kinds = [str(k) for k in rng.choice(["stays", "enters", "leaves"], size=n, p=[0.45, 0.35, 0.2])]
    if rng.random() < 0.6:
        kinds[int(rng.integers(n))] = "few"
    size = VIDEO_SIZE
    frames_idx = np.arange(VIDEO_FRAMES, dtype=np.float64)
    tracks: list[Track] = []
    for j in range(n):
        colour, shape = combos[picks[j]]
        first, last = _span(rng, kinds[j])
        for _ in range(60):
            r = float(rng.uniform(9.0, 13.0))
            lo, hi = r + 1.0, size - r - 1.0
            x0, y0 = (float(v) for v in rng.uniform(lo, hi, size=2))
            if rng.random() < 0.5:
                speed, ang = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
                vx, vy = speed * np.cos(ang), speed * np.sin(ang)
            else:
                vx = vy = 0.0
            t0 = first * FRAMES_PER_GROUP
            xs = x0 + vx * (frames_idx - t0)
            ys = y0 + vy * (frames_idx - t0)
            vis = (frames_idx // FRAMES_PER_GROUP >= first) & (frames_idx // FRAMES_PER_GROUP <= last)
            if (xs[vis] < lo).any() or (xs[vis] > hi).any() or (ys[vis] < lo).any() or (ys[vis] > hi).any():
                continue
            clash = False
            for t in tracks:
                both = vis & np.array([t.visible(f) for f in range(VIDEO_FRAMES)])
                d2 = (xs - np.array(t.xs)) ** 2 + (ys - np.array(t.ys)) ** 2
                if both.any() and (d2[both] < (r + t.r + 3) ** 2).any():
                    clash = True
                    break
            if not clash:
                tracks.append(Track(colour, shape, r, first, last, tuple(xs.tolist()), tuple(ys.tolist())))
                break
    bg = _background(rng, size)
    rgbs = [_RGB[COLOURS.index(t.colour)] + rng.uniform(-18, 18, size=3).astype(np.float32) for t in tracks]
    frames = np.empty((VIDEO_FRAMES, size, size, 3), dtype=np.uint8)
    for f in range(VIDEO_FRAMES):
        img = bg.copy()
        for t, rgb in zip(tracks, rgbs, strict=True):
            if t.visible(f):
                _paint(img, None, Obj(t.colour, t.shape, t.xs[f], t.ys[f], t.r), rgb, 0)
        img = img + rng.normal(0.0, 8.0, size=img.shape).astype(np.float32)
        frames[f] = np.clip(img, 0, 255).astype(np.uint8)
    return Clip(frames, tracks)


def clip_cells(clip: Clip) -> tuple[np.ndarray, np.ndarray]:
    """Per frame group, what is under each 28-px cell (one LLM token of the bundled model's video input):
    colour and shape labels ``(VIDEO_GROUPS, 4, 4)`` as :attr:`Scene.cell_colour` / :attr:`Scene.cell_shape`,
    coverage summed over the group's :data:`FRAMES_PER_GROUP` frames."""
    size = clip.frames.shape[1]
    cc, cs = [], []
    for g in range(VIDEO_GROUPS):
        owners = []
        for f in range(g * FRAMES_PER_GROUP, (g + 1) * FRAMES_PER_GROUP):
            owner = np.full((size, size), -1, dtype=np.int64)
            scratch = np.zeros((size, size, 3), dtype=np.float32)
            for k, t in enumerate(clip.tracks):
                if t.visible(f):
                    _paint(scratch, owner, Obj(t.colour, t.shape, t.xs[f], t.ys[f], t.r), np.zeros(3), k)
            owners.append(owner)
        c, s = _cell_labels(owners, clip.tracks)
        cc.append(c)
        cs.append(s)
    return np.stack(cc), np.stack(cs)


def _when(t: Track) -> str | None:
    return next((w for w, gs in WHEN_GROUPS.items() if t.first in gs), None)


def ask_clip(clip: Clip, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A ``(question, answer)`` of type ``qtype`` (:data:`VIDEO_QUESTION_TYPES`) about ``clip``, or ``None``."""
    tracks = clip.tracks
    if qtype == "few_frames":
        shapes = [t.shape for t in tracks]
        cands = [t for t in tracks if t.groups <= 2 and shapes.count(t.shape) == 1]
        if not cands:
            return None
        t = cands[rng.integers(len(cands))]
        return f"what colour is the {t.shape} ?", t.colour
    if qtype == "exist":
        return _exist(tracks, rng, prefer=[t for t in tracks if t.groups < VIDEO_GROUPS])
    if qtype == "when":
        by_answer: dict[str, list[Track]] = {}
        for t in tracks:
            w = _when(t)
            if w is not None:
                by_answer.setdefault(w, []).append(t)
        if not by_answer:
            return None
        answers = sorted(by_answer, key=list(WHEN_GROUPS).index)
        a = answers[rng.integers(len(answers))]
        t = by_answer[a][rng.integers(len(by_answer[a]))]
        return f"when does the {t.name} appear ?", a
    if qtype == "describe":
        return VIDEO_DESCRIBE_PROMPTS[rng.integers(len(VIDEO_DESCRIBE_PROMPTS))], describe_clip(clip)
    raise ValueError(f"unknown video question type {qtype!r}; expected one of {VIDEO_QUESTION_TYPES}")


def describe_clip(clip: Clip) -> str:
    """Every object as "a <colour> <shape>", in order of first appearance (then x, then y)."""
    tracks = sorted(
        clip.tracks, key=lambda t: (t.first, t.xs[t.first * FRAMES_PER_GROUP], t.ys[t.first * FRAMES_PER_GROUP])
    )
    return " , ".join(f"a {t.colour} {t.shape}" for t in tracks) + " ."


# ---------------------------------------------------------------------------------------------- scoring
_ITEM = re.compile(
    r"^an? (?P<colour>" + "|".join(COLOURS) + r") (?P<shape>" + "|".join(SHAPES) + r")"
    r"(?: (?P<loc>" + "|".join(LOCATIONS.values()) + r"))?$"
)


def parse_description(text: str) -> list[tuple[str, str, str | None] | None]:
    """Items of a generated description: ``(colour, shape, location phrase or None)`` per comma-separated
    part; ``None`` for a part that is not an object description (it counts as a wrong item).

    Accepts the tokenizer's detokenised form ("a red circle at the top, a blue square.") as well as the
    spaced form of :func:`describe_scene`.
    """
    text = " ".join(re.sub(r"([,.?])", r" \1 ", text.lower()).split())
    items: list[tuple[str, str, str | None] | None] = []
    for part in text.split(","):
        part = part.replace(".", " ").strip()
        if not part:
            continue
        m = _ITEM.match(" ".join(part.split()))
        items.append(None if m is None else (m["colour"], m["shape"], m["loc"]))
    return items


def description_counts(prediction: str, truth: str, *, with_location: bool = True) -> tuple[int, int, int]:
    """``(matched, predicted, true)`` object counts between two descriptions.

    An item matches a true item with the same colour, shape and (if ``with_location``) location; each
    true item matches at most once (multiset intersection). Precision = matched / predicted, recall =
    matched / true; sum the counts over a split for micro-averaged figures.
    """

    def key(item: tuple[str, str, str | None]) -> tuple[str, ...]:
        return item if with_location else item[:2]  # type: ignore[return-value]

    true_items = [key(i) for i in parse_description(truth) if i is not None]
    pred = parse_description(prediction)
    pool = list(true_items)
    matched = 0
    for item in pred:
        if item is not None and key(item) in pool:
            pool.remove(key(item))
            matched += 1
    return matched, len(pred), len(true_items)


# ---------------------------------------------------------------------------------------------- splits
def _rng(task: str, split_name: str, index: int, seed: int) -> np.random.Generator:
    if split_name not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split_name!r}; expected one of {sorted(_SPLIT_IDS)}")
    if task not in _TASK_IDS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return np.random.default_rng([seed, _TASK_IDS[task], _SPLIT_IDS[split_name], index])


def sample(split_name: str, index: int, seed: int = 0, task: str = "image") -> Sample | VideoSample:
    """Item ``index`` of ``split_name`` (``train``/``validation``/``test``) of ``task``.

    ``image``: the question type cycles over :data:`IMAGE_QUESTION_TYPES`; ``describe``: the prompt
    cycles over :data:`DESCRIBE_PROMPTS`; ``video``: the type cycles over :data:`VIDEO_QUESTION_TYPES`.
    """
    rng = _rng(task, split_name, index, seed)
    if task == "video":
        qtype = VIDEO_QUESTION_TYPES[index % len(VIDEO_QUESTION_TYPES)]
        # "when" answers cycle start/middle/end over the split (clips have more starts than ends)
        target = list(WHEN_GROUPS)[(index // len(VIDEO_QUESTION_TYPES)) % len(WHEN_GROUPS)]
        while True:
            clip = make_clip(rng)
            qa = ask_clip(clip, qtype, rng)
            if qa is not None and (qtype != "when" or qa[1] == target):
                if qtype == "describe":
                    qa = (VIDEO_DESCRIBE_PROMPTS[index % len(VIDEO_DESCRIBE_PROMPTS)], qa[1])
                return VideoSample(clip, qa[0], qa[1], qtype, index)
    if task == "describe":
        scene = make_scene(rng)
        return Sample(scene, DESCRIBE_PROMPTS[index % len(DESCRIBE_PROMPTS)], describe_scene(scene), "describe", index)
    qtype = IMAGE_QUESTION_TYPES[index % len(IMAGE_QUESTION_TYPES)]
    while True:
        scene = make_scene(rng)
        qa = ask(scene, qtype, rng)
        if qa is not None:
            return Sample(scene, qa[0], qa[1], qtype, index)


def split(split_name: str, n: int | None = None, seed: int = 0, task: str = "image") -> list:
    """The first ``n`` items of a split of ``task`` (default: the whole fixed validation/test split).

    Train, validation and test use disjoint random streams; question types are balanced.
    """
    if task not in SPLIT_SIZES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if n is None:
        if split_name not in SPLIT_SIZES[task]:
            raise ValueError(f"split {split_name!r} is unbounded: pass n")
        n = SPLIT_SIZES[task][split_name]
    return [sample(split_name, i, seed, task) for i in range(n)]


def to_pil(image: np.ndarray):
    """The ``(H, W, 3)`` uint8 array as a PIL image."""
    from PIL import Image

    return Image.fromarray(image, mode="RGB")


def prompt_messages(question: str, *, video: bool = False) -> list[dict]:
    """Chat messages for ``processor.apply_chat_template``: one user turn with the image (or video) and text."""
    return [{"role": "user", "content": [{"type": "video" if video else "image"}, {"type": "text", "text": question}]}]
