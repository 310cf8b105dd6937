"""Official parameter groups on the full FIBER-B model, checked against the official
state-dict key list.

The oracle applies the official rules literally to the official names and shapes of
the official state-dict key lists ../shared/docs/fiber_statedict_keys_v{2,3}.tsv, read at test time
(measured on the official code); our groups
come from our module names. The full models are built on the meta device (no allocation).
"""
import math
from collections import defaultdict

import pytest
import torch
from torch import nn

from conftest import REPO, tiny_model
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from fiber_det import add_fiber_config
from fiber_det.engine.param_groups import (
    build_param_groups,
    build_param_groups_from_cfg,
    describe_param_groups,
    official_param_name,
)

DOCS = REPO.parent / "shared" / "docs"
OFFICIAL_FROZEN = ("rpn.head.cls_logits.",)  # requires_grad False in every official model
PRETRAIN_FROZEN = OFFICIAL_FROZEN + (  # FREEZE_CONV_BODY_AT 2: patch embed + Swin stage 1
    "fusion_backbone.backbone.body.patch_embed.",
    "fusion_backbone.backbone.body.layers.0.",
)
FINETUNE = dict(base_lr=1e-5, lang_lr=1e-5, weight_decay=1e-4)
PRETRAIN = dict(base_lr=1e-4, lang_lr=1e-5, weight_decay=0.01)
# non-default factors, so that every rule leaves a distinct trace
ODD_FACTORS = dict(
    base_lr=1e-4, lang_lr=3e-5, weight_decay=0.05, bias_lr_factor=3.0, weight_decay_bias=1e-3,
    norm_wd_factor=0.25, backbone_body_lr_factor=0.5,
)


def full_model(config: str):
    """A FIBER-B model of configs/<config> on the meta device."""
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / config))
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        return build_model(cfg)


def official_groups(version: str, frozen, base_lr, lang_lr, weight_decay, bias_lr_factor=2.0,
                    weight_decay_bias=0.0, norm_wd_factor=1.0, backbone_body_lr_factor=1.0):
    """{(lr, wd): [tensors, scalars]} by the official rules on the official parameter list."""
    out = defaultdict(lambda: [0, 0])
    for line in (DOCS / f"fiber_statedict_keys_{version}.tsv").read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        if name.endswith(("relative_position_index", "position_ids")) or ".cell_anchors." in name:
            continue  # buffers
        if name.startswith(frozen):
            continue
        lr, wd = base_lr, weight_decay
        if "language_backbone" in name:
            lr = lang_lr
        if "backbone.body" in name and "language_backbone.body" not in name:
            lr = base_lr * backbone_body_lr_factor
        if "bias" in name:
            lr *= bias_lr_factor
            wd = weight_decay_bias
        if "norm" in name or "Norm" in name:
            wd *= norm_wd_factor
        dims = [int(x) for x in shape.strip("()").split(",") if x.strip()]
        out[(lr, wd)][0] += 1
        out[(lr, wd)][1] += math.prod(dims)
    return dict(out)


def our_groups(groups):
    return {(d["lr"], d["weight_decay"]): [d["tensors"], d["scalars"]] for d in describe_param_groups(groups).values()}


@pytest.fixture(scope="module")
def coco_model():
    return full_model("FIBER-SwinB-coco.yaml")


@pytest.mark.parametrize("hyper", [FINETUNE, PRETRAIN, ODD_FACTORS], ids=["finetune", "pretrain", "odd"])
def test_groups_match_official_rules_v2(coco_model, hyper):
    groups = build_param_groups(coco_model, **hyper)
    assert our_groups(groups) == official_groups("v2", OFFICIAL_FROZEN, **hyper)
    assert sum(d["scalars"] for d in describe_param_groups(groups).values()) == 252_034_744


