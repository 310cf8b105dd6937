"""AdamW over merged groups, the official full-model gradient clipping (norm 1.0 over every parameter,
inside optimizer.step), and the coarse stage's transformers-style AdamW update against hand-computed steps."""
import copy
import math

import pytest
import torch
from torch import nn

from conftest import tiny_cfg, tiny_model
from fiber_det.engine.optimizer import AdamWFullModelClip, AdamWTransformers, FullModelClipMixin, build_optimizer
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


@pytest.mark.parametrize("fused", [False, True])
def test_clipping_under_grad_scaler_acts_on_unscaled_gradients(fused):
    """GradScaler.step unscales before calling step(), so the clip sees the true gradients (also
    with the fused AdamW, which would otherwise take the scale into its kernel)."""
    model = TwoTensors()
    opt = build_optimizer(_clip_cfg(value=1.0, SOLVER__FUSED_OPTIMIZER=fused), model)
    assert bool(opt.defaults["fused"]) == fused
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
    with pytest.raises(ValueError, match="FUSED_OPTIMIZER"):
        build_optimizer(tiny_cfg(SOLVER__FUSED_OPTIMIZER=True, SOLVER__ADAMW__UPDATE="transformers"), TwoTensors())


# ---- the coarse stage's optimiser: transformers' AdamW update ----

def _hand_transformers_adamw(p, grads, lr, betas, eps, wd):
    """transformers.optimization.AdamW (correct_bias True), written out in float64 per element."""
    b1, b2 = betas
    m, v = [0.0] * len(p), [0.0] * len(p)
    p = list(p)
    for t, g in enumerate(grads, start=1):
        step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            p[i] = p[i] - step * m[i] / (math.sqrt(v[i]) + eps)
            p[i] = p[i] - lr * wd * p[i]  # decay after the step, on the updated weight
    return p


def _run(optimizer_cls, grads, **kwargs):
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = optimizer_cls([w], **kwargs)
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return w.detach().tolist()


GRADS = ([0.5, -1.0, 0.0], [0.1, 0.3, -2.0], [-0.2, 0.05, 1.0])


def test_transformers_adamw_matches_hand_computed_steps():
    # eps and wd large enough that their placement shows
    hyper = dict(lr=0.1, betas=(0.9, 0.98), eps=0.1, weight_decay=0.5)
    got = _run(AdamWTransformers, GRADS, **hyper)
    want = _hand_transformers_adamw([1.0, -2.0, 0.5], GRADS, 0.1, (0.9, 0.98), 0.1, 0.5)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (got, want)
    # torch's AdamW (eps after the bias correction, decay before the step) ends elsewhere
    torch_adamw = _run(torch.optim.AdamW, GRADS, **hyper)
    assert max(abs(a - b) for a, b in zip(torch_adamw, want)) > 1e-3, (torch_adamw, want)
    # without eps and weight decay the two are the same Adam (non-zero gradients: no 0/0)
    plain, grads = dict(lr=0.1, betas=(0.9, 0.98), eps=0.0, weight_decay=0.0), GRADS[1:]
    assert _run(AdamWTransformers, grads, **plain) == pytest.approx(_run(torch.optim.AdamW, grads, **plain), rel=1e-12)


def test_transformers_adamw_skips_parameters_without_gradient_and_counts_steps_per_parameter():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = AdamWTransformers([a, b], lr=0.1, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b, torch.ones(2)) and b not in opt.state  # no gradient: untouched, no decay
    assert opt.state[a]["step"] == 1
    b.grad = torch.ones(2)
    opt.step()
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1
    # b's first step has the bias correction of t = 1: the update is lr * sign(g) (up to eps), then decay
    assert torch.allclose(b, (1.0 - 0.1) * (1 - 0.1 * 0.01) * torch.ones(2), atol=1e-6)


def test_coarse_config_builds_the_official_coarse_optimizer():
    from coarse_inputs import coarse_cfg, coarse_model

    cfg = coarse_cfg(SOLVER__BASE_LR=1e-5)
    opt = build_optimizer(cfg, coarse_model())
    assert type(opt) is AdamWTransformers
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-8
    # the six official groups merge to four values: x1 / x5 LR, decayed or not
    assert sorted((g["lr"], g["weight_decay"]) for g in opt.param_groups) == [
        (1e-5, 0.0), (1e-5, 0.01), (5e-5, 0.0), (5e-5, 0.01)]
    clipped = build_optimizer(coarse_cfg(SOLVER__CLIP_GRADIENTS__ENABLED=True,
                                         SOLVER__CLIP_GRADIENTS__CLIP_TYPE="full_model"), coarse_model())
    assert isinstance(clipped, AdamWTransformers) and isinstance(clipped, FullModelClipMixin)
    with pytest.raises(ValueError, match="SOLVER.ADAMW.UPDATE"):
        build_optimizer(coarse_cfg(SOLVER__ADAMW__UPDATE="adam"), coarse_model())


def test_transformers_adamw_state_round_trip_continues_identically():
    def fresh():
        torch.manual_seed(0)
        return nn.Linear(3, 2)

    model, other = fresh(), fresh()
    opt = AdamWTransformers(model.parameters(), lr=0.01, betas=(0.9, 0.98), weight_decay=0.01)
    for seed in range(2):
        _random_grads(list(model.parameters()), seed)
        opt.step()
    other.load_state_dict(model.state_dict())
    resumed = AdamWTransformers(other.parameters(), lr=0.01, betas=(0.9, 0.98), weight_decay=0.01)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _random_grads(list(model.parameters()), 5)
    _random_grads(list(other.parameters()), 5)
    opt.step()
    resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert [s["step"] for s in resumed.state.values()] == [3, 3]


@pytest.mark.parametrize("clip", [None, "full_model", "norm"])
def test_fused_optimizer_updates_like_foreach(clip):
    """SOLVER.FUSED_OPTIMIZER: the same AdamW updates (lr, decay, bias-correction, clipping) up to
    float rounding, and an interchangeable state."""
    overrides = dict(SOLVER__BASE_LR=1e-3, SOLVER__LANG_LR=3e-4, SOLVER__WEIGHT_DECAY=0.05)
    cfgs = [(_clip_cfg(clip, 0.5, SOLVER__FUSED_OPTIMIZER=f, **overrides) if clip
             else tiny_cfg(SOLVER__FUSED_OPTIMIZER=f, **overrides)) for f in (False, True)]
    models = [small_tiny_model(), small_tiny_model()]
    opts = [build_optimizer(c, m) for c, m in zip(cfgs, models)]
    assert not opts[0].defaults["fused"] and opts[1].defaults["fused"]
    trainable = [[p for p in m.parameters() if p.requires_grad] for m in models]
    for step in range(3):
        for params, opt in zip(trainable, opts):
            _random_grads(params, seed=step)
            opt.step()
    moved = 0
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        diff = (a - b).abs().max().item()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), f"{name}: max |foreach - fused| = {diff:.3g}"
        moved += a.requires_grad
    assert moved > 10
    other = build_optimizer(cfgs[0], small_tiny_model())
    other.load_state_dict(opts[1].state_dict())  # a fused run's state resumes without it
    assert other.state_dict()["state"].keys() == opts[1].state_dict()["state"].keys()
