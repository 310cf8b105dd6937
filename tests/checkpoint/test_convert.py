"""Official FIBER checkpoints and configs -> fiber-det.

- the rename table against the measured official key lists (v2 COCO / v3 RefCOCO models);
- ``convert_official_state_dict`` on the golden fixture's official-style state dict;
- the ``tools/convert_fiber_checkpoint.py`` round trip: official file -> Detectron2 file that
  ``DetectionCheckpointer`` loads with no missing/unexpected key and that reproduces the
  fixture's detections;
- ``translate_official_config`` on official-style yaml files.
"""
import ast
import logging
import math

import pytest
import torch

from checkpoint_test_utils import run_tool, same_detection_sets, write_fixture_side_files
from conftest import REPO, load_tool
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from fiber_det import add_fiber_config
from fiber_det.checkpoint.convert import ConversionError, convert_official_state_dict
from fiber_det.checkpoint.official_config import translate_official_config
from fiber_det.checkpoint.rename_table import DROPPED, REGENERATED_BUFFERS, rename_key
from fiber_det.modeling.backbone.windows import relative_position_index
from fiber_det.modeling.postprocess import postprocess_image, rescale_boxes

DOCS = REPO.parent / "shared" / "docs"
BODY = "module.fusion_backbone.backbone.body."
TEXT = "module.fusion_backbone.language_backbone.body.model."

# Base-FIBER-SwinB.yaml: official parameter counts and the dropped cls_logits conv
OFFICIAL_PARAMS = {"v2": 252_055_304, "v3": 252_063_496}
CLS_LOGITS_PARAMS = 80 * 256 + 80
FIBER_DET_PARAMS = {"v2": 252_034_744, "v3": 252_042_936}


def _cfg(path):
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _read_tsv(version):
    rows = []
    for line in (DOCS / f"fiber_statedict_keys_{version}.tsv").read_text().splitlines():
        if line.strip():
            key, shape, dtype = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape)), dtype))
    return rows


def _is_buffer(key):
    return any(p.match(key) for p in REGENERATED_BUFFERS)


# ---------------------------------------------------------------------------------------------
# the rename table against the official key lists
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[("v2", "Base-FIBER-SwinB.yaml"), ("v3", "FIBER-SwinB-refcoco.yaml")],
                ids=["v2", "v3"])
def swin_b(request):
    """Shapes, dtypes and parameter counts of the full-size model (built once per version)."""
    version, name = request.param
    torch.manual_seed(0)
    model = build_model(_cfg(REPO / "configs" / name))
    summary = {
        "version": version,
        "state": {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()},
        "params": sum(p.numel() for p in model.parameters()),
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
    }
    del model
    return summary


def test_rename_table_classifies_every_official_key(swin_b):
    rows = _read_tsv(swin_b["version"])
    assert len(rows) == {"v2": 806, "v3": 818}[swin_b["version"]]
    dropped = [k for k, _, _ in rows if any(p.match(k) for p in DROPPED)]
    buffers = [k for k, _, _ in rows if _is_buffer(k) and k not in dropped]
    renamed = [k for k, _, _ in rows if k not in dropped and k not in buffers]
    assert dropped == ["rpn.head.cls_logits.weight", "rpn.head.cls_logits.bias"]
    # 24 Swin blocks' relative_position_index, the text position_ids, 5 levels of cell anchors
    assert sum(k.endswith("relative_position_index") for k in buffers) == 24
    assert sum(k.endswith("embeddings.position_ids") for k in buffers) == 1
    assert sum(".cell_anchors." in k for k in buffers) == 5
    assert len(buffers) == 30
    unmatched = [k for k in renamed if rename_key(k) is None]
    assert not unmatched, f"official keys without a rename rule: {unmatched}"
    assert all(dtype == "torch.int64" for k, _, dtype in rows if k in buffers and "cell_anchors" not in k)


def test_renamed_keys_and_shapes_equal_the_model_state_dict(swin_b):
    rows = _read_tsv(swin_b["version"])
    renamed = {}
    for key, shape, dtype in rows:
        if any(p.match(key) for p in DROPPED) or _is_buffer(key):
            continue
        new = rename_key(key)
        assert new not in renamed, f"two official keys rename to {new}"
        renamed[new] = (shape, dtype)
    model_state = swin_b["state"]
    assert set(renamed) - set(model_state) == set(), "converted names the model does not have"
    assert set(model_state) - set(renamed) == set(), "model keys no official key provides"
    wrong = {k: (renamed[k], model_state[k]) for k in renamed
             if renamed[k][0] != model_state[k][0] or renamed[k][1] != str(model_state[k][1])}
    assert not wrong, f"shape/dtype differences (official, ours): {wrong}"


