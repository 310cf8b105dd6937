"""Re-score the predictions that fiber_det's evaluators dump, without a model.

    python tools/evaluate_predictions.py --task coco --gt instances_val2017.json \\
        --predictions output/inference/coco_val/coco_instances_results.json [--output metrics.json]
    python tools/evaluate_predictions.py --task lvis --gt lvis_v1_minival.json \\
        --predictions output/inference/lvis_minival/lvis_instances_results.json
    python tools/evaluate_predictions.py --task flickr --gt final_flickr_separateGT_val.json \\
        --predictions output/inference/flickr_val/flickr_predictions.json [--annotations-root flickr30k]
    python tools/evaluate_predictions.py --task refexp --gt finetune_refcoco_val.json \\
        --predictions output/inference/refcoco_val/refexp_predictions.json
    python tools/evaluate_predictions.py --task retrieval \\
        --predictions output/inference/coco_karpathy_test/retrieval_scores.npz

The scoring is the evaluators' own (fiber_det.evaluation), so the numbers equal those printed at
the end of the evaluation run. Results are printed as json and as Detectron2 "copypaste:" lines.

File formats (--predictions), as written to the evaluator's output folder:
  coco    coco_instances_results.json: COCO result list [{"image_id", "category_id" (json id),
          "bbox": [x, y, w, h], "score"}]; w = x2 - x1 + 1 when TEST.COCO_BOX_PLUS_ONE (default).
          --gt: the COCO-format json with annotations.
  lvis    lvis_instances_results.json: the same list with LVIS category ids and w = x2 - x1, already
          reduced to the FixedAP selection (top --lvis-topk per category, non-zero area); the
          selection is applied again (a no-op on this file). --gt: the LVIS json. Reports the
          official table: AP, AP50, AP75, APs/m/l, APr/c/f, AR@-1 (recall without a per-image
          cap, standard LVIS's AR@300) and ARs/ARm/ARl@-1.
  flickr  flickr_predictions.json: {"task": "flickr", "flickr_gt_type": "separate" | "merged",
          "predictions": [{"image_id", "original_img_id", "sentence_id", "boxes": [[x1, y1, x2, y2]],
          "scores": [...], "labels": [...] (1-based phrase index in tokens_positive_eval)}]}.
          --gt: the MDETR json (final_flickr_{separate,merged}GT_*.json); with --annotations-root
          (folder with Annotations/*.xml and Sentences/*.txt) the GT boxes and phrase types come
          from the official Flickr30k Entities files, else from the json's boxes.
  refexp  refexp_predictions.json: {"task": "refexp", "predictions": [{"image_id", "dataset_name",
          "boxes": [[x1, y1, x2, y2]], "scores": [...]}]}. --gt: the MDETR json
          (finetune_refcoco*_{split}.json).
  retrieval  retrieval_scores.npz (numpy arrays, read without pickle): "itc" (images x captions
          scores), "image_index", "caption_index", "caption_image_index" (each caption's image),
          optional "itm" (NaN where unscored) and "itm_topk" (0 = exhaustive ITM). No --gt: the
          positives are in the file.
For flickr and refexp the entries of the predictions file are scored (an entry without boxes is a
miss); json entries absent from the file are reported and left out. An image or category id that
the ground truth lacks, a malformed file or a missing key is an error: one line naming the file and
the id or key, exit code 1.
"""
import argparse
import json
import logging
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fiber_det  # noqa: E402,F401  (compat fixes)
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.evaluation import print_csv_format  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from fiber_det.evaluation.coco import PromptedCOCOEvaluator  # noqa: E402
from fiber_det.evaluation.flickr import GT_TYPES, flickr_gt_entry, score_flickr  # noqa: E402
from fiber_det.evaluation.lvis import LVISFixedAPEvaluator  # noqa: E402
from fiber_det.evaluation.refexp import refexp_gt_entry, score_refexp  # noqa: E402
from fiber_det.evaluation.retrieval import load_retrieval_scores  # noqa: E402

logger = logging.getLogger("fiber_det.evaluate_predictions")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=("coco", "lvis", "flickr", "refexp", "retrieval"))
    parser.add_argument("--gt", default=None, help="ground-truth json (see the file formats above; not for retrieval)")
    parser.add_argument("--predictions", required=True, help="the file the evaluator dumped")
    parser.add_argument("--annotations-root", default=None,
                        help="flickr: Flickr30k Entities folder with Annotations/ and Sentences/")
    parser.add_argument("--flickr-gt-type", default=None, choices=sorted(GT_TYPES),
                        help="flickr: headline protocol (default: the one stored in the predictions file)")
    parser.add_argument("--lvis-topk", type=int, default=10000,
                        help="lvis: detections kept per category (TEST.LVIS_TOPK_PER_CATEGORY)")
    parser.add_argument("--output", default=None, help="write the metrics to this json file")
    args = parser.parse_args(argv)
    if args.gt is None and args.task != "retrieval":
        parser.error(f"--gt is required for --task {args.task}")
    return args


def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid json ({e})") from e


def _load_gt(gt: str, task: str) -> dict:
    """The ground-truth json, checked to hold the lists the task reads."""
    data = _load_json(gt, "ground-truth json")
    required = ("images", "annotations", "categories") if task in ("coco", "lvis") else ("images",)
    if not isinstance(data, dict):
        raise ValueError(f"{gt}: expected a COCO-style json object with {list(required)}, got a {type(data).__name__}")
    for key in required:
        if not isinstance(data.get(key), list):
            raise ValueError(f"{gt}: no '{key}' list; a {task} ground truth is a COCO-style json with {list(required)}")
    for key in required:
        for k, entry in enumerate(data[key]):
            if key != "annotations" and not (isinstance(entry, dict) and "id" in entry):
                raise ValueError(f"{gt}: {key}[{k}] has no 'id'")
    return data


