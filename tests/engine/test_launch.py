"""Two CPU processes (gloo) through fiber_det's launcher: evaluation counts every image once with
the 1-process results, training all-reduces gradients (weights equal on both processes and to a
1-process run with the same total batch)."""
import json

import pytest
import torch

from conftest import tiny_cfg
from detectron2.engine import HookBase
from detectron2.utils import comm
from fiber_det.data.datasets.synthetic import default_root, generate_synthetic, register_synthetic
from fiber_det.engine.ema import unwrap_model
from fiber_det.engine.launch import default_backend, launch
from fiber_det.engine.trainer import FiberTrainer, resolve_schedule

NUM_VAL = 5  # uneven shards over 2 processes: 3 + 2
TEST_SETS = ("synthetic_detection_val", "synthetic_grounding_val")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = generate_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=8, num_val=NUM_VAL, image_size=64)
    yield root
    register_synthetic(default_root())


def _cfg(out, datasets_test=()):
    # no dropout, drop-path or DropBlock: a 2-process step then equals a 1-process one up to round-off
    # (GroupNorm/LayerNorm only, and the loss normalisers are reduced over processes)
    return resolve_schedule(tiny_cfg(
        DATASETS__TRAIN=("synthetic_grounding_train", "synthetic_detection_train"), DATASETS__TEST=datasets_test,
        DATALOADER__NUM_WORKERS=0, SOLVER__IMS_PER_BATCH=2, SOLVER__MAX_ITER=2, SOLVER__WARMUP_ITERS=0,
        SOLVER__BASE_LR=1e-4, SOLVER__CHECKPOINT_PERIOD=100, MODEL__FIBER__SWIN__DROP_PATH_RATE=0.0,
        MODEL__FIBER__TEXT__DROPOUT=0.0, MODEL__FIBER__TEXT__ATTENTION_DROPOUT=0.0,
        MODEL__FIBER__FPN__DROP_BLOCK_PROB=0.0, INPUT__MIN_SIZE_TRAIN=(64,), INPUT__MAX_SIZE_TRAIN=64,
        INPUT__MIN_SIZE_TEST=64, INPUT__MAX_SIZE_TEST=64, OUTPUT_DIR=str(out), SEED=11,
        MODEL__FIBER__ATSS__INFERENCE_TH=0.0,  # the untrained model's scores are all below the default 0.05
    ))


class _FirstGradients(HookBase):
    def __init__(self):
        self.grads = {}

    def after_step(self):
        if self.trainer.iter == 0:
            model = unwrap_model(self.trainer.model)
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _evaluate_then_train(root, out):
    """Per process: evaluate the seeded initial model, train 2 iterations, save what the test compares."""
    torch.set_num_threads(1)  # identical arithmetic in every process
    register_synthetic(root)
    torch.manual_seed(0)
    trainer = FiberTrainer(_cfg(out))
    metrics = FiberTrainer.test(_cfg(out, TEST_SETS), trainer.model)
    grads = _FirstGradients()
    trainer.register_hooks([grads])
    trainer.train()
    rank = comm.get_rank()
    torch.save({"weights": unwrap_model(trainer.model).state_dict(), "grads": grads.grads, "metrics": metrics,
                "world_size": comm.get_world_size()}, out / f"rank{rank}.pth")


def _dumped(out):
    with open(out / "inference" / "synthetic_detection_val" / "coco_instances_results.json") as f:
        coco = json.load(f)
    with open(out / "inference" / "synthetic_grounding_val" / "flickr_predictions.json") as f:
        flickr = json.load(f)["predictions"]
    return coco, flickr


def test_two_gloo_processes_train_and_evaluate_like_one(synthetic, tmp_path):
    assert default_backend(2) == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    launch(_evaluate_then_train, 2, backend="gloo", args=(synthetic, two))
    threads = torch.get_num_threads()
    try:
        _evaluate_then_train(synthetic, one)
    finally:
        torch.set_num_threads(threads)
        register_synthetic(synthetic)
    ranks = [torch.load(two / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    single = torch.load(one / "rank0.pth", weights_only=True)
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1

    # evaluation: each of the 5 images once, the same predictions and metrics as one process
    coco, flickr = _dumped(two)
    assert sorted({r["image_id"] for r in coco}) == list(range(1, NUM_VAL + 1))
    assert len(flickr) == NUM_VAL and len({p["image_id"] for p in flickr}) == NUM_VAL
    assert (coco, flickr) == _dumped(one)  # the same detections, none twice
    # (json: NaN metrics, e.g. APm without medium boxes, compare equal)
    assert json.dumps(ranks[0]["metrics"]) == json.dumps(single["metrics"])
    assert not any(ranks[1]["metrics"].values())  # results live on the main process

    # training: all-reduced gradients, so both processes hold the same weights ...
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][name], value), name
    # ... and the 1-process run's (2 images in one batch): its gradients up to float round-off
    assert ranks[0]["grads"].keys() == single["grads"].keys() and single["grads"]
    for name, grad in single["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Adam divides each gradient element by its own running magnitude, so an element whose gradient
    # is round-off (~1e-8) may move by up to lr per step either way: the weights agree to 1e-6
    # except for a few such elements, which stay within 2 steps x lr
    far, total = 0, 0
    for name, value in single["weights"].items():
        diff = (ranks[0]["weights"][name].double() - value.double()).abs()
        assert diff.max() <= 2 * 1e-4 + 1e-7, (name, float(diff.max()))
        far, total = far + int((diff > 1e-6).sum()), total + diff.numel()
    assert far <= 1e-4 * total, f"{far} of {total} weights differ by more than 1e-6"


def test_launch_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="backend must be one of"):
        launch(print, 2, backend="mpi")
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="NCCL with 2 processes needs as many GPUs"):
            launch(print, 2, backend="nccl")
