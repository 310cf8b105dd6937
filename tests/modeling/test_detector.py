"""End-to-end detector behaviour on the tiny config with real photos and a real BPE tokenizer."""
import copy

import pytest
import torch
from model_inputs import builder, cat_input, grounding_input, photo

from conftest import tiny_cfg, tiny_model
from fiber_det.data.mapper import GroundingDatasetMapper
from fiber_det.data.prompt import Prompt
from records import chelsea_grounding

# recorded with seed 0 on CPU (torch 2.14.1) from the mapper's output for chelsea.jpg; update
# deliberately when the model or the mapper changes
GOLDEN_LOSSES = {
    "loss_reg": 1.278695,
    "loss_centerness": 0.693023,  # ~ln 2: the centerness conv starts at ~0 logits (upstream init)
    "loss_dot_product_token": 3.078565,
}


@pytest.fixture(scope="module")
def template():
    """Read-only: tests work on their own copy (``model``)."""
    return tiny_model(seed=0, MODEL__FIBER__ATSS__INFERENCE_TH=0.0)  # random heads score ~0.01


@pytest.fixture
def model(template):
    return copy.deepcopy(template)


def _losses(model, inputs):
    model.train()
    torch.manual_seed(1)  # drop path / dropout / DropBlock
    return model(inputs)


def test_golden_losses_of_the_mapper_output(model):
    """One real training sample, from the dataset dict through GroundingDatasetMapper to the losses."""
    mapper = GroundingDatasetMapper(tiny_cfg(INPUT__FLIP_PROB=0.0, INPUT__MIN_SIZE_TRAIN=(128,)), True)
    x = mapper(chelsea_grounding())
    assert tuple(x["image"].shape) == (3, 128, 192) and len(x["instances"]) == 4
    (prompt,) = x["prompts"]
    assert prompt.labels == (1, 2, 3)  # the two eyes share the phrase "green eyes"
    losses = _losses(model, [x])
    got = {k: round(v.item(), 6) for k, v in losses.items()}
    print("new loss values:", got)
    assert set(got) == set(GOLDEN_LOSSES)
    for k, v in GOLDEN_LOSSES.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), f"{k}: got {got[k]}, recorded {v} (all: {got})"


def test_training_step_updates_and_handles_empty_gt(model):
    empty = grounding_input(photo("astronaut", (160, 160)), "a person. a flag.", boxes=[], spans=[])
    losses = _losses(model, [cat_input(), empty])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_batch_of_only_empty_gt_gives_zero_box_losses(model):
    empty = grounding_input(photo("astronaut", (128, 128)), "a person.", boxes=[], spans=[])
    losses = _losses(model, [empty])
    assert losses["loss_reg"].item() == 0.0 and losses["loss_centerness"].item() == 0.0
    assert losses["loss_dot_product_token"].item() > 0.0
    sum(losses.values()).backward()  # the graph is kept even without positives
    model.zero_grad()


def test_inference_on_prompts_of_different_origins(model):
    """A builder-made prompt and one constructed from a token map give the same kind of output:
    the model reads only token ids and the label -> token map."""
    model.eval()
    a = grounding_input(photo("chelsea", (128, 192)), "cat. eyes. nose.",
                        label_spans={1: [[0, 3]], 2: [[5, 9]], 3: [[11, 15]]}, height=300, width=451)
    caption = "a cup of coffee on a saucer"
    by_tokens = Prompt(caption, builder().build(caption).input_ids, {1: [1, 2], 2: [7]})
    b = {"image": photo("coffee", (128, 192)), "prompts": (by_tokens,)}
    with torch.no_grad():
        out = model([a, b])
    ia, ib = out[0]["instances"], out[1]["instances"]
    assert ia.image_size == (300, 451) and ib.image_size == (128, 192)
    assert len(ia) > 0 and len(ib) > 0
    assert set(ia.pred_labels.tolist()) <= {1, 2, 3} and set(ib.pred_labels.tolist()) <= {1, 2}
    assert torch.equal(ia.pred_classes, ia.pred_labels - 1)
    assert (ia.scores[:-1] >= ia.scores[1:]).all()
    # boxes come back in the original frame: some extend beyond the resized 192-px width
    assert ia.pred_boxes.tensor[:, 2].max() <= 451 + 1e-3


