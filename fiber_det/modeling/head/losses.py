"""ATSS training targets and FIBER's losses: token focal loss, GIoU and centerness.

All loss math runs in fp32 (upstream ``custom_fwd(cast_inputs=float32)``). Normalisers are
averaged over processes so the objective is (global sum) / (global count), as upstream.
"""
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from detectron2.config import configurable
from detectron2.utils import comm

from .atss import LegacyBoxCoder, atss_assign
from .grounding_head import flatten_level_outputs

__all__ = ["FiberLoss"]


def _reduce_mean(value: torch.Tensor) -> float:
    """Sum over processes / number of processes (a plain float when not distributed)."""
    world = comm.get_world_size()
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value.item() / world


class FiberLoss:
    """Computes ATSS targets and the losses ``loss_reg``, ``loss_centerness`` and
    ``loss_dot_product_token`` (upstream names; the zero-weighted ``loss_cls`` is omitted)."""

    @configurable
    def __init__(self, *, topk: int = 9, reg_loss_weight: float = 2.0, token_alpha: float = 0.25,
                 token_gamma: float = 2.0, token_loss_weight: float = 1.0, max_query_len: int = 256):
        """
        Args:
            topk: ATSS candidates per level and GT box.
            reg_loss_weight: weight of the GIoU loss.
            token_alpha, token_gamma, token_loss_weight: the region-word sigmoid focal loss.
            max_query_len: the "no object" token slot of negatives is column max_query_len - 1
                (upstream index 255); it only counts when a caption fills every position.
        """
        self.topk = topk
        self.reg_loss_weight = reg_loss_weight
        self.token_alpha = token_alpha
        self.token_gamma = token_gamma
        self.token_loss_weight = token_loss_weight
        self.no_object_index = max_query_len - 1
        self.box_coder = LegacyBoxCoder()

    @classmethod
    def from_config(cls, cfg):
        a = cfg.MODEL.FIBER.ATSS
        return {
            "topk": a.TOPK, "reg_loss_weight": a.REG_LOSS_WEIGHT, "token_alpha": a.TOKEN_ALPHA,
            "token_gamma": a.TOKEN_GAMMA, "token_loss_weight": a.TOKEN_LOSS_WEIGHT,
            "max_query_len": cfg.MODEL.FIBER.TEXT.MAX_QUERY_LEN,
        }

    def assign(self, anchors_per_level: List[torch.Tensor], gt_boxes: torch.Tensor, positive_map: torch.Tensor,
               num_tokens: int) -> Dict[str, torch.Tensor]:
        """Targets of one image.

        Args:
            anchors_per_level: [(A_l, 4)]; gt_boxes: (G, 4); positive_map: (G, >= num_tokens) binary.
        Returns:
            "matched" (A,) GT index or -1, "reg_targets" (A, 4) deltas of the matched GT (GT 0
            for negatives, ignored), "token_targets" (A, num_tokens) binary.
        """
        anchors = torch.cat(anchors_per_level)
        matched = atss_assign(anchors_per_level, gt_boxes, self.topk)
        num_anchors = anchors.shape[0]
        tokens = anchors.new_zeros((num_anchors, num_tokens))
        if gt_boxes.shape[0] == 0:
            reg = anchors.new_zeros((num_anchors, 4))
        else:
            pos = matched >= 0
            tokens[pos] = positive_map[matched[pos], :num_tokens].to(tokens.dtype)
            reg = self.box_coder.encode(gt_boxes[matched.clamp(min=0)], anchors)
        if self.no_object_index < num_tokens:
            tokens[matched < 0, self.no_object_index] = 1.0
        return {"matched": matched, "reg_targets": reg, "token_targets": tokens}

    def centerness_targets(self, reg_targets: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b)) of the decoded targets around anchor centres."""
        gts = self.box_coder.decode(reg_targets, anchors)
        cx = (anchors[:, 2] + anchors[:, 0]) / 2
        cy = (anchors[:, 3] + anchors[:, 1]) / 2
        lr = torch.stack([cx - gts[:, 0], gts[:, 2] - cx], dim=1)
        tb = torch.stack([cy - gts[:, 1], gts[:, 3] - cy], dim=1)
        return torch.sqrt((lr.min(dim=-1)[0] / lr.max(dim=-1)[0]) * (tb.min(dim=-1)[0] / tb.max(dim=-1)[0]))

    def giou_loss(self, deltas, reg_targets, anchors, weight) -> torch.Tensor:
        """Weighted sum of 1 - GIoU between decoded prediction and target (no "+1")."""
        pred = self.box_coder.decode(deltas, anchors)
        pred = torch.stack(
            [pred[:, 0], pred[:, 1], torch.max(pred[:, 0], pred[:, 2]), torch.max(pred[:, 1], pred[:, 3])], dim=1
        )
        target = self.box_coder.decode(reg_targets, anchors)
        losses = generalized_box_iou_loss(pred, target, reduction="none", eps=1e-7)
        if weight.sum() > 0:
            return (losses * weight).sum()
        return losses.sum()

    def __call__(self, head_outputs: Dict[str, List[torch.Tensor]], anchors_per_level: List[torch.Tensor],
                 gt_boxes: List[torch.Tensor], positive_maps: List[torch.Tensor],
                 text_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            head_outputs: :class:`FiberHead` outputs ("box_deltas", "centerness", "token_logits").
            anchors_per_level: [(A_l, 4)], shared by every image of the padded batch.
            gt_boxes: per image (G_i, 4) in resized-image pixels.
            positive_maps: per image (G_i, >= T) binary token maps.
            text_mask: (B, T) attention mask.
        """
        with torch.autocast(text_mask.device.type, enabled=False):
            deltas = flatten_level_outputs(head_outputs["box_deltas"]).float().reshape(-1, 4)
            centerness = flatten_level_outputs(head_outputs["centerness"]).float().reshape(-1)
            logits = torch.cat(head_outputs["token_logits"], dim=1).float()  # (B, A, T)
            num_tokens = logits.shape[-1]
            anchors_per_level = [a.float() for a in anchors_per_level]
            targets = [
                self.assign(anchors_per_level, boxes.float(), pmap, num_tokens)
                for boxes, pmap in zip(gt_boxes, positive_maps)
            ]
            return self._losses(deltas, centerness, logits, torch.cat(anchors_per_level), targets, text_mask)

    def _losses(self, deltas, centerness, logits, anchors, targets, text_mask):
        matched = torch.cat([t["matched"] for t in targets])
        reg_targets = torch.cat([t["reg_targets"] for t in targets])
        token_targets = torch.stack([t["token_targets"] for t in targets])
        anchors = anchors.repeat(len(targets), 1)
        pos = torch.nonzero(matched >= 0).squeeze(1)
        num_pos = max(_reduce_mean(pos.new_tensor([pos.numel()], dtype=torch.float32)), 1.0)

        keep = (text_mask > 0)[:, None, :].expand_as(logits)
        token_loss = sigmoid_focal_loss(
            logits[keep], token_targets[keep], alpha=self.token_alpha, gamma=self.token_gamma, reduction="sum"
        ) / num_pos

        deltas, reg_targets, anchors, centerness = deltas[pos], reg_targets[pos], anchors[pos], centerness[pos]
        if pos.numel() > 0:
            ctr_targets = self.centerness_targets(reg_targets, anchors)
            ctr_norm = _reduce_mean(ctr_targets.sum())
            reg_loss = self.giou_loss(deltas, reg_targets, anchors, ctr_targets) / ctr_norm
            ctr_loss = F.binary_cross_entropy_with_logits(centerness, ctr_targets, reduction="sum") / num_pos
        else:
            _reduce_mean(centerness.new_tensor([0.0]))  # keep collectives matched across processes
            reg_loss, ctr_loss = deltas.sum(), centerness.sum()
        return {
            "loss_reg": reg_loss * self.reg_loss_weight,
            "loss_centerness": ctr_loss,
            "loss_dot_product_token": token_loss * self.token_loss_weight,
        }
