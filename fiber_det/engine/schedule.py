"""FIBER's training length, LR schedule and weight-decay schedule (the official solver's rules).

- Length: SOLVER.MAX_EPOCH > 0 gives MAX_ITER = MAX_EPOCH · N // IMS_PER_BATCH (N = training
  images kept by the loader); otherwise SOLVER.MAX_ITER.
- LR: lr(it) = lr_group · w(it) · GAMMA^(number of milestones ≤ it), with the linear warmup
  w(it) = f·(1 − it/W) + it/W for it < W (f = WARMUP_FACTOR, W = WARMUP_ITERS), else 1.
  Milestones = round(fraction · MAX_ITER) for SOLVER.STEP_FRACTIONS, else SOLVER.STEPS.
  Built from Detectron2's LRMultiplier + WarmupParamScheduler + MultiStepParamScheduler, which
  give exactly this for MAX_ITER < 10^6 (fvcore's WHERE_EPSILON = 1e-6 shifts a boundary by one
  iteration beyond that; :func:`build_lr_scheduler` warns). The official warmup also multiplies
  by GAMMA^k when a milestone falls inside the warmup; Detectron2's does not -- no FIBER config
  does that.
- LR, coarse stage (SOLVER.LR_SCHEDULER_NAME "WarmupLinearDecayLR"): lr(it) = lr_group · f(it)
  with f(it) = it/W for it < W, then (T − it)/(T − W) (T = MAX_ITER), i.e. transformers'
  ``get_polynomial_decay_schedule_with_warmup`` with power 1 and end 0: the first step runs at 0.
  W = WARMUP_ITERS, or int(T · WARMUP_FRACTION) when that is > 0 (official 10 %).
- Weight decay (SOLVER.WEIGHT_DECAY_SCHEDULE, official pre-training): every group's weight decay
  is multiplied by GAMMA once per milestone m, from the first iteration ≥ m · RATIO on.
"""
import bisect
import logging
import math
from typing import List, Optional, Sequence

import torch
from fvcore.common.param_scheduler import MultiStepParamScheduler, ParamScheduler

from detectron2.engine import HookBase
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler

__all__ = [
    "resolve_max_iter",
    "resolve_warmup_iters",
    "WarmupLinearDecay",
    "LR_SCHEDULERS",
    "resolve_milestones",
    "build_lr_scheduler",
    "WeightDecayScheduleHook",
    "build_weight_decay_schedule_hook",
]

logger = logging.getLogger(__name__)

LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupLinearDecayLR")


def resolve_max_iter(cfg, num_train_images: int) -> int:
    """Training iterations: SOLVER.MAX_EPOCH · num_train_images // SOLVER.IMS_PER_BATCH when
    MAX_EPOCH > 0 (official, computed from the loader's image count), else SOLVER.MAX_ITER.

    Example (the official COCO fine-tuning): 24 epochs of N = 117,266 images at batch 32 -> 87,949.
    """
    s = cfg.SOLVER
    if s.MAX_EPOCH > 0:
        if num_train_images <= 0:
            raise ValueError(f"SOLVER.MAX_EPOCH = {s.MAX_EPOCH} but the training set has {num_train_images} images")
        if s.IMS_PER_BATCH <= 0:
            raise ValueError(f"SOLVER.IMS_PER_BATCH must be positive, got {s.IMS_PER_BATCH}")
        max_iter = s.MAX_EPOCH * num_train_images // s.IMS_PER_BATCH
        source = f"SOLVER.MAX_EPOCH {s.MAX_EPOCH} x {num_train_images} images // IMS_PER_BATCH {s.IMS_PER_BATCH}"
    else:
        max_iter, source = s.MAX_ITER, "SOLVER.MAX_ITER"
    if max_iter <= 0:
        raise ValueError(f"{source} gives {max_iter} training iterations; need at least 1")
    return int(max_iter)


def resolve_warmup_iters(cfg, max_iter: int) -> int:
    """Warmup iterations: int(max_iter · SOLVER.WARMUP_FRACTION) when that fraction is > 0 (the
    official coarse ``warmup_steps`` 0.1, truncated as ``int()`` does), else SOLVER.WARMUP_ITERS.

    Example: 10 % of 100,000 steps -> 10,000.
    """
    s = cfg.SOLVER
    if s.WARMUP_FRACTION > 0:
        if s.WARMUP_FRACTION >= 1:
            raise ValueError(f"SOLVER.WARMUP_FRACTION must lie in [0, 1), got {s.WARMUP_FRACTION}")
        return int(max_iter * s.WARMUP_FRACTION)
    return int(s.WARMUP_ITERS)


