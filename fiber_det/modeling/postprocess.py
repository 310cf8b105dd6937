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
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms)

from detectron2.structures import Instances

from .head.atss import LegacyBoxCoder
from .head.grounding_head import flatten_level_outputs

__all__ = ["phrase_scores", "top_candidates", "decode_and_clip", "select_candidates", "class_aware_nms",
           "postprocess_image", "rescale_boxes", "merge_chunk_detections"]


def phrase_scores(token_probs: torch.Tensor, token_map: Mapping[int, Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, T) token probabilities -> (A, L) mean probability per label and the (L,) labels,
    labels in ascending order (the column order of upstream's label - 1 layout).

    Labels with the same number of tokens are averaged in one gather (the same per-label
    ``mean`` as upstream's loop over labels, in a few ops instead of one per label).

    Args:
        token_probs: sigmoid of one image's token logits.
        token_map: ``{label: token indices}`` (:attr:`fiber_det.data.prompt.Prompt.token_map`).
    """
    if not token_map:
        raise ValueError("the prompt has no label: nothing to detect")
    labels = sorted(token_map)
    groups: Dict[int, Tuple[List[int], List[Sequence[int]]]] = {}
    for col, label in enumerate(labels):
        cols, tokens = groups.setdefault(len(token_map[label]), ([], []))
        cols.append(col)
        tokens.append(list(token_map[label]))
    device = token_probs.device
    scores = token_probs.new_empty((token_probs.shape[0], len(labels)))
    for cols, tokens in groups.values():
        index = torch.as_tensor(tokens, dtype=torch.long, device=device)  # (L_n, n)
        scores[:, torch.as_tensor(cols, dtype=torch.long, device=device)] = token_probs[:, index].mean(-1)
    return scores, torch.as_tensor(labels, dtype=torch.int64)


def top_candidates(scores: torch.Tensor, centerness_logits: torch.Tensor, threshold: float, top_n: int):
    """One level of one image: the (anchor, column) pairs scoring above ``threshold`` (strict),
    at most ``top_n`` by score · sigmoid(centerness).

    Args:
        scores: (A, L) phrase scores; centerness_logits: (A,).
    Returns:
        anchors (K,), columns (K,) into L, weighted scores (K,), in ``topk(sorted=False)`` order.
    """
    candidates = (scores > threshold).nonzero()  # (N, 2) (anchor, column), row-major
    loc, col = candidates[:, 0], candidates[:, 1]
    weighted = scores[loc, col] * centerness_logits.sigmoid()[loc]
    top, idx = weighted.topk(min(len(candidates), top_n), sorted=False)
    return loc[idx], col[idx], top


def decode_and_clip(deltas: torch.Tensor, anchors: torch.Tensor, image_size_hw: Tuple[int, int], box_coder) -> torch.Tensor:
    """(K, 4) deltas on (K, 4) anchors -> boxes clipped to [0, w - 1] x [0, h - 1]."""
    boxes = box_coder.decode(deltas.view(-1, 4), anchors.view(-1, 4))
    h, w = image_size_hw
    return torch.stack(
        [boxes[:, 0].clamp(0, w - 1), boxes[:, 1].clamp(0, h - 1), boxes[:, 2].clamp(0, w - 1), boxes[:, 3].clamp(0, h - 1)],
        dim=1,
    )


def select_candidates(scores, centerness_logits, deltas, anchors, image_size_hw, threshold, top_n, box_coder):
    """One level of one image: :func:`top_candidates`, decoded and clipped.

    Args:
        scores: (A, L) phrase scores; centerness_logits: (A,); deltas: (A, 4); anchors: (A, 4);
        image_size_hw: unpadded resized size used for clipping.
    Returns:
        boxes (K, 4), scores (K,) = sqrt(score · sigmoid(centerness)), columns (K,) into L.
    """
    loc, col, top = top_candidates(scores, centerness_logits, threshold, top_n)
    return decode_and_clip(deltas[loc], anchors[loc], image_size_hw, box_coder), torch.sqrt(top), col


def class_aware_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by per-label greedy NMS with the legacy "+1" IoU (suppress if IoU > thr),
    in descending score order.

    torchvision's ``nms`` on boxes with x2 + 1, y2 + 1 gives the "+1" IoU. Labels are processed
    one at a time (not torchvision's coordinate-offset trick, whose large offsets round the IoU).
    """
    shifted = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)
    order = torch.argsort(labels, stable=True)
    counts = torch.unique_consecutive(labels[order], return_counts=True)[1].tolist()
    # torchvision's kernel directly: torchvision.ops.nms only adds API-usage logging per call
    keep = [idx[torch.ops.torchvision.nms(shifted[idx], scores[idx], iou_threshold)]
            for idx in torch.split(order, counts)]
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
    # all levels at once where a level's own computation does not depend on the others: the
    # phrase scores, decoding and clipping; the threshold and top-k stay per level
    probs = torch.cat([logits[index] for logits in head_outputs["token_logits"]]).sigmoid()
    scores, labels = phrase_scores(probs, token_map)
    centerness = flatten_level_outputs([c[index: index + 1] for c in head_outputs["centerness"]])[0, :, 0]
    locs, cols, tops, start = [], [], [], 0
    for anchors in anchors_per_level:
        end = start + len(anchors)
        loc, col, top = top_candidates(scores[start:end], centerness[start:end], score_threshold, pre_nms_top_n)
        locs.append(loc + start)
        cols.append(col)
        tops.append(top)
        start = end
    loc = torch.cat(locs)
    deltas = flatten_level_outputs([d[index: index + 1] for d in head_outputs["box_deltas"]])[0]
    boxes = decode_and_clip(deltas[loc], torch.cat(anchors_per_level)[loc], image_size_hw, box_coder)
    scores, labels = torch.sqrt(torch.cat(tops)), labels.to(loc.device)[torch.cat(cols)]
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
