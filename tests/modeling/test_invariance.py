"""Invariances of the fusion model: text padding, batch composition, odd sizes, gradients,
activation checkpointing, freezing (tiny config, real photos, fusion gates opened)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from model_inputs import cat_input, grounding_input, photo

from conftest import tiny_model
from detectron2.structures import ImageList


def _open_gates(model, value=0.5):
    for name, p in model.named_parameters():
        if "alpha_" in name:
            p.data.fill_(value)
    return model


@pytest.fixture(scope="module")
def template():
    """Read-only: tests work on their own copy (``model``)."""
    return _open_gates(tiny_model(seed=0, MODEL__FIBER__ATSS__INFERENCE_TH=0.0)).eval()


@pytest.fixture
def model(template):
    return copy.deepcopy(template)


def _run(model, inputs):
    images = model.preprocess_images(inputs)
    input_ids, attention_mask = model.text_inputs([x["prompts"][0] for x in inputs])
    with torch.no_grad():
        out, anchors = model.run(images.tensor, input_ids, attention_mask)
    return out, attention_mask


def test_padded_captions_equal_running_alone(model):
    img = photo("chelsea", (128, 192))
    short = grounding_input(img, "a cat", label_spans={1: [[2, 5]]})
    long = grounding_input(img, "a tabby cat with green eyes and a pink nose", label_spans={1: [[8, 11]], 2: [[17, 27]]})
    batch, mask = _run(model, [short, long])
    for i, x in enumerate((short, long)):
        alone, _ = _run(model, [x])
        real = mask[i].bool()
        for lvl in range(5):
            torch.testing.assert_close(batch["token_logits"][lvl][i][:, real], alone["token_logits"][lvl][0][:, real],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch["box_deltas"][lvl][i], alone["box_deltas"][lvl][0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        together = model([short, long])
        for i, x in enumerate((short, long)):
            single = model([x])[0]["instances"]
            torch.testing.assert_close(together[i]["instances"].scores, single.scores, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(together[i]["instances"].pred_boxes.tensor, single.pred_boxes.tensor,
                                       atol=1e-3, rtol=1e-5)


def test_pad_to_longest_equals_pad_to_max(model):
    x = [grounding_input(photo("coffee", (128, 192)), "a cup. a saucer. a spoon.", label_spans={1: [[2, 5]], 2: [[9, 15]]})]
    full, mask = _run(model, x)
    model.pad_to_max = False  # the test's own copy
    short, short_mask = _run(model, x)
    t = short_mask.shape[1]
    assert t < mask.shape[1]
    for lvl in range(5):
        torch.testing.assert_close(short["token_logits"][lvl], full["token_logits"][lvl][:, :, :t], atol=1e-5, rtol=1e-5)


def test_batch_of_different_sizes(model):
    """The largest image is unaffected by batching. A smaller image sees more zero padding in
    the batch than alone; upstream FIBER has the same effect (text tokens attend to every image
    token incl. padding, and Swin windows mix padded zeros), so its batch result equals running
    it alone *on the batch's padded canvas*, not on its own smaller canvas."""
    big = grounding_input(photo("astronaut", (160, 224)), "a person. a flag.", label_spans={1: [[2, 8]]})
    small = grounding_input(photo("coffee", (100, 130)), "a cup.", label_spans={1: [[2, 5]]})
    batch, _ = _run(model, [big, small])
    alone_big, _ = _run(model, [big])
    for lvl in range(5):
        torch.testing.assert_close(batch["token_logits"][lvl][0], alone_big["token_logits"][lvl][0], atol=1e-5, rtol=1e-5)
    # the small image alone, padded to the batch canvas
    norm = (small["image"].float() - model.pixel_mean) / model.pixel_std
    canvas = ImageList.from_tensors([norm], 32).tensor
    canvas = F.pad(canvas, (0, 224 - canvas.shape[-1], 0, 160 - canvas.shape[-2]))
    with torch.no_grad():
        padded_alone, _ = model.run(canvas, *model.text_inputs(small["prompts"]))
    for lvl in range(5):
        torch.testing.assert_close(batch["token_logits"][lvl][1], padded_alone["token_logits"][lvl][0], atol=1e-5, rtol=1e-5)
    # on its own (smaller) canvas the result differs: the padding effect (P5, read with a hook)
    p5 = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: p5.append(o[0]["p5"]))
    try:
        own_canvas, _ = _run(model, [small])
        _run(model, [big, small])
    finally:
        hook.remove()
    assert own_canvas["token_logits"][0].shape[1] < batch["token_logits"][0].shape[1]
    assert not torch.allclose(p5[0][0], p5[1][1][:, :4, :5], atol=1e-3)


