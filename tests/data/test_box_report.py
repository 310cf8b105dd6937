"""Boxes reaching outside their image are clipped or dropped by the mapper, and counted and named
in the log once per training set."""
import logging

import numpy as np

from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from fiber_det.data.box_report import report_boxes_outside_images
from fiber_det.data.build import get_train_dataset_dicts
from fiber_det.data.mapper import legacy_xyxy_boxes


def _record(name, boxes, height=50, width=80):
    return {"file_name": name, "height": height, "width": width, "image_id": name, "task": "detection",
            "annotations": [{"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 0, "category_id": 0} for b in boxes]}


DICTS = [
    _record("inside.jpg", [[10, 10, 20, 20]]),
    _record("partly_out.jpg", [[70, 40, 30, 30], [5, 5, 10, 10]]),  # clipped to x2 = 79, y2 = 49
    _record("gone.jpg", [[90, 10, 20, 20], [-30, 0, 20, 10]]),  # right of the image; left of it
    {**_record("crowd.jpg", [[-10, -10, 200, 200]]), "annotations": [
        {"bbox": [-10, -10, 200, 200], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 1, "category_id": 0}]},
]


def test_counts_match_what_the_mapper_keeps(caplog):
    with caplog.at_level(logging.WARNING, logger="fiber_det.data.box_report"):
        assert report_boxes_outside_images("boxes_test_a", DICTS) == (1, 2)
    assert ("training set 'boxes_test_a': of 5 boxes, 1 reach outside their image and are clipped to it "
            "(e.g. partly_out.jpg (1)), and 2 are empty once clipped and dropped (e.g. gone.jpg (2))") in caplog.text
    for record, kept in zip(DICTS[:3], (1, 2, 0)):  # the mapper's rule keeps the others
        boxes = legacy_xyxy_boxes(record["annotations"], record["height"], record["width"])
        assert int(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).sum()) == kept
    np.testing.assert_array_equal(legacy_xyxy_boxes(DICTS[1]["annotations"][:1], 50, 80), [[70, 40, 79, 49]])


def test_logged_once_per_training_set(caplog):
    name = "boxes_test_registered"
    DatasetCatalog.register(name, lambda: [dict(d, dataset=name) for d in DICTS])
    MetadataCatalog.get(name).set(thing_classes=["thing"])
    try:
        cfg = tiny_cfg(DATASETS__TRAIN=(name,), DATALOADER__FILTER_EMPTY_ANNOTATIONS=False)
        with caplog.at_level(logging.WARNING, logger="fiber_det.data.box_report"):
            get_train_dataset_dicts(cfg)
            get_train_dataset_dicts(cfg)
        assert caplog.text.count(f"training set '{name}'") == 1
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
