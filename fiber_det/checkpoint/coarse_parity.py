"""Compare the coarse model with a golden fixture of the official coarse code
(../shared/fixtures/COARSE_FIXTURE_FORMAT.md).

:func:`build_coarse_fixture_model` builds our model from the fixture's official config and
converted state dict and loads its ITC queue; :func:`check_coarse_fixture` compares the eval-mode
paths (contrastive towers, fused encoder, MLM, ITM on explicit negatives) and one training step
(losses, ITC internals, the sampled negatives from the stored RNG state, ITM, the queue update,
the gradients) at the fixture's recommended tolerances. Intermediate tensors are read with forward
hooks. Memory: only the queue images that the step can read are copied out of the fixture.
"""
import hashlib
import re
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from detectron2.modeling import build_model

from ..data.tokenization import build_tokenizer
from .coarse import convert_official_coarse_state_dict
from .official_coarse_config import translate_official_coarse_config
from .parity import Comparison, compare_tensors, write_fixture_tokenizer

__all__ = [
    "is_coarse_fixture", "build_coarse_fixture_model", "check_coarse_fixture", "eval_coarse_comparisons",
    "train_coarse_comparisons", "load_queue",
]

# prefixes of the fixture's ``recommended_tolerances`` group names
TEXT, IMAGE, POOLED, SIM = "text hidden states", "image tokens", "pooled / normalised", "ITC similarities"
RETRIEVAL, WEIGHTS, ITM, MLM = "retrieval scores", "negative-sampling weights", "ITM logits", "MLM logits"
LOSS, GRAD, SUM = "losses", "gradients", "checksums"


def is_coarse_fixture(fixture: dict) -> bool:
    """True for a coarse-grained fixture (it stores ITC outputs)."""
    return isinstance(fixture.get("outputs_eval"), dict) and "itc" in fixture["outputs_eval"]


class _Checks:
    """Collects :class:`Comparison` lines; ``group`` None compares exactly (integers)."""

    def __init__(self, fixture: dict):
        self.tolerances = fixture["recommended_tolerances"]
        self.results: List[Comparison] = []

    def __call__(self, key, actual, expected, group: Optional[str] = None, note: str = ""):
        atol = rtol = 0.0
        if group is not None:
            name = next((n for n in self.tolerances if n.startswith(group)), None)
            if name is None:
                raise KeyError(f"fixture has no tolerance group starting with {group!r}")
            atol, rtol = float(self.tolerances[name]["atol"]), float(self.tolerances[name]["rtol"])
        self.results.append(compare_tensors(key, actual, expected, atol, rtol, note))

    def skip(self, key, note):
        self.results.append(Comparison(key, 0.0, 0.0, 0.0, 0.0, True, note, skipped=True))


def build_coarse_fixture_model(fixture: dict, tokenizer_dir: str, opts: Sequence[str] = ()):
    """Our coarse model from the fixture's official config + converted weights, with its queue
    state (eval mode, CPU). The fixture's Swin drop path was switched off, so is ours. ``opts``:
    ``[KEY, VALUE, ...]`` overrides of options that keep the function (e.g. MODEL.FIBER.SDPA).

    Returns (model, conversion report)."""
    ref = fixture["reference"]
    text_cfg = dict(ref["text_model_config_not_in_config"], model_type="roberta")
    cfg = translate_official_coarse_config(ref["config"], text_model_config=text_cfg, tokenizer=tokenizer_dir)
    cfg.MODEL.FIBER.SWIN.DROP_PATH_RATE = 0.0
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd, report = convert_official_coarse_state_dict({"state_dict": fixture["state_dict"]}, expected)
    report.raise_if_errors()
    model.load_state_dict(sd, strict=True)
    load_queue(model.queue, fixture["state_dict"])
    model.eval()
    return model, report


