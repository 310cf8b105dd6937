"""Training captions for detection and grounding samples, as the official datasets draw them.

(a) :func:`all_categories_prompt`: every category, shuffled per sample (COCO, ODinW);
(b) :func:`sampled_negatives_prompt`: positives that fit the token budget plus sampled negatives
    (LVIS, Objects365), with :func:`check_for_positive_overflow` and :func:`negative_count`;
(c) :func:`grounding_prompt`: the caption verbatim (Flickr30k, GoldG, RefCOCO).
Each returns a :class:`TrainingCaption` (the text, its labelled spans and the label of every kept
box), which :meth:`fiber_det.data.prompt.PromptBuilder.build` turns into the sample's
:class:`~fiber_det.data.prompt.Prompt` with ``training=True``. All take an explicit ``rng``
(``random.Random`` or ``np.random.Generator``) so that a sample's caption is reproducible.
"""
import random
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .captions import category_caption, clean_name, labelled_names
from .tokenization import check_span

__all__ = [
    "TrainingCaption",
    "all_categories_prompt",
    "name_token_counts",
    "check_for_positive_overflow",
    "negative_count",
    "sampled_negatives_prompt",
    "grounding_prompt",
]

Rng = Union[random.Random, np.random.Generator]


class TrainingCaption(NamedTuple):
    """A training caption and the boxes it keeps.

    Attributes:
        caption: the text fed to the model.
        spans: ``{label: [[start, end), ...]}`` of every label of the caption, in caption order:
            the categories it names, or for a grounding caption one label per distinct span list
            of its boxes (1, 2, ... in order of first appearance).
        box_labels: the label of every kept box, aligned with ``kept``.
        kept: indices of the input boxes that stay, in input order; the others belong to a
            category that the caption does not name.
    """

    caption: str
    spans: Dict[int, List[List[int]]]
    box_labels: List[int]
    kept: List[int]


def _check_rng(rng) -> None:
    if not isinstance(rng, (random.Random, np.random.Generator)):
        raise TypeError(f"rng must be a random.Random or np.random.Generator, got {type(rng).__name__}")


