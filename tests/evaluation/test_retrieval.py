"""Retrieval recall against hand-computed ranks (ties included), a brute-force reference for the
ITC, exhaustive-ITM and top-k ITM protocols, the evaluator's checks and dump, and its gathering
over processes (simulated, and a real 2-process gloo run)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.config import get_cfg
from fiber_det import add_fiber_config
from fiber_det.evaluation import build_evaluator, gather
from fiber_det.evaluation.retrieval import (
    RETRIEVAL_SCORES_FILE,
    ItmScorer,
    RetrievalEvaluator,
    first_hit_ranks,
    load_retrieval_scores,
    score_retrieval,
)

# 3 images; captions 0, 1 -> image 0, captions 2, 3 -> image 1, caption 4 -> image 2
CAPTION_IMAGE = torch.tensor([0, 0, 1, 1, 2])
ITC = torch.tensor([
    [0.9, 0.1, 0.9, 0.2, 0.0],  # c0 and c2 tie: c0 (positive, lower index) first -> rank 0
    [0.5, 0.2, 0.1, 0.5, 0.3],  # c0 and c3 tie: c0 first, so positive c3 is second -> rank 1
    [0.3, 0.3, 0.3, 0.3, 0.3],  # all tied: index order, positive c4 last -> rank 4
])


def test_hand_computed_ranks_with_ties():
    i2t = first_hit_ranks(ITC, torch.arange(3), CAPTION_IMAGE)
    assert i2t.tolist() == [0, 1, 4]
    # columns: c0 -> img0 first; c1 [.1,.2,.3] -> img0 third; c2 [.9,.1,.3] -> img1 third;
    # c3 [.2,.5,.3] -> img1 first; c4 [0,.3,.3]: img1 and img2 tie, img1 (lower index) first -> rank 1
    t2i = first_hit_ranks(ITC.T, CAPTION_IMAGE, torch.arange(3))
    assert t2i.tolist() == [0, 2, 2, 0, 1]
    r = score_retrieval(ITC, CAPTION_IMAGE)["retrieval"]
    assert list(r) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    assert r["i2t_R@1"] == pytest.approx(100 / 3) and r["i2t_R@5"] == 100
    assert r["t2i_R@1"] == pytest.approx(40.0) and r["t2i_R@5"] == 100


def test_query_without_positive_is_a_miss():
    ranks = first_hit_ranks(torch.tensor([[0.5, 0.4]]), torch.tensor([7]), torch.tensor([0, 1]))
    assert ranks.tolist() == [2]


def _reference_ranked(scores):
    """Indices by decreasing score, ties by index (the documented rule), in plain Python."""
    return sorted(range(len(scores)), key=lambda g: (-scores[g], g))


def _reference(itc, itm, caption_image, topk):
    """Recalls by brute force: ITC, and ITM exhaustive (topk 0) or on the ITC top-k candidates."""
    n_img, n_txt = itc.shape
    out = {}
    for name, use_itm in (("", False), ("itm", True)):
        if use_itm and itm is None:
            continue
        hits = {"i2t": [], "t2i": []}
        for i in range(n_img):
            ranked = _reference_ranked(itc[i].tolist())
            if use_itm:
                cands = ranked[:topk] if topk else ranked
                ranked = sorted(cands, key=lambda t: (-itm[i, t].item(), t))
            hits["i2t"].append(next((r for r, t in enumerate(ranked) if caption_image[t] == i), n_txt))
        for t in range(n_txt):
            ranked = _reference_ranked(itc[:, t].tolist())
            if use_itm:
                cands = ranked[:topk] if topk else ranked
                ranked = sorted(cands, key=lambda i: (-itm[i, t].item(), i))
            hits["t2i"].append(next((r for r, i in enumerate(ranked) if i == caption_image[t]), n_img))
        prefix = "" if not use_itm else ("itm_" if not topk else f"itm_top{topk}_")
        for d, ranks in hits.items():
            for k in (1, 5, 10):
                out[f"{prefix}{d}_R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    return out


def _random_case(seed, n_img=14, n_txt=40, levels=6):
    g = torch.Generator().manual_seed(seed)
    caption_image = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=g)])
    # few distinct values (many exact ties), positives pushed up a little
    positive = torch.zeros(n_img, n_txt)
    positive[caption_image, torch.arange(n_txt)] = 1
    itc = (torch.randint(0, levels, (n_img, n_txt), generator=g) + 2 * positive).float() / levels
    itm = torch.randint(0, levels, (n_img, n_txt), generator=g).float() + 2 * positive - 2
    return itc, itm, caption_image


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("topk", [0, 10, 17])
def test_against_brute_force(seed, topk):
    itc, itm, caption_image = _random_case(seed)
    got = score_retrieval(itc, caption_image, itm, topk)["retrieval"]
    expected = _reference(itc, itm, caption_image, topk)
    assert got == pytest.approx(expected), (got, expected)
    assert 0 < got["i2t_R@1"] < 100 and 0 < got["t2i_R@1"] < got["t2i_R@5"] < 100  # not a trivial case


def test_topk_needs_scored_candidates_and_k10():
    itc, itm, caption_image = _random_case(0)
    with pytest.raises(ValueError, match=">= 10"):
        score_retrieval(itc, caption_image, itm, 5)
    itm[0, :] = float("nan")
    with pytest.raises(ValueError, match="NaN for"):
        score_retrieval(itc, caption_image, itm, 10)
    with pytest.raises(ValueError, match="non-finite"):
        score_retrieval(torch.full((2, 3), float("inf")), torch.tensor([0, 1, 1]))


# ---- the evaluator ----

def _unit(v):
    v = torch.as_tensor(v, dtype=torch.float32)
    return v / v.norm()


def _items(n_img=6, n_txt=15, dim=8, seed=0):
    """(inputs, outputs) of an image pass and a text pass: random unit image embeddings, captions
    near their image's; captions 7 and 8 have exactly the embedding of caption 6 (ties)."""
    g = torch.Generator().manual_seed(seed)
    caption_image = [t % n_img for t in range(n_txt)]
    inputs = [{"modality": "image", "image_index": i, "image_id": f"img{i}"} for i in range(n_img)]
    outputs = [{"image_embedding": _unit(torch.randn(dim, generator=g))} for _ in range(n_img)]
    text_emb = [_unit(outputs[t % n_img]["image_embedding"] + 0.5 * torch.randn(dim, generator=g))
                for t in range(n_txt)]
    text_emb[7] = text_emb[8] = text_emb[6]
    inputs += [{"modality": "text", "caption_index": t, "image_index": caption_image[t], "image_id": "x",
                "caption": f"c{t}"} for t in range(n_txt)]
    outputs += [{"text_embedding": e} for e in text_emb]
    return inputs, outputs