def test_parameter_counts_match_the_official_model(swin_b):
    version = swin_b["version"]
    rows = _read_tsv(version)
    official_params = sum(math.prod(s) for k, s, _ in rows if not _is_buffer(k))
    assert official_params == OFFICIAL_PARAMS[version]
    assert swin_b["params"] == FIBER_DET_PARAMS[version] == OFFICIAL_PARAMS[version] - CLS_LOGITS_PARAMS
    official_backbone = sum(math.prod(s) for k, s, _ in rows if k.startswith("fusion_backbone.") and not _is_buffer(k))
    assert swin_b["backbone_params"] == official_backbone


def test_regenerated_buffers_have_the_official_shapes(swin_b):
    # the official Swin-B uses window 12: (144, 144) indices into a 529-row table
    rows = {k: s for k, s, _ in _read_tsv(swin_b["version"])}
    idx = relative_position_index(12)
    assert tuple(idx.shape) == rows["fusion_backbone.backbone.body.layers.0.blocks.0.attn.relative_position_index"]
    table = rows["fusion_backbone.backbone.body.layers.0.blocks.0.attn.relative_position_bias_table"]
    assert int(idx.max()) + 1 == table[0] == 23 ** 2


# ---------------------------------------------------------------------------------------------
# convert_official_state_dict on the fixture
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def expected_shapes(fixture_model):
    return {k: tuple(v.shape) for k, v in fixture_model.state_dict().items()}


@pytest.fixture(scope="module")
def official_sd(fixture_v2):
    """The fixture's official state dict (``module.``-prefixed); a shallow copy, so tests may
    replace entries (never modify the shared tensors in place)."""
    sd = dict(fixture_v2["state_dict"])
    assert all(k.startswith("module.") for k in sd)
    return sd


def _unprefixed(sd):
    return {k[len("module."):]: v for k, v in sd.items()}


LAYOUTS = {
    "model": lambda sd: {"model": sd, "optimizer": {}, "iteration": 3},
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 1},
    "bare": lambda sd: sd,
}


