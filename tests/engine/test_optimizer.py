"""AdamW over merged groups and the official full-model gradient clipping (norm 1.0 over every parameter, inside optimizer.step)."""
import copy

import pytest
import torch
from torch import nn

from conftest import tiny_cfg, tiny_model
from fiber_det.engine.optimizer import AdamWFullModelClip, build_optimizer
from fiber_det.engine.param_groups import build_param_groups_from_cfg


def _clip_cfg(clip_type="full_model", value=1.0, **overrides):
    return tiny_cfg(SOLVER__CLIP_GRADIENTS__ENABLED=True, SOLVER__CLIP_GRADIENTS__CLIP_TYPE=clip_type,
                    SOLVER__CLIP_GRADIENTS__CLIP_VALUE=value, **overrides)


def _random_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def small_tiny_model():
    """The tiny FIBER with its large tensors (> 4096 elements, 97 % of the elements) frozen, to
    keep CPU steps cheap; every kind of group keeps members."""
    model = tiny_model()
    for p in model.parameters():
        if p.numel() > 4096:
            p.requires_grad_(False)
    return model


class TwoTensors(nn.Module):
    """Parameters with known gradients: a (2,) weight and a (1,) scalar; names map to the head."""

    def __init__(self):
        super().__init__()
        self.head = nn.Module()
        self.head.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.head.s = nn.Parameter(torch.tensor([3.0]))


def test_plain_adamw_with_official_defaults():
    cfg = tiny_cfg(SOLVER__BASE_LR=1e-4, SOLVER__LANG_LR=1e-5, SOLVER__WEIGHT_DECAY=0.01)
    model = tiny_model()
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8 and opt.defaults["foreach"]
    expected = build_param_groups_from_cfg(cfg, model)
    assert [(g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups] == [
        (g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in expected
    ]


def test_merged_groups_update_like_one_group_per_parameter():
    """Merging groups by (lr, wd) must not change a single bit of the AdamW updates."""
    cfg = tiny_cfg(SOLVER__BASE_LR=1e-3, SOLVER__LANG_LR=3e-4, SOLVER__WEIGHT_DECAY=0.05)
    model = small_tiny_model()
    twin = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    merged = build_optimizer(cfg, model)
    twin_params = dict(twin.named_parameters())
    ours = {id(p): n for n, p in model.named_parameters()}
    singles = [
        {"params": [twin_params[ours[id(p)]]], "lr": g["lr"], "weight_decay": g["weight_decay"]}
        for g in merged.param_groups for p in g["params"]
    ]
    full = build_param_groups_from_cfg(cfg, tiny_model())
    assert [g["name"] for g in merged.param_groups] == [g["name"] for g in full]
    assert len(merged.param_groups) < len(singles)
    per_param = torch.optim.AdamW(singles, lr=cfg.SOLVER.BASE_LR, foreach=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for step in range(2):
        _random_grads([dict(model.named_parameters())[n] for n in trainable], seed=step)
        _random_grads([twin_params[n] for n in trainable], seed=step)
        merged.step()
        per_param.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, twin_params[n]), n
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, initial[n])]
    assert sorted(moved) == sorted(trainable)


def test_full_model_clipping_bounds_the_global_norm():
    model = TwoTensors()
    opt = build_optimizer(_clip_cfg(value=1.0), model)
    assert isinstance(opt, AdamWFullModelClip) and isinstance(opt, torch.optim.AdamW)
    model.head.w.grad = torch.tensor([3.0, 4.0])
    model.head.s.grad = torch.tensor([12.0])  # global norm 13, each tensor's norm > 1
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    # one global factor ~1/13 (clip_grad_norm_ divides by norm + 1e-6), not per-tensor clipping
    scale = 1.0 / (13.0 + 1e-6)
    assert torch.allclose(model.head.w.grad, torch.tensor([3.0, 4.0]) * scale, rtol=1e-6, atol=0)
    assert torch.allclose(model.head.s.grad, torch.tensor([12.0]) * scale, rtol=1e-6, atol=0)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    model.head.w.grad = torch.tensor([0.3, 0.4])
    model.head.s.grad = None  # a parameter without gradient is skipped, the rest is under the bound
    opt.step()
    assert torch.equal(model.head.w.grad, torch.tensor([0.3, 0.4]))


def test_per_parameter_clipping_is_detectron2s():
    model = TwoTensors()
    opt = build_optimizer(_clip_cfg("norm", 1.0), model)
    assert not isinstance(opt, AdamWFullModelClip) and isinstance(opt, torch.optim.AdamW)
    model.head.w.grad = torch.tensor([3.0, 4.0])
    model.head.s.grad = torch.tensor([12.0])
    opt.step()
    # each tensor clipped to norm 1 on its own
    assert torch.allclose(model.head.w.grad.norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(model.head.s.grad.norm(), torch.tensor(1.0), atol=1e-5)
    with pytest.raises(ValueError):
        build_optimizer(_clip_cfg("per_layer", 1.0), model)


def test_clipping_under_grad_scaler_acts_on_unscaled_gradients():
    """GradScaler.step unscales before calling step(), so the clip sees the true gradients."""
    model = TwoTensors()
    opt = build_optimizer(_clip_cfg(value=1.0), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    loss = (model.head.w * torch.tensor([3.0, 4.0])).sum() + 12.0 * model.head.s.sum()  # grads (3, 4), (12)
    scaler.scale(loss).backward()
    assert torch.equal(model.head.w.grad, torch.tensor([3.0, 4.0]) * 2.0**16)
    scaler.step(opt)
    scaler.update()
    # clipped after unscaling: global norm 1 (clipping the scaled grads first would leave 1/65536)
    total = torch.cat([model.head.w.grad, model.head.s.grad]).norm()
    assert abs(total.item() - 1.0) < 1e-5
    assert torch.allclose(model.head.w.grad, torch.tensor([3.0, 4.0]) / 13.0, rtol=1e-5)

    # an inf gradient: the scaler skips the step (and the clip) and lowers the scale
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model.head.w.sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**15


def test_state_dict_round_trip():
    cfg = _clip_cfg(value=0.5, SOLVER__BASE_LR=1e-3)
    model = small_tiny_model()
    opt = build_optimizer(cfg, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _random_grads(trainable, seed=0)
    opt.step()
    state = copy.deepcopy(opt.state_dict())

    other = build_optimizer(cfg, small_tiny_model())
    other.load_state_dict(state)
    assert other.max_norm == 0.5
    assert [g["name"] for g in other.param_groups] == [g["name"] for g in opt.param_groups]
    loaded = other.state_dict()
    assert loaded["state"].keys() == state["state"].keys()
    for k, v in state["state"].items():
        assert all(torch.equal(v[s], loaded["state"][k][s]) for s in ("exp_avg", "exp_avg_sq", "step"))


def test_refused_settings():
    with pytest.raises(ValueError, match="CLIP_VALUE"):
        build_optimizer(_clip_cfg(value=0.0), TwoTensors())
    with pytest.raises(ValueError, match="fused"):
        AdamWFullModelClip(TwoTensors().parameters(), max_norm=1.0, fused=True)
