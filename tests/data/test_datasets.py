"""Tests of fiber_det.data.datasets: COCO-style and MDETR-style loaders, builtin registration.

Every json here is written by hand in its real format (COCO, LVIS, Objects365 v2, Roboflow/ODinW,
MDETR Flickr30k / RefCOCO / GoldG) into tmp_path; the loaders never open images.
"""
import itertools
import json
import os
import re
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

import fiber_det  # noqa: F401  (registers the builtin names)
from fiber_det.data.datasets import (
    builtin,
    load_mdetr_grounding_json,
    register_coco_grounding_dataset,
    register_mdetr_grounding_dataset,
)

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()


@pytest.fixture
def name():
    """A fresh dataset name, removed from both catalogs afterwards."""
    dataset_name = f"test_datasets_{next(_counter)}"
    yield dataset_name
    if dataset_name in DatasetCatalog.list():
        DatasetCatalog.remove(dataset_name)
    if dataset_name in MetadataCatalog.list():
        MetadataCatalog.remove(dataset_name)


def write_json(path: Path, content: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return str(path)


def images_dir(tmp_path: Path, sub: str = "images") -> str:
    folder = tmp_path / sub
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


# ---------------------------------------------------------------------------------------------
# COCO-format detection


COCO_JSON = {
    "info": {"description": "hand-written"},
    "images": [
        {"id": 42, "file_name": "000000000042.jpg", "height": 480, "width": 640},
        {"id": 7, "file_name": "000000000007.jpg", "height": 300, "width": 200},
    ],
    "annotations": [
        {"id": 1, "image_id": 42, "category_id": 7, "bbox": [10, 20.5, 30, 40], "area": 1200.0,
         "iscrowd": 0, "segmentation": [[10, 20, 40, 20, 40, 60]]},
        {"id": 2, "image_id": 42, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25.0, "iscrowd": 1,
         "segmentation": {"counts": [0, 25], "size": [480, 640]}},
        {"id": 3, "image_id": 7, "category_id": 3, "bbox": [1.5, 2.5, 3.5, 4.5], "area": 15.75, "iscrowd": 0},
    ],
    "categories": [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
        {"id": 7, "name": "traffic_light", "supercategory": "outdoor"},
    ],
}


def test_coco_json_loads_with_contiguous_ids(tmp_path, name):
    json_file = write_json(tmp_path / "instances.json", COCO_JSON)
    root = images_dir(tmp_path)
    register_coco_grounding_dataset(name, json_file, root)
    dicts = DatasetCatalog.get(name)

    assert [d["image_id"] for d in dicts] == [7, 42]  # sorted by id
    first, second = dicts
    assert first["file_name"] == os.path.join(os.path.abspath(root), "000000000007.jpg")
    assert os.path.isabs(second["file_name"])
    assert (first["height"], first["width"]) == (300, 200)
    assert first["task"] == "detection" and first["dataset"] == name
    assert first["annotations"] == [
        {"bbox": [1.5, 2.5, 3.5, 4.5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 0}
    ]
    # json order kept within an image; crowd boxes are kept (the mapper decides)
    assert [a["category_id"] for a in second["annotations"]] == [2, 0]
    assert [a["iscrowd"] for a in second["annotations"]] == [0, 1]
    assert second["annotations"][0]["bbox"] == [10.0, 20.5, 30.0, 40.0]
    assert all(isinstance(v, float) for v in second["annotations"][0]["bbox"])

    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["person", "car", "traffic_light"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1, 7: 2}
    assert meta.evaluator_type == "coco" and meta.prompt_mode == "all_categories"
    assert meta.json_file == json_file and meta.image_root == root
    assert not hasattr(meta, "caption_prompt")


def test_contiguous_ids_follow_json_category_order(tmp_path, name):
    # upstream maps ids in the order of the json's "categories" list, not sorted by id
    content = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "iscrowd": 0}],
        "categories": [{"id": 5, "name": "zebra"}, {"id": 2, "name": "ant"}],
    }
    register_coco_grounding_dataset(name, write_json(tmp_path / "c.json", content), images_dir(tmp_path))
    (record,) = DatasetCatalog.get(name)
    assert record["annotations"][0]["category_id"] == 1
    assert MetadataCatalog.get(name).thing_classes == ["zebra", "ant"]
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id == {5: 0, 2: 1}


