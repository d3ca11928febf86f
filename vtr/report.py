"""Per-call report: visual tokens per stage per sample, kept indices in original coordinates, timings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtr.tokens import VisualTokens

__all__ = ["ImageRecord", "Report", "StageRecord"]


@dataclass
class ImageRecord:
    """What one operator did to one image (or video) of one sample."""

    image: int
    tokens_in: int
    tokens_out: int
    kept: list[int]  # original indices within the image, ascending (representatives for merged tokens)
    #: For each original unit of the image, the position in ``kept`` of the token covering it (``-1``:
    #: dropped); ``None`` when no token was merged (each kept token covers only itself).
    groups: list[int] | None = None


@dataclass
class StageRecord:
    """One operator applied to one sample."""

    sample: int
    stage: str
    operator: str
    tokens_in: int
    tokens_out: int
    seconds: float
    images: list[ImageRecord] = field(default_factory=list)


@dataclass
class Report:
    """What the last reduced call did. ``model.vtr.report`` holds the report of the latest prefill."""

    records: list[StageRecord] = field(default_factory=list)
    original_tokens: list[int] = field(default_factory=list)  # visual rows per sample before reduction
    #: Per sample: (prompt rows the LLM would see unreduced, rows it saw), padding excluded.
    prompt_tokens: list[tuple[int, int]] = field(default_factory=list)
    #: Per sample: analytic LLM prefill FLOPs (unreduced, reduced); empty when the config is not decoder-shaped.
    llm_prefill_flops: list[tuple[float, float]] = field(default_factory=list)
    #: Per sample: visual tokens each LLM layer saw in prefill (empty when no decoder hooks ran).
    layer_tokens: list[list[int]] = field(default_factory=list)
    #: Per sample: KV-cache bytes each LLM layer holds after prefill (valid rows, text included).
    kv_bytes: list[list[int]] = field(default_factory=list)
    #: Per sample: the layout of its images/videos (grids per tile or frame), for overlays and per-frame counts.
    layouts: list[tuple] = field(default_factory=list)
    #: Operator-specific details by operator kind (e.g. ``"quota"``: frame scores and budgets per video).
    details: dict[str, list] = field(default_factory=dict)

    def add(
        self,
        *,
        sample: int,
        stage: str,
        operator: str,
        before: VisualTokens,
        after: VisualTokens,
        seconds: float,
    ) -> None:
        images = []
        owner = after.owner
        for i, im in enumerate(after.layout):
            pos = (after.image == i).nonzero().flatten()
            order = torch.argsort(after.index[pos])
            pos = pos[order]
            kept = [int(v) - im.offset for v in after.index[pos].tolist()]
            groups = None
            if owner is not None:
                slot = torch.full((len(after),), -1, dtype=torch.long, device=pos.device)
                slot[pos] = torch.arange(len(pos), device=pos.device)
                o = owner[im.offset : im.offset + im.n_tokens]
                # One extra -1 slot for dropped units (also when nothing is left).
                slot = torch.cat([slot, slot.new_full((1,), -1)])
                groups = slot[torch.where(o >= 0, o, len(after))].tolist()
            images.append(ImageRecord(i, int((before.image == i).sum()), len(kept), kept, groups))
        self.records.append(StageRecord(sample, stage, operator, len(before), len(after), seconds, images))

    def add_counts(
        self, *, sample: int, stage: str, operator: str, tokens_in: int, tokens_out: int, seconds: float
    ) -> None:
        """Record an operator by its counts only (an intermediate vision-stage step: no per-image detail)."""
        self.records.append(StageRecord(sample, stage, operator, tokens_in, tokens_out, seconds))

    def tokens_out(self, sample: int = 0) -> int:
        """Visual tokens of ``sample`` at the LLM input (after the ``vision`` and ``pre_llm`` stages)."""
        recs = [r for r in self.records if r.sample == sample and r.stage in ("vision", "pre_llm")]
        return recs[-1].tokens_out if recs else self.original_tokens[sample]

    llm_input_tokens = tokens_out

    def mean_layer_tokens(self, sample: int = 0) -> float:
        """Visual tokens per LLM layer, averaged over layers (MustDrop/FastV's count); the LLM-input count when
        no operator acted inside the LLM."""
        layers = self.layer_tokens[sample] if sample < len(self.layer_tokens) else []
        return sum(layers) / len(layers) if layers else float(self.tokens_out(sample))

    def kept(self, sample: int = 0, image: int = 0, stage: str | None = None) -> list[int]:
        """Original indices kept for one image after the last operator (of ``stage``, when given)."""
        recs = [r for r in self.records if r.sample == sample and (stage is None or r.stage == stage)]
        if not recs:
            raise ValueError(f"no operator ran on sample {sample}" + (f" in stage {stage!r}" if stage else ""))
        return recs[-1].images[image].kept

    def set_layer_tokens(self, visual: list[list[int]], total: list[list[int]], text_config, dtype) -> None:
        """Record per-layer visual counts and KV-cache bytes (``total`` valid rows per layer and sample)."""
        import torch

        self.layer_tokens = visual
        heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        per_row = 2 * heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        self.kv_bytes = [[n * per_row for n in rows] for rows in total]

    @property
    def operator_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def summary(self) -> str:
        """Human-readable table: one line per sample and operator, then per-layer counts when the LLM pruned."""
        lines = [f"{'sample':>6} {'stage':<8} {'operator':<12} {'in':>6} {'out':>6} {'ms':>8}"]
        for r in self.records:
            lines.append(
                f"{r.sample:>6} {r.stage:<8} {r.operator:<12} {r.tokens_in:>6} {r.tokens_out:>6} "
                f"{r.seconds * 1e3:>8.2f}"
            )
        for b, layers in enumerate(self.layer_tokens):
            if len(set(layers)) > 1:
                lines.append(
                    f"sample {b}: visual tokens per LLM layer {layers} (LLM input {self.tokens_out(b)}, "
                    f"layer average {self.mean_layer_tokens(b):.1f}, KV bytes per layer {self.kv_bytes[b]})"
                )
        return "\n".join(lines)

    def set_prompt_tokens(self, rows: list[tuple[int, int]], text_config=None) -> None:
        """Record prompt lengths per sample and, for a decoder-shaped ``text_config``, prefill FLOPs."""
        from vtr.profile import decoder_prefill_flops

        self.prompt_tokens = rows
        try:
            self.llm_prefill_flops = [
                (decoder_prefill_flops(text_config, a), decoder_prefill_flops(text_config, b)) for a, b in rows
            ]
        except AttributeError:  # not a decoder config we can count (FLOPs are informational only)
            self.llm_prefill_flops = []

    def to_dict(self) -> dict:
        return {
            "original_tokens": list(self.original_tokens),
            "prompt_tokens": [list(r) for r in self.prompt_tokens],
            "llm_prefill_flops": [list(r) for r in self.llm_prefill_flops],
            "layer_tokens": [list(r) for r in self.layer_tokens],
            "kv_bytes": [list(r) for r in self.kv_bytes],
            "records": [
                {
                    "sample": r.sample,
                    "stage": r.stage,
                    "operator": r.operator,
                    "tokens_in": r.tokens_in,
                    "tokens_out": r.tokens_out,
                    "seconds": r.seconds,
                    "images": [vars(i) for i in r.images],
                }
                for r in self.records
            ],
        }
