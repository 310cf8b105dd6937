"""Build a fiber-det model from a config and print its parameter counts per part.

    python tools/model_info.py --config-file configs/quick_schedules/FIBER-tiny.yaml [KEY VALUE ...]

Swin-B sized configs are built on the meta device (shapes only), so this is instant everywhere.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import fiber_det  # noqa: E402,F401
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from fiber_det import add_fiber_config  # noqa: E402

PARTS = (
    ("Swin (image tower, with image->text fusion)", "backbone.bottom_up.vision."),
    ("text encoder (with text->image fusion)", "backbone.bottom_up.text."),
    ("FPN", "backbone."),
    ("DyHead tower", "head.dyhead_tower."),
    ("output layers", "head."),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    args = p.parse_args(argv)
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "meta"
    cfg.MODEL.FIBER.SWIN.WEIGHTS = cfg.MODEL.FIBER.TEXT.WEIGHTS = ""  # shapes only
    with torch.device("meta"):
        model = build_model(cfg)
    counts = {name: 0 for name, _ in PARTS}
    for key, param in model.named_parameters():
        part = next(name for name, prefix in PARTS if key.startswith(prefix))
        counts[part] += param.numel()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, n in counts.items():
        print(f"{name:48s} {n:>13,}")
    print(f"{'total parameters':48s} {total:>13,}")
    print(f"{'trainable parameters':48s} {trainable:>13,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
