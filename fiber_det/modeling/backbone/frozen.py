"""Frozen parts of a tower (Detectron2's FREEZE_AT convention), shared by the Swin and the text encoder."""
from typing import Iterable

from torch import nn

__all__ = ["FrozenModulesMixin"]


class FrozenModulesMixin:
    """Put before ``nn.Module``: :meth:`freeze_modules` turns the given sub-modules' gradients off,
    and they stay in eval mode (no dropout or drop path) whatever ``train()`` is called with, as
    Detectron2's frozen stages do, so a frozen part is a fixed function of its input."""

    def freeze_modules(self, modules: Iterable[nn.Module]) -> None:
        self._frozen = list(modules)
        for m in self._frozen:
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self, "_frozen", []):
            m.eval()
        return self
