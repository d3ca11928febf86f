"""QuoTA frame scorers and query decoupling (spec: quota.md §3, steps 1 and 2).

A frame scorer is any callable ``scorer(frames, query, objects) -> Tensor[F]`` with scores in ``[0, 1]``:

* ``frames``: ``[F, H, W, 3]`` uint8 (numpy or torch), ``[F, 3, H, W]`` float in ``[0, 1]``, a list of PIL
  images, or anything with a ``.frames`` attribute holding one of those (a :class:`vtr.video.Clip`);
* ``query``: the question; ``objects``: the decoupled object list, or ``None`` to score against the question.

Built in: :class:`VLMScorer` (renormalised P(yes) of a VLM, one forward per frame), :class:`ClipScorer`
(open_clip image-text cosine) and :func:`constant_scorer` (equal scores). :func:`decouple_query` asks a VLM to
rewrite the question into objects and parses the answer with :func:`vtr.ops.quota.parse_decoupled`.

These are generic Hugging Face / open_clip calls (chat template, processor, forward): nothing model-family
specific.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vtr.ops.quota import decouple_prompt, parse_decoupled

__all__ = ["ClipScorer", "VLMScorer", "constant_scorer", "decouple_query", "to_pil_frames", "vlm_prompt"]


def to_pil_frames(frames: Any) -> list:
    """Frames in any accepted form (see the module docstring) as a list of RGB ``PIL.Image``."""
    from PIL import Image

    frames = getattr(frames, "frames", frames)
    if isinstance(frames, (list, tuple)) and all(isinstance(f, Image.Image) for f in frames):
        return [f.convert("RGB") for f in frames]
    arr = frames
    if isinstance(arr, Tensor):
        arr = arr.detach().cpu()
        if arr.is_floating_point():
            if arr.ndim != 4 or arr.shape[1] != 3:
                raise ValueError(f"float frames must be [F, 3, H, W] in [0, 1], got shape {tuple(arr.shape)}")
            arr = (arr.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        arr = arr.numpy()
    arr = np.asarray(arr)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"frames must be [F, H, W, 3] uint8, [F, 3, H, W] float or a list of PIL images; got {arr.dtype} "
            f"array of shape {arr.shape}"
        )
    return [Image.fromarray(np.ascontiguousarray(f)) for f in arr]


def constant_scorer(frames: Any, query: str, objects: Sequence[str] | None = None) -> Tensor:
    """Equal scores for every frame: QuoTA then splits the budget uniformly (an ablation, and the identity)."""
    return torch.ones(len(to_pil_frames(frames)))


def vlm_prompt(query: str, objects: Sequence[str] | None, answer: str = "letter") -> str:
    """The per-frame question of the ``vlm`` scorer (spec §3, step 2)."""
    if answer not in ("letter", "word"):
        raise ValueError(f"answer must be 'letter' or 'word', got {answer!r}")
    tail = "A. yes B. no. Reply with the letter only." if answer == "letter" else "Answer yes or no."
    if objects:
        return f"Does this frame show any of these objects: {', '.join(objects)}? {tail}"
    return f"{query.strip()} Does this frame contain information that helps answer the question? {tail}"


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _to_model(inputs, model) -> dict[str, Any]:
    param = next(model.parameters())
    out = {}
    for k, v in dict(inputs).items():
        if isinstance(v, Tensor):
            v = v.to(param.device)
            if v.is_floating_point():
                v = v.to(param.dtype)
        out[k] = v
    return out


@dataclass
class VLMScorer:
    """``s_t`` from a VLM's answer to "does this frame show ...?": one forward per frame, no generation.

    The yes/no answer ids are the tokenizer's ids of ``"A"``/``"B"`` (``answer="letter"``) or ``"yes"``/``"no"``
    (``"word"``); each must be a single known token. ``renormalize=True`` gives ``P(yes) / (P(yes) + P(no))``
    (computed as a sigmoid of the logit difference, so it never divides by zero), ``False`` the raw ``P(yes)``
    over the vocabulary (fp32 softmax). Frames are batched with left padding and read at the last position.
    """

    model: Any
    processor: Any
    answer: str = "letter"
    renormalize: bool = True
    batch_size: int = 16

    def answer_ids(self) -> tuple[int, int]:
        """Token ids of the yes and no answers; ``ValueError`` unless each is one known, distinct token."""
        tok = _tokenizer(self.processor)
        words = ("A", "B") if self.answer == "letter" else ("yes", "no")
        other = "vlm_answer='word' (yes/no)" if self.answer == "letter" else "vlm_answer='letter' (A/B)"
        hint = f"; try QuoTA {other} or scorer='clip'"
        ids = []
        for word in words:
            enc = tok.encode(word, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(
                    f"the tokenizer splits the answer {word!r} into {len(enc)} tokens; need exactly one{hint}"
                )
            if tok.unk_token_id is not None and enc[0] == tok.unk_token_id:
                raise ValueError(
                    f"the tokenizer has no token for the answer {word!r} (it maps to the unknown token){hint}"
                )
            ids.append(int(enc[0]))
        if ids[0] == ids[1]:
            raise ValueError(f"the answers {words} map to the same token id {ids[0]}")
        return ids[0], ids[1]

    def __call__(self, frames: Any, query: str, objects: Sequence[str] | None = None) -> Tensor:
        images = to_pil_frames(frames)
        yes, no = self.answer_ids()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
        messages[0]["content"][1]["text"] = vlm_prompt(query, objects, self.answer)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        scores = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            inputs = self.processor(
                images=chunk, text=[text] * len(chunk), padding=True, padding_side="left", return_tensors="pt"
            )
            mask = inputs.get("attention_mask")
            if mask is not None and not bool(mask[:, -1].all()):
                raise ValueError("the scorer's processor did not left-pad the batch: the last position is padding")
            with torch.no_grad():
                logits = self.model(**_to_model(inputs, self.model), use_cache=False, logits_to_keep=1).logits
            last = logits[:, -1].float()
            if self.renormalize:
                scores.append(torch.sigmoid(last[:, yes] - last[:, no]))
            else:
                scores.append(torch.softmax(last, dim=-1)[:, yes])
        return torch.cat(scores).cpu() if scores else torch.zeros(0)


@functools.lru_cache(maxsize=4)
def _load_clip(model_name: str, pretrained: str | None, device: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


@dataclass
class ClipScorer:
    """``s_t = max(0, max_o cos(image_t, text_o))`` with open_clip; texts ``"a photo of {o}"`` per object, or the
    question (truncated to the text context) without objects.

    ``pretrained`` is an open_clip tag (its weights come from the local open_clip / Hugging Face cache; set
    ``HF_HUB_OFFLINE=1`` to forbid downloads) or a checkpoint path; ``None`` gives random weights (tests).
    The model loads once per ``(model_name, pretrained, device)``.
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    device: str = "cpu"
    batch_size: int = 64

    def __call__(self, frames: Any, query: str, objects: Sequence[str] | None = None) -> Tensor:
        model, preprocess, tokenizer = _load_clip(self.model_name, self.pretrained, self.device)
        texts = [f"a photo of {o}" for o in objects] if objects else [query]
        images = to_pil_frames(frames)
        with torch.no_grad():
            txt = model.encode_text(tokenizer(texts).to(self.device)).float()
            txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            scores = []
            for i in range(0, len(images), self.batch_size):
                batch = torch.stack([preprocess(im) for im in images[i : i + self.batch_size]]).to(self.device)
                img = model.encode_image(batch).float()
                img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                scores.append((img @ txt.T).amax(dim=-1).clamp_min(0.0))
        return torch.cat(scores).cpu() if scores else torch.zeros(0)


def decouple_query(model, processor, question: str, *, max_new_tokens: int = 96) -> list[str] | None:
    """Ask ``model`` (text only, greedy) to rewrite ``question`` into concrete objects; ``None`` means "use the
    question" (the model said no objects are needed, or its answer did not parse).

    ``processor`` is the model's processor or just its tokenizer (text only either way).
    """
    prompt = decouple_prompt(question)
    if hasattr(processor, "tokenizer"):  # a multimodal processor: typed content items
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = _to_model(processor(text=[text], return_tensors="pt"), model)
    else:  # a tokenizer: plain string content
        messages = [{"role": "user", "content": prompt}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = _to_model(processor([text], return_tensors="pt", add_special_tokens=False), model)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = _tokenizer(processor).decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return parse_decoupled(answer)
