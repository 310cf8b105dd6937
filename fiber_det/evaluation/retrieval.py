"""Image–text retrieval recall: image->text and text->image R@1/5/10, ITC and ITM protocols.

Inputs are the items of :func:`fiber_det.data.datasets.caption_pairs.retrieval_items`: one image item
per image (the model answers ``{"image_embedding": (D,)}``) and one text item per caption
(``{"text_embedding": (D,)}``), both unit-norm (the official ITC features are L2-normalised).

**ITC protocol** (the official one): score[i, t] = <image_embedding_i, text_embedding_t> (fp32),
i.e. the cosine similarity, for every image i and caption t. Image->text (``i2t``): for each
image, the captions ranked by score; a hit at k if any of its captions (all are positives) is
among the first k; averaged over images. Text->image (``t2i``): for each caption, the images
ranked by score; a hit at k if its image is among the first k; averaged over captions. Values in
percent. **Ties**: the official code ranks with ``torch.topk``, whose order among equal scores is
unspecified; here equal scores rank by index, the lower ``caption_index`` / ``image_index`` first
(a stable sort), so results never depend on the device or the number of processes.

**ITM protocol** (``itm_mode``): "exhaustive" (official) scores every (image, caption) pair with
the model's ITM "match" logit and ranks by it, keys prefixed ``itm_``. "topk" (NOT the official
protocol; faster) scores only the ITC top-k captions of each image (for i2t) and the ITC top-k
images of each caption (for t2i); candidates rank by ITM before every non-candidate; keys
prefixed ``itm_top<k>_``. The ITM scores come from ``itm_scorer(image_indices, caption_indices)``
-> float tensor (len(image_indices), len(caption_indices)) of logits (:class:`ItmScorer` builds
one from the dataset, the mapper and the model's pair scoring); the evaluator calls it in
``evaluate()`` (after Detectron2 has left its inference context: the scorer must put the model in
eval mode itself) under ``torch.no_grad()``, one image per call with all the captions that image
needs, the images split over the processes.

Results under the task ``retrieval``: ``i2t_R@1``, ``i2t_R@5``, ``i2t_R@10``, ``t2i_R@1``,
``t2i_R@5``, ``t2i_R@10`` (+ the ITM keys). Several processes: the items are gathered without
duplicates (by ``image_index`` / ``caption_index``). Dumped to ``output_dir`` as
``retrieval_scores.npz`` (numpy, no pickle): ``image_index`` (N,), ``image_id`` (N,) str,
``caption_index`` (M,), ``caption_image_index`` (M,) (the image_index of each caption's image),
``itc`` (N, M) float32, ``itm_topk`` (0 = exhaustive) and, with ITM, ``itm`` (N, M) float32 (NaN
where a pair was not scored); tools/evaluate_predictions.py ``--task retrieval`` re-scores it.
"""
import logging
import os
import zipfile
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .gather import gather_unique

__all__ = [
    "RetrievalEvaluator", "ItmScorer", "RETRIEVAL_SCORES_FILE", "ITM_MODES", "first_hit_ranks", "itm_candidates",
    "score_retrieval", "load_retrieval_scores",
]

logger = logging.getLogger(__name__)

RETRIEVAL_SCORES_FILE = "retrieval_scores.npz"
ITM_MODES = ("", "exhaustive", "topk")
RECALL_KS = (1, 5, 10)
_NORM_TOLERANCE = 1e-2  # fp16 features normalised in fp32 are unit-norm far within this
_CHUNK = 256  # query rows sorted at once


