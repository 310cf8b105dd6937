"""Build a pure-Python detectron2 0.6 wheel from its PyPI registry copy (no C++/CUDA part).

Usage: python tools/build_detectron2_wheel.py OUT_DIR

detectron2 is not on PyPI under its own name. ``pb1-detectron2==0.6`` is an sdist whose Python
files are byte-identical to upstream v0.6 (compared file by file when this was set up). This script
1. downloads that sdist from the PyPI simple index and checks its sha256,
2. edits its setup.py in a scratch folder: name "detectron2", no extension modules, the shipped
   model-zoo configs as package data, and without the requirements only caffe2 export or the
   repo's formatter need (``black==21.4b2``, ``future``, ``pydot``) or that pip refuses
   (the ``panopticapi @ URL`` extra),
3. runs ``pip wheel --no-deps --no-build-isolation`` (setup.py imports torch).
Nothing of detectron2 is committed to this repository; the edits are string replacements that
fail loudly if the upstream text is not found.
"""
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

SDIST = "pb1-detectron2-0.6.tar.gz"
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
INDEX = os.environ.get("FIBER_PYPI_SIMPLE", "https://pypi.org/simple")

# (upstream text, replacement) pairs applied to setup.py
SETUP_EDITS = [
    ('name="pb1-detectron2"', 'name="detectron2"'),
    ("ext_modules=get_extensions(),", "ext_modules=[],"),
    ('cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},', ""),
    (
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    ),
    ('"future",  # used by caffe2', ""),
    ('"pydot",  # used to save caffe2 SVGs', ""),
    ('"black==21.4b2",', ""),
    ('"panopticapi @ https://github.com/cocodataset/panopticapi/archive/master.zip",', ""),
]


def sdist_url() -> str:
    page = urllib.request.urlopen(f"{INDEX}/pb1-detectron2/", timeout=120).read().decode()
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].endswith("/" + SDIST):
            return href.split("#")[0]
    raise SystemExit(f"{SDIST} not listed at {INDEX}/pb1-detectron2/")


def patch_setup(path: str) -> None:
    text = open(path).read()
    for old, new in SETUP_EDITS:
        if old not in text:
            raise SystemExit(f"{path}: expected text not found, cannot patch: {old!r}")
        text = text.replace(old, new)
    open(path, "w").write(text)


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, SDIST)
        url = sdist_url()
        print(f"    downloading {url}")
        urllib.request.urlretrieve(url, archive)
        digest = hashlib.sha256(open(archive, "rb").read()).hexdigest()
        if digest != SHA256:
            raise SystemExit(f"{SDIST}: sha256 {digest} != expected {SHA256}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        src = os.path.join(tmp, SDIST[: -len(".tar.gz")])
        patch_setup(os.path.join(src, "setup.py"))
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", out_dir, src],
            check=True,
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
