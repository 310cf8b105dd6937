"""compare_detections: one-to-one matching within labels, tolerant of near-tie reordering."""
import torch

from detectron2.structures import Boxes, Instances
from fiber_det.utils.detections import compare_detections


def _instances(boxes, scores, labels):
    inst = Instances((100, 100))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_labels = torch.tensor(labels)
    return inst


BOXES = [[0.0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 50]]


def test_near_ties_in_another_order_are_equal():
    a = _instances(BOXES, [0.5, 0.5000001, 0.3], [1, 1, 2])
    b = _instances([BOXES[1], BOXES[0], [30, 30, 40, 50.001]], [0.5000002, 0.5, 0.3], [1, 1, 2])
    diff = compare_detections(a, b)
    assert diff.equal and diff.unmatched == 0
    assert 0 < diff.max_abs_score_diff < 2e-7 and abs(diff.max_abs_box_diff - 1e-3) < 1e-5


def test_moved_box_changed_score_and_missing_detection_are_not_equal():
    a = _instances(BOXES, [0.5, 0.4, 0.3], [1, 1, 2])
    moved = compare_detections(a, _instances([BOXES[0], [5, 5, 20, 21], BOXES[2]], [0.5, 0.4, 0.3], [1, 1, 2]))
    assert not moved.equal and moved.max_abs_box_diff == 1.0
    rescored = compare_detections(a, _instances(BOXES, [0.5, 0.4, 0.31], [1, 1, 2]))
    assert not rescored.equal and abs(rescored.max_abs_score_diff - 0.01) < 1e-6
    missing = compare_detections(a, _instances(BOXES[:2], [0.5, 0.4], [1, 1]))
    assert not missing.equal and missing.unmatched == 1
    relabelled = compare_detections(a, _instances(BOXES, [0.5, 0.4, 0.3], [1, 1, 3]))
    assert not relabelled.equal and relabelled.unmatched == 2
