"""Detection prompts: category names -> caption, per-label character spans and token indices.

Reproduces the official ``create_queries_and_maps`` (spec §6, last paragraph; examples in §7.6):
names are cleaned, joined by a separator with no trailing one, optionally wrapped in a per-class
ODinW-style ``CAPTION_PROMPT`` (prefix / name / suffix), and each label's character span is
resolved to token indices with the same ``char_to_token`` fallbacks as the positive maps.

Training captions (spec §7.2) are in :mod:`fiber_det.data.training_prompts`.
"""
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .tokenization import char_span_to_token_range, check_fast_tokenizer, check_span

__all__ = [
    "clean_name",
    "build_detection_prompt",
    "build_label_to_tokens",
    "chunk_category_prompts",
]

# Greedy on purpose: upstream removes everything from the first "(" to the last ")".
_PARENTHESISED = re.compile(r"\(.*\)")


def clean_name(name: str) -> str:
    """Cleans a dataset category name exactly as upstream does.

    Removes "(...)" substrings, turns "_" into " ", then replaces "  " by " " in ONE pass, so a
    name like LVIS "bow_(weapon)" keeps a trailing space (the model was trained on such prompts).

    Example:
        >>> clean_name("bow_(weapon)")
        'bow '
        >>> clean_name("traffic_light")
        'traffic light'
        >>> clean_name("a___b")
        'a  b'
    """
    name = _PARENTHESISED.sub("", name)
    name = name.replace("_", " ")
    return name.replace("  ", " ")


def _labelled_names(
    names: Union[Mapping[int, str], Sequence[str]], sort_labels: bool
) -> List[Tuple[int, str]]:
    if isinstance(names, str):
        raise TypeError("names must be a mapping {label: name} or a list of names, not a string")
    if isinstance(names, Mapping):
        pairs = list(names.items())
        for label, _ in pairs:
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError(f"labels must be ints, got {label!r} ({type(label).__name__})")
        if sort_labels:
            pairs.sort(key=lambda pair: pair[0])
    else:
        # A list means contiguous labels 1..N in list order, like a COCO contiguous id map.
        pairs = list(enumerate(names, start=1))
    if not pairs:
        raise ValueError("names is empty: a prompt needs at least one category")
    for label, name in pairs:
        if not isinstance(name, str):
            raise TypeError(f"label {label}: name must be a string, got {type(name).__name__}")
    return pairs


def build_detection_prompt(
    names: Union[Mapping[int, str], Sequence[str]],
    separator: str = ". ",
    caption_prompt: Optional[Sequence[Mapping[str, str]]] = None,
    sort_labels: bool = True,
) -> Tuple[str, Dict[int, List[List[int]]]]:
    """Builds the detection caption and the character span of every label's name.

    Upstream sorts labels by their dataset key before joining (``sort_labels=True``); pass
    ``sort_labels=False`` to keep the mapping's own order (e.g. a per-sample shuffled training
    prompt, spec §7.2 (a)).

    With ``caption_prompt`` (one dict per class, in label order), class i contributes
    ``prefix + name + suffix`` and its span covers only the name part, as upstream. Upstream takes
    the entry's ``name`` verbatim (not cleaned) and replaces the class name by it.
    NOTE: upstream requires all three keys; here a missing ``prefix`` / ``suffix`` means "" and a
    missing ``name`` falls back to the cleaned class name.

    Args:
        names: ``{label: raw name}`` (int labels, e.g. contiguous 1..C or LVIS ids) or a list of
            raw names (labels 1..N).
        separator: text between consecutive entries (``DATASETS.SEPARATION_TOKENS``); none is
            added after the last one.
        caption_prompt: optional per-class ``{"prefix", "name", "suffix"}`` dicts.
        sort_labels: sort a mapping by label, as upstream inference does.

    Returns:
        ``(caption, {label: [[start, end)]})``.

    Example:
        >>> build_detection_prompt(["person", "bicycle", "traffic_light"])
        ('person. bicycle. traffic light', {1: [[0, 6]], 2: [[8, 15]], 3: [[17, 30]]})
        >>> build_detection_prompt({3: "bow_(weapon)", 1: "cat"})
        ('cat. bow ', {1: [[0, 3]], 3: [[5, 9]]})
        >>> wrapped = [{"prefix": "a ", "name": "fish", "suffix": " underwater"}]
        >>> build_detection_prompt(["fish"], caption_prompt=wrapped)
        ('a fish underwater', {1: [[2, 6]]})
    """
    pairs = _labelled_names(names, sort_labels)
    if caption_prompt is not None and len(caption_prompt) != len(pairs):
        raise ValueError(
            f"caption_prompt has {len(caption_prompt)} entries but there are {len(pairs)} classes"
        )
    caption = ""
    label_spans: Dict[int, List[List[int]]] = {}
    for index, (label, raw_name) in enumerate(pairs):
        entry = caption_prompt[index] if caption_prompt is not None else {}
        name = entry.get("name", clean_name(raw_name))
        caption += entry.get("prefix", "")
        start = len(caption)
        caption += name
        label_spans[label] = [[start, len(caption)]]
        caption += entry.get("suffix", "")
        if index != len(pairs) - 1:
            caption += separator
    return caption, label_spans


