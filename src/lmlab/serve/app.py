"""The HTTP side of ``lmlab serve``: OpenAI-compatible endpoints, Server-Sent Events, metrics, the playground.

Routes (``create_app(settings, loader)`` builds a Starlette app; uvicorn runs it):

    GET  /health                 503 while the model loads, 200 when ready
    GET  /metrics                Prometheus text: running/queued requests, tokens, TTFT and inter-token histograms
    GET  /v1/models              the one model served
    POST /v1/completions         prompt (str or list of str) -> text; ``stream: true`` sends SSE chunks
    POST /v1/chat/completions    messages through the checkpoint's chat template -> an assistant message
    POST /v1/summarize           a dialogue -> a summary with the lab's recipes (fine-tuned, zero/one/few-shot);
                                 the fine-tuned recipe decodes as it says (the shipped one: minimum Bayes risk
                                 over 8 samples), ``best_of`` chooses how many summaries to sample (1: one)
    GET  /v1/summarize/dialogues the bundled dialogues and the recipes available (for the playground)
    POST /v1/preferences         {prompt, chosen, rejected, source?}: a person's choice, appended to --prefs-out FILE
    POST /v1/inspect             inside the model on one text (lmlab.inspect.inspect_request; the Inside tab)
    POST /v1/embeddings          (with --index) texts -> the index encoder's unit vectors, OpenAI-shaped
    POST /v1/search              (with --index) {query, k, mode, filter} -> the index's hits
    GET  /v1/documents/{id}      (with --index) one indexed document, whole
    GET  /                       the playground (static HTML/CSS/JS from ``serve/static``)

This layer holds no model logic: a route handler (a plain module-level function of the request; the
server's ``ServerState`` is ``request.app.state.lmlab``) validates a request, turns it into prompt token
ids and a ``GenerationConfig`` per choice, submits them to the ``Scheduler`` (the one thread that owns
the model) and relays the scheduler's events, hopping them from the model thread onto the event loop;
every stream goes through one SSE helper (``sse_response``). Chat completions take ``"retrieval": {"k", "mode",
"filter"}`` (with --index: the last user message is grounded in the index's hits by
``lmlab.index.grounded_messages``; the hits come back as ``sources``), and both completion endpoints take
OpenAI's ``response_format`` (a per-request grammar constraint, ``lmlab.generation.constrain``).
Errors are OpenAI-shaped:
``{"error": {"message", "type", "param", "code"}}`` with 400 (bad JSON or parameters, naming the field),
401 (API key), 429 (queue full, with ``Retry-After``), 503 (loading or shutting down). A client that
disconnects cancels its requests, which frees their slots before the next decode step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lmlab.adapt.recipe import Recipe
from lmlab.align.prefs import PreferencePair, append_preference
from lmlab.errors import LmlabError
from lmlab.generation import GenerationConfig
from lmlab.generation.constrain import constraint_from_response_format
from lmlab.generation.decode import resolve_config
from lmlab.prompting import Example, SentenceEmbedder, build_prompt, select_shots
from lmlab.serve.metrics import Metrics
from lmlab.serve.scheduler import Closing, Event, QueueFull, Scheduler, Sequence
from lmlab.tasks.summarize.data import load_sample
from lmlab.tasks.summarize.experiments import CHAT_STOP_STRINGS, INSTRUCTION, STOP_STRINGS, clean_summary

STATIC = Path(__file__).parent / "static"
INSPECT_STATIC = Path(__file__).parent.parent / "inspect" / "static"  # inspect.{js,css}, shared with lmlab inspect --html
MAX_N = 8  # choices per request
MAX_BEST_OF = 16  # summaries sampled for one /v1/summarize (minimum Bayes risk)
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
SUMMARY_RECIPES = {"fine-tuned": 0, "zero-shot": 0, "one-shot": 1, "few-shot": 3}  # recipe -> shots
MAX_EMBED_INPUTS = 2048  # texts per /v1/embeddings request, as OpenAI allows
MAX_SEARCH_K = 100
SEARCH_MODES = ("hybrid", "dense", "bm25")  # lmlab.index.MODES (not imported here: it would load the encoder stack)


@dataclass
class ServeSettings:
    """What ``lmlab serve`` was started with (see ``lmlab serve --help``)."""

    model_name: str = "lmlab"
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    timeout: float = 600.0
    prefill_tokens: int = 512  # prompt tokens prefilled between two decode steps (longer prompts: chunks)
    shot_method: str = "nearest"  # summarize shots: "nearest" (MiniLM, the lab's best) or "random"
    finetuned: Any = None  # the prompt recipe (lmlab.adapt.recipe.Recipe) when serving a fine-tuned summarizer
    prefs_out: str | None = None  # the preferences JSONL file the playground's compare tab appends to
    index: Any = None  # an lmlab.index.Index (lmlab serve --index): embeddings, search, retrieval, the Ask tab

    @property
    def default_recipe(self) -> str:
        """What /v1/summarize and the playground use unless told: the fine-tuned summarizer when one is
        served (as ``lmlab summarize`` does), else the best prompting recipe."""
        return "fine-tuned" if self.finetuned is not None else "few-shot"

    @property
    def recipes(self) -> list[str]:
        return [r for r in SUMMARY_RECIPES if r != "fine-tuned" or self.finetuned is not None]


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class InstructionRecipe:
    """The lab's zero-shot instruction prompt: the fine-tuned recipe when an adapter brings none of its own."""

    chat: bool | None = None  # None: the chat template when the tokenizer has one

    def prompt(self, text: str, tokenizer, max_prompt_tokens: int | None = None):
        chat = getattr(tokenizer, "chat_template", None) is not None if self.chat is None else self.chat
        return build_prompt(text, [], template="instruction", tokenizer=tokenizer, chat=chat, instruction=INSTRUCTION,
                            max_prompt_tokens=max_prompt_tokens)


