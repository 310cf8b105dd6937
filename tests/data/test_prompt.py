"""Tests of fiber_det.data.prompt: the Prompt type, its builder (spans -> tokens, chunking),
batching of token ids, and the phrases of grounding records.

Real vocabularies only: the GPT-2 BPE in tests/assets, the BERT WordPiece of all-MiniLM-L6-v2 and
the tiny BPE stored in the official golden fixture.
"""
import pickle
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import ByT5Tokenizer

from conftest import tiny_cfg
from fiber_det.data.captions import category_caption, clean_name
from fiber_det.data.prompt import (
    LabelMap,
    Prompt,
    PromptBuilder,
    collate_prompts,
    grounding_phrases,
    phrase_annotations,
)
from fiber_det.data.tokenization import build_tokenizer
from fiber_det.data.training_prompts import grounding_prompt

CHELSEA = "A tabby cat with green eyes and a pink nose."
CHELSEA_SPANS = {1: [[0, 11]], 2: [[17, 27]], 3: [[32, 43]]}
WORD = st.from_regex(r"[a-z]{1,9}( [a-z]{1,9}){0,2}(_\([a-z]{1,6}\))?", fullmatch=True)
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _length(tokenizer, caption):
    return len(tokenizer(caption)["input_ids"])


# ---------------------------------------------------------------------------------------------
# the type


def test_prompt_is_immutable_hashable_and_picklable(gpt2):
    prompt = PromptBuilder(gpt2).build(CHELSEA, CHELSEA_SPANS)
    assert prompt.labels == (1, 2, 3) and prompt.num_tokens == len(prompt.input_ids) == 14
    assert prompt.names == {1: "A tabby cat", 2: "green eyes", 3: "a pink nose"}
    assert prompt.spans[2] == ((17, 27),) and isinstance(prompt.input_ids, tuple)
    with pytest.raises(AttributeError):
        prompt.caption = "a dog"
    with pytest.raises(TypeError):
        prompt.token_map[1] = (5,)
    with pytest.raises(AttributeError):
        prompt.token_map._data = {}
    copy = pickle.loads(pickle.dumps(prompt))
    assert copy == prompt and hash(copy) == hash(prompt) and {prompt: 1}[copy] == 1
    assert copy != PromptBuilder(gpt2).build(CHELSEA, {1: [[0, 11]]})


def test_direct_construction_is_checked():
    prompt = Prompt("a cat", (0, 10, 20, 2), {1: [2, 1, 2]})
    assert prompt.token_map == {1: (1, 2)} and prompt.spans == {1: ()} and prompt.names == {1: ""}
    with pytest.raises(ValueError, match=r"label 1: token indices \[1, 4\] are outside the prompt's 4 tokens"):
        Prompt("a cat", (0, 10, 20, 2), {1: [1, 4]})
    with pytest.raises(ValueError, match="names has labels \\[2\\] that token_map lacks"):
        Prompt("a cat", (0, 10, 20, 2), {1: [1]}, names={1: "a", 2: "b"})
    with pytest.raises(ValueError, match=r"label 1: span \[0, 9\)"):
        Prompt("a cat", (0, 10, 20, 2), {1: [1]}, spans={1: [[0, 9]]})
    with pytest.raises(TypeError, match="labels must be ints"):
        Prompt("a cat", (0, 10, 20, 2), {"1": [1]})
    with pytest.raises(ValueError, match="input_ids"):
        Prompt("a cat", (), {})


def test_label_map_is_a_read_only_mapping():
    m = LabelMap({2: "b", 1: "a"})
    assert list(m) == [2, 1] and m == {1: "a", 2: "b"} and len(m) == 2
    assert hash(m) == hash(LabelMap([(2, "b"), (1, "a")]))
    with pytest.raises(AttributeError):
        m.x = 1


# ---------------------------------------------------------------------------------------------
# spans -> tokens on real tokenizers


# The 80 COCO category names in category-id order (contiguous labels 1..80).
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
    "teddy_bear hair_drier toothbrush"
).split()


