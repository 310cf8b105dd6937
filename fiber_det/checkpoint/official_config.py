"""Translate an official FIBER (maskrcnn_benchmark yacs) config into a fiber-det config.

Accepts a partial official yaml (the files under ``fine_grained/configs``) or a merged dump
(``cfg.dump()``); keys the yaml leaves out take the official defaults listed in
:data:`OFFICIAL_DEFAULTS` (values from the official ``config/defaults.py``). Only the keys that
decide the model and inference are translated:
- :data:`REQUIRED` keys must hold the listed value (otherwise the model would be one fiber-det
  does not build): a different value raises;
- keys read by :func:`translate_official_config` are mapped;
- everything else (solver, datasets, other architectures' options) does not change the model
  or inference and is ignored with one log line.
"""
import ast
import logging
from typing import Any, Dict, Optional

import yaml

from detectron2.config import CfgNode, get_cfg

from ..config import add_fiber_config

__all__ = ["translate_official_config", "load_official_config", "OFFICIAL_DEFAULTS", "REQUIRED"]

logger = logging.getLogger(__name__)

# official defaults (maskrcnn_benchmark/config/defaults.py) of every key read below
OFFICIAL_DEFAULTS: Dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.RPN_ARCHITECTURE": "RPN",
    "MODEL.RPN_ONLY": False,
    "MODEL.MASK_ON": False,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.SWINT.EMBED_DIM": 96,
    "MODEL.SWINT.OUT_CHANNELS": (96, 192, 384, 768),
    "MODEL.SWINT.DEPTHS": (2, 2, 6, 2),
    "MODEL.SWINT.NUM_HEADS": (3, 6, 12, 24),
    "MODEL.SWINT.WINDOW_SIZE": 7,
    "MODEL.SWINT.MLP_RATIO": 4,
    "MODEL.SWINT.DROP_PATH_RATE": 0.2,
    "MODEL.SWINT.APE": False,
    "MODEL.SWINT.VERSION": "v1",
    "MODEL.SWINT.OUT_NORM": True,
    "MODEL.SWINT.LAYER_SCALE": 0,
    "MODEL.BACKBONE.CONV_BODY": "R-50-C4",
    "MODEL.BACKBONE.FREEZE_CONV_BODY_AT": 2,
    "MODEL.BACKBONE.OUT_CHANNELS": 256 * 4,
    "MODEL.BACKBONE.USE_CHECKPOINT": False,
    "MODEL.BACKBONE.FUSION_VERSION": "v1",
    "MODEL.LANGUAGE_BACKBONE.MODEL_TYPE": "bert-base-uncased",
    "MODEL.LANGUAGE_BACKBONE.TOKENIZER_TYPE": "bert-base-uncased",
    "MODEL.LANGUAGE_BACKBONE.LANG_DIM": 768,
    "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN": 256,
    "MODEL.LANGUAGE_BACKBONE.PAD_MAX": True,
    "MODEL.LANGUAGE_BACKBONE.MASK_SPECIAL": False,
    "MODEL.FPN.USE_GN": False,
    "MODEL.FPN.USE_RELU": False,
    "MODEL.FPN.DROP_BLOCK": True,
    "MODEL.FPN.DROP_PROB": 0.3,
    "MODEL.FPN.DROP_SIZE": 3,
    "MODEL.GROUP_NORM.NUM_GROUPS": 16,
    "MODEL.GROUP_NORM.EPSILON": 1e-5,
    "MODEL.RPN.USE_FPN": False,
    "MODEL.RPN.ANCHOR_SIZES": (32, 64, 128, 256, 512),
    "MODEL.RPN.ANCHOR_STRIDE": (16,),
    "MODEL.RPN.ASPECT_RATIOS": (0.5, 1.0, 2.0),
    "MODEL.RPN.ANCHOR_SHIFT": (0.0, 0.0, 0.0, 0.0),
    "MODEL.RPN.OCTAVE": 2.0,
    "MODEL.RPN.SCALES_PER_OCTAVE": 3,
    "MODEL.RPN.USE_RELATIVE_SIZE": False,
    "MODEL.ATSS.INFERENCE_TH": 0.05,
    "MODEL.ATSS.NMS_TH": 0.6,
    "MODEL.ATSS.PRE_NMS_TOP_N": 1000,
    "MODEL.ATSS.TOPK": 9,
    "MODEL.ATSS.REG_LOSS_WEIGHT": 2.0,
    "MODEL.ATSS.DETECTIONS_PER_IMG": 100,
    "MODEL.DYHEAD.PRIOR_PROB": 0.01,
    "MODEL.DYHEAD.NUM_CONVS": 4,
    "MODEL.DYHEAD.CHANNELS": 128,
    "MODEL.DYHEAD.USE_DFCONV": False,
    "MODEL.DYHEAD.SCORE_AGG": "MEAN",
    "MODEL.DYHEAD.LOG_SCALE": 0.0,
    "MODEL.DYHEAD.USE_GN": False,
    "MODEL.DYHEAD.USE_DYFUSE": False,
    "MODEL.DYHEAD.USE_DYRELU": False,
    "MODEL.DYHEAD.COSINE_SCALE": -1.0,
    "MODEL.DYHEAD.FUSE_CONFIG.EARLY_FUSE_ON": False,
    "MODEL.DYHEAD.FUSE_CONFIG.TYPE": "",
    "MODEL.DYHEAD.FUSE_CONFIG.USE_CLASSIFICATION_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_TOKEN_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.TOKEN_GAMMA": 2.0,
    "MODEL.DYHEAD.FUSE_CONFIG.TOKEN_ALPHA": 0.25,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_DOT_PRODUCT_TOKEN_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_CONTRASTIVE_ALIGN_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.DOT_PRODUCT_TOKEN_LOSS_WEIGHT": 1.0,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_SHALLOW_CONTRASTIVE_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_BACKBONE_SHALLOW_CONTRASTIVE_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.MLM_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_DOT_PRODUCT": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT": False,
    "MODEL.DYHEAD.FUSE_CONFIG.ADD_LINEAR_LAYER": False,
    "INPUT.MIN_SIZE_TRAIN": 800,
    "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "INPUT.PIXEL_MEAN": [102.9801, 115.9465, 122.7717],
    "INPUT.PIXEL_STD": [1.0, 1.0, 1.0],
    "INPUT.TO_BGR255": True,
    "AUGMENT.MULT_MIN_SIZE_TRAIN": (),
    "DATALOADER.SIZE_DIVISIBILITY": 0,
}

