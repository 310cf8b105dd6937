"""Data side of fiber_det: tokenizers, captions, the Prompt type, mappers and loaders."""
from .captions import category_caption, clean_name
from .prompt import Prompt, PromptBuilder, collate_prompts
from .tokenization import build_tokenizer, create_positive_map
from . import datasets  # noqa: F401,E402  (registers the built-in datasets)

__all__ = [
    "Prompt",
    "PromptBuilder",
    "build_tokenizer",
    "category_caption",
    "clean_name",
    "collate_prompts",
    "create_positive_map",
]