@torch.no_grad()
def load_queue(queue, sd: Dict[str, torch.Tensor]) -> None:
    """The official queue buffers into our queue; of the image queue only the entries a step can
    read (the first ``queue_total``) are copied, the fixture's is a 1-2 GB strided view."""
    for name in ("image_queue", "text_queue", "text_input_queue", "text_input_mask_queue", "queue_ptr", "queue_total"):
        getattr(queue, name).copy_(sd[name])
    n = queue.num_filled
    for s in range(0, n, 64):
        queue.image_input_queue[s:min(s + 64, n)] = sd["image_input_queue"][s:min(s + 64, n)]


def _hooks(model):
    """Forward hooks recording (inputs, output) of every module the fixture has a tensor for."""
    bb, store, handles = model.backbone, {}, []
    modules = {"patch_embed": bb.vision.patch_embed.norm, "vit_norm": bb.vision.norm, "text_emb": bb.text.embeddings}
    for i, layer in enumerate(bb.vision.layers):
        if layer.downsample is not None:
            modules[f"stage{i + 1}.downsample"] = layer.downsample
        for j, blk in enumerate(layer.blocks):
            modules[f"stage{i + 1}.block{j}"] = blk
    for k, layer in enumerate(bb.text.encoder.layer):
        modules[f"text_layer{k}"] = layer
    for name in ("image_transform_itc", "image_pooler_itc", "text_transform_itc", "text_pooler_itc",
                 "image_transform", "image_pooler", "text_transform", "text_pooler"):
        modules[name] = getattr(model, f"cross_modal_{name}")
    for name, m in modules.items():
        handles.append(m.register_forward_hook(lambda mod, i, o, name=name: store.__setitem__(name, (i, o))))
    return store, handles


def _stats(x: torch.Tensor):
    x = x.double()
    return x.sum(), x.abs().sum()


def _eval_itc(c: _Checks, model, store, fx):
    inp, ref = fx["inputs"], fx["outputs_eval"]["itc"]
    L = fx["outputs_eval"]["stored_token_slots"]
    last = model.backbone.vision.layers[-1]
    image_feat = model.image_features(inp["image"])
    pe = store["patch_embed"][1]
    c("outputs_eval/itc/image.patch_embed_every16th_channel", pe[:, :, ::16], ref["image.patch_embed_every16th_channel"], IMAGE)
    s1 = store["stage1.downsample"][1]
    c("outputs_eval/itc/image.stage1_out_every16th_channel", s1[:, :, ::16], ref["image.stage1_out_every16th_channel"], IMAGE)
    for name, x in (("patch_embed", pe), ("stage1_out", s1)):
        total, abs_total = _stats(x)
        stats = ref[f"image.{name}_stats"]
        c(f"outputs_eval/itc/image.{name}_stats/sum", total, torch.tensor(stats["sum"], dtype=torch.float64), SUM)
        c(f"outputs_eval/itc/image.{name}_stats/abs_sum", abs_total, torch.tensor(stats["abs_sum"], dtype=torch.float64), SUM)
    c("outputs_eval/itc/image.stage2_out", store["stage2.downsample"][1], ref["image.stage2_out"], IMAGE)
    c("outputs_eval/itc/image.stage3_out", store["stage3.downsample"][1], ref["image.stage3_out"], IMAGE)
    c("outputs_eval/itc/image.stage4_out", store[f"stage{len(model.backbone.vision.layers)}.block{len(last.blocks) - 1}"][1],
      ref["image.stage4_out"], IMAGE)
    c("outputs_eval/itc/image.vit_norm", store["vit_norm"][1], ref["image.vit_norm"], IMAGE)
    c("outputs_eval/itc/image.transform_itc", store["image_transform_itc"][1], ref["image.transform_itc"], IMAGE)
    c("outputs_eval/itc/image.avgpool", store["image_pooler_itc"][0][0], ref["image.avgpool"], POOLED)
    c("outputs_eval/itc/image.pooler_itc", store["image_pooler_itc"][1], ref["image.pooler_itc"], POOLED)
    c("outputs_eval/itc/image_feat", image_feat, ref["image_feat"], POOLED)
    text_feat = model.text_features(inp["text_ids"], inp["text_masks"])
    c("outputs_eval/itc/text.embeddings", store["text_emb"][1][:, :L], ref["text.embeddings"], TEXT)
    _text_layers(c, store, "outputs_eval/itc", ref["text.layers"], L)
    c("outputs_eval/itc/text.transform_itc", store["text_transform_itc"][1][:, :L], ref["text.transform_itc"], TEXT)
    c("outputs_eval/itc/text.pooler_itc", store["text_pooler_itc"][1], ref["text.pooler_itc"], POOLED)
    c("outputs_eval/itc/text_feat", text_feat, ref["text_feat"], POOLED)
    c("outputs_eval/itc/retrieval_scores_image_x_text", image_feat @ text_feat.T, ref["retrieval_scores_image_x_text"],
      RETRIEVAL)


