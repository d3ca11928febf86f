"""The contract matrix (DESIGN §4): every family x every operator case x its inputs, one table.

Operator cases (``OPERATORS``) cover every stage: ``vision`` (ToMe in the CLIP/SigLIP tower), ``pre_llm``
(Random, Pool, DivPrune, ToMe after the projector), ``prefill`` (FastV between decoder layers). Each case has
an identity configuration that still runs the operator's real path (keep=1.0 through the hooks, FastV r=0
through the layer hooks) and a reducing one. Contracts, per family, case and operator:

* identity: fp32 logits within 1e-5 of the unwrapped model, the same greedy tokens and the same sampled tokens;
* counts: what the report says reached the LLM is what the LLM got, within the budget;
* positions: prefill position ids are the unreduced ones gathered at the kept rows; decode positions equal
  the unreduced run's, step by step (also for a cached forward with ``position_ids=None``);
* batch: every sample of a padded batch gives what it gives alone, with different kept counts;
* beams: ``num_beams``/``num_return_sequences`` identity and per-copy reduction;
* unwrap: every hook and instance attribute removed, outputs bitwise equal; attention backend unchanged;
* per-layer caches (prefill operators): each layer's KV cache holds exactly what that layer saw, and
  decoding equals a reference that masks instead of removing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import (
    FAMILIES,
    GEN,
    CacheRecorder,
    LMRecorder,
    build_inputs,
    family_cases,
    hook_state,
    model_and_processor,
    pos3,
    reference_run,
    reference_sample,
    sample,
)

import vtr
from vtr.adapters.decoder import additive_mask
from vtr.ops import (
    ATS,
    DivPrune,
    FastV,
    HiRED,
    MustDropCache,
    MustDropFilter,
    MustDropKeys,
    MustDropMerge,
    Pool,
    Random,
    ToMe,
)
from vtr.ops.base import resolve_keep

PATCH_TOWER = {"llava", "llava_next", "llava_onevision"}  # ToMe merges inside these towers


@dataclass(frozen=True)
class OpCase:
    """One operator configuration for the matrix.

    Attributes:
        identity: ops that keep everything but run the real path. reduce: ops that reduce.
        stage: the stage the operator acts in (on every family it applies to).
        families: families it applies to (default all). skip_cases: case-name prefixes it refuses.
        exact: per image, the exact count expected from its original rows; ``None``: only ``count <= budget``
            is checked (the budget is ``resolve_keep(keep, n)``).
        exact_families: families the exact count applies to (default all).
        keep: the reducing budget (ratio of each image's rows), for the upper bound; in-tower operators budget
            each encoder sequence (tile), so for tiled families only ``count < n`` is checked.
        identity_runs: the identity configuration leaves a record of ``stage``; ``False`` for methods that cannot
            keep everything on their real path (ATS's sampler never keeps a block's lowest-score unit): their
            identity row checks the no-op configuration, and the other rows the real path.
    """

    identity: Callable[[], list]
    reduce: Callable[[], list]
    stage: str
    keep: float
    families: frozenset[str] = field(default_factory=lambda: frozenset(FAMILIES))
    skip_cases: tuple[str, ...] = ()
    exact: Callable[[int], int] | None = None
    exact_families: frozenset[str] = field(default_factory=lambda: frozenset(FAMILIES))
    identity_runs: bool = True


def _mustdrop(merge: float, thresholds: tuple[float, float]) -> list:
    """MustDrop's four operators; the tiny LLMs have 2 layers, so the one pruning layer is 0."""
    return [
        MustDropMerge(threshold=merge),
        MustDropKeys(),
        *_mustdrop_llm(thresholds),
    ]


def _mustdrop_llm(thresholds: tuple[float, float]) -> list:
    g, i = thresholds
    return [
        MustDropFilter(layers=(0,), scale=False, global_thr=g, individual_thr=i),
        MustDropCache(layers=(0,), scale=False),
    ]


OPERATORS: dict[str, OpCase] = {
    "random": OpCase(
        lambda: [Random(keep=1.0)], lambda: [Random(keep=0.3)], "pre_llm", 0.3, exact=lambda n: resolve_keep(0.3, n)
    ),
    "pool": OpCase(lambda: [Pool(keep=1.0)], lambda: [Pool(keep=0.3)], "pre_llm", 0.3),
    "divprune": OpCase(
        lambda: [DivPrune(keep=1.0)], lambda: [DivPrune(keep=0.3)], "pre_llm", 0.3, exact=lambda n: resolve_keep(0.3, n)
    ),
    "tome_tower": OpCase(
        lambda: [ToMe(keep=1.0, placement="vision")],
        lambda: [ToMe(keep=0.6, placement="vision")],
        "vision",
        0.6,
        families=frozenset(PATCH_TOWER),
        skip_cases=("video",),
        exact=lambda n: resolve_keep(0.6, n),
        exact_families=frozenset({"llava"}),
    ),
    "tome_pre_llm": OpCase(
        lambda: [ToMe(keep=1.0, placement="pre_llm")],
        lambda: [ToMe(keep=0.3, placement="pre_llm", scope="image")],
        "pre_llm",
        0.3,
        exact=lambda n: resolve_keep(0.3, n),
    ),
    "fastv": OpCase(lambda: [FastV(k=1, r=0.0)], lambda: [FastV(k=1, r=0.5)], "prefill", 1.0),
    "ats": OpCase(
        lambda: [ATS(blocks=())],
        lambda: [ATS(keep=0.6)],
        "vision",
        0.6,
        skip_cases=("video",),  # LLaVA-OneVision pools video frames on full grids
        identity_runs=False,
    ),
    # HiRED budgets the padded AnyRes tiles ((k + 1) * P * beta), not the unpadded canvas rows: the ratio bound is
    # looser than its keep; single-partition families keep exactly floor(beta * units).
    "hired": OpCase(
        lambda: [HiRED(keep=1.0)],
        lambda: [HiRED(keep=0.3)],
        "pre_llm",
        0.4,
        skip_cases=("video",),  # LLaVA-OneVision's pooled video frames carry no encoder scores
        exact=lambda n: int(0.3 * n),
        exact_families=frozenset({"llava", "qwen2_vl", "qwen2_5_vl"}),
    ),
    "mustdrop": OpCase(
        lambda: _mustdrop(1.01, (0.0, 0.0)),
        lambda: _mustdrop(0.04, (0.1, 0.3)),
        "vision",
        1.0,
        skip_cases=("video",),
    ),
    "mustdrop_llm": OpCase(lambda: _mustdrop_llm((0.0, 0.0)), lambda: _mustdrop_llm((0.05, 0.2)), "decode", 1.0),
}


def _params(test: str):
    for fam in FAMILIES.values():
        for case in family_cases(fam):
            if test == "batch" and "b3" not in case:
                continue
            for name, op in OPERATORS.items():
                if fam.name not in op.families or case.startswith(op.skip_cases):
                    continue
                yield pytest.param(fam.name, case, name, id=f"{fam.name}-{case}-{name}")


def _wrapped(model, ops):
    vtr.wrap(model, ops)
    assert model.vtr.pipeline.stages  # validated


# --------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize(("family", "case", "op"), list(_params("identity")))
def test_identity(family: str, case: str, op: str) -> None:
    inputs, ref_logits, ref_tokens, _ = reference_run(family, case)
    model, _ = model_and_processor(family)
    ref_sampled = reference_sample(family, case)
    _wrapped(model, OPERATORS[op].identity())
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            report = model.vtr.report
            tokens = model.generate(**inputs, **GEN)
            sampled = sample(model, inputs)
    finally:
        vtr.unwrap(model)
    # The operator really ran (a record of its stage for every sample with visual tokens).
    stage = OPERATORS[op].stage
    for b, n in enumerate(report.original_tokens):
        if n and OPERATORS[op].identity_runs:
            assert any(r.sample == b and r.stage == stage for r in report.records), f"no {stage} record, sample {b}"
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(sampled, ref_sampled)  # sampling goes through the same path


# --------------------------------------------------------------------------------------------- counts, positions
@pytest.mark.parametrize(("family", "case", "op"), list(_params("counts")))
def test_counts_and_positions(family: str, case: str, op: str) -> None:
    """What the report says reached the LLM is what it got, within budget; prefill positions are the unreduced
    ones gathered at the kept rows; decode positions equal the unreduced run's."""
    inputs, _, _ref_tokens, ref_pos = reference_run(family, case)
    model, _ = model_and_processor(family)
    spec = OPERATORS[op]
    _wrapped(model, spec.reduce())
    try:
        with LMRecorder(model) as rec, torch.no_grad():
            model.generate(**inputs, **GEN)
        state = model.vtr.adapter.last
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    bsz = inputs["input_ids"].shape[0]
    prefill = pos3(rec.calls[0]["position_ids"])
    mask = rec.calls[0]["attention_mask"]
    assert rec.calls[0]["past"] == 0 and mask is not None and mask.ndim == 2
    reduced_any = False
    for b in range(bsz):
        spans = state.spans[b]
        n_vis = len(spans.seq_pos)
        assert report.original_tokens[b] == n_vis
        kept_rows = state.kept_rows[b]
        n_text = inputs["input_ids"].shape[1] - n_vis - (0 if spans.drop is None else len(spans.drop))
        assert len(kept_rows) == n_text + report.tokens_out(b)
        for i, im in enumerate(spans.layout):
            got = [r for r in report.records if r.sample == b][-1].images[i].tokens_out
            if spec.stage == "vision":
                assert got < im.n_tokens
            else:
                assert got <= resolve_keep(spec.keep, im.n_tokens) + _extra_rows(im)
            if spec.exact is not None and family in spec.exact_families:
                assert got == spec.exact(im.n_tokens), f"sample {b} image {i}: {got} != {spec.exact(im.n_tokens)}"
            reduced_any |= got < im.n_tokens
        n = len(kept_rows)
        # Prefill: gathered ORIGINAL positions (text rows all kept, sequence order preserved).
        torch.testing.assert_close(prefill[..., b, -n:], ref_pos[0][..., b, kept_rows], rtol=0, atol=0)
        assert bool(mask[b, -n:].bool().eq(inputs["attention_mask"][b, kept_rows].bool()).all())
        if spec.stage == "prefill":
            layers = report.layer_tokens[b]
            assert layers[0] == n_vis and layers[1] == resolve_keep(0.5, n_vis)
            reduced_any |= layers[1] < n_vis
    assert reduced_any, "the reducing configuration should reduce something"
    # Decode: exactly the positions of the unreduced run, step by step.
    assert len(rec.calls) == len(ref_pos)
    for step, call in enumerate(rec.calls[1:], start=1):
        torch.testing.assert_close(pos3(call["position_ids"]), ref_pos[step], rtol=0, atol=0)


def _extra_rows(im) -> int:
    """Rows of an image outside its grids (newlines), which in-tower operators do not touch."""
    return im.n_tokens - sum(t * h * w for t, h, w in im.grids)


# --------------------------------------------------------------------------------------------- batch
@pytest.mark.parametrize(("family", "case", "op"), list(_params("batch")))
def test_batch_invariance(family: str, case: str, op: str) -> None:
    """Each sample of a padded batch gives what it gives alone (greedy tokens equal, logits close)."""
    model, processor = model_and_processor(family)
    samples = family_cases(FAMILIES[family])[case]
    _wrapped(model, OPERATORS[op].reduce())
    try:
        with torch.no_grad():
            batch_inputs = build_inputs(processor, samples)
            batch_logits = model(**batch_inputs).logits[:, -1]
            batch_tokens = model.generate(**batch_inputs, **GEN)[:, -GEN["max_new_tokens"] :]
            report = model.vtr.report
            counts = [report.mean_layer_tokens(b) for b in range(len(samples))]
            for b, smp in enumerate(samples):
                one = build_inputs(processor, [smp])
                logits = model(**one).logits[:, -1]
                tokens = model.generate(**one, **GEN)[:, -GEN["max_new_tokens"] :]
                assert model.vtr.report.mean_layer_tokens(0) == counts[b]
                torch.testing.assert_close(logits[0], batch_logits[b], atol=1e-4, rtol=1e-4)
                assert torch.equal(tokens[0], batch_tokens[b]), f"sample {b} differs from its batched run"
    finally:
        vtr.unwrap(model)
    if len(set(report.original_tokens)) > 1:
        assert len(set(counts)) > 1, "the batch case should keep different numbers of tokens per sample"


# --------------------------------------------------------------------------------------------- beams
@pytest.mark.parametrize(("family", "op"), [(f, o) for f in FAMILIES for o in OPERATORS if f in OPERATORS[o].families])
def test_beams_and_return_sequences(family: str, op: str) -> None:
    """``generate`` encodes images before repeating each sample: the captured grid metadata and vision results
    serve every copy. Identity with beam search; a reduced run reduces every copy like the unexpanded batch."""
    case = "multi-b3"
    inputs, *_ = reference_run(family, case)
    model, _ = model_and_processor(family)
    beams = dict(GEN, num_beams=2)
    with torch.no_grad():
        ref = model.generate(**inputs, **beams)
    bsz = inputs["input_ids"].shape[0]
    spec = OPERATORS[op]
    _wrapped(model, spec.identity())
    try:
        with torch.no_grad():
            assert torch.equal(model.generate(**inputs, **beams), ref)
        _wrapped(model, spec.reduce())
        with torch.no_grad():
            model.generate(**inputs, **GEN)
            plain = model.vtr.report
            want = [(plain.original_tokens[b], plain.mean_layer_tokens(b)) for b in range(bsz)]
            out = model.generate(**inputs, **dict(GEN, num_beams=2, num_return_sequences=2))
            report = model.vtr.report
    finally:
        vtr.unwrap(model)
    assert out.shape[0] == 2 * bsz
    got = [(report.original_tokens[r], report.mean_layer_tokens(r)) for r in range(2 * bsz)]
    assert got == [w for w in want for _ in range(2)]


# --------------------------------------------------------------------------------------------- unwrap
@pytest.mark.parametrize(("family", "op"), [(f, o) for f in FAMILIES for o in OPERATORS if f in OPERATORS[o].families])
def test_unwrap_restores_and_backend_unchanged(family: str, op: str) -> None:
    model, _ = model_and_processor(family)
    inputs, ref_logits, ref_tokens, _ = reference_run(family, "multi-b3")
    before = hook_state(model)
    impls = [(n, m.config._attn_implementation) for n, m in model.named_modules() if hasattr(m, "config")]
    vtr.wrap(model, DivPrune(keep=0.2))
    _wrapped(model, OPERATORS[op].reduce())  # wrapping twice replaces the first pipeline
    with torch.no_grad():
        model(**inputs)
        model.generate(**inputs, **GEN)
    assert [(n, m.config._attn_implementation) for n, m in model.named_modules() if hasattr(m, "config")] == impls
    vtr.unwrap(model)
    assert hook_state(model) == before
    assert not hasattr(model, "vtr")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref_logits, atol=0, rtol=0)
        assert torch.equal(model.generate(**inputs, **GEN), ref_tokens)


