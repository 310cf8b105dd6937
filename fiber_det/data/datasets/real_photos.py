"""A small real-photo set with hand-drawn boxes: MDETR/Flickr-style grounding + COCO-style view.

Eight photographs, one caption each, boxes drawn by hand (about ±10-15 px) and checked by eye
on the pictures. Layout under ``root`` (default: the repository's ``datasets/real_photos``)::

    images/            coffee, astronaut, chelsea (scikit-image, CC0 / public domain, vendored);
                       motorcycle_left (copied from the installed scikit-image);
                       dog, person, giraffe (Debian ``darknet``) and quokka (``imgaug`` wheel),
                       fetched by ``datasets/prepare_real_photos.py`` when available
    grounding.json     MDETR/Flickr format: one entry per photo present, category 1 "object"
    detection.json     COCO format: one category per box name (fixed list, :data:`CATEGORIES`)

The jsons are (re)written by :func:`ensure_real_photos` from :data:`PHOTOS` and list only the
photos present. Registered names: ``real_photos_grounding`` (evaluator "flickr", separate GT
boxes) and ``real_photos_detection`` (evaluator "coco", prompt mode "all_categories").
"""
import json
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple, Union

from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...utils.paths import REPO_ROOT
from ..image_io import image_size
from .coco_style import load_coco_detection_json
from .mdetr import load_mdetr_grounding_json

__all__ = ["PHOTOS", "CATEGORIES", "default_root", "ensure_real_photos", "real_photo_jsons", "register_real_photos"]

Box = Tuple[int, int, int, int]


class Phrase(NamedTuple):
    """A phrase of the caption (found left to right), its detection category and its xyxy boxes."""

    text: str
    category: str
    boxes: Tuple[Box, ...]


class Photo(NamedTuple):
    file_name: str
    source: str  # "vendored" | "skimage" | "darknet" | "imgaug"
    caption: str
    phrases: Tuple[Phrase, ...]


def _named(*items: Tuple[str, Box]) -> Tuple[Phrase, ...]:
    return tuple(Phrase(name, name, (box,)) for name, box in items)


# xyxy in original pixels, drawn by hand and checked by drawing them on each photo (the quokka's
# is the box of imgaug's quokka_annotations.json); datasets/real_photos/README.md lists the sources.
PHOTOS: Tuple[Photo, ...] = (
    Photo("coffee.jpg", "vendored", "cup. saucer. spoon.",
          _named(("cup", (172, 16, 410, 306)), ("saucer", (76, 74, 480, 390)), ("spoon", (324, 64, 426, 326)))),
    Photo("astronaut.jpg", "vendored", "astronaut. helmet. flag. space shuttle.",
          _named(("astronaut", (18, 14, 364, 512)), ("helmet", (276, 342, 512, 512)), ("flag", (0, 0, 98, 512)),
                 ("space shuttle", (352, 0, 468, 284)))),
    Photo("chelsea.jpg", "vendored", "A tabby cat with green eyes and a pink nose.",
          (Phrase("A tabby cat", "cat", ((0, 0, 395, 299),)),
           Phrase("green eyes", "eye", ((134, 84, 210, 148), (292, 108, 344, 165))),
           Phrase("a pink nose", "nose", ((232, 222, 296, 268),)))),
    Photo("motorcycle_left.jpg", "skimage", "motorcycle. bench.",
          _named(("motorcycle", (92, 88, 686, 452)), ("bench", (40, 104, 292, 308)))),
    Photo("dog.jpg", "darknet", "dog. bicycle. truck.",
          _named(("dog", (132, 220, 312, 542)), ("bicycle", (124, 138, 568, 420)), ("truck", (466, 74, 690, 172)))),
    Photo("person.jpg", "darknet", "person. dog. horse.",
          _named(("person", (190, 96, 276, 375)), ("dog", (63, 263, 205, 344)), ("horse", (404, 138, 603, 346)))),
    Photo("giraffe.jpg", "darknet", "giraffe. zebra.",
          _named(("giraffe", (166, 28, 448, 440)), ("zebra", (246, 204, 428, 428)))),
    Photo("quokka.jpg", "imgaug", "animal.", _named(("animal", (148, 50, 550, 642)))),
)
# Fixed (first-appearance) order, so category ids do not depend on which photos are present.
CATEGORIES: Tuple[str, ...] = tuple(dict.fromkeys(ph.category for photo in PHOTOS for ph in photo.phrases))
_GROUNDING_NAME, _DETECTION_NAME = "real_photos_grounding", "real_photos_detection"


def default_root() -> Path:
    """The repository's ``datasets/real_photos`` folder."""
    return REPO_ROOT / "datasets" / "real_photos"


def _spans(photo: Photo) -> List[List[int]]:
    spans, cursor = [], 0
    for phrase in photo.phrases:
        start = photo.caption.index(phrase.text, cursor)
        cursor = start + len(phrase.text)
        spans.append([start, cursor])
    return spans