def test_coco_prompt_tokens(gpt2):
    (prompt,) = PromptBuilder(gpt2).chunks(COCO_NAMES)
    assert prompt.caption == category_caption(COCO_NAMES)[0]
    tokens = gpt2(prompt.caption).tokens()
    assert prompt.token_map[1] == (1,) and tokens[1] == "person"
    assert [tokens[i] for i in prompt.token_map[2]] == ["Ġbicycle"]
    # "traffic light": every BPE token of both words, and nothing else.
    assert gpt2.convert_tokens_to_string([tokens[i] for i in prompt.token_map[10]]) == " traffic light"
    # Every token is either special, a separator ("." / space), or owned by exactly one label.
    owned = [i for indices in prompt.token_map.values() for i in indices]
    assert len(owned) == len(set(owned))
    for i, token in enumerate(tokens):
        assert (token not in (".", "Ġ", "Ġ.")) if i in owned else (token in ("<s>", "</s>", ".", "Ġ."))
    assert prompt.names[10] == "traffic_light"  # the raw name, for people


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_spans_and_tokens_round_trip(request, name):
    """The characters of a label's tokens are exactly its (word-aligned) spans, on both vocabularies."""
    tokenizer = request.getfixturevalue(name)
    captions = [(CHELSEA, CHELSEA_SPANS),
                ("a cat and a dog on a remote control", {1: [[2, 5], [12, 15]], 2: [[21, 35]]}),
                category_caption(["bow_(weapon)", "traffic_light", "hair_drier"])]
    builder = PromptBuilder(tokenizer)
    for caption, spans in captions:
        prompt = builder.build(caption, spans)
        offsets = tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
        assert list(prompt.input_ids) == tokenizer(caption)["input_ids"]
        for label, label_spans in prompt.spans.items():
            covered = sorted({c for i in prompt.token_map[label] for c in range(*offsets[i])})
            expected = sorted({c for s, e in label_spans for c in range(s, e) if not caption[c].isspace()})
            assert covered == expected, (name, caption, label)


def test_trailing_space_name_maps_to_its_word(gpt2):
    prompt = PromptBuilder(gpt2).build(*category_caption(["bow_(weapon)", "arrow"]))
    tokens = gpt2(prompt.caption).tokens()
    assert [tokens[i] for i in prompt.token_map[1]] == ["bow"]
    assert [tokens[i] for i in prompt.token_map[2]] == ["Ġarrow"]


def test_inference_maps_use_the_whole_caption(bert):
    caption, spans = category_caption([f"thing{i}" for i in range(120)])  # far over 256 WordPiece tokens
    prompt = PromptBuilder(bert, max_length=1000).build(caption, spans)
    assert max(prompt.token_map[120]) > 256
    assert bert.convert_ids_to_tokens(prompt.input_ids[prompt.token_map[120][0]]) == "thing"
    with pytest.raises(ValueError, match=r"label 81 \('thing80'\) lies past the first 255 tokens"):
        PromptBuilder(bert).build(caption, spans)


