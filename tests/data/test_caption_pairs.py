"""Image-caption datasets: Karpathy json, official Arrow files and JSON-lines made by the test from
real photos; de-duplication, one item per (image, caption), the evaluation view, bad inputs."""
import json
import logging

import pytest

from caption_files import NAMES, arrow_rows, photo_bytes, write_arrow, write_jsonl, write_karpathy
from detectron2.data import DatasetCatalog, MetadataCatalog
from fiber_det.data.datasets import builtin
from fiber_det.data.datasets.caption_pairs import (
    load_caption_arrow,
    load_caption_jsonl,
    load_karpathy_json,
    read_arrow_image,
    register_caption_dataset,
    retrieval_items,
)

EXPECTED = {  # captions kept per photo: first occurrences, blank dropped
    "astronaut": ["An astronaut in an orange suit.", "A woman smiling next to a flag."],
    "chelsea": ["A tabby cat.", "A cat with green eyes."],
    "coffee": ["A cup of coffee on a saucer with a spoon."],
}


def _check_pairs(dicts, names, name="test"):
    """One dict per (image, caption), indices dense and in order."""
    expected = [(i, c) for i, n in enumerate(names) for c in EXPECTED[n]]
    assert [(d["image_index"], d["caption"]) for d in dicts] == expected
    assert [d["caption_index"] for d in dicts] == list(range(len(expected)))
    assert all(d["task"] == "caption" and d["dataset"] == name for d in dicts)