def _text_layers(c, store, prefix, refs, L):
    """Each text layer's output of the last forward (each layer runs once per forward)."""
    for k, ref in enumerate(refs):
        c(f"{prefix}/text.layers[{k}]", store[f"text_layer{k}"][1][:, :L], ref, TEXT)


def _eval_fused(c: _Checks, model, store, fx):
    inp, ref = fx["inputs"], fx["outputs_eval"]["fused"]
    L = fx["outputs_eval"]["stored_token_slots"]
    out = model.fused_features(inp["image"], inp["text_ids"], inp["text_masks"])
    c("outputs_eval/fused/text.embeddings", store["text_emb"][1][:, :L], ref["text.embeddings"], TEXT)
    _text_layers(c, store, "outputs_eval/fused", ref["text.layers"], L)
    c("outputs_eval/fused/image.stage2_out", store["stage2.downsample"][1], ref["image.stage2_out"], IMAGE)
    for name, expected in ref["image.fused_blocks"].items():
        if name not in store:
            c(f"outputs_eval/fused/image.fused_blocks/{name}", torch.zeros(0), expected, IMAGE, "no such module")
            continue
        c(f"outputs_eval/fused/image.fused_blocks/{name}", store[name][1], expected, IMAGE)
    c("outputs_eval/fused/text_feats", out["text_feats"][:, :L], ref["text_feats"], TEXT)
    c("outputs_eval/fused/image_feats", out["image_feats"], ref["image_feats"], IMAGE)
    c("outputs_eval/fused/text.pooler", store["text_pooler"][1], ref["text.pooler"], POOLED)
    c("outputs_eval/fused/image.avgpool", store["image_pooler"][0][0], ref["image.avgpool"], POOLED)
    c("outputs_eval/fused/image.pooler", store["image_pooler"][1], ref["image.pooler"], POOLED)
    c("outputs_eval/fused/cls_feats", out["cls_feats"], ref["cls_feats"], POOLED)
    c("outputs_eval/fused/itm_logits_positive", model.itm_score(out["cls_feats"]), ref["itm_logits_positive"], ITM)
    c("outputs_eval/fused/rank_scores_positive", model.itm_score.match_logit(out["cls_feats"]),
      ref["rank_scores_positive"], ITM)


def _eval_mlm_itm(c: _Checks, model, fx):
    inp, oe = fx["inputs"], fx["outputs_eval"]
    logits = model.mlm_score(model.fused_features(inp["image"], inp["text_ids_mlm"], inp["text_masks"])["text_feats"])
    c("outputs_eval/mlm/logits", logits, oe["mlm"]["logits"], MLM)
    loss = F.cross_entropy(logits.flatten(0, 1), inp["text_labels_mlm"].flatten(), ignore_index=-100)
    c("outputs_eval/mlm/loss", loss, oe["mlm"]["loss"], LOSS)
    ref = oe["itm_explicit"]
    b = inp["image"].shape[0]
    image_neg, text_neg = ref["image_neg_candidate_index"], ref["text_neg_candidate_index"]
    neg_images = model.queue.select_images(image_neg, inp["image"])
    neg_ids, neg_mask = model.queue.select_texts(text_neg, inp["text_ids"], inp["text_masks"])
    from ..modeling.coarse.objectives import itm_pairs

    images, ids, mask, labels = itm_pairs(inp["image"], inp["text_ids"], inp["text_masks"], neg_images, neg_ids, neg_mask)
    _pair_indices(c, "outputs_eval/itm_explicit", b, image_neg, text_neg, ref)
    c("outputs_eval/itm_explicit/text_ids", ids, ref["text_ids"])
    c("outputs_eval/itm_explicit/text_masks", mask, ref["text_masks"])
    c("outputs_eval/itm_explicit/labels", labels.float(), ref["labels"], LOSS)
    cls = model.fused_features(images, ids, mask)["cls_feats"]
    logits = model.itm_score(cls)
    c("outputs_eval/itm_explicit/cls_feats", cls, ref["cls_feats"], POOLED)
    c("outputs_eval/itm_explicit/logits", logits, ref["logits"], ITM)
    c("outputs_eval/itm_explicit/rank_scores", model.itm_score.match_logit(cls), ref["rank_scores"], ITM)
    c("outputs_eval/itm_explicit/loss", F.cross_entropy(logits, labels), ref["loss"], LOSS)