def test_finetune_counts(coco_model):
    # COCO/LVIS fine-tuning: every "bias" name at 2e-5 without decay, everything else 1e-5 / 1e-4
    groups = build_param_groups(coco_model, **FINETUNE)
    assert describe_param_groups(groups) == {
        "lr=1e-05,wd=0.0001": {"lr": 1e-5, "weight_decay": 1e-4, "tensors": 386, "scalars": 251_541_906},
        "lr=2e-05,wd=0.0": {"lr": 2e-5, "weight_decay": 0.0, "tensors": 388, "scalars": 492_838},
    }


def test_pretraining_model_freezes_stage1():
    model = full_model("FIBER-SwinB-coarse-then-fine.yaml")
    groups = build_param_groups(model, **PRETRAIN)
    assert our_groups(groups) == {
        (1e-4, 0.01): [240, 113_688_076],  # Swin body, FPN, head weights
        (2e-4, 0.0): [250, 364_446],  # their "bias" names
        (1e-5, 0.01): [130, 137_322_246],  # text tower weights
        (2e-5, 0.0): [121, 120_576],  # text tower biases
    }
    assert our_groups(groups) == official_groups("v2", PRETRAIN_FROZEN, **PRETRAIN)
    assert sum(len(g["params"]) for g in groups) == 741
    assert sum(p.numel() for g in groups for p in g["params"]) == 251_495_344
    grouped = {id(p) for g in groups for p in g["params"]}
    frozen = [n for n, p in model.named_parameters() if id(p) not in grouped]
    stage1 = ("backbone.bottom_up.vision.patch_embed.", "backbone.bottom_up.vision.layers.0.")
    assert frozen and all(n.startswith(stage1) for n in frozen)


def test_v3_model_matches_official():
    model = full_model("FIBER-SwinB-refcoco.yaml")
    groups = build_param_groups(model, **ODD_FACTORS)
    assert our_groups(groups) == official_groups("v3", OFFICIAL_FROZEN, **ODD_FACTORS)
    assert sum(p.numel() for g in groups for p in g["params"]) == 252_042_936


def test_quirky_names(coco_model):
    """Spot checks of the substring quirks (rules match substrings of parameter names, so e.g. every
    name containing "norm" gets the norm factor) with every factor distinct."""
    groups = build_param_groups(coco_model, **ODD_FACTORS)
    where = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(coco_model.named_parameters())

    def lr_wd(name):
        return where[id(params[name])]

    body, text = "backbone.bottom_up.vision.", "backbone.bottom_up.text."
    # Swin body: BASE_LR x BACKBONE_BODY_LR_FACTOR; "bias" names (incl. the relative position
    # table) x BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS; norm weights decayed x norm factor
    assert lr_wd(body + "layers.2.blocks.3.attn.relative_position_bias_table") == (1e-4 * 0.5 * 3.0, 1e-3)
    assert lr_wd(body + "layers.2.blocks.3.attn.qkv.weight") == (1e-4 * 0.5, 0.05)
    assert lr_wd(body + "layers.2.blocks.3.norm1.weight") == (1e-4 * 0.5, 0.05 * 0.25)
    assert lr_wd(body + "layers.2.blocks.3.norm1.bias") == (1e-4 * 0.5 * 3.0, 1e-3 * 0.25)
    assert lr_wd(body + "layers.3.blocks.1.attn.alpha_i2t") == (1e-4 * 0.5, 0.05)
    # text tower: LANG_LR; "LayerNorm" counts as a norm
    assert lr_wd(text + "encoder.layer.7.attention.output.LayerNorm.weight") == (3e-5, 0.05 * 0.25)
    assert lr_wd(text + "embeddings.word_embeddings.weight") == (3e-5, 0.05)
    assert lr_wd(text + "encoder.layer.10.alpha_t2i") == (3e-5, 0.05)
    # FPN and head: BASE_LR; bias_lang / bias0 are "bias" names; GroupNorm ("bn") is not a norm
    assert lr_wd("backbone.fpn_lateral3.weight") == (1e-4, 0.05)
    assert lr_wd("head.bias_lang") == (1e-4 * 3.0, 1e-3)
    assert lr_wd("head.bias0") == (1e-4 * 3.0, 1e-3)
    assert lr_wd("head.log_scale") == (1e-4, 0.05)
    assert lr_wd("head.scales.0.scale") == (1e-4, 0.05)
    assert lr_wd("head.dyhead_tower.0.DyConv.0.bn.weight") == (1e-4, 0.05)


