"""A web page for FIBER: upload or pick an image, type class names or a caption, see the boxes.

    python tools/web_demo.py [--config-file C --weights W] [--port 7860] [--cpu] [KEY VALUE ...]

then open http://127.0.0.1:7860. Defaults: the quickstart model (the README's main job writes
output/quickstart/model_final.pth). The page shows the image with labelled boxes (Detectron2's
Visualizer, colours as tools/demo.py), a table of the detections (label, score, box in original
pixels), a confidence slider that re-filters without running the model again, and the detections
as JSON to download. Prompts: class names separated by "." (or ",", ";"), e.g. "cup. saucer.
spoon.", or a caption, grounded on its noun phrases or on the phrases given (separated by ";").

Bad uploads get a message in the page: files that cannot be decoded, floating-point images, images
above --max-megapixels; files above --max-upload-mb are refused by the server before they are
stored (Gradio's upload limit). 16-bit images are read as fiber_det.data.image_io reads them
(their high byte), with a note in the page.
"""
import argparse
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import fiber_det  # noqa: E402,F401  (compat fixes, registers the model)
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from fiber_det.data.image_io import read_image  # noqa: E402
from fiber_det.predictor import FIBERPredictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/quickstart/fiber_tiny_synthetic.yaml"
DEFAULT_WEIGHTS = "output/quickstart/model_final.pth"
MAIN_JOB = ("bash tools/setup_env.sh && .venv/bin/python tools/train_net.py --config-file "
            "configs/quickstart/fiber_tiny_synthetic.yaml --resume OUTPUT_DIR output/quickstart")
PHOTOS = REPO / "datasets" / "real_photos" / "images"
# prompts offered with the real photos that are present
EXAMPLE_PROMPTS = {
    "coffee.jpg": ("class names", "cup. saucer. spoon."),
    "astronaut.jpg": ("caption", "an astronaut holding a helmet in front of a flag"),
    "chelsea.jpg": ("class names", "cat."),
    "dog.jpg": ("class names", "dog. bicycle. car."),
    "giraffe.jpg": ("class names", "giraffe. tree."),
    "motorcycle_left.jpg": ("class names", "motorcycle."),
    "person.jpg": ("class names", "person."),
    "quokka.jpg": ("caption", "a quokka on the grass"),
}
WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # Pillow modes of 16-bit / 32-bit integer images
TABLE_HEADERS = ["label", "score", "x1", "y1", "x2", "y2"]
logger = logging.getLogger("fiber_det.web_demo")


class InputError(ValueError):
    """A problem with what the user gave; its message is shown in the page."""


