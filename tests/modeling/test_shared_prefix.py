"""Shared-prefix inference (TEST.SHARED_PREFIX) against the sequential path, on real photos with a
vocabulary in several chunks; the text-prefix cache; the fused-part entry point on the golden
fixture.

The sequential reference runs each image alone (a call with one image): the shared path always
runs every image at its own padded size, while a sequential call with several images pads them to
a common size, which changes the Swin windows near the borders.
"""
import pytest
import torch
from model_inputs import builder, photo

from conftest import tiny_model
from fiber_det.checkpoint.parity import compare_tensors, tolerance_for
from fiber_det.modeling.backbone.fusion import TextState
from fiber_det.modeling.backbone.swin import SwinState
from fiber_det.modeling.shared_prefix import _fused_batches
from fiber_det.utils.detections import compare_detections

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["cat", "dog", "person", "traffic_light", "kite", "cup", "saucer", "spoon", "astronaut", "flag",
         "helmet", "glove"]


@pytest.fixture(scope="module")
def models():
    """(sequential, shared) tiny models with the same weights; threshold 0 keeps many detections.
    Read-only: the tests never change them (the cache test builds its own)."""
    sequential = tiny_model(0, MODEL__FIBER__ATSS__INFERENCE_TH=0.0, TEST__PROMPTS_PER_BATCH=3,
                            TEST__SHARED_PREFIX=False).eval()
    shared = tiny_model(1, MODEL__FIBER__ATSS__INFERENCE_TH=0.0, TEST__PROMPTS_PER_BATCH=3,
                        TEST__SHARED_PREFIX=True).eval()
    shared.load_state_dict(sequential.state_dict())
    return sequential, shared


def _inputs():
    """Three photos: two that pad to the same 128x192 (they share fused batches) and one 128x128;
    4 prompt chunks each."""
    chunks = builder().chunks(NAMES, 3)
    assert len(chunks) == 4
    return [{"image": photo(name, size), "prompts": chunks}
            for name, size in (("chelsea", (128, 190)), ("coffee", (120, 180)), ("astronaut", (128, 128)))]


def test_shared_prefix_equals_sequential_per_image(models):
    sequential, shared = models
    inputs = _inputs()
    with torch.no_grad():
        expected = [sequential([x])[0]["instances"] for x in inputs]
        actual = [out["instances"] for out in shared(inputs)]
    for i, (a, e) in enumerate(zip(actual, expected)):
        diff = compare_detections(a, e)
        print(f"image {i}: {len(a)} vs {len(e)} detections, {diff}")
        assert len(e) >= 4 * 100 and diff.equal  # 100 per chunk (TEST.DETECTIONS_PER_IMAGE), all kept
        assert set(e.pred_labels.tolist()) <= set(range(1, len(NAMES) + 1))


def test_text_prefix_cache_is_reused_and_dropped_when_weights_change(models, monkeypatch):
    sequential, _ = models
    model = tiny_model(1, MODEL__FIBER__ATSS__INFERENCE_TH=0.0, TEST__PROMPTS_PER_BATCH=3, TEST__SHARED_PREFIX=True)
    model.load_state_dict(sequential.state_dict())
    model.eval()
    bottom_up = model.backbone.bottom_up
    calls = []
    original = bottom_up.text_prefix
    monkeypatch.setattr(bottom_up, "text_prefix", lambda ids, mask: calls.append(len(ids)) or original(ids, mask))
    first, second, _ = _inputs()
    with torch.no_grad():
        model([first])
        assert calls == [3, 1] and len(model.text_prefix_cache) == 4  # 4 chunks, 3 per forward
        model([second])
        assert calls == [3, 1]  # every chunk's text prefix came from the cache
        torch.nn.init.normal_(bottom_up.text.embeddings.word_embeddings.weight, std=0.05)  # new weights, in place
        out = model([second])[0]["instances"]
        assert calls == [3, 1, 3, 1]  # recomputed, not the stale prefixes
        model.shared_prefix = False  # the sequential path of the changed model
        expected = model([second])[0]["instances"]
    assert compare_detections(out, expected).equal
    model.train()
    assert len(model.text_prefix_cache) == 0  # emptied when training starts


def test_fused_batches_keep_pair_order_and_group_one_padded_shape():
    pairs = [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b"), (2, "c")]
    shapes = [(128, 192), (128, 192), (128, 128)]
    assert _fused_batches(pairs, shapes, 3) == [[(0, "a"), (0, "b"), (1, "a")], [(1, "b")],
                                                [(2, "a"), (2, "b"), (2, "c")]]


def test_run_fused_on_prefixes_reproduces_the_official_head_outputs(fixture_v2, fixture_model):
    """The fused part from an image prefix and a text prefix (each computed alone, then batched
    as the shared path does) gives the fixture's head outputs."""
    inp, head = fixture_v2["inputs"], fixture_v2["outputs_eval"]["head"]
    bottom_up = fixture_model.backbone.bottom_up
    with torch.no_grad():
        image = bottom_up.image_prefix(inp["images"])
        text = bottom_up.text_prefix(inp["input_ids"], inp["attention_mask"])
        outputs, _ = fixture_model.run_fused(SwinState.cat([image, image]), TextState.cat([text, text]))
    num_tokens = fixture_v2["outputs_eval"]["stored_token_slots"]
    results = []
    for level in range(5):
        for ours, theirs, key in ((outputs["box_deltas"][level], head["bbox_reg"][level], "bbox_reg"),
                                  (outputs["centerness"][level], head["centerness"][level], "centerness"),
                                  (outputs["token_logits"][level][..., :num_tokens], head["dot_product_logits"][level],
                                   "dot_product_logits")):
            name = f"outputs_eval/head/{key}[{level}]"
            for row in (0, 1):
                results.append(compare_tensors(name, ours[row:row + 1], theirs, *tolerance_for(fixture_v2, name)))
    failed = [r.line() for r in results if not r.ok]
    assert len(results) == 30 and not failed, "\n".join(failed)
