"""GroundingDatasetMapper: one dataset dict -> one FIBER model input (spec §7).

Reads the image (uint8 BGR), applies the official resize rule and legacy flip
(:mod:`fiber_det.data.transforms`), converts boxes with the official "-1" (spec §7.4) and builds
the caption: a detection prompt from the dataset's metadata (``prompt_mode``, spec §7.2 (a)/(b))
or the grounding sentence verbatim (§7.2 (c)). Training inputs carry ``instances`` with
``gt_boxes`` and binary ``gt_positive_map`` rows (spec §5.1); test inputs carry the label map of
the prompt(s). Every other field of the dataset dict is passed through unchanged.

Images without boxes are kept: the trainer skips batches with too many of them (spec §5.5); the
detection-only empty-image filter of the official COCO loader lives in :mod:`.build`.
"""
import copy
import functools
import random
from typing import Dict, List, Sequence

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import check_image_size
from detectron2.structures import Boxes, BoxMode, Instances

from ..utils.paths import resolve_path
from .image_io import read_image
from .prompts import build_detection_prompt, chunk_category_prompts
from .training_prompts import (
    all_categories_prompt,
    grounding_prompt,
    name_token_counts,
    negative_count,
    sampled_negatives_prompt,
)
from .tokenization import build_tokenizer, check_span, create_positive_map
from .transforms import build_transforms

__all__ = ["GroundingDatasetMapper", "legacy_xyxy_boxes"]

PROMPT_MODES = ("all_categories", "sampled_negatives")


def legacy_xyxy_boxes(annotations: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Annotation boxes -> (N, 4) float32 legacy xyxy in the original frame (spec §7.4).

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


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str):
    return build_tokenizer(resolve_path(path))


def _context(dataset_dict: dict) -> str:
    return f"image '{dataset_dict.get('file_name')}' (image_id {dataset_dict.get('image_id')})"