def finetuned_recipe(adapter_dir: str | Path) -> Recipe | InstructionRecipe:
    """The prompt recipe a fine-tuned summarizer was trained with (``lmlab_recipe.json`` beside its weights,
    written by ``lmlab finetune``), else the lab's zero-shot instruction prompt."""
    return Recipe.load(adapter_dir) or InstructionRecipe()


# --- request validation ----------------------------------------------------------------------------
def _number(body: dict, name: str, default, low=None, high=None, integer=False, low_open=False):
    """body[name] as a number in [low, high] (or (low, high] with low_open) -> value; ApiError naming the field."""
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"{name}={value!r} must be {kind}", name)
    if value != value:  # NaN
        raise ApiError(400, f"{name}={value!r} must be {kind}", name)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        raise ApiError(400, f"{name}={value!r} must be {' and '.join(s for s in (lo, hi) if s)}", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or not 1 <= len(stop) <= MAX_STOP
            or any(not isinstance(s, str) or not s for s in stop)):
        raise ApiError(400, f"stop={body.get('stop')!r} must be a non-empty string or a list of 1 to {MAX_STOP} of them",
                       "stop")
    return stop


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}={value!r} must be true or false", name)
    return value


def generation_configs(body: dict, max_tokens_default: int, n: int = 1, max_tokens_field: str = "max_tokens"):
    """The GenerationConfig of each of `n` choices from OpenAI fields plus lmlab's extras.

    ``temperature`` 0 means greedy (OpenAI's default is 1: sampling). lmlab's extras: ``top_k``, ``min_p``,
    ``repetition_penalty``, and ``ignore_eos`` (as in vLLM: generate exactly ``max_tokens``). With a ``seed``, choice i samples
    with seed + i, so several choices differ but each is reproducible.
    """
    for unsupported in ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "tools", "functions", "logit_bias"):
        if body.get(unsupported) not in (None, False, 1 if unsupported == "best_of" else None):
            raise ApiError(400, f"{unsupported} is not supported by lmlab serve", unsupported)
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(body, penalty, 0.0, -2.0, 2.0) != 0:
            raise ApiError(400, f"{penalty} is not supported; use repetition_penalty (lmlab's multiplicative penalty)",
                           penalty)
    max_tokens = _number(body, max_tokens_field, None, 1, integer=True)
    if max_tokens is None and max_tokens_field != "max_tokens":
        max_tokens = _number(body, "max_tokens", None, 1, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_k = _number(body, "top_k", 0, -1, integer=True)
    seed = _number(body, "seed", None, 0, integer=True)
    config = GenerationConfig(
        max_new_tokens=max_tokens or max_tokens_default,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both disable it
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, low_open=True),
        seed=seed,
        stop_strings=_stop(body),
        eos_token_ids=[] if _bool(body, "ignore_eos") else None,  # vLLM's knob: always max_tokens (benchmarks)
    )
    return [config if seed is None else config.replace(seed=seed + i) for i in range(n)]


async def response_constraint(body: dict, state: "ServerState", n: int):
    """``response_format`` -> a grammar Constraint (None for absent or text); a bad schema, an unsupported
    keyword, or a constraint with n > 1 or ignore_eos is a 400 naming it. Compiles in a worker thread."""
    response_format = body.get("response_format")
    if response_format is None:
        return None
    try:
        constraint = await asyncio.to_thread(constraint_from_response_format, response_format, state.tokenizer,
                                             state.model)
    except LmlabError as exc:
        raise ApiError(400, f"response_format: {exc}", "response_format") from None
    if constraint is not None and n > 1:
        raise ApiError(400, f"n={n} with response_format {constraint.kind!r} is not supported: ask for one choice",
                       "n")
    if constraint is not None and body.get("ignore_eos"):
        raise ApiError(400, "ignore_eos with response_format is not supported: the grammar ends with "
                            "end-of-sequence", "ignore_eos")
    return constraint


def retrieval_options(body: dict) -> dict | None:
    """``"retrieval": true | {"k", "mode", "filter"}`` -> search keywords (None when not asked for)."""
    spec = body.get("retrieval")
    if spec is None or spec is False:
        return None
    if spec is True:
        spec = {}
    if not isinstance(spec, dict):
        raise ApiError(400, f"retrieval={spec!r} must be true or an object {{k, mode, filter}}", "retrieval")
    unknown = set(spec) - {"k", "mode", "filter"}
    if unknown:
        raise ApiError(400, f"retrieval has unknown field {sorted(unknown)[0]!r}; it takes k, mode and filter",
                       "retrieval")
    return search_options(spec, "retrieval.", default_k=4)


