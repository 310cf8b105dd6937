"""Coarse checkpoints: official coarse -> our coarse model (strict accounting, rank_output,
table resizing), our coarse model's save/resume, the coarse -> fine hand-off, the CLI."""
import re

import pytest
import torch
import torch.nn.functional as F

from checkpoint_test_utils import run_tool
from coarse_inputs import TINY_COARSE, coarse_cfg, coarse_model, pair_inputs
from conftest import FIXTURES, tiny_model
from detectron2.modeling import build_model
from fiber_det.checkpoint.checkpointer import FiberCheckpointer
from fiber_det.checkpoint.coarse import convert_coarse_state_dict, convert_official_coarse_state_dict
from fiber_det.checkpoint.convert import ConversionError
from fiber_det.checkpoint.official_coarse_config import translate_official_coarse_config
from fiber_det.modeling.backbone.windows import relative_position_index, shift_window_mask
from fiber_det.modeling.coarse.queue import QueueCheckpoint

COARSE_DEV = FIXTURES / "fiber_coarse_ref_dev.pt"
QUEUE_KEYS = ("image_queue", "text_queue", "image_input_queue", "text_input_queue", "text_input_mask_queue",
              "queue_ptr", "queue_total")


def official_state_dict(model):
    """Our coarse model's weights in the official layout: module names, the buffers the official
    model stores, its unused parameters, ``rank_output`` and the queue."""
    sd = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^backbone\.vision\.", "vit_model.", k)
        sd[re.sub(r"^backbone\.text\.", "text_transformer.", k)] = v.clone()
    vision, text = model.backbone.vision, model.backbone.text
    for i, layer in enumerate(vision.layers):
        res = model.image_size // 4 // 2**i
        for j, blk in enumerate(layer.blocks):
            prefix = f"vit_model.layers.{i}.blocks.{j}."
            sd[prefix + "attn.relative_position_index"] = relative_position_index(blk.window_size)
            if blk.shifts(res, res):
                sd[prefix + "attn_mask"] = shift_window_mask(res, res, blk.window_size, blk.shift_size)
    sd["text_transformer.embeddings.position_ids"] = torch.arange(text.config.max_position_embeddings)[None]
    d = text.config.hidden_size
    for k, layer in enumerate(text.encoder.layer):
        if layer.image_dim is None:
            sd[f"text_transformer.encoder.layer.{k}.alpha_t2i"] = torch.zeros(1)
        else:
            sd[f"text_transformer.encoder.layer.{k}.crossattention_t2i.output.LayerNorm.weight"] = torch.ones(d)
            sd[f"text_transformer.encoder.layer.{k}.crossattention_t2i.output.LayerNorm.bias"] = torch.zeros(d)
    sd["text_transformer.pooler.dense.weight"], sd["text_transformer.pooler.dense.bias"] = torch.eye(d), torch.zeros(d)
    sd["rank_output.weight"] = sd["itm_score.fc.weight"][1:]
    sd["rank_output.bias"] = sd["itm_score.fc.bias"][1:]
    for name, v in model.queue.snapshot().items():
        sd[name] = v.clone()
    return sd


@pytest.fixture
def tiny():
    model = coarse_model().eval()
    return model, official_state_dict(model)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_official_checkpoint_converts_with_every_key_accounted(tiny):
    model, sd = tiny
    new_sd, report = convert_official_coarse_state_dict({"state_dict": sd, "epoch": 3}, _shapes(model))
    report.raise_if_errors()
    dropped = [d.split(":")[0] for d in report.dropped]
    assert sorted(list(report.converted) + report.regenerated + dropped) == sorted(sd)  # one bucket each
    assert set(new_sd) == set(model.state_dict())
    assert set(QUEUE_KEYS) <= set(dropped) and len(report.regenerated) == 5 + 1 + 1  # indices, 1 mask, positions
    fresh = coarse_model(seed=5).eval()
    fresh.load_state_dict(new_sd, strict=True)
    batch = pair_inputs(model, 2)
    with torch.no_grad():
        a, b = model(batch), fresh(batch)
    assert torch.equal(a[0]["image_embedding"], b[0]["image_embedding"])
    assert int(fresh.queue.queue_total) == 0  # the queue starts fresh, as the official loader's


