"""Prompt engineering: zero/one/few-shot prompts from templates, shot selection, and a token budget.

* ``Example(input, output)``: one dialogue and (for shots) its summary.
* ``TEMPLATES``: how an example is written. ``build_prompt(query, shots, template=...)`` puts the shots
  (with their answers) before the query (without one); ``chat=True`` instead writes each shot as a
  user turn and an assistant turn, and the query as the last user turn, through the tokenizer's chat
  template (for instruct models).
* ``select_shots(query, pool, k, method=...)``: "indices", seeded "random", or "nearest" by cosine
  similarity of ``SentenceEmbedder`` vectors (mean-pooled MiniLM hidden states). Never the query itself.
* The budget: a prompt never silently exceeds ``max_prompt_tokens`` (usually context window minus
  max_new_tokens). First the shots least similar to the query are dropped (from the end without an
  embedder), then the query dialogue is cut from the middle, keeping its first and last turns around a
  ``[...]`` marker. What was dropped is written in ``Prompt.notes``. A template that cannot fit even
  with an empty query raises ``DataError`` with the numbers.

Templates, as text (``{x}`` the dialogue, ``{y}`` the summary; examples are joined by two blank lines):

* bare:         ``{x}`` (a shot adds ``\\n{y}``)
* instruction:  ``{instruction}\\n\\n`` once, then per example ``{x}\\n\\nSummary:`` (a shot adds `` {y}``)
* flan:         per example ``Dialogue:\\n\\n{x}\\n\\n{question}\\n`` (a shot adds ``{y}``),
                question ``What was going on?`` unless `instruction` replaces it
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import lmlab
from lmlab.errors import ConfigError, DataError, choices_error
from lmlab.generation import GenerationConfig, generate

TRUNCATION_MARKER = "[...]"
SHOT_SEPARATOR = "\n\n\n"


@dataclass
class Example:
    """A dialogue (`input`) and, for a shot, its reference summary (`output`)."""

    input: str
    output: str | None = None


@dataclass
class Prompt:
    """A built prompt and what it took to fit the budget."""

    text: str
    n_tokens: int | None  # None when built without a tokenizer
    shots: list[Example]  # the shots used, in prompt order
    dropped_shots: list[Example] = field(default_factory=list)
    truncated_query: bool = False
    notes: list[str] = field(default_factory=list)  # human-readable: what was dropped or cut, and why


# --- templates ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplate:
    """How one example is written (`block`), what comes before all examples (`header`).

    ``block(x, y)`` renders an example; with ``y=None`` it ends at the cue the model continues from.
    ``user(x)`` is the same example as a chat user turn (no cue-only formatting needed there).
    """

    name: str
    default_instruction: str | None = None

    def header(self, instruction: str | None) -> str:
        if self.name == "instruction":
            return (instruction or self.default_instruction) + "\n\n"
        if self.name == "bare" and instruction:
            return instruction + "\n\n"
        return ""

    def block(self, x: str, y: str | None, instruction: str | None = None) -> str:
        if self.name == "bare":
            return x if y is None else f"{x}\n{y}"
        if self.name == "instruction":
            return f"{x}\n\nSummary:" + ("" if y is None else f" {y}")
        question = instruction or self.default_instruction
        return f"Dialogue:\n\n{x}\n\n{question}\n" + ("" if y is None else y)

    def render(self, query: str, shots: Sequence[Example], instruction: str | None = None) -> str:
        blocks = [self.block(s.input, s.output or "", instruction) for s in shots]
        blocks.append(self.block(query, None, instruction))
        return self.header(instruction) + SHOT_SEPARATOR.join(blocks)

    def user(self, x: str, instruction: str | None = None) -> str:
        """The chat user turn for dialogue `x`: the instruction (or question) with the dialogue."""
        if self.name == "instruction":
            return f"{instruction or self.default_instruction}\n\n{x}"
        if self.name == "flan":
            return f"Dialogue:\n\n{x}\n\n{instruction or self.default_instruction}"
        return x if not instruction else f"{instruction}\n\n{x}"

    def messages(self, query: str, shots: Sequence[Example], instruction: str | None = None,
                 system: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system}] if system else []
        for s in shots:
            msgs += [{"role": "user", "content": self.user(s.input, instruction)},
                     {"role": "assistant", "content": s.output or ""}]
        msgs.append({"role": "user", "content": self.user(query, instruction)})
        return msgs


TEMPLATES: dict[str, PromptTemplate] = {
    "bare": PromptTemplate("bare"),
    "instruction": PromptTemplate("instruction", "Summarize the following conversation."),
    "flan": PromptTemplate("flan", "What was going on?"),
}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise choices_error("template", name, sorted(TEMPLATES))
    return TEMPLATES[name]


# --- building within a budget ------------------------------------------------------------------
def _render(template: PromptTemplate, query: str, shots: Sequence[Example], tokenizer, chat: bool,
            instruction: str | None, system: str | None) -> str:
    if not chat:
        return template.render(query, shots, instruction)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("chat=True needs a tokenizer with a chat_template; use chat=False for a plain-text prompt")
    return tokenizer.apply_chat_template(template.messages(query, shots, instruction, system), add_generation_prompt=True)


def _middle_cut(query: str, keep: int) -> tuple[str, int, str]:
    """Keep `keep` units of `query` (turns when it has several lines, else words): the first half and the
    last half around the marker -> (text, total units, unit name)."""
    lines = query.split("\n")
    units, sep, unit = (lines, "\n", "turns") if len(lines) > 1 else (query.split(" "), " ", "words")
    head = (keep + 1) // 2
    tail = keep - head
    kept = units[:head] + [TRUNCATION_MARKER] + (units[len(units) - tail:] if tail else [])
    return sep.join(kept), len(units), unit


def build_prompt(query: str, shots: Sequence[Example] = (), template: str = "instruction", tokenizer=None,
                 chat: bool = False, instruction: str | None = None, max_prompt_tokens: int | None = None,
                 embedder=None, system: str | None = None, context_window: int | None = None,
                 max_new_tokens: int = 0) -> Prompt:
    """Build the prompt for `query` with `shots`, fitted to the token budget.

    The budget is `max_prompt_tokens`, else ``context_window - max_new_tokens`` when a context window
    is given, else none. Budgets count tokens with `tokenizer` (required for a budget). With an
    `embedder` (``.embed(texts) -> (N, D)`` unit vectors) the shots least similar to the query are
    dropped first; without one, the last shots are.
    """
    tmpl = get_template(template)
    shots = list(shots)
    if max_prompt_tokens is None and context_window is not None:
        max_prompt_tokens = context_window - max_new_tokens
    if max_prompt_tokens is not None and tokenizer is None:
        raise ConfigError(f"max_prompt_tokens={max_prompt_tokens} needs a tokenizer to count tokens")

    def render(q: str, s: Sequence[Example]) -> str:
        return _render(tmpl, q, s, tokenizer, chat, instruction, system)

    def count(text: str) -> int | None:
        # counted as generation encodes the prompt: with the special tokens the tokenizer adds (BOS, </s>)
        return len(tokenizer.encode(text, add_special_tokens=True)) if tokenizer is not None else None

    text = render(query, shots)
    n = count(text)
    prompt = Prompt(text, n, shots)
    if max_prompt_tokens is None or n <= max_prompt_tokens:
        return prompt

    empty = count(render("", []))
    if empty > max_prompt_tokens:
        raise DataError(f"the {template!r} template{' (chat)' if chat else ''} alone takes {empty} tokens with an "
                        f"empty query, more than max_prompt_tokens={max_prompt_tokens}; raise the context window "
                        f"or lower max_new_tokens")

    # 1. drop shots, least similar to the query first (the last ones without an embedder)
    if shots:
        if embedder is not None:
            vectors = embedder.embed([query] + [s.input for s in shots])  # (1 + k, D) unit vectors
            similarity = (vectors[1:] @ vectors[0]).tolist()  # (k,) cosine similarity to the query
            drop_order = sorted(range(len(shots)), key=lambda i: similarity[i])
            drop_rule = "least similar to the query first"
        else:
            drop_order = list(range(len(shots) - 1, -1, -1))
            drop_rule = "from the end"
        dropped: set[int] = set()
        for i in drop_order:
            dropped.add(i)
            kept = [s for j, s in enumerate(shots) if j not in dropped]
            text = render(query, kept)
            n = count(text)
            if n <= max_prompt_tokens:
                break
        prompt.shots = [s for j, s in enumerate(shots) if j not in dropped]
        prompt.dropped_shots = [s for j, s in enumerate(shots) if j in dropped]
        prompt.notes.append(f"dropped {len(dropped)} of {len(shots)} shots ({drop_rule}) to fit "
                            f"max_prompt_tokens={max_prompt_tokens}")
        prompt.text, prompt.n_tokens = text, n
        if n <= max_prompt_tokens:
            return prompt

    # 2. cut the query from the middle: the most units (turns or words) that fit, by binary search
    best, total, unit = _middle_cut(query, 0)  # the marker alone
    if count(render(best, [])) > max_prompt_tokens:
        raise DataError(f"the {template!r} template with only the truncation marker takes "
                        f"{count(render(best, []))} tokens, more than max_prompt_tokens={max_prompt_tokens}")
    lo, hi = 0, total - 1  # invariant: keeping `lo` units fits; keeping all `total` does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = _middle_cut(query, mid)[0]
        if count(render(candidate, [])) <= max_prompt_tokens:
            lo, best = mid, candidate
        else:
            hi = mid - 1
    prompt.text = render(best, [])
    prompt.n_tokens = count(prompt.text)
    prompt.truncated_query = True
    prompt.notes.append(f"cut the query from the middle: kept {lo} of {total} {unit} around {TRUNCATION_MARKER!r} "
                        f"to fit max_prompt_tokens={max_prompt_tokens}")
    return prompt


fit_prompt = build_prompt  # the budget rules live inside build_prompt; this name reads better at call sites


# --- shot selection ----------------------------------------------------------------------------
SHOT_METHODS = ("random", "indices", "nearest")


def select_shots(query: str, pool: Sequence[Example], k: int, method: str = "random", seed: int = 0,
                 indices: Sequence[int] | None = None, embedder=None) -> list[Example]:
    """Pick `k` shots from `pool` for `query`; an example with the query's own input is never picked.

    random   seeded: the same (seed, pool, query) always gives the same shots
    indices  exactly ``pool[i] for i in indices`` (k must equal len(indices))
    nearest  the k most similar by cosine similarity of `embedder` vectors, most similar first
    """
    if method not in SHOT_METHODS:
        raise choices_error("method", method, SHOT_METHODS)
    if not isinstance(k, int) or k < 0:
        raise DataError(f"k={k!r} must be a non-negative integer")
    if k > len(pool):
        raise DataError(f"k={k} shots requested but the pool holds only {len(pool)} examples")
    key = query.strip()
    candidates = [i for i, ex in enumerate(pool) if ex.input.strip() != key]
    if method == "indices":
        if indices is None or len(indices) != k:
            raise DataError(f"method='indices' needs k={k} indices; got {None if indices is None else list(indices)}")
        for i in indices:
            if not 0 <= i < len(pool):
                raise DataError(f"shot index {i} is outside the pool of {len(pool)} examples")
            if pool[i].input.strip() == key:
                raise DataError(f"shot index {i} is the query itself")
        return [pool[i] for i in indices]
    if k > len(candidates):
        raise DataError(f"k={k} shots requested but the pool holds only {len(candidates)} examples "
                        f"other than the query ({len(pool)} in all)")
    if k == 0:
        return []
    if method == "random":
        return [pool[i] for i in random.Random(seed).sample(candidates, k)]
    if embedder is None:
        raise ConfigError("method='nearest' needs an embedder (e.g. SentenceEmbedder())")
    vectors = embedder.embed([query] + [pool[i].input for i in candidates])  # (1 + N, D) unit vectors
    similarity = vectors[1:] @ vectors[0]  # (N,) cosine similarity to the query
    order = similarity.argsort(descending=True, stable=True)[:k].tolist()
    return [pool[candidates[j]] for j in order]


class SentenceEmbedder:
    """Sentence vectors from an encoder: mean of the last hidden states over real tokens, L2-normalised
    (the sentence-transformers recipe for all-MiniLM-L6-v2). Embeddings are cached by text."""

    def __init__(self, source: str = "all-minilm-l6-v2", max_length: int = 256, batch_size: int = 32):
        self.model = lmlab.load_model(source)
        self.tokenizer = lmlab.load_tokenizer(source)
        self.max_length, self.batch_size = max_length, batch_size
        self._cache: dict[str, torch.Tensor] = {}

    def embed(self, texts: Sequence[str], progress: bool | None = None):
        """texts -> (N, D) float tensor of unit vectors."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        batches = range(0, len(todo), self.batch_size)
        show = progress if progress is not None else len(todo) > 4 * self.batch_size
        with torch.inference_mode():
            for start in tqdm(batches, desc="embedding", unit="batch", disable=not show):
                chunk = todo[start:start + self.batch_size]
                ids, mask = self.tokenizer.encode_batch(chunk, padding_side="right", add_special_tokens=True,
                                                        max_length=self.max_length, truncation_side="right")
                hidden = self.model.encode(ids, mask)  # (B, T, C)
                m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (B, C) mean over real tokens
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                for text, vec in zip(chunk, pooled):
                    self._cache[text] = vec.clone()
        if not texts:
            return torch.empty(0, 0)
        return torch.stack([self._cache[t] for t in texts])


