"""The prompt: one caption, its labelled phrases and its tokens, made once and never changed.

A :class:`Prompt` is what the model reads besides the image. It is built by
:class:`PromptBuilder` where the caption is created (the dataset mapper, the predictor, the
benchmark) and carried unchanged to :class:`fiber_det.modeling.meta_arch.FIBER`, which uses
only its token ids (:func:`collate_prompts` pads them into ``input_ids`` / ``attention_mask``)
and its label -> token map (phrase score = mean token probability over the label's tokens;
training target rows = the tokens of a box's label). docs/prompt.md follows one caption from the
dataset to the logits.

The two ways upstream resolves character spans to tokens are both kept, chosen by ``training``:
training maps use the caption as the model reads it (truncated at ``max_length`` tokens; a span
that falls outside marks nothing), inference maps use the whole caption and a label whose tokens
the model would not see is an error (upstream would score the wrong column).

The phrases of a grounding record (``tokens_positive_eval``, the labels of its prompt) and the
annotations belonging to each phrase are read here too (:func:`grounding_phrases`,
:func:`phrase_annotations`), so the mapper and the evaluators agree on what label j is.
"""
import functools
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from detectron2.config import configurable

from ..utils.paths import resolve_path
from .captions import category_caption, labelled_names
from .tokenization import build_tokenizer, check_fast_tokenizer, check_span, create_positive_map

__all__ = [
    "LabelMap", "Prompt", "PromptBuilder", "collate_prompts", "grounding_phrases", "phrase_annotations",
]

Span = Tuple[int, int]


class LabelMap(Mapping):
    """An immutable ``{label: value}`` mapping: int labels in insertion order, hashable, picklable.

    Values must themselves be immutable (tuples, strings) for the map to stay so.
    """

    __slots__ = ("_data",)

    def __init__(self, items: Union[Mapping, Iterable[Tuple[int, object]]] = ()):
        data = dict(items.items() if isinstance(items, Mapping) else items)
        for label in data:
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError(f"labels must be ints, got {label!r} ({type(label).__name__})")
        object.__setattr__(self, "_data", data)

    def __getitem__(self, label):
        return self._data[label]

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __setattr__(self, name, value):
        raise AttributeError("a LabelMap is immutable")

    def __reduce__(self):
        return (LabelMap, (tuple(self._data.items()),))

    def __repr__(self) -> str:
        return f"LabelMap({self._data!r})"


@dataclass(frozen=True)
class Prompt:
    """One caption as the model reads it, with its labelled phrases (immutable).

    Labels are ints (>= 1 by convention: category label = contiguous id + 1, phrase label = phrase
    index + 1); the three maps have the same labels in the same order.

    Attributes:
        caption: the text.
        input_ids: token ids with special tokens, truncated at the builder's ``max_length``,
            unpadded; the key of anything cached per prompt text (e.g. a text-tower prefix).
        token_map: ``{label: sorted token indices into input_ids}``; the model averages the token
            probabilities of a label's indices into its score, and a box of that label is trained
            towards exactly these tokens. A training prompt may map a label to no token.
        spans: ``{label: ((start, end), ...)}`` character spans of the label's phrase.
        names: ``{label: text}``: the category name or the phrase text, for people.
    """

    caption: str
    input_ids: Tuple[int, ...]
    token_map: LabelMap
    spans: LabelMap = None
    names: LabelMap = None

    def __post_init__(self):
        if not isinstance(self.caption, str):
            raise TypeError(f"caption must be a string, got {type(self.caption).__name__}")
        ids = tuple(self.input_ids)
        if not ids or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise ValueError(f"input_ids must be a non-empty sequence of ints, got {self.input_ids!r}")
        token_map = LabelMap((label, _token_indices(label, tokens, len(ids), self.caption))
                             for label, tokens in dict(self.token_map).items())
        spans = {} if self.spans is None else dict(self.spans)
        names = {} if self.names is None else dict(self.names)
        for what, given in (("spans", spans), ("names", names)):
            extra = set(given) - set(token_map)
            if extra:
                raise ValueError(f"{what} has labels {sorted(extra)} that token_map lacks (caption {self.caption!r})")
        spans = LabelMap((label, tuple(_checked(label, span, self.caption) for span in spans.get(label, ())))
                         for label in token_map)
        names = LabelMap((label, str(names[label]) if label in names else _text(self.caption, spans[label]))
                         for label in token_map)
        for field, value in (("input_ids", ids), ("token_map", token_map), ("spans", spans), ("names", names)):
            object.__setattr__(self, field, value)

    @property
    def labels(self) -> Tuple[int, ...]:
        """The labels, in prompt order."""
        return tuple(self.token_map)

    @property
    def num_tokens(self) -> int:
        """Length of :attr:`input_ids` (the attention mask's ones)."""
        return len(self.input_ids)

    def positive_map(self, labels: Sequence[int], num_columns: int) -> torch.Tensor:
        """The binary token map of boxes with the given labels (the training target).

        Args:
            labels: one label of this prompt per box.
            num_columns: token columns (MODEL.FIBER.TEXT.MAX_QUERY_LEN).

        Returns:
            float32 tensor (len(labels), num_columns); row g marks ``token_map[labels[g]]``.
        """
        rows = torch.zeros((len(labels), num_columns), dtype=torch.float32)
        for row, label in enumerate(labels):
            if label not in self.token_map:
                raise ValueError(f"box {row}: label {label!r} is not a label of the prompt {self.caption!r}")
            tokens = list(self.token_map[label])
            if tokens and tokens[-1] >= num_columns:
                raise ValueError(f"label {label}: token {tokens[-1]} does not fit {num_columns} columns")
            rows[row, tokens] = 1.0
        return rows


