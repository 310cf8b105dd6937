"""Tiny image-caption files in the real formats (Karpathy json, official Arrow, JSON-lines), made
from the vendored photos; shared by the caption dataset, mapper and loader tests."""
import json
import shutil
from pathlib import Path

import pyarrow as pa

from conftest import REPO

PHOTOS = REPO / "datasets" / "real_photos" / "images"
NAMES = ("astronaut", "chelsea", "coffee")
CAPTIONS = {
    "astronaut": ["An astronaut in an orange suit.", "A woman smiling next to a flag.",
                  "An astronaut in an orange suit."],  # duplicate: kept once
    "chelsea": ["A tabby cat.", "   ", "A cat with green eyes."],  # blank: dropped and logged
    "coffee": ["A cup of coffee on a saucer with a spoon."],
}


def photo_bytes(name: str) -> bytes:
    return (PHOTOS / f"{name}.jpg").read_bytes()


def write_arrow(path: Path, rows) -> Path:
    """An Arrow IPC file as the official writers make it (``RecordBatchFileWriter``, one row per image)."""
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    schema = pa.schema([("image", pa.binary()), ("caption", pa.list_(pa.string())), ("image_id", pa.string()),
                        ("split", pa.string())])
    table = pa.Table.from_pydict(columns, schema=schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def arrow_rows(split="test"):
    return [{"image": photo_bytes(n), "caption": CAPTIONS[n], "image_id": f"{n}.jpg", "split": split} for n in NAMES]


def write_karpathy(root: Path) -> Path:
    """``dataset_coco.json`` with the photos in ``root/coco/{train2014,val2014}``, one per split."""
    entries = []
    for k, (name, folder, split) in enumerate([("astronaut", "train2014", "train"), ("chelsea", "val2014", "val"),
                                              ("coffee", "val2014", "test"), ("astronaut", "val2014", "restval")]):
        (root / "coco" / folder).mkdir(parents=True, exist_ok=True)
        filename = f"COCO_{folder}_{k:012d}.jpg"
        shutil.copy(PHOTOS / f"{name}.jpg", root / "coco" / folder / filename)
        sentences = [{"raw": c, "tokens": c.lower().split(), "imgid": k, "sentid": 10 * k + j}
                     for j, c in enumerate(CAPTIONS[name])]
        entries.append({"filepath": folder, "filename": filename, "imgid": k, "split": split, "cocoid": 1000 + k,
                        "sentences": sentences, "sentids": [s["sentid"] for s in sentences]})
    path = root / "karpathy" / "dataset_coco.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def write_jsonl(root: Path, lines=None) -> Path:
    """A JSON-lines file with relative image paths (under ``root/images``) and a blank line."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        shutil.copy(PHOTOS / f"{name}.jpg", root / "images" / f"{name}.jpg")
    if lines is None:
        lines = [json.dumps({"image": f"images/{n}.jpg", "captions": CAPTIONS[n]}) for n in NAMES]
        lines.insert(2, "")
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
