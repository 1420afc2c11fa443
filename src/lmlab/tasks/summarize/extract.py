"""An application of structured output: extract ``{speakers, topic, decision, amount}`` from a dialogue as JSON
that always parses and validates, and score each field against what the record's human summary states.

    lmlab extract --records 400:500          # SmolLM2-135M-Instruct on dev 400-499, with and without the grammar

Scoring (deterministic, per field; the summary is the reference, the topic label for ``topic``):

* ``speakers``  correct when the list is non-empty and every name in it occurs in the summary (case and ``#``
  ignored: ``Person1`` matches ``#Person1#``);
* ``topic``     correct when it shares a content word with the record's ``topic`` label (e.g. "shopping");
* ``decision``  ``null`` is correct when the summary states no decision (none of: decide, agree, will, choose,
  plan, going to, promise, accept, refuse); a text is correct when at least half of its content words occur
  in the summary;
* ``amount``    ``null`` is correct when the summary holds no number; a number is correct when the summary
  holds that number (digits, or one to twenty in words).

A field of an output that does not parse as the schema's JSON counts as wrong: that is what the unconstrained
run loses, and the grammar prevents.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["speakers", "topic", "decision", "amount"],
    "properties": {
        "speakers": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 4},
        "topic": {"type": "string", "maxLength": 40},
        "decision": {"type": ["string", "null"], "maxLength": 120},
        "amount": {"type": ["number", "null"], "minimum": 0, "maximum": 1000000},
    },
}
FIELDS = ("speakers", "topic", "decision", "amount")

INSTRUCTION = ("Read the dialogue and answer with a JSON object with these keys:\n"
               '"speakers": the people talking (their names, or #Person1# and #Person2# when no name is given),\n'
               '"topic": the topic in two or three words,\n'
               '"decision": what was decided or agreed in one short sentence, or null,\n'
               '"amount": the main number or price mentioned, or null.\n\nDialogue:\n')

_STOP = {"a", "an", "the", "of", "to", "and", "or", "in", "on", "at", "for", "with", "is", "are", "was", "be",
         "will", "that", "this", "it", "his", "her", "their", "they", "he", "she", "i", "you", "we", "about", "by"}
_DECISION_WORDS = re.compile(r"\b(decide[sd]?|agree[sd]?|will|choose|chooses|chose|plan[s]?|going to|promise[sd]?|"
                             r"accept[sed]*|refuse[sd]?)\b", re.I)
_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                            "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"
                                            .split())}


def extraction_prompt(tokenizer, dialogue: str) -> str:
    from lmlab.prompting import chat_prompt

    return chat_prompt(tokenizer, INSTRUCTION + dialogue)


def extraction_constraint(model, tokenizer):
    from lmlab.generation.constrain import Constraint
    from lmlab.generation.decode import resolve_config

    eos = resolve_config(model, None, tokenizer).eos_token_ids
    return Constraint(tokenizer, SCHEMA, vocab_size=model.config.vocab_size, eos_token_ids=eos)


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower().replace("#", "")) if w not in _STOP]


def _numbers(text: str) -> set[float]:
    text = re.sub(r"#Person\d+#", " ", text)  # speaker tags are not amounts
    found = {float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text)}
    found |= {float(_NUMBER_WORDS[w]) for w in re.findall(r"[a-z]+", text.lower()) if w in _NUMBER_WORDS}
    return found


def score_fields(value: Any, summary: str, topic: str) -> dict[str, bool]:
    """Which fields of one extraction agree with the summary (and topic label); see the module docstring."""
    if not isinstance(value, dict):
        return {f: False for f in FIELDS}
    summary_norm = summary.lower().replace("#", "")
    out = {}
    speakers = value.get("speakers")
    out["speakers"] = (isinstance(speakers, list) and bool(speakers) and all(
        isinstance(s, str) and s.strip() and s.lower().replace("#", "").strip() in summary_norm for s in speakers))
    t = value.get("topic")
    out["topic"] = isinstance(t, str) and bool(set(_words(t)) & set(_words(topic)))
    d = value.get("decision", "missing")
    if d is None:
        out["decision"] = _DECISION_WORDS.search(summary) is None
    elif isinstance(d, str) and _words(d):
        words = _words(d)
        out["decision"] = sum(w in set(_words(summary)) for w in words) >= len(words) / 2
    else:
        out["decision"] = False
    a = value.get("amount", "missing")
    numbers = _numbers(summary)
    if a is None:
        out["amount"] = not numbers
    else:
        out["amount"] = isinstance(a, (int, float)) and not isinstance(a, bool) and float(a) in numbers
    return out


@dataclass
class ExtractionResult:
    """One run over the records: per-record outputs and scores, and the totals."""

    constrained: bool
    outputs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def parsed(self) -> float:
        return sum(o["valid"] for o in self.outputs) / max(1, len(self.outputs))

    def field_accuracy(self) -> dict[str, float]:
        n = max(1, len(self.outputs))
        acc = {f: sum(o["correct"][f] for o in self.outputs) / n for f in FIELDS}
        acc["all fields"] = sum(acc[f] for f in FIELDS) / len(FIELDS)
        return acc


def run_extraction(records: list[dict[str, Any]], model, tokenizer, constrained: bool = True, batch_size: int = 8,
                   max_new_tokens: int = 96, progress: bool = False) -> ExtractionResult:
    """Extract from every record's dialogue (greedy), with the grammar or without, and score against its summary."""
    import jsonschema
    from tqdm.auto import tqdm

    from lmlab.generation import GenerationConfig, generate

    constraint = extraction_constraint(model, tokenizer) if constrained else None
    config = GenerationConfig(max_new_tokens=max_new_tokens, constraint=constraint)
    result = ExtractionResult(constrained)
    start = time.perf_counter()
    for b in tqdm(range(0, len(records), batch_size), disable=not progress, desc="extracting", unit="batch"):
        batch = records[b:b + batch_size]
        texts = generate(model, tokenizer, [extraction_prompt(tokenizer, r["dialogue"]) for r in batch], config)
        for r, text in zip(batch, texts):
            try:
                value = json.loads(text)
                jsonschema.validate(value, SCHEMA)
                valid = True
            except (json.JSONDecodeError, jsonschema.ValidationError):
                value, valid = None, False
            result.outputs.append({"id": r.get("fname"), "output": text, "valid": valid, "value": value,
                                   "correct": score_fields(value, r["summary"], r.get("topic", ""))})
    result.seconds = time.perf_counter() - start
    return result


def report(results: list[ExtractionResult], n: int) -> str:
    lines = [f"extraction of {{speakers, topic, decision, amount}} from {n} dialogues, share of fields correct "
             "against the summaries:", "",
             "| decoding | valid JSON | speakers | topic | decision | amount | all fields | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        acc = r.field_accuracy()
        lines.append(f"| {'grammar (json_schema)' if r.constrained else 'free text'} | {r.parsed:.2f} | "
                     + " | ".join(f"{acc[f]:.2f}" for f in (*FIELDS, "all fields")) + f" | {r.seconds:.0f} |")
    return "\n".join(lines)