def _token_indices(label, tokens, num_tokens: int, caption: str) -> Tuple[int, ...]:
    indices = tuple(sorted({int(t) for t in tokens}))
    if indices and not 0 <= indices[0] <= indices[-1] < num_tokens:
        raise ValueError(f"label {label}: token indices {list(indices)} are outside the prompt's {num_tokens} "
                         f"tokens (caption {caption!r})")
    return indices


def _checked(label, span, caption: str) -> Span:
    try:
        return check_span(span, caption)
    except (TypeError, ValueError) as e:
        raise ValueError(f"label {label}: {e}") from e


def _text(caption: str, spans: Sequence[Span]) -> str:
    return " ".join(caption[start:end] for start, end in spans)


def _shortened(text: str, limit: int = 60) -> str:
    """``text``, or its first ``limit - 3`` characters and "..." (a phrase quoted in a message)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str):
    return build_tokenizer(resolve_path(path))


class PromptBuilder:
    """Makes :class:`Prompt` objects with the model's tokenizer: captions with labelled spans
    (:meth:`build`) and category vocabularies split to fit (:meth:`chunks`)."""

    @configurable
    def __init__(self, tokenizer, *, max_length: int = 256, separator: str = ". "):
        """
        Args:
            tokenizer: the model's fast HF tokenizer.
            max_length: tokens the model reads per caption, special tokens included
                (MODEL.FIBER.TEXT.MAX_QUERY_LEN).
            separator: between category names (DATASETS.PROMPT.SEPARATOR).
        """
        check_fast_tokenizer(tokenizer)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (two special tokens), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.separator = separator

    @classmethod
    def from_config(cls, cfg):
        """The tokenizer of MODEL.FIBER.TEXT.TOKENIZER (loaded once per folder), checked against the
        text tower it feeds (pad id, vocabulary size)."""
        t = cfg.MODEL.FIBER.TEXT
        if not t.TOKENIZER:
            raise ValueError("MODEL.FIBER.TEXT.TOKENIZER is empty: prompts need the model's tokenizer folder")
        tokenizer = _tokenizer_at(t.TOKENIZER)
        if tokenizer.pad_token_id != t.PAD_TOKEN_ID:
            raise ValueError(f"MODEL.FIBER.TEXT.PAD_TOKEN_ID = {t.PAD_TOKEN_ID} but tokenizer {t.TOKENIZER} pads "
                             f"with id {tokenizer.pad_token_id}")
        if len(tokenizer) > t.VOCAB_SIZE:
            raise ValueError(f"tokenizer {t.TOKENIZER} has {len(tokenizer)} tokens > MODEL.FIBER.TEXT.VOCAB_SIZE "
                             f"{t.VOCAB_SIZE}")
        return {"tokenizer": tokenizer, "max_length": t.MAX_QUERY_LEN, "separator": cfg.DATASETS.PROMPT.SEPARATOR}

    def num_tokens(self, caption: str) -> int:
        """Tokens of the whole caption, special tokens included (no truncation)."""
        return len(self.tokenizer(caption)["input_ids"])

    def fits(self, caption: str) -> bool:
        """Whether the model reads the whole caption (at most ``max_length`` tokens)."""
        return self.num_tokens(caption) <= self.max_length

    def build(self, caption: str, spans: Optional[Mapping[int, Sequence[Sequence[int]]]] = None,
              names: Optional[Mapping[int, str]] = None, *, training: bool = False) -> Prompt:
        """A prompt of ``caption`` whose label ``k`` is the phrase at ``spans[k]``.

        Args:
            caption: the text.
            spans: ``{label: [[start, end), ...]}``; None or {} for a caption without labels
                (text only, e.g. to compare token ids).
            names: ``{label: text}``; by default the text of the label's spans.
            training: resolve spans on the truncated caption, as upstream's training maps (a span
                past the cut, or resolving to no token, marks nothing). Otherwise resolve them on
                the whole caption, as upstream's inference maps, and raise when a label resolves
                to no token or to a token past the cut.

        Raises:
            ValueError: empty caption; a span outside it (the message names the label); with
                ``training=False`` a label without tokens or past the cut.
        """
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"caption {caption!r} is empty or not a string: a prompt needs text")
        spans = LabelMap((label, tuple(_checked(label, s, caption) for s in label_spans))
                         for label, label_spans in dict(spans or {}).items())
        encoding = self.tokenizer(caption, max_length=self.max_length, truncation=True)
        input_ids = tuple(encoding["input_ids"])
        if training:
            token_map = _resolve(encoding, caption, spans, self.max_length)
        else:
            whole = encoding if len(input_ids) < self.max_length else self.tokenizer(caption)
            token_map = _resolve(whole, caption, spans, len(whole["input_ids"]))
            # When cut, the model's last token is the closing special token, not the word there.
            visible = len(input_ids) - 1 if len(whole["input_ids"]) > len(input_ids) else len(input_ids)
            for label, tokens in token_map.items():
                if not tokens:
                    raise ValueError(f"label {label}: spans {[list(s) for s in spans[label]]} resolve to no token "
                                     f"in caption {caption!r}")
                if tokens[-1] >= visible:
                    raise ValueError(
                        f"label {label} ({_shortened(_text(caption, spans[label]))!r}) lies past the first {visible} tokens, "
                        f"where the caption is cut (max_length {self.max_length}, MODEL.FIBER.TEXT.MAX_QUERY_LEN); "
                        "shorten the caption")
        return Prompt(caption, input_ids, token_map, spans, names)

    def chunks(self, names: Union[Mapping[int, str], Sequence[str]], chunk_size: int = 0,
               caption_prompt: Optional[Sequence[Mapping[str, str]]] = None) -> Tuple[Prompt, ...]:
        """The category prompts of a vocabulary, each within ``max_length`` tokens.

        One prompt when the whole vocabulary fits and ``chunk_size`` does not ask for less. With
        ``0 < chunk_size < #names``, labels (sorted) are cut into consecutive blocks of that many,
        as the official LVIS evaluation does (40: 1203 names -> 31 prompts); otherwise a
        vocabulary that does not fit is packed greedily into as few prompts as possible. A block
        that still does not fit is halved until it does. Every label lands in exactly one prompt
        and keeps its value; ``names`` of each prompt are the raw names given.

        Args:
            names: ``{label: raw name}`` or a list of raw names (labels 1..N).
            chunk_size: labels per prompt (TEST.CHUNK_SIZE), 0 = only split when needed.
            caption_prompt: optional per-class ``{"prefix", "name", "suffix"}`` dicts in label order
                (see :func:`fiber_det.data.captions.category_caption`).

        Raises:
            ValueError: a single name alone exceeds ``max_length`` tokens.
        """
        pairs = labelled_names(names)
        wrap = {}
        if caption_prompt is not None:
            if len(caption_prompt) != len(pairs):
                raise ValueError(f"caption_prompt has {len(caption_prompt)} entries but there are {len(pairs)} classes")
            wrap = {label: entry for (label, _), entry in zip(pairs, caption_prompt)}

        def text(block):
            return category_caption(dict(block), self.separator, [wrap[k] for k, _ in block] if wrap else None)

        def split_until_fit(block):
            if self.fits(text(block)[0]):
                return [block]
            if len(block) == 1:
                raise ValueError(f"category {block[0][1]!r} (label {block[0][0]}) alone exceeds {self.max_length} tokens")
            half = len(block) // 2
            return split_until_fit(block[:half]) + split_until_fit(block[half:])

        if 0 < chunk_size < len(pairs):
            blocks = [pairs[i:i + chunk_size] for i in range(0, len(pairs), chunk_size)]
        elif self.fits(text(pairs)[0]):
            blocks = [pairs]
        else:
            blocks = self._greedy_blocks(pairs, text)
        return tuple(self.build(*text(b), names=dict(b)) for block in blocks for b in split_until_fit(block))

    def _greedy_blocks(self, pairs, text) -> List[list]:
        """Packs names on their standalone token counts. A separator's trailing space merges into
        the next word's first token, so only its stripped part is counted; every block is then
        checked on its real caption (and split if the estimate was short)."""
        blocks, current, used = [], [], 2  # the two special tokens
        for pair in pairs:
            piece = text([pair])[0] + self.separator.rstrip()
            cost = len(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
            if current and used + cost > self.max_length:
                blocks.append(current)
                current, used = [], 2
            current.append(pair)
            used += cost
        blocks.append(current)
        return blocks


def _resolve(encoding, caption: str, spans: LabelMap, columns: int) -> Dict[int, Tuple[int, ...]]:
    """``{label: token indices}`` of the spans in ``encoding`` (the official positive-map rule:
    ``char_to_token`` with its fallbacks, tokens clipped at ``columns``)."""
    labels = list(spans)
    rows = create_positive_map(encoding, [spans[k] for k in labels], columns, normalize=False, caption=caption)
    return {label: tuple(torch.nonzero(rows[r]).flatten().tolist()) for r, label in enumerate(labels)}


def collate_prompts(prompts: Sequence[Prompt], pad_token_id: int, max_length: int,
                    pad_to_max: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The text tensors of a batch of prompts, as the official tokenizer call pads them.

    Args:
        prompts: B prompts.
        pad_token_id: the tokenizer's pad id (MODEL.FIBER.TEXT.PAD_TOKEN_ID).
        max_length: tokens the model reads (MODEL.FIBER.TEXT.MAX_QUERY_LEN).
        pad_to_max: pad every row to ``max_length`` (official); else to the longest prompt.

    Returns:
        ``(input_ids, attention_mask)``, int64 tensors (B, T) padded on the right.

    Raises:
        TypeError: an entry is not a :class:`Prompt`.
        ValueError: no prompt, or a prompt longer than ``max_length`` (built for another model).
    """
    if not prompts:
        raise ValueError("no prompt to collate")
    for k, prompt in enumerate(prompts):
        if not isinstance(prompt, Prompt):
            raise TypeError(f"prompt {k} is a {type(prompt).__name__}, not a Prompt (make it with PromptBuilder)")
        if prompt.num_tokens > max_length:
            raise ValueError(f"prompt {k} has {prompt.num_tokens} tokens but the model reads {max_length} "
                             f"(MODEL.FIBER.TEXT.MAX_QUERY_LEN); build it with max_length={max_length}")
    length = max_length if pad_to_max else max(p.num_tokens for p in prompts)
    input_ids = torch.full((len(prompts), length), int(pad_token_id), dtype=torch.int64)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, :prompt.num_tokens] = torch.as_tensor(prompt.input_ids, dtype=torch.int64)
        attention_mask[row, :prompt.num_tokens] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# Phrases of grounding records (the dataset-dict contract of MDETR-style data)


