"""The playground's Inside tab in a real headless Chromium (the `browser` fixture of test_serve_browser.py).

The tab posts to /v1/inspect and draws the answer with lmlab inspect's own page script (served from
/static/inspect/, not copied); the test hovers tokens, moves the top-k slider, steps through decoding, and
traces a fine-tuned summary back to the dialogue's turns.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from lmlab.serve.app import InstructionRecipe
from lmlab.tasks.summarize.data import load_sample
from serving import running_server, tiny_model, tiny_tokenizer
from test_serve_browser import browser  # noqa: F401 (the fixture)

TEXT = "The quick brown fox jumps over the lazy dog. The quick brown"


def _shown(piece: str) -> str:
    """What the page prints for a token piece (inspect.js's shown())."""
    return piece.replace("Ġ", " ").replace("Ċ", "\\n").replace("▁", " ")


def test_inside_tab_hover_top_k_step_and_turns(browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=512)
    with running_server(lambda: (model, tok), shot_method="random", finetuned=InstructionRecipe()) as (url, _):
        api = httpx.post(f"{url}/v1/inspect", json={"text": TEXT, "steps": 1, "top_k": 5}, timeout=60).json()
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.02)
        wait.until(lambda d: "ready" in d.find_element(By.ID, "model-info").get_attribute("class"))
        browser.find_element(By.ID, "tab-inside").click()
        stats = browser.find_element(By.ID, "inside-stats")
        wait.until(lambda d: stats.get_attribute("data-done") == "1")
        assert browser.find_element(By.ID, "panel-summarize").get_attribute("hidden") is not None

        # --- it renders: the tokens the API reports, the heatmap, the logit lens ----------------------------
        spans = browser.find_elements(By.CSS_SELECTOR, "#tokens-src .tok")
        assert [s.get_attribute("textContent") for s in spans] == [_shown(t) for t in api["tokens"]]
        assert browser.find_element(By.ID, "attn-canvas").size["width"] > 0
        assert browser.find_elements(By.CSS_SELECTOR, "#lens tr")

        # --- hovering a token changes the highlighted attention: the chosen head's row of that query -----
        layer = len(api["layers"]["decoder"]) - 1  # the page starts on the last recorded layer, head 0
        def hover(i):
            ActionChains(browser).move_to_element(spans[i]).perform()
            wait.until(lambda d: "query" in spans[i].get_attribute("class"))
            return [float(s.get_attribute("data-w")) for s in spans]
        for i in (3, 9):
            shown = hover(i)
            want = api["attentions"][layer][0][i]
            assert max(abs(a - b) for a, b in zip(shown, want)) <= 1 / 255 + 1e-4, (i, shown, want)
        assert hover(3) != hover(9)

        # --- moving top-k changes how many tokens are kept (the Python processors' count) ---------------
        kept = browser.find_element(By.ID, "kept-count")
        assert int(kept.get_attribute("data-kept")) == tok.vocab_size  # filters off: every token
        browser.execute_script("const s = document.getElementById('top-k'); s.value = 5;"
                               "s.dispatchEvent(new Event('input'));")
        assert int(kept.get_attribute("data-kept")) == api["sampling"]["kept_count"] == 5
        assert len(browser.find_elements(By.CSS_SELECTOR, "#bars rect.bar.cut")) > 0

        # --- stepping appends a token, fetched through the route (the tab asked for no steps) ------------
        browser.find_element(By.ID, "step").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tokens-src .tok")) == len(spans) + 1)
        last = browser.find_elements(By.CSS_SELECTOR, "#tokens-src .tok")[-1]
        assert "stepped" in last.get_attribute("class")
        assert last.get_attribute("textContent") == _shown(api["steps"][0]["token"])

        # --- for summaries: a bundled dialogue, traced back turn by turn -------------------------------
        record = load_sample().records[0]
        Select(browser.find_element(By.ID, "inside-pick")).select_by_value(record.id)
        assert browser.find_element(By.ID, "inside-text").get_property("value") == record.dialogue
        browser.find_element(By.ID, "inside-trace").click()
        wait.until(lambda d: stats.get_attribute("data-done") == "2" or "error" in stats.get_attribute("innerHTML"))
        assert stats.get_attribute("data-done") == "2", stats.text
        turns = browser.find_elements(By.CSS_SELECTOR, "#summary-turns .turn")
        lines = [line for line in record.dialogue.strip().split("\n") if line.strip()]
        assert len(turns) == len(lines)
        shares = [float(t.get_attribute("data-share")) for t in turns]
        assert abs(sum(shares) - 1) < 1e-2 and len(set(shares)) > 1
        browser.execute_script("document.getElementById('view').value = 'multi';"
                               "document.getElementById('view').dispatchEvent(new Event('change'));")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#multiples figure")) == model.config.n_heads
        shot = Path(os.environ.get("LMLAB_INSIDE_SCREENSHOT", tmp_path / "serve-inside.png"))
        browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
