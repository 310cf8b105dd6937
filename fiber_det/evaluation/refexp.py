"""RefCOCO / RefCOCO+ / RefCOCOg precision@k, as MDETR and FIBER score it.

Per entry (one referring expression, one GT box), the official evaluator's semantics:
- every detection of the entry is ranked (the one phrase is label 1) by score, highest first; equal
  scores are ordered by the box ``[x1, y1, x2, y2]`` compared lexicographically, largest first,
  because the official code sorts ``(score, box)`` pairs in reverse;
- the GT is the single annotation's xywh with x2 = x + w, y2 = y + h (no "-1");
- hit at k if the largest generalized IoU between a top-k box and the GT is >= 0.5 (the official
  criterion; "IoU_P@k" repeats it with plain IoU); fp32 as the official tensors; an entry without
  detections is a miss (the official code would crash).

Task "refexp", per ``dataset_name`` (the json's field, else the registered dataset name):
"<name>_P@1", "<name>_P@5", "<name>_P@10", "<name>_IoU_P@1", ... in percent.

Dumped to ``output_dir`` (when given): ``refexp_predictions.json`` = ``{"task": "refexp",
"predictions": [{"image_id", "dataset_name", "boxes": [[x1, y1, x2, y2], ...], "scores": [...]}]}``
(raw detections, original image frame); tools/evaluate_predictions.py re-scores it.
"""
from collections import OrderedDict, defaultdict
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torchvision.ops import box_iou, generalized_box_iou

from detectron2.config import configurable
from detectron2.structures import BoxMode

from .gather import PerImageEvaluator

__all__ = ["RefExpEvaluator", "score_refexp", "refexp_gt_entry", "refexp_prediction_record",
           "rank_refexp_boxes", "REFEXP_PREDICTIONS_FILE"]

REFEXP_PREDICTIONS_FILE = "refexp_predictions.json"
TOPK = (1, 5, 10)
THRESHOLD = 0.5


def _dataset_name(record: Mapping) -> str:
    name = record.get("dataset_name") or record.get("dataset")
    if not name:
        raise ValueError(f"entry {record.get('image_id')}: no 'dataset_name' (nor 'dataset') to report it under")
    return str(name)


def refexp_gt_entry(record: Mapping) -> dict:
    """``{"image_id", "dataset_name", "bbox": [x1, y1, x2, y2]}`` of a dataset dict / mapper input
    or an MDETR json image with its ``annotations`` attached (exactly one, xywh)."""
    annotations = record.get("annotations") or []
    if len(annotations) != 1:
        raise ValueError(f"refexp entry {record['image_id']}: expected exactly one annotation, got {len(annotations)}")
    ann = annotations[0]
    box = BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
    return {"image_id": record["image_id"], "dataset_name": _dataset_name(record), "bbox": [float(v) for v in box]}


def refexp_prediction_record(record: Mapping, instances) -> dict:
    """One entry's detections as dumped: boxes xyxy (original frame) and scores."""
    instances = instances.to("cpu")
    return {"image_id": record["image_id"], "dataset_name": _dataset_name(record),
            "boxes": instances.pred_boxes.tensor.tolist(), "scores": instances.scores.tolist()}


def rank_refexp_boxes(boxes: Sequence[Sequence[float]], scores: Sequence[float]) -> torch.Tensor:
    """Boxes (N, 4) ordered by (score, x1, y1, x2, y2), largest first (the official tie rule)."""
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], *boxes[i]), reverse=True)
    return torch.tensor([list(boxes[i]) for i in order], dtype=torch.float32).reshape(-1, 4)


def _entry_hits(ranked: torch.Tensor, gt_box: Sequence[float]) -> Dict[str, List[bool]]:
    """Per criterion ("P" = GIoU, "IoU_P" = IoU), hit at each k of :data:`TOPK`."""
    if len(ranked) == 0:
        return {"P": [False] * len(TOPK), "IoU_P": [False] * len(TOPK)}
    gt = torch.tensor([list(gt_box)], dtype=torch.float32)
    overlaps = {"P": generalized_box_iou(ranked, gt)[:, 0], "IoU_P": box_iou(ranked, gt)[:, 0]}
    return {name: [bool(v[:k].max() >= THRESHOLD) for k in TOPK] for name, v in overlaps.items()}


def score_refexp(
    gt_entries: Sequence[Mapping], predictions: Mapping[object, Mapping]
) -> "OrderedDict[str, Dict[str, float]]":
    """Precision@k per dataset name.

    Args:
        gt_entries: :func:`refexp_gt_entry` records.
        predictions: ``{image_id: record with "boxes" and "scores"}``; missing = no detection.

    Returns:
        ``{"refexp": {"<name>_P@k" | "<name>_IoU_P@k": percent}}``.
    """
    hits = defaultdict(lambda: defaultdict(int))
    totals = defaultdict(int)
    for entry in gt_entries:
        pred = predictions.get(entry["image_id"]) or {"boxes": [], "scores": []}
        name = entry["dataset_name"]
        totals[name] += 1
        for criterion, per_k in _entry_hits(rank_refexp_boxes(pred["boxes"], pred["scores"]), entry["bbox"]).items():
            for k, hit in zip(TOPK, per_k):
                hits[name][f"{criterion}@{k}"] += int(hit)
    metrics = OrderedDict()
    for name in sorted(totals):
        for criterion in ("P", "IoU_P"):
            for k in TOPK:
                metrics[f"{name}_{criterion}@{k}"] = 100.0 * hits[name][f"{criterion}@{k}"] / totals[name]
    return OrderedDict(refexp=metrics)


class RefExpEvaluator(PerImageEvaluator):
    """Referring-expression precision@k (task "refexp"; see the module docstring)."""

    @configurable
    def __init__(self, dataset_name: str, *, output_dir: Optional[str] = None, distributed: bool = True):
        """
        Args:
            dataset_name: the evaluated dataset (fallback name when entries lack ``dataset_name``).
            output_dir: where the predictions are dumped (None: no dump).
            distributed: gather the entries of all processes.
        """
        super().__init__(dataset_name, output_dir=output_dir, distributed=distributed)

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            record = dict(inp)
            record.setdefault("dataset", self._dataset_name)
            self._records.append({"image_id": inp["image_id"], "gt": refexp_gt_entry(record),
                                  "prediction": refexp_prediction_record(record, out["instances"])})

    def evaluate(self):
        entries = self._gather_records()
        if not entries:
            return {}
        predictions = [e["prediction"] for e in entries]
        self._dump({"task": "refexp", "predictions": predictions}, REFEXP_PREDICTIONS_FILE,
                   f"the predictions of {len(predictions)} referring expressions")
        return score_refexp([e["gt"] for e in entries], {p["image_id"]: p for p in predictions})
