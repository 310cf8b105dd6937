"""The coarse model on CUDA: the same features and losses as on CPU (TF32 off), and a bf16
autocast training step; skipped without a GPU.

Run on a GPU machine with: python -m pytest -q tests/modeling/coarse/test_cuda_coarse.py
"""
import copy

import pytest
import torch

from coarse_inputs import coarse_model, pair_inputs

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("no_tf32")]


def _no_dropout():
    return coarse_model(MODEL__FIBER__SWIN__DROP_PATH_RATE=0.0, MODEL__FIBER__TEXT__DROPOUT=0.0,
                        MODEL__FIBER__TEXT__ATTENTION_DROPOUT=0.0)


def test_cpu_vs_cuda():
    cpu = _no_dropout()
    gpu = copy.deepcopy(cpu).cuda()
    batch = pair_inputs(cpu)
    with torch.no_grad():
        a, b = cpu.eval()(batch), gpu.eval()(batch)
        torch.testing.assert_close(cpu.itm_score_matrix(batch, batch), gpu.itm_score_matrix(batch, batch),
                                   atol=2e-5, rtol=1e-4)
    for x, y in zip(a, b):
        for k in x:
            torch.testing.assert_close(y[k].cpu(), x[k], atol=2e-5, rtol=1e-4)
    cpu.train(), gpu.train()
    images = cpu.preprocess_images(batch)
    ids, mask = cpu.text_inputs(batch)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    # only MLM and ITC: the hard negatives come from different generators on the two devices
    cpu.use_itm = gpu.use_itm = False
    lc = cpu.losses(images, ids, mask, ids, labels)
    lg = gpu.losses(images.cuda(), ids.cuda(), mask.cuda(), ids.cuda(), labels.cuda())
    for k in lc:
        torch.testing.assert_close(lg[k].cpu(), lc[k].detach(), atol=2e-5, rtol=1e-5)
    assert torch.equal(gpu.queue.queue_ptr.cpu(), cpu.queue.queue_ptr)


def test_bf16_autocast_training_step():
    model = coarse_model().cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(pair_inputs(model))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert int(model.queue.queue_total) == 3 and model.queue.image_queue.dtype == torch.float32
