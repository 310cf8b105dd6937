"""COCO box AP of prompted detection: Detectron2's COCOEvaluator with the official result format.

What differs from :class:`detectron2.evaluation.COCOEvaluator` (everything else is inherited):
- results are xywh with the legacy "+1" (w = x2 - x1 + 1, h = y2 - y1 + 1) when
  ``TEST.COCO_BOX_PLUS_ONE`` (official: the paper's COCO numbers were computed that way);
- category ids come from the metadata's ``thing_dataset_id_to_contiguous_id`` (``pred_classes`` is
  the contiguous id = prompt label - 1), read when predictions arrive, because dataset loaders
  record the map only when the dataset is loaded;
- processes are gathered without duplicates (per ``image_id``);
- the official pycocotools implementation is used (not Detectron2's fast one), and per-category
  AP is named in the json's sorted-id order, which is the order COCOeval uses.

Dumped to ``output_dir`` (when given): ``coco_instances_results.json``, a COCO result list
``[{"image_id", "category_id" (json id), "bbox": [x, y, w, h], "score"}]`` exactly as scored, and
Detectron2's ``instances_predictions.pth`` (the same results grouped per image).
"""
import logging
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from detectron2.config import configurable
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
from detectron2.structures import Instances
from detectron2.utils import comm

from .gather import dump_json, gather_unique

__all__ = ["PromptedCOCOEvaluator", "instances_to_coco_results", "contiguous_to_json_ids", "COCO_RESULTS_FILE"]

logger = logging.getLogger(__name__)

COCO_RESULTS_FILE = "coco_instances_results.json"


def contiguous_to_json_ids(metadata, dataset_name: str) -> Dict[int, int]:
    """``{contiguous id: json category id}`` from ``thing_dataset_id_to_contiguous_id``."""
    id_map = metadata.get("thing_dataset_id_to_contiguous_id")
    if not id_map:
        raise ValueError(
            f"dataset '{dataset_name}': metadata has no 'thing_dataset_id_to_contiguous_id'; load the "
            "dataset (DatasetCatalog.get) before evaluating, or register it with that map"
        )
    return {contiguous: json_id for json_id, contiguous in id_map.items()}


def instances_to_coco_results(
    instances: Instances, image_id, json_ids: Mapping[int, int], box_plus_one: bool
) -> List[dict]:
    """COCO/LVIS result dicts of one image's detections (original image frame).

    Args:
        instances: with ``pred_boxes`` (N, 4) xyxy, ``scores`` (N,), ``pred_classes`` (N,)
            contiguous ids.
        image_id: the json image id.
        json_ids: ``{contiguous id: json category id}``.
        box_plus_one: w = x2 - x1 + 1 (legacy COCO convention) instead of x2 - x1.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`` in the instances' order.
    """
    boxes = instances.pred_boxes.tensor.detach().cpu()
    # the arithmetic stays in the boxes' dtype (fp32), as the official BoxList conversion does
    extra = 1 if box_plus_one else 0
    xywh = torch.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0] + extra,
                        boxes[:, 3] - boxes[:, 1] + extra], dim=1).tolist()
    scores = instances.scores.detach().cpu().tolist()
    classes = instances.pred_classes.detach().cpu().tolist()
    results = []
    for box, score, cls in zip(xywh, scores, classes):
        if cls not in json_ids:
            raise ValueError(
                f"image {image_id}: predicted class {cls} is not a contiguous id of the dataset "
                f"(0..{len(json_ids) - 1})"
            )
        results.append({"image_id": image_id, "category_id": json_ids[cls], "bbox": box, "score": score})
    return results


class PromptedCOCOEvaluator(COCOEvaluator):
    """Box AP (task "bbox": AP, AP50, AP75, APs, APm, APl, AP-<class>) of a COCO-format dataset."""

    @configurable
    def __init__(
        self,
        dataset_name: str,
        *,
        output_dir: Optional[str] = None,
        box_plus_one: bool = True,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file`` and (once loaded)
                ``thing_dataset_id_to_contiguous_id``.
            output_dir: where the results are dumped (None: no dump).
            box_plus_one: legacy "+1" widths in the results (``TEST.COCO_BOX_PLUS_ONE``).
            distributed: gather the predictions of all processes.
        """
        super().__init__(dataset_name, tasks=("bbox",), distributed=False, output_dir=output_dir,
                         use_fast_impl=False)
        self._dataset_name = dataset_name
        self._box_plus_one = box_plus_one
        self._gather = distributed

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return {"dataset_name": dataset_name, "output_dir": output_dir,
                "box_plus_one": cfg.TEST.COCO_BOX_PLUS_ONE}

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        json_ids = contiguous_to_json_ids(self._metadata, self._dataset_name)
        for inp, out in zip(inputs, outputs):
            results = instances_to_coco_results(out["instances"], inp["image_id"], json_ids, self._box_plus_one)
            self._predictions.append({"image_id": inp["image_id"], "instances": results})

    def evaluate(self, img_ids=None):
        self._predictions = gather_unique(self._predictions, "image_id", self._gather)
        if self._gather and not comm.is_main_process():
            return {}
        return super().evaluate(img_ids)

    def _eval_predictions(self, predictions, img_ids=None):
        results = [r for p in predictions for r in p["instances"]]
        dump_json(results, self._output_dir, COCO_RESULTS_FILE, f"{len(results)} COCO results")
        if not self._do_evaluation:
            logger.info("%s has no annotations: nothing to evaluate", self._metadata.json_file)
            return
        self._results["bbox"] = self.score_results(results, img_ids)

    def score_results(self, results: List[dict], img_ids=None) -> Dict[str, float]:
        """Box AP metrics (percent; NaN where COCOeval gives -1) of COCO results with json ids.

        This is the scoring used by :meth:`evaluate` and by tools/evaluate_predictions.py.
        """
        # copies: COCO.loadRes adds fields to the dicts it is given
        results = [dict(r) for r in results]
        coco_eval = (
            _evaluate_predictions_on_coco(self._coco_api, results, "bbox", use_fast_impl=False, img_ids=img_ids)
            if results else None  # COCO API fails on empty results; Detectron2 reports NaN then
        )
        names = [c["name"] for c in self._coco_api.loadCats(sorted(self._coco_api.getCatIds()))]
        return self._derive_coco_results(coco_eval, "bbox", class_names=names)
