"""Dataset dicts of the fiber_det contract on the vendored real photos (datasets/real_photos),
shared by the mapper and model tests."""
from detectron2.structures import BoxMode

from conftest import REPO

IMAGES = REPO / "datasets" / "real_photos" / "images"
COFFEE = {"cup": (172, 16, 410, 306), "saucer": (76, 74, 480, 390), "spoon": (324, 64, 426, 326)}


def ann(xyxy, **extra):
    """An annotation of an xyxy box, stored as COCO xywh."""
    x1, y1, x2, y2 = xyxy
    return {"bbox": [x1, y1, x2 - x1, y2 - y1], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 0, **extra}


def coffee_grounding(**extra):
    """coffee.jpg (600 x 400) with the caption "cup. saucer. spoon." and one box per word."""
    caption = "cup. saucer. spoon."
    spans = {"cup": [0, 3], "saucer": [5, 11], "spoon": [13, 18]}
    return {
        "file_name": str(IMAGES / "coffee.jpg"), "height": 400, "width": 600, "image_id": 7,
        "task": "grounding", "dataset": "test", "caption": caption, "sentence_id": 3,
        "annotations": [ann(COFFEE[k], category_id=1, tokens_positive=[spans[k]]) for k in COFFEE],
        "tokens_positive_eval": [[spans[k]] for k in COFFEE], **extra,
    }


def chelsea_grounding():
    """chelsea.jpg (451 x 300): a cat, its two eyes (one phrase) and its nose."""
    return {
        "file_name": str(IMAGES / "chelsea.jpg"), "height": 300, "width": 451, "image_id": 3,
        "task": "grounding", "dataset": "test", "caption": "A tabby cat with green eyes and a pink nose.",
        "annotations": [ann((0, 0, 395, 299), category_id=1, tokens_positive=[[0, 11]]),
                        ann((134, 84, 210, 148), category_id=1, tokens_positive=[[17, 27]]),
                        ann((292, 108, 344, 165), category_id=1, tokens_positive=[[17, 27]]),
                        ann((232, 222, 296, 268), category_id=1, tokens_positive=[[32, 43]])],
        "tokens_positive_eval": [[[0, 11]], [[17, 27]], [[32, 43]]],
    }
