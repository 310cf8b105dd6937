"""Compare fiber-det with a golden fixture of the official code (../shared/fixtures format).

:func:`build_fixture_model` builds our model from the fixture's official config dump and
converted state dict; :func:`check_fixture` runs eval and train modes on the fixture's inputs
and compares every captured tensor with the fixture's tolerances.
"""
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from detectron2.modeling import build_model

from ..data.prompt import PromptBuilder, collate_prompts
from ..data.tokenization import build_tokenizer
from ..modeling.postprocess import postprocess_image, rescale_boxes
from .convert import anchor_spec_from_cfg, convert_official_state_dict
from .official_config import translate_official_config

__all__ = [
    "Comparison", "build_fixture_model", "capture_intermediates", "check_fixture", "compare_tensors", "eval_comparisons",
    "load_fixture", "tolerance_for", "train_comparisons", "write_fixture_tokenizer",
]


@dataclass
class Comparison:
    """One compared tensor: ``key`` is the fixture's key path."""

    key: str
    max_abs: float
    atol: float
    rtol: float
    ratio: float  # worst |diff| / (atol + rtol·|ref|); <= 1 passes
    ok: bool
    note: str = ""
    skipped: bool = False

    def line(self) -> str:
        status = "SKIP" if self.skipped else ("OK" if self.ok else "FAIL")
        tol = "exact" if self.atol == 0 and self.rtol == 0 else f"atol={self.atol:g} rtol={self.rtol:g}"
        extra = f"  ({self.note})" if self.note else ""
        return f"{self.key}  max_abs_diff={self.max_abs:.3e}  tol[{tol}]  {status}{extra}"


