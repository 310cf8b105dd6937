"""Batched inference for people: images plus captions, phrases or category names -> detections.

    predictor = FIBERPredictor.from_checkpoint("configs/...yaml", "model.pth")
    result = predictor("photo.jpg", {"caption": "a cat on a mat", "phrases": ["a cat", "a mat"]})
    results = predictor(["a.jpg", "b.jpg"], ["cat", "dog", "kite"], batch_size=2)

Prompts (one shared by all images, or a list with one per image):
  * a caption with phrases: ``{"caption": str, "phrases": [substring | [start, end), ...]}``;
    a substring resolves to its FIRST occurrence (give a span for a later one); label k + 1 is
    phrase k;
  * free text: a ``str`` or ``{"caption": str}``: the phrases are found by
    :func:`fiber_det.data.phrases.caption_phrases` (noun phrases of the optional TextBlob tagger,
    else the whole caption plus its comma / "and"-separated parts);
  * category names: a list of strings (label k + 1 is name k). A vocabulary whose prompt exceeds
    MODEL.FIBER.TEXT.MAX_QUERY_LEN tokens (or any, with TEST.CHUNK_SIZE > 0) is split into chunk
    prompts (:meth:`fiber_det.data.prompt.PromptBuilder.chunks`) that the model runs (with
    TEST.SHARED_PREFIX: the image prefix once per image, each chunk's text prefix once per
    predictor, :mod:`fiber_det.modeling.shared_prefix`) and merges
    with :func:`fiber_det.modeling.postprocess.merge_chunk_detections`, the evaluators' rule,
    except that the merged list keeps only the TEST.DETECTIONS_PER_IMAGE best (exactly that many,
    not upstream's tie-keeping k-th value rule, which stays within each chunk);
  * a :class:`fiber_det.data.prompt.Prompt` made with this predictor's ``prompt_builder`` (used as
    it is; its labels' first spans are reported).
A list of strings is always a shared vocabulary; a list holding dicts, lists or prompts is per
image (its strings are then captions), so per-image captions are best given as
``{"caption": ...}`` dicts.

Bad input for one image (unreadable file, empty caption, a phrase not in the caption, ...) gives
that image's :class:`ImageResult` an ``error`` naming it; the other images still complete.
"""
import logging
import numbers
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.logger import log_first_n

from .checkpoint.checkpointer import FiberCheckpointer
from .config import add_fiber_config
from .data.image_io import read_image
from .data.phrases import caption_phrases, phrase_spans
from .data.prompt import Prompt, PromptBuilder
from .data.transforms import build_transforms
from .utils.device import resolve_device

__all__ = ["Detection", "ImageResult", "FIBERPredictor"]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Detection:
    """One detection in the original image frame.

    Attributes:
        box: [x1, y1, x2, y2] in original pixels.
        score: confidence in [0, 1].
        label: 1-based phrase / category label.
        phrase: the phrase text (caption prompts) or the category name as given.
        span: [start, end) of the phrase in the caption; None for category names.
    """

    box: List[float]
    score: float
    label: int
    phrase: str
    span: Optional[List[int]]


