"""The served chat page in headless Chromium, driven by Selenium: send, regenerate, stop, reset and the
temperature setting, with the replies checked against the chat engine.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skips, saying so, without them."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from chatkit.chat import ChatEngine, GenerationParams
from chatkit.conversation import Message

CHROMIUM = "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not Path(CHROMIUM).is_file() or not Path(DRIVER).is_file():
    pytest.skip(
        f"the browser test needs {CHROMIUM} and chromedriver (apt-get install chromium chromium-driver; "
        ".ci/run installs them)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is a dev extra: pip install -e '.[dev]'"
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

N = 8  # the served test model's default max tokens


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chatkit-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def bubbles(driver) -> list[tuple[str, str]]:
    # textContent, not .text: a random model's reply holds characters Selenium's .text would normalize.
    return driver.execute_script(
        "return [...document.querySelectorAll('#log .msg')].map(e => [e.className.split(' ')[1], e.textContent]);"
    )


def wait_ready(driver, n_bubbles: int, timeout: float = 60) -> None:
    def ready(d):
        return d.find_element(By.ID, "status").text == "ready" and len(bubbles(d)) == n_bubbles

    WebDriverWait(driver, timeout).until(ready)


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def set_field(driver, field: str, value: str) -> None:
    el = driver.find_element(By.ID, field)
    el.clear()
    el.send_keys(value)


def test_page_chats_regenerates_stops_and_resets(served, browser, tiny_engine: ChatEngine):
    greedy = GenerationParams(max_new_tokens=N, sample=False)
    browser.get(served.url + "/")
    assert browser.title == "chatkit"
    set_field(browser, "apikey", served.key)
    set_field(browser, "temperature", "0")

    send(browser, "hello")
    wait_ready(browser, 2)
    r1 = tiny_engine.reply([Message("user", "hello")], greedy)
    assert bubbles(browser) == [["user", "hello"], ["assistant", r1]]

    browser.find_element(By.ID, "regen").click()  # greedy: the same reply again, not a second one
    wait_ready(browser, 2)
    assert bubbles(browser)[-1] == ["assistant", r1]

    send(browser, "What is 2 + 3?")
    wait_ready(browser, 4)
    r2 = tiny_engine.reply(
        [Message("user", "hello"), Message("assistant", r1), Message("user", "What is 2 + 3?")], greedy
    )
    assert bubbles(browser)[2:] == [["user", "What is 2 + 3?"], ["assistant", r2]]

    browser.find_element(By.ID, "reset").click()
    wait_ready(browser, 0)

    # Stop: a long reply is cut where it was, and what was said is kept.
    set_field(browser, "maxtokens", "480")
    send(browser, "count")
    WebDriverWait(browser, 60).until(lambda d: len(bubbles(d)) == 2 and bubbles(d)[1][1])
    stop = browser.find_element(By.ID, "stop")
    was_generating = stop.is_enabled()
    stop.click()
    wait_ready(browser, 2)
    full = tiny_engine.reply([Message("user", "count")], GenerationParams(max_new_tokens=480, sample=False))
    partial = bubbles(browser)[1][1]
    assert full.startswith(partial) and partial
    if was_generating:
        assert len(partial) < len(full)
    assert not browser.find_element(By.ID, "stop").is_enabled()
    assert browser.find_element(By.ID, "send").is_enabled()

    # Empty input does nothing.
    browser.find_element(By.ID, "send").click()
    assert len(bubbles(browser)) == 2
