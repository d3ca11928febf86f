"""QuoTA: query-oriented token assignment for video (spec: specs/quota.md).

QuoTA ("QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video Comprehension", arXiv
2503.08689) spends a video's visual-token budget unevenly across frames: the answering model rewrites the
question into concrete objects (optional), a scorer rates every frame against them (or the raw question), the
budget is split in proportion to the squared scores, frames with 0 tokens are dropped and every other frame is
resized to a near-square token grid of its budget.

Functional cores (pure): :func:`assign_budgets`, :func:`near_square_grid`, :func:`aspect_grid`,
:func:`nearest_cells`, :func:`reduce_frame`, :func:`parse_decoupled`. The operator :class:`QuoTA` (``pre_llm``)
takes the question from ``OpContext.query`` and the frames from ``OpContext.extras["video_frames"]``; scorers
and query decoupling live in :mod:`vtr.ops.quota_scorers`.

vtr decisions beyond the spec: every frame is capped at its native token grid (``cap=None`` means the native
count), because the LLM input holds one row per original position (an up-sampled grid would need duplicated
positions); a pooled cell takes the original position of the nearest native cell.
"""

from __future__ import annotations

import ast
import json
import math
import numbers
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vtr.ops._video import require_video, video_grids
from vtr.ops.base import OpContext, Operator, resolve_keep, validate_keep
from vtr.tokens import VisualTokens

__all__ = [
    "ASSIGNERS",
    "MAX_OBJECTS",
    "QuoTA",
    "QuotaInfo",
    "aspect_grid",
    "assign_budgets",
    "decouple_prompt",
    "frame_grid",
    "near_square_grid",
    "nearest_cells",
    "parse_decoupled",
    "reduce_frame",
]

ASSIGNERS = ("bilinear", "adaptive_pool", "uniform", "tome")
GRIDS = ("auto", "square")
#: At most this many objects are kept from the decoupled query.
MAX_OBJECTS = 16