def test_odinw_background_removed_and_caption_prompt(tmp_path, name):
    # Roboflow export: id 0 is the dataset-level super-category and is never annotated.
    content = {
        "images": [{"id": 0, "file_name": "IMG_2301.jpg", "height": 1024, "width": 768}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 2, "bbox": [5, 6, 7, 8], "area": 56, "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0},
        ],
        "categories": [
            {"id": 0, "name": "creatures", "supercategory": "none"},
            {"id": 1, "name": "fish", "supercategory": "creatures"},
            {"id": 2, "name": "penguin", "supercategory": "creatures"},
        ],
    }
    json_file = write_json(tmp_path / "train" / "_annotations.coco.json", content)
    prompt = [{"prefix": "", "name": "fish", "suffix": ""},
              {"prefix": "", "name": "penguin", "suffix": ", which is black and white"}]
    register_coco_grounding_dataset(name, json_file, str(tmp_path / "train"), caption_prompt=prompt)
    (record,) = DatasetCatalog.get(name)
    assert [a["category_id"] for a in record["annotations"]] == [1, 0]
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["fish", "penguin"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}
    assert meta.caption_prompt == prompt


def test_background_kept_when_asked_and_used_background_raises(tmp_path, name):
    content = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [0, 0, 1, 1]}],
        "categories": [{"id": 0, "name": "background"}, {"id": 1, "name": "cat"}],
    }
    json_file = write_json(tmp_path / "a.json", content)
    register_coco_grounding_dataset(name, json_file, images_dir(tmp_path))
    with pytest.raises(ValueError, match=r"a\.json: category 0 \('background'\) is annotated"):
        DatasetCatalog.get(name)

    kept = name + "_kept"
    try:
        register_coco_grounding_dataset(kept, json_file, images_dir(tmp_path), drop_background=False)
        (record,) = DatasetCatalog.get(kept)
        assert MetadataCatalog.get(kept).thing_classes == ["background", "cat"]
        assert record["annotations"][0]["category_id"] == 0
    finally:
        DatasetCatalog.remove(kept)
        MetadataCatalog.remove(kept)


def test_caption_prompt_length_checked_at_load(tmp_path, name):
    json_file = write_json(tmp_path / "i.json", COCO_JSON)
    register_coco_grounding_dataset(name, json_file, images_dir(tmp_path),
                                    caption_prompt=[{"prefix": "a ", "name": "person"}])
    with pytest.raises(ValueError, match="caption_prompt has 1 entries but .* has 3 categories"):
        DatasetCatalog.get(name)


def test_registration_argument_checks(name):
    with pytest.raises(ValueError, match="prompt_mode"):
        register_coco_grounding_dataset(name, "x.json", "x", prompt_mode="random")
    with pytest.raises(ValueError, match="evaluator_type"):
        register_coco_grounding_dataset(name, "x.json", "x", evaluator_type="voc")
    with pytest.raises(ValueError, match=r"caption_prompt\[0\]"):
        register_coco_grounding_dataset(name, "x.json", "x", caption_prompt=[{"pre": "a"}])
    with pytest.raises(ValueError, match="flickr_gt_type"):
        register_mdetr_grounding_dataset(name, "x.json", "x", "flickr", flickr_gt_type="union")
    assert name not in DatasetCatalog.list()


