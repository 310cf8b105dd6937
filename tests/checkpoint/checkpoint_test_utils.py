"""Helpers shared by the checkpoint tests: the golden fixture written out as the files a user
of the converter has (official config yaml, text config json, tokenizer folder)."""
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence

import torch

from conftest import REPO
from fiber_det.checkpoint.parity import write_fixture_tokenizer

__all__ = ["write_fixture_side_files", "run_tool", "pooled_tensors", "same_detection_sets"]


def write_fixture_side_files(fixture: dict, folder: Path) -> Dict[str, Path]:
    """The fixture's official yacs dump (yaml), its text model config (json, with the
    ``model_type`` HF configs carry) and its tokenizer files (folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    ref = fixture["reference"]
    official = folder / "official_config.yaml"
    official.write_text(ref["cfg_dump"])
    text = folder / "text_config.json"
    text.write_text(json.dumps(dict(ref["text_model_config_not_in_yacs"], model_type="roberta")))
    tok = folder / "tokenizer"
    write_fixture_tokenizer(fixture, tok)
    return {"official_config": official, "text_config": text, "tokenizer": tok}


def run_tool(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``tools/<script>`` with this interpreter from the repository root."""
    return subprocess.run(
        [sys.executable, f"tools/{script}", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def pooled_tensors(shapes: Dict[str, Sequence[int]], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random float tensors of the given shapes, all windows into one shared random vector
    (starting at different offsets), so a checkpoint made of them stays small on disk."""
    g = torch.Generator().manual_seed(seed)
    largest = max(int(torch.Size(s).numel()) for s in shapes.values())
    pool = torch.randn(largest + 997, generator=g)
    out = {}
    for i, (k, s) in enumerate(shapes.items()):
        n = int(torch.Size(s).numel())
        start = (i * 7) % 997
        out[k] = pool[start:start + n].view(tuple(s))
    return out


def same_detection_sets(boxes, scores, labels, ref_boxes, ref_scores, ref_labels, box_tol=5e-3, score_tol=2e-5):
    """Problems (empty list = equal) comparing two detection sets one-to-one: same label, every
    box coordinate within ``box_tol`` pixels and the score within ``score_tol``."""
    problems = []
    if len(scores) != len(ref_scores):
        problems.append(f"{len(scores)} detections vs {len(ref_scores)} in the reference")
    used = torch.zeros(len(scores), dtype=torch.bool)
    for j in range(len(ref_scores)):
        ok = (
            (labels == ref_labels[j]) & ~used
            & ((boxes - ref_boxes[j]).abs().amax(dim=1) <= box_tol)
            & ((scores - ref_scores[j]).abs() <= score_tol)
        )
        if not ok.any():
            problems.append(
                f"reference detection {j} (label {int(ref_labels[j])}, box {ref_boxes[j].tolist()}, "
                f"score {float(ref_scores[j]):.6f}) has no match"
            )
            continue
        used[int(torch.nonzero(ok)[0])] = True
    return problems
