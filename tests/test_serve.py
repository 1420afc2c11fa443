"""`lmlab serve` over real HTTP: a uvicorn server on 127.0.0.1 and the official `openai` client.

A tiny random model keeps these fast; every greedy or seeded answer is compared with lmlab's own
`generate` of the same prompt alone. One test, marked slow, serves the real SmolLM2.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

import lmlab
import lmlab.serve
from lmlab.adapt.lora import LoraConfig, LoRALinear, apply_lora, lora_modules
from lmlab.adapt.peft import save_adapter
from lmlab.adapt.recipe import Recipe, shipped_adapter
from lmlab.checkpoints import save_model
from lmlab.cli import main
from lmlab.commands.serve import load_for_serving
from lmlab.config import ModelConfig
from lmlab.generation import GenerationConfig, generate
from lmlab.generation.decode import resolve_config
from lmlab.model import Transformer
from lmlab.prompting import build_prompt
from lmlab.quant.linear import Int8Linear
from lmlab.serve.app import InstructionRecipe, finetuned_recipe
from lmlab.serve.scheduler import Scheduler
from lmlab.tasks.summarize.data import load_sample
from lmlab.tasks.summarize.experiments import CHAT_STOP_STRINGS, INSTRUCTION, clean_summary
from serving import Gate, free_port, running_server, slow_down, tiny_model, tiny_tokenizer, wait_ready

PROMPT = "#Person1#: Hello, how are you today?\n#Person2#:"


@pytest.fixture(scope="module")
def pair():
    tok = tiny_tokenizer()
    return tiny_model(tok.vocab_size, max_seq_len=2048), tok  # room for a one-shot summarize prompt


@pytest.fixture(scope="module")
def server(pair):
    model, tok = pair
    with running_server(lambda: (model, tok), shot_method="random") as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def alone(pair, prompt: str, **kw) -> str:
    """What lmlab.generate says for `prompt` on its own (the reference for every served answer)."""
    model, tok = pair
    return generate(model, tok, prompt, GenerationConfig(**kw))


def n_tokens(pair, text: str) -> int:
    return len(pair[1].encode(text, add_special_tokens=True))


# --- the OpenAI API --------------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_matches_generate_alone(client, pair):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    want = alone(pair, PROMPT, max_new_tokens=12)
    assert out.choices[0].text == want and want
    assert out.usage.prompt_tokens == n_tokens(pair, PROMPT)
    assert 1 <= out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason in ("stop", "length")


def test_chat_goes_through_the_chat_template(client, pair):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the station?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = pair[1].apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == alone(pair, prompt, max_new_tokens=10)
    assert out.usage.prompt_tokens == n_tokens(pair, prompt)


def test_streaming_equals_the_whole_answer(client, pair):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == alone(pair, PROMPT, max_new_tokens=12)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2  # it really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == n_tokens(pair, PROMPT)

    messages = [{"role": "user", "content": "Tell me about the weather."}]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone(pair, pair[1].apply_chat_template(messages), max_new_tokens=9)


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][len("data: "):])
    assert first["object"] == "text_completion" and first["choices"][0]["index"] == 0


def test_seeded_sampling_and_n_choices(client, pair):
    kw = dict(temperature=0.8, top_p=0.9, seed=11)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, n=2, extra_body={"top_k": 40}, **kw)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    # choice i samples with seed + i, exactly as lmlab.generate would with that seed
    for i, text in enumerate(texts):
        assert text == alone(pair, PROMPT, max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, top_k=40,
                             seed=11 + i)
    assert texts[0] != texts[1]
    again = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, n=2, extra_body={"top_k": 40}, **kw)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    assert 2 <= out.usage.completion_tokens <= 20 and out.usage.prompt_tokens == n_tokens(pair, PROMPT)


def test_lmlab_knobs_reach_the_processor_chain(client, pair):
    # repetition_penalty acts on greedy decoding; min_p only on sampling, so it is checked on a seeded draw
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"repetition_penalty": 1.3})
    assert out.choices[0].text == alone(pair, PROMPT, max_new_tokens=10, repetition_penalty=1.3)
    assert out.choices[0].text != alone(pair, PROMPT, max_new_tokens=10)
    sampled = dict(max_new_tokens=10, do_sample=True, temperature=1.5, seed=3)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.5, seed=3,
                                    extra_body={"min_p": 0.2})
    assert out.choices[0].text == alone(pair, PROMPT, min_p=0.2, **sampled)
    assert out.choices[0].text != alone(pair, PROMPT, **sampled)  # the same draws without min_p differ


def test_ignore_eos_generates_max_tokens(client, pair):
    prompt = "#Person2#: Yes."
    natural = client.completions.create(model="tiny", prompt=prompt, max_tokens=200, temperature=0)
    assert natural.choices[0].finish_reason == "stop"  # this prompt's greedy text reaches <eos>
    n = natural.usage.completion_tokens + 5
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == n and out.choices[0].finish_reason == "length"
    assert out.choices[0].text == alone(pair, prompt, max_new_tokens=n, eos_token_ids=[])


def test_stop_sequence_is_trimmed(client, pair):
    full = alone(pair, PROMPT, max_new_tokens=16)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), "pick a stop string that is not whitespace"
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    want = alone(pair, PROMPT, max_new_tokens=16, stop_strings=[stop])
    assert out.choices[0].text == want and len(want) < len(full) and stop not in want
    assert out.choices[0].finish_reason == "stop"


# --- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": "many"}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": 7}, "prompt"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"stream": "yes"}, "stream"),
])
def test_invalid_parameters_are_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server[0]}/v1/completions", json={"model": "tiny", "prompt": "hi", **body}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_and_bad_messages(server, client):
    r = httpx.post(f"{server[0]}/v1/chat/completions", content=b'{"model": "tiny", "messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    assert err.value.body["param"] == "messages[0].role"


def test_prompt_past_the_context_window_is_400(client, server):
    window = server[1].scheduler.context_window
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=window)
    assert err.value.body["param"] == "max_tokens" and err.value.body["code"] == "context_length_exceeded"
    assert f"context window of {window} tokens" in err.value.body["message"]


def test_api_key(pair):
    model, tok = pair
    with running_server(lambda: (model, tok), api_key="s3cret") as (url, _):
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens >= 1
        assert httpx.get(f"{url}/health").status_code == 200  # health and metrics stay open for probes


def test_health_is_503_while_loading(pair):
    model, tok = pair
    release = threading.Event()

    def loader():
        release.wait(30)
        return model, tok

    with running_server(loader, wait=False) as (url, _):
        r = httpx.get(f"{url}/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"]
        release.set()
        wait_ready(url, timeout=30)
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": "tiny"}


def test_full_queue_is_429_with_retry_after(pair):
    model, tok = pair
    with running_server(lambda: (model, tok), max_batch=1, max_queue=1) as (url, state):
        gate = Gate(model)  # the model loop stops inside the first request's prefill
        body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
        results = []
        first = threading.Thread(target=lambda: results.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60)))
        first.start()
        assert gate.entered.wait(10)
        second = threading.Thread(target=lambda: results.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60)))
        second.start()
        deadline = time.monotonic() + 10
        while state.scheduler.pending() != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        gate.open()
        first.join(60)
        second.join(60)
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    assert [x.status_code for x in results] == [200, 200]
    assert results[0].json()["choices"][0]["text"] == results[1].json()["choices"][0]["text"] == \
        alone(pair, PROMPT, max_new_tokens=3)


def test_request_past_the_timeout_is_ended(pair):
    model, tok = pair
    with running_server(lambda: (model, tok), timeout=0.5) as (url, state):
        hook = slow_down(model, 0.05)
        try:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "temperature": 0},
                           timeout=60)
        finally:
            hook.remove()
        assert state.scheduler.pending() == (0, 0)
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and choice["finish_reason"] == "timeout"
    assert 1 <= r.json()["usage"]["completion_tokens"] < 200


def test_disconnect_cancels_and_frees_the_slot(pair):
    model, tok = pair
    with running_server(lambda: (model, tok)) as (url, state):
        hook = slow_down(model, 0.02)
        try:
            body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                assert state.scheduler.pending() == (1, 0)
            # non-streaming: the client gives up waiting
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json=dict(body, stream=False), timeout=0.5)
            deadline = time.monotonic() + 10
            while state.scheduler.pending() != (0, 0) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            hook.remove()
        assert state.scheduler.pending() == (0, 0) and state.scheduler.cache.active == 0
        assert 'lmlab_requests_total{finish_reason="cancelled"} 2' in httpx.get(f"{url}/metrics").text


def test_metrics_are_prometheus_text(client, server):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    r = httpx.get(f"{server[0]}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name, kind in [("lmlab_requests_running", "gauge"), ("lmlab_requests_queued", "gauge"),
                       ("lmlab_generated_tokens_total", "counter"),
                       ("lmlab_time_to_first_token_seconds", "histogram"),
                       ("lmlab_inter_token_latency_seconds", "histogram")]:
        assert f"# TYPE {name} {kind}" in text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(values["lmlab_generated_tokens_total"]) >= 4
    assert float(values["lmlab_time_to_first_token_seconds_count"]) >= 1
    assert float(values['lmlab_time_to_first_token_seconds_bucket{le="+Inf"}']) == \
        float(values["lmlab_time_to_first_token_seconds_count"])


# --- summarize -------------------------------------------------------------------------------------
def test_summarize_uses_the_lab_recipe(server, pair):
    url = server[0]
    listing = httpx.get(f"{url}/v1/summarize/dialogues").json()
    assert listing["recipes"] == ["zero-shot", "one-shot", "few-shot"] and len(listing["dialogues"]) == 28
    assert listing["default_recipe"] == "few-shot"  # no fine-tuned summarizer served: the best prompting recipe
    dialogue = load_sample().records[3].dialogue
    r = httpx.post(f"{url}/v1/summarize", json={"dialogue": dialogue, "recipe": "zero-shot", "max_tokens": 12},
                   timeout=60)
    assert r.status_code == 200
    model, tok = pair
    prompt = build_prompt(dialogue, [], template="instruction", tokenizer=tok, chat=True, instruction=INSTRUCTION,
                          context_window=model.config.max_seq_len, max_new_tokens=12)
    want = generate(model, tok, prompt.text, GenerationConfig(max_new_tokens=12, stop_strings=CHAT_STOP_STRINGS))
    assert r.json()["summary"] == clean_summary(want)
    assert r.json()["usage"]["prompt_tokens"] == n_tokens(pair, prompt.text)

    body = {"dialogue": dialogue, "recipe": "one-shot", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/summarize", json=body, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line and line != "data: [DONE]"]
    final = events[-1]
    assert final["shots"] == 1 and final["usage"]["completion_tokens"] >= 1
    assert final["summary"] == clean_summary("".join(e.get("delta", "") for e in events[:-1]))

    for bad, param in [({"recipe": "fine-tuned"}, "recipe"), ({"recipe": "ten-shot"}, "recipe"),
                       ({"dialogue": " "}, "dialogue")]:
        r = httpx.post(f"{url}/v1/summarize", json={"dialogue": dialogue, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_fine_tuned_recipe_with_an_adapter(pair):
    """With an adapter the served model is the fine-tuned summarizer: the recipe appears, is the default of
    /v1/summarize and of the playground, and uses the prompt the adapter was trained with (here the lab's
    instruction prompt, what an adapter without a recipe gets)."""
    model, tok = pair
    assert isinstance(finetuned_recipe("/nonexistent-adapter-dir"), InstructionRecipe)
    with running_server(lambda: (model, tok), finetuned=InstructionRecipe()) as (url, _):
        listing = httpx.get(f"{url}/v1/summarize/dialogues").json()
        assert listing["recipes"][0] == "fine-tuned" and listing["default_recipe"] == "fine-tuned"
        dialogue = load_sample().records[5].dialogue
        r = httpx.post(f"{url}/v1/summarize", json={"dialogue": dialogue, "max_tokens": 10}, timeout=60)
    prompt = InstructionRecipe().prompt(dialogue, tok, max_prompt_tokens=model.config.max_seq_len - 10)
    want = generate(model, tok, prompt.text, GenerationConfig(max_new_tokens=10, stop_strings=CHAT_STOP_STRINGS))
    assert r.status_code == 200 and r.json()["recipe"] == "fine-tuned" and r.json()["shots"] == 0
    assert r.json()["summary"] == clean_summary(want)


# --- the model loop --------------------------------------------------------------------------------
def collect_events(scheduler, prompt_ids, config):
    q = queue.Queue()
    req = scheduler.submit(prompt_ids, config, q.put)
    return req, q


def wait_done(q, timeout=60):
    while True:
        event = q.get(timeout=timeout)
        if event.kind != "text":
            return event


def test_a_bad_request_does_not_stop_the_loop(pair):
    model, tok = pair
    cfg = resolve_config(model, GenerationConfig(max_new_tokens=6), tok)
    scheduler = Scheduler(model, tok, max_batch=4)
    try:
        ids = tok.encode(PROMPT, add_special_tokens=True)
        good, q_good = collect_events(scheduler, ids, cfg)
        bad, q_bad = collect_events(scheduler, [5, model.config.vocab_size + 7], cfg)  # an id outside the vocabulary
        event = wait_done(q_bad)
        assert event.kind == "error" and "outside the vocabulary" in event.error
        assert wait_done(q_good).kind == "done"
        assert tok.decode(good.tokens) == alone(pair, PROMPT, max_new_tokens=6)
        after, q_after = collect_events(scheduler, ids, cfg)
        assert wait_done(q_after).kind == "done" and after.tokens == good.tokens and scheduler.alive
    finally:
        scheduler.close()


def test_short_requests_do_not_wait_for_long_ones(pair):
    """Requests join and leave at token granularity: a short one that arrives while a long one runs
    finishes first, and both give the tokens they give alone."""
    model, tok = pair
    long_cfg = resolve_config(model, GenerationConfig(max_new_tokens=60, eos_token_ids=[]), tok)
    short_cfg = resolve_config(model, GenerationConfig(max_new_tokens=3, eos_token_ids=[]), tok)
    scheduler = Scheduler(model, tok, max_batch=4)
    hook = slow_down(model, 0.005)
    try:
        ids = tok.encode(PROMPT, add_special_tokens=True)
        long_req, q_long = collect_events(scheduler, ids, long_cfg)
        while len(long_req.tokens) < 5:
            time.sleep(0.005)
        short_req, q_short = collect_events(scheduler, ids[:5], short_cfg)
        wait_done(q_short)
        assert len(short_req.tokens) == 3 and len(long_req.tokens) < 60  # the long one is still running
        wait_done(q_long)
    finally:
        hook.remove()
        scheduler.close()
    assert tok.decode(long_req.tokens) == alone(pair, PROMPT, max_new_tokens=60, eos_token_ids=[])
    assert tok.decode(short_req.tokens) == alone(pair, tok.decode(ids[:5]), max_new_tokens=3, eos_token_ids=[])


# --- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model and tokenizer saved as an lmlab checkpoint, and a LoRA adapter (q and v) for it."""
    root = tmp_path_factory.mktemp("served")
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    save_model(model, root / "m", tok)
    config = LoraConfig(r=2, alpha=4, dropout=0.0, targets=("q", "v"))
    apply_lora(model, config)
    for _, layer in lora_modules(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # a non-zero B: the adapter changes the outputs
    save_adapter(model, root / "adapter", config)
    return root / "m", root / "adapter"


def import_seconds() -> float:
    """What a cold interpreter takes here and now to import what `lmlab serve` imports (torch among them): a
    loaded shared machine can stretch it to seconds, and a fail-fast bound is on the work after it."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import lmlab.commands.serve, lmlab.serve.app, lmlab.checkpoints, lmlab.quant"],
                   check=True)
    return time.monotonic() - start


@pytest.mark.parametrize("case", ["missing model", "bad quantize", "quantize the load refuses", "missing adapter",
                                  "encoder model", "port in use"])
def test_serve_fails_fast_with_one_line(case, model_dir, tmp_path):
    """Each of these ends `lmlab serve` with exit status 2 and one line naming the offending value, within
    5 s of its imports, without ever answering HTTP (before: 60 s and more of 500s, or uvicorn's log)."""
    model, _ = model_dir
    port = free_port()
    args, named = {
        "missing model": (["missing-model"], "'missing-model'"),
        "bad quantize": ([str(model), "--quantize", "int3"], "quantize='int3'"),
        "quantize the load refuses": ([str(model), "--quantize", "native"], "quantize='native'"),
        "missing adapter": ([str(model), "--adapter", str(tmp_path / "no-adapter")], "--adapter"),
        "encoder model": ([str(tmp_path / "bert")], "arch='encoder'"),
        "port in use": (["missing-model"], f"--port {port}"),  # the port is checked before the model
    }[case]
    if case == "encoder model":
        save_model(Transformer(ModelConfig.from_name("tiny-encoder")), tmp_path / "bert")
    holder = socket.socket()
    if case == "port in use":
        holder.bind(("127.0.0.1", port))
        holder.listen()
    try:
        baseline = import_seconds()
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "lmlab", "serve", *args, "--port", str(port)], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, LMLAB_NUM_THREADS="1"))
        elapsed = time.monotonic() - start
    finally:
        holder.close()
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    if case == "port in use":
        assert "already in use" in lines[0]
    assert elapsed < baseline + 5.0, f"{elapsed:.1f} s to fail (imports alone: {baseline:.1f} s)"