def test_groups_are_disjoint_and_named_by_value(coco_model):
    groups = build_param_groups(coco_model, **PRETRAIN)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in coco_model.parameters() if p.requires_grad)
    assert [g["name"] for g in groups] == [f"lr={g['lr']!r},wd={g['weight_decay']!r}" for g in groups]
    assert len({(g["lr"], g["weight_decay"]) for g in groups}) == len(groups)


def test_from_cfg_reads_solver_keys():
    from conftest import tiny_cfg

    cfg = tiny_cfg(SOLVER__BASE_LR=2e-4, SOLVER__LANG_LR=4e-5, SOLVER__WEIGHT_DECAY=0.03,
                   SOLVER__WEIGHT_DECAY_NORM_FACTOR=0.5, SOLVER__BACKBONE_BODY_LR_FACTOR=0.25)
    model = tiny_model()
    expected = build_param_groups(model, base_lr=2e-4, lang_lr=4e-5, weight_decay=0.03, bias_lr_factor=2.0,
                                  weight_decay_bias=0.0, norm_wd_factor=0.5, backbone_body_lr_factor=0.25)
    got = build_param_groups_from_cfg(cfg, model)
    assert [(g["name"], [id(p) for p in g["params"]]) for g in got] == [
        (g["name"], [id(p) for p in g["params"]]) for g in expected
    ]
    # Swin body (x0.25) / its biases / its norms; text / biases / LayerNorms; FPN+head / biases
    assert {(g["lr"], g["weight_decay"]) for g in got} == {
        (5e-5, 0.03), (1e-4, 0.0), (5e-5, 0.015), (4e-5, 0.03), (8e-5, 0.0), (4e-5, 0.015), (2e-4, 0.03), (4e-4, 0.0),
    }


def test_ddp_prefix_and_unknown_names():
    official = official_param_name("module.backbone.top_block.p6.weight")
    assert official == "fusion_backbone.backbone.fpn.top_blocks.p6.weight"
    with pytest.raises(ValueError, match="no official FIBER counterpart"):
        build_param_groups(nn.Linear(2, 2), **FINETUNE)
    groups = build_param_groups(nn.Linear(2, 2), to_official=lambda n: n, **PRETRAIN)
    assert our_groups(groups) == {(1e-4, 0.01): [1, 4], (2e-4, 0.0): [1, 2]}
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_param_groups(frozen, to_official=lambda n: n, **PRETRAIN)


# ---- the coarse model: six substring groups, checked on the official coarse fixture's parameter names ----

def _official_coarse_group(name, lr, wd, mult_cross=5.0, mult_head=5.0):
    """The official coarse rules, written out: (lr, wd) of one official parameter name."""
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias",
                "norm1.weight", "norm2.bias", "norm2.weight"]
    heads = ["vqa_classifier", "nlvr2_classifier", "mlm_score", "itm_score", "snli_classifier"]
    cross = ["cross_modal", "i2t", "t2i"]
    decayed = not any(n in name for n in no_decay)
    if any(h in name for h in heads):
        return lr * mult_head, wd if decayed else 0.0
    if any(c in name for c in cross):
        return lr * mult_cross, wd if decayed else 0.0
    return lr, wd if decayed else 0.0


