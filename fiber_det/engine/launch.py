"""Detectron2's ``launch`` with a backend choice: gloo on CPU, NCCL on GPUs, one code path.

Detectron2 0.6's launcher asserts CUDA and hard-codes NCCL, so ``--num-gpus N`` cannot run on a
CPU-only machine. This one spawns the same N processes per machine, initialises the process
group with ``backend`` (default: NCCL when CUDA has a device for every local process, else gloo),
sets up Detectron2's per-machine process group (``comm.get_local_rank``) and calls ``main_func``.
"""
import logging
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

__all__ = ["launch", "default_backend", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT = timedelta(minutes=30)


def default_backend(processes_per_machine: int) -> str:
    """NCCL when CUDA has at least one device per local process, else gloo."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= processes_per_machine:
        return "nccl"
    return "gloo"


def launch(main_func, num_processes_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: Optional[str] = None, args=(), timeout: timedelta = DEFAULT_TIMEOUT,
           backend: str = "auto"):
    """Runs ``main_func(*args)`` in ``num_processes_per_machine`` processes on each machine.

    Args:
        main_func: the per-process entry point.
        num_processes_per_machine: processes here (``--num-gpus``: GPUs with NCCL, CPU processes
            with gloo).
        num_machines, machine_rank, dist_url: as Detectron2's launch ("auto": a free local port).
        args: arguments of ``main_func``.
        timeout: of collective operations.
        backend: "auto" (:func:`default_backend`), "gloo" or "nccl".

    Raises:
        ValueError: an unknown backend, NCCL without enough GPUs, or "auto" with several machines.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = default_backend(num_processes_per_machine)
    if backend == "nccl" and torch.cuda.device_count() < num_processes_per_machine:
        raise ValueError(f"NCCL with {num_processes_per_machine} processes needs as many GPUs; "
                         f"{torch.cuda.device_count()} found (gloo runs on CPUs)")
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto picks a port on this machine; several machines need tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(_worker, nprocs=num_processes_per_machine, daemon=False,
             args=(main_func, backend, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout))


def _worker(local_rank, main_func, backend, world_size, per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * per_machine + local_rank
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=rank,
                                timeout=timeout)
    except Exception:
        logger.error("process group URL: %s (backend %s)", dist_url, backend)
        raise
    # Detectron2's per-machine group, which comm.get_local_rank / get_local_size read
    for machine in range(world_size // per_machine):
        group = dist.new_group(list(range(machine * per_machine, (machine + 1) * per_machine)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
