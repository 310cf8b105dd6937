"""What a checkpoint holds beyond weights, optimizer and schedules so that a resumed run is
bit-identical to one never interrupted: every process's data-loader position and RNG states.

The states are gathered from all processes when the checkpoint is written (the checkpointer
calls ``state_dict`` on every process for this) and each process takes its own back on load.
Everything is stored as tensors, ints and tuples, so the checkpoint loads with
``weights_only=True``.
"""
import contextlib
import logging
import random
from typing import List, Optional

import numpy as np
import torch

from detectron2.utils import comm

__all__ = ["rng_states", "set_rng_states", "preserved_rng_states", "gather_process_states",
           "restore_process_states"]

logger = logging.getLogger(__name__)


def rng_states() -> dict:
    """The global RNG states of this process: python, numpy, torch CPU and every CUDA device."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    """Restores :func:`rng_states` (CUDA states only where this process has CUDA devices)."""
    random.setstate(_as_tuples(states["python"]))
    n = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value):
    # random.setstate needs tuples; a checkpoint round trip may hand back lists
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@contextlib.contextmanager
def preserved_rng_states():
    """Runs a block (e.g. an evaluation during training) without changing the global RNG states."""
    saved = rng_states()
    try:
        yield
    finally:
        set_rng_states(saved)


def gather_process_states(data_loader) -> List[dict]:
    """[{"data_loader": ..., "rng": ...}] of every process, in rank order (a collective call:
    every process must call it)."""
    own = {"data_loader": data_loader.state_dict() if hasattr(data_loader, "state_dict") else None,
           "rng": rng_states()}
    return comm.all_gather(own) if comm.get_world_size() > 1 else [own]


def restore_process_states(per_process: Optional[List[dict]], data_loader) -> None:
    """Gives this process its data-loader position and RNG states from :func:`gather_process_states`.

    A checkpoint without them (written by an older fiber-det) or written by another number of
    processes cannot be continued exactly: that is logged, and the data stream and RNGs go on from
    where they are.
    """
    rank, world = comm.get_rank(), comm.get_world_size()
    if not per_process:
        logger.warning("the checkpoint holds no data-loader position or RNG state: the resumed run "
                       "sees other batches than an uninterrupted one would")
        return
    if len(per_process) != world:
        logger.warning(f"the checkpoint was written by {len(per_process)} process(es), this run has {world}: "
                       "data order and RNG states cannot be continued exactly and restart")
        return
    own = per_process[rank]
    if own["data_loader"] is not None and hasattr(data_loader, "load_state_dict"):
        data_loader.load_state_dict(own["data_loader"])
    set_rng_states(own["rng"])
