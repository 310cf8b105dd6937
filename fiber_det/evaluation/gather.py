"""Collects per-entry evaluation records of all processes on the main process, without duplicates.

Also the plumbing every fiber-det evaluator shares around it: the JSON dump of what was scored
(:func:`dump_json`) and a base evaluator keeping one record per image (:class:`PerImageEvaluator`).
"""
import itertools
import json
import logging
import os
from typing import Any, Hashable, List, Optional, Sequence

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["gather_unique", "dump_json", "PerImageEvaluator"]

logger = logging.getLogger(__name__)


def gather_unique(records: Sequence[dict], key: str, distributed: bool = True, all_ranks: bool = False) -> List[dict]:
    """Gathers ``records`` onto the main process, keeps one record per ``record[key]``, sorts by key.

    A distributed sampler can hand an entry to two processes (padding to equal shards); the copies
    are identical, so the first one is kept. Sorting by the per-entry id makes every result
    independent of the number of processes (the LVIS top-k tie rule relies on it).

    Args:
        records: this process's records, each a dict holding ``key`` (e.g. ``"image_id"``).
        key: the per-entry id field.
        distributed: gather across processes (False: use this process's records only).
        all_ranks: gather onto every process (all-gather), not only the main one.

    Returns:
        On the main process (every process with ``all_ranks``, or with ``distributed=False``)
        the unique records sorted by ``record[key]``; an empty list on the other processes.
    """
    if distributed and all_ranks:
        per_rank = comm.all_gather(list(records))
    elif distributed:
        per_rank = comm.gather(list(records), dst=0)
        if not comm.is_main_process():
            return []
    else:
        per_rank = [list(records)]
    unique = {}
    total = 0
    for record in itertools.chain.from_iterable(per_rank):
        if key not in record:
            raise KeyError(f"evaluation record without the id field '{key}': keys {sorted(record)}")
        total += 1
        unique.setdefault(record[key], record)
    if total != len(unique):
        logger.info("Dropped %d duplicate evaluation entries (same '%s')", total - len(unique), key)
    return [unique[k] for k in sorted(unique, key=_sort_key)]


def _sort_key(value: Hashable):
    # ids are ints in our datasets; mixed types still get a deterministic order
    return (type(value).__name__, value)


def dump_json(obj: Any, output_dir: Optional[str], file_name: str, what: str) -> None:
    """Writes ``obj`` as JSON to ``output_dir/file_name`` (creating the folder); no-op without ``output_dir``.

    Args:
        obj: a JSON-serializable object (the evaluator's dump).
        output_dir: the folder, or None / "" for no dump.
        file_name: the file name inside ``output_dir``.
        what: what is saved, for the log line (e.g. "12 COCO results").
    """
    if not output_dir:
        return
    PathManager.mkdirs(output_dir)
    path = os.path.join(output_dir, file_name)
    logger.info("Saving %s to %s", what, path)
    with PathManager.open(path, "w") as f:
        json.dump(obj, f)


class PerImageEvaluator(DatasetEvaluator):
    """Base of evaluators that append one record (a dict with ``"image_id"``) per input to ``self._records``.

    Subclasses fill ``self._records`` in ``process`` and read them back, gathered over processes
    without duplicates and sorted by ``image_id``, with :meth:`_gather_records` in ``evaluate``.
    """

    def __init__(self, dataset_name: str, *, output_dir: Optional[str] = None, distributed: bool = True):
        """
        Args:
            dataset_name: the evaluated dataset.
            output_dir: where the evaluator dumps what it scored (None: no dump).
            distributed: gather the records of all processes.
        """
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return {"dataset_name": dataset_name, "output_dir": output_dir}

    def reset(self) -> None:
        self._records = []

    def _gather_records(self) -> List[dict]:
        """The records of all processes (main process; [] elsewhere), one per ``image_id``, sorted by it."""
        return gather_unique(self._records, "image_id", self._distributed)

    def _dump(self, obj: Any, file_name: str, what: str) -> None:
        dump_json(obj, self._output_dir, file_name, what)
