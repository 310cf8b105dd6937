"""Comparing two detection lists of one image (e.g. two inference paths that should agree).

Detections are matched one-to-one within each label, greedily from the highest score of ``a``,
each to the nearest unused box of ``b``: scores that differ by float rounding may order near-ties
differently, so position-wise comparison would report differences that are not there.
"""
from dataclasses import dataclass

import numpy as np

from detectron2.structures import Instances

__all__ = ["DetectionComparison", "compare_detections"]

# the golden fixtures' tolerances for final detections (pixels; score units)
BOX_ATOL = 5e-3
SCORE_ATOL, SCORE_RTOL = 2e-5, 1e-4


@dataclass
class DetectionComparison:
    """Outcome of :func:`compare_detections`.

    Attributes:
        equal: the same number of detections per label, every one matched within the tolerances.
        unmatched: detections of ``a`` without a partner (label counts differ).
        max_abs_score_diff, max_abs_box_diff: over the matched pairs (0 when none).
    """

    equal: bool
    unmatched: int
    max_abs_score_diff: float
    max_abs_box_diff: float


def compare_detections(a: Instances, b: Instances, box_atol: float = BOX_ATOL, score_atol: float = SCORE_ATOL,
                       score_rtol: float = SCORE_RTOL) -> DetectionComparison:
    """Matches ``a`` against ``b`` (Instances with ``pred_boxes``, ``scores``, ``pred_labels``)
    and checks boxes to ``box_atol`` and scores to ``score_atol + score_rtol · |score of b|``."""
    boxes_a, boxes_b = (x.pred_boxes.tensor.detach().double().cpu().numpy() for x in (a, b))
    scores_a, scores_b = (x.scores.detach().double().cpu().numpy() for x in (a, b))
    labels_a, labels_b = (x.pred_labels.detach().cpu().numpy() for x in (a, b))
    unmatched, max_score, max_box, within = 0, 0.0, 0.0, True
    for label in np.union1d(labels_a, labels_b):
        ia, ib = np.flatnonzero(labels_a == label), np.flatnonzero(labels_b == label)
        unmatched += abs(len(ia) - len(ib))
        free = np.ones(len(ib), dtype=bool)
        for i in ia[np.argsort(-scores_a[ia], kind="stable")]:
            if not free.any():
                break
            dist = np.abs(boxes_b[ib] - boxes_a[i]).max(axis=1) + 1e3 * np.abs(scores_b[ib] - scores_a[i])
            dist[~free] = np.inf
            j = int(np.argmin(dist))
            free[j] = False
            score_diff = abs(scores_a[i] - scores_b[ib[j]])
            box_diff = float(np.abs(boxes_a[i] - boxes_b[ib[j]]).max())
            within &= box_diff <= box_atol and score_diff <= score_atol + score_rtol * abs(scores_b[ib[j]])
            max_score, max_box = max(max_score, score_diff), max(max_box, box_diff)
    return DetectionComparison(bool(within and unmatched == 0), unmatched, float(max_score), max_box)
