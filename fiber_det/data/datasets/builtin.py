"""Registers FIBER's standard datasets under ``$DETECTRON2_DATASETS`` (default ``datasets``).

Names are chosen not to clash with Detectron2's own (``coco_2017_val`` and ``lvis_v1_val`` are
Detectron2's plain instance-detection registrations; ours add ``_grounding``). Paths are relative
to the root; datasets/README.md explains each layout under the section named in
:data:`README_SECTIONS`. Nothing is read at registration.
"""
import os
from typing import Dict, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

from .caption_pairs import README_SECTION as CAPTIONS_SECTION
from .caption_pairs import load_caption_arrow, load_karpathy_json, register_caption_dataset
from .coco_style import register_coco_grounding_dataset
from .mdetr import register_mdetr_grounding_dataset

__all__ = [
    "COCO_SPLITS",
    "LVIS_SPLITS",
    "OBJECTS365_SPLITS",
    "FLICKR_SPLITS",
    "REFEXP_SPLITS",
    "GOLDG_SPLITS",
    "KARPATHY_SPLITS",
    "ARROW_CAPTION_SETS",
    "README_SECTIONS",
    "default_root",
    "register_all_fiber_datasets",
]

README_SECTIONS = {
    "coco": "COCO 2017",
    "lvis": "LVIS v1",
    "objects365": "Objects365",
    "flickr": "Flickr30k Entities",
    "refexp": "RefCOCO, RefCOCO+, RefCOCOg",
    "goldg": "GoldG (MDETR mixed grounding)",
    "captions": CAPTIONS_SECTION,
}

