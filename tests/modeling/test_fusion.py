"""The fusion schedule and the fusion bottom-up's three parts (image prefix, text prefix, fused)."""
import doctest

import pytest
import torch

from conftest import tiny_model
from fiber_det.modeling.backbone import fusion
from fiber_det.modeling.backbone.fusion import FusionBottomUp, fusion_schedule


def test_docstring_examples():
    results = doctest.testmod(fusion)
    assert results.attempted >= 1 and results.failed == 0


def test_schedule_pairs_the_last_blocks_with_the_last_layers():
    pairs = fusion_schedule((1, 1, 2, 1), 32, 4, 2)
    assert [(p.stage, p.block, p.text_layer, p.image_dim) for p in pairs] == [(2, 1, 2, 128), (3, 0, 3, 256)]
    assert fusion_schedule((2, 2, 18, 2), 128, 12, 0) == []
    with pytest.raises(ValueError, match="text encoder has 4"):
        fusion_schedule((1, 1, 2, 1), 32, 4, 5)


def test_parts_compose_to_the_detector_forward():
    bottom_up = tiny_model().backbone.bottom_up.eval()
    assert isinstance(bottom_up, FusionBottomUp)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    ids = torch.randint(5, 1000, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        stages, language = bottom_up(images, ids, mask)
        prefix = bottom_up.image_prefix(images)
        assert prefix.next_block == 3  # blocks 0-2 of (1, 1, 2, 1) do not depend on the text
        text = bottom_up.text_prefix(ids, mask)
        assert text.next_layer == 2
        image, hidden = bottom_up.fuse(prefix, text)
    assert torch.equal(hidden, language["hidden"])
    for k, v in stages.items():
        assert torch.equal(image.stage_outputs[k], v), k
    with torch.no_grad():  # the towers alone differ from the fused encoder (the gates are open)
        bottom_up.vision.block(3).attn.alpha_i2t.fill_(1.0)
        bottom_up.text.encoder.layer[3].alpha_t2i.fill_(1.0)
        fused_hidden = bottom_up.fuse(bottom_up.image_prefix(images), bottom_up.text_prefix(ids, mask))[1]
        alone = bottom_up.encode_text(ids, mask)
    assert not torch.allclose(fused_hidden, alone)


def test_schedule_and_towers_must_agree():
    bottom_up = tiny_model().backbone.bottom_up
    with pytest.raises(ValueError, match="fusion mismatch"):
        FusionBottomUp(vision=bottom_up.vision, text=bottom_up.text, schedule=bottom_up.schedule[1:])