def _pair_indices(c, prefix, b, image_neg, text_neg, ref):
    """The candidate indices of the 3B ITM pairs: (b, b), (b, text_neg b), (image_neg b, b)."""
    own = torch.arange(b)
    c(f"{prefix}/pair_image_candidate_index", torch.cat([own, own, image_neg]), ref["pair_image_candidate_index"])
    c(f"{prefix}/pair_text_candidate_index", torch.cat([own, text_neg, own]), ref["pair_text_candidate_index"])


def eval_coarse_comparisons(fixture: dict, model) -> List[Comparison]:
    c = _Checks(fixture)
    store, handles = _hooks(model)
    try:
        with torch.no_grad():
            _eval_itc(c, model, store, fixture)
            _eval_fused(c, model, store, fixture)
            _eval_mlm_itm(c, model, fixture)
    finally:
        for h in handles:
            h.remove()
    return c.results


def train_coarse_comparisons(fixture: dict, model, name_map: Dict[str, str]) -> List[Comparison]:
    """One training step from the stored RNG state, then the backward pass.

    Args:
        name_map: official parameter name -> ours (the conversion report's ``converted``).
    """
    c = _Checks(fixture)
    inp, ot = fixture["inputs"], fixture["outputs_train"]
    queue, qa = model.queue, ot["queue_after_step"]
    c("outputs_train/queue_after_step/ptr_before", queue.queue_ptr[0], torch.tensor(qa["ptr_before"]))
    c("outputs_train/queue_after_step/total_before", queue.queue_total[0], torch.tensor(qa["total_before"]))
    model.train()
    record: dict = {}
    try:
        torch.set_rng_state(ot["rng"]["torch_rng_state_at_training_step"])
        losses = model.losses(inp["image"], inp["text_ids"], inp["text_masks"], inp["text_ids_mlm"],
                              inp["text_labels_mlm"], record=record)
        total = sum(losses.values())
        model.zero_grad(set_to_none=True)
        total.backward()
    finally:
        model.eval()
    ours = {"loss_mlm": "mlm_loss", "loss_itc": "itc_loss", "loss_itm": "itm_loss"}
    order = [ot["loss_key_order"].index(ours[k]) if ours[k] in ot["loss_key_order"] else -1 for k in losses]
    c("outputs_train/loss_key_order", torch.tensor(order), torch.arange(len(ot["loss_key_order"])))
    for k, v in losses.items():
        c(f"outputs_train/losses/{ours[k]}", v, ot["losses_tensors"][ours[k]], LOSS)
    c("outputs_train/total_loss", total, ot["total_loss"], LOSS)
    _train_itc(c, record, ot)
    _train_itm_mlm(c, record, ot, inp)
    _queue_after(c, model, record, fixture)
    _gradients(c, model, ot, name_map)
    return c.results


