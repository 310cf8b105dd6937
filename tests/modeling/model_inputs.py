"""Real-photo inputs for model tests (scikit-image's CC0 sample photographs)."""
import numpy as np
import torch
from PIL import Image
from skimage import data

from detectron2.structures import Boxes, Instances


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
    """A batched-input dict: training when ``boxes``/``spans`` are given, else inference."""
    x = {"image": image, "caption": caption, "height": image.shape[1], "width": image.shape[2], **extra}
    if boxes is not None:
        inst = Instances(tuple(image.shape[1:]))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.tokens_positive = spans
        x["instances"] = inst
    if label_spans is not None:
        x["label_spans"] = label_spans
    return x


def cat_input(size_hw=(128, 192), **kw):
    """chelsea (a cat): 'a tabby cat with green eyes', boxes for the cat and an eye."""
    img = photo("chelsea", size_hw)
    sy, sx = size_hw[0] / 300, size_hw[1] / 451
    caption = "a tabby cat with green eyes"
    boxes = [[60 * sx, 10 * sy, 440 * sx, 295 * sy], [255 * sx, 80 * sy, 300 * sx, 115 * sy]]
    return grounding_input(img, caption, boxes=boxes, spans=[[[0, 11]], [[17, 27]]], **kw)
