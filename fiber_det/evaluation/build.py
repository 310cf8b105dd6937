"""Chooses the evaluator of a dataset from its metadata's ``evaluator_type``."""
from typing import Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from .coco import PromptedCOCOEvaluator
from .flickr import FlickrRecallEvaluator
from .lvis import LVISFixedAPEvaluator
from .refexp import RefExpEvaluator
from .retrieval import RetrievalEvaluator

__all__ = ["EVALUATORS", "build_evaluator"]

EVALUATORS = {
    "coco": PromptedCOCOEvaluator,
    "lvis": LVISFixedAPEvaluator,
    "flickr": FlickrRecallEvaluator,
    "refexp": RefExpEvaluator,
    "retrieval": RetrievalEvaluator,
}


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None, **kwargs) -> DatasetEvaluator:
    """The evaluator of ``dataset_name`` (metadata ``evaluator_type`` in :data:`EVALUATORS`).

    Args:
        cfg: the full config (``TEST.COCO_BOX_PLUS_ONE``, ``TEST.LVIS_TOPK_PER_CATEGORY``,
            ``TEST.RETRIEVAL.*``).
        dataset_name: a registered dataset.
        output_folder: where the evaluator dumps its predictions (None: no dump).
        **kwargs: passed to the evaluator (e.g. ``itm_scorer`` of :class:`RetrievalEvaluator`).

    Raises:
        ValueError: the dataset has no evaluator type (training-only set) or an unknown one.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "")
    if evaluator_type not in EVALUATORS:
        what = "no evaluator_type (a training-only dataset?)" if not evaluator_type else \
            f"evaluator_type {evaluator_type!r}"
        raise ValueError(
            f"dataset '{dataset_name}' has {what}; evaluable datasets set metadata evaluator_type to "
            f"one of {sorted(EVALUATORS)}"
        )
    return EVALUATORS[evaluator_type](cfg, dataset_name=dataset_name, output_dir=output_folder, **kwargs)
