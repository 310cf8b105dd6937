"""Collects per-entry evaluation records of all processes on the main process, without duplicates."""
import itertools
import logging
from typing import Hashable, List, Sequence

from detectron2.utils import comm

__all__ = ["gather_unique"]

logger = logging.getLogger(__name__)


def gather_unique(records: Sequence[dict], key: str, distributed: bool = True) -> List[dict]:
    """Gathers ``records`` onto the main process, keeps one record per ``record[key]``, sorts by key.

    A distributed sampler can hand an entry to two processes (padding to equal shards); the copies
    are identical, so the first one is kept. Sorting by the per-entry id makes every result
    independent of the number of processes (the LVIS top-k tie rule relies on it).

    Args:
        records: this process's records, each a dict holding ``key`` (e.g. ``"image_id"``).
        key: the per-entry id field.
        distributed: gather across processes (False: use this process's records only).

    Returns:
        On the main process (or with ``distributed=False``) the unique records sorted by
        ``record[key]``; an empty list on the other processes.
    """
    if distributed:
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
