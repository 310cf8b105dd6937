"""Mixed precision: a training step of the tiny model under autocast gives finite losses, and the
deformable convolution and the losses stay in fp32 (upstream custom_fwd(cast_inputs=fp32))."""
import pytest
import torch
from model_inputs import cat_input

from conftest import tiny_model
from fiber_det.modeling.head.dyhead import ModulatedDeformConv3x3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_training_step(dtype):
    model = tiny_model(seed=0).train()
    seen = []
    hook = lambda m, i, o: seen.append(o.dtype)  # noqa: E731
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ModulatedDeformConv3x3)]
    with torch.autocast("cpu", dtype=dtype):
        losses = model([cat_input()])
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.float32}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
