"""ImageCaptionMapper: one caption dataset dict -> one coarse-model input.

Input: the dicts of :mod:`fiber_det.data.datasets.caption_pairs` (one per (image, caption) pair), or
the items of its evaluation view :func:`~fiber_det.data.datasets.caption_pairs.retrieval_items`
(``"modality"`` "image" or "text"). Output, per item:

- ``"image"``: uint8 (3, S, S) RGB tensor (S = ``MODEL.FIBER.COARSE.IMAGE_SIZE``), already
  resized (and augmented in training, ``INPUT.CAPTION_TRANSFORM``); the model divides by 255 and
  normalises with the ImageNet mean/std. ``"height"``/``"width"``: S.
- ``"input_ids"``, ``"attention_mask"``, ``"special_tokens_mask"``: int64 (L,) with L =
  ``MODEL.FIBER.TEXT.MAX_QUERY_LEN``: ``<s>`` caption ``</s>``, truncated, padded to L (pads are
  special tokens), as the official per-caption tokenisation. MLM masking is the model's job.
- ``"image_index"``, ``"caption_index"`` (ints), ``"image_id"``, ``"caption"`` (str),
  ``"dataset"``; evaluation items carry ``"modality"`` and only their half: an image item has
  no text fields and no ``caption_index``, a text item has no image.

A pair (training, or an ITM pass) has both halves. With ``false_images`` (training ITM without
ITC: random negatives), a training pair also gets ``"false_image"``: the image of a dataset entry
drawn uniformly with python's ``random`` (seeded per sample by the training loader), as the
official data sets draw their ``false_image_0``; it may be the pair's own image.

An image that cannot be read is an error
naming the file and the dataset line/row at test time; in training it is skipped (the mapper
returns None, so Detectron2's dataset draws another item), counted and logged with its source.

The tokenizer is the fast tokenizer of ``MODEL.FIBER.TEXT.TOKENIZER``; for RoBERTa's BPE it gives
the same ids as the slow ``RobertaTokenizer`` the official code uses.
"""
import io
import logging
import random
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable

from .caption_transforms import CAPTION_TRANSFORMS, build_caption_transform
from .datasets.caption_pairs import read_arrow_image
from .image_io import read_image
from .prompt import _tokenizer_at

__all__ = ["ImageCaptionMapper", "read_caption_image"]

logger = logging.getLogger(__name__)

_MODALITIES = (None, "image", "text")


def read_caption_image(record: dict) -> Image.Image:
    """The RGB PIL image of a caption dataset dict (a file, or bytes of an Arrow row).

    Decoding goes through the project's image reader (:func:`fiber_det.data.image_io.read_image`),
    so every path of the project reads a file the same way.

    Raises:
        FileNotFoundError, ValueError: naming the dataset entry (``source``) and the file.
    """
    source = record.get("source", "?")
    if "arrow_file" in record:
        where = f"{source} (image bytes of {record['arrow_file']}, row {record['arrow_row']})"
        try:
            bgr = read_image(io.BytesIO(read_arrow_image(record["arrow_file"], record["arrow_row"])), name=where)
        except (ValueError, IndexError) as e:
            raise ValueError(f"{where}: cannot decode the image ({e.__cause__ or e})") from e
    elif "file_name" in record:
        try:
            bgr = read_image(record["file_name"])
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{source}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
    else:
        raise ValueError(f"{source}: the dataset dict has neither 'file_name' nor 'arrow_file'")
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))


class ImageCaptionMapper:
    """Caption dataset dict -> coarse-model input (see the module docstring for the contract)."""

    @configurable
    def __init__(self, is_train: bool, *, transform: Callable, image_size: int, tokenizer, max_length: int,
                 false_images: Optional[Sequence[dict]] = None):
        """
        Args:
            is_train: training (bad images are skipped) or test (they raise).
            transform: RGB PIL image -> uint8 (3, S, S) tensor (:func:`build_caption_transform`).
            image_size: S, reported as the output's height and width.
            tokenizer: a Hugging Face tokenizer (fast).
            max_length: L, the padded and truncated token count.
            false_images: the training dataset dicts to draw each pair's random "false_image"
                from (ITM with random negatives); None: no false image.
        """
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <s> and </s>, got {max_length}")
        self.is_train = is_train
        self.transform = transform
        self.image_size = int(image_size)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.false_images = false_images
        self.skipped = 0  # training items skipped for an unreadable image, in this process

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(
                f"INPUT.FORMAT must be 'RGB' for image-caption data (the coarse model normalises RGB "
                f"images), got {cfg.INPUT.FORMAT!r}")
        text = cfg.MODEL.FIBER.TEXT
        if not text.TOKENIZER:
            raise ValueError("MODEL.FIBER.TEXT.TOKENIZER is empty: the mapper needs the model's tokenizer folder")
        name = cfg.INPUT.CAPTION_TRANSFORM if is_train else "albef"
        if name not in CAPTION_TRANSFORMS:
            raise ValueError(f"INPUT.CAPTION_TRANSFORM must be one of {CAPTION_TRANSFORMS}, got {name!r}")
        size = cfg.MODEL.FIBER.COARSE.IMAGE_SIZE
        return {
            "is_train": is_train,
            "transform": build_caption_transform(name, size),
            "image_size": size,
            "tokenizer": _tokenizer_at(text.TOKENIZER),
            "max_length": text.MAX_QUERY_LEN,
        }

    def __call__(self, record: dict) -> Optional[dict]:
        """Maps one dict (not modified); None for a skipped training item."""
        modality = record.get("modality")
        if modality not in _MODALITIES:
            raise ValueError(f"{record.get('source', '?')}: 'modality' must be 'image' or 'text', got {modality!r}")
        out = {k: record[k] for k in ("dataset", "image_id", "image_index") if k in record}
        if modality is not None:
            out["modality"] = modality
        if modality != "text":
            image = self._image(record)
            if image is None:
                return None
            out.update(image=image, height=self.image_size, width=self.image_size)
            if self.false_images is not None and modality is None:
                false_image = self._image(self.false_images[random.randint(0, len(self.false_images) - 1)])
                if false_image is None:
                    return None
                out["false_image"] = false_image
        if modality != "image":
            out.update(self._text(record))
        return out

    def _image(self, record: dict) -> Optional[torch.Tensor]:
        try:
            return self.transform(read_caption_image(record))
        except (FileNotFoundError, ValueError) as e:
            if not self.is_train:
                raise
            self.skipped += 1
            logger.warning("skipped a training item (%d so far in this process): %s", self.skipped, e)
            return None

    def _text(self, record: dict) -> dict:
        caption = record.get("caption")
        if not isinstance(caption, str):
            raise ValueError(f"{record.get('source', '?')}: the dataset dict has no caption string")
        encoded = self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_special_tokens_mask=True)
        out = {k: torch.as_tensor(encoded[k], dtype=torch.int64)
               for k in ("input_ids", "attention_mask", "special_tokens_mask")}
        out.update(caption=caption, caption_index=record["caption_index"])
        return out
