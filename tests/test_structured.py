"""Structured output: a grammar step in the processor chain keeps every row's output valid JSON for its schema.

Most tests use a *random* tiny decoder: without the grammar its output is noise (never JSON), so output that
parses and validates can only come from the constraint.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

import lmlab
from lmlab.errors import ConfigError, DataError
from lmlab.generation import GenerationConfig, generate, stream
from lmlab.generation.constrain import Constraint, check_schema, load_schema

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                                           "maximum": 120},
                         "ok": {"type": "boolean"}}}
TAGS = {"type": "object", "additionalProperties": False, "required": ["tags", "kind"],
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3},
                       "kind": {"enum": ["x", "y"]}}}
SHORT = {"enum": ["yes", "no"]}
PROMPTS = ["#Person1#: hello there", "#Person2#: the bill is", "a", "#Person1#: what time is it?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return lmlab.load_model(tiny_model_dir), lmlab.load_tokenizer(tiny_model_dir)


def _constraint(tiny, schema=None, kind="json_schema"):
    model, tok = tiny
    return Constraint(tok, schema, kind=kind, vocab_size=model.config.vocab_size, eos_token_ids=[1])


def test_random_model_output_is_not_json_without_the_grammar(tiny):
    model, tok = tiny
    outs = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=30))
    for out in outs:
        with pytest.raises(json.JSONDecodeError):
            json.loads(out)


def test_greedy_batch_validates_against_the_schema(tiny):
    model, tok = tiny
    c = _constraint(tiny, PERSON)
    outs = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=80, constraint=c))
    for out in outs:
        jsonschema.validate(json.loads(out), PERSON)
        assert c.parse_output(out) == json.loads(out)


def test_sampling_each_row_keeps_its_own_schema_and_rows_leave_the_batch(tiny):
    """Four rows, three schemas and one free row; the short ones finish first and leave the batch
    (the loop drops finished rows), so the grammar step must keep following the right rows."""
    model, tok = tiny
    schemas = [SHORT, PERSON, None, TAGS]
    cons = [_constraint(tiny, s) if s is not None else None for s in schemas]
    for seed in range(3):
        config = GenerationConfig(max_new_tokens=80, do_sample=True, seed=[seed, seed + 10, seed + 20, seed + 30],
                                  top_k=50, constraint=cons)
        outs = generate(model, tok, PROMPTS, config)
        for out, schema in zip(outs, schemas):
            if schema is not None:
                jsonschema.validate(json.loads(out), schema)
        # the free row is what it would be without any constrained neighbours (per-row seeds)
        alone = generate(model, tok, PROMPTS, config.replace(constraint=None))
        assert outs[2] == alone[2]


def test_stream_equals_generate_under_a_constraint(tiny):
    model, tok = tiny
    c = _constraint(tiny, TAGS)
    config = GenerationConfig(max_new_tokens=60, do_sample=True, seed=3, constraint=c)
    streamed = "".join(stream(model, tok, PROMPTS[0], config))
    assert streamed == generate(model, tok, PROMPTS[0], config)
    jsonschema.validate(json.loads(streamed), TAGS)


def test_json_object_mode_gives_an_object(tiny):
    model, tok = tiny
    c = Constraint.from_response_format({"type": "json_object"}, tok, vocab_size=model.config.vocab_size,
                                        eos_token_ids=[1])
    out = generate(model, tok, PROMPTS[1], GenerationConfig(max_new_tokens=200, constraint=c))
    try:
        assert isinstance(json.loads(out), dict)
    except json.JSONDecodeError:  # a random model may write a long object: it must then be a valid prefix
        assert out.startswith("{") and len(tok.encode(out)) >= 190


def test_response_format_json_schema_and_text(tiny):
    model, tok = tiny
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    c = Constraint.from_response_format(rf, tok, vocab_size=model.config.vocab_size, eos_token_ids=[1])
    assert c.schema == PERSON
    assert Constraint.from_response_format({"type": "text"}, tok) is None
    with pytest.raises(ConfigError, match="type='xml'"):
        Constraint.from_response_format({"type": "xml"}, tok)
    with pytest.raises(ConfigError, match="json_schema needs"):
        Constraint.from_response_format({"type": "json_schema", "json_schema": {"name": "p"}}, tok)


def test_constraint_from_response_format_for_the_routes(tiny):
    from lmlab.generation.constrain import constraint_from_response_format

    model, tok = tiny
    assert constraint_from_response_format(None, tok, model) is None
    c = constraint_from_response_format({"type": "json_schema", "json_schema": {"name": "t", "schema": TAGS}}, tok, model)
    out = generate(model, tok, PROMPTS[2], GenerationConfig(max_new_tokens=60, constraint=c))
    jsonschema.validate(json.loads(out), TAGS)
    with pytest.raises(ConfigError, match="Unimplemented keys.*not"):
        constraint_from_response_format({"type": "json_schema", "json_schema": {"name": "t", "schema": {"not": {}}}},
                                        tok, model)


def test_bad_schemas_name_the_problem(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"properties/a/type.*'strin'"):
        _constraint(tiny, {"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(ConfigError, match="dependentSchemas"):
        _constraint(tiny, {"type": "object", "dependentSchemas": {"a": {}}})
    with pytest.raises(ConfigError, match="uniqueItems"):
        _constraint(tiny, {"type": "array", "uniqueItems": True})
    bad = tmp_path / "bad.json"
    bad.write_text("{type: object}")
    with pytest.raises(ConfigError, match="bad.json' is not valid JSON"):
        load_schema(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_schema(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_schema("[1, 2]")
    check_schema(PERSON)  # a valid one passes


def test_truncated_output_says_max_new_tokens(tiny):
    model, tok = tiny
    c = _constraint(tiny, PERSON)
    out = generate(model, tok, PROMPTS[0], GenerationConfig(max_new_tokens=3, constraint=c))
    with pytest.raises(DataError, match="max_new_tokens"):
        c.parse_output(out)


def test_constraint_config_validation(tiny):
    c = _constraint(tiny, PERSON)
    with pytest.raises(ConfigError, match="num_beams=2"):
        GenerationConfig(num_beams=2, constraint=c)
    with pytest.raises(ConfigError, match="must be a Constraint"):
        GenerationConfig(constraint="json")
    assert GenerationConfig(constraint=c).replace(max_new_tokens=5).constraint is c


def test_cli_generate_json_schema(tiny_model_dir, tmp_path, capsys):
    from lmlab.cli import main

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    assert main(["generate", str(tiny_model_dir), "hello", "--json-schema", str(schema), "--max-new-tokens", "80"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), PERSON)
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "strin"}}}))
    assert main(["generate", str(tiny_model_dir), "hello", "--json-schema", str(schema)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strin" in err[0]
    schema.write_text(json.dumps(PERSON))
    assert main(["generate", str(tiny_model_dir), "hello", "--json-schema", str(schema), "--max-new-tokens", "3"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    assert main(["generate", str(tiny_model_dir), "hello", "--json-object", "--max-new-tokens", "200"]) in (0, 2)
    out = capsys.readouterr().out
    assert out.startswith("{")


def test_extraction_fields_are_scored_against_the_summary():
    from lmlab.tasks.summarize.extract import SCHEMA, score_fields

    summary = "#Person1# and Tom agree to buy the blue car for 5,000 dollars."
    good = {"speakers": ["Person1", "Tom"], "topic": "buying a car", "decision": "buy the blue car", "amount": 5000}
    jsonschema.validate(good, SCHEMA)
    assert score_fields(good, summary, "car purchase") == {"speakers": True, "topic": True, "decision": True,
                                                          "amount": True}
    bad = {"speakers": ["Mary"], "topic": "weather", "decision": None, "amount": 2}  # "#Person2#" is no amount
    assert score_fields(bad, "#Person2# asks #Person1# about the rain.", "car purchase") == {
        "speakers": False, "topic": False, "decision": True, "amount": False}
    assert score_fields({"amount": None, "decision": None}, "They will meet at 3.", "x") == {
        "speakers": False, "topic": False, "decision": False, "amount": False}
    assert score_fields(None, summary, "car") == dict.fromkeys(("speakers", "topic", "decision", "amount"), False)


def test_extraction_run_with_the_grammar_is_always_valid(tiny):
    from lmlab.tasks.summarize import extract

    model, tok = tiny
    records = [{"fname": f"r{i}", "dialogue": PROMPTS[i], "summary": "#Person1# pays 5 dollars.", "topic": "pay"}
               for i in range(4)]
    tok.chat_template = tok.chat_template or "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    free = extract.run_extraction(records, model, tok, constrained=False, batch_size=4, max_new_tokens=40)
    held = extract.run_extraction(records, model, tok, constrained=True, batch_size=4, max_new_tokens=400)
    assert free.parsed == 0.0  # a random model never writes the JSON by itself
    assert held.parsed >= 0.75, held.outputs  # with the grammar: valid unless a row ran out of tokens
    for o in held.outputs:
        if o["valid"]:
            jsonschema.validate(o["value"], extract.SCHEMA)
