"""The sections of tools/benchmark.py that compare two ways of running the same model:

  * ``chunked-eval``: chunked evaluation (LVIS v1: 1,203 names, 40 per prompt as the official
    evaluation chunks them) on real photos, sequential path (every (image, chunk) pair through
    the whole network) vs shared-prefix path (fiber_det/modeling/shared_prefix.py), with the
    detections of both compared and the FLOP bound of the speedup;
  * ``sdpa``: the network (FIBER.run) and a training forward + backward with
    MODEL.FIBER.SDPA off and on, same weights;
  * ``compile``: graph breaks of FIBER.run and of a training loss (torch._dynamo.explain), and
    torch.compile'd vs eager FIBER.run.
Timings alternate between the two variants (A, B, A, B, ...) so that a change of machine load
affects both alike; each is the mean over --iters calls after --warmup calls (chunked-eval: one
timed pass over all images per path after a one-batch warm-up).

With any of these sections tools/benchmark.py prints, as its last line, one JSON object
(:func:`summary_line`): the chunked-eval keys at the top level (sequential_s, shared_s, speedup,
max_abs_score_diff, detections_equal, num_images, num_chunks, device, ...), the other sections'
under "sdpa" / "compile".
"""
import json
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from fiber_det.data.image_io import read_image
from fiber_det.data.transforms import build_transforms
from fiber_det.utils.detections import compare_detections
from fiber_det.utils.flops import count_flops
from fiber_det.utils.paths import REPO_ROOT

SECTIONS = ("chunked-eval", "sdpa", "compile")
LVIS_DATASET = "lvis_v1_minival_grounding"  # registered by fiber_det with the LVIS v1 names (detectron2's table)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _alternating(fns, iters: int, warmup: int, device):
    """Mean seconds of each of ``fns``, called in turn ``iters`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, ts in zip(fns, times):
            t0 = _now(device)
            fn()
            ts.append(_now(device) - t0)
    return [sum(ts) / len(ts) for ts in times]


# ---- chunked evaluation ----
def lvis_v1_names():
    """The 1,203 LVIS v1 category names in id order (the names the official evaluation prompts with)."""
    names = list(MetadataCatalog.get(LVIS_DATASET).thing_classes)
    if len(names) != 1203:
        raise RuntimeError(f"dataset {LVIS_DATASET} has {len(names)} categories, expected LVIS v1's 1203")
    return names


def photo_inputs(cfg, folder: Path, num_images: int, prompts):
    """Model inputs of the first ``num_images`` photos of ``folder`` (0: all, sorted by name),
    resized by the test transform, each with all ``prompts``."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .jpg/.png image in {folder}")
    files = files[:num_images] if num_images > 0 else files
    augment = T.AugmentationList(build_transforms(cfg, is_train=False))
    inputs = []
    for path in files:
        bgr = read_image(str(path), "BGR")
        aug = T.AugInput(bgr)
        augment(aug)
        image = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
        inputs.append({"image": image, "height": bgr.shape[0], "width": bgr.shape[1], "prompts": prompts,
                       "file_name": path.name})
    return inputs


def _detect_all(model, inputs, shared: bool, device, autocast):
    """(wall seconds, this process's CPU seconds, per-image Instances) of one pass over
    ``inputs``, one image per call (the test loader's batch); the shared path starts with an
    empty text-prefix cache."""
    model.shared_prefix = shared
    model.text_prefix_cache.clear()
    outputs = []
    with torch.no_grad(), autocast:
        t0, c0 = _now(device), time.process_time()
        for x in inputs:
            outputs.append(model.inference([x])[0]["instances"].to("cpu"))
        seconds, cpu_seconds = _now(device) - t0, time.process_time() - c0
    return seconds, cpu_seconds, outputs


def chunk_flops(model, inputs, prompts):
    """FLOPs of both paths over all images and prompts (from one forward of each part per image;
    every prompt is padded to the same length, so one text prefix stands for all)."""
    bottom_up = model.backbone.bottom_up
    input_ids, attention_mask = model.text_inputs(prompts[:1])
    with torch.no_grad():
        text, text_flops = count_flops(lambda: bottom_up.text_prefix(input_ids, attention_mask), model)
        image_flops, fused_flops = 0, 0
        for x in inputs:
            images = model.preprocess_images([x]).tensor
            prefix, fc = count_flops(lambda: bottom_up.image_prefix(images), model)
            image_flops += fc.total
            fused_flops += count_flops(lambda: model.run_fused(prefix, text), model)[1].total
    n = len(prompts)
    sequential = n * (image_flops + fused_flops) + n * len(inputs) * text_flops.total
    shared = image_flops + n * fused_flops + n * text_flops.total
    return {"sequential": sequential, "shared": shared, "image_prefix_per_image": image_flops / len(inputs),
            "text_prefix_per_prompt": text_flops.total, "fused_per_pair": fused_flops / len(inputs)}