def _expected(inputs, outputs):
    images = torch.stack([o["image_embedding"] for i, o in zip(inputs, outputs) if i["modality"] == "image"])
    texts = torch.stack([o["text_embedding"] for i, o in zip(inputs, outputs) if i["modality"] == "text"])
    caption_image = torch.tensor([i["image_index"] for i in inputs if i["modality"] == "text"])
    return images @ texts.T, caption_image


def _run(evaluator, inputs, outputs, batch=4):
    evaluator.reset()
    for start in range(0, len(inputs), batch):  # batches mix image and text items at the seam
        evaluator.process(inputs[start:start + batch], outputs[start:start + batch])
    return evaluator.evaluate()


def test_evaluator_itc_dump_and_offline_rescore(tmp_path):
    inputs, outputs = _items()
    itc, caption_image = _expected(inputs, outputs)
    results = _run(RetrievalEvaluator("test_set", output_dir=str(tmp_path), distributed=False), inputs, outputs)
    assert results == score_retrieval(itc, caption_image)
    with np.load(tmp_path / RETRIEVAL_SCORES_FILE, allow_pickle=False) as dump:
        assert np.allclose(dump["itc"], itc.numpy()) and dump["image_id"].tolist()[:2] == ["img0", "img1"]
        assert dump["caption_image_index"].tolist() == caption_image.tolist() and int(dump["itm_topk"]) == 0
        assert "itm" not in dump
    assert load_retrieval_scores(str(tmp_path / RETRIEVAL_SCORES_FILE)) == results


def _scorer(itc, calls):
    def score(image_indices, caption_indices):
        calls.append((list(image_indices), list(caption_indices)))
        return -3.0 * itc[image_indices][:, caption_indices]  # reverses the ITC order
    return score