def search_options(spec: dict, prefix: str = "", default_k: int = 5) -> dict:
    """{k, mode, filter} of a search or retrieval request, validated -> Index.search keywords."""
    try:
        k = _number(spec, "k", default_k, 1, MAX_SEARCH_K, integer=True)
    except ApiError as exc:
        raise ApiError(400, prefix + exc.message, prefix + "k") from None
    mode = spec.get("mode", "hybrid")
    if mode not in SEARCH_MODES:
        raise ApiError(400, f"{prefix}mode={mode!r} is not valid; choose one of: {', '.join(SEARCH_MODES)}",
                       f"{prefix}mode")
    filt = spec.get("filter")
    scalar = (lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool))
    if filt is not None and (not isinstance(filt, dict) or not all(scalar(v) for v in filt.values())):
        raise ApiError(400, f"{prefix}filter={filt!r} must be an object {{field: value}} of strings or numbers",
                       f"{prefix}filter")
    return {"k": k, "mode": mode, "filter": filt or None}


# --- the server state --------------------------------------------------------------------------------
class ServerState:
    """The model, tokenizer and scheduler once loaded (in a background thread, so /health answers 503 meanwhile)."""

    def __init__(self, settings: ServeSettings, loader: Callable[[], tuple[Any, Any]]):
        self.settings, self.loader = settings, loader
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.model = self.tokenizer = self.scheduler = None
        self.created = int(time.time())
        self._embedder = None
        self._embedder_lock = threading.Lock()
        self._prefs_lock = threading.Lock()  # one append at a time, whichever worker thread runs it
        self._index_lock = threading.Lock()  # the index's encoder and SQLite connection: one worker thread at a time

    def load(self) -> None:
        try:
            model, tokenizer = self.loader()
            s = self.settings
            self.scheduler = Scheduler(model, tokenizer, max_batch=s.max_batch, max_queue=s.max_queue,
                                       timeout=s.timeout, metrics=self.metrics, prefill_tokens=s.prefill_tokens)
            self.model, self.tokenizer = model, tokenizer
            self.ready.set()
        except Exception as exc:  # reported by /health and every endpoint
            self.load_error = f"{type(exc).__name__}: {exc}"

    def require_ready(self) -> Scheduler:
        if self.load_error:
            raise ApiError(500, f"the model failed to load: {self.load_error}", type="server_error")
        if not self.ready.is_set():
            raise ApiError(503, "the model is still loading; retry shortly", type="server_error",
                           headers={"Retry-After": "1"})
        return self.scheduler

    def require_index(self):
        """The served index, or a 400 saying how to get one."""
        if self.settings.index is None:
            raise ApiError(400, "this server has no index: start it with lmlab serve MODEL --index INDEX "
                                "(an index from lmlab index build)", code="no_index")
        return self.settings.index

    def with_index(self, fn: Callable, *args, **kwargs):
        """fn(index, *args, **kwargs) holding the index lock (runs in a worker thread); LmlabError -> 400."""
        index = self.require_index()
        with self._index_lock:
            return fn(index, *args, **kwargs)

    def embedder(self) -> SentenceEmbedder:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = SentenceEmbedder()
            return self._embedder

    # --- prompts ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A prompt's ids, special tokens as the tokenizer's configuration says (like ``lmlab.generate``)."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def resolve(self, config: GenerationConfig) -> GenerationConfig:
        return resolve_config(self.model, config, self.tokenizer)

    def check_window(self, prompt_ids: list[int], max_tokens: int, field: str = "max_tokens") -> None:
        window = self.scheduler.context_window
        if len(prompt_ids) + max_tokens > window:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and {field}={max_tokens}: "
                                f"{len(prompt_ids) + max_tokens} exceeds the context window of {window} tokens",
                           field if len(prompt_ids) < window else "prompt", code="context_length_exceeded")

    def summarize_prompt(self, dialogue: str, recipe: str, max_tokens: int):
        """The lab's prompt for `recipe` -> (Prompt, whether it uses the chat template). Runs in a worker
        thread: nearest shots embed with MiniLM."""
        window = self.scheduler.context_window
        chat = getattr(self.tokenizer, "chat_template", None) is not None
        if recipe == "fine-tuned":
            tuned = self.settings.finetuned
            chat = chat if tuned.chat is None else tuned.chat
            return tuned.prompt(dialogue, self.tokenizer, max_prompt_tokens=window - max_tokens), chat
        k = SUMMARY_RECIPES[recipe]
        shots, embedder = [], None
        method = self.settings.shot_method
        if k:
            pool = [Example(d.dialogue, d.references[0]) for d in load_sample().records if d.references]
            embedder = self.embedder() if method == "nearest" else None
            shots = select_shots(dialogue, pool, k, method=method, embedder=embedder)
        prompt = build_prompt(dialogue, shots, template="instruction", tokenizer=self.tokenizer, chat=chat,
                              instruction=INSTRUCTION, embedder=embedder, context_window=window,
                              max_new_tokens=max_tokens)
        return prompt, chat

    def append_preference(self, pair: PreferencePair) -> int:
        """Append a person's choice to --prefs-out -> the records the file holds now."""
        with self._prefs_lock:
            append_preference(self.settings.prefs_out, pair)
            with open(self.settings.prefs_out, encoding="utf-8") as f:
                return sum(1 for line in f if line.strip())


