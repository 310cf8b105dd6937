"""The coarse-grained (stage-1) checkpoint -> the fine-grained model's towers.

The real ``fiber_coarse_init.pt`` is not available; a synthetic one is built from the coarse
module names (``vit_model.*``, ``text_transformer.*``) of a fine-grained model's towers, plus
the tensors the coarse model has and the fine-grained one discards, minus the Swin output norms
``norm1..3`` the coarse model does not have.
"""
import re

import pytest
import torch

from checkpoint_test_utils import pooled_tensors, run_tool, write_fixture_side_files
from conftest import tiny_model
from fiber_det.checkpoint.coarse import convert_coarse_state_dict
from fiber_det.checkpoint.convert import ConversionError
from fiber_det.modeling.backbone.windows import relative_position_index

VISION, TEXT = "backbone.bottom_up.vision.", "backbone.bottom_up.text."
OUTPUT_NORM = re.compile(r"^backbone\.bottom_up\.vision\.norm[123]\.")
FRESH_PREFIXES = ("backbone.fpn_", "backbone.top_block", "head.")
BLOCK = re.compile(r"^backbone\.bottom_up\.vision\.layers\.(\d+)\.blocks\.(\d+)\.")
LAYER = re.compile(r"^backbone\.bottom_up\.text\.encoder\.layer\.(\d+)\.")


def expected_fresh(shapes):
    """The model keys a coarse checkpoint cannot initialise: FPN, head, Swin output norms."""
    return {k for k in shapes if k.startswith(FRESH_PREFIXES) or OUTPUT_NORM.match(k)}


def build_coarse(shapes, seed=0, add_norm_i2t_i=True):
    """A synthetic coarse checkpoint state dict for a model with these state-dict shapes.

    Returns (state dict, {coarse tower key: model key}, {extra coarse key: expected drop reason
    fragment, or "buffer" for the index buffers the converter checks and regenerates})."""
    tower = {}
    for k in shapes:
        if k.startswith(VISION) and not OUTPUT_NORM.match(k):
            tower["vit_model." + k[len(VISION):]] = k
        elif k.startswith(TEXT):
            tower["text_transformer." + k[len(TEXT):]] = k
    blocks = sorted({m.group(1, 2) for m in map(BLOCK.match, shapes) if m})
    fused_blocks = [b for b in blocks if f"{VISION}layers.{b[0]}.blocks.{b[1]}.attn.alpha_i2t" in shapes]
    layers = sorted({int(m.group(1)) for m in map(LAYER.match, shapes) if m})
    fused_layers = [k for k in layers if f"{TEXT}encoder.layer.{k}.alpha_t2i" in shapes]
    hidden = shapes[f"{TEXT}embeddings.word_embeddings.weight"][1]
    vocab = shapes[f"{TEXT}embeddings.word_embeddings.weight"][0]
    max_pos = shapes[f"{TEXT}embeddings.position_embeddings.weight"][0]
    last_dim = shapes[f"{VISION}norm3.weight"][0]
    table = shapes[f"{VISION}layers.0.blocks.0.attn.relative_position_bias_table"][0]
    window = (int(round(table ** 0.5)) + 1) // 2

    float_shapes = {k: shapes[m] for k, m in tower.items()}
    extras = {}  # key -> (shape, reason fragment)
    extras["vit_model.norm.weight"] = ((last_dim,), "final norm")
    extras["vit_model.norm.bias"] = ((last_dim,), "final norm")
    for i, j in blocks:
        if int(j) % 2:
            extras[f"vit_model.layers.{i}.blocks.{j}.attn_mask"] = ((4, window ** 2, window ** 2), "shift-mask")
    for i, j in fused_blocks:
        dim = shapes[f"{VISION}layers.{i}.blocks.{j}.norm1.weight"][0]
        for p in ("weight", "bias"):
            key = f"vit_model.layers.{i}.blocks.{j}.attn.norm_i2t_i.{p}"
            if add_norm_i2t_i and f"{VISION}layers.{i}.blocks.{j}.attn.norm_i2t_i.{p}" not in shapes:
                extras[key] = ((dim,), "absent in a v2 model")
            elif add_norm_i2t_i:
                float_shapes[key] = (dim,)
                tower[key] = f"{VISION}layers.{i}.blocks.{j}.attn.norm_i2t_i.{p}"
    extras["text_transformer.pooler.dense.weight"] = ((hidden, hidden), "pooler")
    extras["text_transformer.pooler.dense.bias"] = ((hidden,), "pooler")
    for k in fused_layers:
        for p in ("weight", "bias"):
            key = f"text_transformer.encoder.layer.{k}.crossattention_t2i.output.LayerNorm.{p}"
            extras[key] = ((hidden,), "Identity")
    for k in layers:
        if k not in fused_layers:
            extras[f"text_transformer.encoder.layer.{k}.alpha_t2i"] = ((1,), "without cross-attention")
    heads = {
        "cross_modal_image_transform.weight": (hidden, last_dim),
        "cross_modal_text_transform.weight": (hidden, hidden),
        "itm_score.fc.weight": (2, 2 * hidden),
        "mlm_score.bias": (vocab,),
        "temp": (),
        "image_queue": (hidden, 16),
    }
    for k, s in heads.items():
        extras[k] = (s, "coarse-stage head")
    float_shapes.update({k: s for k, (s, _) in extras.items()})
    sd = pooled_tensors(float_shapes, seed)
    # integer buffers
    for i, j in blocks:
        key = f"vit_model.layers.{i}.blocks.{j}.attn.relative_position_index"
        sd[key] = relative_position_index(window)
        extras[key] = (None, "buffer")
    sd["text_transformer.embeddings.position_ids"] = torch.arange(max_pos).expand(1, -1)
    extras["text_transformer.embeddings.position_ids"] = (None, "buffer")
    return sd, tower, {k: r for k, (_, r) in extras.items()}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_shapes():
    return _shapes(tiny_model())


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "module."])
def test_coarse_checkpoint_initialises_exactly_the_towers(tiny_shapes, prefix):
    sd, tower, extras = build_coarse(tiny_shapes)
    assert len(tower) > 50 and len(extras) > 15
    ckpt = {"state_dict": {prefix + k: v for k, v in sd.items()}, "epoch": 3, "global_step": 100}
    new_sd, report = convert_coarse_state_dict(ckpt, tiny_shapes)
    report.raise_if_errors()
    assert report.ok and report.version == "coarse" and report.source == "state_dict"
    assert report.stripped_prefix == bool(prefix)
    # exactly the tower tensors, with their values
    assert report.converted == tower
    assert set(new_sd) == set(tower.values())
    for coarse_key, model_key in tower.items():
        assert new_sd[model_key] is sd[coarse_key] or torch.equal(new_sd[model_key], sd[coarse_key])
    # fusion modules come from the coarse stage too
    assert f"{VISION}layers.3.blocks.0.attn.qkv_text_i2t.weight" in new_sd
    assert f"{TEXT}encoder.layer.3.crossattention_t2i.self.key.weight" in new_sd
    assert f"{TEXT}encoder.layer.3.alpha_t2i" in new_sd
    # left at their initialisation: FPN, DyHead, Swin output norms
    assert set(report.fresh) == expected_fresh(tiny_shapes) == set(tiny_shapes) - set(new_sd)
    assert {f"{VISION}norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")} <= set(report.fresh)
    # the index buffers are checked against their recomputed values, every other extra is
    # dropped with its documented reason
    buffers = {k for k, r in extras.items() if r == "buffer"}
    assert set(report.regenerated) == buffers and len(buffers) == 6
    extras = {k: r for k, r in extras.items() if k not in buffers}
    dropped = dict(d.split(": ", 1) for d in report.dropped)
    assert set(dropped) == set(extras)
    wrong = {k: dropped[k] for k in extras if extras[k] not in dropped[k]}
    assert not wrong, f"unexpected drop reasons: {wrong}"
    assert not report.unmatched and not report.missing and not report.mismatched


