"""The playground in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

The test types into the page, presses the buttons and checks that streamed text arrives, in both tabs.
Where the browser cannot be installed (no apt-get, or not root and no sudo) it skips and says why;
where `scripts/setup.sh` would have installed it, a missing browser is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest

from lmlab.align.prefs import read_preferences
from lmlab.generation import GenerationConfig, generate
from lmlab.serve.app import InstructionRecipe
from serving import running_server, slow_down, tiny_model, tiny_tokenizer

DIALOGUE = ("#Person1#: Did you book the train tickets for Saturday?\n"
            "#Person2#: Yes, two seats at nine in the morning.\n"
            "#Person1#: Great, I will bring the sandwiches.")


def _browser_paths() -> tuple[str | None, str | None]:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return chromium, shutil.which("chromedriver")


def _setup_can_install() -> bool:
    """What scripts/setup.sh checks before it installs the browser."""
    if shutil.which("apt-get") is None:
        return False
    if os.geteuid() == 0:
        return True
    return shutil.which("sudo") is not None and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


@pytest.fixture
def browser():
    chromium, driver_path = _browser_paths()
    if not (chromium and driver_path):
        if _setup_can_install():
            pytest.fail("chromium and chromedriver are missing; bash scripts/setup.sh installs them "
                        "(apt-get install chromium chromium-driver)")
        pytest.skip("no headless Chromium: this machine has no apt-get (or no root/sudo) for scripts/setup.sh "
                    "to install chromium + chromium-driver")
    # selenium is imported in the tests that drive a browser: an optional dev dependency, unused where they skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager try to download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_streams_summaries_and_chat(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=2048)
    with running_server(lambda: (model, tok), shot_method="random") as (url, _):
        hook = slow_down(model, 0.03)  # ~30 ms a token: the page sees the text grow
        try:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60, poll_frequency=0.01)
            wait.until(lambda d: "ready" in d.find_element(By.ID, "model-info").get_attribute("class"))
            assert browser.find_element(By.ID, "model-info").text == "tiny"
            wait.until(lambda d: len(Select(d.find_element(By.ID, "dialogue-pick")).options) == 29)
            recipes = [o.text for o in Select(browser.find_element(By.ID, "recipe")).options]
            assert recipes == ["zero-shot", "one-shot", "few-shot"]
            selected = Select(browser.find_element(By.ID, "recipe")).first_selected_option.text
            assert selected == "few-shot"  # no fine-tuned summarizer served: the best prompting recipe

            # --- summarize: type a dialogue, press the button, watch the summary stream in ----------
            box = browser.find_element(By.ID, "dialogue")
            box.clear()
            box.send_keys(DIALOGUE)
            Select(browser.find_element(By.ID, "recipe")).select_by_visible_text("zero-shot")
            max_tokens = browser.find_element(By.ID, "sum-max-tokens")
            max_tokens.clear()
            max_tokens.send_keys("24")
            browser.find_element(By.ID, "summarize").click()
            summary = browser.find_element(By.ID, "summary")
            # streamed: text is on the page while the request is still running
            wait.until(lambda d: summary.text and "streaming" in summary.get_attribute("class"))
            partial = summary.text
            wait.until(lambda d: "streaming" not in summary.get_attribute("class"))
            stats = browser.find_element(By.ID, "sum-stats").text
            final = summary.text
            assert "tokens/s" in stats and "generated" in stats and "zero-shot (0 shots)" in stats, stats
            assert final and len(final) >= len(partial)

            # the page shows what the API returns for the same request
            api = httpx.post(f"{url}/v1/summarize", timeout=60,
                             json={"dialogue": DIALOGUE, "recipe": "zero-shot", "max_tokens": 24, "temperature": 0,
                                   "top_k": 0, "top_p": 1}).json()
            assert final.split() == api["summary"].split()
            assert f"generated {api['usage']['completion_tokens']} tokens" in stats

            # --- chat: switch tabs, type, press Enter, watch the reply stream in -------------------
            browser.find_element(By.ID, "tab-chat").click()
            assert browser.find_element(By.ID, "panel-summarize").get_attribute("hidden") is not None
            temperature = browser.find_element(By.ID, "chat-temperature")
            temperature.clear()
            temperature.send_keys("0")
            chat_tokens = browser.find_element(By.ID, "chat-max-tokens")
            chat_tokens.clear()
            chat_tokens.send_keys("32")
            browser.find_element(By.ID, "chat-input").send_keys("Where is the station?", Keys.ENTER)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                       and d.find_element(By.CSS_SELECTOR, ".msg.assistant").text)
            reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
            wait.until(lambda d: "streaming" not in reply.get_attribute("class"))
            assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Where is the station?"
            messages = [{"role": "user", "content": "Where is the station?"}]
            want = generate(model, tok, tok.apply_chat_template(messages), GenerationConfig(max_new_tokens=32))
            assert reply.text.split() == want.split()  # the DOM's text collapses runs of whitespace
            assert "tokens/s" in browser.find_element(By.ID, "chat-stats").text
            browser.save_screenshot(str(tmp_path / "playground.png"))
        finally:
            hook.remove()
    assert (tmp_path / "playground.png").stat().st_size > 10_000


def test_playground_picks_the_fine_tuned_summarizer_by_default(browser):
    """Served with a fine-tuned summarizer (lmlab serve's default for a model lmlab ships one for), the
    playground lists its recipe first and selects it, as lmlab summarize would use it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=2048)
    with running_server(lambda: (model, tok), shot_method="random", finetuned=InstructionRecipe()) as (url, _):
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.01)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "recipe")).options) == 4)
        picker = Select(browser.find_element(By.ID, "recipe"))
        assert [o.text for o in picker.options] == ["fine-tuned", "zero-shot", "one-shot", "few-shot"]
        assert picker.first_selected_option.text == "fine-tuned"


