"""The built-in synthetic shapes set: generator, MDETR/COCO json writers and registration.

Each image shows 1-4 flat-coloured shapes (6 colours x 4 shapes x 2 sizes) on a grey, lightly
noisy background; each gets one caption naming 1-3 of its objects, e.g.
"a small red circle left of a blue square" or "a circle, a white cross and a large blue square".
Every noun phrase is unambiguous within its image (no two objects share colour, shape and size,
and a phrase keeps enough attributes to single its object out), so a phrase has exactly one box.

Layout written by :func:`generate_synthetic` under ``root``::

    images/{train,val}/NNNNNN.png      RGB images (default 128x128)
    grounding_{train,val}.json         MDETR-style: one image entry per (image, caption)
    detection_{train,val}.json         COCO-style: all objects, categories = the 4 shape names

Detection categories are the shape names only (colour is left to the grounding split): 4 classes
whose all-categories prompt "circle. square. triangle. cross" a from-scratch tiny model can learn.
Annotations of both jsons also carry the object's ``color`` and ``size`` words; image ``id``s are
the same in both jsons of a split (one caption per image).

Relations ("left of", "above", ...) hold in the image as drawn. A horizontal flip in training does
not rewrite captions (the official flip leaves the text alone), which only makes a "left of"/"right of" word wrong: no phrase
needs the relation to be found, so grounding targets stay correct.

Registered names (at import, for :func:`default_root`): ``synthetic_grounding_{train,val}``
(evaluator "flickr", GT boxes from the json) and ``synthetic_detection_{train,val}`` (evaluator
"coco", prompt mode "all_categories"). Registration does not need the folder; loading does, and
goes through the shared loaders of :mod:`.mdetr` and :mod:`.coco_style` after a check whose error
names the generator script.
"""
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco_style import load_coco_detection_json
from .mdetr import load_mdetr_grounding_json

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "default_root",
    "ensure_synthetic",
    "generate_sample",
    "generate_synthetic",
    "load_synthetic_detection",
    "load_synthetic_grounding",
    "register_synthetic",
]

# RGB values far apart from each other and from the grey background (90..160).
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Side length as a fraction of min(height, width): ~2x apart, small >= 20 px at 128.
SIZES: Dict[str, Tuple[float, float]] = {"small": (0.16, 0.21), "large": (0.34, 0.42)}
SPLITS: Tuple[str, ...] = ("train", "val")
DATASET_NAME = "synthetic"
_DESCRIPTIONS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))
_RELATIONS = ("left of", "right of", "above", "below")
_PLACEMENT_TRIES = 100
_GAP = 2  # px kept free around every shape, so no object touches or occludes another
_SPLIT_CODE = {"train": 0, "val": 1}
_JSONS = tuple(f"{kind}_{split}.json" for kind in ("grounding", "detection") for split in SPLITS)

ImageSize = Union[int, Sequence[int]]


def _hw(image_size: ImageSize) -> Tuple[int, int]:
    """(height, width) from an int (square) or an (h, w) pair."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or min(hw) < 64:
        raise ValueError(
            f"image_size must be an int or (height, width), each >= 64; got {image_size}")
    return int(hw[0]), int(hw[1])


@functools.lru_cache(maxsize=None)
def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Read-only boolean (side, side) mask of ``shape`` filling a side x side square."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    last, third = side - 1, side // 3
    if shape == "circle":
        draw.ellipse([0, 0, last, last], fill=1)
    elif shape == "square":
        draw.rectangle([0, 0, last, last], fill=1)
    elif shape == "triangle":
        draw.polygon([(0, last), (last, last), (last // 2, 0)], fill=1)
    elif shape == "cross":
        draw.rectangle([third, 0, last - third, last], fill=1)
        draw.rectangle([0, third, last, last - third], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = np.asarray(canvas, dtype=bool).copy()
    mask.flags.writeable = False  # shared by the cache
    return mask


def _paste(mask: np.ndarray, x0: int, y0: int, hw: Tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) image of ``mask`` with its top-left corner at (x0, y0), clipped."""
    full = np.zeros(hw, dtype=bool)
    ys = slice(max(0, y0), min(hw[0], y0 + mask.shape[0]))
    xs = slice(max(0, x0), min(hw[1], x0 + mask.shape[1]))
    full[ys, xs] = mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return full


