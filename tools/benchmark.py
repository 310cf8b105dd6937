"""Measure a fiber-det model: training step time, peak memory, inference latency and throughput,
kernel launches, FLOPs and model-FLOPs utilisation (MFU), next to the official FIBER-B numbers.

    python tools/benchmark.py                                  # FIBER-B, CUDA, every section
    python tools/benchmark.py --amp fp16 --opts MODEL.FIBER.SWIN.USE_CHECKPOINT True
    python tools/benchmark.py --config-file configs/quick_schedules/FIBER-tiny.yaml --device cpu \\
        --batch 1 --height 128 --width 160 --iters 2 --warmup 1
    python tools/benchmark.py --config-file configs/quick_schedules/FIBER-tiny.yaml --device cpu --section chunked-eval

Sections: train, infer, flops (the default) and chunked-eval, sdpa, compile (two ways of running
the same model, fiber_det/utils/benchmark_variants.py): with these the last line is one JSON object.

The model has random weights and sees synthetic inputs: random uint8 BGR images of
--height x --width (padded by the model to a multiple of 32: 800x1333 -> 800x1344), the 80-class
COCO prompt (as many classes as fit MODEL.FIBER.TEXT.MAX_QUERY_LEN tokens: all 80 for FIBER-B),
padded to MAX_QUERY_LEN tokens unless --no-pad-to-max, and --boxes-per-image random GT boxes per
training image, each tied to the tokens of a random class of the prompt.

Choices that a reader of the numbers should know:
  * Tokenizer: MODEL.FIBER.TEXT.TOKENIZER when set. When it is empty (Base-FIBER-SwinB.yaml), a
    stand-in is written to a temporary folder: the vendored GPT-2 BPE (tests/assets/gpt2_bpe)
    re-indexed in RoBERTa's fairseq order (<s> 0, <pad> 1, </s> 2, <unk> 3, BPE entries from 4,
    <mask> last), so pad id 1 matches MODEL.FIBER.TEXT.PAD_TOKEN_ID and no config key changes.
    Its merges are roberta-base's, so captions split into the same tokens; only the ids differ,
    which changes no FLOP and no kernel (an embedding lookup costs the same for any id).
  * Post-processing: random weights score every phrase near the 0.01 prior, below the official
    0.05 threshold, which would leave post-processing nothing to do. The model's threshold is set
    to --score-threshold (default 0.0): every level then fills its MODEL.FIBER.ATSS.PRE_NMS_TOP_N
    candidates, the most work post-processing can get. Pass 0.05 for the configured behaviour.
  * Training step = forward (loss) + backward + optimizer (GradScaler step/update + zero_grad),
    each phase timed between device synchronisations; AdamW from build_optimizer(cfg, model).
  * FLOPs: fiber_det.utils.flops (FlopCounterMode + an analytic count of the deformable convs;
    formula there). Forward = one image in eval mode; training step = forward + backward of the
    training batch (optimizer FLOPs not counted), with activation checkpointing switched off
    while counting so that recomputation is not counted (model FLOPs, the MFU convention).
    MFU = training-step FLOPs / step time / peak FLOP/s.
  * CPU: peak memory is the peak RSS of the whole process (getrusage; cannot be reset between
    sections) and "launches" are the top-level aten ops recorded by torch.profiler.
"""
import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import fiber_det  # noqa: E402,F401  (registers the model)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from fiber_det import add_fiber_config  # noqa: E402
from fiber_det.data.prompt import Prompt, PromptBuilder  # noqa: E402
from fiber_det.engine.optimizer import build_optimizer  # noqa: E402
from fiber_det.utils import benchmark_variants  # noqa: E402
from fiber_det.utils.flops import count_flops  # noqa: E402
from fiber_det.utils.paths import REPO_ROOT  # noqa: E402

DEFAULT_SECTIONS = ("train", "infer", "flops")
SECTIONS = DEFAULT_SECTIONS + benchmark_variants.SECTIONS
AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# H100 SXM dense peaks (TFLOP/s) per training dtype; fp32 assumes TF32 tensor cores (plain FP32: 67)
PEAK_TFLOPS = {"none": 495.0, "fp16": 989.0, "bf16": 989.0}
GPT2_BPE = REPO_ROOT / "tests" / "assets" / "gpt2_bpe"
# fairseq's dictionary order, which roberta-base's vocab.json follows
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
# CUDA runtime / driver calls that launch a kernel (name prefixes, e.g. cudaLaunchKernelExC_v11060)
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
GIB = 2.0 ** 30