def test_playground_summarizes_with_the_recipes_mbr_unless_unticked(browser):
    """A fine-tuned recipe that decodes by minimum Bayes risk: the summarize tab says so, ticked by default; the
    summary is the consensus of its samples (the API's answer), and unticked the knobs decide (one summary)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from lmlab.adapt.recipe import Recipe
    from lmlab.tasks.summarize.experiments import INSTRUCTION

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=2048)
    recipe = Recipe(template="instruction", instruction=INSTRUCTION, chat=False, prompt_field="dialogue",
                    response_field="summary", mbr={"n": 3, "temperature": 0.9})
    with running_server(lambda: (model, tok), shot_method="random", finetuned=recipe) as (url, _):
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.01)
        wait.until(lambda d: d.find_element(By.ID, "sum-mbr-row").is_displayed())
        assert "consensus of 3 samples at T=0.9" in browser.find_element(By.ID, "sum-mbr-row").text
        assert browser.find_element(By.ID, "sum-mbr").is_selected()
        assert Select(browser.find_element(By.ID, "recipe")).first_selected_option.text == "fine-tuned"
        box = browser.find_element(By.ID, "dialogue")
        box.clear()
        box.send_keys(DIALOGUE)
        max_tokens = browser.find_element(By.ID, "sum-max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("8")
        summary, stats = browser.find_element(By.ID, "summary"), browser.find_element(By.ID, "sum-stats")

        def run() -> str:
            browser.find_element(By.ID, "summarize").click()
            wait.until(lambda d: "prompt" in stats.text and "streaming" not in summary.get_attribute("class"))
            return stats.text

        text = run()
        api = httpx.post(f"{url}/v1/summarize", json={"dialogue": DIALOGUE, "max_tokens": 8}, timeout=60).json()
        assert api["best_of"] == 3 and "consensus of 3 samples" in text
        assert summary.text.split() == api["summary"].split()
        browser.find_element(By.ID, "sum-mbr").click()  # untick: the knobs (temperature 0: greedy), one summary
        text = run()
        assert "consensus" not in text


def test_compare_tab_records_the_choice(browser, tmp_path):
    """Compare: two summaries of one dialogue, shown in a random order; clicking one appends the choice."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=2048)
    prefs = tmp_path / "prefs.jsonl"
    with running_server(lambda: (model, tok), shot_method="random", prefs_out=str(prefs)) as (url, _):
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.01)
        wait.until(lambda d: "ready" in d.find_element(By.ID, "model-info").get_attribute("class"))
        wait.until(lambda d: len(Select(d.find_element(By.ID, "cmp-recipe-b")).options) == 3)
        browser.find_element(By.ID, "tab-compare").click()
        assert browser.find_element(By.ID, "panel-summarize").get_attribute("hidden") is not None
        box = browser.find_element(By.ID, "cmp-dialogue")
        box.clear()
        box.send_keys(DIALOGUE)
        for side in ("cmp-recipe-a", "cmp-recipe-b"):  # one recipe twice: two samples at T=1
            Select(browser.find_element(By.ID, side)).select_by_visible_text("zero-shot")
        for field, value in (("cmp-temperature", "1"), ("cmp-max-tokens", "12")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "cmp-generate").click()
        wait.until(lambda d: d.find_element(By.ID, "cmp-choose-2").is_enabled())
        shown = [browser.find_element(By.ID, f"cmp-{k}").text for k in (1, 2)]
        assert all(shown) and shown[0] != shown[1]
        assert "zero-shot" not in browser.find_element(By.ID, "cmp-stats").text  # sources hidden before the choice
        browser.find_element(By.ID, "cmp-choose-2").click()
        wait.until(lambda d: "saved" in d.find_element(By.ID, "cmp-stats").text)
        assert "record 1 of" in browser.find_element(By.ID, "cmp-stats").text
        assert not browser.find_element(By.ID, "cmp-choose-1").is_enabled()  # one choice per pair
    records = read_preferences(prefs)
    assert len(records) == 1
    # the DOM's text collapses runs of whitespace: compare words
    assert records[0].chosen.split() == shown[1].split() and records[0].rejected.split() == shown[0].split()
    assert records[0].prompt == DIALOGUE and records[0].source.startswith("playground compare: recipe zero-shot")