def _box_of(mask: np.ndarray) -> List[int]:
    """Tight [x, y, w, h] (pixel edges, COCO convention) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xywh boxes."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _place_objects(rng, hw: Tuple[int, int], max_objects: int, max_iou: float):
    """Samples distinct (colour, shape, size) objects and non-touching placements.

    Returns:
        list of dicts {"color", "shape", "size", "bbox" [x, y, w, h], "mask" (H, W) bool}; an
        object that finds no free spot in ``_PLACEMENT_TRIES`` tries is left out (never the first).
    """
    combos = [(c, s, z) for c in COLORS for s in SHAPES for z in SIZES]
    count = int(rng.integers(1, max_objects + 1))
    picked = [combos[i] for i in rng.choice(len(combos), size=count, replace=False)]
    picked.sort(key=lambda combo: combo[2] != "large")  # big ones first: they are hardest to fit
    occupied = np.zeros(hw, dtype=bool)
    objects = []
    for color, shape, size in picked:
        lo, hi = SIZES[size]
        side = int(round(min(hw) * rng.uniform(lo, hi)))
        local_box = _box_of(_shape_mask(shape, side))
        for _ in range(_PLACEMENT_TRIES):
            x0 = int(rng.integers(0, hw[1] - side + 1))
            y0 = int(rng.integers(0, hw[0] - side + 1))
            box = [x0 + local_box[0], y0 + local_box[1], local_box[2], local_box[3]]
            if any(_iou(box, other["bbox"]) > max_iou for other in objects):
                continue
            halo = _paste(_shape_mask(shape, side + 2 * _GAP), x0 - _GAP, y0 - _GAP, hw)
            if not (halo & occupied).any():
                mask = _paste(_shape_mask(shape, side), x0, y0, hw)
                occupied |= mask
                objects.append(
                    {"color": color, "shape": shape, "size": size, "bbox": box, "mask": mask})
                break
    return objects


def _render(rng, objects: List[dict], hw: Tuple[int, int], noise: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB image: grey background with grey Gaussian noise, flat objects."""
    level = int(rng.integers(90, 161))
    grey = np.full(hw, float(level), dtype=np.float32)
    if noise > 0:
        grey += noise * rng.standard_normal(size=hw, dtype=np.float32)
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    image = np.repeat(grey[:, :, None], 3, axis=2)
    for obj in objects:
        image[obj["mask"]] = COLORS[obj["color"]]  # objects stay noise-free: exact colour inside
    return image


def _describe(rng, index: int, objects: List[dict]) -> str:
    """Noun phrase for objects[index] that no other object of the image matches."""
    target = objects[index]
    others = [o for j, o in enumerate(objects) if j != index]
    valid = [
        attrs for attrs in _DESCRIPTIONS
        if not any(all(o[a] == target[a] for a in attrs) for o in others)
    ]
    attrs = valid[int(rng.integers(len(valid)))]  # never empty: (size, color, shape) is unique
    return " ".join(["a"] + [target[a] for a in ("size", "color", "shape") if a in attrs])


def _relations(a: Sequence[int], b: Sequence[int]) -> List[str]:
    """Relations "A <rel> B" that hold strictly between xywh boxes a and b (no axis overlap)."""
    holds = {
        "left of": a[0] + a[2] <= b[0],
        "right of": b[0] + b[2] <= a[0],
        "above": a[1] + a[3] <= b[1],
        "below": b[1] + b[3] <= a[1],
    }
    return [rel for rel in _RELATIONS if holds[rel]]


