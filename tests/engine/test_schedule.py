"""Training length, LR schedule and weight-decay schedule against the official formulas."""
import bisect

import pytest
import torch
from torch import nn

from conftest import tiny_cfg
from detectron2.engine import TrainerBase
from detectron2.engine.hooks import LRScheduler
from fiber_det.engine.schedule import (
    WeightDecayScheduleHook,
    build_lr_scheduler,
    build_weight_decay_schedule_hook,
    resolve_max_iter,
    resolve_milestones,
)


def official_lr(base_lr, it, milestones, warmup_iters=2000, warmup_factor=0.001, gamma=0.1):
    """upstream WarmupMultiStepLR at scheduler step ``it`` (linear warmup)."""
    w = 1.0
    if it < warmup_iters:
        alpha = it / warmup_iters
        w = warmup_factor * (1 - alpha) + alpha
    return base_lr * w * gamma ** bisect.bisect_right(milestones, it)


def official_weight_decays(wd, milestones, ratio, gamma, steps):
    """The weight decay of each optimizer step 0..steps-1 in upstream's training loop."""
    used, target = [], 0
    for last_epoch in range(1, steps + 1):
        used.append(wd)  # optimizer.step(); scheduler.step() -> last_epoch
        nxt = milestones[target] if target < len(milestones) else float("inf")
        if last_epoch >= nxt * ratio:
            wd *= gamma
            target += 1
    return used


def _optimizer(lrs=(1e-4, 2e-4, 1e-5), wd=0.01):
    return torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr, "weight_decay": wd} for lr in lrs])


def test_max_iter_from_epochs():
    cfg = tiny_cfg(SOLVER__MAX_EPOCH=24, SOLVER__IMS_PER_BATCH=32)
    assert resolve_max_iter(cfg, 117_266) == 87_949  # COCO train2017: 24 epochs at batch 32
    assert resolve_max_iter(tiny_cfg(SOLVER__MAX_ITER=800_000), 117_266) == 800_000
    with pytest.raises(ValueError, match="training set has 0 images"):
        resolve_max_iter(cfg, 0)
    with pytest.raises(ValueError, match="SOLVER.MAX_EPOCH"):
        resolve_max_iter(tiny_cfg(SOLVER__MAX_EPOCH=1, SOLVER__IMS_PER_BATCH=64), 10)


def test_milestones():
    frac = tiny_cfg(SOLVER__STEP_FRACTIONS=[0.67, 0.89])
    assert resolve_milestones(frac, 800_000) == [536_000, 712_000]
    assert resolve_milestones(frac, 87_949) == [58_926, 78_275]
    assert resolve_milestones(tiny_cfg(SOLVER__STEPS=(100, 200)), 800_000) == [100, 200]
    with pytest.raises(ValueError, match="STEP_FRACTIONS"):
        resolve_milestones(tiny_cfg(SOLVER__STEP_FRACTIONS=[0.5, 1.5]), 100)
    with pytest.raises(ValueError, match="strictly increasing"):
        resolve_milestones(tiny_cfg(SOLVER__STEPS=(200, 100)), 1000)


def test_lr_matches_official_formula_on_the_pretraining_schedule():
    cfg = tiny_cfg(SOLVER__STEP_FRACTIONS=[0.67, 0.89], SOLVER__WARMUP_ITERS=2000, SOLVER__WARMUP_FACTOR=0.001,
                   SOLVER__GAMMA=0.1, SOLVER__WARMUP_METHOD="linear")
    opt = _optimizer()
    sched = build_lr_scheduler(cfg, opt, 800_000)
    milestones = [536_000, 712_000]
    checked = [0, 1, 1000, 1999, 2000, 2001, 535_999, 536_000, 536_001, 711_999, 712_000, 799_999, 800_000]
    for it in checked:
        sched.last_epoch = it
        for lr, base in zip(sched.get_lr(), (1e-4, 2e-4, 1e-5)):
            assert lr == pytest.approx(official_lr(base, it, milestones), rel=1e-12, abs=0), it
    # the boundaries themselves, spelled out
    sched.last_epoch = 1999
    assert sched.get_lr()[0] == pytest.approx(1e-4 * (0.001 / 2000 + 1999 / 2000), rel=1e-12)
    sched.last_epoch = 536_000
    assert sched.get_lr()[0] == pytest.approx(1e-5, rel=1e-12)
    sched.last_epoch = 712_000
    assert sched.get_lr()[0] == pytest.approx(1e-6, rel=1e-12)


