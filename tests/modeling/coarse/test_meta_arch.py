"""FiberCoarsePretrain on the tiny config: shapes, losses and their switches, gradients, the
normalisation, padding invariance, input errors."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from coarse_inputs import caption_input, coarse_cfg, coarse_model, pair_inputs, square_photo
from detectron2.modeling import build_model


def test_training_returns_the_three_losses_and_every_parameter_learns():
    model = coarse_model().train()
    losses = model(pair_inputs(model))
    print({k: round(v.item(), 6) for k, v in losses.items()})
    assert list(losses) == ["loss_mlm", "loss_itc", "loss_itm"]  # the official order of the sum
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert int(model.queue.queue_ptr) == 3 and int(model.queue.queue_total) == 3


def test_eval_returns_unit_norm_itc_embeddings():
    model = coarse_model().eval()
    out = model(pair_inputs(model, 2))
    assert len(out) == 2 and set(out[0]) == {"image_embedding", "text_embedding"}
    for x in out:
        for v in x.values():
            assert v.shape == (32,)
            assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    assert int(model.queue.queue_total) == 0  # evaluation never enqueues


def test_shapes_of_the_three_paths():
    model = coarse_model().eval()
    batch = pair_inputs(model, 2)
    images = model.preprocess_images(batch)
    ids, mask = model.text_inputs(batch)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert ids.shape == mask.shape == (2, 16)
    with torch.no_grad():
        fused = model.fused_features(images, ids, mask)
        tokens = model.backbone.encode_image(images)
    assert fused["text_feats"].shape == (2, 16, 32)
    assert fused["image_feats"].shape == (2, 4, 32)  # (64 / 32)² last-stage tokens
    assert fused["cls_feats"].shape == (2, 64)
    assert (tokens.height, tokens.width, tokens.tokens.shape) == (2, 2, (2, 4, 256))


@pytest.mark.parametrize("itc,itm,mlm", [(True, True, True), (True, False, True), (True, True, False),
                                         (False, False, True), (True, False, False)])
def test_objective_switches(itc, itm, mlm):
    model = coarse_model(MODEL__FIBER__COARSE__ITC_ON=itc, MODEL__FIBER__COARSE__ITM_ON=itm,
                         MODEL__FIBER__COARSE__MLM_ON=mlm).train()
    losses = model(pair_inputs(model, 2))
    expected = [k for k, on in (("loss_mlm", mlm), ("loss_itc", itc), ("loss_itm", itm)) if on]
    assert list(losses) == expected
    keys = set(model.state_dict())
    assert ("temp" in keys) == itc and hasattr(model, "queue") == itc
    assert any(k.startswith("mlm_score.") for k in keys) == mlm
    assert any(k.startswith("itm_score.") for k in keys) == itm
    if itc:
        assert hasattr(model.queue, "image_input_queue") == itm  # inputs are kept for ITM only


def test_itm_without_itc_scores_pairs():
    # the official ITM retrieval fine-tunes have no ITC queue; their ITM head scores pairs
    model = coarse_model(MODEL__FIBER__COARSE__ITC_ON=False)
    assert not hasattr(model, "queue") and "temp" not in model.state_dict()
    batch = pair_inputs(model, 2)
    assert model.eval().itm_score_matrix(batch, batch).shape == (2, 2)


def test_window_must_be_image_size_over_32():
    with pytest.raises(ValueError, match="IMAGE_SIZE / 32 = 3"):
        coarse_model(MODEL__FIBER__COARSE__IMAGE_SIZE=96)
    model = coarse_model(MODEL__FIBER__COARSE__IMAGE_SIZE=96, MODEL__FIBER__SWIN__WINDOW_SIZE=3)
    table = model.backbone.vision.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape[0] == 5 ** 2


def test_pixel_statistics_in_0_255_units_are_refused():
    cfg = coarse_cfg()
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    with pytest.raises(ValueError, match="0-1 units"):
        build_model(cfg)


def test_normalisation_is_bit_identical_to_torchvision():
    model = coarse_model()
    rgb = np.asarray(Image.fromarray(square_photo("coffee", 64).permute(1, 2, 0).numpy()))
    official = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ref = official(Image.fromarray(rgb))
    ours = model.preprocess_images([{"image": torch.from_numpy(rgb.copy()).permute(2, 0, 1)}])[0]
    assert torch.equal(ours, ref)


def test_padding_does_not_change_the_itc_text_feature():
    model = coarse_model().eval()
    caption = "a tabby cat with green eyes"
    padded = caption_input(model.tokenizer, caption, 16)
    n = int(padded["attention_mask"].sum())
    short = caption_input(model.tokenizer, caption, n)
    assert int(short["attention_mask"].sum()) == n == short["input_ids"].shape[0]
    with torch.no_grad():
        a = model.text_features(padded["input_ids"][None], padded["attention_mask"][None])
        b = model.text_features(short["input_ids"][None], short["attention_mask"][None])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_output_norms_switch_changes_only_the_fused_path():
    plain, normed = coarse_model(), coarse_model(MODEL__FIBER__COARSE__FUSED_OUTPUT_NORMS=True)
    normed.load_state_dict(plain.state_dict())
    batch = pair_inputs(plain, 2)
    images = plain.preprocess_images(batch)
    ids, mask = plain.text_inputs(batch)
    with torch.no_grad():
        assert torch.equal(plain.image_features(images), normed.image_features(images))
        assert not torch.allclose(plain.fused_features(images, ids, mask)["cls_feats"],
                                  normed.fused_features(images, ids, mask)["cls_feats"])


def test_bad_inputs_are_named():
    model = coarse_model()
    batch = pair_inputs(model, 2)
    with pytest.raises(ValueError, match=r"input 1: 'image' must be a uint8 \(3, 64, 64\)"):
        model([batch[0], {**batch[1], "image": batch[1]["image"].float()}])
    with pytest.raises(ValueError, match=r"input 0: 'image' must be .* got torch.uint8 \(3, 32, 32\)"):
        model([{**batch[0], "image": square_photo("chelsea", 32)}])
    with pytest.raises(ValueError, match="captions of different lengths"):
        model([batch[0], {**batch[1], "input_ids": batch[1]["input_ids"][:8],
                          "attention_mask": batch[1]["attention_mask"][:8]}])
    model.train()
    with pytest.raises(ValueError, match="'special_tokens_mask'"):
        model([{k: v for k, v in x.items() if k != "special_tokens_mask"} for x in batch])


def test_negative_from_a_queue_entry_the_same_step_overwrites():
    # the queue wraps around during the step: entry 0 is drawn as text 0's negative image and then
    # overwritten by the enqueue; ITM must still pair text 0 with the old entry 0 (official: the
    # negatives are gathered before the enqueue)
    model = coarse_model(MODEL__FIBER__SWIN__DROP_PATH_RATE=0.0, MODEL__FIBER__TEXT__DROPOUT=0.0,
                         MODEL__FIBER__TEXT__ATTENTION_DROPOUT=0.0)
    batch = pair_inputs(model, 2)
    images = model.preprocess_images(batch)
    ids, mask = model.text_inputs(batch)
    old_entry = model.preprocess_images([{"image": square_photo("astronaut", 64)}])[0]
    q = model.queue
    with torch.no_grad():
        t = model.text_features(ids, mask)
        q.image_queue.copy_(-t[0][:, None].expand_as(q.image_queue))
        q.image_queue[:, 0] = t[0]  # entry 0 is by far text 0's hardest image
        q.image_input_queue.copy_(images[1].expand_as(q.image_input_queue))
        q.image_input_queue[0] = old_entry
        q.text_input_queue.copy_(ids[1].expand_as(q.text_input_queue))
        q.text_input_mask_queue.copy_(mask[1].expand_as(q.text_input_mask_queue))
        q.queue_ptr.fill_(q.size - 1)
        q.queue_total.fill_(q.size - 1)
    record = {}
    model.train()
    model.losses(images, ids, mask, ids, torch.full_like(ids, -100), record=record)
    assert int(record["image_neg"][0]) == 2  # candidate 2 = queue entry 0
    assert int(q.queue_ptr) == 1 and int(q.queue_total) == q.size + 1
    assert torch.equal(q.image_input_queue[0], images[1]) and torch.equal(q.image_input_queue[-1], images[0])
    model.eval()
    with torch.no_grad():
        expected = model.itm_score(model.fused_features(old_entry[None], ids[:1], mask[:1])["cls_feats"])
    torch.testing.assert_close(record["itm_logits"][4], expected[0], atol=1e-5, rtol=1e-5)  # row 2B + 0


def test_the_image_caption_mapper_feeds_the_model(tmp_path):
    """Real photo files -> ImageCaptionMapper (train and test) -> the model: losses, embeddings."""
    from fiber_det.data.caption_mapper import ImageCaptionMapper

    cfg = coarse_cfg()
    records = []
    for i, (name, caption) in enumerate((("chelsea", "a tabby cat"), ("coffee", "a cup of coffee"))):
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(square_photo(name, 200).permute(1, 2, 0).numpy()).save(path)
        records.append({"file_name": str(path), "caption": caption, "image_index": i, "caption_index": i,
                        "image_id": name, "source": f"test line {i}"})
    model = build_model(cfg).train()
    losses = model([ImageCaptionMapper(cfg, True)(r) for r in records])
    assert list(losses) == ["loss_mlm", "loss_itc", "loss_itm"] and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    items = [{**records[0], "modality": "image"}, {**records[1], "modality": "text"}]
    out = model([ImageCaptionMapper(cfg, False)(r) for r in items])
    assert set(out[0]) == {"image_embedding"} and set(out[1]) == {"text_embedding"}


def test_itm_without_itc_trains_on_random_negatives():
    model = coarse_model(MODEL__FIBER__COARSE__ITC_ON=False, MODEL__FIBER__COARSE__MLM_ON=False).train()
    inputs = pair_inputs(model)
    with pytest.raises(ValueError, match="false_image"):
        model(inputs)
    for i, x in enumerate(inputs):  # each pair's "random" image: the next pair's
        x["false_image"] = inputs[(i + 1) % len(inputs)]["image"]
    torch.manual_seed(0)
    losses = model(inputs)
    assert set(losses) == {"loss_itm"} and torch.isfinite(losses["loss_itm"])
    losses["loss_itm"].backward()
    assert model.itm_score.fc.weight.grad.abs().sum() > 0
    assert not hasattr(model, "queue") and not hasattr(model, "temp")