def _compose_caption(rng, objects: List[dict]) -> Tuple[str, List[Tuple[int, List[int]]]]:
    """Caption naming 1-3 objects, as a list or with a spatial relation between the first two.

    Returns:
        (caption, [(object index, [start, end)), ...]) with phrases in caption order.
    """
    count = int(rng.integers(1, min(3, len(objects)) + 1))
    mentioned = [int(i) for i in rng.permutation(len(objects))[:count]]
    phrases = [(i, _describe(rng, i, objects)) for i in mentioned]
    relations = []
    if count > 1:
        relations = _relations(objects[mentioned[0]]["bbox"], objects[mentioned[1]]["bbox"])
    if relations and rng.random() < 0.5:
        relation = relations[int(rng.integers(len(relations)))]
        joiners = [f" {relation} ", " and "][: count - 1]
    else:
        joiners = [", ", " and "][3 - count:]
    caption, spans = "", []
    for k, (i, text) in enumerate(phrases):
        if k:
            caption += joiners[k - 1]
        spans.append((i, [len(caption), len(caption) + len(text)]))
        caption += text
    return caption, spans


def generate_sample(
    seed: int,
    split: str,
    index: int,
    image_size: ImageSize = 128,
    max_objects: int = 4,
    max_iou: float = 0.1,
    noise: float = 4.0,
) -> Tuple[np.ndarray, List[dict], str, List[Tuple[int, List[int]]]]:
    """One image with its objects and caption; a function of (seed, split, index) alone.

    Returns:
        image (H, W, 3) uint8 RGB; objects (dicts with "color", "shape", "size", "bbox" xywh and
        "mask" (H, W) bool); caption; [(object index, [start, end)), ...] in caption order.
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= max_objects <= 6:
        raise ValueError(f"max_objects must be in 1..6 to fit the image, got {max_objects}")
    # Seeding per image makes a small set the prefix of a larger one with the same seed.
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    hw = _hw(image_size)
    objects = _place_objects(rng, hw, max_objects, max_iou)
    image = _render(rng, objects, hw, noise)
    caption, spans = _compose_caption(rng, objects)
    return image, objects, caption, spans


def _object_annotations(objects: List[dict], image_id: int) -> List[dict]:
    """COCO annotations (without "id") of the drawn objects, with their colour and size words."""
    return [
        {
            "image_id": image_id,
            "bbox": [float(v) for v in o["bbox"]],
            "area": float(o["bbox"][2] * o["bbox"][3]),
            "iscrowd": 0,
            "category_id": SHAPES.index(o["shape"]) + 1,
            "color": o["color"],
            "size": o["size"],
        }
        for o in objects
    ]


def _split_jsons(out: Path, split: str, num_images: int, seed: int, info: dict, **sample_kwargs):
    """Draws and saves the images of one split; returns its (grounding, detection) json dicts."""
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)
    ]
    grounding, detection = (
        {"info": {**info, "split": split}, "images": [], "annotations": [],
         "categories": categories}
        for _ in range(2)
    )
    for index in range(num_images):
        image, objects, caption, spans = generate_sample(seed, split, index, **sample_kwargs)
        file_name, image_id = f"{index:06d}.png", index + 1
        # zlib level 1: 3x faster than the default 6 and only ~5% larger on the noisy background
        Image.fromarray(image).save(image_dir / file_name, format="PNG", compress_level=1)
        entry = {"file_name": file_name, "height": image.shape[0], "width": image.shape[1],
                 "id": image_id}
        detection["images"].append(entry)
        grounding["images"].append({
            **entry,
            "caption": caption,
            "dataset_name": DATASET_NAME,
            "tokens_positive_eval": [[span] for _, span in spans],
            "sentence_id": 0,
            "original_img_id": image_id,
        })
        anns = _object_annotations(objects, image_id)
        for content, mentions in ((detection, [(i, None) for i in range(len(anns))]),
                                  (grounding, spans)):
            for i, span in mentions:
                ann = {"id": len(content["annotations"]) + 1, **anns[i]}
                if span is not None:
                    ann["tokens_positive"] = [span]
                content["annotations"].append(ann)
    return grounding, detection


def generate_synthetic(
    out: Union[str, Path],
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: ImageSize = 128,
    max_objects: int = 4,
    max_iou: float = 0.1,
    noise: float = 4.0,
) -> Path:
    """Writes the images and the four jsons under ``out``; same arguments, same bytes.

    Args:
        out: destination folder (created; existing files of the same names are overwritten).
        seed: generator seed; train and val use separate streams.
        num_train, num_val: images (= captions) per split.
        image_size: int (square) or (height, width), each >= 64.
        max_objects: objects per image are drawn uniformly from 1..max_objects.
        max_iou: largest box IoU allowed between two objects (shapes never touch regardless).
        noise: standard deviation of the background's Gaussian noise (grey levels).

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    hw = _hw(image_size)
    kwargs = dict(image_size=hw, max_objects=max_objects, max_iou=max_iou, noise=noise)
    info = {"description": "fiber_det synthetic shapes", "version": 1, "seed": seed, **kwargs}
    for split, count in zip(SPLITS, (num_train, num_val)):
        grounding, detection = _split_jsons(out, split, count, seed, info, **kwargs)
        for kind, content in (("grounding", grounding), ("detection", detection)):
            with open(out / f"{kind}_{split}.json", "w") as f:
                json.dump(content, f, separators=(",", ":"))
    return out


