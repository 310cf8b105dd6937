"""Official FIBER (maskrcnn_benchmark) state-dict names -> fiber-det names, as data.

Every official key (after stripping ``module.``) falls in exactly one class:
- renamed by the first matching prefix rule of :data:`PREFIX_RENAMES`;
- a buffer fiber-det regenerates (:data:`REGENERATED_BUFFERS`): checked for equality, not loaded;
- dropped (:data:`DROPPED`): the vestigial, frozen ``cls_logits`` conv.
Anything else is an error (the converter lists it). Inside each part the names are upstream's
(Swin, BERT/RoBERTa, DyHead), so the table is prefixes only — no reshapes.
"""
import re

__all__ = ["PREFIX_RENAMES", "REGENERATED_BUFFERS", "DROPPED", "V3_MARKER", "rename_key"]

# (official prefix, fiber-det prefix); first match wins, so specific rules come first
PREFIX_RENAMES = (
    # image tower (Swin with image->text cross-attention)
    ("fusion_backbone.backbone.body.", "backbone.bottom_up.vision."),
    # text tower (RoBERTa with text->image cross-attention)
    ("fusion_backbone.language_backbone.body.model.", "backbone.bottom_up.text."),
    # FPN: upstream inner/layer index i + 1 = log2(stride) in Detectron2's naming
    ("fusion_backbone.backbone.fpn.fpn_inner2.", "backbone.fpn_lateral3."),
    ("fusion_backbone.backbone.fpn.fpn_inner3.", "backbone.fpn_lateral4."),
    ("fusion_backbone.backbone.fpn.fpn_inner4.", "backbone.fpn_lateral5."),
    ("fusion_backbone.backbone.fpn.fpn_layer2.", "backbone.fpn_output3."),
    ("fusion_backbone.backbone.fpn.fpn_layer3.", "backbone.fpn_output4."),
    ("fusion_backbone.backbone.fpn.fpn_layer4.", "backbone.fpn_output5."),
    ("fusion_backbone.backbone.fpn.top_blocks.", "backbone.top_block."),
    # DyHead tower and output layers
    ("rpn.head.", "head."),
)

# official buffers that fiber-det recomputes; the converter asserts the stored values match
REGENERATED_BUFFERS = (
    re.compile(r"^fusion_backbone\.backbone\.body\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$"),
    re.compile(r"^fusion_backbone\.language_backbone\.body\.model\.embeddings\.position_ids$"),
    re.compile(r"^rpn\.anchor_generator\.cell_anchors\.\d+$"),
)

# official parameters with no counterpart: frozen, only used by a loss multiplied by 0
DROPPED = (re.compile(r"^rpn\.head\.cls_logits\.(weight|bias)$"),)

# present only in FIBER v3 checkpoints (the image->text query LayerNorm)
V3_MARKER = re.compile(r"\.attn\.norm_i2t_i\.weight$")


def rename_key(key: str):
    """The fiber-det name of an official key, or None if no rule applies."""
    for old, new in PREFIX_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return None
