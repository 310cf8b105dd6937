"""Legacy anchors, box coder and ATSS assignment on hand-made boxes (values computed by hand)."""
import math

import pytest
import torch

from fiber_det.modeling.head.atss import (
    LegacyAnchorGenerator,
    LegacyBoxCoder,
    atss_assign,
    generate_cell_anchors,
    legacy_box_iou,
)


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


FAR = ((200, 200, 207, 207), (300, 300, 307, 307))  # 8x8 anchors nowhere near the GTs (IoU 0)


# ---------------------------------------------------------------------------------------------
# anchors, IoU, box coder


def test_cell_anchor_and_grid_order():
    # base window [0, 0, 7, 7] (centre 3.5) scaled to 64: half-width (64 - 1) / 2 = 31.5
    assert generate_cell_anchors(8, [64], [1.0]).tolist() == [[-28.0, -28.0, 35.0, 35.0]]
    (level,) = LegacyAnchorGenerator([8], [[16]], [1.0])([(2, 3)])
    # y-major, then x: the shifts are (0,0), (8,0), (16,0), (0,8), ...
    assert level[:, 0].tolist() == [-4.0, 4.0, 12.0, -4.0, 4.0, 12.0]
    assert level[:, 1].tolist() == [-4.0, -4.0, -4.0, 4.0, 4.0, 4.0]
    assert level[0].tolist() == [-4.0, -4.0, 11.0, 11.0]  # 16 px wide with the "+1"


def test_legacy_iou_counts_the_last_pixel():
    # [0, 0, 9, 9] is 10x10 = 100 px, [0, 0, 9, 11] is 10x12 = 120, they share the first: 100 / 120
    iou = legacy_box_iou(_boxes((0, 0, 9, 9)), _boxes((0, 0, 9, 11), (20, 20, 29, 29)))
    torch.testing.assert_close(iou, torch.tensor([[100 / 120, 0.0]]))


def test_box_coder_hand_values_and_round_trip():
    coder = LegacyBoxCoder()
    anchor = _boxes((0, 0, 9, 9))  # 10x10, centre (4.5, 4.5)
    gt = _boxes((5, 0, 24, 9))  # 20x10, centre (14.5, 4.5)
    deltas = coder.encode(gt, anchor)
    # dx = 10 * (14.5 - 4.5) / 10, dy = 0, dw = 5 * log(20 / 10), dh = 5 * log(1)
    torch.testing.assert_close(deltas, torch.tensor([[10.0, 0.0, 5 * math.log(2.0), 0.0]]))
    torch.testing.assert_close(coder.decode(deltas, anchor), gt, atol=1e-5, rtol=0)
    # width deltas are clipped at log(1000 / 16) before exp
    huge = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), anchor)
    assert huge[0, 2] - huge[0, 0] + 1 == pytest.approx(10 * 1000 / 16, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# ATSS


def test_image_without_gt_has_no_positive():
    anchors = [_boxes((0, 0, 7, 7), (8, 0, 15, 7)), _boxes((0, 0, 15, 15))]
    matched = atss_assign(anchors, torch.zeros((0, 4)), topk=9)
    assert matched.dtype == torch.int64 and matched.tolist() == [-1, -1, -1]


def test_gt_larger_than_every_anchor_goes_to_the_best_fitting_level():
    """GT 32x32 (area 1024). Level 0: three 8x8 anchors inside it (IoU 64/1024 = 1/16) and a far
    one; level 1: one 16x16 anchor inside it (IoU 256/1024 = 1/4). topk 3 gives candidates
    {1/16, 1/16, 1/16, 1/4}: mean 0.109375, unbiased std 0.09375, threshold 0.203125, so only the
    level-1 anchor is positive, although every candidate's centre lies inside the GT."""
    level0 = _boxes((0, 0, 7, 7), (8, 0, 15, 7), (0, 8, 7, 15), FAR[0])
    level1 = _boxes((0, 0, 15, 15))
    gt = _boxes((0, 0, 31, 31))
    ious = legacy_box_iou(torch.cat([level0, level1]), gt)[:, 0]
    assert ious.tolist() == [1 / 16, 1 / 16, 1 / 16, 0.0, 1 / 4]
    assert atss_assign([level0, level1], gt, topk=3).tolist() == [-1, -1, -1, -1, 0]
    # alone, level 0's three equal IoUs (std 0) all reach the threshold 1/16
    assert atss_assign([level0], gt, topk=3).tolist() == [0, 0, 0, -1]


def test_tie_between_two_gts_goes_to_the_first():
    """Anchor [0, 0, 7, 7] has IoU 64/128 = 0.5 with both GTs; with two far candidates the
    threshold is 0.5/3 + 0.5/sqrt(3) = 0.455, so it is positive for both and takes GT 0."""
    anchors = [_boxes((0, 0, 7, 7), *FAR)]
    wide, tall = (0, 0, 15, 7), (0, 0, 7, 15)
    assert atss_assign(anchors, _boxes(wide, tall), topk=3).tolist() == [0, -1, -1]
    assert atss_assign(anchors, _boxes(tall, wide), topk=3).tolist() == [0, -1, -1]
    # a higher IoU wins over the order: 64 / 96 = 0.667 with an 8x12 GT
    assert atss_assign(anchors, _boxes(wide, (0, 0, 7, 11)), topk=3).tolist() == [1, -1, -1]


def test_candidate_centre_must_lie_strictly_inside_the_gt():
    """The anchor centre (3.5, 3.5) on the GT's edge is rejected (margin must exceed 0.01,
    measured without the "+1"); 0.1 px further inside it is accepted."""
    anchors = [_boxes((0, 0, 7, 7), *FAR)]
    assert atss_assign(anchors, _boxes((3.5, 3.5, 11.5, 11.5)), topk=3).tolist() == [-1, -1, -1]
    assert atss_assign(anchors, _boxes((3.4, 3.4, 11.4, 11.4)), topk=3).tolist() == [0, -1, -1]
