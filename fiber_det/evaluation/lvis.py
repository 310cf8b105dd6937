"""LVIS FixedAP (Dave et al. 2021, as MDETR and FIBER evaluate LVIS).

Protocol (the official evaluator's semantics; the model side runs 1203 names in 31 chunks of 40,
each keeping up to 300 detections per image):
1. collect every detection of the dataset (labels -> LVIS category ids through the metadata's
   ``thing_dataset_id_to_contiguous_id``; boxes xywh without "+1"); no per-image cap;
2. per category keep the ``topk`` (10,000) highest scores over the whole dataset. Equal scores keep
   image order, which here is ascending ``image_id`` (so results do not depend on the number of
   processes), then the model's order within an image. The cap comes before LVIS's federated
   filtering, so detections on images where the category is neither positive nor negative use up
   budget and are then ignored;
3. drop detections with zero area (w * h = 0), after the cap as upstream (LVIS's own ``0 < area``
   filter did it there; we drop them explicitly so the dump equals what is scored);
4. ``lvis`` package: ``LVISResults(gt, dets, max_dets=-1)`` + ``LVISEval`` (bbox).

Task "bbox": the official LVIS table in percent: AP, AP50, AP75, APs, APm, APl, APr, APc, APf and
the average recall AR@-1, ARs@-1, ARm@-1, ARl@-1 (all sizes / small / medium / large). The ``lvis``
package names recall after the per-image cap, ``AR@300`` in standard LVIS; FixedAP has no per-image
cap (``max_dets = -1``), so the official FixedAP run reports it as ``AR@-1``: the recall of every
kept detection, averaged over IoU 0.50:0.95 and over the categories with ground truth. A value LVIS
reports as -1 (e.g. APr when no rare category has ground truth) becomes NaN.

Dumped to ``output_dir`` (when given): ``lvis_instances_results.json``, the selected detections
(after steps 2-3) as an LVIS result list ``[{"image_id", "category_id" (LVIS id),
"bbox": [x, y, w, h], "score"}]`` in image order. Re-selecting them is a no-op, so
tools/evaluate_predictions.py reproduces the numbers from this file.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.utils.file_io import PathManager

from .coco import contiguous_to_json_ids
from .gather import PerImageEvaluator

__all__ = ["LVISFixedAPEvaluator", "fixed_ap_keep", "select_fixed_ap_detections", "LVIS_RESULTS_FILE"]

logger = logging.getLogger(__name__)

LVIS_RESULTS_FILE = "lvis_instances_results.json"
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR@-1", "ARs@-1", "ARm@-1", "ARl@-1")


def _lvis_package():
    # imported on use: the package is not an install requirement (tools/setup_env.sh adds it)
    try:
        import lvis
    except ImportError as e:
        raise ImportError("LVIS evaluation needs the 'lvis' package: pip install --no-deps lvis==0.5.3") from e
    return lvis


def fixed_ap_keep(category_ids: np.ndarray, scores: np.ndarray, boxes: np.ndarray, topk: int) -> np.ndarray:
    """Steps 2-3 of the protocol on detections given in image order.

    Args:
        category_ids: (N,) category of each detection.
        scores: (N,) scores.
        boxes: (N, 4) xywh boxes.
        topk: detections kept per category.

    Returns:
        (K,) ascending indices of the kept detections.
    """
    if topk <= 0:
        raise ValueError(f"topk must be positive, got {topk}")
    n = len(scores)
    # by category, then score descending, then input position (ties: the earlier image stays ahead)
    order = np.lexsort((np.arange(n), -np.asarray(scores, dtype=np.float64), category_ids))
    sorted_categories = np.asarray(category_ids)[order]
    group_start = np.searchsorted(sorted_categories, sorted_categories, side="left")
    kept = np.sort(order[np.arange(n) - group_start < topk])
    areas = boxes[kept, 2].astype(np.float64) * boxes[kept, 3].astype(np.float64)
    return kept[areas > 0]


def select_fixed_ap_detections(results: Sequence[dict], topk: int) -> List[dict]:
    """:func:`fixed_ap_keep` on LVIS result dicts in image order; the kept ones in input order."""
    if not results:
        return []
    keep = fixed_ap_keep(
        np.array([r["category_id"] for r in results]),
        np.array([r["score"] for r in results], dtype=np.float64),
        np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4),
        topk,
    )
    return [results[i] for i in keep]


class LVISFixedAPEvaluator(PerImageEvaluator):
    """LVIS box AP with the FixedAP protocol (see the module docstring)."""

    @configurable
    def __init__(
        self,
        dataset_name: str,
        *,
        topk: int = 10000,
        output_dir: Optional[str] = None,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file`` (the LVIS json)
                and (once loaded) ``thing_dataset_id_to_contiguous_id``.
            topk: detections kept per category (``TEST.LVIS_TOPK_PER_CATEGORY``).
            output_dir: where the selected detections are dumped (None: no dump).
            distributed: gather the predictions of all processes.
        """
        if topk <= 0:
            raise ValueError(f"topk must be positive, got {topk}")
        self._metadata = MetadataCatalog.get(dataset_name)
        json_file = self._metadata.get("json_file")
        if not json_file:
            raise ValueError(f"dataset '{dataset_name}': metadata has no 'json_file' (the LVIS json)")
        self._lvis_api = _lvis_package().LVIS(PathManager.get_local_path(json_file))
        self._topk = topk
        super().__init__(dataset_name, output_dir=output_dir, distributed=distributed)

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return {"dataset_name": dataset_name, "output_dir": output_dir, "topk": cfg.TEST.LVIS_TOPK_PER_CATEGORY}

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        # detections stay in arrays (36 bytes each): a minival run has ~46M of them (31 chunks x 300)
        json_ids = contiguous_to_json_ids(self._metadata, self._dataset_name)
        lookup = np.full(max(json_ids) + 1, -1, dtype=np.int64)
        lookup[list(json_ids)] = list(json_ids.values())
        for inp, out in zip(inputs, outputs):
            instances = out["instances"].to("cpu")
            boxes = instances.pred_boxes.tensor.detach()
            classes = instances.pred_classes.numpy()
            bad = (classes < 0) | (classes >= len(lookup))
            if bad.any() or (lookup[classes] < 0).any():
                raise ValueError(f"image {inp['image_id']}: predicted classes {sorted(set(classes.tolist()))} "
                                 f"are not all contiguous ids of the dataset (0..{len(json_ids) - 1})")
            self._records.append({
                "image_id": inp["image_id"],
                # xywh computed in the boxes' dtype (fp32), no "+1"
                "boxes": torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).numpy(),
                "scores": instances.scores.detach().numpy(),
                "category_ids": lookup[classes],
            })

    def evaluate(self):
        entries = self._gather_records()
        if not entries:
            return {}
        boxes = np.concatenate([e["boxes"] for e in entries]).reshape(-1, 4)
        scores = np.concatenate([e["scores"] for e in entries])
        category_ids = np.concatenate([e["category_ids"] for e in entries])
        owner = np.repeat(np.arange(len(entries)), [len(e["scores"]) for e in entries])  # entry of each box
        keep = fixed_ap_keep(category_ids, scores, boxes, self._topk)
        selected = [{"image_id": entries[owner[i]]["image_id"], "category_id": int(category_ids[i]),
                     "bbox": boxes[i].tolist(), "score": float(scores[i])} for i in keep]
        self._dump(selected, LVIS_RESULTS_FILE, f"{len(selected)} selected LVIS detections")
        return OrderedDict(bbox=self._score_selected(selected))

    def score_results(self, results: Sequence[dict]) -> Dict[str, float]:
        """FixedAP metrics of LVIS results in image order (selection + LVIS evaluation).

        This is the scoring used by :meth:`evaluate` and by tools/evaluate_predictions.py.
        """
        return self._score_selected(select_fixed_ap_detections(results, self._topk))

    def _score_selected(self, selected: Sequence[dict]) -> Dict[str, float]:
        known = set(self._lvis_api.get_img_ids())
        unknown = sorted({r["image_id"] for r in selected} - known)
        if unknown:
            raise ValueError(
                f"{self._metadata.json_file}: {len(unknown)} predicted image id(s) are not in the LVIS "
                f"json, e.g. {unknown[:5]}"
            )
        if not selected:
            logger.warning("LVIS FixedAP: no detection to evaluate")
            return {metric: float("nan") for metric in LVIS_METRICS}
        lvis = _lvis_package()
        # copies: LVISResults adds fields to the dicts it is given
        lvis_results = lvis.LVISResults(self._lvis_api, [dict(r) for r in selected], max_dets=-1)
        lvis_eval = lvis.LVISEval(self._lvis_api, lvis_results, "bbox")
        lvis_eval.params.max_dets = -1  # only names the AR keys and printed rows: no per-image cap was applied
        lvis_eval.run()
        lvis_eval.print_results()
        values = lvis_eval.get_results()
        return {metric: 100.0 * values[metric] if values[metric] >= 0 else float("nan") for metric in LVIS_METRICS}