def _train_itc(c, record, ot):
    itc, ns = ot["itc"], ot["negative_sampling"]
    c("outputs_train/itc/temp_after_clamp", record["temp"], itc["temp_after_clamp"])
    for name, group in (("image_feat", POOLED), ("text_feat", POOLED), ("sim_i2t", SIM), ("sim_t2i", SIM),
                        ("loss_i2t", LOSS), ("loss_t2i", LOSS), ("weights_i2t", WEIGHTS), ("weights_t2i", WEIGHTS)):
        c(f"outputs_train/itc/{name}", record[name], itc[name], group)
    draws = torch.cat([record["image_neg"], record["text_neg"]])
    c("outputs_train/negative_sampling/sampled_candidate_index_sequence", draws, ns["sampled_candidate_index_sequence"])
    c("outputs_train/negative_sampling/image_neg_candidate_index", record["image_neg"], ns["image_neg_candidate_index"])
    c("outputs_train/negative_sampling/text_neg_candidate_index", record["text_neg"], ns["text_neg_candidate_index"])
    rows = torch.cat([record["weights_t2i"], record["weights_i2t"]]) + 1e-9
    c("outputs_train/negative_sampling/multinomial_inputs", rows, ns["multinomial_inputs"], WEIGHTS)


def _train_itm_mlm(c, record, ot, inp):
    itm = ot["itm"]
    b = inp["image"].shape[0]
    _pair_indices(c, "outputs_train/itm", b, record["image_neg"], record["text_neg"], itm)
    c("outputs_train/itm/text_ids", record["itm_input_ids"], itm["text_ids"])
    c("outputs_train/itm/text_masks", record["itm_attention_mask"], itm["text_masks"])
    c("outputs_train/itm/labels", record["itm_labels"].float(), itm["labels"], LOSS)
    c("outputs_train/itm/logits", record["itm_logits"], itm["logits"], ITM)
    c("outputs_train/itm/cls_feats", record["itm_cls_feats"], itm["cls_feats"], POOLED)
    c("outputs_train/mlm/logits", record["mlm_logits"], ot["mlm"]["logits"], MLM)


@torch.no_grad()
def _queue_after(c, model, record, fixture):
    queue, qa, sd = model.queue, fixture["outputs_train"]["queue_after_step"], fixture["state_dict"]
    inp = fixture["inputs"]
    c("outputs_train/queue_after_step/ptr_after", queue.queue_ptr[0], torch.tensor(qa["ptr_after"]))
    c("outputs_train/queue_after_step/total_after", queue.queue_total[0], torch.tensor(qa["total_after"]))
    written = torch.tensor(qa["written_positions"])
    c("outputs_train/queue_after_step/image_queue_written_columns", queue.image_queue[:, written],
      qa["image_queue_written_columns"], POOLED)
    c("outputs_train/queue_after_step/text_queue_written_columns", queue.text_queue[:, written],
      qa["text_queue_written_columns"], POOLED)
    c("outputs_train/queue_after_step/image_input_queue_written_rows", queue.image_input_queue[written], inp["image"])
    c("outputs_train/queue_after_step/text_input_queue_written_rows", queue.text_input_queue[written], inp["text_ids"])
    c("outputs_train/queue_after_step/text_input_mask_queue_written_rows", queue.text_input_mask_queue[written],
      inp["text_masks"])
    keep = torch.ones(queue.size, dtype=torch.bool)
    keep[written] = False
    for name in ("image_queue", "text_queue"):
        c(f"outputs_train/queue_after_step/{name}_other_columns_unchanged", getattr(queue, name)[:, keep],
          sd[name][:, keep])
    for name in ("text_input_queue", "text_input_mask_queue"):
        c(f"outputs_train/queue_after_step/{name}_other_rows_unchanged", getattr(queue, name)[keep], sd[name][keep])
    filled = min(qa["total_before"], queue.size)
    rows = [r for r in range(filled) if keep[r]]
    worst = 0.0
    for s in range(0, len(rows), 64):
        idx = torch.tensor(rows[s:s + 64])
        worst = max(worst, float((queue.image_input_queue[idx] - sd["image_input_queue"][idx]).abs().max()))
    c("outputs_train/queue_after_step/image_input_queue_other_filled_rows_unchanged_max_abs",
      torch.tensor(worst), torch.tensor(0.0), note=f"{len(rows)} rows")


