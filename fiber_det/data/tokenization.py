"""Tokenizer loading from local folders and character spans -> token positive maps.

FIBER links phrases to tokens through character spans resolved with ``char_to_token`` and the
official off-by-one fallbacks (start, start + 1, start + 2; end - 1, end - 2, end - 3), into a
positive map (rows = boxes or phrases, columns = token positions). The functions here reproduce
both; :class:`fiber_det.data.prompt.PromptBuilder` uses them to make a prompt's label -> token map.

Only *fast* tokenizers are accepted wherever character offsets are needed: Python ("slow")
tokenizers cannot map characters to tokens.
"""
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from transformers import AutoTokenizer, BatchEncoding, BertTokenizerFast, RobertaTokenizerFast

__all__ = [
    "POSITIVE_MAP_EPS",
    "build_tokenizer",
    "check_fast_tokenizer",
    "check_span",
    "char_span_to_token_range",
    "create_positive_map",
]

# The official dataset map divides each row by (row sum + 1e-6); keeping the epsilon makes our
# normalised rows bit-identical to the reference ones (e.g. 1 / (5 + 1e-6) instead of 0.2).
POSITIVE_MAP_EPS = 1e-6

_LOOKED_FOR = (
    "'tokenizer.json', or 'vocab.json' + 'merges.txt' (RoBERTa BPE), "
    "or 'vocab.txt' (BERT WordPiece)"
)

Span = Tuple[int, int]


def check_fast_tokenizer(tokenizer, source: Optional[str] = None) -> None:
    """Raises ValueError unless ``tokenizer`` is a fast (Rust ``tokenizers``) tokenizer.

    Args:
        tokenizer: a transformers tokenizer instance.
        source: where it came from (a folder), added to the message when given.

    Raises:
        ValueError: the tokenizer has no character-offset support (``char_to_token``).
    """
    if getattr(tokenizer, "is_fast", False):
        return
    origin = f" loaded from '{source}'" if source is not None else ""
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__}{origin} is not a fast tokenizer: positive maps need "
        "character offsets (char_to_token), which only fast (tokenizers-backed) tokenizers provide"
    )


def _read_do_lower_case(folder: Path) -> bool:
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return True  # BERT-uncased convention, and the BertTokenizerFast default
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    return bool(config.get("do_lower_case", True))


