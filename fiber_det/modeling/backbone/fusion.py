"""The fusion bottom-up: Swin and the text encoder run interleaved, exchanging information
through cross-attention inside both towers (spec §2.4).

The last N Swin blocks (over all stages) pair one-to-one, in order, with the last N text
layers. In each fused step both towers read the other tower's state from *before* the step
(simultaneous update). The first L - N text layers do not depend on the image and run first.
N = 6 with Swin-B (2, 2, 18, 2) and a 12-layer RoBERTa reproduces FIBER; N = 0 gives two
independent towers.
"""
from typing import Dict, List, Optional, Tuple

import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

from .swin import SwinTransformer, TextContext
from .text import TextEncoder, extended_attention_mask

__all__ = ["FusionBottomUp", "paired_image_dims"]


def paired_image_dims(
    depths, embed_dim: int, num_text_layers: int, num_fused: int
) -> List[Optional[int]]:
    """Key/value width of each text layer's cross-attention: the width of the Swin stage whose
    block it is paired with (None for unfused layers).

    >>> paired_image_dims((2, 2, 18, 2), 128, 12, 6)
    [None, None, None, None, None, None, 512, 512, 512, 512, 1024, 1024]
    """
    if num_fused > num_text_layers:
        raise ValueError(f"{num_fused} fused layers but the text encoder has {num_text_layers}")
    block_dims = [embed_dim * 2**i for i, d in enumerate(depths) for _ in range(d)]
    if num_fused > len(block_dims):
        raise ValueError(f"{num_fused} fused layers but the Swin has {len(block_dims)} blocks")
    fused_dims = block_dims[len(block_dims) - num_fused:]
    return [None] * (num_text_layers - num_fused) + fused_dims


class FusionBottomUp(Backbone):
    """Swin (``vision``) + text encoder (``text``) with the interleaved schedule.

    forward(images (B, 3, H, W), input_ids (B, T), attention_mask (B, T)) returns
    ({"res3", "res4", "res5"}: (B, C_i, H/stride, W/stride)) and the language dict
    {"hidden": (B, T, D), "embedded": hidden * mask, "masks": (B, T), "aggregate": (B, D)}.
    """

    def __init__(self, vision: SwinTransformer, text: TextEncoder, num_fused: int):
        super().__init__()
        self.vision = vision
        self.text = text
        self.num_fused = num_fused
        n_blocks = sum(1 for layer in vision.layers for b in layer.blocks if b.fused)
        n_layers = sum(1 for layer in text.encoder.layer if layer.image_dim is not None)
        if not n_blocks == n_layers == num_fused:
            raise ValueError(
                f"fusion mismatch: {n_blocks} fused Swin blocks, {n_layers} fused text layers, "
                f"num_fused={num_fused}"
            )
        self._out_features = [f"res{i + 2}" for i in vision.out_indices]
        self._out_feature_channels = {f"res{i + 2}": vision.num_features[i] for i in vision.out_indices}
        self._out_feature_strides = {
            f"res{i + 2}": vision.patch_size * 2**i for i in vision.out_indices
        }

    @property
    def size_divisibility(self) -> int:
        return 32

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        mask = extended_attention_mask(attention_mask)
        hidden = self.text.embed(input_ids)
        n_plain = self.text.num_layers - self.num_fused
        for k in range(n_plain):
            hidden = self.text.run_layer(k, hidden, mask)
        state = {"hidden": hidden, "k": n_plain}

        def fusion_step(image_tokens: torch.Tensor) -> TextContext:
            # the Swin block sees the text from before this step; the text layer sees the
            # image tokens entering the block (raw residual stream, no norm, no mask)
            ctx = TextContext(state["hidden"], mask)
            state["hidden"] = self.text.run_layer(state["k"], state["hidden"], mask, image_tokens)
            state["k"] += 1
            return ctx

        stages = self.vision(images, fusion_step if self.num_fused else None)
        hidden = state["hidden"]
        m = attention_mask.to(hidden.dtype)
        embedded = hidden * m.unsqueeze(-1)
        language = {
            "hidden": hidden,
            "embedded": embedded,
            "masks": attention_mask,
            "aggregate": embedded.sum(1) / m.sum(1, keepdim=True),
        }
        return stages, language