@pytest.mark.parametrize("size", [(200, 249), (97, 131)])
def test_odd_sizes_run(model, size):
    x = cat_input(size, label_spans={1: [[0, 11]], 2: [[17, 27]]})
    with torch.no_grad():
        out = model([x])[0]["instances"]
    assert out.image_size == size and len(out) > 0
    model.train()  # the test's own copy
    losses = model([x])
    assert all(torch.isfinite(v) for v in losses.values())


def test_gradients_reach_both_towers():
    m = _open_gates(tiny_model(seed=0)).train()
    losses = m([cat_input()])
    sum(losses.values()).backward()
    bu = m.backbone.bottom_up
    fused_block = bu.vision.layers[3].blocks[0].attn
    fused_layer = bu.text.encoder.layer[-1]
    for name, p in [
        ("vision.patch_embed", bu.vision.patch_embed.proj.weight),
        ("text.word_embeddings", bu.text.embeddings.word_embeddings.weight),
        ("text.layer0.query", bu.text.encoder.layer[0].attention.self.query.weight),
        ("swin.qkv_text_i2t", fused_block.qkv_text_i2t.weight),
        ("swin.alpha_i2t", fused_block.alpha_i2t),
        ("text.crossattention_t2i.key", fused_layer.crossattention_t2i.self.key.weight),
        ("text.alpha_t2i", fused_layer.alpha_t2i),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_no_fusion_gives_independent_towers():
    m = tiny_model(seed=0, MODEL__FIBER__FUSION__NUM_LAYERS=0, MODEL__FIBER__ATSS__INFERENCE_TH=0.0)
    names = [n for n, _ in m.named_parameters()]
    assert not [n for n in names if "i2t" in n or "t2i" in n]
    m.eval()
    with torch.no_grad():
        assert len(m([grounding_input(photo("chelsea", (128, 192)), "a cat", label_spans={1: [[2, 5]]})])[0]["instances"]) > 0


def test_activation_checkpointing_keeps_values_and_gradients():
    det = dict(MODEL__FIBER__SWIN__DROP_PATH_RATE=0.0, MODEL__FIBER__TEXT__DROPOUT=0.0,
               MODEL__FIBER__TEXT__ATTENTION_DROPOUT=0.0, MODEL__FIBER__FPN__DROP_BLOCK_PROB=0.0)
    plain = _open_gates(tiny_model(seed=0, **det)).train()
    ckpt = _open_gates(tiny_model(seed=0, MODEL__FIBER__SWIN__USE_CHECKPOINT=True,
                                  MODEL__FIBER__TEXT__USE_CHECKPOINT=True, **det)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = [cat_input()]
    la, lb = plain(x), ckpt(x)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], atol=1e-6, rtol=1e-6)
    sum(la.values()).backward()
    sum(lb.values()).backward()
    ga, gb = dict(plain.named_parameters()), dict(ckpt.named_parameters())
    for name in ("backbone.bottom_up.vision.layers.2.blocks.1.attn.qkv_text_i2t.weight",
                 "backbone.bottom_up.text.encoder.layer.0.attention.self.query.weight",
                 "backbone.bottom_up.text.encoder.layer.3.crossattention_t2i.self.key.weight"):
        torch.testing.assert_close(ga[name].grad, gb[name].grad, atol=1e-6, rtol=1e-5)


def test_freeze_at_and_drop_path_schedule():
    m = tiny_model(seed=0, MODEL__BACKBONE__FREEZE_AT=2, MODEL__FIBER__SWIN__DROP_PATH_RATE=0.3)
    vision = m.backbone.bottom_up.vision
    frozen = {n for n, p in vision.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in vision.named_parameters() if n.startswith(("patch_embed.", "layers.0."))}
    m.train()
    assert not vision.layers[0].training and vision.layers[1].training
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for layer in vision.layers for b in layer.blocks]
    assert rates == pytest.approx([0.3 * k / (len(rates) - 1) for k in range(len(rates))])


def test_drop_block_only_in_training_on_p3_p4():
    m = tiny_model(seed=0, MODEL__FIBER__FPN__DROP_BLOCK_PROB=0.3)
    feats = {k: torch.randn(1, c.channels, 160 // c.stride, 224 // c.stride)
             for k, c in m.backbone.bottom_up.output_shape().items()}
    fpn = m.backbone

    def run(train):
        fpn.train(train)
        fpn.bottom_up.forward = lambda *a: (feats, {})
        torch.manual_seed(0)
        return fpn(None, None, None)[0]

    ev, tr = run(False), run(True)
    assert not torch.equal(ev["p3"], tr["p3"]) and not torch.equal(ev["p4"], tr["p4"])
    assert torch.equal(ev["p5"], tr["p5"])
    del fpn.bottom_up.forward
