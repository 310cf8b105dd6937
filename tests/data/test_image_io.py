"""The one image reader: EXIF orientation, 16-bit scaling, numpy inputs, errors naming the file;
the same pixels for the same file through the mapper, the predictor and the demo."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, load_tool, tiny_cfg
from fiber_det.data.image_io import image_size, read_image
from fiber_det.data.mapper import GroundingDatasetMapper
from fiber_det.predictor import FIBERPredictor

COFFEE = REPO / "datasets" / "real_photos" / "images" / "coffee.jpg"


def _sixteen_bit_and_its_high_byte(tmp_path):
    grey = np.asarray(Image.open(COFFEE).convert("L"), dtype=np.uint16) * 257 + 100  # low byte non-zero
    Image.fromarray(grey).save(tmp_path / "coffee16.png")
    Image.fromarray((grey >> 8).astype(np.uint8)).save(tmp_path / "coffee8.png")
    assert Image.open(tmp_path / "coffee16.png").mode in ("I;16", "I")
    return tmp_path / "coffee16.png", tmp_path / "coffee8.png", grey


def test_sixteen_bit_png_is_its_high_byte_on_every_path(tmp_path, monkeypatch):
    sixteen, eight, grey = _sixteen_bit_and_its_high_byte(tmp_path)
    expected = np.repeat((grey >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(read_image(sixteen, "RGB"), expected)
    np.testing.assert_array_equal(read_image(grey, "RGB"), expected)  # a uint16 array, scaled the same way
    # the mapper (test mode: resize only) sees the 8-bit image's pixels
    mapper = GroundingDatasetMapper(tiny_cfg(), False)
    record = {"file_name": str(sixteen), "height": 400, "width": 600, "image_id": 1, "task": "grounding",
              "caption": "a cup", "tokens_positive_eval": [[[0, 5]]]}
    assert torch.equal(mapper(record)["image"], mapper({**record, "file_name": str(eight)})["image"])
    # the predictor (before: Detectron2's read_image, an all-white image) detects the same things
    torch.manual_seed(0)
    predictor = FIBERPredictor(tiny_cfg(MODEL__FIBER__ATSS__INFERENCE_TH=0.0, INPUT__MIN_SIZE_TEST=64,
                                        INPUT__MAX_SIZE_TEST=96))
    a, b = predictor([str(sixteen), str(eight)], ["cup", "saucer"])
    assert a.error is None and len(a.detections) > 0
    assert [(d.box, d.score, d.label) for d in a.detections] == [(d.box, d.score, d.label) for d in b.detections]
    # the demo draws on the same pixels
    demo, drawn = load_tool("demo"), []

    class Canvas:  # records what the demo draws on
        def __init__(self, image, **kwargs):
            drawn.append(image)

        def get_output(self):
            return Image.new("RGB", (1, 1))

    monkeypatch.setattr(demo, "Visualizer", Canvas)
    demo.save_outputs(a, [], "x", tmp_path, 0.5, ["cup"])
    np.testing.assert_array_equal(drawn[0], expected)


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = 255  # white on the left
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "rotated.jpg", "RGB")
    assert out.shape == (30, 20, 3) and image_size(tmp_path / "rotated.jpg") == (30, 20)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the white band is now on top
    with Image.open(tmp_path / "rotated.jpg") as opened:  # an in-memory PIL image too
        np.testing.assert_array_equal(read_image(opened, "RGB"), out)


@pytest.mark.parametrize("kind", ["LA", "CMYK", "1", "I32"])
def test_other_modes_become_rgb(tmp_path, kind):
    rgb = (np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3) * 5)
    if kind == "I32":
        image = Image.fromarray((rgb[:, :, 0].astype(np.int32) * 300))  # mode I, values up to 69,000
        expected = np.repeat((np.clip(rgb[:, :, 0].astype(np.int64) * 300, 0, 65535) >> 8)[:, :, None], 3, axis=2)
    else:
        image = Image.fromarray(rgb).convert(kind)
        expected = np.asarray(image.convert("RGB"))
    image.save(tmp_path / "image.tif" if kind in ("CMYK", "I32") else tmp_path / "image.png")
    path = next(tmp_path.glob("image.*"))
    np.testing.assert_array_equal(read_image(path, "RGB"), expected)
    np.testing.assert_array_equal(read_image(path, "BGR"), expected[:, :, ::-1])


def test_bad_inputs_are_named(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif': floating-point pixels"):
        read_image(tmp_path / "float.tif")
    with pytest.raises(FileNotFoundError, match="'.*folder' is not a file"):
        (tmp_path / "folder").mkdir()
        read_image(tmp_path / "folder")
    with pytest.raises(ValueError, match="photo 3: numpy images must be uint8 or uint16, got dtype float64"):
        read_image(np.zeros((4, 4, 3)), name="photo 3")
    with pytest.raises(ValueError, match="format must be 'BGR' or 'RGB'"):
        read_image(np.zeros((4, 4, 3), np.uint8), "RGBA")
