"""The official image transforms (resize rule, legacy flip) as Detectron2 augmentations.

Detectron2's ``ResizeShortestEdge`` rounds the long side and ``HFlipTransform`` maps x -> W - x;
maskrcnn_benchmark truncates the long side and flips boxes with the legacy "+1" (x -> W - x - 1),
so both are re-expressed here. The resampling itself is Detectron2's ``ResizeTransform`` (PIL
bilinear on uint8 images, the same call torchvision's ``F.resize`` makes on a PIL image).
"""
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detectron2.data.transforms import Augmentation, HFlipTransform, NoOpTransform, ResizeTransform

__all__ = ["legacy_resize_size", "LegacyResize", "LegacyHFlipTransform", "LegacyRandomFlip", "build_transforms"]


def legacy_resize_size(height: int, width: int, size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """maskrcnn_benchmark's ``get_size``: the (new_height, new_width) of an image.

    The short side becomes ``size`` unless the long side would then exceed ``max_size`` (then
    size = int(round(max_size * short / long))); the long side is *truncated*, and an image whose
    short side already equals ``size`` is kept as is.

    Example:
        >>> legacy_resize_size(480, 640, 800, 1333)
        (800, 1066)
        >>> legacy_resize_size(300, 1000, 800, 1333)
        (400, 1333)
        >>> legacy_resize_size(2, 10000, 800, 1333)
        (1, 1333)
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max_size is not None and max_size > 0:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
            if size < 1:
                # more elongated than 2 * max_size : 1, the official rule rounds the short side to
                # 0 px (and fails); it keeps 1 px, the long side max_size (the model pads both)
                return (1, max_size) if height <= width else (max_size, 1)
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class LegacyResize(Augmentation):
    """Resize with the official size rule; the short side is drawn from ``short_edge_lengths``."""

    def __init__(self, short_edge_lengths: Sequence[int], max_size: int):
        """
        Args:
            short_edge_lengths: candidate short sides, one drawn uniformly per image (test: one).
            max_size: cap on the long side (1333 officially).
        """
        super().__init__()
        if isinstance(short_edge_lengths, int):
            short_edge_lengths = (short_edge_lengths,)
        if len(short_edge_lengths) == 0:
            raise ValueError("LegacyResize: short_edge_lengths is empty")
        self.short_edge_lengths = tuple(int(s) for s in short_edge_lengths)
        self.max_size = int(max_size)

    def get_transform(self, image: np.ndarray):
        h, w = image.shape[:2]
        size = self.short_edge_lengths[np.random.randint(len(self.short_edge_lengths))]
        new_h, new_w = legacy_resize_size(h, w, size, self.max_size)
        if (new_h, new_w) == (h, w):
            return NoOpTransform()
        return ResizeTransform(h, w, new_h, new_w, Image.BILINEAR)


class LegacyHFlipTransform(HFlipTransform):
    """Horizontal flip whose coordinates follow the legacy "+1" convention: x -> W - x - 1.

    Boxes (transformed through their corners) become x1' = W - x2 - 1, x2' = W - x1 - 1.
    """

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords[:, 0] = self.width - coords[:, 0] - 1
        return coords


class LegacyRandomFlip(Augmentation):
    """:class:`LegacyHFlipTransform` with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {prob}")
        self.prob = prob

    def get_transform(self, image: np.ndarray):
        if self.prob > 0 and np.random.rand() < self.prob:
            return LegacyHFlipTransform(image.shape[1])
        return NoOpTransform()


def build_transforms(cfg, is_train: bool):
    """The official pipeline: [LegacyResize, LegacyRandomFlip] in training, [LegacyResize] at test."""
    if is_train:
        return [
            LegacyResize(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN),
            LegacyRandomFlip(cfg.INPUT.FLIP_PROB),
        ]
    return [LegacyResize(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
