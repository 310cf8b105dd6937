"""The built-in synthetic image–caption set: the synthetic shapes images with whole-scene captions.

Images come from the synthetic shapes generator (:func:`.synthetic.generate_sample`): with the
same seed and sizes they are the very images of ``synthetic_grounding_{train,val}``, so a coarse
model pre-trained on the train split has seen no validation image of either set. Each image gets
:data:`CAPTIONS_PER_IMAGE` captions, one per wording template, each naming **every** object with
its size, colour, shape and place in a 3 x 3 grid (objects in random order), e.g.

    "a small red circle at the top left and a large blue square in the centre"
    "two shapes on a grey background: a large blue square in the middle and a small red circle ..."
    "at the top left a small red circle, in the centre a large blue square"

so two images share a caption only when they hold the same objects in the same cells. The
captions are a function of (seed, split, index) alone (a numpy stream separate from the image's).

Layout written by :func:`generate_synthetic_captions` under ``root``::

    images/{train,val}/NNNNNN.png      RGB images (as the shapes set: default 128 x 128)
    captions_{train,val}.jsonl         {"image": "images/train/000000.png", "image_id": 1,
                                        "captions": [5 strings]} per line

Registered (at import, for :func:`default_root`) through the JSON-lines loader, the format users
write for their own pairs: ``synthetic_captions_train`` (training) and ``synthetic_captions_val``
(evaluator "retrieval"). Registration does not need the folder; ``tools/train_net.py`` generates
it on first use (``datasets/prepare_synthetic_captions.py`` does it by hand).
"""
import json
import os
import shutil
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .caption_pairs import load_caption_jsonl, register_caption_dataset
from .synthetic import SPLITS, ImageSize, generate_sample

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "default_root",
    "ensure_synthetic_captions",
    "generate_synthetic_captions",
    "register_synthetic_captions",
    "scene_captions",
]

CAPTIONS_PER_IMAGE = 5
_CELL_WORDS = {  # (row, column) of the object's centre in a 3 x 3 grid -> two phrasings
    (0, 0): ("at the top left", "in the top left corner"),
    (0, 1): ("at the top", "at the top centre"),
    (0, 2): ("at the top right", "in the top right corner"),
    (1, 0): ("on the left", "at the centre left"),
    (1, 1): ("in the centre", "in the middle"),
    (1, 2): ("on the right", "at the centre right"),
    (2, 0): ("at the bottom left", "in the bottom left corner"),
    (2, 1): ("at the bottom", "at the bottom centre"),
    (2, 2): ("at the bottom right", "in the bottom right corner"),
}
_COUNTS = ("one shape", "two shapes", "three shapes", "four shapes", "five shapes", "six shapes")
_CAPTION_STREAM = 1  # numpy seed component that separates the caption stream from the image's
_FILES = tuple(f"captions_{split}.jsonl" for split in SPLITS)


def _cell(bbox: Sequence[float], hw: Tuple[int, int]) -> Tuple[int, int]:
    """(row, column) in 0..2 of the centre of an xywh box in an (H, W) image."""
    cx, cy = bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2
    return min(int(3 * cy / hw[0]), 2), min(int(3 * cx / hw[1]), 2)


