"""AdamW over the official parameter groups, with FIBER's full-model gradient clipping (official solver).

SOLVER.ADAMW.UPDATE selects the update rule:
- "torch" (the fine-grained stage, official): ``torch.optim.AdamW``.
- "transformers" (the coarse stage, official): :class:`AdamWTransformers`, the update of
  ``transformers.optimization.AdamW`` (``correct_bias`` True), which differs from torch's in two
  places: eps is added to sqrt(v) before the bias correction (torch: after it), and the decoupled
  weight decay p <- p - lr·wd·p acts on the weights after the Adam step (torch: before it).
SOLVER.ADAMW.BETAS / EPS are the moments' decay rates and eps (official 0.9/0.999 fine-grained,
0.9/0.98 coarse; eps 1e-8 both).

SOLVER.CLIP_GRADIENTS.CLIP_TYPE selects the clipping:
- "full_model" (official pre-training): the global norm of ALL gradients in the optimizer is
  clipped to CLIP_VALUE inside ``step()``. Detectron2 core has no such mode.
- "value" / "norm": Detectron2's per-parameter clipping (``maybe_add_gradient_clipping``).

Clipping lives inside ``step()`` as in the official code, so with AMP ``GradScaler.step`` has
already unscaled the gradients (and skipped the step on inf/NaN) when the clip runs: the clip
acts on true gradients. A fused AdamW (SOLVER.FUSED_OPTIMIZER, "torch" update only) would instead
take the scale into ``step()`` and be clipped on scaled gradients; with clipping on, it is therefore
marked as an optimizer that the scaler unscales first (:func:`_unscaled_by_grad_scaler`).
"""
import logging
import math
from typing import Callable, Iterable, Optional

import torch

from detectron2.solver.build import maybe_add_gradient_clipping

from .param_groups import build_param_groups_from_cfg

__all__ = ["AdamWTransformers", "FullModelClipMixin", "AdamWFullModelClip", "build_optimizer", "ADAMW_UPDATES"]

logger = logging.getLogger(__name__)


ADAMW_UPDATES = ("torch", "transformers")


class AdamWTransformers(torch.optim.Optimizer):
    """AdamW with the update of ``transformers.optimization.AdamW`` (the official coarse optimiser).

    Per parameter with a gradient g, at its step t (counted per parameter, from 1):
        m <- b1·m + (1 - b1)·g;  v <- b2·v + (1 - b2)·g²
        p <- p - lr·sqrt(1 - b2^t)/(1 - b1^t) · m / (sqrt(v) + eps)
        p <- p - lr·wd·p                        (after the Adam step, on the updated p)
    torch.optim.AdamW instead decays first and divides by sqrt(v)/sqrt(1 - b2^t) + eps. The
    state (``step`` int, ``exp_avg``, ``exp_avg_sq``) has torch's key names. The ops are the
    official ones, applied per group with the multi-tensor (``torch._foreach_*``) kernels.

    Args:
        params: parameters or groups (each group may set lr, betas, eps, weight_decay).
        lr, betas, eps, weight_decay: defaults of the groups (transformers' defaults would be
            eps 1e-6, wd 0; the coarse configs set eps 1e-8, wd 0.01).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamWTransformers: invalid lr {lr}, betas {betas}, eps {eps} or weight decay "
                             f"{weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list) -> None:
        (beta1, beta2), lr = group["betas"], group["lr"]
        grads, avgs, sqs, step_sizes = [], [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("AdamWTransformers does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"]
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            step_sizes.append(-lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t))
        torch._foreach_mul_(avgs, beta1)
        torch._foreach_add_(avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, avgs, denom, step_sizes)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-lr * group["weight_decay"])


class FullModelClipMixin:
    """Put before an optimizer class: its ``step()`` first clips the global gradient norm.

    Args:
        params: parameters or parameter groups (as for the optimizer).
        max_norm: the global norm bound (SOLVER.CLIP_GRADIENTS.CLIP_VALUE; official 1.0).
        norm_type: the norm (SOLVER.CLIP_GRADIENTS.NORM_TYPE; official 2.0).
        **kwargs: the optimizer's arguments (lr, betas, eps, weight_decay, foreach, fused, ...).

    ``state_dict()`` / ``load_state_dict()`` are the optimizer's (the bound is not state).
    """

    def __init__(self, params: Iterable, *, max_norm: float, norm_type: float = 2.0, **kwargs):
        if not max_norm > 0:
            raise ValueError(
                f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE = {max_norm}: full-model clipping needs a positive "
                "norm bound (set SOLVER.CLIP_GRADIENTS.ENABLED False to disable clipping)"
            )
        super().__init__(params, **kwargs)
        _unscaled_by_grad_scaler(self)
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


def _unscaled_by_grad_scaler(optimizer: torch.optim.Optimizer) -> None:
    """Makes ``GradScaler.step`` unscale the gradients (and skip inf/NaN steps) before calling
    ``optimizer.step()``, also for a fused AdamW, which otherwise takes the scale into its kernel:
    a clip inside ``step()`` must see true gradients."""
    optimizer._step_supports_amp_scaling = False


class AdamWFullModelClip(FullModelClipMixin, torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``step()`` first clips the global gradient norm (official
    fine-grained pre-training)."""


class AdamWTransformersFullModelClip(FullModelClipMixin, AdamWTransformers):
    """:class:`AdamWTransformers` whose ``step()`` first clips the global gradient norm."""


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (SOLVER.ADAMW: update rule, betas, eps; decoupled decay) over
    :func:`~fiber_det.engine.param_groups.build_param_groups_from_cfg` groups, with the
    gradient clipping selected by SOLVER.CLIP_GRADIENTS.

    Returns:
        ``torch.optim.AdamW`` or :class:`AdamWTransformers` (a subclass when full-model clipping is on).
    """
    groups = build_param_groups_from_cfg(cfg, model)
    a = cfg.SOLVER.ADAMW
    if a.UPDATE not in ADAMW_UPDATES:
        raise ValueError(f"SOLVER.ADAMW.UPDATE must be one of {ADAMW_UPDATES}, got {a.UPDATE!r}")
    kwargs = {"lr": cfg.SOLVER.BASE_LR, "betas": tuple(a.BETAS), "eps": a.EPS}
    if a.UPDATE == "torch":
        # foreach: one multi-tensor kernel per op instead of one per parameter; same arithmetic.
        # fused: one kernel per tensor for the whole update; the same update up to float rounding
        kwargs["fused" if cfg.SOLVER.FUSED_OPTIMIZER else "foreach"] = True
    elif cfg.SOLVER.FUSED_OPTIMIZER:
        raise ValueError('SOLVER.FUSED_OPTIMIZER needs SOLVER.ADAMW.UPDATE "torch": the "transformers" '
                         "update has no fused kernel")
    base = torch.optim.AdamW if a.UPDATE == "torch" else AdamWTransformers
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        cls = AdamWFullModelClip if a.UPDATE == "torch" else AdamWTransformersFullModelClip
        optimizer = cls(groups, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE, **kwargs)
    else:
        # disabled -> the optimizer itself; "value" / "norm" -> Detectron2's per-parameter clipping
        # (which raises on an unknown CLIP_TYPE, naming it)
        optimizer = maybe_add_gradient_clipping(cfg, base)(groups, **kwargs)
        if clip.ENABLED:
            _unscaled_by_grad_scaler(optimizer)
    logger.info(
        "optimizer %s: %d parameter groups, %d tensors", type(optimizer).__name__, len(optimizer.param_groups),
        sum(len(g["params"]) for g in optimizer.param_groups),
    )
    return optimizer
