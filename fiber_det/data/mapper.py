"""GroundingDatasetMapper: one dataset dict -> one FIBER model input.

Reads the image (uint8 BGR), applies the official resize rule and legacy flip
(:mod:`fiber_det.data.transforms`), converts boxes with the official "-1" (x2 = x + w - 1) and
makes the image's ``prompts`` (a tuple of :class:`~fiber_det.data.prompt.Prompt`): a category
caption from the dataset's metadata (``prompt_mode``: all categories or sampled negatives, see
:mod:`.training_prompts`) or the grounding sentence verbatim. Training inputs carry one prompt and
``instances`` with ``gt_boxes`` and binary ``gt_positive_map`` rows (the tokens of each box's
label); test inputs carry one prompt, or several for a vocabulary too long for one caption
(:meth:`~fiber_det.data.prompt.PromptBuilder.chunks`). Every other field of the dataset dict is
passed through unchanged.

Images without boxes are kept: the trainer skips batches with too many of them; the
detection-only empty-image filter of the official COCO loader lives in :mod:`.build`.
"""
import copy
import random
from typing import Dict, List, Sequence

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import check_image_size
from detectron2.structures import Boxes, BoxMode, Instances

from .image_io import read_image
from .prompt import PromptBuilder, box_spans, grounding_phrases
from .training_prompts import (
    all_categories_prompt,
    grounding_prompt,
    name_token_counts,
    negative_count,
    sampled_negatives_prompt,
)
from .transforms import build_transforms

__all__ = ["GroundingDatasetMapper", "legacy_xyxy_boxes"]

PROMPT_MODES = ("all_categories", "sampled_negatives")