def test_norm_i2t_i_is_discarded_by_a_v2_model(tiny_shapes):
    sd, tower, extras = build_coarse(tiny_shapes)
    norm_keys = [k for k in sd if ".norm_i2t_i." in k]
    assert len(norm_keys) == 4
    _, report = convert_coarse_state_dict({"state_dict": sd}, tiny_shapes)
    assert not any(".norm_i2t_i." in k for k in report.converted)
    assert sum(".norm_i2t_i." in d for d in report.dropped) == 4


def test_v3_model_takes_norm_i2t_i():
    shapes = _shapes(tiny_model(MODEL__FIBER__FUSION__I2T_QUERY_NORM=True))
    assert sum(".norm_i2t_i." in k for k in shapes) == 4
    sd, tower, extras = build_coarse(shapes)
    new_sd, report = convert_coarse_state_dict({"state_dict": sd}, shapes)
    report.raise_if_errors()
    norm_keys = sorted(k for k in report.converted if ".norm_i2t_i." in k)
    assert len(norm_keys) == 4
    for k in norm_keys:
        assert torch.equal(new_sd[report.converted[k]], sd[k])
    assert not any(".norm_i2t_i." in d for d in report.dropped)
    assert set(report.fresh) == expected_fresh(shapes)


def test_unknown_coarse_key_is_an_error(tiny_shapes):
    sd, _, _ = build_coarse(tiny_shapes)
    sd["vit_model.layers.0.blocks.0.foo"] = torch.zeros(3)
    sd["text_transformer.encoder.layer.1.attention.self.bar.weight"] = torch.zeros(3)
    _, report = convert_coarse_state_dict({"state_dict": sd}, tiny_shapes)
    assert sorted(report.unmatched) == ["text_transformer.encoder.layer.1.attention.self.bar.weight",
                                        "vit_model.layers.0.blocks.0.foo"]
    assert not report.ok
    with pytest.raises(ConversionError, match=r"vit_model\.layers\.0\.blocks\.0\.foo"):
        report.raise_if_errors()


