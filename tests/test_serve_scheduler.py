"""The model loop's prefill policy: batched prefill, the per-iteration prefill budget, chunked prefill of
long prompts, and prompt admission of newcomers; each checked against the same request generated alone.

The order of events comes from a log the loop itself writes (a subclass records every accepted token and
every forward of the decoder stack), never from timing.
"""

from __future__ import annotations

import queue

import openai
import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError, DataError
from lmlab.generation import GenerationConfig, generate, generate_tokens
from lmlab.generation.decode import resolve_config
from lmlab.model import Transformer
from lmlab.nn.slot_cache import DecodeView, SlotCache
from lmlab.serve.runner import EagerDecodeStep
from lmlab.serve.scheduler import Scheduler
from serving import Gate, running_server, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model(400, max_seq_len=512)


class Recording(Scheduler):
    """A scheduler that logs, in the loop thread, each accepted token as ("token", request id, index) and
    each forward of the decoder stack as ("prefill", tokens incl. padding) or ("decode", rows)."""

    def __init__(self, model, **kw):
        self.log: list[tuple] = []
        self.after_token = None  # called with the request after each of its tokens (in the loop thread)
        self._hook = model.decoder.register_forward_pre_hook(self._forward, with_kwargs=True)
        super().__init__(model, _NoText(), **kw)

    def _forward(self, module, args, kwargs):
        B, T = args[0].shape[:2]  # the embedded input (B, T, C)
        decode = isinstance(kwargs.get("cache"), DecodeView)  # the view a decode step hands the stack
        self.log.append(("decode", B) if decode else ("prefill", B * T))

    def _accept(self, seq, out, token):
        self.log.append(("token", seq.id, len(seq.tokens)))
        finished = super()._accept(seq, out, token)
        if self.after_token is not None:
            self.after_token(seq)
        return finished

    def close(self, *a, **kw):
        super().close(*a, **kw)
        self._hook.remove()

    def tokens_of(self, req_id: int) -> list[int]:
        """Positions in the log of request `req_id`'s tokens."""
        return [i for i, e in enumerate(self.log) if e[0] == "token" and e[1] == req_id]


class _NoText:
    """A tokenizer stand-in: the loop only needs ``decode`` for streamed text, which these tests ignore."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def config(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, eos_token_ids=[], pad_token_id=0)


def alone(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of `prompt` generated on its own (the reference for every served answer)."""
    return generate_tokens(model, torch.tensor([prompt]), None, config(n))[0]


