"""The coarse model's objectives as functions of tensors: ITC logits and loss, hard-negative
sampling for ITM, ITM pairs (hard or random negatives), and MLM masking. Shapes: B batch, H contrastive width, Q queue size.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from transformers import DataCollatorForLanguageModeling

__all__ = ["itc_logits", "itc_loss", "hard_negative_weights", "sample_hard_negatives", "itm_pairs",
           "itm_random_pairs", "MLMMasker"]


def itc_logits(image_feat: torch.Tensor, text_feat: torch.Tensor, image_queue: torch.Tensor,
               text_queue: torch.Tensor, temp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Similarities against [batch ; queue], divided by the temperature.

    The batch's own keys are detached (the official model has no momentum encoder: the
    image-to-text loss trains only the image side and ``temp``, and vice versa).

    Args:
        image_feat, text_feat: (B, H) unit-norm features.
        image_queue, text_queue: (H, Q) queued features (columns).
        temp: 0-dim temperature.
    Returns:
        (sim_i2t, sim_t2i), each (B, B + Q).
    """
    text_all = torch.cat([text_feat.t().detach(), text_queue.detach()], dim=1)
    image_all = torch.cat([image_feat.t().detach(), image_queue.detach()], dim=1)
    return image_feat @ text_all / temp, text_feat @ image_all / temp


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy of each row against its own batch column, both directions) / 2.

    Returns:
        (loss_itc, loss_i2t, loss_t2i).
    """
    target = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
    loss_i2t = F.cross_entropy(sim_i2t, target)
    loss_t2i = F.cross_entropy(sim_t2i, target)
    return (loss_i2t + loss_t2i) / 2.0, loss_i2t, loss_t2i


@torch.no_grad()
def hard_negative_weights(sim: torch.Tensor, num_queued: int) -> torch.Tensor:
    """Sampling weights over the candidates [batch ; first ``num_queued`` queue entries].

    Official rule: softmax of the temperature-scaled similarities over those candidates only,
    then the positive pair (b, b) set to 0, without renormalising; other captions of the same
    image, or the same pair sitting in the queue, stay candidates.

    Args:
        sim: (B, B + Q) from :func:`itc_logits`.
        num_queued: filled queue entries (at most Q).
    Returns:
        (B, B + num_queued).
    """
    w = F.softmax(sim[:, :sim.shape[0] + num_queued], dim=1)
    w.fill_diagonal_(0)
    return w


@torch.no_grad()
def sample_hard_negatives(weights_t2i: torch.Tensor, weights_i2t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One negative image per text and one negative text per image, as the official code draws
    them: ``torch.multinomial(w + 1e-9, 1)`` row by row, first every image negative (rows of
    ``weights_t2i``), then every text negative (rows of ``weights_i2t``), from the default
    generator of the weights' device. The 1e-9 leaves the positive a tiny chance.

    Returns:
        (image_neg, text_neg): (B,) candidate indices (j < B: batch item j, else queue entry j - B).
    """
    draws = [torch.multinomial(w[b] + 1e-9, 1)
             for w in (weights_t2i, weights_i2t) for b in range(w.shape[0])]
    idx = torch.cat(draws)
    b = weights_t2i.shape[0]
    return idx[:b], idx[b:]


def itm_pairs(images, input_ids, attention_mask, neg_images, neg_ids, neg_mask):
    """The 3B ITM pairs: (image b, text b) matched, (image b, negative text b) and (negative image
    b, text b) not matched.

    Returns:
        (images (3B, 3, S, S), input_ids (3B, T), attention_mask (3B, T), labels (3B,) int64).
    """
    b = images.shape[0]
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(images.device)
    return (
        torch.cat([images, images, neg_images]),
        torch.cat([input_ids, neg_ids, input_ids]),
        torch.cat([attention_mask, neg_mask, attention_mask]),
        labels,
    )


def itm_random_pairs(images: torch.Tensor, false_images: torch.Tensor):
    """ITM with random negatives (the official ITM-only fine-tuning): floor(B/2) labels 1 and the
    rest 0, shuffled with ``torch.randperm`` (global CPU generator); a pair labelled 0 swaps its
    image for its ``false_images`` row (an image drawn at random from the training set by the
    data loader, which can be the true one).

    Args:
        images, false_images: (B, 3, S, S).
    Returns:
        (images (B, 3, S, S), labels (B,) int64).
    """
    b = images.shape[0]
    labels = torch.cat([torch.ones(b // 2), torch.zeros(b - b // 2)])[torch.randperm(b)].long().to(images.device)
    return torch.where(labels.view(-1, 1, 1, 1).bool(), images, false_images), labels


class MLMMasker:
    """Hugging Face's language-modelling collator rule, applied to a padded batch: each
    non-special token is selected with ``probability``; a selected token becomes ``<mask>`` (80 %),
    a uniformly random id in [0, len(tokenizer)) (10 %, special ids included) or stays (10 %);
    labels are the original ids at selected positions and -100 elsewhere.

    Random numbers come from the global CPU torch generator of the calling process (Detectron2
    seeds it per process); the official code draws the same way inside its data-loader workers.
    """

    def __init__(self, tokenizer, probability: float = 0.15):
        if tokenizer.mask_token is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token: MLM needs one")
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=probability)

    def __call__(self, input_ids: torch.Tensor, special_tokens_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and 1-for-special mask (``<s>``, ``</s>``, pads) -> (masked ids, labels), on
        the device of ``input_ids``."""
        ids, labels = self.collator.torch_mask_tokens(input_ids.detach().cpu().clone(), special_tokens_mask.cpu())
        return ids.to(input_ids.device), labels.to(input_ids.device)
