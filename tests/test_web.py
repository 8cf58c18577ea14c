"""The served chat page in headless Chromium, driven by Selenium: send, regenerate, stop, reset and the
sampling settings, with the replies checked against the chat engine; Markdown, code blocks, copying,
the system prompt, reasoning and tool calls on a served engine whose reply a test sets, and model text
that tries to run script shown as text.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skips, saying so, without them.
Screenshots of the page go to each test's tmp_path (printed; `pytest -s` shows the paths) and, when it
can be written, outputs/web-screenshots/."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatkit.chat import ChatEngine, GenerationParams
from chatkit.conversation import Message, ToolCall
from chatkit.templates import get_template
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

REPO = Path(__file__).resolve().parents[1]
N = 8  # the served test model's default max tokens


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chatkit-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def bubbles(driver) -> list[tuple[str, str]]:
    """Each message's role and its text as written (what its Copy button copies; a reply is shown as
    Markdown, and a random model's reply holds characters Markdown would take as markup)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#log .msg')].map(e => [e.className.split(' ')[1], e.dataset.raw]);"
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
    Its defaults are greedy (--no-sample: temperature 0), 8 tokens, and the bot's top-p and top-k;
    empty fields send nothing."""
    browser.get(served.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    d = GenerationParams()  # the served fixture sets only --max-tokens and --no-sample
    shown = {"temperature": "0", "topp": f"{d.top_p:g}", "topk": str(d.top_k), "maxtokens": str(N)}
    for field, default in shown.items():
        el = browser.find_element(By.ID, field)
        assert (el.get_attribute("value"), el.get_attribute("placeholder")) == ("", default), field


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


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1") -> Iterator[str]:
    """`app` under uvicorn on a free port, in a thread of this process (so a test can see what its
    engine was asked); yields the server's URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.05)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True


# --- a served engine whose reply the test sets: the page's rendering of known text ----------------


class ScriptedEngine:
    """The tiny engine's tokenizer and context with a reply the test sets, written as a Qwen3 model
    writes it (so reasoning and tool calls can be read out of it); keeps what each generation was
    asked: messages, parameters, tools. Only for what the page does with a reply: the server and the
    page are the real ones."""

    def __init__(self, engine: ChatEngine):
        self.engine, self.template = engine, get_template("qwen3")
        self.context_length = 1 << 15  # Qwen3's tool prompt in the tiny tokenizer's pieces outgrows 512
        self.reply = ""
        self.asked: list[tuple[list[Message], GenerationParams, object]] = []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def prompt_length(self, messages, *, tools=None, thinking=None) -> int:
        return len(encode_prompt(self.engine.tokenizer, self.template, messages, tools, thinking))

    def stream(
        self, messages, params, seed=None, *, stop=(), info=None, cancel=None, tools=None, thinking=None
    ):
        self.asked.append((list(messages), params, tools))
        for i in range(0, len(self.reply), 16):  # in pieces, so the page renders a reply as it grows
            yield self.reply[i : i + 16]
        if info is not None:
            info.finish_reason = "stop"


@pytest.fixture(scope="module")
def scripted(tiny_engine: ChatEngine):
    """The app on a `ScriptedEngine` (no API key; greedy, 8 tokens by default) served in this
    process; .url, .engine."""
    from chatkit.serve import ServerConfig, create_app

    engine = ScriptedEngine(tiny_engine)
    with serving(create_app(engine, ServerConfig("scripted", GenerationParams(max_new_tokens=8)))) as url:
        yield types.SimpleNamespace(url=url, engine=engine)


def open_page(driver, url: str) -> None:
    """Load the page with the clipboard recorded in window.__copied (a headless browser's own
    clipboard is not readable), once /health has named the model."""
    driver.get(url + "/")
    driver.execute_script(
        "window.__copied = [];"
        "navigator.clipboard.writeText = (t) => { window.__copied.push(t); return Promise.resolve(); };"
    )
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text)


def ask(driver, scripted, reply: str, text: str = "hi", n_bubbles: int = 2) -> None:
    """Send `text`; the engine answers `reply`; wait until the page is ready again."""
    scripted.engine.reply = reply
    send(driver, text)
    wait_ready(driver, n_bubbles)


def last_reply(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")[-1]


def screenshot(driver, tmp_path: Path, name: str) -> list[Path]:
    """The page as a PNG in tmp_path, and in outputs/web-screenshots/ when that can be written."""
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path))
    saved = [path]
    kept = REPO / "outputs" / "web-screenshots"
    with contextlib.suppress(OSError):
        kept.mkdir(parents=True, exist_ok=True)
        saved.append(Path(shutil.copy(path, kept / path.name)))
    print("screenshot:", *saved)
    return saved


