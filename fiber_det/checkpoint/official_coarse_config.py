"""Translate an official coarse-grained FIBER config (the sacred dict of ``fiber/config.py``, as
stored under ``hyper_parameters["config"]`` of its Lightning checkpoints) into a fiber-det config
for :class:`~fiber_det.modeling.coarse.FiberCoarsePretrain`.

Starts from configs/coarse/Base-FIBER-B-coarse.yaml and sets what the dict decides: the Swin
variant (window = image size / 32), the caption length, the head width, the objectives. Values
the model cannot reproduce raise; training, data and evaluation entries are ignored.
"""
import logging
import re
from typing import Any, Dict, Optional

from detectron2.config import CfgNode, get_cfg

from ..config import add_fiber_config
from ..utils.paths import REPO_ROOT
from .official_config import ROBERTA_BASE, set_text_tower

__all__ = ["translate_official_coarse_config", "COARSE_BASE_CONFIG"]

logger = logging.getLogger(__name__)

COARSE_BASE_CONFIG = REPO_ROOT / "configs" / "coarse" / "Base-FIBER-B-coarse.yaml"
# official Swin variants: embed dim, depths, heads (their window is replaced by image_size / 32)
SWIN_VARIANTS = {
    "base": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
    "large": (192, [2, 2, 18, 2], [6, 12, 24, 48]),
}


def _check(config: Dict[str, Any], text: dict) -> list:
    bad = []
    m = re.fullmatch(r"swin_(base|large)_patch4_window\d+_\d+(_in22k)?", str(config.get("vit")))
    if not m:
        bad.append(f"vit = {config.get('vit')!r} (swin_base/large_patch4_window*_* expected)")
    else:
        embed = SWIN_VARIANTS[m.group(1)][0]
        if config.get("input_image_embed_size") != embed * 8:
            bad.append(f"input_image_embed_size = {config.get('input_image_embed_size')} != last Swin width {embed * 8}")
    if config["image_size"] % 32:
        bad.append(f"image_size = {config['image_size']} (a multiple of 32 expected)")
    if config.get("input_text_embed_size") != text["hidden_size"]:
        bad.append(f"input_text_embed_size = {config.get('input_text_embed_size')} != text hidden size {text['hidden_size']}")
    if config.get("vocab_size", text["vocab_size"]) != text["vocab_size"]:
        bad.append(f"vocab_size = {config['vocab_size']} != the text model's {text['vocab_size']}")
    if not config.get("itc_pooler", True):
        bad.append("itc_pooler = False (only the pooled ITC features are implemented)")
    if config.get("whole_word_masking", False):
        bad.append("whole_word_masking = True (the official code does not support it for RoBERTa either)")
    return bad


def translate_official_coarse_config(
    config: Dict[str, Any], text_model_config: Optional[dict] = None, tokenizer: str = ""
) -> CfgNode:
    """Official coarse config dict -> fiber-det CfgNode.

    Args:
        config: the official merged config (54 keys: ``image_size``, ``max_text_len``,
            ``hidden_size``, ``loss_names``, ``vit``, ``num_fuse_block``, ...).
        text_model_config: the HF RobertaConfig fields of the text model when it is not
            roberta-base (the official code loads roberta-base's config from the hub).
        tokenizer: local tokenizer folder for MODEL.FIBER.TEXT.TOKENIZER.
    Raises:
        ValueError listing every value the coarse model cannot reproduce.
    """
    text = dict(ROBERTA_BASE, **(text_model_config or {}))
    bad = _check(config, text)
    if bad:
        raise ValueError("official coarse config not reproducible by fiber-det:\n  " + "\n  ".join(bad))
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(str(COARSE_BASE_CONFIG))
    f = cfg.MODEL.FIBER
    embed, depths, heads = SWIN_VARIANTS[re.match(r"swin_(\w+?)_", config["vit"]).group(1)]
    f.SWIN.EMBED_DIM, f.SWIN.DEPTHS, f.SWIN.NUM_HEADS = embed, depths, heads
    f.SWIN.WINDOW_SIZE = config["image_size"] // 32
    f.SWIN.MLP_RATIO = float(config.get("mlp_ratio", 4))
    set_text_tower(f.TEXT, text, tokenizer)
    f.TEXT.MAX_QUERY_LEN = config["max_text_len"]
    f.FUSION.NUM_LAYERS = config["num_fuse_block"]
    c = f.COARSE
    c.IMAGE_SIZE = config["image_size"]
    c.EMBED_DIM = config["hidden_size"]
    losses = config.get("loss_names", {})
    c.ITC_ON, c.ITM_ON, c.MLM_ON = (losses.get(k, 0) > 0 for k in ("itc", "itm", "mlm"))
    c.MLM_PROBABILITY = float(config.get("mlm_prob", 0.15))
    heads_off = sorted(k for k, v in losses.items() if v > 0 and k not in ("itc", "itm", "mlm"))
    if heads_off:
        logger.warning("official coarse config: objectives %s are not part of the pre-training model (ignored)", heads_off)
    return cfg