def test_karpathy_splits_and_paths(tmp_path, caplog):
    json_file = write_karpathy(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fiber_det"):
        train = load_karpathy_json(str(json_file), str(tmp_path / "coco"), ("train", "val"), "test")
    _check_pairs(train, ["astronaut", "chelsea"])
    assert "dropped 1 blank caption" in caplog.text and "images[1]" in caplog.text
    assert train[0]["file_name"] == str(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000000.jpg")
    assert train[-1]["image_id"] == "COCO_val2014_000000000001.jpg"
    test = load_karpathy_json(str(json_file), str(tmp_path / "coco"), ("test",), "test")
    _check_pairs(test, ["coffee"])
    restval = load_karpathy_json(str(json_file), str(tmp_path / "coco"), ("restval",), "test")
    assert restval[0]["file_name"].endswith("val2014/COCO_val2014_000000000003.jpg")


def test_builtin_karpathy_names(tmp_path):
    write_karpathy(tmp_path)
    builtin.register_all_fiber_datasets(str(tmp_path))
    try:
        assert len(DatasetCatalog.get("coco_karpathy_train")) == 4  # Karpathy train + val, not restval
        assert [d["caption"] for d in DatasetCatalog.get("coco_karpathy_test")] == EXPECTED["coffee"]
        assert MetadataCatalog.get("coco_karpathy_test").evaluator_type == "retrieval"
        assert MetadataCatalog.get("coco_karpathy_train").evaluator_type == ""
        with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
            DatasetCatalog.get("flickr30k_karpathy_test")
    finally:
        builtin.register_all_fiber_datasets(builtin.default_root())


def test_arrow_official_layout(tmp_path):
    path = write_arrow(tmp_path / "coco_caption_karpathy_test.arrow", arrow_rows())
    dicts = load_caption_arrow([str(path)], "test")
    _check_pairs(dicts, list(NAMES))
    assert [d["arrow_row"] for d in dicts] == [0, 0, 1, 1, 2]
    assert "file_name" not in dicts[0] and "image" not in dicts[0]  # no image bytes in the dicts
    assert dicts[2]["image_id"] == "chelsea.jpg"
    assert read_arrow_image(str(path), 2) == photo_bytes("coffee")
    with pytest.raises(IndexError, match="row 3 out of range"):
        read_arrow_image(str(path), 3)


def test_builtin_arrow_names_and_missing_parts(tmp_path, caplog):
    (tmp_path / "arrow").mkdir()
    write_arrow(tmp_path / "arrow" / "coco_caption_karpathy_test.arrow", arrow_rows())
    for k in (0, 2):  # parts 1 and 3..8 absent: skipped and logged, as the official SBU loader does
        write_arrow(tmp_path / "arrow" / f"sbu_{k}.arrow", arrow_rows("train")[k:k + 1])
    builtin.register_all_fiber_datasets(str(tmp_path))
    try:
        assert len(DatasetCatalog.get("coco_karpathy_test_arrow")) == 5
        with caplog.at_level(logging.WARNING, logger="fiber_det"):
            sbu = DatasetCatalog.get("sbu_train_arrow")
        assert [d["image_index"] for d in sbu] == [0, 0, 1]
        assert "7 of 9 Arrow files absent" in caplog.text
        with pytest.raises(FileNotFoundError, match="none of its Arrow files"):
            DatasetCatalog.get("gcc_train_arrow")
        with pytest.raises(FileNotFoundError, match="coco_caption_karpathy_train.arrow"):
            DatasetCatalog.get("coco_karpathy_train_arrow")
    finally:
        builtin.register_all_fiber_datasets(builtin.default_root())


def test_arrow_bad_inputs(tmp_path):
    rows = arrow_rows()
    rows[1]["caption"] = []
    with pytest.raises(ValueError, match=r"bad\.arrow: row 1: the image has no caption"):
        load_caption_arrow([str(write_arrow(tmp_path / "bad.arrow", rows))], "test")
    not_arrow = tmp_path / "plain.arrow"
    not_arrow.write_bytes(photo_bytes("coffee"))
    with pytest.raises(ValueError, match="plain.arrow: not an Arrow IPC file"):
        load_caption_arrow([str(not_arrow)], "test")
    import pyarrow as pa
    table = pa.table({"image": [b"x"], "text": [["a"]]})
    with pa.OSFile(str(tmp_path / "cols.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(ValueError, match=r"cols.arrow: missing column\(s\) \['caption', 'image_id'\]"):
        load_caption_arrow([str(tmp_path / "cols.arrow")], "test")
    with pytest.raises(FileNotFoundError, match="absent.arrow"):
        load_caption_arrow([str(tmp_path / "absent.arrow")], "test")


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path)
    dicts = load_caption_jsonl(str(path), None, "test")
    _check_pairs(dicts, list(NAMES))
    assert dicts[0]["file_name"] == str(tmp_path / "images" / "astronaut.jpg")
    assert dicts[0]["image_id"] == "images/astronaut.jpg" and dicts[0]["source"] == f"{path}:1"
    assert dicts[-1]["source"] == f"{path}:4"  # line 3 is blank
    other = load_caption_jsonl(str(path), "/elsewhere", "test")
    assert other[0]["file_name"] == "/elsewhere/images/astronaut.jpg"


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.jpg", "captions": []}', "the image has no caption"),
    ('{"image": "a.jpg", "captions": ["", " "]}', "the image has no caption"),
    ('{"image": "a.jpg", "captions": "a cat"}', "captions must be a list of strings"),
    ('{"image": "a.jpg", "captions": ["a cat", 3]}', "caption 1 is not a string"),
    ('{"image": "a.jpg"}', "no 'captions' field"),
    ('{"captions": ["a cat"]}', "expected an object with an 'image' path"),
    ('{"image": "a.jpg", "captions": ["a cat"]', "not valid json"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"image": "images/coffee.jpg", "captions": ["a cup"]})
    path = write_jsonl(tmp_path, [good, line])
    with pytest.raises(ValueError, match=f"pairs.jsonl:2: .*{message}"):
        load_caption_jsonl(str(path), None, "test")


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_caption_jsonl(str(tmp_path / "nothing.jsonl"), None, "test")
    json_file = write_karpathy(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_karpathy_json(str(json_file), str(tmp_path / "no_images"), ("test",), "test")
    with pytest.raises(ValueError, match="unknown Karpathy split"):
        load_karpathy_json(str(json_file), str(tmp_path / "coco"), ("dev",), "test")


def test_retrieval_items(tmp_path):
    pairs = load_caption_arrow([str(write_arrow(tmp_path / "t.arrow", arrow_rows()))], "test")
    items = retrieval_items(pairs)
    images, texts = items[:3], items[3:]
    assert [i["modality"] for i in images] == ["image"] * 3 and [i["image_index"] for i in images] == [0, 1, 2]
    assert all("caption" not in i and i["arrow_row"] == i["image_index"] for i in images)
    assert [t["modality"] for t in texts] == ["text"] * 5
    assert [(t["caption_index"], t["image_index"]) for t in texts] == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2)]
    assert all("arrow_file" not in t and "file_name" not in t for t in texts)


def test_register_rejects_other_evaluators():
    with pytest.raises(ValueError, match="'retrieval' or ''"):
        register_caption_dataset("test_caption_coco", list, evaluator_type="coco")
    register_caption_dataset("test_caption_ok", lambda: [], evaluator_type="retrieval", note="x")
    assert MetadataCatalog.get("test_caption_ok").task == "caption"


def test_docstring_examples():
    import doctest

    from fiber_det.data.datasets import caption_pairs

    results = doctest.testmod(caption_pairs)
    assert results.attempted >= 1 and results.failed == 0
