"""The public API on LLaVA-1.5 (tiny random model): report, positions modes, labels, scope of wrap, errors.

The per-family contracts (identity, counts, positions, batch, beams, unwrap) are in test_contracts.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import N_IMG, greedy

import vtr
from vtr.ops import DivPrune, FastV, Pool, Random, ToMe


class Recorder:
    """Records what reaches the language model (after vtr's hook, which was registered first)."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(
            {
                "position_ids": kwargs["position_ids"].clone(),
                "attention_mask": None if kwargs["attention_mask"] is None else kwargs["attention_mask"].clone(),
                "inputs_embeds": kwargs["inputs_embeds"].clone(),
            }
        )

    def close(self):
        self.handle.remove()


def all_hook_counts(model) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


def test_report_shows_budget(llava, make_inputs):
    model, _ = llava
    vtr.wrap(model, "divprune", keep=0.25)
    greedy(model, make_inputs([("what colour ?", 2)]), n=2)
    rep = model.vtr.report
    assert rep.original_tokens == [2 * N_IMG] and rep.tokens_out(0) == 128
    (rec,) = rep.records
    assert (rec.stage, rec.operator, rec.tokens_in, rec.tokens_out) == ("pre_llm", "DivPrune", 512, 128)
    assert [(i.tokens_in, i.tokens_out) for i in rec.images] == [(256, 64), (256, 64)]
    for img in rec.images:
        assert img.kept == sorted(set(img.kept)) and 0 <= img.kept[0] and img.kept[-1] < N_IMG
    assert rec.seconds > 0


# --------------------------------------------------------------------------- positions
def _kept_sequence_mask(inputs, model) -> torch.Tensor:
    """[L] bool: which prompt rows survive, from the report (sample 0)."""
    ids = inputs["input_ids"][0]
    image_rows = torch.nonzero(ids == model.config.image_token_id).flatten()
    keep = ids != model.config.image_token_id
    rep = model.vtr.report
    for i, img in enumerate(rep.records[-1].images):
        keep[image_rows[i * N_IMG + torch.tensor(img.kept)]] = True
    return keep


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_positions_during_generate(llava, make_inputs, positions):
    model, _ = llava
    inputs = make_inputs([("what colour is the circle ?", 1)])
    n_prompt = inputs["input_ids"].shape[1]
    vtr.wrap(model, "divprune", keep=0.25, positions=positions)
    rec = Recorder(model)
    try:
        greedy(model, inputs, n=4)
    finally:
        rec.close()
    keep = _kept_sequence_mask(inputs, model)
    n_kept = int(keep.sum())
    assert n_kept == n_prompt - N_IMG + 64
    prefill, *decode = rec.calls
    assert prefill["inputs_embeds"].shape[1] == n_kept
    expected = torch.arange(n_prompt)[keep] if positions == "original" else torch.arange(n_kept)
    assert torch.equal(prefill["position_ids"][0], expected)
    assert prefill["attention_mask"].shape == (1, n_kept) and bool(prefill["attention_mask"].all())
    assert len(decode) == 3
    start = n_prompt if positions == "original" else n_kept
    for step, call in enumerate(decode):
        # Decoding continues where the UNPRUNED prompt would have (original), or contiguously (compact).
        assert call["position_ids"].tolist() == [[start + step]]
        # generate drops an all-ones mask while decoding; when present it must match the reduced cache.
        if call["attention_mask"] is not None:
            assert call["attention_mask"].shape == (1, n_kept + step + 1)


def test_plain_forward_gathers_default_positions(llava, make_inputs):
    model, _ = llava
    inputs = make_inputs([("what colour ?", 1)])
    vtr.wrap(model, "random", keep=0.25)
    rec = Recorder(model)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
            model(input_ids=nxt, attention_mask=mask, cache=out.cache)
    finally:
        rec.close()
    keep = _kept_sequence_mask(inputs, model)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(rec.calls[0]["position_ids"][0], torch.arange(n)[keep])
    assert rec.calls[1]["position_ids"].tolist() == [[n]]
    assert rec.calls[1]["attention_mask"].shape == (1, int(keep.sum()) + 1)


