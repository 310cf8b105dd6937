"""tools/web_demo.py: the page in a real browser (Debian's chromium, driven by Playwright), and its
callbacks on bad input."""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_model
from PIL import Image

CONFIG = str(REPO / "configs" / "quick_schedules" / "FIBER-tiny.yaml")
PHOTO = REPO / "datasets" / "real_photos" / "images" / "coffee.jpg"
CHROMIUM = "/usr/bin/chromium"
# as root in a container, without a GPU, and with no traffic beyond this machine
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("web_demo", REPO / "tools" / "web_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny model (random weights, seed 0) with the token bias raised: every token
    probability is ~0.98, so every prompt gets detections, deterministically."""
    model = tiny_model(0)
    with torch.no_grad():
        model.head.bias0.fill_(4.0)
    path = tmp_path_factory.mktemp("web_demo") / "tiny.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def demo(tool, weights):
    from fiber_det.predictor import FIBERPredictor

    return tool.WebDemo(FIBERPredictor.from_checkpoint(CONFIG, weights, device="cpu"), max_megapixels=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(weights, tmp_path):
    """The web demo as a user starts it, on a free local port; yields its URL."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "web_demo.py"), "--config-file", CONFIG,
                             "--weights", weights, "--port", str(port), "--cpu", "--max-upload-mb", "5"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("web demo did not start:\n" + (tmp_path / "server.log").read_text())
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_browser_upload_detect_and_bad_file(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert shutil.which("chromium") or os.path.exists(CHROMIUM), \
        "Debian's chromium is missing: run `bash tools/setup_env.sh` as root (apt-get install -y chromium)"
    shutil.copy(PHOTO, tmp_path / PHOTO.name)
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1300})
        page = browser.new_page()
        page.goto(server)
        page.locator("#image-upload input[type=file]").set_input_files(str(tmp_path / PHOTO.name))
        expect(page.locator("#input-image img")).to_be_visible(timeout=60_000)
        page.locator("#prompt textarea").fill("cup. saucer. spoon.")
        page.locator("#detect-button").click()
        rows = page.locator("#detections [role=row]:has([role=gridcell])")  # data rows, not the header
        expect(rows.first).to_be_visible(timeout=120_000)
        expect(page.locator("#output-image img")).to_be_visible()
        expect(page.locator("#status")).to_contain_text("detection(s) with score >= 0.30")
        first = rows.first.inner_text()
        assert any(name in first for name in ("cup", "saucer", "spoon")), first
        page.screenshot(path=str(tmp_path / "web_demo.png"), full_page=True)
        print("screenshot:", tmp_path / "web_demo.png", "| first row:", first.replace("\n", " "))
        # a file that is not an image gets a message in the page
        (tmp_path / "notes.jpg").write_text("not a picture")
        page.locator("#image-upload").get_by_role("button", name="Clear").click()
        page.locator("#image-upload input[type=file]").set_input_files(str(tmp_path / "notes.jpg"))
        expect(page.locator("#status")).to_contain_text("not an image file", timeout=60_000)
        page.screenshot(path=str(tmp_path / "web_demo_bad_upload.png"))
        # the server's upload limit (--max-upload-mb 5): a message in the page, 413 for a direct POST
        (tmp_path / "big.jpg").write_bytes(b"\0" * (6 << 20))
        page.locator("#image-upload").get_by_role("button", name="Clear").click()
        page.locator("#image-upload input[type=file]").set_input_files(str(tmp_path / "big.jpg"))
        expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible(timeout=60_000)
        browser.close()
    import httpx

    response = httpx.post(server + "gradio_api/upload", files={"files": ("big.jpg", b"\0" * (6 << 20))})
    assert response.status_code == 413, response.text
    assert (tmp_path / "web_demo.png").stat().st_size > 10_000


def test_bad_uploads_give_messages(demo, tmp_path):
    """Not an image, floating point, too many pixels, an empty prompt: a message each, no exception."""
    text = tmp_path / "a.png"
    text.write_text("hello")
    floating = tmp_path / "float.tif"
    Image.fromarray(np.full((20, 30), 0.5, dtype=np.float32)).save(floating)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (1200, 1000)).save(huge)  # 1.2 MP > the 1 MP limit of this fixture
    for path, expected in [(text, "not an image file"), (floating, "float.tif"), (huge, "above the 1 MP limit")]:
        image, rows, json_file, status, state = demo.detect(str(path), "class names", "cup.", "", 0.3)
        assert image is None and rows == [] and state is None and expected in status, status
        assert "Traceback" not in status
        assert demo.preview(str(path))[0] is None and expected in demo.preview(str(path))[1]
    status = demo.detect(str(PHOTO), "class names", "  ", "", 0.3)[3]
    assert "type class names" in status
    status = demo.detect(str(PHOTO), "caption", "a cup on a saucer", "a spoon", 0.3)[3]
    assert "'a spoon'" in status and "Traceback" not in status


def test_16_bit_upload_runs_with_a_note(demo, tmp_path):
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((40, 60), 40000, dtype=np.uint16)).save(deep)
    image, rows, _, status, _ = demo.detect(str(deep), "class names", "cup.", "", 0.3)
    assert rows and "16-bit" in status, status
    assert image.shape[:2] == (40, 60) and demo.preview(str(deep))[0][0, 0, 0] == 40000 >> 8


def test_detect_table_slider_and_json(demo):
    image, rows, json_file, status, state = demo.detect(str(PHOTO), "class names", "cup. saucer. spoon.", "", 0.3)
    assert image.shape[2] == 3 and image.dtype == np.uint8 and rows, status
    assert {r[0] for r in rows} <= {"cup", "saucer", "spoon"} and all(r[1] >= 0.3 for r in rows)
    import json

    saved = json.loads(open(json_file).read())
    assert saved["prompt"] == {"classes": ["cup", "saucer", "spoon"]} and len(saved["detections"]) == len(rows)
    # the slider re-filters the stored result without running the model
    _, fewer, _, status = demo.render(state, 1.0)
    assert fewer == [] and status.startswith("0 detection(s)")
    assert demo.detect(str(PHOTO), "caption", "a cup on a saucer", "a cup; a saucer", 0.0)[1]


def test_missing_weights_messages(tool, tmp_path, monkeypatch):
    monkeypatch.setattr(tool, "DEFAULT_WEIGHTS", str(tmp_path / "model_final.pth"))  # as if not trained yet
    message = tool.check_files(tool.parse_args(["--weights", tool.DEFAULT_WEIGHTS]))
    assert "quickstart model" in message and tool.MAIN_JOB in message
    other = tool.check_files(tool.parse_args(["--weights", str(tmp_path / "other.pth")]))
    assert other == f"weights not found: {tmp_path / 'other.pth'}"
    assert "config file not found" in tool.check_files(tool.parse_args(["--config-file", "nope.yaml"]))