def first_hit_ranks(scores: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-ranked positive (G when it has none).

    Gallery entries are sorted by decreasing score, equal scores in index order (stable sort).

    Args:
        scores: (Q, G) query x gallery scores.
        query_labels: (Q,) int; gallery entry g is a positive of query q iff
            ``gallery_labels[g] == query_labels[q]``.
        gallery_labels: (G,) int.

    Returns:
        (Q,) int64 ranks.
    """
    ranks = []
    for start in range(0, scores.shape[0], _CHUNK):
        order = torch.sort(scores[start:start + _CHUNK], dim=1, descending=True, stable=True).indices
        hits = gallery_labels[order] == query_labels[start:start + _CHUNK, None]
        first = hits.to(torch.int8).argmax(dim=1)  # argmax returns the first maximal index
        ranks.append(torch.where(hits.any(dim=1), first, torch.full_like(first, scores.shape[1])))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)


def _recalls(i2t: torch.Tensor, t2i: torch.Tensor, caption_image: torch.Tensor, prefix: str) -> Dict[str, float]:
    """R@k of both directions; ``i2t``/``t2i`` are (N_img, N_txt) ranking keys."""
    images = torch.arange(i2t.shape[0])
    ranks = {"i2t": first_hit_ranks(i2t, images, caption_image), "t2i": first_hit_ranks(t2i.T, caption_image, images)}
    return {f"{prefix}{d}_R@{k}": 100.0 * (r < k).double().mean().item() for d, r in ranks.items() for k in RECALL_KS}


def itm_candidates(itc: torch.Tensor, topk: int):
    """(i2t, t2i) bool (N_img, N_txt) masks: each image's ITC top-k captions, each caption's top-k images."""
    i2t = torch.zeros_like(itc, dtype=torch.bool)
    t2i = torch.zeros_like(itc, dtype=torch.bool)
    rows = torch.sort(itc, dim=1, descending=True, stable=True).indices[:, :topk]
    i2t.scatter_(1, rows, True)
    cols = torch.sort(itc, dim=0, descending=True, stable=True).indices[:topk]
    t2i.scatter_(0, cols, True)
    return i2t, t2i


def score_retrieval(itc: torch.Tensor, caption_image: torch.Tensor, itm: Optional[torch.Tensor] = None,
                    itm_topk: int = 0) -> "OrderedDict[str, Dict[str, float]]":
    """The recalls of a score matrix (see the module docstring).

    Args:
        itc: (N_img, N_txt) ITC scores.
        caption_image: (N_txt,) position (0..N_img-1) of each caption's image.
        itm: optional (N_img, N_txt) ITM logits (NaN where not scored).
        itm_topk: 0 for the exhaustive ITM protocol, else the k of the "topk" mode (>= 10).

    Returns:
        ``{"retrieval": {"i2t_R@1": ..., ...}}`` in percent.
    """
    _check_matrix(itc, "itc", caption_image)
    results = _recalls(itc, itc, caption_image, "")
    if itm is not None:
        _check_matrix(itm, "itm", caption_image, allow_nan=True)
        if itm_topk == 0:
            i2t_mask = t2i_mask = torch.ones_like(itm, dtype=torch.bool)
            prefix = "itm_"
        else:
            if itm_topk < max(RECALL_KS):
                raise ValueError(f"ITM top-k must be >= {max(RECALL_KS)} to give R@{max(RECALL_KS)}, got {itm_topk}")
            i2t_mask, t2i_mask = itm_candidates(itc, itm_topk)
            prefix = f"itm_top{itm_topk}_"
        if torch.isnan(itm[i2t_mask | t2i_mask]).any():
            raise ValueError("the ITM scores lack (are NaN for) pairs the protocol ranks")
        low = torch.tensor(float("-inf"))
        results.update(_recalls(torch.where(i2t_mask, itm, low), torch.where(t2i_mask, itm, low), caption_image,
                                prefix))
    return OrderedDict(retrieval=results)


def _check_matrix(scores: torch.Tensor, name: str, caption_image: torch.Tensor, allow_nan: bool = False) -> None:
    if scores.dim() != 2 or scores.shape[1] != caption_image.shape[0]:
        raise ValueError(f"{name} scores must be (images, {caption_image.shape[0]} captions), got {tuple(scores.shape)}")
    bad = torch.isinf(scores) if allow_nan else ~torch.isfinite(scores)
    if bad.any():
        raise ValueError(f"{name} scores hold {int(bad.sum())} non-finite value(s)")
    if caption_image.numel() and (caption_image.min() < 0 or caption_image.max() >= scores.shape[0]):
        raise ValueError("caption_image holds positions outside the image rows")


def load_retrieval_scores(path: str) -> "OrderedDict[str, Dict[str, float]]":
    """Re-scores a ``retrieval_scores.npz`` dump (same numbers as the evaluator printed)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a retrieval dump (a numpy .npz file without pickled data): {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a retrieval dump (a numpy .npz archive), got a single array")
    with archive as data:
        missing = [k for k in ("image_index", "caption_image_index", "itc") if k not in data]
        if missing:
            raise ValueError(f"{path}: not a retrieval dump, missing array(s) {missing}")
        positions = {int(v): p for p, v in enumerate(data["image_index"])}
        unknown = sorted({int(v) for v in data["caption_image_index"]} - set(positions))
        if unknown:
            raise ValueError(f"{path}: captions of image_index {unknown[:5]} have no image row")
        caption_image = torch.tensor([positions[int(v)] for v in data["caption_image_index"]], dtype=torch.int64)
        itm = torch.from_numpy(data["itm"]) if "itm" in data else None
        topk = int(data["itm_topk"]) if "itm_topk" in data else 0
        return score_retrieval(torch.from_numpy(data["itc"]), caption_image, itm, topk)


class ItmScorer:
    """An ``itm_scorer`` for :class:`RetrievalEvaluator` built from the dataset and a pair scorer.

    ``score_pairs(image_input, text_inputs) -> (len(text_inputs),)`` ITM logits is the model's
    part: ``image_input`` is one mapped image item, ``text_inputs`` up to ``batch_size`` mapped
    text items (official: the image repeated against batches of 64 captions). Each image is
    mapped once per call; text items are mapped once and kept.
    """

    def __init__(self, items: Sequence[dict], mapper: Callable[[dict], dict],
                 score_pairs: Callable[[dict, List[dict]], torch.Tensor], batch_size: int = 64):
        """
        Args:
            items: :func:`~fiber_det.data.datasets.caption_pairs.retrieval_items` of the dataset.
            mapper: the test-time mapper (``ImageCaptionMapper(cfg, False)``).
            score_pairs: the model's ITM scoring of one image against a list of captions.
            batch_size: captions per ``score_pairs`` call.
        """
        self._images = {it["image_index"]: it for it in items if it["modality"] == "image"}
        self._texts = {it["caption_index"]: it for it in items if it["modality"] == "text"}
        self._mapper, self._score_pairs, self._batch_size = mapper, score_pairs, int(batch_size)
        self._mapped_texts: Dict[int, dict] = {}

    def _text(self, caption_index: int) -> dict:
        if caption_index not in self._mapped_texts:
            self._mapped_texts[caption_index] = self._mapper(self._texts[caption_index])
        return self._mapped_texts[caption_index]

    def __call__(self, image_indices: Sequence[int], caption_indices: Sequence[int]) -> torch.Tensor:
        rows = []
        for i in image_indices:
            image = self._mapper(self._images[i])
            row = []
            for start in range(0, len(caption_indices), self._batch_size):
                texts = [self._text(t) for t in caption_indices[start:start + self._batch_size]]
                row.append(torch.as_tensor(self._score_pairs(image, texts)).float().reshape(-1).cpu())
            rows.append(torch.cat(row) if row else torch.zeros(0))
        return torch.stack(rows)


class RetrievalEvaluator(DatasetEvaluator):
    """R@1/5/10 of image->text and text->image retrieval (see the module docstring)."""

    @configurable
    def __init__(self, dataset_name: str, *, output_dir: Optional[str] = None, distributed: bool = True,
                 itm_mode: str = "", itm_topk: int = 128,
                 itm_scorer: Optional[Callable[[List[int], List[int]], torch.Tensor]] = None):
        """
        Args:
            dataset_name: the evaluated dataset (for messages and logs).
            output_dir: where ``retrieval_scores.npz`` is written (None: no dump).
            distributed: gather the items of all processes.
            itm_mode: one of :data:`ITM_MODES` (TEST.RETRIEVAL.ITM).
            itm_topk: candidates per query in the "topk" mode (TEST.RETRIEVAL.ITM_TOPK).
            itm_scorer: ``(image_indices, caption_indices) -> (n_img, n_txt)`` ITM logits;
                required when ``itm_mode`` is not "".
        """
        if itm_mode not in ITM_MODES:
            raise ValueError(f"TEST.RETRIEVAL.ITM must be one of {ITM_MODES}, got {itm_mode!r}")
        if itm_mode and itm_scorer is None:
            raise ValueError(f"TEST.RETRIEVAL.ITM is {itm_mode!r} but no itm_scorer was given to the evaluator")
        if itm_mode == "topk" and itm_topk < max(RECALL_KS):
            raise ValueError(f"TEST.RETRIEVAL.ITM_TOPK must be >= {max(RECALL_KS)}, got {itm_topk}")
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._itm_mode = itm_mode
        self._itm_topk = int(itm_topk)
        self._itm_scorer = itm_scorer
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None, itm_scorer=None):
        r = cfg.TEST.RETRIEVAL
        return {"dataset_name": dataset_name, "output_dir": output_dir, "itm_mode": r.ITM, "itm_topk": r.ITM_TOPK,
                "itm_scorer": itm_scorer}

    def reset(self) -> None:
        self._images: List[dict] = []
        self._texts: List[dict] = []

    def process(self, inputs, outputs) -> None:
        for item, output in zip(inputs, outputs):
            modality = item.get("modality")
            key = {"image": "image_embedding", "text": "text_embedding"}.get(modality)
            if key is None:
                raise ValueError(
                    f"dataset '{self._dataset_name}': retrieval evaluation takes the items of retrieval_items() "
                    f"('modality' image or text), got modality {modality!r}")
            if key not in output:
                raise KeyError(f"the model's output for a {modality} item has no '{key}' (keys {sorted(output)})")
            record = {"image_index": int(item["image_index"]), "image_id": item.get("image_id"),
                      "embedding": output[key].detach().float().cpu().reshape(-1)}
            if modality == "image":
                self._images.append(record)
            else:
                self._texts.append({**record, "caption_index": int(item["caption_index"])})

    def evaluate(self):
        every_rank = bool(self._itm_mode)  # ITM scoring is split over the processes
        images = gather_unique(self._images, "image_index", self._distributed, all_ranks=every_rank)
        texts = gather_unique(self._texts, "caption_index", self._distributed, all_ranks=every_rank)
        if self._distributed and not every_rank and not comm.is_main_process():
            return {}
        image_emb, text_emb, caption_image = self._embeddings(images, texts)
        itc = image_emb @ text_emb.T
        logger.info("retrieval on '%s': %d images x %d captions", self._dataset_name, len(images), len(texts))
        itm = self._score_itm(itc, [r["image_index"] for r in images], [r["caption_index"] for r in texts])
        if self._distributed and not comm.is_main_process():
            return {}
        topk = self._itm_topk if self._itm_mode == "topk" else 0
        self._dump(images, texts, itc, itm, topk)
        return score_retrieval(itc, caption_image, itm, topk)

    def _embeddings(self, images: List[dict], texts: List[dict]):
        """(N, D) image and (M, D) text embeddings and each caption's image position, checked."""
        what = f"dataset '{self._dataset_name}'"
        if not images or not texts:
            raise ValueError(f"{what}: retrieval needs image and text items; got {len(images)} image and "
                             f"{len(texts)} text embeddings")
        positions = {r["image_index"]: p for p, r in enumerate(images)}
        orphans = sorted({r["image_index"] for r in texts} - set(positions))
        if orphans:
            raise ValueError(f"{what}: captions of image_index {orphans[:5]} but no embedding of those images")
        caption_image = torch.tensor([positions[r["image_index"]] for r in texts], dtype=torch.int64)
        without = sorted(set(range(len(images))) - set(caption_image.tolist()))
        if without:
            raise ValueError(f"{what}: image_index {[images[p]['image_index'] for p in without[:5]]} has no caption")
        stacked = []
        for records, name in ((images, "image_embedding"), (texts, "text_embedding")):
            dims = {r["embedding"].numel() for r in records}
            if len(dims) != 1 or dims == {0}:
                raise ValueError(f"{what}: every {name} must have the same non-zero size, got sizes {sorted(dims)}")
            emb = torch.stack([r["embedding"] for r in records])
            norms = emb.norm(dim=1)
            if not torch.isfinite(emb).all() or (norms - 1).abs().max() > _NORM_TOLERANCE:
                raise ValueError(f"{what}: {name}s must be finite and unit-norm (ITC compares cosines); norms range "
                                 f"{norms.min().item():.4g}..{norms.max().item():.4g}")
            stacked.append(emb)
        if stacked[0].shape[1] != stacked[1].shape[1]:
            raise ValueError(f"{what}: image_embedding size {stacked[0].shape[1]} != text_embedding size "
                             f"{stacked[1].shape[1]}")
        return stacked[0], stacked[1], caption_image

    def _score_itm(self, itc: torch.Tensor, image_indices: List[int], caption_indices: List[int]):
        """(N, M) ITM logits (NaN where unscored) on the main process; None without ITM or elsewhere."""
        if not self._itm_mode:
            return None
        if self._itm_mode == "exhaustive":
            needed = torch.ones_like(itc, dtype=torch.bool)
        else:
            i2t, t2i = itm_candidates(itc, self._itm_topk)
            needed = i2t | t2i
        rank, world = (comm.get_rank(), comm.get_world_size()) if self._distributed else (0, 1)
        rows = []
        with torch.no_grad():
            for p in range(rank, len(image_indices), world):
                cols = needed[p].nonzero().flatten()
                scores = self._itm_scorer([image_indices[p]], [caption_indices[c] for c in cols.tolist()])
                scores = torch.as_tensor(scores).detach().float().cpu()
                if scores.shape != (1, len(cols)):
                    raise ValueError(f"itm_scorer returned shape {tuple(scores.shape)} for 1 image x {len(cols)} "
                                     "captions")
                rows.append((p, cols, scores[0]))
                if len(rows) % 100 == 0:
                    logger.info("ITM scoring: %d images done on this process", len(rows))
        gathered = comm.gather(rows, dst=0) if self._distributed else [rows]
        if self._distributed and not comm.is_main_process():
            return None
        itm = torch.full_like(itc, float("nan"))
        for p, cols, scores in (row for part in gathered for row in part):
            itm[p, cols] = scores
        return itm

    def _dump(self, images: Sequence[dict], texts: Sequence[dict], itc: torch.Tensor, itm, topk: int) -> None:
        if not self._output_dir:
            return
        PathManager.mkdirs(self._output_dir)
        path = os.path.join(self._output_dir, RETRIEVAL_SCORES_FILE)
        arrays = {
            "image_index": np.array([r["image_index"] for r in images], dtype=np.int64),
            "image_id": np.array([str(r["image_id"]) for r in images]),
            "caption_index": np.array([r["caption_index"] for r in texts], dtype=np.int64),
            "caption_image_index": np.array([r["image_index"] for r in texts], dtype=np.int64),
            "itc": itc.numpy().astype(np.float32), "itm_topk": np.int64(topk),
        }
        if itm is not None:
            arrays["itm"] = itm.numpy().astype(np.float32)
        logger.info("Saving the %d x %d retrieval scores to %s", itc.shape[0], itc.shape[1], path)
        with PathManager.open(path, "wb") as f:
            np.savez(f, **arrays)
