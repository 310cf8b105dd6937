"""Inputs with several prompts (vocabulary chunks): one forward per (image, prompt) pair, merged."""
import pytest
import torch

from conftest import tiny_model
from fiber_det.data.prompts import chunk_category_prompts


@pytest.fixture(scope="module")
def model():
    m = tiny_model()
    m.eval()
    m.score_threshold = 0.0  # keep plenty of detections so the merge is exercised
    return m


def test_chunked_prompts_equal_separate_runs(model):
    img = torch.randint(0, 255, (3, 100, 130), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    chunks = chunk_category_prompts(["cat", "dog", "person", "traffic_light", "kite"], model.tokenizer, 2)
    assert len(chunks) == 3
    model.prompts_per_batch = 2  # pairs split across forwards and across the two images
    with torch.no_grad():
        out = model([{"image": img, "prompts": chunks}, {"image": img, "prompts": chunks[:1]}])
        ref = [model([{"image": img, **c}])[0]["instances"] for c in chunks]
    merged = out[0]["instances"]
    assert set(merged.pred_labels.tolist()) == {1, 2, 3, 4, 5}
    expected = torch.cat([r.scores for r in ref]).sort(descending=True).values
    assert len(merged) == len(expected)
    torch.testing.assert_close(merged.scores, expected, atol=1e-6, rtol=0)
    assert torch.all(merged.scores[:-1] >= merged.scores[1:])
    names = {1: "cat", 2: "dog", 3: "person", 4: "traffic_light", 5: "kite"}
    assert merged.pred_phrases == [names[int(lab)] for lab in merged.pred_labels]
    assert set(out[1]["instances"].pred_labels.tolist()) <= {1, 2}


def test_empty_prompt_list_is_an_error(model):
    img = torch.zeros((3, 64, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="'prompts' is empty"):
        model([{"image": img, "prompts": []}])
