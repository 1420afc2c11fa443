"""Continuous batching: the scheduler decides; one thread runs it; sequences join and leave the batch at
token granularity. (vLLM's split: ``Scheduler`` decides what runs each iteration, ``runner.ModelRunner``
executes the model, ``output.SequenceOutput`` samples, detokenizes and applies stop strings.)

The loop, one iteration at a time:

1. *housekeeping*: sequences that were cancelled (their client left) or ran past their deadline end,
   and their KV-cache slots are freed.
2. *admission*: waiting sequences take free slots (at most ``max_batch`` run at once) and are prefilled
   into their own slots (``ModelRunner.prefill``), which also yields each one's first token. Each
   iteration prefills at most ``prefill_tokens`` prompt tokens (a budget), first come first served, so
   the running sequences wait at most that much prefill between two of their tokens, and the oldest
   waiting sequence, when a slot is free, is prefilled (or starts its chunks) before the next decode
   step. Prompts admitted in one iteration go in length order, in right-padded batches of at most
   ``prefill_tokens`` padded tokens (similar lengths, so little padding): on a GPU one batch costs about
   what one prompt does; on a CPU a prompt of a few hundred tokens already keeps the matrix units busy,
   so batching saves little there, and the budget is what lets earlier newcomers see their first token
   sooner.
   *Chunked prefill*: a prompt longer than ``prefill_tokens`` is prefilled ``prefill_tokens`` at a time,
   one chunk per iteration, into a one-row ``Cache`` of its own (``ModelRunner.prefill_chunk``, then
   ``ModelRunner.admit``), so a long prompt never stalls the running sequences for more than one chunk.
3. *one decode step* for every running sequence together (``ModelRunner.decode``): each row sits at its
   own position (RoPE or absolute positions per row) and attends only to its own keys.
4. the output step (``lmlab.serve.output``): each row's token is chosen with that sequence's own
   logits-processor chain and, when sampling, its own seeded ``torch.Generator``; text is decoded
   incrementally, stop strings are held back and trimmed as ``lmlab.generation.stream`` does. Finished
   rows leave the batch (``ModelRunner.release``).

Greedy output is the same as ``lmlab.generate`` of the request alone, and sampled output with a
``seed`` is too: the same prefill, the same processor chain and the same generator draws, in the same
order. (Float rounding of a batched matrix product, or of a prompt prefilled in chunks, can differ from a
lone one in the last bit, which changes a token only on an exact near-tie of two logits.)

The loop never dies because of one sequence: an error while prefilling or choosing a token ends that
sequence with an error event; an error in a batched decode step ends the sequences of that step.

Results go back through each sequence's ``emit(event)`` callback (called from the loop thread; the HTTP
layer hops it onto its event loop).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from lmlab.errors import ConfigError, DataError, LmlabError
from lmlab.generation.config import GenerationConfig
from lmlab.nn.kv_cache import Cache
from lmlab.serve.metrics import Metrics
from lmlab.serve.output import SequenceOutput, sample
from lmlab.serve.runner import DecodeStep, ModelRunner, check_servable


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
class Sequence:
    """One sequence to generate (a request's choice). Created by ``Scheduler.submit``; read-only for callers."""

    prompt_ids: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    deadline: float | None
    id: int = 0
    tokens: list[int] = field(default_factory=list)  # generated ids (eos included when it ended on one)
    text: str = ""  # generated text sent so far (stop strings trimmed once found)
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


class _Chunked:
    """A long prompt being prefilled chunk by chunk into a one-row cache of its own; `followers`: sequences
    with the same prompt (more choices of the request) that take a copy of the cache when it is full."""

    def __init__(self, seq: Sequence, out: SequenceOutput, cache: Cache,
                 followers: list[tuple[Sequence, SequenceOutput]] | None = None):
        self.seq, self.out, self.cache = seq, out, cache
        self.followers = followers or []

    @property
    def members(self) -> list[tuple[Sequence, SequenceOutput]]:
        return [(self.seq, self.out)] + self.followers

    @property
    def remaining(self) -> int:
        return self.out.prompt_length - self.cache.length


class Scheduler:
    """Continuous batching over a decoder-only model (see the module docstring).

    ``max_batch``: sequences decoded together (KV-cache slots); ``max_queue``: sequences waiting for a
    slot before ``submit`` raises ``QueueFull``; ``timeout``: default seconds a sequence may run, from
    arrival, before it ends with finish reason "timeout"; ``prefill_tokens``: prompt tokens prefilled per
    iteration between two decode steps (longer prompts go in chunks of this size); ``decode_step``: the
    runner's decode forward (default: the eager PyTorch model; see ``runner.DecodeStep``); ``engine``: else
    the decode engine to run it ("auto", "native", "eager"...; None: ``$LMLAB_ENGINE``, which ``lmlab serve
    --engine`` sets, else eager), eager where it cannot run; ``engine_name`` and ``/metrics`` say which runs.
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, timeout: float | None = 600.0,
                 metrics: Metrics | None = None, max_context: int | None = None, prefill_tokens: int = 512,
                 decode_step: DecodeStep | None = None, engine: str | None = None):
        check_servable(model.config)
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_tokens", prefill_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout={timeout!r} must be > 0 seconds")
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.prefill_tokens = prefill_tokens
        self.context_window = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        self.metrics = metrics or Metrics()
        self.runner = ModelRunner(model, max_batch, self.context_window, decode_step, engine)
        self.engine_name = self.metrics.engine = self.runner.engine_name
        self.running: list[Sequence] = []  # running[i] owns cache row i
        self._outputs: dict[int, SequenceOutput] = {}  # sequence id -> its output state
        self._waiting: deque[Sequence] = deque()
        self._chunked: _Chunked | None = None  # the long prompt being prefilled chunk by chunk, if any
        self._jobs: deque[tuple[Future, Callable[[], object]]] = deque()  # call(): work for the model thread
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._closing = False
        self.peak_running = 0  # the most sequences ever decoded together
        self.error: str | None = None  # why the loop stopped, if it ever failed
        self._thread = threading.Thread(target=self._run, name="lmlab-model-loop", daemon=True)
        self._thread.start()

    @property
    def cache(self):
        """The runner's slot KV cache (row i: ``running[i]``)."""
        return self.runner.cache

    @property
    def steps(self) -> int:
        """Decode steps run (tests and benchmarks read it)."""
        return self.runner.steps

    @property
    def prefills(self) -> int:
        """Prefill forwards run (a batch of prompts or one chunk counts once)."""
        return self.runner.prefills

    # --- the caller's side (any thread) ----------------------------------------------------------
    def submit(self, prompt_ids: list[int], config: GenerationConfig, emit: Callable[[Event], None],
               timeout: float | None = None) -> Sequence:
        """Queue a sequence -> its handle. `config` must be resolved (eos/pad ids filled in).

        Raises ``DataError`` for an empty prompt or one that cannot fit the context window,
        ``QueueFull`` when ``max_queue`` sequences are waiting, ``Closing`` while draining.
        """
        return self.submit_many([prompt_ids], [config], [emit], timeout)[0]

    def submit_many(self, prompts: list[list[int]], configs: list[GenerationConfig],
                    emits: list[Callable[[Event], None]], timeout: float | None = None) -> list[Sequence]:
        """Queue the sequences of one request at once -> their handles: all of them or none (the same errors as
        ``submit``). Queued together, the ones with the same prompt (n choices) share its prefill."""
        timeout = self.timeout if timeout is None else timeout
        now = time.monotonic()
        seqs = []
        for prompt_ids, config, emit in zip(prompts, configs, emits):
            if not prompt_ids:
                raise DataError("the prompt is empty: it needs at least one token")
            need = len(prompt_ids) + config.max_new_tokens
            if need > self.context_window:
                raise DataError(f"prompt of {len(prompt_ids)} tokens + max_tokens={config.max_new_tokens} = {need} "
                                f"exceeds the context window of {self.context_window} tokens")
            seqs.append(Sequence(list(prompt_ids), config, emit, now + timeout if timeout else None, arrived=now))
        with self._cv:
            if self._closing:
                raise Closing("the server is shutting down and takes no new requests")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            for seq in seqs:
                seq.id = next(self._ids)
                self._waiting.append(seq)
            with self.metrics.lock:
                self.metrics.queued = len(self._waiting)
            self._cv.notify()
        return seqs

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the model thread between two iterations -> a Future of its result. For work that
        uses the model outside the batch (e.g. ``/v1/inspect``'s recorded forward pass, whose hooks would
        otherwise fire on the loop's own steps): running sequences pause while it runs."""
        future: Future = Future()
        with self._cv:
            if self._closing:
                raise Closing("the server is shutting down and takes no new requests")
            self._jobs.append((future, fn))
            self._cv.notify()
        return future

    def cancel(self, seq: Sequence) -> None:
        """End `seq` soon (its client went away): the loop frees its slot before the next step."""
        with self._cv:
            seq.cancelled = True
            self._cv.notify()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking sequences; with `drain`, let waiting and running ones finish; then stop the loop."""
        with self._cv:
            self._closing = True
            if not drain:
                for seq in self._all():
                    seq.cancelled = True
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
        """Slots taken: running sequences, and the chunked prompt's sequences that will need them."""
        return len(self.running) + (len(self._chunked.members) if self._chunked is not None else 0)

    def _all(self) -> list[Sequence]:
        return list(self._waiting) + self.running + ([s for s, _ in self._chunked.members] if self._chunked else [])

    # --- the loop (model thread) -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            with self.runner.session():
                while self._iteration():
                    pass
        except BaseException as exc:  # a bug in the loop itself: fail every sequence rather than hang them
            self.error = f"{type(exc).__name__}: {exc}"
            with self._cv:
                self._closing = True
                stranded = self._all()
                self._waiting.clear()
                jobs, self._jobs = list(self._jobs), deque()
            for future, _ in jobs:
                future.set_exception(Closing(f"the model loop stopped: {self.error}"))
            for seq in stranded:
                self._end(seq, "error", f"the model loop stopped: {self.error}")
            raise

    def _iteration(self) -> bool:
        """Housekeeping, admission + prefill, one decode step -> False once closed and drained.
        (A method of its own so that nothing of a finished sequence outlives the iteration in a local.)"""
        with self._cv:
            while not (self._waiting or self.running or self._chunked or self._jobs or self._closing):
                self._cv.wait()
            if self._closing and not self._waiting and not self.running and not self._chunked and not self._jobs:
                return False
            jobs, self._jobs = list(self._jobs), deque()
            self._expire_waiting()
            chunk, admitted, start_chunked = self._plan_prefill()  # start_chunked: a prompt's sequences
            with self.metrics.lock:
                self.metrics.queued = len(self._waiting)
        for future, fn in jobs:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:  # the caller's error, not the loop's
                    future.set_exception(exc)
        self._expire_running()
        if start_chunked:
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

    def _plan_prefill(self) -> tuple[int, list[Sequence], list[Sequence]]:
        """This iteration's prefill work, within ``prefill_tokens`` prompt tokens (called holding the lock)
        -> (tokens of the chunked prompt to prefill now, sequences to prefill whole, the sequences of a
        long prompt that starts chunked prefill now).

        First come, first served: the chunked prompt in progress takes its next chunk first; then waiting
        sequences are taken in arrival order while a slot and the budget last. A prompt longer than the
        whole budget starts chunked prefill when no other is in progress; one that does not fit the
        budget left waits for the next iteration, where it comes first. So the queue's head is always
        served within one iteration of a slot being free. A prompt already taken this iteration costs
        nothing again (the sequences share its prefill: a request's n choices), and the sequences right
        behind a long prompt with the same prompt join its chunked prefill.
        """
        budget = self.prefill_tokens
        chunk = 0
        if self._chunked is not None:
            chunk = min(budget, self._chunked.remaining)
            budget -= chunk
        admitted: list[Sequence] = []
        taken: set[tuple[int, ...]] = set()  # prompts prefilled this iteration
        start_chunked: list[Sequence] = []
        while self._waiting and self._occupied() + len(admitted) < self.max_batch:
            head = self._waiting[0]
            key = tuple(head.prompt_ids)
            n = 0 if key in taken else len(key)
            if n <= budget and (n == 0 or budget > 0):
                admitted.append(self._waiting.popleft())
                taken.add(key)
                budget -= n
            elif n > self.prefill_tokens and self._chunked is None and not start_chunked:
                start_chunked.append(self._waiting.popleft())
                while (self._waiting and self._waiting[0].prompt_ids == head.prompt_ids
                       and self._occupied() + len(admitted) + len(start_chunked) < self.max_batch):
                    start_chunked.append(self._waiting.popleft())
                chunk, budget = budget, 0
                break
            else:
                break
        return chunk, admitted, start_chunked

    def _prefill_groups(self, admitted: list[Sequence]) -> list[list[Sequence]]:
        """Sequences admitted in one iteration, shortest prompt first, cut into prefill batches of at most
        ``prefill_tokens`` padded tokens (a batch's cost is its number of distinct prompts times its longest
        prompt; sorting keeps the lengths in a batch close, so little of it is padding). The sequences of one
        prompt go in one batch, which prefills it once."""
        by_prompt: dict[tuple[int, ...], list[Sequence]] = {}
        for seq in admitted:
            by_prompt.setdefault(tuple(seq.prompt_ids), []).append(seq)
        groups: list[list[Sequence]] = []
        longest = prompts = 0
        for members in sorted(by_prompt.values(), key=lambda m: len(m[0].prompt_ids)):
            n = len(members[0].prompt_ids)
            if groups and max(longest, n) * (prompts + 1) <= self.prefill_tokens:
                groups[-1].extend(members)
                longest, prompts = max(longest, n), prompts + 1
            else:
                groups.append(list(members))
                longest, prompts = n, 1
        return groups

    def _expired(self, seq: Sequence, now: float) -> str | None:
        """"cancelled" or "timeout" when `seq` must end now, else None."""
        if seq.cancelled:
            return "cancelled"
        return "timeout" if seq.deadline and now > seq.deadline else None

    def _expire_waiting(self) -> None:
        """Drop cancelled or timed-out sequences that never got a slot (called holding the lock)."""
        now = time.monotonic()
        for seq in [s for s in self._waiting if self._expired(s, now)]:
            self._waiting.remove(seq)
            self._end(seq, self._expired(seq, now))

    def _expire_running(self) -> None:
        now = time.monotonic()
        part = self._chunked
        if part is not None:
            for seq, out in list(part.followers):
                if reason := self._expired(seq, now):
                    part.followers.remove((seq, out))
                    self._end(seq, reason)
            if reason := self._expired(part.seq, now):
                self._end(part.seq, reason)
                if part.followers:  # the next sequence of the same prompt carries the chunked prefill on
                    part.seq, part.out = part.followers.pop(0)
                else:
                    self._chunked = None
        for row in range(len(self.running) - 1, -1, -1):  # descending: see _release
            seq = self.running[row]
            if reason := self._expired(seq, now):
                self._release(row)
                self._end(seq, reason)

    def _new_output(self, seq: Sequence) -> SequenceOutput | None:
        """The output state of a sequence about to be prefilled, or None when it cannot be made (ended)."""
        try:
            return SequenceOutput(seq.prompt_ids, seq.config, self.tokenizer, self.runner.device)
        except Exception as exc:
            self._end(seq, "error", f"{type(exc).__name__}: {exc}")
            return None

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Claim a slot for each sequence and run their prompts through the model together (one right-padded
        batch; a lone prompt goes unpadded) -> each one's first token. If the batch fails, each prompt is
        retried alone, so a bad one fails only itself."""
        ready = [(seq, out) for seq in seqs if (out := self._new_output(seq)) is not None]
        if not ready:
            return
        # a prompt asked for again (a request's n choices) is prefilled once: its later sequences get copies
        unique: dict[tuple[int, ...], int] = {}
        firsts, copies, sources = [], [], []
        for seq, out in ready:
            key = tuple(seq.prompt_ids)
            if key in unique:
                copies.append((seq, out))
                sources.append(unique[key])
            else:
                unique[key] = len(firsts)
                firsts.append((seq, out))
        ready = firsts + copies  # the order of their rows
        first = len(self.running)
        for seq, out in ready:  # running while prefilled (pending() counts them)
            self.running.append(seq)
            self._outputs[seq.id] = out
        try:
            logits = self.runner.prefill([out.prompt for _, out in firsts], sources)  # (B, V)
        except Exception as exc:
            for seq, _ in reversed(ready):  # the runner freed their rows
                self.running.pop()
                self._outputs.pop(seq.id, None)
            if len(ready) > 1:
                for seq, _ in ready:
                    self._prefill([seq])
            else:
                self._end(ready[0][0], "error", f"{type(exc).__name__}: {exc}")
            return
        with self.metrics.lock:
            self.metrics.prompt_tokens += sum(out.prompt_length for _, out in ready)
            self.metrics.shared_prefills += len(copies)
        finished = []
        for i, (seq, out) in enumerate(ready):
            token: int | Exception
            try:
                token = out.choose(logits[i])
            except Exception as exc:
                token = exc
            if self._accept(seq, out, token):
                finished.append(first + i)
        for row in reversed(finished):
            self._release(row)

    def _start_chunked(self, seqs: list[Sequence]) -> None:
        """Begin prefilling a prompt longer than ``prefill_tokens`` (for each of `seqs`, which share it): its own
        one-row cache, filled chunk by chunk."""
        ready = [(seq, out) for seq in seqs if (out := self._new_output(seq)) is not None]
        if not ready:
            return
        try:
            cache = self.runner.chunk_cache(ready[0][1].prompt_length)
        except Exception as exc:
            for seq, _ in ready:
                self._end(seq, "error", f"{type(exc).__name__}: {exc}")
            return
        self._chunked = _Chunked(*ready[0], cache, followers=ready[1:])

    def _prefill_chunk(self, n: int) -> None:
        """The next `n` prompt tokens of the chunked prompt; after its last chunk it takes a slot (its cache
        entries move in with ``ModelRunner.admit``) and its first token is chosen, as a whole prefill would."""
        part = self._chunked
        done = part.cache.length
        try:
            logits = self.runner.prefill_chunk(part.cache, part.out.history[:, done:done + n])  # (V,)
        except Exception as exc:
            self._chunked = None
            for seq, _ in part.members:
                self._end(seq, "error", f"{type(exc).__name__}: {exc}")
            return
        if part.cache.length < part.out.prompt_length:
            return
        self._chunked = None
        admitted = []
        for seq, out in part.members:  # each takes a row holding a copy of the prompt's cache
            try:
                row = self.runner.admit(part.cache)
            except Exception as exc:
                self._end(seq, "error", f"{type(exc).__name__}: {exc}")
                continue
            self.running.append(seq)
            self._outputs[seq.id] = out
            admitted.append((row, seq, out))
        with self.metrics.lock:
            self.metrics.prompt_tokens += sum(out.prompt_length for _, _, out in admitted)
            self.metrics.shared_prefills += max(0, len(admitted) - 1)
        finished = []
        for row, seq, out in admitted:
            token: int | Exception
            try:
                token = out.choose(logits)
            except Exception as exc:
                token = exc
            if self._accept(seq, out, token):
                finished.append(row)
        for row in sorted(finished, reverse=True):  # descending: see _release
            self._release(row)

    def _decode_step(self) -> None:
        """One token for every running sequence, in one forward pass over the active cache rows."""
        outputs = [self._outputs[s.id] for s in self.running]
        try:
            logits = self.runner.decode([out.last_token for out in outputs])  # (A, V)
        except Exception as exc:  # the whole step failed: its sequences end, the loop goes on
            for row in range(len(self.running) - 1, -1, -1):
                seq = self.running[row]
                self._release(row)
                self._end(seq, "error", f"{type(exc).__name__}: {exc}")
            return
        finished = [row for row, (seq, out, token) in enumerate(zip(self.running, outputs, sample(outputs, logits)))
                    if self._accept(seq, out, token)]
        for row in reversed(finished):  # descending, so each swap moves a row that stays
            self._release(row)

    def _accept(self, seq: Sequence, out: SequenceOutput, token: int | Exception) -> bool:
        """Record `token` (or the error choosing it), emit new text -> whether the sequence has ended."""
        if isinstance(token, Exception):
            self._end(seq, "error", f"{type(token).__name__}: {token}")
            return True
        now = time.monotonic()
        with self.metrics.lock:
            self.metrics.generated_tokens += 1
            if seq.first_token_at is None:
                self.metrics.ttft.observe(now - seq.arrived)
            else:
                self.metrics.itl.observe(now - seq.last_token_at)
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now
        seq.tokens.append(token)
        try:
            text, reason = out.append(token)
            if text:
                seq.text += text
                seq.emit(Event("text", text))
        except Exception as exc:
            self._end(seq, "error", f"{type(exc).__name__}: {exc}")
            return True
        if reason:
            self._end(seq, reason)
            return True
        return False

    def _release(self, row: int) -> None:
        """Free cache row `row`; the last running sequence moves into it (mirrors ``ModelRunner.release``)."""
        self.runner.release(row)
        seq = self.running[row]
        self.running[row] = self.running[-1]
        self.running.pop()
        self._outputs.pop(seq.id, None)

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish_reason = reason
        self.metrics.finished(reason)
        try:
            seq.emit(Event("error", error=error) if reason == "error" else Event("done", finish_reason=reason))
        except Exception:  # a broken callback must not stop the loop
            pass
