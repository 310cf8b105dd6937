"""FIBER's trainer on Detectron2's engine: official optimiser/schedules, AMP, EMA, guards, exact resume.

:class:`FiberTrainer` is a :class:`~detectron2.engine.DefaultTrainer` whose pieces come from
fiber_det (parameter groups and full-model clipping, fractional milestones and epochs, the
weight-decay schedule, EMA, the resumable grounding data loader, the evaluators, the strict and
atomic checkpointer) and whose step (:class:`FiberTrainStep`) adds what Detectron2's
SimpleTrainer/AMPTrainer lack: autocast on any device in fp16 or bf16, skipping of batches
without boxes, and a guard against non-finite losses and gradients. Checkpoints also hold every
process's data-loader position and RNG states, so ``--resume`` continues bit-identically.
"""
import logging
import os
import time
import weakref
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import FiberCheckpointer
from ..checkpoint.pretrained import load_pretrained_towers
from ..data.build import build_test_loader, build_train_loader, get_train_dataset_dicts
from ..data.caption_mapper import ImageCaptionMapper
from ..data.datasets.caption_pairs import retrieval_items
from ..evaluation import build_evaluator
from ..evaluation.retrieval import ItmScorer
from ..modeling.coarse.queue import QueueCheckpoint
from .ema import EMAHook, ModelEMA, swap_to_ema
from .resume import gather_process_states, preserved_rng_states, restore_process_states
from .optimizer import build_optimizer
from .schedule import (build_lr_scheduler, build_weight_decay_schedule_hook, resolve_max_iter, resolve_milestones,
                       resolve_warmup_iters)

__all__ = ["FiberTrainStep", "FiberTrainer", "NonFiniteTrainingError", "resolve_schedule", "amp_dtype_from_cfg"]

logger = logging.getLogger(__name__)


def amp_dtype_from_cfg(cfg) -> Optional[torch.dtype]:
    """None without SOLVER.AMP.ENABLED, else the autocast dtype of SOLVER.AMP.DTYPE."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if cfg.SOLVER.AMP.DTYPE not in dtypes:
        raise ValueError(f"SOLVER.AMP.DTYPE must be one of {sorted(dtypes)}, got {cfg.SOLVER.AMP.DTYPE!r}")
    return dtypes[cfg.SOLVER.AMP.DTYPE]


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped after SOLVER.NONFINITE_PATIENCE consecutive non-finite losses or gradients."""


def _any_rank(flag: bool, device) -> bool:
    """True if ``flag`` holds on at least one process (so that every process takes the same branch
    under DDP); a collective call."""
    if comm.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _mean_loss_dict(loss_dicts):
    """Per key, the mean over the micro-batches of one step (detached; the one dict when alone)."""
    if len(loss_dicts) == 1:
        return loss_dicts[0]
    return {k: torch.stack([d[k].detach().float() for d in loss_dicts]).mean() for k in loss_dicts[0]}