def _demo_module():
    """tools/demo.py, for its phrase colours (one definition for both demos)."""
    spec = importlib.util.spec_from_file_location("fiber_det_cli_demo", Path(__file__).with_name("demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_upload(path: str, max_megapixels: float) -> Tuple[np.ndarray, str]:
    """((H, W, 3) uint8 RGB, a note for the page or "") of an uploaded file, or InputError saying
    why it cannot be used.

    The size is read from the header before decoding; decoding is fiber-det's one image reader
    (EXIF orientation, grey / 16-bit handling), called only here."""
    name = Path(path).name
    try:
        with Image.open(path) as im:
            width, height, mode = im.width, im.height, im.mode
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: the image is too large ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{name}: not an image file that can be read (JPEG, PNG, BMP, TIFF, WebP)") from e
    if width * height > max_megapixels * 1e6:
        raise InputError(f"{name}: {width}x{height} pixels ({width * height / 1e6:.1f} MP) is above the "
                         f"{max_megapixels:g} MP limit of this server; downscale it")
    try:
        rgb = read_image(path, format="RGB", name=name)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(str(e) if str(e).startswith(name) else f"{name}: {e}") from e
    note = (f"{name} has {mode} pixels (16-bit or wider): the model sees their high byte."
            if mode in WIDE_MODES else "")
    return rgb, note


def parse_prompt(mode: str, text: str, phrases: str = ""):
    """The predictor prompt: a list of class names, or a caption dict (with its phrases)."""
    text = (text or "").strip()
    if not text:
        raise InputError("type class names (\"cup. saucer. spoon.\") or a caption")
    if mode == "class names":
        names = [n.strip() for n in re.split(r"[.,;\n]", text) if n.strip()]
        if not names:
            raise InputError(f"no class name in {text!r}: separate names with '.'")
        return names
    listed = [p.strip() for p in (phrases or "").split(";") if p.strip()]
    return {"caption": text, "phrases": listed} if listed else {"caption": text}


class WebDemo:
    """The page's callbacks around one predictor (pure Python: testable without a browser)."""

    def __init__(self, predictor: FIBERPredictor, max_megapixels: float = 40.0):
        self.predictor = predictor
        self.max_megapixels = max_megapixels
        self.phrase_color = _demo_module().phrase_color
        self.output_dir = Path(tempfile.mkdtemp(prefix="fiber_web_demo_"))

    def preview(self, path: Optional[str]):
        """(image or None, status) for a newly chosen file."""
        if not path:
            return None, ""
        try:
            return read_upload(path, self.max_megapixels)
        except InputError as e:
            return None, f"**Cannot use this file.** {e}"

    def detect(self, path: Optional[str], mode: str, text: str, phrases: str, threshold: float):
        """Runs the model; returns (image, table rows, json file, status, state)."""
        try:
            if not path:
                raise InputError("upload an image or pick an example first")
            rgb, note = read_upload(path, self.max_megapixels)
            prompt = parse_prompt(mode, text, phrases)
            result = self.predictor(rgb, prompt, input_format="RGB")
            if result.error is not None:
                raise InputError(result.error.replace("image 0: ", "", 1))
        except InputError as e:
            return None, [], None, f"**Cannot run.** {e}", None
        except Exception:  # never a stack trace in the page; the server log has it
            logger.exception("web demo: detection failed")
            return None, [], None, "**Internal error** while running the model; see the server log.", None
        record = {**result.to_dict(), "name": Path(path).name,
                  "prompt": prompt if isinstance(prompt, dict) else {"classes": prompt}}
        state = {"image": rgb, "record": record, "note": note}
        return (*self.render(state, threshold), state)

    def render(self, state, threshold: float):
        """(image, table rows, json file, status) of the detections scoring >= ``threshold``."""
        if not state:
            return None, [], None, ""
        record = state["record"]
        kept = [d for d in record["detections"] if d["score"] >= threshold]
        vis = Visualizer(state["image"], metadata=None, scale=1.0)
        if kept:
            vis.overlay_instances(
                boxes=np.array([d["box"] for d in kept]),
                labels=[f"{d['phrase']} {d['score']:.2f}" for d in kept],
                assigned_colors=[self.phrase_color(d["phrase"]) for d in kept],
            )
        rows = [[d["phrase"], round(d["score"], 3), *[round(v, 1) for v in d["box"]]] for d in kept]
        out = self.output_dir / f"{Path(record['name']).stem}_detections.json"
        out.write_text(json.dumps({**record, "confidence_threshold": threshold, "detections": kept}, indent=1))
        status = (f"{len(kept)} detection(s) with score >= {threshold:.2f} "
                  f"({len(record['detections'])} before the threshold)")
        if state.get("note"):
            status = f"{status}. {state['note']}"
        return vis.get_output().get_image(), rows, str(out), status


def example_rows() -> List[list]:
    """[file, mode, text, phrases] for each real photo present."""
    return [[str(PHOTOS / name), mode, text, ""] for name, (mode, text) in EXAMPLE_PROMPTS.items()
            if (PHOTOS / name).is_file()]


def build_app(demo: WebDemo, default_threshold: float = 0.3):
    """The Gradio Blocks page (element ids are what tests/test_web_demo.py drives)."""
    import gradio as gr

    with gr.Blocks(title="fiber-det web demo", analytics_enabled=False) as app:
        gr.Markdown("# fiber-det: detect and ground phrases\nUpload an image (or pick an example below), "
                    "type class names or a caption, press **Detect**.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image", type="filepath", elem_id="image-upload")
                preview = gr.Image(label="Input", type="numpy", interactive=False, elem_id="input-image")
                mode = gr.Radio(["class names", "caption"], value="class names", label="Prompt kind",
                                elem_id="prompt-kind")
                text = gr.Textbox(label="Class names or caption", placeholder="cup. saucer. spoon.",
                                  elem_id="prompt")
                phrases = gr.Textbox(label="Phrases of the caption to ground (optional, separated by ';')",
                                     elem_id="phrases")
                threshold = gr.Slider(0.0, 1.0, value=default_threshold, step=0.01, label="Confidence threshold",
                                      elem_id="threshold")
                button = gr.Button("Detect", variant="primary", elem_id="detect-button")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                image = gr.Image(label="Detections", type="numpy", interactive=False, elem_id="output-image")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Detections (original pixels)",
                                     interactive=False, elem_id="detections")
                download = gr.File(label="JSON", interactive=False, elem_id="json-file")
        rows = example_rows()
        if rows:
            gr.Examples(rows, inputs=[upload, mode, text, phrases], label="Real photos")
        # a new file clears the previous image's detections
        upload.change(demo.preview, upload, [preview, status]).then(
            lambda: (None, [], None, None), None, [image, table, download, state])
        button.click(demo.detect, [upload, mode, text, phrases, threshold], [image, table, download, status, state])
        threshold.release(demo.render, [state, threshold], [image, table, download, status])
    return app


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help=f"fiber-det yaml config (default {DEFAULT_CONFIG})")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help=f"checkpoint (default {DEFAULT_WEIGHTS})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload the server accepts")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="largest image size accepted")
    p.add_argument("--confidence-threshold", type=float, default=0.3, help="initial slider value")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (default: the config's MODEL.DEVICE)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    if len(args.opts) % 2:
        p.error(f"config overrides need KEY VALUE pairs, got {args.opts}")
    return args


def check_files(args) -> Optional[str]:
    """A message if the config or the weights are missing (naming the command that makes the
    default weights), else None."""
    if not Path(args.config_file).is_file():
        return f"config file not found: {args.config_file}"
    if not Path(args.weights).is_file():
        if Path(args.weights).resolve() == (REPO / DEFAULT_WEIGHTS).resolve():
            return (f"{args.weights} not found: it is the quickstart model; make it with the README's main job\n"
                    f"  {MAIN_JOB}\nor pass --config-file and --weights of another model")
        return f"weights not found: {args.weights}"
    return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    setup_logger(name="fiber_det")
    problem = check_files(args)
    if problem:
        raise SystemExit(problem)
    predictor = FIBERPredictor.from_checkpoint(args.config_file, args.weights, args.opts,
                                               device="cpu" if args.cpu else None)
    app = build_app(WebDemo(predictor, args.max_megapixels), args.confidence_threshold)
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: no font download
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, max_file_size=int(args.max_upload_mb * 2**20),
        show_error=False, ssr_mode=False, theme=theme, allowed_paths=[str(PHOTOS)], quiet=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
