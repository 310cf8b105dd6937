"""FiberCheckpointer: official files load directly, incompatible files are errors."""
import copy
import os

import pytest
import torch

from conftest import REPO, tiny_model
from fiber_det.checkpoint.checkpointer import CheckpointMismatchError, FiberCheckpointer
from fiber_det.modeling.postprocess import postprocess_image


def test_official_checkpoint_loads_directly(fixture_v2, fixture_model, tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": dict(fixture_v2["state_dict"]), "iteration": 7}, path)
    fresh = copy.deepcopy(fixture_model)
    for p in fresh.parameters():
        p.data.zero_()
    extra = FiberCheckpointer(fresh).load(str(path))
    assert "iteration" not in extra  # the official training state does not carry over
    inp = fixture_v2["inputs"]
    with torch.no_grad():
        out, anchors = fresh.run(inp["images"], inp["input_ids"], inp["attention_mask"])
    _, scores, labels = postprocess_image(out, 0, anchors, inp["image_sizes_hw"][0],
                                          inp["per_image"][0]["positive_map_label_to_token"])
    det = fixture_v2["outputs_eval"]["detections"][0]
    assert sorted(labels.tolist()) == sorted(det["labels"].tolist())
    torch.testing.assert_close(scores.sort().values, det["scores"].sort().values, atol=2e-5, rtol=1e-4)


def test_incompatible_checkpoint_is_an_error_listing_keys(tmp_path):
    model = tiny_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["head.not_a_param"] = torch.zeros(1)
    del sd["head.bias0"]
    sd["head.log_scale"] = torch.zeros(2)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError) as e:
        FiberCheckpointer(model).load(str(path))
    msg = str(e.value)
    assert "head.not_a_param" in msg and "head.bias0" in msg and "head.log_scale" in msg


def test_allowed_missing_prefixes_for_partial_inits(tmp_path):
    model = tiny_model()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "partial.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError, match="head.bias0"):
        FiberCheckpointer(model).load(str(path))
    FiberCheckpointer(model, allow_missing=("head.",)).load(str(path))


def _linear_checkpointer(folder):
    torch.manual_seed(0)
    return FiberCheckpointer(torch.nn.Linear(3, 2), str(folder))


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """Disk full while writing: the file of that name and last_checkpoint stay as they were."""
    import fiber_det.checkpoint.checkpointer as module

    checkpointer = _linear_checkpointer(tmp_path)
    checkpointer.save("model_0000009", iteration=9)
    before = (tmp_path / "model_0000009.pth").read_bytes()
    real_save = torch.save

    def disk_full(obj, f):
        real_save(obj, f)
        f.truncate(100)  # a part is on disk, then the device is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module.torch, "save", disk_full)
    with torch.no_grad():
        checkpointer.model.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_0000009", iteration=9)  # e.g. a resumed run saving the same iteration again
    assert (tmp_path / "model_0000009.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]  # no leftovers


KILLED_WHILE_SAVING = """
import os, signal, sys, torch
import fiber_det.checkpoint.checkpointer as module
torch.manual_seed(0)
checkpointer = module.FiberCheckpointer(torch.nn.Linear(3, 2), sys.argv[1])
checkpointer.save("model_0000001", iteration=1)
real_save = torch.save
def killed(obj, f):
    real_save(obj, f)
    f.flush()
    f.truncate(100)
    os.kill(os.getpid(), signal.SIGKILL)
module.torch.save = killed
checkpointer.save("model_0000003", iteration=3)
"""


def test_a_kill_while_saving_leaves_last_checkpoint_loadable(tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(tmp_path)], cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000003.pth").exists()  # only a hidden temporary file, never this name
    checkpointer = _linear_checkpointer(tmp_path)
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 1
