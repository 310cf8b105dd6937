"""The tiny coarse model and image-caption inputs as the coarse mapper makes them: real photos
(scikit-image's CC0 samples) resized with PIL bicubic to S x S RGB uint8, captions tokenised by
the model's own tokenizer (max-length padding, special-token mask)."""
import numpy as np
import torch
from PIL import Image
from skimage import data

from conftest import REPO
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from fiber_det import add_fiber_config

TINY_COARSE = REPO / "configs" / "coarse" / "FIBER-coarse-tiny.yaml"
PAIRS = (("chelsea", "a tabby cat with green eyes"), ("coffee", "a cup of coffee on a saucer"),
         ("astronaut", "an astronaut in front of a flag"))


def coarse_cfg(**overrides):
    """configs/coarse/FIBER-coarse-tiny.yaml with ``KEY=VALUE`` overrides (dots as '__')."""
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(str(TINY_COARSE))
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list([x for k, v in overrides.items() for x in (k.replace("__", "."), v)])
    return cfg


def coarse_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(coarse_cfg(**overrides))


def square_photo(name: str, size: int) -> torch.Tensor:
    """(3, S, S) uint8 RGB: ``skimage.data.<name>()`` resized with PIL bicubic (aspect not kept)."""
    rgb = getattr(data, name)()
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    img = Image.fromarray(rgb[..., :3]).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def caption_input(tokenizer, caption: str, length: int) -> dict:
    enc = tokenizer(caption, padding="max_length", truncation=True, max_length=length,
                    return_special_tokens_mask=True, return_tensors="pt")
    return {k: enc[k][0] for k in ("input_ids", "attention_mask", "special_tokens_mask")}


def pair_inputs(model, n: int = len(PAIRS)) -> list:
    """The first ``n`` of :data:`PAIRS` as the model's batched inputs."""
    return [
        {"image": square_photo(name, model.image_size), **caption_input(model.tokenizer, caption, model.text_length),
         "image_index": i, "caption_index": i}
        for i, (name, caption) in enumerate(PAIRS[:n])
    ]
