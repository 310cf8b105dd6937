"""Flickr30k Entities phrase-grounding recall (R@1/5/10 and upper bound), as MDETR and FIBER score it.

One entry = one (image, sentence) pair. Phrase j of an entry is the j-th of its evaluated phrases
(:func:`fiber_det.data.prompt.grounding_phrases`, label j + 1 of the prompt the mapper made); the
model's detections with label j + 1 are its ranked boxes (all detections sorted by score, stable,
bucketed by label; labels outside 1..#phrases are not phrases of the entry), and a dummy
``[0, 0, 0, 0]`` box is appended to every list as FIBER's post-processing does. An empty list (only
possible when called directly) is a miss, where the official evaluator would crash.

Ground truth, per phrase (the official MDETR evaluator's semantics):
(a) with ``annotations_root`` (metadata ``flickr_annotations_root``): the official Flickr30k Entities
    files. ``Sentences/<original_img_id>.txt`` line ``sentence_id`` (blank lines skipped), e.g.
    ``[/EN#18/people A man] in [/EN#19/clothing a blue shirt] .``, gives the phrases (entity id,
    types, first-word index); ``Annotations/<original_img_id>.xml`` gives per ``<object>`` one
    ``<bndbox>`` (xmin, ymin, xmax, ymax; pixels, used as they are) for every entity id in its
    ``<name>`` tags. A phrase is evaluable iff its entity has a box. Alignment, as MDETR's
    evaluator: the json's evaluated phrases are exactly the evaluable phrases in sentence order,
    so phrase j of the json is the j-th evaluable phrase of the sentence; a count mismatch raises.
    Phrase types come from the Sentences tags.
(b) without it: from the entry's json annotations. The GT boxes of phrase j are the annotations
    whose caption spans overlap (share at least one character with) a span of phrase j
    (:func:`fiber_det.data.prompt.phrase_annotations`); boxes are xywh -> xyxy with x2 = x + w. A phrase without such a box is not evaluated (counted
    in the log). There are no phrase types then, only "all".
Sentences without an evaluable phrase are skipped.

Protocols: ANY-box (hit if a top-k box has IoU >= 0.5 with any GT box of the phrase) and MERGED-box
(IoU >= 0.5 with the union box ``[min x1, min y1, max x2, max y2]`` of the phrase's boxes). IoU is
float64 without "+1". Both are reported under task "grounding": the protocol of the dataset's
``flickr_gt_type`` ("separate" -> ANY, "merged" -> MERGED) as the headline keys "R@1", "R@5",
"R@10", "UB", the other with the prefix "merged_" or "any_"; per phrase type "R@1/people" (a phrase
with two types counts once in each). Values in percent.

Dumped to ``output_dir`` (when given): ``flickr_predictions.json`` =
``{"task": "flickr", "flickr_gt_type": ..., "predictions": [{"image_id", "original_img_id",
"sentence_id", "boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}]}`` (raw
detections, original image frame, labels 1-based); tools/evaluate_predictions.py re-scores it.
"""
import logging
import os
import xml.etree.ElementTree as ET
from collections import OrderedDict, defaultdict
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torchvision.ops import box_iou

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from ..data.prompt import grounding_phrases, phrase_annotations
from .gather import PerImageEvaluator

__all__ = [
    "FlickrRecallEvaluator", "score_flickr", "flickr_gt_entry", "flickr_prediction_record",
    "parse_flickr_sentences", "parse_flickr_boxes", "FLICKR_PREDICTIONS_FILE", "GT_TYPES",
]

logger = logging.getLogger(__name__)

FLICKR_PREDICTIONS_FILE = "flickr_predictions.json"
GT_TYPES = {"separate": "any", "merged": "merged"}  # flickr_gt_type -> headline protocol
RECALLS = (("R@1", 1), ("R@5", 5), ("R@10", 10), ("UB", None))  # None: all boxes (upper bound)
IOU_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------
# Flickr30k Entities files


def _parse_sentence(line: str, where: str) -> List[dict]:
    """Phrases of one annotated sentence: ``{"phrase_id", "phrase_type", "first_word_index", "phrase"}``."""
    words, phrases, current = [], [], None
    for token in line.split():
        if current is None and token.startswith("["):
            parts = token.split("/")  # "[/EN#18/people/other" -> ["[", "EN#18", "people", "other"]
            if len(parts) < 3 or not parts[1].startswith("EN#"):
                raise ValueError(f"{where}: malformed phrase tag {token!r} (expected [/EN#<id>/<type>...)")
            current = {"phrase_id": parts[1][3:], "phrase_type": parts[2:], "first_word_index": len(words),
                       "words": []}
            continue
        word = token
        if current is not None:
            closes = token.endswith("]")
            word = token[:-1] if closes else token
            current["words"].append(word)
            if closes:
                phrases.append({**current, "phrase": " ".join(current.pop("words"))})
                current = None
        words.append(word)
    if current is not None:
        raise ValueError(f"{where}: phrase [/EN#{current['phrase_id']} is not closed by ']'")
    return phrases


