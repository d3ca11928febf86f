"""Tiny random-weight models for tests, the CLI and the demo — built locally, no downloads.

Every factory returns ``(model, processor)`` with a word-level tokenizer and a chat template, so the
whole ``processor(...) -> model.generate(...) -> processor.decode(...)`` path runs offline in seconds.
"""

from __future__ import annotations

import torch

__all__ = [
    "CHAT_TEMPLATE",
    "VOCAB_WORDS",
    "build_word_tokenizer",
    "tiny_internvl",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_llava_onevision",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
]

#: Plain-text chat template shared by the tiny models: ``USER: <image> question ASSISTANT:``.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'video' %}<video> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]

#: Words of the synthetic visual QA task plus chat scaffolding; unknown words map to ``<unk>``.
VOCAB_WORDS = [
    "USER",
    ":",
    "ASSISTANT",
    "?",
    ".",
    ",",
    "what",
    "which",
    "is",
    "the",
    "of",
    "colour",
    "color",
    "shape",
    "how",
    "many",
    "are",
    "there",
    "in",
    "image",
    "picture",
    "a",
    "an",
    "any",
    "where",
    "on",
    "side",
    "this",
    "describe",
    "object",
    "objects",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "cyan",
    "pink",
    "gray",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "circles",
    "squares",
    "triangles",
    "stars",
    "crosses",
    "diamonds",
    "shapes",
    "yes",
    "no",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "small",
    "large",
    "big",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
]