# keys whose value fiber-det's model requires (FIBER fine-grained = these values)
REQUIRED: Dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedVLRCNN",
    "MODEL.RPN_ARCHITECTURE": "VLDYHEAD",
    "MODEL.RPN_ONLY": True,
    "MODEL.MASK_ON": False,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.SWINT.VERSION": "fusion",
    "MODEL.SWINT.APE": False,
    "MODEL.SWINT.OUT_NORM": True,
    "MODEL.SWINT.LAYER_SCALE": 0,
    "MODEL.BACKBONE.CONV_BODY": "SWINT-FPN-RETINANET",
    "MODEL.LANGUAGE_BACKBONE.MODEL_TYPE": "roberta-fused-v2",
    "MODEL.LANGUAGE_BACKBONE.MASK_SPECIAL": False,
    "MODEL.FPN.USE_GN": False,
    "MODEL.FPN.USE_RELU": False,
    "MODEL.GROUP_NORM.EPSILON": 1e-5,
    "MODEL.RPN.USE_FPN": True,
    "MODEL.RPN.ANCHOR_SHIFT": (0.0, 0.0, 0.0, 0.0),
    "MODEL.RPN.USE_RELATIVE_SIZE": False,
    "MODEL.DYHEAD.USE_DFCONV": True,
    "MODEL.DYHEAD.SCORE_AGG": "MEAN",
    "MODEL.DYHEAD.USE_GN": True,
    "MODEL.DYHEAD.USE_DYFUSE": True,
    "MODEL.DYHEAD.USE_DYRELU": True,
    "MODEL.DYHEAD.COSINE_SCALE": -1.0,
    "MODEL.DYHEAD.FUSE_CONFIG.EARLY_FUSE_ON": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_CLASSIFICATION_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_TOKEN_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_DOT_PRODUCT_TOKEN_LOSS": True,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_CONTRASTIVE_ALIGN_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_SHALLOW_CONTRASTIVE_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_BACKBONE_SHALLOW_CONTRASTIVE_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.MLM_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_DOT_PRODUCT": True,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT": False,
    "MODEL.DYHEAD.FUSE_CONFIG.ADD_LINEAR_LAYER": False,
    "INPUT.TO_BGR255": True,
    "DATALOADER.SIZE_DIVISIBILITY": 32,
}

