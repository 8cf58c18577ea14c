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
from chatkit.tokenization import encode_prompt

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


def test_page_shows_the_model_and_the_server_defaults_before_any_key(served, browser):
    """The served fixture requires an API key: the name and the defaults come from the open /health.
    Its defaults are greedy (--no-sample: temperature 0) and 8 tokens; empty fields send nothing."""
    browser.get(served.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    temperature, max_tokens = (browser.find_element(By.ID, f) for f in ("temperature", "maxtokens"))
    assert temperature.get_attribute("value") == "" and temperature.get_attribute("placeholder") == "0"
    assert max_tokens.get_attribute("value") == "" and max_tokens.get_attribute("placeholder") == str(N)


def test_page_leaves_out_the_oldest_turns_when_the_chat_outgrows_the_context(
    served, browser, tiny_engine: ChatEngine
):
    params = GenerationParams(max_new_tokens=100, sample=False)
    words = "the cat sat on the mat and looked at the dog "

    def long_text(tag: str) -> str:  # a turn of about 200 tokens: two no longer fit 512 with replies
        text = tag
        while len(tiny_engine.tokenizer.encode(text, add_special_tokens=False)) < 200:
            text += " " + words.strip()
        return text

    first, second = long_text("first"), long_text("second")
    browser.get(served.url + "/")
    set_field(browser, "apikey", served.key)
    set_field(browser, "temperature", "0")
    set_field(browser, "maxtokens", "100")
    send(browser, first)
    wait_ready(browser, 2)
    r1 = tiny_engine.reply([Message("user", first)], params)
    assert bubbles(browser)[1] == ["assistant", r1]

    send(browser, second)
    history = [Message("user", first), Message("assistant", r1), Message("user", second)]

    def prompt_len(msgs: list[Message]) -> int:
        return len(encode_prompt(tiny_engine.tokenizer, tiny_engine.template, msgs))

    ctx = tiny_engine.context_length
    assert prompt_len(history) + 100 > ctx >= prompt_len(history[2:]) + 100  # only the last turn fits
    status = "ready (2 oldest messages left out to fit the context)"
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text == status)
    # The page still shows the whole chat; the reply is the engine's on the trimmed history (as the bot).
    assert bubbles(browser) == [
        ["user", first],
        ["assistant", r1],
        ["user", second],
        ["assistant", tiny_engine.reply(history, params)],
    ]
    assert tiny_engine.reply(history, params) == tiny_engine.reply(history[2:], params)


class CountingEngine:
    """The tiny engine, counting the generations it starts."""

    def __init__(self, engine: ChatEngine):
        self.engine, self.generations = engine, 0

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def stream(self, *args, **kwargs):
        self.generations += 1
        return self.engine.stream(*args, **kwargs)

    def complete(self, *args, **kwargs):
        self.generations += 1
        return self.engine.complete(*args, **kwargs)


ATTACK = """<!doctype html><title>elsewhere</title>
<form id="f" method="POST" enctype="text/plain" action="{api}">
<input name='{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 2, "x": "' value='"}}'>
</form>
<script>
fetch("{api}", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
  body: JSON.stringify({{messages: [{{role: "user", content: "hi"}}], max_tokens: 2}})}})
  .finally(() => {{ document.title = "sent"; setTimeout(() => document.getElementById("f").submit(), 0); }});
</script>"""


def test_a_page_on_another_site_cannot_run_a_generation(browser, tiny_engine: ChatEngine, tmp_path: Path):
    """The attack on the keyless default: a page elsewhere makes the browser POST to the API, by
    fetch (no-cors, text/plain) and by a text/plain form whose body is JSON. Both are refused (the
    browser says where the page comes from) and no generation runs; the API itself still works."""
    import functools
    import http.server
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from chatkit.serve import ServerConfig, create_app

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    engine = CountingEngine(tiny_engine)
    port = free_port()
    config = ServerConfig("tiny", GenerationParams(max_new_tokens=2, sample=False))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    threading.Thread(target=server.run, daemon=True).start()
    api = f"http://127.0.0.1:{port}/v1/chat/completions"
    (tmp_path / "index.html").write_text(ATTACK.format(api=api))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    elsewhere = http.server.ThreadingHTTPServer(("127.0.0.2", 0), handler)  # another host, on loopback
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        browser.get(f"http://127.0.0.2:{elsewhere.server_address[1]}/index.html")
        # The form's answer, shown as the browser navigates to it: a refusal, or (unguarded) a reply.
        WebDriverWait(browser, 60).until(lambda d: '"error"' in d.page_source or '"choices"' in d.page_source)
        assert "cross_site_request" in browser.page_source
        assert engine.generations == 0
        r = httpx.post(api, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 200 and engine.generations == 1  # the counter counts
    finally:
        elsewhere.shutdown()
        server.should_exit = True