def parse_flickr_sentences(path: str) -> List[List[dict]]:
    """Parses ``Sentences/<id>.txt``: per non-blank line (= sentence_id), its annotated phrases.

    Returns:
        One list per sentence of ``{"phrase_id": str, "phrase_type": [str], "first_word_index":
        int, "phrase": str}`` in sentence order.
    """
    with PathManager.open(path, "r") as f:
        lines = f.read().split("\n")
    return [_parse_sentence(line, f"{path}:{no}") for no, line in enumerate(lines, 1) if line.strip()]


def parse_flickr_boxes(path: str) -> Dict[str, List[List[float]]]:
    """Parses ``Annotations/<id>.xml``: ``{entity id: [[xmin, ymin, xmax, ymax], ...]}``.

    An ``<object>`` with a ``<bndbox>`` adds its box to every entity named in its ``<name>`` tags
    (shared boxes); objects marked ``<nobndbox>`` / ``<scene>`` have no box and are not listed.
    """
    with PathManager.open(path, "r") as f:
        root = ET.fromstring(f.read())
    boxes = defaultdict(list)
    for index, obj in enumerate(root.findall("object")):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            continue
        try:
            box = [float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: <object> #{index} has an incomplete or non-numeric <bndbox>") from e
        for name in obj.findall("name"):
            if not (name.text or "").strip():
                raise ValueError(f"{path}: <object> #{index} has an empty <name>")
            boxes[name.text.strip()].append(box)
    return dict(boxes)


class _FlickrEntities:
    """Per-phrase GT of entries from the official files (protocol (a)); files parsed once per image."""

    def __init__(self, root: str):
        for sub in ("Annotations", "Sentences"):
            if not os.path.isdir(os.path.join(root, sub)):
                raise FileNotFoundError(f"Flickr30k Entities folder {root} has no '{sub}' sub-folder")
        self.root = root
        self._cache: Dict[str, tuple] = {}

    def _load(self, original_img_id: str):
        if original_img_id not in self._cache:
            sentences = parse_flickr_sentences(os.path.join(self.root, "Sentences", f"{original_img_id}.txt"))
            boxes = parse_flickr_boxes(os.path.join(self.root, "Annotations", f"{original_img_id}.xml"))
            self._cache[original_img_id] = (sentences, boxes)
        return self._cache[original_img_id]

    def phrases(self, entry: dict) -> Optional[List[dict]]:
        """GT per json phrase (``{"any", "merged", "types"}``), or None for a skipped sentence."""
        if entry.get("original_img_id") is None or entry.get("sentence_id") is None:
            raise ValueError(f"entry {entry['image_id']}: 'original_img_id' and 'sentence_id' are needed "
                             "to read the Flickr30k Entities annotations")
        image, sentence_id = str(entry["original_img_id"]), int(entry["sentence_id"])
        sentences, boxes = self._load(image)
        if not 0 <= sentence_id < len(sentences):
            raise ValueError(f"entry {entry['image_id']}: sentence_id {sentence_id} out of range, "
                             f"Sentences/{image}.txt has {len(sentences)} sentences")
        evaluable = [p for p in sentences[sentence_id] if p["phrase_id"] in boxes]
        if not evaluable:
            return None
        if len(evaluable) != entry["num_phrases"]:
            raise ValueError(
                f"entry {entry['image_id']} (Flickr image {image}, sentence {sentence_id}): the json evaluates "
                f"{entry['num_phrases']} phrases but the sentence has {len(evaluable)} phrases with boxes "
                f"({[p['phrase'] for p in evaluable]}); they are aligned by order and must correspond one to one"
            )
        return [_phrase_gt(boxes[p["phrase_id"]], p["phrase_type"]) for p in evaluable]


def _phrase_gt(boxes: Sequence[Sequence[float]], types: Sequence[str]) -> dict:
    """ANY-box GT (M, 4), MERGED-box GT (1, 4) and the phrase types."""
    any_box = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    merged = torch.cat([any_box[:, :2].min(dim=0).values, any_box[:, 2:].max(dim=0).values]).reshape(1, 4)
    return {"any": any_box, "merged": merged, "types": list(types)}


def _json_phrases(entry: dict) -> Optional[List[Optional[dict]]]:
    """Protocol (b): GT per json phrase from overlapping annotation spans (None: no box)."""
    if entry["phrase_boxes"] is None:
        raise ValueError(f"entry {entry['image_id']}: an annotation has no caption spans; without "
                         "Flickr30k Entities annotations the GT of a phrase comes from these spans")
    phrases = entry["phrase_boxes"]
    if not any(phrases):
        return None
    return [_phrase_gt(boxes, ()) if boxes else None for boxes in phrases]


# ---------------------------------------------------------------------------------------------
# Entries and scoring


def flickr_gt_entry(record: Mapping) -> dict:
    """The GT fields of one entry, from a dataset dict / mapper input or an MDETR json image whose
    ``annotations`` were attached (boxes xywh in json coordinates, ``bbox_mode`` XYWH_ABS if absent).

    Returns:
        ``{"image_id", "original_img_id", "sentence_id", "num_phrases", "phrase_boxes"}``:
        ``phrase_boxes`` holds per phrase the xyxy boxes (x2 = x + w) of the annotations whose
        spans overlap it, or is None when an annotation has no spans.
    """
    boxes = []
    for ann in record.get("annotations", []):
        mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
        boxes.append([float(v) for v in BoxMode.convert(list(ann["bbox"]), mode, BoxMode.XYXY_ABS)])
    phrases = grounding_phrases(record)
    members = phrase_annotations(record, phrases)
    return {
        "image_id": record["image_id"],
        "original_img_id": record.get("original_img_id"),
        "sentence_id": record.get("sentence_id"),
        "num_phrases": len(phrases),
        "phrase_boxes": None if members is None else [[boxes[i] for i in indices] for indices in members],
    }


def flickr_prediction_record(record: Mapping, instances) -> dict:
    """One entry's raw detections as dumped: boxes xyxy (original frame), scores, 1-based labels."""
    instances = instances.to("cpu")
    labels = instances.pred_labels if instances.has("pred_labels") else instances.pred_classes + 1
    return {
        "image_id": record["image_id"],
        "original_img_id": record.get("original_img_id"),
        "sentence_id": record.get("sentence_id"),
        "boxes": instances.pred_boxes.tensor.tolist(),
        "scores": instances.scores.tolist(),
        "labels": [int(v) for v in labels.tolist()],
    }


def rank_phrase_boxes(prediction: Optional[Mapping], num_phrases: int) -> List[torch.Tensor]:
    """Per phrase j, the boxes labelled j + 1 by descending score (stable) plus the dummy box.

    Returns:
        ``num_phrases`` float64 tensors of shape (n_j + 1, 4); no prediction: the dummy only.
    """
    ranked = [[] for _ in range(num_phrases)]
    if prediction is not None:
        scores, labels, boxes = prediction["scores"], prediction["labels"], prediction["boxes"]
        if not len(scores) == len(labels) == len(boxes):
            raise ValueError(f"entry {prediction['image_id']}: boxes, scores and labels differ in length")
        for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
            if 1 <= labels[i] <= num_phrases:
                ranked[labels[i] - 1].append(boxes[i])
    return [torch.tensor(r + [[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64) for r in ranked]


def phrase_hits(ranked: torch.Tensor, gt: torch.Tensor) -> Dict[str, bool]:
    """Hit at each recall of :data:`RECALLS` for ranked boxes (N, 4) vs GT boxes (M, 4), float64."""
    if len(ranked) == 0 or len(gt) == 0:
        return {name: False for name, _ in RECALLS}
    # a degenerate pair has IoU 0/0; it is no hit (the official numpy max would turn it into NaN)
    best = box_iou(ranked, gt).nan_to_num(0.0).max(dim=1).values
    return {name: bool(best[:k].max() >= IOU_THRESHOLD) for name, k in RECALLS}


class _RecallCounter:
    """Hits and totals per (protocol, recall, phrase type)."""

    def __init__(self):
        self.hits = defaultdict(int)
        self.total = defaultdict(int)

    def add(self, protocol: str, hits: Mapping[str, bool], types: Sequence[str]) -> None:
        for name, hit in hits.items():
            for kind in ["all"] + sorted(set(types)):
                self.total[protocol, name, kind] += 1
                self.hits[protocol, name, kind] += int(hit)

    def metrics(self, headline: str) -> "OrderedDict[str, float]":
        out = OrderedDict()
        for protocol in (headline, "merged" if headline == "any" else "any"):
            prefix = "" if protocol == headline else f"{protocol}_"
            kinds = sorted({k for p, _, k in self.total if p == protocol and k != "all"})
            for kind in ["all"] + kinds:
                suffix = "" if kind == "all" else f"/{kind}"
                for name, _ in RECALLS:
                    total, hits = self.total[protocol, name, kind], self.hits[protocol, name, kind]
                    out[f"{prefix}{name}{suffix}"] = 100.0 * hits / total if total else float("nan")
        return out


def score_flickr(
    gt_entries: Sequence[Mapping],
    predictions: Mapping[object, Mapping],
    annotations_root: Optional[str] = None,
    gt_type: str = "separate",
) -> "OrderedDict[str, Dict[str, float]]":
    """Recall@k of Flickr30k Entities entries (see the module docstring).

    Args:
        gt_entries: :func:`flickr_gt_entry` records.
        predictions: ``{image_id: flickr_prediction_record}``; an entry without one has no detection.
        annotations_root: folder with ``Annotations/`` and ``Sentences/`` (None: GT from the json).
        gt_type: "separate" (headline ANY-box) or "merged" (headline MERGED-box).

    Returns:
        ``{"grounding": {metric: percent}}``.
    """
    if gt_type not in GT_TYPES:
        raise ValueError(f"flickr_gt_type must be one of {sorted(GT_TYPES)}, got {gt_type!r}")
    entities = _FlickrEntities(annotations_root) if annotations_root else None
    counter, skipped_sentences, skipped_phrases = _RecallCounter(), 0, 0
    for entry in gt_entries:
        phrases = entities.phrases(entry) if entities else _json_phrases(entry)
        if phrases is None:
            skipped_sentences += 1
            continue
        ranked = rank_phrase_boxes(predictions.get(entry["image_id"]), len(phrases))
        for boxes, phrase in zip(ranked, phrases):
            if phrase is None:
                skipped_phrases += 1
                continue
            for protocol in ("any", "merged"):
                counter.add(protocol, phrase_hits(boxes, phrase[protocol]), phrase["types"])
    if skipped_sentences or skipped_phrases:
        logger.info("Flickr recall: skipped %d sentence(s) without an evaluable phrase and %d phrase(s) "
                    "without a GT box", skipped_sentences, skipped_phrases)
    metrics = counter.metrics(GT_TYPES[gt_type])
    if not counter.total:
        logger.warning("Flickr recall: no phrase was evaluated")
    return OrderedDict(grounding=metrics)


# ---------------------------------------------------------------------------------------------
# Evaluator


class FlickrRecallEvaluator(PerImageEvaluator):
    """Flickr30k Entities Recall@k (task "grounding"; see the module docstring)."""

    @configurable
    def __init__(
        self,
        dataset_name: str,
        *,
        gt_type: str = "separate",
        annotations_root: Optional[str] = None,
        output_dir: Optional[str] = None,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: the evaluated dataset (for messages).
            gt_type: "separate" (headline ANY-box) or "merged" (headline MERGED-box).
            annotations_root: Flickr30k Entities folder with ``Annotations/`` and ``Sentences/``;
                None: GT boxes from the entries' json annotations.
            output_dir: where the predictions are dumped (None: no dump).
            distributed: gather the entries of all processes.
        """
        if gt_type not in GT_TYPES:
            raise ValueError(f"dataset '{dataset_name}': flickr_gt_type must be one of {sorted(GT_TYPES)}, "
                             f"got {gt_type!r}")
        if annotations_root:
            _FlickrEntities(annotations_root)  # fail now, not after the whole inference
        self._gt_type = gt_type
        self._annotations_root = annotations_root or None
        super().__init__(dataset_name, output_dir=output_dir, distributed=distributed)

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        meta = MetadataCatalog.get(dataset_name)
        return {"dataset_name": dataset_name, "output_dir": output_dir, "gt_type": meta.get("flickr_gt_type"),
                "annotations_root": meta.get("flickr_annotations_root")}

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            self._records.append({"image_id": inp["image_id"], "gt": flickr_gt_entry(inp),
                                  "prediction": flickr_prediction_record(inp, out["instances"])})

    def evaluate(self):
        entries = self._gather_records()
        if not entries:
            return {}
        predictions = [e["prediction"] for e in entries]
        self._dump({"task": "flickr", "flickr_gt_type": self._gt_type, "predictions": predictions},
                   FLICKR_PREDICTIONS_FILE, f"the predictions of {len(predictions)} Flickr entries")
        return score_flickr([e["gt"] for e in entries], {p["image_id"]: p for p in predictions},
                            self._annotations_root, self._gt_type)
