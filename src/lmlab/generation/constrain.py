"""Structured output: a grammar over the tokenizer's vocabulary that decoding must follow.

``Constraint`` compiles a JSON schema (or "any JSON object") once per request with ``llguidance`` (chosen by
measurement over ``outlines-core``, see docs/structured.md); ``RowMatcher`` follows one generated
sequence through it and gives, at each step, the set of tokens that keep the text a valid prefix of a
document the grammar accepts. ``processors.GrammarConstraint`` applies it as one step of the logits chain
(each batch row its own matcher), so greedy, sampling, batching and streaming all keep to the grammar.
Once the grammar is complete the only allowed tokens are the end-of-sequence ids.

JSON is generated with fixed separators, ``", "`` and ``": "`` (what ``json.dumps`` writes, so what a model has
seen most) and no other whitespace between tokens, which stops a small model from wandering into endless
whitespace. Output is guaranteed to parse and validate unless generation hits ``max_new_tokens``
first: ``parse_output`` then says so.

    c = Constraint.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": S}}, tok)
    text = lmlab.generate(model, tok, prompt, GenerationConfig(max_new_tokens=200, constraint=c))
    value = c.parse_output(text)   # the parsed object; validated against S
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import ConfigError, DataError

_LL_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], Any] = {}


def _ll_tokenizer(tokenizer, vocab_size: int, eos_ids: Sequence[int]):
    """llguidance's view of `tokenizer` (built once per tokenizer, vocabulary size and eos ids: ~0.5 s)."""
    import llguidance

    key = (id(tokenizer), vocab_size, tuple(eos_ids))
    if key not in _LL_TOKENIZERS:
        backend = getattr(tokenizer, "backend", tokenizer)  # lmlab.Tokenizer or a `tokenizers.Tokenizer`
        _LL_TOKENIZERS[key] = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))
    return _LL_TOKENIZERS[key]


def load_schema(source: str | Path | dict) -> dict:
    """A JSON schema from a dict, a file path, or JSON text; not-JSON is an error naming the source."""
    if isinstance(source, dict):
        return source
    text, where = str(source), "schema"
    path = Path(text)
    if not text.lstrip().startswith(("{", "[")):
        if not path.is_file():
            raise ConfigError(f"schema file {text!r} does not exist")
        text, where = path.read_text(encoding="utf-8"), f"schema file {str(path)!r}"
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{where} must be a JSON object (a JSON schema), got {type(schema).__name__}")
    return schema


