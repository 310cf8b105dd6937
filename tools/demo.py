"""Run FIBER on images with a caption or a vocabulary; save annotated PNGs and JSON detections.

    python tools/demo.py --config-file configs/quick_schedules/FIBER-tiny-minilm.yaml \
        --weights model.pth --input "photos/*.jpg" --classes cat,dog,kite --output out/
    python tools/demo.py --config-file C --weights W --input a.jpg b.png \
        --caption "a man riding a horse" [--phrases "a man" "a horse"] --output out/

For every image, ``OUT/<stem>.png`` shows the detections scoring at least
``--confidence-threshold`` (one deterministic colour per phrase) and ``OUT/<stem>.json`` lists
them with the image size. A caption without ``--phrases`` is split into phrases by
fiber_det.data.phrases.caption_phrases; a phrase given as a substring is its first occurrence.
An image that fails is logged and skipped; the exit code is 1 if any failed.
"""
import argparse
import glob
import json
import logging
import os
import sys
import zlib
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fiber_det  # noqa: E402,F401
from detectron2.utils.colormap import colormap  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from fiber_det.data.image_io import read_image  # noqa: E402
from fiber_det.data.phrases import tagger_available  # noqa: E402
from fiber_det.predictor import FIBERPredictor  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("fiber_det.demo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True, help="fiber-det yaml config")
    p.add_argument("--weights", default=None, help="checkpoint (default: the config's MODEL.WEIGHTS)")
    p.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--caption", help="grounding caption (free text)")
    text.add_argument("--classes", help="comma-separated category names")
    text.add_argument("--classes-file", help="text file with one category name per line")
    p.add_argument("--phrases", nargs="+", help="phrases of --caption to ground (substrings)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score to draw and save")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward")
    p.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none", help="autocast dtype")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (default: CUDA when available)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    if args.phrases and args.caption is None:
        p.error("--phrases needs --caption")
    if len(args.opts) % 2:
        p.error(f"--opts needs KEY VALUE pairs, got {args.opts}")
    return args


def build_prompt(args):
    """The predictor prompt of the command line: a caption dict or a list of names."""
    if args.caption is not None:
        return {"caption": args.caption, **({"phrases": args.phrases} if args.phrases else {})}
    if args.classes is not None:
        names = [n.strip() for n in args.classes.split(",")]
        source = "--classes"
    else:
        with open(args.classes_file) as f:
            names = [line.strip() for line in f if line.strip()]
        source = args.classes_file
    if not names or any(not n for n in names):
        raise SystemExit(f"{source}: empty category name in {names!r}")
    return names


def expand_inputs(patterns):
    """(image paths, errors): folders give their image files, patterns their matches (sorted)."""
    files, errors = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(str(q) for q in Path(pattern).iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
        elif glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
        else:
            found = [pattern]  # a missing file is reported by the predictor, per image
        if not found:
            errors.append(f"{pattern}: no image matches")
        files.extend(found)
    return list(dict.fromkeys(files)), errors


def output_stems(files):
    """One output name per file: its stem, suffixed with _1, _2, ... when stems repeat."""
    counts, seen, stems = Counter(Path(f).stem for f in files), Counter(), []
    for f in files:
        stem = Path(f).stem
        stems.append(stem if counts[stem] == 1 or seen[stem] == 0 else f"{stem}_{seen[stem]}")
        seen[stem] += 1
    return stems


def phrase_color(phrase: str):
    """A colour (RGB in [0, 1]) that depends only on the phrase text (crc32, not Python's salted hash)."""
    palette = colormap(rgb=True, maximum=1)
    return tuple(float(c) for c in palette[zlib.crc32(phrase.encode("utf-8")) % len(palette)])


def save_outputs(result, detections, stem: str, out_dir: Path, threshold: float, prompt) -> None:
    """Writes ``stem.png`` (boxes and phrase labels on the image) and ``stem.json``."""
    image = read_image(result.name, "RGB")
    vis = Visualizer(image, metadata=None, scale=1.0)
    if detections:
        vis.overlay_instances(
            boxes=np.array([d.box for d in detections]),
            labels=[f"{d.phrase} {d.score:.2f}" for d in detections],
            assigned_colors=[phrase_color(d.phrase) for d in detections],
        )
    vis.get_output().save(str(out_dir / f"{stem}.png"))
    record = {
        "file_name": result.name, "height": result.height, "width": result.width, "caption": result.caption,
        "classes": None if isinstance(prompt, dict) else list(prompt), "confidence_threshold": threshold,
        "detections": [{"box": d.box, "score": d.score, "label": d.label, "phrase": d.phrase, "span": d.span}
                       for d in detections],
    }
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump(record, f, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="fiber_det")
    prompt = build_prompt(args)
    if isinstance(prompt, dict) and "phrases" not in prompt:
        how = "noun phrases of the TextBlob tagger" if tagger_available() else "the caption and its ,/and parts"
        logger.info("no --phrases: grounding %s", how)
    predictor = FIBERPredictor.from_checkpoint(
        args.config_file, args.weights, args.opts, device="cpu" if args.cpu else None,
        amp_dtype=None if args.amp == "none" else args.amp, batch_size=args.batch_size,
    )
    files, failures = expand_inputs(args.input)
    for message in failures:
        logger.error(message)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems, written, kept = output_stems(files), 0, 0
    with tqdm(total=len(files), unit="img", disable=len(files) < 2) as bar:
        for start in range(0, len(files), args.batch_size):
            batch = files[start:start + args.batch_size]
            for result, stem in zip(predictor(batch, prompt), stems[start:start + len(batch)]):
                if result.error is None:
                    detections = [d for d in result.detections if d.score >= args.confidence_threshold]
                    try:
                        save_outputs(result, detections, stem, out_dir, args.confidence_threshold, prompt)
                        written, kept = written + 1, kept + len(detections)
                    except OSError as e:
                        result.error = f"{result.name}: cannot write outputs ({e})"
                if result.error is not None:
                    failures.append(result.error)
                    logger.error(result.error)
                bar.update(1)
    logger.info("demo: %d image(s), %d written, %d failure(s), %d detection(s) with score >= %g -> %s",
                len(files), written, len(failures), kept, args.confidence_threshold, out_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
