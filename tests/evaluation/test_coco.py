"""PromptedCOCOEvaluator: "+1" result boxes, json category ids, AP values computed by hand."""
import json
import math
import uuid

import pytest
import torch

import fiber_det  # noqa: F401  (compat fixes)
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from fiber_det import add_fiber_config
from fiber_det.evaluation import PromptedCOCOEvaluator, build_evaluator
from fiber_det.evaluation.coco import COCO_RESULTS_FILE

# contiguous 0 = json id 1 ("cat"), contiguous 1 = json id 3 ("dog"): non-contiguous json ids
COCO_GT = {
    "images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"},
               {"id": 2, "width": 100, "height": 100, "file_name": "2.jpg"}],
    "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0},
    ],
}
# xyxy boxes that equal the GT under the legacy "+1" convention (w = x2 - x1 + 1)
CAT1, DOG1, CAT2 = [10, 10, 29, 29], [50, 50, 79, 79], [0, 0, 39, 39]


def make_instances(boxes, scores, labels, size=(100, 100)) -> Instances:
    """Model-style outputs: pred_boxes xyxy, scores, 1-based pred_labels, pred_classes = label - 1."""
    inst = Instances(size)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_labels = torch.tensor(labels, dtype=torch.int64)
    inst.pred_classes = inst.pred_labels - 1
    return inst


def register_json(tmp_path, data, evaluator_type, **metadata) -> str:
    """Writes ``data`` as a json and registers metadata for it under a fresh name."""
    path = tmp_path / f"{evaluator_type}_gt.json"
    path.write_text(json.dumps(data))
    name = f"test_{evaluator_type}_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(json_file=str(path), evaluator_type=evaluator_type, **metadata)
    return name


@pytest.fixture
def coco_dataset(tmp_path):
    return register_json(tmp_path, COCO_GT, "coco", thing_classes=["cat", "dog"],
                         thing_dataset_id_to_contiguous_id={1: 0, 3: 1})


def run(evaluator, per_image):
    """Feeds ``{image_id: Instances}`` through the evaluator and returns its results."""
    evaluator.reset()
    for image_id, inst in per_image.items():
        evaluator.process([{"image_id": image_id, "height": 100, "width": 100}], [{"instances": inst}])
    return evaluator.evaluate()


def perfect_predictions():
    return {1: make_instances([CAT1, DOG1], [0.9, 0.8], [1, 2]), 2: make_instances([CAT2], [0.7], [1])}


def test_perfect_predictions_and_plus_one_dump(coco_dataset, tmp_path):
    out = tmp_path / "out"
    results = run(PromptedCOCOEvaluator(coco_dataset, output_dir=str(out), distributed=False), perfect_predictions())
    bbox = results["bbox"]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "AP-cat", "AP-dog"):
        assert bbox[key] == pytest.approx(100.0), key
    assert math.isnan(bbox["APl"])  # no large GT box
    dumped = json.loads((out / COCO_RESULTS_FILE).read_text())
    assert [(d["image_id"], d["category_id"], d["bbox"]) for d in dumped] == [
        (1, 1, [10, 10, 20, 20]), (1, 3, [50, 50, 30, 30]), (2, 1, [0, 0, 40, 40])]


def test_without_plus_one(coco_dataset, tmp_path):
    out = tmp_path / "out"
    evaluator = PromptedCOCOEvaluator(coco_dataset, output_dir=str(out), box_plus_one=False, distributed=False)
    bbox = run(evaluator, perfect_predictions())["bbox"]
    dumped = json.loads((out / COCO_RESULTS_FILE).read_text())
    assert dumped[0]["bbox"] == [10, 10, 19, 19]
    # IoUs 0.9025 (cat, image 1), 0.9344 (dog), 0.9506 (cat, image 2): all match at IoU 0.5..0.90;
    # at 0.95 only the lower-scored cat box does (precision 1/2 up to recall 1/2, 51 of 101 points)
    cat = (9 + 0.5 * 51 / 101) / 10
    dog = 9 / 10
    assert bbox["AP50"] == pytest.approx(100.0)
    assert bbox["AP"] == pytest.approx(100 * (cat + dog) / 2)


def test_one_wrong_box(coco_dataset):
    preds = perfect_predictions()
    preds[1] = make_instances([CAT1, [0, 60, 9, 69]], [0.9, 0.8], [1, 2])  # the dog box misses
    bbox = run(PromptedCOCOEvaluator(coco_dataset, distributed=False), preds)["bbox"]
    assert bbox["AP"] == pytest.approx(50.0)  # cat 100, dog 0
    assert bbox["AP-dog"] == pytest.approx(0.0)
    assert bbox["APs"] == pytest.approx(50.0)  # both small GT boxes: cat hit, dog missed
    assert bbox["APm"] == pytest.approx(100.0)  # only the medium cat box counts


def test_image_without_predictions(coco_dataset):
    preds = perfect_predictions()
    preds[2] = make_instances([], [], [])
    bbox = run(PromptedCOCOEvaluator(coco_dataset, distributed=False), preds)["bbox"]
    # cat: 1 of 2 GT found with precision 1 -> recall thresholds 0..0.50 (51 of 101) have precision 1
    assert bbox["AP-cat"] == pytest.approx(100 * 51 / 101)
    assert bbox["AP"] == pytest.approx(100 * (51 / 101 + 1) / 2)


def test_duplicates_across_processes_are_dropped(coco_dataset, tmp_path, monkeypatch):
    from fiber_det.evaluation import gather

    # two "ranks" that both evaluated image 2 (padding of a distributed sampler)
    monkeypatch.setattr(gather.comm, "gather", lambda data, dst=0: [data, [r for r in data if r["image_id"] == 2]])
    out = tmp_path / "out"
    results = run(PromptedCOCOEvaluator(coco_dataset, output_dir=str(out)), perfect_predictions())
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert len(json.loads((out / COCO_RESULTS_FILE).read_text())) == 3


def test_unknown_class_and_missing_map(coco_dataset, tmp_path):
    evaluator = PromptedCOCOEvaluator(coco_dataset, distributed=False)
    with pytest.raises(ValueError, match="predicted class 2"):
        evaluator.process([{"image_id": 1}], [{"instances": make_instances([CAT1], [0.9], [3])}])
    bare = register_json(tmp_path, COCO_GT, "coco")
    with pytest.raises(ValueError, match="thing_dataset_id_to_contiguous_id"):
        PromptedCOCOEvaluator(bare, distributed=False).process(
            [{"image_id": 1}], [{"instances": make_instances([CAT1], [0.9], [1])}])


def test_build_evaluator(coco_dataset, tmp_path):
    cfg = add_fiber_config(get_cfg())
    cfg.TEST.COCO_BOX_PLUS_ONE = False
    evaluator = build_evaluator(cfg, coco_dataset, str(tmp_path))
    assert isinstance(evaluator, PromptedCOCOEvaluator) and evaluator._box_plus_one is False
    MetadataCatalog.get("test_train_only_set").set(evaluator_type="")
    with pytest.raises(ValueError, match="no evaluator_type"):
        build_evaluator(cfg, "test_train_only_set")
    MetadataCatalog.get("test_voc_set").set(evaluator_type="pascal_voc")
    with pytest.raises(ValueError, match="'pascal_voc'"):
        build_evaluator(cfg, "test_voc_set")