def test_lvis_paths_from_coco_url_and_passthrough(tmp_path, name):
    content = {
        "images": [
            {"id": 397133, "height": 427, "width": 640, "coco_url":
             "http://images.cocodataset.org/val2017/000000397133.jpg",
             "not_exhaustive_category_ids": [2], "neg_category_ids": [3]},
            # GLIP's minival json also carries file_name; coco_url still decides (same result).
            {"id": 155379, "height": 480, "width": 640, "file_name": "train2017/000000155379.jpg",
             "coco_url": "http://images.cocodataset.org/train2017/000000155379.jpg",
             "not_exhaustive_category_ids": [], "neg_category_ids": []},
            {"id": 5, "height": 4, "width": 4, "file_name": "val2017/000000000005.jpg"},
        ],
        "annotations": [  # LVIS annotations have no iscrowd
            {"id": 1, "image_id": 397133, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 12,
             "segmentation": [[1, 2, 4, 2, 4, 6]]},
        ],
        "categories": [
            {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"], "frequency": "c"},
            {"id": 2, "name": "air_conditioner", "synonyms": ["air_conditioner"], "frequency": "f"},
            {"id": 3, "name": "bull", "synonyms": ["horned_cow"], "frequency": "r"},
        ],
    }
    json_file = write_json(tmp_path / "lvis" / "lvis_v1_val.json", content)
    coco = images_dir(tmp_path, "coco")
    register_coco_grounding_dataset(name, json_file, coco, evaluator_type="lvis",
                                    drop_background=False, image_path_style="coco_url")
    by_id = {d["image_id"]: d for d in DatasetCatalog.get(name)}
    root = os.path.abspath(coco)
    assert by_id[397133]["file_name"] == os.path.join(root, "val2017/000000397133.jpg")
    assert by_id[155379]["file_name"] == os.path.join(root, "train2017/000000155379.jpg")
    assert by_id[5]["file_name"] == os.path.join(root, "val2017/000000000005.jpg")
    assert by_id[397133]["not_exhaustive_category_ids"] == [2]  # raw LVIS ids
    assert by_id[397133]["neg_category_ids"] == [3]
    assert "neg_category_ids" not in by_id[5]
    assert by_id[397133]["annotations"] == [
        {"bbox": [1.0, 2.0, 3.0, 4.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2, "iscrowd": 0}
    ]
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["aerosol_can", "air_conditioner", "bull"]  # "name", not synonyms[0]
    assert meta.evaluator_type == "lvis"


def test_registered_classes_must_match_json(tmp_path, name):
    json_file = write_json(tmp_path / "i.json", COCO_JSON)
    register_coco_grounding_dataset(name, json_file, images_dir(tmp_path),
                                    thing_classes=["person", "car", "bus"])
    with pytest.raises(ValueError, match=r"i\.json: categories differ .* first difference at index 2"):
        DatasetCatalog.get(name)


def test_objects365_v2_patch_folders_and_excluded_image(tmp_path, name):
    content = {
        "images": [
            {"id": 420917, "height": 512, "width": 769, "license": 5, "url": "",
             "file_name": "images/v1/patch8/objects365_v1_00420917.jpg"},
            {"id": 320532, "height": 10, "width": 10,
             "file_name": "images/v1/patch6/objects365_v1_00320532.jpg"},
        ],
        "annotations": [
            {"id": 51, "iscrowd": 0, "isfake": 0, "area": 1584.6, "isreflected": 0,
             "bbox": [491.4, 88.2, 35.7, 44.4], "image_id": 420917, "category_id": 2},
            {"id": 52, "iscrowd": 0, "bbox": [0, 0, 1, 1], "image_id": 320532, "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "Person"}, {"id": 2, "name": "Sneakers"}],
    }
    json_file = write_json(tmp_path / "zhiyuan_objv2_train.json", content)
    train = images_dir(tmp_path, "train")
    register_coco_grounding_dataset(
        name, json_file, train, prompt_mode="sampled_negatives", drop_background=False,
        image_path_style="patch_folder", exclude_images=builtin.OBJECTS365_V2_MISSING,
    )
    (record,) = DatasetCatalog.get(name)
    assert record["file_name"] == os.path.join(os.path.abspath(train), "patch8", "objects365_v1_00420917.jpg")
    assert record["annotations"][0]["category_id"] == 1
    assert record["annotations"][0]["bbox"] == [491.4, 88.2, 35.7, 44.4]
    assert MetadataCatalog.get(name).prompt_mode == "sampled_negatives"


COCO_BAD_DATA = {
    "no_bbox": (lambda c: c["annotations"][0].pop("bbox"),
                r"annotation 1 \(image 42\) has a missing or malformed 'bbox'"),
    "negative_width": (lambda c: c["annotations"][0].update(bbox=[1, 2, -3, 4]),
                       r"annotation 1: 'bbox' .* width, height >= 0"),
    "unknown_category": (lambda c: c["annotations"][0].update(category_id=99),
                         r"annotation 1 .* 'category_id' 99"),
    "unknown_image": (lambda c: c["annotations"][0].update(image_id=1234),
                      r"annotations\[0\] \(id 1\) has 'image_id' 1234"),
    "bad_iscrowd": (lambda c: c["annotations"][0].update(iscrowd=2), r"annotation 1: 'iscrowd' must be 0 or 1"),
    "no_height": (lambda c: c["images"][0].pop("height"), r"images\[0\] has a missing or invalid 'height'"),
    "no_file_name": (lambda c: c["images"][1].pop("file_name"), r"images\[1\] \(id 7\) has no 'file_name'"),
    "duplicate_id": (lambda c: c["images"][1].update(id=42), "duplicate 'id'"),
    "no_categories": (lambda c: c.pop("categories"), "missing or empty 'categories'"),
}


@pytest.mark.parametrize("change, message", COCO_BAD_DATA.values(), ids=COCO_BAD_DATA.keys())
def test_coco_bad_data_names_file_and_field(tmp_path, name, change, message):
    content = json.loads(json.dumps(COCO_JSON))
    change(content)
    json_file = write_json(tmp_path / "bad_instances.json", content)
    register_coco_grounding_dataset(name, json_file, images_dir(tmp_path))
    with pytest.raises(ValueError, match=r"bad_instances\.json: .*" + message):
        DatasetCatalog.get(name)


def test_missing_files_raise_at_load_naming_path_and_section(tmp_path, name):
    json_file = str(tmp_path / "nowhere" / "instances.json")
    register_coco_grounding_dataset(name, json_file, str(tmp_path / "nowhere" / "images"))  # no I/O here
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get(name)
    assert json_file in str(info.value)
    assert "see datasets/README.md, section 'Custom COCO-format datasets (ODinW)'" in str(info.value)

    write_json(Path(json_file), COCO_JSON)
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*nowhere.images"):
        DatasetCatalog.get(name)


# ---------------------------------------------------------------------------------------------
# MDETR-style grounding

FLICKR_CAPTION = "A man in a blue shirt is playing a guitar ."
FLICKR_JSON = {
    "images": [
        {"file_name": "1000092795.jpg", "height": 500, "width": 333, "id": 3,
         "caption": FLICKR_CAPTION, "dataset_name": "flickr", "tokens_negative": [[0, 5], [9, 21]],
         "sentence_id": 0, "original_img_id": 1000092795,
         "tokens_positive_eval": [[[0, 5]], [[9, 21]], [[33, 41]]]},
        {"file_name": "1000092795.jpg", "height": 500, "width": 333, "id": 1,
         "caption": "Two dogs .", "dataset_name": "flickr", "tokens_negative": [[0, 8]],
         "sentence_id": 1, "original_img_id": 1000092795, "tokens_positive_eval": []},
    ],
    "annotations": [
        {"area": 600, "iscrowd": 0, "image_id": 3, "category_id": 1, "id": 10,
         "bbox": [10, 20, 30, 20], "tokens_positive": [[0, 5]]},
        # one box shared by two phrases (IoU >= 0.95 merged): both spans on one annotation
        {"area": 100, "iscrowd": 0, "image_id": 3, "category_id": 1, "id": 11,
         "bbox": [40.5, 50.5, 10, 10], "tokens_positive": [[9, 21], [33, 41]]},
    ],
    "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
}


def test_flickr_entries(tmp_path, name):
    json_file = write_json(tmp_path / "final_flickr_separateGT_val.json", FLICKR_JSON)
    root = images_dir(tmp_path, "flickr30k_images")
    register_mdetr_grounding_dataset(name, json_file, root, "flickr", flickr_gt_type="separate",
                                     flickr_annotations_root=str(tmp_path))
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [1, 3]
    record = dicts[1]
    assert record["file_name"] == os.path.join(os.path.abspath(root), "1000092795.jpg")
    assert (record["height"], record["width"]) == (500, 333)
    assert record["task"] == "grounding" and record["dataset"] == name
    assert record["caption"] == FLICKR_CAPTION
    assert record["tokens_positive_eval"] == [[[0, 5]], [[9, 21]], [[33, 41]]]
    phrases = [FLICKR_CAPTION[s:e] for (s, e), in record["tokens_positive_eval"]]
    assert phrases == ["A man", "a blue shirt", "a guitar"]
    assert record["annotations"] == [
        {"bbox": [10.0, 20.0, 30.0, 20.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1,
         "iscrowd": 0, "tokens_positive": [[0, 5]]},
        {"bbox": [40.5, 50.5, 10.0, 10.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1,
         "iscrowd": 0, "tokens_positive": [[9, 21], [33, 41]]},
    ]
    assert record["dataset_name"] == "flickr" and record["sentence_id"] == 0
    assert record["original_img_id"] == 1000092795
    assert record["tokens_negative"] == [[0, 5], [9, 21]]
    assert "original_id" not in record and "data_source" not in record
    assert dicts[0]["annotations"] == [] and dicts[0]["tokens_positive_eval"] == []
    meta = MetadataCatalog.get(name)
    assert (meta.evaluator_type, meta.flickr_gt_type) == ("flickr", "separate")
    assert meta.flickr_annotations_root == str(tmp_path)


def test_refcoco_eval_phrase_is_the_annotation_span(tmp_path, name):
    caption = "the man on the left in red"
    content = {
        "images": [{"file_name": "COCO_train2014_000000581857.jpg", "height": 640, "width": 427,
                    "id": 0, "original_id": 581857, "caption": caption, "dataset_name": "refcoco",
                    "tokens_negative": [[0, 26]]}],
        "annotations": [{"area": 5000.0, "iscrowd": 0, "image_id": 0, "category_id": 1,
                         "id": 0, "bbox": [103.93, 299.99, 134.22, 177.42], "original_id": 2156,
                         "tokens_positive": [[0, 7]]}],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
    }
    json_file = write_json(tmp_path / "finetune_refcoco_testA.json", content)
    register_mdetr_grounding_dataset(name, json_file, images_dir(tmp_path, "train2014"), "refexp")
    (record,) = DatasetCatalog.get(name)
    assert record["tokens_positive_eval"] == [[[0, 7]]]
    assert caption[0:7] == "the man"
    assert record["original_id"] == 581857 and record["dataset_name"] == "refcoco"
    assert record["annotations"][0]["bbox"] == [103.93, 299.99, 134.22, 177.42]
    assert record["annotations"][0]["category_id"] == 1
    assert MetadataCatalog.get(name).evaluator_type == "refexp"


def test_goldg_image_roots_by_data_source_and_derived_phrases(tmp_path, name):
    caption = "a red car. the dog on the grass."
    content = {
        "images": [
            {"file_name": "2354786.jpg", "height": 375, "width": 500, "id": 5, "caption": caption,
             "dataset_name": "mixed", "data_source": "vg", "tokens_negative": []},
            {"file_name": "COCO_train2014_000000000009.jpg", "height": 480, "width": 640, "id": 6,
             "caption": "a bowl.", "dataset_name": "mixed", "data_source": "coco", "tokens_negative": []},
        ],
        "annotations": [
            {"area": 1, "iscrowd": 0, "image_id": 5, "category_id": 1, "id": 1, "bbox": [0, 0, 5, 5],
             "tokens_positive": [[11, 18]]},
            {"area": 1, "iscrowd": 0, "image_id": 5, "category_id": 1, "id": 2, "bbox": [1, 1, 5, 5],
             "tokens_positive": [[0, 9]]},
            {"area": 1, "iscrowd": 0, "image_id": 5, "category_id": 1, "id": 3, "bbox": [2, 2, 5, 5],
             "tokens_positive": [[11, 18]]},
            {"area": 1, "iscrowd": 0, "image_id": 6, "category_id": 1, "id": 4, "bbox": [2, 2, 5, 5],
             "tokens_positive": [[0, 6]]},
        ],
        "categories": [{"id": 1, "name": "object"}],
    }
    json_file = write_json(tmp_path / "final_mixed_train_no_coco.json", content)
    gqa, coco = images_dir(tmp_path, "gqa/images"), images_dir(tmp_path, "coco/train2014")
    register_mdetr_grounding_dataset(name, json_file, gqa, coco_image_root=coco)
    vg_entry, coco_entry = DatasetCatalog.get(name)
    assert vg_entry["file_name"] == os.path.join(os.path.abspath(gqa), "2354786.jpg")
    assert coco_entry["file_name"] == os.path.join(os.path.abspath(coco), "COCO_train2014_000000000009.jpg")
    # one phrase per distinct span list, in order of first appearance
    assert vg_entry["tokens_positive_eval"] == [[[11, 18]], [[0, 9]]]
    assert vg_entry["data_source"] == "vg" and coco_entry["data_source"] == "coco"
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "" and meta.coco_image_root == coco


def _flickr_with(change):
    content = json.loads(json.dumps(FLICKR_JSON))
    change(content)
    return content


GROUNDING_BAD_DATA = {
    "no_caption": (lambda c: c["images"][0].pop("caption"), r"images\[0\] \(id 3\) has no 'caption'"),
    "span_past_caption": (
        lambda c: c["annotations"][1].update(tokens_positive=[[9, 21], [33, 99]]),
        r"annotation 11 \(image 3\): 'tokens_positive' span \[33, 99\) is outside the caption",
    ),
    "empty_span": (lambda c: c["annotations"][0].update(tokens_positive=[[5, 5]]), r"span \[5, 5\) is outside"),
    "flat_span": (lambda c: c["annotations"][0].update(tokens_positive=[0, 5]),
                  r"'tokens_positive' has a malformed span 0"),
    "no_tokens_positive": (lambda c: c["annotations"][0].pop("tokens_positive"),
                           r"annotation 10 \(image 3\) has no 'tokens_positive'"),
    "no_bbox": (lambda c: c["annotations"][0].pop("bbox"),
                r"annotation 10 \(image 3\) has a missing or malformed 'bbox'"),
    "no_category": (lambda c: c["annotations"][0].pop("category_id"), r"annotation 10 .* 'category_id'"),
    "eval_span_past_caption": (
        lambda c: c["images"][0].update(tokens_positive_eval=[[[0, 50]]]),
        r"images\[0\] \(id 3\): 'tokens_positive_eval' span \[0, 50\) is outside",
    ),
    "duplicate_id": (lambda c: c["images"][1].update(id=3), "duplicate 'id'"),
}


@pytest.mark.parametrize("change, message", GROUNDING_BAD_DATA.values(), ids=GROUNDING_BAD_DATA.keys())
def test_grounding_bad_data_names_file_and_field(tmp_path, name, change, message):
    json_file = write_json(tmp_path / "bad_flickr.json", _flickr_with(change))
    register_mdetr_grounding_dataset(name, json_file, images_dir(tmp_path), "flickr")
    with pytest.raises(ValueError, match=r"bad_flickr\.json: .*" + message):
        DatasetCatalog.get(name)


def test_grounding_missing_json_names_section(tmp_path):
    missing = str(tmp_path / "final_flickr_separateGT_test.json")
    with pytest.raises(FileNotFoundError) as info:
        load_mdetr_grounding_json(missing, str(tmp_path), "x", readme_section="Flickr30k Entities")
    assert missing in str(info.value)
    assert "see datasets/README.md, section 'Flickr30k Entities'" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Builtin registration


EXPECTED_BUILTINS = {
    "coco_2017_train_grounding": "coco", "coco_2017_val_grounding": "coco",
    "lvis_v1_train_grounding": "lvis", "lvis_v1_val_grounding": "lvis", "lvis_v1_minival_grounding": "lvis",
    "objects365_v1_train": "coco", "objects365_v2_train": "coco", "objects365_v2_val": "coco",
    "flickr30k_train_separate": "flickr", "flickr30k_val_separate": "flickr",
    "flickr30k_test_separate": "flickr", "flickr30k_val_merged": "flickr", "flickr30k_test_merged": "flickr",
    **{f"{d}_{s}": "refexp" for d in ("refcoco", "refcoco+") for s in ("train", "val", "testA", "testB")},
    "refcocog_train": "refexp", "refcocog_val": "refexp", "refcocog_test": "refexp",
    "goldg_mixed_train_no_coco": "",
}


def test_builtin_names_registered_with_metadata():
    registered = set(DatasetCatalog.list())
    assert set(EXPECTED_BUILTINS) <= registered
    assert {"coco_2017_val", "lvis_v1_val"} <= registered  # Detectron2's own names untouched
    assert MetadataCatalog.get("coco_2017_val").get("prompt_mode") is None
    root = builtin.default_root()
    for dataset_name, evaluator in EXPECTED_BUILTINS.items():
        meta = MetadataCatalog.get(dataset_name)
        assert meta.evaluator_type == evaluator, dataset_name
        assert meta.json_file.startswith(os.path.join(root, "")), dataset_name
    assert MetadataCatalog.get("lvis_v1_train_grounding").prompt_mode == "sampled_negatives"
    assert MetadataCatalog.get("lvis_v1_minival_grounding").json_file.endswith(
        "lvis/lvis_v1_minival_inserted_image_name.json")
    assert MetadataCatalog.get("objects365_v2_train").prompt_mode == "sampled_negatives"
    assert MetadataCatalog.get("coco_2017_val_grounding").prompt_mode == "all_categories"
    assert len(MetadataCatalog.get("coco_2017_val_grounding").thing_classes) == 80
    assert len(MetadataCatalog.get("lvis_v1_val_grounding").thing_classes) == 1203
    assert MetadataCatalog.get("refcocog_test").json_file.endswith("finetune_refcocog_test_corrected.json")
    assert MetadataCatalog.get("refcoco+_testB").image_root == os.path.join(root, "coco", "train2014")
    flickr = MetadataCatalog.get("flickr30k_test_merged")
    assert flickr.flickr_gt_type == "merged"
    assert flickr.flickr_annotations_root == os.path.join(root, "flickr30k")
    assert flickr.image_root == os.path.join(root, "flickr30k", "flickr30k_images")
    goldg = MetadataCatalog.get("goldg_mixed_train_no_coco")
    assert goldg.coco_image_root == os.path.join(root, "coco", "train2014")


@pytest.fixture
def builtins_at(tmp_path):
    """Re-registers the builtins under tmp_path/datasets; restores the default root afterwards."""
    root = tmp_path / "datasets"
    builtin.register_all_fiber_datasets(str(root))
    yield root
    builtin.register_all_fiber_datasets(builtin.default_root())


def test_builtin_loaders_on_a_dataset_tree(builtins_at):
    root = builtins_at
    write_json(root / "mdetr_annotations" / "final_flickr_separateGT_val.json", FLICKR_JSON)
    (root / "flickr30k" / "flickr30k_images").mkdir(parents=True)
    dicts = DatasetCatalog.get("flickr30k_val_separate")
    expected = os.path.abspath(root / "flickr30k" / "flickr30k_images" / "1000092795.jpg")
    assert dicts[1]["file_name"] == expected
    assert dicts[1]["dataset"] == "flickr30k_val_separate"

    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    cats = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    write_json(root / "coco" / "annotations" / "instances_val2017.json", {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "height": 426, "width": 640}],
        "annotations": [{"id": 1, "image_id": 139, "category_id": 90, "bbox": [1, 2, 3, 4], "iscrowd": 0}],
        "categories": cats,
    })
    (root / "coco" / "val2017").mkdir(parents=True)
    (record,) = DatasetCatalog.get("coco_2017_val_grounding")
    assert record["annotations"][0]["category_id"] == 79  # toothbrush

    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get("refcoco_val")
    assert str(root / "mdetr_annotations" / "finetune_refcoco_val.json") in str(info.value)
    assert "section 'RefCOCO, RefCOCO+, RefCOCOg'" in str(info.value)


def test_readme_has_every_cited_section():
    headings = set(re.findall(r"^#+\s+(.+?)\s*$", (REPO / "datasets" / "README.md").read_text(), re.M))
    from fiber_det.data.datasets import coco_style, mdetr

    cited = set(builtin.README_SECTIONS.values())
    cited |= {coco_style.CUSTOM_DETECTION_SECTION, mdetr.CUSTOM_GROUNDING_SECTION}
    assert cited <= headings, cited - headings
