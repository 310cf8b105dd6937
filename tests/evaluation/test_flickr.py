"""FlickrRecallEvaluator on hand-written Flickr30k Entities files: ANY vs MERGED, types, alignment."""
import json

import pytest
import torch
from test_coco import make_instances

from detectron2.structures import BoxMode
from fiber_det.evaluation import FlickrRecallEvaluator
from fiber_det.evaluation.flickr import (
    FLICKR_PREDICTIONS_FILE, parse_flickr_boxes, parse_flickr_sentences, phrase_hits, rank_phrase_boxes,
)

SENTENCES = """[/EN#1/people Two men] play [/EN#2/instruments/other a guitar] near [/EN#3/scene a wall] .
[/EN#4/notvisual Nobody] is near [/EN#3/scene the wall] .
[/EN#1/people The men] smile .
[/EN#2/instruments The guitar] is old .
"""
A, B, G = [10, 10, 50, 90], [120, 10, 160, 90], [60, 40, 100, 60]  # entity 1 = A + B, entity 2 = G
XML = """<annotation>
  <filename>100.jpg</filename>
  <size><width>200</width><height>100</height><depth>3</depth></size>
  <object><name>1</name><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>50</xmax><ymax>90</ymax></bndbox></object>
  <object><name>1</name><bndbox><xmin>120</xmin><ymin>10</ymin><xmax>160</xmax><ymax>90</ymax></bndbox></object>
  <object><name>2</name><name>5</name>
    <bndbox><xmin>60</xmin><ymin>40</ymin><xmax>100</xmax><ymax>60</ymax></bndbox></object>
  <object><name>3</name><nobndbox>0</nobndbox><scene>1</scene></object>
  <object><name>4</name><nobndbox>1</nobndbox><scene>0</scene></object>
</annotation>
"""


def _xywh(box):
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _image(image_id, sentence_id, caption, phrases):
    return {"id": image_id, "file_name": "100.jpg", "height": 100, "width": 200, "caption": caption,
            "dataset_name": "flickr", "sentence_id": sentence_id, "original_img_id": 100,
            "tokens_positive_eval": phrases, "tokens_negative": []}


def _ann(ann_id, image_id, box, spans):
    return {"id": ann_id, "image_id": image_id, "bbox": _xywh(box), "area": 1, "iscrowd": 0, "category_id": 1,
            "tokens_positive": spans}


# MDETR-format json of the four sentences (entries 11..14); sentence 1 has no phrase with a box
FLICKR_JSON = {
    "images": [
        _image(11, 0, "Two men play a guitar near a wall .", [[[0, 7]], [[13, 21]]]),
        _image(12, 1, "Nobody is near the wall .", []),
        _image(13, 2, "The men smile .", [[[0, 7]]]),
        _image(14, 3, "The guitar is old .", [[[0, 10]]]),
    ],
    "annotations": [
        _ann(1, 11, A, [[0, 7]]), _ann(2, 11, B, [[0, 7]]), _ann(3, 11, G, [[13, 21]]),
        _ann(4, 13, A, [[0, 7]]), _ann(5, 13, B, [[0, 7]]), _ann(6, 14, G, [[0, 10]]),
    ],
    "categories": [{"id": 1, "name": "object"}],
}


def wrong(i):
    return [170 + i, 0, 199, 30]  # overlaps no GT box (nor the merged box of entity 1)


# E11: phrase 1 hit at rank 1; phrase 2 hit at rank 6; a label-3 box (no such phrase) is not used.
# E12: skipped sentence. E13: the right box at rank 11 (upper bound only). E14: no detection.
PREDICTIONS = {
    11: ([A] + [wrong(i) for i in range(5)] + [G, A], [0.9, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.95], [1] + [2] * 6 + [3]),
    12: ([A], [0.9], [1]),
    13: ([wrong(i) for i in range(10)] + [A], [0.9 - 0.05 * i for i in range(10)] + [0.1], [1] * 11),
    14: ([], [], []),
}
ANY = {"R@1": 25, "R@5": 25, "R@10": 50, "UB": 75,
       "R@1/people": 50, "R@5/people": 50, "R@10/people": 50, "UB/people": 100,
       "R@1/instruments": 0, "R@5/instruments": 0, "R@10/instruments": 50, "UB/instruments": 50,
       "R@1/other": 0, "R@5/other": 0, "R@10/other": 100, "UB/other": 100}
# MERGED: entity 1's union box [10, 10, 160, 90] has IoU 0.27 with A, so only the guitar phrase counts
MERGED = {"R@1": 0, "R@5": 0, "R@10": 25, "UB": 25,
          "R@1/people": 0, "R@5/people": 0, "R@10/people": 0, "UB/people": 0,
          "R@1/instruments": 0, "R@5/instruments": 0, "R@10/instruments": 50, "UB/instruments": 50,
          "R@1/other": 0, "R@5/other": 0, "R@10/other": 100, "UB/other": 100}


@pytest.fixture
def flickr_root(tmp_path):
    root = tmp_path / "flickr30k"
    (root / "Annotations").mkdir(parents=True)
    (root / "Sentences").mkdir()
    (root / "Annotations" / "100.xml").write_text(XML)
    (root / "Sentences" / "100.txt").write_text(SENTENCES)
    return root


