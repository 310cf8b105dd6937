"""ResumableTrainLoader: a loaded state continues the same batches, workers change nothing, ranks
shard one stream, bad samples are skipped and named; the real mapper on a thin image."""
import itertools
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_cfg
from fiber_det.data.mapper import GroundingDatasetMapper
from fiber_det.data.resumable_loader import ResumableTrainLoader


def _dataset(n=7):
    # a mix of landscape (w > h) and portrait images, as the aspect groups see them
    return [{"file_name": f"img{i}.jpg", "width": 40 if i % 3 else 20, "height": 30, "index": i} for i in range(n)]


def _mapper(record):
    """Records every RNG the real mapper may use."""
    if record.get("bad"):
        raise ValueError(f"cannot read image '{record['file_name']}': broken")
    return {**record, "draws": (random.random(), float(np.random.rand()), float(torch.rand(1)))}


def _take(loader, n):
    return [[(x["index"], x["draws"]) for x in batch] for batch in itertools.islice(iter(loader), n)]


def test_a_loaded_state_continues_with_the_same_batches():
    loader = ResumableTrainLoader(_dataset(), _mapper, 2, seed=3)
    it = iter(loader)
    head = [[(x["index"], x["draws"]) for x in next(it)] for _ in range(5)]
    state = loader.state_dict()
    tail = [[(x["index"], x["draws"]) for x in next(it)] for _ in range(6)]
    resumed = ResumableTrainLoader(_dataset(), _mapper, 2, seed=99)
    resumed.load_state_dict(state)  # the seed comes with the state
    assert _take(resumed, 6) == tail
    assert _take(ResumableTrainLoader(_dataset(), _mapper, 2, seed=3), 11) == head + tail
    # aspect groups: a batch never mixes w > h with w <= h
    for batch in itertools.islice(iter(ResumableTrainLoader(_dataset(), _mapper, 2, seed=3)), 20):
        assert len({x["width"] > x["height"] for x in batch}) == 1


def test_workers_and_the_main_process_give_the_same_batches():
    main = _take(ResumableTrainLoader(_dataset(), _mapper, 2, seed=5), 8)
    assert _take(ResumableTrainLoader(_dataset(), _mapper, 2, seed=5, num_workers=2), 8) == main
    before = random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()
    _take(ResumableTrainLoader(_dataset(), _mapper, 2, seed=5), 2)
    after = random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()
    assert before[:2] == after[:2] and torch.equal(before[2], after[2]), "mapping changed the global RNGs"


def test_two_ranks_split_the_one_process_stream():
    data = _dataset(8)
    one = ResumableTrainLoader(data, _mapper, 1, aspect_ratio_grouping=False, seed=2)
    ranks = [ResumableTrainLoader(data, _mapper, 1, aspect_ratio_grouping=False, seed=2, rank=r, world_size=2)
             for r in (0, 1)]
    stream = [b[0] for b in _take(one, 12)]
    per_rank = [[b[0] for b in _take(r, 6)] for r in ranks]
    assert stream[0::2] == per_rank[0] and stream[1::2] == per_rank[1]
    assert sorted(i for i, _ in stream[:8]) == list(range(8))  # an epoch is a permutation


def test_bad_samples_are_skipped_counted_and_named(caplog):
    data = _dataset()
    data[4] = {**data[4], "bad": True}
    loader = ResumableTrainLoader(data, _mapper, 2, seed=1)
    with caplog.at_level(logging.WARNING, logger="fiber_det.data.resumable_loader"):
        batches = _take(loader, 10)
    assert all(i != 4 for batch in batches for i, _ in batch)
    skipped = loader.state_dict()["skipped"]
    assert skipped >= 1 and f"({skipped} skipped so far)" in caplog.text
    assert "skipped training sample img4.jpg: cannot read image 'img4.jpg'" in caplog.text
    all_bad = [{**d, "bad": True} for d in _dataset(3)]
    with pytest.raises(RuntimeError, match="7 training samples in a row failed to load; the last: img"):
        _take(ResumableTrainLoader(all_bad, _mapper, 2, seed=1), 1)


def test_an_extreme_aspect_ratio_image_is_trained_on(gpt2, tmp_path):
    """10000 x 20 pixels: the official resize would round its short side to 0 px (a crash in PIL)."""
    from conftest import tiny_model

    path = tmp_path / "strip.png"
    Image.fromarray(np.full((20, 10000, 3), 90, np.uint8)).save(path)
    record = {"file_name": str(path), "height": 20, "width": 10000, "image_id": 1, "task": "grounding",
              "caption": "a grey strip", "annotations": [{"bbox": [100, 2, 5000, 15], "bbox_mode": 1, "iscrowd": 0,
                                                          "tokens_positive": [[0, 12]]}]}
    batch = next(iter(ResumableTrainLoader([record], GroundingDatasetMapper(tiny_cfg(), True), 1, seed=0)))
    assert tuple(batch[0]["image"].shape[1:]) == (1, 192)
    model = tiny_model()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
