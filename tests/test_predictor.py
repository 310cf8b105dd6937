"""FIBERPredictor on real photos with the tiny GPT-2 model (random weights, seed 0): batching,
vocabulary chunking, per-image errors, input formats and phrase resolution."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from conftest import REPO, tiny_cfg
from fiber_det.data.phrases import caption_phrases, find_noun_phrases, phrase_spans, split_caption_phrases
from fiber_det.data.prompt import PromptBuilder
from fiber_det.predictor import FIBERPredictor, ImageResult

# threshold 0: random weights score ~0.01 per token, so the default 0.05 would find nothing;
# 64 x 96 test images keep the CPU time low
OPTS = dict(MODEL__FIBER__ATSS__INFERENCE_TH=0.0, MODEL__FIBER__ATSS__PRE_NMS_TOP_N=50,
            INPUT__MIN_SIZE_TEST=64, INPUT__MAX_SIZE_TEST=96)
COFFEE = data.coffee()  # (400, 600, 3) RGB: resized to 64 x 96
CHELSEA = data.chelsea()  # (300, 451, 3) RGB: also 64 x 96, so batching adds no padding
CUP = {"caption": "a cup of coffee on a saucer", "phrases": ["a cup", "coffee", "a saucer"]}
pytestmark = pytest.mark.usefixtures("single_thread")


def make_predictor(seed=0, **overrides):
    torch.manual_seed(seed)
    return FIBERPredictor(tiny_cfg(**{**OPTS, **overrides}))


@pytest.fixture(scope="module")
def predictor():
    return make_predictor()


@pytest.fixture(scope="module")
def coffee_cup(predictor):
    """The reference result: COFFEE with the CUP phrases, alone, RGB numpy input."""
    return predictor(COFFEE, CUP, input_format="RGB")


def assert_same_detections(a: ImageResult, b: ImageResult, atol=1e-3):
    assert a.error is None and b.error is None, (a.error, b.error)
    assert len(a.detections) == len(b.detections) > 0
    assert [d.label for d in a.detections] == [d.label for d in b.detections]
    assert [(d.phrase, d.span) for d in a.detections] == [(d.phrase, d.span) for d in b.detections]
    torch.testing.assert_close(torch.tensor([d.box for d in a.detections]), torch.tensor([d.box for d in b.detections]),
                               atol=atol, rtol=0)
    torch.testing.assert_close(torch.tensor([d.score for d in a.detections]),
                               torch.tensor([d.score for d in b.detections]), atol=1e-5, rtol=0)


def test_batched_equals_one_by_one(predictor):
    images = [COFFEE, CHELSEA, np.ascontiguousarray(COFFEE[:, ::-1])]
    prompts = [CUP, ["cat", "dog", "sofa"], {"caption": "a cat, a dog and a bird"}]
    batched = predictor(images, prompts, input_format="RGB", batch_size=3)
    single = [predictor(im, p, input_format="RGB", batch_size=1) for im, p in zip(images, prompts)]
    for b, s in zip(batched, single):
        assert_same_detections(b, s)
    assert batched[0].caption == CUP["caption"] and batched[1].caption is None
    d = batched[0].detections[0]
    assert (batched[0].height, batched[0].width) == (400, 600)
    assert 0 <= d.box[0] <= d.box[2] <= 600 and 0 <= d.box[1] <= d.box[3] <= 400
    assert {x.phrase for x in batched[1].detections} <= {"cat", "dog", "sofa"}
    assert all(x.span is None for x in batched[1].detections)
    assert batched[0].instances is not None and len(batched[0].instances) == len(batched[0].detections)


@pytest.fixture(scope="module")
def long_text_predictor():
    """256-token prompts on 64 x 96 images: the 1,203-name vocabulary runs as 22 chunks."""
    return make_predictor(MODEL__FIBER__TEXT__MAX_QUERY_LEN=256, TEST__PROMPTS_PER_BATCH=32,
                          TEST__DETECTIONS_PER_IMAGE=0, MODEL__FIBER__ATSS__PRE_NMS_TOP_N=5)


def test_1203_names_are_chunked_and_every_chunk_contributes(long_text_predictor):
    p = long_text_predictor
    names = [f"thing {i}" for i in range(1, 1204)]
    chunks = p.prompt_builder.chunks(names)
    assert len(chunks) > 10
    result = p(COFFEE, names, input_format="RGB")
    assert result.error is None
    labels = {d.label for d in result.detections}
    for k, chunk in enumerate(chunks):
        assert labels & set(chunk.labels), f"chunk {k} has no detection"
    assert all(d.phrase == names[d.label - 1] for d in result.detections)
    scores = [d.score for d in result.detections]
    assert scores == sorted(scores, reverse=True)


def test_chunk_merge_caps_at_detections_per_image(long_text_predictor):
    p = long_text_predictor
    names = [f"thing {i}" for i in range(1, 201)]
    assert len(p.prompt_builder.chunks(names)) >= 2
    full = p(CHELSEA, names, input_format="RGB")
    assert len(full.detections) > 20
    capping = copy.copy(p)  # the shared fixture stays as it is
    capping.detections_per_image = 20
    capped = capping(CHELSEA, names, input_format="RGB")
    assert len(capped.detections) == 20
    assert [d.score for d in capped.detections] == [d.score for d in full.detections[:20]]


def test_bad_images_and_prompts_fail_alone(predictor, coffee_cup, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    missing = str(tmp_path / "missing.jpg")
    images = [COFFEE, missing, str(broken), COFFEE, COFFEE, COFFEE]
    prompts = [CUP, CUP, CUP, {"caption": "  "}, {"caption": "a cup of coffee", "phrases": ["a cup", "tea"]}, CUP]
    results = predictor(images, prompts, input_format="RGB", batch_size=6)
    errors = [r.error for r in results]
    assert errors[0] is None and errors[5] is None
    assert errors[1].startswith(missing) and "cannot read the image" in errors[1]
    assert errors[2].startswith(str(broken)) and "cannot read the image" in errors[2]
    assert errors[3].startswith("image 3:") and "empty" in errors[3]
    assert errors[4].startswith("image 4:") and "phrase 1 ('tea') is not in the caption" in errors[4]
    assert all(not r.detections for r in results[1:5])
    assert_same_detections(results[0], coffee_cup)
    assert_same_detections(results[5], coffee_cup)


def test_model_side_error_fails_only_that_image(predictor, monkeypatch):
    original = predictor.model.postprocess

    def postprocess(outputs, anchors, image_sizes, inputs, prompts):
        if any(p.caption == "boom" for p in prompts):
            raise ValueError("rejected by the model")
        return original(outputs, anchors, image_sizes, inputs, prompts)

    monkeypatch.setattr(predictor.model, "postprocess", postprocess)
    results = predictor([COFFEE, CHELSEA], [{"caption": "boom"}, CUP], input_format="RGB", batch_size=2)
    assert results[0].error == "image 0: rejected by the model"
    assert results[1].error is None and results[1].detections


def test_rgb_bgr_pil_and_path_inputs_agree(predictor, coffee_cup, tmp_path):
    path = tmp_path / "coffee.png"
    Image.fromarray(COFFEE).save(path)
    rgb = coffee_cup
    bgr = predictor(np.ascontiguousarray(COFFEE[:, :, ::-1]), CUP, input_format="BGR")
    pil = predictor(Image.fromarray(COFFEE), CUP)
    from_path = predictor(str(path), CUP)
    for other in (bgr, pil, from_path):
        assert [d.box for d in other.detections] == [d.box for d in rgb.detections]
        assert [(d.score, d.label) for d in other.detections] == [(d.score, d.label) for d in rgb.detections]
    assert predictor(COFFEE, CUP, input_format="BGR").detections != rgb.detections  # channel order matters
    with pytest.raises(ValueError, match="input_format"):
        predictor(COFFEE, CUP, input_format="GBR")


def test_substrings_resolve_to_their_first_occurrence(predictor):
    caption = "a cat and a cat toy"
    assert phrase_spans(caption, ["a cat", [10, 15], "toy"]) == [(0, 5), (10, 15), (16, 19)]
    result = predictor(CHELSEA, {"caption": caption, "phrases": ["a cat", [10, 15], "toy"]}, input_format="RGB")
    spans = {d.label: (d.phrase, d.span) for d in result.detections}
    assert spans == {1: ("a cat", [0, 5]), 2: ("a cat", [10, 15]), 3: ("toy", [16, 19])}
    with pytest.raises(ValueError, match="outside the caption"):
        phrase_spans(caption, [[10, 40]])
    with pytest.raises(TypeError, match="phrase 0"):
        phrase_spans(caption, [[1.0, 3.0]])


def test_free_text_is_split_into_phrases(predictor):
    caption = "a cat, a dog and a bird."
    assert split_caption_phrases(caption) == [(0, 23), (0, 5), (7, 12), (17, 23)]
    assert caption_phrases(caption, use_tagger=False) == split_caption_phrases(caption)
    result = predictor(CHELSEA, caption, input_format="RGB")
    expected = {k + 1: [s, e] for k, (s, e) in enumerate(caption_phrases(caption))}
    assert result.detections and {d.label: d.span for d in result.detections}.items() <= expected.items()
    assert all(d.phrase == caption[d.span[0]:d.span[1]] for d in result.detections)
    with pytest.raises(ValueError, match="empty"):
        caption_phrases(" ")


def test_tagger_noun_phrases():
    pytest.importorskip("textblob")
    caption = "a black cat sitting on a red mat, and two dogs playing in the park."
    found = [caption[s:e] for s, e in find_noun_phrases(caption)]
    assert found == ["a black cat", "a red mat", "two dogs", "the park"]
    assert caption_phrases("He runs.", use_tagger=True) == [(0, 7)]  # no noun: the split fallback


def test_prompt_forms(predictor):
    single = predictor(COFFEE, ["cup", "saucer"], input_format="RGB")
    assert isinstance(single, ImageResult) and single.error is None
    record = json.loads(json.dumps(single.to_dict()))
    assert record["detections"][0]["box"] == single.detections[0].box and record["error"] is None
    shared = predictor([COFFEE, CHELSEA], ["cup", "saucer"], input_format="RGB")
    assert len(shared) == 2 and all(r.error is None for r in shared)
    assert shared[0].detections == single.detections
    with pytest.raises(ValueError, match="2 per-image prompts for 3 image"):
        predictor([COFFEE] * 3, [CUP, ["cup"]])
    assert "unknown prompt key" in predictor(COFFEE, {"caption": "a cup", "phrase": ["a cup"]}).error
    assert "category 1" in predictor(COFFEE, [["cup", ""]]).error


def test_a_prompt_object_is_used_as_it_is(predictor, coffee_cup):
    """What the web demo or a cache hands over: a Prompt made with the predictor's builder."""
    spans = {k + 1: [s] for k, s in enumerate(phrase_spans(CUP["caption"], CUP["phrases"]))}
    prompt = predictor.prompt_builder.build(CUP["caption"], spans)
    assert_same_detections(predictor(COFFEE, prompt, input_format="RGB"), coffee_cup)
    per_image = predictor([COFFEE, CHELSEA], [prompt, ["cat"]], input_format="RGB")
    assert_same_detections(per_image[0], coffee_cup)
    assert {d.phrase for d in per_image[1].detections} == {"cat"}
    too_long = PromptBuilder(predictor.tokenizer, max_length=256).build("a cup " * 40, {1: [[2, 5]]})
    error = predictor(COFFEE, too_long, input_format="RGB").error
    assert error.startswith("image 0: prompt 0 has 83 tokens but the model reads 64")


