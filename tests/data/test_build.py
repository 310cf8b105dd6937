"""Training-set mixing (copy factors, empty-image filter) and the loaders on the real-photo set,
ending in the tiny model (the mapper output is a valid model input)."""
import uuid

import pytest
import torch

from fiber_det.data.transforms import legacy_resize_size

import fiber_det.data.datasets.real_photos  # noqa: F401  (registers real_photos_*)
from conftest import tiny_cfg, tiny_model
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from fiber_det.data.build import build_test_loader, build_train_loader, get_train_dataset_dicts


def _entry(image_id, task, anns):
    return {"file_name": f"/x/{image_id}.jpg", "height": 10, "width": 10, "image_id": image_id, "task": task,
            "dataset": "d", "annotations": anns, **({"caption": "a cat"} if task == "grounding" else {})}


def _box(iscrowd=0):
    return {"bbox": [1, 1, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": iscrowd}


@pytest.fixture
def two_datasets():
    det = [_entry(1, "detection", [_box()]), _entry(2, "detection", []), _entry(3, "detection", [_box(1)])]
    grd = [_entry(10, "grounding", [{**_box(), "tokens_positive": [[2, 5]]}]), _entry(11, "grounding", [])]
    names = [f"test_build_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("det", "grd")]
    for name, dicts in zip(names, (det, grd)):
        DatasetCatalog.register(name, lambda dicts=dicts: dicts)
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def test_copy_factors_and_detection_only_empty_filter(two_datasets):
    det, grd = two_datasets
    dicts = get_train_dataset_dicts(tiny_cfg(DATASETS__TRAIN=(det, grd), DATASETS__COPY_FACTORS=[3, 2]))
    # detection: only image 1 has a non-crowd box; grounding keeps its empty image
    assert [d["image_id"] for d in dicts] == [1, 1, 1, 10, 11, 10, 11]
    cfg = tiny_cfg(DATASETS__TRAIN=(det, grd), DATALOADER__FILTER_EMPTY_ANNOTATIONS=False)
    unfiltered = get_train_dataset_dicts(cfg)
    assert [d["image_id"] for d in unfiltered] == [1, 2, 3, 10, 11]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"DATASETS__COPY_FACTORS": [1]}, "COPY_FACTORS has 1 entries but DATASETS.TRAIN has 2"),
        ({"DATASETS__COPY_FACTORS": [1, 0]}, "must be an int >= 1"),
    ],
)
def test_copy_factor_errors(two_datasets, overrides, message):
    with pytest.raises(ValueError, match=message):
        get_train_dataset_dicts(tiny_cfg(DATASETS__TRAIN=tuple(two_datasets), **overrides))


def test_empty_train_list_is_an_error():
    with pytest.raises(ValueError, match="DATASETS.TRAIN is empty"):
        get_train_dataset_dicts(tiny_cfg(DATASETS__TRAIN=()))


def test_loaders_feed_the_tiny_model():
    cfg = tiny_cfg(DATASETS__TRAIN=("real_photos_grounding", "real_photos_detection"), SOLVER__IMS_PER_BATCH=2,
                   DATALOADER__NUM_WORKERS=0, INPUT__FLIP_PROB=0.5)
    batch = next(iter(build_train_loader(cfg)))
    assert len(batch) == 2
    for x in batch:
        # the official rule: short side 96 or 128 unless the long side would pass 192
        h, w = x["image"].shape[1:]
        assert x["image"].dtype == torch.uint8 and max(h, w) <= 192
        assert (h, w) in {legacy_resize_size(x["height"], x["width"], s, 192) for s in (96, 128)}
        inst = x["instances"]
        assert len(inst) > 0 and inst.gt_positive_map.shape == (len(inst), 64)
        assert (inst.gt_positive_map.sum(1) > 0).all()  # every box points at some token
    model = tiny_model()
    model.train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())

    test_batch = next(iter(build_test_loader(cfg, "real_photos_grounding")))
    assert len(test_batch) == 1 and len(test_batch[0]["prompts"]) == 1 and "instances" not in test_batch[0]
    assert max(test_batch[0]["image"].shape[1:]) <= 192  # MAX_SIZE_TEST
    model.eval()
    with torch.no_grad():
        (result,) = model(test_batch)
    assert result["instances"].image_size == (test_batch[0]["height"], test_batch[0]["width"])

    chunked = tiny_cfg(DATALOADER__NUM_WORKERS=0, TEST__CHUNK_SIZE=8)
    (x,) = next(iter(build_test_loader(chunked, "real_photos_detection")))
    assert [len(p.labels) for p in x["prompts"]] == [8, 8, 4]  # 20 categories


@pytest.fixture
def caption_set(tmp_path):
    """A JSON-lines caption dataset of the three vendored photos, registered for retrieval."""
    from caption_files import write_jsonl
    from fiber_det.data.datasets.caption_pairs import load_caption_jsonl, register_caption_dataset

    name, path = f"test_build_captions_{uuid.uuid4().hex[:8]}", write_jsonl(tmp_path)
    register_caption_dataset(name, lambda: load_caption_jsonl(str(path), None, name), evaluator_type="retrieval")
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _caption_cfg(**overrides):
    return tiny_cfg(INPUT__FORMAT="RGB", MODEL__FIBER__COARSE__IMAGE_SIZE=32, DATALOADER__NUM_WORKERS=0, **overrides)


def test_caption_train_loader_picks_the_caption_mapper(caption_set, two_datasets):
    batch = next(iter(build_train_loader(_caption_cfg(DATASETS__TRAIN=(caption_set,), SOLVER__IMS_PER_BATCH=3))))
    assert len(batch) == 3
    for x in batch:
        assert x["image"].shape == (3, 32, 32) and x["input_ids"].shape == (64,) and isinstance(x["caption"], str)
    with pytest.raises(ValueError, match="mixes image-caption datasets"):
        build_train_loader(_caption_cfg(DATASETS__TRAIN=(caption_set, two_datasets[0])))


def test_retrieval_test_loader(caption_set):
    from fiber_det.data.build import build_retrieval_test_loader

    cfg = _caption_cfg(TEST__RETRIEVAL__BATCH_SIZE=2)
    batches = list(build_test_loader(cfg, caption_set))  # dispatched on evaluator_type "retrieval"
    items = [x for b in batches for x in b]
    assert [len(b) for b in batches] == [2, 2, 2, 2]  # 3 images + 5 captions
    assert [x["modality"] for x in items] == ["image"] * 3 + ["text"] * 5
    assert items[3]["caption_index"] == 0 and items[0]["image"].shape == (3, 32, 32)
    assert len(list(build_retrieval_test_loader(cfg, caption_set))) == 4
