"""Image–caption datasets of the coarse stage: Karpathy jsons, the official Arrow files, JSON-lines.

Every format becomes the same dataset dicts ("caption" contract), **one dict per (image,
caption) pair**, as the official data sets index their items:

- ``task``: ``"caption"``; ``dataset``: the registered name;
- ``image_id``: the image's id in its source (Karpathy/Arrow: the file name; JSON-lines: the
  line's ``image_id``, else its ``image`` path); ``image_index``: 0..N_img-1 in load order;
- ``caption_index``: 0..N_cap-1 over the whole dataset (image order, then caption order);
  ``caption``: the raw sentence (no lower-casing, no stripping);
- the image: ``file_name`` (a path), or ``arrow_file`` + ``arrow_row`` (bytes read, memory
  mapped, only when the mapper needs them); ``source``: where the entry was read
  (``file:line``, ``file: images[k]`` or ``file: row r``), named by every later error.

Captions are de-duplicated per image keeping the first occurrence (the official ``set()`` order
depends on Python's per-process string hashing and cannot be reproduced). A caption that is not
a string is an error; an empty or blank caption string is dropped, counted and logged; an image
left without captions is an error naming the file and the line/entry/row.

:func:`retrieval_items` turns the pairs into the evaluation view (one image item per image, then
one text item per caption), see its docstring.
"""
import json
import logging
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco_style import require_dir, require_file

__all__ = [
    "ARROW_CAPTION_COLUMNS",
    "dedup_captions",
    "load_karpathy_json",
    "load_caption_arrow",
    "load_caption_jsonl",
    "read_arrow_image",
    "register_caption_dataset",
    "retrieval_items",
]

logger = logging.getLogger(__name__)

# Columns of the official *.arrow files that the loader reads (``split``, VG's boxes are unused).
ARROW_CAPTION_COLUMNS = ("image", "caption", "image_id")
README_SECTION = "Image–caption datasets (coarse stage)"

# (image fields, captions, source) of one image, in dataset order
ImageEntry = Tuple[dict, Sequence, str]


def dedup_captions(captions: Iterable[str]) -> List[str]:
    """Distinct captions in order of first occurrence.

    Example:
        >>> dedup_captions(["a dog", "a cat", "a dog"])
        ['a dog', 'a cat']
    """
    return list(dict.fromkeys(captions))


def _clean_captions(captions, source: str, dropped: List[str]) -> List[str]:
    """Checked, de-duplicated captions of one image; blank ones are appended to ``dropped``."""
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise ValueError(f"{source}: captions must be a list of strings, got {type(captions).__name__}")
    kept = []
    for k, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(f"{source}: caption {k} is not a string ({caption!r})")
        if caption.strip():
            kept.append(caption)
        else:
            dropped.append(f"{source} caption {k}")
    if not kept:
        raise ValueError(f"{source}: the image has no caption (an empty caption list or only blank captions)")
    return dedup_captions(kept)


def _pair_dicts(entries: Iterable[ImageEntry], dataset_name: str) -> List[dict]:
    """One dict per (image, caption) from per-image entries; logs the blank captions dropped."""
    dicts, dropped = [], []
    image_index = 0
    for fields, captions, source in entries:
        for caption in _clean_captions(captions, source, dropped):
            dicts.append({
                "task": "caption", "dataset": dataset_name, **fields, "image_index": image_index,
                "caption_index": len(dicts), "caption": caption, "source": source,
            })
        image_index += 1
    if dropped:
        logger.warning("dataset '%s': dropped %d blank caption(s), e.g. %s", dataset_name, len(dropped),
                       "; ".join(dropped[:3]))
    logger.info("dataset '%s': %d images, %d (image, caption) pairs", dataset_name, image_index, len(dicts))
    return dicts


# ---------------------------------------------------------------------------------------------
# Karpathy jsons (dataset_coco.json, dataset_flickr30k.json)


def _karpathy_entries(data: dict, json_file: str, image_root: str, splits: Sequence[str]) -> Iterable[ImageEntry]:
    for k, img in enumerate(data["images"]):
        source = f"{json_file}: images[{k}]"
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str) or "split" not in img:
            raise ValueError(f"{source}: expected an object with 'filename', 'split' and 'sentences'")
        if img["split"] not in splits:
            continue
        sentences = img.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
            raise ValueError(f"{source} ({img['filename']}): 'sentences' must be a list of objects with 'raw'")
        # COCO entries name their folder (train2014 / val2014) in "filepath"; Flickr30k has one folder.
        path = os.path.join(image_root, img.get("filepath", ""), img["filename"])
        yield {"file_name": path, "image_id": img["filename"]}, [s["raw"] for s in sentences], \
            f"{source} ({img['filename']})"


