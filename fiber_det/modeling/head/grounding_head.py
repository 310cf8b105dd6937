"""Region-word alignment head: DyHead tower, box deltas, centerness and token logits.

Parameter names are upstream's (``dyhead_tower``, ``bbox_pred``, ``centerness``, ``scales``,
``dot_product_projection_text``, ``log_scale``, ``bias_lang``, ``bias0``). The vestigial
``cls_logits`` conv of the official head is not built: it is frozen, never scores anything
and only fed a loss multiplied by 0.
"""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from .dyhead import DyHeadTower

__all__ = ["FiberHead", "Scale", "flatten_level_outputs"]


def flatten_level_outputs(per_level: List[torch.Tensor]) -> torch.Tensor:
    """[(B, K, H_l, W_l)] head maps -> (B, sum_l H_l·W_l, K): anchors in (y, x) row-major order,
    levels in order, the anchor order of the token logits and of the anchor generator."""
    return torch.cat([x.flatten(2).transpose(1, 2) for x in per_level], dim=1)


class Scale(nn.Module):
    """A learnable scalar multiplier (per FPN level, applied to the box deltas)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x):
        return x * self.scale


class FiberHead(nn.Module):
    """DyHead tower + output layers with region-word dot-product logits.

    forward(features: list of L maps (B, C, H_l, W_l), embedded: (B, T, D_text) text features
    with pads zeroed) returns a dict of per-level lists:
        "box_deltas": (B, 4, H_l, W_l) in box-coder units, already multiplied by ``scales[l]``;
        "centerness": (B, 1, H_l, W_l) logits;
        "token_logits": (B, H_l·W_l, T), anchors in (y, x) row-major order.
    Intermediate tensors (the DyHead tower's outputs, the projected tokens) are read with forward
    hooks on ``dyhead_tower`` and ``dot_product_projection_text``.
    """

    @configurable
    def __init__(self, *, in_channels: int, channels: int, num_convs: int, num_levels: int,
                 text_dim: int, gn_groups: int = 16, prior_prob: float = 0.01, log_scale: float = 0.0,
                 deformable: bool = True):
        super().__init__()
        if in_channels != channels:
            raise ValueError(f"the DyHead tower needs in_channels == channels ({in_channels} != {channels})")
        self.dyhead_tower = DyHeadTower(channels, num_convs, gn_groups, deformable)
        self.bbox_pred = nn.Conv2d(channels, 4, kernel_size=1)
        self.centerness = nn.Conv2d(channels, 1, kernel_size=1)
        for conv in (self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
        self.dot_product_projection_text = nn.Linear(text_dim, channels, bias=True)
        self.log_scale = nn.Parameter(torch.tensor([log_scale]))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor([-math.log((1 - prior_prob) / prior_prob)]))

    @classmethod
    def from_config(cls, cfg, input_shapes):
        h = cfg.MODEL.FIBER.HEAD
        return {
            "in_channels": input_shapes[0].channels,
            "channels": h.CHANNELS,
            "num_convs": h.NUM_CONVS,
            "num_levels": len(input_shapes),
            "text_dim": cfg.MODEL.FIBER.TEXT.HIDDEN_SIZE,
            "gn_groups": h.GN_GROUPS,
            "prior_prob": h.PRIOR_PROB,
            "log_scale": h.LOG_SCALE,
            "deformable": h.USE_DFCONV,
        }

    def token_features(self, embedded: torch.Tensor):
        """(B, T, D) -> projected tokens (B, T, C) and per-token bias (B, T).

        Upstream: L2-normalise, halve before the projection; the bias uses the normalised (not
        halved) features."""
        e = F.normalize(embedded, p=2, dim=-1)
        proj = self.dot_product_projection_text(e / 2.0)
        bias = torch.matmul(e, self.bias_lang) + self.bias0
        return proj, bias

    def forward(self, features: List[torch.Tensor], embedded: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
        tower = self.dyhead_tower(features)
        proj, bias = self.token_features(embedded)
        temperature = self.log_scale.exp()
        out = {"box_deltas": [], "centerness": [], "token_logits": []}
        for level, z in enumerate(tower):
            out["box_deltas"].append(self.scales[level](self.bbox_pred(z)))
            out["centerness"].append(self.centerness(z))
            queries = z.flatten(2).transpose(1, 2)  # (B, H*W, C), (y, x) row-major
            logits = torch.matmul(queries, proj.transpose(-1, -2)) / temperature + bias[:, None, :]
            out["token_logits"].append(logits.clamp(min=-50000.0, max=50000.0))
        return out
