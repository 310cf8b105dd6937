"""Runtime fixes that let detectron2 v0.6 (pure-Python build) run on a current stack.

Each fix changes nothing when the installed versions do not need it; the facts behind them are in
../shared/docs/install.md ("Errors you will meet with v0.6"). They are applied
- by ``import fiber_det`` (:func:`apply`), and
- at interpreter start in the project's venv, through ``fiber_det_compat.pth`` written by
  tools/setup_env.sh (:func:`install_hook`): a meta-path hook applies them the moment
  ``detectron2`` is imported, so ``import detectron2.modeling`` works even before
  ``import fiber_det``.
This module is top-level (not inside ``fiber_det``) so the hook imports nothing heavy.
"""
import glob
import importlib.abc
import importlib.util
import os
import sys
import types

__all__ = ["apply", "install_hook"]


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


def _register_stand_in_c(detectron2):
    if "detectron2._C" in sys.modules:
        return
    for location in getattr(detectron2, "__path__", []):
        if glob.glob(os.path.join(location, "_C.*.so")):  # a real build exists: use it
            return
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


def _coco_eval_without_c(fast_eval_api):
    # COCOEvaluator's default "fast" implementation calls _C; pycocotools gives the same numbers.
    from pycocotools.cocoeval import COCOeval

    if isinstance(sys.modules.get("detectron2._C"), _StandInC):
        fast_eval_api.COCOeval_opt.evaluate = COCOeval.evaluate
        fast_eval_api.COCOeval_opt.accumulate = COCOeval.accumulate


_AFTER_IMPORT = {
    "detectron2": lambda m: (_pillow_aliases(), _numpy_aliases(), _register_stand_in_c(m)),
    "detectron2.evaluation.fast_eval_api": _coco_eval_without_c,
}


def apply():
    """Apply every fix for the modules already imported (idempotent)."""
    import detectron2

    _AFTER_IMPORT["detectron2"](detectron2)
    if "detectron2.evaluation.fast_eval_api" in sys.modules:
        _coco_eval_without_c(sys.modules["detectron2.evaluation.fast_eval_api"])
    install_hook()


class _FixAfterImport(importlib.abc.MetaPathFinder):
    """Runs the fix of a listed module right after the module body executes."""

    def find_spec(self, name, path, target=None):
        if name not in _AFTER_IMPORT:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_fix(module, _exec=exec_module, _fix=_AFTER_IMPORT[name]):
            _exec(module)
            _fix(module)

        spec.loader.exec_module = exec_then_fix
        return spec


def install_hook():
    """Register the import hook once (the venv's .pth calls this at start-up)."""
    if not any(isinstance(f, _FixAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FixAfterImport())
