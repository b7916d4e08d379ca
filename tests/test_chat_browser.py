"""The web demo end to end in a real headless Chromium (Debian's chromium + chromium-driver, selenium).

Upload an image, drag on it to mark a region, ask with it, get a reply whose predicted boxes are drawn on
the picture, type a region, see the message for a wrong box count with the dialogue still there; the page
asks nothing of any host but the demo's. A screenshot is saved under tests/artifacts/ (git-ignored) for a
human to look at.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
from chat_support import RunningDemo, build_tiny_chat_model, sample_image

from chatterbox.config import REPO_ROOT
from chatterbox.serve.draw import PALETTE, REGION_COLOUR

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"

try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
    pytest.mark.skipif(not HAVE_SELENIUM, reason="needs the selenium package"),
    # Gradio's queue statistics use pandas options that pandas 3 deprecates.
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

# The pixel colours (RGB) at points of the picture, read from the <img> through a canvas.
READ_PIXELS_JS = """
const [img, points] = arguments;
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext("2d");
context.drawImage(img, 0, 0);
return points.map(([x, y]) => Array.from(context.getImageData(x, y, 1, 1).data.slice(0, 3)));
"""


@pytest.fixture(scope="module")
def demo(tiny_tokenizer_dir):
    from chatterbox.tokens import load_tokenizer

    running = RunningDemo(build_tiny_chat_model(load_tokenizer(str(tiny_tokenizer_dir))), max_new_tokens=8)
    yield running
    running.close()


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    # An explicit driver path: selenium never looks for (or downloads) a driver of its own.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def outlined(browser, img, box, colour) -> bool:
    """Whether the bottom edge of ``box`` (pixels of the picture) is drawn in ``colour``, give or take a pixel."""
    x, y = round((box[0] + box[2]) / 2), round(box[3])
    points = [[min(max(x + dx, 0), 319), min(max(y + dy, 0), 239)] for dx in (-1, 0, 1) for dy in (-2, -1, 0, 1)]
    return any(tuple(rgb) == tuple(colour) for rgb in browser.execute_script(READ_PIXELS_JS, img, points))


def test_upload_drag_ask_and_see_the_boxes(demo, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = tmp_path / "scene.png"
    sample_image(320, 240).save(image_path)
    wait = WebDriverWait(browser, 60)
    find = browser.find_element
    value = lambda element_id: find(By.CSS_SELECTOR, f"#{element_id} textarea").get_attribute("value")  # noqa: E731

    browser.get(demo.url + "/")
    wait.until(lambda _: browser.title == "ChatterBox" and browser.find_elements(By.CSS_SELECTOR, "#upload input"))
    find(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(image_path))
    wait.until(lambda _: value("status").startswith("Image 320×240"))
    img = wait.until(lambda _: browser.find_element(By.CSS_SELECTOR, "#picture img"))
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img) == [320, 240]

    # Drag from (20, 30) to (120, 140) of the picture, shown at its own size: offsets are from its centre.
    width, height = browser.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]",
                                           img)
    assert (width, height) == (320, 240)
    ActionChains(browser).move_to_element_with_offset(img, 20 - 160, 30 - 120).click_and_hold() \
        .move_by_offset(50, 50).move_by_offset(50, 60).release().perform()
    wait.until(lambda _: value("regions"))
    dragged = [float(v) for v in value("regions").split()]
    assert len(dragged) == 4 and all(abs(a - b) <= 2 for a, b in zip(dragged, [20, 30, 120, 140])), dragged
    # The region is drawn on the picture.
    wait.until(lambda _: outlined(browser, find(By.CSS_SELECTOR, "#picture img"), dragged, REGION_COLOUR))

    question = find(By.CSS_SELECTOR, "#question textarea")
    question.send_keys("What is ")
    find(By.ID, "insert-bbox").click()
    wait.until(lambda _: value("question").endswith("<bbox>"))
    question.send_keys("?")
    find(By.CSS_SELECTOR, "#ground input").click()
    find(By.ID, "send").click()
    wait.until(lambda _: value("status").startswith("Round 1: "))
    dialogue = find(By.ID, "dialogue").text
    assert "What is <bbox>? [VG]" in dialogue and "box 1 ([VG] in the question): " in dialogue
    # Boxes above the score threshold are drawn on the picture, outlined in the palette colour of their index.
    found = [(int(k), [float(v) for v in box.split(",")])
             for k, box in re.findall(r"box (\d+) \(\[VG\] in the (?:question|reply)\): \[([^\]]+)\] score [\d.]+$",
                                      dialogue, flags=re.MULTILINE)]
    assert found
    img = find(By.CSS_SELECTOR, "#picture img")
    assert all(outlined(browser, img, box, PALETTE[k - 1]) for k, box in found), found

    # A typed region for round 2.
    find(By.CSS_SELECTOR, "#regions textarea").send_keys("200 60 300 200")
    question.send_keys("And <bbox>?")
    find(By.ID, "send").click()
    wait.until(lambda _: value("status").startswith("Round 2: "))

    # Wrong box count: the message is shown, the dialogue stays on the page.
    question.send_keys("Compare <bbox> and <bbox>.")
    find(By.ID, "send").click()
    message = "the question has 2 <bbox> token(s) but 0 box(es) were given"
    wait.until(lambda _: message in value("status"))
    wait.until(lambda _: any(message in toast.text for toast in
                             browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")))
    dialogue = find(By.ID, "dialogue").text
    assert "What is <bbox>? [VG]" in dialogue and "And <bbox>?" in dialogue

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "chat_web.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0

    # Over the network (not the browser's own chrome:// pages, nor data: and blob: URLs) only the demo was asked.
    events = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    urls = {e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"}
    assert any(url.startswith(demo.url + "/gradio_api/") for url in urls)
    elsewhere = {url for url in urls if url.startswith(("http:", "https:", "ws:", "wss:"))
                 and not url.startswith(demo.url + "/")}
    assert not elsewhere, f"the page asked other hosts: {sorted(elsewhere)}"
