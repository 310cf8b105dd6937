"""The coarse image-text model through FiberTrainer and tools/train_net.py on a tiny synthetic
caption set: the official optimiser and schedule, the ITC queue, gradient accumulation, exact
resume with the queue, AMP and activation checkpointing, and --eval-only retrieval."""
import pytest
import torch

from coarse_inputs import TINY_COARSE, coarse_cfg, coarse_model, pair_inputs
from conftest import Crash, load_tool
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from fiber_det.data.datasets import synthetic_captions
from fiber_det.engine.trainer import FiberTrainer, resolve_schedule

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    root = synthetic_captions.generate_synthetic_captions(tmp_path_factory.mktemp("captions"), num_train=8,
                                                          num_val=3, image_size=64)
    synthetic_captions.register_synthetic_captions(root)
    yield root
    synthetic_captions.register_synthetic_captions(synthetic_captions.default_root())


def make_cfg(out, **overrides):
    """The tiny coarse model (ITC + ITM + MLM, 16-entry queue) on the tiny caption set: 10 steps of
    4 pairs, 10 % warmup (1 step), checkpoints after steps 3 and 7."""
    settings = dict(
        DATASETS__TRAIN=("synthetic_captions_train",), DATASETS__TEST=("synthetic_captions_val",),
        DATALOADER__NUM_WORKERS=0, SOLVER__IMS_PER_BATCH=4, SOLVER__MAX_ITER=10, SOLVER__CHECKPOINT_PERIOD=4,
        SOLVER__BASE_LR=1e-3, TEST__EVAL_PERIOD=0, TEST__RETRIEVAL__BATCH_SIZE=4, OUTPUT_DIR=str(out), SEED=3,
    )
    return resolve_schedule(coarse_cfg(**{**settings, **overrides}))


class Record(HookBase):
    """Per iteration: the LR of every group (before the step) and a copy of one weight after it."""

    def __init__(self):
        self.lrs, self.weights = {}, {}

    def before_step(self):
        self.lrs[self.trainer.iter] = [g["lr"] for g in self.trainer.optimizer.param_groups]

    def after_step(self):
        w = self.trainer.model.backbone.vision.patch_embed.proj.weight
        self.weights[self.trainer.iter] = w.detach().clone()


def train(cfg, resume=False, crash_at=None):
    seed_all_rng(cfg.SEED)  # as tools/train_net.py's default_setup: the same initial weights every run
    trainer = FiberTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    record = Record()
    trainer.register_hooks([record] + ([Crash(crash_at)] if crash_at is not None else []))
    try:
        trainer.train()
    except RuntimeError as e:
        assert "simulated crash" in str(e)
    return trainer, record


def test_training_steps_with_the_official_optimiser_schedule_and_queue(captions, tmp_path):
    trainer, record = train(make_cfg(tmp_path))
    model = trainer.model
    assert sorted(record.lrs) == list(range(10))
    # step 0 runs at factor 0 (no update at all: the decay is lr-scaled too), step 1 at the full LR, then linear to 0
    assert all(lr == 0.0 for lr in record.lrs[0])
    assert sorted({round(lr, 12) for lr in record.lrs[1]}) == [1e-3, 5e-3]
    assert sorted({round(lr, 12) for lr in record.lrs[9]}) == [pytest.approx(1e-3 / 9), pytest.approx(5e-3 / 9)]
    assert not torch.equal(record.weights[1], record.weights[9])
    # every micro-batch entered the queue: 10 x 4 pairs into 16 entries
    assert int(model.queue.queue_total) == 40 and int(model.queue.queue_ptr) == 40 % 16
    storage = trainer.storage.latest()
    for name in ("loss_mlm", "loss_itc", "loss_itm"):
        assert torch.isfinite(torch.tensor(storage[name][0])), name


