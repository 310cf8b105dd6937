"""Training captions (all categories, sampled negatives, grounding) with the real GPT-2 BPE and
BERT WordPiece tokenizers (fixtures ``gpt2`` / ``bert``)."""
import doctest
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fiber_det.data import training_prompts
from fiber_det.data.captions import clean_name
from fiber_det.data.prompt import PromptBuilder
from fiber_det.data.training_prompts import (
    all_categories_prompt,
    check_for_positive_overflow,
    grounding_prompt,
    name_token_counts,
    negative_count,
    sampled_negatives_prompt,
)

NAMES = ["person", "bicycle", "traffic_light", "bow_(weapon)", "cup", "saucer", "spoon", "zebra"]
WORD = st.from_regex(r"[a-z]{1,9}( [a-z]{1,9}){0,2}(_\([a-z]{1,6}\))?", fullmatch=True)
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _length(tokenizer, caption):
    return len(tokenizer(caption)["input_ids"])


def _check_spans(prompt, names, box_labels):
    """Every kept box keeps its category label, and every label's span covers exactly its
    cleaned category name in the caption."""
    assert prompt.box_labels == [box_labels[i] for i in prompt.kept]
    for label, ((start, end),) in prompt.spans.items():
        assert prompt.caption[start:end] == clean_name(names[label - 1])


# ---------------------------------------------------------------------------------------------
# (a) all categories


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
def test_all_categories_shuffles_reproducibly(make_rng):
    labels = [5, 5, 1]
    captions = {all_categories_prompt(NAMES, labels, make_rng(seed)).caption for seed in range(8)}
    assert len(captions) > 1  # order changes with the seed ...
    again = all_categories_prompt(NAMES, labels, make_rng(3))
    assert again == all_categories_prompt(NAMES, labels, make_rng(3))  # ... reproducibly
    assert again.kept == [0, 1, 2] and set(again.spans) == set(range(1, 9))
    _check_spans(again, NAMES, labels)
    assert not again.caption.endswith(". ")


def test_all_categories_without_shuffle_is_sorted_and_takes_caption_prompt():
    prompt = all_categories_prompt(NAMES, [3], None, shuffle=False)
    assert prompt.caption == "person. bicycle. traffic light. bow . cup. saucer. spoon. zebra"
    assert prompt.box_labels == [3] and prompt.spans[3] == [[17, 30]]
    wrapped = [{"prefix": "a ", "suffix": " here"}, {"name": "bike"}]
    prompt = all_categories_prompt(["person", "bicycle"], [2, 1], None, shuffle=False, caption_prompt=wrapped)
    assert prompt.caption == "a person here. bike"
    assert prompt.spans == {1: [[2, 8]], 2: [[15, 19]]} and prompt.box_labels == [2, 1]


def test_all_categories_errors():
    with pytest.raises(ValueError, match="disable shuffling"):
        all_categories_prompt(NAMES, [1], random.Random(0), caption_prompt=[{}] * len(NAMES))
    with pytest.raises(ValueError, match="box 1: label 9 is not a category"):
        all_categories_prompt(NAMES, [1, 9], random.Random(0))
    with pytest.raises(TypeError, match="rng must be"):
        all_categories_prompt(NAMES, [1], rng=0)


# ---------------------------------------------------------------------------------------------
# (b) sampled negatives


def test_name_token_counts_match_tokenize(gpt2, bert):
    counts = name_token_counts(NAMES, gpt2)
    assert counts[3] == len(gpt2.tokenize("traffic light. ")) == 5  # 'tra', 'ffic', 'Ġlight', '.', 'Ġ'
    assert name_token_counts(NAMES, bert)[3] == 3  # 'traffic', 'light', '.'
    assert counts[4] == len(gpt2.tokenize("bow . "))


def test_positive_overflow_keeps_the_walk_prefix_and_counts_the_breaker(gpt2):
    names = [f"long name number {i} with many words" for i in range(40)]
    labels = list(range(1, 41))
    counts = name_token_counts(names, gpt2)
    kept, used = check_for_positive_overflow(names, labels + labels, gpt2, random.Random(1), 254)
    assert 0 < len(kept) < 40 and len(set(kept)) == len(kept)
    walk = list(range(1, 41))
    random.Random(1).shuffle(walk)  # the walk order: the distinct labels shuffled
    assert kept == walk[: len(kept)]
    assert sum(counts[k] for k in kept) <= 254 < used == sum(counts[k] for k in walk[: len(kept) + 1])
    everything, total = check_for_positive_overflow(names, labels[:3], gpt2, random.Random(1), 254)
    assert sorted(everything) == [1, 2, 3] and total == sum(counts[k] for k in (1, 2, 3))


def test_sampled_negatives_keeps_fitting_positives_and_drops_overflow_boxes(gpt2):
    names = [f"category {i} described by quite a few words" for i in range(1, 301)]
    box_labels = [l for l in range(1, 61) for _ in range(2)]  # 60 positive classes, 2 boxes each
    seed = 7
    fitted, _ = check_for_positive_overflow(names, box_labels, gpt2, random.Random(seed), 254)
    prompt = sampled_negatives_prompt(names, box_labels, PromptBuilder(gpt2), random.Random(seed), max_negatives=85)
    assert set(fitted) <= set(prompt.spans)  # every positive that fits is named
    assert [box_labels[i] for i in prompt.kept] == [l for l in box_labels if l in set(fitted)]
    assert len(prompt.kept) < len(box_labels)  # overflow boxes dropped
    assert set(prompt.spans) - set(box_labels) == set()  # no negative fits after an overflow
    assert _length(gpt2, prompt.caption) <= 256
    _check_spans(prompt, names, box_labels)


