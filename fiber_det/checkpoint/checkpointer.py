"""Detectron2 checkpointer for fiber-det models: strict, and reads official FIBER files directly.

Detectron2's DetectionCheckpointer only logs missing, unexpected or mis-shaped keys (and
silently skips the mis-shaped ones). :class:`FiberCheckpointer` turns each into an error that
lists them, and converts an official (maskrcnn_benchmark) FIBER checkpoint on the fly with the
same rename table and checks as tools/convert_fiber_checkpoint.py.
"""
import logging
from typing import Iterable

import torch

from detectron2.checkpoint import DetectionCheckpointer

from .convert import ConversionError, convert_official_state_dict, list_problems, unwrap_checkpoint

__all__ = ["FiberCheckpointer", "CheckpointMismatchError", "is_official_checkpoint"]

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys do not fit the model; the message lists them."""


def is_official_checkpoint(checkpoint) -> bool:
    """True for a state dict with the official module names (``fusion_backbone.``, ``rpn.``)."""
    if not isinstance(checkpoint, dict):
        return False
    try:
        sd, _, _ = unwrap_checkpoint(checkpoint)
    except ConversionError:
        return False
    return any(k.startswith("fusion_backbone.") for k in sd)


class FiberCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that refuses incompatible checkpoints and accepts official ones.

    Args:
        allow_missing: prefixes of model keys that may be absent from the file (e.g. a partial
            initialisation such as the converted coarse-grained checkpoint: ``("backbone.fpn",
            "backbone.top_block", "head.", "backbone.bottom_up.vision.norm")``).
        use_ema: load the ``model_ema`` entry (official files and fiber_det training checkpoints)
            instead of ``model``; a file without it is an error.
    """

    def __init__(self, model, save_dir="", *, allow_missing: Iterable[str] = (), use_ema: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_missing = tuple(allow_missing)
        self.use_ema = use_ema

    def _load_file(self, filename):
        if not filename.endswith((".pth", ".pt")):
            return super()._load_file(filename)
        data = torch.load(filename, map_location="cpu", weights_only=True)
        if is_official_checkpoint(data):
            model = self.model.module if hasattr(self.model, "module") else self.model
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            sd, report = convert_official_state_dict(
                data, expected, use_ema=self.use_ema, anchors=model.anchor_generator.spec()
            )
            report.raise_if_errors()
            logger.info("converted official FIBER checkpoint %s: %s", filename, report.summary())
            return {"model": sd, "__author__": "official FIBER (converted on load)", "matching_heuristics": False}
        if self.use_ema:
            if "model_ema" not in data:
                raise KeyError(f"{filename}: no 'model_ema' entry to load EMA weights from (keys: {sorted(data)})")
            return {"model": data["model_ema"]}
        return data if "model" in data else {"model": data}

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        missing = [k for k in incompatible.missing_keys if not k.startswith(self.allow_missing)]
        report = list_problems({
            "missing key(s)": missing,
            "unexpected key(s)": incompatible.unexpected_keys,
            "mis-shaped key(s)": [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                                  for k, a, b in incompatible.incorrect_shapes],
        })
        if report:
            raise CheckpointMismatchError("checkpoint does not fit the model:\n" + report)
        return incompatible
