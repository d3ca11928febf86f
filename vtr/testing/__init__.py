"""Tiny random-weight models for tests, the CLI and the demo — built locally, no downloads.

Every factory returns ``(model, processor)`` with a word-level tokenizer and a chat template, so the
whole ``processor(...) -> model.generate(...) -> processor.decode(...)`` path runs offline in seconds.

* :mod:`vtr.testing.tokenizers`: the word-level tokenizer and chat templates;
* :mod:`vtr.testing.builder`: the one builder every factory goes through;
* :mod:`vtr.testing.models`: one factory per supported family.
"""

from vtr.testing.builder import build, text_fields, vision_fields
from vtr.testing.models import (
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)
from vtr.testing.tokenizers import (
    CHAT_TEMPLATE,
    INTERNVL_CHAT_TEMPLATE,
    QWEN_CHAT_TEMPLATE,
    VOCAB_WORDS,
    build_word_tokenizer,
    qwen_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "INTERNVL_CHAT_TEMPLATE",
    "QWEN_CHAT_TEMPLATE",
    "VOCAB_WORDS",
    "build",
    "build_word_tokenizer",
    "qwen_tokenizer",
    "text_fields",
    "tiny_internvl",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_llava_onevision",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "vision_fields",
]
