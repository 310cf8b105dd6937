"""Image-text retrieval with the coarse model over whole sets (mixed into
:class:`~.meta_arch.FiberCoarsePretrain`).

Images and captions are given as the model's input dicts ("image" for images; "input_ids",
"attention_mask" for captions). Scores are (N images, M captions) float32 CPU tensors; row i,
column j scores image i against caption j. Run under ``torch.autocast`` to reproduce the official
fp16 evaluation (which quantises ITM scores to about 3 significant digits and creates ties).
"""
from typing import Sequence, Tuple

import torch

__all__ = ["RetrievalMixin"]


class RetrievalMixin:
    """ITC and ITM retrieval scores; each image and each caption is encoded once for ITC."""

    @torch.no_grad()
    def retrieval_image_embeddings(self, images: Sequence[dict], batch_size: int = 64) -> torch.Tensor:
        """(N, H) unit-norm contrastive image features, ``batch_size`` images per forward."""
        out = [self.image_features(self.preprocess_images(list(images[s:s + batch_size])))
               for s in range(0, len(images), batch_size)]
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def retrieval_text_embeddings(self, captions: Sequence[dict], batch_size: int = 64) -> torch.Tensor:
        """(M, H) unit-norm contrastive caption features, ``batch_size`` captions per forward."""
        out = [self.text_features(*self.text_inputs(list(captions[s:s + batch_size])))
               for s in range(0, len(captions), batch_size)]
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def itc_score_matrix(self, images: Sequence[dict], captions: Sequence[dict], batch_size: int = 64) -> torch.Tensor:
        """(N, M) cosine similarities of the contrastive features (the official ITC retrieval
        score: no temperature)."""
        return self.retrieval_image_embeddings(images, batch_size) @ self.retrieval_text_embeddings(captions, batch_size).T

    @torch.no_grad()
    def itm_scores(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The ITM "match" logit of P pairs in one fused forward (the official ITM retrieval
        score, ``rank_output``). (P, 3, S, S) normalised images, (P, T) captions -> (P,)."""
        return self.itm_score.match_logit(self.fused_features(images, input_ids, attention_mask)["cls_feats"])

    @torch.no_grad()
    def score_pairs(self, image_input: dict, text_inputs: Sequence[dict]) -> torch.Tensor:
        """ITM match logits of one image against captions, in one fused forward (the image
        repeated, as the official evaluation does with batches of 64 captions); runs in eval mode
        whatever the model's mode. -> (len(text_inputs),) float32 CPU."""
        was_training = self.training
        self.eval()
        try:
            pixels = self.preprocess_images([image_input])
            ids, mask = self.text_inputs(list(text_inputs))
            return self.itm_scores(pixels.expand(len(text_inputs), -1, -1, -1), ids, mask).float().cpu()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def itm_score_matrix(self, images: Sequence[dict], captions: Sequence[dict], pairs_per_batch: int = 64) -> torch.Tensor:
        """(N, M) ITM match logits of every (image, caption) pair, as the official evaluation
        computes them (exhaustively, no ITC pre-selection): N·M fused passes, ``pairs_per_batch``
        pairs per forward, image-major."""
        n, m = len(images), len(captions)
        scores = torch.empty(n * m)
        for s in range(0, n * m, pairs_per_batch):
            flat = torch.arange(s, min(s + pairs_per_batch, n * m))
            scores[flat] = self._score_indexed_pairs(images, captions, flat // m, flat % m)
        return scores.view(n, m)

    @torch.no_grad()
    def itm_rerank(self, images: Sequence[dict], captions: Sequence[dict], itc_scores: torch.Tensor, k: int,
                   pairs_per_batch: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
        """ITM scores of the ITC top-k only (not the official protocol; faster).

        Image -> text: each image's k best captions by ``itc_scores`` get their ITM match logit;
        text -> image: each caption's k best images likewise. Every other entry is -inf. How this
        differs from the official exhaustive :meth:`itm_score_matrix`: a true match outside the
        ITC top-k can never be retrieved, ties among the k follow ITM alone, and the two
        directions come from two different matrices (an entry scored in one may be -inf in the
        other). Cost: k·(N + M) fused passes instead of N·M.

        Args:
            itc_scores: (N, M) from :meth:`itc_score_matrix`.
            k: candidates per query (clipped to the set sizes).
        Returns:
            (i2t, t2i): (N, M) each, for image->text and text->image ranking.
        """
        n, m = itc_scores.shape
        if (n, m) != (len(images), len(captions)):
            raise ValueError(f"itc_scores is {(n, m)} for {len(images)} images and {len(captions)} captions")
        i2t = torch.full((n, m), float("-inf"))
        t2i = torch.full((n, m), float("-inf"))
        top_t = itc_scores.topk(min(k, m), dim=1).indices  # (N, k) captions per image
        top_i = itc_scores.topk(min(k, n), dim=0).indices  # (k, M) images per caption
        pairs = (
            (i2t, torch.arange(n).repeat_interleave(top_t.shape[1]), top_t.reshape(-1)),
            (t2i, top_i.T.reshape(-1), torch.arange(m).repeat_interleave(top_i.shape[0])),
        )
        for matrix, rows, cols in pairs:
            for s in range(0, len(rows), pairs_per_batch):
                i, j = rows[s:s + pairs_per_batch], cols[s:s + pairs_per_batch]
                matrix[i, j] = self._score_indexed_pairs(images, captions, i, j)
        return i2t, t2i

    def _score_indexed_pairs(self, images: Sequence[dict], captions: Sequence[dict], img_idx: torch.Tensor,
                     txt_idx: torch.Tensor) -> torch.Tensor:
        """ITM match logits of the pairs (images[img_idx[p]], captions[txt_idx[p]]) -> (P,) CPU."""
        unique, inverse = torch.unique(img_idx, return_inverse=True)
        pixels = self.preprocess_images([images[int(i)] for i in unique])[inverse.to(self.device)]
        ids, mask = self.text_inputs([captions[int(j)] for j in txt_idx])
        return self.itm_scores(pixels, ids, mask).float().cpu()