class FiberTrainStep(SimpleTrainer):
    """One training iteration: skip mostly-empty batches, autocast, guard non-finite values.

    Args:
        model, data_loader, optimizer: as SimpleTrainer (clipping lives in the optimizer's step,
            so under fp16 it acts on unscaled gradients: GradScaler.step unscales first).
        amp_dtype: None (fp32), torch.float16 (with a GradScaler) or torch.bfloat16 (no scaler).
        max_neg_per_batch: skip the batch when all its images, or more than this fraction, have no
            box (as the official trainer's SOLVER.MAX_NEG_PER_BATCH does). All processes skip
            together (the official per-process skip would stall DDP). Under accumulation a skipped
            micro-batch adds no gradient; a step whose micro-batches were all skipped is no step.
        nonfinite_patience: a non-finite loss, or a non-finite gradient without a GradScaler (which
            handles those itself), skips the update (weights untouched, logged with the loss
            terms); this many in a row stop training with :class:`NonFiniteTrainingError`.
        accumulate_steps: micro-batches per optimizer step (SOLVER.ACCUMULATE_STEPS).
    """

    def __init__(self, model, data_loader, optimizer, *, amp_dtype=None, max_neg_per_batch=0.1,
                 nonfinite_patience=5, accumulate_steps=1):
        super().__init__(model, data_loader, optimizer)
        if accumulate_steps < 1:
            raise ValueError(f"SOLVER.ACCUMULATE_STEPS must be >= 1, got {accumulate_steps}")
        self.amp_dtype = amp_dtype
        self.device_type = next(model.parameters()).device.type
        self.scaler = torch.amp.GradScaler(self.device_type) if amp_dtype == torch.float16 else None
        self.max_neg_per_batch = max_neg_per_batch
        self.nonfinite_patience = nonfinite_patience
        self.nonfinite_streak = 0
        self.accumulate_steps = int(accumulate_steps)

    def _should_skip(self, data) -> bool:
        empty = sum(1 for x in data if "instances" in x and len(x["instances"]) == 0)
        skip = empty == len(data) or empty > self.max_neg_per_batch * len(data)
        skip = _any_rank(skip, next(self.model.parameters()).device)
        if skip:
            logger.warning(f"iteration {self.iter}: skipped a batch with {empty}/{len(data)} images without boxes")
            get_event_storage().put_scalar("skipped_batches", 1.0, smoothing_hint=False)
        return skip

    def run_step(self):
        """One optimizer step over ``accumulate_steps`` micro-batches (each loss divided by their
        number; DDP synchronises the gradients on the last one only)."""
        assert self.model.training, "[FiberTrainStep] model was changed to eval mode!"
        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        data_time, loss_dicts = 0.0, []
        for micro in range(self.accumulate_steps):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            if self._should_skip(data):
                continue
            last = micro == self.accumulate_steps - 1
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with amp:
                    loss_dict = self.model(data)
                losses = sum(loss_dict.values())
                if _any_rank(not bool(torch.isfinite(losses).item()), losses.device):
                    self._nonfinite("loss", loss_dict)
                    return
                losses = losses / self.accumulate_steps if self.accumulate_steps > 1 else losses
                (self.scaler.scale(losses) if self.scaler is not None else losses).backward()
            loss_dicts.append(loss_dict)
        if not loss_dicts:
            return
        if self.scaler is None and _any_rank(not self._gradients_finite(), next(self.model.parameters()).device):
            self._nonfinite("gradient", loss_dicts[-1])
            return
        self.nonfinite_streak = 0
        self._write_metrics(_mean_loss_dict(loss_dicts), data_time)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _gradients_finite(self) -> bool:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).item())

    def _nonfinite(self, what: str, loss_dict) -> None:
        """Skips this update (logged, counted); raises NonFiniteTrainingError after ``nonfinite_patience``."""
        self.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in loss_dict.items())
        logger.warning(f"iteration {self.iter}: non-finite {what} (loss terms: {terms}); update skipped "
                       f"({self.nonfinite_streak}/{self.nonfinite_patience} in a row)")
        get_event_storage().put_scalar("nonfinite_steps", 1.0, smoothing_hint=False)
        if self.nonfinite_streak >= self.nonfinite_patience:
            raise NonFiniteTrainingError(
                f"training stopped at iteration {self.iter} after {self.nonfinite_streak} consecutive non-finite "
                f"steps; the last had a non-finite {what}, loss terms: {terms}. The weights were not updated by "
                "them and no checkpoint was written during them; lower SOLVER.BASE_LR or enable "
                "SOLVER.CLIP_GRADIENTS, then --resume from the last checkpoint")

    def state_dict(self):
        ret = super().state_dict()
        ret["nonfinite_streak"] = self.nonfinite_streak
        if self.scaler is not None:
            ret["grad_scaler"] = self.scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.nonfinite_streak = state_dict.get("nonfinite_streak", 0)
        if self.scaler is not None and "grad_scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["grad_scaler"])


