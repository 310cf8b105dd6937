"""Post-processing on hand-made head outputs: phrase scores, thresholds, top-k, NMS per label with
the "+1" IoU, the k-th value cut, rescaling and the merge of chunk detections."""
import math

import pytest
import torch

from detectron2.structures import Boxes, Instances
from fiber_det.modeling.head.atss import LegacyBoxCoder
from fiber_det.modeling.postprocess import (
    class_aware_nms,
    merge_chunk_detections,
    phrase_scores,
    postprocess_image,
    rescale_boxes,
    select_candidates,
)

CODER = LegacyBoxCoder()


def _logit(p):
    return math.log(p / (1 - p))


def test_phrase_score_is_the_mean_token_probability_in_label_order():
    probs = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.2, 0.2, 0.2, 0.8]])
    scores, labels = phrase_scores(probs, {7: (3,), 2: (1, 2)})
    assert labels.tolist() == [2, 7]
    torch.testing.assert_close(scores, torch.tensor([[0.7, 0.3], [0.2, 0.8]]))
    with pytest.raises(ValueError, match="no label"):
        phrase_scores(probs, {})


def test_threshold_is_strict_topk_weights_centerness_and_boxes_are_clipped():
    anchors = torch.tensor([[0.0, 0, 9, 9], [10, 0, 19, 9], [20, 0, 29, 9], [90, 90, 109, 109]])
    scores = torch.tensor([[0.05], [0.5], [0.2], [0.8]])  # 0.05 is not > 0.05
    centerness = torch.tensor([0.0, _logit(0.5), _logit(0.9), _logit(0.5)])
    deltas = torch.zeros(4, 4)
    boxes, final, cols = select_candidates(scores, centerness, deltas, anchors, (100, 100), 0.05, 2, CODER)
    # weighted: 0.25, 0.18, 0.4 -> top 2 are anchors 3 and 1; final score sqrt(score * centerness)
    order = final.argsort(descending=True)
    torch.testing.assert_close(final[order], torch.tensor([math.sqrt(0.4), math.sqrt(0.25)]))
    assert cols.tolist() == [0, 0]
    # anchor 3 decodes to itself, clipped to [0, w - 1] x [0, h - 1]
    torch.testing.assert_close(boxes[order], torch.tensor([[90.0, 90, 99, 99], [10, 0, 19, 9]]))


def test_nms_is_per_label_with_plus_one_iou():
    # "+1" IoU of the two boxes: 100 / 120 = 0.833 (plain IoU 81 / 99 = 0.818)
    boxes = torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 11], [0, 0, 9, 11]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([1, 1, 2])
    assert class_aware_nms(boxes, scores, labels, 0.82).tolist() == [0, 2]  # 0.833 > 0.82: suppressed
    assert class_aware_nms(boxes, scores, labels, 0.85).tolist() == [0, 1, 2]
    assert class_aware_nms(boxes[:0], scores[:0], labels[:0], 0.5).numel() == 0


def _head(probs, centerness, hw):
    """One-level head outputs whose token probabilities and centerness are the given values."""
    h, w = hw
    logits = torch.logit(torch.tensor(probs, dtype=torch.float32)).reshape(1, h * w, -1)
    ctr = torch.logit(torch.tensor(centerness, dtype=torch.float32)).reshape(1, 1, h, w)
    return {"box_deltas": [torch.zeros(1, 4, h, w)], "centerness": [ctr], "token_logits": [logits]}


def test_kth_value_cut_keeps_ties():
    # four far-apart anchors, one label; scores sqrt(p * 1.0) = 0.8, 0.6, 0.6, 0.5
    anchors = [torch.tensor([[0.0, 0, 9, 9], [20, 0, 29, 9], [40, 0, 49, 9], [60, 0, 69, 9]])]
    head = _head([[0.64], [0.36], [0.36], [0.25]], [0.999999] * 4, (1, 4))
    boxes, scores, labels = postprocess_image(head, 0, anchors, (10, 70), {1: (0,)}, detections_per_image=2)
    assert scores.tolist() == pytest.approx([0.8, 0.6, 0.6], abs=1e-5)  # the tie at the cut stays
    assert labels.tolist() == [1, 1, 1]
    _, all_scores, _ = postprocess_image(head, 0, anchors, (10, 70), {1: (0,)}, detections_per_image=0)
    assert len(all_scores) == 4


def test_rescale_uses_separate_ratios_without_clipping():
    boxes = torch.tensor([[10.0, 10, 20, 40]])
    torch.testing.assert_close(rescale_boxes(boxes, (100, 200), (50, 400)), torch.tensor([[20.0, 5, 40, 20]]))
    torch.testing.assert_close(rescale_boxes(boxes, (100, 200), (200, 400)), boxes * 2)


def _instances(scores, labels):
    inst = Instances((10, 10))
    inst.pred_boxes = Boxes(torch.arange(len(scores) * 4, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores)
    inst.pred_labels = torch.tensor(labels)
    return inst


def test_chunk_merge_keeps_every_chunk_sorted_with_stable_ties():
    a, b = _instances([0.9, 0.5], [1, 2]), _instances([0.7, 0.5, 0.1], [3, 3, 4])
    merged = merge_chunk_detections([a, b])
    assert merged.scores.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.5, 0.1])
    assert merged.pred_labels.tolist() == [1, 3, 2, 3, 4]  # equal scores keep chunk order
    capped = merge_chunk_detections([a, b], max_detections=3)
    assert capped.pred_labels.tolist() == [1, 3, 2]
    assert merge_chunk_detections([b], max_detections=1) is b  # one chunk: its own cut already applied
    with pytest.raises(ValueError, match="no chunk"):
        merge_chunk_detections([])


def test_phrase_scores_equal_the_per_label_mean_exactly():
    """Labels averaged in groups of equal token count give exactly upstream's per-label mean."""
    probs = torch.rand(300, 64, generator=torch.Generator().manual_seed(0))
    token_map = {1: (1,), 2: (2, 3, 4), 5: (6, 7), 3: (9, 10, 11), 9: (13,), 4: tuple(range(20, 37))}
    scores, labels = phrase_scores(probs, token_map)
    assert labels.tolist() == [1, 2, 3, 4, 5, 9]
    for col, label in enumerate(labels.tolist()):
        assert torch.equal(scores[:, col], probs[:, list(token_map[label])].mean(-1)), label
