"""COCO-format detection jsons (COCO, LVIS, Objects365, ODinW / custom) as FIBER dataset dicts.

Each image becomes one dict of the detection contract (``task="detection"``; boxes XYWH_ABS as in
the json; ``category_id`` a 0-based contiguous index into ``metadata.thing_classes``). Contiguous
ids follow the order of the json's ``categories`` list, as upstream's grounding datasets do;
for COCO, LVIS and Objects365 that list is sorted by id, so it equals Detectron2's
sorted-id mapping.

We parse the json ourselves rather than with Detectron2's ``load_coco_json`` / ``load_lvis_json``:
those drop instances whose polygons are invalid, accept annotations without ``bbox``, take LVIS
names from ``synonyms[0]`` (not ``name``) and ignore ``file_name`` for LVIS.

The helpers at the bottom (``require_file``, ``read_coco_json``, ``annotations_by_image``,
``parse_bbox``) are shared with the MDETR grounding loader.
"""
import json
import logging
import math
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

__all__ = [
    "EVALUATOR_TYPES",
    "PROMPT_MODES",
    "IMAGE_PATH_STYLES",
    "load_coco_detection_json",
    "register_coco_grounding_dataset",
]

logger = logging.getLogger(__name__)

README = "datasets/README.md"
CUSTOM_DETECTION_SECTION = "Custom COCO-format datasets (ODinW)"
EVALUATOR_TYPES = ("coco", "lvis", "flickr", "refexp", "")
PROMPT_MODES = ("all_categories", "sampled_negatives")
# How an image entry names its file (relative to image_root):
#   "file_name":    the ``file_name`` field (COCO, Objects365 v1, custom);
#   "coco_url":     "<split>/<file>" from LVIS's ``coco_url`` (what upstream's LVIS loader reads),
#                   else ``file_name``;
#   "patch_folder": the last two parts of ``file_name``; Objects365 v2 lists
#                   "images/v1/patch8/x.jpg" while its archives unpack to "<split>/patch8/x.jpg".
IMAGE_PATH_STYLES = ("file_name", "coco_url", "patch_folder")
_BACKGROUND_NAMES = ("background", "__background__")
_LVIS_IMAGE_FIELDS = ("not_exhaustive_category_ids", "neg_category_ids")


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by mdetr.py)


def require_file(path: str, what: str, section: str) -> None:
    """Raises FileNotFoundError naming ``path`` and the README section that explains it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path} (see {README}, section '{section}')")


def require_dir(path: str, what: str, section: str) -> None:
    """Raises FileNotFoundError naming the missing folder and the README section."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path} (see {README}, section '{section}')")


def read_coco_json(json_file: str, section: str) -> dict:
    """Reads a COCO-style json and checks that it has ``images`` and ``annotations`` lists."""
    require_file(json_file, "annotation file", section)
    with open(json_file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file}: not valid json ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: expected a json object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{json_file}: missing or non-list field '{key}'")
    return data


def image_header(img: dict, index: int, json_file: str) -> Tuple[int, int, int]:
    """``(id, height, width)`` of ``images[index]``, each checked to be a positive int (id >= 0)."""
    values = []
    for field in ("id", "height", "width"):
        value = img.get(field) if isinstance(img, dict) else None
        # Some exporters write sizes as 480.0; an integral float is accepted, anything else is not.
        if isinstance(value, float) and field != "id" and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "id" else 1):
            raise ValueError(f"{json_file}: images[{index}] has a missing or invalid '{field}' ({value!r})")
        values.append(value)
    return values[0], values[1], values[2]


def annotations_by_image(data: dict, json_file: str, image_ids) -> Dict[int, List[dict]]:
    """Groups ``annotations`` by ``image_id`` (json order kept); an unknown image id raises."""
    grouped: Dict[int, List[dict]] = {image_id: [] for image_id in image_ids}
    for index, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in grouped:
            raise ValueError(
                f"{json_file}: annotations[{index}] (id {_ann_id(ann)}) has 'image_id' {image_id!r}, "
                "which is not the id of any entry of 'images'"
            )
        grouped[image_id].append(ann)
    return grouped


