"""The synthetic visual QA generator: determinism, splits, and answers checked by hand."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vtr import synthqa
from vtr.synthqa import Obj, Scene


def _scene(objs: list[Obj]) -> Scene:
    z = np.zeros((synthqa.GRID, synthqa.GRID), dtype=np.int64)
    return Scene(np.zeros((224, 224, 3), dtype=np.uint8), objs, z, z)


# Hand-made scene: red circle top-left, red triangle bottom-right, blue square top-right,
# green cross bottom-left, green cross near the centre.
HAND = _scene([
    Obj("red", "circle", 40.0, 40.0, 12.0),
    Obj("red", "triangle", 180.0, 190.0, 12.0),
    Obj("blue", "square", 190.0, 30.0, 12.0),
    Obj("green", "cross", 30.0, 170.0, 12.0),
    Obj("green", "cross", 115.0, 105.0, 12.0),
])

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


def test_hand_checked_answers():
    seen = set()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        for qtype in synthqa.QUESTION_TYPES:
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


def test_no_question_when_none_is_well_defined():
    dup = _scene([Obj("red", "circle", 40.0, 40.0, 12.0), Obj("red", "circle", 120.0, 116.0, 12.0)])
    rng = np.random.default_rng(0)
    assert synthqa.ask(dup, "colour", rng) is None  # the circle is not unique
    assert synthqa.ask(dup, "shape", rng) is None  # red is not unique
    assert synthqa.ask(dup, "location", rng) is None  # "the red circle" is ambiguous
    centre = _scene([Obj("red", "circle", 112.0, 120.0, 12.0)])
    assert synthqa.ask(centre, "location", rng) is None  # too close to both midlines
    with pytest.raises(ValueError, match="unknown question type"):
        synthqa.ask(dup, "size", rng)


def test_deterministic_and_splits_differ():
    a = synthqa.split("test", 12)
    b = synthqa.split("test", 12)
    for x, y in zip(a, b, strict=True):
        assert (x.question, x.answer, x.qtype) == (y.question, y.answer, y.qtype)
        assert np.array_equal(x.image, y.image)
        assert np.array_equal(x.scene.patch_colour, y.scene.patch_colour)
    v = synthqa.split("validation", 12)
    t = [synthqa.sample("train", i) for i in range(12)]
    for x, y, z in zip(a, v, t, strict=True):
        assert not np.array_equal(x.image, y.image) and not np.array_equal(x.image, z.image)
    assert not np.array_equal(synthqa.sample("test", 0, seed=1).image, a[0].image)
    assert len(synthqa.split("validation")) == synthqa.SPLIT_SIZES["validation"]
    with pytest.raises(ValueError):
        synthqa.split("train")
    with pytest.raises(ValueError):
        synthqa.sample("dev", 0)


def test_generated_answers_are_consistent_with_the_scene():
    for s in synthqa.split("test", 150):
        objs = s.scene.objects
        words = s.question.split()
        assert s.answer in synthqa.ANSWERS
        if s.qtype == "colour":
            match = [o for o in objs if o.shape == words[4]]
            assert len(match) == 1 and match[0].colour == s.answer
        elif s.qtype == "shape":
            match = [o for o in objs if o.colour == words[4]]
            assert len(match) == 1 and match[0].shape == s.answer
        elif s.qtype == "count":
            kind = words[2]
            n = sum(o.colour == kind for o in objs) if kind in synthqa.COLOURS else sum(
                synthqa.PLURALS[o.shape] == kind for o in objs
            )
            assert synthqa.COUNT_WORDS[n] == s.answer
        elif s.qtype == "exist":
            present = (words[3], words[4]) in {(o.colour, o.shape) for o in objs}
            assert s.answer == ("yes" if present else "no")
        else:
            (o,) = [o for o in objs if (o.colour, o.shape) == (words[2], words[3])]
            if "left" in words:
                assert s.answer == ("left" if o.cx < 112 else "right") and abs(o.cx - 112) >= 24
            else:
                assert s.answer == ("top" if o.cy < 112 else "bottom") and abs(o.cy - 112) >= 24


def test_image_and_patch_labels():
    s = synthqa.sample("test", 3)
    img, objs = s.image, s.scene.objects
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    assert 3 <= len(objs) <= 6
    for o in objs:
        if o.shape == "cross" or o.shape == "triangle":
            y = int(o.cy + (0.3 * o.r if o.shape == "triangle" else 0))
        else:
            y = int(o.cy)
        pix = img[y - 1: y + 2, int(o.cx) - 1: int(o.cx) + 2].reshape(-1, 3).mean(0)
        ref = synthqa._RGB[synthqa.COLOURS.index(o.colour)]
        assert np.abs(pix - ref).max() < 45, (o, pix)
        gy, gx = int(o.cy) // 16, int(o.cx) // 16
        assert s.scene.patch_colour[gy, gx] == 1 + synthqa.COLOURS.index(o.colour)
        assert s.scene.patch_shape[gy, gx] == 1 + synthqa.SHAPES.index(o.shape)
    # each object covers a few patches; most patches are background
    assert (s.scene.patch_colour > 0).sum() <= 6 * len(objs)
    assert (s.scene.patch_colour == 0).mean() > 0.7
    assert ((s.scene.patch_colour > 0) == (s.scene.patch_shape > 0)).all()


def test_balance_and_vocabulary():
    val = synthqa.split("validation", 500)
    types = Counter(s.qtype for s in val)
    assert set(types.values()) == {100}
    exist = Counter(s.answer for s in val if s.qtype == "exist")
    assert abs(exist["yes"] - exist["no"]) <= 20
    from vtr.testing import build_word_tokenizer

    tok = build_word_tokenizer(synthqa.WORDS)
    for s in val[:100]:
        ids = tok(s.question + " " + s.answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
    assert all(len(tok(a, add_special_tokens=False)["input_ids"]) == 1 for a in synthqa.ANSWERS)
