"""Counts and logs, once per training set, the boxes that reach outside their image.

Training boxes are clipped to the image and dropped when nothing is left, as the official loader
(``clip_to_image(remove_empty=True)``) and Detectron2 do: the mapper's
:func:`~fiber_det.data.mapper.legacy_xyxy_boxes` then its ``x2 > x1 and y2 > y1`` rule. Nothing of that is silent: how many boxes were
clipped or dropped, and in which files, is logged when the training set is assembled.
"""
import logging
from typing import Sequence, Set, Tuple

import numpy as np

from detectron2.structures import BoxMode

__all__ = ["report_boxes_outside_images"]

logger = logging.getLogger(__name__)
_REPORTED: Set[str] = set()


def report_boxes_outside_images(dataset_name: str, dicts: Sequence[dict], examples: int = 5) -> Tuple[int, int]:
    """Logs (once per dataset name and process) the non-crowd boxes of ``dicts`` that the mapper
    clips to their image and those it then drops as empty, with up to ``examples`` file names each.

    Returns:
        (clipped, dropped) box counts.
    """
    clipped, dropped, clipped_files, dropped_files, total = 0, 0, [], [], 0
    for record in dicts:
        anns = [a for a in record.get("annotations", ()) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        total += len(anns)
        h, w = record["height"], record["width"]
        corners = _legacy_corners(anns)
        outside = (corners[:, :2] < 0).any(1) | (corners[:, 2] > w - 1) | (corners[:, 3] > h - 1)
        inside = corners.copy()  # clipped as legacy_xyxy_boxes does (vectorised: this runs over every box)
        inside[:, 0::2] = inside[:, 0::2].clip(0, w - 1)
        inside[:, 1::2] = inside[:, 1::2].clip(0, h - 1)
        empty = (inside[:, 2] <= inside[:, 0]) | (inside[:, 3] <= inside[:, 1])
        for files, mask in ((clipped_files, outside & ~empty), (dropped_files, empty)):
            if mask.any() and len(files) < examples:
                files.append(f"{record.get('file_name')} ({int(mask.sum())})")
        clipped, dropped = clipped + int((outside & ~empty).sum()), dropped + int(empty.sum())
    if dataset_name not in _REPORTED and (clipped or dropped):
        _REPORTED.add(dataset_name)
        logger.warning(
            f"training set '{dataset_name}': of {total} boxes, {clipped} reach outside their image and are clipped "
            f"to it{' (e.g. ' + ', '.join(clipped_files) + ')' if clipped else ''}, and {dropped} are empty once "
            f"clipped and dropped{' (e.g. ' + ', '.join(dropped_files) + ')' if dropped else ''}")
    return clipped, dropped


def _legacy_corners(anns: Sequence[dict]) -> np.ndarray:
    """(N, 4) unclipped legacy xyxy (x2 = x + w - 1) of the annotations' boxes."""
    if all(a.get("bbox_mode", BoxMode.XYWH_ABS) == BoxMode.XYWH_ABS for a in anns):
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    else:
        boxes = np.asarray([BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYWH_ABS)
                            for a in anns], dtype=np.float64)
    boxes[:, 2:] += boxes[:, :2] - 1
    return boxes
