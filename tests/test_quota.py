"""QuoTA: budget and grid cores (spec §9 golden cases, hypothesis properties), the decoupling parser, the
within-frame reductions, the operator with stub scorers, and the clip / vlm scorers on tiny random models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.ops.base import OpContext
from vtr.ops.quota import (
    QuoTA,
    aspect_grid,
    assign_budgets,
    cell_owners,
    frame_grid,
    near_square_grid,
    nearest_cells,
    parse_decoupled,
    reduce_frame,
)
from vtr.ops.quota_scorers import ClipScorer, VLMScorer, constant_scorer, decouple_query, to_pil_frames, vlm_prompt
from vtr.tokens import ImageLayout, VisualTokens


# ------------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize(
    ("scores", "total", "cap", "want"),
    [
        ([1, 1, 2], 12, None, [2, 2, 8]),
        ([1, 1, 2], 12, 6, [3, 3, 6]),
        ([0.1, 0.9], 10, None, [0, 9]),  # frame 0 gets nothing: dropped
        ([0, 0, 0, 0], 10, None, [2, 2, 2, 2]),  # all zero: uniform, no NaN
        ([1, 2, 3], 0, None, [0, 0, 0]),
        ([], 10, None, []),
        ([3.0], 7, None, [7]),
        ([1, 1, 1], 3, None, [1, 1, 1]),  # 2.9999999999 counts as 3: the 1e-9 tolerance
    ],
)
def test_assign_budgets_golden(scores, total, cap, want):
    got = assign_budgets(torch.tensor(scores, dtype=torch.float64), total, cap=cap)
    assert got.dtype == torch.long and got.tolist() == want


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(scores=[1.0, -0.5], total=4), "scores must be finite and >= 0"),
        (dict(scores=[1.0, float("nan")], total=4), "scores must be finite and >= 0"),
        (dict(scores=[1.0, float("inf")], total=4), "scores must be finite and >= 0"),
        (dict(scores=[1.0], total=-1), "total must be an int >= 0, got -1"),
        (dict(scores=[1.0], total=2.5), "total must be an int >= 0, got 2.5"),
        (dict(scores=[1.0], total=4, power=0), "power must be a finite number > 0, got 0"),
        (dict(scores=[1.0], total=4, cap=-1), "cap must be None or an int >= 0, got -1"),
        (dict(scores=[[1.0]], total=4), r"1-D tensor \[T\]"),
    ],
)
def test_assign_budgets_errors(kwargs, message):
    kwargs["scores"] = torch.tensor(kwargs["scores"])
    with pytest.raises(ValueError, match=message):
        assign_budgets(**kwargs)


score_lists = st.lists(st.floats(0, 10, allow_nan=False), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    scores=score_lists,
    total=st.integers(0, 5000),
    power=st.floats(0.25, 4),
    cap=st.one_of(st.none(), st.integers(0, 300)),
)
def test_assign_budgets_properties(scores, total, power, cap):
    s = torch.tensor(scores, dtype=torch.float64)
    n = assign_budgets(s, total, power, cap)
    assert n.shape == s.shape and bool((n >= 0).all())
    assert int(n.sum()) <= total
    if cap is not None:
        assert bool((n <= cap).all())
    if len(scores) and cap is None:
        # Flooring loses less than one token per frame.
        assert total - int(n.sum()) < len(scores) or total == 0
        # Monotone: a frame with a higher score never gets fewer tokens.
        order = torch.argsort(s)
        assert bool((torch.diff(n[order]) >= 0).all())


# ------------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize(
    ("n", "grid"),
    [(0, (0, 0)), (1, (1, 1)), (2, (2, 1)), (6, (3, 2)), (10, (3, 3)), (12, (4, 3)), (130, (11, 11)),
     (132, (12, 11)), (196, (14, 14)), (729, (27, 27))],
)  # fmt: skip
def test_near_square_grid_golden(n, grid):
    assert near_square_grid(n) == grid


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 100_000))
def test_near_square_grid_properties(n):
    h, w = near_square_grid(n)
    r = math.isqrt(n)
    assert h * w <= n and 0 <= h - w <= 1  # near square, never above the budget
    assert h * w >= r * r and n - h * w <= 2 * r  # at most one row/column short of the budget


def test_grid_errors():
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="n >= 0"):
            near_square_grid(bad)
    with pytest.raises(ValueError, match="grid must be one of"):
        frame_grid(4, (2, 2), "round")


def test_aspect_grid_golden():
    assert aspect_grid(24, (4, 6)) == (4, 6)  # the native count keeps the native grid
    assert aspect_grid(6, (4, 6)) == (2, 3)
    assert aspect_grid(1, (8, 1)) == (1, 1)  # h <= n keeps w >= 1
    assert aspect_grid(0, (4, 6)) == (0, 0)
    assert frame_grid(12, (4, 6)) == aspect_grid(12, (4, 6)) and frame_grid(12, (4, 4)) == (4, 3)


@settings(max_examples=300, deadline=None)
@given(big_h=st.integers(1, 40), big_w=st.integers(1, 40), frac=st.floats(0, 1))
def test_aspect_grid_properties(big_h, big_w, frac):
    n = round(frac * big_h * big_w)
    h, w = aspect_grid(n, (big_h, big_w))
    assert h * w <= n and h <= big_h and w <= big_w
    assert (h >= 1 and w >= 1) if n >= 1 else (h, w) == (0, 0)
    if n == big_h * big_w:
        assert (h, w) == (big_h, big_w)


def test_nearest_cells():
    got = nearest_cells((7, 7), (14, 14)).view(7, 7)
    want = torch.tensor([[(2 * i + 1) * 14 + 2 * j + 1 for j in range(7)] for i in range(7)])
    assert torch.equal(got, want)  # spec: 14x14 -> 7x7 maps (i, j) to native (2i+1, 2j+1)
    assert torch.equal(nearest_cells((4, 6), (4, 6)), torch.arange(24))
    assert nearest_cells((1, 1), (3, 5)).tolist() == [1 * 5 + 2]  # the centre


@settings(max_examples=200, deadline=None)
@given(big_h=st.integers(1, 20), big_w=st.integers(1, 20), data=st.data())
def test_nearest_cells_unique_and_owners_cover(big_h, big_w, data):
    h = data.draw(st.integers(1, big_h))
    w = data.draw(st.integers(1, big_w))
    cells = nearest_cells((h, w), (big_h, big_w))
    assert len(set(cells.tolist())) == h * w  # distinct positions: one LLM row each
    owners = cell_owners((h, w), (big_h, big_w))
    assert sorted(set(owners.tolist())) == list(range(h * w))  # every output cell covers native cells
    assert torch.equal(owners[cells], torch.arange(h * w))  # and its representative is one of them


# ------------------------------------------------------------------------------------------------ within-frame
def test_reduce_frame():
    x = torch.randn(6, 4, 5)
    for assigner in ("bilinear", "adaptive_pool", "uniform"):
        torch.testing.assert_close(reduce_frame(x, (6, 4), assigner), x.reshape(24, 5), rtol=0, atol=1e-6)
        const = torch.full((6, 4, 3), 2.5, dtype=torch.bfloat16)
        out = reduce_frame(const, (3, 2), assigner)
        assert out.dtype == torch.bfloat16 and bool((out == 2.5).all())
    grid = torch.arange(16, dtype=torch.float32).view(4, 4, 1)  # cell (i, j) = 4i + j
    assert reduce_frame(grid, (2, 2), "adaptive_pool").flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert reduce_frame(grid, (2, 2), "uniform").flatten().tolist() == [0, 3, 12, 15]  # rows/cols 0 and 3
    assert reduce_frame(grid, (2, 2), "bilinear").flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="assigner must be"):
        reduce_frame(grid, (2, 2), "nearest")


# ------------------------------------------------------------------------------------------------ parser
GOOD = 'Step 1: yes\nStep 2: ["red car", "dog"]\nStep 3: ["red car", "dog", "red car"]'


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (GOOD, ["red car", "dog"]),
        ("STEP 1: Yes.\nstep 3: ['a cup', ' a spoon ']", ["a cup", "a spoon"]),  # Python literal, stripped
        ("Step 1: yes\nStep 3: null", None),
        ("Step 1: no\nStep 3: []", None),
        ('Step 1: no\nStep 3: ["dog"]', None),
        ('Step 1: yes\nStep 3: ["dog", "cat"', None),  # truncated brackets
        ('Step 1: yes\nStep 3: ["dog", 3]', None),  # non-string item
        ('Step 1: yes\nStep 3: ["dog", "  "]', None),  # empty string
        ("Step 1: yes\nStep 3: []", None),
        ('Step 1: yes\nStep 2: ["dog"]', None),  # no step 3
        ('["dog"]', None),  # no step 1
        ("Step 1: yes\nStep 3: [__import__('os').system('echo hi')]", None),
        ('Step 1: yes\nStep 3: ["[odd] name", "ok"]', ["[odd] name", "ok"]),  # brackets inside strings
        ("Step 1: yes\nStep 3: " + str([f"o{i}" for i in range(20)]), [f"o{i}" for i in range(16)]),
        (None, None),
    ],
)
def test_parse_decoupled(text, want):
    assert parse_decoupled(text) == want


def test_parser_never_executes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payloads = [
        "__import__('pathlib').Path('pwned').touch()",
        "[__import__('pathlib').Path('pwned').touch()]",
        "[(lambda: __import__('pathlib').Path('pwned').touch())()]",
        "[x for x in [__import__('pathlib').Path('pwned').touch()]]",
    ]
    for p in payloads:
        assert parse_decoupled(f"Step 1: yes\nStep 3: {p}") is None
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ operator
def video_tokens(t: int = 4, h: int = 4, w: int = 4, d: int = 8, image: bool = False, seed: int = 0) -> VisualTokens:
    layout, offset = [], 0
    if image:
        layout.append(ImageLayout(offset=0, n_tokens=4, grids=((1, 2, 2),), kind="image"))
        offset = 4
    layout.append(ImageLayout(offset=offset, n_tokens=t * h * w, grids=((1, h, w),) * t, kind="video"))
    embeds = torch.randn(offset + t * h * w, d, generator=torch.Generator().manual_seed(seed))
    return VisualTokens.from_layout(embeds, layout)


def frames(n: int, size: int = 8) -> np.ndarray:
    return (np.random.default_rng(n).random((n, size, size, 3)) * 255).astype(np.uint8)


class PreferFrames:
    """Stub scorer: 1.0 for the preferred input frames, ``low`` for the others; records its calls."""

    def __init__(self, preferred: set[int], low: float = 0.1):
        self.preferred, self.low, self.calls = preferred, low, []

    def __call__(self, frames, query, objects=None):
        self.calls.append((len(to_pil_frames(frames)), query, objects))
        n = len(to_pil_frames(frames))
        return torch.tensor([1.0 if i in self.preferred else self.low for i in range(n)])


def ctx(n_frames: int | list[int], query: str = "where is the red car ?", **extras) -> OpContext:
    counts = [n_frames] if isinstance(n_frames, int) else n_frames
    return OpContext(query=query, extras={"video_frames": [frames(c) for c in counts], "quota": [], **extras})


def test_preferred_frames_get_the_largest_budgets():
    tokens = video_tokens(t=4)
    soft = PreferFrames({1, 2}, low=0.1)
    c = ctx(4)
    QuoTA(keep=0.5, scorer=soft, decouple=False)(tokens, c)
    # w = [.01, 1, 1, .01] of 32: [0.16, 15.8, 15.8, 0.16] -> [0, 15, 15, 0], grids 4x3.
    assert c.extras["quota"][0].budgets == [0, 15, 15, 0] and c.extras["quota"][0].grids[1] == (4, 3)
    scorer = PreferFrames({1, 2}, low=0.0)
    c = ctx(4)
    out = QuoTA(keep=0.5, scorer=scorer, decouple=False)(tokens, c)
    (info,) = c.extras["quota"]
    assert info.budgets == [0, 16, 16, 0]
    assert info.grids == [(0, 0), (4, 4), (4, 4), (0, 0)] and info.dropped_frames == 2
    # Dropped frames leave no token; the preferred frames keep their native grid exactly.
    assert out.frame.tolist() == [1] * 16 + [2] * 16
    torch.testing.assert_close(out.embeds, tokens.embeds[16:48])
    assert scorer.calls == [(4, "where is the red car ?", None)]


def test_positions_follow_the_nearest_cell_rule():
    tokens = video_tokens(t=2, h=4, w=4)
    c = ctx(2)
    out = QuoTA(keep=5 + 16, scorer=PreferFrames({0}, low=0.5), decouple=False)(tokens, c)
    (info,) = c.extras["quota"]
    # w = [1, 0.25] -> pi = [0.8, 0.2] of 21; the cap 16 (= 0.762 of 21) moves the excess 0.038 to frame 1:
    # [16, 5] -> grids 4x4 and near_square_grid(5) = 2x2.
    assert info.budgets == [16, 5] and info.grids == [(4, 4), (2, 2)]
    # 2x2 of 4x4: output (i, j) -> native (2i+1, 2j+1) of frame 1.
    assert out.index[16:].tolist() == [16 + 5, 16 + 7, 16 + 13, 16 + 15]
    assert out.sizes[16:].tolist() == [4.0] * 4 and bool((out.sizes[:16] == 1).all())
    want = reduce_frame(tokens.embeds[16:].view(4, 4, -1), (2, 2), "bilinear")
    torch.testing.assert_close(out.embeds[16:], want)


def test_full_budget_with_equal_scores_is_the_identity():
    tokens = video_tokens(t=3, h=4, w=6, image=True)
    for scorer in ("constant", constant_scorer):
        out = QuoTA(keep=1.0, scorer=scorer, decouple=False)(tokens, ctx(3))
        assert torch.equal(out.index, tokens.index) and torch.equal(out.embeds, tokens.embeds)


def test_tome_assigner():
    """ToMe merges each frame down to its grid's area; outputs sit at merge representatives (frame members)."""
    tokens = video_tokens(t=3, h=4, w=4)
    c = ctx(3)
    out = QuoTA(keep=0.5, scorer=PreferFrames({0, 1, 2}, low=0.0), decouple=False, assigner="tome")(tokens, c)
    (info,) = c.extras["quota"]
    assert info.budgets == [8, 8, 8] and info.grids == [(3, 2)] * 3
    assert len(out) == 18 and out.frame.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert out.sizes.view(3, 6).sum(1).tolist() == [16.0] * 3  # every token of a frame went somewhere
    owner = out.owner_map()
    assert torch.equal(owner[out.index], torch.arange(18))  # each representative belongs to its own output
    # A full budget merges nothing.
    full = QuoTA(keep=1.0, scorer="constant", decouple=False, assigner="tome")(tokens, ctx(3))
    assert torch.equal(full.embeds, tokens.embeds)


