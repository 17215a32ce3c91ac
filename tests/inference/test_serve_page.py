"""The chat page at / in a real headless Chromium (the system's chromium and chromedriver, driven by selenium),
talking to the real server on loopback: a question typed, the reply streamed into the page, the history
sent with the next question, the settings applied, clear, and a screenshot that is not blank.

Chromium comes from the system (Debian: chromium, chromium-driver, fonts-noto-cjk), which .ci/run installs
when missing; elsewhere the test is skipped with a note unless RGPT_REQUIRE_BROWSER=1 (set by .ci/run)."""

import pytest

from tests.fixtures_browser import chrome, ink  # skips this module where there is no browser
from tests.fixtures_ckpt import ANSWERS
from tests.fixtures_serve import Server

Q_MOUNTAIN, Q_HELLO, Q_SEASONS = "山脉是如何形成的？", "你好", "一年有几个季节？"

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# Installed into the page before it is used: every request body the page sends, and how many times a
# reply's text changed on screen (a streamed reply changes once per piece; a whole one, once).
SPY = """
window.bodies = [];
const fetch0 = window.fetch;
window.fetch = (url, opts) => { if (opts && opts.body) window.bodies.push(JSON.parse(opts.body)); return fetch0(url, opts); };
window.updates = 0;
new MutationObserver((ms) => { for (const m of ms) if (m.target.closest && m.target.closest('.msg.assistant')) window.updates++; })
  .observe(document.getElementById('log'), {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    _, ckpt = tiny_run
    # stream_interval=0: each step's text is sent at once, so even the tiny model's fast reply comes in pieces
    server = Server(f"checkpoint={ckpt}", "stream_interval=0", cwd=tmp_path_factory.mktemp("page"))
    yield server
    code, stderr = server.stop()
    assert code == 0 and "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def browser():
    driver = chrome()
    yield driver
    driver.quit()


def ask(driver, question: str) -> str:
    """Type a question and press Enter; wait for the reply to finish; return its text."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
    driver.find_element(By.ID, "input").send_keys(question, Keys.ENTER)
    done = ".msg.assistant[data-done]"
    WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) > before)
    return driver.find_elements(By.CSS_SELECTOR, f"{done} .text")[-1].text


@pytest.mark.slow
def test_the_page_streams_replies_keeps_history_and_clears(server, browser, tmp_path):
    browser.get(f"{server.url}/")
    WebDriverWait(browser, 30).until(lambda d: server.model in d.find_element(By.ID, "model").text)
    assert browser.title == "rgpt 对话" and "山脉是如何形成的" in browser.find_element(By.ID, "hint").text
    browser.execute_script(SPY)

    assert ask(browser, Q_HELLO) == ANSWERS[Q_HELLO]
    assert browser.execute_script("return window.updates") > 3, "the reply must appear piece by piece"
    assert ask(browser, Q_SEASONS) == ANSWERS[Q_SEASONS]
    first, second = browser.execute_script("return window.bodies")
    assert first["stream"] is True and first["model"] == server.model
    assert "temperature" not in first and "max_tokens" not in first, "the server's defaults: greedy, 100"
    assert [m["content"] for m in second["messages"]] == [Q_HELLO, ANSWERS[Q_HELLO], Q_SEASONS]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert browser.find_element(By.ID, "send").is_enabled(), "the page is ready for the next question"

    png = browser.get_screenshot_as_png()
    (tmp_path / "page.png").write_bytes(png)  # kept by pytest for a look when this fails
    colours, share, width, height = ink(browser, png)
    assert width >= 800 and height >= 400, (width, height)
    assert colours > 20 and 0.01 < share < 0.9, (
        f"the screenshot looks blank: {colours} colours, {share:.1%} ink"
    )

    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == [], "clear empties the conversation"
    browser.find_element(By.TAG_NAME, "summary").click()  # open the settings
    Select(browser.find_element(By.ID, "method")).select_by_value("sample")
    browser.find_element(By.ID, "seed").send_keys("3")
    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("5")
    assert ask(browser, Q_MOUNTAIN)
    last = browser.execute_script("return window.bodies")[-1]
    assert [m["content"] for m in last["messages"]] == [Q_MOUNTAIN], "after clear, no history is sent"
    assert (last["temperature"], last["top_p"], last["seed"], last["max_tokens"]) == (0.7, 0.9, 3, 5)
    assert "top_k" not in last and "repetition_penalty" not in last, "fields left empty are not sent"