def test_reduced_run_equals_manual_pruned_sequence(llava, make_inputs):
    """Golden check of the splice: same logits as feeding the pruned rows to the LM by hand."""
    model, _ = llava
    inputs = make_inputs([("what colour is the circle ?", 2)])
    with vtr.reduced(model, "divprune", keep=0.1):
        with torch.no_grad():
            logits = model(**inputs).logits
        keep = _kept_sequence_mask(inputs, model)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        emb = model.model.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        emb = emb.masked_scatter(mask, torch.cat(feats))
        n = emb.shape[1]
        hidden = model.model.language_model(
            inputs_embeds=emb[:, keep],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
            position_ids=torch.arange(n)[keep].unsqueeze(0),
        ).last_hidden_state
        manual = model.lm_head(hidden)
    torch.testing.assert_close(logits, manual, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- scope
def test_unwrap_restores_exactly(llava, make_inputs):
    model, _ = llava
    inputs = make_inputs([("what colour ?", 1)])
    before_hooks = all_hook_counts(model)
    before_attrs = set(vars(model)) | {"__class__"}
    with torch.no_grad():
        ref = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    vtr.wrap(model, "divprune", keep=0.25)
    greedy(model, inputs, n=2)
    assert all_hook_counts(model) != before_hooks
    vtr.unwrap(model)
    assert all_hook_counts(model) == before_hooks
    assert set(vars(model)) | {"__class__"} == before_attrs and not hasattr(model, "vtr")
    assert "forward" not in vars(model) and "forward" not in vars(model.model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    with pytest.raises(ValueError, match="not wrapped"):
        vtr.unwrap(model)


def test_wrap_twice_replaces(llava, make_inputs):
    model, _ = llava
    vtr.wrap(model, "divprune", keep=0.25)
    hooks_once = all_hook_counts(model)
    vtr.wrap(model, "random", keep=0.5)
    assert all_hook_counts(model) == hooks_once
    greedy(model, make_inputs([("what ?", 1)]), n=1)
    assert [r.operator for r in model.vtr.report.records] == ["Random"]
    assert model.vtr.report.tokens_out(0) == 128


def test_wrap_patches_only_this_instance(make_inputs, llava):
    from vtr.testing import tiny_llava

    model, _ = llava
    other, _ = tiny_llava()
    cls_forward = type(model).forward
    vtr.wrap(model, "divprune", keep=0.25)
    assert type(model).forward is cls_forward
    assert all_hook_counts(other) == [0] * len(all_hook_counts(other))
    assert not hasattr(other, "vtr")


def test_reduced_context_restores_previous_recipe(llava, make_inputs):
    model, _ = llava
    inputs = make_inputs([("what ?", 1)])
    with vtr.reduced(model, "pool", keep=0.25):
        assert vtr.is_wrapped(model)
    assert not vtr.is_wrapped(model)
    vtr.wrap(model, "random", keep=0.5)
    with vtr.reduced(model, "divprune", keep=0.1):
        greedy(model, inputs, n=1)
        assert model.vtr.report.records[0].operator == "DivPrune"
    assert model.vtr.recipe.ops == [Random(keep=0.5)]


def test_text_only_and_mixed_batches_pass_through(llava, make_inputs):
    """A text-only turn (a chat's follow-up) or a mixed batch passes through; the report says 0 visual tokens."""
    model, _ = llava
    text_only = make_inputs([("what colour ?", 0)])
    mixed = make_inputs([("and now ?", 0), ("what colour is the circle ?", 1)])
    with torch.no_grad():
        ref_text = model(**text_only).logits
        ref_tokens = greedy(model, text_only, n=3)
    vtr.wrap(model, [DivPrune(keep=0.25), FastV(k=1, r=0.5)])
    with torch.no_grad():
        torch.testing.assert_close(model(**text_only).logits, ref_text, atol=1e-5, rtol=0)
        assert model.vtr.report.original_tokens == [0] and model.vtr.report.tokens_out(0) == 0
        assert torch.equal(greedy(model, text_only, n=3), ref_tokens)
        out = greedy(model, mixed, n=3)
    rep = model.vtr.report
    assert rep.original_tokens == [0, N_IMG] and [rep.tokens_out(0), rep.tokens_out(1)] == [0, 64]
    assert rep.layer_tokens == [[0, 0], [64, 32]]
    vtr.unwrap(model)
    with torch.no_grad():
        alone = greedy(model, make_inputs([("and now ?", 0)]), n=3)
    assert torch.equal(out[0, -3:], alone[0, -3:])


def test_labels_are_mapped_onto_the_reduced_sequence(llava, make_inputs):
    model, _ = llava
    inputs = make_inputs([("what colour ?", 1), ("is there a red circle on the left ?", 2)])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = model(**inputs, labels=labels).loss
        with vtr.reduced(model, "divprune", keep=1.0):
            same = model(**inputs, labels=labels).loss
        with vtr.reduced(model, "divprune", keep=0.25):
            out = model(**inputs, labels=labels)
            kept = model.vtr.adapter.last.kept_rows
    torch.testing.assert_close(same, ref, atol=1e-6, rtol=0)
    # By hand: gather the labels of the kept rows, left-pad like the splice, shifted cross-entropy.
    new_len = out.logits.shape[1]
    manual = torch.full((2, new_len), -100)
    for b, rows in enumerate(kept):
        manual[b, new_len - len(rows) :] = labels[b, rows]
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), manual[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(out.loss, ref)


def test_embeds_only_is_refused(llava, make_inputs):
    model, _ = llava
    inputs = make_inputs([("what ?", 1)])
    vtr.wrap(model, "divprune", keep=0.25)
    with torch.no_grad():
        emb = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="needs `input_ids`"):
        model(inputs_embeds=emb, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])


