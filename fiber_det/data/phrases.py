"""Phrases to ground in free text: the character spans of a caption given without phrases.

Upstream's demo finds noun phrases with NLTK's tagger and a ``<DT>?<JJ.*>*<NN.*>+`` chunk grammar,
but NLTK's tagger data is not on PyPI (``nltk.download`` fetches it at run time) and spaCy's
English models (``en_core_web_sm``) are not on PyPI either. The one offline tagger found there is
TextBlob's vendored copy of the Pattern tagger and chunker (``textblob`` 0.20.1: a 625 KB wheel
whose English lexicon ships inside it; it depends on ``nltk`` but uses no NLTK data). It is an
OPTIONAL dependency: when ``textblob`` is importable its noun-phrase chunks are used, otherwise
(or with ``use_tagger=False``) the fallback is the whole caption plus its comma / semicolon /
"and"-separated parts.

Phrases given by the user as substrings resolve to their FIRST occurrence in the caption
(:func:`phrase_spans`); give a ``[start, end)`` span to point at a later one.
"""
import importlib.util
import numbers
import re
from typing import List, Optional, Sequence, Tuple, Union

from .tokenization import check_span

__all__ = ["phrase_spans", "tagger_available", "find_noun_phrases", "split_caption_phrases", "caption_phrases"]

Span = Tuple[int, int]

# separators of the fallback: commas, semicolons and the word "and"
_SEPARATORS = re.compile(r"[,;]|\band\b", flags=re.IGNORECASE)
# leading/trailing characters that are not part of a phrase
_STRIP = " \t\r\n.,;:!?\"'"


def phrase_spans(caption: str, phrases: Sequence[Union[str, Sequence[int]]]) -> List[Span]:
    """Resolves user phrases, each a substring or a ``[start, end)`` pair, to character spans.

    A substring maps to its first occurrence (``str.find``), so repeated words need spans.

    Example:
        >>> phrase_spans("a cat and a cat toy", ["a cat", [10, 15], "toy"])
        [(0, 5), (10, 15), (16, 19)]

    Raises:
        ValueError: empty caption or phrase list, a blank phrase, a substring that is not in the
            caption, or a span outside it; the message names the phrase (index and text).
        TypeError: a phrase that is neither a string nor a pair of ints.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption {caption!r} is empty: nothing to ground")
    if isinstance(phrases, str) or not isinstance(phrases, Sequence) or len(phrases) == 0:
        raise ValueError(f"phrases must be a non-empty list of substrings or [start, end) spans, got {phrases!r}")
    spans = []
    for k, phrase in enumerate(phrases):
        if isinstance(phrase, str):
            if not phrase.strip():
                raise ValueError(f"phrase {k} ({phrase!r}) is blank")
            at = caption.find(phrase)
            if at < 0:
                raise ValueError(f"phrase {k} ({phrase!r}) is not in the caption {caption!r}")
            spans.append((at, at + len(phrase)))
        elif isinstance(phrase, Sequence) and len(phrase) == 2 and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in phrase
        ):
            try:
                spans.append(check_span(phrase, caption))
            except ValueError as e:
                raise ValueError(f"phrase {k}: {e}") from e
        else:
            raise TypeError(f"phrase {k} ({phrase!r}) must be a substring or a [start, end) pair of ints")
    return spans


def tagger_available() -> bool:
    """True when the optional part-of-speech tagger (``textblob``) is installed."""
    return importlib.util.find_spec("textblob") is not None


def _strip_span(text: str, start: int, end: int) -> Optional[Span]:
    """``[start, end)`` shrunk past surrounding spaces and punctuation; None if nothing is left."""
    while start < end and text[start] in _STRIP:
        start += 1
    while end > start and text[end - 1] in _STRIP:
        end -= 1
    return (start, end) if end > start else None


def split_caption_phrases(caption: str) -> List[Span]:
    """The tagger-free phrases: the whole caption, then its parts between commas, semicolons and
    the word "and" when there are several.

    Example:
        >>> split_caption_phrases("a cat, a dog and a bird.")
        [(0, 23), (0, 5), (7, 12), (17, 23)]
        >>> split_caption_phrases("a cat on a mat")
        [(0, 14)]
    """
    whole = _strip_span(caption, 0, len(caption))
    if whole is None:
        return []
    cuts = [0] + [x for m in _SEPARATORS.finditer(caption) for x in m.span()] + [len(caption)]
    parts = [_strip_span(caption, cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]
    parts = [p for p in parts if p is not None and p != whole]
    return [whole] + list(dict.fromkeys(parts))


def _token_offsets(caption: str, words: List[str]) -> List[Optional[Span]]:
    """Character span of each tagger token, found left to right; None for a token the tagger's
    tokenizer rewrote (it may split or normalise text) so that it cannot be located."""
    spans, cursor = [], 0
    for word in words:
        at = caption.find(word, cursor)
        if at < 0:
            spans.append(None)
            continue
        spans.append((at, at + len(word)))
        cursor = at + len(word)
    return spans


def find_noun_phrases(caption: str) -> List[Span]:
    """Noun-phrase chunks of ``caption`` from the Pattern tagger/chunker vendored in TextBlob.

    A chunk is kept when it holds a noun (an ``NN*`` token of two letters or more: the tokenizer
    turns contractions such as "doesn't" into one-letter "nouns"), so pronouns alone are not
    phrases, as with upstream's ``<NN.*>+`` grammar.

    Returns:
        ``[(start, end), ...]`` character spans in caption order.

    Raises:
        ImportError: ``textblob`` is not installed (see :func:`tagger_available`).
    """
    from textblob.en import parse

    tagged = parse(caption, tokenize=True, tags=True, chunks=True, relations=False, lemmata=False)
    tokens = [tok for sentence in tagged.split() for tok in sentence]
    offsets = _token_offsets(caption, [tok[0] for tok in tokens])
    chunks: List[List[int]] = []
    for i, tok in enumerate(tokens):
        chunk = tok[2]
        if chunk == "B-NP" or (chunk == "I-NP" and not (chunks and chunks[-1][-1] == i - 1)):
            chunks.append([i])
        elif chunk == "I-NP":
            chunks[-1].append(i)
    phrases = []
    for chunk in chunks:
        located = [offsets[i] for i in chunk if offsets[i] is not None]
        has_noun = any(tokens[i][1].startswith("NN") and sum(c.isalpha() for c in tokens[i][0]) >= 2 for i in chunk)
        if located and has_noun:
            span = _strip_span(caption, located[0][0], located[-1][1])
            if span is not None:
                phrases.append(span)
    return list(dict.fromkeys(phrases))


def caption_phrases(caption: str, use_tagger: Optional[bool] = None) -> List[Span]:
    """The phrases to score in a caption given without phrases.

    Args:
        caption: free text.
        use_tagger: True: noun phrases of the optional tagger (ImportError if it is missing);
            False: :func:`split_caption_phrases`; None: the tagger when installed, else the split.
            A tagger that finds no noun phrase also falls back to the split.

    Returns:
        ``[(start, end), ...]`` non-empty character spans.

    Raises:
        ValueError: the caption is empty or blank.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption {caption!r} is empty: nothing to ground")
    if use_tagger is None:
        use_tagger = tagger_available()
    phrases = find_noun_phrases(caption) if use_tagger else []
    return phrases or split_caption_phrases(caption)
