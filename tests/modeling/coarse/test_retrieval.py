"""Retrieval scores: ITC matrix, exhaustive ITM, ITC top-k re-ranking."""
import pytest
import torch

from coarse_inputs import coarse_model, pair_inputs


@pytest.fixture(scope="module")
def setup():
    model = coarse_model(seed=1).eval()
    batch = pair_inputs(model)
    return model, batch, batch[::-1][:2]  # 3 images, 2 captions


def test_itc_matrix_is_the_product_of_embeddings_computed_once_per_item(setup):
    model, images, captions = setup
    scores = model.itc_score_matrix(images, captions, batch_size=2)
    assert scores.shape == (3, 2)
    with torch.no_grad():
        per_input = model(images)
    v = torch.stack([x["image_embedding"] for x in per_input])
    t = torch.stack([x["text_embedding"] for x in per_input])[[2, 1]]
    torch.testing.assert_close(scores, v @ t.T, atol=1e-6, rtol=1e-5)


def test_exhaustive_itm_scores_every_pair_and_ignores_batching(setup):
    model, images, captions = setup
    a = model.itm_score_matrix(images, captions, pairs_per_batch=4)
    b = model.itm_score_matrix(images, captions, pairs_per_batch=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        pixels = model.preprocess_images([images[2]])
        ids, mask = model.text_inputs([captions[1]])
        one = model.itm_scores(pixels, ids, mask)
        logits = model.itm_score(model.fused_features(pixels, ids, mask)["cls_feats"])
    torch.testing.assert_close(a[2, 1], one[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, logits[:, 1], atol=1e-6, rtol=1e-6)  # the "match" logit


def test_topk_rerank_scores_only_the_itc_top_k(setup):
    model, images, captions = setup
    itc = model.itc_score_matrix(images, captions)
    full = model.itm_score_matrix(images, captions)
    i2t, t2i = model.itm_rerank(images, captions, itc, k=1)
    top_t, top_i = itc.argmax(dim=1), itc.argmax(dim=0)
    for i in range(3):
        assert torch.isfinite(i2t[i]).sum() == 1 and torch.isfinite(i2t[i, top_t[i]])
        torch.testing.assert_close(i2t[i, top_t[i]], full[i, top_t[i]], atol=1e-5, rtol=1e-5)
    for j in range(2):
        assert torch.isfinite(t2i[:, j]).sum() == 1
        torch.testing.assert_close(t2i[top_i[j], j], full[top_i[j], j], atol=1e-5, rtol=1e-5)
    i2t, t2i = model.itm_rerank(images, captions, itc, k=5)  # k beyond the set sizes: exhaustive
    torch.testing.assert_close(i2t, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t2i, full, atol=1e-5, rtol=1e-5)
