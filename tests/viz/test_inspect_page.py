"""The inspect page in a real headless Chromium: every layer x head drawn with the tokens on both axes, the
weight on hover, the summary and logit lens tables, Chinese drawn with real glyphs (not boxes), and a
screenshot that is not blank."""

import json
import re

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.fixtures_browser import chrome, ink  # skips this module where there is no browser
from tests.fixtures_ckpt import run_cli, trained

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run fastest on one thread

TEXT = "山脉是如何形成的？"

# Each character drawn alone on a canvas in the font of the page's token labels; returns the pixels' alpha
# as a string per character, so that identical renderings (a missing glyph's box) compare equal.
GLYPHS = """
const style = getComputedStyle(document.querySelector('.qlab'));
const c = document.createElement('canvas'); c.width = c.height = 48;
const g = c.getContext('2d');
g.font = `32px ${style.fontFamily}`; g.textBaseline = 'top';
return arguments[0].map((ch) => {
  g.clearRect(0, 0, 48, 48); g.fillText(ch, 4, 4);
  return Array.from(g.getImageData(0, 0, 48, 48).data.filter((_, i) => i % 4 === 3)).join(',');
});
"""


@pytest.fixture(scope="module")
def page_file(tiny_run, tmp_path_factory):
    _, ckpt = tiny_run
    where = tmp_path_factory.mktemp("inspect_page")
    proc = run_cli("inspect", f"checkpoint={ckpt}", f"text={TEXT}", "out=attn.html", "threads=1", cwd=where)
    assert proc.returncode == 0, proc.stderr
    return where / "attn.html"


@pytest.fixture(scope="module")
def browser():
    driver = chrome(1300, 900)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_the_page_draws_every_head_with_chinese_labels_and_weights_on_hover(page_file, browser, tmp_path):
    model, tok, _ = trained()
    ids = tok.encode_prompt([("user", TEXT)])
    tokens = [tok.tokens[i] for i in ids]
    L, H, T = model.config.n_layer, model.config.n_head, len(ids)
    html = page_file.read_text(encoding="utf-8")
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', html, re.S).group(1))

    browser.get(page_file.as_uri())
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    assert browser.title.startswith("rgpt 看懂模型")
    cards = browser.find_elements(By.CSS_SELECTOR, ".head")
    assert [(int(c.get_attribute("data-layer")), int(c.get_attribute("data-head"))) for c in cards] == [
        (layer, h) for layer in range(L) for h in range(H)
    ]
    for card in cards[:: H + 1]:  # a few of them: the tokens on both axes, in order
        keys = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".klab")]
        queries = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".qlab")]
        assert queries == tokens, queries
        assert [k.replace("\n", "") for k in keys] == tokens, keys  # vertical text may report line breaks
    assert len(browser.find_elements(By.CSS_SELECTOR, "#summary tbody tr")) == L * H
    assert len(browser.find_elements(By.CSS_SELECTOR, "#lens tbody tr")) == L + 1

    # hover over layer 1, head 2: row of 形成 (query), column of 山脉 (key)
    card = browser.find_element(By.ID, "head-1-2")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
    canvas = card.find_element(By.TAG_NAME, "canvas")
    r, c = tokens.index("形成"), tokens.index("山脉")
    cell = canvas.size["width"] / T
    dx, dy = (c + 0.5) * cell - canvas.size["width"] / 2, (r + 0.5) * cell - canvas.size["height"] / 2
    ActionChains(browser).move_to_element_with_offset(canvas, int(dx), int(dy)).perform()
    tip = browser.find_element(By.ID, "tip")
    assert tip.is_displayed()
    assert tip.text == f"第 1 层 头 2：「形成」→「山脉」 {data['attention'][1][2][r][c]:.4f}", tip.text

    chars = ["山", "脉", "形", "成", "？"]
    renders = browser.execute_script(GLYPHS, [*chars, "\u0378"])  # U+0378 is unassigned: the box itself
    tofu = renders.pop()
    for ch, r in zip(chars, renders):
        assert r != tofu and any(v != "0" for v in r.split(",")), f"{ch} renders as a missing glyph"
    assert len(set(renders)) == len(chars), "different characters must look different"

    browser.execute_script("window.scrollTo(0, 0)")
    png = browser.get_screenshot_as_png()
    (tmp_path / "page.png").write_bytes(png)  # kept by pytest for a look when this fails
    colours, share, width, height = ink(browser, png)
    assert width >= 1000 and height >= 600, (width, height)
    assert colours > 20 and 0.01 < share < 0.9, (
        f"the screenshot looks blank: {colours} colours, {share:.1%} ink"
    )
