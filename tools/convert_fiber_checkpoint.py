"""Convert an official FIBER checkpoint into a Detectron2 model-zoo file for fiber-det.

    # fine-grained detector checkpoint -> the detector
    python tools/convert_fiber_checkpoint.py --input fiber_coco.pth --output fiber_coco_d2.pth \
        [--official-config e2e_dyhead_SwinT_B_FPN_coco_finetuning_fusion_backbone.yaml] \
        [--config-out fiber_coco_d2.yaml] [--use-ema] [--tokenizer /path/to/roberta-base]
    # coarse checkpoint (official, or a fiber-det coarse model's) -> the detector's initial weights
    python tools/convert_fiber_checkpoint.py --coarse --input fiber_pretrain.ckpt --output init.pth
    # official coarse checkpoint -> the fiber-det coarse model (FiberCoarsePretrain)
    python tools/convert_fiber_checkpoint.py --coarse --target coarse --input fiber_pretrain.ckpt \
        --output fiber_pretrain_d2.pth --config-out fiber_pretrain_d2.yaml [--image-size 576]

The output (``{"model": ..., "__author__": ..., "matching_heuristics": False}``) loads through
``MODEL.WEIGHTS`` with Detectron2's DetectionCheckpointer with no missing or unexpected key.
Prints the conversion report; exits non-zero on any unmatched, missing or mis-shaped key.
Checkpoints are memory-mapped: the official coarse queues (7 GB at 384 px) are never read.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import fiber_det  # noqa: E402,F401
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from fiber_det import add_fiber_config  # noqa: E402
from fiber_det.checkpoint.coarse import (  # noqa: E402
    convert_coarse_state_dict, convert_official_coarse_state_dict,
)
from fiber_det.checkpoint.convert import (  # noqa: E402
    ConversionError, anchor_spec_from_cfg, convert_official_state_dict, unwrap_checkpoint,
)
from fiber_det.checkpoint.official_coarse_config import COARSE_BASE_CONFIG, translate_official_coarse_config  # noqa: E402
from fiber_det.checkpoint.official_config import translate_official_config  # noqa: E402
from fiber_det.checkpoint.rename_table import V3_MARKER  # noqa: E402
from fiber_det.utils.paths import REPO_ROOT  # noqa: E402
from fiber_det.utils.safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_checkpoint_file  # noqa: E402


def load_checkpoint(path: str):
    """The checkpoint, loaded without running code from it; a one-line diagnosis on failure."""
    try:
        return load_checkpoint_file(path, mmap=True)  # dropped tensors are never read
    except (FileNotFoundError, UnsafeCheckpointError, CorruptCheckpointError) as e:
        raise SystemExit(f"[convert] ERROR: {e}") from None


def already_converted(state_dict, expected) -> bool:
    """True for a checkpoint with fiber-det's own names (most tensors are model keys, none official)."""
    if any(k.startswith("fusion_backbone.") for k in state_dict):
        return False
    return len(set(state_dict) & set(expected)) > 0.5 * len(state_dict)


def build_coarse_cfg(args, checkpoint):
    """The coarse model's config: the checkpoint's own official config when it carries one
    (Lightning ``hyper_parameters``), else --config-file; --image-size overrides the size."""
    official = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if isinstance(official, dict) and not args.config_file:
        cfg = translate_official_coarse_config(official, tokenizer=args.tokenizer)
    else:
        cfg = add_fiber_config(get_cfg())
        cfg.merge_from_file(args.config_file or str(COARSE_BASE_CONFIG))
        cfg.MODEL.FIBER.TEXT.TOKENIZER = args.tokenizer or cfg.MODEL.FIBER.TEXT.TOKENIZER
    if args.image_size:
        cfg.MODEL.FIBER.COARSE.IMAGE_SIZE = args.image_size
        cfg.MODEL.FIBER.SWIN.WINDOW_SIZE = args.image_size // 32
    return cfg


