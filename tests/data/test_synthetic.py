"""Tests of the synthetic shapes set: determinism, json validity, spans, boxes, registration."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import fiber_det  # noqa: F401  (compat fixes)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from fiber_det.data.datasets import synthetic as syn

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic") / "set"
    return syn.generate_synthetic(folder, seed=3, num_train=40, num_val=12)


@pytest.fixture
def registered(root):
    syn.register_synthetic(root)
    yield root
    syn.register_synthetic(syn.default_root())  # leave the import-time registration behind


def _load(root, kind, split):
    with open(root / f"{kind}_{split}.json") as f:
        return json.load(f)


def _digests(folder: Path):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _phrase_attributes(phrase: str):
    """{"color"?, "size"?, "shape"} of a phrase like "a small red circle"."""
    words = phrase.split(" ")
    assert words[0] == "a" and words[-1] in syn.SHAPES, phrase
    attrs = {"shape": words[-1]}
    for word in words[1:-1]:
        key = "color" if word in syn.COLORS else "size" if word in syn.SIZES else None
        assert key is not None and key not in attrs, f"unexpected word {word!r} in {phrase!r}"
        attrs[key] = word
    return attrs


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = dict(num_train=4, num_val=2, image_size=(96, 112))
    a = _digests(syn.generate_synthetic(tmp_path / "a", seed=7, **kwargs))
    b = _digests(syn.generate_synthetic(tmp_path / "b", seed=7, **kwargs))
    c = _digests(syn.generate_synthetic(tmp_path / "c", seed=8, **kwargs))
    assert len(a) == 4 + 6 and a == b
    assert all(a[name] != c[name] for name in ("images/train/000000.png", "grounding_train.json"))


def test_pycocotools_loads_every_json(root):
    for split, count in zip(SPLITS, (40, 12)):
        for kind in ("grounding", "detection"):
            coco = COCO(str(root / f"{kind}_{split}.json"))
            assert len(coco.getImgIds()) == count
            assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(syn.SHAPES)
            assert coco.getAnnIds() and all(coco.imgToAnns[i] for i in coco.getImgIds())


def test_spans_are_the_phrases_in_caption_order(root):
    for split in SPLITS:
        content = _load(root, "grounding", split)
        anns = {}
        for a in content["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        for img in content["images"]:
            caption, evals = img["caption"], img["tokens_positive_eval"]
            assert img["dataset_name"] == "synthetic" and 1 <= len(evals) <= 3
            starts = [spans[0][0] for spans in evals]
            assert starts == sorted(starts)
            assert [a["tokens_positive"] for a in anns[img["id"]]] == evals
            for a in anns[img["id"]]:
                (start, end), = a["tokens_positive"]
                attrs = _phrase_attributes(caption[start:end])
                assert syn.SHAPES[a["category_id"] - 1] == attrs["shape"]
                assert all(a[key] == attrs[key] for key in ("color", "size") if key in attrs)


def test_boxes_inside_image_and_on_their_object(root):
    for split in SPLITS:
        content = _load(root, "detection", split)
        images = {img["id"]: img for img in content["images"]}
        for a in content["annotations"]:
            img = images[a["image_id"]]
            pixels = np.asarray(Image.open(root / "images" / split / img["file_name"]))
            assert pixels.shape == (img["height"], img["width"], 3)
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            assert min(w, h) >= 20 and a["area"] == w * h
            # every shape contains its box centre, and objects are drawn without noise
            centre = pixels[int(y + h / 2), int(x + w / 2)]
            assert tuple(centre) == syn.COLORS[a["color"]], a


def test_drawn_masks_are_exact_tight_and_disjoint():
    for index in range(20):
        image, objects, caption, spans = syn.generate_sample(1, "train", index, image_size=160)
        union = np.zeros(image.shape[:2], dtype=int)
        for obj in objects:
            ys, xs = np.nonzero(obj["mask"])
            x0, y0 = xs.min(), ys.min()
            assert obj["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
            assert (image[obj["mask"]] == syn.COLORS[obj["color"]]).all()
            union += obj["mask"]
        assert union.max() == 1
        bounds = [bound for _, span in spans for bound in span]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)  # disjoint phrases


def test_every_phrase_names_exactly_one_object(root):
    for split in SPLITS:
        objects = {}
        for a in _load(root, "detection", split)["annotations"]:
            objects.setdefault(a["image_id"], []).append(
                {"shape": syn.SHAPES[a["category_id"] - 1], "color": a["color"], "size": a["size"]})
        for img in _load(root, "grounding", split)["images"]:
            present = objects[img["id"]]
            assert len({tuple(sorted(o.items())) for o in present}) == len(present)
            for (start, end), in img["tokens_positive_eval"]:
                attrs = _phrase_attributes(img["caption"][start:end])
                matches = [o for o in present if all(o[k] == v for k, v in attrs.items())]
                assert len(matches) == 1, (img["caption"], attrs, present)


def test_relations_hold():
    checked = 0
    for index in range(60):
        _, objects, caption, spans = syn.generate_sample(2, "val", index)
        if len(spans) < 2:
            continue
        (i, (_, end)), (j, (start, _)) = spans[:2]
        joiner = caption[end:start].strip()
        if joiner in ("and", ","):
            continue
        a, b = objects[i]["bbox"], objects[j]["bbox"]
        assert joiner in syn._relations(a, b), (caption, a, b)
        checked += 1
    assert checked > 5


def test_registration_parses_contract_fields(registered):
    for split in SPLITS:
        grounding = DatasetCatalog.get(f"synthetic_grounding_{split}")
        g = grounding[0]
        assert Path(g["file_name"]).is_absolute() and Path(g["file_name"]).is_file()
        assert g["task"] == "grounding" and g["dataset"] == f"synthetic_grounding_{split}"
        assert g["dataset_name"] == "synthetic" and g["sentence_id"] == 0
        assert g["original_img_id"] == g["image_id"]
        assert len({d["image_id"] for d in grounding}) == len(grounding)
        ann = g["annotations"][0]
        assert ann["bbox_mode"] == BoxMode.XYWH_ABS and ann["iscrowd"] == 0
        assert [a["tokens_positive"] for a in g["annotations"]] == g["tokens_positive_eval"]
        meta = MetadataCatalog.get(f"synthetic_grounding_{split}")
        assert meta.evaluator_type == "flickr"
        assert meta.json_file == str(registered / f"grounding_{split}.json")

        detection = DatasetCatalog.get(f"synthetic_detection_{split}")
        meta = MetadataCatalog.get(f"synthetic_detection_{split}")
        assert meta.evaluator_type == "coco" and meta.prompt_mode == "all_categories"
        assert meta.thing_classes == list(syn.SHAPES)
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}
        assert meta.image_root == str(registered / "images" / split)
        raw = _load(registered, "detection", split)["annotations"]
        ids = [a["category_id"] for d in detection for a in d["annotations"]]
        assert ids == [a["category_id"] - 1 for a in raw]
        assert all(d["task"] == "detection" for d in detection)


def test_missing_folder_registers_but_loading_says_how_to_generate(tmp_path):
    try:
        syn.register_synthetic(tmp_path / "absent")
        assert "synthetic_detection_val" in DatasetCatalog.list()
        with pytest.raises(FileNotFoundError, match="prepare_synthetic_grounding.py --out"):
            DatasetCatalog.get("synthetic_detection_val")
    finally:
        syn.register_synthetic(syn.default_root())


def test_ensure_synthetic_generates_once(tmp_path):
    root = syn.ensure_synthetic(tmp_path / "auto", num_train=2, num_val=1)
    stamp = (root / "grounding_train.json").stat().st_mtime_ns
    assert syn.ensure_synthetic(root, num_train=5) == root
    assert (root / "grounding_train.json").stat().st_mtime_ns == stamp
    assert len(_load(root, "detection", "train")["images"]) == 2
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="lacks"):
        syn.ensure_synthetic(tmp_path / "junk")


def test_default_root_follows_environment(monkeypatch):
    monkeypatch.delenv("FIBER_SYNTHETIC_ROOT", raising=False)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert syn.default_root() == str(REPO / "datasets" / "synthetic_grounding")
    monkeypatch.setenv("DETECTRON2_DATASETS", "/data")
    assert syn.default_root() == "/data/synthetic_grounding"
    monkeypatch.setenv("FIBER_SYNTHETIC_ROOT", "/elsewhere")
    assert syn.default_root() == "/elsewhere"


def test_prepare_script(tmp_path):
    import runpy

    script = runpy.run_path(str(REPO / "datasets" / "prepare_synthetic_grounding.py"))
    script["main"](["--out", str(tmp_path), "--num-train", "2", "--num-val", "1",
                    "--image-size", "64", "80"])
    coco = COCO(str(tmp_path / "grounding_val.json"))
    assert coco.imgs[1]["height"] == 64 and coco.imgs[1]["width"] == 80
