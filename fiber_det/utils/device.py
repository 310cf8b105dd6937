"""The device to run on: the one asked for, except a CUDA device on a machine without CUDA."""
import logging

import torch

__all__ = ["resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """``requested`` (MODEL.DEVICE: "cpu", "cuda", "cuda:1", ...), or "cpu" with a warning when it
    names CUDA and CUDA is not available (Detectron2's default MODEL.DEVICE is "cuda")."""
    if str(requested).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE %s, but CUDA is not available: running on the CPU", requested)
        return "cpu"
    return str(requested)