@dataclass
class ImageResult:
    """The detections of one image, or the error that stopped it.

    Attributes:
        name: the image's path, or "image <index>" for in-memory images.
        height, width: original size (0 when the image could not be read).
        caption: the grounding caption; None for category prompts.
        detections: sorted by descending score.
        error: why this image has no result ("<name>: <reason>"), else None.
        instances: the model's raw output (CPU Instances), None on error.
    """

    name: str
    height: int = 0
    width: int = 0
    caption: Optional[str] = None
    detections: List[Detection] = field(default_factory=list)
    error: Optional[str] = None
    instances: Optional[Instances] = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (no ``instances``)."""
        return {"name": self.name, "height": self.height, "width": self.width, "caption": self.caption,
                "detections": [asdict(d) for d in self.detections], "error": self.error}


class _ImageError(ValueError):
    """Bad input for one image; the message already names it."""


class FIBERPredictor:
    """Builds a FIBER model from a config and runs it on images with text prompts.

    Args:
        cfg: a fiber-det config; MODEL.WEIGHTS (if set) is loaded with FiberCheckpointer (strict;
            official FIBER checkpoints are converted on the fly; files that would run code are
            refused), MODEL.DEVICE picks the device (a CUDA device without CUDA: the CPU).
        amp_dtype: None (fp32) or torch.float16 / torch.bfloat16 (or their names) for autocast.
        batch_size: default images per forward (1). With TEST.SHARED_PREFIX (the default) every
            image runs at its own size, so a batch gives each image's single-image result; without
            it images of different resized sizes are zero-padded to a common size, which changes
            the features near their borders.
    """

    def __init__(self, cfg, *, amp_dtype=None, batch_size: int = 1):
        self.amp_dtype = _amp_dtype(amp_dtype)
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.cfg = cfg.clone()
        self.cfg.defrost()
        self.cfg.MODEL.DEVICE = resolve_device(self.cfg.MODEL.DEVICE)
        self.cfg.freeze()
        logger.info("FIBERPredictor runs on %s", self.cfg.MODEL.DEVICE)
        self.model = build_model(self.cfg)
        self.model.eval()
        if self.cfg.MODEL.WEIGHTS:
            FiberCheckpointer(self.model).load(self.cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: the predictor runs a randomly initialised model")
        self.prompt_builder = PromptBuilder(self.cfg)
        self.augmentations = T.AugmentationList(build_transforms(self.cfg, is_train=False))
        self.chunk_size = self.cfg.TEST.CHUNK_SIZE
        self.detections_per_image = self.cfg.TEST.DETECTIONS_PER_IMAGE

    @classmethod
    def from_checkpoint(cls, config_file, weights: Optional[str] = None, opts: Optional[Sequence[str]] = None,
                        device: Optional[str] = None, **kwargs) -> "FIBERPredictor":
        """A predictor from a yaml file, a checkpoint (None: the config's MODEL.WEIGHTS), a
        ``[KEY, VALUE, ...]`` override list and a device ("cpu", "cuda", ...; None: MODEL.DEVICE,
        whose default "cuda" means the CPU where CUDA is not available). Other keyword arguments go to the constructor."""
        cfg = add_fiber_config(get_cfg())
        cfg.merge_from_file(str(config_file))
        cfg.merge_from_list(list(opts or []))
        if weights is not None:
            cfg.MODEL.WEIGHTS = str(weights)
        if device is not None:
            cfg.MODEL.DEVICE = str(device)
        cfg.freeze()
        return cls(cfg, **kwargs)

    @property
    def tokenizer(self):
        """The model's tokenizer (``prompt_builder.tokenizer``)."""
        return self.prompt_builder.tokenizer

    def __call__(self, images, prompts, *, input_format: str = "BGR", batch_size: Optional[int] = None):
        """Detects the prompts' phrases in the images.

        Args:
            images: one image or a list; each a path, a PIL image or an (H, W, 3) / (H, W)
                uint8 or uint16 numpy array in ``input_format``, decoded by
                :func:`fiber_det.data.image_io.read_image` (as in training).
            prompts: one prompt for all images, or a list with one per image (see module doc).
            input_format: "BGR" or "RGB", the channel order of numpy inputs.
            batch_size: images per forward (default: the constructor's).

        Returns:
            An :class:`ImageResult` for a single image, else a list of them in input order.
        """
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"input_format must be 'BGR' or 'RGB', got {input_format!r}")
        batch_size = self.batch_size if batch_size is None else _positive_int(batch_size, "batch_size")
        single = _is_single_image(images)
        images = [images] if single else list(images)
        per_image = _prompts_per_image(prompts, len(images))
        results, pending, prepared = [], [], {}
        for index, (image, prompt) in enumerate(zip(images, per_image)):
            result = ImageResult(name=_image_name(image, index))
            results.append(result)
            try:
                # a shared prompt (one object) is tokenised / chunked once, not once per image
                if id(prompt) not in prepared:
                    prepared[id(prompt)] = _try(self._prompt_fields, prompt)
                pending.append((result, self._prepare(result, image, prepared[id(prompt)], input_format)))
            except _ImageError as e:
                result.error = str(e)
        for start in range(0, len(pending), batch_size):
            self._run_batch(pending[start:start + batch_size])
        return results[0] if single else results

    # ---- inputs ----
    def _prepare(self, result: ImageResult, image, fields, input_format: str) -> dict:
        """The model input of one image from its prompt fields (or the prompt's error); fills
        ``result``'s size and caption."""
        bgr = _read_bgr(image, input_format, result.name)
        result.height, result.width = bgr.shape[:2]
        if isinstance(fields, Exception):
            raise _ImageError(f"{result.name}: {fields}")
        result.caption = fields["_caption"]
        aug = T.AugInput(bgr)
        try:
            self.augmentations(aug)
        except ValueError as e:
            raise _ImageError(f"{result.name}: cannot resize the {result.width}x{result.height} image ({e})") from e
        tensor = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
        return {"image": tensor, "height": result.height, "width": result.width, **fields}

    def _prompt_fields(self, prompt) -> dict:
        """The model's ``prompts`` of one user prompt plus "_caption" (None for category names),
        "_spans" ({label: [start, end)}) and "_names" ({label: phrase}), bookkeeping the
        predictor removes before the forward."""
        if isinstance(prompt, Prompt):
            spans = {label: list(spans[0]) for label, spans in prompt.spans.items() if spans}
            return {"prompts": (prompt,), "_caption": prompt.caption, "_spans": spans, "_names": dict(prompt.names)}
        if isinstance(prompt, str):
            prompt = {"caption": prompt}
        if isinstance(prompt, dict):
            return self._caption_fields(prompt)
        if isinstance(prompt, (list, tuple)):
            return self._category_fields(prompt)
        raise TypeError(f"a prompt must be a caption str, a {{'caption', 'phrases'}} dict, a list of category "
                        f"names or a Prompt, got {type(prompt).__name__}")

    def _caption_fields(self, prompt: dict) -> dict:
        unknown = set(prompt) - {"caption", "phrases"}
        if unknown:
            raise ValueError(f"unknown prompt key(s) {sorted(unknown)}; expected 'caption' and optional 'phrases'")
        caption = prompt.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"caption {caption!r} is empty: nothing to ground")
        phrases = prompt.get("phrases")
        spans = caption_phrases(caption) if phrases is None else phrase_spans(caption, phrases)
        built = self.prompt_builder.build(caption, {k + 1: [s] for k, s in enumerate(spans)})
        num_tokens, cut = len(self.tokenizer(caption)["input_ids"]), self.prompt_builder.max_length
        if num_tokens > cut:
            log_first_n(logging.WARNING, f"a caption of {num_tokens} tokens is cut to its first {cut} "
                        "(MODEL.FIBER.TEXT.MAX_QUERY_LEN); its phrases all lie before the cut", name=__name__)
        return {"prompts": (built,), "_caption": caption, "_names": dict(built.names),
                "_spans": {k + 1: [s, e] for k, (s, e) in enumerate(spans)}}

    def _category_fields(self, names: Sequence[str]) -> dict:
        if len(names) == 0:
            raise ValueError("the category list is empty: nothing to detect")
        for k, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"category {k} ({name!r}) must be a non-empty string")
        prompts = self.prompt_builder.chunks(list(names), self.chunk_size)
        return {"prompts": prompts, "_caption": None, "_spans": {},
                "_names": {label: name for p in prompts for label, name in p.names.items()}}

    # ---- forward ----
    def _run_batch(self, batch) -> None:
        """Runs one batch; if the model rejects it, each image alone so one bad input cannot fail
        the others."""
        inputs = [{k: v for k, v in x.items() if not k.startswith("_")} for _, x in batch]
        try:
            outputs = self._forward(inputs)
        except ValueError as e:
            if len(batch) > 1:
                for item in batch:
                    self._run_batch([item])
                return
            batch[0][0].error = f"{batch[0][0].name}: {e}"
            return
        for (result, x), out in zip(batch, outputs):
            inst = out["instances"].to("cpu")
            inst.pred_boxes.tensor = inst.pred_boxes.tensor.float()
            inst.scores = inst.scores.float()
            result.instances = inst
            result.detections = _detections(inst, x["_spans"], x["_names"])

    def _forward(self, inputs: List[dict]) -> List[dict]:
        amp = nullcontext() if self.amp_dtype is None else torch.autocast(self.model.device.type, self.amp_dtype)
        with torch.no_grad(), amp:
            return self.model.inference(inputs, max_merged_detections=self.detections_per_image)


