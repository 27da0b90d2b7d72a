"""The page at `/` of a live `vggspec serve`, in a real headless Chromium (Debian's chromium and chromedriver).

It uploads an image through the file input and waits for the top five and the heat map; it checks that the
page asks nothing of the outside world and that a bad image is shown as text. The screenshot of the result
goes to the test's folder, and to docs/serve-page.png when VGGSPEC_UPDATE_SCREENSHOT=1 (so that a test run
leaves the working tree as it was): `VGGSPEC_UPDATE_SCREENSHOT=1 pytest tests/test_serve_page.py`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import vggspec
from vggspec.weights import init_weights

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver; .ci/run installs them where apt is usable)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["coast", "forest", "highway", "inside city", "mountain", "open country", "street", "tall building"]
SPEC = """name: pagetiny
input: 32x32x3
classes: 8
labels: labels.txt
conv3-8 maxpool conv3-16 maxpool
FC-32 FC-8 soft-max
"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,1100"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny dense model with a score map and scene labels. Its weights are random, the classifier's scaled
    up so that its posteriors differ as a trained model's do (the screenshot shows a top class, not 8 x 12.5 %)."""
    folder = tmp_path_factory.mktemp("page")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (folder / "pagetiny.vgg").write_text(SPEC)
    graph = vggspec.load_spec(str(folder / "pagetiny.vgg"))
    weights = init_weights(graph, scheme="xavier", seed=1)
    classifier = [k for k in weights if k.endswith(".weight")][-1]
    weights[classifier] = weights[classifier] * 8
    path = folder / "pagetiny.onnx"
    vggspec.export_onnx(graph, path, weights=weights, fully_conv=True, scores=True)
    return path


@contextmanager
def serving(model: Path, *options: str) -> Iterator[str]:
    """A live `vggspec serve tiny=MODEL` on a free 127.0.0.1 port; its URL. Stopped with SIGTERM."""
    port = free_port()
    with (model.parent / f"serve-{port}.log").open("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vggspec", "serve", f"tiny={model}", "--port", str(port),
                                 *options], cwd=model.parent, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc, log)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(model) -> Iterator[str]:
    with serving(model) as url:
        yield url


def _wait_ready(url: str, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"vggspec serve exited with {proc.returncode}:\n{log.read()}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    log.seek(0)
    pytest.fail(f"vggspec serve was not ready within 90 s:\n{log.read()}")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="vggspec-chromium-")
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A drawn landscape (sky, sun, hills): something a person would recognise in the screenshot."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = 320, 480
    y = np.linspace(0, 1, h)[:, None, None]
    sky = np.array([70, 130, 200]) * (1 - y) + np.array([200, 225, 245]) * y
    image = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([330, 40, 400, 110], fill=(255, 214, 90))
    draw.polygon([(0, 230), (90, 140), (170, 200), (260, 110), (360, 210), (480, 150), (480, 320), (0, 320)],
                 fill=(86, 110, 80))
    draw.polygon([(0, 270), (160, 235), (300, 260), (480, 230), (480, 320), (0, 320)], fill=(120, 150, 90))
    path = tmp_path_factory.mktemp("scene") / "landscape.jpg"
    image.save(path, quality=92)
    return path


def wait(driver, condition, seconds: float = 30):
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d))


def test_the_page_shows_the_top_five_and_the_heat_map(server, browser, scene, tmp_path):
    browser.get(f"{server}/")
    assert browser.title == "vggspec serve"
    wait(browser, lambda d: d.find_element(By.ID, "model").get_attribute("value") == "tiny")
    wait(browser, lambda d: "Dense model" in d.find_element(By.ID, "model-info").text)  # from its metadata
    # The score map needs more than the 32-pixel input: the options say so, as a person would.
    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    browser.find_element(By.ID, "scales").send_keys("160")
    browser.find_element(By.ID, "image").send_keys(str(scene))  # choosing a file classifies it
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top-rows tr")) == 5
         and d.execute_script("return document.getElementById('heatmap-img').naturalWidth") > 0
         or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")[:3]]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#top-rows tr")]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    assert len({r[1] for r in rows}) == 5 and all(r[1] in LABELS for r in rows)
    percents = [float(r[2].rstrip(" %")) for r in rows]
    assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.5
    caption = browser.find_element(By.ID, "heatmap-caption").text
    assert rows[0][1] in caption  # the heat map is the top class's
    assert browser.find_element(By.ID, "heatmap-img").get_attribute("alt") == f"Heat map of {rows[0][1]} over the image"
    used = browser.find_element(By.ID, "used").text
    assert "protocol dense" in used and "scales 160" in used
    protocol = browser.find_element(By.CSS_SELECTOR, "#protocol option[value='']").get_attribute("textContent")
    assert protocol == "Model's default (dense)"  # the model's own, learned from the answer
    # No external assets: every resource the page loaded came from the server itself (or a data: URL).
    sources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(s.startswith(server) or s.startswith(("data:", "blob:")) for s in sources), sources
    browser.execute_script("document.activeElement.blur()")  # the screenshot shows no focus ring
    shot = tmp_path / "serve-page.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("VGGSPEC_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "serve-page.png")


def test_a_bad_image_is_shown_as_text_and_the_file_input_takes_the_keyboard(server, browser, tmp_path):
    browser.get(f"{server}/")
    wait(browser, lambda d: d.find_element(By.ID, "model").get_attribute("value") == "tiny")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    error = wait(browser, lambda d: d.find_element(By.ID, "error").text)
    assert error.startswith("400: ") and "Traceback" not in error
    assert browser.find_element(By.ID, "error").get_attribute("role") == "alert"
    assert not browser.find_elements(By.CSS_SELECTOR, "#top-rows tr")
    # Every control has a label, and the hidden file input still takes the keyboard focus.
    for control in browser.find_elements(By.CSS_SELECTOR, "select, input"):
        name = control.get_attribute("id")
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for='{name}']"), name
    browser.execute_script("document.getElementById('image').focus()")
    assert browser.execute_script("return document.activeElement.id") == "image"


def test_a_server_with_an_api_key_gets_it_from_the_page(model, browser):
    with serving(model, "--api-key", "s3cret-key") as url:
        browser.get(f"{url}/")  # the page itself needs no key
        key = wait(browser, lambda d: d.find_element(By.ID, "apikey") if d.find_element(By.ID, "apikey")
                   .is_displayed() else None)
        wait(browser, lambda d: "needs an API key" in d.find_element(By.ID, "error").text)
        assert browser.execute_script("return document.activeElement.id") == "apikey"
        key.send_keys("wrong")
        key.send_keys(Keys.ENTER)
        wait(browser, lambda d: "refused" in d.find_element(By.ID, "error").text)
        key.clear()
        key.send_keys("s3cret-key", Keys.ENTER)
        wait(browser, lambda d: d.find_element(By.ID, "model").get_attribute("value") == "tiny")
        assert browser.find_element(By.ID, "error").text == ""
