"""The synthetic image-caption set: deterministic bytes, the shapes set's images, captions that
name every object with its cell, disjoint splits, and registration through the JSON-lines loader."""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fiber_det  # noqa: F401  (compat fixes)
from detectron2.data import DatasetCatalog, MetadataCatalog
from fiber_det.data.datasets import synthetic as shapes
from fiber_det.data.datasets import synthetic_captions as sc
from fiber_det.data.datasets.caption_pairs import retrieval_items

OBJECT = re.compile(r"a (small|large) (\w+) (circle|square|triangle|cross)")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return sc.generate_synthetic_captions(tmp_path_factory.mktemp("captions") / "set", seed=3, num_train=30,
                                          num_val=10)


def _lines(root, split):
    return [json.loads(line) for line in (root / f"captions_{split}.jsonl").read_text().splitlines()]


def _digests(folder: Path):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = _digests(sc.generate_synthetic_captions(tmp_path / "a", seed=5, num_train=4, num_val=2))
    b = _digests(sc.generate_synthetic_captions(tmp_path / "b", seed=5, num_train=4, num_val=2))
    c = _digests(sc.generate_synthetic_captions(tmp_path / "c", seed=6, num_train=4, num_val=2))
    assert len(a) == 4 + 2 + 2 and a == b and a != c


def test_images_are_the_shapes_sets(root):
    for split, index in (("train", 7), ("val", 3)):
        image, *_ = shapes.generate_sample(3, split, index)
        with Image.open(root / "images" / split / f"{index:06d}.png") as png:
            assert np.array_equal(np.asarray(png), image)


def test_captions_name_every_object_in_its_cell(root):
    for split in sc.SPLITS:
        for index, line in enumerate(_lines(root, split)):
            assert line["image"] == f"images/{split}/{index:06d}.png" and line["image_id"] == index + 1
            captions = line["captions"]
            assert len(captions) == sc.CAPTIONS_PER_IMAGE == len(set(captions))
            _, objects, _, _ = shapes.generate_sample(3, split, index)
            expected = sorted((o["size"], o["color"], o["shape"]) for o in objects)
            for caption in captions:
                assert sorted(OBJECT.findall(caption)) == expected, caption
                for obj in objects:  # the object's cell is said right next to it
                    what = f"a {obj['size']} {obj['color']} {obj['shape']}"
                    cells = sc._CELL_WORDS[sc._cell(obj["bbox"], (128, 128))]
                    assert any(f"{what} {w}" in caption or f"{w} {what}" in caption for w in cells), caption


def test_splits_disjoint_and_scenes_distinct(root):
    train, val = (_lines(root, s) for s in sc.SPLITS)
    pixels = {s: {hashlib.sha256((root / line["image"]).read_bytes()).hexdigest() for line in lines}
              for s, lines in (("train", train), ("val", val))}
    assert len(pixels["train"]) == 30 and len(pixels["val"]) == 10 and not pixels["train"] & pixels["val"]
    captions = [c for line in train + val for c in line["captions"]]
    assert len(set(captions)) > 0.95 * len(captions)


def test_registered_through_jsonl(root):
    sc.register_synthetic_captions(root)
    try:
        pairs = DatasetCatalog.get("synthetic_captions_val")
        assert len(pairs) == 10 * sc.CAPTIONS_PER_IMAGE
        assert pairs[0]["file_name"] == str(root / "images" / "val" / "000000.png")
        assert pairs[0]["source"].endswith("captions_val.jsonl:1")
        assert MetadataCatalog.get("synthetic_captions_val").evaluator_type == "retrieval"
        assert MetadataCatalog.get("synthetic_captions_train").evaluator_type == ""
        assert len(retrieval_items(pairs)) == 10 + 50
    finally:
        sc.register_synthetic_captions(sc.default_root())


def test_missing_set_says_how_to_generate(tmp_path):
    sc.register_synthetic_captions(tmp_path / "absent")
    try:
        with pytest.raises(FileNotFoundError, match="prepare_synthetic_captions.py --out"):
            DatasetCatalog.get("synthetic_captions_train")
    finally:
        sc.register_synthetic_captions(sc.default_root())


def test_ensure_generates_once(tmp_path):
    target = tmp_path / "set"
    sc.ensure_synthetic_captions(target, num_train=2, num_val=1)
    before = _digests(target)
    sc.ensure_synthetic_captions(target, num_train=5, num_val=5)  # reused as is
    assert _digests(target) == before and len(_lines(target, "train")) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="lacks captions_train.jsonl"):
        sc.ensure_synthetic_captions(tmp_path / "other")
