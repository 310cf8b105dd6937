"""Runtime fixes that let detectron2 v0.6 (pure-Python build) run on a current stack.

Applied once by ``import fiber_det``, before any detectron2 submodule is imported. Each fix
changes nothing when the installed versions do not need it. The facts behind every fix are in
../shared/docs/install.md ("Errors you will meet with v0.6").
"""
import importlib.util
import sys
import types

__all__ = ["apply"]

_APPLIED = False


class _StandInC(types.ModuleType):
    """Replaces detectron2's compiled ``_C``, which cannot be built without its csrc sources.

    FIBER needs none of its kernels (deformable conv and NMS come from torchvision). Any other
    kernel (rotated boxes, detectron2's own DCN) raises a clear error when called.
    """

    def __init__(self):
        super().__init__("detectron2._C")
        self.__file__ = "<fiber_det stand-in for detectron2._C>"

    @staticmethod
    def get_compiler_version():
        return "none (fiber_det stand-in)"

    @staticmethod
    def get_cuda_version():
        return "none (fiber_det stand-in)"

    @staticmethod
    def has_cuda():
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _unavailable(*args, **kwargs):
            raise NotImplementedError(
                f"detectron2._C.{name} is unavailable: detectron2 is installed without its C++/CUDA "
                "extension (see tools/setup_env.sh). fiber_det uses torchvision kernels instead."
            )

        return _unavailable


def _register_stand_in_c():
    if "detectron2._C" in sys.modules:
        return
    spec = importlib.util.find_spec("detectron2")
    if spec is None:
        return
    real = None
    for location in spec.submodule_search_locations or []:
        import glob
        import os

        real = real or glob.glob(os.path.join(location, "_C.*.so"))
    if real:  # a real build exists: use it
        return
    import detectron2

    stand_in = _StandInC()
    sys.modules["detectron2._C"] = stand_in
    detectron2._C = stand_in


def _pillow_aliases():
    # Pillow >= 10 removed Image.LINEAR (used by detectron2.data.transforms).
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _numpy_aliases():
    # numpy >= 1.24 removed np.float & co (used by lvis/eval.py).
    import numpy as np

    for name, value in (("float", float), ("int", int), ("bool", bool), ("object", object)):
        if name not in np.__dict__:
            setattr(np, name, value)


def _coco_eval_without_c():
    # COCOEvaluator's default "fast" implementation calls _C; pycocotools gives the same numbers.
    from pycocotools.cocoeval import COCOeval

    from detectron2.evaluation import fast_eval_api

    if isinstance(sys.modules.get("detectron2._C"), _StandInC):
        fast_eval_api.COCOeval_opt.evaluate = COCOeval.evaluate
        fast_eval_api.COCOeval_opt.accumulate = COCOeval.accumulate


def apply():
    """Apply every fix once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _pillow_aliases()
    _numpy_aliases()
    _register_stand_in_c()
    _coco_eval_without_c()
    _APPLIED = True
