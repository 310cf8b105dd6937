"""Category captions: category names -> the caption text and each label's character span.

The text half of the official ``create_queries_and_maps``: names are cleaned, sorted by label,
joined by a separator with no trailing one, and optionally wrapped in a per-class ODinW-style
``CAPTION_PROMPT`` (prefix / name / suffix). Tokens are added by
:class:`fiber_det.data.prompt.PromptBuilder`, which turns such a caption into a
:class:`~fiber_det.data.prompt.Prompt`; training captions are in
:mod:`fiber_det.data.training_prompts`.
"""
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["clean_name", "labelled_names", "category_caption"]

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


def labelled_names(
    names: Union[Mapping[int, str], Sequence[str]], sort_labels: bool = True
) -> List[Tuple[int, str]]:
    """``[(label, raw name)]`` of a ``{label: name}`` mapping (sorted by label unless asked not
    to) or of a list of names (labels 1..N in list order, like a COCO contiguous id map).

    Raises:
        TypeError: a string instead of a collection, a non-int label, a non-string name.
        ValueError: no name at all.
    """
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
        pairs = list(enumerate(names, start=1))
    if not pairs:
        raise ValueError("names is empty: a prompt needs at least one category")
    for label, name in pairs:
        if not isinstance(name, str):
            raise TypeError(f"label {label}: name must be a string, got {type(name).__name__}")
    return pairs


def category_caption(
    names: Union[Mapping[int, str], Sequence[str]],
    separator: str = ". ",
    caption_prompt: Optional[Sequence[Mapping[str, str]]] = None,
    sort_labels: bool = True,
) -> Tuple[str, Dict[int, List[List[int]]]]:
    """Builds the category caption and the character span of every label's name.

    Upstream sorts labels by their dataset key before joining (``sort_labels=True``); pass
    ``sort_labels=False`` to keep the mapping's own order (e.g. the per-sample shuffled
    all-categories training caption).

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
        >>> category_caption(["person", "bicycle", "traffic_light"])
        ('person. bicycle. traffic light', {1: [[0, 6]], 2: [[8, 15]], 3: [[17, 30]]})
        >>> category_caption({3: "bow_(weapon)", 1: "cat"})
        ('cat. bow ', {1: [[0, 3]], 3: [[5, 9]]})
        >>> wrapped = [{"prefix": "a ", "name": "fish", "suffix": " underwater"}]
        >>> category_caption(["fish"], caption_prompt=wrapped)
        ('a fish underwater', {1: [[2, 6]]})
    """
    pairs = labelled_names(names, sort_labels)
    if caption_prompt is not None and len(caption_prompt) != len(pairs):
        raise ValueError(
            f"caption_prompt has {len(caption_prompt)} entries but there are {len(pairs)} classes"
        )
    caption = ""
    spans: Dict[int, List[List[int]]] = {}
    for index, (label, raw_name) in enumerate(pairs):
        entry = caption_prompt[index] if caption_prompt is not None else {}
        name = entry.get("name", clean_name(raw_name))
        caption += entry.get("prefix", "")
        start = len(caption)
        caption += name
        spans[label] = [[start, len(caption)]]
        caption += entry.get("suffix", "")
        if index != len(pairs) - 1:
            caption += separator
    return caption, spans
