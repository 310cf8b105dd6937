"""Detectron2 checkpointer for fiber-det models: safe, strict, atomic, and reads official FIBER files.

Detectron2's DetectionCheckpointer unpickles ``.pkl`` files with full pickle (a crafted file runs
code), only logs missing, unexpected or mis-shaped keys (and silently skips the mis-shaped ones)
and writes checkpoints in place (a kill or a full disk leaves a truncated file). :class:`FiberCheckpointer`
reads every file with :func:`fiber_det.utils.safe_load.load_checkpoint_file` (tensors, numpy
arrays and containers only), turns each key problem into an error that lists them, writes to a
temporary file renamed into place before ``last_checkpoint`` changes, and converts an official
(maskrcnn_benchmark) FIBER checkpoint on the fly with the same rename table and checks as
tools/convert_fiber_checkpoint.py. A coarse model's checkpoint initialises the detector's towers
(converted on load) or another coarse model (position tables of another image size resized,
heads of objectives the model lacks dropped).
"""
import logging
import os
from typing import Callable, Iterable, IO

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..utils.safe_load import PICKLE_EXTENSIONS, load_checkpoint_file
from .coarse import adapt_coarse_state_dict, convert_coarse_state_dict, is_coarse_state_dict
from .convert import ConversionError, convert_official_state_dict, list_problems, unwrap_checkpoint

__all__ = ["FiberCheckpointer", "CheckpointMismatchError", "is_official_checkpoint", "atomic_write"]

logger = logging.getLogger(__name__)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, flushes it to disk and renames it to
    ``path``: readers see the old file or the complete new one, never a part (a kill or a full
    disk while writing leaves ``path`` as it was). The temporary file is removed on errors."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # the rename itself reaches the disk with the folder's entry
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


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

    def save(self, name: str, **kwargs) -> None:
        """fvcore's save, written atomically (:func:`atomic_write`), ``last_checkpoint`` after it.

        The state dicts are taken on every process (a FiberTrainer gathers each process's data
        position and RNG states then), so with several processes every one must call ``save``;
        only the main one writes.
        """
        if not self.save_dir:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        if not self.save_to_disk:
            return
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename):
        if filename.endswith(".pyth"):  # pycls: Detectron2 reads it with torch.load (weights_only by default)
            return super()._load_file(filename)
        data = load_checkpoint_file(filename)
        if filename.endswith(PICKLE_EXTENSIONS):
            return _detectron2_pickle_layout(data, filename)
        if not isinstance(data, dict):
            raise CheckpointMismatchError(f"{filename}: a checkpoint holds a dict, this file holds a {type(data).__name__}")
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
        checkpoint = data if "model" in data else {"model": data}
        return self._from_coarse(checkpoint, filename)

    def _from_coarse(self, checkpoint: dict, filename: str) -> dict:
        """A coarse model's checkpoint, adapted on load as the official loaders do: into the
        detector, its towers (converted, the rest of the detector stays fresh); into another
        coarse model, :func:`~fiber_det.checkpoint.coarse.adapt_coarse_state_dict` (position tables
        of another image size resized, heads the model lacks dropped). Others: unchanged."""
        sd = checkpoint["model"]
        if not isinstance(sd, dict) or not is_coarse_state_dict(sd):
            return checkpoint
        model = self.model.module if hasattr(self.model, "module") else self.model
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if any(k.startswith("backbone.bottom_up.") for k in expected):
            new_sd, report = convert_coarse_state_dict(checkpoint, expected)
            report.raise_if_errors()
            logger.info("initialising the detector from the coarse checkpoint %s: %s", filename, report.summary())
            return {"model": new_sd, "__author__": f"coarse checkpoint {filename} (converted on load)",
                    "matching_heuristics": False, "fresh_keys": report.fresh}
        new_sd, notes = adapt_coarse_state_dict(sd, expected)
        if notes:
            logger.info("%s, adapted to this coarse model:\n  %s", filename, "\n  ".join(notes))
        return {**checkpoint, "model": new_sd}

    def _load_model(self, checkpoint):
        # a coarse-grained initialisation leaves the detector's FPN, head and Swin output norms
        # fresh; its file (converted on load, or by tools/convert_fiber_checkpoint.py) lists them
        fresh = set(checkpoint.pop("fresh_keys", None) or ())
        incompatible = super()._load_model(checkpoint)
        missing = [k for k in incompatible.missing_keys if not k.startswith(self.allow_missing) and k not in fresh]
        if fresh:
            logger.info("%d model tensors stay at their initialisation (not in a coarse checkpoint)", len(fresh))
        report = list_problems({
            "missing key(s)": missing,
            "unexpected key(s)": incompatible.unexpected_keys,
            "mis-shaped key(s)": [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                                  for k, a, b in incompatible.incorrect_shapes],
        })
        if report:
            raise CheckpointMismatchError("checkpoint does not fit the model:\n" + report)
        return incompatible


def _detectron2_pickle_layout(data, filename: str) -> dict:
    """The checkpoint dict Detectron2 0.6 makes of a safely unpickled ``.pkl`` (its own reader uses
    full pickle): model-zoo files ({"model", "__author__", ...}) as they are; Caffe2 / Detectron1
    files are a (possibly "blobs"-nested) dict of arrays, loaded with name matching."""
    if not isinstance(data, dict):
        raise CheckpointMismatchError(f"{filename}: a .pkl checkpoint holds a dict, this file holds a {type(data).__name__}")
    if "model" in data and "__author__" in data:
        logger.info("Reading a file from '%s'", data["__author__"])
        return data
    data = data.get("blobs", data)
    return {"model": {k: v for k, v in data.items() if not k.endswith("_momentum")}, "__author__": "Caffe2",
            "matching_heuristics": True}