def grounding_phrases(record: Mapping) -> List[List[List[int]]]:
    """The evaluated phrases of a grounding record; phrase j is label j + 1 of its prompt.

    ``tokens_positive_eval`` when present, else one phrase per distinct non-empty annotation span
    list (``annotations[i]["tokens_positive"]``), in order of first appearance.

    Args:
        record: a dataset dict, a mapper input or an MDETR json image with its annotations.

    Returns:
        One list of ``[start, end)`` spans per phrase.
    """
    if record.get("tokens_positive_eval") is not None:
        return [[list(span) for span in spans] for spans in record["tokens_positive_eval"]]
    phrases: List[List[List[int]]] = []
    for ann in record.get("annotations", []):
        spans = [list(span) for span in ann.get("tokens_positive") or []]
        if spans and spans not in phrases:
            phrases.append(spans)
    return phrases


def box_spans(annotation: Mapping) -> Optional[List[List[int]]]:
    """The ``[start, end)`` caption spans of one grounding annotation (None when it has none)."""
    spans = annotation.get("tokens_positive")
    return None if spans is None else [list(span) for span in spans]


def phrase_annotations(record: Mapping, phrases: Sequence[Sequence[Sequence[int]]]) -> Optional[List[List[int]]]:
    """Per phrase, the indices of the record's annotations whose spans share at least one
    character with one of the phrase's spans (how MDETR's json evaluation finds a phrase's boxes).

    Returns:
        One index list per phrase, or None when some annotation carries no spans.
    """
    per_box = [box_spans(ann) for ann in record.get("annotations", [])]
    if any(spans is None for spans in per_box):
        return None
    return [[i for i, spans in enumerate(per_box) if _overlap(spans, phrase)] for phrase in phrases]


def _overlap(spans_a: Sequence[Sequence[int]], spans_b: Sequence[Sequence[int]]) -> bool:
    return any(max(a[0], b[0]) < min(a[1], b[1]) for a in spans_a for b in spans_b)
