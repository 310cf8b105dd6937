"""Shared-prefix inference: what a prompt does not change is computed once per image, what an
image does not change once per prompt.

FIBER fuses the two towers only in their last blocks (``backbone/fusion.py``), so the detector's
forward on an (image, prompt) pair splits into
  * the image prefix (patch embedding and the Swin blocks before the first fused one), a function
    of the image alone: computed once per image;
  * the text prefix (embeddings and the text layers before the first fused one), a function of
    the prompt's token ids alone: computed once per prompt and kept in a :class:`TextPrefixCache`
    keyed by the token ids, so a vocabulary's chunks are encoded once for a whole evaluation;
  * the fused part (fused blocks and layers, FPN, head, post-processing), run on batches of
    (image prefix, text prefix) pairs.
Chunked evaluation (LVIS: 31 prompts per image) thus runs one image prefix instead of 31.

Every image runs at its own size (padded to a multiple of 32), as a batch of one image would
run on the sequential path (``FIBER.run`` per pair): zero padding enters the Swin windows, so
images padded to a common size give other features near their borders. Images of the same
padded size share fused batches. The detections equal the sequential path's per image up to
float rounding (tests/modeling/test_shared_prefix.py).
"""
from collections import OrderedDict
from typing import Dict, Hashable, List, Sequence, Tuple

import torch

from ..data.prompt import Prompt, collate_prompts
from .backbone.fusion import TextState
from .backbone.swin import SwinState

__all__ = ["TextPrefixCache", "shared_prefix_inference"]


class TextPrefixCache:
    """Text prefixes of prompts, least recently used dropped beyond ``capacity``.

    An entry is keyed by the prompt's token ids and padded length, and belongs to one state of the
    text tower: its weights (storage and in-place version of every parameter: an optimizer step,
    ``load_state_dict`` or an EMA update changes them), device and autocast dtype. A lookup in
    another state empties the cache first, so a stale prefix is never returned.
    """

    def __init__(self, capacity: int = 64):
        self.capacity = int(capacity)
        self._entries: "OrderedDict[Hashable, TextState]" = OrderedDict()
        self._owner: Hashable = None

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._owner = None

    @staticmethod
    def owner_key(text_tower: torch.nn.Module, device: torch.device) -> Hashable:
        """What the cached prefixes depend on besides the token ids."""
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        weights = tuple((p.data_ptr(), p._version) for p in text_tower.parameters())
        return (str(device), autocast, weights)

    def states(self, model, prompts: Sequence[Prompt], length: int) -> Dict[Tuple[int, ...], TextState]:
        """``{prompt.input_ids: text prefix (batch 1, length T)}`` of the distinct prompts; the
        missing ones are computed in batches of ``model.prompts_per_batch``. Caches only in eval
        mode without autograd (a training-mode prefix has dropout, a graph-holding one is not reusable)."""
        bottom_up = model.backbone.bottom_up
        use = not (model.training or torch.is_grad_enabled())
        if use:
            owner = self.owner_key(bottom_up.text, model.device)
            if owner != self._owner:
                self.clear()
                self._owner = owner
        found: Dict[Tuple[int, ...], TextState] = {}
        missing: Dict[Tuple[int, ...], Prompt] = {}
        for p in prompts:
            key = (p.input_ids, length)
            if p.input_ids in found or p.input_ids in missing:
                continue
            if use and key in self._entries:
                self._entries.move_to_end(key)
                found[p.input_ids] = self._entries[key]
            else:
                missing[p.input_ids] = p
        to_compute, step = list(missing.values()), model.prompts_per_batch
        for start in range(0, len(to_compute), step):
            group = to_compute[start:start + step]
            input_ids, attention_mask = collate_prompts(group, model.pad_token_id, length, pad_to_max=True)
            state = bottom_up.text_prefix(input_ids.to(model.device), attention_mask.to(model.device))
            for row, p in enumerate(group):
                found[p.input_ids] = state.row(row)
                if use:
                    self._entries[(p.input_ids, length)] = found[p.input_ids]
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return found


def _image_prefixes(model, batched_inputs) -> Tuple[List[SwinState], list]:
    """Each image's prefix at its own padded size, and its ImageList of one image."""
    prefixes, image_lists = [], []
    for x in batched_inputs:
        images = model.preprocess_images([x])
        image_lists.append(images)
        prefixes.append(model.backbone.bottom_up.image_prefix(images.tensor))
    return prefixes, image_lists


def _fused_batches(pairs: Sequence[Tuple[int, Prompt]], shapes: Sequence[tuple], size: int) -> List[list]:
    """Consecutive pairs of images with one padded shape, at most ``size`` per batch (pair order kept)."""
    batches: List[list] = []
    for pair in pairs:
        last = batches[-1] if batches else None
        if last is not None and len(last) < size and shapes[last[0][0]] == shapes[pair[0]]:
            last.append(pair)
        else:
            batches.append([pair])
    return batches


def shared_prefix_inference(model, batched_inputs: List[dict], pairs: Sequence[Tuple[int, Prompt]],
                            cache: TextPrefixCache) -> List[List]:
    """The detections of every (image index, prompt) pair through the shared-prefix path.

    Args:
        model: a :class:`~fiber_det.modeling.meta_arch.FIBER`.
        batched_inputs: the model's inputs (module docstring of ``meta_arch.py``).
        pairs: (image index, prompt) in the order the detections are wanted.
        cache: the text-prefix cache (kept by the model across calls).

    Returns:
        Per image, the Instances of its pairs in pair order (original frame, as
        :meth:`FIBER.postprocess` returns them).
    """
    length = model.max_query_len if model.pad_to_max else max(p.num_tokens for _, p in pairs)
    text = cache.states(model, [p for _, p in pairs], length)
    prefixes, image_lists = _image_prefixes(model, batched_inputs)
    shapes = [tuple(il.tensor.shape[-2:]) for il in image_lists]
    per_image: List[list] = [[] for _ in batched_inputs]
    for batch in _fused_batches(pairs, shapes, model.prompts_per_batch):
        image = SwinState.cat([prefixes[i] for i, _ in batch])
        outputs, anchors = model.run_fused(image, TextState.cat([text[p.input_ids] for _, p in batch]))
        sizes = [image_lists[i].image_sizes[0] for i, _ in batch]
        inputs = [batched_inputs[i] for i, _ in batch]
        for (i, _), inst in zip(batch, model.postprocess(outputs, anchors, sizes, inputs, [p for _, p in batch])):
            per_image[i].append(inst)
    return per_image
