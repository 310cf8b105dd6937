"""LVISFixedAPEvaluator: per-category top-k over the dataset, tie order, zero-area boxes, AP by hand."""
import json

import pytest
from test_coco import make_instances, register_json

from fiber_det.evaluation import LVISFixedAPEvaluator, select_fixed_ap_detections
from fiber_det.evaluation.lvis import LVIS_RESULTS_FILE


def _image(image_id, neg, not_exhaustive=()):
    return {"id": image_id, "width": 100, "height": 100, "file_name": f"{image_id}.jpg",
            "neg_category_ids": list(neg), "not_exhaustive_category_ids": list(not_exhaustive)}


# apple (rare, id 1, small box), bowl (common, id 2, medium), cup (frequent, id 5, large).
# Image 1 has no box; bowl is known absent there, apple is unknown (neither positive nor negative).
LVIS_GT = {
    "images": [_image(1, neg=[2]), _image(2, neg=[5]), _image(3, neg=[1])],
    "categories": [{"id": 1, "name": "apple", "frequency": "r"}, {"id": 2, "name": "bowl", "frequency": "c"},
                   {"id": 5, "name": "cup", "frequency": "f"}],
    "annotations": [
        {"id": 1, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [40, 40, 40, 40], "area": 1600},
        {"id": 3, "image_id": 3, "category_id": 5, "bbox": [0, 0, 99, 99], "area": 9801},
    ],
}
APPLE, BOWL, CUP = [10, 10, 30, 30], [40, 40, 80, 80], [0, 0, 99, 99]  # xyxy, no "+1"


@pytest.fixture
def lvis_dataset(tmp_path):
    return register_json(tmp_path, LVIS_GT, "lvis", thing_classes=["apple", "bowl", "cup"],
                         thing_dataset_id_to_contiguous_id={1: 0, 2: 1, 5: 2})


def run(evaluator, per_image):
    """Feeds ``{image_id: Instances}`` in the dict's order; returns the "bbox" metrics."""
    evaluator.reset()
    for image_id, inst in per_image.items():
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    return evaluator.evaluate()["bbox"]


def predictions(apple_score=0.9):
    return {2: make_instances([APPLE, BOWL], [apple_score, 0.8], [1, 2]), 3: make_instances([CUP], [0.7], [3])}


def test_perfect_predictions(lvis_dataset, tmp_path):
    out = tmp_path / "out"
    bbox = run(LVISFixedAPEvaluator(lvis_dataset, output_dir=str(out), distributed=False), predictions())
    assert list(bbox) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
                          "AR@-1", "ARs@-1", "ARm@-1", "ARl@-1"]
    for key, value in bbox.items():
        assert value == pytest.approx(100.0), key
    dumped = json.loads((out / LVIS_RESULTS_FILE).read_text())
    assert [(d["image_id"], d["category_id"], d["bbox"]) for d in dumped] == [
        (2, 1, [10, 10, 20, 20]), (2, 2, [40, 40, 40, 40]), (3, 5, [0, 0, 99, 99])]


def test_one_wrong_box(lvis_dataset):
    preds = predictions()
    preds[2] = make_instances([APPLE, [0, 60, 10, 70]], [0.9, 0.8], [1, 2])  # the bowl box misses
    bbox = run(LVISFixedAPEvaluator(lvis_dataset, distributed=False), preds)
    assert bbox["AP"] == pytest.approx(200 / 3)
    assert bbox["APc"] == pytest.approx(0.0) and bbox["APr"] == pytest.approx(100.0)
    assert bbox["APm"] == pytest.approx(0.0)  # the bowl is the only medium GT box
    assert bbox["APs"] == pytest.approx(100.0) and bbox["APl"] == pytest.approx(100.0)
    # recall: apple and cup found at every IoU threshold, bowl at none
    assert bbox["AR@-1"] == pytest.approx(200 / 3)
    assert (bbox["ARs@-1"], bbox["ARm@-1"], bbox["ARl@-1"]) == pytest.approx((100.0, 0.0, 100.0))