# --- running requests ------------------------------------------------------------------------------
async def _watch_disconnect(request: Request) -> None:
    """Returns when the client goes away (the ASGI server sends http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ChoiceRun:
    """The scheduler ``Sequence``s of one API call (one per choice), submitted at once, and their events as
    they come.

    Submitting happens in the constructor, before any response starts, so a full queue is still a
    429 rather than a broken stream. Leaving ``events()`` early (the client disconnected, the stream was
    cancelled) cancels whatever is still running, which frees its KV-cache slot.
    """

    def __init__(self, state: ServerState, prompts: list[list[int]], configs: list):
        self.scheduler = state.require_ready()
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles: list[Sequence] = []
        emits = [(lambda event, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, event)))
                 for i in range(len(prompts))]
        try:  # queued at once: the choices of one prompt share its prefill
            self.handles = self.scheduler.submit_many(prompts, configs, emits)
        except QueueFull as exc:
            self.cancel()
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except Closing as exc:
            self.cancel()
            raise ApiError(503, str(exc), type="server_error", headers={"Retry-After": "5"}) from None
        except LmlabError as exc:
            self.cancel()
            raise ApiError(400, str(exc), "prompt") from None

    @property
    def prompt_tokens(self) -> int:
        return sum(h.prompt_tokens for h in self.handles)

    @property
    def completion_tokens(self) -> int:
        return sum(h.completion_tokens for h in self.handles)

    def cancel(self) -> None:
        for h in self.handles:
            if h.finish_reason is None:
                self.scheduler.cancel(h)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has ended."""
        open_choices = len(self.handles)
        try:
            while open_choices:
                i, event = await self.queue.get()
                if event.kind != "text":
                    open_choices -= 1
                yield i, event
        finally:
            self.cancel()

    async def collect(self, request: Request) -> tuple[list[str], list[str | None]] | None:
        """Run every choice to its end -> (texts, finish reasons); None when the client left meanwhile."""
        texts = [""] * len(self.handles)
        reasons: list[str | None] = [None] * len(self.handles)
        errors = []

        async def consume():
            async for i, event in self.events():
                if event.kind == "text":
                    texts[i] += event.text
                elif event.kind == "done":
                    reasons[i] = event.finish_reason
                else:
                    errors.append(event.error)

        work = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_watch_disconnect(request))
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if not work.done():  # the client left: cancel the requests and stop waiting
            self.cancel()
            work.cancel()
            return None
        if errors:
            raise ApiError(500, f"generation failed: {errors[0]}", type="server_error")
        return texts, reasons


# --- responses -------------------------------------------------------------------------------------
def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _error_event(message: str) -> dict:
    return ApiError(500, message, type="server_error").body()


def sse_response(run: ChoiceRun, render: Callable[[int, Event], dict | None], before: list[dict] | None = None,
                 after: Callable[[], list[dict]] | None = None) -> StreamingResponse:
    """The one SSE stream of every endpoint: `before` events, then each choice's events rendered by
    `render(choice index, text or done event)` (None sends nothing; an error event is sent OpenAI-shaped),
    then `after()`'s events (called once every choice has ended), then ``data: [DONE]``."""

    async def events() -> AsyncIterator[str]:
        for payload in before or []:
            yield _sse(payload)
        async for i, event in run.events():
            payload = _error_event(event.error) if event.kind == "error" else render(i, event)
            if payload is not None:
                yield _sse(payload)
        for payload in after() if after is not None else []:
            yield _sse(payload)
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion(id: str, object: str, created: int, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    """The body of a completion, a chat completion, or one of their stream chunks."""
    out = {"id": id, "object": object, "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


# --- route plumbing ----------------------------------------------------------------------------------
def route(handler: Callable[[Request, ServerState], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint from `handler(request, state)`: the API key on /v1/ paths, ApiError -> its response."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        state: ServerState = request.app.state.lmlab
        try:
            key = state.settings.api_key
            if key and request.url.path.startswith("/v1/") and request.headers.get("authorization", "") != f"Bearer {key}":
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               type="authentication_error", code="invalid_api_key")
            return await handler(request, state)
        except ApiError as exc:
            return exc.response()

    return endpoint


async def body_of(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: dict) -> None:
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise ApiError(400, f"model={name!r} must be a string", "model")


def choices_count(body: dict) -> int:
    return _number(body, "n", 1, 1, MAX_N, integer=True)


def include_usage(body: dict) -> bool:
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options={options!r} must be an object", "stream_options")
    return bool(options.get("include_usage", False))


def chat_messages(body: dict, state: ServerState) -> list[dict]:
    """The chat request's messages, validated -> [{role, content}] with text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages={messages!r} must be a non-empty list of {{role, content}} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] must be an object with role system, user or assistant",
                           f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": content})
    if getattr(state.tokenizer, "chat_template", None) is None:
        raise ApiError(400, f"model {state.settings.model_name!r} has no chat template; use /v1/completions", "messages")
    return clean


def chat_prompt_ids(clean: list[dict], state: ServerState) -> list[int]:
    """Chat messages through the checkpoint's chat template -> prompt ids."""
    try:
        text = state.tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    except LmlabError as exc:
        raise ApiError(400, str(exc), "messages") from None
    return state.encode(text)


async def collect_or_499(run: ChoiceRun, request: Request) -> tuple[list[str], list[str | None]] | Response:
    """Every choice's (texts, finish reasons), or a 499 response when the client left meanwhile."""
    result = await run.collect(request)
    return Response(status_code=499) if result is None else result  # 499: nobody reads it, the client is gone


# --- route handlers ------------------------------------------------------------------------------------
@route
async def health(request: Request, state: ServerState) -> Response:
    if state.load_error:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=500)
    if not state.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
    if state.scheduler.error:
        return JSONResponse({"status": "error", "error": state.scheduler.error}, status_code=500)
    return JSONResponse({"status": "ok", "model": state.settings.model_name})


@route
async def metrics(request: Request, state: ServerState) -> Response:
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


@route
async def models(request: Request, state: ServerState) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": state.settings.model_name, "object": "model", "created": state.created, "owned_by": "lmlab"}]})


@route
async def completions(request: Request, state: ServerState) -> Response:
    body = await body_of(request)
    state.require_ready()
    check_model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise ApiError(400, f"prompt={prompt!r} must be a string or a non-empty list of strings", "prompt")
    n = choices_count(body)
    stream = _bool(body, "stream")
    constraint = await response_constraint(body, state, n)
    configs = [state.resolve(c.replace(constraint=constraint)) for c in _configs_or_400(body, 16, n)]
    ids = [state.encode(p) for p in prompts]
    for row in ids:
        if not row:
            raise ApiError(400, "prompt is empty: it needs at least one token", "prompt")
        state.check_window(row, configs[0].max_new_tokens)
    if stream:
        include_usage(body)  # validated; usage is always sent
    # choice k = prompt k // n, sample k % n (OpenAI's order)
    run = ChoiceRun(state, [row for row in ids for _ in range(n)], [configs[j] for _ in ids for j in range(n)])
    prompt_tokens = sum(len(r) for r in ids)
    body_of_chunk = functools.partial(_completion, f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()),
                                      state.settings.model_name)

    def choice(i: int, text: str, finish_reason: str | None) -> dict:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}

    if stream:
        return sse_response(
            run, lambda i, e: body_of_chunk([choice(i, e.text, e.finish_reason)]),
            after=lambda: [body_of_chunk([], _usage(prompt_tokens, run.completion_tokens))])  # OpenAI: only with include_usage
    result = await collect_or_499(run, request)
    if isinstance(result, Response):
        return result
    choices = [choice(i, t, r) for i, (t, r) in enumerate(zip(*result))]
    return JSONResponse(body_of_chunk(choices, _usage(prompt_tokens, run.completion_tokens)))


