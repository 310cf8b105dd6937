"""Inference post-processing: token probabilities -> phrase scores -> boxes, as upstream.

Per level: phrase score = mean of the sigmoid token probabilities over the phrase's tokens;
threshold (strict >) before centerness; top-k of score·sigmoid(centerness); decode with the
legacy coder; final score sqrt(score·centerness); clip to [0, w-1] x [0, h-1]. Then class-aware
NMS with "+1" IoU and the kthvalue top-K rule. Detectron2's ``detector_postprocess`` clips to
[0, W] after rescaling and drops empty boxes, so the rescaling here is ours. The detections of a
prompt split into chunks are merged by :func:`merge_chunk_detections`.
"""
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torchvision.ops import nms

from detectron2.structures import Instances

from .head.atss import LegacyBoxCoder
from .head.grounding_head import flatten_level_outputs

__all__ = ["phrase_scores", "select_candidates", "class_aware_nms", "postprocess_image", "rescale_boxes",
           "merge_chunk_detections"]


def phrase_scores(token_probs: torch.Tensor, token_map: Mapping[int, Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, T) token probabilities -> (A, L) mean probability per label and the (L,) labels,
    labels in ascending order (the column order of upstream's label - 1 layout).

    Args:
        token_probs: sigmoid of one image's token logits.
        token_map: ``{label: token indices}`` (:attr:`fiber_det.data.prompt.Prompt.token_map`).
    """
    if not token_map:
        raise ValueError("the prompt has no label: nothing to detect")
    labels = sorted(token_map)
    cols = [token_probs[:, torch.as_tensor(list(token_map[j]), dtype=torch.long)].mean(-1) for j in labels]
    return torch.stack(cols, dim=1), torch.as_tensor(labels, dtype=torch.int64)


def select_candidates(scores, centerness_logits, deltas, anchors, image_size_hw, threshold, top_n, box_coder):
    """One level of one image.

    Args:
        scores: (A, L) phrase scores; centerness_logits: (A,); deltas: (A, 4); anchors: (A, 4);
        image_size_hw: unpadded resized size used for clipping.
    Returns:
        boxes (K, 4), scores (K,) = sqrt(score · sigmoid(centerness)), columns (K,) into L.
    """
    candidates = scores > threshold
    k = min(int(candidates.sum()), top_n)
    weighted = scores * centerness_logits.sigmoid()[:, None]
    top, idx = weighted[candidates].topk(k, sorted=False)
    nz = candidates.nonzero()[idx]
    loc, col = nz[:, 0], nz[:, 1]
    boxes = box_coder.decode(deltas[loc].view(-1, 4), anchors[loc].view(-1, 4))
    h, w = image_size_hw
    boxes = torch.stack(
        [boxes[:, 0].clamp(0, w - 1), boxes[:, 1].clamp(0, h - 1), boxes[:, 2].clamp(0, w - 1), boxes[:, 3].clamp(0, h - 1)],
        dim=1,
    )
    return boxes, torch.sqrt(top), col


def class_aware_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by per-label greedy NMS with the legacy "+1" IoU (suppress if IoU > thr),
    in descending score order.

    torchvision's ``nms`` on boxes with x2 + 1, y2 + 1 gives the "+1" IoU. Labels are processed
    one at a time (not torchvision's coordinate-offset trick, whose large offsets round the IoU).
    """
    shifted = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)
    keep = [idx[nms(shifted[idx], scores[idx], iou_threshold)] for idx in (
        torch.nonzero(labels == lab).squeeze(1) for lab in torch.unique(labels))]
    if not keep:
        return labels.new_zeros((0,))
    keep = torch.cat(keep)
    return keep[scores[keep].argsort(descending=True, stable=True)]


def postprocess_image(
    head_outputs: Dict[str, List[torch.Tensor]],
    index: int,
    anchors_per_level: List[torch.Tensor],
    image_size_hw: Tuple[int, int],
    token_map: Mapping[int, Sequence[int]],
    *,
    score_threshold: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_threshold: float = 0.6,
    detections_per_image: int = 100,
    box_coder: LegacyBoxCoder = None,
    return_candidates: bool = False,
):
    """Detections of image ``index`` of the batch, in the resized (unpadded) frame.

    Args:
        head_outputs: :class:`~fiber_det.modeling.head.grounding_head.FiberHead` outputs.
        index: the image's row in the batch.
        anchors_per_level: [(A_l, 4)] anchors.
        image_size_hw: the resized, unpadded image size (for clipping).
        token_map: ``{label: token indices}`` of the image's prompt.
        score_threshold, pre_nms_top_n, nms_threshold, detections_per_image: MODEL.FIBER.ATSS.*
            and TEST.DETECTIONS_PER_IMAGE (0: no cap).
        box_coder: the legacy coder (default weights).
        return_candidates: also return the pre-NMS candidates.

    Returns:
        (boxes (K, 4), scores (K,), labels (K,)) sorted by descending score; with
        ``return_candidates`` also the pre-NMS candidates (boxes, scores, labels).
    """
    box_coder = box_coder or LegacyBoxCoder()
    cand = []
    for deltas, ctr, logits, anchors in zip(
        head_outputs["box_deltas"], head_outputs["centerness"], head_outputs["token_logits"], anchors_per_level
    ):
        scores, labels = phrase_scores(logits[index].sigmoid(), token_map)
        d = flatten_level_outputs([deltas[index: index + 1]])[0]
        c = flatten_level_outputs([ctr[index: index + 1]])[0, :, 0]
        boxes, s, col = select_candidates(scores, c, d, anchors, image_size_hw, score_threshold, pre_nms_top_n, box_coder)
        cand.append((boxes, s, labels.to(col.device)[col]))
    boxes, scores, labels = (torch.cat(x) for x in zip(*cand))
    keep = class_aware_nms(boxes, scores, labels, nms_threshold)
    if detections_per_image > 0 and keep.numel() > detections_per_image:
        # upstream: threshold at the k-th largest score, keep all >= it (ties may keep more)
        kept_scores = scores[keep]
        thresh, _ = torch.kthvalue(kept_scores.float().cpu(), keep.numel() - detections_per_image + 1)
        keep = keep[kept_scores >= thresh.item()]
    out = (boxes[keep], scores[keep], labels[keep])
    return (out, (boxes, scores, labels)) if return_candidates else out


def rescale_boxes(boxes: torch.Tensor, from_hw: Tuple[int, int], to_hw: Tuple[int, int]) -> torch.Tensor:
    """Scale boxes from the resized to the original image, per axis, without clipping
    (upstream ``BoxList.resize``)."""
    rw, rh = float(to_hw[1]) / float(from_hw[1]), float(to_hw[0]) / float(from_hw[0])
    if rw == rh:
        return boxes * rw
    return torch.stack([boxes[:, 0] * rw, boxes[:, 1] * rh, boxes[:, 2] * rw, boxes[:, 3] * rh], dim=1)


def merge_chunk_detections(parts: Sequence[Instances], max_detections: int = 0) -> Instances:
    """The detections of one image whose prompt was split into chunks, merged into one list.

    The official chunked evaluation (LVIS: 31 prompts of 40 names) runs each chunk with its own
    post-processing cut (TEST.DETECTIONS_PER_IMAGE per chunk, e.g. 300) and keeps every chunk's
    detections: no NMS across chunks (a label lives in one chunk) and no cut across them (FixedAP
    then keeps the best 10,000 per category over the whole dataset). That is the rule here.

    Args:
        parts: one Instances per chunk, in chunk order, labels global (same fields in each).
        max_detections: 0 (the evaluators) keeps them all; N > 0 keeps only the N best of a
            multi-chunk merge (:class:`fiber_det.predictor.FIBERPredictor` passes
            TEST.DETECTIONS_PER_IMAGE, so a vocabulary of any size yields that many per image).
            A single part is returned as is: its post-processing already made the cut.

    Returns:
        Instances sorted by descending score; equal scores keep chunk order.
    """
    if not parts:
        raise ValueError("no chunk detections to merge")
    if len(parts) == 1:
        return parts[0]
    merged = Instances.cat(list(parts))
    order = torch.argsort(merged.scores, descending=True, stable=True)
    if max_detections > 0:
        order = order[:max_detections]
    return merged[order]