def legacy_xyxy_boxes(annotations: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Annotation boxes -> (N, 4) float32 legacy xyxy in the original frame, as the official
    loader converts them.

    x2 = x + w - 1, y2 = y + h - 1, then x clamped to [0, W - 1] and y to [0, H - 1]. Boxes in
    another absolute mode are first converted to XYWH_ABS with detectron2's ``BoxMode``.
    """
    boxes = np.zeros((len(annotations), 4), dtype=np.float32)
    for i, ann in enumerate(annotations):
        boxes[i] = BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYWH_ABS)
    boxes[:, 2:] += boxes[:, :2] - 1
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height - 1)
    return boxes


def _context(dataset_dict: dict) -> str:
    return f"image '{dataset_dict.get('file_name')}' (image_id {dataset_dict.get('image_id')})"


class GroundingDatasetMapper:
    """Dataset dict (fiber_det contract, datasets/README.md) -> model input (see the
    meta-architecture docstring)."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[T.Augmentation],
        prompt_builder: PromptBuilder,
        shuffle: bool = True,
        max_negatives: int = 85,
        control_prob: Sequence[float] = (0.0, 0.0, 1.0, 0.0),
        use_caption_prompt: bool = False,
        chunk_size: int = 0,
    ):
        """
        Args:
            is_train: training (boxes, positive maps, random captions) or test (fixed prompts).
            augmentations: detectron2 augmentations (``build_transforms``).
            prompt_builder: makes the prompts with the model's tokenizer; its ``max_length``
                (MODEL.FIBER.TEXT.MAX_QUERY_LEN) is also the token width of the positive maps.
            shuffle, max_negatives, control_prob, use_caption_prompt: DATASETS.PROMPT.*.
            chunk_size: TEST.CHUNK_SIZE, categories per test prompt (0 = split only when needed).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.prompt_builder = prompt_builder
        self.shuffle = bool(shuffle)
        self.max_negatives = int(max_negatives)
        self.control_prob = tuple(float(p) for p in control_prob)
        self.use_caption_prompt = bool(use_caption_prompt)
        self.chunk_size = int(chunk_size)
        try:  # fail at construction, not in a data-loader worker
            negative_count(self.control_prob, 0, random.Random(0))
        except ValueError as e:
            raise ValueError(f"DATASETS.PROMPT.CONTROL_PROB: {e}") from e
        self._vocabularies: Dict[str, dict] = {}
        self._test_prompts: Dict[str, tuple] = {}

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if cfg.INPUT.FORMAT != "BGR":
            raise ValueError(
                f"INPUT.FORMAT must be 'BGR' (the model normalises BGR images), got {cfg.INPUT.FORMAT!r}"
            )
        p = cfg.DATASETS.PROMPT
        return {
            "is_train": is_train,
            "augmentations": build_transforms(cfg, is_train),
            "prompt_builder": PromptBuilder(cfg),
            "shuffle": p.SHUFFLE,
            "max_negatives": p.MAX_NEGATIVES,
            "control_prob": p.CONTROL_PROB,
            "use_caption_prompt": p.USE_CAPTION_PROMPT,
            "chunk_size": cfg.TEST.CHUNK_SIZE,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        """Maps one dataset dict; the input is not modified."""
        record = copy.deepcopy(dataset_dict)
        for key in ("file_name", "height", "width", "image_id", "task"):
            if key not in record:
                raise ValueError(f"dataset dict of {_context(record)} has no '{key}' field")
        if record["task"] not in ("detection", "grounding"):
            raise ValueError(f"{_context(record)}: task must be 'detection' or 'grounding', got {record['task']!r}")
        image = read_image(record["file_name"], "BGR")
        check_image_size(record, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.is_train:
            record.update(self._training_targets(record, transforms, image.shape[:2]))
        elif record["task"] == "detection":
            record["prompts"] = self._detection_test_prompts(record)
        else:
            record["prompts"] = (self._grounding_test_prompt(record),)
        return record

    # ---- metadata ----
    def _vocabulary(self, record: dict) -> dict:
        """Category names, prompt mode and caption prompt of a detection dataset (cached)."""
        name = record.get("dataset")
        if name is None:
            raise ValueError(
                f"detection dataset dict of {_context(record)} has no 'dataset' field (the registered name)"
            )
        if name not in self._vocabularies:
            meta = MetadataCatalog.get(name)
            classes = meta.get("thing_classes", None)
            if not classes:
                raise ValueError(f"dataset '{name}': metadata has no thing_classes; a detection prompt needs them")
            mode = meta.get("prompt_mode", None)
            if self.is_train and mode not in PROMPT_MODES:
                raise ValueError(
                    f"dataset '{name}': metadata prompt_mode must be one of {PROMPT_MODES}, got {mode!r}"
                )
            caption_prompt = meta.get("caption_prompt", None) if self.use_caption_prompt else None
            self._vocabularies[name] = {
                "names": {k + 1: c for k, c in enumerate(classes)},  # label = contiguous id + 1
                "mode": mode,
                "caption_prompt": caption_prompt,
                "token_counts": None,
            }
        return self._vocabularies[name]

    # ---- training ----
    def _training_caption(self, record: dict, annotations: List[dict]):
        """The caption and the label of every kept box (TrainingCaption)."""
        if record["task"] == "grounding":
            if "caption" not in record:
                raise ValueError(f"grounding dataset dict of {_context(record)} has no 'caption'")
            spans = [box_spans(ann) for ann in annotations]
            for i, box in enumerate(spans):
                if box is None:
                    raise ValueError(f"{_context(record)}: annotation {i} has no caption spans ('tokens_positive')")
            return grounding_prompt(record["caption"], spans)
        vocab = self._vocabulary(record)
        labels = [int(a["category_id"]) + 1 for a in annotations]
        rng = random.Random(np.random.randint(2**31))  # detectron2 seeds np.random per worker
        if vocab["mode"] == "all_categories":
            if vocab["caption_prompt"] is not None and self.shuffle:
                raise ValueError(
                    f"dataset '{record['dataset']}': its caption_prompt needs DATASETS.PROMPT.SHUFFLE False "
                    "(or DATASETS.PROMPT.USE_CAPTION_PROMPT False)"
                )
            return all_categories_prompt(
                vocab["names"], labels, rng, self.shuffle, self.prompt_builder.separator, vocab["caption_prompt"]
            )
        if vocab["caption_prompt"] is not None:
            raise ValueError(f"dataset '{record['dataset']}': caption_prompt is not supported with sampled_negatives")
        builder = self.prompt_builder
        if vocab["token_counts"] is None:
            vocab["token_counts"] = name_token_counts(vocab["names"], builder.tokenizer, builder.separator)
        return sampled_negatives_prompt(
            vocab["names"], labels, builder, rng, self.max_negatives, self.control_prob, vocab["token_counts"],
        )

    def _training_targets(self, record: dict, transforms, image_hw) -> dict:
        if "annotations" not in record:
            raise ValueError(f"dataset dict of {_context(record)} has no 'annotations' (needed for training)")
        annotations = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
        caption = self._training_caption(record, annotations)
        builder = self.prompt_builder
        if record["task"] == "detection" and not builder.fits(caption.caption):
            raise ValueError(
                f"dataset '{record['dataset']}': the all-categories caption has {builder.num_tokens(caption.caption)} "
                f"tokens > MODEL.FIBER.TEXT.MAX_QUERY_LEN {builder.max_length}; use prompt_mode 'sampled_negatives'"
            )
        # grounding captions are read up to the cut, as upstream; spans past it mark nothing
        prompt = builder.build(caption.caption, caption.spans, training=True)
        annotations = [annotations[i] for i in caption.kept]
        boxes = legacy_xyxy_boxes(annotations, record["height"], record["width"])
        valid = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        boxes = transforms.apply_box(boxes[valid]) if len(valid) else boxes[:0]
        instances = Instances(tuple(image_hw))
        instances.gt_boxes = Boxes(torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4))
        instances.gt_positive_map = prompt.positive_map([caption.box_labels[i] for i in valid], builder.max_length)
        return {"prompts": (prompt,), "instances": instances}

    # ---- test ----
    def _detection_test_prompts(self, record: dict) -> tuple:
        """The dataset's category prompts (one, or the chunks of a long vocabulary), made once."""
        name = record.get("dataset")
        if name not in self._test_prompts:
            vocab = self._vocabulary(record)
            self._test_prompts[name] = self.prompt_builder.chunks(vocab["names"], self.chunk_size, vocab["caption_prompt"])
        return self._test_prompts[name]

    def _grounding_test_prompt(self, record: dict):
        """The sentence with label j + 1 = phrase j (:func:`~fiber_det.data.prompt.grounding_phrases`)."""
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"grounding dataset dict of {_context(record)} has no caption")
        phrases = grounding_phrases(record)
        if not phrases:
            raise ValueError(f"{_context(record)}: no phrase to evaluate ('tokens_positive_eval' is missing or empty)")
        for j, spans in enumerate(phrases):
            if not spans:
                raise ValueError(f"{_context(record)}: phrase {j} ('tokens_positive_eval[{j}]') has no span")
        try:
            return self.prompt_builder.build(caption, {j + 1: spans for j, spans in enumerate(phrases)})
        except ValueError as e:
            raise ValueError(f"{_context(record)}: {e}") from e
