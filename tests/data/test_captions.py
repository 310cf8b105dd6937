"""Tests of fiber_det.data.captions: name cleaning, category captions and their spans."""
import doctest

import pytest

from fiber_det.data import captions
from fiber_det.data.captions import category_caption, clean_name, labelled_names


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
        ("bow_(weapon)", "bow "),  # trailing space kept, as in the official LVIS prompts
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
# category_caption


def test_coco_prompt_text_and_spans():
    assert len(COCO_NAMES) == 80
    caption, spans = category_caption(COCO_NAMES)
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
    caption, spans = category_caption(names)
    assert caption == "person. traffic light. toothbrush"
    assert list(spans) == [1, 10, 90] and spans[90] == [[23, 33]]
    caption, spans = category_caption(names, sort_labels=False, separator=" , ")
    assert caption == "toothbrush , person , traffic light"
    assert list(spans) == [90, 1, 10] and spans[1] == [[13, 19]]


def test_lvis_style_names_are_cleaned():
    caption, spans = category_caption({3: "bow_(weapon)", 7: "arrow"})
    assert caption == "bow . arrow"
    assert spans == {3: [[0, 4]], 7: [[6, 11]]}


def test_caption_prompt_span_covers_only_the_name():
    caption_prompt = [
        {"prefix": "there is a ", "name": "fish", "suffix": " in the water"},
        {"prefix": "", "name": "jelly fish", "suffix": ""},
    ]
    caption, spans = category_caption(["fish", "jellyfish"], caption_prompt=caption_prompt)
    assert caption == "there is a fish in the water. jelly fish"
    assert spans == {1: [[11, 15]], 2: [[30, 40]]}
    with pytest.raises(ValueError, match="caption_prompt has 1 entries but there are 2"):
        category_caption(["fish", "jellyfish"], caption_prompt=caption_prompt[:1])


@pytest.mark.parametrize(
    "names, error", [([], ValueError), ({"1": "cat"}, TypeError), ("cat", TypeError), ([3], TypeError)]
)
def test_bad_names(names, error):
    with pytest.raises(error):
        category_caption(names)


def test_labelled_names_of_lists_and_mappings():
    assert labelled_names(["cat", "dog"]) == [(1, "cat"), (2, "dog")]
    assert labelled_names({7: "b", 3: "a"}) == [(3, "a"), (7, "b")]
    assert labelled_names({7: "b", 3: "a"}, sort_labels=False) == [(7, "b"), (3, "a")]


def test_docstring_examples_run():
    results = doctest.testmod(captions)
    assert results.attempted > 0 and results.failed == 0
