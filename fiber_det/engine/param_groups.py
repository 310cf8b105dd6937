"""Optimizer parameter groups with the official FIBER learning-rate / weight-decay rules.

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

from ..checkpoint.rename_table import PREFIX_RENAMES

__all__ = [
    "official_param_name",
    "OfficialLrRules",
    "official_lr_and_weight_decay",
    "build_param_groups",
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
    groups: Dict[Tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, wd = official_rules.lr_and_weight_decay(to_official(name))
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
    """:func:`build_param_groups` with the SOLVER keys of ``cfg``."""
    s = cfg.SOLVER
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
