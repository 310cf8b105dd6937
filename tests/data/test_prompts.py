"""Tests of fiber_det.data.prompts: name cleaning, detection prompts, label -> token maps."""
import doctest

import pytest
from transformers import ByT5Tokenizer

from fiber_det.data import prompts
from fiber_det.data.prompts import build_detection_prompt, build_label_to_tokens, clean_name


# The 80 COCO category names in category-id order (contiguous labels 1..80).
COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# clean_name


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("bow_(weapon)", "bow "),  # trailing space kept (spec §7.6)
        ("traffic light", "traffic light"),
        ("hair_drier", "hair drier"),
        ("a_(b)_c_(d)", "a "),  # greedy: from the first "(" to the last ")"
        ("x___y", "x  y"),  # a single pass of "  " -> " " leaves one double space
        ("__background__", " background "),
    ],
)
def test_clean_name(raw, cleaned):
    assert clean_name(raw) == cleaned


# ---------------------------------------------------------------------------------------------
# build_detection_prompt


def test_coco_prompt_text_and_spans():
    assert len(COCO_NAMES) == 80
    caption, spans = build_detection_prompt(COCO_NAMES)
    assert caption.startswith(
        "person. bicycle. car. motorcycle. airplane. bus. train. truck. boat. traffic light. "
    )
    assert caption.endswith("teddy bear. hair drier. toothbrush")  # no trailing separator
    assert list(spans) == list(range(1, 81))
    assert spans[1] == [[0, 6]] and spans[2] == [[8, 15]]
    for label, name in enumerate(COCO_NAMES, start=1):
        (start, end), = spans[label]
        assert caption[start:end] == name


def test_mapping_is_sorted_by_label_unless_asked_not_to():
    names = {90: "toothbrush", 1: "person", 10: "traffic light"}
    caption, spans = build_detection_prompt(names)
    assert caption == "person. traffic light. toothbrush"
    assert list(spans) == [1, 10, 90] and spans[90] == [[23, 33]]
    caption, spans = build_detection_prompt(names, sort_labels=False, separator=" , ")
    assert caption == "toothbrush , person , traffic light"
    assert list(spans) == [90, 1, 10] and spans[1] == [[13, 19]]


def test_lvis_style_names_are_cleaned():
    caption, spans = build_detection_prompt({3: "bow_(weapon)", 7: "arrow"})
    assert caption == "bow . arrow"
    assert spans == {3: [[0, 4]], 7: [[6, 11]]}


def test_caption_prompt_span_covers_only_the_name():
    caption_prompt = [
        {"prefix": "there is a ", "name": "fish", "suffix": " in the water"},
        {"prefix": "", "name": "jelly fish", "suffix": ""},
    ]
    caption, spans = build_detection_prompt(["fish", "jellyfish"], caption_prompt=caption_prompt)
    assert caption == "there is a fish in the water. jelly fish"
    assert spans == {1: [[11, 15]], 2: [[30, 40]]}
    with pytest.raises(ValueError, match="caption_prompt has 1 entries but there are 2"):
        build_detection_prompt(["fish", "jellyfish"], caption_prompt=caption_prompt[:1])


@pytest.mark.parametrize(
    "names, error", [([], ValueError), ({"1": "cat"}, TypeError), ("cat", TypeError), ([3], TypeError)]
)
def test_bad_names(names, error):
    with pytest.raises(error):
        build_detection_prompt(names)


# ---------------------------------------------------------------------------------------------
# build_label_to_tokens


def test_coco_label_to_tokens(gpt2):
    caption, spans = build_detection_prompt(COCO_NAMES)
    label_to_tokens = build_label_to_tokens(gpt2, caption, spans)
    encoding = gpt2(caption)
    tokens = encoding.tokens()
    assert tokens[label_to_tokens[1][0]] == "person" and label_to_tokens[1] == [1]
    assert [tokens[i] for i in label_to_tokens[2]] == ["Ġbicycle"]
    # "traffic light": every BPE token of both words, and nothing else.
    assert gpt2.convert_tokens_to_string([tokens[i] for i in label_to_tokens[10]]) == " traffic light"
    assert len(label_to_tokens[10]) >= 2
    # Every token is either special, a separator ("." / space), or owned by exactly one label.
    owned = [i for indices in label_to_tokens.values() for i in indices]
    assert len(owned) == len(set(owned))
    for i, token in enumerate(tokens):
        if i in owned:
            assert token not in (".", "Ġ", "Ġ.")
        else:
            assert token in ("<s>", "</s>", ".", "Ġ.")


def test_label_to_tokens_uses_the_untruncated_caption(bert):
    names = [f"thing{i}" for i in range(120)]  # far over 256 WordPiece tokens
    caption, spans = build_detection_prompt(names)
    label_to_tokens = build_label_to_tokens(bert, caption, spans)
    assert max(label_to_tokens[120]) > 256
    assert bert.convert_ids_to_tokens(bert(caption)["input_ids"][label_to_tokens[120][0]]) == "thing"


def test_trailing_space_name_maps_to_its_word(gpt2):
    caption, spans = build_detection_prompt(["bow_(weapon)", "arrow"])
    label_to_tokens = build_label_to_tokens(gpt2, caption, spans)
    tokens = gpt2(caption).tokens()
    assert [tokens[i] for i in label_to_tokens[1]] == ["bow"]
    assert [tokens[i] for i in label_to_tokens[2]] == ["Ġarrow"]


def test_label_without_tokens_is_named(gpt2):
    with pytest.raises(ValueError, match="label 2: spans.*resolve to no token"):
        build_label_to_tokens(gpt2, "cat.    dog", {1: [[0, 3]], 2: [[4, 7]]})


def test_label_span_outside_caption_is_named(gpt2):
    with pytest.raises(ValueError, match=r"label 5: span \[0, 12\).*'cat. dog'"):
        build_label_to_tokens(gpt2, "cat. dog", {5: [[0, 12]]})


def test_slow_tokenizer_rejected():
    with pytest.raises(ValueError, match="not a fast"):
        build_label_to_tokens(ByT5Tokenizer(), "cat", {1: [[0, 3]]})


def test_docstring_examples_run():
    results = doctest.testmod(prompts)
    assert results.attempted > 0 and results.failed == 0


COCO_RAW_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
    "teddy_bear hair_drier toothbrush"
).split()


def test_greedy_chunking_keeps_a_vocabulary_that_fits_in_one_prompt(gpt2):
    from fiber_det.data.prompts import chunk_category_prompts

    (single,) = chunk_category_prompts(COCO_RAW_NAMES, gpt2, chunk_size=0, max_tokens=256)
    assert single["caption"] == build_detection_prompt(COCO_RAW_NAMES)[0]
    assert len(gpt2(single["caption"])["input_ids"]) <= 256
    split = chunk_category_prompts(COCO_RAW_NAMES, gpt2, chunk_size=0, max_tokens=100)
    assert len(split) >= 2 and all(len(gpt2(c["caption"])["input_ids"]) <= 100 for c in split)
    assert sorted(k for c in split for k in c["label_spans"]) == list(range(1, 81))