@pytest.mark.parametrize("mode, topk", [("exhaustive", 0), ("topk", 10)])
def test_evaluator_itm(tmp_path, mode, topk):
    inputs, outputs = _items(n_img=12, n_txt=30)
    itc, caption_image = _expected(inputs, outputs)
    calls = []
    evaluator = RetrievalEvaluator("test_set", output_dir=str(tmp_path), distributed=False, itm_mode=mode,
                                   itm_topk=10, itm_scorer=_scorer(itc, calls))
    results = _run(evaluator, inputs, outputs)["retrieval"]
    expected = _reference(itc, -3.0 * itc, caption_image.tolist(), topk)
    assert results == pytest.approx(expected)
    prefix = "itm_" if mode == "exhaustive" else "itm_top10_"
    assert results[f"{prefix}i2t_R@1"] < results["i2t_R@1"]  # the scorer reverses the ITC order
    assert [c[0] for c in calls] == [[i] for i in range(12)]  # one call per image
    if mode == "exhaustive":
        assert all(c[1] == list(range(30)) for c in calls)
    else:
        assert min(len(c[1]) for c in calls) >= 10 and sum(len(c[1]) for c in calls) < 12 * 30
    assert load_retrieval_scores(str(tmp_path / RETRIEVAL_SCORES_FILE))["retrieval"] == pytest.approx(results)


def test_itm_scorer_adapter():
    """ItmScorer maps each image per call, each caption once, and batches captions."""
    items = [{"modality": "image", "image_index": i} for i in range(3)]
    items += [{"modality": "text", "caption_index": t, "image_index": t % 3} for t in range(7)]
    mapped, batches = [], []

    def mapper(item):
        mapped.append(item)
        return {**item, "mapped": True}

    def score_pairs(image, texts):
        assert image["mapped"] and all(t["mapped"] and t["modality"] == "text" for t in texts)
        batches.append(len(texts))
        return torch.tensor([10.0 * image["image_index"] + t["caption_index"] for t in texts])

    scorer = ItmScorer(items, mapper, score_pairs, batch_size=3)
    out = scorer([2, 0], [6, 1, 4, 0])
    assert out.tolist() == [[26, 21, 24, 20], [6, 1, 4, 0]] and batches == [3, 1, 3, 1]
    scorer([1], [6, 5])
    texts_mapped = [m["caption_index"] for m in mapped if m["modality"] == "text"]
    assert sorted(texts_mapped) == [0, 1, 4, 5, 6]  # once each
    assert sum(m["modality"] == "image" for m in mapped) == 3


def test_evaluator_input_checks():
    inputs, outputs = _items()
    ev = RetrievalEvaluator("test_set", distributed=False)
    with pytest.raises(ValueError, match="retrieval_items"):
        ev.process([{"image_index": 0}], [{"image_embedding": outputs[0]["image_embedding"]}])
    with pytest.raises(KeyError, match="no 'text_embedding'"):
        ev.process([inputs[-1]], [{"image_embedding": outputs[0]["image_embedding"]}])
    bad = [dict(o) for o in outputs]
    bad[0]["image_embedding"] = 2 * bad[0]["image_embedding"]
    with pytest.raises(ValueError, match="unit-norm"):
        _run(ev, inputs, bad)
    kept = [(i, o) for i, o in zip(inputs, outputs) if not (i["modality"] == "text" and i["image_index"] == 5)]
    with pytest.raises(ValueError, match=r"image_index \[5\] has no caption"):
        _run(ev, *map(list, zip(*kept)))
    with pytest.raises(ValueError, match="no embedding of those images"):
        _run(ev, inputs[:2] + inputs[3:], outputs[:2] + outputs[3:])
    with pytest.raises(ValueError, match="no itm_scorer"):
        RetrievalEvaluator("test_set", itm_mode="exhaustive")


def test_build_evaluator_from_config(tmp_path):
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get("test_retrieval_set").set(evaluator_type="retrieval")
    cfg = add_fiber_config(get_cfg())
    assert isinstance(build_evaluator(cfg, "test_retrieval_set", str(tmp_path)), RetrievalEvaluator)
    cfg.TEST.RETRIEVAL.ITM = "topk"
    with pytest.raises(ValueError, match="no itm_scorer"):
        build_evaluator(cfg, "test_retrieval_set")
    ev = build_evaluator(cfg, "test_retrieval_set", itm_scorer=lambda i, t: torch.zeros(len(i), len(t)))
    assert ev._itm_mode == "topk" and ev._itm_topk == cfg.TEST.RETRIEVAL.ITM_TOPK