def build_label_to_tokens(
    tokenizer, caption: str, label_spans: Mapping[int, Sequence[Sequence[int]]]
) -> Dict[int, List[int]]:
    """Resolves every label's character spans to token indices of the (untruncated) caption.

    Upstream tokenises the prompt without truncation here (the model truncates at 256; chunking
    keeps prompts short, spec §6), with special tokens, so index 0 is ``<s>``. The result is what
    the post-processor uses to average token probabilities into label scores.

    Args:
        tokenizer: a fast HF tokenizer.
        caption: the prompt, e.g. from :func:`build_detection_prompt`.
        label_spans: ``{label: [[start, end), ...]}``.

    Returns:
        ``{label: sorted token indices}`` in the order of ``label_spans``.

    Raises:
        ValueError: slow tokenizer, a span outside the caption, or a label whose spans resolve to
            no token at all (upstream would silently never score that label).
    """
    check_fast_tokenizer(tokenizer)
    tokenized = tokenizer(caption)
    label_to_tokens: Dict[int, List[int]] = {}
    for label, spans in label_spans.items():
        tokens = set()
        for span in spans:
            try:
                start, end = check_span(span, caption)
            except ValueError as e:
                raise ValueError(f"label {label}: {e}") from e
            token_range = char_span_to_token_range(tokenized, start, end)
            if token_range is not None:
                tokens.update(range(token_range[0], token_range[1] + 1))
        if not tokens:
            raise ValueError(
                f"label {label}: spans {list(spans)} resolve to no token in caption {caption!r}"
            )
        label_to_tokens[label] = sorted(tokens)
    return label_to_tokens


def _prompt_length(tokenizer, caption: str) -> int:
    return len(tokenizer(caption)["input_ids"])


def chunk_category_prompts(
    names: Union[Mapping[int, str], Sequence[str]],
    tokenizer,
    chunk_size: int = 0,
    max_tokens: int = 256,
    separator: str = ". ",
    caption_prompt: Optional[Sequence[Mapping[str, str]]] = None,
) -> List[dict]:
    """Splits a vocabulary into detection prompts that each fit in ``max_tokens`` tokens.

    With ``chunk_size > 0`` labels (sorted) are cut into consecutive blocks of that many, as the
    official LVIS evaluation does (40: 1203 names -> 31 prompts); a block that still does not fit
    is halved until it does. With ``chunk_size == 0`` as few prompts as possible are built by
    filling each one greedily. Every label lands in exactly one prompt.

    Args:
        names: ``{label: raw name}`` or a list (labels 1..N).
        tokenizer: fast HF tokenizer; lengths include the special tokens.
        chunk_size: labels per prompt, or 0 for greedy packing.
        max_tokens: token budget of one prompt (MODEL.FIBER.TEXT.MAX_QUERY_LEN).
        separator, caption_prompt: as in :func:`build_detection_prompt` (caption_prompt in label order).

    Returns:
        A list of ``{"caption", "label_spans", "label_names"}`` dicts (labels keep their global
        values), ready to be an input's ``prompts`` entry.

    Raises:
        ValueError: a single name alone exceeds ``max_tokens``.
    """
    pairs = _labelled_names(names, sort_labels=True)
    prompts_of = {}
    if caption_prompt is not None:
        if len(caption_prompt) != len(pairs):
            raise ValueError(f"caption_prompt has {len(caption_prompt)} entries but there are {len(pairs)} classes")
        prompts_of = {label: entry for (label, _), entry in zip(pairs, caption_prompt)}

    def build(block):
        cp = [prompts_of[label] for label, _ in block] if prompts_of else None
        caption, spans = build_detection_prompt(dict(block), separator, cp, sort_labels=True)
        return {"caption": caption, "label_spans": spans, "label_names": {label: n for label, n in block}}

    def fits(block):
        return _prompt_length(tokenizer, build(block)["caption"]) <= max_tokens

    def split_until_fit(block):
        if fits(block):
            return [block]
        if len(block) == 1:
            raise ValueError(f"category {block[0][1]!r} (label {block[0][0]}) alone exceeds {max_tokens} tokens")
        half = len(block) // 2
        return split_until_fit(block[:half]) + split_until_fit(block[half:])

    if chunk_size > 0:
        blocks = [pairs[i:i + chunk_size] for i in range(0, len(pairs), chunk_size)]
    else:
        # Greedy packing on per-name token counts; a separator's trailing space merges into the
        # next word's first token, so only its stripped part is counted. Every block is checked
        # on its real caption below (and split if the estimate was short).
        blocks, current, used = [], [], 2
        for label, name in pairs:
            piece = build([(label, name)])["caption"] + separator.rstrip()
            cost = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
            if current and used + cost > max_tokens:
                blocks.append(current)
                current, used = [], 2
            current.append((label, name))
            used += cost
        blocks.append(current)
    return [build(b) for block in blocks for b in split_until_fit(block)]


# ---------------------------------------------------------------------------------------------
