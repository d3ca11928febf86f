"""Tiny random-weight models for tests, the CLI and the demo — built locally, no downloads.

Every factory returns ``(model, processor)`` with a word-level tokenizer and a chat template, so the
whole ``processor(...) -> model.generate(...) -> processor.decode(...)`` path runs offline in seconds.
"""

from __future__ import annotations

import torch

__all__ = ["CHAT_TEMPLATE", "VOCAB_WORDS", "build_word_tokenizer", "tiny_llava"]

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
    "USER", ":", "ASSISTANT", "?", ".", ",",
    "what", "which", "is", "the", "of", "colour", "color", "shape", "how", "many", "are", "there", "in",
    "image", "picture", "a", "an", "any", "where", "on", "side", "this", "describe", "object", "objects",
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink", "gray",
    "circle", "square", "triangle", "star", "cross", "diamond", "circles", "squares", "triangles",
    "stars", "crosses", "diamonds", "shapes",
    "yes", "no", "left", "right", "top", "bottom", "middle", "small", "large", "big",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
]


def build_word_tokenizer(words: list[str] | None = None):
    """A word-level ``PreTrainedTokenizerFast`` (lower-cases, splits on whitespace and punctuation).

    Special tokens: ``<pad>`` (0), ``<unk>``, ``<s>`` (bos), ``</s>`` (eos), ``<image>``, ``<video>``.
    Left padding, as batched generation needs.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(VOCAB_WORDS if words is None else words))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    return fast


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
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 4,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
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
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
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
