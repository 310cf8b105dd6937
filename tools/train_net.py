#!/usr/bin/env python
"""Train or evaluate FIBER with Detectron2's launcher.

    tools/train_net.py --config-file configs/quickstart/fiber_tiny_synthetic.yaml OUTPUT_DIR out/
    tools/train_net.py --config-file C --eval-only MODEL.WEIGHTS W
    tools/train_net.py --config-file C --num-gpus 8 [--num-machines M --machine-rank R --dist-url U]
    tools/train_net.py --config-file C --resume      # continue from OUTPUT_DIR/last_checkpoint

Datasets named in DATASETS.TRAIN / DATASETS.TEST must be registered (fiber_det registers the
standard ones under $DETECTRON2_DATASETS, see datasets/README.md); the built-in synthetic set is
generated on first use.
"""
import logging
import os

import torch

import fiber_det  # noqa: F401  (registers the model and the datasets)
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from fiber_det import add_fiber_config
from fiber_det.checkpoint.checkpointer import FiberCheckpointer
from fiber_det.engine.trainer import FiberTrainer, resolve_schedule

logger = logging.getLogger("fiber_det")


def setup(args):
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu":
        # Adam's second moments of rarely-updated weights decay into denormals, which x86 CPUs
        # process ~100x slower; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
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
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    invoke_main()
