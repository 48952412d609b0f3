"""The page at ``GET /`` in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium): pick three photos, see three thumbnails ranked by ``Predictor``'s scores."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi", reason="memexport[serve] is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extra)")

from memexport.runtime.predictor import Predictor  # noqa: E402
from tests.serve.server import running  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; .ci/run installs them)")


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_pick_three_photos_see_them_ranked(tiny, sample_images, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photos = [p for p in sample_images if p.suffix == ".jpg"][:3]
    with Predictor(tiny) as predictor:
        scores = dict(zip((p.name for p in photos), predictor.score(photos).tolist()))
    expected = sorted(scores, key=scores.get, reverse=True)
    assert len(set(scores.values())) == 3  # a ranking to check
    for server in running(tiny):
        browser.get(server.base + "/")
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p.resolve()) for p in photos))
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result[data-score]")) == 3)
        results = browser.find_elements(By.CSS_SELECTOR, ".result")
        assert [r.get_attribute("data-file") for r in results] == expected
        for result in results:
            assert abs(float(result.get_attribute("data-score")) - scores[result.get_attribute("data-file")]) <= 1e-6
            assert result.find_element(By.CSS_SELECTOR, ".score").text == f"{scores[result.get_attribute('data-file')]:.3f}"
            assert result.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") != "0"  # the thumbnail shows
        assert "3 of 3 photo(s) scored" in browser.find_element(By.ID, "status").text