MARKDOWN = """# Plan

Some **bold**, *italic*, ***both*** and `<b>inline</b>` code, with a [link](https://example.com/a?b=1).
A second line of the same paragraph: 2 * 3 * 4, snake_case_name.

- one
- two, with **bold**
  - nested

3. third
4. fourth

```python
print("<hello>")  # *not* Markdown
```

> quoted"""


def test_page_renders_a_reply_as_markdown_with_code_blocks_to_copy(scripted, browser, tmp_path: Path):
    open_page(browser, scripted.url)
    ask(browser, scripted, MARKDOWN)
    reply = last_reply(browser)
    q = browser.execute_script
    assert reply.find_element(By.CSS_SELECTOR, ".role").text == "scripted"
    assert bubbles(browser) == [["user", "hi"], ["assistant", MARKDOWN]]
    assert [e.tag_name for e in reply.find_elements(By.CSS_SELECTOR, ".body > *")] == [
        "h1", "p", "ul", "ol", "div", "blockquote",
    ]  # fmt: skip
    body = reply.find_element(By.CSS_SELECTOR, ".body")
    texts = {tag: [e.get_attribute("textContent") for e in body.find_elements(By.CSS_SELECTOR, tag)]
             for tag in ("h1", "strong", "em", "p > code", "li", "ol li", "pre code", "blockquote")}  # fmt: skip
    assert texts == {
        "h1": ["Plan"],
        "strong": ["bold", "both", "bold"],
        "em": ["italic", "both"],
        "p > code": ["<b>inline</b>"],
        "li": ["one", "two, with boldnested", "nested", "third", "fourth"],
        "ol li": ["third", "fourth"],
        "pre code": ['print("<hello>")  # *not* Markdown'],
        "blockquote": ["quoted"],
    }
    assert body.find_element(By.CSS_SELECTOR, "ol").get_attribute("start") == "3"
    assert len(body.find_elements(By.CSS_SELECTOR, "p br")) == 1  # the paragraph's line break
    assert body.find_element(By.CSS_SELECTOR, "pre code").get_attribute("class") == "language-python"
    (a,) = body.find_elements(By.TAG_NAME, "a")
    assert (a.text, a.get_attribute("href"), a.get_attribute("rel")) == (
        "link", "https://example.com/a?b=1", "noopener noreferrer",
    )  # fmt: skip
    screenshot(browser, tmp_path, "markdown")
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    screenshot(browser, tmp_path, "markdown-dark")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

    # The code block's Copy copies its code; the message's Copy, the reply as written.
    body.find_element(By.CSS_SELECTOR, ".code button.copy").click()
    reply.find_element(By.CSS_SELECTOR, ".head button.copy").click()
    WebDriverWait(browser, 10).until(lambda d: len(q("return window.__copied")) == 2)
    assert q("return window.__copied") == ['print("<hello>")  # *not* Markdown', MARKDOWN]


XSS = """<img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script>

[x](javascript:window.__xss=3) and [y](JavaScript:window.__xss=4) and **<svg onload="window.__xss=5">**

```html
<img src=x onerror="window.__xss=6">
```"""


def test_page_shows_a_reply_that_tries_to_run_script_as_text(scripted, browser, tmp_path: Path):
    open_page(browser, scripted.url)
    ask(browser, scripted, XSS)
    reply = last_reply(browser)
    body = reply.find_element(By.CSS_SELECTOR, ".body")
    for tag in ("img", "script", "svg", "a"):
        assert not body.find_elements(By.TAG_NAME, tag), tag
    shown = body.get_attribute("textContent")
    for literal in ('<img src=x onerror="window.__xss=1">', "<script>window.__xss=2</script>",
                    "[x](javascript:window.__xss=3)", "[y](JavaScript:window.__xss=4)",
                    '<svg onload="window.__xss=5">', '<img src=x onerror="window.__xss=6">'):  # fmt: skip
        assert literal in shown, literal
    assert "<img" in body.text  # and visible, not just in the DOM
    for e in body.find_elements(By.CSS_SELECTOR, "p, strong"):
        e.click()
    screenshot(browser, tmp_path, "xss")
    assert browser.execute_script("return window.__xss") is None