def load_fixture(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fixture not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


# fixture key path -> the prefix of its group name in ``recommended_tolerances``
_GROUPS = (
    ("outputs_eval/language/", "text"),
    ("outputs_eval/backbone_features/", "backbone"),
    ("outputs_eval/fpn_features", "FPN"),
    ("outputs_eval/dyhead_tower_features", "DyHead"),
    ("outputs_eval/head/bbox_reg", "bbox_reg"),
    ("outputs_eval/head/centerness", "centerness"),
    ("outputs_eval/head/dot_product_logits", "dot-product logits"),
    ("outputs_eval/head/dot_product_proj_tokens", "dot-product projected tokens"),
    ("outputs_eval/pre_nms_candidates/boxes", "pre-NMS candidate boxes"),
    ("outputs_eval/pre_nms_candidates/scores", "pre-NMS candidate scores"),
    ("outputs_eval/detections/boxes", "final detection boxes"),
    ("outputs_eval/detections/scores", "final detection scores"),
    ("outputs_eval/detections/per_phrase_original_image/boxes", "final detection boxes"),
    ("outputs_eval/detections/per_phrase_original_image/scores", "final detection scores"),
    ("outputs_train/losses", "losses"),
)


def tolerance_for(fixture: dict, key: str):
    """(atol, rtol) of a key path; (0, 0) for values that must match exactly."""
    base = re.sub(r"\[[^\]]*\]", "", key)  # "detections[0]/boxes_xyxy" -> "detections/boxes_xyxy"
    for prefix, group in _GROUPS:
        if base.startswith(prefix):
            for name, tol in fixture["recommended_tolerances"].items():
                if name.startswith(group):
                    return float(tol["atol"]), float(tol["rtol"])
            raise KeyError(f"fixture has no tolerance group starting with {group!r}")
    return 0.0, 0.0


# Float values outside every tolerance group (e.g. ATSS regression targets) differ by one float32
# ulp between CPU models and thread counts; only integers, indices and masks are compared exactly.
FLOAT_ATOL_WITHOUT_GROUP = 1e-6


def _compare(fixture, key, actual, expected, note="") -> Comparison:
    atol, rtol = tolerance_for(fixture, key)
    return compare_tensors(key, actual, expected, atol, rtol, note)


def compare_tensors(key: str, actual, expected, atol: float, rtol: float, note: str = "") -> Comparison:
    """One comparison at ``atol`` / ``rtol``; (0, 0) means exact for integers and
    :data:`FLOAT_ATOL_WITHOUT_GROUP` for floats. A shape mismatch fails."""
    actual = torch.as_tensor(actual).detach().cpu()
    expected = torch.as_tensor(expected).detach().cpu()
    if atol == 0 and rtol == 0 and expected.is_floating_point():
        atol = FLOAT_ATOL_WITHOUT_GROUP
    if actual.shape != expected.shape:
        return Comparison(key, math.inf, atol, rtol, math.inf, False, f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if actual.numel() == 0:
        return Comparison(key, 0.0, atol, rtol, 0.0, True, note)
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    if atol == 0 and rtol == 0:
        ok = bool(torch.equal(actual.to(expected.dtype), expected))
        return Comparison(key, float(diff.max()), 0.0, 0.0, 0.0 if ok else math.inf, ok, note)
    ratio = float((diff / (atol + rtol * e.abs())).max())
    return Comparison(key, float(diff.max()), atol, rtol, ratio, ratio <= 1.0, note)


def write_fixture_tokenizer(fixture: dict, folder: str) -> str:
    """Write the fixture's own tokenizer files (vocab.json, merges.txt) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for name, text in fixture["inputs"]["tokenizer_files"].items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    return str(folder)


def build_fixture_model(fixture: dict, tokenizer_dir: Optional[str] = None, opts: Sequence[str] = ()):
    """Our model from the fixture's official config dump + converted weights (eval mode, CPU).
    ``opts``: ``[KEY, VALUE, ...]`` overrides of options that keep the function (e.g. MODEL.FIBER.SDPA).

    Returns (model, conversion report)."""
    ref = fixture["reference"]
    text_cfg = dict(ref["text_model_config_not_in_yacs"], model_type="roberta")
    cfg = translate_official_config(ref["cfg_dump"], text_model_config=text_cfg, tokenizer=tokenizer_dir or "")
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd, report = convert_official_state_dict(fixture["state_dict"], expected, anchors=anchor_spec_from_cfg(cfg))
    report.raise_if_errors()
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    model.eval()
    return model, report


def capture_intermediates(model):
    """Forward hooks recording text embeddings ("emb"), text layer outputs ("text_layers"), the
    Swin stage outputs ("stages"), C2 ("c2": stage-0 tokens, H, W), the FPN levels P3-P7
    ("features"), the language dict ("language"), the DyHead tower outputs ("tower") and the
    projected tokens ("proj_tokens"). Returns (store, hooks)."""
    store: Dict[str, object] = {"text_layers": {}}

    def backbone_out(module, inputs, output):
        features, language = output
        store["features"], store["language"] = [features[k] for k in model.in_features], language

    hooks = [model.backbone.register_forward_hook(backbone_out),
             model.head.dyhead_tower.register_forward_hook(lambda m, i, o: store.__setitem__("tower", o)),
             model.head.dot_product_projection_text.register_forward_hook(
                 lambda m, i, o: store.__setitem__("proj_tokens", o))]
    bottom_up = model.backbone.bottom_up
    hooks.append(bottom_up.text.embeddings.register_forward_hook(lambda m, i, o: store.__setitem__("emb", o)))
    for k, layer in enumerate(bottom_up.text.encoder.layer):
        hooks.append(layer.register_forward_hook(lambda m, i, o, k=k: store["text_layers"].__setitem__(k, o)))
    hooks.append(bottom_up.register_forward_hook(lambda m, i, o: store.__setitem__("stages", o[0])))
    # C2: the stage-0 output (norm0 is an Identity upstream), i.e. its last block's output
    first = bottom_up.vision.layers[0].blocks[-1]
    hooks.append(first.register_forward_hook(lambda m, i, o: store.__setitem__("c2", (o, i[1], i[2]))))
    return store, hooks


def _match_sets(fixture, key, boxes, scores, labels, ref_boxes, ref_scores, ref_labels) -> List[Comparison]:
    """Compare detection sets: greedy one-to-one matching on (label, nearest box)."""
    out = [_compare(fixture, f"{key}/count", torch.tensor(len(scores)), torch.tensor(len(ref_scores)))]
    used = torch.zeros(len(scores), dtype=torch.bool)
    mb, ms, rb, rs = [], [], [], []
    for j in torch.argsort(ref_scores, descending=True).tolist():
        cand = (labels == ref_labels[j]) & ~used
        if not cand.any():
            continue
        d = (boxes - ref_boxes[j]).abs().amax(dim=1) + (scores - ref_scores[j]).abs() * 1e3
        d[~cand] = math.inf
        i = int(d.argmin())
        used[i] = True
        mb.append(boxes[i]); ms.append(scores[i]); rb.append(ref_boxes[j]); rs.append(ref_scores[j])
    unmatched = len(ref_scores) - len(rs)
    out.append(_compare(fixture, f"{key}/labels_matched", torch.tensor(unmatched), torch.tensor(0)))
    if rs:
        out.append(_compare(fixture, f"{key}/boxes_xyxy", torch.stack(mb), torch.stack(rb)))
        out.append(_compare(fixture, f"{key}/scores", torch.stack(ms), torch.stack(rs)))
    return out


def eval_comparisons(fixture, model) -> List[Comparison]:
    inp, oe = fixture["inputs"], fixture["outputs_eval"]
    L = oe["stored_token_slots"]
    res = []
    store, hooks = capture_intermediates(model)
    try:
        with torch.no_grad():
            outputs, anchors = model.run(inp["images"], inp["input_ids"], inp["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    lang = store["language"]
    c = lambda key, a, e, note="": res.append(_compare(fixture, key, a, e, note))  # noqa: E731
    c("outputs_eval/language/text_embeddings", store["emb"][:, :L], oe["language"]["text_embeddings"])
    for k, ref in enumerate(oe["language"]["text_layers"]):
        c(f"outputs_eval/language/text_layers[{k}]", store["text_layers"][k][:, :L], ref)
    for name in ("hidden", "embedded"):
        c(f"outputs_eval/language/{name}", lang[name][:, :L], oe["language"][name])
    c("outputs_eval/language/aggregate", lang["aggregate"], oe["language"]["aggregate"])
    c("outputs_eval/language/masks", lang["masks"], oe["language"]["masks"])
    bf = oe["backbone_features"]
    for name, key in (("C3", "res3"), ("C4", "res4"), ("C5", "res5")):
        c(f"outputs_eval/backbone_features/{name}", store["stages"][key], bf[name])
    tokens, h, w = store["c2"]
    c2 = tokens.view(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)
    c("outputs_eval/backbone_features/C2_channels_every_16th", c2[:, ::16], bf["C2_channels_every_16th"])
    c("outputs_eval/backbone_features/C2_sum", c2.double().sum(), torch.tensor(bf["C2_sum"], dtype=torch.float64))
    c("outputs_eval/backbone_features/C2_abs_sum", c2.double().abs().sum(),
      torch.tensor(bf["C2_abs_sum"], dtype=torch.float64))
    for lvl in range(len(store["features"])):
        c(f"outputs_eval/fpn_features[{lvl}]", store["features"][lvl], oe["fpn_features"][lvl])
        c(f"outputs_eval/dyhead_tower_features[{lvl}]", store["tower"][lvl], oe["dyhead_tower_features"][lvl])
        c(f"outputs_eval/head/bbox_reg[{lvl}]", outputs["box_deltas"][lvl], oe["head"]["bbox_reg"][lvl])
        c(f"outputs_eval/head/centerness[{lvl}]", outputs["centerness"][lvl], oe["head"]["centerness"][lvl])
        c(f"outputs_eval/head/dot_product_logits[{lvl}]", outputs["token_logits"][lvl][:, :, :L],
          oe["head"]["dot_product_logits"][lvl])
    c("outputs_eval/head/dot_product_proj_tokens", store["proj_tokens"][:, :L], oe["head"]["dot_product_proj_tokens"])
    res.append(Comparison("outputs_eval/head/cls_logits_first8_channels", 0.0, 0.0, 0.0, 0.0, True,
                          "the vestigial frozen cls_logits conv is not built by fiber-det", skipped=True))
    for i in range(len(inp["image_sizes_hw"])):
        for lvl, a in enumerate(anchors):
            c(f"outputs_eval/anchors[{i}][{lvl}]", a, oe["anchors"][i][lvl])
    settings = oe["postprocessor_settings"]
    mine = dict(pre_nms_thresh=model.score_threshold, pre_nms_top_n=model.pre_nms_top_n,
                nms_thresh=model.nms_threshold, fpn_post_nms_top_n=model.detections_per_image)
    for k, v in mine.items():
        c(f"outputs_eval/postprocessor_settings/{k}", torch.tensor(float(v)), torch.tensor(float(settings[k])))
    for i, per_image in enumerate(inp["per_image"]):
        res += _detection_checks(fixture, model, outputs, anchors, i, per_image)
    return res


def _detection_checks(fixture, model, outputs, anchors, i, per_image) -> List[Comparison]:
    oe = fixture["outputs_eval"]
    size = tuple(fixture["inputs"]["image_sizes_hw"][i])
    mapping = per_image["positive_map_label_to_token"]
    (boxes, scores, labels), cand = postprocess_image(
        outputs, i, anchors, size, mapping, score_threshold=model.score_threshold,
        pre_nms_top_n=model.pre_nms_top_n, nms_threshold=model.nms_threshold,
        detections_per_image=model.detections_per_image, return_candidates=True,
    )
    pc, det = oe["pre_nms_candidates"][i], oe["detections"][i]
    res = _match_sets(fixture, f"outputs_eval/pre_nms_candidates[{i}]", *cand,
                      pc["boxes_xyxy"], pc["scores"], pc["labels"])
    res += _match_sets(fixture, f"outputs_eval/detections[{i}]", boxes, scores, labels,
                       det["boxes_xyxy"], det["scores"], det["labels"])
    orig = tuple(per_image["original_size_hw"])
    for p in det.get("per_phrase_original_image", []):
        sel = labels == p["label"]
        res += _match_sets(
            fixture, f"outputs_eval/detections[{i}]/per_phrase_original_image[{p['label']}]",
            rescale_boxes(boxes[sel], size, orig), scores[sel], labels[sel],
            p["boxes_xyxy_original_image"], p["scores"], torch.full((len(p["scores"]),), p["label"]),
        )
    return res


def train_comparisons(fixture, model) -> List[Comparison]:
    inp, ot = fixture["inputs"], fixture["outputs_train"]
    res = []
    c = lambda key, a, e: res.append(_compare(fixture, key, a, e))  # noqa: E731
    boxes = [t["boxes_xyxy"] for t in fixture["targets"]]
    counts = [len(b) for b in boxes]
    pmaps = list(torch.split(inp["positive_map_train"], counts))
    model.train()
    try:
        outputs, anchors = model.run(inp["images"], inp["input_ids"], inp["attention_mask"])
        losses = model.loss(outputs, anchors, boxes, pmaps, inp["attention_mask"])
    finally:
        model.eval()
    for name, ref in ot["losses"].items():
        ours = losses[name].detach() if name in losses else torch.tensor(0.0)  # loss_cls: always 0 upstream
        c(f"outputs_train/losses/{name}", ours, torch.tensor(ref, dtype=torch.float32))
    for i, ref in enumerate(ot["atss_assignment"]):
        t = model.loss.assign([a.float() for a in anchors], boxes[i].float(), pmaps[i], inp["input_ids"].shape[1])
        matched = t["matched"]
        labels = torch.where(matched >= 0, fixture["targets"][i]["labels"][matched.clamp(min=0)], 0)
        pos = torch.nonzero(matched >= 0).squeeze(1)
        key = f"outputs_train/atss_assignment[{i}]"
        c(f"{key}/num_anchors", torch.tensor(matched.numel()), torch.tensor(ref["num_anchors"]))
        c(f"{key}/cls_labels", labels, ref["cls_labels"])
        c(f"{key}/matched_gt_index", matched, ref["matched_gt_index"])
        c(f"{key}/positive_anchor_indices", pos, ref["positive_anchor_indices"])
        c(f"{key}/reg_targets_positive", t["reg_targets"][pos], ref["reg_targets_positive"])
        c(f"{key}/token_labels_positive", t["token_targets"][pos], ref["token_labels_positive"])
        neg = torch.nonzero(matched < 0).squeeze(1)
        if neg.numel():
            c(f"{key}/token_labels_negative_row", t["token_targets"][neg[0]], ref["token_labels_negative_row"])
    return res


def check_fixture(fixture: dict, tokenizer_dir: Optional[str] = None, opts: Sequence[str] = ()) -> List[Comparison]:
    """Every comparison of eval and train mode (plus tokenizer reproduction of the input ids);
    ``opts``: config overrides of the model."""
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_dir is None:
            tokenizer_dir = write_fixture_tokenizer(fixture, tmp)
        model, _ = build_fixture_model(fixture, tokenizer_dir, opts)
        builder = PromptBuilder(build_tokenizer(tokenizer_dir), max_length=model.max_query_len)
        prompts = [builder.build(c) for c in fixture["inputs"]["captions"]]
        input_ids, attention_mask = collate_prompts(prompts, model.pad_token_id, model.max_query_len, model.pad_to_max)
        res = [_compare(fixture, "inputs/input_ids", input_ids, fixture["inputs"]["input_ids"]),
               _compare(fixture, "inputs/attention_mask", attention_mask, fixture["inputs"]["attention_mask"])]
    res += eval_comparisons(fixture, model)
    res += train_comparisons(fixture, model)
    return res
