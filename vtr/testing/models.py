"""Tiny random-weight models of every supported family, with real Hugging Face processors.

Every factory returns ``(model, processor)`` (eval mode, fp32, CPU) built by :func:`~vtr.testing.builder.build`
from a word-level tokenizer and small configs; ``words`` replaces the default vocabulary.
"""

from __future__ import annotations

from vtr.testing.builder import build, text_fields, vision_fields
from vtr.testing.tokenizers import (
    CHAT_TEMPLATE,
    INTERNVL_CHAT_TEMPLATE,
    QWEN_CHAT_TEMPLATE,
    build_word_tokenizer,
    qwen_tokenizer,
)

__all__ = ["tiny_internvl", "tiny_llava", "tiny_llava_next", "tiny_llava_onevision", "tiny_qwen2_5_vl", "tiny_qwen2_vl"]


def _anyres_pinpoints(s: int) -> list[list[int]]:
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


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
    256 by default, CLS dropped by the ``default`` feature strategy) and a Llama LM.
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
        **vision_fields(vision_hidden, vision_layers, image_size, patch_size), projection_dim=vision_hidden
    )
    vision.intermediate_size = vision_hidden * 4
    text = LlamaConfig(
        **text_fields(tokenizer, text_hidden, text_layers, mlp_ratio=4, max_positions=2048), tie_word_embeddings=False
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
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return build(
        LlavaForConditionalGeneration, config, tokenizer, processor, seed=seed, attn_implementation=attn_implementation
    )


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
    grid row closed by an ``image_newline`` token.
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
    pinpoints = _anyres_pinpoints(image_size)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            **vision_fields(vision_hidden, vision_layers, image_size, patch_size), projection_dim=vision_hidden
        ),
        text_config=LlamaConfig(**text_fields(tokenizer, text_hidden, text_layers), tie_word_embeddings=False),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=False,
    )
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )

    def init(model) -> None:  # the newline embedding is zero-initialised: make it a real, distinct row
        model.model.image_newline.normal_()

    return build(
        LlavaNextForConditionalGeneration,
        config,
        tokenizer,
        processor,
        seed=seed,
        attn_implementation=attn_implementation,
        init=init,
    )


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
    frames of one processor call must have the same count.
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
    pinpoints = _anyres_pinpoints(image_size)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **vision_fields(vision_hidden, vision_layers, image_size, patch_size), vision_use_head=False
        ),
        text_config=Qwen2Config(**text_fields(tokenizer, text_hidden, text_layers), tie_word_embeddings=False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=False,
    )
    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size, do_sample_frames=False),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        chat_template=CHAT_TEMPLATE,
    )
    return build(
        LlavaOnevisionForConditionalGeneration,
        config,
        tokenizer,
        processor,
        seed=seed,
        attn_implementation=attn_implementation,
    )


def _qwen_text(tokenizer, hidden: int, layers: int) -> dict:
    half = hidden // 4 // 2  # rotary half-dimension (4 heads), split over (t, h, w)
    section = [half - 2 * (half // 4), half // 4, half // 4]
    return dict(
        **text_fields(tokenizer, hidden, layers),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    )


def _qwen_processor(processor_cls, tokenizer, patch_size: int, max_side: int):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    unit = patch_size * 2  # one 2x2 merge unit in pixels
    common = dict(patch_size=patch_size, temporal_patch_size=2, merge_size=2)
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": (2 * unit) ** 2, "longest_edge": max_side**2}, **common
        ),
        video_processor=Qwen2VLVideoProcessor(
            size={"shortest_edge": (2 * unit) ** 2, "longest_edge": max_side**2 * 8}, do_sample_frames=False, **common
        ),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _tiny_qwen(
    config_cls,
    model_cls,
    processor_cls,
    vision: dict,
    *,
    patch_size,
    max_side,
    text_hidden,
    text_layers,
    seed,
    attn_implementation,
    words,
):
    """The part both Qwen factories share: tokenizer, M-RoPE text config, processors, build."""
    tokenizer = qwen_tokenizer(words)
    config = config_cls(
        vision_config=dict(vision, num_heads=4, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2),
        text_config=_qwen_text(tokenizer, text_hidden, text_layers),
        **_qwen_ids(tokenizer),
    )
    processor = _qwen_processor(processor_cls, tokenizer, patch_size, max_side)
    return build(model_cls, config, tokenizer, processor, seed=seed, attn_implementation=attn_implementation)


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
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = dict(depth=vision_layers, embed_dim=vision_hidden, hidden_size=text_hidden, mlp_ratio=2)
    return _tiny_qwen(
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        vision,
        patch_size=patch_size,
        max_side=max_side,
        text_hidden=text_hidden,
        text_layers=text_layers,
        seed=seed,
        attn_implementation=attn_implementation,
        words=words,
    )


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

    vision = dict(
        depth=vision_layers,
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        out_hidden_size=text_hidden,
        window_size=window_units * 2 * patch_size,
        fullatt_block_indexes=[vision_layers - 1],
        tokens_per_second=2,
    )
    return _tiny_qwen(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        vision,
        patch_size=patch_size,
        max_side=max_side,
        text_hidden=text_hidden,
        text_layers=text_layers,
        seed=seed,
        attn_implementation=attn_implementation,
        words=words,
    )


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
    config = InternVLConfig(
        vision_config=vision_fields(vision_hidden, vision_layers, [tile_size, tile_size], [patch_size, patch_size]),
        text_config=Qwen2Config(**text_fields(tokenizer, text_hidden, text_layers)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=per_tile,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    size = {"height": tile_size, "width": tile_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=max_tiles),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size, do_sample_frames=False),
        image_seq_length=per_tile,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return build(
        InternVLForConditionalGeneration,
        config,
        tokenizer,
        processor,
        seed=seed,
        attn_implementation=attn_implementation,
    )
