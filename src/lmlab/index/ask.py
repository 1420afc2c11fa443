"""Answers grounded in an index: retrieve, give each hit a numbered source in the prompt, and check the citations.

``answer_with_sources(model, tokenizer, index, question)`` -> (prompt, sources): the prompt asks the model to
answer only from the sources, to cite them as ``[id]``, and to say ``NOT_FOUND`` (the phrase below) when they do
not hold the answer. Sources are added best first while the prompt fits the model's context window minus the
tokens reserved for the answer; a source that does not fit whole is cut at a turn boundary or dropped.
``check_citations(answer, sources)`` keeps the citations of retrieved ids and removes invented ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lmlab.errors import DataError

NOT_FOUND = "not found in the indexed dialogues"
INSTRUCTION = ("Answer the question using only the sources below. Cite the source of each fact with its id in "
               f"square brackets, like [{{example}}]. If the sources do not contain the answer, reply exactly: "
               f"{NOT_FOUND}.")
_CITATION = re.compile(r"\[([^\[\]\s]{1,80})\]")


def _render(tokenizer, question: str, sources: Sequence, chat: bool) -> str:
    example = sources[0].id if sources else "dev_1"
    body = INSTRUCTION.format(example=example) + "\n\n"
    body += "".join(f"Source [{s.id}]:\n{s.text}\n\n" for s in sources)
    body += f"Question: {question}"
    if chat:
        from lmlab.prompting import chat_prompt

        return chat_prompt(tokenizer, body)
    return body + "\nAnswer:"


def answer_with_sources(model, tokenizer, index, question: str, k: int = 4, max_new_tokens: int = 128,
                        mode: str = "hybrid", chat: bool | None = None) -> tuple[str, list]:
    """Retrieve `k` documents for `question` and build the prompt -> (prompt, the hits used as sources).

    The prompt fits ``model.config.max_seq_len - max_new_tokens`` tokens: sources are taken best first; one
    that does not fit is cut after its last whole turn that fits, or left out.
    """
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"question {question!r} is empty")
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    budget = model.config.max_seq_len - max_new_tokens
    hits = index.search(question, k=k, mode=mode)
    sources: list = []
    for hit in hits:
        turns = hit.text.split("\n")
        while turns:
            candidate = type(hit)(hit.id, hit.score, "\n".join(turns), hit.chunk, hit.meta)
            if len(tokenizer.encode(_render(tokenizer, question, sources + [candidate], chat))) <= budget:
                sources.append(candidate)
                break
            turns = turns[:-1]
    prompt = _render(tokenizer, question, sources, chat)
    if len(tokenizer.encode(prompt)) > budget:
        raise DataError(f"the question alone takes more than the {budget} tokens the prompt may hold "
                        f"(context {model.config.max_seq_len} - max_new_tokens {max_new_tokens})")
    return prompt, sources


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


def is_not_found(answer: str) -> bool:
    """Whether the answer declines (says the sources do not hold it)."""
    return NOT_FOUND in answer.lower()
