#!/usr/bin/env python
"""Train or evaluate FIBER with Detectron2's engine.

    tools/train_net.py --config-file configs/quickstart/fiber_tiny_synthetic.yaml OUTPUT_DIR out/
    tools/train_net.py --config-file C --eval-only MODEL.WEIGHTS W
    tools/train_net.py --config-file C --num-gpus 8 [--num-machines M --machine-rank R --dist-url U]
    tools/train_net.py --config-file C --num-gpus 2 MODEL.DEVICE cpu   # 2 CPU processes (gloo)
    tools/train_net.py --config-file C --resume      # continue from OUTPUT_DIR/last_checkpoint

``--num-gpus N`` runs N processes per machine: on N GPUs with NCCL, or (no CUDA, or
``--dist-backend gloo``) as N CPU processes with gloo, each with cores / N threads.
``--resume`` continues bit-identically (weights, optimizer, schedules, data position, RNG states).
``--eval-only`` needs MODEL.WEIGHTS (``--random-weights`` evaluates an untrained model on purpose).
A run whose loss or gradients stay non-finite stops with the iteration and the loss terms (exit
code 1); the checkpoints written before stay valid.

Datasets named in DATASETS.TRAIN / DATASETS.TEST must be registered (fiber_det registers the
standard ones under $DETECTRON2_DATASETS, see datasets/README.md); the built-in synthetic set is
generated on first use.
"""
import logging
import os

import torch

import fiber_det  # noqa: F401  (registers the model and the datasets)
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from fiber_det import add_fiber_config
from fiber_det.checkpoint.checkpointer import FiberCheckpointer
from fiber_det.engine.launch import BACKENDS, launch
from fiber_det.engine.trainer import FiberTrainer, NonFiniteTrainingError, resolve_schedule
from fiber_det.utils.device import resolve_device
from fiber_det.utils.paths import check_dataset_root

logger = logging.getLogger("fiber_det")


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--dist-backend", choices=BACKENDS, default="auto",
                        help="process group of --num-gpus N: nccl (GPUs), gloo (CPU processes), auto: nccl "
                             "when CUDA has N devices, else gloo")
    parser.add_argument("--random-weights", action="store_true",
                        help="with --eval-only: evaluate a randomly initialised model (no MODEL.WEIGHTS)")
    return parser.parse_args(argv)


def setup(args):
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.eval_only and not cfg.MODEL.WEIGHTS and not args.random_weights:
        raise SystemExit("--eval-only without MODEL.WEIGHTS would score a randomly initialised model: give "
                         "MODEL.WEIGHTS <checkpoint>, or --random-weights to do that on purpose")
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    if cfg.MODEL.DEVICE == "cpu":
        # Adam's second moments of rarely-updated weights decay into denormals, which x86 CPUs
        # process ~100x slower; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
        if comm.get_local_size() > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    check_dataset_root(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    prepare_builtin_data(cfg)
    if not args.eval_only:
        resolve_schedule(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def prepare_builtin_data(cfg):
    """Generates the built-in synthetic datasets (once, on the main process) that a config uses."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n.startswith(("synthetic_grounding_", "synthetic_detection_")) for n in names):
        from fiber_det.data.datasets.synthetic import default_root, ensure_synthetic

        if comm.is_main_process():
            ensure_synthetic(default_root())
    if any(n.startswith("synthetic_captions_") for n in names):
        from fiber_det.data.datasets import synthetic_captions

        if comm.is_main_process():
            synthetic_captions.ensure_synthetic_captions(synthetic_captions.default_root())
    comm.synchronize()


def load_for_eval(cfg, model):
    """MODEL.WEIGHTS into ``model`` (its EMA weights with MODEL.EMA.USE_FOR_EVAL)."""
    FiberCheckpointer(model, save_dir=cfg.OUTPUT_DIR, use_ema=cfg.MODEL.EMA.USE_FOR_EVAL).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = FiberTrainer.build_model(cfg)
        load_for_eval(cfg, model)
        res = FiberTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = FiberTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    try:
        return trainer.train()
    except NonFiniteTrainingError as e:
        last = trainer.checkpointer.get_checkpoint_file() if trainer.checkpointer.has_checkpoint() else ""
        logger.error("%s\nlast checkpoint: %s", e, last or "none written yet")
        raise SystemExit(1) from None


def invoke_main(argv=None) -> None:
    args = parse_args(argv)
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend=args.dist_backend,
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    invoke_main()