def test_flags_reach_load_model(model_dir):
    """--adapter and --quantize reach the loaded model: LoRA layers on q and v only, every frozen base linear
    quantized to int8, and outputs of neither the float base nor the float adapted model."""
    path, adapter = model_dir
    model, tok = load_for_serving(str(path), adapter, "int8")
    lora = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert lora == {"q", "v"}
    n_layers = model.config.n_layers
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * n_layers
    assert isinstance(model.lm_head, Int8Linear)  # the head, and in each layer q k v o gate up down
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 7 * n_layers + 1
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=True)])
    with torch.no_grad():
        got = model(ids)[0, -1]
        base = lmlab.load_model(path)(ids)[0, -1]
        adapted = lmlab.load_model(path, adapter=adapter)(ids)[0, -1]
    assert not torch.allclose(got, base, atol=1e-3) and not torch.allclose(got, adapted, atol=1e-6)
    assert torch.allclose(got, adapted, atol=0.1 * adapted.abs().max().item())  # int8 stays close to the float


def captured_serve(monkeypatch) -> dict:
    """Replace lmlab.serve.serve (what the command calls once the model is loaded) with a recorder."""
    seen = {}

    def record(loader, settings, **kw):
        seen.update(loader=loader, settings=settings, **kw)

    monkeypatch.setattr(lmlab.serve, "serve", record)
    return seen