def test_page_sends_the_system_prompt_and_the_sampling_settings(scripted, browser):
    """What the engine is asked: the system prompt first, and exactly the fields that were set."""
    open_page(browser, scripted.url)
    set_field(browser, "system", "Be brief.")
    for field, value in {"temperature": "0.7", "topp": "0.5", "topk": "3", "maxtokens": "5"}.items():
        set_field(browser, field, value)
    ask(browser, scripted, "Fine.", n_bubbles=3)
    assert bubbles(browser) == [["system", "Be brief."], ["user", "hi"], ["assistant", "Fine."]]
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log .role")]
    assert labels == ["System", "You", "scripted"]
    messages, params, tools = scripted.engine.asked[-1]
    assert [(m.role, m.content) for m in messages] == [("system", "Be brief."), ("user", "hi")]
    assert params == GenerationParams(max_new_tokens=5, sample=True, temperature=0.7, top_k=3, top_p=0.5)
    assert tools is None

    # Reset keeps the system prompt; emptied fields send nothing, so the server's defaults apply.
    browser.find_element(By.ID, "reset").click()
    wait_ready(browser, 1)
    assert browser.find_element(By.ID, "system").get_attribute("value") == "Be brief."
    for field in ("temperature", "topp", "topk", "maxtokens"):
        set_field(browser, field, "")
    ask(browser, scripted, "Again.", n_bubbles=3)
    messages, params, _ = scripted.engine.asked[-1]
    assert [(m.role, m.content) for m in messages] == [("system", "Be brief."), ("user", "hi")]
    assert params == GenerationParams(max_new_tokens=8)

    # A cleared system prompt is no longer sent.
    set_field(browser, "system", "")
    browser.find_element(By.ID, "reset").click()
    wait_ready(browser, 0)
    ask(browser, scripted, "Hello.")
    assert [(m.role, m.content) for m in scripted.engine.asked[-1][0]] == [("user", "hi")]


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = ToolCall("get_weather", {"city": "Paris", "days": [1, 2]})
THINKING = f"""<think>
The user wants the weather.
Call the tool.
</think>

Let me **check**.
<tool_call>
{json.dumps({"name": CALL.name, "arguments": CALL.arguments})}
</tool_call>"""


def test_page_shows_reasoning_and_tool_calls_collapsed(scripted, browser, tmp_path: Path):
    """The server streams them as `reasoning_content` and `tool_calls` deltas; the page keeps them on
    the reply and sends them back with it. The page defines no tools: a client that does is stood
    in for by adding `tools` to the page's requests."""
    open_page(browser, scripted.url)
    browser.execute_script(f"""
        const send = window.fetch;
        window.fetch = (url, opts) => {{
            if (opts && opts.body) opts = {{...opts, body: JSON.stringify({{...JSON.parse(opts.body),
                                                                           tools: [{json.dumps(WEATHER)}]}})}};
            return send(url, opts);
        }};""")
    ask(browser, scripted, THINKING)
    reply = last_reply(browser)
    reasoning, call = (
        reply.find_element(By.CSS_SELECTOR, c) for c in ("details.reasoning", "details.toolcall")
    )
    for details in (reasoning, call):
        assert details.get_attribute("open") is None  # collapsed
    assert reasoning.find_element(By.TAG_NAME, "summary").text == "Reasoning"
    assert not reasoning.find_element(By.CSS_SELECTOR, ".reasoning-text").is_displayed()
    assert reasoning.find_element(By.CSS_SELECTOR, ".reasoning-text").get_attribute("textContent") == (
        "The user wants the weather.\nCall the tool."
    )
    assert call.find_element(By.TAG_NAME, "summary").text == "Tool call: get_weather"
    assert call.find_element(By.TAG_NAME, "pre").get_attribute("textContent") == json.dumps(
        CALL.arguments, indent=2
    )
    assert reply.find_element(By.CSS_SELECTOR, ".body strong").text == "check"
    assert bubbles(browser)[-1] == ["assistant", "Let me **check**."]
    call.find_element(By.TAG_NAME, "summary").click()
    assert call.find_element(By.TAG_NAME, "pre").is_displayed()
    screenshot(browser, tmp_path, "tool-call")

    ask(browser, scripted, "Sunny.", text="thanks", n_bubbles=4)
    sent = scripted.engine.asked[-1][0][1]  # the reply, as the page sent it back
    assert (sent.content, sent.reasoning, [(c.name, c.arguments) for c in sent.tool_calls]) == (
        "Let me **check**.", "The user wants the weather.\nCall the tool.", [(CALL.name, CALL.arguments)],
    )  # fmt: skip


# --- the page's own protection: another site's page cannot use the API --------------------------


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
    import threading

    import httpx

    from chatkit.serve import ServerConfig, create_app

    engine = CountingEngine(tiny_engine)
    config = ServerConfig("tiny", GenerationParams(max_new_tokens=2, sample=False))
    with serving(create_app(engine, config)) as url:
        api = url + "/v1/chat/completions"
        (tmp_path / "index.html").write_text(ATTACK.format(api=api))
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
        elsewhere = http.server.ThreadingHTTPServer(("127.0.0.2", 0), handler)  # another host, on loopback
        threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
        try:
            browser.get(f"http://127.0.0.2:{elsewhere.server_address[1]}/index.html")
            # The form's answer, shown as the browser navigates to it: a refusal, or (unguarded) a reply.
            WebDriverWait(browser, 60).until(
                lambda d: '"error"' in d.page_source or '"choices"' in d.page_source
            )
            assert "cross_site_request" in browser.page_source
            assert engine.generations == 0
            r = httpx.post(api, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
            assert r.status_code == 200 and engine.generations == 1  # the counter counts
        finally:
            elsewhere.shutdown()