def test_dev_fixture_keys_all_accounted():
    assert COARSE_DEV.is_file(), f"golden fixture missing: {COARSE_DEV}"
    fx = torch.load(COARSE_DEV, map_location="cpu", weights_only=True)
    text_cfg = dict(fx["reference"]["text_model_config_not_in_config"], model_type="roberta")
    cfg = translate_official_coarse_config(fx["reference"]["config"], text_model_config=text_cfg)
    assert (cfg.MODEL.FIBER.COARSE.IMAGE_SIZE, cfg.MODEL.FIBER.SWIN.WINDOW_SIZE) == (192, 6)
    assert (cfg.MODEL.FIBER.TEXT.MAX_QUERY_LEN, cfg.MODEL.FIBER.COARSE.EMBED_DIM) == (40, 128)
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        shapes = _shapes(build_model(cfg))
    _, report = convert_official_coarse_state_dict({"state_dict": fx["state_dict"]}, shapes)
    report.raise_if_errors()
    assert len(fx["state_dict"]) == 722
    assert len(report.converted) + len(report.regenerated) + len(report.dropped) == 722
    assert not report.notes  # rank_output equals itm_score.fc row 1 in the fixture


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny):
    model, sd = tiny
    del sd["vit_model.layers.1.blocks.0.mlp.fc1.bias"]
    sd["vit_model.layers.0.blocks.0.attn.foo"] = torch.zeros(2)
    sd["cross_modal_text_pooler.dense.weight"] = torch.zeros(3, 3)
    _, report = convert_official_coarse_state_dict({"state_dict": sd}, _shapes(model))
    with pytest.raises(ConversionError) as e:
        report.raise_if_errors()
    msg = str(e.value)
    for part in ("1 unmatched key(s):", "vit_model.layers.0.blocks.0.attn.foo", "missing key(s):",
                 "backbone.vision.layers.1.blocks.0.mlp.fc1.bias", "1 mismatched key(s):",
                 "cross_modal_text_pooler.dense.weight: checkpoint (3, 3)"):
        assert part in msg, msg


def test_a_detector_checkpoint_is_not_a_coarse_one():
    with pytest.raises(ConversionError, match="no 'vit_model.' keys"):
        convert_official_coarse_state_dict({"model": {"backbone.bottom_up.vision.x": torch.zeros(1)}}, {})


def test_rank_output_ends_up_in_itm_row_1(tiny):
    model, sd = tiny
    sd["rank_output.weight"] = torch.full_like(sd["rank_output.weight"], 0.5)
    sd["rank_output.bias"] = torch.full_like(sd["rank_output.bias"], -2.0)
    new_sd, report = convert_official_coarse_state_dict({"state_dict": sd}, _shapes(model))
    report.raise_if_errors()
    assert torch.all(new_sd["itm_score.fc.weight"][1] == 0.5) and float(new_sd["itm_score.fc.bias"][1]) == -2.0
    assert torch.equal(new_sd["itm_score.fc.weight"][0], sd["itm_score.fc.weight"][0])
    assert any("rank_output.weight differed" in n for n in report.notes)
    assert not sd["itm_score.fc.weight"][1].eq(0.5).all()  # the input is not modified


def _official_resize(table, before, after):
    # the official swin_adapt_position_encoding, step by step
    x = table.transpose(0, 1).view(-1, before, before)
    x = F.interpolate(x.unsqueeze(0), size=(after, after), mode="bicubic").squeeze(0).permute((1, 2, 0))
    return x.contiguous().view(-1, x.size(-1))