def parse_bbox(ann: dict, json_file: str) -> List[float]:
    """The annotation's ``bbox`` as 4 floats ``[x, y, w, h]`` (finite, w and h >= 0)."""
    box = ann.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(
            f"{json_file}: annotation {_ann_id(ann)} (image {ann.get('image_id')}) has a missing or "
            f"malformed 'bbox' ({box!r}); expected [x, y, width, height]"
        )
    try:
        box = [float(v) for v in box]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{json_file}: annotation {_ann_id(ann)}: 'bbox' {box!r} is not numeric") from e
    if not all(math.isfinite(v) for v in box) or box[2] < 0 or box[3] < 0:
        raise ValueError(
            f"{json_file}: annotation {_ann_id(ann)}: 'bbox' {box} must be finite with width, height >= 0"
        )
    return box


def parse_iscrowd(ann: dict, json_file: str) -> int:
    """``iscrowd`` as 0/1 (absent means 0, as in LVIS and MDETR jsons)."""
    value = ann.get("iscrowd", 0)
    if value not in (0, 1):
        raise ValueError(f"{json_file}: annotation {_ann_id(ann)}: 'iscrowd' must be 0 or 1, got {value!r}")
    return int(value)


def check_registration(name: str, evaluator_type: str) -> None:
    """Registration-time argument checks shared by both register helpers (no filesystem access)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    if evaluator_type not in EVALUATOR_TYPES:
        raise ValueError(f"{name}: evaluator_type must be one of {EVALUATOR_TYPES}, got {evaluator_type!r}")


def register_json_dataset(
    name: str, loader: Callable[[], List[dict]], *, json_file: str, image_root: str, evaluator_type: str,
    **metadata,
) -> None:
    """Registers ``loader`` under ``name`` with the metadata every json dataset has (no filesystem access).

    ``loader`` runs only when ``DatasetCatalog.get(name)`` loads the dataset, so a missing json or
    image folder raises FileNotFoundError then, not at registration.

    Args:
        name: dataset name for ``DatasetCatalog`` / ``MetadataCatalog`` (see :func:`check_registration`).
        loader: returns the dataset dicts.
        json_file, image_root, evaluator_type: recorded in the metadata.
        **metadata: further metadata fields.
    """
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type=evaluator_type, **metadata
    )


def _ann_id(ann) -> object:
    return ann.get("id") if isinstance(ann, dict) else None


# ---------------------------------------------------------------------------------------------
# Categories


def _kept_categories(data: dict, json_file: str, drop_background: bool) -> List[dict]:
    """The json's categories in list order, minus the background entry (upstream removes it from
    ODinW jsons).

    Dropped with ``drop_background``: categories named "background"/"__background__", and a
    category with id 0 that no annotation uses (Roboflow/ODinW exports put the dataset-level
    super-category there). A used background category raises instead of losing its boxes.
    """
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{json_file}: missing or empty 'categories' list")
    seen = set()
    for index, cat in enumerate(categories):
        if not (isinstance(cat, dict) and isinstance(cat.get("name"), str) and isinstance(cat.get("id"), int)):
            raise ValueError(
                f"{json_file}: categories[{index}] needs an int 'id' and a string 'name' ({cat!r})"
            )
        if cat["id"] in seen:
            raise ValueError(f"{json_file}: category id {cat['id']} appears twice in 'categories'")
        seen.add(cat["id"])
    if not drop_background:
        return list(categories)
    used = {ann.get("category_id") for ann in data["annotations"] if isinstance(ann, dict)}
    kept = []
    for cat in categories:
        named_background = cat["name"].strip().lower() in _BACKGROUND_NAMES
        if named_background and cat["id"] in used:
            raise ValueError(
                f"{json_file}: category {cat['id']} ('{cat['name']}') is annotated; register with "
                "drop_background=False to keep it as a class"
            )
        if named_background or (cat["id"] == 0 and cat["id"] not in used):
            continue
        kept.append(cat)
    if not kept:
        raise ValueError(f"{json_file}: no category is left after removing the background entry")
    return kept


def _set_category_metadata(dataset_name: str, json_file: str, categories: List[dict]) -> Dict[int, int]:
    """Stores thing_classes / id map; a registered, different class list raises (stale json)."""
    thing_classes = [cat["name"] for cat in categories]
    id_map = {cat["id"]: index for index, cat in enumerate(categories)}
    meta = MetadataCatalog.get(dataset_name)
    registered = meta.get("thing_classes")
    if registered is not None and list(registered) != thing_classes:
        diff = next((i for i, (a, b) in enumerate(zip(thing_classes, registered)) if a != b),
                    min(len(thing_classes), len(registered)))
        raise ValueError(
            f"{json_file}: categories differ from the registered thing_classes of '{dataset_name}' "
            f"({len(thing_classes)} vs {len(registered)} classes, first difference at index {diff})"
        )
    registered_map = meta.get("thing_dataset_id_to_contiguous_id")
    if registered_map is not None and dict(registered_map) != id_map:
        raise ValueError(f"{json_file}: category ids differ from those registered for '{dataset_name}'")
    if registered is None:
        meta.set(thing_classes=thing_classes)
    if registered_map is None:
        meta.set(thing_dataset_id_to_contiguous_id=id_map)
    caption_prompt = meta.get("caption_prompt")
    if caption_prompt is not None and len(caption_prompt) != len(thing_classes):
        raise ValueError(
            f"{dataset_name}: caption_prompt has {len(caption_prompt)} entries but {json_file} "
            f"has {len(thing_classes)} categories (after removing the background)"
        )
    return id_map


# ---------------------------------------------------------------------------------------------
# Loader


def _relative_image_path(img: dict, index: int, json_file: str, style: str) -> str:
    if style == "coco_url" and isinstance(img.get("coco_url"), str):
        return "/".join(img["coco_url"].split("/")[-2:])
    file_name = img.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        fields = "'file_name' or 'coco_url'" if style == "coco_url" else "'file_name'"
        raise ValueError(f"{json_file}: images[{index}] (id {img.get('id')}) has no {fields}")
    if style == "patch_folder":
        return "/".join(file_name.replace("\\", "/").split("/")[-2:])
    return file_name


def _detection_annotations(anns: List[dict], id_map: Mapping[int, int], json_file: str) -> List[dict]:
    out = []
    for ann in anns:
        category_id = ann.get("category_id")
        if category_id not in id_map:
            raise ValueError(
                f"{json_file}: annotation {_ann_id(ann)} (image {ann.get('image_id')}) has "
                f"'category_id' {category_id!r}, which is not a (non-background) category of the json"
            )
        out.append({
            "bbox": parse_bbox(ann, json_file),
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": id_map[category_id],
            "iscrowd": parse_iscrowd(ann, json_file),
        })
    return out


def load_coco_detection_json(
    json_file: str,
    image_root: str,
    dataset_name: str,
    *,
    drop_background: bool = False,
    image_path_style: str = "file_name",
    exclude_images: Sequence[str] = (),
    readme_section: str = CUSTOM_DETECTION_SECTION,
) -> List[dict]:
    """Loads a COCO-format detection json into dataset dicts and records its categories.

    Sets ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` of ``dataset_name``'s
    metadata (or checks them against values given at registration). LVIS image fields
    ``not_exhaustive_category_ids`` / ``neg_category_ids`` are passed through with raw LVIS ids.

    Args:
        json_file: the COCO-format json.
        image_root: folder the image paths are relative to.
        dataset_name: the registered name (stored in each dict's ``dataset``).
        drop_background: remove the background category (see :func:`_kept_categories`).
        image_path_style: one of :data:`IMAGE_PATH_STYLES`.
        exclude_images: relative image paths (after ``image_path_style``) that the json lists but
            the official release lacks; they are left out with a warning.
        readme_section: README section named by a missing-file error.

    Returns:
        One dict per image, sorted by image id.
    """
    if image_path_style not in IMAGE_PATH_STYLES:
        raise ValueError(f"image_path_style must be one of {IMAGE_PATH_STYLES}, got {image_path_style!r}")
    data = read_coco_json(json_file, readme_section)
    require_dir(image_root, "image folder", readme_section)
    categories = _kept_categories(data, json_file, drop_background)
    id_map = _set_category_metadata(dataset_name, json_file, categories)
    headers = [image_header(img, index, json_file) for index, img in enumerate(data["images"])]
    if len({h[0] for h in headers}) != len(headers):
        raise ValueError(f"{json_file}: 'images' has duplicate 'id' values")
    grouped = annotations_by_image(data, json_file, [h[0] for h in headers])
    excluded, skipped = set(exclude_images), []
    image_root = os.path.abspath(image_root)
    dicts = []
    for index in sorted(range(len(headers)), key=lambda i: headers[i][0]):
        img, (image_id, height, width) = data["images"][index], headers[index]
        relative = _relative_image_path(img, index, json_file, image_path_style)
        if relative in excluded:
            skipped.append(relative)
            continue
        record = {
            "file_name": os.path.join(image_root, relative),
            "height": height,
            "width": width,
            "image_id": image_id,
            "task": "detection",
            "dataset": dataset_name,
            "annotations": _detection_annotations(grouped[image_id], id_map, json_file),
        }
        record.update({key: img[key] for key in _LVIS_IMAGE_FIELDS if key in img})
        dicts.append(record)
    if skipped:
        logger.warning("%s: left out %d image(s) missing from the official release: %s",
                       json_file, len(skipped), ", ".join(skipped))
    return dicts


def _check_caption_prompt(name: str, caption_prompt) -> Optional[List[dict]]:
    if caption_prompt is None:
        return None
    if isinstance(caption_prompt, (str, bytes)) or not isinstance(caption_prompt, Sequence):
        raise TypeError(f"{name}: caption_prompt must be a list of {{prefix, name, suffix}} dicts")
    entries = []
    for index, entry in enumerate(caption_prompt):
        if not isinstance(entry, Mapping) or set(entry) - {"prefix", "name", "suffix"}:
            raise ValueError(
                f"{name}: caption_prompt[{index}] must be a dict with keys among prefix/name/suffix, "
                f"got {entry!r}"
            )
        if not all(isinstance(v, str) for v in entry.values()):
            raise TypeError(f"{name}: caption_prompt[{index}] values must be strings ({entry!r})")
        entries.append(dict(entry))
    return entries


def register_coco_grounding_dataset(
    name: str,
    json_file: str,
    image_root: str,
    *,
    evaluator_type: str = "coco",
    prompt_mode: str = "all_categories",
    caption_prompt: Optional[Sequence[Mapping[str, str]]] = None,
    drop_background: bool = True,
    image_path_style: str = "file_name",
    exclude_images: Sequence[str] = (),
    readme_section: str = CUSTOM_DETECTION_SECTION,
    **metadata,
) -> None:
    """Registers a COCO-format detection json, used through category prompts.

    Lazy, as :func:`register_json_dataset`: nothing is read until the dataset is loaded.

    Args:
        name: dataset name for ``DatasetCatalog`` / ``MetadataCatalog``.
        json_file: COCO-format annotation json (ODinW: ``_annotations.coco.json`` or GLIP's
            ``annotations_without_background.json``).
        image_root: folder the json's image paths are relative to.
        evaluator_type: "coco" or "lvis" for evaluation sets (see :data:`EVALUATOR_TYPES`).
        prompt_mode: "all_categories" (COCO, ODinW: every class in every prompt) or
            "sampled_negatives" (LVIS train, Objects365: positives + sampled negatives), see
            :mod:`fiber_det.data.training_prompts`.
        caption_prompt: optional ``{"prefix", "name", "suffix"}`` per class, in contiguous order
            (ODinW's ``CAPTION_PROMPT``); its length is checked against the json at load time.
        drop_background: remove a "background" category or an unused id-0 category.
        image_path_style, exclude_images, readme_section: see :func:`load_coco_detection_json`.
        **metadata: extra metadata, e.g. ``thing_classes`` known in advance (checked at load).
    """
    check_registration(name, evaluator_type)
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"{name}: prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
    if image_path_style not in IMAGE_PATH_STYLES:
        raise ValueError(
            f"{name}: image_path_style must be one of {IMAGE_PATH_STYLES}, got {image_path_style!r}"
        )
    caption_prompt = _check_caption_prompt(name, caption_prompt)
    exclude_images = tuple(exclude_images)
    if caption_prompt is not None:
        metadata["caption_prompt"] = caption_prompt
    register_json_dataset(
        name,
        lambda: load_coco_detection_json(
            json_file, image_root, name, drop_background=drop_background,
            image_path_style=image_path_style, exclude_images=exclude_images,
            readme_section=readme_section,
        ),
        json_file=json_file, image_root=image_root, evaluator_type=evaluator_type, prompt_mode=prompt_mode,
        **metadata,
    )
