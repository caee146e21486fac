"""The page of serve.py in a real headless Chromium (Selenium): pick an image, read the top artist from the page;
add an artist to the gallery from the page and remove it."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import imagegen as gen
import pytest
from test_serve import CLASSES, get, serving, write_model_folder

from predictor import load_model_bundle
from retrieval.gallery import load_gallery
from service import Settings, Source, create_app
from tools import build_gallery

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install -r requirements-serve.txt)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="no Chromium with chromedriver installed (Debian: apt-get install chromium chromium-driver)")
WAIT_S = 60


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Iterator[tuple[str, object]]:
    """The service's URL and the loaded model behind it."""
    model = load_model_bundle(write_model_folder(tmp_path_factory.mktemp("browser") / "model", CLASSES),
                              device="cpu")
    with serving(create_app(model, Settings(max_files=4))) as url:
        yield url, model


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _card(browser, file_name: str):
    """The result card of ``file_name`` once its request has finished."""
    def finished(driver):
        for card in driver.find_elements(By.CSS_SELECTOR, f'article.card[data-file="{file_name}"]'):
            if not card.find_elements(By.CSS_SELECTOR, ".pending"):
                return card
        return False

    return WebDriverWait(browser, WAIT_S).until(finished)


def test_page_shows_the_top_artist_of_an_uploaded_image(page, browser, tmp_path):
    url, model = page
    image = gen.noise_image(tmp_path / "painting.png", (150, 110), seed=7)
    browser.get(url + "/")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: "lsnet_t_artist" in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "file-input").send_keys(str(image))
    card = _card(browser, "painting.png")
    names = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".scores .name")]
    expected = model.classify(image, top_k=5)
    assert names == [e["class_name"] for e in expected]
    assert card.find_element(By.CSS_SELECTOR, ".scores .value").text == f"{expected[0]['probability'] * 100:.1f}%"
    bar = card.find_element(By.CSS_SELECTOR, ".scores .bar span")
    assert bar.get_attribute("style").startswith("width:")


def test_page_shows_why_a_file_is_refused_and_fits_a_phone(page, browser, tmp_path):
    url, _ = page
    broken = gen.text_file(tmp_path / "scan.png")
    browser.set_window_size(390, 844)
    browser.get(url + "/")
    browser.find_element(By.ID, "file-input").send_keys(str(broken))
    error = _card(browser, "scan.png").find_element(By.CSS_SELECTOR, ".error").text
    assert error.startswith("scan.png: not an image")
    assert "could not be classified" in browser.find_element(By.ID, "status").text
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is wider than a phone: {width}"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> tuple[Path, Path]:
    """A model folder and a gallery of it: artists anna and ben, two generated works each (in refs/)."""
    root = tmp_path_factory.mktemp("browser_gallery")
    model_dir = write_model_folder(root / "model", CLASSES)
    for artist in ("anna", "ben"):
        for i in range(2):
            gen.noise_image(root / "refs" / artist / f"{i}.png", (80, 64), seed=len(artist) * 10 + i)
    build_gallery.main(build_gallery.get_args_parser().parse_args(
        ["--checkpoint", str(model_dir), "--images", str(root / "refs"), "--output-dir", str(root / "g"),
         "--device", "cpu", "--num-workers", "0"]))
    return model_dir, root / "g"


def _loaded_works(browser, card) -> list:
    """The similar works' thumbnails of a card, once they are all shown."""
    def shown(driver):
        images = card.find_elements(By.CSS_SELECTOR, ".similar .works img")
        done = [img for img in images if driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", img)]
        return done if images and len(done) == len(images) else False

    return WebDriverWait(browser, WAIT_S).until(shown)


def test_page_shows_similar_gallery_works_with_thumbnails(browser, gallery):
    model_dir, gallery_dir = gallery
    model = load_model_bundle(model_dir, device="cpu")
    with serving(create_app(model, Settings(max_files=4), load_gallery(gallery_dir))) as url:
        browser.set_window_size(1200, 900)
        browser.get(url + "/")
        WebDriverWait(browser, WAIT_S).until(
            lambda d: "gallery of 2 artists" in d.find_element(By.ID, "model-info").text)
        browser.find_element(By.ID, "file-input").send_keys(str(gallery_dir.parent / "refs" / "ben" / "1.png"))
        card = _card(browser, "1.png")
        loaded = _loaded_works(browser, card)
        assert len(loaded) == 4 and all(img.get_attribute("src").startswith("blob:") for img in loaded)
        artists = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".similar .work-artist")]
        assert sorted(artists) == ["anna", "anna", "ben", "ben"]
        assert card.find_element(By.CSS_SELECTOR, ".similar .gallery-artist").text.startswith("Closest gallery artist")


def test_page_adds_an_artist_shows_it_in_similar_works_and_removes_it(browser, gallery, tmp_path):
    model_dir, gallery_dir = gallery
    source = Source(str(model_dir), str(shutil.copytree(gallery_dir, tmp_path / "g")), device="cpu")
    works = [gen.noise_image(tmp_path / "new" / f"cara {i}.png", (64, 80), seed=900 + i) for i in range(2)]
    model, loaded, _ = source.load()
    with serving(create_app(model, Settings(max_files=4), loaded, source)) as url:
        browser.set_window_size(1200, 900)
        browser.get(url + "/")
        WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "gallery-panel").is_displayed())
        browser.find_element(By.ID, "enroll-name").send_keys("Cara")
        browser.find_element(By.ID, "enroll-files").send_keys("\n".join(str(p) for p in works))
        browser.find_element(By.ID, "enroll-button").click()
        card = _card(browser, "cara 0.png")
        assert card.find_element(By.CSS_SELECTOR, ".enrolled").text == "Enrolled as Cara"
        _loaded_works(browser, card)
        # Its own work is the nearest, and the new artist is the closest: the next request used the new gallery.
        assert card.find_elements(By.CSS_SELECTOR, ".similar .work-artist")[0].text == "Cara"
        assert card.find_element(By.CSS_SELECTOR, ".similar .gallery-artist").text.startswith(
            "Closest gallery artist: Cara")
        assert "Added Cara: 2 references" in browser.find_element(By.ID, "status").text
        assert "gallery of 3 artists, 6 works" in browser.find_element(By.ID, "model-info").text
        assert get(f"{url}/v1/gallery/artists").json()["total"] == 3

        browser.find_element(By.ID, "artists-summary").click()
        browser.set_window_size(390, 844)
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the gallery panel is wider than a phone: {width}"
        row = WebDriverWait(browser, WAIT_S).until(
            lambda d: d.find_element(By.CSS_SELECTOR, '#artist-list li[data-artist="Cara"]'))
        assert "2 references" in row.text
        row.find_element(By.CSS_SELECTOR, "button.remove").click()
        browser.switch_to.alert.accept()
        WebDriverWait(browser, WAIT_S).until(
            lambda d: "Removed Cara (2 references)" in d.find_element(By.ID, "status").text)
        assert not browser.find_elements(By.CSS_SELECTOR, '#artist-list li[data-artist="Cara"]')
        assert "gallery of 2 artists" in browser.find_element(By.ID, "model-info").text
    assert load_gallery(source.gallery).artist_names == ["anna", "ben"]
