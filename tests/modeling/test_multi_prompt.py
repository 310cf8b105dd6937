"""Inputs with several prompts (vocabulary chunks): one forward per (image, prompt) pair, merged."""
import pytest
import torch
from model_inputs import builder

from conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    """Read-only: configured through overrides, never changed by the tests."""
    # threshold 0 keeps plenty of detections so the merge is exercised; 2 pairs per forward split
    # the pairs across forwards and across the two images
    return tiny_model(MODEL__FIBER__ATSS__INFERENCE_TH=0.0, TEST__PROMPTS_PER_BATCH=2).eval()


def test_chunked_prompts_equal_separate_runs(model):
    img = torch.randint(0, 255, (3, 100, 130), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    chunks = builder().chunks(["cat", "dog", "person", "traffic_light", "kite"], 2)
    assert len(chunks) == 3
    with torch.no_grad():
        out = model([{"image": img, "prompts": chunks}, {"image": img, "prompts": chunks[:1]}])
        ref = [model([{"image": img, "prompts": (c,)}])[0]["instances"] for c in chunks]
        capped = model.inference([{"image": img, "prompts": chunks}], max_merged_detections=7)[0]["instances"]
    merged = out[0]["instances"]
    assert set(merged.pred_labels.tolist()) == {1, 2, 3, 4, 5}
    expected = torch.cat([r.scores for r in ref]).sort(descending=True).values
    assert len(merged) == len(expected) == sum(len(r) for r in ref)  # every chunk keeps its own detections
    torch.testing.assert_close(merged.scores, expected, atol=1e-6, rtol=0)
    assert torch.all(merged.scores[:-1] >= merged.scores[1:])
    assert set(out[1]["instances"].pred_labels.tolist()) <= {1, 2}
    assert len(capped) == 7 and torch.equal(capped.scores, merged.scores[:7])


def test_empty_prompt_list_is_an_error(model):
    img = torch.zeros((3, 64, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="'prompts' is empty"):
        model([{"image": img, "prompts": []}])