def _check_result_ids(results: List[dict], gt_data: dict, path: str, gt: str) -> None:
    """Every result's image_id and category_id exist in the ground truth."""
    for key, section in (("image_id", "images"), ("category_id", "categories")):
        known = {entry["id"] for entry in gt_data[section]}
        unknown = sorted({r[key] for r in results} - known, key=str)
        if unknown:
            count = sum(r[key] in set(unknown) for r in results)
            raise ValueError(f"{path}: {count} result(s) name a {key} that {gt} lacks in '{section}', "
                             f"e.g. {unknown[:5]}")


def _json_dataset(task: str, gt: str) -> str:
    """A MetadataCatalog entry naming the bare json, so the evaluator classes can be built."""
    name = f"__evaluate_predictions_{task}__{os.path.abspath(gt)}"
    meta = MetadataCatalog.get(name)
    if meta.get("json_file") is None:
        meta.set(json_file=os.path.abspath(gt), evaluator_type=task)
    return name


def _result_list(predictions, path: str) -> List[dict]:
    keys = {"image_id", "category_id", "bbox", "score"}
    if not isinstance(predictions, list):
        raise ValueError(f"{path}: expected a list of {{{', '.join(sorted(keys))}}} results, got a "
                         f"{type(predictions).__name__}")
    for k, p in enumerate(predictions):
        if not isinstance(p, dict) or not keys <= set(p):
            missing = sorted(keys - set(p)) if isinstance(p, dict) else sorted(keys)
            raise ValueError(f"{path}: result {k} lacks {missing}")
        if not (isinstance(p["bbox"], list) and len(p["bbox"]) == 4):
            raise ValueError(f"{path}: result {k} has bbox {p['bbox']!r}; expected [x, y, w, h]")
    return predictions


def _grounding_dump(data, path: str, task: str) -> List[dict]:
    if not isinstance(data, dict) or data.get("task") != task or not isinstance(data.get("predictions"), list):
        raise ValueError(f"{path}: expected {{\"task\": \"{task}\", \"predictions\": [...]}} (a {task} evaluator dump)")
    for k, p in enumerate(data["predictions"]):
        if not isinstance(p, dict) or "image_id" not in p:
            raise ValueError(f"{path}: predictions[{k}] has no 'image_id'")
    return data["predictions"]


def _mdetr_entries(gt: str, predictions: List[dict]) -> List[dict]:
    """The json images (with their annotations attached) that have an entry in ``predictions``."""
    data = _load_gt(gt, "grounding")
    annotations: Dict[object, list] = {img["id"]: [] for img in data["images"]}
    for ann in data.get("annotations", []):
        if ann.get("image_id") not in annotations:
            raise ValueError(f"{gt}: annotation {ann.get('id')} refers to unknown image {ann.get('image_id')!r}")
        annotations[ann["image_id"]].append(ann)
    predicted = {p["image_id"] for p in predictions}
    unknown = sorted(predicted - set(annotations), key=str)
    if unknown:
        raise ValueError(f"{len(unknown)} predicted image id(s) are not in {gt}, e.g. {unknown[:5]}")
    missing = len(annotations) - len(predicted)
    if missing:
        logger.warning("%d of the %d entries of %s have no predictions in the file; they are left out",
                       missing, len(annotations), gt)
    return [{**img, "image_id": img["id"], "annotations": annotations[img["id"]]}
            for img in data["images"] if img["id"] in predicted]


def rescore(args: argparse.Namespace) -> "OrderedDict[str, Dict[str, float]]":
    """Metrics of ``args.predictions`` for ``args.task`` (see the module docstring)."""
    if args.task == "retrieval":
        if not os.path.isfile(args.predictions):
            raise FileNotFoundError(f"predictions file not found: {args.predictions}")
        return load_retrieval_scores(args.predictions)
    data = _load_json(args.predictions, "predictions file")
    if args.task in ("coco", "lvis"):
        results = _result_list(data, args.predictions)
        _check_result_ids(results, _load_gt(args.gt, args.task), args.predictions, args.gt)
        if args.task == "coco":
            evaluator = PromptedCOCOEvaluator(_json_dataset("coco", args.gt), distributed=False)
        else:
            evaluator = LVISFixedAPEvaluator(_json_dataset("lvis", args.gt), topk=args.lvis_topk, distributed=False)
        return OrderedDict(bbox=evaluator.score_results(results))
    predictions = _grounding_dump(data, args.predictions, args.task)
    by_id = {p["image_id"]: p for p in predictions}
    entries = _mdetr_entries(args.gt, predictions)
    if args.task == "flickr":
        gt_type = args.flickr_gt_type or data.get("flickr_gt_type", "separate")
        return score_flickr([flickr_gt_entry(e) for e in entries], by_id, args.annotations_root, gt_type)
    return score_refexp([refexp_gt_entry(e) for e in entries], by_id)


def main(argv: Optional[Sequence[str]] = None) -> "OrderedDict[str, Dict[str, float]]":
    args = parse_args(argv)
    setup_logger(name="detectron2")
    setup_logger(name="fiber_det")
    results = rescore(args)
    print(json.dumps(results, indent=2))
    print_csv_format(results)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """:func:`main` for the command line: a bad input is one line on stderr and exit code 1."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"evaluate_predictions: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
