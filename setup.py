"""fiber-det: FIBER's fine-grained (detection / phrase grounding) stage as a Detectron2 extension.

Install as a library next to an existing torch (which pip keeps when it is in range):

    pip install -e .              # or: pip install -e ".[demo,export]"

install_requires are the ranges the code needs: each lower bound is a version the tests have run
with (the full suite with constraints.txt; tests/modeling/test_cuda.py on the GPU machine with
torch 2.11, torchvision 0.26, timm 1.0.29, transformers 5.17, omegaconf 2.3.0, hydra-core 1.3.2),
and an upper bound only where a release is known to break. The exact versions that
tools/setup_env.sh installs live in constraints.txt.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.11",
    "torchvision>=0.26",
    # not on PyPI under this name: tools/setup_env.sh builds it from the pb1-detectron2 sdist
    # (tools/build_detectron2_wheel.py); fiber_det_compat.py holds the fixes 0.6 needs
    "detectron2>=0.6",
    "setuptools>=77.0.3,<82",  # detectron2.model_zoo imports pkg_resources, removed in 82
    "fvcore>=0.1.5.post20221221",
    "iopath>=0.1.9",
    "yacs>=0.1.8",
    "pycocotools>=2.0.11",
    "omegaconf>=2.3.0",
    "hydra-core>=1.3.2",
    "timm>=1.0.29",
    "transformers>=5.17",
    "pyarrow>=26.0.1",  # the official image-caption Arrow files of the coarse stage (imported on use)
    "safetensors>=0.8.0",
    "numpy>=2.4.6",
    "Pillow>=12.3.0",
    "PyYAML>=6.0.4",
    "tqdm>=4.70.1",
    # lvis (LVIS evaluation) is imported on use; the set-up installs lvis==0.5.3 with --no-deps
    # because its own requirements pull the GUI opencv-python next to the headless one.
]

EXTRAS_REQUIRE = {
    # tools/demo.py and tools/web_demo.py (detectron2's Visualizer imports cv2)
    "demo": ["gradio>=6.31.0", "opencv-python-headless>=4.11.0.86"],
    # tools/export_model.py (TorchScript-based exporter; onnx to inspect the file)
    "export": ["onnx>=1.23.2", "onnxruntime>=1.32.0"],
}
EXTRAS_REQUIRE["test"] = [
    "pytest>=9.2.0",
    "hypothesis>=6.170.15",
    "scikit-image>=0.26.0",  # CC0 sample photographs used by end-to-end tests
    "playwright>=1.65.3",  # drives Debian's chromium in tests/test_web_demo.py (no browser download)
    *EXTRAS_REQUIRE["demo"],
    *EXTRAS_REQUIRE["export"],
]

setup(
    name="fiber-det",
    version="0.1.0",
    description="FIBER (fusion-in-the-backbone vision-language) detection and phrase grounding "
    "for Detectron2, numerically identical to the official implementation",
    packages=find_packages(include=["fiber_det", "fiber_det.*"]),
    py_modules=["fiber_det_compat"],
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
