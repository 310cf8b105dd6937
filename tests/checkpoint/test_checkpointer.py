"""FiberCheckpointer: official files load directly, incompatible files are errors."""
import copy

import pytest
import torch

from conftest import tiny_model
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
