"""The FIBER detector (``MODEL.META_ARCHITECTURE: FIBER``): images and prompts in, losses or
labelled detections out.

Batched inputs (Detectron2 list of dicts), per image:
    "image": (3, H, W) BGR 0-255 tensor, already resized (fiber_det.data mapper / predictor);
    "height", "width": original size for the output boxes (default: the input size);
    "prompts": a non-empty sequence of :class:`fiber_det.data.prompt.Prompt` made by
        :class:`~fiber_det.data.prompt.PromptBuilder`: one for a caption; at inference several
        for a vocabulary too long for one caption (its chunks, labels global). The model reads
        only each prompt's ``input_ids`` and ``token_map``.
  training (exactly one prompt):
    "instances": Instances with ``gt_boxes`` (legacy xyxy, resized frame) and ``gt_positive_map``
        (G, >= T) binary rows, the tokens of each box's label (``Prompt.positive_map``).
Different images of a batch may carry different prompts. At inference every (image, prompt) pair
is run and the detections of an image's chunks are merged by
:func:`~fiber_det.modeling.postprocess.merge_chunk_detections`. Two paths, equal up to float
rounding for a batch of one image (TEST.SHARED_PREFIX):
  * shared prefix (:mod:`fiber_det.modeling.shared_prefix`): each image's prefix once, at its own
    padded size; each prompt's text prefix once, cached across calls; the fused part on batches
    of ``prompts_per_batch`` pairs;
  * sequential (the parity path): :meth:`FIBER.run` on ``max(prompts_per_batch, len(batch))``
    pairs per forward, the images of a forward zero-padded to a common size.

Output per image: {"instances": Instances(pred_boxes, scores, pred_classes = label - 1,
pred_labels = label)} in the original image frame.

The network itself is :meth:`FIBER.run` on tensors (images, input_ids, attention_mask), the
entry point for exports and tools that bring their own tensors.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, ImageList, Instances

from ..data.prompt import Prompt, collate_prompts
from .backbone.fusion import TextState
from .backbone.swin import SwinState
from .head.atss import LegacyAnchorGenerator, LegacyBoxCoder
from .head.grounding_head import FiberHead
from .head.losses import FiberLoss
from .postprocess import merge_chunk_detections, postprocess_image, rescale_boxes
from .shared_prefix import TextPrefixCache, shared_prefix_inference

__all__ = ["FIBER"]


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
        pixel_mean,
        pixel_std,
        pad_token_id: int,
        max_query_len: int = 256,
        pad_to_max: bool = True,
        score_threshold: float = 0.05,
        pre_nms_top_n: int = 1000,
        nms_threshold: float = 0.6,
        detections_per_image: int = 100,
        prompts_per_batch: int = 8,
        shared_prefix: bool = True,
    ):
        """
        Args:
            backbone: :class:`FiberBackbone` (images + tokens -> P3..P7, language dict).
            head: :class:`FiberHead`; anchor_generator: legacy anchors per level; loss: FiberLoss.
            pixel_mean, pixel_std: BGR, 0-255 units.
            pad_token_id: the tokenizer's pad id (MODEL.FIBER.TEXT.PAD_TOKEN_ID).
            max_query_len, pad_to_max: tokens read per caption / pad every caption to it
                (official: 256, True) or to the longest of the batch.
            score_threshold, pre_nms_top_n, nms_threshold, detections_per_image: inference.
            prompts_per_batch: (image, prompt) pairs per forward for inputs with several prompts.
            shared_prefix: inference through the shared-prefix path (module docstring).
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.anchor_generator = anchor_generator
        self.loss = loss
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.pad_token_id = int(pad_token_id)
        self.max_query_len = max_query_len
        self.pad_to_max = pad_to_max
        self.score_threshold = score_threshold
        self.pre_nms_top_n = pre_nms_top_n
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.prompts_per_batch = max(1, int(prompts_per_batch))
        self.shared_prefix = bool(shared_prefix)
        self.text_prefix_cache = TextPrefixCache()
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
        t = f.TEXT
        needed = t.MAX_QUERY_LEN + (t.PAD_TOKEN_ID + 1 if t.ARCH == "roberta" else 0)
        if needed > t.MAX_POSITIONS:
            raise ValueError(f"MODEL.FIBER.TEXT.MAX_POSITIONS = {t.MAX_POSITIONS} < {needed} positions needed for "
                             f"MAX_QUERY_LEN {t.MAX_QUERY_LEN} ({t.ARCH} positions)")
        return {
            "backbone": backbone,
            "head": FiberHead(cfg, [shapes[k] for k in in_features]),
            "anchor_generator": LegacyAnchorGenerator(
                [shapes[k].stride for k in in_features], ag.SIZES, ag.ASPECT_RATIOS[0]
            ),
            "loss": FiberLoss(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "pad_token_id": t.PAD_TOKEN_ID,
            "max_query_len": t.MAX_QUERY_LEN,
            "pad_to_max": t.PAD_TO_MAX,
            "score_threshold": f.ATSS.INFERENCE_TH,
            "pre_nms_top_n": f.ATSS.PRE_NMS_TOP_N,
            "nms_threshold": f.ATSS.NMS_TH,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "prompts_per_batch": cfg.TEST.PROMPTS_PER_BATCH,
            "shared_prefix": cfg.TEST.SHARED_PREFIX,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        """Also empties the text-prefix cache when training starts (its memory is not kept, and
        the weights are about to change)."""
        if mode:
            self.text_prefix_cache.clear()
        return super().train(mode)

    # ---- inputs ----
    def preprocess_images(self, batched_inputs: List[dict]) -> ImageList:
        """Normalise (BGR, 0-255, mean/std) then zero-pad to a multiple of 32."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility, pad_value=0.0)

    def text_inputs(self, prompts: Sequence[Prompt]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` (B, T) of the prompts on the model's device
        (T = max_query_len, or the longest prompt without pad_to_max)."""
        input_ids, attention_mask = collate_prompts(prompts, self.pad_token_id, self.max_query_len, self.pad_to_max)
        return input_ids.to(self.device), attention_mask.to(self.device)

    @staticmethod
    def prompts_of(x: dict, i: int) -> Tuple[Prompt, ...]:
        """The prompts of input ``i``, checked."""
        prompts = x.get("prompts")
        if prompts is None or isinstance(prompts, (str, Prompt)) or not isinstance(prompts, Sequence):
            raise ValueError(f"image {i}: 'prompts' must be a sequence of Prompt (fiber_det.data.prompt.PromptBuilder); "
                             f"got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError(f"image {i}: 'prompts' is empty; nothing to detect")
        return tuple(prompts)

    # ---- forward ----
    def forward(self, batched_inputs: List[dict]):
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs)

    def run(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The network on prepared tensors (the model's tensor-level entry point).

        Args:
            images: (B, 3, H, W) normalised BGR (:meth:`preprocess_images`), H and W multiples of 32.
            input_ids, attention_mask: (B, T) int64 (:meth:`text_inputs`).

        Returns:
            ``(outputs, anchors)``: the :class:`FiberHead` outputs ("box_deltas", "centerness",
            "token_logits", one tensor per level P3..P7) and the anchors per level [(H_l·W_l, 4)],
            shared by every image of the batch.
        """
        return self._head_outputs(*self.backbone(images, input_ids, attention_mask))

    def run_fused(self, image: SwinState, text: TextState):
        """:meth:`run` from an image prefix and a text prefix of the same batch size
        (``backbone.bottom_up.image_prefix`` / ``text_prefix``); returns what :meth:`run` returns."""
        return self._head_outputs(*self.backbone.fused(image, text))

    def _head_outputs(self, features, language):
        feats = [features[k] for k in self.in_features]
        outputs = self.head(feats, language["embedded"])
        anchors = self.anchor_generator([f.shape[-2:] for f in feats])
        return outputs, anchors

    def losses(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        """Training losses of a batch whose inputs carry one prompt and ``instances`` each."""
        prompts = []
        for i, x in enumerate(batched_inputs):
            if "instances" not in x:
                raise ValueError(f"image {i}: training needs 'instances' (gt_boxes + gt_positive_map)")
            if not x["instances"].has("gt_positive_map"):
                raise ValueError(f"image {i}: instances need 'gt_positive_map' (Prompt.positive_map of the box labels)")
            own = self.prompts_of(x, i)
            if len(own) != 1:
                raise ValueError(f"image {i}: training takes exactly one prompt per image, got {len(own)}")
            prompts.append(own[0])
        images = self.preprocess_images(batched_inputs)
        input_ids, attention_mask = self.text_inputs(prompts)
        outputs, anchors = self.run(images.tensor, input_ids, attention_mask)
        boxes = [x["instances"].gt_boxes.tensor.to(self.device) for x in batched_inputs]
        pmaps = [x["instances"].gt_positive_map.to(self.device) for x in batched_inputs]
        return self.loss(outputs, anchors, boxes, pmaps, attention_mask)

    def inference(self, batched_inputs: List[dict], max_merged_detections: int = 0) -> List[Dict[str, Instances]]:
        """Detections of every image over all of its prompts.

        Args:
            batched_inputs: see the module docstring.
            max_merged_detections: cut of an image's merged multi-chunk detections, see
                :func:`~fiber_det.modeling.postprocess.merge_chunk_detections` (0: none, the
                official evaluation rule).
        """
        pairs = [(i, p) for i, x in enumerate(batched_inputs) for p in self.prompts_of(x, i)]
        for i, p in pairs:
            unscored = [label for label, tokens in p.token_map.items() if not tokens]
            if not p.token_map or unscored:
                what = f"label {unscored[0]} maps to no token" if unscored else "it has no label"
                raise ValueError(f"image {i}: prompt {p.caption!r} cannot be scored: {what}")
        if self.shared_prefix:
            per_image = shared_prefix_inference(self, batched_inputs, pairs, self.text_prefix_cache)
            return [{"instances": merge_chunk_detections(parts, max_merged_detections)} for parts in per_image]
        step = max(self.prompts_per_batch, len(batched_inputs))
        per_image: List[List[Instances]] = [[] for _ in batched_inputs]
        for start in range(0, len(pairs), step):
            group = pairs[start:start + step]
            inputs = [batched_inputs[i] for i, _ in group]
            prompts = [p for _, p in group]
            images = self.preprocess_images(inputs)
            input_ids, attention_mask = self.text_inputs(prompts)
            outputs, anchors = self.run(images.tensor, input_ids, attention_mask)
            for (i, _), inst in zip(group, self.postprocess(outputs, anchors, images.image_sizes, inputs, prompts)):
                per_image[i].append(inst)
        return [{"instances": merge_chunk_detections(parts, max_merged_detections)} for parts in per_image]

    def postprocess(self, outputs, anchors, image_sizes, inputs: Sequence[dict],
                    prompts: Sequence[Prompt]) -> List[Instances]:
        """Instances of every batch row (row j: ``inputs[j]`` with ``prompts[j]``) in the original frame."""
        results = []
        for j, (x, prompt) in enumerate(zip(inputs, prompts)):
            boxes, scores, labels = postprocess_image(
                outputs, j, anchors, image_sizes[j], prompt.token_map,
                score_threshold=self.score_threshold, pre_nms_top_n=self.pre_nms_top_n,
                nms_threshold=self.nms_threshold, detections_per_image=self.detections_per_image,
                box_coder=self.box_coder,
            )
            out_hw = (x.get("height", image_sizes[j][0]), x.get("width", image_sizes[j][1]))
            inst = Instances(out_hw)
            inst.pred_boxes = Boxes(rescale_boxes(boxes, image_sizes[j], out_hw))
            inst.scores = scores
            inst.pred_classes = labels - 1
            inst.pred_labels = labels
            results.append(inst)
        return results