def test_two_input_frames_per_token_frame_are_averaged():
    """Qwen: one token frame = 2 input frames; its score is the mean of theirs."""
    tokens = video_tokens(t=2)
    c = ctx(4)
    QuoTA(keep=0.5, scorer=PreferFrames({0, 1}, low=0.0), decouple=False)(tokens, c)
    assert c.extras["quota"][0].scores == [1.0, 0.0] and c.extras["quota"][0].budgets == [16, 0]
    with pytest.raises(ValueError, match="has 2 token frames but its scorer gave 3 frame scores"):
        QuoTA(scorer=PreferFrames(set()), decouple=False)(tokens, ctx(3))


@pytest.mark.parametrize("assigner", ["bilinear", "adaptive_pool", "uniform", "tome"])
@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 6), h=st.integers(1, 6), w=st.integers(1, 6), keep=st.floats(0.05, 1.0), seed=st.integers(0, 99)
)
def test_operator_properties(assigner, t, h, w, keep, seed):
    """Kept count = sum of grid areas <= the budget; every frame's tokens come from that frame, positions are
    distinct native cells, sources cover exactly the kept frames."""
    tokens = video_tokens(t=t, h=h, w=w, seed=seed)
    rng = np.random.default_rng(seed)
    scores = rng.random(t)
    c = ctx(t)
    out = QuoTA(keep=keep, scorer=lambda f, q, o: torch.tensor(scores), decouple=False, assigner=assigner)(tokens, c)
    (info,) = c.extras["quota"]
    total = max(1, min(t * h * w, round(keep * t * h * w)))
    assert sum(info.budgets) <= total
    assert len(out) == sum(a * b for a, b in info.grids) <= sum(info.budgets)
    assert len(set(out.index.tolist())) == len(out)
    for f, (a, b) in enumerate(info.grids):
        assert int((out.frame == f).sum()) == a * b and a <= h and b <= w
    owner = out.owner_map()
    kept_frames = {f for f, (a, b) in enumerate(info.grids) if a * b}
    assert {int(i) // (h * w) for i in (owner >= 0).nonzero().flatten()} == kept_frames


def test_batch_of_contexts_is_independent():
    """Each sample has its own query, frames and budgets; the result depends only on its own inputs."""
    tokens = video_tokens(t=4)
    op = QuoTA(
        keep=0.5,
        scorer=lambda f, q, o: torch.tensor([1.0, 0.2, 0.2, 0.2] if "car" in q else [0.2] * 3 + [1.0]),
        decouple=False,
    )
    a1 = op(tokens, ctx(4, "the car ?"))
    op(tokens, ctx(4, "the dog ?"))
    a2 = op(tokens, ctx(4, "the car ?"))
    assert torch.equal(a1.index, a2.index) and int(a1.frame[0]) == 0
    assert int(op(tokens, ctx(4, "the dog ?")).frame[-1]) == 3


def test_operator_errors():
    tokens = video_tokens(t=2)
    op = QuoTA(scorer="constant", decouple=False)
    with pytest.raises(ValueError, match=r"needs the question text \(OpContext.query\) of sample 0"):
        op(tokens, OpContext(extras={"video_frames": [frames(2)]}))
    with pytest.raises(ValueError, match=r"needs OpContext.extras\['video_frames'\]"):
        op(tokens, OpContext(query="what ?"))
    with pytest.raises(ValueError, match=r"got frames for 2 video\(s\) but sample 0 has 1"):
        op(tokens, ctx([2, 2]))
    with pytest.raises(ValueError, match=r"needs OpContext.extras\['model'\]"):
        QuoTA(scorer="constant")(tokens, ctx(2))  # decouple=True needs the wrapped model
    with pytest.raises(ValueError, match=r"needs OpContext.extras\['model'\]"):
        QuoTA(decouple=False)(tokens, ctx(2))  # scorer="vlm" without a model of its own
    with pytest.raises(ValueError, match="cap=20 exceeds the native 4x4 = 16 tokens per frame"):
        QuoTA(scorer="constant", decouple=False, cap=20)(tokens, ctx(2))
    with pytest.raises(ValueError, match="acts on videos"):
        op(VisualTokens.from_layout(torch.randn(4, 3), [ImageLayout(0, 4, ((1, 2, 2),))]), ctx(1))
    pooled = tokens.merge(torch.arange(len(tokens)) // 2, tokens.embeds[::2], torch.arange(0, len(tokens), 2))
    with pytest.raises(ValueError, match="needs every frame of a video as a complete token grid|unreduced"):
        op(pooled, ctx(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(keep=0), r"QuoTA.keep must be an int >= 1 or a float in \(0, 1\], got 0"),
        (dict(scope="frame"), "QuoTA budgets each whole video: scope must be 'image', got 'frame'"),
        (dict(scorer="siglip"), "QuoTA.scorer must be 'vlm', 'clip', 'constant' or a callable, got 'siglip'"),
        (dict(scorer=3), "QuoTA.scorer must be a name or a callable, got int"),
        (dict(assigner="nearest"), "QuoTA.assigner must be one of"),
        (dict(power=-1.0), "QuoTA.power must be a finite number > 0, got -1.0"),
        (dict(cap=0), r"QuoTA.cap must be None \(the native count\) or an int >= 1, got 0"),
        (dict(grid="round"), "QuoTA.grid must be one of"),
        (dict(vlm_answer="yes"), "QuoTA.vlm_answer must be 'letter' or 'word'"),
        (dict(scorer_batch=0), "QuoTA.scorer_batch must be an int >= 1, got 0"),
        (dict(decouple="yes"), "QuoTA.decouple must be True or False"),
    ],
)
def test_operator_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        QuoTA(**kwargs)


def test_wrapped_model_runs_unreduced_for_scoring_and_decoupling(monkeypatch):
    """The vlm scorer and the decoupling run inside ``extras["unreduced"]``; decoupled objects reach the scorer."""
    import vtr.ops.quota_scorers as qs

    entered = []

    class Unreduced:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            entered.append(False)

    seen = []

    class FakeVLM:
        def __init__(self, model, processor, **kw):
            pass

        def __call__(self, frames, query, objects=None):
            seen.append((entered[-1], objects))
            return torch.ones(len(to_pil_frames(frames)))

    monkeypatch.setattr(qs, "VLMScorer", FakeVLM)
    monkeypatch.setattr(qs, "decouple_query", lambda m, p, q, max_new_tokens: seen.append(entered[-1]) or ["car"])
    c = ctx(2, model=object(), processor=object(), unreduced=Unreduced)
    QuoTA()(video_tokens(t=2), c)
    assert seen == [True, (True, ["car"])] and entered[-1] is False
    assert c.extras["quota"][0].objects == ["car"]


# ------------------------------------------------------------------------------------------------ scorers
def test_to_pil_frames_forms():
    arr = frames(3)
    for form in (arr, torch.from_numpy(arr), torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255):
        pils = to_pil_frames(form)
        assert len(pils) == 3 and np.array_equal(np.asarray(pils[1]), arr[1])
    assert len(to_pil_frames(to_pil_frames(arr))) == 3
    with pytest.raises(ValueError, match="frames must be"):
        to_pil_frames(np.zeros((3, 8, 8), np.uint8))


def test_vlm_prompts():
    assert vlm_prompt("q ?", ["dog", "red car"]) == (
        "Does this frame show any of these objects: dog, red car? A. yes B. no. Reply with the letter only."
    )
    assert vlm_prompt("Where is it?", None, "word").startswith("Where is it? Does this frame contain information")


@pytest.fixture(scope="module")
def tiny_qwen():
    from vtr.testing import tiny_qwen2_vl

    return tiny_qwen2_vl()


def test_vlm_scorer_answer_ids(tiny_qwen):
    model, processor = tiny_qwen
    tok = processor.tokenizer
    assert VLMScorer(model, processor, answer="word").answer_ids() == (
        tok.convert_tokens_to_ids("yes"),
        tok.convert_tokens_to_ids("no"),
    )
    with pytest.raises(ValueError, match="no token for the answer 'B'"):  # the word-level vocabulary lacks "b"
        VLMScorer(model, processor).answer_ids()


def test_vlm_scorer_batches_equal_single_frames(tiny_qwen):
    """Left-padded batches of frames of different sizes give the single-frame scores; P(yes) = P(no) -> 0.5."""
    model, processor = tiny_qwen
    rng = np.random.default_rng(0)
    imgs = [to_pil_frames((rng.random((1, s, s + 8, 3)) * 255).astype(np.uint8))[0] for s in (16, 32, 24)]
    scorer = VLMScorer(model, processor, answer="word", batch_size=3)
    batch = scorer(imgs, "is there a red star ?", None)
    single = torch.cat([scorer([im], "is there a red star ?", None) for im in imgs])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-4)
    assert batch.shape == (3,) and bool(((batch > 0) & (batch < 1)).all())
    raw = VLMScorer(model, processor, answer="word", renormalize=False)(imgs, "is there a red star ?", ["star"])
    assert bool((raw < batch.max()).all())  # a full-vocabulary probability is far below the yes/no share
    tok = processor.tokenizer
    head = model.lm_head.weight
    with torch.no_grad():
        saved = head[tok.convert_tokens_to_ids("no")].clone()
        head[tok.convert_tokens_to_ids("no")] = head[tok.convert_tokens_to_ids("yes")]
        try:
            torch.testing.assert_close(scorer(imgs, "is it ?", None), torch.full((3,), 0.5))
        finally:
            head[tok.convert_tokens_to_ids("no")] = saved


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight open_clip model config (32-pixel images, 2 layers): no download."""
    import json

    import open_clip

    d = tmp_path_factory.mktemp("clip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    }
    (d / "vtr-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return ClipScorer(model_name="vtr-test-clip", pretrained=None)


def test_clip_scorer(tiny_clip):
    f = frames(5, 16)
    with_query = tiny_clip(f, "where is the red car in this long question " * 20, None)  # truncated, no error
    with_objects = tiny_clip(f, "q", ["red car", "dog"])
    for s in (with_query, with_objects):
        assert s.shape == (5,) and bool(((s >= 0) & (s <= 1)).all())
    # The score is the best object's cosine: each object alone gives at most the same.
    one = torch.maximum(tiny_clip(f, "q", ["red car"]), tiny_clip(f, "q", ["dog"]))
    torch.testing.assert_close(with_objects, one, atol=1e-5, rtol=1e-5)


def test_quota_with_clip_scorer(tiny_clip):
    c = ctx(3)
    out = QuoTA(keep=0.5, scorer=tiny_clip, decouple=False)(video_tokens(t=3), c)
    assert len(out) <= 24 and len(c.extras["quota"][0].scores) == 3


def test_decouple_query_plumbing():
    """The decoupling prompt goes through the chat template; the generated continuation is parsed."""

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return {(7, 8): 'Step 1: yes\nStep 3: ["red car"]', (9,): "Step 1: no"}[tuple(ids.tolist())]

    class Proc:
        tokenizer = Tok()

        def apply_chat_template(self, messages, add_generation_prompt):
            assert add_generation_prompt and "Step 3" in messages[0]["content"][0]["text"]
            return messages[0]["content"][0]["text"]

        def __call__(self, text, return_tensors):
            self.text = text
            return {"input_ids": torch.tensor([[1, 2, 3]])}

    class Model(torch.nn.Module):
        def __init__(self, new):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.new = new

        def generate(self, input_ids, max_new_tokens, do_sample):
            assert not do_sample and max_new_tokens == 5
            return torch.cat([input_ids, torch.tensor([self.new])], dim=1)

    proc = Proc()
    assert decouple_query(Model([7, 8]), proc, "Where is the red car?", max_new_tokens=5) == ["red car"]
    assert proc.text[0].startswith("Where is the red car?")
    assert decouple_query(Model([9]), proc, "Why?", max_new_tokens=5) is None


def test_decouple_query_on_a_tiny_model_falls_back(tiny_qwen):
    model, processor = tiny_qwen
    assert decouple_query(model, processor, "where is the red star ?", max_new_tokens=8) is None


def test_recipe():
    import vtr

    (op,) = vtr.recipes.get("quota", keep=0.25, scorer="clip", assigner="uniform")
    assert isinstance(op, QuoTA) and (op.keep, op.scorer, op.assigner) == (0.25, "clip", "uniform")


def test_decouple_query_with_a_tokenizer_only(tiny_qwen):
    """The stage machinery may hand operators the tokenizer instead of the processor: text-only either way."""
    import copy

    model, processor = tiny_qwen
    tok = copy.deepcopy(processor.tokenizer)
    tok.chat_template = processor.chat_template
    calls = []
    real = model.generate

    def generate(**kwargs):
        calls.append(kwargs["input_ids"])
        return real(**kwargs)

    model.generate = generate
    try:
        assert decouple_query(model, tok, "where is the red star ?", max_new_tokens=4) is None
    finally:
        del model.generate
    text = tok.decode(calls[0][0])
    assert text.startswith("user : where is the red star?") and text.endswith("assistant :")
