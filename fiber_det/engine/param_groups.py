"""Optimizer parameter groups with the official FIBER learning-rate / weight-decay rules.

Two rule sets, chosen by the model (:func:`build_param_groups_from_cfg`): the fine-grained
detector's (:class:`OfficialLrRules`, below) and the coarse-grained image-text model's
(:class:`CoarseLrRules`: six substring groups, see its docstring).

The official solver gives every parameter its own group and decides its lr and weight decay by
substrings of the parameter's *official* name (``fusion_backbone.backbone.body...``,
``fusion_backbone.language_backbone...``, ``rpn.head...``). fiber-det names its modules the
Detectron2 way, so each of our names is first mapped back to its official twin through the
checkpoint rename table (:mod:`fiber_det.checkpoint.rename_table`) and the rules are applied
literally to that name; a parameter therefore gets exactly the lr / wd the official code gives
its twin, including the quirks (every name containing "bias" -- ``relative_position_bias_table``,
``bias_lang``, ``bias0`` too -- gets ×BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS).

Detectron2's ``get_default_optimizer_params`` cannot be used: it detects biases by exact name
and norms by module type, which differs from the substring rules.

Parameters sharing (lr, weight_decay) are merged into one group. AdamW's update of a parameter
depends only on that parameter's own state and its group's hyper-parameters, so merging is exact
and saves ~800 tiny groups (and their per-group kernel launches).
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

from torch import nn

from ..checkpoint.coarse import OFFICIAL_COARSE_RENAMES
from ..checkpoint.rename_table import PREFIX_RENAMES

__all__ = [
    "official_param_name",
    "official_coarse_param_name",
    "OfficialLrRules",
    "CoarseLrRules",
    "official_lr_and_weight_decay",
    "build_param_groups",
    "build_coarse_param_groups",
    "build_param_groups_from_cfg",
    "describe_param_groups",
]


def official_param_name(name: str) -> str:
    """The official FIBER name of a fiber-det parameter (inverse of the checkpoint rename table).

    A leading ``module.`` (DDP) is ignored.

    >>> official_param_name("backbone.bottom_up.text.encoder.layer.6.alpha_t2i")
    'fusion_backbone.language_backbone.body.model.encoder.layer.6.alpha_t2i'
    >>> official_param_name("head.bias0")
    'rpn.head.bias0'

    Raises:
        ValueError: the name has no official twin (the rules would be guesswork).
    """
    if name.startswith("module."):
        name = name[len("module."):]
    for official_prefix, ours in PREFIX_RENAMES:
        if name.startswith(ours):
            return official_prefix + name[len(ours):]
    raise ValueError(
        f"parameter {name!r} has no official FIBER counterpart in "
        "fiber_det.checkpoint.rename_table.PREFIX_RENAMES; pass to_official= to build_param_groups "
        "to say which official rule applies to it"
    )


def official_coarse_param_name(name: str) -> str:
    """The official coarse-model name of a parameter of our coarse model (``backbone.vision.`` ->
    ``vit_model.``, ``backbone.text.`` -> ``text_transformer.``; the heads keep their names). A
    leading ``module.`` (DDP) is ignored.

    >>> official_coarse_param_name("backbone.vision.layers.2.blocks.1.attn.qkv_i2t.weight")
    'vit_model.layers.2.blocks.1.attn.qkv_i2t.weight'
    """
    if name.startswith("module."):
        name = name[len("module."):]
    for official_prefix, ours in OFFICIAL_COARSE_RENAMES:
        if name.startswith(ours):
            return official_prefix + name[len(ours):]
    return name


@dataclass(frozen=True)
class OfficialLrRules:
    """The SOLVER values the official lr / weight-decay rules read, and the rules."""

    base_lr: float  # SOLVER.BASE_LR
    lang_lr: float  # SOLVER.LANG_LR
    weight_decay: float  # SOLVER.WEIGHT_DECAY
    bias_lr_factor: float = 2.0  # SOLVER.BIAS_LR_FACTOR
    weight_decay_bias: float = 0.0  # SOLVER.WEIGHT_DECAY_BIAS
    norm_wd_factor: float = 1.0  # SOLVER.WEIGHT_DECAY_NORM_FACTOR
    backbone_body_lr_factor: float = 1.0  # SOLVER.BACKBONE_BODY_LR_FACTOR

    def lr_and_weight_decay(self, official_name: str) -> Tuple[float, float]:
        """(lr, weight_decay) of one parameter: the substring rules below, in order, on its official name."""
        lr, wd = self.base_lr, self.weight_decay
        if "language_backbone" in official_name:
            lr = self.lang_lr
        if "backbone.body" in official_name and "language_backbone.body" not in official_name:
            lr = self.base_lr * self.backbone_body_lr_factor
        if "bias" in official_name:
            lr *= self.bias_lr_factor
            wd = self.weight_decay_bias
        if "norm" in official_name or "Norm" in official_name:
            wd *= self.norm_wd_factor
        return lr, wd


@dataclass(frozen=True)
class CoarseLrRules:
    """The coarse model's rules: six groups by substrings of the official name.

    - no decay: the name contains one of :attr:`NO_DECAY` (every "bias", incl.
      ``relative_position_bias_table`` and ``mlm_score.bias``; RoBERTa's ``LayerNorm``s; the Swin
      ``norm``, ``norm1``, ``norm2``). ``norm_i2t_i.weight``, the gates, ``temp`` and the
      embeddings ARE decayed (no listed substring).
    - lr x ``lr_mult_head`` for the heads (:attr:`HEADS`), x ``lr_mult_cross_modal`` for
      :attr:`CROSS_MODAL` (every i2t / t2i module and gate, and the ``cross_modal_*``
      projections and poolers), else ``base_lr``; the Swin's (``vit_model.*``) then also
      x ``backbone_body_lr_factor`` (1 officially: a Swin trained from scratch next to a
      pretrained text tower wants more).
    A name that is both a head and cross-modal would be in none of the official groups (never
    trained); no such parameter exists, and one is an error here.
    """

    base_lr: float  # SOLVER.BASE_LR
    weight_decay: float  # SOLVER.WEIGHT_DECAY
    lr_mult_cross_modal: float = 5.0  # SOLVER.COARSE.LR_MULT_CROSS_MODAL
    lr_mult_head: float = 5.0  # SOLVER.COARSE.LR_MULT_HEAD
    backbone_body_lr_factor: float = 1.0  # SOLVER.BACKBONE_BODY_LR_FACTOR

    NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias",
                "norm1.weight", "norm2.bias", "norm2.weight")
    HEADS = ("vqa_classifier", "nlvr2_classifier", "mlm_score", "itm_score", "snli_classifier")
    CROSS_MODAL = ("cross_modal", "i2t", "t2i")

    def lr_and_weight_decay(self, official_name: str) -> Tuple[float, float]:
        """(lr, weight_decay) of one parameter from its official coarse name."""
        head = any(h in official_name for h in self.HEADS)
        cross = any(c in official_name for c in self.CROSS_MODAL)
        if head and cross:
            raise ValueError(f"parameter {official_name!r} is both a head and cross-modal: the official groups "
                             "would leave it out")
        lr = self.base_lr * (self.lr_mult_head if head else self.lr_mult_cross_modal if cross else 1.0)
        if official_name.startswith("vit_model."):
            lr *= self.backbone_body_lr_factor
        wd = 0.0 if any(n in official_name for n in self.NO_DECAY) else self.weight_decay
        return lr, wd


def official_lr_and_weight_decay(official_name: str, **rules: float) -> Tuple[float, float]:
    """(lr, weight_decay) of one parameter by the official rules, applied in order to its
    official name: language tower LANG_LR, Swin body x BACKBONE_BODY_LR_FACTOR, "bias" x BIAS_LR_FACTOR
    with WEIGHT_DECAY_BIAS, "norm" x WEIGHT_DECAY_NORM_FACTOR.

    Args:
        official_name: the parameter's official name.
        **rules: the fields of :class:`OfficialLrRules` (``base_lr``, ``lang_lr`` and
            ``weight_decay`` required).

    >>> official_lr_and_weight_decay("rpn.head.bias_lang", base_lr=1e-4, lang_lr=1e-5, weight_decay=0.01)
    (0.0002, 0.0)
    """
    return OfficialLrRules(**rules).lr_and_weight_decay(official_name)


def build_param_groups(
    model: nn.Module,
    *,
    to_official: Callable[[str], str] = official_param_name,
    **rules: float,
) -> List[dict]:
    """AdamW parameter groups of ``model``: official per-parameter (lr, wd), merged by value.

    Args:
        model: a fiber-det model (possibly DDP-wrapped). Parameters with ``requires_grad``
            False are left out.
        to_official: maps one of our parameter names to the official name the rules read.
        **rules: the fields of :class:`OfficialLrRules` (``base_lr``, ``lang_lr`` and
            ``weight_decay`` required; the others default to the official values).

    Returns:
        One dict per distinct (lr, weight_decay), in order of first appearance:
        {"params": [tensors in ``named_parameters`` order], "lr", "weight_decay",
        "name": "lr=<lr>,wd=<wd>"} (floats written with ``repr``, e.g. "lr=1e-05,wd=0.0001").
    """
    official_rules = OfficialLrRules(**rules)  # TypeError here names a misspelled / missing rule
    return _merged_groups(model, lambda name: official_rules.lr_and_weight_decay(to_official(name)))


def build_coarse_param_groups(model: nn.Module, **rules: float) -> List[dict]:
    """AdamW parameter groups of a coarse model (:class:`CoarseLrRules` on the official names),
    merged by value as :func:`build_param_groups` (same return format).

    Args:
        model: a :class:`~fiber_det.modeling.coarse.FiberCoarsePretrain` (possibly DDP-wrapped);
            parameters with ``requires_grad`` False are left out.
        **rules: the fields of :class:`CoarseLrRules` (``base_lr`` and ``weight_decay`` required).
    """
    coarse_rules = CoarseLrRules(**rules)
    return _merged_groups(model, lambda name: coarse_rules.lr_and_weight_decay(official_coarse_param_name(name)))


def _merged_groups(model: nn.Module, lr_and_weight_decay: Callable[[str], Tuple[float, float]]) -> List[dict]:
    """Groups of the trainable parameters of ``model`` by (lr, wd) = ``lr_and_weight_decay(name)``."""
    groups: Dict[Tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, wd = lr_and_weight_decay(name)
        if not (math.isfinite(lr) and math.isfinite(wd)):
            raise ValueError(f"parameter {name!r}: non-finite lr {lr} / weight decay {wd} from the SOLVER keys")
        group = groups.get((lr, wd))
        if group is None:
            group = groups[(lr, wd)] = {"params": [], "lr": lr, "weight_decay": wd, "name": f"lr={lr!r},wd={wd!r}"}
        group["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameter (all have requires_grad False)")
    return list(groups.values())


def build_param_groups_from_cfg(cfg, model: nn.Module) -> List[dict]:
    """The groups of the model's rule set with the SOLVER keys of ``cfg``:
    :func:`build_coarse_param_groups` for MODEL.META_ARCHITECTURE ``FiberCoarsePretrain``,
    :func:`build_param_groups` otherwise."""
    s = cfg.SOLVER
    if cfg.MODEL.META_ARCHITECTURE == "FiberCoarsePretrain":
        return build_coarse_param_groups(model, base_lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY,
                                         lr_mult_cross_modal=s.COARSE.LR_MULT_CROSS_MODAL,
                                         lr_mult_head=s.COARSE.LR_MULT_HEAD,
                                         backbone_body_lr_factor=s.BACKBONE_BODY_LR_FACTOR)
    return build_param_groups(
        model,
        base_lr=s.BASE_LR,
        lang_lr=s.LANG_LR,
        weight_decay=s.WEIGHT_DECAY,
        bias_lr_factor=s.BIAS_LR_FACTOR,
        weight_decay_bias=s.WEIGHT_DECAY_BIAS,
        norm_wd_factor=s.WEIGHT_DECAY_NORM_FACTOR,
        backbone_body_lr_factor=s.BACKBONE_BODY_LR_FACTOR,
    )


def describe_param_groups(groups: List[dict]) -> Dict[str, dict]:
    """Per group name: {"lr", "weight_decay", "tensors": number of tensors, "scalars": number of
    elements}; for logging and for checking the groups against the official parameter list."""
    out = {}
    for i, g in enumerate(groups):
        name = g.get("name", f"group{i}")
        if name in out:
            raise ValueError(f"two parameter groups are named {name!r}")
        out[name] = {
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "tensors": len(g["params"]),
            "scalars": sum(p.numel() for p in g["params"]),
        }
    return out
