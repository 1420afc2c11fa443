"""Continuous batching: one thread owns the model; requests join and leave the batch at token granularity.

The loop, one iteration at a time:

1. *housekeeping*: requests that were cancelled (their client left) or ran past their deadline end,
   and their KV-cache slots are freed.
2. *admission*: waiting requests take free slots (at most ``max_batch`` run at once) and are prefilled
   into their own slots (``SlotCache.bind_prefill``), which also yields each one's first token. Requests
   admitted together are prefilled as one right-padded batch (up to ``prefill_tokens`` padded tokens):
   on a CPU a short prefill is bound by reading the weights, so eight prompts cost little more than one,
   and the eighth does not wait for seven prefills before its first token. A new request waits at most
   one decode step before its prefill, never for a long request to end.
3. *one decode step* for every running request together: each row sits at its own position (RoPE or
   absolute positions per row) and attends only to its own keys (``SlotCache.bind_decode``).
4. each row's token is chosen with that request's own logits-processor chain
   (``lmlab.generation.build_processors``) and, when sampling, its own seeded ``torch.Generator``;
   text is decoded incrementally, stop strings are held back and trimmed as ``lmlab.generation.stream``
   does. Finished rows leave the batch (``SlotCache.remove``).

Greedy output is the same as ``lmlab.generate`` of the request alone, and sampled output with a
``seed`` is too: the same prefill, the same processor chain and the same generator draws, in the same
order. (Float rounding of a batched matrix product can differ from a lone one in the last bit, which
changes a token only on an exact near-tie of two logits.)

The loop never dies because of one request: an error while prefilling or choosing a token ends that
request with an error event; an error in a batched decode step ends the requests of that step.

Results go back through each request's ``emit(event)`` callback (called from the loop thread; the HTTP
layer hops it onto its event loop).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmlab.errors import ConfigError, DataError, LmlabError
from lmlab.generation.config import GenerationConfig
from lmlab.generation.stopping import held_back_length, trim_stop_strings
from lmlab.generation.processors import build_processors
from lmlab.nn.packed import maybe_packed_linears
from lmlab.nn.slot_cache import SlotCache
from lmlab.serve.metrics import Metrics


class QueueFull(LmlabError):
    """The waiting queue holds ``max_queue`` requests already (HTTP 429)."""


class Closing(LmlabError):
    """The scheduler is draining for shutdown and takes no new requests (HTTP 503)."""


@dataclass
class Event:
    """What a request reports: ``text`` deltas, then one ``done`` (with a finish reason) or ``error``."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # done: "stop" | "length" | "timeout" | "cancelled"
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One sequence to generate. Created by ``Scheduler.submit``; read-only for callers."""

    prompt_ids: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    deadline: float | None
    id: int = 0
    tokens: list[int] = field(default_factory=list)  # generated ids (eos included when it ended on one)
    text: str = ""  # generated text so far (stop strings trimmed once found)
    finish_reason: str | None = None
    arrived: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled: bool = False  # set by cancel() from any thread; acted on by the loop

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class _Decoding:
    """Per-request state the loop keeps while a request runs (not visible to callers)."""

    def __init__(self, req: Request, tokenizer, device):
        from lmlab.tokenizer import IncrementalDecoder

        cfg = req.config
        T = len(req.prompt_ids)
        self.seq = torch.empty(1, T + cfg.max_new_tokens, dtype=torch.long, device=device)  # prompt + new tokens
        self.seq[0, :T] = torch.tensor(req.prompt_ids, dtype=torch.long)
        self.length = T
        self.chain = build_processors(cfg, prompt_len=T, eos_token_ids=cfg.eos_token_ids or ())
        self.generator = None
        if cfg.sampling:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(2**62, ()).item()))
        self.eos = set(cfg.eos_token_ids or ())
        self.decoder = IncrementalDecoder(tokenizer)
        self.full_text = ""  # decoded text, stop strings not yet trimmed
        self.sent = 0  # characters of full_text already emitted

    @property
    def plain_greedy(self) -> bool:
        """No processors and no sampling: the token is the argmax, taken for the whole batch at once."""
        return self.generator is None and not len(self.chain)


class Scheduler:
    """Continuous batching over a decoder-only model (see the module docstring).

    ``max_batch``: requests decoded together (KV-cache slots); ``max_queue``: requests waiting for a
    slot before ``submit`` raises ``QueueFull``; ``timeout``: default seconds a request may run, from
    arrival, before it ends with finish reason "timeout".
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, timeout: float | None = 600.0,
                 metrics: Metrics | None = None, max_context: int | None = None, prefill_tokens: int = 4096):
        if model.config.arch != "decoder":
            raise ConfigError(f"lmlab serve runs decoder-only models; this model has arch={model.config.arch!r}")
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout={timeout!r} must be > 0 seconds")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.prefill_tokens = prefill_tokens
        self.context_window = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        self.metrics = metrics or Metrics()
        self.cache = SlotCache.for_model(model, max_batch, self.context_window)
        self.running: list[Request] = []  # running[i] owns cache row i
        self._state: dict[int, _Decoding] = {}  # request id -> its decoding state
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._closing = False
        self.steps = 0  # decode steps run (tests and benchmarks read it)
        self.peak_running = 0  # the most requests ever decoded together
        self.error: str | None = None  # why the loop stopped, if it ever failed
        self._thread = threading.Thread(target=self._run, name="lmlab-model-loop", daemon=True)
        self._thread.start()

    # --- the caller's side (any thread) ----------------------------------------------------------
    def submit(self, prompt_ids: list[int], config: GenerationConfig, emit: Callable[[Event], None],
               timeout: float | None = None) -> Request:
        """Queue a request -> its handle. `config` must be resolved (eos/pad ids filled in).

        Raises ``DataError`` for an empty prompt or one that cannot fit the context window,
        ``QueueFull`` when ``max_queue`` requests are waiting, ``Closing`` while draining.
        """
        if not prompt_ids:
            raise DataError("the prompt is empty: it needs at least one token")
        need = len(prompt_ids) + config.max_new_tokens
        if need > self.context_window:
            raise DataError(f"prompt of {len(prompt_ids)} tokens + max_tokens={config.max_new_tokens} = {need} "
                            f"exceeds the context window of {self.context_window} tokens")
        timeout = self.timeout if timeout is None else timeout
        now = time.monotonic()
        req = Request(list(prompt_ids), config, emit, now + timeout if timeout else None, arrived=now)
        with self._cv:
            if self._closing:
                raise Closing("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            req.id = next(self._ids)
            self._waiting.append(req)
            with self.metrics.lock:
                self.metrics.queued = len(self._waiting)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """End `req` soon (its client went away): the loop frees its slot before the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, let waiting and running ones finish; then stop the loop."""
        with self._cv:
            self._closing = True
            if not drain:
                for req in list(self._waiting) + self.running:
                    req.cancelled = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def pending(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._cv:
            return len(self.running), len(self._waiting)

    # --- the loop (model thread) -----------------------------------------------------------------
    def _run(self) -> None:
        # batched CPU fp32 steps: weights pre-packed for max_batch rows (lmlab.nn.packed; LMLAB_PACKED_GEMM=0 off)
        try:
            with torch.inference_mode(), maybe_packed_linears(self.model, self.max_batch):
                while self._iteration():
                    pass
        except BaseException as exc:  # a bug in the loop itself: fail every request rather than hang them
            self.error = f"{type(exc).__name__}: {exc}"
            with self._cv:
                self._closing = True
                stranded = list(self._waiting) + self.running
                self._waiting.clear()
            for req in stranded:
                self._end(req, "error", f"the model loop stopped: {self.error}")
            raise

    def _iteration(self) -> bool:
        """Housekeeping, admission + prefill, one decode step -> False once closed and drained.
        (A method of its own so that nothing of a finished request outlives the iteration in a local.)"""
        with self._cv:
            while not (self._waiting or self.running or self._closing):
                self._cv.wait()
            if self._closing and not self._waiting and not self.running:
                return False
            self._expire_waiting()
            admitted = []
            while self._waiting and len(self.running) + len(admitted) < self.max_batch:
                admitted.append(self._waiting.popleft())
            with self.metrics.lock:
                self.metrics.queued = len(self._waiting)
        self._expire_running()
        for group in self._prefill_groups(admitted):
            self._prefill(group)
        self.peak_running = max(self.peak_running, len(self.running))
        if self.running:
            self._decode_step()
        with self.metrics.lock:
            self.metrics.running = len(self.running)
        return True

    def _prefill_groups(self, admitted: list[Request]) -> list[list[Request]]:
        """Admitted requests in arrival order, cut into prefill batches of at most ``prefill_tokens`` padded
        tokens (a batch's cost is its size times its longest prompt)."""
        groups: list[list[Request]] = []
        longest = 0
        for req in admitted:
            n = len(req.prompt_ids)
            if groups and max(longest, n) * (len(groups[-1]) + 1) <= self.prefill_tokens:
                groups[-1].append(req)
                longest = max(longest, n)
            else:
                groups.append([req])
                longest = n
        return groups

    def _expire_waiting(self) -> None:
        """Drop cancelled or timed-out requests that never got a slot (called holding the lock)."""
        now = time.monotonic()
        for req in [r for r in self._waiting if r.cancelled or (r.deadline and now > r.deadline)]:
            self._waiting.remove(req)
            self._end(req, "cancelled" if req.cancelled else "timeout")

    def _expire_running(self) -> None:
        now = time.monotonic()
        for row in range(len(self.running) - 1, -1, -1):  # descending: see _release
            req = self.running[row]
            if req.cancelled or (req.deadline and now > req.deadline):
                self._release(row)
                self._end(req, "cancelled" if req.cancelled else "timeout")

    def _prefill(self, reqs: list[Request]) -> None:
        """Claim a slot for each request and run their prompts through the model together (one right-padded
        batch; a lone prompt goes unpadded) -> each one's first token. If the batch fails, each prompt is
        retried alone, so a bad one fails only itself."""
        ready = []
        for req in reqs:
            try:
                ready.append((req, _Decoding(req, self.tokenizer, self.model.device)))
            except Exception as exc:
                self._end(req, "error", f"{type(exc).__name__}: {exc}")
        if not ready:
            return
        first = self.cache.active
        for req, state in ready:
            self.cache.add()
            self.running.append(req)
            self._state[req.id] = state
        lengths = [state.length for _, state in ready]
        try:
            logits = self._prefill_logits(first, [state.seq[0, :state.length] for _, state in ready], lengths)
        except Exception as exc:
            for row in range(first + len(ready) - 1, first - 1, -1):
                self._release(row)
            if len(ready) > 1:
                for req, _ in ready:
                    self._prefill([req])
            else:
                self._end(ready[0][0], "error", f"{type(exc).__name__}: {exc}")
            return
        with self.metrics.lock:
            self.metrics.prompt_tokens += sum(lengths)
        finished = []
        for i, (req, state) in enumerate(ready):
            try:
                if self._accept(req, state, self._choose(state, logits[i])):
                    finished.append(first + i)
            except Exception as exc:
                finished.append(first + i)
                self._end(req, "error", f"{type(exc).__name__}: {exc}")
        for row in reversed(finished):
            self._release(row)

    def _prefill_logits(self, first: int, prompts: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
        """Prompts (each (T_i,)) into cache rows first, first+1, ... -> next-token logits (B, V)."""
        if len(prompts) == 1:  # exactly a lone prefill
            self.cache.bind_prefill(first, lengths[0])
            return self.model(prompts[0][None], cache=self.cache, logits_to_keep=1)[:, -1]  # (1, V)
        mask = self.cache.bind_prefill(first, lengths)  # (B, T) or None
        T = max(lengths)
        ids = torch.zeros(len(prompts), T, dtype=torch.long, device=self.model.device)  # (B, T) right-padded
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        hidden = self.model.decode(ids, attention_mask=mask, cache=self.cache, return_hidden=True,
                                   mask_has_padding=mask is not None)  # (B, T, C)
        rows = torch.arange(len(prompts), device=ids.device)
        last = hidden[rows, torch.tensor(lengths, device=ids.device) - 1]  # (B, C) each prompt's last token
        return self.model.logits(last[:, None])[:, 0]  # (B, V)

    def _decode_step(self) -> None:
        """One token for every running request, in one forward pass over the active cache rows."""
        states = [self._state[r.id] for r in self.running]
        try:
            last = torch.tensor([s.seq[0, s.length - 1].item() for s in states], dtype=torch.long)  # (A,)
            position_ids, mask = self.cache.bind_decode()
            logits = self.model(last[:, None].to(self.model.device), attention_mask=mask, position_ids=position_ids,
                                cache=self.cache, mask_has_padding=mask is not None)[:, -1]  # (A, V)
            self.cache.advance()
            self.steps += 1
        except Exception as exc:  # the whole step failed: its requests end, the loop goes on
            for row in range(len(self.running) - 1, -1, -1):
                req = self.running[row]
                self._release(row)
                self._end(req, "error", f"{type(exc).__name__}: {exc}")
            return
        greedy = logits.argmax(-1).tolist() if any(s.plain_greedy for s in states) else None  # (A,) one call
        finished = []
        for row, (req, state) in enumerate(zip(self.running, states)):
            try:
                token = greedy[row] if state.plain_greedy else self._choose(state, logits[row])
                if self._accept(req, state, token):
                    finished.append(row)
            except Exception as exc:
                finished.append(row)
                self._end(req, "error", f"{type(exc).__name__}: {exc}")
        for row in reversed(finished):  # descending, so each swap moves a row that stays
            self._release(row)

    @staticmethod
    def _choose(state: _Decoding, logits: torch.Tensor) -> int:
        """The request's next token from its logits (V,): its processor chain, then argmax or a seeded draw."""
        scores = logits[None]  # (1, V)
        if len(state.chain):
            scores = state.chain(state.seq[:, :state.length], scores.float())
        if state.generator is not None:
            return int(torch.multinomial(scores.softmax(-1), 1, generator=state.generator))
        return int(scores.argmax(-1))

    def _accept(self, req: Request, state: _Decoding, token: int) -> bool:
        """Record `token`, emit new text -> whether the request has finished (and was ended)."""
        now = time.monotonic()
        with self.metrics.lock:
            self.metrics.generated_tokens += 1
            if req.first_token_at is None:
                self.metrics.ttft.observe(now - req.arrived)
            else:
                self.metrics.itl.observe(now - req.last_token_at)
        if req.first_token_at is None:
            req.first_token_at = now
        req.last_token_at = now
        req.tokens.append(token)
        state.seq[0, state.length] = token
        state.length += 1
        stops = req.config.stop_strings
        reason = None
        if token in state.eos:
            state.full_text += state.decoder.flush()
            reason = "stop"
        else:
            state.full_text += state.decoder.push(token)
            if len(req.tokens) >= req.config.max_new_tokens:
                state.full_text += state.decoder.flush()
                reason = "length"
        text = state.full_text
        if stops:
            cut = trim_stop_strings(text, stops)
            if len(cut) < len(text):
                text, reason = cut, "stop"
        safe = len(text) if (reason or not stops) else len(text) - held_back_length(text, stops)
        if safe > state.sent:
            req.text = text[:safe]
            req.emit(Event("text", text[state.sent:safe]))
            state.sent = safe
        if reason:
            req.text = text
            self._end(req, reason)
            return True
        return False

    def _release(self, row: int) -> None:
        """Free cache row `row`; the last running request moves into it (mirrors ``SlotCache.remove``)."""
        self.cache.remove(row)
        req = self.running[row]
        self.running[row] = self.running[-1]
        self.running.pop()
        self._state.pop(req.id, None)

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason = reason
        self.metrics.finished(reason)
        try:
            req.emit(Event("error", error=error) if reason == "error" else Event("done", finish_reason=reason))
        except Exception:  # a broken callback must not stop the loop
            pass
