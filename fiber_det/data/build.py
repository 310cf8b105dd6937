"""Training and test data loaders: dataset mixing with copy factors, then the loaders.

Training: :class:`~.resumable_loader.ResumableTrainLoader` (Detectron2's uniform shuffled
stream, sharding and aspect-ratio grouping (w > h or not, as the official two groups), with its
position saved in checkpoints). Test: Detectron2's inference loader. Images are zero-padded to a
multiple of 32 by the model, not here.
"""
import logging
from typing import Callable, List, Optional

import torch.utils.data as torchdata

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data.build import filter_images_with_only_crowd_annotations, trivial_batch_collator
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm

from .box_report import report_boxes_outside_images
from .caption_mapper import ImageCaptionMapper
from .datasets.caption_pairs import retrieval_items
from .mapper import GroundingDatasetMapper
from .resumable_loader import ResumableTrainLoader

__all__ = ["get_train_dataset_dicts", "build_train_loader", "build_test_loader", "build_retrieval_test_loader"]

logger = logging.getLogger(__name__)


def _copy_factors(cfg) -> List[int]:
    names, factors = list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.COPY_FACTORS)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty: nothing to train on")
    if not factors:
        return [1] * len(names)
    if len(factors) != len(names):
        raise ValueError(
            f"DATASETS.COPY_FACTORS has {len(factors)} entries but DATASETS.TRAIN has {len(names)} "
            f"({names}); give one factor per dataset or none"
        )
    for name, factor in zip(names, factors):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"DATASETS.COPY_FACTORS: factor of '{name}' must be an int >= 1, got {factor!r}")
    return factors


def get_train_dataset_dicts(cfg) -> List[dict]:
    """Concatenates the DATASETS.TRAIN datasets, dataset k repeated COPY_FACTORS[k] times.

    Sampling is then uniform over the concatenation (the official pre-training mixture is a
    ``ConcatDataset`` with copy factors, so datasets are drawn in proportion to their sizes). With DATALOADER.FILTER_EMPTY_ANNOTATIONS (detectron2's key, default True), images of
    *detection* datasets without any non-crowd box are removed, as maskrcnn_benchmark's COCO-style
    training loader does (``remove_images_without_annotations=is_train``). Grounding images are kept whatever they hold; empty ones are left to the
    trainer's batch skipping (SOLVER.MAX_NEG_PER_BATCH).

    Returns:
        The list of dataset dicts (repeats are the same dict objects; the mapper copies).

    Raises:
        ValueError: empty DATASETS.TRAIN, a factor count mismatch, or a dataset with no image.
        KeyError: a dataset name that is not registered (detectron2's message lists them).
    """
    dicts: List[dict] = []
    for name, factor in zip(cfg.DATASETS.TRAIN, _copy_factors(cfg)):
        entries = DatasetCatalog.get(name)
        if not entries:
            raise ValueError(f"dataset '{name}' (DATASETS.TRAIN) has no image")
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and all(d.get("task") == "detection" for d in entries):
            entries = filter_images_with_only_crowd_annotations(entries)
        logger.info("training set '%s': %d images x %d", name, len(entries), factor)
        report_boxes_outside_images(name, entries)
        dicts.extend(list(entries) * factor)
    return dicts


def _default_train_mapper(cfg, dicts: List[dict]) -> Callable:
    """ImageCaptionMapper for image-caption data, GroundingDatasetMapper for boxes; not both."""
    captions = sum(d.get("task") == "caption" for d in dicts)
    if captions and captions != len(dicts):
        raise ValueError(
            f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)} mixes image-caption datasets with detection/grounding "
            "datasets; the two stages train separate models")
    if not captions:
        return GroundingDatasetMapper(cfg, True)
    coarse = cfg.MODEL.FIBER.COARSE
    # ITM without ITC trains on random negatives: each pair also gets a random training image
    return ImageCaptionMapper(cfg, True, false_images=dicts if coarse.ITM_ON and not coarse.ITC_ON else None)


def build_train_loader(cfg, mapper: Optional[Callable] = None) -> ResumableTrainLoader:
    """Resumable training batches over :func:`get_train_dataset_dicts` (infinite lists, per process
    SOLVER.IMS_PER_BATCH / (processes x SOLVER.ACCUMULATE_STEPS); stream seed SEED, a shared random
    one if SEED < 0).

    Args:
        cfg: the config (SOLVER.IMS_PER_BATCH, DATALOADER.* are detectron2's keys; only its
            uniform "TrainingSampler" stream exists here).
        mapper: defaults to ``ImageCaptionMapper(cfg, is_train=True)`` for image-caption
            datasets, else ``GroundingDatasetMapper(cfg, is_train=True)``.
    """
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r}: fiber-det's resumable loader "
                         "samples uniformly ('TrainingSampler'); dataset weights are DATASETS.COPY_FACTORS")
    world, total, accumulate = comm.get_world_size(), cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUMULATE_STEPS
    if total % (world * accumulate):
        raise ValueError(f"SOLVER.IMS_PER_BATCH {total} is not divisible by the {world} processes x "
                         f"SOLVER.ACCUMULATE_STEPS {accumulate} micro-batches")
    dicts = get_train_dataset_dicts(cfg)
    if mapper is None:
        mapper = _default_train_mapper(cfg, dicts)
    return ResumableTrainLoader(
        dicts, mapper, total // (world * accumulate), aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS, seed=cfg.SEED if cfg.SEED >= 0 else None,
    )


def build_test_loader(cfg, dataset_name: str, mapper: Optional[Callable] = None):
    """detectron2's inference loader (one image per batch, inference sampler) for one dataset.

    Retrieval datasets (metadata ``evaluator_type`` "retrieval") get
    :func:`build_retrieval_test_loader` instead.

    Args:
        cfg: the config.
        dataset_name: a registered dataset.
        mapper: defaults to ``GroundingDatasetMapper(cfg, is_train=False)``.
    """
    if MetadataCatalog.get(dataset_name).get("evaluator_type", "") == "retrieval":
        return build_retrieval_test_loader(cfg, dataset_name, mapper)
    if mapper is None:
        mapper = GroundingDatasetMapper(cfg, False)
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)


def build_retrieval_test_loader(cfg, dataset_name: str, mapper: Optional[Callable] = None):
    """Inference loader over the retrieval view of a caption dataset (image items, then text items).

    Batches are lists of TEST.RETRIEVAL.BATCH_SIZE mapped items, split over processes by
    Detectron2's ``InferenceSampler``; a batch can hold both image and text items (at the seam).

    Args:
        cfg: the config.
        dataset_name: a registered caption dataset.
        mapper: defaults to ``ImageCaptionMapper(cfg, is_train=False)``.
    """
    items = retrieval_items(DatasetCatalog.get(dataset_name))
    if mapper is None:
        mapper = ImageCaptionMapper(cfg, False)
    dataset = MapDataset(DatasetFromList(items, copy=False), mapper)
    return torchdata.DataLoader(
        dataset, batch_size=cfg.TEST.RETRIEVAL.BATCH_SIZE, sampler=InferenceSampler(len(dataset)),
        num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=trivial_batch_collator)
