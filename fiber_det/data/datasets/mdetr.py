"""MDETR-style grounding jsons (Flickr30k Entities, RefCOCO/+/g, GoldG) as FIBER dataset dicts.

The files are COCO-style with one ``images`` entry per (image, caption) pair (datasets/README.md
lists the fields of each release). Each
entry becomes one dict of the grounding contract: the ``caption`` verbatim, one annotation per box
with its raw ``category_id`` and character spans ``tokens_positive``, and ``tokens_positive_eval``
(one span list per evaluated phrase, in sentence order): the entry's own field when the json has
it (Flickr30k), else :func:`fiber_det.data.prompt.grounding_phrases` of the annotations (one
phrase per distinct span list in order of first appearance; RefCOCO: the single annotation's
spans). The image fields ``dataset_name``, ``sentence_id``,
``original_img_id``, ``original_id``, ``data_source`` and ``tokens_negative`` pass through.
"""
import os
from typing import List, Optional

from detectron2.structures import BoxMode

from ..prompt import grounding_phrases
from .coco_style import (
    annotations_by_image,
    check_registration,
    image_header,
    parse_bbox,
    parse_iscrowd,
    read_coco_json,
    register_json_dataset,
    require_dir,
)

__all__ = ["FLICKR_GT_TYPES", "load_mdetr_grounding_json", "register_mdetr_grounding_dataset"]

CUSTOM_GROUNDING_SECTION = "Custom grounding datasets (MDETR format)"
FLICKR_GT_TYPES = ("separate", "merged")
_PASSTHROUGH_FIELDS = (
    "dataset_name", "sentence_id", "original_img_id", "original_id", "data_source", "tokens_negative",
)

Span = List[int]


