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


def _halves(batch):
    """Retrieval evaluation items: one image item and one text item per pair."""
    images = [{"modality": "image", "image": x["image"], "image_index": x["image_index"], "image_id": str(i)}
              for i, x in enumerate(batch)]
    texts = [{"modality": "text", "input_ids": x["input_ids"], "attention_mask": x["attention_mask"],
              "image_index": x["image_index"], "caption_index": x["caption_index"], "image_id": str(i)}
             for i, x in enumerate(batch)]
    return images, texts


def test_evaluation_items_carry_one_half(setup):
    model, batch, _ = setup
    images, texts = _halves(batch)
    out = model(images[:1] + texts)
    assert set(out[0]) == {"image_embedding"} and all(set(o) == {"text_embedding"} for o in out[1:])
    full = model(batch)
    torch.testing.assert_close(out[0]["image_embedding"], full[0]["image_embedding"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[2]["text_embedding"], full[1]["text_embedding"], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"inputs \[0\] have neither"):
        model([{"image_index": 0}])


def test_score_pairs_feeds_the_retrieval_evaluator(setup):
    from fiber_det.evaluation.retrieval import ItmScorer, RetrievalEvaluator

    model, batch, _ = setup
    model.train()  # score_pairs runs in eval mode whatever the model's mode, and restores it
    row = model.score_pairs(batch[0], batch)
    assert model.training and row.shape == (3,)
    model.eval()
    full = model.itm_score_matrix(batch, batch)
    torch.testing.assert_close(row, full[0], atol=1e-5, rtol=1e-5)
    images, texts = _halves(batch)
    scorer = ItmScorer(images + texts, mapper=lambda item: item, score_pairs=model.score_pairs, batch_size=2)
    evaluator = RetrievalEvaluator("coarse_pairs", distributed=False, itm_mode="exhaustive", itm_scorer=scorer)
    evaluator.reset()
    evaluator.process(images + texts, model(images + texts))
    results = evaluator.evaluate()["retrieval"]
    assert {"i2t_R@1", "t2i_R@1", "itm_i2t_R@1", "itm_t2i_R@10"} <= set(results)
    torch.testing.assert_close(scorer([0, 1, 2], [0, 1, 2]), full, atol=1e-5, rtol=1e-5)