# --------------------------------------------------------------------------------------------- manual decoding
@pytest.mark.parametrize(("family", "case"), [(f, c) for f in FAMILIES for c in family_cases(FAMILIES[f])])
def test_manual_decode_positions_without_position_ids(family: str, case: str) -> None:
    """A cached forward with ``position_ids=None`` decodes at the unreduced positions, with the caller's mask
    grown from the unreduced prompt (batch 3) or no mask at all (batch 1).

    Reference: the unwrapped model's own manual run; for M-RoPE models (Qwen: the ``rope_deltas`` path) the
    decode ids ``generate`` gives the unwrapped model, i.e. ``cumsum(mask) - 1 + rope_deltas``.
    """
    inputs, _, _, ref_pos = reference_run(family, case)
    model, _ = model_and_processor(family)
    with_mask = inputs["input_ids"].shape[0] > 1
    mrope = FAMILIES[family].mrope
    ref = [p[-3:] for p in ref_pos[1:3]] if mrope else _manual_decode(model, inputs, with_mask)
    vtr.wrap(model, [Random(keep=0.3), FastV(k=1, r=0.5)])
    try:
        red = _manual_decode(model, inputs, with_mask)
    finally:
        vtr.unwrap(model)
    assert len(red) == len(ref) == 2
    for got, want in zip(red, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _manual_decode(model, inputs: dict, with_mask: bool) -> list[torch.Tensor]:
    """Prefill with ``use_cache``, then two cached forwards with ``position_ids=None``: LM positions."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        mask = inputs["attention_mask"]
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        with LMRecorder(model) as rec:
            for _ in range(2):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                extra = {"attention_mask": mask} if with_mask else {}
                out = model(input_ids=nxt, cache=out.cache, use_cache=True, **extra)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for c in rec.calls:
        if c["position_ids"] is None:  # 1-D LMs build ``past + arange(q)`` themselves
            c["position_ids"] = torch.full((nxt.shape[0], 1), c["past"], dtype=torch.long)
    return [pos3(c["position_ids"]) for c in rec.calls]


# --------------------------------------------------------------------------------------------- per-layer caches
@pytest.mark.parametrize("case", ["image-b1", "multi-b3"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_layer_caches_and_masked_reference(family: str, case: str) -> None:
    """FastV: each layer's cache holds exactly the rows that layer saw in prefill; prefill and decode logits
    equal a reference that keeps every row but masks, in each layer, the keys of the rows it did not see."""
    inputs, *_ = reference_run(family, case)
    model, _ = model_and_processor(family)
    vtr.wrap(model, FastV(k=1, r=0.6))
    try:
        with CacheRecorder(model) as caches, torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        state = model.vtr.adapter.last
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    bsz, length = inputs["input_ids"].shape
    # Cache length of layer i after prefill = the rows it saw (padding included), as the report says.
    assert caches.lengths[0] == [lay.length for lay in state.layers]
    for b in range(bsz):
        valid = [int(lay.mask[b].sum()) for lay in state.layers]
        text = valid[0] - report.layer_tokens[b][0]
        assert [v - text for v in valid] == report.layer_tokens[b]
    # Masked reference on the unwrapped model.
    hide = {}
    for i, lay in enumerate(state.layers):
        h = torch.zeros(bsz, length, dtype=torch.bool)
        for b in range(bsz):
            rows = state.kept_rows[b]
            present = torch.zeros(len(rows), dtype=torch.bool)
            present[lay.rows[b]] = True
            h[b, rows[~present]] = True
        hide[i] = h
    ref = _masked_generate(model, inputs, hide, n=4)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _masked_generate(model, inputs, hide: dict[int, torch.Tensor], n: int):
    """Greedy ``generate`` on the unwrapped model where decoder layer ``i`` cannot attend to the prompt rows
    ``hide[i]`` ``[B, L]`` (their keys are masked in that layer, at prefill and while decoding)."""
    current: dict = {}
    length = inputs["input_ids"].shape[1]

    def lm_pre(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        embeds = kwargs["inputs_embeds"]
        past = 0 if kwargs.get("cache") is None else int(kwargs["cache"].get_seq_length())
        if mask is None:
            mask = torch.ones(embeds.shape[0], past + embeds.shape[1], dtype=torch.long)
        current["mask"] = mask.bool()

    def layer_pre(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            keys = current["mask"].clone()
            keys[:, :length] &= ~hide[i]
            return args, {**kwargs, "attention_mask": additive_mask(keys, hidden.shape[1], hidden.dtype)}

        return hook

    lm = model.model.language_model
    handles = [lm.register_forward_pre_hook(lm_pre, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            return model.generate(
                **inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    finally:
        for h in handles:
            h.remove()
