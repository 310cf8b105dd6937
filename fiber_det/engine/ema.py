"""Exponential moving average of a model's weights (the official MODEL_EMA option); not in Detectron2 core.

After every iteration every state-dict entry (parameters and persistent buffers) of a frozen
copy of the model is updated as ema ← decay·ema + (1 − decay)·model, with the same float
arithmetic as upstream: integer entries are computed in floating point and cast back
(truncated) on the copy, as upstream's ``copy_`` does.

Wiring into a Detectron2 trainer::

    ema = ModelEMA(model, cfg.MODEL.EMA.DECAY)
    checkpointer.add_checkpointable("model_ema", ema)   # saved / resumed with the model
    trainer.register_hooks([EMAHook(ema)])
    with swap_to_ema(model, ema):                       # when MODEL.EMA.USE_FOR_EVAL
        evaluate(model)
"""
import contextlib
import copy
import logging
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from detectron2.engine import HookBase

__all__ = ["unwrap_model", "ModelEMA", "EMAHook", "swap_to_ema"]

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, else ``model`` itself."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


class ModelEMA:
    """A frozen (eval mode, no grad) deep copy of a model holding the moving average.

    Args:
        model: the trained model (DDP-wrapped or not); the copy lives on its device.
        decay: MODEL.EMA.DECAY (official 0.999).

    Attributes:
        module: the averaged model (evaluate it directly, or see :func:`swap_to_ema`).
        restored: True once :meth:`load_state_dict` filled it (e.g. resuming a checkpoint).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"MODEL.EMA.DECAY must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self.restored = False

    def _paired_entries(self, model: nn.Module):
        """(ema entries, model entries) of the same keys, in state-dict order."""
        ema_sd = self.module.state_dict()
        model_sd = unwrap_model(model).state_dict()
        if ema_sd.keys() != model_sd.keys():
            missing, extra = sorted(ema_sd.keys() - model_sd.keys()), sorted(model_sd.keys() - ema_sd.keys())
            raise KeyError(f"EMA and model state dicts differ: only in EMA {missing[:5]}, only in model {extra[:5]}")
        return [ema_sd[k] for k in ema_sd], [model_sd[k].detach() for k in ema_sd]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema ← decay·ema + (1 − decay)·model for every state-dict entry."""
        d = self.decay
        ema_vals, model_vals = self._paired_entries(model)
        floats = [(e, m) for e, m in zip(ema_vals, model_vals) if e.is_floating_point()]
        if floats:
            ema_f = [e for e, _ in floats]
            # e·d and (1 − d)·m rounded separately then added: upstream's expression, batched
            torch._foreach_mul_(ema_f, d)
            torch._foreach_add_(ema_f, torch._foreach_mul([m.to(e.dtype) for e, m in floats], 1.0 - d))
        for e, m in zip(ema_vals, model_vals):
            if not e.is_floating_point():
                e.copy_(e * d + (1.0 - d) * m)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Copy the model's current state into the average (restart it)."""
        for e, m in zip(*self._paired_entries(model)):
            e.copy_(m)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged model's state dict (our parameter names; what a checkpoint stores as
        "model_ema")."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load a saved average (strict: every key of the model, nothing else)."""
        self.module.load_state_dict(state_dict, strict=True)
        self.restored = True


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every training step.

    Before training, an average that was not restored from a checkpoint is re-synchronised with
    the model: the trainer usually builds the EMA before the initial weights are loaded, while
    upstream starts the average from the loaded model.

    Args:
        ema: the average.
        model: the trained model; default ``trainer.model``.
    """

    def __init__(self, ema: ModelEMA, model: Optional[nn.Module] = None):
        self.ema = ema
        self._model = model

    def _get_model(self) -> nn.Module:
        return self._model if self._model is not None else self.trainer.model

    def before_train(self):
        if not self.ema.restored:
            logger.info("model EMA (decay %g) starts from the current model weights", self.ema.decay)
            self.ema.reset(self._get_model())

    def after_step(self):
        self.ema.update(self._get_model())


@contextlib.contextmanager
def swap_to_ema(model: nn.Module, ema: ModelEMA) -> Iterator[nn.Module]:
    """Temporarily give ``model`` the EMA weights (e.g. to evaluate them), restoring it after.

    The two state dicts exchange their contents entry by entry, so the extra memory is one
    tensor, and the model comes back bit-identical even if the body raises.

    Yields:
        ``model``, now holding the averaged weights.
    """
    ema_vals, model_vals = ema._paired_entries(model)

    @torch.no_grad()
    def exchange():
        for e, m in zip(ema_vals, model_vals):
            tmp = m.clone()
            m.copy_(e)
            e.copy_(tmp)

    exchange()
    try:
        yield model
    finally:
        exchange()