def test_coarse_groups_match_the_official_rules_on_the_fixture_names():
    from conftest import FIXTURES
    from fiber_det.checkpoint.official_coarse_config import translate_official_coarse_config
    from fiber_det.engine.param_groups import build_coarse_param_groups, official_coarse_param_name

    fixture = torch.load(FIXTURES / "fiber_coarse_ref_dev.pt", map_location="cpu", weights_only=True, mmap=True)
    ref = fixture["reference"]
    cfg = translate_official_coarse_config(ref["config"], dict(ref["text_model_config_not_in_config"],
                                                              model_type="roberta"))
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    groups = build_coarse_param_groups(model, base_lr=1e-5, weight_decay=0.01, lr_mult_cross_modal=3.0,
                                       lr_mult_head=7.0)
    ours = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    buffers = ("_queue", "queue_ptr", "queue_total", "relative_position_index", "attn_mask", "position_ids")
    official = [k for k in fixture["state_dict"] if not k.endswith(buffers)]
    unused = set(fixture["outputs_train"]["params_without_grad"])  # absent here; rank_output is itm_score row 1
    params = dict(model.named_parameters())
    assert {official_coarse_param_name(n) for n in params} == set(official) - unused
    counts = defaultdict(int)
    for name, p in params.items():
        want = _official_coarse_group(official_coarse_param_name(name), 1e-5, 0.01, 3.0, 7.0)
        assert ours[id(p)] == pytest.approx(want, rel=1e-12), name
        counts[want] += 1
    # all six official groups are populated (x1 / x3 cross-modal / x7 heads, decayed or not)
    assert len(counts) == 6, dict(counts)
    # the quirks: gates, the query LayerNorm weight and temp are decayed; every "bias" name is not
    by_name = {official_coarse_param_name(n): ours[id(p)] for n, p in params.items()}
    assert by_name["temp"] == pytest.approx((1e-5, 0.01))
    assert by_name["vit_model.layers.2.blocks.14.attn.alpha_i2t"] == pytest.approx((3e-5, 0.01))
    assert by_name["vit_model.layers.2.blocks.14.attn.norm_i2t_i.weight"] == pytest.approx((3e-5, 0.01))
    assert by_name["vit_model.layers.0.blocks.0.attn.relative_position_bias_table"] == pytest.approx((1e-5, 0.0))
    assert by_name["mlm_score.bias"] == pytest.approx((7e-5, 0.0))
    assert by_name["text_transformer.embeddings.word_embeddings.weight"] == pytest.approx((1e-5, 0.01))


def test_coarse_groups_from_cfg_and_a_name_in_both_lists():
    from coarse_inputs import coarse_cfg, coarse_model
    from fiber_det.engine.param_groups import CoarseLrRules

    cfg = coarse_cfg(SOLVER__BASE_LR=2e-5, SOLVER__WEIGHT_DECAY=0.02, SOLVER__COARSE__LR_MULT_HEAD=50.0)
    groups = build_param_groups_from_cfg(cfg, coarse_model())
    assert {(g["lr"], g["weight_decay"]) for g in groups} == {
        (2e-5, 0.02), (2e-5, 0.0), (1e-4, 0.02), (1e-4, 0.0), (1e-3, 0.02), (1e-3, 0.0)}
    # the Swin's LR factor (1 officially) multiplies its parameters, fusion modules included
    model = coarse_model()
    groups = build_param_groups_from_cfg(coarse_cfg(SOLVER__BASE_LR=2e-5, SOLVER__BACKBONE_BODY_LR_FACTOR=10.0), model)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr[id(params["backbone.vision.patch_embed.proj.weight"])] == pytest.approx(2e-4)
    assert lr[id(params["backbone.vision.layers.3.blocks.0.attn.qkv_i2t.weight"])] == pytest.approx(1e-3)
    assert lr[id(params["backbone.text.encoder.layer.3.crossattention_t2i.self.key.weight"])] == pytest.approx(1e-4)
    assert lr[id(params["backbone.text.embeddings.word_embeddings.weight"])] == pytest.approx(2e-5)
    with pytest.raises(ValueError, match="both a head and cross-modal"):
        CoarseLrRules(base_lr=1.0, weight_decay=0.0).lr_and_weight_decay("itm_score.cross_modal.weight")
