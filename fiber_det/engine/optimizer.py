"""AdamW over the official parameter groups, with FIBER's full-model gradient clipping (official solver).

SOLVER.CLIP_GRADIENTS.CLIP_TYPE selects the clipping:
- "full_model" (official pre-training): the global norm of ALL gradients in the optimizer is
  clipped to CLIP_VALUE inside ``step()``. Detectron2 core has no such mode.
- "value" / "norm": Detectron2's per-parameter clipping (``maybe_add_gradient_clipping``).

Clipping lives inside ``step()`` as in the official code, so with AMP ``GradScaler.step`` has
already unscaled the gradients (and skipped the step on inf/NaN) when the clip runs: the clip
acts on true gradients. That ordering only holds for optimizers that let the scaler unscale,
i.e. not ``fused=True`` (those take the scale into ``step()``), which is therefore refused.
"""
import logging
from typing import Callable, Iterable, Optional

import torch

from detectron2.solver.build import maybe_add_gradient_clipping

from .param_groups import build_param_groups_from_cfg

__all__ = ["AdamWFullModelClip", "build_optimizer"]

logger = logging.getLogger(__name__)


class AdamWFullModelClip(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``step()`` first clips the global gradient norm.

    Args:
        params: parameters or parameter groups (as for AdamW).
        max_norm: the global norm bound (SOLVER.CLIP_GRADIENTS.CLIP_VALUE; official 1.0).
        norm_type: the norm (SOLVER.CLIP_GRADIENTS.NORM_TYPE; official 2.0).
        **kwargs: AdamW's arguments (lr, betas, eps, weight_decay, foreach, ...).

    ``state_dict()`` / ``load_state_dict()`` are AdamW's (the bound is not state).
    """

    def __init__(self, params: Iterable, *, max_norm: float, norm_type: float = 2.0, **kwargs):
        if not max_norm > 0:
            raise ValueError(
                f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE = {max_norm}: full-model clipping needs a positive "
                "norm bound (set SOLVER.CLIP_GRADIENTS.ENABLED False to disable clipping)"
            )
        if kwargs.get("fused"):
            raise ValueError(
                "fused AdamW receives still-scaled gradients from GradScaler; clipping inside step() "
                "needs unscaled ones: use foreach instead"
            )
        super().__init__(params, **kwargs)
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def step(self, closure: Optional[Callable] = None):
        """Clip all gradients of the optimizer to ``max_norm`` (one global norm), then step."""
        loss = None
        if closure is not None:
            # the closure recomputes the gradients, so it must run before they are clipped
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)
        super().step()
        return loss


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8, decoupled decay: the official defaults) over
    :func:`~fiber_det.engine.param_groups.build_param_groups_from_cfg` groups, with the
    gradient clipping selected by SOLVER.CLIP_GRADIENTS.

    Returns:
        A ``torch.optim.AdamW`` instance (a subclass when clipping is on).
    """
    groups = build_param_groups_from_cfg(cfg, model)
    # foreach: one multi-tensor kernel per op instead of one per parameter; same arithmetic
    kwargs = {"lr": cfg.SOLVER.BASE_LR, "foreach": True}
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer = AdamWFullModelClip(groups, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE, **kwargs)
    else:
        # disabled -> AdamW itself; "value" / "norm" -> Detectron2's per-parameter clipping
        # (which raises on an unknown CLIP_TYPE, naming it)
        optimizer = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(groups, **kwargs)
    logger.info(
        "optimizer %s: %d parameter groups, %d tensors", type(optimizer).__name__, len(optimizer.param_groups),
        sum(len(g["params"]) for g in optimizer.param_groups),
    )
    return optimizer
