"""FiberTrainer end to end on a tiny synthetic set: train, checkpoint, crash, resume."""
import pytest
import torch

from conftest import Crash, tiny_cfg
from detectron2.engine import HookBase
from fiber_det.data.datasets.synthetic import default_root, generate_synthetic, register_synthetic
from fiber_det.engine.trainer import FiberTrainer, resolve_schedule


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = generate_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=12, num_val=4, image_size=64)
    register_synthetic(root)
    yield root
    register_synthetic(default_root())


def make_cfg(out, **overrides):
    settings = dict(
        DATASETS__TRAIN=("synthetic_grounding_train", "synthetic_detection_train"),
        DATASETS__TEST=("synthetic_detection_val", "synthetic_grounding_val"),
        DATALOADER__NUM_WORKERS=0, SOLVER__IMS_PER_BATCH=2, SOLVER__MAX_ITER=6,
        SOLVER__STEP_FRACTIONS=[0.5], SOLVER__WARMUP_ITERS=2, SOLVER__CHECKPOINT_PERIOD=3,
        SOLVER__BASE_LR=1e-3, MODEL__EMA__ENABLED=True, MODEL__EMA__DECAY=0.9, TEST__EVAL_PERIOD=0,
        INPUT__MIN_SIZE_TRAIN=(64,), INPUT__MAX_SIZE_TRAIN=64, INPUT__MIN_SIZE_TEST=64,
        INPUT__MAX_SIZE_TEST=64, OUTPUT_DIR=str(out), SEED=0,
    )
    return resolve_schedule(tiny_cfg(**{**settings, **overrides}))


class RecordLR(HookBase):
    def __init__(self, log):
        self.log = log

    def before_step(self):
        self.log[self.trainer.iter] = self.trainer.optimizer.param_groups[0]["lr"]


def train(cfg, resume, extra_hooks=()):
    trainer = FiberTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    lrs = {}
    trainer.register_hooks([RecordLR(lrs), *extra_hooks])
    start = trainer.start_iter
    try:
        trainer.train()
    except RuntimeError as e:
        assert "simulated crash" in str(e)
    return trainer, start, lrs


def test_crash_and_resume_continues_identically(synthetic, tmp_path):
    _, _, full_lrs = train(make_cfg(tmp_path / "full"), resume=False)
    assert sorted(full_lrs) == list(range(6))
    # warmup over 2 iterations from 0.001 x, then x 0.1 at the milestone round(0.5 * 6) = 3
    assert full_lrs[0] == pytest.approx(1e-6) and full_lrs[2] == pytest.approx(1e-3)
    assert full_lrs[3] == pytest.approx(1e-4) and full_lrs[5] == pytest.approx(1e-4)

    out = tmp_path / "crashed"
    train(make_cfg(out), resume=False, extra_hooks=[Crash(4)])
    saved = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=False)
    assert (out / "last_checkpoint").read_text().strip() == "model_0000002.pth"
    assert saved["iteration"] == 2 and "model_ema" in saved
    saved_optimizer = saved["trainer"]["_trainer"]["optimizer"]

    trainer = FiberTrainer(make_cfg(out))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3
    state = trainer.optimizer.state_dict()
    assert saved_optimizer["state"], "no optimizer state was saved"
    for k, v in saved_optimizer["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state["state"][k][name], v[name], rtol=0, atol=0)
    for name, value in saved["model_ema"].items():
        torch.testing.assert_close(trainer.ema.state_dict()[name], value, rtol=0, atol=0)

    _, start, resumed_lrs = train(make_cfg(out), resume=True)
    assert start == 3 and sorted(resumed_lrs) == [3, 4, 5]
    for it in (3, 4, 5):
        assert resumed_lrs[it] == full_lrs[it], (it, resumed_lrs[it], full_lrs[it])
    assert (out / "model_final.pth").is_file()


def test_final_evaluation_reports_bbox_and_grounding(synthetic, tmp_path):
    cfg = make_cfg(tmp_path, SOLVER__MAX_ITER=2, MODEL__EMA__ENABLED=False)
    trainer = FiberTrainer(cfg)
    results = FiberTrainer.test(cfg, trainer.model)
    assert "AP50" in results["synthetic_detection_val"]["bbox"]
    assert "R@1" in results["synthetic_grounding_val"]["grounding"]


def test_ema_and_weight_decay_hooks_follow_the_lr_scheduler(synthetic, tmp_path):
    from detectron2.engine import hooks

    from fiber_det.engine.ema import EMAHook
    from fiber_det.engine.schedule import WeightDecayScheduleHook

    trainer = FiberTrainer(make_cfg(tmp_path, SOLVER__WEIGHT_DECAY_SCHEDULE=True))
    kinds = [type(h) for h in trainer._hooks]
    at = kinds.index(hooks.LRScheduler)
    assert kinds[at + 1:at + 3] == [EMAHook, WeightDecayScheduleHook]
    # the milestone round(0.5 * 6) = 3 and the configured ratio reach the hook
    assert trainer._hooks[at + 2].decay_iterations == WeightDecayScheduleHook([3], 0.667, 0.1).decay_iterations
    plain = FiberTrainer(make_cfg(tmp_path / "plain", MODEL__EMA__ENABLED=False))
    assert not any(isinstance(h, (EMAHook, WeightDecayScheduleHook)) for h in plain._hooks)


def test_a_diverging_run_stops_cleanly_and_keeps_its_last_good_checkpoint(synthetic, tmp_path, caplog):
    """SOLVER.BASE_LR 1e30: the weights explode after the first step; the NaN deformable-conv offsets
    that follow used to crash torchvision's kernel (a segmentation fault)."""
    from fiber_det.engine.trainer import NonFiniteTrainingError
    from fiber_det.utils.safe_load import load_checkpoint_file

    cfg = make_cfg(tmp_path, SOLVER__BASE_LR=1e30, SOLVER__WARMUP_ITERS=0, SOLVER__CHECKPOINT_PERIOD=1,
                   SOLVER__NONFINITE_PATIENCE=2, SOLVER__CLIP_GRADIENTS__ENABLED=False, MODEL__EMA__ENABLED=False)
    trainer = FiberTrainer(cfg)
    with caplog.at_level("WARNING", logger="fiber_det"), pytest.raises(NonFiniteTrainingError) as error:
        trainer.train()
    message = str(error.value)
    assert "training stopped at iteration 2 after 2 consecutive non-finite steps" in message
    for term in ("loss_reg=", "loss_centerness=", "loss_dot_product_token="):
        assert term in message
    assert "iteration 1: non-finite loss" in caplog.text and "iteration 1: checkpoint not written" in caplog.text
    # the checkpoint of the last finite step is the last one, whole and finite
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_0000000.pth"]
    saved = load_checkpoint_file(tmp_path / "model_0000000.pth")
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