# --- end to end --------------------------------------------------------------------------------
DIALOGUE_STOP_STRINGS = ["\n\n", "#Person1#:", "#Person2#:"]  # a plain-text summary ends at a blank line or a new turn


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """One user message (after an optional system message) in the tokenizer's chat template, ready to generate."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("this tokenizer has no chat_template; drop --chat to use the prompt as plain text")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def summarize(dialogue: str, model, tokenizer, pool: Sequence[Example] = (), k: int = 0, method: str = "random",
              template: str = "instruction", chat: bool | None = None, config=None, seed: int = 0,
              embedder=None, instruction: str | None = None) -> tuple[str, Prompt]:
    """Summarize one dialogue with k shots from `pool` -> (summary, the prompt used).

    `chat=None` uses the chat template when the tokenizer has one. Without chat, generation stops at
    a blank line or a new speaker turn. The prompt is fitted to the model's context window minus
    ``config.max_new_tokens``.
    """
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    config = config or GenerationConfig(max_new_tokens=96)
    if not chat and not config.stop_strings:
        config = config.replace(stop_strings=list(DIALOGUE_STOP_STRINGS))
    shots = select_shots(dialogue, pool, k, method=method, seed=seed, embedder=embedder) if k else []
    prompt = build_prompt(dialogue, shots, template=template, tokenizer=tokenizer, chat=chat, instruction=instruction,
                          embedder=embedder, context_window=model.config.max_seq_len,
                          max_new_tokens=config.max_new_tokens)
    summary = generate(model, tokenizer, prompt.text, config).strip()
    if summary.lower().startswith("summary:"):
        summary = summary[len("summary:"):].strip()
    return summary, prompt
