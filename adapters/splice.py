"""The LLM-input splice: where the ``pre_llm`` stage runs and the reduced prompt reaches the language model.

Instance-level hooks (never class patches):

* top model: ``labels`` are held back and mapped onto the reduced sequence after the call;
* base model: cached calls with ``position_ids=None`` get decode positions from the adapter when the
  family derives them from the unpruned prompt (Qwen's ``rope_deltas``);
* language model, prefill: cut the visual rows out of the merged ``inputs_embeds``, build each sample's
  :class:`~vtr.tokens.VisualTokens` (folding in what the ``vision`` stage did), run the ``pre_llm``
  operators, gather the kept rows, their mask columns and their ORIGINAL position ids (or compact ones),
  and repack the batch with its padding side;
* language model, decode: rebase the attention mask (``generate`` grows it from the unpruned length)
  and shift positions where needed; a post-hook binds the call state to a cache the LM created itself.

A sample without visual rows (a text-only turn, or a mixed batch) passes through with 0 visual tokens.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtr.adapters.base import SpliceState
from vtr.adapters.state import CallState
from vtr.ops.base import OpContext
from vtr.report import Report
from vtr.tokens import VisualTokens

if TYPE_CHECKING:  # pragma: no cover
    from vtr.adapters.base import Adapter

__all__ = ["SpliceHooks", "map_labels"]


class SpliceHooks:
    """The ``pre_llm`` stage and the reduced prompt's masks and positions (see the module docstring)."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        positions = adapter.reducer.recipe.positions
        for op in adapter.reducer.pipeline.ops:
            if positions not in op.position_modes:
                raise ValueError(
                    f"{op.name} supports positions={' or '.join(map(repr, op.position_modes))}, got "
                    f"positions={positions!r}"
                )
        self.handles: list[Any] = []
        self._labels: Tensor | None = None
        self._label_map = None

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        a = self.adapter
        lm = a.language_model()
        self.handles += [
            a.model.register_forward_pre_hook(self._top_hook, with_kwargs=True),
            a.model.register_forward_hook(self._top_post_hook, with_kwargs=True),
            a.base_model().register_forward_pre_hook(self._base_hook, with_kwargs=True),
            lm.register_forward_pre_hook(self._lm_hook, with_kwargs=True),
            lm.register_forward_hook(self._lm_post_hook),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._labels = None
        self._label_map = None

    @property
    def metadata_hooks(self):
        from vtr.adapters.metadata import MetadataHooks

        return next(h for h in self.adapter.hooks if isinstance(h, MetadataHooks))

    # ------------------------------------------------------------------ top model: labels
    def _top_hook(self, module, args, kwargs):
        if self.adapter.paused:
            return None
        # Labels are mapped onto the reduced sequence after the call: the model must not compute its loss
        # on logits that no longer line up with them.
        self._labels = kwargs.get("labels")
        self._label_map = None
        if self._labels is None:
            return None
        out = dict(kwargs)
        out["labels"] = None
        return args, out

    def _top_post_hook(self, module, args, kwargs, output):
        if self.adapter.paused:
            return None
        labels, self._labels = self._labels, None
        if labels is None or getattr(output, "logits", None) is None:
            return None
        if self._label_map is not None:
            labels = self._label_map(labels)
        logits = output.logits
        labels = labels[:, -logits.shape[1] :].to(logits.device)
        vocab = module.config.get_text_config().vocab_size
        output.loss = module.loss_function(logits=logits, labels=labels, vocab_size=vocab)
        return output

    # ------------------------------------------------------------------ base model: cached positions
    def _base_hook(self, module, args, kwargs):
        if self.adapter.paused:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs.get("position_ids") is not None or cache is None:
            return None
        st = self.adapter.calls.for_cache(cache)
        if st is None or st.splice is None:
            return None
        past = int(cache.get_seq_length())
        if past == 0:
            return None
        pos = self.adapter.decode_positions(kwargs, st.splice, past)
        if pos is None:
            return None
        out = dict(kwargs)
        out["position_ids"] = pos
        return args, out

    # ------------------------------------------------------------------ language model
    def _lm_hook(self, module, args, kwargs):
        if self.adapter.paused:
            return None
        if args:
            raise TypeError("vtr expects the language model to be called with keyword arguments")
        embeds = kwargs.get("inputs_embeds")
        meta = self.metadata_hooks
        input_ids, meta.input_ids = meta.input_ids, None
        if embeds is None:
            return None
        cache = kwargs.get("cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        if past == 0:
            return args, self._prefill(kwargs, input_ids, cache)
        return args, self._decode(kwargs, cache, past)

    def _lm_post_hook(self, module, args, output):
        if self.adapter.paused:
            return None
        # The language model may create the cache itself (plain forward with use_cache): bind the reduced
        # prefill's state to the cache it returns, so later calls with that cache decode correctly.
        st = self.adapter.calls.current
        cache = getattr(output, "cache", None)
        if st is not None and st.splice is not None and st.splice.cache_ref is None and cache is not None:
            self.adapter.calls.bind(st, cache)
        self.adapter.calls.current = None
        return None

    # ------------------------------------------------------------------ prefill
    def _prefill(self, kwargs: dict[str, Any], input_ids: Tensor | None, cache) -> dict[str, Any]:
        a = self.adapter
        reducer = a.reducer
        embeds: Tensor = kwargs["inputs_embeds"]
        bsz, length, _ = embeds.shape
        device = embeds.device
        if input_ids is None or input_ids.shape[:2] != (bsz, length):
            raise ValueError(
                "vtr needs `input_ids` to find the visual tokens; calls with only `inputs_embeds` "
                "cannot be reduced (unwrap the model for them)"
            )
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(bsz, length, dtype=torch.long, device=device)
        elif mask.ndim != 2:
            raise ValueError("vtr needs a 2-D attention mask (or none); got a prepared 4-D mask")
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = a.default_positions(kwargs, bsz, length, 0, device)
        pos = pos.expand(*pos.shape[:-2], bsz, length) if pos.shape[-2] == 1 else pos

        spans, expand = a.expanded_batch_spans(input_ids)
        report = Report(original_tokens=[len(s.seq_pos) for s in spans], layouts=[s.layout for s in spans])
        state = CallState(report=report, spans=spans, expand=expand)
        batch = [VisualTokens.from_layout(embeds[b, s.seq_pos], s.layout) for b, s in enumerate(spans)]
        pending, a.calls.pending = a.calls.pending, []
        if pending:
            from vtr.adapters.vision import fold_vision_results

            batch = fold_vision_results(a, batch, spans, pending, input_ids, report)
        contexts = self.contexts(spans, input_ids, mask, report)
        a.metadata = {}  # consumed: the next call captures its own
        batch = reducer.pipeline.run("pre_llm", batch, contexts, report)
        state.tokens = [t.sorted() for t in batch]
        reducer.report = report

        compact = reducer.recipe.positions == "compact"
        rows_e, rows_m, rows_p, shifts, kept_rows, visual = [], [], [], [], [], []
        for b, (s, red) in enumerate(zip(spans, state.tokens, strict=True)):
            keep = torch.ones(length, dtype=torch.bool, device=device)
            keep[s.seq_pos] = False
            if s.drop is not None:
                keep[s.drop.to(device)] = False
            kept_pos = s.seq_pos[red.index]
            keep[kept_pos] = True
            e = embeds[b].clone()
            e[kept_pos] = red.embeds.to(e.dtype)
            p = pos[..., b, :]
            removed = int(length - keep.sum())
            if compact:
                p = p - torch.cumsum((~keep).long(), dim=0)
            rows = keep.nonzero().flatten()
            is_vis = torch.zeros(length, dtype=torch.bool, device=device)
            is_vis[kept_pos] = True
            kept_rows.append(rows)
            visual.append(is_vis[rows])
            rows_e.append(e[keep])
            rows_m.append(mask[b][keep])
            rows_p.append(p[..., keep])
            shifts.append(removed if compact else 0)
        new_len = max(r.shape[0] for r in rows_e)
        report.set_prompt_tokens(
            [(int(mask[b].sum()), int(rows_m[b].sum())) for b in range(bsz)],
            a.model.config.get_text_config(),
        )
        left = not bool((mask[:, -1] == 0).any())  # right padding only when some row ends in padding
        new_e = embeds.new_zeros(bsz, new_len, embeds.shape[-1])
        new_m = mask.new_zeros(bsz, new_len)
        new_p = pos.new_zeros(*pos.shape[:-2], bsz, new_len)
        for b in range(bsz):
            n = rows_e[b].shape[0]
            sl = slice(new_len - n, new_len) if left else slice(0, n)
            new_e[b, sl] = rows_e[b]
            new_m[b, sl] = rows_m[b]
            new_p[..., b, sl] = rows_p[b]
        valid = mask.bool()
        flat = pos.reshape(-1, bsz, length)
        next_pos = (flat.masked_fill(~valid, -1).amax(dim=(0, 2)) + 1).clamp_min(0)
        state.kept_rows, state.visual, state.left = kept_rows, visual, left
        state.splice = SpliceState(
            cache_ref=None,
            orig_len=length,
            new_len=new_len,
            mask=new_m,
            shift=torch.tensor(shifts, device=device),
            next_pos=next_pos,
        )
        a.calls.current = a.calls.last = state
        a.calls.bind(state, cache)
        self._label_map = functools.partial(map_labels, kept_rows=kept_rows, new_len=new_len, left=left)
        out = dict(kwargs)
        out.update(inputs_embeds=new_e, attention_mask=new_m, position_ids=new_p)
        return out

    def contexts(self, spans, input_ids: Tensor, mask: Tensor, report: Report) -> list[OpContext]:
        """The operator context of every sample: index, prompt text (when a tokenizer is known), the model, a way
        to run it unreduced, the processor and, for query-aware operators on videos, the sample's frames."""
        a = self.adapter
        reducer = a.reducer
        frames = None
        if reducer.processor is not None and any(op.needs_query for op in reducer.pipeline.ops):
            n_videos = sum(im.kind == "video" for s in spans for im in s.layout)
            if n_videos:
                frames = iter(a.video_frames(reducer.processor))
        out = []
        for b, s in enumerate(spans):
            ctx = self.context(b, input_ids[b], mask[b])
            ctx.extras.update(processor=reducer.processor, unreduced=a.unreduced, details=report.details)
            if frames is not None:
                ctx.extras["video_frames"] = [next(frames) for im in s.layout if im.kind == "video"]
            out.append(ctx)
        return out

    def context(self, sample: int, input_ids: Tensor, mask: Tensor) -> OpContext:
        """The operator context of one sample: its index, the prompt text (when a tokenizer is known)."""
        ctx = OpContext(sample=sample, extras={"model": self.adapter.model})
        tok = getattr(self.adapter.reducer, "tokenizer", None)
        if tok is not None:
            ids = input_ids[mask.bool()] if mask is not None else input_ids
            vis = self.adapter.visual_token_ids()
            keep = ~torch.isin(ids, torch.tensor(sorted(vis), device=ids.device)) if vis else None
            ctx.query = tok.decode(ids[keep] if keep is not None else ids, skip_special_tokens=True).strip()
            ctx.extras["tokenizer"] = tok
        return ctx

    # ------------------------------------------------------------------ decode
    def _decode(self, kwargs: dict[str, Any], cache, past: int) -> dict[str, Any]:
        state = self.adapter.calls.for_cache(cache)
        if state is None or state.splice is None:
            # A cache this wrapper did not fill (e.g. built before wrapping): leave the call alone.
            return kwargs
        st = state.splice
        embeds: Tensor = kwargs["inputs_embeds"]
        bsz, q = embeds.shape[:2]
        if q > 1 and (st.new_len != st.orig_len or state.layers is not None):
            raise ValueError(
                f"{q} new tokens at once on a reduced cache: continuing from a reduced cache feeds one token per call "
                "(generate's own continuation re-feeds tokens by cache length, which a reduced cache no longer "
                "matches); run the follow-up as a new call with the whole conversation as its prompt"
            )
        out = dict(kwargs)
        mask = kwargs.get("attention_mask")
        grown = past - st.new_len  # tokens appended to the cache since the reduced prefill
        if mask is None:
            if not bool(st.mask.all()):
                # Repacking added padding the caller does not know about: the mask must stay explicit.
                ones = st.mask.new_ones(bsz, grown + q)
                out["attention_mask"] = torch.cat([st.mask, ones], dim=1)
        else:
            if mask.shape[-1] == st.orig_len + grown + q:
                out["attention_mask"] = torch.cat([st.mask.to(mask.dtype), mask[:, st.orig_len :]], dim=1)
            elif mask.shape[-1] != past + q:
                raise ValueError(
                    f"attention mask has {mask.shape[-1]} columns; expected {st.orig_len + grown + q} "
                    f"(unreduced prompt + new tokens) or {past + q} (reduced cache + new tokens)"
                )
        state.decode_mask = out.get("attention_mask")
        pos = kwargs.get("position_ids")
        shift = st.shift.to(embeds.device)
        if pos is None:
            base = self.adapter.default_positions(kwargs, bsz, q, st.orig_len + grown, embeds.device)
            out["position_ids"] = base - shift.view(bsz, 1)
        elif bool(shift.any()):
            out["position_ids"] = pos - shift.view(*([1] * (pos.ndim - 2)), -1, 1)
        return out


def map_labels(labels: Tensor, *, kept_rows: list[Tensor], new_len: int, left: bool) -> Tensor:
    """Labels ``[B, L]`` of the unreduced prompt -> ``[B, new_len]`` on the reduced one (-100 on padding).

    Text rows keep their labels; labels of pruned visual rows disappear (they are -100 in practice: the
    next-token target of a text row is still the token that follows it).
    """
    out = labels.new_full((labels.shape[0], new_len), -100)
    for b, rows in enumerate(kept_rows):
        n = rows.shape[0]
        sl = slice(new_len - n, new_len) if left else slice(0, n)
        out[b, sl] = labels[b, rows.to(labels.device)]
    return out
