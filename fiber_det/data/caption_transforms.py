"""Image transforms of the coarse (image–caption) stage: fixed square images, ALBEF's augmentation.

Two pipelines, both ending in a uint8 (3, S, S) RGB tensor (the model divides by 255 and applies
the ImageNet mean/std, which equals the official ``ToTensor`` + ``Normalize`` up to float
round-off):

- ``"albef"``: PIL bicubic resize to exactly S x S (aspect ratio not kept). The official
  pre-training uses it for training too (no augmentation at all), and every evaluation uses it.
- ``"albef_randaug"`` (retrieval fine-tuning): ``RandomResizedCrop(S, scale (0.5, 1), ratio
  (3/4, 4/3), bicubic)``, horizontal flip (p 0.5; captions are not rewritten), then ALBEF's
  ``RandomAugment(N=2, M=7)``: 2 ops drawn with replacement from :data:`RANDAUG_OPS`, each applied
  with probability 0.5, at magnitude 7 of 10 (brightness/sharpness factor 1.36, shear +-0.21,
  translation +-7 px, rotation +-21 degrees, the sign drawn per use; fill grey 128).

NOTE: ALBEF applies its ops with OpenCV re-implementations of the PIL ops; we use timm's PIL ops
(same op list, magnitudes, probabilities and fill), which differ only at the pixel level:
brightness rounds where ALBEF's lookup table truncates, sharpness clips where ALBEF's uint8 cast
wraps around, and shears are mirrored (same distribution, since the sign is random).
Randomness comes from torch (crop, flip), numpy (op choice) and Python's ``random`` (op
application, sign), all three seeded per data-loader worker by Detectron2.
"""
from typing import Callable, Tuple

import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment
from torchvision import transforms as T
from torchvision.transforms.functional import InterpolationMode, pil_to_tensor

__all__ = ["CAPTION_TRANSFORMS", "RANDAUG_OPS", "build_caption_transform"]

CAPTION_TRANSFORMS: Tuple[str, ...] = ("albef", "albef_randaug")
# ALBEF's op list for retrieval fine-tuning ("Identity" is timm-less: it is a no-op either way).
RANDAUG_OPS: Tuple[str, ...] = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)
RANDAUG_NUM_OPS = 2
RANDAUG_MAGNITUDE = 7
RANDAUG_PROB = 0.5
_RANDAUG_HPARAMS = {
    "translate_const": 10,  # pixels at magnitude 10 (ALBEF's translate_const)
    "img_mean": (128, 128, 128),  # fill of shears, translations and rotations
    "interpolation": Image.BILINEAR,  # ALBEF's cv2.warpAffine default (INTER_LINEAR)
}


class _Identity:
    """The "Identity" op of ALBEF's list (timm has none); drawing it leaves the image as is."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img

    def __repr__(self) -> str:
        return "Identity"


def _randaug() -> RandAugment:
    ops = [
        _Identity() if name == "Identity" else
        AugmentOp(name, prob=RANDAUG_PROB, magnitude=RANDAUG_MAGNITUDE, hparams=_RANDAUG_HPARAMS)
        for name in RANDAUG_OPS
    ]
    return RandAugment(ops, num_layers=RANDAUG_NUM_OPS)


def build_caption_transform(name: str, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The transform ``name`` (one of :data:`CAPTION_TRANSFORMS`) at side ``image_size``.

    Args:
        name: "albef" (resize only) or "albef_randaug" (crop, flip, RandomAugment).
        image_size: S, the side of the square output.

    Returns:
        A callable mapping an RGB PIL image to a uint8 tensor of shape (3, S, S).

    Raises:
        ValueError: unknown ``name`` or ``image_size`` < 1.
    """
    if name not in CAPTION_TRANSFORMS:
        raise ValueError(f"caption transform must be one of {CAPTION_TRANSFORMS}, got {name!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image size must be a positive int, got {image_size!r}")
    size = (image_size, image_size)
    if name == "albef":
        steps = [T.Resize(size, interpolation=InterpolationMode.BICUBIC)]
    else:
        steps = [
            T.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                                interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(0.5),
            _randaug(),
        ]
    return T.Compose([*steps, _to_uint8_tensor])


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous uint8 (3, H, W) tensor (no scaling)."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r}")
    return pil_to_tensor(img).contiguous()