@pytest.mark.slow
def test_serve_defaults_to_the_shipped_summarizer(monkeypatch, smollm2_path):
    """Like `lmlab summarize`, `lmlab serve smollm2-135m-instruct` serves the shipped LoRA summarizer and its
    recipe is /v1/summarize's and the playground's default; --no-adapter serves the base model."""
    shipped = shipped_adapter("smollm2-135m-instruct")
    assert shipped is not None
    seen = captured_serve(monkeypatch)
    assert main(["serve", "smollm2-135m-instruct", "--port", str(free_port())]) == 0
    settings, (model, _) = seen["settings"], seen["loader"]()
    assert settings.finetuned == Recipe.load(shipped) and settings.default_recipe == "fine-tuned"
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    assert seen["sock"].fileno() == -1  # the command closed the socket it bound once serve returned
    assert main(["serve", "smollm2-135m-instruct", "--no-adapter", "--port", str(free_port())]) == 0
    settings, (model, _) = seen["settings"], seen["loader"]()
    assert settings.finetuned is None and settings.default_recipe == "few-shot"
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_cli_serve_drains_on_sigterm(tmp_path):
    """`lmlab serve DIR` in its own process: SIGTERM while a stream runs lets it finish, then exits 0."""
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, d_model=256, n_heads=8, n_kv_heads=4, d_ff=512, n_layers=4)
    save_model(model, tmp_path / "m", tok)
    port = free_port()
    env = dict(os.environ, LMLAB_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", str(tmp_path / "m"), "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=600)  # a cold interpreter on a busy machine can take minutes
        body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True}
        text, reasons = "", []
        with httpx.stream("POST", f"{url}/v1/completions", json=dict(body), timeout=120) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # no new connections while draining
                httpx.get(f"{url}/health", timeout=2)
            for line in [first, *lines]:
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for c in chunk["choices"]:
                        text += c["text"]
                        if c["finish_reason"]:
                            reasons.append(c["finish_reason"])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
        assert reasons in (["length"], ["stop"]) and usage["completion_tokens"] >= 1
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    want = generate(lmlab.load_model(tmp_path / "m"), tok, PROMPT, GenerationConfig(max_new_tokens=300))
    assert text == want


@pytest.mark.slow
def test_smollm2_chat(smollm2_path):
    model, tok = lmlab.load_model("smollm2-135m-instruct"), lmlab.load_tokenizer("smollm2-135m-instruct")
    with running_server(lambda: (model, tok)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
        assert "Paris" in out.choices[0].message.content
        assert out.choices[0].message.content == generate(model, tok, tok.apply_chat_template(messages),
                                                          max_new_tokens=16)
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == out.choices[0].message.content