@route
async def chat(request: Request, state: ServerState) -> Response:
    body = await body_of(request)
    state.require_ready()
    check_model(body)
    n = choices_count(body)
    stream = _bool(body, "stream")
    messages = chat_messages(body, state)
    retrieval = retrieval_options(body)
    ids = chat_prompt_ids(messages, state)
    default = max(1, min(256, state.scheduler.context_window - len(ids)))
    constraint = await response_constraint(body, state, n)
    configs = [state.resolve(c.replace(constraint=constraint))
               for c in _configs_or_400(body, default, n, "max_completion_tokens")]
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sources = None
    if retrieval is not None:
        state.require_index()
        budget = state.scheduler.context_window - configs[0].max_new_tokens
        try:
            messages, sources = await asyncio.to_thread(state.with_index, grounded, messages, state.tokenizer,
                                                        budget=budget, **retrieval)
        except LmlabError as exc:
            raise ApiError(400, f"retrieval: {exc}", "retrieval") from None
        ids = chat_prompt_ids(messages, state)
    state.check_window(ids, configs[0].max_new_tokens, field)
    extra = {} if sources is None else {"sources": [h.to_dict() for h in sources]}
    if stream:
        include_usage(body)  # validated; usage is always sent
    run = ChoiceRun(state, [ids] * n, configs)
    rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.settings.model_name
    if stream:
        chunk = functools.partial(_completion, rid, "chat.completion.chunk", created, name)

        def delta(i: int, event: Event) -> dict:
            content = {"content": event.text} if event.kind == "text" else {}
            return chunk([{"index": i, "delta": content, "logprobs": None, "finish_reason": event.finish_reason}])

        roles = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]) for i in range(n)]
        return sse_response(run, delta, before=roles,
                            after=lambda: [{**chunk([], _usage(len(ids), run.completion_tokens)), **extra}])
    result = await collect_or_499(run, request)
    if isinstance(result, Response):
        return result
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(*result))]
    return JSONResponse({**_completion(rid, "chat.completion", created, name, choices,
                                       _usage(len(ids), run.completion_tokens)), **extra})