# Official FIBER-B numbers (the official code measured on an H100): batch 2 at 800x1333, 256-token prompt.
REFERENCE = [
    ("train_step_time (AMP fp16, checkpointing on)", 0.675, "s"),
    ("train_throughput (AMP fp16, checkpointing on)", 2.96, "img/s"),
    ("train_peak_memory (AMP fp16, checkpointing on)", 10.1, "GiB"),
    ("train_step_time (AMP fp16, checkpointing off)", 0.638, "s"),
    ("train_peak_memory (AMP fp16, checkpointing off)", 19.2, "GiB"),
    ("infer_latency (fp32, batch 1)", 0.210, "s/image"),
    ("infer_forward_time (fp32, batch 1)", 0.115, "s"),
    ("infer_postprocess_time (fp32, batch 1)", 0.093, "s"),
    ("forward_flops", 1.18, "TFLOP"),
    ("train_step_flops", 7.06, "TFLOP"),
    ("mfu", 1.3, "%"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=str(REPO_ROOT / "configs" / "Base-FIBER-SwinB.yaml"))
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="config overrides")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", "--section", dest="only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})")
    p.add_argument("--batch", type=int, default=2, help="training images per step")
    p.add_argument("--height", type=int, default=800, help="image height (before padding to 32)")
    p.add_argument("--width", type=int, default=1333, help="image width (before padding to 32)")
    p.add_argument("--infer-batch", type=int, default=8, help="images per forward for the throughput")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before timing")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none",
                   help="training autocast dtype (fp16 uses a GradScaler)")
    p.add_argument("--infer-amp", choices=sorted(AMP_DTYPES), default="none", help="inference autocast dtype")
    p.add_argument("--no-pad-to-max", action="store_true",
                   help="pad captions to the longest of the batch instead of MAX_QUERY_LEN")
    p.add_argument("--boxes-per-image", type=int, default=8, help="synthetic GT boxes per training image")
    p.add_argument("--score-threshold", type=float, default=0.0,
                   help="inference phrase-score threshold (0: post-processing gets its maximum work)")
    p.add_argument("--skip-step-flops", action="store_true",
                   help="flops section: count the forward only (a training step of FIBER-B is heavy on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU. CUDA default by --amp (H100 SXM dense): fp16/bf16 989, "
                        "none 495 (TF32; plain FP32 is 67). CPU: no default (MFU n/a)")
    benchmark_variants.add_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        p.error(f"--only {args.only!r}: unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    if len(args.opts) % 2:
        p.error(f"--opts needs KEY VALUE pairs, got {len(args.opts)} items")
    for name in ("batch", "height", "width", "infer_batch", "iters", "boxes_per_image", "chunk_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_images < 0 or args.chunk_batch < 0:
        p.error("--num-images and --chunk-batch must be >= 0")
    return args


# ---- model, tokenizer, inputs ----
def write_roberta_order_bpe(source: Path, folder: Path) -> Path:
    """Writes the GPT-2 BPE of ``source`` (vocab.json, merges.txt) into ``folder`` re-indexed in
    RoBERTa's order: <s> 0, <pad> 1, </s> 2, <unk> 3, the BPE entries from 4, <mask> last."""
    with open(source / "vocab.json", encoding="utf-8") as f:
        bpe = json.load(f)
    clash = sorted(set(ROBERTA_SPECIALS) & set(bpe))
    if clash:
        raise ValueError(f"{source / 'vocab.json'} already holds {clash}; cannot re-index it in RoBERTa order")
    vocab = {tok: i for i, tok in enumerate(ROBERTA_SPECIALS)}
    for tok, i in sorted(bpe.items(), key=lambda kv: kv[1]):
        vocab[tok] = len(ROBERTA_SPECIALS) + i
    vocab["<mask>"] = max(vocab.values()) + 1
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    (folder / "merges.txt").write_text((source / "merges.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def build_cfg(args):
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts))
    cfg.MODEL.DEVICE = args.device
    if args.no_pad_to_max:
        cfg.MODEL.FIBER.TEXT.PAD_TO_MAX = False
    cfg.freeze()
    return cfg


def build_benchmark_model(cfg):
    """(model on cfg.MODEL.DEVICE with random weights, its PromptBuilder, a description of the
    tokenizer)."""
    t = cfg.MODEL.FIBER.TEXT
    if t.TOKENIZER:
        return build_model(cfg), PromptBuilder(cfg), t.TOKENIZER
    if t.ARCH != "roberta" or t.PAD_TOKEN_ID != 1:
        raise ValueError(
            f"MODEL.FIBER.TEXT.TOKENIZER is empty and the text tower is ARCH {t.ARCH!r} with PAD_TOKEN_ID "
            f"{t.PAD_TOKEN_ID}: the stand-in tokenizer (GPT-2 BPE in RoBERTa order) fits only roberta / 1; "
            "set MODEL.FIBER.TEXT.TOKENIZER to a local tokenizer folder"
        )
    with tempfile.TemporaryDirectory(prefix="fiber_bench_tok_") as tmp:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.FIBER.TEXT.TOKENIZER = str(write_roberta_order_bpe(GPT2_BPE, Path(tmp)))
        builder = PromptBuilder(cfg)  # the tokenizer is loaded here; the folder is not needed after
        model = build_model(cfg)
    return model, builder, "stand-in: tests/assets/gpt2_bpe re-indexed in RoBERTa order (pad 1); roberta-base's merges"


def coco_prompt(builder: PromptBuilder) -> Prompt:
    """The 80-name COCO prompt as the test mapper builds it (194 RoBERTa tokens), or, when it
    exceeds the builder's ``max_length`` (tiny configs), the first of its chunks."""
    things = sorted((c for c in COCO_CATEGORIES if c["isthing"]), key=lambda c: c["id"])
    return builder.chunks([c["name"] for c in things])[0]


def synthetic_inputs(n, height, width, prompt: Prompt, gen, boxes_per_image=0, max_query_len=0):
    """``n`` model inputs (random BGR images, the prompt); with ``boxes_per_image`` training
    ``instances`` (random boxes, each with the binary token map of a random prompt label)."""
    labels = prompt.labels
    inputs = []
    for _ in range(n):
        x = {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen),
             "height": height, "width": width, "prompts": (prompt,)}
        if boxes_per_image:
            corner = torch.rand(boxes_per_image, 2, generator=gen) * 0.6
            size = 0.05 + torch.rand(boxes_per_image, 2, generator=gen) * 0.35
            boxes = torch.cat([corner, corner + size], dim=1) * torch.tensor([width, height, width, height])
            picks = torch.randint(0, len(labels), (boxes_per_image,), generator=gen).tolist()
            inst = Instances((height, width))
            inst.gt_boxes = Boxes(boxes)
            inst.gt_positive_map = prompt.positive_map([labels[k] for k in picks], max_query_len)
            x["instances"] = inst
        inputs.append(x)
    return inputs


# ---- measuring helpers ----
def _now(device: torch.device) -> float:
    """Wall time after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device):
    """(GiB, unit): CUDA max allocated since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "GiB (CUDA max allocated)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "GiB (CPU: process peak RSS)"


def count_launches(fn, device: torch.device):
    """(count, unit) for one call of ``fn``: CUDA kernel launches, or on CPU the top-level aten
    ops (nested ones, e.g. the addmm inside a linear, are not counted)."""
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        n = sum(1 for e in prof.events() if e.name.startswith(LAUNCH_CALLS))
        if n == 0:  # no runtime-API events recorded: count the kernels that ran on the device
            return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA), "CUDA kernels (device events)"
        return n, "CUDA kernel launches"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    n = sum(1 for e in prof.events() if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    return n, "aten ops (CPU profiler)"


@contextmanager
def activation_checkpointing_off(model):
    """Temporarily clears every ``use_checkpoint`` flag (Swin stages, text encoder)."""
    flagged = [m for m in model.modules() if getattr(m, "use_checkpoint", False)]
    for m in flagged:
        m.use_checkpoint = False
    try:
        yield
    finally:
        for m in flagged:
            m.use_checkpoint = True


def _mean(values):
    return sum(values) / len(values)


# ---- sections ----
class TrainStep:
    """One optimisation step split into timed phases (forward, backward, optimizer)."""

    def __init__(self, model, optimizer, amp_dtype, device):
        self.model, self.optimizer, self.amp_dtype, self.device = model, optimizer, amp_dtype, device
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.skipped = 0  # fp16 steps that GradScaler skipped (inf/NaN gradients; its scale drops)

    def __call__(self, inputs):
        """Returns (forward, backward, optimizer) seconds."""
        t0 = _now(self.device)
        with _autocast(self.device, self.amp_dtype):
            loss = sum(self.model(inputs).values())
        t1 = _now(self.device)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        t2 = _now(self.device)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped += int(self.scaler.get_scale() < scale)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, _now(self.device) - t2


def measure_train(model, cfg, args, inputs, device, rows):
    model.train()
    step = TrainStep(model, build_optimizer(cfg, model), AMP_DTYPES[args.amp], device)
    _reset_peak(device)
    for _ in range(args.warmup):
        step(inputs)
    step.skipped = 0
    phases = [step(inputs) for _ in range(args.iters)]
    skipped = step.skipped
    peak, peak_unit = _peak_memory(device)
    fwd, bwd, opt = (_mean(p) for p in zip(*phases))
    total = fwd + bwd + opt
    launches, launch_unit = count_launches(lambda: step(inputs), device)
    rows += [
        ("train_step_time", total, "s"),
        ("train_forward_time", fwd, "s"),
        ("train_backward_time", bwd, "s"),
        ("train_optimizer_time", opt, "s"),
        ("train_throughput", len(inputs) / total, "img/s"),
        ("train_peak_memory", peak, peak_unit),
        ("train_kernel_launches", launches, launch_unit),
    ]
    if step.scaler is not None:
        rows.append(("train_skipped_steps", skipped, f"of {args.iters} timed (GradScaler: inf/NaN gradients)"))


def _split_inference(model, inputs, device):
    """(preparation, network, post-processing) seconds of one inference call."""
    t0 = _now(device)
    prompts = [model.prompts_of(x, i)[0] for i, x in enumerate(inputs)]
    images = model.preprocess_images(inputs)
    input_ids, attention_mask = model.text_inputs(prompts)
    t1 = _now(device)
    outputs, anchors = model.run(images.tensor, input_ids, attention_mask)
    t2 = _now(device)
    model.postprocess(outputs, anchors, images.image_sizes, inputs, prompts)
    return t1 - t0, t2 - t1, _now(device) - t2


def _time_calls(fn, iters: int, warmup: int, device) -> float:
    """Mean seconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = _now(device)
        fn()
        times.append(_now(device) - t0)
    return _mean(times)


def measure_infer(model, args, single, batched, device, rows):
    model.eval()
    with torch.no_grad(), _autocast(device, AMP_DTYPES[args.infer_amp]):
        _reset_peak(device)
        latency = _time_calls(lambda: model(single), args.iters, args.warmup, device)
        prep, net, post = (_mean(p) for p in zip(*[_split_inference(model, single, device) for _ in range(args.iters)]))
        peak, peak_unit = _peak_memory(device)
        launches, launch_unit = count_launches(lambda: model(single), device)
        batch_time = _time_calls(lambda: model(batched), args.iters, args.warmup, device)
    rows += [
        ("infer_latency", latency, "s/image (batch 1, end to end)"),
        ("infer_preprocess_time", prep, "s (normalise, pad, collate the prompt token ids)"),
        ("infer_forward_time", net, "s (model.run)"),
        ("infer_postprocess_time", post, "s (model.postprocess)"),
        ("infer_peak_memory", peak, peak_unit),
        ("infer_kernel_launches", launches, launch_unit),
        ("infer_batched_throughput", len(batched) / batch_time, f"img/s (batch {len(batched)})"),
    ]


def measure_flops(model, args, single, train_inputs, device, rows, counts):
    model.eval()
    with torch.no_grad():
        images = model.preprocess_images(single)
        input_ids, attention_mask = model.text_inputs([single[0]["prompts"][0]])
        _, fwd = count_flops(lambda: model.run(images.tensor, input_ids, attention_mask), model)
    counts["forward"] = vars(fwd) | {"total": fwd.total}
    rows += [
        ("forward_flops", fwd.total / 1e12, "TFLOP (1 image)"),
        ("forward_flops_counter", fwd.counted / 1e12, "TFLOP (FlopCounterMode part)"),
        ("forward_flops_deformable", fwd.deformable / 1e12, "TFLOP (analytic DCN part)"),
    ]
    if args.skip_step_flops:
        return
    model.train()

    def train_step():
        sum(model(train_inputs).values()).backward()

    with activation_checkpointing_off(model):
        _, step = count_flops(train_step, model, backward=True)
    model.zero_grad(set_to_none=True)
    counts["train_step"] = vars(step) | {"total": step.total}
    rows += [("train_step_flops", step.total / 1e12, f"TFLOP (batch {len(train_inputs)}, fwd + bwd)")]


def add_mfu(args, device, rows):
    """Appends MFU (%) when the step time and the step FLOPs were both measured."""
    values = {name: value for name, value, _ in rows}
    if "train_step_time" not in values or "train_step_flops" not in values:
        return None
    peak = args.peak_tflops if args.peak_tflops is not None else (
        PEAK_TFLOPS[args.amp] if device.type == "cuda" else None)
    mfu = None if peak is None else 100.0 * values["train_step_flops"] / values["train_step_time"] / peak
    rows.append(("mfu", mfu, f"% of {peak} TFLOP/s" if peak is not None else "% (n/a: give --peak-tflops)"))
    return peak


# ---- report ----
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def print_table(rows, title: str) -> None:
    print(f"\n{title}")
    width = max(len(name) for name, _, _ in rows)
    for name, value, unit in rows:
        text = "n/a" if value is None else (f"{value:d}" if isinstance(value, int) else f"{value:.4g}")
        print(f"  {name:<{width}}  {text:>12}  {unit}")


def run_benchmark(args) -> dict:
    """Builds the model, runs the selected sections, returns the JSON-ready results."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = build_cfg(args)
    model, builder, tokenizer_note = build_benchmark_model(cfg)
    model.score_threshold = args.score_threshold
    prompt = coco_prompt(builder)
    gen = torch.Generator().manual_seed(args.seed)
    h, w = args.height, args.width
    train_inputs = synthetic_inputs(args.batch, h, w, prompt, gen, args.boxes_per_image,
                                    cfg.MODEL.FIBER.TEXT.MAX_QUERY_LEN)
    single = synthetic_inputs(1, h, w, prompt, gen)
    rows, counts = [], {}
    if "train" in args.sections:
        measure_train(model, cfg, args, train_inputs, device, rows)
    if "infer" in args.sections:
        measure_infer(model, args, single, synthetic_inputs(args.infer_batch, h, w, prompt, gen), device, rows)
    if "flops" in args.sections:
        measure_flops(model, args, single, train_inputs, device, rows, counts)
    variants = benchmark_variants.run_sections(model, builder, cfg, args, single, train_inputs, device,
                                            _autocast(device, AMP_DTYPES[args.infer_amp]))
    peak = add_mfu(args, device, rows)
    padded = model.preprocess_images(single).tensor.shape[-2:]
    tokens = model.text_inputs([prompt])[0].shape[1]
    settings = {
        "config_file": args.config_file, "opts": list(args.opts), "sections": args.sections,
        "batch": args.batch, "image_size": [h, w], "padded_size": list(padded), "infer_batch": args.infer_batch,
        "iters": args.iters, "warmup": args.warmup, "amp": args.amp, "infer_amp": args.infer_amp,
        "prompt_categories": len(prompt.labels), "prompt_tokens": tokens,
        "pad_to_max": cfg.MODEL.FIBER.TEXT.PAD_TO_MAX, "boxes_per_image": args.boxes_per_image,
        "score_threshold": args.score_threshold, "tokenizer": tokenizer_note,
        "activation_checkpointing": {
            "swin": cfg.MODEL.FIBER.SWIN.USE_CHECKPOINT, "text": cfg.MODEL.FIBER.TEXT.USE_CHECKPOINT},
        "parameters": sum(p.numel() for p in model.parameters()), "peak_tflops": peak,
        "float32_matmul_precision": torch.get_float32_matmul_precision(), "seed": args.seed,
    }
    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "settings": settings,
        "measurements": {name: {"value": value, "unit": unit} for name, value, unit in rows},
        "variants": variants,
        "flop_counts": counts,
        "reference": {name: {"value": value, "unit": unit} for name, value, unit in REFERENCE},
        "config": cfg.dump(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run_benchmark(args)
    s = result["settings"]
    print(f"{result['device']} | torch {result['torch']} | {Path(args.config_file).name} | "
          f"train batch {s['batch']} at {s['image_size'][0]}x{s['image_size'][1]} (padded "
          f"{s['padded_size'][0]}x{s['padded_size'][1]}) | amp {s['amp']} | infer amp {s['infer_amp']} | "
          f"prompt {s['prompt_categories']} classes, {s['prompt_tokens']} tokens | tokenizer: {s['tokenizer']}")
    rows = [(k, v["value"], v["unit"]) for k, v in result["measurements"].items()]
    if rows:
        print_table(rows, "Measured")
        print_table([(k, v["value"], v["unit"]) for k, v in result["reference"].items()],
                    "Official FIBER-B reference (official code; H100, batch 2, 800x1333)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.output}")
    if result["variants"]:
        print(benchmark_variants.summary_line(result, args))
    equal = result["variants"].get("chunked-eval", {}).get("detections_equal", True)
    return 0 if equal and all(v is None or math.isfinite(v) for _, v, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