def start(model, **kw) -> Recording:
    return Recording(model, **kw)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(2, 400, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def wait_all(events: list[queue.Queue]) -> None:
    for q in events:
        while (event := q.get(timeout=60)).kind == "text":
            pass
        assert event.kind == "done", event.error


def submit(scheduler, ids, n):
    q = queue.Queue()
    return scheduler.submit(ids, config(n), q.put), q


def test_prompts_admitted_together_are_prefilled_in_one_batch_with_their_alone_tokens(model):
    """Three prompts of different lengths that wait together go through one right-padded forward, and
    each gives the tokens it gives alone."""
    scheduler = start(model, max_batch=4)
    gate = Gate(model)  # the loop stops inside the first request's (lone) prefill
    try:
        first, q0 = submit(scheduler, prompt(6, 0), 5)
        assert gate.entered.wait(30)
        waiting = [submit(scheduler, prompt(n, n), 5) for n in (9, 4, 7)]
        gate.open()
        wait_all([q0] + [q for _, q in waiting])
    finally:
        scheduler.close()
    prefills = [e for e in scheduler.log if e[0] == "prefill"]
    assert prefills == [("prefill", 6), ("prefill", 3 * 9)]  # the lone one, then one padded batch of three
    assert first.tokens == alone(model, prompt(6, 0), 5)
    for (req, _), n in zip(waiting, (9, 4, 7)):
        assert req.tokens == alone(model, prompt(n, n), 5)


def test_a_newcomer_is_prefilled_before_the_next_decode_step(model):
    """A request that arrives while another decodes gets its first token before the running one's next."""
    scheduler = start(model, max_batch=4)
    newcomer: list = []

    def arrive(req):  # the loop thread, right after the running request's 3rd token
        if len(req.tokens) == 3 and not newcomer:
            newcomer.append(submit(scheduler, prompt(5, 1), 4))

    scheduler.after_token = arrive
    try:
        running, q = submit(scheduler, prompt(6, 0), 12)
        wait_all([q])
    finally:
        scheduler.close()
    new = newcomer[0][0]
    r, n = scheduler.tokens_of(running.id), scheduler.tokens_of(new.id)
    assert r[2] < n[0] < r[3]  # submitted at the running request's 3rd token, first token before its 4th
    assert new.tokens == alone(model, prompt(5, 1), 4) and running.tokens == alone(model, prompt(6, 0), 12)


def test_the_prefill_budget_spreads_newcomers_over_decode_steps(model):
    """With prefill_tokens=10, newcomers of 6 tokens are prefilled one per iteration, with a decode step of
    the running requests in between, so running rows never wait for more than 10 prompt tokens."""
    scheduler = start(model, max_batch=8, prefill_tokens=10)
    gate = Gate(model)
    try:
        first, q0 = submit(scheduler, prompt(6, 0), 8)
        assert gate.entered.wait(30)
        waiting = [submit(scheduler, prompt(6, s), 3) for s in (1, 2, 3)]
        gate.open()
        wait_all([q0] + [q for _, q in waiting])
    finally:
        scheduler.close()
    forwards = [e for e in scheduler.log if e[0] != "token"]
    assert forwards[:7] == [("prefill", 6), ("decode", 1), ("prefill", 6), ("decode", 2),
                            ("prefill", 6), ("decode", 3), ("prefill", 6)]
    assert first.tokens == alone(model, prompt(6, 0), 8)
    for (req, _), s in zip(waiting, (1, 2, 3)):
        assert req.tokens == alone(model, prompt(6, s), 3)


@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(positional):
    """A 30-token prompt with prefill_tokens=8 goes in 4 chunks (8, 8, 8, 6), the running request gets a
    token after each of the first three, and both give their alone tokens."""
    model = tiny_model(400, max_seq_len=512, positional=positional)
    scheduler = start(model, max_batch=4, prefill_tokens=8)
    long_prompt = prompt(30, 7)
    late: list = []

    def arrive(req):  # the loop thread, right after the running request's 2nd token
        if len(req.tokens) == 2 and not late:
            late.append(submit(scheduler, long_prompt, 5))

    scheduler.after_token = arrive
    try:
        running, q = submit(scheduler, prompt(6, 0), 14)
        wait_all([q])
    finally:
        scheduler.close()
    long_req = late[0][0]
    r, n = scheduler.tokens_of(running.id), scheduler.tokens_of(long_req.id)
    assert sum(r[1] < i < n[0] for i in r) == 3  # tokens of the running request while the prompt was prefilled
    chunks = [e for e in scheduler.log[r[1]:n[0]] if e[0] == "prefill"]
    assert chunks == [("prefill", 8), ("prefill", 8), ("prefill", 8), ("prefill", 6)]
    assert long_req.tokens == alone(model, long_prompt, 5)
    assert running.tokens == alone(model, prompt(6, 0), 14)
    assert scheduler.cache.active == 0 and scheduler.pending() == (0, 0)


def test_a_cancelled_chunked_prompt_frees_its_place(model):
    """Cancelling a request while its prompt is prefilled in chunks ends it; the loop goes on."""
    scheduler = start(model, max_batch=1, prefill_tokens=4)
    gate = Gate(model)
    try:
        long_req, q = submit(scheduler, prompt(40, 3), 5)
        assert gate.entered.wait(30)  # inside its first chunk
        scheduler.cancel(long_req)
        gate.open()
        event = q.get(timeout=60)
        assert event.kind == "done" and event.finish_reason == "cancelled"
        after, q2 = submit(scheduler, prompt(5, 4), 3)  # max_batch=1: only runs once the slot is free
        wait_all([q2])
    finally:
        scheduler.close()
    assert after.tokens == alone(model, prompt(5, 4), 3) and scheduler.pending() == (0, 0)


def sampled(n: int, seed: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, eos_token_ids=[], pad_token_id=0, do_sample=True, temperature=1.0,
                            seed=seed)


def sampled_alone(model, prompt_ids: list[int], n: int, seed: int) -> list[int]:
    return generate_tokens(model, torch.tensor([prompt_ids]), None, sampled(n, seed))[0]


def test_choices_of_one_prompt_share_its_prefill(model):
    """Four seeded samples of one prompt and one other prompt, waiting together: one padded forward of the
    two distinct prompts (not five), three rows copied, and every sequence's tokens are its alone tokens."""
    scheduler = start(model, max_batch=8)
    gate = Gate(model)
    try:
        first, q0 = submit(scheduler, prompt(6, 0), 4)
        assert gate.entered.wait(30)
        same = prompt(9, 1)
        queues, choices = [], []
        for seed in range(4):
            q = queue.Queue()
            choices.append(scheduler.submit(same, sampled(6, seed), q.put))
            queues.append(q)
        other, q_other = submit(scheduler, prompt(5, 2), 4)
        gate.open()
        wait_all([q0, q_other] + queues)
    finally:
        scheduler.close()
    assert [e for e in scheduler.log if e[0] == "prefill"] == [("prefill", 6), ("prefill", 2 * 9)]
    assert scheduler.metrics.shared_prefills == 3 and scheduler.metrics.prompt_tokens == 6 + 4 * 9 + 5
    for seed, seq in enumerate(choices):
        assert seq.tokens == sampled_alone(model, same, 6, seed)
    assert len({tuple(c.tokens) for c in choices}) > 1  # they are different samples
    assert other.tokens == alone(model, prompt(5, 2), 4) and first.tokens == alone(model, prompt(6, 0), 4)


def test_choices_of_a_long_prompt_share_its_chunked_prefill(model):
    """A 30-token prompt asked for three times with prefill_tokens=8: one chunked prefill (8, 8, 8, 6) whose
    cache goes to three rows; a choice cancelled meanwhile (the one carrying the prefill) leaves the others."""
    scheduler = start(model, max_batch=4, prefill_tokens=8)
    gate = Gate(model)
    long_prompt = prompt(30, 5)
    queues, choices, carried = [], [], []

    def cancel_the_carrier(req):  # the loop thread: the short request's last token, after the first chunk
        if choices and req is not choices[0] and not carried and scheduler._chunked is not None:
            carried.append(scheduler._chunked.seq)
            scheduler.cancel(choices[0])

    scheduler.after_token = cancel_the_carrier
    try:
        first, q0 = submit(scheduler, prompt(6, 0), 3)
        assert gate.entered.wait(30)
        for seed in range(3):
            q = queue.Queue()
            choices.append(scheduler.submit(long_prompt, sampled(5, seed), q.put))
            queues.append(q)
        gate.open()
        wait_all([q0] + queues[1:])
        event = queues[0].get(timeout=60)
        while event.kind == "text":
            event = queues[0].get(timeout=60)
        assert event.finish_reason == "cancelled"
    finally:
        scheduler.close()
    assert [e for e in scheduler.log if e[0] == "prefill"] == [("prefill", 6), ("prefill", 8), ("prefill", 8),
                                                               ("prefill", 8), ("prefill", 6)]
    for seed, seq in list(enumerate(choices))[1:]:
        assert seq.tokens == sampled_alone(model, long_prompt, 5, seed)
    assert carried == [choices[0]] and scheduler.metrics.shared_prefills == 1
    assert scheduler.cache.active == 0 and scheduler.pending() == (0, 0)


def test_slot_cache_copy_row():
    cache = SlotCache(n_layers=1, slots=3, n_kv_heads=1, head_dim=2, max_capacity=8)
    a, b = cache.add(), cache.add()
    cache.layers[0].k[a, :, :3] = torch.arange(6.0).view(1, 3, 2)
    cache.lengths[a] = 3
    cache.copy_row(a, b)
    assert cache.lengths[b] == 3 and torch.equal(cache.layers[0].k[b, :, :3], cache.layers[0].k[a, :, :3])
    with pytest.raises(DataError, match="row 2 is not active"):
        cache.copy_row(a, 2)


def test_prefill_tokens_must_be_positive(model):
    with pytest.raises(ConfigError, match="prefill_tokens=0"):
        Scheduler(model, None, prefill_tokens=0)


def test_load_row_moves_a_chunked_prefill_into_a_slot():
    """A sequence prefilled in chunks into a one-row Cache, then loaded into a slot, decodes like the whole
    sequence recomputed."""
    cfg = ModelConfig.from_name("tiny-decoder", max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    seq = torch.randint(0, cfg.vocab_size, (13,)).tolist()
    slots = SlotCache.for_model(model, slots=2, max_capacity=64)
    with torch.inference_mode():
        private = model.new_cache(1, len(seq))
        for start in range(0, len(seq), 5):  # chunks of 5, 5, 3
            model(torch.tensor([seq[start:start + 5]]), cache=private, logits_to_keep=1)
        slots.add(), slots.add()
        view, _ = slots.prefill(0, 3)  # row 0 holds something else
        model(torch.tensor([[1, 2, 3]]), cache=view, logits_to_keep=1)
        slots.load_row(1, private)
        assert slots.lengths == [3, 13]
        new = torch.tensor([5, 6])
        view, position_ids, mask = slots.decode()
        got = model(new[:, None], attention_mask=mask, position_ids=position_ids, cache=view,
                    mask_has_padding=mask is not None)[1, -1]  # (V,)
        want = model(torch.tensor([seq + [6]]))[0, -1]
    # fp32, a few hundred O(1) products per logit summed in another order: ~1e-6 of the scale; 1e-4 headroom
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
    with pytest.raises(DataError, match="row 2 is not active"):
        slots.load_row(2, private)


def test_serve_settings_prefill_tokens_reach_the_loop_over_http():
    """`lmlab serve --prefill-tokens N` (ServeSettings.prefill_tokens): a prompt longer than N is served in
    chunks and answers what it answers alone."""
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    text = "#Person1#: Hello, how are you today? I wanted to ask about the meeting.\n#Person2#:"
    n_prompt = len(tok.encode(text, add_special_tokens=True))
    assert n_prompt > 16
    with running_server(lambda: (model, tok), prefill_tokens=8) as (url, state):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        got = client.completions.create(model="tiny", prompt=text, max_tokens=6, temperature=0)
        assert state.scheduler.prefill_tokens == 8 and state.scheduler.prefills == -(-n_prompt // 8)
    assert got.choices[0].text == generate(model, tok, text, GenerationConfig(max_new_tokens=6))


def test_the_runner_decode_step_can_be_replaced(model):
    """An engine takes the runner's place for decode steps through ``decode_step``: every decode step, and
    nothing else, goes through it (here a stand-in that records each call's rows and positions, then runs
    the eager step), and the tokens stay those generated alone."""
    calls: list[tuple[int, list[int]]] = []

    class Recorded:
        def __init__(self):
            self.eager = EagerDecodeStep(model)

        def __call__(self, tokens, cache):
            calls.append((len(tokens), list(cache.lengths)))  # (A, each row's position before the step)
            return self.eager(tokens, cache)

    scheduler = Scheduler(model, _NoText(), max_batch=4, decode_step=Recorded())
    gate = Gate(model)
    try:
        first, q0 = submit(scheduler, prompt(6, 0), 5)
        assert gate.entered.wait(30)
        second, q1 = submit(scheduler, prompt(9, 1), 3)
        gate.open()
        wait_all([q0, q1])
    finally:
        scheduler.close()
    # the second is prefilled after the first's first step; then rows decode together at their own positions
    assert calls == [(1, [6]), (2, [7, 9]), (2, [8, 10]), (1, [9])] and scheduler.steps == 4
    assert first.tokens == alone(model, prompt(6, 0), 5) and second.tokens == alone(model, prompt(9, 1), 3)