def test_lr_stepped_by_detectron2_hook():
    """Every iteration of a short run, driven by Detectron2's LRScheduler hook."""
    cfg = tiny_cfg(SOLVER__STEPS=(20, 35), SOLVER__WARMUP_ITERS=10, SOLVER__WARMUP_FACTOR=0.01, SOLVER__GAMMA=0.5)
    opt = _optimizer()
    seen = []

    class Trainer(TrainerBase):
        def run_step(self):
            seen.append([g["lr"] for g in opt.param_groups])
            opt.step()  # no gradients: a no-op that keeps torch's step-order check quiet

    trainer = Trainer()
    trainer.optimizer = opt
    trainer.register_hooks([LRScheduler(opt, build_lr_scheduler(cfg, opt, 50))])
    trainer.train(0, 50)
    for it, lrs in enumerate(seen):
        for lr, base in zip(lrs, (1e-4, 2e-4, 1e-5)):
            assert lr == pytest.approx(official_lr(base, it, [20, 35], 10, 0.01, 0.5), rel=1e-12), it


def test_constant_warmup_and_bad_keys():
    cfg = tiny_cfg(SOLVER__STEPS=(50,), SOLVER__WARMUP_ITERS=10, SOLVER__WARMUP_FACTOR=0.1,
                   SOLVER__WARMUP_METHOD="constant")
    sched = build_lr_scheduler(cfg, _optimizer((1.0,)), 100)
    lrs = []
    for it in (0, 9, 10, 49, 50):
        sched.last_epoch = it
        lrs.append(sched.get_lr()[0])
    assert lrs == pytest.approx([0.1, 0.1, 1.0, 1.0, 0.1], rel=1e-12)
    no_warmup = build_lr_scheduler(tiny_cfg(SOLVER__STEPS=(5,), SOLVER__WARMUP_ITERS=0), _optimizer((1.0,)), 10)
    lrs = []
    for it in (0, 4, 5, 10):
        no_warmup.last_epoch = it
        lrs.append(no_warmup.get_lr()[0])
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1], rel=1e-12)
    with pytest.raises(ValueError, match="WARMUP_FACTOR"):
        build_lr_scheduler(tiny_cfg(SOLVER__WARMUP_FACTOR=0.0), _optimizer(), 100)


def test_weight_decay_iterations_of_the_spec_example():
    hook = WeightDecayScheduleHook([536_000, 712_000], 0.667, 0.1)
    assert hook.decay_iterations == [357_512, 474_904]
    assert [hook.num_decays(i) for i in (357_511, 357_512, 474_903, 474_904, 799_999)] == [0, 1, 1, 2, 2]
    assert build_weight_decay_schedule_hook(tiny_cfg(), [536_000]) is None
    on = build_weight_decay_schedule_hook(tiny_cfg(SOLVER__WEIGHT_DECAY_SCHEDULE=True), [536_000, 712_000])
    assert on.decay_iterations == [357_512, 474_904]


class _RecordingTrainer(TrainerBase):
    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer
        self.used = {}

    def run_step(self):
        self.used[self.iter] = self.optimizer.param_groups[0]["weight_decay"]


@pytest.mark.parametrize(
    "milestones, ratio, gamma",
    [([30, 45], 0.667, 0.1), ([30, 45], 0.5, 0.1), ([30, 31], 0.667, 0.5), ([12, 70], 0.99, 0.1)],
)
def test_weight_decay_schedule_matches_upstream_loop(milestones, ratio, gamma):
    steps = 60
    expected = official_weight_decays(0.01, milestones, ratio, gamma, steps)
    trainer = _RecordingTrainer(_optimizer((1e-4,), wd=0.01))
    trainer.register_hooks([WeightDecayScheduleHook(milestones, ratio, gamma)])
    trainer.train(0, steps)
    assert [trainer.used[i] for i in range(steps)] == expected  # bit-exact (repeated products)

    # resume at iteration 25 from the optimizer state saved there, and from a fresh optimizer
    first = _RecordingTrainer(_optimizer((1e-4,), wd=0.01))
    first.register_hooks([WeightDecayScheduleHook(milestones, ratio, gamma)])
    first.train(0, 25)
    resumed = _RecordingTrainer(_optimizer((1e-4,), wd=0.01))
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.register_hooks([WeightDecayScheduleHook(milestones, ratio, gamma)])
    resumed.train(25, steps)
    assert [resumed.used[i] for i in range(25, steps)] == expected[25:]
    fresh = _RecordingTrainer(_optimizer((1e-4,), wd=0.01))
    fresh.register_hooks([WeightDecayScheduleHook(milestones, ratio, gamma)])
    fresh.train(25, steps)
    assert [fresh.used[i] for i in range(25, steps)] == expected[25:]