def _randint(rng: Rng, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both ends included)."""
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    return int(rng.integers(low, high + 1))


def _shuffled(rng: Rng, items: Sequence) -> list:
    items = list(items)
    if isinstance(rng, random.Random):
        rng.shuffle(items)
        return items
    return [items[i] for i in rng.permutation(len(items))]


def _sample(rng: Rng, items: Sequence, k: int) -> list:
    """``k`` distinct items (without replacement), in draw order."""
    items = list(items)
    if isinstance(rng, random.Random):
        return rng.sample(items, k)
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def _vocabulary(names, box_labels: Sequence[int]) -> Dict[int, str]:
    vocabulary = dict(labelled_names(names))
    for index, label in enumerate(box_labels):
        if label not in vocabulary:
            raise ValueError(f"box {index}: label {label!r} is not a category of the vocabulary")
    return vocabulary


def _caption_for(order, vocabulary, box_labels, separator, caption_prompt=None) -> TrainingCaption:
    caption, spans = category_caption(
        {label: vocabulary[label] for label in order}, separator, caption_prompt, sort_labels=False
    )
    kept = [i for i, label in enumerate(box_labels) if label in spans]
    return TrainingCaption(caption, spans, [box_labels[i] for i in kept], kept)


def all_categories_prompt(
    names: Union[Mapping[int, str], Sequence[str]],
    box_labels: Sequence[int],
    rng: Optional[Rng],
    shuffle: bool = True,
    separator: str = ". ",
    caption_prompt: Optional[Sequence[Mapping[str, str]]] = None,
) -> TrainingCaption:
    """(a) A caption naming every category, in a fresh random order per sample.

    Used for COCO fine-tuning and ODinW. Every box is kept, labelled with its category.

    Args:
        names: ``{label: raw name}`` or a list of raw names (labels 1..N).
        box_labels: the label of every GT box (repeats allowed).
        rng: ``random.Random`` / ``np.random.Generator``; unused (may be None) without shuffle.
        shuffle: shuffle the category order (upstream's ``DISABLE_SHUFFLE`` False); else sorted.
        separator: text between names (no trailing one).
        caption_prompt: per-class prefix/name/suffix dicts in label order (needs shuffle=False).

    Returns:
        A :class:`TrainingCaption` keeping every box.

    Raises:
        ValueError: caption_prompt with shuffle (upstream asserts the same), a box label outside
            the vocabulary.

    Example:
        >>> p = all_categories_prompt(["cat", "dog"], [2, 2, 1], None, shuffle=False)
        >>> p.caption, p.spans, p.box_labels, p.kept
        ('cat. dog', {1: [[0, 3]], 2: [[5, 8]]}, [2, 2, 1], [0, 1, 2])
        >>> all_categories_prompt(["cat", "dog", "cow"], [1], random.Random(0)).caption
        'cat. cow. dog'
    """
    if caption_prompt is not None and shuffle:
        raise ValueError(
            "caption_prompt needs a fixed category order: disable shuffling (DATASETS.PROMPT.SHUFFLE "
            "False), as upstream requires DISABLE_SHUFFLE with CAPTION_PROMPT"
        )
    vocabulary = _vocabulary(names, box_labels)
    order = list(vocabulary)
    if shuffle:
        _check_rng(rng)
        order = _shuffled(rng, order)
    return _caption_for(order, vocabulary, box_labels, separator, caption_prompt)


def name_token_counts(
    names: Union[Mapping[int, str], Sequence[str]], tokenizer, separator: str = ". "
) -> Dict[int, int]:
    """Token count of ``clean_name(name) + separator`` per label (no special tokens), the unit
    of upstream's 254-token budget for sampled-negatives captions; precompute it once per
    vocabulary."""
    return {label: len(tokenizer.tokenize(clean_name(name) + separator))
            for label, name in labelled_names(names)}


def _counter(vocabulary, tokenizer, separator, token_counts):
    cache = dict(token_counts or {})

    def count(label: int) -> int:
        if label not in cache:
            cache[label] = len(tokenizer.tokenize(clean_name(vocabulary[label]) + separator))
        return cache[label]

    return count


def check_for_positive_overflow(
    names: Union[Mapping[int, str], Sequence[str]],
    box_labels: Sequence[int],
    tokenizer,
    rng: Rng,
    max_tokens: int = 254,
    separator: str = ". ",
    token_counts: Optional[Mapping[int, int]] = None,
) -> Tuple[List[int], int]:
    """Sampled-negatives step 1: which positive categories fit in the token budget.

    The distinct box labels are shuffled and walked in that order, adding the token count of
    ``clean_name + separator``; the walk stops at the first label that brings the total over
    ``max_tokens`` (MAX_QUERY_LEN - 2). Boxes of the labels left out are to be dropped.

    Args:
        names: ``{label: raw name}`` or a list (labels 1..N).
        box_labels: label of every GT box.
        tokenizer: HF tokenizer (``tokenize``, no special tokens).
        rng: ``random.Random`` or ``np.random.Generator``.
        max_tokens: the budget (254 officially).
        separator: appended to every name when counting.
        token_counts: optional precomputed :func:`name_token_counts`.

    Returns:
        ``(kept labels in walk order, token count)``. After an overflow the count includes the
        label that did not fit (so it exceeds ``max_tokens`` and no negative fits), as upstream.
    """
    _check_rng(rng)
    vocabulary = _vocabulary(names, box_labels)
    count = _counter(vocabulary, tokenizer, separator, token_counts)
    kept, used = [], 0
    for label in _shuffled(rng, sorted(set(box_labels))):
        used += count(label)
        if used > max_tokens:
            break
        kept.append(label)
    return kept, used


def negative_count(control_prob: Sequence[float], full_negative: int, rng: Rng) -> int:
    """Sampled-negatives step 2: how many negative names to sample.

    ``u`` uniform in [0, 1): u < p0 -> 1; u < p0 + p1 -> 0; u < p0 + p1 + p2 -> ``full_negative``;
    otherwise a uniform count in 1..max(1, full_negative) (the "random count" mode).
    NOTE: the 4th entry is upstream's "drop positives" probability, which its code asserts to be
    0 (so the value 0.2 of the official Objects365 config would raise there); we raise the same
    way. Positives are always all kept.

    Args:
        control_prob: (p_one_negative, p_no_negative, p_full, p_drop_positive).
        full_negative: min(MAX_NEGATIVES, number of categories).
        rng: ``random.Random`` or ``np.random.Generator``.

    Example:
        >>> negative_count([0.0, 0.0, 1.0, 0.0], 85, random.Random(0))
        85
        >>> negative_count([0.0, 0.0, 0.0, 0.0], 85, random.Random(0)) in range(1, 86)
        True
    """
    _check_rng(rng)
    probs = [float(p) for p in control_prob]
    if len(probs) != 4 or min(probs) < 0 or sum(probs[:3]) > 1.0 + 1e-6:
        raise ValueError(
            f"control_prob must be 4 non-negative probabilities with p0 + p1 + p2 <= 1, got {list(control_prob)}"
        )
    if probs[3] != 0:
        raise ValueError(
            f"control_prob[3] (drop positives) must be 0, got {probs[3]}: upstream asserts it and always "
            "keeps every positive"
        )
    u = rng.random()
    if u < probs[0]:
        return 1
    if u < probs[0] + probs[1]:
        return 0
    if u < probs[0] + probs[1] + probs[2]:
        return full_negative
    return _randint(rng, 1, max(1, full_negative))


def _fit(order, positives, vocabulary, box_labels, builder) -> TrainingCaption:
    """Guarantees the ``builder.max_length`` bound that the per-name counts only estimate: a
    name's tokens inside the caption can differ from its standalone ones (BPE merges the leading
    space)."""
    order = list(order)
    while True:
        caption = _caption_for(order, vocabulary, box_labels, builder.separator)
        if builder.fits(caption.caption):
            return caption
        if len(order) == 1:
            raise ValueError(
                f"category {vocabulary[order[0]]!r} (label {order[0]}) alone exceeds {builder.max_length} tokens"
            )
        # Last negative in caption order first; a positive goes (with its boxes) only after all
        # negatives, which is what the overflow check of step 1 does.
        negatives = [label for label in order if label not in positives]
        order.remove(negatives[-1] if negatives else order[-1])


def sampled_negatives_prompt(
    names: Union[Mapping[int, str], Sequence[str]],
    box_labels: Sequence[int],
    builder,
    rng: Rng,
    max_negatives: int = 85,
    control_prob: Sequence[float] = (0.0, 0.0, 1.0, 0.0),
    token_counts: Optional[Mapping[int, int]] = None,
) -> TrainingCaption:
    """(b) The image's categories plus sampled negatives, within the token budget.

    Used for LVIS fine-tuning and Objects365 (upstream's
    ``convert_object_detection_to_grounding_optimized_for_od``):

    1. :func:`check_for_positive_overflow` with budget ``builder.max_length - 2``;
    2. :func:`negative_count` with full_negative = min(max_negatives, #categories);
    3. that many labels drawn without replacement from ALL categories, the image's own labels
       removed, shuffled, then kept in order while the remaining budget (budget - positive
       count - their counts) stays > 0;
    4. positives and negatives shuffled together into one caption; boxes whose label is not in
       it are dropped (reported through ``kept``).

    NOTE: two departures, both for safety: the whole caption is re-measured and trimmed (last
    negative first) if the standalone per-name counts underestimated it, so no caption ever
    exceeds ``builder.max_length`` tokens with special tokens; and where upstream would produce
    an empty caption (no box, no negative drawn) one negative is named, since the model needs
    text.

    Args:
        names: ``{label: raw name}`` or a list (labels 1..N).
        box_labels: label of every GT box.
        builder: the :class:`~fiber_det.data.prompt.PromptBuilder` of the model (its tokenizer,
            ``max_length`` = MODEL.FIBER.TEXT.MAX_QUERY_LEN and separator).
        rng: ``random.Random`` or ``np.random.Generator``.
        max_negatives: DATASETS.PROMPT.MAX_NEGATIVES (upstream RANDOM_SAMPLE_NEG, 85).
        control_prob: DATASETS.PROMPT.CONTROL_PROB, see :func:`negative_count`.
        token_counts: optional precomputed :func:`name_token_counts` (speeds up large vocabularies).

    Returns:
        A :class:`TrainingCaption`.
    """
    _check_rng(rng)
    if max_negatives < 0:
        raise ValueError(f"max_negatives must be >= 0, got {max_negatives}")
    tokenizer, separator = builder.tokenizer, builder.separator
    vocabulary = _vocabulary(names, box_labels)
    count = _counter(vocabulary, tokenizer, separator, token_counts)
    budget = builder.max_length - 2
    positives, used = check_for_positive_overflow(
        vocabulary, box_labels, tokenizer, rng, budget, separator, {k: count(k) for k in set(box_labels)}
    )
    num_negatives = negative_count(control_prob, min(max_negatives, len(vocabulary)), rng)
    present = set(box_labels)
    drawn = [label for label in _sample(rng, list(vocabulary), num_negatives) if label not in present]
    negatives, remaining = [], budget - used
    for label in _shuffled(rng, drawn):
        remaining -= count(label)
        if remaining <= 0:
            break
        negatives.append(label)
    if not positives and not negatives:
        pool = [label for label in vocabulary if label not in present and count(label) < budget]
        if not pool:
            raise ValueError(f"no category name fits in {builder.max_length} tokens beside the image's own")
        negatives = _sample(rng, pool, 1)
    order = _shuffled(rng, positives + negatives)
    return _fit(order, set(positives), vocabulary, box_labels, builder)


def grounding_prompt(caption: str, spans_per_box: Sequence[Sequence[Sequence[int]]]) -> TrainingCaption:
    """(c) A grounding caption, used verbatim (the model reads its first MAX_QUERY_LEN tokens).

    Spans are validated against the caption. Boxes with the same span list share a label (1, 2,
    ... in order of first appearance). A box with no span is kept (its token row stays all
    zero), as upstream.

    Example:
        >>> c = grounding_prompt("a red cat", [[[0, 9]], [[2, 5], [6, 9]], [[0, 9]]])
        >>> c.spans, c.box_labels
        ({1: [[0, 9]], 2: [[2, 5], [6, 9]]}, [1, 2, 1])

    Raises:
        ValueError: empty caption, or a span outside it (the message names the box).
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"grounding caption is empty or not a string: {caption!r}")
    spans: Dict[int, List[List[int]]] = {}
    box_labels = []
    for index, box in enumerate(spans_per_box):
        try:
            checked = [list(check_span(span, caption)) for span in box]
        except (ValueError, TypeError) as e:
            raise ValueError(f"box {index}: bad caption spans {box!r}: {e}") from e
        label = next((k for k, v in spans.items() if v == checked), len(spans) + 1)
        spans.setdefault(label, checked)
        box_labels.append(label)
    return TrainingCaption(caption, spans, box_labels, list(range(len(box_labels))))
