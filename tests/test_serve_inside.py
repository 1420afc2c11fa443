"""POST /v1/inspect in lmlab serve: the Inside tab's route (lmlab.inspect.inspect_request on the served model).

The recorded passes run on the scheduler's model thread (Scheduler.call), never beside a decode step: the
recorder's hooks sit on the model's modules and would fire on the loop's own KV-cache steps.
"""

from __future__ import annotations

import threading

import httpx

from lmlab.generation import GenerationConfig, generate
from lmlab.serve.app import InstructionRecipe
from serving import running_server, slow_down, tiny_model, tiny_tokenizer

DIALOGUE = ("#Person1#: Did you book the train tickets for Saturday?\n"
            "#Person2#: Yes, two seats at nine in the morning.\n"
            "#Person1#: Great, I will bring the sandwiches.")


def _server(max_seq_len: int = 256, **settings):
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=max_seq_len)
    return model, tok, running_server(lambda: (model, tok), shot_method="random", **settings)


def test_inspect_route_returns_the_json_contract_and_the_page_form():
    model, tok, server = _server()
    with server as (url, _):
        j = httpx.post(f"{url}/v1/inspect", json={"text": "Hello there, how are you?", "steps": 2}, timeout=60).json()
        assert j["tokens"] and len(j["tokens"]) == len(tok.encode("Hello there, how are you?", add_special_tokens=True))
        assert len(j["steps"]) == 2
        page = httpx.post(f"{url}/v1/inspect", json={"text": "Hello there", "format": "page", "top_k": 5},
                          timeout=60).json()
        assert page["attention"]["decoder"]["shape"][0] == model.config.n_layers
        assert page["sampling"]["top_k"] == 5 and page["model"] == "tiny"


def test_inspect_bad_input_is_one_line_400():
    model, tok, server = _server()
    with server as (url, _):
        cases = [({"text": "hi", "layers": [99]}, "layer 99 is out of range"),
                 ({"text": "hi", "target": "x"}, "target='x'"),
                 ({"text": "word " * 400}, "longer than the model's window"),
                 ({"text": "hi", "steps": 17}, "steps=17"),
                 ({"text": "hi", "bogus": 1}, "bogus"),
                 ({"dialogue": DIALOGUE}, "fine-tuned summarizer"),
                 ({"text": "hi", "summary": "x"}, "summary needs the dialogue")]
        for body, want in cases:
            r = httpx.post(f"{url}/v1/inspect", json=body, timeout=60)
            message = r.json()["error"]["message"]
            assert r.status_code == 400 and want in message and "\n" not in message, (body, message)
        r = httpx.post(f"{url}/v1/inspect", json={"text": "hi", "top_k": -3}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


def test_inspect_runs_on_the_model_thread_beside_a_running_request():
    """While a completion streams, inspections run between its decode steps: every forward pass happens on
    the model loop's thread, and the completion's text is exactly what generate() gives alone."""
    model, tok, server = _server()
    threads = set()
    spy = model.register_forward_pre_hook(lambda module, args: threads.add(threading.current_thread().name))
    with server as (url, _):
        hook = slow_down(model, 0.01)
        try:
            prompt = "#Person1#: Where is the station?"
            result = {}

            def complete():
                result["r"] = httpx.post(f"{url}/v1/completions", timeout=120, json={
                    "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True}).json()

            worker = threading.Thread(target=complete)
            worker.start()
            for _ in range(3):
                r = httpx.post(f"{url}/v1/inspect", json={"text": "Hello there", "steps": 4}, timeout=120)
                assert r.status_code == 200, r.text
            worker.join(120)
        finally:
            hook.remove()
    spy.remove()
    assert threads == {"lmlab-model-loop"}
    want = generate(model, tok, prompt, GenerationConfig(max_new_tokens=40, eos_token_ids=[]))
    assert result["r"]["choices"][0]["text"] == want


def test_inspect_traces_the_fine_tuned_summary_to_the_dialogue_turns():
    model, tok, server = _server(512, finetuned=InstructionRecipe())
    with server as (url, _):
        r = httpx.post(f"{url}/v1/inspect", json={"dialogue": DIALOGUE, "summary": "They will take the train.",
                                                  "format": "page"}, timeout=60)
        assert r.status_code == 200, r.text
        t = r.json()["summary_turns"]
        assert t["turns"] == DIALOGUE.split("\n") and abs(sum(t["share"]) - 1) < 1e-6
        assert r.json()["text"] == DIALOGUE  # the text inspected defaults to the dialogue
        # without a summary the fine-tuned recipe writes one (greedy), as /v1/summarize does
        written = httpx.post(f"{url}/v1/summarize", json={"dialogue": DIALOGUE, "recipe": "fine-tuned",
                                                          "max_tokens": 64}, timeout=60).json()["summary"]
        r = httpx.post(f"{url}/v1/inspect", json={"dialogue": DIALOGUE}, timeout=60)
        if written:
            assert r.status_code == 200 and r.json()["summary_turns"]["summary"] == written
        else:
            assert r.status_code == 400 and "empty summary" in r.json()["error"]["message"]


def test_scheduler_call_runs_jobs_on_the_model_thread_and_passes_errors_back():
    import pytest

    from lmlab.errors import DataError
    from lmlab.serve.scheduler import Closing, Scheduler

    tok = tiny_tokenizer()
    scheduler = Scheduler(tiny_model(tok.vocab_size), tok, max_batch=2)
    try:
        assert scheduler.call(lambda: threading.current_thread().name).result(30) == "lmlab-model-loop"

        def bad():
            raise DataError("layer 9 is out of range")

        with pytest.raises(DataError, match="layer 9"):
            scheduler.call(bad).result(30)
        assert scheduler.alive  # a job's error is the caller's, not the loop's
    finally:
        scheduler.close()
    with pytest.raises(Closing):
        scheduler.call(lambda: None)