class WarmupLinearDecay(ParamScheduler):
    """The coarse-stage LR factor at iteration t: t / W for t < W, then (T - t) / (T - W), and 0
    from T on (transformers' polynomial schedule with power 1 and end 0; factor 0 at t = 0).

    Args:
        warmup_iters: W (0: no warmup, the decay starts at 1).
        max_iter: T, the number of optimizer steps.

    Called by Detectron2's ``LRMultiplier`` with where = t / T; t is recovered exactly by rounding.
    """

    def __init__(self, warmup_iters: int, max_iter: int):
        if not 0 <= warmup_iters < max_iter:
            raise ValueError(f"warmup of {warmup_iters} iterations must be shorter than the {max_iter} of training")
        self.warmup_iters, self.max_iter = int(warmup_iters), int(max_iter)

    def factor(self, t: int) -> float:
        if t < self.warmup_iters:
            return float(t) / float(max(1, self.warmup_iters))
        if t >= self.max_iter:
            return 0.0
        return 1.0 - (t - self.warmup_iters) / (self.max_iter - self.warmup_iters)

    def __call__(self, where: float) -> float:
        return self.factor(int(round(where * self.max_iter)))


def resolve_milestones(cfg, max_iter: int) -> List[int]:
    """LR milestones: round(f · max_iter) for f in SOLVER.STEP_FRACTIONS (when non-empty, each in
    (0, 1)), else SOLVER.STEPS; strictly increasing. Milestones ≥ max_iter are kept (they still
    drive the weight-decay schedule).

    Example: fractions (0.67, 0.89) of 800,000 -> [536000, 712000].
    """
    s = cfg.SOLVER
    if len(s.STEP_FRACTIONS) > 0:
        bad = [f for f in s.STEP_FRACTIONS if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"SOLVER.STEP_FRACTIONS must lie in (0, 1); got {list(s.STEP_FRACTIONS)}")
        # Python's round, as upstream (ties to even)
        milestones, key = [int(round(f * max_iter)) for f in s.STEP_FRACTIONS], "SOLVER.STEP_FRACTIONS"
    else:
        milestones, key = [int(m) for m in s.STEPS], "SOLVER.STEPS"
    if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m <= 0 for m in milestones):
        raise ValueError(f"{key} gives milestones {milestones} (max_iter {max_iter}); they must be positive "
                         "and strictly increasing")
    return milestones


def build_lr_scheduler(
    cfg, optimizer: torch.optim.Optimizer, max_iter: int, milestones: Optional[Sequence[int]] = None
):
    """The official LR schedule of SOLVER.LR_SCHEDULER_NAME as a Detectron2 ``LRMultiplier``:
    warmup + multi-step (fine-grained) or :class:`WarmupLinearDecay` (coarse).

    Args:
        cfg: reads SOLVER.LR_SCHEDULER_NAME; multi-step: SOLVER.GAMMA, WARMUP_ITERS,
            WARMUP_FACTOR, WARMUP_METHOD ("linear" | "constant") and the milestone keys
            (:func:`resolve_milestones`); linear decay: :func:`resolve_warmup_iters`.
        optimizer: its groups' current ``lr`` are the per-group base values.
        max_iter: the training length (:func:`resolve_max_iter`).
        milestones: overrides the milestones resolved from ``cfg``.

    Returns:
        ``LRMultiplier``: step it once per iteration (Detectron2's ``LRScheduler`` hook does).
    """
    s = cfg.SOLVER
    if s.LR_SCHEDULER_NAME not in LR_SCHEDULERS:
        raise ValueError(f"SOLVER.LR_SCHEDULER_NAME must be one of {LR_SCHEDULERS}, got {s.LR_SCHEDULER_NAME!r}")
    if s.LR_SCHEDULER_NAME == "WarmupLinearDecayLR":
        return LRMultiplier(optimizer, multiplier=WarmupLinearDecay(resolve_warmup_iters(cfg, max_iter), max_iter),
                            max_iter=max_iter)
    milestones = resolve_milestones(cfg, max_iter) if milestones is None else [int(m) for m in milestones]
    # fvcore needs milestones < max_iter; the others never act within training
    active = [m for m in milestones if m < max_iter]
    if len(active) < len(milestones):
        logger.info("LR milestones %s are >= max_iter %d and never reached", milestones[len(active):], max_iter)
    if max_iter * ParamScheduler.WHERE_EPSILON >= 1:
        logger.warning("max_iter %d >= 1e6: fvcore's rounding may move LR boundaries one iteration early", max_iter)
    warmup = resolve_warmup_iters(cfg, max_iter)
    if warmup < 0 or not 0 < s.WARMUP_FACTOR <= 1:
        raise ValueError(f"SOLVER.WARMUP_ITERS ({warmup}) must be >= 0 and WARMUP_FACTOR "
                         f"({s.WARMUP_FACTOR}) in (0, 1]")
    steps = MultiStepParamScheduler(
        values=[s.GAMMA**k for k in range(len(active) + 1)], milestones=active, num_updates=max_iter
    )
    multiplier = WarmupParamScheduler(
        steps, s.WARMUP_FACTOR, min(warmup / max_iter, 1.0), s.WARMUP_METHOD
    )
    return LRMultiplier(optimizer, multiplier=multiplier, max_iter=max_iter)


