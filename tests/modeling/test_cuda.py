"""CUDA vs CPU agreement (TF32 off) and AMP training steps; skipped without a GPU.

Run on a GPU machine with: python -m pytest -q tests/modeling/test_cuda.py
"""
import copy

import pytest
import torch
from model_inputs import cat_input

from conftest import tiny_model
from fiber_det.checkpoint.parity import capture_intermediates, tolerance_for
from fiber_det.modeling.postprocess import postprocess_image

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("no_tf32")]


def _run_with_intermediates(model, inp, device):
    """(head outputs + "features" (P3-P7) + "tower" (DyHead), anchors) of the fixture inputs."""
    store, hooks = capture_intermediates(model)
    try:
        with torch.no_grad():
            out, anchors = model.run(*(inp[k].to(device) for k in ("images", "input_ids", "attention_mask")))
    finally:
        for h in hooks:
            h.remove()
    return {**out, "features": store["features"], "tower": store["tower"]}, anchors


def test_fixture_model_cpu_vs_cuda(fixture_v2, fixture_model):
    inp, oe = fixture_v2["inputs"], fixture_v2["outputs_eval"]
    gpu = copy.deepcopy(fixture_model).cuda().eval()
    out, anchors = _run_with_intermediates(gpu, inp, "cuda")
    cpu, _ = _run_with_intermediates(fixture_model, inp, "cpu")
    for key, group in (("features", "outputs_eval/fpn_features"), ("tower", "outputs_eval/dyhead_tower_features"),
                       ("box_deltas", "outputs_eval/head/bbox_reg"), ("centerness", "outputs_eval/head/centerness"),
                       ("token_logits", "outputs_eval/head/dot_product_logits")):
        atol, rtol = tolerance_for(fixture_v2, group)
        for lvl in range(5):
            torch.testing.assert_close(out[key][lvl].cpu(), cpu[key][lvl], atol=atol, rtol=rtol)
    mapping = inp["per_image"][0]["positive_map_label_to_token"]
    boxes, scores, labels = postprocess_image(out, 0, anchors, inp["image_sizes_hw"][0], mapping)
    det = oe["detections"][0]
    assert sorted(labels.cpu().tolist()) == sorted(det["labels"].tolist())
    torch.testing.assert_close(scores.cpu().sort().values, det["scores"].sort().values, atol=2e-5, rtol=1e-4)


def test_tiny_model_cpu_vs_cuda():
    cpu = tiny_model(seed=0, MODEL__FIBER__ATSS__INFERENCE_TH=0.0).eval()
    for name, p in cpu.named_parameters():
        if "alpha_" in name:
            p.data.fill_(0.5)
    gpu = copy.deepcopy(cpu).cuda()
    x = [cat_input(label_spans={1: [[0, 11]], 2: [[17, 27]]})]
    with torch.no_grad():
        a, b = cpu(x)[0]["instances"], gpu(x)[0]["instances"].to("cpu")
    assert torch.equal(a.pred_labels, b.pred_labels)
    torch.testing.assert_close(b.scores, a.scores, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, atol=5e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_amp_training_step(dtype):
    model = tiny_model(seed=0).cuda().train()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.autocast("cuda", dtype=dtype):
        losses = model([cat_input()])
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values()), losses
    scaler.scale(sum(losses.values())).backward()
    scaler.step(opt)
    scaler.update()
