"""The ITC queue of the coarse model: the last ``size`` training samples' contrastive features
and, for ITM hard negatives, their inputs (ALBEF's queue without a momentum encoder).

Official behaviour kept:
- the feature queues start as un-normalised ``torch.randn`` columns and enter the contrastive
  loss from the first step on (all ``size`` columns, whatever has been written);
- after every training micro-batch the features (unit-norm), the normalised input images, the
  token ids and the attention masks of all processes are gathered (no gradient) and written at
  ``queue_ptr``, wrapping around the end; ``queue_total`` counts every sample ever written (it is
  not capped at ``size``);
- hard negatives are drawn among the batch and the first ``min(queue_total, size)`` entries only.

Input entries are never read before they are written (candidates stop at ``queue_total``), so
the input queues start uninitialised (``torch.empty``) instead of the official randn / zeros:
same behaviour, and memory is only touched as entries are written.

The buffers are not part of the model's ``state_dict`` (the official loader drops them from every
checkpoint it loads): :class:`QueueCheckpoint` saves and restores them with the trainer state,
as the official Lightning resume does.
"""
from typing import Dict

import torch
from torch import nn

from detectron2.utils import comm

__all__ = ["ContrastiveQueue", "QueueCheckpoint"]


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenates ``t`` of every process along dim 0 (no gradient); ``t`` itself when alone."""
    if comm.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(comm.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class ContrastiveQueue(nn.Module):
    """FIFO of features (columns of ``image_queue`` / ``text_queue``) and, with ``keep_inputs``,
    of inputs (``image_input_queue``, ``text_input_queue``, ``text_input_mask_queue``).

    Args:
        size: number of entries.
        feature_dim: H, the contrastive feature width.
        image_size, text_length: S and T of the stored inputs.
        keep_inputs: store the inputs (needed by ITM hard negatives).
    """

    NAMES = ("image_queue", "text_queue", "image_input_queue", "text_input_queue", "text_input_mask_queue",
             "queue_ptr", "queue_total")

    def __init__(self, size: int, feature_dim: int, image_size: int, text_length: int, keep_inputs: bool = True):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.size = size
        self.keep_inputs = keep_inputs
        self.register_buffer("image_queue", torch.randn(feature_dim, size), persistent=False)
        self.register_buffer("text_queue", torch.randn(feature_dim, size), persistent=False)
        if keep_inputs:
            self.register_buffer("image_input_queue", torch.empty(size, 3, image_size, image_size), persistent=False)
            self.register_buffer("text_input_queue", torch.empty(size, text_length, dtype=torch.long), persistent=False)
            self.register_buffer("text_input_mask_queue", torch.empty(size, text_length, dtype=torch.long),
                                 persistent=False)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("queue_total", torch.zeros(1, dtype=torch.long), persistent=False)

    @property
    def num_filled(self) -> int:
        """Entries written so far, at most ``size``: the hard-negative candidates."""
        return min(int(self.queue_total), self.size)

    @torch.no_grad()
    def push(self, image_feat: torch.Tensor, text_feat: torch.Tensor, images: torch.Tensor = None,
             input_ids: torch.Tensor = None, attention_mask: torch.Tensor = None) -> None:
        """Gathers the batch of every process and writes it at ``queue_ptr`` (wrapping around).

        Args:
            image_feat, text_feat: (B, H) unit-norm contrastive features.
            images: (B, 3, S, S) normalised images; input_ids, attention_mask: (B, T). Required
                when the queue keeps inputs.
        """
        rows = [_gather(image_feat.detach()), _gather(text_feat.detach())]
        targets = [self.image_queue.T, self.text_queue.T]
        if self.keep_inputs:
            if images is None or input_ids is None or attention_mask is None:
                raise ValueError("this queue keeps the inputs for ITM: pass images, input_ids and attention_mask")
            rows += [_gather(images), _gather(input_ids), _gather(attention_mask)]
            targets += [self.image_input_queue, self.text_input_queue, self.text_input_mask_queue]
        n = rows[0].shape[0]
        if n > self.size:
            raise ValueError(f"{n} samples per step exceed the queue size {self.size}")
        ptr = int(self.queue_ptr)
        first = min(n, self.size - ptr)
        for src, dst in zip(rows, targets):
            if src.shape[1:] != dst.shape[1:]:
                raise ValueError(f"queue entries are {tuple(dst.shape[1:])}, got {tuple(src.shape[1:])}")
            dst[ptr:ptr + first] = src[:first]
            dst[:n - first] = src[first:]
        self.queue_ptr[0] = (ptr + n) % self.size
        self.queue_total[0] += n

    def select_images(self, index: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Hard-negative images by candidate index: j < B is batch image j, j >= B is queue entry
        j - B. (K,) indices, (B, 3, S, S) batch -> (K, 3, S, S), a copy that a later
        :meth:`push` cannot change."""
        b = images.shape[0]
        return torch.stack([images[j] if j < b else self.image_input_queue[j - b] for j in index.tolist()])

    def select_texts(self, index: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Hard-negative captions by candidate index (as :meth:`select_images`) -> (ids, masks),
        each (K, T)."""
        b = input_ids.shape[0]
        rows = [(input_ids[j], attention_mask[j]) if j < b else (self.text_input_queue[j - b],
                                                                  self.text_input_mask_queue[j - b])
                for j in index.tolist()]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def snapshot(self) -> Dict[str, torch.Tensor]:
        """{name: tensor} of every buffer (shared, not copied)."""
        return {name: getattr(self, name) for name in self.NAMES if hasattr(self, name)}

    @torch.no_grad()
    def restore(self, state: Dict[str, torch.Tensor]) -> None:
        """Copies a :meth:`snapshot` into the buffers; every buffer must be present, same shapes."""
        own = self.snapshot()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k}: saved {tuple(state[k].shape)} vs queue {tuple(v.shape)}"
                        for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape))
        if missing or unexpected or shapes:
            raise ValueError(f"queue state does not fit: missing {missing}, unexpected {unexpected}, shapes {shapes}")
        for k, v in own.items():
            v.copy_(state[k])


class QueueCheckpoint:
    """Checkpointable view of a :class:`ContrastiveQueue` for Detectron2's checkpointer, e.g.
    ``DetectionCheckpointer(model, dir, itc_queue=QueueCheckpoint(model.queue))``."""

    def __init__(self, queue: ContrastiveQueue):
        self.queue = queue

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.queue.snapshot().items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.queue.restore(state)