def check_schema(schema: dict) -> None:
    """Raise ConfigError naming the problem if `schema` is not a valid JSON schema (draft 2020-12)."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "(root)"
        raise ConfigError(f"invalid JSON schema at {where}: {exc.message}") from None


class Constraint:
    """A compiled grammar: ``json_schema`` (a JSON schema dict) or ``json_object`` (any JSON object).

    Immutable and shared: every row that follows it gets its own ``RowMatcher`` (``new_matcher()``).
    """

    def __init__(self, tokenizer, schema: dict | None = None, kind: str = "json_schema",
                 vocab_size: int | None = None, eos_token_ids: Sequence[int] | None = None):
        import llguidance

        if kind not in ("json_schema", "json_object"):
            raise ConfigError(f"constraint kind={kind!r} is not valid; choose one of: json_schema, json_object")
        if kind == "json_schema":
            if not isinstance(schema, dict):
                raise ConfigError(f"a json_schema constraint needs a schema object, got {schema!r}")
            check_schema(schema)
        else:
            schema = {"type": "object"}
        self.kind, self.schema = kind, schema
        eos = list(eos_token_ids) if eos_token_ids else [tokenizer.eos_token_id]
        if any(e is None for e in eos):
            raise ConfigError("a constraint needs the tokenizer's end-of-sequence id (the grammar ends with it)")
        self.vocab_size = int(vocab_size or tokenizer.vocab_size)
        self.eos_token_ids = eos
        self._ll_tok = _ll_tokenizer(tokenizer, self.vocab_size, eos)
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self.grammar, self._ll_tok)
        if is_error:
            raise ConfigError(f"unsupported JSON schema: {messages[0]}")

    @classmethod
    def from_response_format(cls, response_format: dict, tokenizer, vocab_size: int | None = None,
                             eos_token_ids: Sequence[int] | None = None) -> "Constraint | None":
        """OpenAI's ``response_format``: ``{"type": "text"}`` (-> None), ``{"type": "json_object"}``, or
        ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``; anything else is an error."""
        if not isinstance(response_format, dict):
            raise ConfigError(f"response_format must be an object, got {response_format!r}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(tokenizer, kind="json_object", vocab_size=vocab_size, eos_token_ids=eos_token_ids)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ConfigError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}; "
                                  f"got {spec!r}")
            return cls(tokenizer, spec["schema"], vocab_size=vocab_size, eos_token_ids=eos_token_ids)
        raise ConfigError(f"response_format type={kind!r} is not valid; choose one of: text, json_object, json_schema")

    def new_matcher(self) -> "RowMatcher":
        return RowMatcher(self)

    def parse_output(self, text: str) -> Any:
        """The generated text -> the parsed value, validated against the schema. A text that does not parse
        can only be a generation cut short by ``max_new_tokens``: the error says so."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"the output is not complete JSON ({exc.msg} at column {exc.colno}): generation "
                            f"stopped before the grammar finished; raise max_new_tokens. Output: {text[:80]!r}"
                            ) from None
        if self.kind == "json_schema":
            import jsonschema

            jsonschema.validate(value, self.schema)
        return value

    def __deepcopy__(self, memo) -> "Constraint":  # immutable: GenerationConfig copies share it
        return self

    def __repr__(self) -> str:
        return f"Constraint({self.kind}, {json.dumps(self.schema)[:60]})"


class RowMatcher:
    """One sequence's position in a grammar: ``advance(token)`` after each generated token, ``allowed()`` the
    (V,) bool mask of tokens that may come next. After an end-of-sequence token (or a grammar error, which a
    masked decode never produces) the row is ``done`` and ``allowed()`` returns None: no constraint."""

    def __init__(self, constraint: Constraint):
        import llguidance

        self.constraint = constraint
        self.matcher = llguidance.LLMatcher(constraint._ll_tok, constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise ConfigError(f"unsupported JSON schema: {self.matcher.get_error()}")
        self.done = False
        self._bitmask = torch.zeros((constraint._ll_tok.vocab_size + 31) // 32, dtype=torch.int32)  # a bit per token

    def advance(self, token: int) -> None:
        if self.done:
            return
        if token in self.constraint.eos_token_ids or self.matcher.is_stopped():
            self.done = True
            return
        if not self.matcher.consume_token(int(token)):
            raise DataError(f"token {token} is not allowed by the grammar here: {self.matcher.get_error()}")

    def allowed(self) -> torch.Tensor | None:
        """(V,) bool: the tokens the grammar allows next (None once the row is done)."""
        if self.done:
            return None
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")  # (32 * words,)
        return torch.from_numpy(bits[:self.constraint.vocab_size].view(np.bool_))


def constraint_from_response_format(response_format: dict | None, tokenizer, model=None) -> Constraint | None:
    """What ``response_format`` on ``/v1/chat/completions`` and ``/v1/completions`` maps to: a ``Constraint`` for
    ``json_object`` / ``json_schema``, None for absent or ``{"type": "text"}``. An invalid schema or an unsupported
    keyword raises ``ConfigError`` naming it (a route answers 400 with that message). `model` supplies the logits'
    vocabulary size and eos ids (default: the tokenizer's)."""
    if response_format is None:
        return None
    vocab_size = model.config.vocab_size if model is not None else None
    eos = None
    if model is not None:
        from lmlab.generation.decode import resolve_config

        eos = resolve_config(model, None, tokenizer).eos_token_ids
    return Constraint.from_response_format(response_format, tokenizer, vocab_size=vocab_size, eos_token_ids=eos)