def test_tables_are_resized_for_another_image_size(tiny):
    model, sd = tiny  # 64 px, window 2
    big = coarse_model(MODEL__FIBER__COARSE__IMAGE_SIZE=96, MODEL__FIBER__SWIN__WINDOW_SIZE=3)
    new_sd, report = convert_official_coarse_state_dict({"state_dict": sd}, _shapes(big))
    report.raise_if_errors()
    key = "vit_model.layers.2.blocks.1.attn.relative_position_bias_table"
    ours = new_sd["backbone.vision.layers.2.blocks.1.attn.relative_position_bias_table"]
    assert ours.shape == (25, 4)
    torch.testing.assert_close(ours, _official_resize(sd[key], 3, 5), atol=0, rtol=0)
    assert any("window 2 (64 px) to 3 (96 px)" in n for n in report.notes)
    assert any(d.startswith("vit_model.layers.2.blocks.1.attn_mask: buffer of the checkpoint's window")
               for d in report.dropped)
    _, strict = convert_official_coarse_state_dict({"state_dict": sd}, _shapes(big), resize_tables=False)
    assert not strict.ok and any("not allowed" in m for m in strict.mismatched)


def test_save_and_resume_with_the_queue(tiny, tmp_path):
    model, _ = tiny
    model.train()
    model(pair_inputs(model, 2))  # the queue holds 2 entries
    FiberCheckpointer(model, str(tmp_path), itc_queue=QueueCheckpoint(model.queue)).save("model_0000001")
    path = str(tmp_path / "model_0000001.pth")
    resumed = coarse_model(seed=9)
    FiberCheckpointer(resumed, str(tmp_path), itc_queue=QueueCheckpoint(resumed.queue)).resume_or_load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    for k, v in model.queue.snapshot().items():
        # input entries never written are uninitialised memory (possibly NaN): compare the written ones
        written = slice(0, model.queue.num_filled) if k.endswith("input_queue") or k == "text_input_mask_queue" \
            else slice(None)
        assert torch.equal(getattr(resumed.queue, k)[written], v[written]), k
    # loaded as initial weights (MODEL.WEIGHTS), the queue starts fresh, as the official loader's
    init = coarse_model(seed=9)
    FiberCheckpointer(init, str(tmp_path)).load(path, checkpointables=[])
    assert torch.equal(init.state_dict()["temp"], model.state_dict()["temp"])
    assert int(init.queue.queue_total) == 0


def _fine_tiny():
    # FIBER-tiny.yaml with the coarse tiny model's window and v3 query norm: the same towers
    return tiny_model(MODEL__FIBER__SWIN__WINDOW_SIZE=2, MODEL__FIBER__FUSION__I2T_QUERY_NORM=True)


@pytest.mark.parametrize("layout", ["ours", "official"])
def test_coarse_to_fine_handoff_leaves_no_fused_backbone_key_missing(tiny, layout):
    model, official = tiny
    fine = _fine_tiny()
    shapes = _shapes(fine)
    ckpt = {"model": model.state_dict()} if layout == "ours" else {"state_dict": official}
    new_sd, report = convert_coarse_state_dict(ckpt, shapes)
    report.raise_if_errors()
    towers = {k for k in shapes if k.startswith("backbone.bottom_up.") and not re.search(r"vision\.norm\d\.", k)}
    assert towers == set(new_sd) and not report.missing
    assert any(".attn.qkv_text_i2t." in k for k in new_sd) and any(".crossattention_t2i." in k for k in new_sd)
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            fine_key = k.replace("backbone.", "backbone.bottom_up.", 1)
            if fine_key in new_sd:
                assert torch.equal(new_sd[fine_key], v), k
    if layout == "official":
        assert {r.split(".attn.")[-1] for r in report.regenerated} >= {"relative_position_index"}
    fine.load_state_dict(new_sd, strict=False)


