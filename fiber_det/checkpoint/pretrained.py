"""Initialise the two towers from real pretrained parts (before any FIBER checkpoint).

- :func:`load_hf_text_weights`: a local HF BERT/RoBERTa folder (config.json + model.safetensors
  or pytorch_model.bin) into :class:`TextEncoder`, by name. Only the new fusion parameters
  (``crossattention_t2i.*``, ``alpha_t2i``) may stay at their initialisation (gates 0).
- :func:`load_swin_imagenet_weights`: an official Microsoft Swin ImageNet checkpoint into
  :class:`SwinTransformer`. Only the fusion parameters and the output norms ``norm{1,2,3}`` may
  stay fresh; the classifier and recomputed buffers are skipped, and so is the final ``norm``
  unless the Swin has one (the coarse-grained model, which loads it as timm does).
- :func:`load_pretrained_towers`: both of the above into every fusion backbone of a built model,
  from ``MODEL.FIBER.SWIN.WEIGHTS`` / ``MODEL.FIBER.TEXT.WEIGHTS``. Training calls it after
  building the model (the model's ``from_config`` never reads files); a full checkpoint
  (``MODEL.WEIGHTS``) loaded afterwards overrides it.
Any other missing, unexpected or mis-shaped key is an error that lists them.
"""
import json
import logging
import os
import re
from typing import Dict, List

import torch

from ..modeling.backbone.swin import SwinTransformer
from ..modeling.backbone.windows import relative_position_index
from ..modeling.backbone.text import TextEncoder, TextEncoderConfig
from ..utils.paths import resolve_path
from ..utils.safe_load import load_checkpoint_file
from .convert import list_problems

__all__ = ["load_hf_text_weights", "load_swin_imagenet_weights", "load_pretrained_towers", "PretrainedLoadError"]

logger = logging.getLogger(__name__)

TEXT_FUSION = re.compile(r"^encoder\.layer\.\d+\.(crossattention_t2i\.|alpha_t2i$)")
TEXT_IGNORED = re.compile(r"^(pooler\.|cls\.|lm_head\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")
SWIN_FUSION = re.compile(r"\.attn\.(qkv_text_i2t|qkv_i2t|proj_i2t|norm_i2t_i)\.|\.attn\.alpha_i2t$")
SWIN_FRESH = re.compile(r"^norm\d+\.")
SWIN_IGNORED = re.compile(r"^head\.|\.attn_mask$|\.relative_position_index$")
SWIN_FINAL_NORM = re.compile(r"^norm\.(weight|bias)$")


class PretrainedLoadError(ValueError):
    """The pretrained file does not fit the model; the message lists every problem."""


def _fail(source: str, problems: Dict[str, List[str]]) -> None:
    report = list_problems(problems)
    if report:
        raise PretrainedLoadError(f"{source}: cannot initialise from it\n{report}")


def _load_into(module: torch.nn.Module, sd: Dict[str, torch.Tensor], fresh_ok: re.Pattern, source: str):
    own = module.state_dict()
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                        for k, v in sd.items() if k in own and own[k].shape != v.shape)
    missing = sorted(k for k in own if k not in sd and not fresh_ok.search(k))
    _fail(source, {"unexpected keys": unexpected, "mis-shaped keys": mismatched, "missing keys": missing})
    module.load_state_dict(sd, strict=False)
    fresh = sorted(k for k in own if k not in sd)
    logger.info("%s: loaded %d tensors; %d left at their initialisation", source, len(sd), len(fresh))
    return {"loaded": sorted(sd), "fresh": fresh}


def _read_weights(folder: str) -> Dict[str, torch.Tensor]:
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    pt = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(pt):
        return load_checkpoint_file(pt)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


def load_hf_text_weights(text: TextEncoder, folder: str) -> Dict[str, List[str]]:
    """Load a HF BERT/RoBERTa checkpoint folder into ``text`` (architecture must match).

    Returns {"loaded": keys, "fresh": keys left at their initialisation}."""
    folder = resolve_path(folder)
    with open(os.path.join(folder, "config.json")) as f:
        hf = TextEncoderConfig.from_hf(json.load(f))
    ours = text.config
    diffs = [f"{k}: file {getattr(hf, k)!r} vs model {getattr(ours, k)!r}"
             for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size", "position_style", "pad_token_id")
             if getattr(hf, k) != getattr(ours, k)]
    if abs(hf.layer_norm_eps - ours.layer_norm_eps) > 1e-15:
        diffs.append(f"layer_norm_eps: file {hf.layer_norm_eps} vs model {ours.layer_norm_eps}")
    _fail(f"{folder}/config.json", {"architecture differences": diffs})
    sd = {}
    for k, v in _read_weights(folder).items():
        k = re.sub(r"^(bert|roberta)\.", "", k)
        if not TEXT_IGNORED.search(k):
            sd[k] = v
    return _load_into(text, sd, TEXT_FUSION, folder)


def load_swin_imagenet_weights(swin: SwinTransformer, path: str) -> Dict[str, List[str]]:
    """Load an official Swin ImageNet checkpoint (``{"model": ...}``) into ``swin``.

    Returns {"loaded": keys, "fresh": keys left at their initialisation}."""
    path = resolve_path(path)
    ckpt = load_checkpoint_file(path)
    raw = ckpt.get("model", ckpt.get("state_dict", ckpt))
    bad_index = []
    sd = {}
    for k, v in raw.items():
        if k.endswith("relative_position_index"):
            window = int(round(v.shape[0] ** 0.5))
            if not torch.equal(v.long(), relative_position_index(window)):
                bad_index.append(k)
        if not SWIN_IGNORED.search(k) and (swin.norm is not None or not SWIN_FINAL_NORM.match(k)):
            sd[k] = v
    _fail(path, {"non-standard relative_position_index buffers": bad_index})
    return _load_into(swin, sd, re.compile(f"{SWIN_FUSION.pattern}|{SWIN_FRESH.pattern}"), path)


def load_pretrained_towers(model: torch.nn.Module, cfg) -> Dict[str, Dict[str, List[str]]]:
    """Initialise every :class:`FusionBottomUp` of ``model`` from ``MODEL.FIBER.SWIN.WEIGHTS``
    and ``MODEL.FIBER.TEXT.WEIGHTS`` (each skipped when empty).

    Returns:
        {"swin": ..., "text": ...} the loaders' reports of the first fusion backbone (empty
        when nothing was loaded).
    """
    from ..modeling.backbone.fusion import FusionBottomUp

    f = cfg.MODEL.FIBER
    towers = [m for m in model.modules() if isinstance(m, FusionBottomUp)]
    if (f.SWIN.WEIGHTS or f.TEXT.WEIGHTS) and not towers:
        raise ValueError("MODEL.FIBER.SWIN.WEIGHTS / TEXT.WEIGHTS are set but the model has no fusion backbone")
    reports: Dict[str, Dict[str, List[str]]] = {}
    for bottom_up in towers:
        if f.SWIN.WEIGHTS:
            reports.setdefault("swin", load_swin_imagenet_weights(bottom_up.vision, f.SWIN.WEIGHTS))
        if f.TEXT.WEIGHTS:
            reports.setdefault("text", load_hf_text_weights(bottom_up.text, f.TEXT.WEIGHTS))
    return reports