class WeightDecayScheduleHook(HookBase):
    """Multiplies every group's weight decay by ``gamma`` once per milestone m, for all
    iterations ≥ m · ``ratio`` (official: checked against the scheduler's step count after each
    step, so the step with 0-based index ceil(m · ratio) is the first with the lower decay).

    Resume-safe: the decay is recomputed from the iteration (never counted from events), from
    each group's ``initial_weight_decay`` (stored in the group on first use, hence saved with the
    optimizer state).

    Args:
        milestones: the LR milestones (all of them, also those ≥ max_iter).
        ratio: SOLVER.WEIGHT_DECAY_SCHEDULE_RATIO (official 0.667).
        gamma: SOLVER.GAMMA.
        optimizer: the optimizer to act on; default ``trainer.optimizer``.
    """

    def __init__(self, milestones: Sequence[int], ratio: float, gamma: float, optimizer=None):
        if not ratio > 0:
            raise ValueError(f"SOLVER.WEIGHT_DECAY_SCHEDULE_RATIO must be positive, got {ratio}")
        self.gamma = gamma
        self._optimizer = optimizer
        # upstream compares its step count L = 1, 2, ... with the float m * ratio after each step
        # and moves to the next milestone only after a decay: at most one decay per step
        self._decay_iters: List[int] = []
        for threshold in sorted(m * ratio for m in milestones):
            first = max(math.ceil(threshold), 1)
            if self._decay_iters:
                first = max(first, self._decay_iters[-1] + 1)
            self._decay_iters.append(first)

    @property
    def decay_iterations(self) -> List[int]:
        """The first (0-based) iteration run with each successive decay.

        >>> WeightDecayScheduleHook([536000, 712000], 0.667, 0.1).decay_iterations
        [357512, 474904]
        """
        return list(self._decay_iters)

    def num_decays(self, iteration: int) -> int:
        """How many times the weight decay has been multiplied by gamma when ``iteration`` runs."""
        return bisect.bisect_right(self._decay_iters, iteration)

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        """Set each group's weight decay to its value for ``iteration``."""
        k = self.num_decays(iteration)
        for group in optimizer.param_groups:
            wd = group.setdefault("initial_weight_decay", group["weight_decay"])
            for _ in range(k):  # repeated products, bit-identical to upstream's in-place *=
                wd *= self.gamma
            group["weight_decay"] = wd

    def _get_optimizer(self):
        return self._optimizer if self._optimizer is not None else self.trainer.optimizer

    def before_train(self):
        # trainer.iter is the first iteration to run (start_iter on resume)
        self.apply(self._get_optimizer(), self.trainer.iter)

    def after_step(self):
        self.apply(self._get_optimizer(), self.trainer.iter + 1)


def build_weight_decay_schedule_hook(cfg, milestones: Sequence[int]) -> Optional[WeightDecayScheduleHook]:
    """The hook for SOLVER.WEIGHT_DECAY_SCHEDULE (RATIO, GAMMA), or None when it is off."""
    s = cfg.SOLVER
    if not s.WEIGHT_DECAY_SCHEDULE:
        return None
    return WeightDecayScheduleHook(milestones, s.WEIGHT_DECAY_SCHEDULE_RATIO, s.GAMMA)
