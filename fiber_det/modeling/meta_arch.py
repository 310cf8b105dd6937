"""The FIBER detector (``MODEL.META_ARCHITECTURE: FIBER``): one caption per image in, losses or
phrase-labelled detections out.

Batched inputs (Detectron2 list of dicts), per image:
    "image": (3, H, W) BGR 0-255 tensor, already resized (fiber_det.data mapper / predictor);
    "height", "width": original size for the output boxes (default: the input size);
    "caption": str, the prompt ("person. dog. kite.") or grounding sentence;
  training:
    "instances": Instances with ``gt_boxes`` (legacy xyxy, resized frame) and either
        ``gt_positive_map`` (G, >= T) binary token maps or ``tokens_positive`` (list per box of
        [start, end) character spans into the caption);
  inference (one of):
    "label_to_tokens": {label: [token indices]} (labels >= 1), or
    "label_spans": {label: [[start, end), ...]} character spans, mapped with the tokenizer;
    optional "label_names": {label: phrase} copied to the output ``pred_phrases``;
    or "prompts": a list of {"caption", "label_spans" | "label_to_tokens", ["label_names"]}, one
        per chunk of a vocabulary too large for one caption (labels global): the image is run once
        per prompt (``prompts_per_batch`` pairs per forward) and the detections are concatenated.
Different images of a batch may carry different captions and label maps.

Output per image: {"instances": Instances(pred_boxes, scores, pred_classes = label - 1,
pred_labels = label, [pred_phrases])} in the original image frame.
"""
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, ImageList, Instances

from ..data.prompts import build_label_to_tokens
from ..data.tokenization import build_tokenizer, positive_map_from_caption, tokenize_captions
from .head.atss import LegacyAnchorGenerator, LegacyBoxCoder
from .head.grounding_head import FiberHead
from .head.losses import FiberLoss
from ..utils.paths import resolve_path
from .postprocess import postprocess_image, rescale_boxes

__all__ = ["FIBER", "reorder_instances"]