def measure_chunked_eval(model, builder, cfg, args, device, autocast=None):
    """The chunked-eval section: both paths on the same photos and prompts; a JSON-ready dict."""
    autocast = autocast or nullcontext()
    names = lvis_v1_names()
    prompts = builder.chunks(names, args.chunk_size)
    model.eval()
    if args.chunk_batch:
        model.prompts_per_batch = args.chunk_batch
    inputs = photo_inputs(cfg, Path(args.images), args.num_images, prompts)
    warm = [dict(inputs[0], prompts=prompts[:model.prompts_per_batch])]
    for shared in (False, True):
        _detect_all(model, warm, shared, device, autocast)
    sequential_s, sequential_cpu_s, sequential = _detect_all(model, inputs, False, device, autocast)
    shared_s, shared_cpu_s, shared = _detect_all(model, inputs, True, device, autocast)
    diffs = [compare_detections(a, b) for a, b in zip(shared, sequential)]
    flops = chunk_flops(model, inputs, prompts)
    return {
        "sequential_s": sequential_s, "shared_s": shared_s, "speedup": sequential_s / shared_s,
        # CPU time of this process: on a shared machine less sensitive to other processes than wall time
        "sequential_cpu_s": sequential_cpu_s, "shared_cpu_s": shared_cpu_s,
        "speedup_cpu": sequential_cpu_s / shared_cpu_s,
        "max_abs_score_diff": max(d.max_abs_score_diff for d in diffs),
        "max_abs_box_diff": max(d.max_abs_box_diff for d in diffs),
        "detections_equal": all(d.equal for d in diffs),
        "num_detections": sum(len(o) for o in sequential),
        "num_images": len(inputs), "num_chunks": len(prompts), "num_categories": len(names),
        "chunk_size": args.chunk_size, "chunk_batch": model.prompts_per_batch,
        "score_threshold": model.score_threshold, "prompt_tokens": model.text_inputs(prompts[:1])[0].shape[1],
        "image_sizes": [list(x["image"].shape[1:]) for x in inputs],
        "flop_bound_speedup": flops["sequential"] / flops["shared"], "flops": flops,
        "text_prefix_cache_entries": len(model.text_prefix_cache),
    }