def _detections(inst: Instances, spans: Dict[int, List[int]], names: Dict[int, str]) -> List[Detection]:
    boxes, scores, labels = inst.pred_boxes.tensor.tolist(), inst.scores.tolist(), inst.pred_labels.tolist()
    return [Detection(box=b, score=s, label=int(lab), phrase=names.get(int(lab), ""), span=spans.get(int(lab)))
            for b, s, lab in zip(boxes, scores, labels)]


def _try(fn, *args):
    """``fn(*args)``, or the ValueError / TypeError it raised (a per-image error, reported later)."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        return e


def _read_bgr(image, input_format: str, name: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR array of a path, PIL image or numpy array; _ImageError naming it."""
    try:
        return read_image(image, "BGR", name=name, input_format=input_format)
    except (OSError, ValueError) as e:
        if isinstance(image, (str, Path)):
            raise _ImageError(f"{name}: cannot read the image ({type(e).__name__}: {e})") from e
        raise _ImageError(str(e)) from e


def _is_single_image(images) -> bool:
    return isinstance(images, (str, Path, Image.Image, np.ndarray))


def _image_name(image, index: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"image {index}"


def _prompts_per_image(prompts, num_images: int) -> list:
    """One prompt per image: a str, a dict, a Prompt or a list of str is shared; another list is
    per image."""
    shared = isinstance(prompts, (str, dict, Prompt)) or (
        isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(isinstance(p, str) for p in prompts)
    )
    if shared:
        return [prompts] * num_images
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"prompts must be a caption, a dict, a list of category names or a list with one prompt "
                         f"per image, got {prompts!r}")
    if len(prompts) != num_images:
        raise ValueError(f"{len(prompts)} per-image prompts for {num_images} image(s)")
    return list(prompts)


def _amp_dtype(amp_dtype) -> Optional[torch.dtype]:
    if amp_dtype is None or amp_dtype in (torch.float16, torch.bfloat16):
        return amp_dtype
    if isinstance(amp_dtype, str) and amp_dtype.lower() in _AMP_DTYPES:
        return _AMP_DTYPES[amp_dtype.lower()]
    raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)