@META_ARCH_REGISTRY.register()
class FIBER(nn.Module):
    """Fusion backbone + DyHead/ATSS region-word head."""

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: FiberHead,
        anchor_generator: LegacyAnchorGenerator,
        loss: FiberLoss,
        tokenizer,
        pixel_mean,
        pixel_std,
        max_query_len: int = 256,
        pad_to_max: bool = True,
        score_threshold: float = 0.05,
        pre_nms_top_n: int = 1000,
        nms_threshold: float = 0.6,
        detections_per_image: int = 100,
        prompts_per_batch: int = 8,
    ):
        """
        Args:
            backbone: :class:`FiberBackbone` (images + tokens -> P3..P7, language dict).
            head: :class:`FiberHead`; anchor_generator: legacy anchors per level; loss: FiberLoss.
            tokenizer: a HF fast tokenizer (``build_tokenizer``); None if inputs carry token ids.
            pixel_mean, pixel_std: BGR, 0-255 units.
            max_query_len, pad_to_max: caption truncation / padding (official: 256, True).
            score_threshold, pre_nms_top_n, nms_threshold, detections_per_image: inference.
            prompts_per_batch: (image, prompt) pairs per forward for inputs with several prompts.
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.anchor_generator = anchor_generator
        self.loss = loss
        self.tokenizer = tokenizer
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.max_query_len = max_query_len
        self.pad_to_max = pad_to_max
        self.score_threshold = score_threshold
        self.pre_nms_top_n = pre_nms_top_n
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.prompts_per_batch = max(1, int(prompts_per_batch))
        self.box_coder = LegacyBoxCoder()
        self.in_features = ["p3", "p4", "p5", "p6", "p7"]

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        in_features = ["p3", "p4", "p5", "p6", "p7"]
        ag = cfg.MODEL.ANCHOR_GENERATOR
        f = cfg.MODEL.FIBER
        if len(ag.ASPECT_RATIOS) != 1:
            raise ValueError("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS: one list shared by all levels expected")
        return {
            "backbone": backbone,
            "head": FiberHead(cfg, [shapes[k] for k in in_features]),
            "anchor_generator": LegacyAnchorGenerator(
                [shapes[k].stride for k in in_features], ag.SIZES, ag.ASPECT_RATIOS[0]
            ),
            "loss": FiberLoss(cfg),
            "tokenizer": _tokenizer_from_cfg(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "max_query_len": f.TEXT.MAX_QUERY_LEN,
            "pad_to_max": f.TEXT.PAD_TO_MAX,
            "score_threshold": f.ATSS.INFERENCE_TH,
            "pre_nms_top_n": f.ATSS.PRE_NMS_TOP_N,
            "nms_threshold": f.ATSS.NMS_TH,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "prompts_per_batch": cfg.TEST.PROMPTS_PER_BATCH,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ---- inputs ----
    def preprocess_images(self, batched_inputs: List[dict]) -> ImageList:
        """Normalise (BGR, 0-255, mean/std) then zero-pad to a multiple of 32."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility, pad_value=0.0)

    def tokenize(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        """input_ids / attention_mask (B, T) for the captions (T = max_query_len if pad_to_max)."""
        captions = []
        for i, x in enumerate(batched_inputs):
            caption = x.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"image {i}: 'caption' is missing or empty; FIBER needs a text prompt")
            captions.append(caption)
        if self.tokenizer is None:
            raise ValueError("no tokenizer: set MODEL.FIBER.TEXT.TOKENIZER to a local tokenizer folder")
        tok = tokenize_captions(self.tokenizer, captions, self.max_query_len, self.pad_to_max)
        return {k: v.to(self.device) for k, v in tok.items()}

    def label_map(self, x: dict, i: int, num_tokens: int) -> Dict[int, List[int]]:
        """The {label: token indices} map of one image, validated."""
        if "label_to_tokens" in x:
            mapping = {int(k): [int(t) for t in v] for k, v in x["label_to_tokens"].items()}
        elif "label_spans" in x:
            # untruncated tokenisation, as upstream's create_queries_and_maps
            mapping = build_label_to_tokens(self.tokenizer, x["caption"], x["label_spans"])
        else:
            raise ValueError(f"image {i}: no phrase to score; give 'label_to_tokens' or 'label_spans'")
        if not mapping:
            raise ValueError(f"image {i}: the label map is empty; nothing to detect")
        for label, toks in mapping.items():
            if not toks:
                raise ValueError(f"image {i}: label {label} maps to no token of caption {x['caption']!r}")
            if max(toks) >= num_tokens or min(toks) < 0:
                raise ValueError(
                    f"image {i}: label {label} uses token {max(toks)} but captions are cut at {num_tokens} "
                    "tokens (MODEL.FIBER.TEXT.MAX_QUERY_LEN); shorten or split the prompt"
                )
        return mapping

    def gt_positive_map(self, x: dict, i: int) -> torch.Tensor:
        inst = x["instances"]
        if inst.has("gt_positive_map"):
            return inst.gt_positive_map.to(self.device)
        if inst.has("tokens_positive"):
            pmap = positive_map_from_caption(
                self.tokenizer, x["caption"], list(inst.tokens_positive), max_length=self.max_query_len,
                normalize=False,
            )
            return pmap.to(self.device)
        if len(inst) == 0:
            return torch.zeros((0, self.max_query_len), device=self.device)
        raise ValueError(f"image {i}: instances need 'gt_positive_map' or 'tokens_positive'")

    # ---- forward ----
    def forward(self, batched_inputs: List[dict]):
        if not self.training and any("prompts" in x for x in batched_inputs):
            return self.multi_prompt_inference(batched_inputs)
        images = self.preprocess_images(batched_inputs)
        tokens = self.tokenize(batched_inputs)
        outputs, anchors = self.run(images.tensor, tokens["input_ids"], tokens["attention_mask"])
        if self.training:
            for i, x in enumerate(batched_inputs):
                if "instances" not in x:
                    raise ValueError(f"image {i}: training needs 'instances' (gt_boxes + token maps)")
            boxes = [x["instances"].gt_boxes.tensor.to(self.device) for x in batched_inputs]
            pmaps = [self.gt_positive_map(x, i) for i, x in enumerate(batched_inputs)]
            return self.loss(outputs, anchors, boxes, pmaps, tokens["attention_mask"])
        return self.inference(batched_inputs, outputs, anchors, images.image_sizes, tokens["attention_mask"].shape[1])

    def run(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The network on prepared tensors.

        Args:
            images: (B, 3, H, W) normalised, padded to 32; input_ids, attention_mask: (B, T).
        Returns:
            (head outputs of :class:`FiberHead` plus "features" (P3..P7 list) and "language"
            (the backbone's language dict), anchors per level [(H_l·W_l, 4)]).
        """
        features, language = self.backbone(images, input_ids, attention_mask)
        feats = [features[k] for k in self.in_features]
        outputs = self.head(feats, language["embedded"])
        outputs["features"], outputs["language"] = feats, language
        anchors = self.anchor_generator([f.shape[-2:] for f in feats])
        return outputs, anchors

    def multi_prompt_inference(self, batched_inputs: List[dict]) -> List[Dict[str, Instances]]:
        """Runs every (image, prompt) pair, ``prompts_per_batch`` at a time, and concatenates the
        detections of each image (sorted by score; labels are global across prompts)."""
        pairs, owner = [], []
        for i, x in enumerate(batched_inputs):
            prompts = x.get("prompts")
            if prompts is None:
                prompts = [{k: x[k] for k in ("caption", "label_spans", "label_to_tokens", "label_names") if k in x}]
            if not prompts:
                raise ValueError(f"image {i}: 'prompts' is empty; nothing to detect")
            base = {k: v for k, v in x.items() if k not in ("prompts", "caption", "label_spans", "label_to_tokens", "label_names")}
            for p in prompts:
                pairs.append({**base, **p})
                owner.append(i)
        per_image: List[List[Instances]] = [[] for _ in batched_inputs]
        for start in range(0, len(pairs), self.prompts_per_batch):
            results = self.forward(pairs[start:start + self.prompts_per_batch])
            for j, r in enumerate(results):
                per_image[owner[start + j]].append(r["instances"])
        merged = []
        for parts in per_image:
            inst = Instances.cat(parts) if len(parts) > 1 else parts[0]
            merged.append({"instances": reorder_instances(inst, torch.argsort(inst.scores, descending=True, stable=True))})
        return merged

    def inference(self, batched_inputs, outputs, anchors, image_sizes, num_tokens) -> List[Dict[str, Instances]]:
        results = []
        for i, x in enumerate(batched_inputs):
            mapping = self.label_map(x, i, num_tokens)
            boxes, scores, labels = postprocess_image(
                outputs, i, anchors, image_sizes[i], mapping,
                score_threshold=self.score_threshold, pre_nms_top_n=self.pre_nms_top_n,
                nms_threshold=self.nms_threshold, detections_per_image=self.detections_per_image,
                box_coder=self.box_coder,
            )
            out_hw = (x.get("height", image_sizes[i][0]), x.get("width", image_sizes[i][1]))
            inst = Instances(out_hw)
            inst.pred_boxes = Boxes(rescale_boxes(boxes, image_sizes[i], out_hw))
            inst.scores = scores
            inst.pred_classes = labels - 1
            inst.pred_labels = labels
            names: Optional[dict] = x.get("label_names")
            if names is not None:
                inst.pred_phrases = [names[int(lab)] for lab in labels]
            results.append({"instances": inst})
        return results


def reorder_instances(inst: Instances, order: torch.Tensor) -> Instances:
    """``inst[order]`` that also indexes list fields (``pred_phrases``), which Instances cannot.

    Args:
        inst: N instances.
        order: (K,) int64 indices into them (a permutation or a subset, e.g. NMS keep indices).
    """
    out = Instances(inst.image_size)
    for k, v in inst.get_fields().items():
        out.set(k, [v[j] for j in order.tolist()] if isinstance(v, list) else v[order])
    return out


def _tokenizer_from_cfg(cfg):
    """The tokenizer of MODEL.FIBER.TEXT.TOKENIZER, checked against the text tower's config."""
    t = cfg.MODEL.FIBER.TEXT
    if not t.TOKENIZER:
        return None
    tokenizer = build_tokenizer(resolve_path(t.TOKENIZER))
    if tokenizer.pad_token_id != t.PAD_TOKEN_ID:
        raise ValueError(
            f"MODEL.FIBER.TEXT.PAD_TOKEN_ID = {t.PAD_TOKEN_ID} but tokenizer {t.TOKENIZER} pads with id "
            f"{tokenizer.pad_token_id}"
        )
    if len(tokenizer) > t.VOCAB_SIZE:
        raise ValueError(f"tokenizer {t.TOKENIZER} has {len(tokenizer)} tokens > MODEL.FIBER.TEXT.VOCAB_SIZE {t.VOCAB_SIZE}")
    needed = t.MAX_QUERY_LEN + (t.PAD_TOKEN_ID + 1 if t.ARCH == "roberta" else 0)
    if needed > t.MAX_POSITIONS:
        raise ValueError(f"MODEL.FIBER.TEXT.MAX_POSITIONS = {t.MAX_POSITIONS} < {needed} positions needed for "
                         f"MAX_QUERY_LEN {t.MAX_QUERY_LEN} ({t.ARCH} positions)")
    return tokenizer
