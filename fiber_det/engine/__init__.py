"""Training pieces Detectron2 lacks: official parameter groups, full-model gradient clipping,
the FIBER LR / weight-decay schedules, model EMA, the gloo/NCCL launcher and exact resume."""
from .ema import EMAHook, ModelEMA, swap_to_ema, unwrap_model
from .optimizer import AdamWFullModelClip, build_optimizer
from .param_groups import (
    build_param_groups,
    build_param_groups_from_cfg,
    describe_param_groups,
    official_lr_and_weight_decay,
    official_param_name,
)
from .schedule import (
    WeightDecayScheduleHook,
    build_lr_scheduler,
    build_weight_decay_schedule_hook,
    resolve_max_iter,
    resolve_milestones,
)

__all__ = [
    "EMAHook", "ModelEMA", "swap_to_ema", "unwrap_model",
    "AdamWFullModelClip", "build_optimizer",
    "build_param_groups", "build_param_groups_from_cfg", "describe_param_groups", "official_lr_and_weight_decay",
    "official_param_name",
    "WeightDecayScheduleHook", "build_lr_scheduler", "build_weight_decay_schedule_hook", "resolve_max_iter",
    "resolve_milestones",
]