def _spans(value, caption: str, where: str, field: str) -> List[Span]:
    """Checks a list of ``[start, end)`` character spans against the caption and copies it."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: '{field}' must be a list of [start, end] spans, got {value!r}")
    spans = []
    for span in value:
        if (
            not isinstance(span, (list, tuple)) or len(span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
        ):
            raise ValueError(f"{where}: '{field}' has a malformed span {span!r}; expected [start, end]")
        start, end = span
        if not 0 <= start < end <= len(caption):
            raise ValueError(
                f"{where}: '{field}' span [{start}, {end}) is outside the caption "
                f"({len(caption)} characters: {caption!r})"
            )
        spans.append([start, end])
    return spans


def _grounding_annotations(anns: List[dict], caption: str, json_file: str) -> List[dict]:
    out = []
    for ann in anns:
        where = f"{json_file}: annotation {ann.get('id')} (image {ann.get('image_id')})"
        if "tokens_positive" not in ann:
            raise ValueError(f"{where} has no 'tokens_positive'")
        category_id = ann.get("category_id")
        if isinstance(category_id, bool) or not isinstance(category_id, int):
            raise ValueError(f"{where} has a missing or non-int 'category_id' ({category_id!r})")
        out.append({
            "bbox": parse_bbox(ann, json_file),
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": category_id,
            "iscrowd": parse_iscrowd(ann, json_file),
            "tokens_positive": _spans(ann["tokens_positive"], caption, where, "tokens_positive"),
        })
    return out


def _tokens_positive_eval(img: dict, caption: str, annotations: List[dict], where: str) -> List[List[Span]]:
    if "tokens_positive_eval" not in img:
        return grounding_phrases({"annotations": annotations})
    value = img["tokens_positive_eval"]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: 'tokens_positive_eval' must be a list of span lists, got {value!r}")
    return [_spans(phrase, caption, where, "tokens_positive_eval") for phrase in value]


def _image_path(img: dict, where: str, image_root: str, coco_image_root: Optional[str]) -> str:
    file_name = img.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"{where} has no 'file_name'")
    # GoldG mixes COCO train2014 images (data_source "coco") with Visual Genome / GQA images.
    root = coco_image_root if coco_image_root is not None and img.get("data_source") == "coco" else image_root
    return os.path.join(root, file_name)


def load_mdetr_grounding_json(
    json_file: str,
    image_root: str,
    dataset_name: str,
    *,
    coco_image_root: Optional[str] = None,
    readme_section: str = CUSTOM_GROUNDING_SECTION,
) -> List[dict]:
    """Loads an MDETR-style grounding json into dataset dicts (grounding contract).

    Args:
        json_file: the json (e.g. ``final_flickr_separateGT_val.json``).
        image_root: folder the ``file_name`` fields are relative to.
        dataset_name: the registered name (stored in each dict's ``dataset``).
        coco_image_root: folder for entries with ``data_source == "coco"`` (GoldG); None means
            ``image_root`` for every entry.
        readme_section: README section named by a missing-file error.

    Returns:
        One dict per (image, caption) entry, sorted by entry id.
    """
    data = read_coco_json(json_file, readme_section)
    require_dir(image_root, "image folder", readme_section)
    headers = [image_header(img, index, json_file) for index, img in enumerate(data["images"])]
    if len({h[0] for h in headers}) != len(headers):
        raise ValueError(f"{json_file}: 'images' has duplicate 'id' values (one id per caption entry)")
    grouped = annotations_by_image(data, json_file, [h[0] for h in headers])
    image_root = os.path.abspath(image_root)
    if coco_image_root is not None:
        if any(img.get("data_source") == "coco" for img in data["images"]):
            require_dir(coco_image_root, "COCO image folder", readme_section)
        coco_image_root = os.path.abspath(coco_image_root)
    dicts = []
    for index in sorted(range(len(headers)), key=lambda i: headers[i][0]):
        img, (image_id, height, width) = data["images"][index], headers[index]
        where = f"{json_file}: images[{index}] (id {image_id})"
        caption = img.get("caption")
        if not isinstance(caption, str) or not caption:
            raise ValueError(f"{where} has no 'caption' (every entry of a grounding json needs one)")
        annotations = _grounding_annotations(grouped[image_id], caption, json_file)
        record = {
            "file_name": _image_path(img, where, image_root, coco_image_root),
            "height": height,
            "width": width,
            "image_id": image_id,
            "task": "grounding",
            "dataset": dataset_name,
            "caption": caption,
            "annotations": annotations,
            "tokens_positive_eval": _tokens_positive_eval(img, caption, annotations, where),
        }
        record.update({key: img[key] for key in _PASSTHROUGH_FIELDS if key in img})
        dicts.append(record)
    return dicts


def register_mdetr_grounding_dataset(
    name: str,
    json_file: str,
    image_root: str,
    evaluator_type: str = "",
    *,
    coco_image_root: Optional[str] = None,
    readme_section: str = CUSTOM_GROUNDING_SECTION,
    **metadata,
) -> None:
    """Registers an MDETR-style grounding json (captions used verbatim, as upstream trains on them).

    Lazy, as :func:`~.coco_style.register_json_dataset`: nothing is read until the dataset is loaded.

    Args:
        name: dataset name for ``DatasetCatalog`` / ``MetadataCatalog``.
        json_file: the MDETR-style json.
        image_root: folder the json's ``file_name`` fields are relative to.
        evaluator_type: "flickr", "refexp", or "" for training-only sets.
        coco_image_root: see :func:`load_mdetr_grounding_json` (GoldG).
        readme_section: README section named by a missing-file error.
        **metadata: extra metadata, e.g. ``flickr_gt_type`` ("separate" | "merged") and
            ``flickr_annotations_root`` for the Flickr30k evaluator.
    """
    check_registration(name, evaluator_type)
    gt_type = metadata.get("flickr_gt_type")
    if gt_type is not None and gt_type not in FLICKR_GT_TYPES:
        raise ValueError(f"{name}: flickr_gt_type must be one of {FLICKR_GT_TYPES}, got {gt_type!r}")
    if coco_image_root is not None:
        metadata["coco_image_root"] = coco_image_root
    register_json_dataset(
        name,
        lambda: load_mdetr_grounding_json(
            json_file, image_root, name, coco_image_root=coco_image_root, readme_section=readme_section
        ),
        json_file=json_file, image_root=image_root, evaluator_type=evaluator_type, **metadata,
    )
