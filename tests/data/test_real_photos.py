"""The real-photo set: jsons written from the hand-drawn table for the photos present (tested on
a copy holding only the vendored CC0 photos), their MDETR/COCO formats, and the registration."""
import json
import shutil

import pytest
from PIL import Image

from conftest import REPO
from detectron2.data import DatasetCatalog, MetadataCatalog
from fiber_det.data.datasets import real_photos
from fiber_det.data.datasets.real_photos import CATEGORIES, PHOTOS, ensure_real_photos, register_real_photos

VENDORED = [p.file_name for p in PHOTOS if p.source == "vendored"]


@pytest.fixture
def vendored_root(tmp_path):
    """A root holding only the vendored photos (what a fresh checkout has, without network)."""
    (tmp_path / "images").mkdir()
    for name in VENDORED:
        shutil.copyfile(REPO / "datasets" / "real_photos" / "images" / name, tmp_path / "images" / name)
    return tmp_path


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_vendored_photos_are_small_real_jpegs():
    assert VENDORED == ["coffee.jpg", "astronaut.jpg", "chelsea.jpg"]
    sizes = {"coffee.jpg": (600, 400), "astronaut.jpg": (512, 512), "chelsea.jpg": (451, 300)}
    for name in VENDORED:
        path = REPO / "datasets" / "real_photos" / "images" / name
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == sizes[name]
        assert path.stat().st_size < 150_000


def test_jsons_list_only_present_photos(vendored_root, monkeypatch):
    monkeypatch.setattr(real_photos, "_copy_from_skimage", lambda images_dir: None)  # no scikit-image copy
    ensure_real_photos(vendored_root)
    grounding = _load(vendored_root / "grounding.json")
    assert [img["file_name"] for img in grounding["images"]] == VENDORED
    assert [img["id"] for img in grounding["images"]] == [1, 2, 3]  # fixed ids from the table
    # the written files name no path of this machine: they stay valid when the root moves
    for name in ("grounding.json", "detection.json"):
        text = (vendored_root / name).read_text(encoding="utf-8")
        assert str(vendored_root) not in text and str(REPO) not in text and '"/' not in text
    Image.new("RGB", (960, 643)).save(vendored_root / "images" / "quokka.jpg")  # a stand-in of the right size
    ensure_real_photos(vendored_root)  # a new photo appears -> rewritten
    assert [img["file_name"] for img in _load(vendored_root / "grounding.json")["images"]][-1] == "quokka.jpg"
    # not the photo the boxes were drawn on
    Image.new("RGB", (300, 200)).save(vendored_root / "images" / "quokka.jpg")
    with pytest.raises(ValueError, match=r"quokka.jpg: box \(148, 50, 550, 642\) of 'animal' is outside"):
        ensure_real_photos(vendored_root)


def test_grounding_json_is_mdetr_flickr_format(vendored_root):
    ensure_real_photos(vendored_root)  # also copies motorcycle_left from the installed scikit-image
    data = _load(vendored_root / "grounding.json")
    assert (vendored_root / "images" / "motorcycle_left.jpg").is_file()
    assert data["categories"] == [{"id": 1, "name": "object"}]
    by_image = {img["id"]: img for img in data["images"]}
    for img in data["images"]:
        assert {"file_name", "height", "width", "id", "caption", "dataset_name", "sentence_id", "original_img_id",
                "tokens_negative", "tokens_positive_eval"} <= set(img)
        with Image.open(vendored_root / "images" / img["file_name"]) as image:
            assert image.size == (img["width"], img["height"])
    photo = {p.file_name: p for p in PHOTOS}
    for img in data["images"]:
        texts = [" ".join(img["caption"][s:e] for s, e in spans) for spans in img["tokens_positive_eval"]]
        assert texts == [ph.text for ph in photo[img["file_name"]].phrases]
    for ann in data["annotations"]:
        img = by_image[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert 0 <= x < x + w <= img["width"] and 0 <= y < y + h <= img["height"]
        assert ann["tokens_positive"] in img["tokens_positive_eval"] and ann["category_id"] == 1
    astronaut = by_image[2]
    assert astronaut["caption"] == "astronaut. helmet. flag. space shuttle."
    assert astronaut["tokens_positive_eval"][3] == [[25, 38]]
    chelsea_boxes = [a for a in data["annotations"] if a["image_id"] == 3 and a["tokens_positive"] == [[17, 27]]]
    assert [a["bbox"] for a in chelsea_boxes] == [[134, 84, 76, 64], [292, 108, 52, 57]]  # "green eyes": 2 boxes
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


def test_detection_view_shares_boxes_with_fixed_categories(vendored_root):
    ensure_real_photos(vendored_root)
    grounding, detection = _load(vendored_root / "grounding.json"), _load(vendored_root / "detection.json")
    assert [c["name"] for c in detection["categories"]] == list(CATEGORIES)
    assert len(CATEGORIES) == 20 and CATEGORIES[:3] == ("cup", "saucer", "spoon")
    assert [a["bbox"] for a in detection["annotations"]] == [a["bbox"] for a in grounding["annotations"]]
    names = [CATEGORIES[a["category_id"] - 1] for a in detection["annotations"] if a["image_id"] == 3]
    assert names == ["cat", "eye", "eye", "nose"]


def test_missing_vendored_photo_is_named(vendored_root):
    (vendored_root / "images" / "chelsea.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="chelsea.jpg"):
        ensure_real_photos(vendored_root)


def test_registered_datasets_load(vendored_root):
    try:
        register_real_photos(vendored_root)
        grounding = DatasetCatalog.get("real_photos_grounding")
        detection = DatasetCatalog.get("real_photos_detection")
        assert [d["image_id"] for d in grounding] == [d["image_id"] for d in detection] == [1, 2, 3, 4]
        coffee = grounding[0]
        assert coffee["task"] == "grounding" and coffee["file_name"] == str(vendored_root / "images" / "coffee.jpg")
        assert coffee["caption"] == "cup. saucer. spoon." and coffee["tokens_positive_eval"][1] == [[5, 11]]
        assert detection[0]["task"] == "detection"
        assert [a["category_id"] for a in detection[0]["annotations"]] == [0, 1, 2]
        meta = MetadataCatalog.get("real_photos_grounding")
        assert meta.evaluator_type == "flickr" and meta.flickr_gt_type == "separate"
        meta = MetadataCatalog.get("real_photos_detection")
        assert meta.evaluator_type == "coco" and meta.prompt_mode == "all_categories"
        assert meta.thing_classes == list(CATEGORIES)
    finally:
        register_real_photos()  # back to the repository's folder
    repo_images = str(REPO / "datasets" / "real_photos" / "images")
    assert MetadataCatalog.get("real_photos_grounding").image_root == repo_images
