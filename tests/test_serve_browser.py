"""histosynth serve in a real browser: headless Chromium (the system's, via selenium) drives the page.

It draws two ellipses and places a shape, switches the style (the image must change), downloads the
pair (the mask in it must be what was drawn), samples a mask with a type mix, uploads a file that is no
image (the page shows the server's message and keeps working), and saves a screenshot of the page.

Needs the ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them where it is root with
apt-get) and selenium (the ``test`` extra); without them it skips, saying which is missing.

The page is served by uvicorn on a free localhost port, from the tiny run of ``tests/test_serve.py``,
or from ``$HISTOSYNTH_SERVE_RESULTS`` (a real run's results folder, for the screenshot in the docs).
``$HISTOSYNTH_SCREENSHOT`` names where the screenshot goes (default: the test's temporary folder).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.test_serve import results  # noqa: F401 - the session fixture: a tiny finished run

CHROMIUM = next((p for p in ("chromium", "chromium-browser", "google-chrome") if shutil.which(p)), None)
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
    pytest.mark.skipif(DRIVER is None, reason="no chromedriver binary (apt-get install chromium-driver)"),
]
selenium = pytest.importorskip("selenium", reason="selenium is not installed (the test extra)")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (the serve extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from histosynth.serve.app import create_app  # noqa: E402

WAIT = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(results):  # noqa: F811 - the fixture imported above
    folder = Path(os.environ.get("HISTOSYNTH_SERVE_RESULTS") or results)
    app = create_app(folder, max_upload_mb=2)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.run
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    except Exception as err:  # noqa: BLE001 - a browser that cannot start here is a skip, with its reason
        pytest.skip(f"headless chromium did not start: {str(err).splitlines()[0]}")
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def painted(driver) -> int:
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-painted") or 0)


def wait_painted(driver, before: int) -> None:
    WebDriverWait(driver, WAIT).until(lambda d: painted(d) > before and
                                      d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0")


def error_text(driver) -> str:
    box = driver.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


def at(driver, x: float, y: float) -> ActionChains:
    """Actions starting with the pointer at canvas pixel (x, y) (the canvas is shown 1:1)."""
    canvas = driver.find_element(By.ID, "canvas")
    w = canvas.size["width"]
    h = canvas.size["height"]
    return ActionChains(driver).move_to_element_with_offset(canvas, round(x - w / 2), round(y - h / 2))


def test_draw_style_download_sample_and_bad_upload_in_a_browser(server, browser, tmp_path):
    url, run = server
    d = browser
    d.get(url + "/")
    WebDriverWait(d, WAIT).until(lambda drv: painted(drv) >= 1)
    assert not error_text(d), error_text(d)
    info = run.describe(run.default)
    types = sorted(run.classes)
    t1, t2 = types[0], types[-1]

    # draw: a dragged ellipse of the first type, a click (a default ellipse) of the last, a library/β-VAE shape
    drawn = [((75, 70), t1), ((180, 150), t2)]
    Select(d.find_element(By.ID, "type")).select_by_value(str(t1))
    n = painted(d)
    at(d, 55, 58).click_and_hold().move_by_offset(40, 24).release().perform()
    wait_painted(d, n)
    Select(d.find_element(By.ID, "type")).select_by_value(str(t2))
    n = painted(d)
    at(d, 180, 150).click().perform()
    wait_painted(d, n)
    if run.shapes[0].shape[0]:
        d.find_element(By.ID, "shape-0").click()
        Select(d.find_element(By.ID, "type")).select_by_value(str(t1))
        n = painted(d)
        at(d, 200, 60).click().perform()
        wait_painted(d, n)
        drawn.append(((200, 60), t1))
    assert not error_text(d), error_text(d)
    assert f"{len(drawn)} nuclei (drawn)" in d.find_element(By.ID, "status").text
    assert f"step {info['step']}" in d.find_element(By.ID, "status").text

    # switch the style: the image changes
    styles = info["styles"]
    if len(styles) > 1:
        style = Select(d.find_element(By.ID, "style"))
        before = d.find_element(By.ID, "image").get_attribute("src")
        other = next(s for s in styles if s != style.first_selected_option.get_attribute("value"))
        n = painted(d)
        style.select_by_value(other)
        wait_painted(d, n)
        after = d.find_element(By.ID, "image").get_attribute("src")
        assert after.startswith("data:image/png") and after != before
        assert f"style “{other}”" in d.find_element(By.ID, "status").text

    # download: the zip's mask is what was drawn
    d.find_element(By.ID, "download").click()
    deadline = time.monotonic() + WAIT
    while not (zips := [p for p in d.downloads.glob("*.zip")]):
        assert time.monotonic() < deadline, "no download arrived"
        time.sleep(0.1)
    time.sleep(0.3)
    with zipfile.ZipFile(zips[0]) as z:
        inst = tifffile.imread(io.BytesIO(z.read("inst.tif")))
        typ = tifffile.imread(io.BytesIO(z.read("types.tif")))
        names = set(z.namelist())
    assert names == {"image.png", "inst.tif", "types.tif", "nuclei.geojson", "info.json"}
    assert inst.shape == (256, 256) and int(inst.max()) == len(drawn)
    ids = [int(inst[y, x]) for (x, y), _ in drawn]
    assert all(ids) and len(set(ids)) == len(drawn), ids
    assert [int(typ[y, x]) for (x, y), _ in drawn] == [t for _, t in drawn]
    mask = run.mask(d.find_element(By.TAG_NAME, "body").get_attribute("data-mask"))
    assert np.array_equal(mask.inst, inst) and np.array_equal(mask.types, typ)

    # sample with a type mix: only the last type
    if run.stats is not None:
        d.find_element(By.ID, f"fix-{t2}").click()
        d.execute_script(f"const r = document.getElementById('share-{t2}'); r.value = 1; "
                         "r.dispatchEvent(new Event('input'));")
        n = painted(d)
        d.find_element(By.ID, "sample").click()
        wait_painted(d, n)
        assert not error_text(d), error_text(d)
        sampled = run.mask(d.find_element(By.TAG_NAME, "body").get_attribute("data-mask"))
        assert sampled.n_nuclei > 0 and set(np.unique(sampled.types[sampled.inst > 0]).tolist()) == {t2}
        assert "sampled (statistical" in d.find_element(By.ID, "status").text
        d.find_element(By.ID, f"fix-{t2}").click()  # back to the fitted mix for the screenshot
        n = painted(d)
        d.find_element(By.ID, "sample").click()
        wait_painted(d, n)

    # a file that is no image: the page says what the server said, and keeps painting
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    d.find_element(By.ID, "upload-file").send_keys(str(bad))
    d.find_element(By.ID, "upload").click()
    WebDriverWait(d, WAIT).until(lambda drv: error_text(drv))
    assert "notes.png: cannot read label image" in error_text(d)
    assert "Traceback" not in d.page_source
    d.find_element(By.ID, "upload-file").clear()
    n = painted(d)
    d.find_element(By.ID, "paint").click()
    wait_painted(d, n)
    assert not error_text(d)

    shot = Path(os.environ.get("HISTOSYNTH_SCREENSHOT") or tmp_path / "serve.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