def build_word_tokenizer(
    words: list[str] | None = None,
    *,
    special_tokens: list[str] | None = None,
    named_tokens: dict[str, str] | None = None,
):
    """A word-level ``PreTrainedTokenizerFast`` (lower-cases, splits on whitespace and punctuation).

    Special tokens: ``<pad>`` (0), ``<unk>``, ``<s>`` (bos), ``</s>`` (eos), ``<image>``, ``<video>``,
    then ``special_tokens`` (extra family markers such as ``<|vision_start|>``, appended in order).
    ``named_tokens`` maps tokenizer attributes to tokens (default ``image_token="<image>"``,
    ``video_token="<video>"``); processors read e.g. ``tokenizer.image_token`` from it.
    Left padding, as batched generation needs.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(VOCAB_WORDS if words is None else words))
    specials = list(dict.fromkeys(SPECIAL_TOKENS + list(special_tokens or [])))
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    named = {"image_token": "<image>", "video_token": "<video>"} if named_tokens is None else dict(named_tokens)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=named,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    extra = [t for t in specials[len(SPECIAL_TOKENS) :] if t not in named.values()]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    return fast


def _text_kwargs(tokenizer, hidden: int, layers: int, *, mlp_ratio: int = 2, max_positions: int = 4096) -> dict:
    """Config fields every tiny decoder shares (4 heads, 2 KV heads, the tokenizer's special ids)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * mlp_ratio,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _finish(model, tokenizer, attn_implementation: str):
    """Common tail of the factories: attention backend, generation config, eval mode."""
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def tiny_llava(
    *,
    image_size: int = 64,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    words: list[str] | None = None,
):
    """A random-weight ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``.

    CLIP-style vision tower with a CLS token (``(image_size / patch_size)**2`` patch tokens per image,
    256 by default, CLS dropped by the ``default`` feature strategy) and a Llama LM. Returns
    ``(model, processor)``; the model is in eval mode, fp32, on the CPU. ``words`` replaces the
    default vocabulary (see :func:`build_word_tokenizer`).
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_word_tokenizer(words)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        **_text_kwargs(tokenizer, text_hidden, text_layers, mlp_ratio=4, max_positions=2048),
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = _finish(LlavaForConditionalGeneration(config), tokenizer, attn_implementation)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------- Qwen2-VL family
QWEN_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

#: Chat template of the tiny Qwen models: every image/video is ``<|vision_start|><|..._pad|><|vision_end|>``.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _qwen_tokenizer(words: list[str] | None):
    return build_word_tokenizer(
        words,
        special_tokens=QWEN_SPECIAL_TOKENS,
        named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _qwen_text_config(tokenizer, text_hidden: int, text_layers: int) -> dict:
    heads = 4
    half = text_hidden // heads // 2  # rotary half-dimension, split over (t, h, w)
    section = [half - 2 * (half // 4), half // 4, half // 4]
    return dict(
        **_text_kwargs(tokenizer, text_hidden, text_layers),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    )


def _qwen_processors(patch_size: int, max_side: int):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    unit = patch_size * 2  # one 2x2 merge unit in pixels
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": (2 * unit) ** 2, "longest_edge": max_side**2},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": (2 * unit) ** 2, "longest_edge": max_side**2 * 8},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        do_sample_frames=False,
    )
    return image_processor, video_processor


def tiny_qwen2_vl(
    *,
    patch_size: int = 4,
    max_side: int = 48,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    words: list[str] | None = None,
):
    """A random-weight ``Qwen2VLForConditionalGeneration`` and a local ``Qwen2VLProcessor``.

    Native-resolution ViT without CLS, 2x2 PatchMerger (one LLM token per ``2*patch_size`` pixels
    squared), M-RoPE LM. Images are resized to multiples of ``2*patch_size`` with at most
    ``max_side**2`` pixels; videos go through ``Qwen2VLVideoProcessor`` (2 frames per temporal step).
    Returns ``(model, processor)`` in eval mode, fp32, on the CPU.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tokenizer = _qwen_tokenizer(words)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=vision_layers,
            embed_dim=vision_hidden,
            hidden_size=text_hidden,
            num_heads=4,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            mlp_ratio=2,
        ),
        text_config=_qwen_text_config(tokenizer, text_hidden, text_layers),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = _finish(Qwen2VLForConditionalGeneration(config), tokenizer, attn_implementation)
    image_processor, video_processor = _qwen_processors(patch_size, max_side)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_qwen2_5_vl(
    *,
    patch_size: int = 4,
    max_side: int = 48,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    window_units: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    words: list[str] | None = None,
):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` and a local ``Qwen2_5_VLProcessor``.

    Like :func:`tiny_qwen2_vl` plus Qwen2.5-VL's window attention: windows of ``window_units`` x
    ``window_units`` merge units in every vision block except the last (full attention).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tokenizer = _qwen_tokenizer(words)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=vision_layers,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_heads=4,
            out_hidden_size=text_hidden,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=window_units * 2 * patch_size,
            fullatt_block_indexes=[vision_layers - 1],
            tokens_per_second=2,
        ),
        text_config=_qwen_text_config(tokenizer, text_hidden, text_layers),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = _finish(Qwen2_5_VLForConditionalGeneration(config), tokenizer, attn_implementation)
    image_processor, video_processor = _qwen_processors(patch_size, max_side)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------- InternVL
#: Chat template of the tiny InternVL: an image is ``<IMG_CONTEXT>`` (the processor expands it to
#: ``<img>`` + tokens + ``</img>``), a video ``<video>``.
INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image> ", "<IMG_CONTEXT> ")


def tiny_internvl(
    *,
    tile_size: int = 32,
    patch_size: int = 4,
    max_tiles: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    words: list[str] | None = None,
):
    """A random-weight ``InternVLForConditionalGeneration`` (InternViT with CLS + Qwen2 LM) and its processor.

    Dynamic tiling by ``GotOcr2ImageProcessor`` (``tile_size`` pixels, up to ``max_tiles`` crops plus a
    thumbnail LAST when an image needs more than one tile); pixel shuffle 0.5 turns each 2x2 block of
    patches into one LLM token: ``(tile_size / patch_size / 2)**2`` tokens per tile (16 by default).
    Each image is ``<img>`` + tokens + ``</img>``; a video becomes one ``<img>...</img>`` per frame.
    """
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        Qwen2Config,
    )

    tokenizer = build_word_tokenizer(
        words,
        special_tokens=["<img>", "</img>", "<IMG_CONTEXT>"],
        named_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "image_token": "<image>",
            "video_token": "<video>",
        },
    )
    per_tile = (tile_size // patch_size // 2) ** 2
    text = Qwen2Config(**_text_kwargs(tokenizer, text_hidden, text_layers))
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
            intermediate_size=vision_hidden * 2,
            image_size=[tile_size, tile_size],
            patch_size=[patch_size, patch_size],
        ),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=per_tile,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = _finish(InternVLForConditionalGeneration(config), tokenizer, attn_implementation)
    image_processor = GotOcr2ImageProcessor(
        size={"height": tile_size, "width": tile_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
    )
    video_processor = InternVLVideoProcessor(size={"height": tile_size, "width": tile_size}, do_sample_frames=False)
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=per_tile,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT
def tiny_llava_next(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    words: list[str] | None = None,
):
    """A random-weight ``LlavaNextForConditionalGeneration`` (CLIP with CLS + Llama) and its processor.

    AnyRes with pinpoints ``{1x2, 2x1, 2x2} * image_size``: every image is a base view of
    ``(image_size / patch_size)**2`` tokens (16 by default) followed by the unpadded tile grid, each
    grid row closed by an ``image_newline`` token. Returns ``(model, processor)`` in eval mode.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = build_word_tokenizer(words)
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(**_text_kwargs(tokenizer, text_hidden, text_layers), tie_word_embeddings=False)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = _finish(LlavaNextForConditionalGeneration(config), tokenizer, attn_implementation)
    with torch.no_grad():  # the newline embedding is zero-initialised: make it a real, distinct row
        model.model.image_newline.normal_()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------- LLaVA-OneVision
def tiny_llava_onevision(
    *,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    vision_aspect_ratio: str = "anyres_max_9",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    words: list[str] | None = None,
):
    """A random-weight ``LlavaOnevisionForConditionalGeneration`` (SigLIP without CLS + Qwen2) and its processor.

    Images: AnyRes with pinpoints ``{1x2, 2x1, 2x2} * image_size``; each is a base view of ``g*g`` tokens
    (``g = image_size / patch_size``, 64 by default, no CLS: ``vision_feature_select_strategy="full"``)
    followed by the unpadded canvas with a newline per row (resized down when it exceeds
    ``vision_aspect_ratio``; ``"anyres_max_1"`` makes 2-tile canvases shrink). Nested image lists
    (several images per prompt) give untiled base views plus one newline each. Videos: every frame is
    pooled 2x2 by the model (``ceil(g/2)**2`` tokens, 16 by default), one newline closes the video; the
    frames of one processor call must have the same count. Returns ``(model, processor)`` in eval mode.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = build_word_tokenizer(words)
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(**_text_kwargs(tokenizer, text_hidden, text_layers), tie_word_embeddings=False)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = _finish(LlavaOnevisionForConditionalGeneration(config), tokenizer, attn_implementation)
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    video_processor = LlavaOnevisionVideoProcessor(
        size={"height": image_size, "width": image_size}, do_sample_frames=False
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