def load_karpathy_json(json_file: str, image_root: str, splits: Sequence[str], dataset_name: str) -> List[dict]:
    """Pair dicts of the images of ``splits`` in one of Karpathy's split jsons.

    Args:
        json_file: ``dataset_coco.json`` or ``dataset_flickr30k.json`` (``images`` entries with
            ``filename``, ``split``, ``sentences[].raw`` and, for COCO, ``filepath``).
        image_root: the folder of ``filepath/filename`` (COCO: the folder holding train2014/ and
            val2014/; Flickr30k: the image folder itself).
        splits: Karpathy splits to keep ("train", "val", "restval", "test"), in json order.
        dataset_name: the registered name.

    Raises:
        FileNotFoundError: the json or the image folder is missing.
        ValueError: malformed json, an unknown split name, or an image without captions.
    """
    require_file(json_file, "Karpathy split json", README_SECTION)
    require_dir(image_root, "image folder", README_SECTION)
    with open(json_file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file}: not valid json ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_file}: expected a json object with an 'images' list (Karpathy's split file)")
    unknown = set(splits) - {"train", "val", "restval", "test"}
    if unknown:
        raise ValueError(f"{dataset_name}: unknown Karpathy split(s) {sorted(unknown)}")
    return _pair_dicts(_karpathy_entries(data, json_file, image_root, tuple(splits)), dataset_name)


# ---------------------------------------------------------------------------------------------
# The official Arrow files (one row per image; columns image, caption, image_id, ...)


def _open_arrow(path: str):
    """The table of an Arrow IPC file, memory-mapped (image bytes stay on disk until read)."""
    import pyarrow as pa

    require_file(path, "Arrow file", README_SECTION)
    try:
        table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not an Arrow IPC file as the official writers produce ({e})") from e
    missing = [c for c in ARROW_CAPTION_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; it has {table.column_names}")
    return table


def _arrow_entries(path: str) -> Iterable[ImageEntry]:
    table = _open_arrow(path)
    captions = table.column("caption").to_pylist()
    image_ids = table.column("image_id").to_pylist()
    for row, (caption_list, image_id) in enumerate(zip(captions, image_ids)):
        if isinstance(caption_list, str):  # a plain string column: one caption per image
            caption_list = [caption_list]
        elif caption_list is None:
            caption_list = []
        yield {"arrow_file": path, "arrow_row": row, "image_id": image_id}, caption_list, f"{path}: row {row}"


def load_caption_arrow(arrow_files: Sequence[str], dataset_name: str, missing_ok: bool = False) -> List[dict]:
    """Pair dicts of the official Arrow files, in file then row order.

    Only the ``caption`` and ``image_id`` columns are read here; image bytes are read by
    :func:`read_arrow_image` when an item is mapped.

    Args:
        arrow_files: paths of ``*.arrow`` files (Arrow IPC file format, columns ``image``
            (encoded bytes), ``caption`` (list of strings), ``image_id``).
        dataset_name: the registered name.
        missing_ok: skip absent files (the official GCC/SBU loaders do: how many of the 31/9
            parts exist depends on what could be downloaded); the skipped ones are logged and at
            least one must exist.

    Raises:
        FileNotFoundError: a missing file (all of them with ``missing_ok``).
        ValueError: not an Arrow IPC file, a missing column, or a row without captions.
    """
    present = [p for p in arrow_files if os.path.isfile(p)] if missing_ok else list(arrow_files)
    if missing_ok:
        absent = [p for p in arrow_files if p not in present]
        if not present:
            raise FileNotFoundError(f"dataset '{dataset_name}': none of its Arrow files exists, e.g. "
                                    f"{arrow_files[0]} (see datasets/README.md, section '{README_SECTION}')")
        if absent:
            logger.warning("dataset '%s': %d of %d Arrow files absent and skipped, e.g. %s", dataset_name,
                           len(absent), len(arrow_files), ", ".join(absent[:3]))

    def entries():
        for path in present:
            yield from _arrow_entries(path)

    return _pair_dicts(entries(), dataset_name)


_ARROW_TABLES: Dict[str, Tuple[int, object]] = {}


def read_arrow_image(arrow_file: str, row: int) -> bytes:
    """The encoded image bytes of ``row`` (the file is memory-mapped once per process)."""
    cached = _ARROW_TABLES.get(arrow_file)
    if cached is None or cached[0] != os.getpid():  # data-loader workers map their own copy
        cached = (os.getpid(), _open_arrow(arrow_file))
        _ARROW_TABLES[arrow_file] = cached
    table = cached[1]
    if not 0 <= row < table.num_rows:
        raise IndexError(f"{arrow_file}: row {row} out of range ({table.num_rows} rows)")
    value = table.column("image")[row].as_py()
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"{arrow_file}: row {row}: column 'image' holds {type(value).__name__}, not bytes")
    return bytes(value)


# ---------------------------------------------------------------------------------------------
# JSON-lines: one {"image": path, "captions": [...], "image_id"?: ...} per line


def _jsonl_entries(jsonl_file: str, image_root: str) -> Iterable[ImageEntry]:
    with open(jsonl_file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) hold no entry
            source = f"{jsonl_file}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: not valid json ({e.msg} at column {e.colno})") from e
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
                raise ValueError(f"{source}: expected an object with an 'image' path and a 'captions' list")
            if "captions" not in entry:
                raise ValueError(f"{source}: no 'captions' field")
            path = os.path.join(image_root, entry["image"])  # an absolute "image" is kept as is
            yield {"file_name": path, "image_id": entry.get("image_id", entry["image"])}, entry["captions"], source


