"""Export FIBER's grounding network to ONNX, then check the file with onnxruntime against PyTorch.

    python tools/export_model.py --config-file configs/quickstart/fiber_tiny_synthetic.yaml \\
        --weights output/quickstart/model_final.pth --format onnx --output model.onnx [KEY VALUE ...]

The graph is the network of ``FIBER.run`` (fusion backbone, FPN, DyHead) plus the box decoding of
every anchor. It stops BEFORE score thresholding and NMS: turning token logits into phrase scores
needs the phrase -> token map of the prompt, which is text bookkeeping done in Python.

  inputs   image           (B, 3, H, W) float32: BGR pixels, minus MODEL.PIXEL_MEAN, divided by
                           MODEL.PIXEL_STD, zero-padded bottom/right to multiples of 32 (the image
                           already resized by the config's INPUT.MIN/MAX_SIZE_TEST)
           input_ids       (B, T) int64 token ids of the prompt (the model's tokenizer)
           attention_mask  (B, T) int64: 1 for tokens, 0 for padding
  outputs  boxes           (B, A, 4) float32: each anchor's decoded box, xyxy in the padded input
                           frame, not clipped; anchors of P3..P7 in order, (y, x) row-major
           centerness      (B, A) centerness logits
           token_logits    (B, A, T) region-word logits
           level_sizes     (L, 2) int64: (H_l, W_l) of each level, A = sum of H_l * W_l
B, H, W and T are dynamic. Detections follow fiber_det/modeling/postprocess.py: a phrase's score is
the mean of sigmoid(token_logits) over its tokens; per level, anchors above
MODEL.FIBER.ATSS.INFERENCE_TH, the PRE_NMS_TOP_N best by score * sigmoid(centerness); final score
sqrt(score * sigmoid(centerness)); boxes clipped to the unpadded image, class-aware NMS at
MODEL.FIBER.ATSS.NMS_TH with "+1" IoU, then scaled to the original image size.

After exporting, the tool runs the file with onnxruntime and the model with PyTorch on two real
photos of different sizes and two prompts of different lengths, prints the largest differences,
and exits with 1 if one exceeds --atol + --rtol * |PyTorch value|.

Ops without an ONNX mapping are refused before anything is built: the deformable convolution
(``torchvision::deform_conv2d``, MODEL.FIBER.HEAD.USE_DFCONV True, the official FIBER-B setting)
has none; models built with MODEL.FIBER.HEAD.USE_DFCONV False (e.g. the quickstart) export.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fiber_det  # noqa: E402,F401  (compat fixes, registers the model)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from fiber_det.config import add_fiber_config  # noqa: E402
from fiber_det.data.image_io import read_image  # noqa: E402
from fiber_det.data.transforms import build_transforms  # noqa: E402
from fiber_det.modeling.head.losses import flatten_level_outputs  # noqa: E402
from fiber_det.predictor import FIBERPredictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INPUT_NAMES = ["image", "input_ids", "attention_mask"]
OUTPUT_NAMES = ["boxes", "centerness", "token_logits", "level_sizes"]
DYNAMIC_AXES = {
    "image": {0: "batch", 2: "height", 3: "width"},
    "input_ids": {0: "batch", 1: "tokens"},
    "attention_mask": {0: "batch", 1: "tokens"},
    "boxes": {0: "batch", 1: "anchors"},
    "centerness": {0: "batch", 1: "anchors"},
    "token_logits": {0: "batch", 1: "anchors", 2: "tokens"},
}
OPSET = 17
CHECK_IMAGES = ("datasets/real_photos/images/coffee.jpg", "datasets/real_photos/images/astronaut.jpg")
CHECK_PROMPTS = ("a cup. a saucer.", "a small red circle left of a blue square and a black cross in the corner")
# (config key, value that cannot be exported, why, what to set instead)
UNEXPORTABLE = [
    ("MODEL.FIBER.HEAD.USE_DFCONV", True,
     "the DyHead's modulated deformable convolution (torchvision::deform_conv2d) has no ONNX export",
     "a model built and trained with MODEL.FIBER.HEAD.USE_DFCONV False (e.g. the quickstart config)"),
]
logger = logging.getLogger("fiber_det.export_model")


class GroundingGraph(nn.Module):
    """The exported function: ``FIBER.run`` plus the box decoding of every anchor (see the
    module docstring for the shapes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        outputs, anchors = self.model.run(image, input_ids, attention_mask)
        deltas = flatten_level_outputs(outputs["box_deltas"])  # (B, A, 4)
        batch = deltas.shape[0]
        anchors = torch.cat(anchors).repeat(batch, 1)
        boxes = self.model.box_coder.decode(deltas.reshape(-1, 4), anchors).reshape(batch, -1, 4)
        centerness = flatten_level_outputs(outputs["centerness"])[:, :, 0]
        token_logits = torch.cat(outputs["token_logits"], dim=1)
        # traced as Shape ops, so the sizes follow the input size
        level_sizes = torch.stack([torch._shape_as_tensor(c)[-2:] for c in outputs["centerness"]])
        return boxes, centerness, token_logits, level_sizes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="fiber-det yaml config")
    p.add_argument("--weights", default=None, help="checkpoint (default: the config's MODEL.WEIGHTS)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    p.add_argument("--output", required=True, help="the file to write, e.g. model.onnx")
    p.add_argument("--atol", type=float, default=1e-4, help="check: absolute tolerance")
    p.add_argument("--rtol", type=float, default=1e-4, help="check: relative tolerance")
    p.add_argument("--no-check", action="store_true", help="export only, skip the onnxruntime check")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    if len(args.opts) % 2:
        p.error(f"config overrides need KEY VALUE pairs, got {args.opts}")
    return args


def load_config(config_file: str, opts: Sequence[str]):
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def unexportable_settings(cfg) -> List[str]:
    """One message per setting of ``cfg`` that builds an op without an ONNX export."""
    messages = []
    for key, bad, why, instead in UNEXPORTABLE:
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node == bad:
            messages.append(f"{key} = {bad}: {why}; export {instead}")
    return messages


def export_onnx(graph: GroundingGraph, example: Dict[str, torch.Tensor], output: str) -> None:
    """Writes the ONNX file (TorchScript-based exporter, opset 17, dynamic batch/size/length).

    The TorchScript-based exporter is used because the torch.export-based one took 137 s on
    the tiny test model on 2 cores (about 3 s here) and gives the same graph semantics."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            graph, tuple(example[k] for k in INPUT_NAMES), output, dynamo=False, opset_version=OPSET,
            input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=DYNAMIC_AXES,
        )


def graph_inputs(predictor: FIBERPredictor, augmentations, image_path: str, caption: str) -> Dict[str, torch.Tensor]:
    """The three graph inputs of one image file and one caption (its own token length, no padding)."""
    aug = T.AugInput(read_image(image_path, format="BGR"))
    augmentations(aug)
    tensor = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
    image = predictor.model.preprocess_images([{"image": tensor}]).tensor
    input_ids = torch.tensor([predictor.prompt_builder.build(caption).input_ids], dtype=torch.int64)
    return {"image": image, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def check_with_onnxruntime(graph: GroundingGraph, path: str, cases: List[Dict[str, torch.Tensor]],
                           atol: float, rtol: float) -> Dict[str, float]:
    """Runs every case with onnxruntime and PyTorch; prints and returns the max |difference| per
    output; raises ValueError naming the output if one is outside ``atol + rtol * |torch|``."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = {name: 0.0 for name in OUTPUT_NAMES}
    failures = []
    for case in cases:
        with torch.no_grad():
            expected = [t.numpy() for t in graph(*(case[k] for k in INPUT_NAMES))]
        got = session.run(OUTPUT_NAMES, {k: case[k].numpy() for k in INPUT_NAMES})
        diffs = {}
        for name, e, g in zip(OUTPUT_NAMES, expected, got):
            if e.shape != g.shape:
                raise ValueError(f"{path}: output {name} has shape {g.shape} in onnxruntime, {e.shape} in PyTorch")
            d = np.abs(g.astype(np.float64) - e.astype(np.float64))
            diffs[name] = float(d.max()) if d.size else 0.0
            worst[name] = max(worst[name], diffs[name])
            if (d > atol + rtol * np.abs(e)).any():
                failures.append(f"{name} on {case['name']} (max |diff| {diffs[name]:.3g})")
        h, w = case["image"].shape[-2:]
        print(f"  {case['name']}: input {h}x{w}, T={case['input_ids'].shape[1]}, anchors "
              f"{expected[0].shape[1]}: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    print("max |onnxruntime - PyTorch|: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    if failures:
        raise ValueError(f"onnxruntime differs from PyTorch beyond atol {atol} + rtol {rtol}: " + "; ".join(failures))
    return worst


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Exports (and checks) as the command line says; returns the max differences ({} with --no-check)."""
    args = parse_args(argv)
    setup_logger(name="fiber_det")
    cfg = load_config(args.config_file, args.opts)
    problems = unexportable_settings(cfg)
    if problems:
        raise SystemExit(f"{args.config_file}: cannot export to {args.format}:\n  " + "\n  ".join(problems))
    predictor = FIBERPredictor.from_checkpoint(args.config_file, args.weights, args.opts, device="cpu")
    graph = GroundingGraph(predictor.model).eval()
    augmentations = T.AugmentationList(build_transforms(predictor.cfg, is_train=False))
    cases = []
    for image_path in CHECK_IMAGES:
        for caption in CHECK_PROMPTS:
            case = graph_inputs(predictor, augmentations, str(REPO / image_path), caption)
            cases.append({**case, "name": f"{Path(image_path).name} + {caption[:24]!r}"})
    start = time.perf_counter()
    export_onnx(graph, cases[0], args.output)
    print(f"exported {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB, opset {OPSET}) in "
          f"{time.perf_counter() - start:.1f} s; outputs are before NMS")
    if args.no_check:
        return {}
    try:
        return check_with_onnxruntime(graph, args.output, cases, args.atol, args.rtol)
    except ValueError as e:
        raise SystemExit(str(e)) from e


if __name__ == "__main__":
    main(sys.argv[1:])
