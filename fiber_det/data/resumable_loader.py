"""The training data loader whose position is part of the checkpoint, so a resumed run is exact.

Detectron2's loader (TrainingSampler + AspectRatioGroupedDataset + per-worker seeds) cannot be
positioned: its sampler is a generator, its grouping buffers live in the main process and every
worker's numpy/python RNG advances with the samples that worker happened to map. Here

* the sample stream is fixed by a seed: epoch e is ``torch.randperm(n)`` under a seed derived
  from (seed, e); process ``rank`` of ``world_size`` takes every world_size-th entry (the same
  sharding as TrainingSampler), so position p of a process is entry p * world_size + rank;
* each sample is mapped with python's, numpy's and torch's RNGs seeded from (seed, entry), so its
  augmentation and prompt do not depend on the worker that maps it or on what ran before;
* batches are grouped by aspect ratio (w > h or not, as Detectron2) in the main process, and
  :meth:`ResumableTrainLoader.state_dict` after a batch is {seed, next position, positions
  waiting in the groups}: loading it replays exactly the same batches.

A sample whose mapping fails with ValueError or OSError (unreadable image, bad annotation) is
skipped, counted and logged with its file name; training goes on. A mapper may also return None
to skip a sample (having logged why). Consecutive failures beyond
``min(50, 2 * len(dataset) + 1)`` mean a systematic error and raise.
"""
import contextlib
import itertools
import logging
import random
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.utils.data as torchdata

from detectron2.utils import comm

__all__ = ["ResumableTrainLoader", "sample_seed"]

logger = logging.getLogger(__name__)


def sample_seed(seed: int, entry: int) -> int:
    """The 32-bit seed of stream entry ``entry`` under the loader seed ``seed``."""
    return _derived_seed(seed, 0, entry)


def _derived_seed(seed: int, domain: int, index: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, domain, index]).generate_state(1)[0])


@contextlib.contextmanager
def _seeded(seed: int):
    """Seeds python's, numpy's and torch's global RNGs; restores their previous states after."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed also reseeds CUDA)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class _MappedEntries(torchdata.Dataset):
    """``dataset[(position, entry, index)]`` -> (position, mapped dict or None, error or None)."""

    def __init__(self, dataset: Sequence[dict], mapper, seed: int):
        self.dataset, self.mapper, self.seed = dataset, mapper, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        position, entry, index = key
        record = self.dataset[index]
        with _seeded(sample_seed(self.seed, entry)):
            try:
                return position, self.mapper(record), None
            except (ValueError, OSError) as e:
                return position, None, f"{record.get('file_name', f'dataset entry {index}')}: {e}"


def _no_collate(item):
    return item


class ResumableTrainLoader:
    """Infinite lists of ``batch_size`` mapped training samples, resumable from :meth:`state_dict`.

    Args:
        dataset: the dataset dicts (with "width" / "height" for aspect grouping).
        mapper: dict -> model input (raises ValueError / OSError, or returns None, for a bad sample).
        batch_size: samples per batch on this process.
        aspect_ratio_grouping: batch only images with w > h together, and w <= h together.
        num_workers: mapping processes (0: in the main process).
        seed: the stream seed; None: one random seed shared by all processes.
        rank, world_size: this process and the process count (default: Detectron2's comm).
    """

    def __init__(self, dataset: Sequence[dict], mapper, batch_size: int, *, aspect_ratio_grouping: bool = True,
                 num_workers: int = 0, seed: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        if len(dataset) == 0:
            raise ValueError("the training set is empty")
        if batch_size < 1:
            raise ValueError(f"batch size per process must be >= 1, got {batch_size}")
        self.dataset, self.mapper, self.batch_size = dataset, mapper, int(batch_size)
        self.aspect_ratio_grouping, self.num_workers = bool(aspect_ratio_grouping), int(num_workers)
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.world_size = comm.get_world_size() if world_size is None else int(world_size)
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.max_consecutive_failures = min(50, 2 * len(dataset) + 1)
        self._state = {"seed": self.seed, "next_position": 0, "pending": [], "skipped": 0}
        self._permutation = (-1, None)  # (epoch, its permutation), cached

    def state_dict(self) -> dict:
        """{seed, next_position, pending (positions held by the aspect groups), skipped}: the
        state after the last batch handed out."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._state.items()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch at which ``state`` was taken (takes effect on the next iter())."""
        missing = {"seed", "next_position", "pending", "skipped"} - set(state)
        if missing:
            raise KeyError(f"data-loader state lacks {sorted(missing)}")
        self.seed = int(state["seed"])
        self._state = {"seed": self.seed, "next_position": int(state["next_position"]),
                       "pending": [int(p) for p in state["pending"]], "skipped": int(state["skipped"])}
        self._permutation = (-1, None)

    def dataset_index(self, entry: int) -> int:
        """The dataset index of stream entry ``entry`` (epoch entry // n, shuffled under (seed, epoch))."""
        n = len(self.dataset)
        epoch = entry // n
        if self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed(_derived_seed(self.seed, 1, epoch))
            self._permutation = (epoch, torch.randperm(n, generator=generator).tolist())
        return self._permutation[1][entry % n]

    def _keys(self, positions: Iterator[int]):
        for position in positions:
            entry = position * self.world_size + self.rank
            yield position, entry, self.dataset_index(entry)

    def __iter__(self) -> Iterator[List[dict]]:
        return self._batches()

    def _batches(self) -> Iterator[List[dict]]:
        # the state is read on the first next(), so load_state_dict after iter() still applies
        state = self.state_dict()
        positions = itertools.chain(sorted(state["pending"]), itertools.count(state["next_position"]))
        loader = torchdata.DataLoader(
            _MappedEntries(self.dataset, self.mapper, self.seed), batch_size=None, sampler=self._keys(positions),
            num_workers=self.num_workers, collate_fn=_no_collate, generator=torch.Generator().manual_seed(0),
        )
        groups: List[List[tuple]] = [[], []]
        next_position, skipped, failures = state["next_position"], state["skipped"], 0
        for position, mapped, error in loader:
            next_position = max(next_position, position + 1)
            if mapped is None:  # a mapping error, or a mapper that skips the sample itself (and says why)
                skipped, failures = skipped + 1, failures + 1
                if error is not None:
                    logger.warning("skipped training sample %s (%d skipped so far)", error, skipped)
                if failures >= self.max_consecutive_failures:
                    raise RuntimeError(f"{failures} training samples in a row failed to load; the last: "
                                       f"{error or 'skipped by the mapper'}")
                continue
            failures = 0
            group = groups[self._group_of(mapped)]
            group.append((position, mapped))
            if len(group) == self.batch_size:
                batch = [m for _, m in group]
                group.clear()
                self._state = {"seed": self.seed, "next_position": next_position,
                               "pending": [p for g in groups for p, _ in g], "skipped": skipped}
                yield batch

    def _group_of(self, mapped: dict) -> int:
        if not self.aspect_ratio_grouping:
            return 0
        return 0 if mapped["width"] > mapped["height"] else 1