def test_sampled_negatives_budget_and_exclusion(bert):
    names = [f"thing{i}" for i in range(1, 201)]
    box_labels = [3, 3, 17]
    counts = name_token_counts(names, bert)
    prompt = sampled_negatives_prompt(names, box_labels, PromptBuilder(bert, max_length=40), random.Random(0),
                                      max_negatives=85)
    labels = set(prompt.spans)
    assert {3, 17} <= labels and prompt.kept == [0, 1, 2]
    assert sum(counts[l] for l in labels) < 40 - 2  # the remaining budget stayed > 0
    assert len(labels) > 5 and _length(bert, prompt.caption) <= 40
    # "all MAX_NEGATIVES" with a budget that is never hit: exactly 85 negatives minus drawn positives
    big = sampled_negatives_prompt(names, box_labels, PromptBuilder(bert, max_length=100000), random.Random(0))
    assert 83 <= len(big.spans) - 2 <= 85
    builder = PromptBuilder(bert)
    none = sampled_negatives_prompt(names, box_labels, builder, random.Random(0), control_prob=[0, 1, 0, 0])
    assert set(none.spans) == {3, 17}
    one = sampled_negatives_prompt(names, box_labels, builder, random.Random(0), control_prob=[1, 0, 0, 0])
    assert len(set(one.spans) - {3, 17}) <= 1


def test_image_without_boxes_still_gets_a_caption(gpt2):
    prompt = sampled_negatives_prompt(NAMES, [], PromptBuilder(gpt2), random.Random(0), control_prob=[0, 1, 0, 0])
    assert len(prompt.spans) == 1 and prompt.kept == [] and prompt.caption.strip()


@given(
    names=st.lists(WORD, min_size=1, max_size=300),
    data=st.data(),
    max_query_len=st.sampled_from([24, 64, 256]),
    seed=st.integers(0, 2**16),
)
@HYPOTHESIS
def test_no_sampled_prompt_exceeds_the_budget(gpt2, bert, names, data, max_query_len, seed):
    box_labels = data.draw(st.lists(st.integers(1, len(names)), max_size=40))
    control = data.draw(st.sampled_from([(0, 0, 1, 0), (0.3, 0.3, 0.2, 0), (0, 0, 0, 0)]))
    for tokenizer in (gpt2, bert):
        try:
            builder = PromptBuilder(tokenizer, max_length=max_query_len)
            prompt = sampled_negatives_prompt(names, box_labels, builder, random.Random(seed), 85, control)
        except ValueError as e:  # only when a single name cannot fit at all
            assert "alone exceeds" in str(e) or "no category name fits" in str(e)
            continue
        assert _length(tokenizer, prompt.caption) <= max_query_len
        assert all(box_labels[i] in prompt.spans for i in prompt.kept)
        dropped = set(range(len(box_labels))) - set(prompt.kept)
        assert all(box_labels[i] not in prompt.spans for i in dropped)
        _check_spans(prompt, names, box_labels)


@given(names=st.lists(WORD, min_size=1, max_size=120), data=st.data())
@HYPOTHESIS
def test_all_categories_prompt_names_every_category_once(names, data):
    box_labels = data.draw(st.lists(st.integers(1, len(names)), max_size=10))
    prompt = all_categories_prompt(names, box_labels, random.Random(data.draw(st.integers(0, 99))))
    assert sorted(prompt.spans) == list(range(1, len(names) + 1))
    assert prompt.kept == list(range(len(box_labels)))
    _check_spans(prompt, names, box_labels)


def test_negative_count_modes():
    assert negative_count([1, 0, 0, 0], 85, random.Random(0)) == 1
    assert negative_count([0, 1, 0, 0], 85, random.Random(0)) == 0
    assert negative_count([0, 0, 1, 0], 85, np.random.default_rng(0)) == 85
    draws = [negative_count([0, 0, 0, 0], 10, random.Random(s)) for s in range(400)]
    assert set(draws) == set(range(1, 11))  # uniform in 1..full_negative
    assert negative_count([0, 0, 0, 0], 0, random.Random(0)) == 1  # at least one
    draws = [negative_count([0.5, 0.5, 0, 0], 10, np.random.default_rng(s)) for s in range(200)]
    assert set(draws) == {0, 1}
    with pytest.raises(ValueError, match="drop positives"):
        negative_count([0.05, 0.05, 0.5, 0.2], 85, random.Random(0))  # the Objects365 value
    with pytest.raises(ValueError, match="4 non-negative"):
        negative_count([0.6, 0.6, 0, 0], 85, random.Random(0))


# ---------------------------------------------------------------------------------------------
# (c) grounding captions


def test_grounding_caption_verbatim_and_checked():
    caption = "A man in a blue shirt ."
    prompt = grounding_prompt(caption, [[[0, 5]], [[9, 21], [0, 5]], [], [[0, 5]]])
    assert prompt.caption == caption and prompt.kept == [0, 1, 2, 3]
    # boxes with the same spans share a label; a box without span gets one of its own (no token)
    assert prompt.spans == {1: [[0, 5]], 2: [[9, 21], [0, 5]], 3: []} and prompt.box_labels == [1, 2, 3, 1]
    with pytest.raises(ValueError, match="box 1: bad caption spans"):
        grounding_prompt(caption, [[[0, 5]], [[20, 40]]])
    with pytest.raises(ValueError, match="empty"):
        grounding_prompt("  ", [])


def test_docstring_examples_run():
    results = doctest.testmod(training_prompts)
    assert results.attempted >= 4 and results.failed == 0
