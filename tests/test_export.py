"""tools/export_model.py: ONNX export of the tiny model, checked with onnxruntime against PyTorch."""
import importlib.util

import onnx
import pytest
import torch
from conftest import REPO, tiny_model

CONFIG = str(REPO / "configs" / "quick_schedules" / "FIBER-tiny.yaml")
PLAIN_CONVS = ["MODEL.FIBER.HEAD.USE_DFCONV", "False"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("export_model", REPO / "tools" / "export_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A checkpoint of the tiny model with plain DyHead convs (random weights, seed 0)."""
    path = tmp_path_factory.mktemp("export") / "tiny.pth"
    torch.save({"model": tiny_model(0, MODEL__FIBER__HEAD__USE_DFCONV=False).state_dict()}, path)
    return str(path)


def test_export_matches_pytorch(tool, weights, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    diffs = tool.main(["--config-file", CONFIG, "--weights", weights, "--format", "onnx", "--output", str(out),
                       *PLAIN_CONVS])
    printed = capsys.readouterr().out
    print(printed)
    assert "max |onnxruntime - PyTorch|" in printed and "before NMS" in printed
    # two image sizes x two prompt lengths were compared
    assert "input 128x192" in printed and "input 128x128" in printed and "T=9" in printed and "T=18" in printed
    assert set(diffs) == {"boxes", "centerness", "token_logits", "level_sizes"}
    assert diffs["token_logits"] < 1e-4 and diffs["centerness"] < 1e-4, diffs
    assert diffs["boxes"] < 1e-2 and diffs["level_sizes"] == 0, diffs  # boxes reach ~1000 px
    graph = onnx.load(str(out)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims == {"image": ["batch", 3, "height", "width"], "input_ids": ["batch", "tokens"],
                    "attention_mask": ["batch", "tokens"]}
    assert [v.name for v in graph.output] == ["boxes", "centerness", "token_logits", "level_sizes"]


def test_deformable_conv_is_refused_up_front(tool, tmp_path):
    with pytest.raises(SystemExit, match=r"MODEL\.FIBER\.HEAD\.USE_DFCONV = True: .*deform_conv2d.* has no ONNX"):
        tool.main(["--config-file", CONFIG, "--output", str(tmp_path / "model.onnx")])
    assert not (tmp_path / "model.onnx").exists()