# ---- the coarse stage: linear warmup from 0, then linear decay to 0 ----

def transformers_poly_lr(lr_init, step, warmup, total, lr_end=0.0, power=1.0):
    """transformers' get_polynomial_decay_schedule_with_warmup LR at ``step``, written out."""
    if step < warmup:
        factor = float(step) / float(max(1, warmup))
    elif step > total:
        factor = lr_end / lr_init
    else:
        decay = (lr_init - lr_end) * (1 - (step - warmup) / (total - warmup)) ** power + lr_end
        factor = decay / lr_init
    return lr_init * factor


def test_coarse_linear_decay_stepped_by_detectron2_hook():
    """Every iteration of a 37-step run with a 10 % warmup (int(3.7) = 3 steps): the first step
    runs at LR 0, the last at 1/34 of the base; every group scales alike."""
    cfg = tiny_cfg(SOLVER__LR_SCHEDULER_NAME="WarmupLinearDecayLR", SOLVER__WARMUP_FRACTION=0.1)
    opt = _optimizer((1e-5, 5e-5, 1e-5))
    seen = []

    class Trainer(TrainerBase):
        def run_step(self):
            seen.append([g["lr"] for g in opt.param_groups])
            opt.step()

    trainer = Trainer()
    trainer.optimizer = opt
    trainer.register_hooks([LRScheduler(opt, build_lr_scheduler(cfg, opt, 37))])
    trainer.train(0, 37)
    assert len(seen) == 37 and seen[0] == [0.0, 0.0, 0.0]
    for it, lrs in enumerate(seen):
        for lr, base in zip(lrs, (1e-5, 5e-5, 1e-5)):
            assert lr == pytest.approx(transformers_poly_lr(base, it, 3, 37), rel=1e-12, abs=1e-20), it
    assert seen[3][1] == pytest.approx(5e-5) and seen[36][1] == pytest.approx(5e-5 / 34)


def test_coarse_linear_decay_on_the_official_pretraining_schedule():
    from fiber_det.engine.schedule import WarmupLinearDecay, resolve_warmup_iters

    cfg = tiny_cfg(SOLVER__LR_SCHEDULER_NAME="WarmupLinearDecayLR", SOLVER__WARMUP_FRACTION=0.1)
    assert resolve_warmup_iters(cfg, 100000) == 10000
    schedule = WarmupLinearDecay(10000, 100000)
    for t in (0, 1, 5000, 9999, 10000, 10001, 55000, 99999, 100000, 100500):
        assert schedule(t / 100000) == pytest.approx(transformers_poly_lr(1e-5, t, 10000, 100000) / 1e-5,
                                                     rel=1e-12, abs=1e-15), t
    assert resolve_warmup_iters(tiny_cfg(SOLVER__WARMUP_ITERS=7), 100) == 7  # no fraction: WARMUP_ITERS
    with pytest.raises(ValueError, match="LR_SCHEDULER_NAME"):
        build_lr_scheduler(tiny_cfg(SOLVER__LR_SCHEDULER_NAME="WarmupCosineLR"), _optimizer(), 10)
    with pytest.raises(ValueError, match="WARMUP_FRACTION"):
        resolve_warmup_iters(tiny_cfg(SOLVER__WARMUP_FRACTION=1.0), 10)
    with pytest.raises(ValueError, match="shorter"):
        WarmupLinearDecay(10, 10)


def test_resolve_schedule_writes_the_warmup_of_a_fraction():
    from fiber_det.engine.trainer import resolve_schedule

    cfg = resolve_schedule(tiny_cfg(SOLVER__MAX_ITER=250, SOLVER__WARMUP_FRACTION=0.1, SOLVER__STEPS=()))
    assert (cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FRACTION, cfg.SOLVER.MAX_ITER) == (25, 0.0, 250)
