"""fiber-det: FIBER's fine-grained (detection / phrase grounding) stage as a Detectron2 extension."""
from setuptools import find_packages, setup

# The versions tools/setup_env.sh installs; keep both in sync.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "detectron2==0.6",  # built from the pb1-detectron2 sdist by tools/build_detectron2_wheel.py
    "setuptools>=77.0.3,<82",  # detectron2.model_zoo imports pkg_resources
    "fvcore==0.1.5.post20221221",
    "iopath==0.1.9",
    "yacs==0.1.8",
    "pycocotools==2.0.11",
    "omegaconf==2.3.1",
    "hydra-core==1.3.8",
    "timm==1.0.31",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "opencv-python-headless==4.11.0.86",
    "pyarrow==26.0.1",  # the official image-caption Arrow files of the coarse stage
    # lvis==0.5.3 is needed by LVIS evaluation; the set-up script installs it with --no-deps
    # because its own requirements pull the GUI opencv-python next to the headless one.
]

TEST_REQUIRES = [
    "pytest==9.2.0",
    "hypothesis==6.170.15",
    "scikit-image==0.26.0",  # CC0 sample photographs used by end-to-end tests
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
    extras_require={"test": TEST_REQUIRES},
)
