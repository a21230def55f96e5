"""`ldm serve`'s page in a real headless browser (Debian's chromium + chromium-driver, driven by
Selenium): load it, type a prompt, press Generate, see the image, its parameters and the gallery;
then img2img from an init image picked in the page.
Serves the shipped default model at its size (512², a few steps). LDM_UPDATE_SCREENSHOT=1 also
writes the screenshot to docs/server_page.png (the README's)."""
import base64
import os
import shutil
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from ldm.server.app import create_app
from test_server import running

DOCS = Path(__file__).resolve().parents[1] / "docs" / "server_page.png"


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def fill(driver, element_id: str, value) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(str(value))


def test_page_generates_an_image(tmp_path):
    with running(create_app()) as port, chromium() as driver:
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text != "…")
        assert "ldm-default.safetensors [" in driver.find_element(By.ID, "model").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#sampler option")) == 5
        fill(driver, "prompt", "a red circle to the left of a blue square")
        fill(driver, "steps", 12)
        fill(driver, "scale", 5)
        fill(driver, "seed", 3)
        Select(driver.find_element(By.ID, "sampler")).select_by_visible_text("DPM++ 2M")
        driver.find_element(By.ID, "generate").click()
        seen, deadline = [], time.time() + 120
        while not driver.find_elements(By.ID, "output") and time.time() < deadline:
            seen.append(float(driver.find_element(By.ID, "progress").get_attribute("value")))
            time.sleep(0.1)
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "const i = document.getElementById('output'); return i && i.complete && i.naturalWidth"))
        assert driver.execute_script("return document.getElementById('output').naturalWidth") == 512
        assert any(0 < v < 1 for v in seen), seen                  # the bar was fed by /progress
        info = driver.find_element(By.ID, "info").text
        assert info.startswith("a red circle to the left of a blue square\n") and "Seed: 3," in info
        assert "Sampler: dpmpp_2m_karras" in info and len(driver.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1
        assert driver.find_element(By.ID, "error").text == ""
        time.sleep(0.5)                                              # a late /progress poll leaves the bar full
        assert driver.find_element(By.ID, "progress").get_attribute("value") == "1"
        # img2img from a file picked in the page: the first image, redrawn from 30% of the steps
        init = tmp_path / "init.png"
        src = driver.execute_script("return document.getElementById('output').src")
        init.write_bytes(base64.b64decode(src.split(",", 1)[1]))
        driver.find_element(By.ID, "init").send_keys(str(init))
        fill(driver, "strength", 0.3)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 2)
        info = driver.find_element(By.ID, "info").text
        assert "Denoising strength: 0.3, Steps run: 3" in info and driver.find_element(By.ID, "error").text == ""
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("LDM_UPDATE_SCREENSHOT") == "1":
            shutil.copy(shot, DOCS)