def dataset_dicts(data=FLICKR_JSON):
    """The grounding dataset dicts of the json (what the loader and mapper pass through)."""
    dicts = []
    for img in data["images"]:
        anns = [{"bbox": a["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 0,
                 "tokens_positive": a["tokens_positive"]} for a in data["annotations"] if a["image_id"] == img["id"]]
        dicts.append({"image_id": img["id"], "height": 100, "width": 200, "task": "grounding", "annotations": anns,
                      **{k: img[k] for k in ("caption", "tokens_positive_eval", "dataset_name", "sentence_id",
                                              "original_img_id")}})
    return dicts


def run(evaluator, dicts=None):
    evaluator.reset()
    for record in dicts or dataset_dicts():
        evaluator.process([record], [{"instances": make_instances(*PREDICTIONS[record["image_id"]], size=(100, 200))}])
    return evaluator.evaluate()["grounding"]


def _prefixed(expected, prefix):
    return {prefix + k: v for k, v in expected.items()}


def test_official_annotations_any_and_merged(flickr_root, tmp_path):
    out = tmp_path / "out"
    results = run(FlickrRecallEvaluator("flickr_test", annotations_root=str(flickr_root), output_dir=str(out),
                                        distributed=False))
    assert results == pytest.approx({**ANY, **_prefixed(MERGED, "merged_")})
    assert list(results)[:4] == ["R@1", "R@5", "R@10", "UB"]
    dump = json.loads((out / FLICKR_PREDICTIONS_FILE).read_text())
    assert dump["task"] == "flickr" and dump["flickr_gt_type"] == "separate"
    assert [p["image_id"] for p in dump["predictions"]] == [11, 12, 13, 14]
    assert dump["predictions"][0]["labels"] == PREDICTIONS[11][2]


def test_merged_gt_type_swaps_the_headline(flickr_root):
    results = run(FlickrRecallEvaluator("flickr_test", gt_type="merged", annotations_root=str(flickr_root),
                                        distributed=False))
    assert results == pytest.approx({**MERGED, **_prefixed(ANY, "any_")})


def test_gt_from_json_spans(flickr_root):
    results = run(FlickrRecallEvaluator("flickr_test", distributed=False))
    # same boxes as the xml; no phrase types without the Sentences files
    assert results == pytest.approx({k: v for k, v in {**ANY, **_prefixed(MERGED, "merged_")}.items() if "/" not in k})


def test_alignment_mismatch_raises(flickr_root):
    dicts = dataset_dicts()
    dicts[0]["tokens_positive_eval"] = [[[0, 7]]]  # the sentence has two phrases with boxes
    evaluator = FlickrRecallEvaluator("flickr_test", annotations_root=str(flickr_root), distributed=False)
    with pytest.raises(ValueError, match="aligned by order"):
        run(evaluator, dicts)


def test_file_parsers(flickr_root):
    sentences = parse_flickr_sentences(str(flickr_root / "Sentences" / "100.txt"))
    assert len(sentences) == 4
    assert [(p["phrase_id"], p["phrase_type"], p["first_word_index"], p["phrase"]) for p in sentences[0]] == [
        ("1", ["people"], 0, "Two men"), ("2", ["instruments", "other"], 3, "a guitar"), ("3", ["scene"], 6, "a wall")]
    assert parse_flickr_boxes(str(flickr_root / "Annotations" / "100.xml")) == {"1": [A, B], "2": [G], "5": [G]}
    bad = flickr_root / "Sentences" / "bad.txt"
    bad.write_text("[/EN#1/people A man in a shirt .\n")
    with pytest.raises(ValueError, match="not closed"):
        parse_flickr_sentences(str(bad))


def test_ranking_dummy_and_empty_list():
    ranked = rank_phrase_boxes({"image_id": 1, "boxes": [A, G, B], "scores": [0.2, 0.9, 0.5], "labels": [1, 2, 1]}, 2)
    assert ranked[0].tolist() == [[float(v) for v in B], [float(v) for v in A], [0.0, 0.0, 0.0, 0.0]]
    assert ranked[1].dtype == torch.float64 and len(ranked[1]) == 2
    assert rank_phrase_boxes(None, 1)[0].tolist() == [[0.0, 0.0, 0.0, 0.0]]
    gt = torch.tensor([A], dtype=torch.float64)
    assert not any(phrase_hits(torch.zeros(0, 4, dtype=torch.float64), gt).values())
    assert phrase_hits(ranked[0], gt) == {"R@1": False, "R@5": True, "R@10": True, "UB": True}


def test_bad_configuration(tmp_path):
    with pytest.raises(ValueError, match="flickr_gt_type"):
        FlickrRecallEvaluator("flickr_test", gt_type="union")
    with pytest.raises(FileNotFoundError, match="Annotations"):
        FlickrRecallEvaluator("flickr_test", annotations_root=str(tmp_path))


def test_build_from_metadata(flickr_root):
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    from fiber_det import add_fiber_config
    from fiber_det.evaluation import build_evaluator

    cfg = add_fiber_config(get_cfg())
    MetadataCatalog.get("test_flickr_merged").set(evaluator_type="flickr", flickr_gt_type="merged",
                                                  flickr_annotations_root=str(flickr_root))
    results = run(build_evaluator(cfg, "test_flickr_merged"))
    assert results == pytest.approx({**MERGED, **_prefixed(ANY, "any_")})
    MetadataCatalog.get("test_flickr_untyped").set(evaluator_type="flickr")
    with pytest.raises(ValueError, match="flickr_gt_type"):
        build_evaluator(cfg, "test_flickr_untyped")