@route
async def summarize(request: Request, state: ServerState) -> Response:
    body = await body_of(request)
    state.require_ready()
    settings = state.settings
    dialogue = body.get("dialogue")
    if not isinstance(dialogue, str) or not dialogue.strip():
        raise ApiError(400, "dialogue must be a non-empty string (#Person1#: ... one turn per line)", "dialogue")
    recipe = body.get("recipe", settings.default_recipe)
    if recipe not in SUMMARY_RECIPES:
        raise ApiError(400, f"recipe={recipe!r} is not valid; choose one of: {', '.join(SUMMARY_RECIPES)}", "recipe")
    if recipe not in settings.recipes:
        raise ApiError(400, "recipe='fine-tuned' needs a fine-tuned summarizer: a server started with the shipped "
                            "adapter, --adapter DIR (a LoRA summarizer from lmlab finetune), or a fine-tuned model",
                       "recipe")
    stream = _bool(body, "stream")
    body, best_of = _summary_decoding(body, recipe, settings)
    config = _configs_or_400(body, 64, 1)[0]
    if best_of > 1 and not config.do_sample:
        raise ApiError(400, f"best_of={best_of} needs temperature > 0: {best_of} greedy summaries are one text",
                       "temperature")
    try:
        prompt, chat = await asyncio.to_thread(state.summarize_prompt, dialogue.strip(), recipe, config.max_new_tokens)
    except LmlabError as exc:
        raise ApiError(400, str(exc), "dialogue") from None
    config = state.resolve(config.replace(stop_strings=config.stop_strings + list(
        CHAT_STOP_STRINGS if chat else STOP_STRINGS)))
    ids = state.encode(prompt.text)
    state.check_window(ids, config.max_new_tokens)
    if best_of > 1:  # minimum Bayes risk: best_of samples, the consensus kept (lmlab.align.mbr)
        return await _summarize_mbr(request, state, dialogue, recipe, prompt, ids, config, best_of, stream)
    run = ChoiceRun(state, [ids], [config])

    def final(text: str, reason: str | None) -> dict:
        return {"object": "summary", "model": settings.model_name, "recipe": recipe, "shots": len(prompt.shots),
                "notes": prompt.notes, "summary": clean_summary(text), "finish_reason": reason, "best_of": 1,
                "usage": _usage(len(ids), run.completion_tokens)}

    if stream:
        texts, reasons = [""], [None]

        def delta(i: int, event: Event) -> dict | None:
            if event.kind == "done":
                reasons[0] = event.finish_reason
                return None
            texts[0] += event.text
            return {"delta": event.text}

        return sse_response(run, delta, after=lambda: [final(texts[0], reasons[0])])
    result = await collect_or_499(run, request)
    if isinstance(result, Response):
        return result
    return JSONResponse(final(result[0][0], result[1][0]))


def _summary_decoding(body: dict, recipe: str, settings: ServeSettings) -> tuple[dict, int]:
    """/v1/summarize's decoding -> (the body with sampling settings filled in, summaries to sample).

    ``best_of`` given: that many (1 to MAX_BEST_OF). Not given: the fine-tuned recipe's minimum Bayes risk
    (its ``mbr``: n samples with its temperature) when the request sets no ``temperature``, else one. With
    no ``temperature``, one summary is greedy (the lab's recipes), several take the recipe's sampling settings.
    """
    tuned = settings.finetuned if recipe == "fine-tuned" else None
    mbr = getattr(tuned, "mbr", None) or {}
    default = tuned.mbr_samples if mbr and "temperature" not in body else 1
    best_of = _number(body, "best_of", default, 1, MAX_BEST_OF, integer=True)
    if "temperature" not in body:
        sampling = {k: v for k, v in tuned.mbr_sampling.items() if k != "do_sample"} if mbr and best_of > 1 else {}
        body = {**sampling, **body, "temperature": sampling.get("temperature", 0)}
    return {k: v for k, v in body.items() if k != "best_of"}, best_of  # OpenAI's best_of means another thing


async def _summarize_mbr(request: Request, state: ServerState, dialogue: str, recipe: str, prompt, ids: list[int],
                         config, best_of: int, stream: bool) -> Response:
    """`best_of` samples of one summary prompt run as choices of one call; the one with the highest mean ROUGE
    against the others is the summary. A stream sends it as one delta once every sample has ended."""
    from lmlab.align.best_of_n import candidate_seeds
    from lmlab.align.mbr import MBRScorer

    base = config.seed if isinstance(config.seed, int) else 0  # seeded as `lmlab summarize --best-of N --mbr`
    run = ChoiceRun(state, [ids] * best_of, [config.replace(seed=s) for s in candidate_seeds(base, best_of)])

    async def pick(texts: list[str], reasons: list[str | None]) -> dict:
        candidates = [clean_summary(t) for t in texts]
        scores = await asyncio.to_thread(MBRScorer().score_candidates, dialogue, candidates)
        best = max(range(best_of), key=lambda k: (scores[k], -k))  # ties: the earliest, as best_of_n keeps
        return {"object": "summary", "model": state.settings.model_name, "recipe": recipe,
                "shots": len(prompt.shots), "notes": prompt.notes, "summary": candidates[best],
                "finish_reason": reasons[best], "best_of": best_of,
                "candidates": [{"summary": c, "mbr": round(v, 6), "finish_reason": r}
                               for c, v, r in zip(candidates, scores, reasons)],
                "usage": _usage(len(ids), run.completion_tokens)}

    if stream:
        async def events() -> AsyncIterator[str]:
            texts, reasons = [""] * best_of, [None] * best_of
            async for i, event in run.events():
                if event.kind == "error":
                    yield _sse(_error_event(event.error))
                elif event.kind == "text":
                    texts[i] += event.text
                else:
                    reasons[i] = event.finish_reason
            final = await pick(texts, reasons)
            yield _sse({"delta": final["summary"]})
            yield _sse(final)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await collect_or_499(run, request)
    if isinstance(result, Response):
        return result
    return JSONResponse(await pick(*result))