def build_tokenizer(path: Union[str, Path]):
    """Loads a fast HF tokenizer from a local folder (never from the hub).

    The folder kind is recognised by its files, in this order: ``tokenizer.json`` (any fast
    tokenizer, via ``AutoTokenizer``); ``vocab.json`` + ``merges.txt`` (RoBERTa byte-level BPE,
    ``RobertaTokenizerFast``); ``vocab.txt`` (BERT WordPiece, ``BertTokenizerFast``, honouring
    ``do_lower_case`` from ``tokenizer_config.json``, default True).

    Args:
        path: a local folder.

    Returns:
        A fast ``PreTrainedTokenizerBase``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a folder, holds none of the files above, cannot be loaded, or
            yields a tokenizer that is not fast.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"tokenizer folder '{folder}' does not exist")
    if not folder.is_dir():
        raise ValueError(f"tokenizer path '{folder}' is not a folder; expected {_LOOKED_FOR}")

    # local_files_only: a folder name that happens to look like a hub id must never hit the network.
    if (folder / "tokenizer.json").is_file():
        loader, kwargs = AutoTokenizer.from_pretrained, {}
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        loader, kwargs = RobertaTokenizerFast.from_pretrained, {}
    elif (folder / "vocab.txt").is_file():
        loader = BertTokenizerFast.from_pretrained
        kwargs = {"do_lower_case": _read_do_lower_case(folder)}
    else:
        present = sorted(p.name for p in folder.iterdir())
        raise ValueError(
            f"no tokenizer files in '{folder}': looked for {_LOOKED_FOR}; found {present}"
        )

    try:
        tokenizer = loader(str(folder), local_files_only=True, **kwargs)
    except Exception as e:  # re-raised with the folder named; the original stays chained
        raise ValueError(f"could not load a tokenizer from '{folder}': {e}") from e
    check_fast_tokenizer(tokenizer, source=str(folder))
    # fiber-det truncates or chunks prompts at MODEL.FIBER.TEXT.MAX_QUERY_LEN itself and says so;
    # transformers' warning against the tokenizer's own model_max_length would only mislead
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def _char_to_token(tokenized: BatchEncoding, char_index: int) -> Optional[int]:
    # The official fallbacks treat a failing lookup as "no token"; a negative index (end - 3 on a
    # short span) would otherwise raise OverflowError in the Rust binding.
    if char_index < 0:
        return None
    try:
        return tokenized.char_to_token(char_index)
    except Exception:  # noqa: BLE001 - any lookup failure means "unresolved", as upstream
        return None


def _first_resolved(tokenized: BatchEncoding, char_indices: Sequence[int]) -> Optional[int]:
    for char_index in char_indices:
        token = _char_to_token(tokenized, char_index)
        if token is not None:
            return token
    return None


def char_span_to_token_range(
    tokenized: BatchEncoding, start: int, end: int
) -> Optional[Tuple[int, int]]:
    """Resolves a character span to an inclusive token range with the official fallbacks.

    beg = token of char ``start``, else ``start + 1``, else ``start + 2``; last = token of char
    ``end - 1``, else ``end - 2``, else ``end - 3``. The fallbacks exist because whitespace maps
    to no token (a span starting or ending on a space still resolves to its neighbouring word).

    Args:
        tokenized: the fast-tokenizer encoding of ONE caption.
        start: first character of the span.
        end: one past its last character.

    Returns:
        ``(beg, last)`` token indices, or None when either end stays unresolved or the fallbacks
        crossed (``beg > last``, e.g. a whitespace-only span), in which case upstream marks nothing.
    """
    beg = _first_resolved(tokenized, (start, start + 1, start + 2))
    last = _first_resolved(tokenized, (end - 1, end - 2, end - 3))
    if beg is None or last is None or beg > last:
        return None
    return beg, last


def _check_encoding(tokenized) -> None:
    if not isinstance(tokenized, BatchEncoding):
        if getattr(tokenized, "is_fast", None) is False:
            # A slow tokenizer passed in: say so, that is the real problem.
            check_fast_tokenizer(tokenized)
        raise TypeError(
            "expected the BatchEncoding of one caption (tokenizer(caption)), "
            f"got {type(tokenized).__name__}"
        )
    if not tokenized.is_fast:
        raise ValueError(
            "the encoding comes from a slow (Python) tokenizer, which is not fast and has no "
            "char_to_token; use a fast tokenizer (see build_tokenizer)"
        )
    if len(tokenized.encodings) != 1:
        raise ValueError(
            f"expected the encoding of ONE caption, got a batch of {len(tokenized.encodings)}"
        )


def check_span(span: Sequence[int], caption: Optional[str] = None) -> Span:
    """Validates one ``[start, end)`` character span and returns it as a tuple of ints.

    Args:
        span: a ``[start, end)`` pair.
        caption: the caption it indexes; without it ``end`` cannot be bounded.

    Raises:
        ValueError: not a pair, empty, or outside the caption; the message names span and caption.
    """
    if len(span) != 2:
        raise ValueError(f"span {span!r} is not a [start, end) pair (caption: {caption!r})")
    start, end = int(span[0]), int(span[1])
    too_long = caption is not None and end > len(caption)
    if start < 0 or start >= end or too_long:
        length = "?" if caption is None else len(caption)
        raise ValueError(
            f"span [{start}, {end}) is outside the caption or empty "
            f"(need 0 <= start < end <= {length}); caption: {caption!r}"
        )
    return start, end


def create_positive_map(
    tokenized: BatchEncoding,
    spans_per_row: Sequence[Sequence[Sequence[int]]],
    max_length: int = 256,
    normalize: bool = True,
    return_unresolved: bool = False,
    caption: Optional[str] = None,
):
    """Builds the [n_rows, max_length] token map of character spans (official create_positive_map).

    Row i marks, for every span of ``spans_per_row[i]``, the tokens ``beg..last`` returned by
    :func:`char_span_to_token_range`; unresolved spans are skipped, as upstream.

    NOTE: upstream fills ``map[i, beg:last + 1]``, which silently clips tokens at column
    ``max_length``; we clip identically, and a span lying entirely beyond the last column is
    reported as unresolved (it marks nothing).

    Args:
        tokenized: fast-tokenizer ``BatchEncoding`` of ONE caption (truncated at ``max_length``
            for training maps; upstream uses an untruncated one for grounding evaluation).
        spans_per_row: one entry per box / phrase, each a list of ``[start, end)`` char spans.
        max_length: number of columns (256 in FIBER).
        normalize: divide every row by (row sum + 1e-6), as the official dataset does; False
            gives the binary map the collator feeds to the loss.
        return_unresolved: also return the spans that marked no token.
        caption: the caption text; when given, spans are checked against its length (the
            encoding does not keep the text, so without it only ``0 <= start < end`` is checked).

    Returns:
        float32 tensor [n_rows, max_length]; with ``return_unresolved`` a tuple
        ``(map, [(row, (start, end)), ...])``.

    Raises:
        ValueError: slow-tokenizer encoding, batch of several captions, or a span outside the
            caption (start < 0, start >= end, end > len(caption)).
        TypeError: ``tokenized`` is not a BatchEncoding.
    """
    _check_encoding(tokenized)
    positive_map = torch.zeros((len(spans_per_row), max_length), dtype=torch.float32)
    unresolved: List[Tuple[int, Span]] = []
    for row, spans in enumerate(spans_per_row):
        for span in spans:
            start, end = check_span(span, caption)
            token_range = char_span_to_token_range(tokenized, start, end)
            if token_range is None or token_range[0] >= max_length:
                unresolved.append((row, (start, end)))
                continue
            positive_map[row, token_range[0] : token_range[1] + 1] = 1.0
    if normalize:
        positive_map = positive_map / (positive_map.sum(-1)[:, None] + POSITIVE_MAP_EPS)
    return (positive_map, unresolved) if return_unresolved else positive_map