# name -> (image_root, json_file)
COCO_SPLITS: Dict[str, Tuple[str, str]] = {
    "coco_2017_train_grounding": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val_grounding": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}
# name -> (image_root, json_file, prompt_mode); images under coco/{train,val}2017 via coco_url.
LVIS_SPLITS: Dict[str, Tuple[str, str, str]] = {
    "lvis_v1_train_grounding": ("coco", "lvis/lvis_v1_train.json", "sampled_negatives"),
    "lvis_v1_val_grounding": ("coco", "lvis/lvis_v1_val.json", "all_categories"),
    "lvis_v1_minival_grounding": (
        "coco", "lvis/lvis_v1_minival_inserted_image_name.json", "all_categories"
    ),
}
# name -> (image_root, json_file, image_path_style)
OBJECTS365_SPLITS: Dict[str, Tuple[str, str, str]] = {
    "objects365_v1_train": ("objects365/train", "objects365/annotations/objects365_train.json", "file_name"),
    "objects365_v1_val": ("objects365/val", "objects365/annotations/objects365_val.json", "file_name"),
    "objects365_v2_train": ("objects365v2/train", "objects365v2/annotations/zhiyuan_objv2_train.json",
                            "patch_folder"),
    "objects365_v2_val": ("objects365v2/val", "objects365v2/annotations/zhiyuan_objv2_val.json",
                          "patch_folder"),
}
# Listed in zhiyuan_objv2_train.json but absent from the released train archives.
OBJECTS365_V2_MISSING = (
    "patch16/objects365_v2_00908726.jpg",
    "patch6/objects365_v1_00320532.jpg",
    "patch6/objects365_v1_00320534.jpg",
)
_MDETR = "mdetr_annotations"
# name -> (json_file, flickr_gt_type); images in flickr30k/flickr30k_images
FLICKR_SPLITS: Dict[str, Tuple[str, str]] = {
    **{f"flickr30k_{s}_separate": (f"{_MDETR}/final_flickr_separateGT_{s}.json", "separate")
       for s in ("train", "val", "test")},
    **{f"flickr30k_{s}_merged": (f"{_MDETR}/final_flickr_mergedGT_{s}.json", "merged") for s in ("val", "test")},
}
# name -> json_file; images in coco/train2014
REFEXP_SPLITS: Dict[str, str] = {
    **{f"{d}_{s}": f"{_MDETR}/finetune_{d}_{s}.json"
       for d in ("refcoco", "refcoco+") for s in ("train", "val", "testA", "testB")},
    "refcocog_train": f"{_MDETR}/finetune_refcocog_train.json",
    "refcocog_val": f"{_MDETR}/finetune_refcocog_val.json",
    "refcocog_test": f"{_MDETR}/finetune_refcocog_test_corrected.json",
}
# name -> (json_file, image_root of non-COCO entries, image_root of data_source "coco")
GOLDG_SPLITS: Dict[str, Tuple[str, str, str]] = {
    "goldg_mixed_train_no_coco": (f"{_MDETR}/final_mixed_train_no_coco.json", "gqa/images", "coco/train2014"),
}

# Image-caption sets of the coarse stage. Official training set = Karpathy train + val (restval
# excluded); the official evaluation (and validation) set = Karpathy test.
# name -> (Karpathy json, image folder, Karpathy splits, evaluator_type)
KARPATHY_SPLITS: Dict[str, Tuple[str, str, Tuple[str, ...], str]] = {
    "coco_karpathy_train": ("karpathy/dataset_coco.json", "coco", ("train", "val"), ""),
    "coco_karpathy_test": ("karpathy/dataset_coco.json", "coco", ("test",), "retrieval"),
    "flickr30k_karpathy_train": ("karpathy/dataset_flickr30k.json", "flickr30k/flickr30k_images", ("train", "val"), ""),
    "flickr30k_karpathy_test": ("karpathy/dataset_flickr30k.json", "flickr30k/flickr30k_images", ("test",), "retrieval"),
}
# name -> (Arrow files under arrow/, missing files allowed (official for GCC/SBU parts), evaluator_type)
ARROW_CAPTION_SETS: Dict[str, Tuple[Tuple[str, ...], bool, str]] = {
    "coco_karpathy_train_arrow": (("coco_caption_karpathy_train.arrow", "coco_caption_karpathy_val.arrow"), False, ""),
    "coco_karpathy_test_arrow": (("coco_caption_karpathy_test.arrow",), False, "retrieval"),
    "flickr30k_karpathy_train_arrow": (("f30k_caption_karpathy_train.arrow", "f30k_caption_karpathy_val.arrow"),
                                       False, ""),
    "flickr30k_karpathy_test_arrow": (("f30k_caption_karpathy_test.arrow",), False, "retrieval"),
    "gcc_train_arrow": (tuple(f"conceptual_caption_train_{k}.arrow" for k in range(31)), True, ""),
    "sbu_train_arrow": (tuple(f"sbu_{k}.arrow" for k in range(9)), True, ""),
    "vg_train_arrow": (("vg.arrow",), False, ""),
}


def default_root() -> str:
    """``$DETECTRON2_DATASETS`` (user-expanded), else ``datasets`` as in Detectron2."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _coco_metadata() -> dict:
    things = sorted((c for c in COCO_CATEGORIES if c["isthing"]), key=lambda c: c["id"])
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
    }


def _lvis_metadata() -> dict:
    # The json's "name" (what upstream prompts with), not Detectron2's synonyms[0].
    cats = sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
    return {
        "thing_classes": [c["name"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }


def _unregister(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _register_detection(root: str) -> None:
    for name, (images, json_file) in COCO_SPLITS.items():
        _unregister(name)
        register_coco_grounding_dataset(
            name, os.path.join(root, json_file), os.path.join(root, images), evaluator_type="coco",
            prompt_mode="all_categories", drop_background=False, readme_section=README_SECTIONS["coco"],
            **_coco_metadata(),
        )
    for name, (images, json_file, prompt_mode) in LVIS_SPLITS.items():
        _unregister(name)
        register_coco_grounding_dataset(
            name, os.path.join(root, json_file), os.path.join(root, images), evaluator_type="lvis",
            prompt_mode=prompt_mode, drop_background=False, image_path_style="coco_url",
            readme_section=README_SECTIONS["lvis"], **_lvis_metadata(),
        )
    for name, (images, json_file, style) in OBJECTS365_SPLITS.items():
        _unregister(name)
        register_coco_grounding_dataset(
            name, os.path.join(root, json_file), os.path.join(root, images), evaluator_type="coco",
            prompt_mode="sampled_negatives", drop_background=False, image_path_style=style,
            exclude_images=OBJECTS365_V2_MISSING if name == "objects365_v2_train" else (),
            readme_section=README_SECTIONS["objects365"],
        )


def _register_grounding(root: str) -> None:
    for name, (json_file, gt_type) in FLICKR_SPLITS.items():
        _unregister(name)
        register_mdetr_grounding_dataset(
            name, os.path.join(root, json_file), os.path.join(root, "flickr30k", "flickr30k_images"),
            "flickr", readme_section=README_SECTIONS["flickr"], flickr_gt_type=gt_type,
            flickr_annotations_root=os.path.join(root, "flickr30k"),
        )
    for name, json_file in REFEXP_SPLITS.items():
        _unregister(name)
        register_mdetr_grounding_dataset(
            name, os.path.join(root, json_file), os.path.join(root, "coco", "train2014"), "refexp",
            readme_section=README_SECTIONS["refexp"],
        )
    for name, (json_file, images, coco_images) in GOLDG_SPLITS.items():
        _unregister(name)
        register_mdetr_grounding_dataset(
            name, os.path.join(root, json_file), os.path.join(root, images), "",
            coco_image_root=os.path.join(root, coco_images), readme_section=README_SECTIONS["goldg"],
        )


def _register_captions(root: str) -> None:
    for name, (json_file, images, splits, evaluator_type) in KARPATHY_SPLITS.items():
        json_path, image_root = os.path.join(root, json_file), os.path.join(root, images)
        register_caption_dataset(
            name, lambda j=json_path, i=image_root, s=splits, n=name: load_karpathy_json(j, i, s, n),
            evaluator_type=evaluator_type, json_file=json_path, image_root=image_root, karpathy_splits=list(splits))
    for name, (files, missing_ok, evaluator_type) in ARROW_CAPTION_SETS.items():
        paths = [os.path.join(root, "arrow", f) for f in files]
        register_caption_dataset(
            name, lambda p=paths, m=missing_ok, n=name: load_caption_arrow(p, n, missing_ok=m),
            evaluator_type=evaluator_type, arrow_files=paths)


def register_all_fiber_datasets(root: str) -> None:
    """(Re-)registers every standard name at ``root``; called at import with :func:`default_root`."""
    _register_detection(root)
    _register_grounding(root)
    _register_captions(root)


register_all_fiber_datasets(default_root())