def test_the_first_step_changes_no_weight(captions, tmp_path):
    cfg = make_cfg(tmp_path, SOLVER__MAX_ITER=10)
    trainer = FiberTrainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.register_hooks([Crash(0)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "LR factor 0 at step 0 must leave every weight"


def test_gradient_accumulation_runs_micro_batches_and_queues_each(captions, tmp_path):
    trainer, _ = train(make_cfg(tmp_path, SOLVER__ACCUMULATE_STEPS=2, SOLVER__MAX_ITER=3))
    assert trainer.data_loader.batch_size == 2
    assert int(trainer.model.queue.queue_total) == 3 * 4  # 2 micro-batches of 2 per step
    with pytest.raises(ValueError, match="ACCUMULATE_STEPS"):
        FiberTrainer(make_cfg(tmp_path / "bad", SOLVER__ACCUMULATE_STEPS=3))


def test_crash_and_resume_continues_bit_identically_with_the_queue(captions, tmp_path):
    full, _ = train(make_cfg(tmp_path / "full"))
    out = tmp_path / "crashed"
    train(make_cfg(out), crash_at=5)
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    saved = torch.load(out / "model_0000003.pth", map_location="cpu", weights_only=True)
    assert set(saved["itc_queue"]) >= {"image_queue", "text_input_queue", "queue_ptr", "queue_total"}
    assert int(saved["itc_queue"]["queue_total"]) == 16 and not any("queue" in k for k in saved["model"])

    resumed, record = train(make_cfg(out), resume=True)
    assert sorted(record.lrs) == list(range(4, 10))
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for k, v in full.model.queue.snapshot().items():
        # input entries never written are uninitialised memory: compare the written ones
        filled = slice(0, full.model.queue.num_filled) if "input" in k else slice(None)
        assert torch.equal(getattr(resumed.model.queue, k)[filled], v[filled]), k
    states = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i, s in states[0].items():
        assert s["step"] == states[1][i]["step"] and torch.equal(s["exp_avg_sq"], states[1][i]["exp_avg_sq"])


def test_amp_and_activation_checkpointing(captions, tmp_path):
    """bf16 autocast trains (finite losses); activation checkpointing gives the same gradients."""
    trainer, _ = train(make_cfg(tmp_path, SOLVER__AMP__ENABLED=True, SOLVER__AMP__DTYPE="bfloat16",
                                SOLVER__MAX_ITER=2))
    assert all(torch.isfinite(torch.tensor(v[0])) for k, v in trainer.storage.latest().items() if k.startswith("loss"))

    grads = []
    for use_checkpoint in (False, True):
        model = coarse_model(MODEL__FIBER__SWIN__USE_CHECKPOINT=use_checkpoint,
                             MODEL__FIBER__TEXT__USE_CHECKPOINT=use_checkpoint)
        model.train()
        torch.manual_seed(1)  # dropout, MLM masks and hard negatives alike
        sum(model(pair_inputs(model)).values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_eval_only_scores_retrieval_with_itc_and_itm(captions, tmp_path, monkeypatch):
    monkeypatch.setenv("FIBER_SYNTHETIC_CAPTIONS_ROOT", str(captions))  # train_net generates nothing
    train(make_cfg(tmp_path / "train", SOLVER__MAX_ITER=2))
    tool = load_tool("train_net")
    args = tool.parse_args([
        "--config-file", str(TINY_COARSE), "--eval-only",
        "MODEL.WEIGHTS", str(tmp_path / "train" / "model_final.pth"), "MODEL.DEVICE", "cpu",
        "DATASETS.TEST", '("synthetic_captions_val",)', "DATALOADER.NUM_WORKERS", "0",
        "TEST.RETRIEVAL.ITM", "exhaustive", "TEST.RETRIEVAL.BATCH_SIZE", "4", "OUTPUT_DIR", str(tmp_path / "eval"),
    ])
    results = tool.main(args)["retrieval"]  # one test set: Detectron2 returns its results directly
    for prefix in ("", "itm_"):
        for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
            assert 0.0 <= results[prefix + key] <= 100.0, prefix + key
    # 3 images, 15 captions: image->text R@10 and text->image R@5 are certain hits
    assert results["i2t_R@10"] == 100.0 and results["t2i_R@5"] == 100.0 and results["itm_t2i_R@5"] == 100.0
    assert (tmp_path / "eval" / "inference" / "synthetic_captions_val" / "retrieval_scores.npz").is_file()


def test_itm_fine_tuning_with_random_negatives(captions, tmp_path):
    """ITC off: the training loader hands each pair a random false image, the model trains ITM alone."""
    trainer, _ = train(make_cfg(tmp_path, MODEL__FIBER__COARSE__ITC_ON=False, MODEL__FIBER__COARSE__MLM_ON=False,
                                SOLVER__MAX_ITER=2))
    batch = next(iter(trainer.data_loader))
    assert all(x["false_image"].shape == x["image"].shape for x in batch)
    latest = trainer.storage.latest()  # one loss: Detectron2 logs it as total_loss only
    assert not any(k.startswith("loss_") for k in latest) and 0.3 < latest["total_loss"][0] < 1.5