def test_training_maps_use_the_truncated_caption(gpt2):
    caption = "a cat and a dog"  # <s> a Ġcat Ġand Ġa Ġdog </s>
    builder = PromptBuilder(gpt2, max_length=4)  # <s> a Ġcat </s>
    prompt = builder.build(caption, {1: [[2, 5]], 2: [[12, 15]], 3: [[2, 15]]}, training=True)
    assert prompt.input_ids == tuple(gpt2(caption)["input_ids"][:3]) + (gpt2.eos_token_id,)
    assert prompt.token_map == {1: (2,), 2: (), 3: ()}  # past the cut: nothing, as upstream's training maps
    assert prompt.positive_map([2, 1, 1], 6).tolist() == [[0] * 6, [0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="label 2 .*lies past the first 3 tokens"):
        builder.build(caption, {1: [[2, 5]], 2: [[12, 15]]})


def test_bad_spans_and_tokenizers_are_named(gpt2):
    builder = PromptBuilder(gpt2)
    with pytest.raises(ValueError, match="label 2: spans .*resolve to no token"):
        builder.build("cat.    dog", {1: [[0, 3]], 2: [[4, 7]]})
    with pytest.raises(ValueError, match=r"label 5: span \[0, 12\).*'cat. dog'"):
        builder.build("cat. dog", {5: [[0, 12]]})
    with pytest.raises(ValueError, match="empty"):
        builder.build("   ", {})
    with pytest.raises(ValueError, match="not a fast"):
        PromptBuilder(ByT5Tokenizer())
    with pytest.raises(ValueError, match="box 1: label 7 is not a label"):
        builder.build("a cat", {1: [[2, 5]]}).positive_map([1, 7], 8)


# ---------------------------------------------------------------------------------------------
# batching token ids


def test_collate_equals_the_official_tokenizer_call(gpt2):
    captions = ["a cat.", "a remote control on a table.", " ".join(["word"] * 80)]
    builder = PromptBuilder(gpt2, max_length=64)
    prompts = [builder.build(c) for c in captions]
    input_ids, attention_mask = collate_prompts(prompts, gpt2.pad_token_id, 64)
    official = gpt2(captions, max_length=64, padding="max_length", truncation=True, return_tensors="pt")
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert torch.equal(input_ids, official["input_ids"]) and torch.equal(attention_mask, official["attention_mask"])
    assert attention_mask.sum(1).tolist() == [5, 9, 64] and input_ids[2, -1].item() == gpt2.eos_token_id
    longest, mask = collate_prompts(prompts[:2], gpt2.pad_token_id, 64, pad_to_max=False)
    assert longest.shape == (2, 9) and torch.equal(longest, input_ids[:2, :9]) and torch.equal(mask, attention_mask[:2, :9])


def test_collate_rejects_what_the_model_cannot_read(gpt2):
    prompt = PromptBuilder(gpt2, max_length=64).build("a cat " * 40)
    with pytest.raises(ValueError, match="prompt 1 has 64 tokens but the model reads 32"):
        collate_prompts([PromptBuilder(gpt2, max_length=32).build("a cat"), prompt], 0, 32)
    with pytest.raises(TypeError, match="prompt 0 is a str, not a Prompt"):
        collate_prompts(["a cat"], 0, 32)
    with pytest.raises(ValueError, match="no prompt"):
        collate_prompts([], 0, 32)


# ---------------------------------------------------------------------------------------------
# against the official golden fixture


def test_token_ids_and_maps_match_the_reference(fixture_v2, fixture_tokenizer_dir):
    inputs = fixture_v2["inputs"]
    builder = PromptBuilder(build_tokenizer(fixture_tokenizer_dir), max_length=256)
    prompts = [builder.build(c) for c in inputs["captions"]]
    input_ids, attention_mask = collate_prompts(prompts, 1, 256)
    assert torch.equal(input_ids, inputs["input_ids"]) and torch.equal(attention_mask, inputs["attention_mask"])
    # inference: the per-phrase label -> token map of the official grounding evaluation
    per_image = inputs["per_image"][0]
    phrases = {k + 1: p["char_spans"] for k, p in enumerate(per_image["phrases"])}
    prompt = builder.build(per_image["caption"], phrases)
    assert prompt.token_map == {1: (1, 2, 3, 4, 5), 2: (9, 10, 11, 12), 3: (14, 15, 16, 17, 18)}
    assert prompt.token_map == {k: tuple(v) for k, v in per_image["positive_map_label_to_token"].items()}
    assert torch.equal(prompt.positive_map(prompt.labels, 256), (per_image["positive_map_eval"] > 0).float())
    # training: the boxes' binary token map the official collator feeds to the loss
    caption = grounding_prompt(inputs["captions"][0], fixture_v2["targets"][0]["tokens_positive"])
    train = builder.build(caption.caption, caption.spans, training=True)
    assert torch.equal(train.positive_map(caption.box_labels, 256), inputs["positive_map_train"])


# ---------------------------------------------------------------------------------------------
# vocabulary chunks


def test_a_vocabulary_that_fits_stays_one_prompt(gpt2):
    (single,) = PromptBuilder(gpt2).chunks(COCO_NAMES)
    assert single.caption == category_caption(COCO_NAMES)[0] and _length(gpt2, single.caption) <= 256
    split = PromptBuilder(gpt2, max_length=100).chunks(COCO_NAMES)
    assert len(split) >= 2 and all(_length(gpt2, c.caption) <= 100 for c in split)
    assert [k for c in split for k in c.labels] == list(range(1, 81))


@given(
    names=st.lists(WORD, min_size=1, max_size=200),
    chunk_size=st.sampled_from([0, 7, 40]),
    max_tokens=st.sampled_from([48, 256]),
)
@HYPOTHESIS
def test_chunking_covers_every_category_once_within_budget(gpt2, names, chunk_size, max_tokens):
    ids = sorted(random.Random(len(names)).sample(range(1, 5000), len(names)))  # LVIS-like sparse ids
    vocabulary = dict(zip(reversed(ids), reversed(names)))  # unsorted mapping on purpose
    chunks = PromptBuilder(gpt2, max_length=max_tokens).chunks(vocabulary, chunk_size)
    assert [label for chunk in chunks for label in chunk.labels] == ids  # each once, sorted, global
    for chunk in chunks:
        assert _length(gpt2, chunk.caption) <= max_tokens and chunk.num_tokens <= max_tokens
        if chunk_size:
            assert len(chunk.labels) <= chunk_size
        for label, ((start, end),) in chunk.spans.items():
            assert chunk.caption[start:end] == clean_name(vocabulary[label])
            assert chunk.names[label] == vocabulary[label] and chunk.token_map[label]


def test_lvis_sized_vocabulary_gives_31_chunks(gpt2):
    names = {i: f"cat_{i}_(x)" for i in range(1, 1204)}
    chunks = PromptBuilder(gpt2).chunks(names, chunk_size=40)
    assert len(chunks) == 31 and chunks[0].labels == tuple(range(1, 41))
    assert chunks[-1].labels == (1201, 1202, 1203)


def test_chunks_take_caption_prompts(gpt2):
    wrap = [{"prefix": "a ", "name": "fish", "suffix": " underwater"}, {}, {"name": "jelly fish"}]
    chunks = PromptBuilder(gpt2).chunks(["fish", "shark", "jellyfish"], chunk_size=2, caption_prompt=wrap)
    assert [c.caption for c in chunks] == ["a fish underwater. shark", "jelly fish"]
    assert chunks[0].spans[1] == ((2, 6),) and chunks[1].labels == (3,)
    with pytest.raises(ValueError, match="caption_prompt has 1 entries"):
        PromptBuilder(gpt2).chunks(["fish", "shark"], caption_prompt=wrap[:1])


def test_a_name_that_alone_does_not_fit_is_named(gpt2):
    with pytest.raises(ValueError, match="'very long name indeed' \\(label 2\\) alone exceeds 5 tokens"):
        PromptBuilder(gpt2, max_length=5).chunks(["cat", "very long name indeed"])


# ---------------------------------------------------------------------------------------------
# the builder of a config


def test_builder_from_config_checks_the_text_tower():
    builder = PromptBuilder(tiny_cfg())
    assert builder.max_length == 64 and builder.separator == ". " and builder.tokenizer.pad_token_id == 50260
    assert PromptBuilder(tiny_cfg()).tokenizer is builder.tokenizer  # loaded once per folder
    with pytest.raises(ValueError, match="PAD_TOKEN_ID = 1 but tokenizer .* pads with id 50260"):
        PromptBuilder(tiny_cfg(MODEL__FIBER__TEXT__PAD_TOKEN_ID=1))
    with pytest.raises(ValueError, match="50262 tokens > MODEL.FIBER.TEXT.VOCAB_SIZE 1000"):
        PromptBuilder(tiny_cfg(MODEL__FIBER__TEXT__VOCAB_SIZE=1000))
    with pytest.raises(ValueError, match="TOKENIZER is empty"):
        PromptBuilder(tiny_cfg(MODEL__FIBER__TEXT__TOKENIZER=""))


# ---------------------------------------------------------------------------------------------
# phrases of grounding records


def test_grounding_phrases_and_their_annotations():
    record = {"tokens_positive_eval": [[[0, 5]], [[10, 15], [20, 25]]],
              "annotations": [{"tokens_positive": [[0, 3]]}, {"tokens_positive": [[24, 30]]},
                              {"tokens_positive": [[5, 10]]}]}
    phrases = grounding_phrases(record)
    assert phrases == [[[0, 5]], [[10, 15], [20, 25]]]
    # overlap = at least one shared character; [5, 10) touches neither phrase
    assert phrase_annotations(record, phrases) == [[0], [1]]
    without_eval = {"annotations": [{"tokens_positive": [[4, 8]]}, {"tokens_positive": []},
                                    {"tokens_positive": [[4, 8]]}, {"tokens_positive": [[0, 2]]}]}
    assert grounding_phrases(without_eval) == [[[4, 8]], [[0, 2]]]  # distinct, non-empty, first-seen order
    assert phrase_annotations({"annotations": [{"bbox": [0, 0, 1, 1]}]}, phrases) is None
