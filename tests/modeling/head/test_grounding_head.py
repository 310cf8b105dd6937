"""The region-word head's output layout."""
import torch

from fiber_det.modeling.head.atss import LegacyAnchorGenerator
from fiber_det.modeling.head.grounding_head import FiberHead, flatten_level_outputs


def test_flattened_maps_follow_the_anchor_order():
    """Position k of the flattened maps is anchor k of the generator: (y, x) row-major, level by level."""
    maps = [torch.arange(6.0).reshape(1, 1, 2, 3), torch.tensor([[[[6.0]]]])]
    flat = flatten_level_outputs(maps)
    assert flat.shape == (1, 7, 1) and flat[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    anchors = LegacyAnchorGenerator([8, 16], [[8], [16]], [1.0])([(2, 3), (1, 1)])
    corners = torch.cat(anchors)[:, :2]  # stride-8 size-8 anchors start at their cell's corner
    assert corners[:6].tolist() == [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]] and len(corners) == 7


def test_head_returns_only_its_outputs():
    torch.manual_seed(0)
    head = FiberHead(in_channels=16, channels=16, num_convs=1, num_levels=2, text_dim=8, gn_groups=4,
                     deformable=False).eval()
    with torch.no_grad():
        out = head([torch.randn(1, 16, 4, 6), torch.randn(1, 16, 2, 3)], torch.randn(1, 5, 8))
    assert set(out) == {"box_deltas", "centerness", "token_logits"}
    assert [tuple(x.shape) for x in out["token_logits"]] == [(1, 24, 5), (1, 6, 5)]
    assert [tuple(x.shape) for x in out["box_deltas"]] == [(1, 4, 4, 6), (1, 4, 2, 3)]