def real_photo_jsons(images_dir: Union[str, Path]) -> Tuple[dict, dict]:
    """(grounding json, detection json) for the photos of :data:`PHOTOS` present in ``images_dir``.

    Boxes are stored as COCO xywh with w = x2 - x1, h = y2 - y1 (the hand-drawn corners are pixel
    edges); the image ids are fixed per photo (its position in :data:`PHOTOS` + 1).
    """
    images, grounding_anns, detection_anns = [], [], []
    for index, photo in enumerate(PHOTOS, start=1):
        path = Path(images_dir) / photo.file_name
        if not path.is_file():
            continue
        height, width = image_size(path)  # as the image reader returns it (EXIF orientation applied)
        phrase_spans = _spans(photo)
        images.append({"file_name": photo.file_name, "height": height, "width": width, "id": index,
                       "caption": photo.caption, "dataset_name": "real_photos", "sentence_id": 0,
                       "original_img_id": index, "tokens_negative": [],
                       "tokens_positive_eval": [[s] for s in phrase_spans]})
        boxes = [(phrase, span, box) for phrase, span in zip(photo.phrases, phrase_spans) for box in phrase.boxes]
        for k, (phrase, span, (x1, y1, x2, y2)) in enumerate(boxes, start=1):
            if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
                raise ValueError(f"{photo.file_name}: box {(x1, y1, x2, y2)} of {phrase.text!r} is outside the image")
            ann = {"id": index * 100 + k, "image_id": index,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            grounding_anns.append({**ann, "category_id": 1, "tokens_positive": [span]})
            detection_anns.append({**ann, "category_id": CATEGORIES.index(phrase.category) + 1})
    grounding = {"images": images, "annotations": grounding_anns, "categories": [{"id": 1, "name": "object"}]}
    detection = {"images": [{k: img[k] for k in ("file_name", "height", "width", "id")} for img in images],
                 "annotations": detection_anns,
                 "categories": [{"id": i, "name": name} for i, name in enumerate(CATEGORIES, start=1)]}
    return grounding, detection


def _write_if_changed(path: Path, content: dict) -> None:
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            if json.load(f) == content:
                return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
    os.replace(tmp, path)  # atomic: concurrent test processes never read a half-written file


def _copy_from_skimage(images_dir: Path) -> None:
    """Re-encodes the photos that the installed scikit-image ships (no network) as JPEG."""
    try:
        import skimage.data
    except ImportError:
        return
    folder = Path(skimage.data.__file__).parent
    for photo in PHOTOS:
        source = folder / photo.file_name.replace(".jpg", ".png")
        target = images_dir / photo.file_name
        if photo.source == "skimage" and source.is_file() and not target.is_file():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with Image.open(source) as image:
                image.convert("RGB").save(tmp, format="JPEG", quality=90)
            os.replace(tmp, target)


def ensure_real_photos(root: Optional[Union[str, Path]] = None) -> Path:
    """Makes ``root`` usable without network: scikit-image photos copied, jsons (re)written.

    The darknet / imgaug photos are only listed if ``datasets/prepare_real_photos.py`` fetched
    them. Returns the root folder.

    Raises:
        FileNotFoundError: a vendored photo is missing from ``root/images``.
    """
    root = Path(root) if root is not None else default_root()
    images_dir = root / "images"
    missing = [p.file_name for p in PHOTOS if p.source == "vendored" and not (images_dir / p.file_name).is_file()]
    if missing:
        raise FileNotFoundError(f"vendored real photos missing from {images_dir}: {missing}")
    _copy_from_skimage(images_dir)
    grounding, detection = real_photo_jsons(images_dir)
    _write_if_changed(root / "grounding.json", grounding)
    _write_if_changed(root / "detection.json", detection)
    return root


def register_real_photos(root: Optional[Union[str, Path]] = None) -> None:
    """Registers ``real_photos_grounding`` and ``real_photos_detection`` (re-registering replaces
    them). Nothing is read until a dataset is loaded, which first calls :func:`ensure_real_photos`."""
    root = Path(root) if root is not None else default_root()
    images = str(root / "images")
    specs = (
        (_GROUNDING_NAME, load_mdetr_grounding_json, "grounding.json",
         {"evaluator_type": "flickr", "flickr_gt_type": "separate"}),
        (_DETECTION_NAME, load_coco_detection_json, "detection.json",
         {"evaluator_type": "coco", "prompt_mode": "all_categories", "thing_classes": list(CATEGORIES),
          "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(CATEGORIES))}}),
    )
    for name, loader, json_name, metadata in specs:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        json_file = str(root / json_name)

        def load(name=name, loader=loader, json_file=json_file):
            ensure_real_photos(root)
            return loader(json_file, images, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(json_file=json_file, image_root=images, **metadata)


register_real_photos()
