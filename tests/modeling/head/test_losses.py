"""FiberLoss on hand-made targets: token focal loss, GIoU, centerness and the normalisers,
against values computed by hand from the formulas (not from torchvision)."""
import math

import pytest
import torch

from fiber_det.modeling.head.atss import LegacyBoxCoder
from fiber_det.modeling.head.losses import FiberLoss

ALPHA, GAMMA = 0.25, 2.0
CODER = LegacyBoxCoder()


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _focal(logit: float, target: int) -> float:
    p = 1 / (1 + math.exp(-logit))
    if target:
        return -ALPHA * (1 - p) ** GAMMA * math.log(p)
    return -(1 - ALPHA) * p ** GAMMA * math.log(1 - p)


def test_centerness_target_by_hand():
    # anchor centre (4.5, 4.5) in box [0, 0, 19, 9]: left 4.5, right 14.5, top = bottom = 4.5
    anchor, gt = _boxes((0, 0, 9, 9)), _boxes((0, 0, 19, 9))
    target = FiberLoss().centerness_targets(CODER.encode(gt, anchor), anchor)
    torch.testing.assert_close(target, torch.tensor([math.sqrt(4.5 / 14.5)]), atol=1e-6, rtol=0)


def test_giou_loss_by_hand():
    # [0, 0, 10, 10] vs [5, 0, 15, 10]: intersection 50, union 150 = enclosing box -> GIoU 1/3
    # [0, 0, 10, 10] vs [20, 0, 30, 10]: IoU 0, enclosing 300, union 200 -> GIoU -1/3
    anchors = _boxes((0, 0, 9, 9), (0, 0, 9, 9))
    pred = CODER.encode(_boxes((0, 0, 10, 10), (0, 0, 10, 10)), anchors)
    target = CODER.encode(_boxes((5, 0, 15, 10), (20, 0, 30, 10)), anchors)
    weight = torch.tensor([0.5, 2.0])
    loss = FiberLoss().giou_loss(pred, target, anchors, weight)
    assert loss.item() == pytest.approx(0.5 * (1 - 1 / 3) + 2.0 * (1 + 1 / 3), abs=1e-4)
    assert FiberLoss().giou_loss(pred, target, anchors, torch.zeros(2)).item() == pytest.approx(2 / 3 + 4 / 3, abs=1e-4)


def _one_image(matched, token_targets, reg_targets):
    return [{"matched": torch.tensor(matched), "token_targets": torch.tensor(token_targets, dtype=torch.float32),
             "reg_targets": reg_targets}]


def test_losses_by_hand_one_positive():
    """Two anchors, three token slots of which the last is padding (ignored). Anchor 0 is
    positive for a box whose tokens are {0}; anchor 1 is negative."""
    anchors = _boxes((0, 0, 9, 9), (20, 20, 29, 29))
    gt = _boxes((0, 0, 19, 9))
    reg = CODER.encode(gt.expand(2, 4), anchors)
    deltas = CODER.encode(_boxes((0, 0, 14, 9), (0, 0, 14, 9)), anchors)  # predicted: [0, 0, 14, 9]
    centerness = torch.tensor([0.3, -2.0])
    logits = torch.tensor([[[2.0, -1.0, 9.0], [0.5, 1.0, -9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    targets = _one_image([0, -1], [[1, 0, 0], [0, 0, 1]], reg)
    loss = FiberLoss()._losses(deltas, centerness, logits, anchors, targets, mask)

    token = _focal(2.0, 1) + _focal(-1.0, 0) + _focal(0.5, 0) + _focal(1.0, 0)  # / num_pos = 1
    assert loss["loss_dot_product_token"].item() == pytest.approx(token, rel=1e-5)
    ctr = math.sqrt(4.5 / 14.5)
    bce = -(ctr * math.log(1 / (1 + math.exp(-0.3))) + (1 - ctr) * math.log(1 - 1 / (1 + math.exp(-0.3))))
    assert loss["loss_centerness"].item() == pytest.approx(bce, rel=1e-5)
    # GIoU of [0, 0, 14, 9] vs [0, 0, 19, 9] (no "+1"): IoU 126 / 171, same enclosing box; the
    # centerness weight of the single positive cancels with its normaliser; weight 2
    assert loss["loss_reg"].item() == pytest.approx(2.0 * (1 - 126 / 171), rel=1e-4)


def test_no_positive_gives_zero_box_losses_and_unnormalised_token_loss():
    anchors = _boxes((0, 0, 9, 9))
    logits = torch.tensor([[[-1.0, 2.0]]])
    targets = _one_image([-1], [[0, 0]], torch.zeros(1, 4))
    loss = FiberLoss()._losses(torch.zeros(1, 4), torch.zeros(1), logits, anchors, targets, torch.tensor([[1, 1]]))
    assert loss["loss_reg"].item() == 0.0 and loss["loss_centerness"].item() == 0.0
    assert loss["loss_dot_product_token"].item() == pytest.approx(_focal(-1.0, 0) + _focal(2.0, 0), rel=1e-5)


def test_assign_targets_and_the_no_object_slot():
    """Negatives mark the last column ("no object", upstream index 255) only when the caption fills
    every position; positives copy their box's token row."""
    anchors = [_boxes((0, 0, 7, 7), (200, 200, 207, 207), (300, 300, 307, 307))]
    gt = _boxes((0, 0, 15, 7))
    pmap = torch.tensor([[0.0, 1.0, 1.0]])
    full = FiberLoss(topk=3, max_query_len=3).assign(anchors, gt, pmap, num_tokens=3)
    assert full["matched"].tolist() == [0, -1, -1]
    assert full["token_targets"].tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 1]]
    torch.testing.assert_close(full["reg_targets"][0], CODER.encode(gt, anchors[0][:1])[0])
    short = FiberLoss(topk=3, max_query_len=256).assign(anchors, gt, pmap, num_tokens=3)
    assert short["token_targets"].tolist() == [[0, 1, 1], [0, 0, 0], [0, 0, 0]]
    empty = FiberLoss(topk=3, max_query_len=3).assign(anchors, torch.zeros(0, 4), torch.zeros(0, 3), 3)
    assert empty["matched"].tolist() == [-1, -1, -1] and empty["reg_targets"].abs().sum() == 0