# the text model official FIBER always builds (RobertaConfig of "roberta-base")
ROBERTA_BASE = dict(
    model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
    pad_token_id=1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
)


def _decode(value):
    # yacs semantics: strings that are Python literals ("(2, 2, 18, 2)") become values
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _flatten(tree: dict, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _decode(v)
    return out


def load_official_config(source: str) -> Dict[str, Any]:
    """A yaml path or yaml text -> flat {"A.B.C": value} with defaults filled in."""
    text = source
    if "\n" not in source and source.endswith((".yaml", ".yml")):
        with open(source) as f:
            text = f.read()
    tree = yaml.safe_load(text) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"official config {source[:80]!r}: not a yaml mapping")
    if "_BASE_" in tree:
        raise ValueError("official FIBER configs do not use _BASE_; give the merged config")
    flat = dict(OFFICIAL_DEFAULTS)
    flat.update(_flatten(tree))
    return flat


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _freeze_at(official: int) -> int:
    # official FREEZE_CONV_BODY_AT k: k >= 0 freezes the patch embedding, k >= 2 also Swin
    # stages 0..k-2; Detectron2's FREEZE_AT counts the stem as 1 (see SwinTransformer.freeze)
    return 0 if official < 0 else max(official, 1)


def _official_fused_blocks(depths) -> int:
    # official rule: blocks with index >= 14 in stages 0-2 and every block of stage 3
    return sum(max(0, d - 14) for d in depths[:3]) + depths[3]


def set_text_tower(t: CfgNode, text: Dict[str, Any], tokenizer: str) -> None:
    """MODEL.FIBER.TEXT's architecture keys (``t``) from a Hugging Face BERT / RoBERTa config dict
    (``model_type`` defaults to "roberta", as the official models are) and the tokenizer folder."""
    t.ARCH = text.get("model_type", "roberta")
    t.VOCAB_SIZE = text["vocab_size"]
    t.HIDDEN_SIZE = text["hidden_size"]
    t.NUM_LAYERS = text["num_hidden_layers"]
    t.NUM_HEADS = text["num_attention_heads"]
    t.INTERMEDIATE_SIZE = text["intermediate_size"]
    t.MAX_POSITIONS = text["max_position_embeddings"]
    t.TYPE_VOCAB_SIZE = text["type_vocab_size"]
    t.LAYER_NORM_EPS = float(text["layer_norm_eps"])
    t.PAD_TOKEN_ID = text["pad_token_id"]
    t.DROPOUT = float(text["hidden_dropout_prob"])
    t.ATTENTION_DROPOUT = float(text["attention_probs_dropout_prob"])
    t.TOKENIZER = tokenizer


