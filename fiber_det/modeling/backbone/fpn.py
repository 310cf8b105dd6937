"""FPN over the fused Swin outputs (C3-C5 -> P3-P7) that also carries the language features,
registered in Detectron2's BACKBONE_REGISTRY as ``build_fiber_backbone``.

Detectron2's :class:`FPN` builds the layers (``fpn_lateral{3,4,5}``, ``fpn_output{3,4,5}``,
``top_block.p6/p7``, P6 computed from P5 as in GLIP/FIBER); the forward is ours because the
bottom-up also takes the text and because GLIP's FPN applies DropBlock to the merged P3/P4
laterals in training.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7

from .fusion import FusionBottomUp, TextState
from .swin import SwinState

__all__ = ["DropBlock2d", "FiberBackbone", "build_fiber_backbone"]


class DropBlock2d(nn.Module):
    """DropBlock as in GLIP's FPN (the ``dropblock`` package semantics): seed rate
    ``p / block_size²`` per position, seeds dilated by a ``block_size`` max-pool, kept values
    rescaled by numel / kept. timm's DropBlock2d computes its seed rate differently, hence ours.
    Identity in eval mode or with p = 0."""

    def __init__(self, drop_prob: float, block_size: int):
        super().__init__()
        self.drop_prob = drop_prob
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if not self.training or self.drop_prob == 0.0:
            return x
        gamma = self.drop_prob / self.block_size**2
        seeds = (torch.rand(x.shape[0], *x.shape[2:], device=x.device) < gamma).to(x.dtype)
        block = F.max_pool2d(seeds[:, None], self.block_size, stride=1, padding=self.block_size // 2)
        if self.block_size % 2 == 0:
            block = block[:, :, :-1, :-1]
        keep = 1 - block.squeeze(1)
        return x * keep[:, None] * (keep.numel() / keep.sum().clamp(min=1))


class FiberBackbone(FPN):
    """Fusion bottom-up + FPN. ``forward(images, input_ids, attention_mask)`` returns
    ({"p3".."p7": (B, out_channels, H/s, W/s)}, language dict of :class:`FusionBottomUp`)."""

    @configurable
    def __init__(self, *, bottom_up: FusionBottomUp, out_channels: int, drop_block_prob: float = 0.0,
                 drop_block_size: int = 3):
        in_features = ["res3", "res4", "res5"]
        super().__init__(
            bottom_up, in_features, out_channels,
            top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        )
        self.drop_block = DropBlock2d(drop_block_prob, drop_block_size)

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        f = cfg.MODEL.FIBER
        return {
            "bottom_up": FusionBottomUp(cfg),
            "out_channels": cfg.MODEL.FPN.OUT_CHANNELS,
            "drop_block_prob": f.FPN.DROP_BLOCK_PROB,
            "drop_block_size": f.FPN.DROP_BLOCK_SIZE,
        }

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, images, input_ids, attention_mask) -> Tuple[Dict[str, torch.Tensor], dict]:
        return self.pyramid(*self.bottom_up(images, input_ids, attention_mask))

    def fused(self, image: SwinState, text: TextState) -> Tuple[Dict[str, torch.Tensor], dict]:
        """What :meth:`forward` returns, from an image prefix and a text prefix of the same batch
        size (:meth:`FusionBottomUp.image_prefix` / :meth:`~FusionBottomUp.text_prefix`)."""
        return self.pyramid(*self.bottom_up.fused(image, text))

    def pyramid(self, bottom_up: Dict[str, torch.Tensor], language: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
        """C3-C5 of the bottom-up -> P3-P7 (the language dict passes through)."""
        feats = [bottom_up[f] for f in self.in_features]  # C3, C4, C5
        prev = self.lateral_convs[0](feats[-1])
        results = [self.output_convs[0](prev)]
        for lateral_conv, output_conv, c in zip(self.lateral_convs[1:], self.output_convs[1:], feats[-2::-1]):
            lateral = lateral_conv(c)
            # size-based nearest upsampling as upstream (equals scale 2 on 32-padded inputs)
            prev = lateral + F.interpolate(prev, size=lateral.shape[-2:], mode="nearest")
            # DropBlock feeds only the output conv; the top-down path continues undropped
            results.insert(0, output_conv(self.drop_block(prev)))
        results.extend(self.top_block(results[-1]))
        return dict(zip(self._out_features, results)), language


@BACKBONE_REGISTRY.register()
def build_fiber_backbone(cfg, input_shape=None) -> FiberBackbone:
    """Detectron2 backbone builder (``MODEL.BACKBONE.NAME: build_fiber_backbone``)."""
    return FiberBackbone(cfg, input_shape)
