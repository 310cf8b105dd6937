"""tools/check_reference_parity.py: passes on the golden fixture, and a tampered copy makes it
fail on exactly the affected key paths.

The tool takes ~30 s per run; both runs are started together."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURE_V2, REPO

ALPHA_T2I_11 = "module.fusion_backbone.language_backbone.body.model.encoder.layer.11.alpha_t2i"


def _start(fixture_path):
    return subprocess.Popen(
        [sys.executable, "tools/check_reference_parity.py", "--fixture", str(fixture_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(returncode, stdout lines, stderr) of the tool on the fixture and on a tampered copy:
    the last text layer's t2i gate x1.5 (changes text_layers[11] and everything downstream of the
    text features, not the Swin/FPN features) and the recorded ``loss_cls`` changed."""
    assert FIXTURE_V2.is_file()
    tampered = torch.load(FIXTURE_V2, map_location="cpu", weights_only=True)  # a private copy
    sd = tampered["state_dict"]
    sd[ALPHA_T2I_11] = sd[ALPHA_T2I_11].clone() * 1.5
    tampered["outputs_train"]["losses"]["loss_cls"] = 0.25
    path = tmp_path_factory.mktemp("tampered") / "fiber_ref_v2_tampered.pt"
    torch.save(tampered, path)
    procs = {"golden": _start(FIXTURE_V2), "tampered": _start(path)}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=400)
        out[name] = (proc.returncode, stdout.splitlines(), stderr)
    return out


LINE = re.compile(r"^(\S+)\s+max_abs_diff=\S+\s+tol\[[^\]]*\]\s+(OK|FAIL|SKIP)\b")


def _status(lines):
    """{key path: OK/FAIL/SKIP} of the per-tensor lines ("<key>  max_abs_diff=..  tol[..]  OK")."""
    return {m.group(1): m.group(2) for m in map(LINE.match, lines) if m}


def test_parity_tool_passes_on_the_fixture(runs):
    rc, lines, stderr = runs["golden"]
    assert rc == 0, "\n".join(lines[-20:]) + stderr
    status = _status(lines)
    assert len(status) >= 90
    fpn0 = [line for line in lines if line.startswith("outputs_eval/fpn_features[0]")]
    assert len(fpn0) == 1 and "OK" in fpn0[0].split()
    for key in ("outputs_eval/language/text_layers[11]", "outputs_eval/backbone_features/C5",
                "outputs_eval/head/dot_product_logits[4]", "outputs_eval/detections[0]/boxes_xyxy",
                "outputs_train/losses/loss_dot_product_token", "outputs_train/atss_assignment[0]/matched_gt_index"):
        assert status.get(key) == "OK", key
    assert not [k for k, s in status.items() if s == "FAIL"]
    assert lines[-1].startswith("PARITY OK")


def test_parity_tool_fails_on_a_tampered_fixture(runs):
    rc, lines, stderr = runs["tampered"]
    assert rc == 1, "\n".join(lines[-20:]) + stderr
    status = _status(lines)
    assert lines[-1].startswith("PARITY FAIL")
    failed = {k for k, s in status.items() if s == "FAIL"}
    # the changed gate: the last text layer and what reads the text features
    assert {"outputs_eval/language/text_layers[11]", "outputs_eval/language/hidden",
            "outputs_eval/head/dot_product_proj_tokens", "outputs_eval/head/dot_product_logits[0]"} <= failed
    # the changed recorded loss
    assert "outputs_train/losses/loss_cls" in failed
    # upstream of the gate, and the image-only path, still agree
    for key in ("outputs_eval/language/text_embeddings", "outputs_eval/language/text_layers[10]",
                "outputs_eval/backbone_features/C5", "outputs_eval/fpn_features[0]",
                "outputs_eval/dyhead_tower_features[0]", "outputs_eval/head/bbox_reg[0]"):
        assert status[key] == "OK", key
    fail_lines = [line for line in lines if " FAIL" in line and not line.startswith("PARITY")]
    assert all(line.split()[0] in failed for line in fail_lines)
    n_failed = int(lines[-1].split(" failed")[0].rsplit(" ", 1)[-1])
    assert n_failed == len(failed)
