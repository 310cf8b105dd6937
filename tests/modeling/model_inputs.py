"""Real-photo inputs for model tests (scikit-image's CC0 sample photographs) with prompts of the
tiny config's tokenizer (the vendored GPT-2 BPE, 64 tokens)."""
import functools

import numpy as np
import torch
from PIL import Image
from skimage import data

from conftest import GPT2_DIR
from detectron2.structures import Boxes, Instances
from fiber_det.data.prompt import PromptBuilder
from fiber_det.data.tokenization import build_tokenizer
from fiber_det.data.training_prompts import grounding_prompt

MAX_QUERY_LEN = 64  # MODEL.FIBER.TEXT.MAX_QUERY_LEN of configs/quick_schedules/FIBER-tiny.yaml


@functools.lru_cache(maxsize=None)
def builder() -> PromptBuilder:
    """The prompt builder of the tiny config."""
    return PromptBuilder(build_tokenizer(GPT2_DIR), max_length=MAX_QUERY_LEN)


def photo(name: str, size_hw=None) -> torch.Tensor:
    """(3, H, W) uint8 BGR tensor of ``skimage.data.<name>()``, optionally PIL-bilinear resized."""
    rgb = getattr(data, name)()
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    img = Image.fromarray(rgb[..., :3])
    if size_hw is not None:
        img = img.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img)[..., ::-1])).permute(2, 0, 1).contiguous()


def grounding_input(image, caption, boxes=None, spans=None, label_spans=None, **extra):
    """A batched-input dict with one prompt of ``caption``.

    With ``boxes`` and ``spans`` (one span list per box) it also carries training ``instances``;
    the prompt's labels are then ``label_spans`` when given (so the same input also serves
    inference), else the boxes' own span lists.
    """
    x = {"image": image, "height": image.shape[1], "width": image.shape[2], **extra}
    prompt = builder().build(caption, label_spans) if label_spans is not None else None
    if boxes is not None:
        sample = grounding_prompt(caption, spans)
        training = builder().build(caption, sample.spans, training=True)
        inst = Instances(tuple(image.shape[1:]))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_positive_map = training.positive_map(sample.box_labels, MAX_QUERY_LEN)
        x["instances"] = inst
        prompt = prompt or training
    x["prompts"] = (prompt or builder().build(caption),)
    return x


def cat_input(size_hw=(128, 192), **kw):
    """chelsea (a cat): 'a tabby cat with green eyes', boxes for the cat and an eye."""
    img = photo("chelsea", size_hw)
    sy, sx = size_hw[0] / 300, size_hw[1] / 451
    caption = "a tabby cat with green eyes"
    boxes = [[60 * sx, 10 * sy, 440 * sx, 295 * sy], [255 * sx, 80 * sy, 300 * sx, 115 * sy]]
    return grounding_input(img, caption, boxes=boxes, spans=[[[0, 11]], [[17, 27]]], **kw)
