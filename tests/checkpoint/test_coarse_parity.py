"""The parity tool on the coarse dev fixture (FIXTURE = the official coarse code's outputs), and
a positive control: tampered expectations fail."""
import copy

import torch

from checkpoint_test_utils import run_tool
from conftest import FIXTURES
from detectron2.config import get_cfg
from fiber_det import add_fiber_config
from fiber_det.checkpoint.coarse_parity import build_coarse_fixture_model, eval_coarse_comparisons, is_coarse_fixture
from fiber_det.checkpoint.parity import write_fixture_tokenizer

COARSE_DEV = FIXTURES / "fiber_coarse_ref_dev.pt"


def test_tool_passes_on_the_dev_fixture():
    assert COARSE_DEV.is_file(), f"golden fixture missing: {COARSE_DEV}"
    proc = run_tool("check_reference_parity.py", "--fixture", COARSE_DEV, timeout=900)
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[-5:]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines[-1].startswith("PARITY OK") and "worst diff/tolerance ratio" in lines[-1]
    body = lines[:-1]
    assert len(body) > 800 and all(line.endswith(("OK", ")")) and " FAIL" not in line for line in body)
    for key in ("outputs_train/negative_sampling/sampled_candidate_index_sequence  max_abs_diff=0.000e+00  tol[exact]",
                "outputs_train/queue_after_step/ptr_after", "outputs_train/grads_full/temp",
                "outputs_eval/fused/image.fused_blocks/stage4.block1", "outputs_eval/itm_explicit/logits",
                "outputs_train/grad_norms/vit_model.patch_embed.proj.weight"):
        assert any(line.startswith(key) for line in body), key


def test_tampered_expectations_fail(tmp_path):
    fixture = torch.load(COARSE_DEV, map_location="cpu", weights_only=True)
    assert is_coarse_fixture(fixture) and not is_coarse_fixture({"outputs_eval": {"head": {}}})
    model, _ = build_coarse_fixture_model(fixture, write_fixture_tokenizer(fixture, tmp_path))
    tampered = copy.copy(fixture)
    tampered["outputs_eval"] = dict(fixture["outputs_eval"])
    tampered["outputs_eval"]["itc"] = dict(fixture["outputs_eval"]["itc"], image_feat=fixture["outputs_eval"]["itc"]
                                           ["image_feat"] + 1e-3)
    fused = dict(fixture["outputs_eval"]["fused"])
    fused["image.fused_blocks"] = dict(fused["image.fused_blocks"])
    fused["image.fused_blocks"]["stage4.block0"] = fused["image.fused_blocks"]["stage4.block0"] * 1.01
    tampered["outputs_eval"]["fused"] = fused
    results = eval_coarse_comparisons(tampered, model)
    failed = sorted(r.key for r in results if not r.ok)
    assert failed == ["outputs_eval/fused/image.fused_blocks/stage4.block0", "outputs_eval/itc/image_feat"], failed


def test_eval_parity_with_the_other_attention_kernels(tmp_path):
    """MODEL.FIBER.SDPA switched from its default keeps eval parity (the default: the tool above)."""
    fixture = torch.load(COARSE_DEV, map_location="cpu", weights_only=True)
    tokenizer = write_fixture_tokenizer(fixture, tmp_path)
    default = add_fiber_config(get_cfg()).MODEL.FIBER.SDPA
    model, _ = build_coarse_fixture_model(fixture, tokenizer, ["MODEL.FIBER.SDPA", str(not default)])
    assert model.backbone.text.encoder.layer[0].attention.self.sdpa is (not default)
    results = eval_coarse_comparisons(fixture, model)
    failed = [r.line() for r in results if not r.ok]
    assert len(results) >= 71 and not failed, "\n".join(failed)  # every eval tensor of the fixture