def test_recall_over_iou_thresholds(lvis_dataset):
    # the cup box covers 62 of the GT's 99 rows: IoU 62/99 = 0.626 matches at IoU 0.50, 0.55 and
    # 0.60 only, so the cup's recall (and AP) is 3 of the 10 thresholds
    preds = predictions()
    preds[3] = make_instances([[0, 0, 99, 62]], [0.7], [3])
    bbox = run(LVISFixedAPEvaluator(lvis_dataset, distributed=False), preds)
    assert bbox["ARl@-1"] == pytest.approx(30.0) and bbox["APf"] == pytest.approx(30.0)
    assert bbox["AR@-1"] == pytest.approx((100 + 100 + 30) / 3)
    assert bbox["AP50"] == pytest.approx(100.0) and bbox["AP75"] == pytest.approx(200 / 3)


def test_image_without_predictions(lvis_dataset):
    preds = predictions()
    preds[3] = make_instances([], [], [])
    bbox = run(LVISFixedAPEvaluator(lvis_dataset, distributed=False), preds)
    assert bbox["AP"] == pytest.approx(200 / 3) and bbox["APf"] == pytest.approx(0.0)


def test_topk_tie_keeps_earlier_image_before_federated_filtering(lvis_dataset):
    # image 1's apple box ties with the correct one on image 2; fed in reverse image order
    preds = {3: predictions()[3], 2: predictions()[2], 1: make_instances([[50, 50, 60, 60]], [0.9], [1])}
    bbox = run(LVISFixedAPEvaluator(lvis_dataset, topk=1, distributed=False), preds)
    # image 1 wins the single apple slot; apple is unknown on image 1, so the box is then ignored
    assert bbox["APr"] == pytest.approx(0.0) and bbox["AP"] == pytest.approx(200 / 3)
    assert run(LVISFixedAPEvaluator(lvis_dataset, topk=2, distributed=False), preds)["AP"] == pytest.approx(100.0)
    preds[2] = predictions(apple_score=0.95)[2]  # no tie: the higher score wins the slot
    assert run(LVISFixedAPEvaluator(lvis_dataset, topk=1, distributed=False), preds)["AP"] == pytest.approx(100.0)


def test_zero_area_boxes_are_dropped_after_the_cap(lvis_dataset, tmp_path):
    preds = predictions()
    preds[2] = make_instances([[10, 10, 10, 30], APPLE, BOWL], [0.99, 0.9, 0.8], [1, 1, 2])
    out = tmp_path / "out"
    assert run(LVISFixedAPEvaluator(lvis_dataset, output_dir=str(out), distributed=False), preds)["AP"] == \
        pytest.approx(100.0)  # an FP ranked first would lower the apple AP
    assert all(d["bbox"][2] * d["bbox"][3] > 0 for d in json.loads((out / LVIS_RESULTS_FILE).read_text()))
    # with one slot per category the zero-area box takes the apple slot, then is dropped
    assert run(LVISFixedAPEvaluator(lvis_dataset, topk=1, distributed=False), preds)["APr"] == pytest.approx(0.0)


def test_select_fixed_ap_detections_order_and_errors(lvis_dataset):
    results = [{"image_id": i, "category_id": c, "bbox": [0, 0, 1, 1], "score": s}
               for i, c, s in [(1, 7, 0.5), (1, 8, 0.1), (2, 7, 0.5), (2, 7, 0.6), (3, 8, 0.2)]]
    kept = select_fixed_ap_detections(results, topk=2)
    assert kept == [results[0], results[1], results[3], results[4]]  # input order, tie -> image 1
    with pytest.raises(ValueError, match="topk"):
        select_fixed_ap_detections(results, topk=0)
    evaluator = LVISFixedAPEvaluator(lvis_dataset, distributed=False)
    with pytest.raises(ValueError, match="contiguous ids"):
        evaluator.process([{"image_id": 2}], [{"instances": make_instances([APPLE], [0.9], [4])}])
    with pytest.raises(ValueError, match="not in the LVIS json"):
        evaluator.score_results([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])


def test_build_from_config(lvis_dataset):
    from detectron2.config import get_cfg

    from fiber_det import add_fiber_config
    from fiber_det.evaluation import build_evaluator

    cfg = add_fiber_config(get_cfg())
    cfg.TEST.LVIS_TOPK_PER_CATEGORY = 1
    evaluator = build_evaluator(cfg, lvis_dataset)
    assert isinstance(evaluator, LVISFixedAPEvaluator) and evaluator._topk == 1
