"""RefExpEvaluator: lexicographic tie-break, GIoU vs IoU, x2 = x + w, misses, per-dataset keys."""
import json

import pytest
from test_coco import make_instances

from detectron2.structures import BoxMode
from fiber_det.evaluation import RefExpEvaluator
from fiber_det.evaluation.refexp import REFEXP_PREDICTIONS_FILE, rank_refexp_boxes


def _image(image_id, dataset_name):
    return {"id": image_id, "file_name": f"{image_id}.jpg", "height": 100, "width": 100, "caption": "the thing",
            "dataset_name": dataset_name, "original_id": image_id, "tokens_negative": []}


# (entry id, dataset, GT xywh, predicted xyxy boxes, scores)
CASES = [
    # equal scores: [50, 50, 70, 70] ranks before the correct box (larger x1) -> P@1 miss, P@5 hit
    (1, "refcoco", [10, 10, 20, 20], [[10, 10, 30, 30], [50, 50, 70, 70]], [0.9, 0.9]),
    # diagonal shift: IoU 0.5065 >= 0.5 but GIoU 0.4600 < 0.5
    (2, "refcoco", [0, 0, 10, 10], [[1.8, 1.8, 11.8, 11.8]], [0.9]),
    # GIoU = IoU = 0.5 exactly with GT [0, 0, 10, 10] (x2 = x + w); a "-1" GT would give 0.405
    (3, "refcoco", [0, 0, 10, 10], [[0, 0, 20, 10]], [0.9]),
    (4, "refcoco", [0, 0, 10, 10], [], []),  # no prediction: a miss
    # six wrong boxes first, the right one at rank 7
    (5, "refcoco", [0, 0, 10, 10], [[50 + i, 50, 60 + i, 60] for i in range(6)] + [[0, 0, 10, 10]],
     [0.9 - 0.05 * i for i in range(6)] + [0.1]),
    (6, "refcoco+", [5, 5, 30, 40], [[5, 5, 35, 45]], [0.8]),
]
REFEXP_JSON = {
    "images": [_image(i, name) for i, name, *_ in CASES],
    "annotations": [{"id": 100 + i, "image_id": i, "bbox": gt, "area": gt[2] * gt[3], "iscrowd": 0, "category_id": 1,
                     "tokens_positive": [[0, 9]]} for i, _, gt, *_ in CASES],
    "categories": [{"id": 1, "name": "thing"}],
}
EXPECTED = {
    "refcoco_P@1": 20, "refcoco_P@5": 40, "refcoco_P@10": 60,
    "refcoco_IoU_P@1": 40, "refcoco_IoU_P@5": 60, "refcoco_IoU_P@10": 80,
    "refcoco+_P@1": 100, "refcoco+_P@5": 100, "refcoco+_P@10": 100,
    "refcoco+_IoU_P@1": 100, "refcoco+_IoU_P@5": 100, "refcoco+_IoU_P@10": 100,
}


def dataset_dicts():
    return [{"image_id": i, "height": 100, "width": 100, "dataset_name": name, "caption": "the thing",
             "tokens_positive_eval": [[[0, 9]]],
             "annotations": [{"bbox": gt, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 0,
                              "tokens_positive": [[0, 9]]}]}
            for i, name, gt, *_ in CASES]


def run(evaluator, dicts=None, cases=CASES):
    evaluator.reset()
    predictions = {i: (boxes, scores) for i, _, _, boxes, scores in cases}
    for record in dicts or dataset_dicts():
        boxes, scores = predictions[record["image_id"]]
        evaluator.process([record], [{"instances": make_instances(boxes, scores, [1] * len(scores))}])
    return evaluator.evaluate()["refexp"]


def test_precision_at_k(tmp_path):
    out = tmp_path / "out"
    results = run(RefExpEvaluator("refcoco_val", output_dir=str(out), distributed=False))
    assert results == pytest.approx(EXPECTED)
    dump = json.loads((out / REFEXP_PREDICTIONS_FILE).read_text())
    assert dump["task"] == "refexp" and [p["image_id"] for p in dump["predictions"]] == [1, 2, 3, 4, 5, 6]


def test_tie_break_changes_precision_at_1():
    cases = [c for c in CASES if c[0] == 1]
    dicts = [d for d in dataset_dicts() if d["image_id"] == 1]
    assert run(RefExpEvaluator("refcoco_val", distributed=False), dicts, cases)["refcoco_P@1"] == 0
    untied = [(1, "refcoco", [10, 10, 20, 20], cases[0][3], [0.9, 0.89])]
    assert run(RefExpEvaluator("refcoco_val", distributed=False), dicts, untied)["refcoco_P@1"] == 100


def test_rank_order():
    boxes = [[1, 5, 9, 9], [2, 0, 3, 3], [1, 6, 2, 2], [9, 9, 10, 10]]
    ranked = rank_refexp_boxes(boxes, [0.5, 0.5, 0.5, 0.4]).tolist()
    assert ranked == [[2, 0, 3, 3], [1, 6, 2, 2], [1, 5, 9, 9], [9, 9, 10, 10]]
    assert rank_refexp_boxes([], []).shape == (0, 4)


def test_dataset_name_fallback_and_bad_entries():
    dicts = [d for d in dataset_dicts() if d["image_id"] == 6]
    del dicts[0]["dataset_name"]
    assert "refcoco+_val_P@1" in run(RefExpEvaluator("refcoco+_val", distributed=False), dicts)
    dicts[0]["annotations"] = dicts[0]["annotations"] * 2
    with pytest.raises(ValueError, match="exactly one annotation"):
        run(RefExpEvaluator("refcoco+_val", distributed=False), dicts)


def test_giou_case_values():
    from torchvision.ops import box_iou, generalized_box_iou
    import torch

    pred, gt = torch.tensor([[1.8, 1.8, 11.8, 11.8]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # inter 8.2^2 = 67.24, union 200 - 67.24 = 132.76, enclosing 11.8^2 = 139.24
    assert box_iou(pred, gt).item() == pytest.approx(67.24 / 132.76, abs=1e-5)
    assert generalized_box_iou(pred, gt).item() == pytest.approx(67.24 / 132.76 - 6.48 / 139.24, abs=1e-5)


def test_build_from_metadata():
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    from fiber_det import add_fiber_config
    from fiber_det.evaluation import build_evaluator

    MetadataCatalog.get("test_refcoco_val").set(evaluator_type="refexp")
    evaluator = build_evaluator(add_fiber_config(get_cfg()), "test_refcoco_val")
    assert isinstance(evaluator, RefExpEvaluator)
    assert run(evaluator) == pytest.approx(EXPECTED)
