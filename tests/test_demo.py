"""tools/demo.py on a real photo with the tiny GPT-2 model: PNG + JSON outputs that round-trip,
per-image failures and the exit code."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from conftest import REPO, load_tool, tiny_cfg
from fiber_det.predictor import FIBERPredictor

CONFIG = str(REPO / "configs" / "quick_schedules" / "FIBER-tiny.yaml")
OPTS = ["MODEL.FIBER.ATSS.INFERENCE_TH", "0.0", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
pytestmark = pytest.mark.usefixtures("single_thread")

demo = load_tool("demo")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder with coffee.jpg and astronaut.png, weights file, predictor with those weights)."""
    root = tmp_path_factory.mktemp("demo")
    Image.fromarray(data.coffee()).save(root / "coffee.jpg", quality=95)
    Image.fromarray(data.astronaut()).save(root / "astronaut.png")
    torch.manual_seed(0)
    predictor = FIBERPredictor(tiny_cfg(**{k.replace(".", "__"): v for k, v in zip(OPTS[::2], OPTS[1::2])}))
    weights = root / "tiny.pth"
    torch.save({"model": predictor.model.state_dict()}, weights)
    return root, str(weights), predictor


def test_demo_outputs_round_trip(setup, tmp_path):
    root, weights, predictor = setup
    out = tmp_path / "out"
    argv = ["--config-file", CONFIG, "--weights", weights, "--input", str(root / "*.jpg"),
            "--classes", "cup,saucer,spoon",
            "--output", str(out), "--confidence-threshold", "0.07", "--cpu", "--opts", *OPTS]
    assert demo.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["coffee.json", "coffee.png"]
    with Image.open(out / "coffee.png") as png:
        assert png.size == (600, 400)
        drawn = np.asarray(png.convert("RGB"))
    with Image.open(root / "coffee.jpg") as jpg:
        assert not np.array_equal(drawn, np.asarray(jpg.convert("RGB")))  # boxes were drawn
    record = json.loads((out / "coffee.json").read_text())
    assert (record["height"], record["width"]) == (400, 600) and record["classes"] == ["cup", "saucer", "spoon"]
    result = predictor(str(root / "coffee.jpg"), ["cup", "saucer", "spoon"])
    expected = [d for d in result.detections if d.score >= 0.07]
    assert expected, "the threshold leaves nothing to compare"
    assert [d["box"] for d in record["detections"]] == [d.box for d in expected]
    assert [(d["score"], d["label"], d["phrase"], d["span"]) for d in record["detections"]] == [
        (d.score, d.label, d.phrase, None) for d in expected]


def test_demo_caption_with_a_bad_image_exits_nonzero(setup, tmp_path):
    root, weights, _ = setup
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    out = tmp_path / "out"
    argv = ["--config-file", CONFIG, "--weights", weights, "--input", str(root / "astronaut.png"), str(broken),
            str(tmp_path / "none*.png"), "--caption", "a woman in a space suit", "--phrases", "a woman", "a space suit",
            "--output", str(out), "--confidence-threshold", "0", "--cpu", "--batch-size", "2", "--opts", *OPTS]
    assert demo.main(argv) == 1
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.json", "astronaut.png"]
    record = json.loads((out / "astronaut.json").read_text())
    assert record["caption"] == "a woman in a space suit"
    assert {(d["phrase"], tuple(d["span"])) for d in record["detections"]} <= {("a woman", (0, 7)),
                                                                                 ("a space suit", (11, 23))}
    assert record["detections"]


def test_output_names_and_colours_are_deterministic():
    assert demo.output_stems(["a/x.jpg", "b/x.png", "c/y.jpg"]) == ["x", "x_1", "y"]
    assert demo.phrase_color("a cat") == demo.phrase_color("a cat")
    assert len({demo.phrase_color(f"thing {i}") for i in range(20)}) > 5


def test_bad_command_lines_are_rejected():
    with pytest.raises(SystemExit):
        demo.parse_args(["--config-file", CONFIG, "--input", "x.jpg", "--output", "o", "--classes", "a",
                         "--phrases", "a"])
    args = demo.parse_args(["--config-file", CONFIG, "--input", "x.jpg", "--output", "o", "--classes", "a,,b"])
    with pytest.raises(SystemExit, match="empty category name"):
        demo.build_prompt(args)


def test_classes_file_gives_one_name_per_line(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cup\n\ntraffic light\n")
    args = demo.parse_args(["--config-file", CONFIG, "--input", "x.jpg", "--output", "o", "--classes-file", str(names)])
    assert demo.build_prompt(args) == ["cup", "traffic light"]
