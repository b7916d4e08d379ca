"""The web demo end to end in a real headless Chromium (Debian's chromium + chromium-driver, selenium).

Upload an image, draw a region with the mouse, ask with it, get a reply with a predicted box drawn on
the canvas, type a region, see an error message for a wrong box count; a screenshot is saved under
tests/artifacts/ (git-ignored) for a human to look at.
"""
from __future__ import annotations

import re
import shutil

import pytest
from chat_support import RunningDemo, build_tiny_chat_model, sample_image

from chatterbox.config import REPO_ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
PALETTE_RGB = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60)]  # the page's PALETTE

try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
    pytest.mark.skipif(not HAVE_SELENIUM, reason="needs the selenium package"),
]


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
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # An explicit driver path: selenium never looks for (or downloads) a driver of its own.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_upload_region_reply_and_drawn_box(demo, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = tmp_path / "scene.png"
    sample_image(320, 240).save(image_path)
    wait = WebDriverWait(browser, 60)
    find = lambda element_id: browser.find_element(By.ID, element_id)  # noqa: E731

    browser.get(demo.url + "/")
    find("image-input").send_keys(str(image_path))
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Image 320×240"))
    canvas = find("canvas")
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("320", "240")  # scale 1

    # Draw a region from (20, 30) to (120, 140): offsets are from the canvas centre (160, 120).
    ActionChains(browser).move_to_element_with_offset(canvas, 20 - 160, 30 - 120).click_and_hold() \
        .move_by_offset(50, 50).move_by_offset(50, 60).release().perform()
    assert canvas.get_attribute("data-regions") == "1"
    drawn = [float(v) for v in find("regions").text.strip("[]").split(",")]
    assert all(abs(a - b) <= 2 for a, b in zip(drawn, [20, 30, 120, 140])), drawn

    find("question").send_keys("What is ")
    find("insert-bbox").click()
    find("question").send_keys("?")
    find("ground").click()
    find("send").click()
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#chat .reply")))
    chat_text = find("chat").text
    assert "You: What is <bbox>? [VG]" in chat_text
    assert "box 1 (question): " in chat_text
    assert find("error").text == ""
    # Boxes above the score threshold are drawn on the canvas, outlined in the palette colour of their index.
    found = re.findall(r"box (\d+) \((?:question|reply)\): \[([^\]]+)\] score", chat_text)
    assert found and int(canvas.get_attribute("data-boxes")) == len(found)
    index, numbers = int(found[0][0]), [float(v) for v in found[0][1].split(",")]
    colours = browser.execute_script(
        "const c = document.getElementById('canvas').getContext('2d');"
        "const [x1, y1, x2, y2] = arguments[0];"
        "const px = (x, y) => Array.from(c.getImageData(Math.round(x), Math.round(y), 1, 1).data.slice(0, 3));"
        "return [px((x1 + x2) / 2, y2), px(x1, (y1 + y2) / 2), px(x2, (y1 + y2) / 2)];", numbers)
    expected = PALETTE_RGB[(index - 1) % len(PALETTE_RGB)]
    assert any(sum(abs(a - b) for a, b in zip(c, expected)) < 40 for c in colours), (colours, expected)

    # A typed region for round 2.
    find("box-input").send_keys("200 60 300 200")
    find("add-box").click()
    assert "[200, 60, 300, 200]" in find("regions").text
    find("question").send_keys("And <bbox>?")
    find("send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat .reply")) == 2)
    assert find("status").text.startswith("Round 2:")

    # Wrong box count: the server's message is shown, the dialogue goes on.
    find("question").send_keys("Compare <bbox> and <bbox>.")
    find("send").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "error"), "2 <bbox> token(s) but 0 box(es)"))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "chat_web.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
