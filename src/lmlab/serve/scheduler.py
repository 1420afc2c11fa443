"""Continuous batching: one thread owns the model; requests join and leave the batch at token granularity.

The loop, one iteration at a time:

1. *housekeeping*: requests that were cancelled (their client left) or ran past their deadline end,
   and their KV-cache slots are freed.
2. *admission*: waiting requests take free slots (at most ``max_batch`` run at once) and are prefilled
   into their own slots (``SlotCache.bind_prefill``), which also yields each one's first token. Each
   iteration prefills at most ``prefill_tokens`` prompt tokens (a budget), first come first served, so
   the running requests wait at most that much prefill between two of their tokens, and the oldest
   waiting request, when a slot is free, is prefilled (or starts its chunks) before the next decode step. Prompts admitted in one iteration go in
   length order, in right-padded batches of at most ``prefill_tokens`` padded tokens (similar lengths, so
   little padding): on a GPU one batch costs about what one prompt does; on a CPU a prompt of a few
   hundred tokens already keeps the matrix units busy, so batching saves little there, and the budget
   is what lets earlier newcomers see their first token sooner.
   *Chunked prefill*: a prompt longer than ``prefill_tokens`` is prefilled ``prefill_tokens`` at a time,
   one chunk per iteration, into a one-row ``Cache`` of its own (then ``SlotCache.load_row``), so a long
   prompt never stalls the running requests for more than one chunk.
3. *one decode step* for every running request together: each row sits at its own position (RoPE or
   absolute positions per row) and attends only to its own keys (``SlotCache.bind_decode``).
4. each row's token is chosen with that request's own logits-processor chain
   (``lmlab.generation.build_processors``) and, when sampling, its own seeded ``torch.Generator``;
   text is decoded incrementally, stop strings are held back and trimmed as ``lmlab.generation.stream``
   does. Finished rows leave the batch (``SlotCache.remove``).

Greedy output is the same as ``lmlab.generate`` of the request alone, and sampled output with a
``seed`` is too: the same prefill, the same processor chain and the same generator draws, in the same
order. (Float rounding of a batched matrix product, or of a prompt prefilled in chunks, can differ from a
lone one in the last bit, which changes a token only on an exact near-tie of two logits.)

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


class _Chunked:
    """A long prompt being prefilled chunk by chunk into a one-row cache of its own (``state.seq`` holds it)."""

    def __init__(self, req: Request, state: _Decoding, cache):
        self.req, self.state, self.cache = req, state, cache

    @property
    def remaining(self) -> int:
        return self.state.length - self.cache.length


class Scheduler:
    """Continuous batching over a decoder-only model (see the module docstring).

    ``max_batch``: requests decoded together (KV-cache slots); ``max_queue``: requests waiting for a
    slot before ``submit`` raises ``QueueFull``; ``timeout``: default seconds a request may run, from
    arrival, before it ends with finish reason "timeout"; ``prefill_tokens``: prompt tokens prefilled per
    iteration between two decode steps (longer prompts go in chunks of this size).
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, timeout: float | None = 600.0,
                 metrics: Metrics | None = None, max_context: int | None = None, prefill_tokens: int = 512):
        if model.config.arch != "decoder":
            raise ConfigError(f"lmlab serve runs decoder-only models; this model has arch={model.config.arch!r}")
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_tokens", prefill_tokens)):
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
        self._chunked: _Chunked | None = None  # the long prompt being prefilled chunk by chunk, if any
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._closing = False
        self.steps = 0  # decode steps run (tests and benchmarks read it)
        self.prefills = 0  # prefill forwards run (a batch of prompts or one chunk counts once)
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
                for req in list(self._waiting) + self.running + ([self._chunked.req] if self._chunked else []):
                    req.cancelled = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def pending(self) -> tuple[int, int]:
        """(running, waiting) right now; a prompt being prefilled in chunks counts as running."""
        with self._cv:
            return self._occupied(), len(self._waiting)

    def _occupied(self) -> int:
        """Slots taken: running requests, and the chunked prompt that will need one."""
        return len(self.running) + (self._chunked is not None)

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
                stranded = list(self._waiting) + self.running + ([self._chunked.req] if self._chunked else [])
                self._waiting.clear()
            for req in stranded:
                self._end(req, "error", f"the model loop stopped: {self.error}")
            raise

    def _iteration(self) -> bool:
        """Housekeeping, admission + prefill, one decode step -> False once closed and drained.
        (A method of its own so that nothing of a finished request outlives the iteration in a local.)"""
        with self._cv:
            while not (self._waiting or self.running or self._chunked or self._closing):
                self._cv.wait()
            if self._closing and not self._waiting and not self.running and not self._chunked:
                return False
            self._expire_waiting()
            chunk, admitted, start_chunked = self._plan_prefill()
            with self.metrics.lock:
                self.metrics.queued = len(self._waiting)
        self._expire_running()
        if start_chunked is not None:
            self._start_chunked(start_chunked)
        if self._chunked is not None:
            self._prefill_chunk(chunk)
        for group in self._prefill_groups(admitted):
            self._prefill(group)
        self.peak_running = max(self.peak_running, len(self.running))
        if self.running:
            self._decode_step()
        with self.metrics.lock:
            self.metrics.running = self._occupied()
        return True

    def _plan_prefill(self) -> tuple[int, list[Request], Request | None]:
        """This iteration's prefill work, within ``prefill_tokens`` prompt tokens (called holding the lock)
        -> (tokens of the chunked prompt to prefill now, requests to prefill whole, a long request that
        starts chunked prefill now).

        First come, first served: the chunked prompt in progress takes its next chunk first; then waiting
        requests are taken in arrival order while a slot and the budget last. A prompt longer than the
        whole budget starts chunked prefill when no other is in progress; one that does not fit the
        budget left waits for the next iteration, where it comes first. So the queue's head is always
        served within one iteration of a slot being free.
        """
        budget = self.prefill_tokens
        chunk = 0
        if self._chunked is not None:
            chunk = min(budget, self._chunked.remaining)
            budget -= chunk
        admitted: list[Request] = []
        start_chunked = None
        while self._waiting and budget > 0 and self._occupied() + len(admitted) < self.max_batch:
            n = len(self._waiting[0].prompt_ids)
            if n <= budget:
                admitted.append(self._waiting.popleft())
                budget -= n
            elif n > self.prefill_tokens and self._chunked is None and start_chunked is None:
                start_chunked = self._waiting.popleft()
                chunk, budget = budget, 0
            else:
                break
        return chunk, admitted, start_chunked

    def _prefill_groups(self, admitted: list[Request]) -> list[list[Request]]:
        """Requests admitted in one iteration, shortest prompt first, cut into prefill batches of at most
        ``prefill_tokens`` padded tokens (a batch's cost is its size times its longest prompt; sorting keeps
        the lengths in a batch close, so little of it is padding)."""
        groups: list[list[Request]] = []
        longest = 0
        for req in sorted(admitted, key=lambda r: len(r.prompt_ids)):
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
        part = self._chunked
        if part is not None and (part.req.cancelled or (part.req.deadline and now > part.req.deadline)):
            self._chunked = None
            self._end(part.req, "cancelled" if part.req.cancelled else "timeout")
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

    def _start_chunked(self, req: Request) -> None:
        """Begin prefilling a prompt longer than ``prefill_tokens``: its own one-row cache, filled chunk by chunk."""
        try:
            state = _Decoding(req, self.tokenizer, self.model.device)
            cache = self.model.new_cache(1, state.length)
        except Exception as exc:
            self._end(req, "error", f"{type(exc).__name__}: {exc}")
            return
        self._chunked = _Chunked(req, state, cache)

    def _prefill_chunk(self, n: int) -> None:
        """The next `n` prompt tokens of the chunked prompt; after its last chunk it takes a slot (its cache
        entries move in with ``SlotCache.load_row``) and its first token is chosen, as a whole prefill would."""
        part = self._chunked
        done = part.cache.length
        try:
            ids = part.state.seq[:, done:done + n]  # (1, n) the next chunk, at positions done..done+n-1
            logits = self.model(ids, cache=part.cache, logits_to_keep=1)[0, -1]  # (V,)
            self.prefills += 1
            if part.cache.length < part.state.length:
                return
            self._chunked = None
            row = self.cache.add()
            self.running.append(part.req)
            self._state[part.req.id] = part.state
            self.cache.load_row(row, part.cache)
        except Exception as exc:
            if self._chunked is None and self.running and self.running[-1] is part.req:  # failed after taking a slot
                self._release(len(self.running) - 1)
            self._chunked = None
            self._end(part.req, "error", f"{type(exc).__name__}: {exc}")
            return
        with self.metrics.lock:
            self.metrics.prompt_tokens += part.state.length
        try:
            finished = self._accept(part.req, part.state, self._choose(part.state, logits))
        except Exception as exc:
            finished = True
            self._end(part.req, "error", f"{type(exc).__name__}: {exc}")
        if finished:
            self._release(row)

    def _prefill_logits(self, first: int, prompts: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
        """Prompts (each (T_i,)) into cache rows first, first+1, ... -> next-token logits (B, V)."""
        self.prefills += 1
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
