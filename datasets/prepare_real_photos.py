"""Fetches the real photos that are not vendored and writes the real-photo jsons.

    python datasets/prepare_real_photos.py [--root datasets/real_photos]

Sources (each skipped with a message when unavailable; the jsons then list only what is there):
  dog.jpg, person.jpg, giraffe.jpg   Debian package ``darknet`` (MIT / WTFPL, (c) Joseph Redmon),
                                     via ``apt-get download`` + ``dpkg-deb -x`` (no install)
  quokka.jpg                         the ``imgaug==0.4.0`` wheel (MIT), via ``pip download``,
                                     read as a zip (imgaug itself is never imported)
The scikit-image photos need no network (see fiber_det.data.datasets.real_photos).
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fiber_det.data.datasets.real_photos import PHOTOS, default_root, ensure_real_photos

DARKNET_DATA = Path("usr/share/darknet/data")
IMGAUG_PIN = "imgaug==0.4.0"


def _run(cmd, cwd) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fetch_darknet(images_dir: Path, work: Path, wanted) -> None:
    """Extracts the wanted darknet sample photos from the Debian package."""
    _run(["apt-get", "download", "darknet"], cwd=work)
    deb = next(work.glob("darknet_*.deb"))
    _run(["dpkg-deb", "-x", str(deb), str(work / "darknet")], cwd=work)
    for name in wanted:
        shutil.copyfile(work / "darknet" / DARKNET_DATA / name, images_dir / name)


def fetch_quokka(images_dir: Path, work: Path) -> None:
    """Copies imgaug's quokka photo out of its wheel and checks the box against our table."""
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(work), IMGAUG_PIN], cwd=work)
    wheel = next(work.glob("imgaug-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        (images_dir / "quokka.jpg").write_bytes(archive.read("imgaug/quokka.jpg"))
        shipped = json.loads(archive.read("imgaug/quokka_annotations.json"))["bounding_boxes"][0]
    ours = next(p for p in PHOTOS if p.file_name == "quokka.jpg").phrases[0].boxes[0]
    theirs = tuple(int(shipped[k]) for k in ("x1", "y1", "x2", "y2"))
    if theirs != ours:
        print(f"[prepare_real_photos] note: imgaug's quokka box {theirs} differs from ours {ours}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(default_root()), help="folder holding images/ and the jsons")
    args = parser.parse_args(argv)
    images_dir = Path(args.root) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    missing = {p.source: [] for p in PHOTOS}
    for photo in PHOTOS:
        if not (images_dir / photo.file_name).is_file():
            missing[photo.source].append(photo.file_name)
    with tempfile.TemporaryDirectory() as tmp:
        steps = (("darknet", lambda w: fetch_darknet(images_dir, w, missing["darknet"])),
                 ("imgaug", lambda w: fetch_quokka(images_dir, w)))
        for source, fetch in steps:
            if not missing.get(source):
                continue
            work = Path(tmp) / source
            work.mkdir()
            try:
                fetch(work)
                print(f"[prepare_real_photos] fetched {', '.join(missing[source])}")
            except (OSError, subprocess.CalledProcessError, StopIteration, KeyError) as e:
                detail = getattr(e, "stderr", None) or e
                print(f"[prepare_real_photos] skipped {', '.join(missing[source])} ({source} unavailable: {detail})")
    root = ensure_real_photos(args.root)
    with open(root / "grounding.json", encoding="utf-8") as f:
        listed = [img["file_name"] for img in json.load(f)["images"]]
    print(f"[prepare_real_photos] {root}: {len(listed)} photos listed: {', '.join(listed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