def test_cli_official_coarse_to_coarse_and_ours_to_fine(tiny, tmp_path):
    model, official = tiny
    src = tmp_path / "fiber_pretrain.ckpt"
    torch.save({"state_dict": official, "epoch": 1, "global_step": 10}, src)
    out = tmp_path / "coarse_d2.pth"
    proc = run_tool("convert_fiber_checkpoint.py", "--coarse", "--target", "coarse", "--input", src,
                    "--output", out, "--config-file", TINY_COARSE, "--config-out", tmp_path / "coarse_d2.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"converted={len(model.state_dict()) + 2}" in proc.stdout  # + rank_output weight and bias
    loaded = coarse_model(seed=3)
    FiberCheckpointer(loaded).load(str(out))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    fine_out = tmp_path / "fine_init.pth"
    proc = run_tool("convert_fiber_checkpoint.py", "--coarse", "--input", out, "--output", fine_out,
                    "--config-file", "configs/quick_schedules/FIBER-tiny.yaml", "MODEL.FIBER.SWIN.WINDOW_SIZE", "2",
                    "MODEL.FIBER.FUSION.I2T_QUERY_NORM", "True")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fresh=" in proc.stdout and "missing" not in proc.stdout
    # the converted init loads strictly through MODEL.WEIGHTS: it lists the keys it leaves fresh
    fine = _fine_tiny()
    FiberCheckpointer(fine).load(str(fine_out))
    assert torch.equal(fine.state_dict()["backbone.bottom_up.text.encoder.layer.3.alpha_t2i"],
                       model.state_dict()["backbone.text.encoder.layer.3.alpha_t2i"])


def test_model_weights_of_a_coarse_training_checkpoint_initialise_the_detector(tiny, tmp_path):
    """MODEL.WEIGHTS = a coarse run's checkpoint: converted on load, FPN/head/output norms fresh."""
    model, _ = tiny
    FiberCheckpointer(model, str(tmp_path), itc_queue=QueueCheckpoint(model.queue)).save("model_final")
    fine = _fine_tiny()
    fresh_before = {k: v.clone() for k, v in fine.state_dict().items() if k.startswith(("head.", "backbone.fpn"))}
    FiberCheckpointer(fine, str(tmp_path)).resume_or_load(str(tmp_path / "model_final.pth"), resume=False)
    towers = 0
    for k, v in model.state_dict().items():
        if k.startswith(("backbone.vision.", "backbone.text.")) and not k.startswith("backbone.vision.norm."):
            assert torch.equal(fine.state_dict()[k.replace("backbone.", "backbone.bottom_up.", 1)], v), k
            towers += 1
    assert towers > 100
    assert all(torch.equal(fine.state_dict()[k], v) for k, v in fresh_before.items())
    # a tower key the coarse checkpoint lacks is still an error, named
    sd = dict(model.state_dict())
    del sd["backbone.text.encoder.layer.3.alpha_t2i"]
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(ConversionError, match=r"layer\.3\.alpha_t2i"):
        FiberCheckpointer(_fine_tiny()).load(str(tmp_path / "partial.pth"))


def test_model_weights_of_a_coarse_checkpoint_into_another_coarse_model(tiny, tmp_path):
    """Fine-tuning at another image size with fewer objectives: tables resized, heads dropped."""
    model, _ = tiny  # 64 px, window 2, ITC + ITM + MLM
    FiberCheckpointer(model, str(tmp_path)).save("pretrained")
    big = coarse_model(MODEL__FIBER__COARSE__IMAGE_SIZE=96, MODEL__FIBER__SWIN__WINDOW_SIZE=3,
                       MODEL__FIBER__COARSE__ITM_ON=False, MODEL__FIBER__COARSE__MLM_ON=False)
    FiberCheckpointer(big).load(str(tmp_path / "pretrained.pth"))
    key = "backbone.vision.layers.2.blocks.1.attn.relative_position_bias_table"
    torch.testing.assert_close(big.state_dict()[key], _official_resize(model.state_dict()[key], 3, 5), atol=0, rtol=0)
    assert torch.equal(big.state_dict()["temp"], model.state_dict()["temp"])
    assert not any(k.startswith(("itm_score", "mlm_score")) for k in big.state_dict())


def test_official_config_that_cannot_be_reproduced_is_refused():
    config = {"vit": "vit_base_patch16_224", "image_size": 200, "input_image_embed_size": 1024,
              "input_text_embed_size": 512, "max_text_len": 40, "hidden_size": 768, "num_fuse_block": 6,
              "loss_names": {"itm": 1, "itc": 0, "mlm": 1}}
    with pytest.raises(ValueError) as e:
        translate_official_coarse_config(config)
    for part in ("vit = 'vit_base_patch16_224'", "image_size = 200", "input_text_embed_size = 512 != text hidden"):
        assert part in str(e.value)