def test_ask_tab_streams_a_grounded_answer_and_opens_the_cited_dialogue(browser, tmp_path):
    """Ask: a question against the served index -> the answer streams in, the sources follow, and clicking
    a source shows its whole dialogue."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from lmlab.index import Index
    from test_index import DOCS, ToyEncoder

    index, _ = Index.build(tmp_path / "idx", DOCS, meta_fields=["topic"], encoder=ToyEncoder())
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=2048)
    with running_server(lambda: (model, tok), index=index) as (url, _):
        hook = slow_down(model, 0.03)
        try:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60, poll_frequency=0.01)
            wait.until(lambda d: "ready" in d.find_element(By.ID, "model-info").get_attribute("class"))
            browser.find_element(By.ID, "tab-ask").click()
            assert browser.find_element(By.ID, "panel-ask").get_attribute("hidden") is None
            wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
            browser.find_element(By.ID, "ask-input").send_keys("What did the customer order with the salmon?")
            k = browser.find_element(By.ID, "ask-k")
            k.clear()
            k.send_keys("3")
            tokens = browser.find_element(By.ID, "ask-max-tokens")
            tokens.clear()
            tokens.send_keys("24")
            browser.find_element(By.ID, "ask").click()
            answer = browser.find_element(By.ID, "ask-answer")
            wait.until(lambda d: answer.text and "streaming" in answer.get_attribute("class"))  # streamed
            wait.until(lambda d: "streaming" not in answer.get_attribute("class"))
            sources = browser.find_elements(By.CSS_SELECTOR, "#ask-sources button")
            assert [s.get_attribute("data-id") for s in sources] == [h.id for h in index.search(
                "What did the customer order with the salmon?", k=3)]
            assert sources[0].get_attribute("data-id") == "d1"
            assert "3 sources" in browser.find_element(By.ID, "ask-stats").text
            sources[0].click()
            doc = browser.find_element(By.ID, "ask-doc")
            wait.until(lambda d: doc.text)
            assert doc.text.split() == DOCS[0]["dialogue"].split()
            assert "topic=restaurant" in browser.find_element(By.ID, "ask-doc-title").text
            assert "open" in sources[0].get_attribute("class")
            browser.save_screenshot(str(tmp_path / "ask.png"))
        finally:
            hook.remove()
    assert (tmp_path / "ask.png").stat().st_size > 10_000


def test_ask_tab_without_an_index_says_how_to_get_one(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=2048)
    with running_server(lambda: (model, tok)) as (url, _):
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.01)
        wait.until(lambda d: "--index INDEX" in d.find_element(By.ID, "ask-stats").get_attribute("textContent"))
        assert not browser.find_element(By.ID, "ask").is_enabled()
