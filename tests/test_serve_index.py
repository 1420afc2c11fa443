"""`lmlab serve --index`: /v1/embeddings (the openai client; the vectors are lmlab.index.embed's), /v1/search,
/v1/documents, retrieval for chat completions with the sources returned, and ``response_format`` on both
completion endpoints (parses and validates; streaming; concurrent requests with different schemas)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from lmlab.cli import main
from lmlab.index import Index, embed
from serving import running_server, tiny_model, tiny_tokenizer
from test_index import DOCS

SCHEMA_A = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "blue"]},
                                             "ok": {"type": "boolean"}},
            "required": ["color", "ok"], "additionalProperties": False}
SCHEMA_B = {"type": "object", "properties": {"size": {"type": "integer", "minimum": 0, "maximum": 9},
                                             "unit": {"type": "string", "enum": ["cm", "m"]}},
            "required": ["size", "unit"], "additionalProperties": False}


def fmt(schema, name="x"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def idx(tmp_path_factory, minilm_path):
    return Index.build(tmp_path_factory.mktemp("serve-index") / "idx", DOCS, meta_fields=["topic"])[0]


@pytest.fixture(scope="module")
def pair():
    tok = tiny_tokenizer()
    return tiny_model(tok.vocab_size, max_seq_len=2048), tok


@pytest.fixture(scope="module")
def server(pair, idx):
    with running_server(lambda: pair, index=idx) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


# --- embeddings, search, documents -------------------------------------------------------------------
def test_embeddings_with_the_openai_client_equal_lmlab_index_embed(client):
    texts = ["a glass of lemonade", "the train station is two blocks north"]
    ref = embed(texts)  # (2, 384)
    got = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # the client asks for base64
    assert [d.index for d in got.data] == [0, 1] and got.model == "all-minilm-l6-v2"
    assert np.array_equal(np.array([d.embedding for d in got.data], dtype=np.float32), ref)
    floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], encoding_format="float")
    one = np.array(floats.data[0].embedding, dtype=np.float32)
    assert np.array_equal(one, embed(texts[:1])[0])  # one text alone: no padding, the same bytes
    assert got.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError, match="embeds with 'all-minilm-l6-v2'"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError, match=r"input\[1\] is empty"):
        client.embeddings.create(model="all-minilm-l6-v2", input=["x", " "])


def test_search_returns_the_index_hits(server, idx):
    url = server[0]
    r = httpx.post(f"{url}/v1/search", json={"query": "grilled salmon and lemonade", "k": 2, "mode": "hybrid"})
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert [h["id"] for h in hits] == [h.id for h in idx.search("grilled salmon and lemonade", k=2)]
    assert hits[0]["id"] == "d1" and set(hits[0]) >= {"id", "score", "text", "chunk", "meta"}
    r = httpx.post(f"{url}/v1/search", json={"query": "a table", "k": 5, "filter": {"topic": "restaurant"}})
    assert {h["id"] for h in r.json()["hits"]} == {"d1", "d5"}
    for body, param in [({"query": "x", "k": 0}, "k"), ({"query": "x", "mode": "fuzzy"}, "mode"),
                        ({"query": ""}, "query"), ({"query": "x", "filter": {"colour": "red"}}, "filter"),
                        ({"query": "x", "top": 3}, "top")]:
        r = httpx.post(f"{url}/v1/search", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    doc = httpx.get(f"{url}/v1/documents/d1").json()
    assert doc["text"] == DOCS[0]["dialogue"] and doc["meta"] == {"topic": "restaurant"}
    assert httpx.get(f"{url}/v1/documents/nope").status_code == 404


# --- retrieval for chat completions --------------------------------------------------------------------
def test_chat_retrieval_grounds_the_prompt_and_returns_the_sources(client, server, pair):
    messages = [{"role": "user", "content": "What did the customer order with the salmon?"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    grounded = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                              extra_body={"retrieval": {"k": 2}})
    sources = grounded.model_extra["sources"]
    assert [s["id"] for s in sources][0] == "d1" and len(sources) == 2
    assert not (plain.model_extra or {}).get("sources")
    assert grounded.usage.prompt_tokens > plain.usage.prompt_tokens + 30  # the sources are in the prompt
    body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True,
            "retrieval": {"k": 2, "mode": "bm25"}}
    with httpx.stream("POST", f"{server[0]}/v1/chat/completions", json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [s["id"] for s in events[-1]["sources"]][0] == "d1" and events[-1]["usage"]["prompt_tokens"] > 30
    assert all("sources" not in e for e in events[:-1])
    for retrieval, param in [({"k": 0}, "retrieval.k"), ({"mode": "x"}, "retrieval.mode"), ("yes", "retrieval"),
                             ({"depth": 2}, "retrieval")]:
        r = httpx.post(f"{server[0]}/v1/chat/completions",
                       json={"messages": messages, "max_tokens": 2, "retrieval": retrieval})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_without_an_index_the_routes_answer_400_naming_the_flag(pair):
    with running_server(lambda: pair) as (url, _):
        for method, path, body in [("POST", "/v1/embeddings", {"input": "x"}), ("POST", "/v1/search", {"query": "x"}),
                                   ("GET", "/v1/documents/d1", None),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                     "retrieval": {"k": 2}})]:
            r = httpx.request(method, f"{url}{path}", json=body)
            assert r.status_code == 400 and "--index INDEX" in r.json()["error"]["message"], (path, r.text)


def test_serve_refuses_a_missing_index_before_anything_else(tmp_path, capsys):
    assert main(["serve", "smollm2-135m-instruct", "--index", str(tmp_path / "nope"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope' does not exist" in err[0]


# --- response_format ---------------------------------------------------------------------------------------
def test_response_format_json_schema_parses_and_validates(client):
    messages = [{"role": "user", "content": "Pick a color."}]
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=1, seed=seed,
                                           response_format=fmt(SCHEMA_A))
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA_A)
    r = client.completions.create(model="tiny", prompt="Size:", max_tokens=40, temperature=0,
                                  extra_body={"response_format": fmt(SCHEMA_B)})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA_B)
    free = client.completions.create(model="tiny", prompt="Size:", max_tokens=10, temperature=0)
    assert not free.choices[0].text.startswith("{")  # without the constraint the random model writes no JSON
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_response_format_streams_and_each_concurrent_request_keeps_its_schema(client):
    chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Size?"}],
                                            max_tokens=40, temperature=0, stream=True, response_format=fmt(SCHEMA_B))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for p in pieces if p) >= 2
    jsonschema.validate(json.loads("".join(pieces)), SCHEMA_B)

    def one(i):
        schema = (SCHEMA_A, SCHEMA_B)[i % 2]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Item {i}"}],
                                           max_tokens=40, temperature=0.8, seed=i, response_format=fmt(schema))
        return schema, json.loads(r.choices[0].message.content)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    for schema, value in results:
        jsonschema.validate(value, schema)
        other = SCHEMA_B if schema is SCHEMA_A else SCHEMA_A
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, other)


def test_bad_response_format_is_a_400_naming_it(client):
    messages = [{"role": "user", "content": "x"}]
    cases = [(fmt({"type": "objekt"}), "'objekt'"), (fmt({"type": "object", "if": {}, "then": {}}), '"if"'),
             ({"type": "xml"}, "'xml'"), ({"type": "json_schema"}, "json_schema")]
    for response_format, named in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                           response_format=response_format)
        assert named in str(err.value) and err.value.body["param"] == "response_format", err.value
    with pytest.raises(openai.BadRequestError, match="n=2 with response_format"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, n=2,
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="'objekt'"):
        client.completions.create(model="tiny", prompt="x", max_tokens=5,
                                  extra_body={"response_format": fmt({"type": "objekt"})})