@route
async def dialogues(request: Request, state: ServerState) -> Response:
    settings = state.settings
    records = [{"id": d.id, "topic": d.topic, "dialogue": d.dialogue} for d in load_sample().records]
    tuned = settings.finetuned
    mbr = dict(getattr(tuned, "mbr", None) or {})  # the fine-tuned recipe's default decoding (the playground shows it)
    return JSONResponse({"recipes": settings.recipes, "default_recipe": settings.default_recipe, "dialogues": records,
                         "finetuned_mbr": mbr or None,
                         "preferences": settings.prefs_out is not None, "index": settings.index is not None})


@route
async def preferences(request: Request, state: ServerState) -> Response:
    """The playground's compare tab: a person's choice between two summaries, appended to --prefs-out."""
    body = await body_of(request)
    prefs_out = state.settings.prefs_out
    if prefs_out is None:
        raise ApiError(400, "this server records no preferences: start it with lmlab serve --prefs-out FILE")
    for name in ("prompt", "chosen", "rejected"):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise ApiError(400, f"{name} must be a non-empty string", name)
    source = body.get("source")
    if source is not None and not isinstance(source, str):
        raise ApiError(400, f"source must be a string, got {type(source).__name__}", "source")
    if body["chosen"] == body["rejected"]:
        raise ApiError(400, "chosen and rejected are the same text: there is no preference to record", "rejected")
    pair = PreferencePair(body["prompt"], body["chosen"], body["rejected"], source)
    try:
        records = await asyncio.to_thread(state.append_preference, pair)
    except (LmlabError, OSError) as exc:
        raise ApiError(500, f"could not append to {prefs_out}: {exc}", type="server_error") from None
    return JSONResponse({"object": "preference", "file": str(prefs_out), "records": records})


@route
async def inspection(request: Request, state: ServerState) -> Response:
    """The Inside tab: ``lmlab.inspect.inspect_request`` on the served model, plus, with ``dialogue`` (and
    ``summary``, else the fine-tuned summarizer writes it, greedy), ``summary_turns``: which turns the summary
    drew on (``lmlab.inspect.turns``). The recorded passes run on the model thread (``Scheduler.call``): the
    recorder's hooks live on the model's modules, so a decode step running meanwhile would fire them."""
    from lmlab.inspect import inspect_request
    from lmlab.inspect.api import FIELDS as INSPECT_FIELDS
    from lmlab.inspect.turns import turn_attention

    body = await body_of(request)
    scheduler = state.require_ready()
    dialogue, summary = body.pop("dialogue", None), body.pop("summary", None)
    prompt = None
    if dialogue is not None:
        if not isinstance(dialogue, str) or not dialogue.strip():
            raise ApiError(400, "dialogue must be a non-empty string (#Person1#: ... one turn per line)", "dialogue")
        if state.settings.finetuned is None:
            raise ApiError(400, "dialogue: tracing a summary to its turns needs the fine-tuned summarizer (a server "
                                "started with the shipped adapter or --adapter DIR)", "dialogue")
        if summary is not None and (not isinstance(summary, str) or not summary.strip()):
            raise ApiError(400, f"summary={summary!r} must be a non-empty string (or absent: the summarizer writes it)",
                           "summary")
        dialogue = dialogue.strip()
        body.setdefault("text", dialogue)
        try:
            prompt, chat = await asyncio.to_thread(state.summarize_prompt, dialogue, "fine-tuned", 64)
        except LmlabError as exc:
            raise ApiError(400, str(exc), "dialogue") from None
        if summary is None:
            config = state.resolve(GenerationConfig(max_new_tokens=64, do_sample=False, stop_strings=list(
                CHAT_STOP_STRINGS if chat else STOP_STRINGS)))
            ids = state.encode(prompt.text)
            state.check_window(ids, config.max_new_tokens)
            result = await collect_or_499(ChoiceRun(state, [ids], [config]), request)
            if isinstance(result, Response):
                return result
            summary = clean_summary(result[0][0])
            if not summary:
                raise ApiError(400, "the fine-tuned summarizer wrote an empty summary for this dialogue", "dialogue")
    elif summary is not None:
        raise ApiError(400, "summary needs the dialogue it summarizes (field dialogue)", "summary")

    def run() -> dict:
        out = inspect_request(state.model, state.tokenizer, body, name=state.settings.model_name)
        if prompt is not None:
            out["summary_turns"] = dict(turn_attention(state.model, state.tokenizer, prompt.text, summary, dialogue),
                                        adapter="fine-tuned")
        return out

    try:
        out = await asyncio.wrap_future(scheduler.call(run))
    except Closing as exc:
        raise ApiError(503, str(exc), type="server_error", headers={"Retry-After": "5"}) from None
    except LmlabError as exc:
        field = str(exc).split("=", 1)[0].split(" ", 1)[0]  # "top_k=...", "layer 40 is out of range" -> the field
        raise ApiError(400, str(exc), {"layer": "layers", "head": "layers"}.get(field, field)
                       if field in INSPECT_FIELDS | {"layer", "head"} else None) from None
    return JSONResponse(out)


