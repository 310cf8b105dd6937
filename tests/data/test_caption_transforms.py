"""The coarse-stage image transforms: shape, dtype, the plain bicubic resize, determinism of the
RandAugment pipeline under seeded RNGs, and its op table."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from caption_files import PHOTOS
from fiber_det.data import caption_transforms as ct


@pytest.fixture(scope="module")
def photo():
    with Image.open(PHOTOS / "chelsea.jpg") as img:  # 451 x 300, not square
        return img.convert("RGB")


def _seeded(transform, image, seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return transform(image)


@pytest.mark.parametrize("name", ct.CAPTION_TRANSFORMS)
def test_shape_dtype_and_determinism(photo, name):
    transform = ct.build_caption_transform(name, 40)
    runs = [_seeded(transform, photo, seed) for seed in (0, 0, 1, 2, 3)]
    for out in runs:
        assert out.dtype == torch.uint8 and out.shape == (3, 40, 40) and out.is_contiguous()
    assert torch.equal(runs[0], runs[1])
    if name == "albef":
        expected = np.array(photo.resize((40, 40), Image.BICUBIC))
        assert all(torch.equal(r, torch.from_numpy(expected).permute(2, 0, 1)) for r in runs)
    else:  # random crops, flips and ops: other seeds give other images
        assert not all(torch.equal(runs[0], r) for r in runs[2:])


def test_randaugment_table():
    aug = ct.build_caption_transform("albef_randaug", 32).transforms[2]
    assert aug.num_layers == 2
    names = [getattr(op, "name", repr(op)) for op in aug.ops]
    assert tuple(names) == ct.RANDAUG_OPS
    for op in aug.ops[1:]:
        assert (op.prob, op.magnitude) == (0.5, 7)
        assert op.kwargs["fillcolor"] == (128, 128, 128)
    # magnitude 7 of 10: ALBEF's factors
    levels = {op.name: op.level_fn(7, op.hparams) for op in aug.ops[1:] if op.level_fn is not None}
    assert levels["Brightness"] == levels["Sharpness"] == pytest.approx((1.36,))
    assert abs(levels["ShearX"][0]) == pytest.approx(0.21) and abs(levels["Rotate"][0]) == pytest.approx(21)
    assert abs(levels["TranslateX"][0]) == pytest.approx(7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="one of"):
        ct.build_caption_transform("randaug", 32)
    with pytest.raises(ValueError, match="positive int"):
        ct.build_caption_transform("albef", 0)
