"""The search page (`clipalign-search --serve`) in a real headless Chromium: Debian's `chromium` driven by Selenium
through Debian's `chromedriver`. A query typed, the grid of images shown (from files and out of a tar shard), an image
clicked and the results following it, the back button; empty, huge and unknown input shown as messages while the
server keeps answering; requests for files outside the API refused. A screenshot of the grid is kept as an artifact
($CLIPALIGN_TEST_ARTIFACTS, else the pytest temporary directory) and its path printed. About 25 s on 2 busy cores."""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from embedding_fixture import make_embedding_dir, model_for_tests

from clipalign.index import index_embeddings

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# no first-run dialogs, no calls to Google's hosts (updates, sync, QUIC probes), no GPU on a headless machine
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,860")
WAIT = 60  # seconds for the page to answer: the first query runs the model for the first time

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no {CHROMIUM}: the page is tested in Debian's "
                                                               f"chromium (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(URL, server process, index directory) of `clipalign-search INDEX --serve --port 0` over 40 drawn images."""
    root = tmp_path_factory.mktemp("served")
    embed_dir = make_embedding_dir(root, model_for_tests(root))
    index_embeddings(embed_dir, root / "index", log=lambda line: None)
    proc = subprocess.Popen([sys.executable, "-m", "clipalign.search", str(root / "index"), "--serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        ready = selectors.DefaultSelector()
        ready.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline() if ready.select(timeout=180) else ""
        match = re.search(r"^serving (http://127\.0\.0\.1:\d+/) ", line)
        assert match, f"the server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(1), proc, root / "index"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMEDRIVER.is_file(), f"{CHROMIUM} is here but not {CHROMEDRIVER}: apt-get install chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(lambda d: condition(d), message=message)


def _cards(driver) -> list[dict]:
    """The grid as the page shows it: key, caption, score line, and whether the image has loaded."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#grid .card')].map(card => {
            const img = card.querySelector('img');
            return {key: card.dataset.key, caption: card.querySelector('.caption').textContent,
                    meta: card.querySelector('.meta').textContent,
                    loaded: !!img && img.complete && img.naturalWidth > 0};
        });""")


def _message(driver) -> str:
    return driver.execute_script("const m = document.getElementById('message'); return m.hidden ? '' : m.textContent;")


def _submit(driver, text: str) -> None:
    """Type a query (a huge one set directly: typing 10,000 keys one by one takes a while) and press Enter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "query")
    box.clear()
    if len(text) > 200:
        driver.execute_script("arguments[0].value = arguments[1];", box, text)
        text = ""
    box.send_keys(text + Keys.ENTER)


def _keep_screenshot(driver, tmp_path: Path, tmp_path_factory, capsys) -> Path:
    shot = tmp_path / "search_page.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    artifacts = Path(os.environ.get("CLIPALIGN_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    kept = shutil.copy(shot, artifacts / shot.name)
    with capsys.disabled():
        print(f"\nsearch page screenshot: {kept}")
    return Path(kept)


def test_a_typed_query_shows_the_grid_and_a_click_searches_by_that_image(served, browser, tmp_path,
                                                                          tmp_path_factory, capsys):
    url, proc, index_dir = served
    browser.get(url)
    _wait(browser, lambda d: d.find_element("id", "model-name").text == "tiny-vit-64", "the header names the model")
    assert browser.find_element("id", "index-name").text == str(index_dir)
    assert "Flat, 40 vectors, recall@10 1.000" in browser.find_element("id", "index-detail").text

    _submit(browser, "a red circle above a blue square")
    _wait(browser, lambda d: len(_cards(d)) == 20 and all(c["loaded"] for c in _cards(d)), "20 images shown")
    cards = _cards(browser)
    assert "20 images for" in browser.find_element("id", "status").text and _message(browser) == ""
    assert {c["key"] for c in cards} <= {f"{i:06d}" for i in range(40)} and all(c["caption"] for c in cards)
    assert [c["meta"].split(" · ")[0] for c in cards] == [f"#{i}" for i in range(1, 21)]
    assert any(int(c["key"]) < 20 for c in cards) and any(int(c["key"]) >= 20 for c in cards)  # files and a shard
    assert "#q=a+red+circle" in browser.current_url
    _keep_screenshot(browser, tmp_path, tmp_path_factory, capsys)

    clicked = cards[2]["key"]
    browser.find_elements("css selector", "#grid .card .thumb")[2].click()
    _wait(browser, lambda d: _cards(d) and _cards(d)[0]["key"] == clicked, "results like the clicked image")
    assert f"20 images like {clicked} in" in " ".join(browser.find_element("id", "status").text.split())
    first = _cards(browser)[0]
    assert first["meta"].startswith("#1 · 1.000 · ")  # the clicked image is nearest itself
    assert [c["key"] for c in _cards(browser)] != [c["key"] for c in cards]

    browser.back()
    _wait(browser, lambda d: [c["key"] for c in _cards(d)] == [c["key"] for c in cards], "back to the text query")
    assert browser.find_element("id", "query").get_attribute("value") == "a red circle above a blue square"
    assert proc.poll() is None


def test_bad_input_shows_a_message_and_the_server_keeps_answering(served, browser):
    url, proc, _ = served
    browser.get(url)
    _wait(browser, lambda d: d.find_element("id", "model-name").text == "tiny-vit-64", "the page is up")

    _submit(browser, "   ")
    _wait(browser, lambda d: "empty query" in _message(d), "a message for an empty query")
    _submit(browser, "a" * 10_000)
    _wait(browser, lambda d: "query too long: 10000 characters, at most 1000" in _message(d),
          "a message for a huge query")
    browser.get(url + "#key=no-such-key")
    _wait(browser, lambda d: "no sample with key 'no-such-key'" in _message(d), "a message for an unknown key")
    browser.get(url + "#q=a+circle&k=1000000")
    _wait(browser, lambda d: "expected a whole number from 1 to 100" in _message(d), "a message for a bad k")
    assert "Traceback" not in browser.page_source

    # nothing outside the API is served: paths and keys never reach the file system
    host, port = url[len("http://"):-1].split(":")
    for path, status in (("/../../etc/passwd", 404), ("/api/image?key=" + quote("../../../etc/passwd"), 404),
                         ("/api/image?key=" + quote("/etc/passwd"), 404), ("/page.html", 404)):
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", path)
        response = connection.getresponse()
        body = json.loads(response.read())
        assert response.status == status and "error" in body and "root:" not in json.dumps(body), (path, body)
        connection.close()
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/api/info", headers={"Host": f"attacker.example:{port}"})  # DNS rebinding
    assert connection.getresponse().status == 403
    connection.close()

    _submit(browser, "a green triangle")
    _wait(browser, lambda d: len(_cards(d)) == 20 and _message(d) == "", "a good query works again")
    assert proc.poll() is None
