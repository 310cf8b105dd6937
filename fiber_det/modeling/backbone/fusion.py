"""The fusion bottom-up: Swin and the text encoder run interleaved, exchanging information
through cross-attention inside both towers. This file is the one place that decides which Swin
block pairs with which text layer (:func:`fusion_schedule`).

The last N Swin blocks (over all stages) pair one-to-one, in order, with the last N text
layers. In each fused step both towers read the other tower's state from *before* the step
(simultaneous update): the Swin block attends to the text entering the paired layer, the text
layer attends to the image tokens entering the paired block. N = 6 with Swin-B (2, 2, 18, 2) and
a 12-layer RoBERTa reproduces FIBER (stage-3 blocks 14-17 with text layers 6-9, stage-4 blocks
0-1 with layers 10-11); N = 0 gives two independent towers.

The work splits into three parts (:class:`FusionBottomUp`): the image prefix (patch embedding
and the blocks before the first fused one), the text prefix (embeddings and the layers before the
first fused one), neither of which depends on the other modality, and the fused part.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .swin import SwinState, SwinTransformer, TextContext
from .text import TextEncoder, TextEncoderConfig, extended_attention_mask

__all__ = [
    "FusedPair", "FusionBottomUp", "TextState", "build_fusion_bottom_up", "fusion_schedule", "text_config_from_cfg",
]


@dataclass(frozen=True)
class FusedPair:
    """One fused step: Swin block ``block`` of stage ``stage`` (width ``image_dim``) with text
    layer ``text_layer``."""

    stage: int
    block: int
    text_layer: int
    image_dim: int


def fusion_schedule(depths: Sequence[int], embed_dim: int, num_text_layers: int, num_fused: int) -> List[FusedPair]:
    """FIBER's pairing: the last ``num_fused`` Swin blocks with the last ``num_fused`` text layers.

    >>> [(p.stage, p.block, p.text_layer) for p in fusion_schedule((2, 2, 18, 2), 128, 12, 6)]
    [(2, 14, 6), (2, 15, 7), (2, 16, 8), (2, 17, 9), (3, 0, 10), (3, 1, 11)]
    """
    if num_fused > num_text_layers:
        raise ValueError(f"{num_fused} fused layers but the text encoder has {num_text_layers}")
    blocks = [(i, j) for i, d in enumerate(depths) for j in range(d)]
    if num_fused > len(blocks):
        raise ValueError(f"{num_fused} fused layers but the Swin has {len(blocks)} blocks")
    tail = blocks[len(blocks) - num_fused:]
    first_layer = num_text_layers - num_fused
    return [FusedPair(i, j, first_layer + n, embed_dim * 2**i) for n, (i, j) in enumerate(tail)]


@dataclass
class TextState:
    """The text side part-way through the encoder.

    Attributes:
        hidden: (B, T, D) hidden states entering layer ``next_layer``.
        additive_mask: (B, 1, 1, T) extended attention mask (0 / finfo.min).
        attention_mask: (B, T) 0/1 mask.
        next_layer: index of the next layer to run.
    """

    hidden: torch.Tensor
    additive_mask: torch.Tensor
    attention_mask: torch.Tensor
    next_layer: int = 0

    @staticmethod
    def cat(states: Sequence["TextState"]) -> "TextState":
        """The batch of the given states, in order (the same length T and next layer)."""
        first = states[0]
        if any((s.hidden.shape[1], s.next_layer) != (first.hidden.shape[1], first.next_layer) for s in states):
            raise ValueError("TextState.cat: the states differ in length or next layer")
        return TextState(torch.cat([s.hidden for s in states]), torch.cat([s.additive_mask for s in states]),
                         torch.cat([s.attention_mask for s in states]), first.next_layer)

    def row(self, i: int) -> "TextState":
        """Batch row ``i`` as a state of batch size 1."""
        return TextState(self.hidden[i:i + 1], self.additive_mask[i:i + 1], self.attention_mask[i:i + 1],
                         self.next_layer)


def text_config_from_cfg(cfg) -> TextEncoderConfig:
    """The text tower architecture from ``MODEL.FIBER.TEXT``."""
    t = cfg.MODEL.FIBER.TEXT
    return TextEncoderConfig(
        vocab_size=t.VOCAB_SIZE, hidden_size=t.HIDDEN_SIZE, num_hidden_layers=t.NUM_LAYERS,
        num_attention_heads=t.NUM_HEADS, intermediate_size=t.INTERMEDIATE_SIZE,
        max_position_embeddings=t.MAX_POSITIONS, type_vocab_size=t.TYPE_VOCAB_SIZE,
        layer_norm_eps=t.LAYER_NORM_EPS, pad_token_id=t.PAD_TOKEN_ID,
        hidden_dropout_prob=t.DROPOUT, attention_probs_dropout_prob=t.ATTENTION_DROPOUT,
        position_style=t.ARCH,
    )


class FusionBottomUp(Backbone):
    """Swin (``vision``) + text encoder (``text``) run with the schedule of :func:`fusion_schedule`.

    The fine-grained detector calls :meth:`forward`; the coarse-grained model calls
    :meth:`encode_image` / :meth:`encode_text` (towers alone) and :meth:`image_prefix`,
    :meth:`text_prefix`, :meth:`fuse` (the fused encoder).
    """

    @configurable
    def __init__(self, *, vision: SwinTransformer, text: TextEncoder, schedule: Sequence[FusedPair]):
        """
        Args:
            vision: a Swin built with ``fused_blocks`` = the schedule's (stage, block) pairs.
            text: a text encoder whose layer ``p.text_layer`` has cross-attention of width
                ``p.image_dim`` for every pair p, and no other layer has.
            schedule: the fused pairs in running order (:func:`fusion_schedule`).
        """
        super().__init__()
        self.vision = vision
        self.text = text
        self.schedule = list(schedule)
        self._check_schedule()
        self._text_layer_of_block = {
            vision.block_positions.index((p.stage, p.block)): p.text_layer for p in self.schedule
        }
        self._out_features = [f"res{i + 2}" for i in vision.out_indices]
        self._out_feature_channels = {f"res{i + 2}": vision.num_features[i] for i in vision.out_indices}
        self._out_feature_strides = {f"res{i + 2}": vision.patch_size * 2**i for i in vision.out_indices}

    def _check_schedule(self) -> None:
        blocks = [(i, j) for i, layer in enumerate(self.vision.layers) for j, b in enumerate(layer.blocks) if b.fused]
        layers = [(k, layer.image_dim) for k, layer in enumerate(self.text.encoder.layer) if layer.image_dim is not None]
        n = len(self.schedule)
        tail = list(range(self.text.num_layers - n, self.text.num_layers))
        problems = []
        if sorted(blocks) != sorted((p.stage, p.block) for p in self.schedule):
            problems.append(f"fused Swin blocks {blocks} vs schedule {[(p.stage, p.block) for p in self.schedule]}")
        if layers != [(p.text_layer, p.image_dim) for p in self.schedule]:
            problems.append(f"fused text layers (index, image width) {layers} vs schedule "
                            f"{[(p.text_layer, p.image_dim) for p in self.schedule]}")
        if [p.text_layer for p in self.schedule] != tail:
            problems.append(f"the fused text layers must be the last {n} layers {tail}, in order")
        if problems:
            raise ValueError("fusion mismatch: " + "; ".join(problems))

    @classmethod
    def from_config(cls, cfg, out_indices: Sequence[int] = (1, 2, 3), final_norm: bool = False):
        """From ``MODEL.FIBER.{SWIN,TEXT,FUSION}`` and ``MODEL.BACKBONE.FREEZE_AT`` (Swin; the text
        tower's is ``MODEL.FIBER.TEXT.FREEZE_AT``).

        Args:
            out_indices: Swin stages returned by :meth:`forward` (each with its ``norm{i}``).
            final_norm: create the Swin's final ``norm`` (the coarse model's contrastive path).
        Pretrained tower weights (``MODEL.FIBER.SWIN.WEIGHTS`` / ``TEXT.WEIGHTS``) are not loaded
        here: see :func:`fiber_det.checkpoint.pretrained.load_pretrained_towers`.
        """
        f = cfg.MODEL.FIBER
        text_cfg = text_config_from_cfg(cfg)
        schedule = fusion_schedule(f.SWIN.DEPTHS, f.SWIN.EMBED_DIM, text_cfg.num_hidden_layers, f.FUSION.NUM_LAYERS)
        vision = SwinTransformer(
            embed_dim=f.SWIN.EMBED_DIM, depths=tuple(f.SWIN.DEPTHS), num_heads=tuple(f.SWIN.NUM_HEADS),
            window_size=f.SWIN.WINDOW_SIZE, mlp_ratio=f.SWIN.MLP_RATIO, patch_size=f.SWIN.PATCH_SIZE,
            drop_path_rate=f.SWIN.DROP_PATH_RATE, out_indices=out_indices, text_dim=text_cfg.hidden_size,
            fused_blocks=[(p.stage, p.block) for p in schedule], i2t_query_norm=f.FUSION.I2T_QUERY_NORM,
            shift_single_window=f.SWIN.SHIFT_SINGLE_WINDOW, final_norm=final_norm,
            use_checkpoint=f.SWIN.USE_CHECKPOINT, sdpa=f.SDPA,
        )
        vision.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)
        image_dims: List[Optional[int]] = [None] * text_cfg.num_hidden_layers
        for p in schedule:
            image_dims[p.text_layer] = p.image_dim
        text = TextEncoder(text_cfg, image_dims, use_checkpoint=f.TEXT.USE_CHECKPOINT, sdpa=f.SDPA)
        text.freeze(f.TEXT.FREEZE_AT)
        if f.TEXT.FREEZE_WORD_EMBEDDINGS:
            text.embeddings.word_embeddings.weight.requires_grad_(False)
        return {"vision": vision, "text": text, "schedule": schedule}

    @property
    def num_fused(self) -> int:
        return len(self.schedule)

    @property
    def size_divisibility(self) -> int:
        return 32

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    # ---- the towers alone ----
    def encode_image(self, images: torch.Tensor) -> SwinState:
        """(B, 3, H, W) normalised images through the whole Swin, fused blocks without their
        image->text branch. Returns the final state (``tokens``: raw last-stage tokens)."""
        return self.vision.run(self.vision.embed(images))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and 0/1 mask through every text layer without image tokens -> (B, T, D)."""
        state = self.text_prefix(input_ids, attention_mask)
        hidden = state.hidden
        for k in range(state.next_layer, self.text.num_layers):
            hidden = self.text.run_layer(k, hidden, state.additive_mask)
        return hidden

    # ---- the fused encoder, in three parts ----
    def image_prefix(self, images: torch.Tensor) -> SwinState:
        """Patch embedding and every Swin block before the first fused one (text-independent)."""
        first = min(self._text_layer_of_block, default=self.vision.num_blocks)
        return self.vision.run(self.vision.embed(images), stop=first)

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextState:
        """Embeddings and every text layer before the first fused one (image-independent)."""
        mask = extended_attention_mask(attention_mask)
        hidden = self.text.embed(input_ids)
        n_plain = self.text.num_layers - self.num_fused
        for k in range(n_plain):
            hidden = self.text.run_layer(k, hidden, mask)
        return TextState(hidden, mask, attention_mask, n_plain)

    def fuse(self, image: SwinState, text: TextState, last_text_norm: bool = True) -> Tuple[SwinState, torch.Tensor]:
        """The rest of both towers, interleaved; the two prefixes must have the same batch size.

        Args:
            image: from :meth:`image_prefix`; text: from :meth:`text_prefix`.
            last_text_norm: False skips the last text layer's output LayerNorm (official coarse).
        Returns:
            (final Swin state, (B, T, D) last text hidden states).
        """
        state = {"hidden": text.hidden, "k": text.next_layer}
        last = self.text.num_layers - 1

        def fusion_step(block: int, image_tokens: torch.Tensor) -> TextContext:
            k = self._text_layer_of_block[block]
            if k != state["k"]:
                raise RuntimeError(f"fusion out of order: Swin block {block} pairs with text layer {k}, "
                                   f"but layer {state['k']} is next")
            ctx = TextContext(state["hidden"], text.additive_mask)
            state["hidden"] = self.text.run_layer(
                k, state["hidden"], text.additive_mask, image_tokens, last_norm=last_text_norm or k != last
            )
            state["k"] += 1
            return ctx

        out = self.vision.run(image, fusion_step=fusion_step if self.num_fused else None)
        return out, state["hidden"]

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """The fine-grained detector's bottom-up: :meth:`fused` on the two prefixes.

        Returns:
            ({"res{i+2}": (B, C_i, H/stride, W/stride)} for the Swin's ``out_indices``,
            {"hidden": (B, T, D), "embedded": hidden * mask, "masks": (B, T), "aggregate": (B, D)
            masked mean}).
        """
        text = self.text_prefix(input_ids, attention_mask)  # first: keeps the order of random draws
        return self.fused(self.image_prefix(images), text)

    def fused(self, image: SwinState, text: TextState) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """The detector's bottom-up from an image prefix and a text prefix of the same batch size
        (row b of one with row b of the other); returns what :meth:`forward` returns."""
        image, hidden = self.fuse(image, text)
        m = text.attention_mask.to(hidden.dtype)
        embedded = hidden * m.unsqueeze(-1)
        language = {
            "hidden": hidden,
            "embedded": embedded,
            "masks": text.attention_mask,
            "aggregate": embedded.sum(1) / m.sum(1, keepdim=True),
        }
        return image.stage_outputs, language


@BACKBONE_REGISTRY.register()
def build_fusion_bottom_up(cfg, input_shape=None) -> FusionBottomUp:
    """Detectron2 backbone builder of the fused Swin + text towers (no FPN)."""
    return FusionBottomUp(cfg)