def test_from_checkpoint_loads_the_weights(predictor, coffee_cup, tmp_path):
    weights = tmp_path / "tiny.pth"
    torch.save({"model": predictor.model.state_dict()}, weights)
    opts = [x for k, v in OPTS.items() for x in (k.replace("__", "."), str(v))]
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = FIBERPredictor.from_checkpoint(REPO / "configs/quick_schedules/FIBER-tiny.yaml", str(weights), opts, "cpu")
    a, b = loaded(COFFEE, CUP, input_format="RGB"), coffee_cup
    assert [d.box for d in a.detections] == [d.box for d in b.detections]


def test_bfloat16_autocast_on_cpu(predictor, coffee_cup):
    reference = coffee_cup
    bf16 = copy.copy(predictor)  # the shared fixture stays fp32
    bf16.amp_dtype = torch.bfloat16
    result = bf16(COFFEE, CUP, input_format="RGB")
    assert result.error is None and result.detections
    boxes = torch.tensor([d.box for d in result.detections])
    assert boxes.dtype == torch.float32 and torch.isfinite(boxes).all()
    assert {d.label for d in result.detections} <= {1, 2, 3}
    assert abs(result.detections[0].score - reference.detections[0].score) < 0.02
    with pytest.raises(ValueError, match="amp_dtype"):
        FIBERPredictor(tiny_cfg(), amp_dtype=torch.float64)


