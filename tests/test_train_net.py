"""tools/train_net.py refuses what would silently go wrong: --eval-only of a random model, a
$DETECTRON2_DATASETS that does not exist."""
import pytest

from conftest import REPO, load_tool
from fiber_det.data.datasets.synthetic import default_root, register_synthetic

TINY = str(REPO / "configs" / "quick_schedules" / "FIBER-tiny.yaml")


@pytest.fixture(scope="module")
def tool():
    return load_tool("train_net")


def test_eval_only_needs_weights_unless_asked_for_random_ones(tool, tmp_path):
    args = tool.parse_args(["--config-file", TINY, "--eval-only", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(SystemExit, match="--eval-only without MODEL.WEIGHTS would score a randomly initialised model"):
        tool.setup(args)
    args = tool.parse_args(["--config-file", TINY, "--eval-only", "--random-weights", "OUTPUT_DIR", str(tmp_path)])
    assert tool.setup(args).MODEL.WEIGHTS == ""


def test_a_missing_dataset_root_is_named_not_created(tool, tmp_path, monkeypatch):
    missing = tmp_path / "nonexistent"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(missing))
    monkeypatch.delenv("FIBER_SYNTHETIC_ROOT", raising=False)
    register_synthetic(default_root())  # as at import with this environment
    try:
        args = tool.parse_args(["--config-file", TINY, "OUTPUT_DIR", str(tmp_path / "out"), "DATASETS.TRAIN",
                                '("synthetic_detection_train",)', "DATASETS.TEST", "()"])
        with pytest.raises(FileNotFoundError) as error:
            tool.setup(args)
        assert str(error.value).startswith(f"DETECTRON2_DATASETS={missing} does not exist, and dataset(s) "
                                           "synthetic_detection_train live under it")
        assert not missing.exists()
    finally:
        monkeypatch.undo()
        register_synthetic(default_root())
