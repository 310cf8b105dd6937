"""kill -9 between two checkpoints, then --resume: bit-identical to the run left alone; the RNG
and data-position states that make it so."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO
from fiber_det.data.datasets.synthetic import generate_synthetic
from fiber_det.engine.resume import preserved_rng_states, rng_states, set_rng_states
from fiber_det.utils.safe_load import load_checkpoint_file

# 8 iterations, checkpoints after iterations 2 and 5 and the final one; dropout, drop-path,
# DropBlock and random flips on, so that every RNG matters
TRAIN_ARGS = [
    "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", '("synthetic_grounding_train","synthetic_detection_train")',
    "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "8",
    "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.BASE_LR", "1e-3", "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.STEP_FRACTIONS", "[0.5]", "MODEL.EMA.ENABLED", "True", "INPUT.MIN_SIZE_TRAIN", "(56, 64)",
    "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.FLIP_PROB", "0.5", "SEED", "7",
]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=12, num_val=2, image_size=64)


def _train_net(out, root, *extra):
    env = {**os.environ, "FIBER_SYNTHETIC_ROOT": str(root), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
           str(REPO / "configs" / "quick_schedules" / "FIBER-tiny.yaml"), *extra, *TRAIN_ARGS, "OUTPUT_DIR", str(out)]
    with open(f"{out}.log", "a") as log:  # a file: a pipe nobody reads would block the process once full
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _log(out) -> str:
    with open(f"{out}.log") as f:
        return f.read()


def _kill_after_first_checkpoint(proc, out, timeout=300):
    """SIGKILLs ``proc`` as soon as ``last_checkpoint`` appears; returns the checkpoint it names."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "last_checkpoint").is_file():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return (out / "last_checkpoint").read_text()
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint before the run ended (rc {proc.poll()}):\n{_log(out)[-3000:]}")


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(synthetic_root, tmp_path):
    full = _train_net(tmp_path / "full", synthetic_root)
    killed_dir = tmp_path / "killed"
    killed = _train_net(killed_dir, synthetic_root)
    checkpoint = _kill_after_first_checkpoint(killed, killed_dir)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint in ("model_0000002.pth", "model_0000005.pth") and not (killed_dir / "model_final.pth").exists()

    resumed = _train_net(killed_dir, synthetic_root, "--resume")
    assert resumed.wait() == 0, _log(killed_dir)[-3000:]
    assert f"Loading trainer from {killed_dir / checkpoint}" in _log(killed_dir)
    assert full.wait() == 0, _log(tmp_path / "full")[-3000:]

    expected = load_checkpoint_file(tmp_path / "full" / "model_final.pth")
    got = load_checkpoint_file(killed_dir / "model_final.pth")
    assert got["iteration"] == expected["iteration"] == 7
    for part in ("model", "model_ema"):
        differing = [k for k, v in expected[part].items() if not torch.equal(got[part][k], v)]
        assert not differing, f"{part}: {len(differing)} tensors differ after resuming, e.g. {differing[:3]}"
    states = (expected["trainer"]["_trainer"]["optimizer"]["state"], got["trainer"]["_trainer"]["optimizer"]["state"])
    for k, v in states[0].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(states[1][k][name], v[name]), (k, name)
    assert got["trainer"]["processes"][0]["data_loader"] == expected["trainer"]["processes"][0]["data_loader"]


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_states_round_trip_through_a_checkpoint_file(tmp_path):
    states = rng_states()
    first = _draws()
    torch.save({"rng": states}, tmp_path / "rng.pth")
    _draws()
    set_rng_states(load_checkpoint_file(tmp_path / "rng.pth")["rng"])  # weights_only loading
    assert _draws() == first


def test_preserved_rng_states_leave_no_trace():
    states = rng_states()
    expected = _draws()
    set_rng_states(states)
    with preserved_rng_states():
        _draws()
        np.random.seed(1)
    assert _draws() == expected