def test_default_device_is_the_cpu_without_cuda(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("INFO", logger="fiber_det"):
        predictor = make_predictor(MODEL__DEVICE="cuda")  # Detectron2's default
    assert predictor.model.device.type == "cpu" and predictor.cfg.MODEL.DEVICE == "cpu"
    assert "CUDA is not available: running on the CPU" in caplog.text and "FIBERPredictor runs on cpu" in caplog.text


def test_a_long_caption_gives_fiber_dets_message_only(predictor, capfd, caplog, monkeypatch):
    import collections

    from detectron2.utils import logger as d2_logger

    monkeypatch.setattr(d2_logger, "_LOG_COUNTER", collections.Counter())  # log_first_n starts afresh
    caption = "a cup of coffee " + "and a very long description " * 180  # ~5,000 characters
    assert len(caption) > 5000
    results = predictor([COFFEE, CHELSEA], {"caption": caption}, input_format="RGB")
    errors = [r.error for r in results]
    # the free-text phrases include the whole caption, which runs past the 64-token cut
    assert all(e is not None and "lies past the first 63 tokens" in e and len(e) < 300 for e in errors), errors
    with caplog.at_level("WARNING"):
        ok = predictor(COFFEE, {"caption": caption, "phrases": ["a cup", "coffee"]}, input_format="RGB")
        predictor(COFFEE, {"caption": caption, "phrases": ["a cup"]}, input_format="RGB")
    assert ok.error is None
    assert "Token indices sequence length" not in capfd.readouterr().err + caplog.text  # transformers' warning
    assert caplog.text.count("tokens is cut to its first 64 (MODEL.FIBER.TEXT.MAX_QUERY_LEN)") == 1  # once


def test_an_extreme_aspect_ratio_image_is_answered(predictor):
    result = predictor(np.zeros((20, 10000, 3), np.uint8), ["cat"])
    assert result.error is None and (result.height, result.width) == (20, 10000)
    for box in (d.box for d in result.detections):
        assert 0 <= box[0] <= box[2] <= 10000 and 0 <= box[1] <= box[3] <= 20