def translate_official_config(
    source: str, text_model_config: Optional[dict] = None, tokenizer: str = ""
) -> CfgNode:
    """Official yacs config (path or yaml text) -> fiber-det CfgNode.

    Args:
        source: official yaml (partial, defaults filled in) or a merged ``cfg.dump()``.
        text_model_config: the HF RobertaConfig fields of the text model when it is not
            roberta-base (e.g. the fixtures' ``reference.text_model_config_not_in_yacs``).
        tokenizer: local tokenizer folder for MODEL.FIBER.TEXT.TOKENIZER (official configs name a
            hub model, which fiber-det never downloads).
    Raises:
        ValueError listing every key whose value fiber-det cannot reproduce.
    """
    o = load_official_config(source)
    bad = [f"{k} = {o.get(k)!r} (fiber-det needs {v!r})" for k, v in REQUIRED.items() if not _same(o.get(k), v)]
    depths = list(o["MODEL.SWINT.DEPTHS"])
    embed = o["MODEL.SWINT.EMBED_DIM"]
    if len(depths) != 4:
        bad.append(f"MODEL.SWINT.DEPTHS = {depths} (4 stages expected)")
    elif list(o["MODEL.SWINT.OUT_CHANNELS"]) != [embed * 2**i for i in range(4)]:
        bad.append(f"MODEL.SWINT.OUT_CHANNELS = {o['MODEL.SWINT.OUT_CHANNELS']} != EMBED_DIM * 2**i")
    text = dict(ROBERTA_BASE, **(text_model_config or {}))
    n_text = text["num_hidden_layers"]
    if len(depths) == 4 and _official_fused_blocks(depths) != 6:
        bad.append(f"MODEL.SWINT.DEPTHS = {depths}: the official code fuses blocks that do not pair with text layers 6-11")
    if n_text != 12:
        bad.append(f"text model with {n_text} layers: official FIBER fuses layers 6-11 of a 12-layer model")
    if o["MODEL.LANGUAGE_BACKBONE.LANG_DIM"] != text["hidden_size"]:
        bad.append(f"MODEL.LANGUAGE_BACKBONE.LANG_DIM = {o['MODEL.LANGUAGE_BACKBONE.LANG_DIM']} != text hidden size")
    if list(o["MODEL.RPN.ANCHOR_STRIDE"]) != [8, 16, 32, 64, 128]:
        bad.append(f"MODEL.RPN.ANCHOR_STRIDE = {o['MODEL.RPN.ANCHOR_STRIDE']} (P3-P7 strides 8..128 expected)")
    if o["MODEL.BACKBONE.FUSION_VERSION"] not in ("v2", "v3"):
        bad.append(f"MODEL.BACKBONE.FUSION_VERSION = {o['MODEL.BACKBONE.FUSION_VERSION']!r} (v2 or v3)")
    if bad:
        raise ValueError("official config not reproducible by fiber-det:\n  " + "\n  ".join(bad))

    cfg = add_fiber_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "FIBER"
    cfg.MODEL.BACKBONE.NAME = "build_fiber_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = _freeze_at(o["MODEL.BACKBONE.FREEZE_CONV_BODY_AT"])
    cfg.MODEL.PIXEL_MEAN = list(o["INPUT.PIXEL_MEAN"])
    cfg.MODEL.PIXEL_STD = list(o["INPUT.PIXEL_STD"])
    cfg.INPUT.FORMAT = "BGR"
    train_sizes = o["AUGMENT.MULT_MIN_SIZE_TRAIN"] or o["INPUT.MIN_SIZE_TRAIN"]
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(train_sizes) if isinstance(train_sizes, (list, tuple)) else (train_sizes,)
    cfg.INPUT.MAX_SIZE_TRAIN = o["INPUT.MAX_SIZE_TRAIN"]
    cfg.INPUT.MIN_SIZE_TEST = o["INPUT.MIN_SIZE_TEST"]
    cfg.INPUT.MAX_SIZE_TEST = o["INPUT.MAX_SIZE_TEST"]
    cfg.MODEL.FPN.OUT_CHANNELS = o["MODEL.BACKBONE.OUT_CHANNELS"]
    octave, spo = o["MODEL.RPN.OCTAVE"], o["MODEL.RPN.SCALES_PER_OCTAVE"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [
        [float(octave ** (j / float(spo)) * s) for j in range(spo)] for s in o["MODEL.RPN.ANCHOR_SIZES"]
    ]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[float(r) for r in o["MODEL.RPN.ASPECT_RATIOS"]]]
    cfg.TEST.DETECTIONS_PER_IMAGE = o["MODEL.ATSS.DETECTIONS_PER_IMG"]

    f = cfg.MODEL.FIBER
    f.SWIN.EMBED_DIM = embed
    f.SWIN.DEPTHS = depths
    f.SWIN.NUM_HEADS = list(o["MODEL.SWINT.NUM_HEADS"])
    f.SWIN.WINDOW_SIZE = o["MODEL.SWINT.WINDOW_SIZE"]
    f.SWIN.MLP_RATIO = float(o["MODEL.SWINT.MLP_RATIO"])
    f.SWIN.DROP_PATH_RATE = float(o["MODEL.SWINT.DROP_PATH_RATE"])
    f.SWIN.USE_CHECKPOINT = bool(o["MODEL.BACKBONE.USE_CHECKPOINT"])
    set_text_tower(f.TEXT, text, tokenizer)
    f.TEXT.MAX_QUERY_LEN = o["MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN"]
    f.TEXT.PAD_TO_MAX = bool(o["MODEL.LANGUAGE_BACKBONE.PAD_MAX"])
    f.FUSION.NUM_LAYERS = 6
    f.FUSION.I2T_QUERY_NORM = o["MODEL.BACKBONE.FUSION_VERSION"] == "v3"
    f.FPN.DROP_BLOCK_PROB = float(o["MODEL.FPN.DROP_PROB"]) if o["MODEL.FPN.DROP_BLOCK"] else 0.0
    f.FPN.DROP_BLOCK_SIZE = o["MODEL.FPN.DROP_SIZE"]
    f.HEAD.CHANNELS = o["MODEL.DYHEAD.CHANNELS"]
    f.HEAD.NUM_CONVS = o["MODEL.DYHEAD.NUM_CONVS"]
    f.HEAD.GN_GROUPS = o["MODEL.GROUP_NORM.NUM_GROUPS"]
    f.HEAD.PRIOR_PROB = float(o["MODEL.DYHEAD.PRIOR_PROB"])
    f.HEAD.LOG_SCALE = float(o["MODEL.DYHEAD.LOG_SCALE"])
    f.ATSS.TOPK = o["MODEL.ATSS.TOPK"]
    f.ATSS.REG_LOSS_WEIGHT = float(o["MODEL.ATSS.REG_LOSS_WEIGHT"])
    f.ATSS.TOKEN_ALPHA = float(o["MODEL.DYHEAD.FUSE_CONFIG.TOKEN_ALPHA"])
    f.ATSS.TOKEN_GAMMA = float(o["MODEL.DYHEAD.FUSE_CONFIG.TOKEN_GAMMA"])
    f.ATSS.TOKEN_LOSS_WEIGHT = float(o["MODEL.DYHEAD.FUSE_CONFIG.DOT_PRODUCT_TOKEN_LOSS_WEIGHT"])
    f.ATSS.INFERENCE_TH = float(o["MODEL.ATSS.INFERENCE_TH"])
    f.ATSS.PRE_NMS_TOP_N = o["MODEL.ATSS.PRE_NMS_TOP_N"]
    f.ATSS.NMS_TH = float(o["MODEL.ATSS.NMS_TH"])

    read = set(OFFICIAL_DEFAULTS) | set(REQUIRED)
    ignored = sorted(k for k in o if k not in read)
    logger.info(
        "official config: %d keys translated or checked; %d keys ignored (training, datasets and other "
        "architectures' options do not change the model or inference), e.g. %s",
        len(read), len(ignored), ", ".join(ignored[:5]),
    )
    return cfg
