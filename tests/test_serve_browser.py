"""The page at `/` in a real headless Chromium (selenium): upload a demo image, see the grid with the
right top-1, click a result and see a new grid; paths and domains that are HTML show as text; a file
that is not an image gets a message in words; /docs (Swagger UI) renders from local files only."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from servers import LiveServer
from test_search_api import unit

import uniret
from uniret.data.collection import Item
from uniret.embed.store import EmbeddingStore, write_store
from uniret.index.build import build_index
from uniret.serve import create_app

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="no headless Chromium + chromedriver (apt-get install chromium chromium-driver)"),
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def grid(driver) -> tuple[str | None, list[int]]:
    """(the query the grid shows, the ids of its cards in order)."""
    return driver.execute_script(
        "const g = document.getElementById('results');"
        "return [g.dataset.query || null, Array.from(g.querySelectorAll('.card')).map(c => Number(c.dataset.id))];")


def test_upload_see_grid_click_result(browser, image_index, demo_root):
    from selenium.webdriver.common.by import By

    store = EmbeddingStore(image_index / "store")
    target = 11
    image = demo_root / "images" / store.items[target].path
    with LiveServer(create_app(uniret.open_index(image_index / "index", images=demo_root))) as url:
        browser.get(url + "/")
        wait_for(browser, lambda d: "74 pictures" in d.find_element(By.ID, "info").text)
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("5")
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait_for(browser, lambda d: grid(d)[0] == image.name and len(grid(d)[1]) == 5)
        ids = grid(browser)[1]
        assert ids[0] == target  # the uploaded image finds itself first
        first = browser.find_element(By.CSS_SELECTOR, "#results .card")
        assert store.items[target].path in first.text and store.items[target].domain in first.text
        wait_for(browser, lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('#results img')).every(i => i.complete && i.naturalWidth > 0)"))
        # click the second result: a new search by its id, whose top-1 is that item
        browser.find_elements(By.CSS_SELECTOR, "#results .card")[1].click()
        wait_for(browser, lambda d: grid(d)[0] == f"id:{ids[1]}")
        assert grid(browser)[1][0] == ids[1] and len(grid(browser)[1]) == 5
        assert browser.find_element(By.ID, "id").get_attribute("value") == str(ids[1])


def test_html_in_metadata_renders_as_text(browser, tmp_path):
    from selenium.webdriver.common.by import By

    evil_path, evil_domain = "<script>window.pwned=1</script>.png", "<img src=x onerror=window.pwned=2>"
    items = [Item(path=evil_path if i == 0 else f"{i}.png", domain=evil_domain, split="test", position=i)
             for i in range(6)]
    write_store(tmp_path / "store", unit(np.random.default_rng(0).normal(size=(6, 8))), items,
                model={"config_hash": "h"})
    build_index(tmp_path / "store", tmp_path / "index")
    with LiveServer(create_app(uniret.open_index(tmp_path / "index"))) as url:
        browser.get(url + "/")
        wait_for(browser, lambda d: "6 pictures" in d.find_element(By.ID, "info").text)
        browser.find_element(By.ID, "id").send_keys("0")
        browser.find_element(By.ID, "go").click()
        wait_for(browser, lambda d: grid(d)[0] == "id:0")
        card = browser.find_element(By.CSS_SELECTOR, "#results .card")
        assert evil_path in card.text and evil_domain in card.text  # shown as text
        assert browser.execute_script("return window.pwned === undefined")
        assert not browser.find_elements(By.CSS_SELECTOR, "#results script, #results img[src='x']")
        options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#domain option")]
        assert evil_domain in options


def test_non_image_upload_and_offline_docs(browser, image_index, demo_root, tmp_path):
    from selenium.webdriver.common.by import By

    (tmp_path / "notes.txt").write_text("shopping list: milk, eggs")
    with LiveServer(create_app(uniret.open_index(image_index / "index", images=demo_root))) as url:
        browser.get(url + "/")
        wait_for(browser, lambda d: "74 pictures" in d.find_element(By.ID, "info").text)
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
        wait_for(browser, lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
        message = browser.find_element(By.ID, "status").text
        assert "not an image uniret can read" in message and "JPEG, PNG" in message
        assert "BytesIO" not in message and "0x" not in message
        # Swagger UI from the installed package: the operations render, and every script and style
        # sheet comes from this server (nothing from a CDN)
        browser.get(url + "/docs")
        wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/search", "/info", "/items/{item_id}"} <= {p.replace("\u200b", "") for p in paths}
        sources = browser.execute_script(
            "return Array.from(document.querySelectorAll('script[src], link[href]')).map(e => e.src || e.href)")
        assert sources and all(s.startswith(url) for s in sources), sources
