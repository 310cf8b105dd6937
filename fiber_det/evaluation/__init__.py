"""Evaluators of fiber-det: prompted COCO box AP, LVIS FixedAP, Flickr30k recall, RefCOCO precision,
image-text retrieval recall."""
from .build import EVALUATORS, build_evaluator
from .coco import PromptedCOCOEvaluator
from .flickr import FlickrRecallEvaluator, score_flickr
from .lvis import LVISFixedAPEvaluator, select_fixed_ap_detections
from .refexp import RefExpEvaluator, score_refexp
from .retrieval import RetrievalEvaluator, score_retrieval

__all__ = [
    "EVALUATORS",
    "build_evaluator",
    "PromptedCOCOEvaluator",
    "LVISFixedAPEvaluator",
    "FlickrRecallEvaluator",
    "RefExpEvaluator",
    "RetrievalEvaluator",
    "select_fixed_ap_detections",
    "score_flickr",
    "score_refexp",
    "score_retrieval",
]
