"""Dataset registration: COCO / LVIS / Objects365 / ODinW detection jsons,
MDETR-style grounding jsons (Flickr30k Entities, RefCOCO/+/g, GoldG) and image-caption sets
(Karpathy jsons, the official Arrow files, JSON-lines) as Detectron2 datasets.

Importing this package registers the standard names (see :mod:`.builtin` and datasets/README.md).
"""
from .coco_style import load_coco_detection_json, register_coco_grounding_dataset
from .mdetr import load_mdetr_grounding_json, register_mdetr_grounding_dataset
from . import builtin  # noqa: F401  (registers the standard names under $DETECTRON2_DATASETS)

__all__ = [
    "load_coco_detection_json",
    "load_mdetr_grounding_json",
    "register_coco_grounding_dataset",
    "register_mdetr_grounding_dataset",
]

# Synthetic dataset registration (owned by synthetic.py) is imported below this line.
from . import synthetic  # noqa: E402,F401  (registers synthetic_{grounding,detection}_{train,val})
from . import real_photos  # noqa: E402,F401  (registers real_photos_{grounding,detection})
from . import synthetic_captions  # noqa: E402,F401  (registers synthetic_captions_{train,val})