@route
async def embeddings(request: Request, state: ServerState) -> Response:
    """OpenAI's embeddings endpoint over the index's encoder: the vectors ``lmlab.index.embed`` gives (unit
    length, mean pooling), as floats or base64 little-endian float32 (``encoding_format``)."""
    body = await body_of(request)
    encoder = state.require_index().encoder
    model = body.get("model")
    if model is not None and model != encoder.name:
        raise ApiError(400, f"model={model!r}: this server embeds with {encoder.name!r} (the index's encoder)",
                       "model")
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if (not isinstance(texts, list) or not 1 <= len(texts) <= MAX_EMBED_INPUTS
            or any(not isinstance(t, str) for t in texts)):
        raise ApiError(400, f"input must be a string or a list of 1 to {MAX_EMBED_INPUTS} strings (token ids are "
                            f"not supported), got {str(body.get('input'))[:60]!r}", "input")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ApiError(400, f"input[{i}] is empty", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"encoding_format={fmt!r} is not valid; choose float or base64", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and dims != encoder.dim:
        raise ApiError(400, f"dimensions={dims!r}: {encoder.name!r} gives {encoder.dim}-dimensional vectors only",
                       "dimensions")
    vectors, tokens = await asyncio.to_thread(state.with_index, _embed, texts)  # (N, D) float32

    def encode(v) -> list[float] | str:
        return v.tolist() if fmt == "float" else base64.b64encode(v.astype("<f4").tobytes()).decode()

    return JSONResponse({"object": "list", "model": encoder.name,
                         "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                                  for i, v in enumerate(vectors)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


@route
async def search(request: Request, state: ServerState) -> Response:
    """{query, k, mode, filter} -> the index's hits (documents, best first; ``lmlab index search --json``'s)."""
    body = await body_of(request)
    state.require_index()
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ApiError(400, f"query={query!r} must be a non-empty string", "query")
    unknown = set(body) - {"query", "k", "mode", "filter"}
    if unknown:
        raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}; /v1/search takes query, k, mode and filter",
                       sorted(unknown)[0])
    options = search_options(body)
    try:
        hits = await asyncio.to_thread(state.with_index, lambda index: index.search(query, **options))
    except LmlabError as exc:
        raise ApiError(400, str(exc), "filter" if "filter" in str(exc) else "query") from None
    return JSONResponse({"object": "search", "query": query, "mode": options["mode"],
                         "hits": [h.to_dict() for h in hits]})


@route
async def document(request: Request, state: ServerState) -> Response:
    """One indexed document, whole (the playground opens a cited source with it)."""
    state.require_index()
    doc_id = request.path_params["doc_id"]
    try:
        text, meta = await asyncio.to_thread(state.with_index, _document, doc_id)
    except LmlabError as exc:
        raise ApiError(404, str(exc), "id", code="not_found") from None
    return JSONResponse({"object": "document", "id": doc_id, "text": text, "meta": meta})


def _embed(index, texts: list[str]):
    encoder = index.encoder
    return encoder.embed(texts), sum(encoder.count_tokens(t) for t in texts)


def _document(index, doc_id: str) -> tuple[str, dict]:
    return index.document(doc_id), index.metadata(doc_id)


def grounded(index, messages: list[dict], tokenizer, budget: int, k: int, mode: str, filter) -> tuple[list, list]:
    """``lmlab.index.grounded_messages`` (imported when first asked for: it loads the retrieval stack)."""
    from lmlab.index import grounded_messages

    return grounded_messages(messages, tokenizer, index, budget, k=k, mode=mode, filter=filter)


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    """Load the model in a thread once the server is up (/health answers 503 meanwhile); after uvicorn has
    drained the HTTP requests, stop the model loop."""
    state: ServerState = app.state.lmlab
    threading.Thread(target=state.load, name="lmlab-load", daemon=True).start()
    yield
    if state.scheduler is not None:
        await asyncio.to_thread(state.scheduler.close, True)


ROUTES = [
    Route("/health", health),
    Route("/metrics", metrics),
    Route("/v1/models", models),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat, methods=["POST"]),
    Route("/v1/summarize", summarize, methods=["POST"]),
    Route("/v1/summarize/dialogues", dialogues),
    Route("/v1/preferences", preferences, methods=["POST"]),
    Route("/v1/inspect", inspection, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/search", search, methods=["POST"]),
    Route("/v1/documents/{doc_id:path}", document),
    Route("/", index),
    Mount("/static/inspect", StaticFiles(directory=INSPECT_STATIC), name="inspect-static"),  # the Inside tab's page
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
]


def create_app(settings: ServeSettings, loader: Callable[[], tuple[Any, Any]]) -> Starlette:
    """The Starlette app. `loader()` returns (model, tokenizer); it runs in a thread after start-up."""
    app = Starlette(routes=ROUTES, lifespan=lifespan)
    app.state.lmlab = ServerState(settings, loader)
    return app


def _configs_or_400(body: dict, default_max_tokens: int, n: int, max_tokens_field: str = "max_tokens") -> list:
    """generation_configs, with GenerationConfig's own validation errors as 400s."""
    try:
        return generation_configs(body, default_max_tokens, n, max_tokens_field)
    except LmlabError as exc:
        name = str(exc).split("=", 1)[0].strip()
        param = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}.get(name, name)
        raise ApiError(400, str(exc), param) from None
