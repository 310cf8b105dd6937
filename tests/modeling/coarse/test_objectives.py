"""ITC loss and logits, hard-negative weights and draws (against the dev fixture's stored RNG
state), ITM pairs, MLM masking."""
import pytest
import torch

from conftest import FIXTURES
from fiber_det.data.tokenization import build_tokenizer
from fiber_det.modeling.coarse.objectives import (
    MLMMasker, hard_negative_weights, itc_logits, itc_loss, itm_pairs, sample_hard_negatives,
)

COARSE_DEV = FIXTURES / "fiber_coarse_ref_dev.pt"


@pytest.fixture(scope="module")
def train_record():
    """The dev fixture's ITC / sampling record (read-only)."""
    assert COARSE_DEV.is_file(), f"golden fixture missing: {COARSE_DEV}"
    fx = torch.load(COARSE_DEV, map_location="cpu", weights_only=True)
    return {k: fx["outputs_train"][k] for k in ("itc", "negative_sampling", "rng")}, fx["state_dict"]


def test_itc_logits_and_loss_reproduce_the_fixture(train_record):
    rec, sd = train_record
    itc = rec["itc"]
    v, t = itc["image_feat"], itc["text_feat"]
    sim_i2t, sim_t2i = itc_logits(v, t, sd["image_queue"], sd["text_queue"], itc["temp_after_clamp"])
    torch.testing.assert_close(sim_i2t, itc["sim_i2t"], atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(sim_t2i, itc["sim_t2i"], atol=5e-5, rtol=1e-5)
    loss, loss_i2t, loss_t2i = itc_loss(sim_i2t, sim_t2i)
    torch.testing.assert_close(loss, itc["loss_itc"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss_i2t, itc["loss_i2t"], atol=2e-5, rtol=1e-5)


def test_keys_are_detached():
    v = torch.nn.functional.normalize(torch.randn(2, 4), dim=1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(2, 4), dim=1).requires_grad_()
    sim_i2t, _ = itc_logits(v, t, torch.randn(4, 3), torch.randn(4, 3), torch.tensor(0.07))
    sim_i2t.sum().backward()
    assert v.grad is not None and t.grad is None  # image->text reaches only the image side


def test_weights_and_draws_from_the_stored_rng_state(train_record):
    rec, sd = train_record
    itc, ns = rec["itc"], rec["negative_sampling"]
    n = int(sd["queue_total"])
    w_i2t, w_t2i = hard_negative_weights(itc["sim_i2t"], n), hard_negative_weights(itc["sim_t2i"], n)
    b = w_i2t.shape[0]
    assert w_i2t.shape == (b, b + n) and torch.all(torch.diagonal(w_i2t) == 0)
    torch.testing.assert_close(w_t2i, itc["weights_t2i"], atol=5e-6, rtol=1e-4)
    state = torch.get_rng_state()
    try:
        torch.set_rng_state(rec["rng"]["torch_rng_state_at_training_step"])
        image_neg, text_neg = sample_hard_negatives(w_t2i, w_i2t)
        torch.manual_seed(rec["rng"]["sampling_seed"] + 1)
        other = torch.cat(sample_hard_negatives(w_t2i, w_i2t))
    finally:
        torch.set_rng_state(state)
    assert torch.cat([image_neg, text_neg]).tolist() == ns["sampled_candidate_index_sequence"].tolist()
    assert other.tolist() != ns["sampled_candidate_index_sequence"].tolist()  # the state decides


def test_itm_pairs_layout():
    images = torch.arange(2.0).view(2, 1, 1, 1)
    ids, mask = torch.tensor([[1], [2]]), torch.ones(2, 1, dtype=torch.long)
    imgs, pair_ids, _, labels = itm_pairs(images, ids, mask, images + 10, ids + 10, mask)
    assert imgs.flatten().tolist() == [0, 1, 0, 1, 10, 11]
    assert pair_ids.flatten().tolist() == [1, 2, 11, 12, 1, 2]
    assert labels.tolist() == [1, 1, 0, 0, 0, 0]


def test_mlm_masking_follows_the_collator_rule():
    tok = build_tokenizer("tests/assets/gpt2_bpe")
    masker = MLMMasker(tok, 0.15)
    enc = tok(["a tabby cat with green eyes on a red mat"] * 4000, padding="max_length", max_length=16,
              return_special_tokens_mask=True, return_tensors="pt")
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    torch.manual_seed(0)
    masked, labels = masker(ids, special)
    selected = labels != -100
    assert not (selected & special.bool()).any()  # <s>, </s> and pads are never selected
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    rate = selected.sum() / (~special.bool()).sum()
    to_mask = (masked[selected] == tok.mask_token_id).float().mean()
    kept = (masked[selected] == ids[selected]).float().mean()
    assert abs(float(rate) - 0.15) < 0.01 and abs(float(to_mask) - 0.8) < 0.02 and abs(float(kept) - 0.1) < 0.02
    torch.manual_seed(0)
    again, _ = masker(ids, special)
    assert torch.equal(again, masked)  # the global generator decides


def test_itm_random_pairs_half_matched_with_the_false_images_elsewhere():
    from fiber_det.modeling.coarse.objectives import itm_random_pairs

    images, false_images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2), -torch.ones(5, 3, 2, 2)
    torch.manual_seed(0)
    expected_order = torch.randperm(5)
    torch.manual_seed(0)
    imgs, labels = itm_random_pairs(images, false_images)
    # floor(5/2) = 2 matched pairs, shuffled by torch.randperm as the official code does
    assert torch.equal(labels, torch.tensor([1, 1, 0, 0, 0])[expected_order]) and labels.dtype == torch.int64
    for b in range(5):
        assert torch.equal(imgs[b], images[b] if labels[b] == 1 else false_images[b])