def test_bad_inputs_give_clear_errors(model):
    model.eval()
    img = photo("chelsea", (128, 192))
    with pytest.raises(ValueError, match="image 0: prompt 'a cat' cannot be scored: it has no label"):
        model([grounding_input(img, "a cat")])
    with pytest.raises(ValueError, match="image 1: 'prompts' must be a sequence of Prompt"):
        model([grounding_input(img, "a cat", label_spans={1: [[2, 5]]}), {"image": img, "prompts": "a cat"}])
    with pytest.raises(ValueError, match="image 0: 'prompts' is empty"):
        model([{"image": img, "prompts": ()}])
    long = Prompt("a cat", tuple(range(70)), {1: [1]})
    with pytest.raises(ValueError, match="prompt 0 has 70 tokens but the model reads 64"):
        model([{"image": img, "prompts": (long,)}])
    model.train()
    with pytest.raises(ValueError, match="image 0: training needs 'instances'"):
        model([grounding_input(img, "a cat")])
    with pytest.raises(ValueError, match="exactly one prompt"):
        x = cat_input()
        model([{**x, "prompts": x["prompts"] * 2}])


def test_v3_flag_adds_query_norm_and_changes_outputs():
    v2 = tiny_model(seed=0)
    v3 = tiny_model(seed=0, MODEL__FIBER__FUSION__I2T_QUERY_NORM=True)
    extra = set(v3.state_dict()) - set(v2.state_dict())
    assert extra and all(".attn.norm_i2t_i." in k for k in extra)
    assert len(extra) == 2 * 2  # weight + bias in each of the 2 fused blocks
    v3.load_state_dict(v2.state_dict(), strict=False)
    for m in (v2, v3):
        for name, p in m.named_parameters():
            if "alpha" in name:
                p.data.fill_(0.7)
        m.eval()
    x = [cat_input()]
    with torch.no_grad():
        d2 = v2.run(v2.preprocess_images(x).tensor, *v2.text_inputs(x[0]["prompts"]))[0]["token_logits"][0]
        d3 = v3.run(v3.preprocess_images(x).tensor, *v3.text_inputs(x[0]["prompts"]))[0]["token_logits"][0]
    assert (d2 - d3).abs().max() > 1e-4


def test_run_returns_only_the_head_outputs(model):
    """The tensor-level entry point: (images, input_ids, attention_mask) -> head outputs, anchors."""
    model.eval()
    x = [cat_input()]
    with torch.no_grad():
        outputs, anchors = model.run(model.preprocess_images(x).tensor, *model.text_inputs(x[0]["prompts"]))
    assert set(outputs) == {"box_deltas", "centerness", "token_logits"}
    assert [tuple(t.shape) for t in outputs["token_logits"]] == [(1, 16 * 24, 64), (1, 8 * 12, 64), (1, 4 * 6, 64),
                                                                   (1, 2 * 3, 64), (1, 1 * 2, 64)]
    assert [a.shape[0] for a in anchors] == [t.shape[1] for t in outputs["token_logits"]]


def test_run_traces_into_one_graph(template):
    """FIBER.run has no graph break (torch.compile fullgraph; the eager backend keeps this test
    fast, tools/benchmark.py --section compile times the inductor build)."""
    model = copy.deepcopy(template).eval()
    x = cat_input()
    images = model.preprocess_images([x]).tensor
    input_ids, attention_mask = model.text_inputs(x["prompts"])
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model.run, fullgraph=True, backend="eager")
            out, anchors = compiled(images, input_ids, attention_mask)
            ref, ref_anchors = model.run(images, input_ids, attention_mask)
    finally:
        torch._dynamo.reset()
    for key in ("box_deltas", "centerness", "token_logits"):
        for a, b in zip(out[key], ref[key]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(anchors, ref_anchors))