def test_misshaped_coarse_key_is_an_error(tiny_shapes):
    sd, tower, _ = build_coarse(tiny_shapes)
    key = "text_transformer.encoder.layer.2.crossattention_t2i.self.key.weight"
    assert key in tower
    sd[key] = torch.zeros(7, 7)
    new_sd, report = convert_coarse_state_dict({"state_dict": sd}, tiny_shapes)
    assert len(report.mismatched) == 1 and report.mismatched[0].startswith(key)
    assert tower[key] not in new_sd
    with pytest.raises(ConversionError, match=re.escape(key)):
        report.raise_if_errors()


def test_cli_converts_a_coarse_checkpoint(fixture_v2, fixture_model, tmp_path):
    shapes = _shapes(fixture_model)
    sd, tower, extras = build_coarse(shapes, seed=1)
    ckpt = tmp_path / "fiber_coarse_init.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 9}, ckpt)
    side = write_fixture_side_files(fixture_v2, tmp_path / "official")
    out = tmp_path / "coarse_d2.pth"
    proc = run_tool("convert_fiber_checkpoint.py", "--coarse", "--input", ckpt, "--official-config",
                    side["official_config"], "--text-config", side["text_config"], "--output", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_fresh = len(expected_fresh(shapes))
    # FPN 6 convs + P6/P7 (16); head: 3 scalars/vectors, 6 DyHead blocks x 20, bbox, centerness,
    # 5 scales, text projection (134); Swin output norms (6)
    assert n_fresh == 16 + (3 + 6 * 20 + 2 + 2 + 5 + 2) + 6
    assert f"[convert] {n_fresh} model tensors stay at their initialisation" in proc.stdout
    assert f"fresh={n_fresh}" in proc.stdout and f"converted={len(tower)}" in proc.stdout
    n_buffers = sum(r == "buffer" for r in extras.values())
    assert f"dropped={len(extras) - n_buffers}" in proc.stdout and f"regenerated={n_buffers}" in proc.stdout
    written = torch.load(out, map_location="cpu", weights_only=True)
    assert set(written["model"]) == set(tower.values())
    key = "text_transformer.encoder.layer.10.crossattention_t2i.self.key.weight"
    assert torch.equal(written["model"][tower[key]], sd[key])


# A coarse checkpoint that does not initialise the towers must not convert "successfully".
def test_missing_tower_key_is_an_error(tiny_shapes):
    sd, _, _ = build_coarse(tiny_shapes)
    del sd["vit_model.layers.0.blocks.0.attn.qkv.weight"]
    _, report = convert_coarse_state_dict({"state_dict": sd}, tiny_shapes)
    assert "backbone.bottom_up.vision.layers.0.blocks.0.attn.qkv.weight" in report.missing
    assert not report.ok


def test_checkpoint_under_an_unknown_module_name_is_an_error(tiny_shapes):
    sd, _, _ = build_coarse(tiny_shapes)
    _, report = convert_coarse_state_dict({"state_dict": {"model." + k: v for k, v in sd.items()}}, tiny_shapes)
    assert not report.converted
    assert not report.ok


def test_index_buffers_are_checked_not_dropped(tiny_shapes):
    sd, _, _ = build_coarse(tiny_shapes)
    key = "vit_model.layers.1.blocks.0.attn.relative_position_index"
    sd[key] = sd[key].flip(0)
    sd["text_transformer.embeddings.position_ids"] = sd["text_transformer.embeddings.position_ids"] + 1
    _, report = convert_coarse_state_dict({"state_dict": sd}, tiny_shapes)
    assert sorted(m.split(":")[0] for m in report.mismatched) == sorted([key, "text_transformer.embeddings.position_ids"])
    with pytest.raises(ConversionError, match="differ from the regenerated buffer"):
        report.raise_if_errors()


def test_tables_of_another_window_are_refused_with_the_reason(tiny_shapes):
    sd, _, _ = build_coarse(tiny_shapes)
    key = "vit_model.layers.0.blocks.0.attn.relative_position_bias_table"
    heads = sd[key].shape[1]
    sd[key] = torch.zeros(35 ** 2, heads)  # window 18: a 576-pixel checkpoint
    _, report = convert_coarse_state_dict({"state_dict": sd}, tiny_shapes)
    assert len(report.mismatched) == 1
    assert "window 18, a 576-pixel coarse checkpoint" in report.mismatched[0]
    assert "detector's window 7" in report.mismatched[0]
