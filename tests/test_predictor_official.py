"""FIBERPredictor on an official (maskrcnn_benchmark-named) checkpoint, converted while loading."""
import numpy as np
import pytest
import torch
from skimage import data

from fiber_det import FIBERPredictor
from fiber_det.checkpoint.official_config import translate_official_config


@pytest.fixture(scope="module")
def official_predictor(fixture_v2, fixture_tokenizer_dir, tmp_path_factory):
    ref = fixture_v2["reference"]
    text_cfg = dict(ref["text_model_config_not_in_yacs"], model_type="roberta")
    cfg = translate_official_config(ref["cfg_dump"], text_model_config=text_cfg, tokenizer=str(fixture_tokenizer_dir))
    weights = tmp_path_factory.mktemp("official") / "fiber_official.pth"
    torch.save({"model": fixture_v2["state_dict"]}, weights)  # official layout and key names
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 160
    cfg.MODEL.FIBER.ATSS.INFERENCE_TH = 0.0
    return FIBERPredictor(cfg)


def test_official_checkpoint_loads_into_the_predictor(official_predictor, fixture_model):
    ours = official_predictor.model.state_dict()
    ref = fixture_model.state_dict()
    assert ours.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)


def test_official_checkpoint_grounds_phrases_on_a_real_photo(official_predictor):
    coffee = np.ascontiguousarray(data.coffee())
    result = official_predictor(coffee, {"caption": "a cup on a saucer", "phrases": ["a cup", "a saucer"]},
                                input_format="RGB")
    assert result.error is None and result.detections
    assert {d.phrase for d in result.detections} <= {"a cup", "a saucer"}
    for d in result.detections:
        x1, y1, x2, y2 = d.box
        assert -1 <= x1 <= x2 <= 600 and -1 <= y1 <= y2 <= 400  # original 600 x 400 frame
