"""Word-level tokenizers and chat templates of the tiny models (every word the tests and synthetic tasks use)."""

from __future__ import annotations

__all__ = [
    "CHAT_TEMPLATE",
    "INTERNVL_CHAT_TEMPLATE",
    "QWEN_CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "VOCAB_WORDS",
    "build_word_tokenizer",
    "qwen_tokenizer",
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


def qwen_tokenizer(words: list[str] | None):
    return build_word_tokenizer(
        words,
        special_tokens=QWEN_SPECIAL_TOKENS,
        named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


#: Chat template of the tiny InternVL: an image is ``<IMG_CONTEXT>`` (the processor expands it to
#: ``<img>`` + tokens + ``</img>``), a video ``<video>``.
INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image> ", "<IMG_CONTEXT> ")
