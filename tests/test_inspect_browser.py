"""The `lmlab inspect --html` page in a real headless Chromium: it renders, hovering a token changes the
highlighted attention, the sampling sliders keep exactly the tokens lmlab.generation.processors keeps, and
stepping appends the greedy token. (The browser fixture is the playground test's: same install rules.)"""

from __future__ import annotations

import pytest
import torch

from serving import tiny_model, tiny_tokenizer
from test_serve_browser import browser  # noqa: F401  (the fixture)
from lmlab.inspect import filter_distribution, inspect_model, write_html

TEXT = "#Person1#: Did you book the train tickets for Saturday?"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    insp = inspect_model(model, tok, TEXT, steps=2, name="tiny")
    path = write_html(insp, tmp_path_factory.mktemp("inspect") / "inspect.html")
    return insp, path


def _weights(driver):
    from selenium.webdriver.common.by import By

    return [float(s.get_attribute("data-w") or "nan") for s in driver.find_elements(By.CSS_SELECTOR, "#tokens-src .tok")]


def _set(driver, slider: str, value) -> int:
    from selenium.webdriver.common.by import By

    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", slider, str(value))
    return int(driver.find_element(By.ID, "kept-count").get_attribute("data-kept"))


def test_page_hover_filter_and_step(browser, page):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    insp, path = page
    browser.get(path.as_uri())
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens-src .tok")
    T = len(insp.ids)
    assert len(tokens) == T and tokens[1].text.strip() == insp.tokens[1].replace("Ġ", " ").strip()
    assert browser.find_element(By.ID, "attn-canvas").get_attribute("width") not in (None, "0")
    assert browser.get_log("browser") == []

    # hover: the highlighted keys are the chosen head's row for that query (causal: nothing after it)
    ActionChains(browser).move_to_element(tokens[3]).perform()
    first = _weights(browser)
    layer = insp.layers["decoder"][-1]
    expected = insp.attention(layer, 0)[3]
    assert max(abs(a - float(b)) for a, b in zip(first, expected)) <= 1 / 255
    assert all(w == 0 for w in first[4:]) and abs(sum(first) - 1) <= T / 510
    ActionChains(browser).move_to_element(tokens[T - 1]).perform()
    second = _weights(browser)
    assert second != first and abs(sum(second) - 1) <= T / 510
    assert "query" in browser.find_elements(By.CSS_SELECTOR, "#tokens-src .tok")[T - 1].get_attribute("class")

    # the filter: the page's kept counts equal the processors' on the same logits
    logits, ids = insp.output["logits"], insp.ids
    V = logits.numel()
    assert int(browser.find_element(By.ID, "kept-count").get_attribute("data-kept")) == V
    assert _set(browser, "top-k", 5) == 5
    assert _set(browser, "top-k", 40) == 40
    for settings in (dict(top_k=40, top_p=0.5), dict(top_k=40, top_p=0.5, temperature=0.5),
                     dict(top_k=0, top_p=0.9, temperature=1.5), dict(top_k=0, top_p=1, temperature=1.5, min_p=0.05)):
        full = {**dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), **settings}
        for name in ("temperature", "min_p", "top_p", "top_k"):
            kept = _set(browser, name.replace("_", "-"), full[name])
        assert kept == int(filter_distribution(logits, ids, **full)[1].sum()), settings
    _set(browser, "min-p", 0)
    _set(browser, "temperature", 1)
    assert _set(browser, "top-k", 5) == 5  # the 20 bars: 5 kept, 15 greyed out
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars rect[data-cut='1']")) == 15
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars rect[data-cut='0']")) == 5
    _set(browser, "top-k", 0)

    # stepping appends the greedy token and moves the distribution
    _set(browser, "top-p", 1)
    before = int(browser.find_element(By.ID, "kept-count").get_attribute("data-kept"))
    assert before == V
    browser.find_element(By.ID, "step").click()
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens-src .tok")
    assert len(tokens) == T + 1 and "stepped" in tokens[-1].get_attribute("class")
    assert insp.steps[0]["id"] == int(logits.argmax())
    _set(browser, "top-p", 0.5)
    step_logits = insp.steps[0]["logits"]
    assert _set(browser, "top-p", 0.5) == int(filter_distribution(step_logits, ids + [insp.steps[0]["id"]],
                                                                  top_p=0.5)[1].sum())
    ActionChains(browser).move_to_element(tokens[-1]).perform()
    row = _weights(browser)
    assert len(row) == T + 1 and abs(sum(row) - 1) <= (T + 1) / 510
    browser.find_element(By.ID, "step").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tokens-src .tok")) == T + 2
    assert not browser.find_element(By.ID, "step").is_enabled()  # two precomputed steps
    assert browser.get_log("browser") == []


def test_small_multiples_show_every_head(browser, page):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    insp, path = page
    browser.get(path.as_uri())
    Select(browser.find_element(By.ID, "view")).select_by_value("multi")
    figures = browser.find_elements(By.CSS_SELECTOR, "#multiples figure")
    assert len(figures) == insp.attentions["decoder"].shape[1]
    figures[2].click()
    assert Select(browser.find_element(By.ID, "head")).first_selected_option.text == "2"
    assert browser.find_elements(By.ID, "attn-canvas")