def _gradients(c, model, ot, name_map):
    params = dict(model.named_parameters())
    covered = set()
    for name, norm in ot["grad_norms"].items():
        ours = name_map.get(name)
        grad = params[ours].grad if ours in params else None
        if grad is None:
            c(f"outputs_train/grad_norms/{name}", torch.tensor(float("nan")), torch.tensor(norm, dtype=torch.float64), GRAD,
              "no gradient in fiber-det" if ours in params else f"no parameter {ours}")
            continue
        covered.add(ours)
        c(f"outputs_train/grad_norms/{name}", grad.double().norm(), torch.tensor(norm, dtype=torch.float64), GRAD)
    for name in ot["params_without_grad"]:
        ours = name_map.get(name, "")
        has = ours in params and params[ours].grad is not None
        c(f"outputs_train/params_without_grad/{name}", torch.tensor(int(has)), torch.tensor(0),
          note="not built by fiber-det (unused)" if ours not in params else "")
    extra = sorted(n for n, p in params.items() if p.grad is not None and n not in covered)
    c("outputs_train/grad_norms/fiber_det_parameters_without_official_gradient", torch.tensor(len(extra)),
      torch.tensor(0), note=", ".join(extra[:3]))
    for name, ref in ot["grads_full"].items():
        grad = params[name_map[name]].grad if name_map.get(name) in params else None
        c(f"outputs_train/grads_full/{name}", grad if grad is not None else torch.zeros(0), ref, GRAD)


def _input_checks(c: _Checks, fixture, tokenizer_dir, model):
    """Our tokenizer on the fixture's captions, and our normalisation of the original photos
    (PIL bicubic resize as the official transform) when scikit-image can provide them."""
    inp = fixture["inputs"]
    tok = build_tokenizer(tokenizer_dir)
    enc = tok(list(inp["text"]), padding="max_length", truncation=True, max_length=inp["max_text_len"],
              return_tensors="pt")
    c("inputs/text_ids", enc["input_ids"], inp["text_ids"])
    c("inputs/text_masks", enc["attention_mask"], inp["text_masks"])
    for i, sample in enumerate(inp["per_sample"]):
        image = _source_image(sample, model.image_size)
        if image is None:
            c.skip(f"inputs/image[{i}]", f"{sample['image_source']} not available here")
            continue
        c(f"inputs/image[{i}]", model.preprocess_images([{"image": image}])[0], inp["image"][i], IMAGE,
          "photo -> PIL bicubic -> model normalisation")


def _source_image(sample, size: int) -> Optional[torch.Tensor]:
    """The fixture photo resized to size x size with PIL bicubic (aspect ratio not kept) as a
    uint8 (3, S, S) tensor, or None when scikit-image cannot provide the identical photo here."""
    m = re.fullmatch(r"skimage\.data\.(\w+)\(\)", sample.get("image_source", ""))
    if m is None:
        return None
    try:
        import numpy as np
        import skimage.data
        from PIL import Image

        raw = np.ascontiguousarray(getattr(skimage.data, m.group(1))())
    except Exception:  # not installed, or a file scikit-image would have to download
        return None
    if hashlib.sha256(raw.tobytes()).hexdigest() != sample.get("raw_image_sha256") or raw.ndim != 3:
        return None
    resized = Image.fromarray(raw).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()


def check_coarse_fixture(fixture: dict, tokenizer_dir: Optional[str] = None, opts: Sequence[str] = ()) -> List[Comparison]:
    """Every comparison: inputs, eval mode, one training step (``opts``: config overrides)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = tokenizer_dir or write_fixture_tokenizer(fixture, tmp)
        model, report = build_coarse_fixture_model(fixture, tokenizer_dir, opts)
        c = _Checks(fixture)
        _input_checks(c, fixture, tokenizer_dir, model)
    results = c.results + eval_coarse_comparisons(fixture, model)
    results += train_coarse_comparisons(fixture, model, report.converted)
    return results