def test_two_ranks_simulated_gather_drops_duplicates(monkeypatch, tmp_path):
    """Rank 1's items (with a duplicate of an image and a caption of rank 0, as a padded
    distributed sampler produces) are gathered with rank 0's: same result as one process."""
    inputs, outputs = _items()
    expected = _run(RetrievalEvaluator("test_set", distributed=False), inputs, outputs)
    half = len(inputs) // 2
    rank1 = RetrievalEvaluator("test_set", distributed=False)
    rank1.process(inputs[half - 1:], outputs[half - 1:])
    rank1.process(inputs[:1], outputs[:1])

    def fake_gather(data, dst=0):
        texts = bool(data) and "caption_index" in data[0]
        return [data, rank1._texts if texts else rank1._images]

    monkeypatch.setattr(gather.comm, "gather", fake_gather)
    rank0 = RetrievalEvaluator("test_set", output_dir=str(tmp_path))
    rank0.process(inputs[:half], outputs[:half])
    assert rank0.evaluate() == expected


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        inputs, outputs = _items(n_img=12, n_txt=30)
        itc, _ = _expected(inputs, outputs)
        # InferenceSampler-like shards with one item of rank 0 repeated on rank 1
        shard = list(range(0, 21)) if rank == 0 else list(range(20, len(inputs)))
        ev = RetrievalEvaluator("test_set", output_dir=out_dir if rank == 0 else None, itm_mode="exhaustive",
                                itm_scorer=_scorer(itc, []))
        ev.reset()
        ev.process([inputs[i] for i in shard], [outputs[i] for i in shard])
        results = ev.evaluate()
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
        else:
            assert results == {}
    finally:
        dist.destroy_process_group()


def test_two_processes_gloo(tmp_path):
    # forked (not spawned) workers start in milliseconds: they inherit the imported modules
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_worker, args=(rank, str(tmp_path / "init"), str(tmp_path))) for rank in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    inputs, outputs = _items(n_img=12, n_txt=30)
    expected = _run(RetrievalEvaluator("x", distributed=False, itm_mode="exhaustive",
                                       itm_scorer=_scorer(_expected(inputs, outputs)[0], [])), inputs, outputs)
    got = json.loads((tmp_path / "results.json").read_text())
    assert got["retrieval"] == pytest.approx(expected["retrieval"]) and len(got["retrieval"]) == 12


class _PaletteModel(torch.nn.Module):
    """A model without weights: images -> share of pixels of each palette colour, captions ->
    counts of the colour words; enough to retrieve synthetic scenes well above chance."""

    def forward(self, batch):
        from fiber_det.data.datasets.synthetic import COLORS

        palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # (6, 3)
        outputs = []
        for item in batch:
            if item["modality"] == "image":
                pixels = item["image"].flatten(1).T.float()  # (HW, 3) RGB
                near = (torch.cdist(pixels, palette) < 40).float().mean(0)
                outputs.append({"image_embedding": torch.nn.functional.normalize(near + 1e-3, dim=0)})
            else:
                words = item["caption"].split()
                counts = torch.tensor([float(words.count(c)) for c in COLORS])
                outputs.append({"text_embedding": torch.nn.functional.normalize(counts + 1e-3, dim=0)})
        return outputs


def test_end_to_end_on_synthetic_captions(tmp_path, caplog):
    """Generated files -> JSON-lines loader -> retrieval loader -> model -> evaluator, as
    tools/train_net.py --eval-only runs it, with Detectron2's inference loop and copypaste lines."""
    import logging

    from conftest import tiny_cfg
    from detectron2.evaluation import inference_on_dataset, print_csv_format
    from fiber_det.data.build import build_test_loader
    from fiber_det.data.datasets import synthetic_captions as sc

    sc.register_synthetic_captions(sc.generate_synthetic_captions(tmp_path / "set", num_train=1, num_val=40))
    try:
        cfg = tiny_cfg(INPUT__FORMAT="RGB", MODEL__FIBER__COARSE__IMAGE_SIZE=64, DATALOADER__NUM_WORKERS=0)
        loader = build_test_loader(cfg, "synthetic_captions_val")
        evaluator = build_evaluator(cfg, "synthetic_captions_val", str(tmp_path / "inference"))
        results = inference_on_dataset(_PaletteModel(), loader, evaluator)
    finally:
        sc.register_synthetic_captions(sc.default_root())
    r = results["retrieval"]
    assert r["i2t_R@1"] > 25 and r["t2i_R@10"] > 50, r  # chance: 2.5 and 25
    with caplog.at_level(logging.INFO):
        print_csv_format(results)
    assert "copypaste: Task: retrieval" in caplog.text
    assert "copypaste: i2t_R@1,i2t_R@5,i2t_R@10,t2i_R@1,t2i_R@5,t2i_R@10" in caplog.text
    assert load_retrieval_scores(str(tmp_path / "inference" / RETRIEVAL_SCORES_FILE)) == results
