"""The web playground in a real browser: Debian's headless Chromium, driven by Selenium.

It uploads a photo into the prompt's image slot, generates (the page streams progress),
and checks the image and the timings appear; then a bad input, whose message must show.
The screenshot is kept under test-artifacts/ (KOSMOS_G_TEST_ARTIFACTS to change it);
docs/playground.png in the README is a copy of it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.serve.conftest import API_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("KOSMOS_G_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (infra/local/setup.sh installs them as root)")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,860"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_generates_from_an_uploaded_image_and_shows_errors(browser, service, photos_png, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    photo = tmp_path / "cat.png"
    photo.write_bytes(photos_png[1])

    browser.get(service + "/")
    assert browser.title == "Kosmos-G playground"
    # The page asks for the key (401 from /v1/models) until it is given.
    wait.until(ready.visibility_of_element_located((By.ID, "error")))
    assert "API key" in browser.find_element(By.ID, "error").text
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda b: b.find_element(By.ID, "scheduler").find_elements(By.TAG_NAME, "option"))
    assert "native 32px" in browser.find_element(By.ID, "model").text
    assert not browser.find_element(By.ID, "error").is_displayed()

    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a photo of <image> sitting on the grass")
    slots = browser.find_elements(By.CSS_SELECTOR, "#slots .slot")
    assert len(slots) == 1
    # Generating with an empty slot is caught in the page, before any request.
    browser.find_element(By.ID, "generate").click()
    assert "Attach an image to slot 1" in browser.find_element(By.ID, "error").text

    browser.find_element(By.CSS_SELECTOR, "#slots .slot-file").send_keys(str(photo))
    wait.until(lambda b: "cat.png" in b.find_element(By.CSS_SELECTOR, "#slots .slot").text)
    for field, value in (("steps", "4"), ("seed", "3"), ("num-images", "2")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    # The model info loaded again (as leaving the key's field does, answered late on a busy machine)
    # keeps what was typed: the server's defaults fill only empty fields.
    browser.execute_async_script("loadModel().then(arguments[arguments.length - 1])")
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "4"
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results img.generated")) == 2)
    images = browser.find_elements(By.CSS_SELECTOR, "#results img.generated")
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) == 32 for img in images)
    assert browser.find_element(By.ID, "progress").get_attribute("value") == "4"  # every step was streamed
    timings = browser.find_element(By.ID, "timings").text
    assert "denoise" in timings and "seed 3" in timings
    assert not browser.find_element(By.ID, "error").is_displayed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "playground.png"))

    # A bad value the server refuses: its message is shown, the results stay.
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("100000")
    browser.find_element(By.ID, "generate").click()
    wait.until(ready.visibility_of_element_located((By.ID, "error")))
    message = browser.find_element(By.ID, "error").text
    assert message.startswith("Error 400") and "steps must be between" in message
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results img.generated")) == 2
    assert browser.save_screenshot(str(ARTIFACTS / "playground-error.png"))
