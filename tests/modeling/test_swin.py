"""Swin geometry: presets, upstream parameter names, padding, output shapes."""
import pytest
import torch

from conftest import tiny_model
from fiber_det.modeling.backbone.fusion import fusion_schedule
from fiber_det.modeling.backbone.swin import SwinTransformer

# parameters of the upstream ImageNet classifiers (swin_tiny/small_patch4_window7_224,
# swin_base_patch4_window12_384 as FIBER uses), minus the 1000-class head; with out_indices=(3,)
# our norm3 stands where their final norm is. Swin-B here = the official FIBER-B Swin body (86.88 M).
UPSTREAM_BODY_PARAMS = {"T": 28_288_354 - 769_000, "S": 49_606_258 - 769_000, "B": 87_903_584 - 1_025_000}


@pytest.mark.parametrize("name", sorted(UPSTREAM_BODY_PARAMS))
def test_presets_match_upstream_parameter_counts(name):
    with torch.device("meta"):
        swin = SwinTransformer.from_preset(name, out_indices=(3,))
    assert sum(p.numel() for p in swin.parameters()) == UPSTREAM_BODY_PARAMS[name]


def test_upstream_names_and_fused_blocks():
    with torch.device("meta"):
        schedule = fusion_schedule((2, 2, 18, 2), 128, 12, 6)
        swin = SwinTransformer.from_preset("B", text_dim=768, fused_blocks=[(p.stage, p.block) for p in schedule],
                                           i2t_query_norm=True)
    keys = set(swin.state_dict())
    assert "patch_embed.proj.weight" in keys and "layers.2.downsample.reduction.weight" in keys
    assert {"norm1.weight", "norm2.weight", "norm3.weight"} <= keys and "norm0.weight" not in keys
    fused = sorted({k.split(".attn.")[0] for k in keys if "qkv_i2t" in k})
    assert fused == [f"layers.2.blocks.{j}" for j in (14, 15, 16, 17)] + ["layers.3.blocks.0", "layers.3.blocks.1"]
    assert "layers.2.blocks.14.attn.norm_i2t_i.weight" in keys
    assert not any(".relative_position_index" in k for k in keys)  # regenerated, never loaded


@pytest.mark.parametrize("hw", [(64, 96), (70, 101)])
def test_padding_and_output_strides(hw):
    swin = SwinTransformer(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=7).eval()
    with torch.no_grad():
        out = swin(torch.randn(1, 3, *hw))
    for i, (name, stride) in enumerate((("res3", 8), ("res4", 16), ("res5", 32))):
        assert out[name].shape == (1, 32 * 2**i, -(-hw[0] // stride), -(-hw[1] // stride))


def test_backbone_output_shape():
    shapes = tiny_model().backbone.output_shape()
    assert [(k, v.stride, v.channels) for k, v in shapes.items()] == [
        ("p3", 8, 32), ("p4", 16, 32), ("p5", 32, 32), ("p6", 64, 32), ("p7", 128, 32)]