def test_unsupported_stage_operator_and_model_raise(llava):
    import timm

    from vtr.testing import tiny_qwen2_5_vl, tiny_qwen2_vl

    model, _ = llava
    with pytest.raises(ValueError, match="cannot follow"):
        vtr.wrap(model, [DivPrune(), ToMe(keep=0.5, placement="vision")])
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    with pytest.raises(ValueError, match="FastV acts in stage 'prefill', which the timm ViT adapter does not support"):
        vtr.wrap(vit, "fastv")
    qwen, _ = tiny_qwen2_vl()
    with pytest.raises(ValueError, match="ToMe cannot merge inside the Qwen2-VL encoder"):
        vtr.wrap(qwen, ToMe(keep=0.5, placement="vision"))
    with pytest.raises(ValueError, match="ToMe on Qwen2-VL merges the LLM-input tokens .* needs keep"):
        vtr.wrap(qwen, ToMe(r=4))
    qwen25, _ = tiny_qwen2_5_vl()
    with pytest.raises(ValueError, match="ToMe cannot merge inside the Qwen2.5-VL encoder"):
        vtr.wrap(qwen25, ToMe(keep=0.5, placement="vision"))
    with pytest.raises(ValueError, match="FastV.k=5: layer 5 is outside the language model's layers 0..1"):
        vtr.wrap(model, FastV(k=5))
    for m in (model, vit, qwen, qwen25):
        assert not vtr.is_wrapped(m)
    with pytest.raises(TypeError, match="no adapter for Linear; supported model classes: LlavaFor"):
        vtr.wrap(torch.nn.Linear(2, 2), "divprune")


@pytest.mark.parametrize(("keep", "err"), [(0, ValueError), (1.5, ValueError), ("x", TypeError)])
def test_bad_keep_through_wrap(llava, keep, err):
    model, _ = llava
    with pytest.raises(err, match=f"keep must be .*{keep!r}" if keep != "x" else "got 'x'"):
        vtr.wrap(model, "divprune", keep=keep)
    assert not vtr.is_wrapped(model)


def test_chain_pool_then_divprune(llava, make_inputs):
    model, _ = llava
    vtr.wrap(model, [Pool(keep=0.5), DivPrune(keep=32)])
    greedy(model, make_inputs([("what ?", 1)]), n=1)
    recs = model.vtr.report.records
    assert [(r.operator, r.tokens_in, r.tokens_out) for r in recs] == [("Pool", 256, 128), ("DivPrune", 128, 32)]


def test_report_prompt_tokens_and_flops(llava, make_inputs):
    from vtr.profile import decoder_prefill_flops

    model, _ = llava
    inputs = make_inputs([("what ?", 1), ("is there a red circle on the left ?", 2)])
    vtr.wrap(model, "divprune", keep=0.25)
    greedy(model, inputs, n=1)
    rep = model.vtr.report
    valid = inputs["attention_mask"].sum(1).tolist()
    assert rep.prompt_tokens == [(valid[0], valid[0] - 192), (valid[1], valid[1] - 384)]
    cfg = model.config.text_config
    assert rep.llm_prefill_flops[1] == (
        decoder_prefill_flops(cfg, valid[1]),
        decoder_prefill_flops(cfg, valid[1] - 384),
    )
    assert rep.to_dict()["prompt_tokens"][0] == list(rep.prompt_tokens[0])
