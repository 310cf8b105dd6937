"""Parity with the official code on ../shared/fixtures/fiber_ref_v2_single.pt (CPU, eval + train).

Each test asserts a group of tensors within the fixture's tolerances and, on failure, prints
the new values (one line per tensor: key, max abs diff, tolerance).
"""
import copy

import pytest
import torch

from fiber_det.checkpoint.parity import eval_comparisons, tolerance_for, train_comparisons
from fiber_det.modeling.head.atss import LegacyAnchorGenerator
from fiber_det.modeling.head.grounding_head import FiberHead
from fiber_det.modeling.head.losses import FiberLoss
from fiber_det.modeling.postprocess import postprocess_image


@pytest.fixture(scope="module")
def eval_results(fixture_v2, fixture_model):
    return eval_comparisons(fixture_v2, fixture_model)


def _assert_group(results, *prefixes):
    sel = [r for r in results if r.key.startswith(prefixes) and not r.skipped]
    assert sel, f"no comparison under {prefixes}"
    failed = [r.line() for r in sel if not r.ok]
    assert not failed, "parity failures (new values):\n" + "\n".join(failed)
    return sel


def test_text_tower_parity(eval_results):
    sel = _assert_group(eval_results, "outputs_eval/language/")
    assert sum("text_layers[" in r.key for r in sel) == 12


def test_swin_and_fpn_parity(eval_results):
    sel = _assert_group(eval_results, "outputs_eval/backbone_features/", "outputs_eval/fpn_features")
    assert {r.key for r in sel} >= {f"outputs_eval/backbone_features/C{i}" for i in (3, 4, 5)}
    assert sum("fpn_features[" in r.key for r in sel) == 5


def test_head_parity(eval_results):
    sel = _assert_group(eval_results, "outputs_eval/dyhead_tower_features", "outputs_eval/head/")
    assert len(sel) == 5 * 4 + 1  # tower, bbox, centerness, logits per level + projected tokens


def test_anchors_and_detections_parity(eval_results):
    _assert_group(eval_results, "outputs_eval/anchors")
    sel = _assert_group(eval_results, "outputs_eval/pre_nms_candidates", "outputs_eval/detections")
    assert any(r.key.endswith("detections[0]/boxes_xyxy") for r in sel)


def test_losses_and_atss_assignment_parity(fixture_v2, fixture_model):
    model = copy.deepcopy(fixture_model)  # the session's model is shared: switch modes on a copy
    results = train_comparisons(fixture_v2, model)
    sel = _assert_group(results, "outputs_train/")
    keys = {r.key for r in sel}
    assert "outputs_train/losses/loss_dot_product_token" in keys
    assert "outputs_train/atss_assignment[0]/matched_gt_index" in keys
    assert not model.training


def test_head_alone_on_fixture_features(fixture_v2, fixture_model):
    """The head in isolation: fed the fixture's own P3-P7 and text features."""
    oe = fixture_v2["outputs_eval"]
    L = oe["stored_token_slots"]
    embedded = torch.zeros(1, 256, 768)
    embedded[:, :L] = oe["language"]["embedded"]
    head = FiberHead(in_channels=64, channels=64, num_convs=6, num_levels=5, text_dim=768)
    head.load_state_dict(fixture_model.head.state_dict())
    with torch.no_grad():
        out = head(list(oe["fpn_features"]), embedded)
    atol, rtol = tolerance_for(fixture_v2, "outputs_eval/head/dot_product_logits[0]")
    for lvl in range(5):
        torch.testing.assert_close(out["token_logits"][lvl][:, :, :L], oe["head"]["dot_product_logits"][lvl],
                                   atol=atol, rtol=rtol)
        torch.testing.assert_close(out["box_deltas"][lvl], oe["head"]["bbox_reg"][lvl], atol=atol, rtol=rtol)


def test_postprocess_and_loss_on_fixture_head_outputs(fixture_v2):
    """Post-processing and losses fed the fixture's own head outputs: exact candidate and
    detection sets, and the recorded losses."""
    oe, inp = fixture_v2["outputs_eval"], fixture_v2["inputs"]
    head = {"box_deltas": oe["head"]["bbox_reg"], "centerness": oe["head"]["centerness"],
            "token_logits": oe["head"]["dot_product_logits"]}
    anchors = LegacyAnchorGenerator([8, 16, 32, 64, 128], [[64], [128], [256], [512], [1024]], [1.0])(
        [x.shape[-2:] for x in oe["fpn_features"]])
    mapping = inp["per_image"][0]["positive_map_label_to_token"]
    (boxes, scores, labels), cand = postprocess_image(head, 0, anchors, inp["image_sizes_hw"][0], mapping,
                                                      return_candidates=True)
    det = oe["detections"][0]

    def key(b, s, lab):
        return sorted(zip(lab.tolist(), [round(x, 4) for x in s.tolist()], [tuple(round(v, 2) for v in r) for r in b.tolist()]))

    assert key(boxes, scores, labels) == key(det["boxes_xyxy"], det["scores"], det["labels"])
    pc = oe["pre_nms_candidates"][0]
    assert key(*cand) == key(pc["boxes_xyxy"], pc["scores"], pc["labels"])
    L = oe["stored_token_slots"]
    losses = FiberLoss()(head, anchors, [fixture_v2["targets"][0]["boxes_xyxy"]], [inp["positive_map_train"]],
                         inp["attention_mask"][:, :L])
    for name, value in losses.items():
        assert abs(value.item() - fixture_v2["outputs_train"]["losses"][name]) <= 1e-5, (name, value.item())


def test_float_values_without_group_tolerate_one_ulp_integers_stay_exact(fixture_v2):
    from fiber_det.checkpoint.parity import _compare

    key = "outputs_train/atss_assignment[0]/reg_targets_positive"
    expected = torch.tensor([1.0, 2.0, 3.0])
    ulp = _compare(fixture_v2, key, expected + 6e-8, expected)
    assert ulp.ok and ulp.atol == 1e-6, ulp.line()
    assert not _compare(fixture_v2, key, expected + 1e-5, expected).ok
    ints = torch.tensor([1, 2, 3])
    assert not _compare(fixture_v2, "outputs_train/atss_assignment[0]/matched_gt_index", ints + 1, ints).ok


def test_parity_with_the_other_attention_kernels(fixture_v2, fixture_tokenizer_dir, fixture_model):
    """MODEL.FIBER.SDPA switched from its default keeps eval parity (the default is covered above
    and by tools/check_reference_parity.py)."""
    from fiber_det.checkpoint.parity import build_fixture_model

    default = fixture_model.backbone.bottom_up.vision.layers[0].blocks[0].attn.sdpa
    model, _ = build_fixture_model(fixture_v2, str(fixture_tokenizer_dir), ["MODEL.FIBER.SDPA", str(not default)])
    attention = [m.sdpa for m in model.modules() if hasattr(m, "sdpa")]
    assert len(attention) == 24 + 12 + 6 and set(attention) == {not default}  # Swin blocks, text self + cross
    results = eval_comparisons(fixture_v2, model)
    sel = _assert_group(results, "outputs_eval/")
    assert len(sel) >= 78  # every eval tensor of the fixture, detections included
