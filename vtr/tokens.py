"""``VisualTokens``: the per-sample data that flows between operators.

Shapes use ``N`` for the current number of tokens of one sample and ``D`` for the feature size.
Everything is per sample; a batch is a list of ``VisualTokens`` (counts may differ per sample).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["SCOPES", "ImageLayout", "TowerTokens", "VisualTokens"]

SCOPES = ("image", "frame", "sample")


@dataclass(frozen=True)
class ImageLayout:
    """Static description of one image (or video) of a sample, in token units.

    ``grids`` holds one ``(t, h, w)`` grid per frame/tile group, in the order the model packs them;
    ``n_tokens`` is the original number of visual rows of this image at the LLM input (including extra
    rows such as newlines); ``offset`` is the index of its first row among the sample's visual rows.
    """

    offset: int
    n_tokens: int
    grids: tuple[tuple[int, int, int], ...]
    kind: str = "image"  # "image" | "video"


@dataclass
class VisualTokens:
    """Visual tokens of one sample.

    Attributes:
        embeds: ``[N, D]`` token features (LLM-input embeddings in ``pre_llm``).
        index: ``[N]`` long, ORIGINAL row of each token (its representative for merged tokens) among
            the sample's visual rows, in ``[0, N_orig)``.
        image: ``[N]`` long, image/video id within the sample.
        frame: ``[N]`` long, frame (video) or tile (AnyRes, InternVL) id within the image.
        coords: ``[N, 3]`` long, original ``(t, h, w)`` grid coordinates in token units.
        sizes: ``[N]`` float, number of original units each token stands for (1 unless merged).
        protected: ``[N]`` bool, tokens later stages must not drop.
        scores: named per-token signals ``name -> [N]`` captured on demand.
        owner: ``[N_orig]`` long, the current token covering each ORIGINAL unit (``-1``: dropped), or
            ``None`` when no token was ever merged (each token covers exactly its ``index``). This sparse
            form of the sources keeps memory O(N_orig) for long videos; :meth:`source_matrix` gives the
            dense ``[N, N_orig]`` view on demand.
        layout: per-image static layout, shared by all stages.
        encoder: ``[N, 2]`` long or ``None``: where each row came from in the vision encoder — the encoder
            sequence within its image (tile / frame: 0 = LLaVA-NeXT's base view, InternVL's crops then the
            thumbnail last) and the unit index in that sequence (``-1`` for rows from no unit, e.g. newlines).
            Filled when the vision stage ran (vision operators or vision signals).
    """

    embeds: Tensor
    index: Tensor
    image: Tensor
    frame: Tensor
    coords: Tensor
    sizes: Tensor
    protected: Tensor
    layout: tuple[ImageLayout, ...]
    scores: dict[str, Tensor] = field(default_factory=dict)
    owner: Tensor | None = None
    encoder: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.embeds.shape[0]
        if self.embeds.ndim != 2:
            raise ValueError(f"VisualTokens.embeds must be [N, D], got shape {tuple(self.embeds.shape)}")
        for name in ("index", "image", "frame", "sizes", "protected"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise ValueError(f"VisualTokens.{name} must have shape ({n},), got {tuple(t.shape)}")
        if self.coords.shape != (n, 3):
            raise ValueError(f"VisualTokens.coords must have shape ({n}, 3), got {tuple(self.coords.shape)}")
        for name, s in self.scores.items():
            if s.shape[0] != n:
                raise ValueError(f"score {name!r} has {s.shape[0]} rows for {n} tokens")
        if self.encoder is not None and self.encoder.shape != (n, 2):
            raise ValueError(f"VisualTokens.encoder must have shape ({n}, 2), got {tuple(self.encoder.shape)}")
        if self.owner is not None and self.owner.shape != (self.n_orig,):
            raise ValueError(f"VisualTokens.owner must have shape ({self.n_orig},), got {tuple(self.owner.shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_layout(cls, embeds: Tensor, layout: Sequence[ImageLayout]) -> VisualTokens:
        """Build unreduced tokens for ``embeds`` [N_orig, D] described by ``layout``.

        Each image's rows are assigned to its grids in order (row-major ``t, h, w`` within a grid);
        rows beyond the grids (e.g. newline tokens) take the coordinates of the grid row they close.
        """
        n = embeds.shape[0]
        total = sum(im.n_tokens for im in layout)
        if total != n:
            raise ValueError(f"layout describes {total} visual rows but {n} embeddings were given")
        image = torch.empty(n, dtype=torch.long)
        frame = torch.empty(n, dtype=torch.long)
        coords = torch.empty(n, 3, dtype=torch.long)
        for i, im in enumerate(layout):
            sl = slice(im.offset, im.offset + im.n_tokens)
            image[sl] = i
            fr, co = _grid_coords(im)
            frame[sl] = fr
            coords[sl] = co
        dev = embeds.device
        return cls(
            embeds=embeds,
            index=torch.arange(n, device=dev),
            image=image.to(dev),
            frame=frame.to(dev),
            coords=coords.to(dev),
            sizes=torch.ones(n, device=dev),
            protected=torch.zeros(n, dtype=torch.bool, device=dev),
            layout=tuple(layout),
        )

    # ------------------------------------------------------------------ basic ops
    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def n_orig(self) -> int:
        """Number of visual rows of the sample before any reduction."""
        return sum(im.n_tokens for im in self.layout)

    def take(self, idx: Tensor) -> VisualTokens:
        """Tokens at positions ``idx`` (a ``[k]`` long tensor into the current tokens)."""
        idx = idx.to(self.embeds.device, torch.long)
        return replace(
            self,
            embeds=self.embeds[idx],
            index=self.index[idx],
            image=self.image[idx],
            frame=self.frame[idx],
            coords=self.coords[idx],
            sizes=self.sizes[idx],
            protected=self.protected[idx],
            scores={k: v[idx] for k, v in self.scores.items()},
            owner=None if self.owner is None else _reindex_owner(self.owner, idx, len(self)),
            encoder=None if self.encoder is None else self.encoder[idx],
        )

    def sorted(self) -> VisualTokens:
        """Tokens re-sorted by original index (the order the LLM sees them)."""
        order = torch.argsort(self.index, stable=True)
        if torch.equal(order, torch.arange(len(self), device=order.device)):
            return self
        return self.take(order)

    @staticmethod
    def cat(parts: Sequence[VisualTokens]) -> VisualTokens:
        """Concatenate token sets of the SAME sample (e.g. per-scope results)."""
        if not parts:
            raise ValueError("VisualTokens.cat needs at least one part")
        first = parts[0]
        keys = set(first.scores)
        if any(set(p.scores) != keys for p in parts):
            raise ValueError("cannot concatenate VisualTokens with different score names")
        owner = None
        if any(p.owner is not None for p in parts):
            owner = torch.full((first.n_orig,), -1, dtype=torch.long, device=first.embeds.device)
            offset = 0
            for p in parts:
                o = p.owner_map()
                covered = o >= 0
                if bool((owner[covered] >= 0).any()):
                    raise ValueError("VisualTokens.cat: the parts cover the same original unit twice")
                owner[covered] = o[covered] + offset
                offset += len(p)
        return replace(
            first,
            embeds=torch.cat([p.embeds for p in parts]),
            index=torch.cat([p.index for p in parts]),
            image=torch.cat([p.image for p in parts]),
            frame=torch.cat([p.frame for p in parts]),
            coords=torch.cat([p.coords for p in parts]),
            sizes=torch.cat([p.sizes for p in parts]),
            protected=torch.cat([p.protected for p in parts]),
            scores={k: torch.cat([p.scores[k] for p in parts]) for k in keys},
            owner=owner,
            encoder=torch.cat([p.encoder for p in parts]) if all(p.encoder is not None for p in parts) else None,
        )

    def merge(self, assign: Tensor, embeds: Tensor, rep: Tensor, sizes: Tensor | None = None) -> VisualTokens:
        """Group the current tokens into ``K`` new ones (pooling, merging, up/down-sampling).

        Args:
            assign: ``[N]`` long, the output token each current token goes into (``-1``: dropped).
            embeds: ``[K, D]`` features of the outputs.
            rep: ``[K]`` long, position (into the current tokens) of each output's representative: the
                output takes its ORIGINAL index, image, frame and coordinates, i.e. its position.
            sizes: ``[K]`` original units each output stands for; default: the summed sizes of its members.

        Returns:
            ``K`` tokens in the given order (call :meth:`sorted` for the LLM order). ``protected`` is set
            when any member is protected; ``scores`` are size-weighted means of the members (the
            representative's score for an output without members); sources are tracked in ``owner``.
        """
        n, k = len(self), embeds.shape[0]
        dev = self.embeds.device
        assign = assign.to(dev, torch.long)
        rep = rep.to(dev, torch.long)
        if assign.shape != (n,):
            raise ValueError(f"merge: assign must have shape ({n},), got {tuple(assign.shape)}")
        if rep.shape != (k,):
            raise ValueError(f"merge: rep must have shape ({k},) (one per output embedding), got {tuple(rep.shape)}")
        if embeds.ndim != 2 or (n and embeds.shape[1] != self.embeds.shape[1]):
            raise ValueError(f"merge: embeds must be [K, {self.embeds.shape[1]}], got {tuple(embeds.shape)}")
        if n and (bool((assign < -1).any()) or bool((assign >= k).any())):
            raise ValueError(
                f"merge: assign values must lie in [-1, {k}), got range [{int(assign.min())}, {int(assign.max())}]"
            )
        if k and (bool((rep < 0).any()) or bool((rep >= n).any())):
            raise ValueError(f"merge: rep values must lie in [0, {n}), got range [{int(rep.min())}, {int(rep.max())}]")
        member = assign >= 0
        dst = assign[member]
        w = self.sizes[member].float()
        mass = torch.zeros(k, device=dev).index_add_(0, dst, w)
        if sizes is None:
            sizes = mass.to(self.sizes.dtype)
        elif sizes.shape != (k,):
            raise ValueError(f"merge: sizes must have shape ({k},), got {tuple(sizes.shape)}")
        protected = torch.zeros(k, dtype=torch.bool, device=dev)
        protected[dst[self.protected[member]]] = True
        scores = {}
        for name, val in self.scores.items():
            v = val.float()
            num = torch.zeros((k, *v.shape[1:]), device=dev).index_add_(
                0, dst, v[member] * w.view(-1, *[1] * (v.ndim - 1))
            )
            den = mass.view(-1, *[1] * (v.ndim - 1))
            scores[name] = torch.where(den > 0, num / den.clamp_min(1e-12), v[rep]).to(val.dtype)
        o = self.owner_map()
        owner = torch.cat([assign, assign.new_full((1,), -1)])[torch.where(o >= 0, o, n)]
        return replace(
            self,
            embeds=embeds.to(self.embeds.dtype),
            index=self.index[rep],
            image=self.image[rep],
            frame=self.frame[rep],
            coords=self.coords[rep],
            sizes=sizes.to(dev),
            protected=protected,
            scores=scores,
            owner=owner,
            encoder=None if self.encoder is None else self.encoder[rep],
        )

    def owner_map(self) -> Tensor:
        """``[N_orig]`` long: the current token covering each original unit, ``-1`` where dropped."""
        if self.owner is not None:
            return self.owner
        o = torch.full((self.n_orig,), -1, dtype=torch.long, device=self.embeds.device)
        o[self.index] = torch.arange(len(self), device=o.device)
        return o

    def source_matrix(self) -> Tensor:
        """``[N, N_orig]`` bool: which original units each token covers (dense; for small inputs and overlays)."""
        o = self.owner_map()
        m = torch.zeros(len(self), self.n_orig, dtype=torch.bool, device=self.embeds.device)
        covered = (o >= 0).nonzero().flatten()
        m[o[covered], covered] = True
        return m

    def units(self, scope: str) -> Iterator[tuple[tuple[int, ...], Tensor]]:
        """Yield ``(key, positions)`` for each budget unit of ``scope``, in original order.

        ``"image"``: one unit per image/video; ``"frame"``: one per (image, frame/tile);
        ``"sample"``: one unit with every token.
        """
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if len(self) == 0:
            return
        if scope == "sample":
            yield (), torch.arange(len(self), device=self.embeds.device)
            return
        key = self.image if scope == "image" else self.image * (self.frame.max() + 1) + self.frame
        for k in torch.unique(key, sorted=True).tolist():
            pos = torch.nonzero(key == k, as_tuple=False).flatten()
            if scope == "image":
                yield (int(k),), pos
            else:
                nf = int(self.frame.max()) + 1
                yield (int(k) // nf, int(k) % nf), pos


def _reindex_owner(owner: Tensor, idx: Tensor, n: int) -> Tensor:
    """Owner map after keeping the tokens at positions ``idx`` (of ``n``): others become ``-1``."""
    inv = torch.full((n + 1,), -1, dtype=torch.long, device=owner.device)  # slot n: dropped units (also when n = 0)
    inv[idx.to(owner.device)] = torch.arange(len(idx), device=owner.device)
    return inv[torch.where(owner >= 0, owner, n)]


def _grid_coords(im: ImageLayout) -> tuple[Tensor, Tensor]:
    """Frame id and (t, h, w) coordinates of every row of one image."""
    frames, coords = [], []
    for g, (t, h, w) in enumerate(im.grids):
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        coords.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], dim=1))
        frames.append(torch.full((t * h * w,), g, dtype=torch.long))
    co = torch.cat(coords) if coords else torch.zeros(0, 3, dtype=torch.long)
    fr = torch.cat(frames) if frames else torch.zeros(0, dtype=torch.long)
    extra = im.n_tokens - co.shape[0]
    if extra < 0:
        raise ValueError(f"image grids cover {co.shape[0]} rows but the image has {im.n_tokens}")
    if extra:
        # Rows beyond the grids (e.g. newline tokens) belong to the last group.
        last = co[-1:] if co.shape[0] else torch.zeros(1, 3, dtype=torch.long)
        co = torch.cat([co, last.expand(extra, 3)])
        fr = torch.cat([fr, torch.full((extra,), max(len(im.grids) - 1, 0), dtype=torch.long)])
    return fr, co


@dataclass
class TowerTokens:
    """Tokens inside a vision encoder, batched over its sequences (images, tiles or frames): what
    ``vision``-stage operators read and return.

    One row per token UNIT (a patch on CLIP/SigLIP/timm; 2x2 patches on Qwen2-VL and InternVL, whose
    ``x`` rows then hold the unit's patches side by side, ``[k * C]``). Special tokens (CLS, distillation)
    live in ``prefix`` and are never dropped. Sequences may keep different numbers of units: rows beyond
    a sequence's count are padding (``valid`` False).

    Attributes:
        x: ``[S, U, k*C]`` unit features (the hidden states between blocks).
        prefix: ``[S, P, C]`` special tokens (``P`` = 0, 1 for CLS, 2 for CLS + distillation).
        valid: ``[S, U]`` bool, real (non-padding) rows.
        index: ``[S, U]`` long, ORIGINAL unit index (raster over ``grid``) of each row's representative.
        sizes: ``[S, U]`` float, original units each row stands for.
        owner: ``[S, U0]`` long, the row covering each ORIGINAL unit (``-1``: dropped).
        protected: ``[S, U]`` bool, rows later stages must not drop.
        scores: named signals ``name -> [S, U]`` (attention rows summed per unit, value norms, ...).
        grid: ``(h, w)`` unit grid of each sequence (original).
        keys: ``[S, U, d]`` the block's keys averaged over heads and summed per unit (ToMe's metric), set
            at the mid-block point, else ``None``.
        prefix_keys: ``[S, P, d]`` the same for the prefix tokens.
        block: the encoder block the operator is called at.
        point: ``"mid"`` (after the attention residual, before the MLP) or ``"post"`` (after the block).
        size_bias: later blocks add ``log(size)`` to the attention logits of each key (proportional
            attention, ToMe); set by the operator that asks for it.
    """

    x: Tensor
    prefix: Tensor
    valid: Tensor
    index: Tensor
    sizes: Tensor
    owner: Tensor
    protected: Tensor
    grid: tuple[tuple[int, int], ...]
    scores: dict[str, Tensor] = field(default_factory=dict)
    keys: Tensor | None = None
    prefix_keys: Tensor | None = None
    block: int = 0
    point: str = "post"
    size_bias: bool = False

    @property
    def counts(self) -> Tensor:
        """``[S]`` long, real rows per sequence."""
        return self.valid.sum(1)

    def take(self, idx: Tensor, valid: Tensor | None = None) -> TowerTokens:
        """Rows ``idx`` ``[S, K]`` of every sequence (``valid`` ``[S, K]`` marks real picks; default all)."""
        s, k = idx.shape
        dev = idx.device
        valid = torch.ones(s, k, dtype=torch.bool, device=dev) if valid is None else valid
        n = self.x.shape[1]
        target = torch.where(valid, idx, n)  # invalid picks land in a dummy column
        assign = torch.full((s, n + 1), -1, dtype=torch.long, device=dev)
        assign.scatter_(1, target, torch.arange(k, device=dev).expand(s, k).contiguous())
        assign = torch.where(self.valid, assign[:, :n], -1)
        return self._reassign(assign, rep=torch.where(valid, idx, 0), valid=valid)

    def _reassign(self, assign: Tensor, rep: Tensor, valid: Tensor, x: Tensor | None = None) -> TowerTokens:
        """New rows: row ``j`` of sequence ``s`` takes the position of old row ``rep[s, j]``; old row ``i``
        goes into new row ``assign[s, i]`` (``-1``: dropped); ``x`` defaults to the representative's."""

        def gather(t: Tensor) -> Tensor:
            return torch.gather(t, 1, rep.view(*rep.shape, *[1] * (t.ndim - 2)).expand(*rep.shape, *t.shape[2:]))

        member = assign >= 0
        slot = assign.clamp_min(0)
        sizes = torch.zeros(rep.shape, dtype=self.sizes.dtype, device=rep.device)
        sizes.scatter_add_(1, slot, torch.where(member, self.sizes, 0).to(sizes.dtype))
        protected = torch.zeros(rep.shape, dtype=torch.bool, device=rep.device)
        protected.scatter_reduce_(1, slot, self.protected & member, reduce="amax")
        owner = torch.where(self.owner >= 0, torch.gather(assign, 1, self.owner.clamp_min(0)), -1)
        new_x = gather(self.x) if x is None else x
        if not bool(valid.all()):  # padding rows are zeros (cheap to skip when every row is real)
            new_x = new_x * valid.unsqueeze(-1).to(new_x.dtype)
        return replace(
            self,
            x=new_x,
            valid=valid,
            index=torch.where(valid, gather(self.index), -1),
            sizes=torch.where(valid, sizes, 0),
            owner=owner,
            protected=protected & valid,
            scores={n: gather(v) for n, v in self.scores.items()},
            keys=None if self.keys is None else gather(self.keys),
        )

    def merge(self, assign: Tensor, x: Tensor, rep: Tensor, valid: Tensor | None = None) -> TowerTokens:
        """Group rows: old row ``i`` of sequence ``s`` goes into new row ``assign[s, i]`` (``-1``: dropped).

        Args:
            assign: ``[S, U]`` long.
            x: ``[S, K, k*C]`` features of the new rows.
            rep: ``[S, K]`` long, old row whose ORIGINAL position (``index``) each new row takes.
            valid: ``[S, K]`` bool, real new rows (default all).

        Sizes are the summed sizes of the members; scores are the representative's.
        """
        s, k = rep.shape
        valid = torch.ones(s, k, dtype=torch.bool, device=rep.device) if valid is None else valid
        assign = torch.where(self.valid, assign, -1)
        return self._reassign(assign, rep=torch.where(valid, rep, 0), valid=valid, x=x)
