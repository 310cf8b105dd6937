"""Checkpoints never run code: crafted .pkl and .pth files are refused, naming the file and the
object; model-zoo .pkl files, numpy arrays and our own checkpoints load; empty and truncated
files get a one-line diagnosis first."""
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import tiny_cfg, tiny_model
from fiber_det.checkpoint.checkpointer import FiberCheckpointer
from fiber_det.predictor import FIBERPredictor
from fiber_det.utils.safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_checkpoint_file


class _Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _crafted(tmp_path, suffix):
    marker = tmp_path / f"code_ran_{suffix}"
    content = {"model": {"w": np.ones(2, np.float32)}, "__author__": "Detectron2 Model Zoo", "x": _Payload(marker)}
    path = tmp_path / f"crafted.{suffix}"
    if suffix == "pkl":
        with open(path, "wb") as f:
            pickle.dump(content, f, protocol=2)
    else:
        torch.save(content, path)
    return path, marker


@pytest.mark.parametrize("suffix", ["pkl", "pth"])
def test_crafted_files_are_refused_by_every_loader(tmp_path, suffix):
    path, marker = _crafted(tmp_path, suffix)
    loaders = [lambda: load_checkpoint_file(path), lambda: FiberCheckpointer(tiny_model()).load(str(path)),
               lambda: FIBERPredictor(tiny_cfg(MODEL__WEIGHTS=str(path)))]
    for load in loaders:
        with pytest.raises(UnsafeCheckpointError) as error:
            load()
        assert str(error.value).startswith(f"{path}: refused to load") and "posix.mkdir" in str(error.value)
        assert not marker.exists(), "the checkpoint ran code"


def test_model_zoo_pickles_and_numpy_arrays_load(tmp_path):
    model = tiny_model(seed=1)
    zoo = {"model": {k: v.numpy() for k, v in model.state_dict().items()},
           "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump(zoo, f, protocol=2)  # protocol 2 stores bytes through _codecs.encode, as old zoo files
    target = tiny_model(seed=2)
    FiberCheckpointer(target).load(str(tmp_path / "zoo.pkl"))
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    torch.save({"a": np.arange(3), "b": np.float32(2.5), "c": torch.ones(2)}, tmp_path / "numpy.pth")
    loaded = load_checkpoint_file(tmp_path / "numpy.pth")
    assert loaded["a"].tolist() == [0, 1, 2] and loaded["b"] == 2.5 and torch.equal(loaded["c"], torch.ones(2))


def test_empty_truncated_and_foreign_files_are_diagnosed(tmp_path):
    torch.save({"model": {"w": torch.randn(1000)}}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    expected = {"truncated.pth": "the file is truncated", "empty.pth": "the file is empty (0 bytes)",
                "notes.pth": "the file is not a readable checkpoint"}
    for name, diagnosis in expected.items():
        with pytest.raises(CorruptCheckpointError) as error:
            FiberCheckpointer(tiny_model()).load(str(tmp_path / name))
        assert str(error.value).splitlines()[0].startswith(f"{tmp_path / name}: {diagnosis}"), str(error.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth' does not exist"):
        load_checkpoint_file(tmp_path / "nowhere.pth")