def load_caption_jsonl(jsonl_file: str, image_root: Optional[str], dataset_name: str) -> List[dict]:
    """Pair dicts of a JSON-lines file, one ``{"image": path, "captions": [str, ...]}`` per line.

    Args:
        jsonl_file: the file; an optional ``image_id`` field per line names the image (default:
            its ``image`` path). Blank lines are ignored.
        image_root: folder relative ``image`` paths start from (None: the file's folder).
        dataset_name: the registered name.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a line that is not json, lacks ``image``/``captions``, or has no caption,
            named as ``file:line``.
    """
    require_file(jsonl_file, "JSON-lines caption file", README_SECTION)
    root = os.path.dirname(os.path.abspath(jsonl_file)) if image_root is None else image_root
    return _pair_dicts(_jsonl_entries(jsonl_file, root), dataset_name)


# ---------------------------------------------------------------------------------------------
# Registration and the evaluation view


def register_caption_dataset(name: str, loader: Callable[[], List[dict]], *, evaluator_type: str = "",
                             **metadata) -> None:
    """(Re-)registers a caption dataset; ``loader`` runs when the dataset is first loaded.

    Args:
        name: the dataset name.
        loader: returns the pair dicts (e.g. ``lambda: load_caption_jsonl(f, None, name)``).
        evaluator_type: "retrieval" for evaluation sets, "" for training-only sets.
        **metadata: further metadata (e.g. the files read), for messages and tools.
    """
    if evaluator_type not in ("", "retrieval"):
        raise ValueError(f"{name}: a caption dataset's evaluator_type is 'retrieval' or '', got {evaluator_type!r}")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(evaluator_type=evaluator_type, task="caption", **metadata)


_IMAGE_FIELDS = ("file_name", "arrow_file", "arrow_row")


def retrieval_items(pairs: Sequence[dict]) -> List[dict]:
    """The evaluation view of a caption dataset: image items first, then text items.

    - one ``{"modality": "image", image source fields, "image_index", "image_id", "dataset",
      "source"}`` per image, in ``image_index`` order;
    - one ``{"modality": "text", "caption", "caption_index", "image_index", "image_id",
      "dataset", "source"}`` per pair, in ``caption_index`` order (``image_index`` names its
      positive image).

    The mapper reads only the image of an image item and tokenises only the caption of a text
    item; the model answers ``{"image_embedding": (D,)}`` and ``{"text_embedding": (D,)}``.
    """
    images: Dict[int, dict] = {}
    texts = []
    for pair in pairs:
        common = {k: pair[k] for k in ("image_index", "image_id", "dataset", "source") if k in pair}
        if pair["image_index"] not in images:
            images[pair["image_index"]] = {
                "modality": "image", **{k: pair[k] for k in _IMAGE_FIELDS if k in pair}, **common}
        texts.append({"modality": "text", "caption": pair["caption"], "caption_index": pair["caption_index"],
                      **common})
    return [images[i] for i in sorted(images)] + sorted(texts, key=lambda t: t["caption_index"])
