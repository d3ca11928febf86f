"""``VisualTokens``: the per-sample data that flows between operators.

Shapes use ``N`` for the current number of tokens of one sample and ``D`` for the feature size.
Everything is per sample; a batch is a list of ``VisualTokens`` (counts may differ per sample).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["SCOPES", "ImageLayout", "VisualTokens"]

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
        sources: ``[N, N_orig]`` bool (original units covered by each token) or ``None`` for the
            identity (each token covers exactly its ``index``); materialised only by merging operators.
        layout: per-image static layout, shared by all stages.
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
    sources: Tensor | None = None

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
            sources=None if self.sources is None else self.sources[idx],
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
        any_src = any(p.sources is not None for p in parts)
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
            sources=torch.cat([p.source_matrix() for p in parts]) if any_src else None,
        )

    def source_matrix(self) -> Tensor:
        """``[N, N_orig]`` bool: which original units each token covers."""
        if self.sources is not None:
            return self.sources
        m = torch.zeros(len(self), self.n_orig, dtype=torch.bool, device=self.embeds.device)
        m[torch.arange(len(self), device=m.device), self.index] = True
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
