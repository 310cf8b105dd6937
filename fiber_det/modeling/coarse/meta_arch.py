"""FIBER's coarse-grained image-text model (``MODEL.META_ARCHITECTURE: FiberCoarsePretrain``):
the fusion backbone of the detector pre-trained on image-caption pairs with ITC, ITM (hard
negatives) and MLM, and used for image-text retrieval.

Batched inputs (a Detectron2 list of dicts, made by the image-caption mapper), per pair:
    "image": uint8 (3, S, S) RGB tensor, already resized to S x S (PIL bicubic, aspect ratio not
        kept; S = MODEL.FIBER.COARSE.IMAGE_SIZE). The model normalises it with the official
        float ops (ToTensor's /255, then Normalize with MODEL.PIXEL_MEAN/STD in 0-1 units), so
        the result is bit-identical to the official transform;
    "input_ids", "attention_mask", "special_tokens_mask": int64 (T,) tensors from the tokenizer
        of MODEL.FIBER.TEXT.TOKENIZER (padding to max_length T = MODEL.FIBER.TEXT.MAX_QUERY_LEN,
        truncation, special tokens; "special_tokens_mask" is needed for MLM in training only);
    "image_index", "caption_index": int, dataset-wide indices (used by retrieval evaluation,
        ignored by the model).
Training returns {"loss_mlm", "loss_itc", "loss_itm"} (the enabled ones, in the official order;
Detectron2 sums them, which is the official total). MLM masks are drawn here, not by the mapper
(:class:`~.objectives.MLMMasker`). The ITC queue is updated after every training step.
Evaluation returns, per input, {"image_embedding": (H,), "text_embedding": (H,)}: the unit-norm
ITC features (their dot product is the ITC retrieval score). Retrieval evaluation items carry one
half only ("modality" image: no text fields; "modality" text: no "image") and get that half's
embedding only. ITM scoring: ``score_pairs(image_input, text_inputs)`` (one image against a list
of captions, the evaluator's ``ItmScorer`` hook), and over whole sets
:meth:`~.retrieval.RetrievalMixin.itc_score_matrix`, ``itm_score_matrix`` (exhaustive, official)
and ``itm_rerank`` (ITC top-k, not official).

The ITC queue is not part of ``state_dict()`` (the official loader drops it from every checkpoint
it loads); a trainer that wants ``--resume`` to continue with the same queue (as the official
Lightning resume does) registers ``QueueCheckpoint(model.queue)`` with its checkpointer.

Differences from the fine-grained detector, all constructor arguments: window = S / 32 (the
relative-position tables depend on S); a stage whose token map is one window runs unshifted;
the Swin has a final ``norm`` and no stage-output norms; the fused (ITM/MLM) path applies neither
the Swin final norm nor the last text layer's output LayerNorm, while the contrastive path applies
both; the v3 query LayerNorm ``norm_i2t_i``; drop path 0.1 (configs/coarse).
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ...data.tokenization import build_tokenizer
from ...utils.paths import resolve_path
from ..backbone.fusion import FusionBottomUp
from .heads import ITMHead, MLMHead, Pooler, init_head_weights
from .objectives import (MLMMasker, hard_negative_weights, itc_logits, itc_loss, itm_pairs, itm_random_pairs,
                         sample_hard_negatives)
from .queue import ContrastiveQueue
from .retrieval import RetrievalMixin

__all__ = ["FiberCoarsePretrain"]


@META_ARCH_REGISTRY.register()
class FiberCoarsePretrain(RetrievalMixin, nn.Module):
    """Fusion backbone + contrastive projections/poolers, fused projections/poolers, ITC
    temperature and queue, ITM and MLM heads (official module names)."""

    # with an objective off (or ITC alone) the fused path and some heads get no gradient: DDP must
    # look for unused parameters, as the official Lightning run does (FiberTrainer reads this)
    find_unused_parameters = True

    @configurable
    def __init__(
        self,
        *,
        backbone: FusionBottomUp,
        embed_dim: int,
        image_size: int,
        text_length: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        tokenizer=None,
        vocab_size: int = 50265,
        itc: bool = True,
        itm: bool = True,
        mlm: bool = True,
        queue_size: int = 4096,
        temperature: float = 0.07,
        mlm_probability: float = 0.15,
        fused_output_norms: bool = False,
        pad_to_max: bool = True,
    ):
        """
        Args:
            backbone: a :class:`FusionBottomUp` whose Swin has a final ``norm``.
            embed_dim: H, width of the projections, poolers and heads.
            image_size: S; inputs must be S x S.
            text_length: T, the caption length of the ITC queue's token entries.
            pixel_mean, pixel_std: RGB, 0-1 units (applied after /255).
            tokenizer: a HF tokenizer with a mask token (needed for MLM training only).
            vocab_size: rows of the MLM decoder.
            itc, itm, mlm: the objectives (heads built). Training ITM with ITC draws hard
                negatives from the ITC scores (pre-training); without ITC it takes random ones:
                every input then carries a "false_image" (ITM retrieval fine-tuning).
            queue_size, temperature: ITC queue length and initial temperature.
            mlm_probability: MLM selection rate.
            fused_output_norms: apply the Swin final norm and the last text layer's output
                LayerNorm on the fused path too (official: False).
            pad_to_max: run the text tower on all T positions (official); False: only up to the
                longest caption of the batch (the trailing pads are masked, so the outputs are equal
                up to float round-off, and faster). The queue always stores T tokens.
        """
        super().__init__()
        if backbone.vision.norm is None:
            raise ValueError("the coarse model needs a Swin with a final norm (FusionBottomUp(cfg, final_norm=True))")
        if max(pixel_mean) > 1 or max(pixel_std) > 1:
            raise ValueError(f"MODEL.PIXEL_MEAN/STD {list(pixel_mean)}/{list(pixel_std)}: the coarse model divides "
                             "images by 255 first (ToTensor), so they are in 0-1 units, e.g. [0.485, 0.456, 0.406]")
        self.backbone = backbone
        self.image_size, self.text_length = image_size, text_length
        self.use_itc, self.use_itm, self.use_mlm = itc, itm, mlm
        self.fused_output_norms = fused_output_norms
        self.pad_to_max = pad_to_max
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        heads = _build_heads(backbone, embed_dim, vocab_size, mlm, itm)
        for name, module in heads.items():  # official names at the top level
            self.add_module(name, module)
        if itc:
            self.temp = nn.Parameter(torch.tensor(float(temperature)))
            self.queue = ContrastiveQueue(queue_size, embed_dim, image_size, text_length, keep_inputs=itm)
        self.tokenizer = tokenizer
        self.masker = MLMMasker(tokenizer, mlm_probability) if (mlm and tokenizer is not None) else None

    @classmethod
    def from_config(cls, cfg):
        f, c = cfg.MODEL.FIBER, cfg.MODEL.FIBER.COARSE
        if c.IMAGE_SIZE % 32:
            raise ValueError(f"MODEL.FIBER.COARSE.IMAGE_SIZE {c.IMAGE_SIZE} is not a multiple of 32")
        if f.SWIN.WINDOW_SIZE * 32 != c.IMAGE_SIZE:
            raise ValueError(f"MODEL.FIBER.SWIN.WINDOW_SIZE is {f.SWIN.WINDOW_SIZE}, but the coarse model's window "
                             f"is IMAGE_SIZE / 32 = {c.IMAGE_SIZE // 32} (the official model derives it)")
        return {
            "backbone": FusionBottomUp(cfg, out_indices=(), final_norm=True),
            "embed_dim": c.EMBED_DIM,
            "image_size": c.IMAGE_SIZE,
            "text_length": f.TEXT.MAX_QUERY_LEN,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "tokenizer": _tokenizer_from_cfg(cfg),  # MLM masking: <mask> id, vocabulary size
            "vocab_size": f.TEXT.VOCAB_SIZE,
            "itc": c.ITC_ON,
            "itm": c.ITM_ON,
            "mlm": c.MLM_ON,
            "queue_size": c.QUEUE_SIZE,
            "temperature": c.TEMPERATURE,
            "mlm_probability": c.MLM_PROBABILITY,
            "fused_output_norms": c.FUSED_OUTPUT_NORMS,
            "pad_to_max": f.TEXT.PAD_TO_MAX,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ---- inputs ----
    def preprocess_images(self, batched_inputs: List[dict]) -> torch.Tensor:
        """The "image" entries -> (B, 3, S, S) float32: x / 255, then (x - mean) / std."""
        for i, x in enumerate(batched_inputs):
            img = x.get("image")
            if not torch.is_tensor(img) or img.dtype != torch.uint8 or tuple(img.shape) != (3, self.image_size,
                                                                                             self.image_size):
                got = f"{img.dtype} {tuple(img.shape)}" if torch.is_tensor(img) else type(img).__name__
                raise ValueError(f"input {i}: 'image' must be a uint8 (3, {self.image_size}, {self.image_size}) "
                                 f"tensor (the mapper resizes to MODEL.FIBER.COARSE.IMAGE_SIZE), got {got}")
        images = torch.stack([x["image"] for x in batched_inputs]).to(self.device)
        # torchvision's ToTensor (to float, div 255) and Normalize (sub mean, div std), op for op
        return images.float().div(255).sub(self.pixel_mean).div(self.pixel_std)

    def text_inputs(self, batched_inputs: List[dict], keys=("input_ids", "attention_mask")) -> List[torch.Tensor]:
        """Stacks the token entries ``keys`` of every input -> [(B, T) int64 on the model's device]."""
        out = []
        for key in keys:
            rows = []
            for i, x in enumerate(batched_inputs):
                v = x.get(key)
                if not torch.is_tensor(v) or v.dim() != 1:
                    raise ValueError(f"input {i}: {key!r} must be a 1-D int64 tensor, got "
                                     f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
                rows.append(v)
            if len({r.shape[0] for r in rows}) > 1:
                raise ValueError(f"{key!r}: captions of different lengths {[r.shape[0] for r in rows]} in one batch "
                                 "(the mapper pads every caption to MODEL.FIBER.TEXT.MAX_QUERY_LEN)")
            out.append(torch.stack(rows).long().to(self.device))
        return out

    # ---- encoders ----
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Contrastive image features: whole Swin without fusion -> final norm -> projection ->
        token mean -> pooler -> L2 normalisation (no epsilon). (B, 3, S, S) -> (B, H)."""
        tokens = self.backbone.vision.norm(self.backbone.encode_image(images).tokens)
        x = self.cross_modal_image_transform_itc(tokens)
        v = self.cross_modal_image_pooler_itc(_token_mean(x))
        return v / v.norm(dim=-1, keepdim=True)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Contrastive text features: every text layer without fusion (all with their output
        LayerNorm) -> projection -> pooler on ``<s>`` -> L2 normalisation. (B, T) -> (B, H)."""
        input_ids, attention_mask = self._trim(input_ids, attention_mask)
        x = self.cross_modal_text_transform_itc(self.backbone.encode_text(input_ids, attention_mask))
        t = self.cross_modal_text_pooler_itc(x)
        return t / t.norm(dim=-1, keepdim=True)

    def fused_features(self, images: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The fused encoder on B (image, caption) pairs.

        Returns:
            {"text_feats": (B, T, H), "image_feats": (B, N, H) projected last tokens,
            "cls_feats": (B, 2H) [text pooler on <s> ; image pooler on the token mean]}.
        """
        bb = self.backbone
        input_ids, attention_mask = self._trim(input_ids, attention_mask)
        image, hidden = bb.fuse(bb.image_prefix(images), bb.text_prefix(input_ids, attention_mask),
                                last_text_norm=self.fused_output_norms)
        tokens = bb.vision.norm(image.tokens) if self.fused_output_norms else image.tokens
        text_feats = self.cross_modal_text_transform(hidden)
        image_feats = self.cross_modal_image_transform(tokens)
        cls_feats = torch.cat([self.cross_modal_text_pooler(text_feats),
                               self.cross_modal_image_pooler(_token_mean(image_feats))], dim=-1)
        return {"text_feats": text_feats, "image_feats": image_feats, "cls_feats": cls_feats}

    def _trim(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Without ``pad_to_max``: the (B, T) captions cut after the batch's last non-pad column."""
        if self.pad_to_max or input_ids.shape[1] == 0:
            return input_ids, attention_mask
        n = max(int(attention_mask.sum(1).max()), 1)
        return input_ids[:, :n], attention_mask[:, :n]

    # ---- forward ----
    def forward(self, batched_inputs: List[dict]):
        if not self.training:
            return self.embeddings(batched_inputs)
        images = self.preprocess_images(batched_inputs)
        input_ids, attention_mask = self.text_inputs(batched_inputs)
        mlm_ids = mlm_labels = None
        if self.use_mlm:
            if self.masker is None:
                raise ValueError("MLM training needs a tokenizer: set MODEL.FIBER.TEXT.TOKENIZER")
            (special,) = self.text_inputs(batched_inputs, keys=("special_tokens_mask",))
            mlm_ids, mlm_labels = self.masker(input_ids, special)
        false_images = None
        if self.use_itm and not self.use_itc:
            missing = [i for i, x in enumerate(batched_inputs) if "false_image" not in x]
            if missing:
                raise ValueError(f"inputs {missing} lack 'false_image': ITM without ITC trains on random negatives, "
                                 "which the training mapper draws (ImageCaptionMapper(false_images=...))")
            false_images = self.preprocess_images([{"image": x["false_image"]} for x in batched_inputs])
        return self.losses(images, input_ids, attention_mask, mlm_ids, mlm_labels, false_images=false_images)

    @torch.no_grad()
    def embeddings(self, batched_inputs: List[dict]) -> List[Dict[str, torch.Tensor]]:
        """Unit-norm contrastive features of each input's halves: "image_embedding" (H,) when it
        has an "image", "text_embedding" (H,) when it has "input_ids" (retrieval items carry one)."""
        has_image = [i for i, x in enumerate(batched_inputs) if "image" in x]
        has_text = [i for i, x in enumerate(batched_inputs) if "input_ids" in x]
        neither = sorted(set(range(len(batched_inputs))) - set(has_image) - set(has_text))
        if neither:
            raise ValueError(f"inputs {neither} have neither 'image' nor 'input_ids'")
        out: List[Dict[str, torch.Tensor]] = [{} for _ in batched_inputs]
        if has_image:
            v = self.image_features(self.preprocess_images([batched_inputs[i] for i in has_image]))
            for i, row in zip(has_image, v):
                out[i]["image_embedding"] = row
        if has_text:
            t = self.text_features(*self.text_inputs([batched_inputs[i] for i in has_text]))
            for i, row in zip(has_text, t):
                out[i]["text_embedding"] = row
        return out

    def losses(self, images, input_ids, attention_mask, mlm_input_ids=None, mlm_labels=None,
               record: Optional[dict] = None, false_images=None) -> Dict[str, torch.Tensor]:
        """One training step on prepared tensors, in the official order MLM, ITC, ITM.

        Args:
            images: (B, 3, S, S) normalised; input_ids, attention_mask: (B, T).
            mlm_input_ids, mlm_labels: (B, T) masked ids and labels (-100 = not selected).
            record: when a dict, filled with the step's intermediate tensors (for inspection).
            false_images: (B, 3, S, S) normalised random images, for ITM without ITC.
        Returns:
            {"loss_mlm", "loss_itc", "loss_itm"} of the enabled objectives. In training mode the
            ITC queue receives this batch after the hard negatives were drawn.
        """
        if self.use_itm and not self.use_itc and false_images is None:
            raise ValueError("ITM without ITC trains on random negatives: pass false_images")
        record = {} if record is None else record
        losses = {}
        if self.use_mlm:
            logits = self.mlm_score(self.fused_features(images, mlm_input_ids, attention_mask)["text_feats"])
            record["mlm_logits"] = logits
            labels = mlm_labels[:, :logits.shape[1]]  # pads (cut without pad_to_max) are never selected
            losses["loss_mlm"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if self.use_itc:
            losses["loss_itc"], negatives = self._itc_step(images, input_ids, attention_mask, record)
        if self.use_itm:
            if self.use_itc:  # hard negatives: 3B pairs
                imgs, ids, mask, labels = itm_pairs(images, input_ids, attention_mask, *negatives)
            else:  # random negatives: B pairs, half of them with their false image
                (imgs, labels), ids, mask = itm_random_pairs(images, false_images), input_ids, attention_mask
            fused = self.fused_features(imgs, ids, mask)
            logits = self.itm_score(fused["cls_feats"])
            record.update(itm_logits=logits, itm_labels=labels, itm_cls_feats=fused["cls_feats"],
                          itm_input_ids=ids, itm_attention_mask=mask)
            losses["loss_itm"] = F.cross_entropy(logits, labels)
        return losses

    def _itc_step(self, images, input_ids, attention_mask, record):
        """ITC loss, hard negatives (drawn before the enqueue; copies) and the queue update."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 1.0)
        v = self.image_features(images)
        t = self.text_features(input_ids, attention_mask)
        sim_i2t, sim_t2i = itc_logits(v, t, self.queue.image_queue, self.queue.text_queue, self.temp)
        loss, loss_i2t, loss_t2i = itc_loss(sim_i2t, sim_t2i)
        record.update(temp=self.temp.detach().clone(), image_feat=v, text_feat=t, sim_i2t=sim_i2t, sim_t2i=sim_t2i,
                      loss_i2t=loss_i2t, loss_t2i=loss_t2i)
        negatives = None
        if self.use_itm:
            n = self.queue.num_filled
            w_i2t, w_t2i = hard_negative_weights(sim_i2t, n), hard_negative_weights(sim_t2i, n)
            image_neg, text_neg = sample_hard_negatives(w_t2i, w_i2t)
            negatives = (self.queue.select_images(image_neg, images),
                         *self.queue.select_texts(text_neg, input_ids, attention_mask))
            record.update(weights_i2t=w_i2t, weights_t2i=w_t2i, image_neg=image_neg, text_neg=text_neg)
        if self.training:
            if self.queue.keep_inputs and input_ids.shape[1] != self.text_length:
                raise ValueError(f"captions have {input_ids.shape[1]} tokens, the queue holds "
                                 f"MODEL.FIBER.TEXT.MAX_QUERY_LEN = {self.text_length}")
            self.queue.push(v, t, images, input_ids, attention_mask)
        return loss, negatives


def _tokenizer_from_cfg(cfg):
    """The tokenizer of MODEL.FIBER.TEXT.TOKENIZER (None when unset), checked against the text
    tower: MLM draws random ids in [0, len(tokenizer)), which the embeddings must hold."""
    t = cfg.MODEL.FIBER.TEXT
    if not t.TOKENIZER:
        return None
    tokenizer = build_tokenizer(resolve_path(t.TOKENIZER))
    if tokenizer.pad_token_id != t.PAD_TOKEN_ID or len(tokenizer) > t.VOCAB_SIZE:
        raise ValueError(f"tokenizer {t.TOKENIZER} (pad id {tokenizer.pad_token_id}, {len(tokenizer)} tokens) does not "
                         f"fit MODEL.FIBER.TEXT.PAD_TOKEN_ID {t.PAD_TOKEN_ID} / VOCAB_SIZE {t.VOCAB_SIZE}")
    return tokenizer


def _build_heads(backbone: FusionBottomUp, embed_dim: int, vocab_size: int, mlm: bool, itm: bool) -> nn.ModuleDict:
    """Projections and poolers of both paths (always built, as officially), the MLM and ITM
    heads, with the official initialisation."""
    text_dim, image_dim = backbone.text.config.hidden_size, backbone.vision.num_features[-1]
    heads = nn.ModuleDict()
    heads["cross_modal_text_transform"] = nn.Linear(text_dim, embed_dim)
    heads["cross_modal_image_transform"] = nn.Linear(image_dim, embed_dim)
    heads["cross_modal_text_transform_itc"] = nn.Linear(text_dim, embed_dim)
    heads["cross_modal_image_transform_itc"] = nn.Linear(image_dim, embed_dim)
    for name in ("image", "text"):
        heads[f"cross_modal_{name}_pooler"] = Pooler(embed_dim)
        heads[f"cross_modal_{name}_pooler_itc"] = Pooler(embed_dim)
    if mlm:
        heads["mlm_score"] = MLMHead(embed_dim, vocab_size)
    if itm:
        heads["itm_score"] = ITMHead(2 * embed_dim)
    heads.apply(init_head_weights)
    return heads


def _token_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, N, H) -> (B, 1, H) mean over tokens (the official AdaptiveAvgPool1d(1))."""
    return F.adaptive_avg_pool1d(x.transpose(1, 2), 1).transpose(1, 2)