def build_cfg(args, checkpoint):
    text_cfg = None
    if args.text_config:
        with open(args.text_config) as f:
            text_cfg = json.load(f)
        text_cfg.setdefault("model_type", "roberta")
    if args.target == "coarse":
        cfg = build_coarse_cfg(args, checkpoint)
    elif args.config_file:
        cfg = add_fiber_config(get_cfg())
        cfg.merge_from_file(args.config_file)
        cfg.MODEL.FIBER.TEXT.TOKENIZER = args.tokenizer or cfg.MODEL.FIBER.TEXT.TOKENIZER
    elif args.official_config:
        cfg = translate_official_config(args.official_config, text_model_config=text_cfg, tokenizer=args.tokenizer)
    else:
        if text_cfg is not None:
            raise SystemExit("--text-config needs --official-config (the rest of the architecture)")
        cfg = add_fiber_config(get_cfg())
        cfg.merge_from_file(str(REPO_ROOT / "configs" / "Base-FIBER-SwinB.yaml"))
        version = args.fusion_version
        if version == "auto":  # coarse checkpoints always carry the v3 norm: they default to v2
            sd, _, _ = unwrap_checkpoint(checkpoint, args.use_ema)
            version = "v3" if not args.coarse and any(V3_MARKER.search(k) for k in sd) else "v2"
        cfg.MODEL.FIBER.FUSION.I2T_QUERY_NORM = version == "v3"
        cfg.MODEL.FIBER.TEXT.TOKENIZER = args.tokenizer
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def print_report(report) -> None:
    print(f"[convert] {report.summary()}")
    for key in report.dropped:
        print(f"[convert] dropped: {key}")
    for note in report.notes:
        print(f"[convert] note: {note}")
    if report.fresh:
        print(f"[convert] {len(report.fresh)} model tensors stay at their initialisation (e.g. {report.fresh[0]})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="official checkpoint (.pth / .pt)")
    p.add_argument("--output", required=True, help="Detectron2-style checkpoint to write")
    p.add_argument("--official-config", default="", help="official yaml (or merged dump) of the checkpoint")
    p.add_argument("--config-out", default="", help="write the matching fiber-det config here")
    p.add_argument("--use-ema", action="store_true", help="convert the 'model_ema' weights")
    p.add_argument("--coarse", action="store_true",
                   help="input is a coarse-grained checkpoint (official .ckpt / fiber_coarse_init.pt, or a fiber-det coarse model's)")
    p.add_argument("--target", choices=("fine", "coarse"), default="fine",
                   help="fine: the detector (default); coarse: the fiber-det coarse model (needs --coarse)")
    p.add_argument("--config-file", default="", help="fiber-det config of the target model (default: from "
                   "--official-config, else configs/Base-FIBER-SwinB.yaml; --target coarse: the checkpoint's own "
                   "official config, else configs/coarse/Base-FIBER-B-coarse.yaml)")
    p.add_argument("--image-size", type=int, default=0, help="--target coarse: image size of the target model; "
                   "the position tables are resized bicubically as in official fine-tuning")
    p.add_argument("--fusion-version", choices=("auto", "v2", "v3"), default="auto",
                   help="target model without --official-config (auto: from the keys; v2 for --coarse)")
    p.add_argument("--tokenizer", default="", help="local tokenizer folder written into the config")
    p.add_argument("--text-config", default="", help="HF config.json of a text model other than roberta-base")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the target model's config")
    args = p.parse_args(argv)
    if args.target == "coarse" and not args.coarse:
        p.error("--target coarse converts a coarse checkpoint: add --coarse")

    checkpoint = load_checkpoint(args.input)
    try:
        cfg = build_cfg(args, checkpoint)
        model = build_model(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if isinstance(checkpoint, dict) and already_converted(unwrap_checkpoint(checkpoint, args.use_ema)[0], expected):
            print(f"[convert] ERROR: {args.input} is already in fiber-det format (its tensors carry the model's own "
                  "names): load it with MODEL.WEIGHTS directly, there is nothing to convert", file=sys.stderr)
            return 1
        if args.target == "coarse":
            sd, report = convert_official_coarse_state_dict(checkpoint, expected)
        elif args.coarse:
            sd, report = convert_coarse_state_dict(checkpoint, expected)
        else:
            sd, report = convert_official_state_dict(
                checkpoint, expected, use_ema=args.use_ema, anchors=anchor_spec_from_cfg(cfg)
            )
    except (ConversionError, ValueError, KeyError) as e:
        print(f"[convert] ERROR: {e}", file=sys.stderr)
        return 1
    print_report(report)
    try:
        report.raise_if_errors()
    except ConversionError as e:
        print(f"[convert] ERROR: {e}", file=sys.stderr)
        return 1
    out = {"model": sd, "__author__": f"fiber-det convert_fiber_checkpoint.py from {os.path.basename(args.input)}",
           "matching_heuristics": False}
    if report.fresh:  # a coarse init: FiberCheckpointer lets exactly these model keys stay at their init
        out["fresh_keys"] = list(report.fresh)
    torch.save(out, args.output)
    print(f"[convert] wrote {args.output} ({len(sd)} tensors)")
    if args.config_out:
        with open(args.config_out, "w") as f:
            f.write(cfg.dump())
        print(f"[convert] wrote {args.config_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
