"""Every yaml under configs/ loads, merges into fiber-det's config and builds a model."""
import pytest
import torch

from conftest import REPO
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from fiber_det import add_fiber_config
from fiber_det.config import add_fiber_config as add_again

CONFIGS = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))

# (total, trainable) parameters; Swin-B ones equal the official counts minus cls_logits (20,560)
EXPECTED_PARAMS = {
    "Base-FIBER-SwinB.yaml": (252_034_744, 252_034_744),
    "FIBER-SwinB-coarse-then-fine.yaml": (252_034_744, 251_495_344),
    "FIBER-SwinB-coco.yaml": (252_034_744, 252_034_744),
    "FIBER-SwinB-lvis.yaml": (252_034_744, 252_034_744),
    "FIBER-SwinB-refcoco.yaml": (252_042_936, 252_042_936),
    # the official coarse model's 281,897,191 (384 px, ITC + ITM + MLM) minus its unused text pooler
    # (590,592), alpha_t2i of layers 0-5 (6), cross-attention output LayerNorms (9,216), rank_output (1,537)
    "coarse/Base-FIBER-B-coarse.yaml": (281_295_840, 281_295_840),
    "coarse/FIBER-B-pretrain.yaml": (281_295_840, 281_295_840),
    # ITC only at 576 px: no MLM head (39,245,913) nor ITM head (3,074); position tables for window
    # 18 instead of 12 (1225 - 529 rows x the heads of the 24 blocks: 2x4 + 2x8 + 18x16 + 2x32 = 376)
    "coarse/FIBER-B-retrieval-coco-itc.yaml": (281_295_840 - 39_245_913 - 3_074 + 696 * 376,) * 2,
    # ITM only at 384 px: no MLM head, no ITC temperature
    "coarse/FIBER-B-retrieval-coco-itm.yaml": (281_295_840 - 39_245_913 - 1,) * 2,
}


def _cfg(name):
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_every_config_is_listed():
    assert set(EXPECTED_PARAMS) < set(CONFIGS)
    assert any(c.startswith("quick_schedules/") for c in CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds(name):
    cfg = _cfg(name)
    coarse_model = name.startswith(("coarse/", "quickstart/fiber_tiny_coarse"))  # not the detectors started from one
    assert cfg.MODEL.META_ARCHITECTURE == ("FiberCoarsePretrain" if coarse_model else "FIBER")
    if name.startswith(("quick_schedules/", "coarse/FIBER-coarse-tiny", "quickstart/")):
        model = build_model(cfg)
    else:  # Swin-B sized: build on the meta device (shapes only, no memory)
        cfg.MODEL.DEVICE = "meta"
        with torch.device("meta"):
            model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name in EXPECTED_PARAMS:
        assert (total, trainable) == EXPECTED_PARAMS[name]
    assert total > 0


def test_add_fiber_config_rejects_unknown_keys():
    cfg = add_again(get_cfg())
    with pytest.raises((KeyError, AssertionError), match="MODEL.FIBER.SWIN.NOT_A_KEY"):
        cfg.merge_from_list(["MODEL.FIBER.SWIN.NOT_A_KEY", 1])