@pytest.mark.parametrize("prefixed", [True, False], ids=["module.", "no-prefix"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_checkpoint_layout_converts(official_sd, expected_shapes, layout, prefixed):
    sd = dict(official_sd) if prefixed else _unprefixed(official_sd)
    new_sd, report = convert_official_state_dict(LAYOUTS[layout](sd), expected_shapes)
    report.raise_if_errors()
    assert report.ok and report.version == "v2"
    assert report.source == {"model": "model", "state_dict": "state_dict", "bare": "<bare>"}[layout]
    assert report.stripped_prefix == prefixed
    assert set(new_sd) == set(expected_shapes)
    for official, ours in (("rpn.head.bias0", "head.bias0"),
                           ("fusion_backbone.backbone.fpn.fpn_inner2.weight", "backbone.fpn_lateral3.weight"),
                           ("fusion_backbone.backbone.fpn.top_blocks.p6.weight", "backbone.top_block.p6.weight"),
                           ("fusion_backbone.language_backbone.body.model.encoder.layer.11.alpha_t2i",
                            "backbone.bottom_up.text.encoder.layer.11.alpha_t2i")):
        assert torch.equal(new_sd[ours], official_sd["module." + official])
        assert report.converted[official] == ours


def test_buffers_are_regenerated_and_cls_logits_dropped(official_sd, expected_shapes):
    new_sd, report = convert_official_state_dict({"model": official_sd}, expected_shapes)
    assert report.ok
    regenerated = set(report.regenerated)
    assert {f"fusion_backbone.backbone.body.layers.{i}.blocks.{j}.attn.relative_position_index"
            for i, d in enumerate((2, 2, 18, 2)) for j in range(d)} <= regenerated
    assert "fusion_backbone.language_backbone.body.model.embeddings.position_ids" in regenerated
    assert {f"rpn.anchor_generator.cell_anchors.{i}" for i in range(5)} <= regenerated
    assert len(regenerated) == 30
    assert sorted(report.dropped) == ["rpn.head.cls_logits.bias", "rpn.head.cls_logits.weight"]
    assert not any("cls_logits" in k or "relative_position_index" in k or "position_ids" in k
                   or "cell_anchors" in k for k in new_sd)
    assert len(report.converted) == len(official_sd) - 30 - 2 == len(new_sd)


def _changed(sd, key, fn):
    out = dict(sd)
    out[key] = fn(sd[key].clone())
    return out


def test_use_ema_reads_model_ema(official_sd, expected_shapes):
    alpha = TEXT + "encoder.layer.6.alpha_t2i"
    ema = _changed(_changed(official_sd, "module.rpn.head.bias0", lambda t: t + 0.25), alpha, lambda t: t * 0.5)
    ckpt = {"model": official_sd, "model_ema": ema, "optimizer": {}, "iteration": 5}
    raw, report = convert_official_state_dict(ckpt, expected_shapes)
    assert report.source == "model" and torch.equal(raw["head.bias0"], official_sd["module.rpn.head.bias0"])
    new_sd, report = convert_official_state_dict(ckpt, expected_shapes, use_ema=True)
    assert report.ok and report.source == "model_ema"
    assert torch.equal(new_sd["head.bias0"], ema["module.rpn.head.bias0"])
    assert not torch.equal(new_sd["head.bias0"], official_sd["module.rpn.head.bias0"])
    assert torch.equal(new_sd["backbone.bottom_up.text.encoder.layer.6.alpha_t2i"], ema[alpha])


def test_use_ema_without_model_ema_is_an_error(official_sd):
    with pytest.raises(ConversionError, match="model_ema"):
        convert_official_state_dict({"model": official_sd}, use_ema=True)


def _corrupt(t):
    t = t.clone()
    t.view(-1)[0] += 3
    return t


BUFFERS = [
    BODY + "layers.2.blocks.5.attn.relative_position_index",
    TEXT + "embeddings.position_ids",
    "module.rpn.anchor_generator.cell_anchors.3",
]


@pytest.mark.parametrize("key", BUFFERS, ids=["relative_position_index", "position_ids", "cell_anchors"])
def test_corrupted_buffer_is_an_error_in_model(official_sd, expected_shapes, key):
    bad = _changed(official_sd, key, _corrupt)
    _, report = convert_official_state_dict({"model": bad}, expected_shapes)
    assert not report.ok
    assert any(m.startswith(key[len("module."):]) for m in report.mismatched), report.mismatched
    with pytest.raises(ConversionError, match=key[len("module."):].replace(".", r"\.")):
        report.raise_if_errors()


@pytest.mark.parametrize("key", BUFFERS, ids=["relative_position_index", "position_ids", "cell_anchors"])
def test_corrupted_buffer_in_model_ema_is_only_a_note(official_sd, expected_shapes, key):
    ckpt = {"model": official_sd, "model_ema": _changed(official_sd, key, _corrupt)}
    new_sd, report = convert_official_state_dict(ckpt, expected_shapes, use_ema=True)
    report.raise_if_errors()
    assert any(key[len("module."):] in n for n in report.notes), report.notes
    assert key[len("module."):] in report.regenerated
    assert set(new_sd) == set(expected_shapes)


@pytest.mark.parametrize(
    "extra, listed",
    [
        ("module.fusion_backbone.mystery.weight", "fusion_backbone.mystery.weight"),  # no rule
        ("module.rpn.head.extra_conv.weight", "head.extra_conv.weight"),  # rule, but no model key
    ],
    ids=["no-rule", "unknown-to-model"],
)
def test_extra_unknown_key_is_an_error(official_sd, expected_shapes, extra, listed):
    bad = dict(official_sd)
    bad[extra] = torch.zeros(3)
    _, report = convert_official_state_dict({"model": bad}, expected_shapes)
    assert not report.ok
    assert any(listed in u for u in report.unmatched), report.unmatched
    assert not report.missing and not report.mismatched
    with pytest.raises(ConversionError, match=listed.replace(".", r"\.")):
        report.raise_if_errors()


def test_missing_key_is_an_error(official_sd, expected_shapes):
    bad = dict(official_sd)
    del bad["module.rpn.head.bias0"]
    del bad[TEXT + "encoder.layer.3.output.LayerNorm.bias"]
    _, report = convert_official_state_dict({"model": bad}, expected_shapes)
    assert sorted(report.missing) == ["backbone.bottom_up.text.encoder.layer.3.output.LayerNorm.bias", "head.bias0"]
    assert not report.unmatched and not report.mismatched
    with pytest.raises(ConversionError, match=r"head\.bias0"):
        report.raise_if_errors()


def test_misshaped_key_is_an_error(official_sd, expected_shapes):
    bad = _changed(official_sd, "module.rpn.head.bbox_pred.weight", lambda t: torch.zeros(5, *t.shape[1:]))
    _, report = convert_official_state_dict({"model": bad}, expected_shapes)
    assert len(report.mismatched) == 1
    assert report.mismatched[0].startswith("rpn.head.bbox_pred.weight -> head.bbox_pred.weight")
    assert "(5, 64, 1, 1)" in report.mismatched[0] and "(4, 64, 1, 1)" in report.mismatched[0]
    with pytest.raises(ConversionError, match=r"head\.bbox_pred\.weight"):
        report.raise_if_errors()
    # without expected shapes nothing can tell
    _, report = convert_official_state_dict({"model": bad})
    assert report.ok


def test_v3_marker_sets_the_version(official_sd, expected_shapes):
    v3 = dict(official_sd)
    for blk in ("layers.2.blocks.14", "layers.3.blocks.1"):
        for p in ("weight", "bias"):
            v3[f"{BODY}{blk}.attn.norm_i2t_i.{p}"] = torch.ones(512 if blk.startswith("layers.2") else 1024)
    _, report = convert_official_state_dict({"model": v3})
    assert report.ok and report.version == "v3"
    # into the (v2) fixture model, the v3 keys are errors that name them
    _, report = convert_official_state_dict({"model": v3}, expected_shapes)
    assert report.version == "v3" and not report.ok
    assert any("layers.2.blocks.14.attn.norm_i2t_i.weight" in u for u in report.unmatched)


# ---------------------------------------------------------------------------------------------
# tools/convert_fiber_checkpoint.py round trip
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def side_files(fixture_v2, tmp_path_factory):
    return write_fixture_side_files(fixture_v2, tmp_path_factory.mktemp("official"))


def _cli_args(side, ckpt, out, *extra):
    return ["--input", ckpt, "--official-config", side["official_config"], "--text-config", side["text_config"],
            "--tokenizer", side["tokenizer"], "--output", out, *extra]


@pytest.fixture(scope="module")
def round_trip(fixture_v2, side_files, tmp_path_factory):
    """An official-style training checkpoint converted with the CLI (--use-ema)."""
    tmp = tmp_path_factory.mktemp("round_trip")
    sd = fixture_v2["state_dict"]
    ckpt = tmp / "model_final.pth"
    torch.save({"model": sd, "model_ema": sd, "optimizer": {}, "iteration": 5}, ckpt)
    out, cfg_out = tmp / "fiber_d2.pth", tmp / "fiber_d2.yaml"
    args = _cli_args(side_files, ckpt, out, "--config-out", cfg_out, "--use-ema")
    proc = run_tool("convert_fiber_checkpoint.py", *args)
    return {"proc": proc, "out": out, "cfg_out": cfg_out}


def test_cli_writes_a_detectron2_checkpoint(round_trip, fixture_v2, expected_shapes):
    proc = round_trip["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "source='model_ema'" in proc.stdout
    assert "regenerated=30" in proc.stdout and "dropped=2" in proc.stdout
    written = torch.load(round_trip["out"], map_location="cpu", weights_only=True)
    assert set(written) == {"model", "__author__", "matching_heuristics"}
    assert written["matching_heuristics"] is False
    assert isinstance(written["__author__"], str)
    assert set(written["model"]) == set(expected_shapes)
    assert torch.equal(written["model"]["head.bias0"], fixture_v2["state_dict"]["module.rpn.head.bias0"])
    assert round_trip["cfg_out"].is_file()


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _load_with_checkpointer(model, path, caplog):
    """DetectionCheckpointer.load, returning (incompatible keys, WARNING records of the fvcore /
    detectron2 loggers). A handler is attached to those loggers directly, in case
    detectron2's setup_logger turned off their propagation."""
    checkpointer = DetectionCheckpointer(model)
    seen = {}
    original = checkpointer._load_model

    def spy(checkpoint):
        seen["incompatible"] = original(checkpoint)
        return seen["incompatible"]

    checkpointer._load_model = spy
    handler = _ListHandler()
    loggers = [logging.getLogger(n) for n in ("fvcore", "detectron2")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="fvcore"), caplog.at_level(logging.WARNING, logger="detectron2"):
            checkpointer.load(str(path))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    records = handler.records + [r for r in caplog.records if r.levelno >= logging.WARNING]
    return seen["incompatible"], records


def test_round_trip_loads_cleanly_and_reproduces_detections(round_trip, fixture_v2, caplog, tmp_path):
    assert round_trip["proc"].returncode == 0, round_trip["proc"].stderr
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(str(round_trip["cfg_out"]))
    cfg.MODEL.WEIGHTS = str(round_trip["out"])
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    incompatible, records = _load_with_checkpointer(model, cfg.MODEL.WEIGHTS, caplog)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert not [r.getMessage() for r in records], "warnings while loading the converted checkpoint"

    # positive control: the same path reports a key missing from a file
    written = torch.load(round_trip["out"], map_location="cpu", weights_only=True)
    del written["model"]["head.bias0"]
    torch.save(written, tmp_path / "incomplete.pth")
    incompatible_bad, records_bad = _load_with_checkpointer(model, tmp_path / "incomplete.pth", caplog)
    assert incompatible_bad.missing_keys == ["head.bias0"]
    assert any("head.bias0" in r.getMessage() for r in records_bad)

    model.eval()
    inp, det = fixture_v2["inputs"], fixture_v2["outputs_eval"]["detections"][0]
    size = tuple(inp["image_sizes_hw"][0])
    with torch.no_grad():
        outputs, anchors = model.run(inp["images"], inp["input_ids"], inp["attention_mask"])
    boxes, scores, labels = postprocess_image(
        outputs, 0, anchors, size, inp["per_image"][0]["positive_map_label_to_token"],
        score_threshold=model.score_threshold, pre_nms_top_n=model.pre_nms_top_n,
        nms_threshold=model.nms_threshold, detections_per_image=model.detections_per_image,
    )
    assert len(scores) == 24
    problems = same_detection_sets(boxes, scores, labels, det["boxes_xyxy"], det["scores"], det["labels"])
    assert not problems, "\n".join(problems)
    orig = tuple(inp["per_image"][0]["original_size_hw"])
    for phrase in det["per_phrase_original_image"]:
        sel = labels == phrase["label"]
        ref_scores = phrase["scores"]
        problems = same_detection_sets(
            rescale_boxes(boxes[sel], size, orig), scores[sel], labels[sel],
            phrase["boxes_xyxy_original_image"], ref_scores, torch.full((len(ref_scores),), phrase["label"]),
        )
        assert not problems, f"phrase {phrase['phrase']!r}:\n" + "\n".join(problems)


def test_cli_rejects_an_unknown_key(fixture_v2, side_files, tmp_path):
    sd = dict(fixture_v2["state_dict"])
    sd["module.rpn.head.mystery_scale"] = torch.ones(1)
    ckpt = tmp_path / "extra.pth"
    torch.save({"model": sd}, ckpt)
    out = tmp_path / "out.pth"
    proc = run_tool("convert_fiber_checkpoint.py", *_cli_args(side_files, ckpt, out))
    assert proc.returncode != 0
    assert "head.mystery_scale" in proc.stdout + proc.stderr
    assert "1 unmatched" in proc.stderr
    assert not out.exists()


def test_cli_diagnoses_converted_truncated_and_unsafe_inputs(round_trip, side_files, tmp_path):
    """One line first: an already converted file, a truncated file, a file that would run code."""
    def first_error(proc):
        return next(line for line in proc.stderr.splitlines() if line.startswith("[convert]"))

    proc = run_tool("convert_fiber_checkpoint.py", *_cli_args(side_files, round_trip["out"], tmp_path / "again.pth"))
    assert proc.returncode == 1
    assert first_error(proc) == (
        f"[convert] ERROR: {round_trip['out']} is already in fiber-det format (its tensors carry the model's own "
        "names): load it with MODEL.WEIGHTS directly, there is nothing to convert")
    tool = load_tool("convert_fiber_checkpoint")  # in process: these stop before any model is built
    data = round_trip["out"].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit, match=f"^\\[convert\\] ERROR: {tmp_path / 'cut.pth'}: the file is truncated"):
        tool.load_checkpoint(str(tmp_path / "cut.pth"))
    torch.save({"model": {}, "hook": print}, tmp_path / "code.pth")
    with pytest.raises(SystemExit, match="refused to load: the file names the Python object\\(s\\) builtins.print"):
        tool.load_checkpoint(str(tmp_path / "code.pth"))


# ---------------------------------------------------------------------------------------------
# translate_official_config
# ---------------------------------------------------------------------------------------------
# the official COCO fine-tuning yaml (e2e_dyhead_SwinT_B_FPN_..._coco_finetuning_fusion_backbone),
# partial: everything else takes the official defaults
OFFICIAL_COCO_YAML = """\
MODEL:
  META_ARCHITECTURE: "GeneralizedVLRCNN"
  WEIGHT: "MODEL/fiber_coarse_then_fine.pth"
  RPN_ONLY: True
  RPN_ARCHITECTURE: "VLDYHEAD"
  SWINT:
    VERSION: "fusion"
    EMBED_DIM: 128
    DEPTHS: (2, 2, 18, 2)
    NUM_HEADS: (4, 8, 16, 32)
    WINDOW_SIZE: 12
    OUT_CHANNELS: (128, 256, 512, 1024)
    DROP_PATH_RATE: 0.4
  BACKBONE:
    FUSION_VERSION: "v2"
    CONV_BODY: "SWINT-FPN-RETINANET"
    OUT_CHANNELS: 256
    USE_CHECKPOINT: True
    FREEZE_CONV_BODY_AT: -1
  LANGUAGE_BACKBONE:
    FREEZE: False
    MODEL_TYPE: "roberta-fused-v2"
    MASK_SPECIAL: False
    TOKENIZER_TYPE: "roberta-base"
    USE_CHECKPOINT: False
  RPN:
    USE_FPN: True
    ANCHOR_SIZES: (64, 128, 256, 512, 1024)
    ANCHOR_STRIDE: (8, 16, 32, 64, 128)
    ASPECT_RATIOS: (1.0,)
    SCALES_PER_OCTAVE: 1
  DYHEAD:
    CHANNELS: 256
    NUM_CONVS: 6
    USE_GN: True
    USE_DYRELU: True
    USE_DFCONV: True
    USE_DYFUSE: True
    TOPK: 9
    SCORE_AGG: "MEAN"
    LOG_SCALE: 0.0
    USE_CHECKPOINT: True
    FUSE_CONFIG:
      EARLY_FUSE_ON: False
      TYPE: "NONE"
      USE_CLASSIFICATION_LOSS: False
      USE_TOKEN_LOSS: False
      USE_CONTRASTIVE_ALIGN_LOSS: False
      USE_DOT_PRODUCT_TOKEN_LOSS: True
      USE_SHALLOW_CONTRASTIVE_LOSS: False
      USE_BACKBONE_SHALLOW_CONTRASTIVE_LOSS: False
      CLAMP_DOT_PRODUCT: True
TEST:
  DURING_TRAINING: False
  IMS_PER_BATCH: 64
DATASETS:
  TRAIN: ("coco_grounding_train", )
  TEST: ("coco_2017_val",)
  DISABLE_SHUFFLE: False
  ADD_DET_PROMPT: False
  RANDOM_SAMPLE_NEG: 85
  CONTROL_PROB: (0.0, 0.0, 0.5, 0.0)
  SEPARATION_TOKENS: ". "
INPUT:
  PIXEL_MEAN: [ 103.530, 116.280, 123.675 ]
  PIXEL_STD: [ 57.375, 57.120, 58.395 ]
  MIN_SIZE_TRAIN: 800
  MAX_SIZE_TRAIN: 1333
  MIN_SIZE_TEST: 800
  MAX_SIZE_TEST: 1333
AUGMENT:
  MULT_MIN_SIZE_TRAIN: (480,560,640,720,800)
DATALOADER:
  SIZE_DIVISIBILITY: 32
SOLVER:
  OPTIMIZER: ADAMW
  BASE_LR: 0.00001
  LANG_LR: 0.00001
  WEIGHT_DECAY: 0.0001
  STEPS: (0.67, 0.89)
  MAX_EPOCH: 12
  IMS_PER_BATCH: 64
  WARMUP_ITERS: 2000
  WARMUP_FACTOR: 0.001
  USE_AMP: True
  MODEL_EMA: 0.0
  FIND_UNUSED_PARAMETERS: False
  CLIP_GRADIENTS:
    ENABLED: True
    CLIP_TYPE: "full_model"
    CLIP_VALUE: 1.0
    NORM_TYPE: 2.0
"""

# memory-only switch: the official yaml turns on activation checkpointing, configs/ do not
MEMORY_ONLY = {"SWIN.USE_CHECKPOINT"}


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _assert_same_model_config(ours, ref):
    a, b = _flat(ours.MODEL.FIBER), _flat(ref.MODEL.FIBER)
    assert set(a) == set(b)
    diff = {k: (a[k], b[k]) for k in a if k not in MEMORY_ONLY and a[k] != b[k]}
    assert not diff, f"MODEL.FIBER differences (translated, configs/): {diff}"
    assert ours.MODEL.ANCHOR_GENERATOR.SIZES == ref.MODEL.ANCHOR_GENERATOR.SIZES
    assert ours.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == ref.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
    assert ours.MODEL.BACKBONE.FREEZE_AT == ref.MODEL.BACKBONE.FREEZE_AT
    assert ours.MODEL.FPN.OUT_CHANNELS == ref.MODEL.FPN.OUT_CHANNELS
    assert ours.MODEL.META_ARCHITECTURE == ref.MODEL.META_ARCHITECTURE
    assert ours.MODEL.BACKBONE.NAME == ref.MODEL.BACKBONE.NAME
    assert ours.MODEL.PIXEL_MEAN == ref.MODEL.PIXEL_MEAN and ours.MODEL.PIXEL_STD == ref.MODEL.PIXEL_STD
    assert ours.INPUT.FORMAT == ref.INPUT.FORMAT
    assert ours.TEST.DETECTIONS_PER_IMAGE == ref.TEST.DETECTIONS_PER_IMAGE


def test_official_coco_yaml_translates_to_the_coco_config():
    cfg = translate_official_config(OFFICIAL_COCO_YAML)
    _assert_same_model_config(cfg, _cfg(REPO / "configs" / "FIBER-SwinB-coco.yaml"))
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0  # FREEZE_CONV_BODY_AT -1
    assert cfg.MODEL.FIBER.SWIN.USE_CHECKPOINT is True
    ref = _cfg(REPO / "configs" / "FIBER-SwinB-coco.yaml")
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(ref.INPUT.MIN_SIZE_TRAIN) == (480, 560, 640, 720, 800)
    assert (cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (1333, 800, 1333)


def test_official_yaml_from_a_file_path(tmp_path):
    path = tmp_path / "coco.yaml"
    path.write_text(OFFICIAL_COCO_YAML)
    cfg = translate_official_config(str(path))
    _assert_same_model_config(cfg, _cfg(REPO / "configs" / "FIBER-SwinB-coco.yaml"))


def test_refcoco_like_yaml_translates_to_the_refcoco_config():
    text = OFFICIAL_COCO_YAML.replace('FUSION_VERSION: "v2"', 'FUSION_VERSION: "v3"').replace(
        "  DYHEAD:\n", "  ATSS:\n    PRE_NMS_TOP_N: 3000\n    INFERENCE_TH: 0.0\n  DYHEAD:\n", 1)
    cfg = translate_official_config(text)
    ref = _cfg(REPO / "configs" / "FIBER-SwinB-refcoco.yaml")
    assert cfg.MODEL.FIBER.FUSION.I2T_QUERY_NORM is True
    assert cfg.MODEL.FIBER.FUSION.I2T_QUERY_NORM == ref.MODEL.FIBER.FUSION.I2T_QUERY_NORM
    assert dict(cfg.MODEL.FIBER.ATSS) == dict(ref.MODEL.FIBER.ATSS)
    assert (cfg.MODEL.FIBER.ATSS.PRE_NMS_TOP_N, cfg.MODEL.FIBER.ATSS.INFERENCE_TH) == (3000, 0.0)
    _assert_same_model_config(cfg, ref)


def test_pretraining_default_freeze_is_freeze_at_2():
    text = OFFICIAL_COCO_YAML.replace("    FREEZE_CONV_BODY_AT: -1\n", "")
    assert "FREEZE_CONV_BODY_AT" not in text
    assert translate_official_config(text).MODEL.BACKBONE.FREEZE_AT == 2
    explicit = OFFICIAL_COCO_YAML.replace("FREEZE_CONV_BODY_AT: -1", "FREEZE_CONV_BODY_AT: 2")
    assert translate_official_config(explicit).MODEL.BACKBONE.FREEZE_AT == 2


def test_fixture_config_dump_translates(fixture_v2, fixture_model):
    ref = fixture_v2["reference"]
    cfg = translate_official_config(ref["cfg_dump"], dict(ref["text_model_config_not_in_yacs"], model_type="roberta"))
    f = cfg.MODEL.FIBER
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2  # FREEZE_CONV_BODY_AT 2 (official default)
    assert (f.SWIN.WINDOW_SIZE, f.SWIN.MLP_RATIO, list(f.SWIN.NUM_HEADS)) == (7, 2.0, [2, 4, 8, 16])
    assert (f.TEXT.VOCAB_SIZE, f.TEXT.INTERMEDIATE_SIZE, f.TEXT.DROPOUT) == (360, 512, 0.0)
    assert (f.HEAD.CHANNELS, cfg.MODEL.FPN.OUT_CHANNELS, f.FUSION.I2T_QUERY_NORM) == (64, 64, False)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (320, 480)
    # FREEZE_AT 2: the patch embedding and Swin stage 0 are frozen, stage 1 is not
    vision = fixture_model.backbone.bottom_up.vision
    assert not any(p.requires_grad for p in vision.patch_embed.parameters())
    assert not any(p.requires_grad for p in vision.layers[0].parameters())
    assert all(p.requires_grad for p in vision.layers[1].parameters())


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("      EARLY_FUSE_ON: False", "      EARLY_FUSE_ON: True", "MODEL.DYHEAD.FUSE_CONFIG.EARLY_FUSE_ON"),
        ('    VERSION: "fusion"', '    VERSION: "fusion"\n    APE: True', "MODEL.SWINT.APE"),
        ("  RPN_ONLY: True", "  RPN_ONLY: True\n  MASK_ON: True", "MODEL.MASK_ON"),
        ('    SCORE_AGG: "MEAN"', '    SCORE_AGG: "MAX"', "MODEL.DYHEAD.SCORE_AGG"),
        ('    FUSION_VERSION: "v2"', '    FUSION_VERSION: "v1"', "MODEL.BACKBONE.FUSION_VERSION"),
        ("    ANCHOR_STRIDE: (8, 16, 32, 64, 128)", "    ANCHOR_STRIDE: (4, 8, 16, 32, 64)", "MODEL.RPN.ANCHOR_STRIDE"),
    ],
    ids=["early-fuse", "ape", "mask-on", "score-agg", "fusion-v1", "anchor-stride"],
)
def test_behaviour_changing_value_is_rejected(old, new, key):
    assert old in OFFICIAL_COCO_YAML
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        translate_official_config(OFFICIAL_COCO_YAML.replace(old, new, 1))


def test_inert_keys_are_accepted():
    text = (OFFICIAL_COCO_YAML.replace("  BASE_LR: 0.00001", "  BASE_LR: 0.5")
            .replace('  TRAIN: ("coco_grounding_train", )', '  TRAIN: ("flickr30k_train", "mixed_train_no_coco")'))
    assert "BASE_LR: 0.5" in text and "flickr30k_train" in text
    cfg = translate_official_config(text)
    _assert_same_model_config(cfg, _cfg(REPO / "configs" / "FIBER-SwinB-coco.yaml"))


def test_anchor_spec_from_config_checks_stored_anchors(official_sd):
    from conftest import tiny_cfg
    from fiber_det.checkpoint.convert import FIBER_ANCHORS, anchor_spec_from_cfg

    cfg = tiny_cfg()
    assert anchor_spec_from_cfg(cfg) == FIBER_ANCHORS
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    _, report = convert_official_state_dict({"model": official_sd}, anchors=anchor_spec_from_cfg(cfg))
    assert any("cell_anchors.0" in m for m in report.mismatched), report.mismatched
