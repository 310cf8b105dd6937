"""Evaluators of fiber-det: prompted COCO box AP, LVIS FixedAP, Flickr30k recall, RefCOCO precision."""
from .build import EVALUATORS, build_evaluator
from .coco import PromptedCOCOEvaluator
from .flickr import FlickrRecallEvaluator, score_flickr
from .lvis import LVISFixedAPEvaluator, select_fixed_ap_detections
from .refexp import RefExpEvaluator, score_refexp

__all__ = [
    "EVALUATORS",
    "build_evaluator",
    "PromptedCOCOEvaluator",
    "LVISFixedAPEvaluator",
    "FlickrRecallEvaluator",
    "RefExpEvaluator",
    "select_fixed_ap_detections",
    "score_flickr",
    "score_refexp",
]