class GroundingDatasetMapper:
    """Dataset dict (fiber_det contract) -> model input (see the meta-architecture docstring)."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[T.Augmentation],
        tokenizer,
        max_query_len: int = 256,
        separator: str = ". ",
        shuffle: bool = True,
        max_negatives: int = 85,
        control_prob: Sequence[float] = (0.0, 0.0, 1.0, 0.0),
        use_caption_prompt: bool = False,
        chunk_size: int = 0,
    ):
        """
        Args:
            is_train: training (boxes, positive maps, random prompts) or test (label maps).
            augmentations: detectron2 augmentations (``build_transforms``).
            tokenizer: the model's fast tokenizer.
            max_query_len: MODEL.FIBER.TEXT.MAX_QUERY_LEN (token columns of the positive map).
            separator, shuffle, max_negatives, control_prob, use_caption_prompt: DATASETS.PROMPT.*.
            chunk_size: TEST.CHUNK_SIZE, categories per test prompt (0 = split only when needed).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.tokenizer = tokenizer
        self.max_query_len = int(max_query_len)
        self.separator = separator
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
        self._test_prompts: Dict[str, dict] = {}

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if cfg.INPUT.FORMAT != "BGR":
            raise ValueError(
                f"INPUT.FORMAT must be 'BGR' (the model normalises BGR images), got {cfg.INPUT.FORMAT!r}"
            )
        text = cfg.MODEL.FIBER.TEXT
        if not text.TOKENIZER:
            raise ValueError("MODEL.FIBER.TEXT.TOKENIZER is empty: the mapper needs the model's tokenizer folder")
        p = cfg.DATASETS.PROMPT
        return {
            "is_train": is_train,
            "augmentations": build_transforms(cfg, is_train),
            "tokenizer": _tokenizer_at(text.TOKENIZER),
            "max_query_len": text.MAX_QUERY_LEN,
            "separator": p.SEPARATOR,
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
            record.update(copy.deepcopy(self._detection_test_prompt(record)))
        else:
            record.update(self._grounding_test_prompt(record))
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
        """The caption and the prompt's view of the boxes (TrainingPrompt)."""
        if record["task"] == "grounding":
            if "caption" not in record:
                raise ValueError(f"grounding dataset dict of {_context(record)} has no 'caption'")
            for i, ann in enumerate(annotations):
                if "tokens_positive" not in ann:
                    raise ValueError(f"{_context(record)}: annotation {i} has no 'tokens_positive'")
            return grounding_prompt(record["caption"], [a["tokens_positive"] for a in annotations])
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
                vocab["names"], labels, rng, self.shuffle, self.separator, vocab["caption_prompt"]
            )
        if vocab["caption_prompt"] is not None:
            raise ValueError(f"dataset '{record['dataset']}': caption_prompt is not supported with sampled_negatives")
        if vocab["token_counts"] is None:
            vocab["token_counts"] = name_token_counts(vocab["names"], self.tokenizer, self.separator)
        return sampled_negatives_prompt(
            vocab["names"], labels, self.tokenizer, rng, self.max_query_len, self.max_negatives,
            self.control_prob, self.separator, vocab["token_counts"],
        )

    def _training_targets(self, record: dict, transforms, image_hw) -> dict:
        if "annotations" not in record:
            raise ValueError(f"dataset dict of {_context(record)} has no 'annotations' (needed for training)")
        annotations = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
        prompt = self._training_caption(record, annotations)
        annotations = [annotations[i] for i in prompt.kept]
        boxes = legacy_xyxy_boxes(annotations, record["height"], record["width"])
        valid = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        boxes = transforms.apply_box(boxes[valid]) if len(valid) else boxes[:0]
        spans = [prompt.tokens_positive[i] for i in valid]
        if record["task"] == "detection":
            tokenized = self.tokenizer(prompt.caption)
            if len(tokenized["input_ids"]) > self.max_query_len:
                raise ValueError(
                    f"dataset '{record['dataset']}': the all-categories prompt has {len(tokenized['input_ids'])} "
                    f"tokens > MODEL.FIBER.TEXT.MAX_QUERY_LEN {self.max_query_len}; "
                    "use prompt_mode 'sampled_negatives'"
                )
        else:  # grounding captions are truncated, as upstream
            tokenized = self.tokenizer(prompt.caption, max_length=self.max_query_len, truncation=True)
        positive_map = create_positive_map(
            tokenized, spans, self.max_query_len, normalize=False, caption=prompt.caption
        )
        instances = Instances(tuple(image_hw))
        instances.gt_boxes = Boxes(torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4))
        instances.gt_positive_map = positive_map
        return {"caption": prompt.caption, "instances": instances}

    # ---- test ----
    def _detection_test_prompt(self, record: dict) -> dict:
        """One prompt with every category, or ``prompts`` chunks (spec §8.2), per dataset (cached)."""
        name = record.get("dataset")
        if name not in self._test_prompts:
            vocab = self._vocabulary(record)
            names, caption_prompt = vocab["names"], vocab["caption_prompt"]
            caption, spans = build_detection_prompt(names, self.separator, caption_prompt)
            too_many = 0 < self.chunk_size < len(names)
            too_long = len(self.tokenizer(caption)["input_ids"]) > self.max_query_len
            if too_many or too_long:
                chunk = self.chunk_size if too_many else 0
                prompts = chunk_category_prompts(
                    names, self.tokenizer, chunk, self.max_query_len, self.separator, caption_prompt
                )
                self._test_prompts[name] = {"prompts": prompts}
            else:
                self._test_prompts[name] = {"caption": caption, "label_spans": spans, "label_names": dict(names)}
        return self._test_prompts[name]

    def _grounding_test_prompt(self, record: dict) -> dict:
        """The sentence with label j + 1 = phrase j of ``tokens_positive_eval``."""
        caption, phrases = record.get("caption"), record.get("tokens_positive_eval")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"grounding dataset dict of {_context(record)} has no caption")
        if not phrases:
            raise ValueError(f"{_context(record)}: 'tokens_positive_eval' is missing or empty: no phrase to evaluate")
        label_spans, label_names = {}, {}
        for j, spans in enumerate(phrases):
            try:
                checked = [list(check_span(span, caption)) for span in spans]
            except (ValueError, TypeError) as e:
                raise ValueError(f"{_context(record)}: tokens_positive_eval[{j}]: {e}") from e
            if not checked:
                raise ValueError(f"{_context(record)}: tokens_positive_eval[{j}] has no span")
            label_spans[j + 1] = checked
            label_names[j + 1] = " ".join(caption[s:e] for s, e in checked)
        return {"caption": caption, "label_spans": label_spans, "label_names": label_names}