def _is_complete(root: Path) -> bool:
    return all((root / name).is_file() for name in _JSONS)


def ensure_synthetic(root: Union[str, Path], **gen_kwargs) -> Path:
    """Generates the set into ``root`` (see :func:`generate_synthetic`) unless its jsons exist.

    Existing data is reused as is, whatever ``gen_kwargs`` say. Generation goes to a temporary
    sibling folder that is renamed into place, so concurrent callers never see half a set.

    Raises:
        FileExistsError: ``root`` exists, is not empty and lacks the jsons.
    """
    root = Path(root)
    if _is_complete(root):
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists but lacks {', '.join(_JSONS)}; delete it or pick another folder for "
            "the synthetic set")
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    try:
        generate_synthetic(tmp, **gen_kwargs)
        if root.exists():
            root.rmdir()  # an empty folder (e.g. made by a launcher) is fine to replace
        os.replace(tmp, root)
    except OSError:
        if not _is_complete(root):  # a lost race is fine only if the winner left a complete set
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _require_generated(json_file: str) -> None:
    """Raises FileNotFoundError that says how to generate the set when ``json_file`` is missing."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"synthetic dataset file {json_file} not found; generate the set with "
            f"`python datasets/prepare_synthetic_grounding.py --out {os.path.dirname(json_file)}`")


def load_synthetic_grounding(json_file: str, image_root: str, dataset_name: str) -> List[dict]:
    """Dataset dicts (grounding contract) of a synthetic grounding json, one per caption."""
    _require_generated(json_file)
    return load_mdetr_grounding_json(json_file, image_root, dataset_name)


def load_synthetic_detection(json_file: str, image_root: str, dataset_name: str) -> List[dict]:
    """Dataset dicts (detection contract, 0-based contiguous ``category_id``) of a synthetic
    detection json."""
    _require_generated(json_file)
    return load_coco_detection_json(json_file, image_root, dataset_name)


def default_root() -> str:
    """``$FIBER_SYNTHETIC_ROOT``, else ``$DETECTRON2_DATASETS/synthetic_grounding``, else the
    repository's ``datasets/synthetic_grounding``."""
    if os.environ.get("FIBER_SYNTHETIC_ROOT"):
        return os.environ["FIBER_SYNTHETIC_ROOT"]
    base = os.environ.get("DETECTRON2_DATASETS") or str(
        Path(__file__).resolve().parents[3] / "datasets")
    return os.path.join(base, "synthetic_grounding")


def _register(name: str, loader, json_file: str, image_root: str, **metadata) -> None:
    """Registers ``name`` afresh (dropping an earlier registration, e.g. at another root)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, lambda: loader(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, **metadata)


def register_synthetic(root: Union[str, Path]) -> None:
    """(Re-)registers the four synthetic datasets at ``root``; the folder may not exist yet."""
    root = os.path.abspath(str(root))
    for split in SPLITS:
        image_root = os.path.join(root, "images", split)
        _register(
            f"synthetic_grounding_{split}", load_synthetic_grounding,
            os.path.join(root, f"grounding_{split}.json"), image_root,
            evaluator_type="flickr", flickr_gt_type="separate")
        _register(
            f"synthetic_detection_{split}", load_synthetic_detection,
            os.path.join(root, f"detection_{split}.json"), image_root,
            evaluator_type="coco", prompt_mode="all_categories", thing_classes=list(SHAPES),
            thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(SHAPES))})


register_synthetic(default_root())