# ------------------------------------------------------------------------------------------------ budgets
def assign_budgets(scores: Tensor, total: int, power: float = 2.0, cap: int | None = None) -> Tensor:
    """Split ``total`` tokens over ``T`` frames in proportion to ``scores ** power`` (spec §3, step 3).

    Args:
        scores: ``[T]`` finite, ``>= 0``.
        total: token budget ``>= 0``.
        power: exponent ``> 0`` (only the exponent matters).
        cap: optional per-frame maximum ``>= 0``; one proportional redistribution pass of the excess, then a
            clamp (a second-round excess is discarded).

    Returns:
        ``[T]`` long budgets ``n_t = floor(total * pi_t + 1e-9)``: ``sum(n) <= total``, ``n >= 0``, ``n <= cap``.
        All-zero scores give the uniform split (never NaN).
    """
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not math.isfinite(power) or power <= 0:
        raise ValueError(f"power must be a finite number > 0, got {power!r}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, numbers.Integral) or cap < 0):
        raise ValueError(f"cap must be None or an int >= 0, got {cap!r}")
    s = torch.as_tensor(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be a 1-D tensor [T], got shape {tuple(s.shape)}")
    s = s.to(torch.float64)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"scores must be finite and >= 0, got {s.tolist()}")
    t = len(s)
    if t == 0 or total == 0:
        return torch.zeros(t, dtype=torch.long, device=s.device)
    w = s**power
    mass = w.sum()
    pi = w / mass if mass > 0 else torch.full_like(s, 1.0 / t)
    if cap is not None:
        c = cap / total
        excess = (pi - c).clamp_min(0).sum()
        under = pi < c
        pi = pi.clamp_max(c)
        room = w[under].sum()
        if room > 0:
            pi = torch.where(under, pi + excess * w / room, pi)
    n = torch.floor(total * pi + 1e-9).to(torch.long)
    return n.clamp_max(cap) if cap is not None else n


# ------------------------------------------------------------------------------------------------ grids
def near_square_grid(n: int) -> tuple[int, int]:
    """``(h, w)`` with ``h * w <= n``, the official growth rule: ``h = w = isqrt(n)``, then one extra row when it
    fits, otherwise one extra column when it fits. ``0 -> (0, 0)``; ``n < 0`` raises ``ValueError``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"near_square_grid needs an int n >= 0, got {n!r}")
    h = w = math.isqrt(int(n))
    if h * w < n and (h + 1) * w <= n:
        h += 1
    elif h * w < n and h * (w + 1) <= n:
        w += 1
    return h, w


def aspect_grid(n: int, native: tuple[int, int]) -> tuple[int, int]:
    """Aspect-preserving grid of at most ``n`` cells inside the native ``(H, W)`` grid (vtr extension, spec §3).

    ``h = clamp(floor(sqrt(n * H / W)), 1, min(H, n))`` and ``w = min(W, floor(n / h))``; ``h <= n`` keeps
    ``w >= 1`` for every ``n >= 1``. ``n = 0`` gives ``(0, 0)``.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"aspect_grid needs an int n >= 0, got {n!r}")
    big_h, big_w = native
    if n == 0:
        return 0, 0
    h = min(max(math.isqrt(int(n * big_h // big_w)) if big_w else 1, 1), big_h, int(n))
    # isqrt(floor(x)) == floor(sqrt(x)) for x >= 0, without float error.
    return h, min(big_w, int(n) // h)


def frame_grid(n: int, native: tuple[int, int], mode: str = "auto") -> tuple[int, int]:
    """The ``(h, w)`` grid a frame with budget ``n`` gets: :func:`near_square_grid` (``"square"``, or ``"auto"``
    on a square native grid) or :func:`aspect_grid` (``"auto"`` on a non-square native grid)."""
    if mode not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {mode!r}")
    if mode == "auto" and native[0] != native[1]:
        return aspect_grid(n, native)
    return near_square_grid(n)


def nearest_cells(grid: tuple[int, int], native: tuple[int, int]) -> Tensor:
    """``[h * w]`` raster index (into the native ``H x W`` grid) of the native cell nearest to each output cell.

    Output cell ``(i, j)`` maps to native ``(floor((i + 1/2) * H / h), floor((j + 1/2) * W / w))`` (spec §2).
    """
    h, w = grid
    big_h, big_w = native
    rows = torch.div((2 * torch.arange(h) + 1) * big_h, 2 * h, rounding_mode="floor")
    cols = torch.div((2 * torch.arange(w) + 1) * big_w, 2 * w, rounding_mode="floor")
    return (rows.view(h, 1) * big_w + cols.view(1, w)).flatten()


def cell_owners(grid: tuple[int, int], native: tuple[int, int]) -> Tensor:
    """``[H * W]``: the output cell containing each native cell's centre (``floor((r + 1/2) * h / H)``, same for
    columns), for sizes and sources of a down-sampled frame. With ``h <= H`` and ``w <= W`` every output cell gets
    members, and the :func:`nearest_cells` representative of an output cell is one of them."""
    h, w = grid
    big_h, big_w = native
    rows = torch.div((2 * torch.arange(big_h) + 1) * h, 2 * big_h, rounding_mode="floor")
    cols = torch.div((2 * torch.arange(big_w) + 1) * w, 2 * big_w, rounding_mode="floor")
    return (rows.view(big_h, 1) * w + cols.view(1, big_w)).flatten()


# ------------------------------------------------------------------------------------------------ within-frame
def reduce_frame(x: Tensor, grid: tuple[int, int], assigner: str = "bilinear") -> Tensor:
    """Resize one frame map ``x`` ``[H, W, D]`` to ``[h * w, D]`` (raster), computed in fp32, input dtype out.

    ``bilinear``: ``align_corners=False``, no antialias (the native size is the identity). ``adaptive_pool``:
    adaptive average pooling. ``uniform``: rows ``floor(linspace(0, H - 1, h))``, same for columns.
    (``tome`` needs a merge, not a resize: see :class:`QuoTA`.)
    """
    if x.ndim != 3:
        raise ValueError(f"reduce_frame expects a frame map [H, W, D], got {tuple(x.shape)}")
    h, w = grid
    big_h, big_w, d = x.shape
    if h <= 0 or w <= 0:
        raise ValueError(f"reduce_frame needs a grid of at least 1x1, got {grid}")
    acc = torch.promote_types(x.dtype, torch.float32)
    if assigner == "uniform":
        rows = torch.linspace(0, big_h - 1, h).floor().long().to(x.device)
        cols = torch.linspace(0, big_w - 1, w).floor().long().to(x.device)
        return x[rows][:, cols].reshape(h * w, d)
    chw = x.to(acc).permute(2, 0, 1).unsqueeze(0)
    if assigner == "bilinear":
        out = F.interpolate(chw, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    elif assigner == "adaptive_pool":
        out = F.adaptive_avg_pool2d(chw, (h, w))
    else:
        raise ValueError(f"reduce_frame: assigner must be 'bilinear', 'adaptive_pool' or 'uniform', got {assigner!r}")
    return out[0].permute(1, 2, 0).reshape(h * w, d).to(x.dtype)


# ------------------------------------------------------------------------------------------------ decoupling
_DECOUPLE_TEMPLATE = """{question}

Before answering, decide which concrete objects to look for in the video frames. Answer in three steps.
Step 1: Is it necessary to find specific physical objects to answer the question? Answer yes or no.
Step 2: If yes, list them as a bracketed list of quoted strings.
Step 3: Keep only concrete physical entities (no abstract concepts such as time, reasons or feelings) and \
output the final bracketed list, or null.

Example. Question: How many blue balloons are on the long table?
Step 1: yes
Step 2: ["blue balloons", "long table"]
Step 3: ["blue balloons", "long table"]

Example. Question: Which country does the product shown in the video come from?
Step 1: no
Step 2: null
Step 3: null

Example. Question: What does the man in the red jacket do after he opens the car door?
Step 1: yes
Step 2: ["man", "red jacket", "car door", "hurry"]
Step 3: ["man", "red jacket", "car door"]

Now give the three steps for the question above."""


def decouple_prompt(question: str) -> str:
    """The chain-of-thought query-decoupling instruction for ``question`` (spec §3, step 1)."""
    return _DECOUPLE_TEMPLATE.format(question=question.strip())


_STEP1 = re.compile(r"step\s*1\s*[:：.]\s*\W*\s*(yes|no)\b", re.IGNORECASE)
_STEP3 = re.compile(r"step\s*3\s*[:：.]", re.IGNORECASE)


def _bracketed(text: str) -> str | None:
    """The first ``[...]`` of ``text`` (brackets inside quoted strings ignored), or ``None`` if unclosed."""
    start = text.find("[")
    if start < 0:
        return None
    depth, quote, escaped = 0, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def parse_decoupled(text: str, max_objects: int = MAX_OBJECTS) -> list[str] | None:
    """Objects from a decoupling answer, or ``None`` to fall back to the raw query (spec §3, step 1).

    Needs ``Step 1: yes`` (the last step-1 line) and, after the last ``Step 3:``, a bracketed list parsed by
    ``json.loads`` or, failing that, ``ast.literal_eval`` (literals only; nothing is ever executed). Only a
    non-empty list of non-empty strings is accepted: stripped, deduplicated in order, at most ``max_objects``.
    """
    if not isinstance(text, str):
        return None
    step1 = _STEP1.findall(text)
    if not step1 or step1[-1].lower() != "yes":
        return None
    parts = _STEP3.split(text)
    if len(parts) < 2:
        return None
    tail = parts[-1].strip()
    if tail.lower().startswith("null"):
        return None
    literal = _bracketed(tail)
    if literal is None or len(literal) > 4000:
        return None
    try:
        value = json.loads(literal)
    except ValueError:
        try:
            value = ast.literal_eval(literal)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return None
    objects = [v.strip() for v in value]
    if not all(objects):
        return None
    return list(dict.fromkeys(objects))[:max_objects]


# ------------------------------------------------------------------------------------------------ operator
@dataclass
class QuotaInfo:
    """What QuoTA did to one video (appended to ``report.details["quota"]`` through ``OpContext.extras["details"]``,
    and to ``OpContext.extras["quota"]`` when that is a list)."""

    image: int
    query: str
    objects: list[str] | None
    scores: list[float]
    budgets: list[int]
    grids: list[tuple[int, int]]
    dropped_frames: int
    decouple_seconds: float
    scorer_seconds: float


@dataclass
class QuoTA(Operator):
    """Query-oriented token assignment over the frames of each video (``pre_llm``; spec: quota.md).

    Needs from the call context: ``ctx.query`` (the question text) and ``ctx.extras["video_frames"]`` (one entry
    per video of the sample, in prompt order: the frames given to the processor, ``[F, H, W, 3]`` uint8 or
    ``[F, 3, H, W]`` float in [0, 1]; ``F`` a multiple of the video's token frames, e.g. 2 per Qwen temporal step,
    whose scores are averaged). The ``vlm`` scorer without its own model and the query decoupling use the
    wrapped model: ``ctx.extras["model"]``, ``ctx.extras["processor"]`` (the decoupling also takes
    ``ctx.extras["tokenizer"]``) and ``ctx.extras["unreduced"]`` (a callable returning a context manager under
    which the wrapped model runs without reduction).

    Attributes:
        keep: each video's token budget, a ratio of its visual tokens or a count (default 1.0: the baseline
            count, spent unevenly).
        scope: ``"image"`` only (the budget unit is each whole video).
        scorer: ``"vlm"`` (P(yes) of a VLM; default the wrapped model), ``"clip"`` (open_clip cosine),
            ``"constant"`` (equal scores: uniform budgets, an ablation), or a callable
            ``(frames, query, objects) -> [F]`` scores in [0, 1].
        decouple: rewrite the question into objects with the wrapped model first (falls back to the question).
        assigner: within-frame reduction: ``bilinear``, ``adaptive_pool``, ``uniform`` (positions: nearest native
            cell) or ``tome`` (ToMe merging to ``h * w`` tokens, :func:`vtr.ops.tome.merge_to`; positions: the
            merge representatives).
        power: budget exponent. cap: per-frame maximum (``None``: the native count; never above it).
        grid: ``"auto"`` (near-square, aspect-preserving on non-square native grids) or ``"square"``.
        clip_model, clip_pretrained: open_clip model name and pretrained tag or local checkpoint path
            (``None``: random weights, for tests). Weights load at first use from the open_clip cache.
        vlm_answer: ``"letter"`` (A/B ids) or ``"word"`` (yes/no ids). vlm_renormalize: P(yes)/(P(yes)+P(no))
            (``False``: the official raw P(yes)). scorer_batch: frames per scorer forward.
        decouple_tokens: max new tokens of the decoupling generation.
    """

    #: The operator reads ``OpContext.query`` (the stage machinery then needs a tokenizer at ``wrap``).
    needs_query: ClassVar[bool] = True

    keep: int | float = 1.0
    scope: str = "image"
    scorer: str | Callable[..., Tensor] = "vlm"
    decouple: bool = True
    assigner: str = "bilinear"
    power: float = 2.0
    cap: int | None = None
    grid: str = "auto"
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "laion2b_s34b_b79k"
    vlm_answer: str = "letter"
    vlm_renormalize: bool = True
    scorer_batch: int = 16
    decouple_tokens: int = 96

    def validate(self) -> None:
        self.keep = validate_keep(self.keep, "QuoTA.keep")
        if self.scope != "image":
            raise ValueError(f"QuoTA budgets each whole video: scope must be 'image', got {self.scope!r}")
        if isinstance(self.scorer, str):
            if self.scorer not in ("vlm", "clip", "constant"):
                raise ValueError(f"QuoTA.scorer must be 'vlm', 'clip', 'constant' or a callable, got {self.scorer!r}")
        elif not callable(self.scorer):
            raise TypeError(f"QuoTA.scorer must be a name or a callable, got {type(self.scorer).__name__}")
        if not isinstance(self.decouple, bool):
            raise TypeError(f"QuoTA.decouple must be True or False, got {self.decouple!r}")
        if self.assigner not in ASSIGNERS:
            raise ValueError(f"QuoTA.assigner must be one of {ASSIGNERS}, got {self.assigner!r}")
        p = self.power
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"QuoTA.power must be a finite number > 0, got {p!r}")
        if self.cap is not None and (isinstance(self.cap, bool) or not isinstance(self.cap, int) or self.cap < 1):
            raise ValueError(f"QuoTA.cap must be None (the native count) or an int >= 1, got {self.cap!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"QuoTA.grid must be one of {GRIDS}, got {self.grid!r}")
        if self.vlm_answer not in ("letter", "word"):
            raise ValueError(f"QuoTA.vlm_answer must be 'letter' or 'word', got {self.vlm_answer!r}")
        for name in ("scorer_batch", "decouple_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"QuoTA.{name} must be an int >= 1, got {v!r}")

    # -------------------------------------------------------------- context
    def _needs(self, ctx: OpContext, key: str, why: str) -> Any:
        if key not in ctx.extras or ctx.extras[key] is None:
            raise ValueError(
                f"QuoTA needs OpContext.extras[{key!r}] ({why}); the adapter did not provide it for sample "
                f"{ctx.sample}. Use scorer='clip' or 'constant' with decouple=False when the wrapped model is "
                "not available to operators."
            )
        return ctx.extras[key]

    def _unreduced(self, ctx: OpContext):
        factory = self._needs(ctx, "unreduced", "to run the wrapped model without reduction")
        return factory()

    def _scorer(self, ctx: OpContext) -> tuple[Callable[..., Tensor], bool]:
        """The frame scorer, and whether it runs the wrapped model (which must then run unreduced)."""
        from vtr.ops import quota_scorers as qs

        if callable(self.scorer):
            return self.scorer, False
        if self.scorer == "constant":
            return qs.constant_scorer, False
        if self.scorer == "clip":
            return qs.ClipScorer(model_name=self.clip_model, pretrained=self.clip_pretrained), False
        model = self._needs(ctx, "model", "the wrapped model scores frames with scorer='vlm'")
        processor = self._needs(ctx, "processor", "the wrapped model's processor, for scorer='vlm'")
        scorer = qs.VLMScorer(
            model, processor, answer=self.vlm_answer, renormalize=self.vlm_renormalize, batch_size=self.scorer_batch
        )
        return scorer, True

    def _objects(self, query: str, ctx: OpContext) -> list[str] | None:
        if not self.decouple:
            return None
        from vtr.ops.quota_scorers import decouple_query

        model = self._needs(ctx, "model", "the wrapped model decouples the query (decouple=True)")
        processor = ctx.extras.get("processor") or self._needs(
            ctx, "tokenizer", "the wrapped model's processor or tokenizer, for decouple=True"
        )
        with self._unreduced(ctx):
            return decouple_query(model, processor, query, max_new_tokens=self.decouple_tokens)

    # -------------------------------------------------------------- apply
    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        require_video(tokens, self.name)
        grids = video_grids(tokens, self.name)
        if not grids:
            return tokens
        if any(g.grid != g.native for g in grids) or not bool((tokens.sizes == 1).all()):
            raise ValueError("QuoTA works on unreduced video frames: place it before other reducing operators")
        query = ctx.query
        if not isinstance(query, str) or not query.strip():
            raise ValueError(
                f"QuoTA needs the question text (OpContext.query) of sample {ctx.sample}, and the adapter did not "
                "provide it"
            )
        frames_per_video = self._needs(ctx, "video_frames", "the frames of every video of the sample")
        videos = [i for i, im in enumerate(tokens.layout) if im.kind == "video"]
        if len(frames_per_video) != len(videos):
            raise ValueError(
                f"QuoTA got frames for {len(frames_per_video)} video(s) but sample {ctx.sample} has {len(videos)}"
            )
        t0 = time.perf_counter()
        objects = self._objects(query, ctx)
        t_decouple = time.perf_counter() - t0
        scorer, wrapped = self._scorer(ctx)
        dev = tokens.embeds.device
        assign = torch.full((len(tokens),), -1, dtype=torch.long, device=dev)
        in_video = torch.zeros(len(tokens), dtype=torch.bool, device=dev)
        for g in grids:
            in_video[g.pos.flatten()] = True
        others = (~in_video).nonzero().flatten()
        assign[others] = torch.arange(len(others), device=dev)
        embeds, reps = [tokens.embeds[others]], [others]
        offset = len(others)
        for g in grids:
            frames = frames_per_video[videos.index(g.image)]
            t1 = time.perf_counter()
            with self._unreduced(ctx) if wrapped else nullcontext(), torch.no_grad():
                raw = torch.as_tensor(scorer(frames, query, objects), dtype=torch.float64).flatten().cpu()
            t_score = time.perf_counter() - t1
            if len(raw) % g.t:
                raise ValueError(
                    f"QuoTA: video {g.image} has {g.t} token frames but its scorer gave {len(raw)} frame scores "
                    "(expected a multiple: input frames per token frame)"
                )
            scores = raw.view(g.t, -1).mean(dim=1)
            big_h, big_w = g.native
            native = big_h * big_w
            cap = native if self.cap is None else self.cap
            if cap > native:
                raise ValueError(f"QuoTA.cap={cap} exceeds the native {big_h}x{big_w} = {native} tokens per frame")
            total = resolve_keep(self.keep, g.t * native)
            budgets = assign_budgets(scores, total, self.power, cap)
            shapes = []
            for f in range(g.t):
                h, w = frame_grid(int(budgets[f]), g.native, self.grid)
                if h > big_h or w > big_w:
                    raise ValueError(
                        f"QuoTA: grid='square' gives {h}x{w} for budget {int(budgets[f])}, larger than the native "
                        f"{big_h}x{big_w} grid: use grid='auto'"
                    )
                shapes.append((h, w))
                if h * w == 0:
                    continue  # a 0-budget frame is dropped: no token, no newline
                pos = g.pos[f]
                if self.assigner == "tome":
                    # ToMe down to h*w tokens: no grid; each output sits at its representative's position.
                    from vtr.ops.tome import merge_to

                    merged, _size, rep, member_of = merge_to(tokens.embeds[pos], h * w)
                    embeds.append(merged)
                    reps.append(pos[rep])
                    assign[pos] = member_of + offset
                else:
                    x = tokens.embeds[pos].view(big_h, big_w, -1)
                    embeds.append(reduce_frame(x, (h, w), self.assigner))
                    reps.append(pos[nearest_cells((h, w), g.native).to(dev)])
                    assign[pos] = cell_owners((h, w), g.native).to(dev) + offset
                offset += h * w
            info = QuotaInfo(
                image=g.image,
                query=query,
                objects=objects,
                scores=scores.tolist(),
                budgets=budgets.tolist(),
                grids=shapes,
                dropped_frames=sum(h * w == 0 for h, w in shapes),
                decouple_seconds=t_decouple,
                scorer_seconds=t_score,
            )
            if isinstance(ctx.extras.get("quota"), list):
                ctx.extras["quota"].append(info)
            if isinstance(ctx.extras.get("details"), dict):
                ctx.extras["details"].setdefault("quota", []).append(info)
        return tokens.merge(assign, torch.cat(embeds), torch.cat(reps)).sorted()
