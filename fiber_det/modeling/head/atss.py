"""Anchors, box coder and ATSS assignment in the legacy maskrcnn_benchmark "+1" geometry.

Detectron2's DefaultAnchorGenerator / Box2BoxTransform measure widths as x2 - x1 and centre
anchors differently, so they cannot reproduce FIBER. Boxes are
(x1, y1, x2, y2) in pixels of the resized image; a box's width is x2 - x1 + 1.
"""
import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["LegacyAnchorGenerator", "LegacyBoxCoder", "legacy_box_iou", "atss_assign", "generate_cell_anchors"]

INF = 100000000


def generate_cell_anchors(stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Legacy Detectron anchors of one level centred on the (0, 0) cell, (A, 4) float.

    Base window [0, 0, stride-1, stride-1]; ratio enumeration rounds widths/heights to integers;
    then every size is applied. stride 8, size 64, ratio 1 -> [-28, -28, 35, 35].
    """

    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mkanchors(ws, hs, cx, cy):
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1), cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)))

    base = np.array([1, 1, stride, stride], dtype=np.float64) - 1
    w, h, cx, cy = whctrs(base)
    ratios = np.array(aspect_ratios, dtype=np.float64)
    ws = np.round(np.sqrt(w * h / ratios))
    hs = np.round(ws * ratios)
    ratio_anchors = mkanchors(ws, hs, cx, cy)
    scales = np.array(sizes, dtype=np.float64) / stride
    out = []
    for a in ratio_anchors:
        w, h, cx, cy = whctrs(a)
        out.append(mkanchors(w * scales, h * scales, cx, cy))
    return np.vstack(out).astype(np.float32)


class LegacyAnchorGenerator(nn.Module):
    """Anchors per FPN level, enumerated y-major, then x, then cell anchor (upstream's order).

    Attributes:
        cell_anchors: buffers ``cell_anchors.{l}`` (A, 4), regenerated (never loaded).
    """

    def __init__(self, strides: Sequence[int], sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float]):
        super().__init__()
        if len(strides) != len(sizes):
            raise ValueError(f"{len(strides)} strides but {len(sizes)} anchor size lists")
        self.strides = list(strides)
        self.sizes = [tuple(sz) for sz in sizes]
        self.aspect_ratios = tuple(aspect_ratios)
        self.cell_anchors = nn.Module()
        for i, (s, sz) in enumerate(zip(strides, sizes)):
            self.cell_anchors.register_buffer(
                str(i), torch.from_numpy(generate_cell_anchors(s, sz, aspect_ratios)), persistent=False
            )

    def spec(self):
        """(stride, sizes, aspect ratios) per level (what checkpoint conversion checks against)."""
        return tuple((s, sz, self.aspect_ratios) for s, sz in zip(self.strides, self.sizes))

    def forward(self, grid_sizes: List[Tuple[int, int]]) -> List[torch.Tensor]:
        """[(H_l, W_l)] -> [(H_l * W_l * A, 4)] float32 anchors."""
        out = []
        for i, ((h, w), stride) in enumerate(zip(grid_sizes, self.strides)):
            cell = getattr(self.cell_anchors, str(i))
            dev = cell.device
            sx = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=dev)
            sy = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=dev)
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=1)
            out.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        return out


class LegacyBoxCoder:
    """Anchor-relative deltas with weights (10, 10, 5, 5) and "+1" widths (upstream's BoxCoder)."""

    def __init__(self, weights=(10.0, 10.0, 5.0, 5.0), clip=math.log(1000.0 / 16)):
        self.weights = weights
        self.clip = clip

    def encode(self, gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(N, 4) boxes, (N, 4) anchors -> (N, 4) deltas."""
        aw = anchors[:, 2] - anchors[:, 0] + 1
        ah = anchors[:, 3] - anchors[:, 1] + 1
        ax = (anchors[:, 2] + anchors[:, 0]) / 2
        ay = (anchors[:, 3] + anchors[:, 1]) / 2
        gw = gt[:, 2] - gt[:, 0] + 1
        gh = gt[:, 3] - gt[:, 1] + 1
        gx = (gt[:, 2] + gt[:, 0]) / 2
        gy = (gt[:, 3] + gt[:, 1]) / 2
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)), dim=1
        )

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(N, 4) deltas, (N, 4) anchors -> (N, 4) boxes."""
        anchors = anchors.to(deltas.dtype)
        w = anchors[:, 2] - anchors[:, 0] + 1
        h = anchors[:, 3] - anchors[:, 1] + 1
        cx = (anchors[:, 2] + anchors[:, 0]) / 2
        cy = (anchors[:, 3] + anchors[:, 1]) / 2
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.clip)
        px = dx * w[:, None] + cx[:, None]
        py = dy * h[:, None] + cy[:, None]
        pw = torch.exp(dw) * w[:, None]
        ph = torch.exp(dh) * h[:, None]
        out = torch.zeros_like(deltas)
        out[:, 0::4] = px - 0.5 * (pw - 1)
        out[:, 1::4] = py - 0.5 * (ph - 1)
        out[:, 2::4] = px + 0.5 * (pw - 1)
        out[:, 3::4] = py + 0.5 * (ph - 1)
        return out


def legacy_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) -> (N, M) IoU with "+1" areas and intersections."""
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    return inter / (area_a[:, None] + area_b - inter)


def atss_assign(anchors_per_level: List[torch.Tensor], gt_boxes: torch.Tensor, topk: int):
    """ATSS positive selection for one image, as upstream: per level the ``topk`` anchors closest
    to each GT centre are candidates; those with IoU >= mean + std (unbiased) of the candidates'
    IoUs and a centre strictly inside the GT are positive.

    Args:
        anchors_per_level: [(A_l, 4)] anchors; gt_boxes: (G, 4); topk: candidates per level and GT
            (times anchors per location, as upstream).
    Returns:
        matched (A,) int64: index of the assigned GT box, -1 for negatives.
    """
    anchors = torch.cat(anchors_per_level)
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if num_gt == 0:
        return torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    ious = legacy_box_iou(anchors, gt_boxes)
    gt_c = torch.stack(((gt_boxes[:, 2] + gt_boxes[:, 0]) / 2.0, (gt_boxes[:, 3] + gt_boxes[:, 1]) / 2.0), dim=1)
    acx = (anchors[:, 2] + anchors[:, 0]) / 2.0
    acy = (anchors[:, 3] + anchors[:, 1]) / 2.0
    dist = (torch.stack((acx, acy), dim=1)[:, None, :] - gt_c[None, :, :]).pow(2).sum(-1).sqrt()

    candidates, start = [], 0
    for level_anchors in anchors_per_level:
        end = start + level_anchors.shape[0]
        k = min(topk, level_anchors.shape[0])
        _, idx = dist[start:end].topk(k, dim=0, largest=False)
        candidates.append(idx + start)
        start = end
    candidates = torch.cat(candidates, dim=0)  # (K, G)

    cand_ious = ious[candidates, torch.arange(num_gt, device=anchors.device)]
    thresh = cand_ious.mean(0) + cand_ious.std(0)  # unbiased std, as upstream
    is_pos = cand_ious >= thresh[None, :]
    # the candidate's centre must lie inside its GT box (strict margin 0.01, no "+1")
    cx, cy = acx[candidates], acy[candidates]
    margins = torch.stack(
        (cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy), dim=1
    )
    is_pos &= margins.min(dim=1)[0] > 0.01

    # an anchor positive for several GTs takes the one with the highest IoU (first on ties)
    ious_inf = torch.full_like(ious, -INF)
    gt_idx = torch.arange(num_gt, device=anchors.device).expand_as(candidates)
    pos_anchor, pos_gt = candidates[is_pos], gt_idx[is_pos]
    ious_inf[pos_anchor, pos_gt] = ious[pos_anchor, pos_gt]
    best, matched = ious_inf.max(dim=1)
    matched[best == -INF] = -1
    return matched