class FiniteStepCheckpointer(hooks.PeriodicCheckpointer):
    """Detectron2's periodic checkpointer that writes nothing while the last steps were non-finite
    (the weights then in memory are the ones that produced NaN/inf); a checkpoint due meanwhile is
    written at the first finite step, so a recovered run loses no checkpoint period."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._due = False

    def after_step(self):
        if self.trainer._trainer.nonfinite_streak > 0:
            if (self.trainer.iter + 1) % self.period == 0:
                self._due = True
                logger.warning(f"iteration {self.trainer.iter}: checkpoint not written (the last step was non-finite)")
            return
        if self._due and (self.trainer.iter + 1) % self.period != 0:
            self.checkpointer.save(f"{self.file_prefix}_{self.trainer.iter:07d}", iteration=self.trainer.iter)
        self._due = False
        super().after_step()


def _itm_scorer_kwargs(cfg, dataset_name: str, model) -> dict:
    """{"itm_scorer": ...} for a retrieval dataset (the model's ``score_pairs`` over its mapped
    items), {} for any other dataset."""
    if MetadataCatalog.get(dataset_name).get("evaluator_type", "") != "retrieval":
        return {}
    model = model.module if hasattr(model, "module") else model
    items = retrieval_items(DatasetCatalog.get(dataset_name))
    mapper = ImageCaptionMapper(cfg, False)
    return {"itm_scorer": ItmScorer(items, mapper, model.score_pairs, cfg.TEST.RETRIEVAL.BATCH_SIZE)}


def resolve_schedule(cfg):
    """Writes the effective SOLVER.MAX_ITER (from MAX_EPOCH), STEPS (from STEP_FRACTIONS) and
    WARMUP_ITERS (from WARMUP_FRACTION) into ``cfg`` so that every hook, the scheduler and the
    saved config see the same numbers."""
    num_images = len(get_train_dataset_dicts(cfg)) if cfg.SOLVER.MAX_EPOCH > 0 else 0
    max_iter = resolve_max_iter(cfg, num_images)
    steps = resolve_milestones(cfg, max_iter)
    warmup = resolve_warmup_iters(cfg, max_iter)
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = int(max_iter)
    cfg.SOLVER.STEPS = tuple(int(s) for s in steps)
    cfg.SOLVER.STEP_FRACTIONS = []
    cfg.SOLVER.WARMUP_ITERS = int(warmup)
    cfg.SOLVER.WARMUP_FRACTION = 0.0
    cfg.SOLVER.MAX_EPOCH = 0
    if was_frozen:
        cfg.freeze()
    return cfg


class FiberTrainer(DefaultTrainer):
    """DefaultTrainer with fiber_det's optimiser, schedules, data, evaluators, EMA and checkpointer.

    ``cfg`` should have gone through :func:`resolve_schedule` (tools/train_net.py does it).
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        self.ema = ModelEMA(model, cfg.MODEL.EMA.DECAY) if cfg.MODEL.EMA.ENABLED else None
        # DDP on CPU (gloo) takes no device_ids; Detectron2 would pass the local rank. Models some
        # of whose parameters may get no gradient in a step (the coarse model with an objective
        # off: official Lightning runs DDP with find_unused_parameters=True) say so.
        on_cpu = next(model.parameters()).device.type == "cpu"
        unused = bool(getattr(model, "find_unused_parameters", False))
        queue = getattr(model, "queue", None)
        model = create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=unused,
                                 **({"device_ids": None} if on_cpu else {}))
        self._trainer = FiberTrainStep(
            model, data_loader, optimizer, amp_dtype=amp_dtype_from_cfg(cfg),
            max_neg_per_batch=cfg.SOLVER.MAX_NEG_PER_BATCH, nonfinite_patience=cfg.SOLVER.NONFINITE_PATIENCE,
            accumulate_steps=cfg.SOLVER.ACCUMULATE_STEPS,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        extra = {"model_ema": self.ema} if self.ema is not None else {}
        if queue is not None:  # the coarse ITC queue: kept out of the weights, saved with the trainer state
            extra["itc_queue"] = QueueCheckpoint(queue)
        self.checkpointer = FiberCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), **extra)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        ret = super().build_hooks()
        # EMA and weight-decay updates go right after the LR scheduler, before the checkpointer
        # and the evaluation, so both see the updated averages.
        position = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)) + 1
        extra = [EMAHook(self.ema) if self.ema is not None else None,
                 build_weight_decay_schedule_hook(self.cfg, self.cfg.SOLVER.STEPS)]
        ret[position:position] = [h for h in extra if h is not None]
        # Detectron2 checkpoints on the main process only; ours runs on every process (each one's
        # data position and RNG states are gathered into the file), before the evaluation.
        ret = [h for h in ret if not isinstance(h, hooks.PeriodicCheckpointer)]
        evaluation = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
        ret.insert(evaluation, FiniteStepCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        ret[evaluation + 1]._func = self._eval_in_training(ret[evaluation + 1]._func)
        return ret

    def state_dict(self):
        # Detectron2 0.6's DefaultTrainer saves neither the optimizer (nor the GradScaler) of its
        # inner trainer nor the LR scheduler; without them --resume would restart both. The data
        # position and RNG states of every process make the resumed run bit-identical.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["scheduler"] = self.scheduler.state_dict()
        ret["processes"] = gather_process_states(self._trainer.data_loader)
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        missing = [k for k in ("_trainer", "scheduler") if k not in state_dict]
        if missing:
            raise KeyError(f"the checkpoint's trainer state lacks {missing}: it was not written by FiberTrainer")
        self._trainer.load_state_dict(state_dict["_trainer"])
        self.scheduler.load_state_dict(state_dict["scheduler"])
        restore_process_states(state_dict.get("processes"), self._trainer.data_loader)

    def _eval_in_training(self, func):
        """The periodic evaluation with the EMA weights (MODEL.EMA.USE_FOR_EVAL) and without
        touching the training RNGs (so that it cannot change what a resumed run sees)."""
        use_ema = self.ema is not None and self.cfg.MODEL.EMA.USE_FOR_EVAL

        def run():
            with preserved_rng_states(), (swap_to_ema(self.model, self.ema) if use_ema else nullcontext()):
                return func()
        return run

    @classmethod
    def build_model(cls, cfg):
        # the towers start from MODEL.FIBER.SWIN/TEXT.WEIGHTS; MODEL.WEIGHTS, loaded afterwards by
        # the checkpointer, overrides them
        model = super().build_model(cfg)
        load_pretrained_towers(model, cfg)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer, cfg.SOLVER.MAX_ITER)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, **kwargs):
        # predictions are dumped where tools/evaluate_predictions.py can re-score them
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder, **kwargs)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test; with TEST.RETRIEVAL.ITM, the retrieval datasets' evaluators score
        image-caption pairs with the model's ITM head (:class:`~fiber_det.evaluation.retrieval.ItmScorer`)."""
        if evaluators is None and cfg.TEST.RETRIEVAL.ITM:
            evaluators = [cls.build_evaluator(cfg, name, **_itm_scorer_kwargs(cfg, name, model))
                          for name in cfg.DATASETS.TEST]
        return super().test(cfg, model, evaluators)
