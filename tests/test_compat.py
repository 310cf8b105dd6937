"""The detectron2 v0.6 runtime fixes (fiber_det_compat)."""
import subprocess
import sys

import pytest


def test_detectron2_imports_before_fiber_det():
    """The venv's .pth hook applies the fixes as soon as detectron2 is imported."""
    code = (
        "import detectron2.modeling, detectron2.data, detectron2.engine, detectron2.evaluation\n"
        "from detectron2 import _C\n"
        "print(type(_C).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("_StandInC")


def test_stand_in_kernels_fail_clearly():
    import fiber_det  # noqa: F401
    from detectron2 import _C

    assert _C.has_cuda() is False
    with pytest.raises(NotImplementedError, match="nms_rotated"):
        _C.nms_rotated()


def test_coco_eval_uses_pycocotools():
    import fiber_det  # noqa: F401
    from detectron2.evaluation import fast_eval_api
    from pycocotools.cocoeval import COCOeval

    assert fast_eval_api.COCOeval_opt.evaluate is COCOeval.evaluate
    assert fast_eval_api.COCOeval_opt.accumulate is COCOeval.accumulate
