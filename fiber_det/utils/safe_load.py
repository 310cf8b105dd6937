"""Reads checkpoint files without running code from them.

Full unpickling (``torch.load(weights_only=False)``, or the plain ``pickle.load`` that
Detectron2 0.6 uses for ``.pkl`` files) calls whatever function the file names, so a crafted
checkpoint runs arbitrary code. Every fiber-det loader reads files through
:func:`load_checkpoint_file`, which admits only tensors, numpy arrays, numpy scalars and plain
containers:

* PyTorch files (``.pth``, ``.pt``, anything not ``.pkl``): ``torch.load(weights_only=True)``
  with numpy's array-rebuilding functions added to its allowlist;
* pickle files (``.pkl``, ``.pickle``: the Detectron2 and Caffe2 model zoos): a restricted
  unpickler with the same allowlist.

Anything else is refused with :class:`UnsafeCheckpointError`, naming the file and the refused
objects. An empty, truncated or foreign file raises :class:`CorruptCheckpointError`, whose first
line is the diagnosis ("the file is empty", "the file is truncated", ...) and the rest the details.
"""
import _compat_pickle
import os
import pickle
import re
import zipfile
from typing import Any, List, Tuple

import numpy as np
import torch

__all__ = ["load_checkpoint_file", "UnsafeCheckpointError", "CorruptCheckpointError", "PICKLE_EXTENSIONS"]

PICKLE_EXTENSIONS = (".pkl", ".pickle")
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1 and numpy 2 pickles
# (module, name) that rebuild arrays and containers without running anything else
_ALLOWED_GLOBALS = {
    *((module, name) for module in _NUMPY_MODULES for name in ("_reconstruct", "scalar")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("_codecs", "encode"),  # protocol-2 pickles store bytes as _codecs.encode(text, "latin1")
}
_NUMPY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "complex64", "complex128")
_TORCH_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_REFUSAL = "Weights only load failed"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that names Python objects other than tensors, arrays and containers."""


class CorruptCheckpointError(ValueError):
    """An empty, truncated or unreadable checkpoint file."""


def load_checkpoint_file(path: str, map_location: str = "cpu", mmap: bool = False) -> Any:
    """The content of a checkpoint file, loaded without executing code from it.

    Args:
        path: a ``.pkl`` / ``.pickle`` file (restricted unpickler, latin1 strings as Detectron2
            reads them) or a PyTorch file of any other name.
        map_location: where tensors go (as ``torch.load``).
        mmap: memory-map a zip-format PyTorch file, so tensors the caller drops (e.g. an official
            coarse checkpoint's multi-GB image queue) are never read; legacy files load normally.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file names objects outside the allowlist (listed).
        CorruptCheckpointError: the file is empty, truncated or not a checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    if os.path.getsize(path) == 0:
        raise CorruptCheckpointError(f"{path}: the file is empty (0 bytes); was it written by a process "
                                     "that was killed or ran out of disk?")
    if path.endswith(PICKLE_EXTENSIONS):
        return _load_pickle(path)
    return _load_torch(path, map_location, mmap and _zip_complete(path))


def _load_pickle(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, encoding="latin1").load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(_refusal(path, [str(e)])) from None
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
            raise CorruptCheckpointError(_diagnosis(path, e)) from e


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Python 2 names (Caffe2-era files) mapped as the default unpickler maps them
        key = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if key not in _ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(f"{module}.{name}")
        return super().find_class(*key)


def _numpy_safe_globals() -> List[Tuple[Any, str]]:
    """numpy's allowlisted functions for torch's weights-only unpickler, under both module names."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = [type(np.dtype(t)) for t in _NUMPY_DTYPES]  # np.dtype(...) instances are rebuilt with BUILD
    return [(getattr(core, name), f"{module}.{name}") for module in _NUMPY_MODULES
            for name in ("_reconstruct", "scalar")] + [np.ndarray, np.dtype, *dtypes]


def _load_torch(path: str, map_location: str, mmap: bool = False) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = _refused_globals(path, str(e)) if _TORCH_REFUSAL in str(e) else []
        if refused:
            raise UnsafeCheckpointError(_refusal(path, refused)) from None
        raise CorruptCheckpointError(_diagnosis(path, e)) from e
    except (EOFError, RuntimeError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(_diagnosis(path, e)) from e


def _refused_globals(path: str, message: str) -> List[str]:
    """The Python objects a PyTorch file names beyond the allowlist (from torch's refusal)."""
    found = re.findall(r"GLOBAL ([\w.]+)", message) + re.findall(r"got <class '([\w.]+)'>", message)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            found += torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files: the message's name is all there is
        pass
    allowed = {f"{m}.{n}" for m, n in _ALLOWED_GLOBALS}
    return sorted(set(found) - allowed)


def _refusal(path: str, refused: List[str]) -> str:
    return (f"{path}: refused to load: the file names the Python object(s) {', '.join(refused)}, which "
            "unpickling would call (a checkpoint can run code this way). fiber-det loads only tensors, numpy "
            "arrays and plain containers; if you trust the file, load it yourself and re-save its tensors "
            "with torch.save(state_dict).")


def _diagnosis(path: str, error: Exception) -> str:
    """One line naming what is wrong with an unreadable file, then the underlying error."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith(_TORCH_REFUSAL):  # torch's advice to drop weights_only does not apply
        lines = [line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))]
    message = lines[0] if lines else type(error).__name__
    if head == _TORCH_ZIP_MAGIC and not _zip_complete(path):
        first = f"the file is truncated ({size} bytes: a PyTorch checkpoint without its end)"
    elif isinstance(error, EOFError) or "EOF" in message or "truncated" in message:
        first = f"the file is truncated ({size} bytes; the data ends early)"
    else:
        first = f"the file is not a readable checkpoint ({size} bytes, starts with {head!r})"
    return f"{path}: {first}; was it copied or written completely?\n  details: {type(error).__name__}: {message}"


def _zip_complete(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False
