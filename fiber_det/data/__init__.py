"""Data side of fiber_det: tokenization, positive maps and prompts (spec §7)."""
from .prompts import build_detection_prompt, build_label_to_tokens, clean_name
from .tokenization import (
    build_tokenizer,
    create_positive_map,
    label_tokens_to_positive_map,
    positive_map_from_caption,
    positive_map_to_label_tokens,
    tokenize_captions,
)
from . import datasets  # noqa: F401,E402  (registers the built-in datasets)

__all__ = [
    "build_detection_prompt",
    "build_label_to_tokens",
    "build_tokenizer",
    "clean_name",
    "create_positive_map",
    "label_tokens_to_positive_map",
    "positive_map_from_caption",
    "positive_map_to_label_tokens",
    "tokenize_captions",
]
