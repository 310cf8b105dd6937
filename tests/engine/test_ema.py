"""Model EMA (ema <- decay * ema + (1 - decay) * model, as upstream): update math on every state-dict entry, checkpointing, hook, swap."""
import copy

import pytest
import torch
from torch import nn

from conftest import tiny_model
from detectron2.checkpoint import Checkpointer
from detectron2.engine import TrainerBase
from fiber_det.engine.ema import EMAHook, ModelEMA, swap_to_ema


class Toy(nn.Module):
    """A float parameter, a float buffer, an int64 buffer and a non-persistent buffer."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.arange(6.0).view(2, 3) * scale)
            self.lin.bias.fill_(scale)
        self.register_buffer("running", torch.full((2,), 4.0 * scale))
        self.register_buffer("count", torch.tensor([10, 7, -3], dtype=torch.int64))
        self.register_buffer("scratch", torch.ones(1), persistent=False)


def test_update_math_on_every_entry():
    model = Toy()
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.lin.weight.add_(1.0)
        model.lin.bias.mul_(-2.0)
        model.running.fill_(8.0)
        model.count.copy_(torch.tensor([15, 7, 4]))
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(model)
    new = ema.state_dict()
    assert set(new) == {"lin.weight", "lin.bias", "running", "count"}
    for k in ("lin.weight", "lin.bias", "running"):
        # upstream's expression, bit for bit
        assert torch.equal(new[k], old[k] * 0.9 + (1.0 - 0.9) * model.state_dict()[k]), k
    # int64: upstream's float32 arithmetic, cast back by truncation: 10·0.9 + 15·0.1 = 10.5 -> 10,
    # 7·0.9 + 7·0.1 = 6.9999995 -> 6 (even a constant drifts), -3·0.9 + 4·0.1 = -2.3 -> -2
    assert new["count"].dtype == torch.int64
    assert new["count"].tolist() == [10, 6, -2]
    upstream = torch.empty_like(old["count"]).copy_(old["count"] * 0.9 + (1.0 - 0.9) * model.count)
    assert torch.equal(new["count"], upstream)


def test_copy_is_frozen_and_independent():
    model = Toy()
    model.train()
    ema = ModelEMA(model, decay=0.999)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    assert not torch.equal(ema.module.lin.weight, model.lin.weight)
    with pytest.raises(ValueError, match="MODEL.EMA.DECAY"):
        ModelEMA(model, decay=1.5)


def test_unwraps_data_parallel():
    model = Toy()
    wrapped = nn.DataParallel(model)  # same .module convention as DistributedDataParallel
    ema = ModelEMA(wrapped, decay=0.5)
    assert set(ema.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        model.running.fill_(0.0)
    ema.update(wrapped)
    assert torch.equal(ema.module.running, torch.full((2,), 2.0))


def test_state_round_trip_through_a_detectron2_checkpointer(tmp_path):
    model = Toy()
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.lin.weight.add_(3.0)
    ema.update(model)
    Checkpointer(model, str(tmp_path), model_ema=ema).save("ckpt")
    saved = torch.load(tmp_path / "ckpt.pth", map_location="cpu", weights_only=False)
    assert set(saved["model_ema"]) == {"lin.weight", "lin.bias", "running", "count"}

    other_model = Toy(scale=5.0)
    other = ModelEMA(other_model, decay=0.9)
    assert not other.restored
    Checkpointer(other_model, str(tmp_path), model_ema=other).load(str(tmp_path / "ckpt.pth"))
    assert other.restored
    for k, v in ema.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    with pytest.raises(RuntimeError):
        other.load_state_dict({"lin.weight": torch.zeros(2, 3)})


class _SGDTrainer(TrainerBase):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def run_step(self):
        self.optimizer.zero_grad()
        self.model.lin(torch.ones(1, 3)).pow(2).sum().backward()
        self.optimizer.step()


def test_hook_updates_after_every_step_from_the_loaded_weights():
    model = Toy()
    ema = ModelEMA(model, decay=0.8)
    with torch.no_grad():  # weights loaded after the EMA was built (e.g. MODEL.WEIGHTS)
        model.lin.weight.mul_(-1.0)
    expected = copy.deepcopy(model.state_dict())
    trainer = _SGDTrainer(model)

    class Track(EMAHook):
        def after_step(self):
            super().after_step()
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    expected[k] = expected[k] * 0.8 + (1.0 - 0.8) * v

    trainer.register_hooks([Track(ema)])
    trainer.train(0, 4)
    for k, v in expected.items():
        assert torch.equal(ema.state_dict()[k], v), k
    assert not torch.equal(ema.module.lin.weight, model.lin.weight)


def test_hook_keeps_a_restored_average():
    model = Toy()
    ema = ModelEMA(model, decay=0.8)
    ema.load_state_dict(Toy(scale=3.0).state_dict())
    EMAHook(ema, model=model).before_train()
    assert torch.equal(ema.module.running, torch.full((2,), 12.0))


def test_swap_to_ema_restores_the_model_exactly():
    model = Toy()
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.lin.weight.add_(2.0)
    ema.update(model)
    raw = copy.deepcopy(model.state_dict())
    averaged = copy.deepcopy(ema.state_dict())
    with swap_to_ema(model, ema) as swapped:
        assert swapped is model
        for k, v in averaged.items():
            assert torch.equal(model.state_dict()[k], v), k
    for k, v in raw.items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(KeyError, match="boom"):
        with swap_to_ema(model, ema):
            raise KeyError("boom")
    for k, v in raw.items():
        assert torch.equal(model.state_dict()[k], v), k
    for k, v in averaged.items():
        assert torch.equal(ema.state_dict()[k], v), k


def test_on_the_tiny_fiber_model():
    model = tiny_model()
    ema = ModelEMA(model, decay=0.999)
    keys = list(model.state_dict())
    assert list(ema.state_dict()) == keys
    with torch.no_grad():
        model.head.bias0.add_(1.0)
    before = ema.module.head.bias0.clone()
    ema.update(model)
    assert torch.equal(ema.module.head.bias0, before * 0.999 + (1.0 - 0.999) * model.head.bias0)
    with pytest.raises(KeyError, match="differ"):
        ema.update(Toy())