# ---- SDPA ----
def _twin(model, cfg, key_value):
    """A model built with one config override, holding ``model``'s weights."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(list(key_value))
    twin = build_model(cfg)
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def _tensor_inputs(model, inputs):
    prompts = [x["prompts"][0] for x in inputs]
    return (model.preprocess_images(inputs).tensor, *model.text_inputs(prompts))


def _train_step(model, inputs):
    def step():
        model.zero_grad(set_to_none=True)
        sum(model(inputs).values()).backward()
    return step


def measure_sdpa(model, cfg, args, single, train_inputs, device):
    """The sdpa section: FIBER.run (inference) and a training forward + backward, eager vs SDPA."""
    on = bool(cfg.MODEL.FIBER.SDPA)
    other = _twin(model, cfg, ["MODEL.FIBER.SDPA", str(not on)])
    eager, sdpa = (other, model) if on else (model, other)
    tensors = _tensor_inputs(model, single)
    eager.eval()
    sdpa.eval()
    with torch.no_grad():
        diff = max((a - b).abs().max().item() for a, b in zip(eager.run(*tensors)[0]["token_logits"],
                                                               sdpa.run(*tensors)[0]["token_logits"]))
        fwd = _alternating([lambda: eager.run(*tensors), lambda: sdpa.run(*tensors)], args.iters, args.warmup, device)
    eager.train()
    sdpa.train()
    torch.manual_seed(args.seed)
    train = _alternating([_train_step(eager, train_inputs), _train_step(sdpa, train_inputs)],
                         args.iters, args.warmup, device)
    model.eval()
    return {"eager_forward_s": fwd[0], "sdpa_forward_s": fwd[1], "forward_speedup": fwd[0] / fwd[1],
            "eager_train_fwd_bwd_s": train[0], "sdpa_train_fwd_bwd_s": train[1], "train_speedup": train[0] / train[1],
            "max_abs_token_logit_diff": diff, "train_batch": len(train_inputs), "default_sdpa": on}


# ---- torch.compile ----
def graph_breaks(fn, *fn_args):
    """(graphs, graph breaks, {reason: count}) of ``fn(*fn_args)`` under torch._dynamo.explain."""
    explained = torch._dynamo.explain(fn)(*fn_args)
    reasons = Counter(r.reason.splitlines()[0][:160] + _where(r) for r in explained.break_reasons)
    return explained.graph_count, explained.graph_break_count, dict(reasons)


def _where(reason) -> str:
    frames = [f for f in reason.user_stack if "fiber_det" in f.filename]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def measure_compile(model, args, single, train_inputs, device):
    """The compile section: graph breaks of FIBER.run and of a training loss (FIBER.run +
    FiberLoss), then torch.compile(FIBER.run) vs eager."""
    tensors = _tensor_inputs(model, single)
    train_tensors = _tensor_inputs(model, train_inputs)
    boxes = [x["instances"].gt_boxes.tensor.to(model.device) for x in train_inputs]
    pmaps = [x["instances"].gt_positive_map.to(model.device) for x in train_inputs]

    def training_loss(images, input_ids, attention_mask):
        return model.loss(*model.run(images, input_ids, attention_mask), boxes, pmaps, attention_mask)

    model.train()
    train_graphs, train_breaks, train_reasons = graph_breaks(training_loss, *train_tensors)
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        graphs, breaks, reasons = graph_breaks(model.run, *tensors)
        torch._dynamo.reset()
        compiled = torch.compile(model.run)
        t0 = _now(device)
        out = compiled(*tensors)
        compile_s = _now(device) - t0
        ref = model.run(*tensors)
        diff = max((a - b).abs().max().item() for a, b in zip(out[0]["token_logits"], ref[0]["token_logits"]))
        eager_s, compiled_s = _alternating([lambda: model.run(*tensors), lambda: compiled(*tensors)],
                                           args.iters, args.warmup, device)
    return {"run_graphs": graphs, "run_graph_breaks": breaks, "run_break_reasons": reasons,
            "train_loss_graphs": train_graphs, "train_loss_graph_breaks": train_breaks,
            "train_loss_break_reasons": train_reasons, "compile_s": compile_s,
            "eager_forward_s": eager_s, "compiled_forward_s": compiled_s, "speedup": eager_s / compiled_s,
            "max_abs_token_logit_diff": diff, "backend": "inductor"}


# ---- wiring into tools/benchmark.py ----
def add_arguments(parser) -> None:
    """The chunked-eval options."""
    parser.add_argument("--images", default=str(REPO_ROOT / "datasets" / "real_photos" / "images"),
                        help="chunked-eval: folder of photos (.jpg/.png)")
    parser.add_argument("--num-images", type=int, default=0, help="chunked-eval: the first N photos by name (0: all)")
    parser.add_argument("--chunk-size", type=int, default=40,
                        help="chunked-eval: LVIS names per prompt (official: 40; a chunk over "
                             "MODEL.FIBER.TEXT.MAX_QUERY_LEN tokens is halved until it fits)")
    parser.add_argument("--chunk-batch", type=int, default=0,
                        help="chunked-eval: (image, chunk) pairs per forward on both paths (0: TEST.PROMPTS_PER_BATCH)")


def run_sections(model, builder, cfg, args, single, train_inputs, device, autocast) -> dict:
    """{section: results} of the selected sections of this module."""
    out = {}
    if "sdpa" in args.sections:
        out["sdpa"] = measure_sdpa(model, cfg, args, single, train_inputs, device)
    if "compile" in args.sections:
        out["compile"] = measure_compile(model, args, single, train_inputs, device)
    if "chunked-eval" in args.sections:
        out["chunked-eval"] = measure_chunked_eval(model, builder, cfg, args, device, autocast)
    return out


def summary_line(result: dict, args) -> str:
    """The one-line JSON object printed last (module docstring)."""
    variants = result["variants"]
    line = dict(variants.get("chunked-eval", {}), device=result["device"], config_file=args.config_file,
                torch=result["torch"], threads=torch.get_num_threads())
    line.update({k: v for k, v in variants.items() if k != "chunked-eval"})
    return json.dumps(line)
