"""The synthetic generator (``vtr.bench.synthqa``): determinism, splits, answers true of their scene or clip,
descriptions that list exactly the objects, and the description scorer on hand cases."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.bench import synthqa
from vtr.bench.synthqa import Clip, Obj, Scene, Track


def _scene(objs: list[Obj]) -> Scene:
    z = np.zeros((synthqa.GRID, synthqa.GRID), dtype=np.int64)
    return Scene(np.zeros((224, 224, 3), dtype=np.uint8), objs, z, z)


# Hand-made scene: red circle top-left, red triangle bottom-right, blue square top-right,
# green cross bottom-left, green cross near the centre.
HAND = _scene(
    [
        Obj("red", "circle", 40.0, 40.0, 12.0),
        Obj("red", "triangle", 180.0, 190.0, 12.0),
        Obj("blue", "square", 190.0, 30.0, 12.0),
        Obj("green", "cross", 30.0, 170.0, 12.0),
        Obj("green", "cross", 115.0, 105.0, 12.0),
    ]
)

#: Every question the generator may ask about HAND, with the answer worked out by hand.
HAND_TRUTH = {
    "what colour is the circle ?": "red",
    "what colour is the triangle ?": "red",
    "what colour is the square ?": "blue",
    "what shape is the blue object ?": "square",
    "how many circles are there ?": "one",
    "how many squares are there ?": "one",
    "how many triangles are there ?": "one",
    "how many crosses are there ?": "two",
    "how many stars are there ?": "zero",
    "how many red objects are there ?": "two",
    "how many green objects are there ?": "two",
    "how many blue objects are there ?": "one",
    "how many yellow objects are there ?": "zero",
    "how many purple objects are there ?": "zero",
    "is there a red circle ?": "yes",
    "is there a red triangle ?": "yes",
    "is there a blue square ?": "yes",
    "is there a green cross ?": "yes",
    "is the red circle on the left or the right ?": "left",
    "is the red circle at the top or the bottom ?": "top",
    "is the red triangle on the left or the right ?": "right",
    "is the red triangle at the top or the bottom ?": "bottom",
    "is the blue square on the left or the right ?": "right",
    "is the blue square at the top or the bottom ?": "top",
}
HAND_DESCRIPTION = (
    "a red circle at the top left , a blue square at the top right , a green cross in the middle , "
    "a green cross at the bottom left , a red triangle at the bottom right ."
)


def test_hand_checked_answers():
    seen = set()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        for qtype in synthqa.IMAGE_QUESTION_TYPES:
            qa = synthqa.ask(HAND, qtype, rng)
            assert qa is not None, qtype
            q, a = qa
            if q.startswith("is there") and a == "no":
                c, s = q.split()[3:5]
                assert (c, s) not in {(o.colour, o.shape) for o in HAND.objects}, q
                seen.add("no")
                continue
            assert q in HAND_TRUTH, f"unexpected question {q!r}"
            assert a == HAND_TRUTH[q], q
            seen.add(q)
    # never asks about ambiguous referents: the two green crosses, "the red object", "the cross"
    assert "what colour is the cross ?" not in seen
    assert not any(q.startswith("what shape is the red") or q.startswith("what shape is the green") for q in seen)
    assert not any("green cross on" in q or "green cross at" in q for q in seen)
    assert "no" in seen and len(seen) >= 20
    assert synthqa.describe_scene(HAND) == HAND_DESCRIPTION
    q, a = synthqa.ask(HAND, "describe", np.random.default_rng(0))
    assert q in synthqa.DESCRIBE_PROMPTS and a == HAND_DESCRIPTION


def test_no_question_when_none_is_well_defined():
    dup = _scene([Obj("red", "circle", 40.0, 40.0, 12.0), Obj("red", "circle", 120.0, 116.0, 12.0)])
    rng = np.random.default_rng(0)
    assert synthqa.ask(dup, "colour", rng) is None  # the circle is not unique
    assert synthqa.ask(dup, "shape", rng) is None  # red is not unique
    assert synthqa.ask(dup, "left_right", rng) is None  # "the red circle" is ambiguous
    centre = _scene([Obj("red", "circle", 112.0, 120.0, 12.0)])
    assert synthqa.ask(centre, "left_right", rng) is None  # too close to the vertical midline
    assert synthqa.ask(centre, "top_bottom", rng) is None
    with pytest.raises(ValueError, match="unknown question type 'size'"):
        synthqa.ask(dup, "size", rng)
    with pytest.raises(ValueError, match="unknown video question type 'size'"):
        synthqa.ask_clip(Clip(np.zeros((16, 112, 112, 3), np.uint8), []), "size", rng)


def _track(colour, shape, first, last, x=30.0, y=30.0) -> Track:
    n = synthqa.VIDEO_FRAMES
    return Track(colour, shape, 10.0, first, last, (x,) * n, (y,) * n)


def test_hand_checked_clip():
    clip = Clip(
        np.zeros((16, 112, 112, 3), np.uint8),
        [
            _track("red", "circle", 0, 7, x=80),
            _track("blue", "star", 3, 3),  # visible in frames 6-7 only
            _track("green", "square", 6, 7),  # appears at the end, so also visible in few frames
            _track("yellow", "circle", 2, 7),  # appears at group 2: neither start nor middle
        ],
    )
    asked = Counter()
    few = Counter()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        few[synthqa.ask_clip(clip, "few_frames", rng)] += 1
        q, a = synthqa.ask_clip(clip, "when", rng)
        expected = {"red circle": "start", "blue star": "middle", "green square": "end"}
        name = q.removeprefix("when does the ").removesuffix(" appear ?")
        assert expected[name] == a
        asked[name] += 1
    assert set(asked) == {"red circle", "blue star", "green square"}  # never the yellow circle
    assert set(few) == {("what colour is the star ?", "blue"), ("what colour is the square ?", "green")}
    assert synthqa.describe_clip(clip) == "a red circle , a yellow circle , a blue star , a green square ."
    assert [clip.tracks[1].visible(f) for f in range(16)] == [f in (6, 7) for f in range(16)]


def test_deterministic_and_splits_differ():
    for task in synthqa.TASKS:
        a = synthqa.split("test", 8, task=task)
        b = synthqa.split("test", 8, task=task)
        for x, y in zip(a, b, strict=True):
            assert (x.question, x.answer, x.qtype) == (y.question, y.answer, y.qtype)
            pix = "frames" if task == "video" else "image"
            assert np.array_equal(getattr(x, pix), getattr(y, pix))
        v = synthqa.split("validation", 8, task=task)
        t = [synthqa.sample("train", i, task=task) for i in range(8)]
        pix = "frames" if task == "video" else "image"
        for x, y, z in zip(a, v, t, strict=True):
            assert not np.array_equal(getattr(x, pix), getattr(y, pix))
            assert not np.array_equal(getattr(x, pix), getattr(z, pix))
        assert not np.array_equal(getattr(synthqa.sample("test", 0, seed=1, task=task), pix), getattr(a[0], pix))
    assert not np.array_equal(synthqa.sample("test", 0).image, synthqa.sample("test", 0, task="describe").image)
    with pytest.raises(ValueError, match="unbounded"):
        synthqa.split("train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        synthqa.sample("dev", 0)
    with pytest.raises(ValueError, match="unknown task 'audio'"):
        synthqa.split("test", 2, task="audio")


def _check_image_answer(s: synthqa.Sample) -> None:
    objs = s.scene.objects
    words = s.question.split()
    if s.qtype == "describe":
        items = synthqa.parse_description(s.answer)
        truth = [(o.colour, o.shape, synthqa.LOCATIONS[synthqa.location_of(o)]) for o in objs]
        assert Counter(items) == Counter(truth)
        return
    assert s.answer in synthqa.ANSWERS
    if s.qtype == "colour":
        match = [o for o in objs if o.shape == words[4]]
        assert len(match) == 1 and match[0].colour == s.answer
    elif s.qtype == "shape":
        match = [o for o in objs if o.colour == words[4]]
        assert len(match) == 1 and match[0].shape == s.answer
    elif s.qtype == "count":
        kind = words[2]
        if kind in synthqa.COLOURS:
            n = sum(o.colour == kind for o in objs)
        else:
            n = sum(synthqa.PLURALS[o.shape] == kind for o in objs)
        assert synthqa.COUNT_WORDS[n] == s.answer
    elif s.qtype == "exist":
        present = (words[3], words[4]) in {(o.colour, o.shape) for o in objs}
        assert s.answer == ("yes" if present else "no")
    else:
        (o,) = [o for o in objs if (o.colour, o.shape) == (words[2], words[3])]
        if s.qtype == "left_right":
            assert s.answer == ("left" if o.cx < 112 else "right") and abs(o.cx - 112) >= 24
        else:
            assert s.qtype == "top_bottom"
            assert s.answer == ("top" if o.cy < 112 else "bottom") and abs(o.cy - 112) >= 24


def _check_clip_answer(s: synthqa.VideoSample) -> None:
    tracks = s.clip.tracks
    words = s.question.split()
    if s.qtype == "describe":
        items = synthqa.parse_description(s.answer)
        assert Counter(items) == Counter((t.colour, t.shape, None) for t in tracks)
        firsts = [next(t.first for t in tracks if (t.colour, t.shape) == i[:2]) for i in items]
        assert firsts == sorted(firsts)  # order of first appearance
        return
    if s.qtype == "few_frames":
        (t,) = [t for t in tracks if t.shape == words[4]]  # the shape is unique in the clip
        assert t.colour == s.answer and t.groups <= 2
        assert sum(t.visible(f) for f in range(synthqa.VIDEO_FRAMES)) <= 4
    elif s.qtype == "exist":
        present = (words[3], words[4]) in {(t.colour, t.shape) for t in tracks}
        assert s.answer == ("yes" if present else "no")
    else:
        assert s.qtype == "when"
        (t,) = [t for t in tracks if (t.colour, t.shape) == (words[3], words[4])]
        assert t.first in synthqa.WHEN_GROUPS[s.answer]


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 10**6), seed=st.integers(0, 2**16), task=st.sampled_from(["image", "describe"]))
def test_image_answers_are_true_of_the_scene(index, seed, task):
    s = synthqa.sample("train", index, seed=seed, task=task)
    _check_image_answer(s)
    for o in s.scene.objects:  # centres keep clear of the third lines: one location each
        for v in (o.cx, o.cy):
            assert all(abs(v - 224 * k / 3) >= synthqa.THIRD_MARGIN for k in (1, 2))


@settings(max_examples=25, deadline=None)
@given(index=st.integers(0, 10**6), seed=st.integers(0, 2**16))
def test_clip_answers_are_true_of_the_clip(index, seed):
    s = synthqa.sample("train", index, seed=seed, task="video")
    _check_clip_answer(s)
    tracks = s.clip.tracks
    assert 2 <= len(tracks) <= 4
    assert len({(t.colour, t.shape) for t in tracks}) == len(tracks)
    frames = s.frames
    assert frames.shape == (16, 112, 112, 3) and frames.dtype == np.uint8
    for f in range(16):
        for t in tracks:  # visible objects are painted at their centre, never overlapping
            if t.visible(f):
                x, y = int(t.xs[f]), int(t.ys[f] + (0.3 * t.r if t.shape == "triangle" else 0))
                pix = frames[f, y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(float).mean(0)
                ref = synthqa._RGB[synthqa.COLOURS.index(t.colour)]
                assert np.abs(pix - ref).max() < 45, (f, t, pix)
                for u in tracks:
                    if u is not t and u.visible(f):
                        assert (t.xs[f] - u.xs[f]) ** 2 + (t.ys[f] - u.ys[f]) ** 2 >= (t.r + u.r + 3) ** 2


def test_fixed_splits_are_consistent_and_balanced():
    for s in synthqa.split("validation", 120):
        _check_image_answer(s)
    val = synthqa.split("validation", 600)
    types = Counter(s.qtype for s in val)
    assert set(types) == set(synthqa.IMAGE_QUESTION_TYPES) and set(types.values()) == {100}
    exist = Counter(s.answer for s in val if s.qtype == "exist")
    assert abs(exist["yes"] - exist["no"]) <= 20
    lr = Counter(s.answer for s in val if s.qtype == "left_right")
    assert abs(lr["left"] - lr["right"]) <= 25
    vid = synthqa.split("validation", 240, task="video")
    for s in vid:
        _check_clip_answer(s)
    assert set(Counter(s.qtype for s in vid).values()) == {60}
    assert set(Counter(s.answer for s in vid if s.qtype == "when").values()) == {20}  # start/middle/end
    vexist = Counter(s.answer for s in vid if s.qtype == "exist")
    assert abs(vexist["yes"] - vexist["no"]) <= 16
    assert synthqa.SPLIT_SIZES["image"]["test"] % len(synthqa.IMAGE_QUESTION_TYPES) == 0
    assert synthqa.SPLIT_SIZES["video"]["test"] % (len(synthqa.VIDEO_QUESTION_TYPES) * 3) == 0


def test_image_pixels_and_cell_labels():
    s = synthqa.sample("test", 3)
    img, objs = s.image, s.scene.objects
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    assert 3 <= len(objs) <= 6
    for o in objs:
        y = int(o.cy + (0.3 * o.r if o.shape == "triangle" else 0))
        pix = img[y - 1 : y + 2, int(o.cx) - 1 : int(o.cx) + 2].reshape(-1, 3).mean(0)
        ref = synthqa._RGB[synthqa.COLOURS.index(o.colour)]
        assert np.abs(pix - ref).max() < 45, (o, pix)
        gy, gx = int(o.cy) // synthqa.CELL, int(o.cx) // synthqa.CELL
        assert s.scene.cell_colour[gy, gx] == 1 + synthqa.COLOURS.index(o.colour)
        assert s.scene.cell_shape[gy, gx] == 1 + synthqa.SHAPES.index(o.shape)
    assert s.scene.cell_colour.shape == (8, 8)
    assert (s.scene.cell_colour > 0).sum() <= 4 * len(objs)
    assert ((s.scene.cell_colour > 0) == (s.scene.cell_shape > 0)).all()


@settings(max_examples=15, deadline=None)
@given(index=st.integers(0, 10**6), seed=st.integers(0, 2**16))
def test_clip_cell_labels_follow_the_tracks(index, seed):
    """Per frame group, the cell under a visible object's centre carries its colour and shape, objects show up
    only in groups where they are visible, and labelled cells exist only near a visible object."""
    clip = synthqa.sample("train", index, seed=seed, task="video").clip
    cc, cs = synthqa.clip_cells(clip)
    assert cc.shape == cs.shape == (synthqa.VIDEO_GROUPS, 4, 4)
    assert ((cc > 0) == (cs > 0)).all()
    for g in range(synthqa.VIDEO_GROUPS):
        f = g * synthqa.FRAMES_PER_GROUP
        visible = [t for t in clip.tracks if t.visible(f)]
        labels = {
            (synthqa.COLOURS[c - 1], synthqa.SHAPES[s - 1])
            for c, s in zip(cc[g].ravel(), cs[g].ravel(), strict=True)
            if c
        }
        assert labels <= {(t.colour, t.shape) for t in visible}
        for t in visible:  # an object inside one cell in both frames of the group labels that cell
            ext = 1.2 * t.r
            cells = {
                (int((t.ys[k] + d) // synthqa.CELL), int((t.xs[k] + e) // synthqa.CELL))
                for k in (f, f + 1)
                for d in (-ext, ext)
                for e in (-ext, ext)
            }
            if len(cells) == 1:
                ((gy, gx),) = cells
                assert (cc[g, gy, gx], cs[g, gy, gx]) == (
                    1 + synthqa.COLOURS.index(t.colour),
                    1 + synthqa.SHAPES.index(t.shape),
                )
        for gy, gx in zip(*np.nonzero(cc[g]), strict=True):  # a labelled cell is within reach of a visible object
            cy, cx = (gy + 0.5) * synthqa.CELL, (gx + 0.5) * synthqa.CELL
            assert any(
                abs(t.xs[f] - cx) < 14 + 1.2 * t.r + 2 and abs(t.ys[f] - cy) < 14 + 1.2 * t.r + 2 for t in visible
            )


def test_clip_cell_labels_hand_case():
    """One still red circle of radius 12 centred in cell (1, 2) during groups 2-3 only."""
    xs = tuple([2.5 * 28] * 16)
    ys = tuple([1.5 * 28] * 16)
    clip = Clip(np.zeros((16, 112, 112, 3), dtype=np.uint8), [Track("red", "circle", 12.0, 2, 3, xs, ys)])
    cc, cs = synthqa.clip_cells(clip)
    expect = np.zeros((8, 4, 4), dtype=np.int64)
    expect[2:4, 1, 2] = 1
    assert (cc == expect).all() and (cs == expect).all()


def test_vocabulary_covers_every_prompt_and_answer():
    from vtr.testing import build_word_tokenizer

    tok = build_word_tokenizer(synthqa.WORDS)
    texts = list(synthqa.DESCRIBE_PROMPTS + synthqa.VIDEO_DESCRIBE_PROMPTS)
    for task in synthqa.TASKS:
        texts += [s.question + " " + s.answer for s in synthqa.split("validation", 60, task=task)]
    for text in texts:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
    assert all(len(tok(a, add_special_tokens=False)["input_ids"]) == 1 for a in synthqa.ANSWERS)
    assert len(set(synthqa.WORDS)) == len(synthqa.WORDS)


# ---------------------------------------------------------------------------------------------- scorer
TRUTH = "a red circle at the top left , a blue square on the right , a blue square at the bottom ."


@pytest.mark.parametrize(
    ("prediction", "counts"),
    [
        (TRUTH, (3, 3, 3)),
        # the tokenizer's detokenised form, other order
        ("a blue square at the bottom, a red circle at the top left, a blue square on the right.", (3, 3, 3)),
        ("a red circle at the top left .", (1, 1, 3)),  # precision 1, recall 1/3
        ("a red circle at the top right , a blue square on the right .", (1, 2, 3)),  # wrong location
        ("a blue square on the right , a blue square on the right , a blue square on the right .", (1, 3, 3)),
        ("a red circle at the top left , some noise , a green star in the middle .", (1, 3, 3)),
        ("", (0, 0, 3)),
    ],
)
def test_description_counts_hand_cases(prediction, counts):
    assert synthqa.description_counts(prediction, TRUTH) == counts


def test_description_counts_without_location():
    pred = "a red circle at the bottom , a blue square , a blue square at the top ."
    assert synthqa.description_counts(pred, TRUTH, with_location=False) == (3, 3, 3)
    assert synthqa.description_counts(pred, TRUTH) == (0, 3, 3)
    assert synthqa.parse_description("A Red Circle, a cat.") == [("red", "circle", None), None]