def _join(parts: List[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_captions(rng: np.random.Generator, objects: Sequence[dict], hw: Tuple[int, int]) -> List[str]:
    """:data:`CAPTIONS_PER_IMAGE` distinct captions, each naming every object of the scene.

    Args:
        rng: the caption stream of the image.
        objects: dicts with "size", "color", "shape" and "bbox" (xywh), as the generator draws them.
        hw: (height, width) of the image.
    """
    def described(leading: bool) -> List[str]:
        phrases = []
        for k in rng.permutation(len(objects)):
            obj = objects[int(k)]
            where = _CELL_WORDS[_cell(obj["bbox"], hw)][int(rng.integers(2))]
            what = f"a {obj['size']} {obj['color']} {obj['shape']}"
            phrases.append(f"{where} {what}" if leading else f"{what} {where}")
        return phrases

    count = _COUNTS[len(objects) - 1]
    return [
        _join(described(False)),
        f"{count} on a grey background: {_join(described(False))}",
        f"there is {_join(described(False))}",
        ", ".join(described(True)),
        f"a picture of {_join(described(False))}",
    ]


def _write_split(out: Path, split: str, num_images: int, seed: int, sample_kwargs: dict) -> None:
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(out / f"captions_{split}.jsonl", "w", encoding="utf-8") as f:
        for index in range(num_images):
            image, objects, _, _ = generate_sample(seed, split, index, **sample_kwargs)
            Image.fromarray(image).save(image_dir / f"{index:06d}.png", format="PNG", compress_level=1)
            rng = np.random.default_rng([seed, SPLITS.index(split), index, _CAPTION_STREAM])
            line = {"image": f"images/{split}/{index:06d}.png", "image_id": index + 1,
                    "captions": scene_captions(rng, objects, image.shape[:2])}
            f.write(json.dumps(line, separators=(",", ":")) + "\n")


def generate_synthetic_captions(
    out: Union[str, Path],
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: ImageSize = 128,
    max_objects: int = 4,
    max_iou: float = 0.1,
    noise: float = 4.0,
) -> Path:
    """Writes the images and the two JSON-lines files under ``out``; same arguments, same bytes.

    The image arguments are those of :func:`.synthetic.generate_synthetic` (same defaults, so the
    same images as the grounding set of the same seed).

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    kwargs = dict(image_size=image_size, max_objects=max_objects, max_iou=max_iou, noise=noise)
    for split, count in zip(SPLITS, (num_train, num_val)):
        _write_split(out, split, count, seed, kwargs)
    return out


def _is_complete(root: Path) -> bool:
    return all((root / name).is_file() for name in _FILES)


def ensure_synthetic_captions(root: Union[str, Path], **gen_kwargs) -> Path:
    """Generates the set into ``root`` unless its JSON-lines files exist (then reused as is).

    Generation goes to a temporary sibling folder renamed into place, so concurrent callers never
    see half a set.

    Raises:
        FileExistsError: ``root`` exists, is not empty and lacks the JSON-lines files.
    """
    root = Path(root)
    if _is_complete(root):
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but lacks {', '.join(_FILES)}; delete it or pick another folder")
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    try:
        generate_synthetic_captions(tmp, **gen_kwargs)
        if root.exists():
            root.rmdir()
        os.replace(tmp, root)
    except OSError:
        if not _is_complete(root):  # a lost race is fine only if the winner left a complete set
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_root() -> str:
    """``$FIBER_SYNTHETIC_CAPTIONS_ROOT``, else ``$DETECTRON2_DATASETS/synthetic_captions``, else
    the repository's ``datasets/synthetic_captions``."""
    if os.environ.get("FIBER_SYNTHETIC_CAPTIONS_ROOT"):
        return os.environ["FIBER_SYNTHETIC_CAPTIONS_ROOT"]
    base = os.environ.get("DETECTRON2_DATASETS") or str(Path(__file__).resolve().parents[3] / "datasets")
    return os.path.join(base, "synthetic_captions")


def _load(jsonl_file: str, name: str) -> List[dict]:
    if not os.path.isfile(jsonl_file):
        raise FileNotFoundError(
            f"synthetic caption file {jsonl_file} not found; generate the set with "
            f"`python datasets/prepare_synthetic_captions.py --out {os.path.dirname(jsonl_file)}`")
    return load_caption_jsonl(jsonl_file, None, name)


def register_synthetic_captions(root: Union[str, Path]) -> None:
    """(Re-)registers ``synthetic_captions_{train,val}`` at ``root``; the folder may not exist yet."""
    root = os.path.abspath(str(root))
    for split in SPLITS:
        name, jsonl = f"synthetic_captions_{split}", os.path.join(root, f"captions_{split}.jsonl")
        register_caption_dataset(name, lambda j=jsonl, n=name: _load(j, n),
                                 evaluator_type="retrieval" if split == "val" else "", jsonl_file=jsonl,
                                 image_root=root)


register_synthetic_captions(default_root())
