"""Answers grounded in an index: retrieve, give each hit a numbered source in the prompt, and check the citations.

``answer_with_sources(model, tokenizer, index, question)`` -> (prompt, sources): the prompt asks the model to
answer only from the sources, to cite them as ``[id]``, and to say ``NOT_FOUND`` (the phrase below) when they do
not hold the answer. Sources are added best first while the prompt fits the model's context window minus the
tokens reserved for the answer; a source that does not fit whole is cut at a turn boundary or dropped.
``check_citations(answer, sources)`` keeps the citations of retrieved ids and removes invented ones;
``CitationFilter`` does the same to a stream, piece by piece. ``grounded_answer`` streams a grounded answer,
``grounded_messages`` grounds a chat request's last user message (what ``lmlab serve`` does for
``"retrieval"``), and ``summarize_hits`` summarizes each retrieved document ("summarize everything about X").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from lmlab.errors import DataError

NOT_FOUND = "not found in the indexed dialogues"
INSTRUCTION = ("Answer the question using only the sources below. Cite the source of each fact with its id in "
               f"square brackets, like [{{example}}]. If the sources do not contain the answer, reply exactly: "
               f"{NOT_FOUND}.")
REMINDER = (f"Answer in one sentence that ends with the id of its source, like [{{example}}]. If no source answers "
            f"the question, reply: {NOT_FOUND}.")  # after the question: a small model follows the last words best
_CITATION = re.compile(r"\[([^\[\]\s]{1,80})\]")
_OPEN_CITATION = re.compile(r"\[[^\[\]\s]{0,80}")  # what may still become a citation once more text comes


def _body(question: str, sources: Sequence) -> str:
    example = sources[0].id if sources else "dev_1"
    body = INSTRUCTION.format(example=example) + "\n\n"
    body += "".join(f"Source [{s.id}]:\n{s.text}\n\n" for s in sources)
    return body + f"Question: {question}\n\n" + REMINDER.format(example=example)


def _render(tokenizer, question: str, sources: Sequence, chat: bool) -> str:
    body = _body(question, sources)
    if chat:
        from lmlab.prompting import chat_prompt

        return chat_prompt(tokenizer, body)
    return body + "\nAnswer:"


def _fit_sources(hits: Sequence, render: Callable[[list], str], tokenizer, budget: int) -> list:
    """The hits that fit: best first, each whole or cut after its last turn that fits (or left out), while
    ``render(sources)`` stays within `budget` tokens."""
    sources: list = []
    for hit in hits:
        turns = hit.text.split("\n")
        while turns:
            candidate = type(hit)(hit.id, hit.score, "\n".join(turns), hit.chunk, hit.meta)
            if len(tokenizer.encode(render(sources + [candidate]))) <= budget:
                sources.append(candidate)
                break
            turns = turns[:-1]
    return sources


def _check_question(question) -> None:
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"question {question!r} is empty")


def answer_with_sources(model, tokenizer, index, question: str, k: int = 4, max_new_tokens: int = 128,
                        mode: str = "hybrid", chat: bool | None = None, filter=None) -> tuple[str, list]:
    """Retrieve `k` documents for `question` and build the prompt -> (prompt, the hits used as sources).

    The prompt fits ``model.config.max_seq_len - max_new_tokens`` tokens: sources are taken best first; one
    that does not fit is cut after its last whole turn that fits, or left out.
    """
    _check_question(question)
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    budget = model.config.max_seq_len - max_new_tokens
    hits = index.search(question, k=k, mode=mode, filter=filter)
    sources = _fit_sources(hits, lambda s: _render(tokenizer, question, s, chat), tokenizer, budget)
    prompt = _render(tokenizer, question, sources, chat)
    if len(tokenizer.encode(prompt)) > budget:
        raise DataError(f"the question alone takes more than the {budget} tokens the prompt may hold "
                        f"(context {model.config.max_seq_len} - max_new_tokens {max_new_tokens})")
    return prompt, sources


def grounded_messages(messages: list[dict], tokenizer, index, budget: int, k: int = 4, mode: str = "hybrid",
                      filter=None) -> tuple[list[dict], list]:
    """A chat's messages with the last user message grounded -> (messages, sources).

    The last user message is the query; it is replaced by the instruction, the numbered sources and the
    question, with as many sources (best first, cut at turns) as keep the templated chat within `budget`
    tokens. The other messages are kept as they are.
    """
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise DataError("retrieval needs a user message to search for; the messages have none")
    last = users[-1]
    question = messages[last]["content"]
    _check_question(question)

    def render(sources: list) -> str:
        grounded = [dict(m) for m in messages]
        grounded[last]["content"] = _body(question, sources)
        return tokenizer.apply_chat_template(grounded, add_generation_prompt=True)

    sources = _fit_sources(index.search(question, k=k, mode=mode, filter=filter), render, tokenizer, budget)
    out = [dict(m) for m in messages]
    out[last]["content"] = _body(question, sources)
    return out, sources


def check_citations(answer: str, sources: Sequence) -> tuple[str, list[str], list[str]]:
    """-> (the answer with invented citations removed, ids cited that were retrieved, ids cited that were not)."""
    known = {s.id for s in sources}
    cited, invented = [], []

    def keep(match: re.Match) -> str:
        ident = match.group(1)
        if ident in known:
            if ident not in cited:
                cited.append(ident)
            return match.group(0)
        if ident not in invented:
            invented.append(ident)
        return ""

    clean = _CITATION.sub(keep, answer)
    return re.sub(r"[ \t]{2,}", " ", clean).strip(), cited, invented


class CitationFilter:
    """``check_citations`` for a stream: ``push(piece)`` -> the text safe to show now, with citations of ids
    that were not retrieved removed; text from a ``[`` that may still become a citation is held back until
    it is known. ``flush()`` returns what is held at the end. ``cited`` / ``invented`` as in check_citations."""

    def __init__(self, sources: Sequence):
        self.known = {s.id for s in sources}
        self.cited: list[str] = []
        self.invented: list[str] = []
        self.pending = ""

    def push(self, piece: str) -> str:
        self.pending += piece
        out = []
        while self.pending:
            at = self.pending.find("[")
            if at < 0:
                out.append(self.pending)
                self.pending = ""
                break
            out.append(self.pending[:at])
            rest = self.pending[at:]
            match = _CITATION.match(rest)
            if match:
                ident = match.group(1)
                bucket = self.cited if ident in self.known else self.invented
                if ident not in bucket:
                    bucket.append(ident)
                if ident in self.known:
                    out.append(match.group(0))
                self.pending = rest[match.end():]
            elif _OPEN_CITATION.fullmatch(rest):  # "[dev_1" : wait for the rest
                self.pending = rest
                break
            else:  # a bracket that cannot be a citation
                out.append("[")
                self.pending = rest[1:]
        return "".join(out)

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest


def is_not_found(answer: str) -> bool:
    """Whether the answer declines (says the sources do not hold it)."""
    return NOT_FOUND in answer.lower()


@dataclass
class Answer:
    """A grounded answer, filled in as ``grounded_answer`` streams it (``text``: without invented citations)."""

    question: str
    prompt: str
    sources: list
    text: str = ""
    cited: list[str] = field(default_factory=list)
    invented: list[str] = field(default_factory=list)

    @property
    def not_found(self) -> bool:
        return is_not_found(self.text)


def grounded_answer(model, tokenizer, index, question: str, k: int = 4, config=None, mode: str = "hybrid", filter=None,
        chat: bool | None = None) -> tuple[Answer, Iterator[str]]:
    """Retrieve, prompt with numbered sources, and stream the answer -> (Answer, its text in pieces).

    Pieces have invented citations removed already (``CitationFilter``); once the iterator is exhausted the
    Answer holds the whole text and the cited / invented ids. `config` defaults to greedy, 128 new tokens.
    """
    from lmlab.generation import GenerationConfig, stream

    config = config or GenerationConfig(max_new_tokens=128)
    prompt, sources = answer_with_sources(model, tokenizer, index, question, k=k, max_new_tokens=config.max_new_tokens,
                                          mode=mode, chat=chat, filter=filter)
    answer = Answer(question, prompt, sources)
    filt = CitationFilter(sources)

    def pieces() -> Iterator[str]:
        for piece in stream(model, tokenizer, prompt, config):
            shown = filt.push(piece)
            answer.text += shown
            if shown:
                yield shown
        shown = filt.flush()
        answer.text += shown
        if shown:
            yield shown
        answer.text = re.sub(r"[ \t]{2,}", " ", answer.text).strip()
        answer.cited, answer.invented = filt.cited, filt.invented

    return answer, pieces()


def summarize_hits(index, about: str, summarize: Callable[[str], str], k: int = 4, mode: str = "hybrid",
                   filter=None) -> list[tuple[str, str]]:
    """"Summarize everything about X": retrieve `k` documents for `about`, then `summarize(document text)`
    each whole document -> [(document id, summary)], best first (``lmlab ask --summarize`` passes the
    fine-tuned summarizer)."""
    _check_question(about)
    hits = index.search(about, k=k, mode=mode, filter=filter)
    return [(hit.id, summarize(index.document(hit.id))) for hit in hits]
