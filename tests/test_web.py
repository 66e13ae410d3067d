"""The service's web page and HTML pages in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium): a person submits a product, follows the job, sees
the mask drawn on the map, and follows the links; no page loads anything from elsewhere.

``KAPPAMASK_SCREENSHOT=PATH`` keeps the map page's screenshot there (the README's
docs/map-page.png is one)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import requests

from kappamask.inference.server import LocalTriton

from .conftest import DATA, T29UNU
from .processes import debian_binary, served

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served(triton.http_url, tmp_path_factory.mktemp("web"), DATA) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium; WebGL (OpenLayers draws COGs with it) runs on SwiftShader."""
    chromium = debian_binary("chromium", ["chromium", "chromium-driver"])
    chromedriver = debian_binary("chromedriver", ["chromium", "chromium-driver"])
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        "--enable-unsafe-swiftshader",
        "--use-angle=swiftshader",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(browser: Any, condition: Any, timeout: float = 120) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(condition)


def _foreign_resources(browser: Any, site: str) -> list[str]:
    """What the page in ``browser`` loaded from anywhere but the service (at ``site`` or
    at its public URL, http://localhost:PORT, the name pygeoapi's pages use)."""
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    own = ("data:", site, site.replace("127.0.0.1", "localhost"))
    return [u for u in loaded if not u.startswith(own)]


def test_a_person_submits_a_product_and_sees_its_mask_on_the_map(
    site: str, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{site}/map")
    _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#legend span"), 30)
    legend = browser.find_element(By.ID, "legend").text
    for name in ("clear", "cloud_shadow", "semi_transparent_cloud", "cloud"):
        assert name in legend
    browser.find_element(By.ID, "product").send_keys(str(T29UNU))
    Select(browser.find_element(By.ID, "resolution")).select_by_value("60")
    browser.find_element(By.ID, "go").click()
    finished = (
        "const s = document.body.dataset.job; return ['successful', 'failed'].includes(s) && s"
    )
    status = _wait(browser, lambda b: b.execute_script(finished))
    assert status == "successful", browser.find_element(By.ID, "job-status").text
    assert "S2A_MSIL2A_20221005T115411" in browser.find_element(By.ID, "job-product").text
    _wait(browser, lambda b: b.execute_script("return document.body.dataset.map") == "drawn", 60)
    # the mask's pixels are on the canvas: the map differs where the mask layer is drawn
    share = browser.execute_async_script("window.kappamask.maskShare().then(arguments[0])")
    assert share > 0.05, share
    screenshot = tmp_path / "map-page.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 20_000
    if os.environ.get("KAPPAMASK_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["KAPPAMASK_SCREENSHOT"])
    assert _foreign_resources(browser, site) == []
    # every link of the result opens: the COGs, the preview, the STAC item
    links = {
        a.get_attribute("data-asset"): a.get_attribute("href")
        for a in browser.find_elements(By.CSS_SELECTOR, "#links a")
    }
    assert set(links) == {"mask", "confidence", "probability", "valid", "preview", "item"}
    for href in links.values():
        assert requests.get(href, timeout=30).status_code == 200, href
    item = requests.get(links["item"], timeout=30).json()
    assert item["id"].startswith("S2A_MSIL2A_20221005T115411")
    # the job's own page names the product; its results page links the files and the map
    browser.find_element(By.ID, "job-link").click()
    _wait(browser, lambda b: "S2A_MSIL2A_20221005T115411" in b.page_source, 30)
    job_url = urlparse(browser.current_url)
    browser.get(f"{site}{job_url.path}/results?f=html")
    hrefs = [a.get_attribute("href") for a in browser.find_elements(By.TAG_NAME, "a")]
    assert any(h and h.endswith("_KAPPAMASK.tif") for h in hrefs), hrefs
    assert any(h and "/map?job=" in h for h in hrefs), hrefs
    preview = browser.find_element(By.TAG_NAME, "img")  # the picture, loaded
    assert browser.execute_script("return arguments[0].naturalWidth", preview) > 100


def test_every_html_page_works_offline(site: str, browser: Any) -> None:
    """The pages pygeoapi renders, Swagger UI included, load nothing from a CDN."""
    from selenium.webdriver.common.by import By

    for path in (
        "/?f=html",
        "/processes?f=html",
        "/processes/kappamask?f=html",
        "/jobs?f=html",
        "/conformance?f=html",
        "/map",
    ):
        browser.get(f"{site}{path}")
        assert _foreign_resources(browser, site) == [], path
        sheets = browser.execute_script("return document.styleSheets.length")
        assert sheets >= 1, path  # styled
    browser.get(f"{site}/openapi?f=html")
    title = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
    assert "KappaMask" in title[0].text
    assert _foreign_resources(browser, site) == []
    # the process page shows how to execute it (POST), and no link that answers 405
    browser.get(f"{site}/processes/kappamask?f=html")
    assert "POST" in browser.page_source
    for anchor in browser.find_elements(By.TAG_NAME, "a"):
        href = anchor.get_attribute("href") or ""
        assert not urlparse(href).path.endswith("/execution"), href
